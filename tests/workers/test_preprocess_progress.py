"""The preprocess stage's progress: the part of the source its finished shards cover, from the shard
records its real producers write (`read_shards`, `ShardProcessor`), in any order they finish."""
import json
import os
import random
import shutil

from pipelines.data.config import PreprocessConfig
from pipelines.data.sources import read_units
from tests.workers.train_fixture import make_preprocess
from workers.preprocess.job import SourceProgress
from workers.preprocess.tasks import ShardProcessor, read_shards, shard_results, unit_batch
from workers.run_records import ShardRecord, read_record


def test_finished_shards_cover_the_source_whatever_their_order(tmp_path) -> None:
    layout = make_preprocess(str(tmp_path / "run"), documents=60, shards=6)
    cfg = PreprocessConfig.model_validate(json.load(open(layout.manifest("preprocess")))["config"])
    corpus = cfg.source.path
    folder = tmp_path / "corpus"
    folder.mkdir()
    shutil.copy(corpus, folder / "a.txt")
    with open(corpus) as f:  # a second, smaller unit
        (folder / "b.txt").write_text("".join(f.readlines()[: 40]))
    cfg = cfg.model_copy(update={"source": cfg.source.model_copy(update={"path": str(folder / "*.txt")})})
    units = read_units(cfg.source)
    processor = ShardProcessor(cfg.model_dump_json(), 0, layout)
    batch = unit_batch(units)
    records = [r for rows in read_shards(batch, cfg.model_dump_json()) for r in shard_results(processor(rows))]
    assert {r.shard_id[:5] for r in records} == {"00000", "00001"} and len(records) > 6
    for unit in ("00000", "00001"):  # each unit's shards tile it from 0 to 1
        spans = [r.read_span for r in sorted(records, key=lambda r: r.shard_id) if r.shard_id.startswith(unit)]
        assert spans[0][0] == 0.0 and spans[-1][1] == 1.0
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(spans, spans[1:]))
    assert read_record(ShardRecord, layout.shard_record(records[0].shard_id), "preprocess") == records[0]

    random.Random(0).shuffle(records)  # processors finish in any order
    progress = SourceProgress(cfg, units)
    assert progress.total == sum(os.path.getsize(u.location) for u in units)
    seen = [progress.add(r) for r in records]
    done = [d for d, _, _ in seen]
    assert done == sorted(done) and done[-2] < progress.total and abs(done[-1] - progress.total) <= 1
    assert seen[-1][2]["shards"] == len(records) and seen[-1][2]["tokens"] == sum(r.stats.tokens for r in records)
