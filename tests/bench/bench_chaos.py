"""`make bench-chaos`: the chaos soak. Faults of every kind at every kind of moment (tests/chaos.py)
injected into a longer `pofa run tiny` than the CI test's, rerun until done, against an uninterrupted
run of the same recipe measured in the same session.

Printed: each fault (kind, stage, moment, when it fired, how long until the stage logged its next step
or the rerun's exit code), and a summary: faults injected, recoveries, the finished run bit-identical
or not, leftover processes, checkpoints kept, and time lost per fault = (chaos run's wall time -
uninterrupted run's) / faults fired. Output also in runs/bench-chaos/chaos.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from orchestrator.ray_leftovers import instance_processes  # noqa: E402
from tests.chaos import Size, committed_checkpoints, differences, run_clean, run_with_faults, schedule  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--faults", type=int, default=9)
    ap.add_argument("--teacher-steps", type=int, default=20)
    ap.add_argument("--student-steps", type=int, default=24)
    ap.add_argument("--out", default="runs/bench-chaos")
    args = ap.parse_args()
    size = Size(teacher_steps=args.teacher_steps, student_steps=args.student_steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # only what this bench writes there, and said: a previous soak's runs and consoles
    previous = [p for p in out.iterdir() if p.name in ("reference", "chaos", "chaos.json")
                or p.name.startswith("chaos-console-")]
    if previous:
        print(f"bench-chaos: replacing the previous soak's {', '.join(sorted(p.name for p in previous))} in {out}")
    for p in previous:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    faults = schedule(args.seed, args.faults, size)
    print(f"bench-chaos: seed {args.seed}, {len(faults)} faults, teacher {size.teacher_steps} / student "
          f"{size.student_steps} steps", flush=True)

    began = time.monotonic()
    run_clean(out / "reference", size, limit_s=3600)
    reference_s = time.monotonic() - began
    print(f"uninterrupted run: {reference_s:.0f} s", flush=True)

    chaos = run_with_faults(out / "chaos", size, faults, limit_s=7200)
    fired = [o for o in chaos.outcomes if o.fired]
    diffs = differences(out / "reference", chaos.run_dir)
    time.sleep(3)
    leftovers = sum(len(instance_processes(t)) for t in chaos.tokens)
    kept = {s: len(committed_checkpoints(chaos.run_dir, s)) for s in ("teacher", "student")}
    lost = (chaos.elapsed_s - reference_s) / max(1, len(fired))

    print(f"\n| # | fault | fired after (s) | recovery (s) or rerun exit code |\n|---|---|---|---|")
    for i, o in enumerate(chaos.outcomes, 1):
        what = (f"exit {o.rc}, rerun" if o.rc is not None else f"{o.recovery_s:.0f} s to the next step") \
            if o.fired else "not reached (stage ended first)"
        print(f"| {i} | {o.fault.describe()} | {o.waited_s:.0f} | {what} |")
    summary = {"seed": args.seed, "faults": len(faults), "fired": len(fired), "pofa_runs": chaos.attempts,
               "bit_identical": not diffs, "differences": diffs[:20], "leftover_processes": leftovers,
               "checkpoints_kept": kept, "reference_s": round(reference_s, 1), "chaos_s": round(chaos.elapsed_s, 1),
               "time_lost_per_fault_s": round(lost, 1)}
    print(f"\n| figure | value |\n|---|---|")
    for k, v in summary.items():
        print(f"| {k} | {v} |")
    (out / "chaos.json").write_text(json.dumps({**summary, "outcomes": [asdict(o) for o in chaos.outcomes]},
                                               indent=1, default=str))
    return 0 if not diffs and leftovers == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
