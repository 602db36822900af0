"""Training-engine benchmark (`make bench-train`): prints one table.

- step time of the same tiny training (2 workers, ZeRO-2, CPU) under Ray Train vs a bare
  `torchrun` + DeepSpeed launch of the same worker code (goal: ratio <= 1.05);
- time from the command to the first training step (goal <= 30 s);
- checkpoint save and load times;
- with a CUDA GPU: one BERT-Base teacher step in bf16, tokens/s and model FLOPs utilisation.

Usage: python tests/bench/bench_train.py [--steps 40] [--workers 2]
(internally re-invoked as `torchrun ... bench_train.py --bare RUN_DIR` for the bare side).
"""
from __future__ import annotations

import time

COMMAND_START = time.time()  # before the heavy imports: "time from command" includes them

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _spec(run_dir: str, steps: int, workers: int, checkpoint_every: int | None = None):
    from pipelines.models.config import BertInit, ModelConfig
    from pipelines.training.config import TrainConfig
    from tests.workers.train_fixture import tiny_train
    from workers.run_layout import RunLayout
    from workers.train.spec import TrainSpec

    train = TrainConfig(**tiny_train(num_workers=workers, max_steps=steps, eval_every=10**6,
                                     checkpoint_every=checkpoint_every or steps, keep_checkpoints=2))
    model = ModelConfig(init=BertInit(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=128))
    return TrainSpec(stage="teacher", layout=RunLayout.open(run_dir), train=train, model=model, seed=1,
                     progress=False)


def _median_step_time(step_ends: list[float], skip: int = 3) -> float:
    gaps = [b - a for a, b in zip(step_ends, step_ends[1:])][skip:]
    return statistics.median(gaps)


def bare_main(run_dir: str, steps: int) -> None:
    """One torchrun rank: the same Worker code, no Ray."""
    import torch
    import torch.distributed as dist

    from workers.train.pretraining_worker import PretrainingWorker

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = _spec(os.path.join(run_dir, "bare"), steps, world)
    worker = PretrainingWorker(spec, rank, world, torch.device("cpu"), in_ray=False)
    ends = []
    for _ in range(steps):
        metrics = worker.train_step()
        worker.tracker.log(metrics, worker.step)
        ends.append(time.perf_counter())
    t = time.perf_counter()
    worker.save_checkpoint({})
    save_s = time.perf_counter() - t
    if rank == 0:
        with open(os.path.join(run_dir, "bare", "bare.json"), "w") as f:
            json.dump({"step_s": _median_step_time(ends), "save_s": save_s}, f)
    dist.destroy_process_group()


def _records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def ray_side(run_dir: str, steps: int, workers: int) -> dict[str, float]:
    import ray

    from workers.run_records import TrainSummary, read_record
    from workers.train.driver import run_training

    imported = time.time()
    ray.init(num_cpus=max(4, workers * 2), log_to_driver=False)  # keep the table readable
    spec = _spec(os.path.join(run_dir, "ray"), steps, workers, checkpoint_every=steps // 2)
    called = time.time()
    run_training(spec, echo=False)
    records = [r for r in _records(spec.run.metrics) if "loss" in r]
    first = read_record(TrainSummary, spec.run.summary, spec.run.stage).timings  # rank 0's start-up marks
    # time a checkpoint load: set the final checkpoint aside and rerun the same run, which resumes from
    # the one before it (the same recipe: a longer run would change the LR schedule, which is refused)
    final = spec.run.checkpoint_step(steps)
    os.rename(final, final + "-set-aside")
    run_training(spec, echo=False)
    resumed = read_record(TrainSummary, spec.run.summary, spec.run.stage).timings
    ray.shutdown()
    return {"step_s": _median_step_time([r["time"] for r in records]),
            "call_to_first_step_s": records[0]["time"] - called,
            "command_to_first_step_s": records[0]["time"] - COMMAND_START,
            # where the start-up goes (rank 0's marks)
            "startup": {"imports (torch, Ray, pofa)": imported - COMMAND_START,
                        "ray.init (local instance)": called - imported,
                        "Ray Train: controller, worker group, process group": first["entered_at"] - called,
                        "worker build: model, DeepSpeed engine, data open": (first["built_at"]
                                                                             - first["entered_at"]),
                        "resume check": first["resumed_at"] - first["built_at"],
                        "first step": records[0]["time"] - first["resumed_at"]},
            "save_s": first["checkpoint_save_s"][-1],
            "load_s": resumed["checkpoint_load_s"]}


def bare_side(run_dir: str, steps: int, workers: int) -> dict[str, float]:
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", f"--nproc_per_node={workers}", os.path.abspath(__file__), "--bare", run_dir,
           "--steps", str(steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}  # as Ray gives each 1-CPU worker
    subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(run_dir, "bare", "bare.json")) as f:
        return json.load(f)


def gpu_bert_base() -> dict[str, float] | None:
    """One process, BERT-Base MLM+NSP, bf16, ZeRO-2, seq 128: tokens/s and MFU (H100 bf16 dense peak)."""
    import torch

    if not torch.cuda.is_available():
        return None
    import deepspeed
    from transformers import AutoModelForPreTraining, BertConfig

    os.environ.pop("DS_ACCELERATOR", None)
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29513", "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(key, value)
    model = AutoModelForPreTraining.from_config(BertConfig())
    params = sum(p.numel() for p in model.parameters())
    batch, seq = 64, 128
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
                                      config={"train_micro_batch_size_per_gpu": batch, "bf16": {"enabled": True},
                                              "zero_optimization": {"stage": 2},
                                              "zero_allow_untested_optimizer": True})
    ids = torch.randint(1000, 30000, (batch, seq), device=engine.device)
    labels = torch.where(torch.rand_like(ids, dtype=torch.float) < 0.15, ids, -100)
    nsp = torch.zeros(batch, dtype=torch.long, device=engine.device)
    times = []
    for _ in range(13):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = engine(input_ids=ids, labels=labels, next_sentence_label=nsp)
        engine.backward(out.loss)
        engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    step = statistics.median(times[3:])
    tokens_per_s = batch * seq / step
    peak = 989e12  # H100 SXM dense bf16
    return {"step_s": step, "tokens_per_s": tokens_per_s, "mfu": 6 * params * tokens_per_s / peak}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--bare", metavar="RUN_DIR")
    args = parser.parse_args()
    if args.bare:
        bare_main(args.bare, args.steps)
        return
    from tests.workers.train_fixture import make_preprocess

    with tempfile.TemporaryDirectory() as tmp:
        for side in ("ray", "bare"):  # the same data twice: each side is its own run directory
            make_preprocess(os.path.join(tmp, side), documents=1200)
        ray_ = ray_side(tmp, args.steps, args.workers)
        bare = bare_side(tmp, args.steps, args.workers)
    rows = [
        ("step time, Ray Train (median, s)", f"{ray_['step_s']:.4f}", ""),
        ("step time, bare torchrun (median, s)", f"{bare['step_s']:.4f}", ""),
        ("ratio Ray Train / bare", f"{ray_['step_s'] / bare['step_s']:.3f}", "goal <= 1.05"),
        ("command -> first step (s)", f"{ray_['command_to_first_step_s']:.1f}", "goal <= 30"),
        ("run_training() call -> first step (s)", f"{ray_['call_to_first_step_s']:.1f}", ""),
        *[(f"  start-up: {phase} (s)", f"{secs:.1f}", "") for phase, secs in ray_["startup"].items()],
        ("checkpoint save (s)", f"{ray_['save_s']:.3f}", f"bare: {bare['save_s']:.3f}"),
        ("checkpoint load (s)", f"{ray_['load_s']:.3f}", ""),
    ]
    gpu = gpu_bert_base()
    if gpu is not None:
        rows += [("BERT-Base bf16 step (s)", f"{gpu['step_s']:.3f}", "1 GPU, batch 64 x 128"),
                 ("BERT-Base tokens/s", f"{gpu['tokens_per_s']:.0f}", ""),
                 ("BERT-Base MFU", f"{gpu['mfu']:.1%}", "vs 989 TFLOP/s bf16")]
    width = max(len(r[0]) for r in rows)
    print(f"\ntiny BERT (2 layers, hidden 64), {args.workers} workers, ZeRO-2, CPU, global batch 16, "
          f"{args.steps} steps")
    print(f"{'measure'.ljust(width)}  {'value':>10}  note")
    for name, value, note in rows:
        print(f"{name.ljust(width)}  {value:>10}  {note}")


if __name__ == "__main__":
    main()
