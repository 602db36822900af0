"""A preprocess processor stuck on a shard (a read that never returns: the shard's completion record
is a FIFO nobody writes, as a mount that stopped answering would be) is stopped by its watchdog with
its stacks in the log folder; the same processor waiting between shards is never taken for stalled."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.workers.train_fixture import make_preprocess
from workers.stall_watchdog import STALL_EXIT, read_records

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, os, sys, time
sys.path.insert(0, {repo!r})
from pipelines.data.config import PreprocessConfig
from pipelines.data.sources import read_units
from workers.preprocess.tasks import ShardProcessor, read_shards, unit_batch
from workers.run_layout import RunLayout

layout = RunLayout.open({run!r})
cfg = PreprocessConfig.model_validate(json.load(open(layout.manifest("preprocess")))["config"])
units = read_units(cfg.source)
rows = list(read_shards(unit_batch(units), cfg.model_dump_json()))
processor = ShardProcessor(cfg.model_dump_json(), 0, layout, log_dir={logs!r}, stall_timeout_s=8)
time.sleep(12)  # idle between shards: not a stall
processor(rows[0])
print("shard 0 done", flush=True)
time.sleep(12)
record = layout.shard_record(rows[1].column("shard_id")[0].as_py())
os.remove(record)
os.mkfifo(record)
processor(rows[1])
print("never", flush=True)
"""


def test_a_processor_stuck_on_a_shard_is_stopped_with_its_stacks(tmp_path: Path) -> None:
    layout = make_preprocess(str(tmp_path / "run"), documents=40, shards=4)
    logs = tmp_path / "logs"
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(repo=str(REPO), run=layout.root, logs=str(logs))],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == STALL_EXIT, done.stderr[-2000:]
    assert time.monotonic() - started < 100
    [record] = read_records(str(logs))
    assert record.name.startswith("preprocess processor-") and record.last_progress.startswith("shard 00000-")
    # blocked opening the shard's record (a FIFO): in the record reader, called from `_finished`
    assert "read_record" in record.where[-1] and "open(path" in record.where[-1]
    assert any("_finished" in frame for frame in record.where[:-1])
    assert "in _one" in Path(record.stacks).read_text()
    [logged] = [p.read_text() for p in logs.iterdir() if p.name.startswith("processor-")]  # its stdout and stderr
    assert "shard 0 done" in logged and "never" not in logged
    assert logged.index("shard 0 done") < logged.index("made no progress")  # idle waits never fired it
