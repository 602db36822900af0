"""The preprocess stage end to end on a real local Ray instance, over real Wikipedia and a local HF dataset."""
import io
import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from orchestrator.console import Console
from orchestrator.job_graph import run_pipeline
from orchestrator.recipe.load import load_recipe
from workers.stage_outputs import PreprocessOutput

pytestmark = pytest.mark.integration  # Ray, DeepSpeed, a server or a subprocess pipeline

FAST = ["preprocess.source.max_documents=40", "preprocess.documents_per_shard=8"]
STATS_KEYS = {"documents_train", "documents_validation", "documents_skipped", "sentences", "instances_train",
              "instances_validation", "tokens", "short_seq_fraction", "nsp_random_fraction", "masked_token_fraction",
              "max_seq_length", "fingerprint"}
CONSOLE: dict[str, str] = {}  # what a fixture's run printed


def _run(run_dir, overrides=(), lines=None, console=None, **kw):
    recipe = load_recipe("tiny", [*FAST, *overrides])
    return run_pipeline(recipe, str(run_dir), stages=["preprocess"],
                        console=console or (lines.append if lines is not None else lambda _: None), **kw)


@pytest.fixture(scope="module")
def two_workers(ray_local, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("w2")
    out = io.StringIO()  # the console a log file gets (not a terminal)
    manifest = _run(run_dir, ["preprocess.num_workers=2"], console=Console(out, tty=False))["preprocess"]
    CONSOLE["two_workers"] = out.getvalue()
    return run_dir, manifest


def test_the_live_line_follows_the_source_read(two_workers):
    """The stage's live line: the share of the dump's bytes its finished shards cover, growing."""
    text = CONSOLE["two_workers"]
    live = [line for line in text.splitlines() if "of source read" in line]
    assert live, text
    shares = [int(line.split("(")[1].split("%")[0]) for line in live]
    assert shares == sorted(shares) and shares[-1] < 100  # the result line, not the live line, says done
    size = os.path.getsize(load_recipe("tiny", FAST).preprocess.source.files()[0])
    assert all(line.startswith("[preprocess] ") and f"/{size / 1e6:.1f} MB of source read" in line for line in live)
    assert "shards" in live[-1] and "tokens/s" in live[-1]


def test_outputs_stats_and_layout(two_workers):
    run_dir, manifest = two_workers
    stats = manifest.stats
    assert STATS_KEYS <= set(stats)
    assert stats["documents_train"] + stats["documents_validation"] + stats["documents_skipped"].get(
        "disambiguation", 0) == 40
    assert stats["documents_skipped"]["redirect"] > 0 and stats["instances_validation"] > 0
    assert stats["masked_token_fraction"] is None  # dynamic masking: masks are drawn at batch time
    assert manifest.fingerprint == stats["fingerprint"]
    tok = AutoTokenizer.from_pretrained(str(run_dir / "preprocess" / "tokenizer"))
    rows = 0
    for rel in manifest.outputs:
        if rel.endswith(".parquet"):
            table = pq.read_table(run_dir / "preprocess" / rel)
            assert table.column_names == ["input_ids", "token_type_ids", "next_sentence_label",
                                          "masked_lm_positions", "masked_lm_ids"]
            for ids in table.column("input_ids").to_pylist()[:50]:
                assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and len(ids) <= 128
                assert max(ids) < len(tok)
            rows += table.num_rows
    assert rows == stats["instances_train"] + stats["instances_validation"]
    record = PreprocessOutput.model_validate(manifest.output)  # what the training stages read
    assert record.splits["train"].rows == stats["instances_train"]
    assert record.splits["validation"].rows == stats["instances_validation"]
    assert record.masking.kind == "dynamic" and record.masking.max_predictions_per_seq == 20
    assert record.tokenizer == "preprocess/tokenizer" and record.vocab_size == len(tok)
    assert not [f for f in os.listdir(run_dir / "preprocess" / "train") if f.startswith(".tmp")]


def test_same_bytes_with_one_worker_and_on_rerun(two_workers, tmp_path):
    _, manifest2 = two_workers
    manifest1 = _run(tmp_path, ["preprocess.num_workers=1"])["preprocess"]
    assert manifest1.outputs == manifest2.outputs  # content hashes, file by file
    assert manifest1.fingerprint == manifest2.fingerprint


def test_rerun_skips_then_redoes_what_changed(two_workers):
    run_dir, manifest = two_workers
    lines = []
    _run(run_dir, ["preprocess.num_workers=2"], lines)
    assert "[preprocess] up to date (manifest matches): skipped" in lines
    shard = sorted(r for r in manifest.outputs if r.startswith("train/"))[0]
    os.unlink(run_dir / "preprocess" / shard)
    os.unlink(run_dir / "preprocess" / ".shards" / (shard.split("shard-")[1][:-8] + ".json"))
    lines.clear()
    redone = _run(run_dir, ["preprocess.num_workers=2"], lines)["preprocess"]
    assert f"[preprocess] resuming (output {shard} is missing: made again from what the stage kept)" in lines
    assert redone.outputs == manifest.outputs  # only that shard was redone, byte for byte


def test_static_masking_and_changed_recipe_redoes_stage_only_when_named(ray_local, tmp_path):
    lines = []
    _run(tmp_path, [], lines)
    static = ["preprocess.masking=static", "preprocess.dupe_factor=2"]
    with pytest.raises(ValueError, match=r"(?s)preprocess.masking 'dynamic' -> 'static'.*finished shard"):
        _run(tmp_path, static, lines)
    assert len(os.listdir(tmp_path / "preprocess" / "train")) > 0  # nothing was deleted
    m = _run(tmp_path, static, lines, redo=["preprocess"])["preprocess"]
    assert "[preprocess] running (--redo)" in lines
    assert abs(m.stats["masked_token_fraction"] - 0.15) < 0.02
    table = pq.read_table(tmp_path / "preprocess" / sorted(r for r in m.outputs if r.startswith("train/"))[0])
    row = table.slice(0, 1).to_pylist()[0]
    assert len(row["masked_lm_positions"]) == len(row["masked_lm_ids"]) > 0


def test_local_hf_dataset_source(ray_local, tmp_path):
    import datasets

    texts = [f"Document {i} talks about topic {i % 7}. It has a second sentence. And a third one about item {i}."
             for i in range(60)]
    saved = tmp_path / "hf_saved"
    datasets.Dataset.from_dict({"id": [str(i) for i in range(60)], "title": [f"T{i}" for i in range(60)],
                                "text": texts}).save_to_disk(str(saved))
    folder = tmp_path / "hf_folder"
    folder.mkdir()
    with open(folder / "train.jsonl", "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": str(i), "title": f"T{i}", "text": t}) + "\n")
    common = ["preprocess.tokenizer.train_documents=60", "preprocess.source.max_documents=null",
              "preprocess.min_document_tokens=4"]
    by_path = _run(tmp_path / "a", ["preprocess.source.kind=hf_dataset", f"preprocess.source.path={saved}", *common])
    # The hub code path (datasets.load_dataset by name), pointed at a local data folder.
    by_name = _run(tmp_path / "b", ["preprocess.source.kind=hf_dataset", "preprocess.source.path=null",
                                    f"preprocess.source.name={folder}", *common])
    for m in (by_path["preprocess"], by_name["preprocess"]):
        s = m.stats
        assert s["documents_train"] + s["documents_validation"] == 60
        assert s["instances_train"] > 0
    # Same documents, same ids: the same split.
    assert by_path["preprocess"].stats["documents_validation"] == by_name["preprocess"].stats[
        "documents_validation"]


def test_cli_end_to_end_and_lock(tmp_path):
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", "tiny", "--run-dir", str(tmp_path / "run"),
           "--stages", "preprocess", "--set", "preprocess.source.max_documents=16", "--set", "ray.num_cpus=2"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert first.returncode == 0, first.stderr[-2000:]
    summary = first.stdout[first.stdout.index("\nstage "):]  # the run's closing table
    assert "[preprocess] done" in first.stdout and "outputs" in summary and " instances, " in summary
    assert "[preprocess] running\n" in first.stdout  # a first start: no "(not started)"
    assert "\ntotal " in summary and "pofa: done in " in summary.splitlines()[-1]
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert "[preprocess] up to date (manifest matches): skipped" in second.stdout
    assert os.path.exists(tmp_path / "run" / "recipe.yaml")
