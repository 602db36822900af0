"""A resumed preprocess stage finds each finished shard by its id: no folder is listed, nothing is redone,
and the records it returns carry where this run read the shard from (its units may be cut otherwise)."""
import json
import os

from pipelines.data.config import PreprocessConfig
from pipelines.data.sources import read_units
from tests.workers.train_fixture import make_preprocess
from workers.preprocess.tasks import ShardProcessor, read_shards, shard_results, unit_batch


def test_finished_shards_are_looked_up_not_listed_nor_redone(tmp_path, monkeypatch) -> None:
    layout = make_preprocess(str(tmp_path / "run"), documents=60, shards=4)
    cfg = PreprocessConfig.model_validate(json.load(open(layout.manifest("preprocess")))["config"])
    before = {name: os.stat(os.path.join(layout.path("preprocess", ".shards"), name)).st_mtime_ns
              for name in os.listdir(layout.path("preprocess", ".shards"))}
    units = read_units(cfg.source)
    processor = ShardProcessor(cfg.model_dump_json(), 0, layout)
    rows = list(read_shards(unit_batch(units), cfg.model_dump_json()))

    def no_listing(*_args, **_kwargs):
        raise AssertionError("a resumed shard was found by listing a folder")

    monkeypatch.setattr(os, "listdir", no_listing)
    monkeypatch.setattr(os, "scandir", no_listing)
    monkeypatch.setattr("workers.preprocess.tasks.process_shard",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("a finished shard was made again")))
    records = [r for rows_ in rows for r in shard_results(processor(rows_))]
    monkeypatch.undo()
    assert len(records) == len(before) == 4
    assert all(r.unit == 0 and r.read_span[1] > r.read_span[0] for r in records)
    after = {name: os.stat(os.path.join(layout.path("preprocess", ".shards"), name)).st_mtime_ns
             for name in os.listdir(layout.path("preprocess", ".shards"))}
    assert after == before  # no record rewritten
