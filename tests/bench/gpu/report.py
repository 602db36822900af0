"""The benchmark's record: a JSON rewritten after every measurement (so a stop keeps what was
measured), the table printed and written beside it, the checks that make the exit status."""
from __future__ import annotations

import os
import threading
from typing import Any, Callable

from pipelines.atomic import write_json_atomic, write_text_atomic

KD_VALUE_TOLERANCE = 1e-3  # relative: kernel and straightforward loss compute the same sum


class Record:
    def __init__(self, path: str, header: dict[str, Any]) -> None:
        self.path = path
        self.table_path = os.path.splitext(path)[0] + ".txt"
        self.data: dict[str, Any] = {**header, "results": {}, "skipped": {}, "failed": {}, "complete": False}
        self._lock = threading.Lock()  # the watchdog thread may write while the main thread measures

    def add(self, section: str, name: str, value: Any) -> None:
        with self._lock:
            self.data[section][name] = value
        self.write()

    def write(self) -> None:
        with self._lock:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            write_json_atomic(self.data, self.path)
            write_text_atomic(render(self.data) + "\n", self.table_path)


def checks(data: dict[str, Any]) -> dict[str, bool]:
    """Correctness read off the results (timings are never checks): name -> passed."""
    out: dict[str, bool] = {}
    res = data["results"]
    if "kd_kernel" in res:
        out["KD kernel value = straightforward loss"] = res["kd_kernel"]["value_rel_diff"] <= KD_VALUE_TOLERANCE
    if "sparse24" in res:
        out["2:4 masks keep 2 of every 4"] = bool(res["sparse24"]["pattern_2_4"])
    for name in ("teacher_step", "student_step"):
        if name in res:
            first, last = res[name]["loss_first"], res[name]["loss_last"]
            out[f"{name} losses finite"] = all(v == v and abs(v) != float("inf") for v in (first, last))
    if "student_step" in res:
        out["masks exact after the KD steps"] = bool(res["student_step"]["masks"]["exact"])
    return out


def _ms(row: dict[str, Any]) -> str:
    return f"{row['median_ms']:.3f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _step_rows(label: str, row: dict[str, Any], peak: str) -> list[tuple[str, str, str]]:
    return [(f"{label} (ms/step)", _ms(row), f"{row['engine']}; n={row['n']}, min {row['min_ms']:.3f}"
             + (", TRUNCATED by the budget" if row["truncated"] else "")),
            (f"{label} tokens/s", f"{row['tokens_per_s']:,.0f}", f"real (non-padding) {row['real_tokens_per_s']:,.0f}"),
            (f"{label} MFU", _pct(row["mfu"]), f"{row['achieved_tflops']:.1f} TFLOP/s vs {peak}"
             + (f"; {_pct(row.get('mfu_vs_matmul'))} of the measured matmul" if row.get("mfu_vs_matmul") else ""))]


def render(data: dict[str, Any]) -> str:
    dev, shape, res = data["device"], data["shape"], data["results"]
    peak = f"{dev['peak_tflops']} TFLOP/s ({dev['peak_source']})" if dev["peak_tflops"] else dev["peak_source"]
    rows: list[tuple[str, str, str]] = [
        ("device", dev["type"], f"{dev['name']}; torch {dev['torch']}, CUDA {dev['cuda']}, "
                                f"deepspeed {dev['deepspeed']}, transformers {dev['transformers']}"),
        ("bf16 matmul, measured (TFLOP/s)", f"{dev['matmul_tflops']:.3g}" if dev.get("matmul_tflops") else "n/a",
         f"{dev['matmul_n']}^3; peak {peak}"),
        ("shape", shape["name"], f"{shape['layers']} layers, hidden {shape['hidden']}, vocab {shape['vocab']}, "
                                 f"batch {shape['batch']} x {shape['seq']}, bf16"),
    ]
    if "teacher_step" in res:
        rows += _step_rows("teacher step", res["teacher_step"], peak)
    if "student_step" in res:
        s = res["student_step"]
        rows += _step_rows("KD student step", s, peak)
        if "teacher_step" in res:
            rows.append(("KD student / teacher step", f"{s['median_ms'] / res['teacher_step']['median_ms']:.2f}x", ""))
        m = s["masks"]
        rows.append(("masks exact after the KD steps", "yes" if m["exact"] else "NO",
                     f"{m['layers']} layers at {m['mask_sparsity']:.1%}; counts exact: {m['counts_exact']}; nonzero at "
                     f"pruned: {m['live_nonzero_at_pruned']} live, {m['stored_nonzero_at_pruned']} stored (keep)"))
    if "kd_kernel" in res:
        k = res["kd_kernel"]
        mem = (f"; peak {k['kernel']['peak_memory_gib']:.1f} vs {k['straightforward']['peak_memory_gib']:.1f} GiB"
               if k["kernel"]["peak_memory_gib"] is not None else "")
        rows += [("KD loss, pofa kernel (ms)", _ms(k["kernel"]), f"{k['rows']} rows x {k['vocab']}, fwd + bwd{mem}"),
                 ("KD loss, straightforward (ms)", _ms(k["straightforward"]), f"speedup {k['speedup']:.2f}x"),
                 ("KD loss value, relative diff", f"{k['value_rel_diff']:.1e}",
                  f"{k['value_kernel']:.6f} vs {k['value_straightforward']:.6f}; grad max diff {k['grad_max_abs_diff']:.1e}")]
    if "sparse24" in res:
        sp = res["sparse24"]
        for name, r in sp["linears"].items():
            cells = [f"{b} {r[b]['median_ms']:.3f} ms ({r[b]['speedup']:.2f}x, err {r[b]['max_rel_err']:.0e})"
                     for b in ("cusparselt", "cutlass") if b in r]
            cells += [f"{b} skipped" for b in r["skipped"]]
            rows.append((f"2:4 Linear {name} x{r['count']}, dense (ms)", _ms(r["dense"]), "; ".join(cells)))
        if "student_forward" in sp:
            f = sp["student_forward"]
            rows.append(("2:4 student forward, dense (ms)", _ms(f["dense"]),
                         f"{f['backend']} {f['sparse']['median_ms']:.3f} ms ({f['speedup']:.2f}x), max rel err "
                         f"{f['max_rel_err']:.1e}"))
    for name, passed in checks(data).items():
        rows.append((f"check: {name}", "ok" if passed else "FAILED", ""))
    for section in ("skipped", "failed"):
        for name, why in data[section].items():
            rows.append((f"{section}: {name}", "", why))
    backend_skips: dict[str, str] = {}  # one line per backend, not per Linear shape
    for r in res.get("sparse24", {}).get("linears", {}).values():
        for backend, why in r["skipped"].items():
            backend_skips.setdefault(backend, why)
    for backend, why in backend_skips.items():
        rows.append((f"skipped: 2:4 {backend} kernels", "", why))
    for name, why in res.get("sparse24", {}).get("skipped", {}).items():
        rows.append((f"skipped: 2:4 {name}", "", why))
    width, vwidth = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    lines = [f"{'measure'.ljust(width)}  {'value'.rjust(vwidth)}  note"]
    lines += [f"{name.ljust(width)}  {value.rjust(vwidth)}  {note}".rstrip() for name, value, note in rows]
    return "\n".join(lines)


class Watchdog:
    """A hard stop past the budget (a hung kernel or collective never returns to the loop): writes
    what was measured, says so in one line, and ends the process."""

    def __init__(self, seconds: float, record: Record, say: Callable[[str], None],
                 stop: Callable[[int], Any] = os._exit, limit_s: float | None = None) -> None:
        self.record, self.say, self.stop, self.current = record, say, stop, "start-up"
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self.limit_s = seconds if limit_s is None else limit_s  # the run's limit, for the message

    def start(self) -> None:
        self._timer.start()

    def cancel(self) -> None:
        self._timer.cancel()

    def _fire(self) -> None:
        self.record.data["failed"][self.current] = f"hard time limit ({self.limit_s:.0f} s) reached during it"
        self.record.write()
        self.say(f"bench-gpu: stopped at the hard time limit during {self.current}; partial results in "
                 f"{self.record.path}")
        self.stop(3)  # os._exit: the main thread may be stuck in a call that never returns
