"""GPU benchmark (`make bench-gpu`): pofa's training steps and kernels on one GPU, in one run of
at most 8 minutes, written as a JSON and a table. A script, not a test.

At BERT-Base shape (12 layers, hidden 768, vocab 30522), batch 256 x 128 from pofa's collator, bf16:
  teacher_step   the teacher stage's step on pofa's DeepSpeed engine (ZeRO-2, one GPU): ms/step,
                 tokens/s, MFU (FLOP formula in tests/bench/gpu/flops.py)
  student_step   the student stage's KD step: frozen teacher, KD loss, GMP masks through the DeepSpeed
                 mask enforcer; then the masks checked exact
  kd_kernel      the KD loss on the MLM logits: pofa's chunked kernel against the straightforward form
                 (value and time, forward + backward)
  sparse24       the 2:4-pruned student's Linear layers on torch's semi-structured sparse kernels
                 (cuSPARSELt, CUTLASS) against dense, per Linear shape and for the whole forward
Without a GPU it prints one line and exits 0. `--device cpu --tiny` runs every measurement at a tiny
shape on the CPU (what tests/bench/test_bench_gpu.py does). A measurement that cannot run here is
skipped with one line naming why; the budget (--budget-s) truncates loops, and a hard limit ends the
run with what it has. Exit status: 0, or 1 when a measurement failed or a correctness check did.

Usage: python tests/bench/bench_gpu.py [--out bench-out/bench-gpu.json] [--batch 256] [--seq 128]
       [--peak-tflops X] [--only kd_kernel,sparse24,teacher_step,student_step] [--device cpu --tiny]
"""
from __future__ import annotations

import time

STARTED = time.monotonic()  # the budget counts the imports too

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import importlib.metadata  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from typing import Any, Callable  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from workers.errors import first_line  # noqa: E402

MEASUREMENTS = ("kd_kernel", "sparse24", "teacher_step", "student_step")  # cheap and engine-free first
MIN_SECONDS = {"kd_kernel": 10, "sparse24": 15, "teacher_step": 40, "student_step": 60}  # to start one on a GPU


def say(line: str) -> None:
    print(line, flush=True)


def no_gpu_line() -> str | None:
    """The one line for a machine without a usable GPU, or None when there is one."""
    try:
        import torch
    except ImportError as exc:
        return f"bench-gpu: no GPU measured: torch is not importable by {sys.executable} ({exc})"
    if torch.cuda.is_available():
        return None
    return f"bench-gpu: no GPU: torch {torch.__version__} sees no CUDA device here; nothing measured"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="auto: the GPU, or the no-GPU line and exit 0")
    ap.add_argument("--tiny", action="store_true", help="a tiny BERT (the CPU test tier), not BERT-Base")
    ap.add_argument("--batch", type=int, help="sequences per step (default 256; tiny 8)")
    ap.add_argument("--seq", type=int, help="sequence length (default 128; tiny 32)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10, help="timed calls per row")
    ap.add_argument("--budget-s", type=float, default=420.0, help="loops stop early past it (imports included)")
    ap.add_argument("--hard-limit-s", type=float, default=480.0, help="the run ends here whatever it is doing")
    ap.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for MFU (default: by name)")
    ap.add_argument("--only", default=",".join(MEASUREMENTS), help="comma-separated subset of " + ", ".join(MEASUREMENTS))
    ap.add_argument("--no-deepspeed", action="store_true", help="the step rows on torch AdamW, not DeepSpeed")
    ap.add_argument("--out", default=os.path.join(REPO, "bench-out", "bench-gpu.json"))
    args = ap.parse_args(argv)
    unknown = set(args.only.split(",")) - set(MEASUREMENTS)
    if unknown:
        ap.error(f"--only: unknown {sorted(unknown)}; choose from {', '.join(MEASUREMENTS)}")
    return args


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def device_info(device: Any, peak_override: float | None) -> dict[str, Any]:
    import torch

    from tests.bench.gpu.flops import matmul_tflops, peak_tflops

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak, source = peak_tflops(name, peak_override)
        capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
        n = 8192
    else:
        name = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
        peak, source = (peak_override, "--peak-tflops") if peak_override else (None, "no peak table for CPUs")
        capability, n = None, 256
    return {"type": device.type, "name": name, "capability": capability, "torch": torch.__version__,
            "cuda": torch.version.cuda, "deepspeed": _version("deepspeed"), "transformers": _version("transformers"),
            "peak_tflops": peak, "peak_source": source, "matmul_n": n, "matmul_tflops": matmul_tflops(device, n)}


def run(args: argparse.Namespace, device_type: str) -> int:
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported
    elif os.environ.get("DS_ACCELERATOR") == "cpu":
        os.environ.pop("DS_ACCELERATOR")
    import torch

    from tests.bench.gpu import report
    from tests.bench.gpu.flops import __doc__ as flop_formula
    from tests.bench.gpu.kd_loss import measure_kd_kernel
    from tests.bench.gpu.shapes import BERT_BASE, TINY
    from tests.bench.gpu.sparse24 import measure_sparse24
    from tests.bench.gpu.timing import Budget, Plan, Skip
    from tests.bench.gpu.train_steps import measure_student_step, measure_teacher_step

    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    shape = (TINY if args.tiny else BERT_BASE).with_batch(args.batch, args.seq)
    budget = Budget(args.budget_s)
    budget.started = STARTED
    info = device_info(device, args.peak_tflops)
    plan = Plan(budget=budget, warmup=args.warmup, iters=args.iters, peak_tflops=info["peak_tflops"])
    record = report.Record(os.path.abspath(args.out), {
        "bench": "bench-gpu", "version": 1, "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "device": info, "shape": shape.as_dict(), "warmup": args.warmup, "iters": args.iters,
        "budget_s": args.budget_s, "flop_formula": flop_formula})
    say(f"bench-gpu: {info['name']}, {shape.name} batch {shape.batch} x {shape.seq}, bf16; results -> {record.path}")
    watchdog = report.Watchdog(max(args.hard_limit_s - budget.elapsed(), 1.0), record, say, limit_s=args.hard_limit_s)
    watchdog.start()
    measures: dict[str, Callable[..., dict[str, Any]]] = {
        "kd_kernel": measure_kd_kernel, "sparse24": measure_sparse24,
        "teacher_step": lambda d, s, p: measure_teacher_step(d, s, p, deepspeed=not args.no_deepspeed),
        "student_step": lambda d, s, p: measure_student_step(d, s, p, deepspeed=not args.no_deepspeed)}
    for name in [m for m in MEASUREMENTS if m in args.only.split(",")]:
        watchdog.current = name
        need = MIN_SECONDS[name] if device.type == "cuda" else 0
        started = time.monotonic()
        try:
            if budget.left() < need:
                raise Skip(f"time budget: {budget.left():.0f} s left, it needs about {need} s")
            result = measures[name](device, shape, plan)
        except Skip as exc:
            record.add("skipped", name, str(exc))
            say(f"skipped {name}: {exc}")
            continue
        except Exception as exc:  # one broken measurement must not cost the others
            traceback.print_exc()
            record.add("failed", name, first_line(exc))
            say(f"failed {name}: {first_line(exc)}")
            continue
        finally:
            gc.collect()  # engines hold reference cycles: free the device memory before the next one
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if "achieved_tflops" in result and info["matmul_tflops"]:
            result["mfu_vs_matmul"] = result["achieved_tflops"] / info["matmul_tflops"]
        result["wall_s"] = time.monotonic() - started
        record.add("results", name, result)
        say(f"bench-gpu: {name} done in {result['wall_s']:.1f} s ({budget.elapsed():.0f} s elapsed)")
    watchdog.cancel()
    checks = report.checks(record.data)
    record.data.update(checks=checks, elapsed_s=budget.elapsed(), complete=not record.data["failed"])
    record.write()
    say("\n" + report.render(record.data))
    say(f"\nbench-gpu: {record.path} and {record.table_path}")
    return 0 if record.data["complete"] and all(checks.values()) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.device == "auto":
        line = no_gpu_line()
        if line is not None:
            say(line)
            return 0
    return run(args, "cpu" if args.device == "cpu" else "cuda")


if __name__ == "__main__":
    sys.exit(main())
