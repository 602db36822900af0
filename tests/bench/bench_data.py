"""Pretraining data path benchmark (`make bench-data`): prints one table.

The corpus is the `tiny` recipe's real preprocess output (the gensim Wikipedia fragment, length 128,
dynamic masking), and the same shards repeated 16 times (16x the rows, as a bigger corpus would be).
For each, in a fresh process (so its peak RSS is its own), one loader process (rank 0 of 1 and of 4
workers, global batch 256, micro-batch 32) streams 200 steps in the global epoch order and builds
model-ready tensors (padding, attention masks, dynamic MLM masks):

- throughput: real tokens delivered as tensors per second (goal >= 1M tokens/s per loader process);
- first-batch latency: from opening the split to the first step's tensors;
- peak RSS of the loader process (goal: 16x corpus / 1x corpus <= 1.1: memory does not grow with the
  corpus);
- beside them, the rate a training step consumes tokens: one forward+backward of the tiny BERT on a
  32 x 128 batch in this process (the loader must stay well ahead of it).

Usage: python tests/bench/bench_data.py [--steps 200]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)


def _corpus(root: str) -> str:
    """The tiny recipe's preprocess stage, for real (Ray Data), once."""
    run_dir = os.path.join(root, "x1")
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", "tiny", "--stages", "preprocess", "--run-dir", run_dir,
           "--set", "ray.num_cpus=2", "--set", "tracking.enabled=false"]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return run_dir


def _repeat(source: str, target: str, times: int) -> None:
    """The same shards `times` times over, with a record that lists them all (as a bigger corpus)."""
    from workers.run_layout import RunLayout
    from workers.stage_outputs import PreprocessOutput, load_manifest, write_manifest

    shutil.copytree(source, target)
    layout = RunLayout.open(target)
    manifest = load_manifest(layout, "preprocess")
    train = manifest.output["splits"]["train"]
    shards = []
    for copy in range(times):
        for shard in train["shards"]:
            name = f"copy{copy:02d}-{shard['name']}"
            os.link(layout.shard("train", shard["name"]), layout.shard("train", name))
            shards.append({**shard, "name": name})
    manifest.output["splits"]["train"] = {"shards": shards, "rows": train["rows"] * times}
    write_manifest(layout, manifest, PreprocessOutput)


def measure(run_dir: str, steps: int, world: int) -> dict:
    """In this process: stream `steps` steps as rank 0 of `world`."""
    from workers.run_layout import RunLayout
    from workers.train.inputs import PretrainingInputs
    from workers.train.streaming import GlobalCursor

    started = time.perf_counter()
    inputs = PretrainingInputs(RunLayout.open(run_dir), seed=1, rank=0, world=world, global_batch=256, micro_batch=32,
                               eval_samples=0)
    cursor, tokens, first = GlobalCursor(), 0, None
    loop_started = None
    for _ in range(steps):
        batches = inputs.train.step_batches(cursor)
        if first is None:
            first = time.perf_counter() - started
            loop_started = time.perf_counter()
        else:
            tokens += sum(int(b["attention_mask"].sum()) for b in batches)
        cursor = inputs.train.advance(cursor)
    elapsed = time.perf_counter() - loop_started
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tokens_per_s": tokens / elapsed, "first_batch_s": first, "rss_mib": rss_mib,
            "rows": inputs.train.order.rows}


def step_consumption() -> float:
    """Tokens per second one training step of the tiny BERT consumes (forward + backward, one thread)."""
    import torch

    from pipelines.models.build import build_pretraining_model
    from pipelines.models.config import BertInit, ModelConfig

    torch.set_num_threads(1)
    model = build_pretraining_model(ModelConfig(init=BertInit(max_position_embeddings=128)), vocab_size=4000, seed=0)
    ids = torch.randint(5, 4000, (32, 128))
    labels = torch.where(torch.rand(32, 128) < 0.15, ids, -100)
    nsp = torch.zeros(32, dtype=torch.long)
    times = []
    for _ in range(6):
        t = time.perf_counter()
        model(input_ids=ids, labels=labels, next_sentence_label=nsp).loss.backward()
        times.append(time.perf_counter() - t)
    return 32 * 128 / sorted(times[1:])[len(times[1:]) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--measure", nargs=2, metavar=("RUN_DIR", "WORLD"))
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], args.steps, int(args.measure[1]))))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        x1 = _corpus(tmp)
        x16 = os.path.join(tmp, "x16")
        _repeat(x1, x16, 16)
        results = {}
        for label, run_dir in (("1x", x1), ("16x", x16)):
            for world in (1, 4):
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--steps", str(args.steps),
                                      "--measure", run_dir, str(world)], check=True, capture_output=True, text=True,
                                     cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"})
                results[(label, world)] = json.loads(out.stdout.strip().splitlines()[-1])
    consumed = step_consumption()
    for (label, world), r in results.items():
        rows.append((f"corpus {label} ({r['rows']:,} rows), rank 0 of {world}", f"{r['tokens_per_s']:,.0f}",
                     f"{r['first_batch_s']:.2f}", f"{r['rss_mib']:.0f}"))
    print(f"\nstreaming loader, global batch 256, micro-batch 32, {args.steps} steps, one process each")
    width = max(len(r[0]) for r in rows)
    print(f"{'loader'.ljust(width)}  {'tokens/s':>12}  {'first (s)':>9}  {'peak RSS MiB':>12}")
    for name, tps, first, rss in rows:
        print(f"{name.ljust(width)}  {tps:>12}  {first:>9}  {rss:>12}")
    ratio = results[("16x", 1)]["rss_mib"] / results[("1x", 1)]["rss_mib"]
    worst = min(r["tokens_per_s"] for r in results.values())
    print(f"\npeak RSS 16x / 1x (rank 0 of 1): {ratio:.3f}  (goal <= 1.1: {'met' if ratio <= 1.1 else 'missed'})")
    print(f"slowest loader: {worst:,.0f} tokens/s  (goal >= 1,000,000: {'met' if worst >= 1e6 else 'missed'})")
    print(f"a tiny-BERT training step consumes {consumed:,.0f} tokens/s (forward+backward, 32x128, one thread): "
          f"the loader runs {worst / consumed:.0f}x faster")


if __name__ == "__main__":
    main()
