"""The real preprocess stage on the gensim dump cut into read units inside the file: the same shards, byte
for byte, as one reader per file, on another number of workers."""
import os

import pytest

from orchestrator.job_graph import run_pipeline
from orchestrator.recipe.load import load_recipe

pytestmark = pytest.mark.integration


def _run(run_dir, overrides):
    recipe = load_recipe("tiny", overrides)
    return run_pipeline(recipe, str(run_dir), stages=["preprocess"], console=lambda _: None)["preprocess"]


def test_a_dump_cut_into_units_gives_the_shards_of_one_unit(ray_local, tmp_path):
    one = _run(tmp_path / "one", ["preprocess.source.read_unit_mb=1024", "preprocess.num_workers=1"])
    cut = _run(tmp_path / "cut", ["preprocess.source.read_unit_mb=0.25", "preprocess.num_workers=2"])
    assert one.stats["read_units"] == 1 and cut.stats["read_units"] >= 2
    shards = sorted(rel for rel in one.outputs if rel.endswith(".parquet"))
    assert len(shards) >= 2 and cut.outputs == one.outputs  # every output file, by content hash
    for rel in shards:
        with open(tmp_path / "one" / "preprocess" / rel, "rb") as a, open(tmp_path / "cut" / "preprocess" / rel, "rb") as b:
            assert a.read() == b.read()
    assert cut.fingerprint == one.fingerprint  # the unit size is operational: it changes no output byte
    assert one.stats["documents_train"] + one.stats["documents_validation"] > 90  # the whole dump was read
    assert {k: v for k, v in cut.stats.items() if k != "read_units"} == {
        k: v for k, v in one.stats.items() if k != "read_units"}
    assert os.listdir(tmp_path / "cut" / "preprocess" / ".shards")
