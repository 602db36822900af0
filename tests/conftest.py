"""Shared fixtures: one local Ray instance per test session, and the real data gensim ships."""
from __future__ import annotations

import os

import pytest

from pipelines.data.paths import resolve_source_path
from workers import native_ops

# pofa's DeepSpeed build settings and ops folder for the test process and every process it starts
# (subprocesses, local Ray workers): the same as the CLI's, so the ops `make install` built are the ones
# the tests load, and no test rebuilds them with other settings.
native_ops.configure()

GENSIM_WIKI = "pkg://gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
GENSIM_POLARITY = "pkg://gensim/test/test_data/pang_lee_polarity.cor"


# Fixtures that start real services: a test using one is in the integration tier whatever its module says.
_SERVICE_FIXTURES = {"ray_local", "s3"}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if _SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance shared by the integration tests (starting one costs seconds)."""
    import ray

    if not ray.is_initialized():
        from workers.preemption import SETUP_HOOK

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))},
                              "worker_process_setup_hook": SETUP_HOOK})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def wiki_dump() -> str:
    path = resolve_source_path(GENSIM_WIKI)
    assert os.path.exists(path), "gensim's Wikipedia fragment is missing: is gensim installed?"
    return path


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3-compatible server (moto, IAM enforced) for the tests of object-store run directories."""
    from tests.s3_server import s3_server

    with s3_server(str(tmp_path_factory.mktemp("moto") / "moto.log")) as server:
        yield server
