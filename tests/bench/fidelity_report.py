"""bench-fidelity's tables, goal check and MLflow record (the runs themselves: bench_fidelity.py)."""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

VARIANTS = {
    "a": "(a) cubic GMP + KD (the method)",
    "b": "(b) cubic GMP, no KD",
    "c": "(c) one-shot pruning + KD",
    "d": "(d) dense, trained on (ceiling)",
    # ablations of (a), opt-in (`--variants a,b,c,d,e,f,g`): one knob each of the method, no fine-tunes
    "e": "(e) = (a) without LR rewinding",
    "f": "(f) = (a), KD on masked positions only",
    "g": "(g) = (a) at temperature 1",
}


# -- tables ---------------------------------------------------------------------------------------------
def mean_spread(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (max(xs) - min(xs)) / 2


def fmt(xs: list[float], ref: Optional[float], pct: bool = True, digits: int = 4) -> tuple[str, str]:
    if not xs:
        return "–", "–"
    m, s = mean_spread(xs)
    scale = 100.0 if pct else 1.0
    cell = f"{m * scale:.2f} ± {s * scale:.2f}" if pct else f"{m:.{digits}f} ± {s:.{digits}f}"
    rel = f"{100.0 * m / ref:.1f}%" if ref else "–"
    return cell, rel


def build_table(results: dict[str, dict[str, list[float]]], labels: Optional[dict[str, str]] = None,
                ref: Optional[dict[str, Optional[float]]] = None, ref_name: str = "(d)") -> list[str]:
    """One row per variant of `labels` (default VARIANTS) in `results`; the "% of" columns are relative to
    `ref` (per metric; default: the mean of variant (d), the dense ceiling)."""
    labels = labels or VARIANTS
    if ref is None:
        ref = {k: statistics.fmean(results["d"][k]) if results.get("d", {}).get(k) else None
               for k in ("mlm_acc", "mlm_loss", "nsp_acc", "polarity")}
    ft_seeds = max((len(r.get("polarity", [])) for r in results.values()), default=0)
    of = f"% of {ref_name}"
    lines = [f"| student (90% unstructured unless dense) | seeds | val MLM acc % | {of} | val MLM loss | {of} "
             f"| val NSP acc % | {of} | polarity acc % ({ft_seeds or 'no'} fine-tune seeds) | {of} |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for v, label in labels.items():
        r = results.get(v)
        if not r:
            continue
        acc = fmt(r["mlm_acc"], ref.get("mlm_acc"))
        loss = fmt(r["mlm_loss"], ref.get("mlm_loss"), pct=False, digits=3)
        nsp = fmt(r["nsp_acc"], ref.get("nsp_acc"))
        pol = fmt(r["polarity"], ref.get("polarity"))
        lines.append(f"| {label} | {len(r['mlm_acc'])} | {acc[0]} | {acc[1]} | {loss[0]} | {loss[1]} | {nsp[0]} "
                     f"| {nsp[1]} | {pol[0]} | {pol[1]} |")
    return lines


def goal(results: dict[str, dict[str, list[float]]],
         against: tuple[str, ...] = ("b", "c")) -> tuple[Optional[bool], list[str]]:
    """(a) beats each of `against` on validation MLM accuracy by more than the seed spread."""
    if "a" not in results:
        return None, ["(a) missing"]
    if len(results["a"]["mlm_acc"]) < 2:
        return None, ["one seed per variant: no spread to compare against"]
    ma, sa = mean_spread(results["a"]["mlm_acc"])
    verdicts, ok = [], True
    for other in against:
        if other not in results:
            ok = False
            verdicts.append(f"({other}) missing")
            continue
        mo, so = mean_spread(results[other]["mlm_acc"])
        beats = ma - sa > mo + so
        ok &= beats
        verdicts.append(f"(a) {100 * ma:.2f} ± {100 * sa:.2f} vs ({other}) {100 * mo:.2f} ± {100 * so:.2f}: "
                        f"{'beats it by more than the spread' if beats else 'does NOT beat it by more than the spread'}"
                        f" (difference {100 * (ma - mo):+.2f} points)")
    return ok, verdicts


def timing_line(wall: float, stage_times: dict[str, float]) -> str:
    load = os.getloadavg()
    return (f"Wall time {wall / 60:.1f} min for this invocation (stage times: "
            + ", ".join(f"{k} {t:.0f} s" for k, t in stage_times.items())
            + f"; sum {sum(stage_times.values()) / 60:.1f} min); load average at the end "
            f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} on {os.cpu_count()} cores.")


def publish(out: Path, stem: str, lines: list[str], record: dict[str, Any], log: Callable[[Path], str]) -> None:
    """`<out>/<stem>.md` (the lines under a title) and `<out>/<stem>.json` (`record`, with the load average),
    the lines on stdout, then `log(md)` (an MLflow record, returning its run id): a tracking problem is
    reported, not fatal, since the table is the result."""
    md = out / f"{stem}.md"
    md.write_text(f"# bench-{stem}\n\n" + "\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(json.dumps({**record, "loadavg": os.getloadavg()}, indent=2))
    print()
    print("\n".join(lines))
    try:
        run_id = log(md)
        print(f"\nMLflow: parent run {run_id} in sqlite:///{out / 'mlflow.db'} "
              f"(mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'})")
    except Exception as exc:
        print(f"\nMLflow logging failed: {type(exc).__name__}: {exc}")
    print(f"Markdown: {md}")


# -- MLflow ------------------------------------------------------------------------------------------------
def log_mlflow(out: Path, settings: dict[str, Any], teacher: dict[str, float], base_acc: dict[str, Any],
               results: dict[str, dict[str, list[float]]], sets: dict[str, list[str]], md: Path,
               labels: Optional[dict[str, str]] = None, name: str = "bench-fidelity",
               extra_params: Optional[dict[str, str]] = None) -> str:
    import mlflow

    labels = labels or VARIANTS
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        name, artifact_location=(out / "mlartifacts").resolve().as_uri())
    run_name = f"{name.removeprefix('bench-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name) as parent:
        mlflow.log_params({k: str(v) for k, v in {**settings, **(extra_params or {})}.items()})
        mlflow.log_metrics({f"teacher.{k.replace('/', '.')}": v for k, v in teacher.items()
                            if k in ("val/mlm_acc", "val/nsp_acc", "val/mlm_loss")})
        mlflow.log_metrics({"baseline.mlm_acc": base_acc["mlm_acc"], "baseline.nsp_acc": base_acc["nsp_acc"]})
        mlflow.log_artifact(str(md))
        for v, r in results.items():
            with mlflow.start_run(experiment_id=exp_id, run_name=labels[v], nested=True):
                mlflow.log_params({"variant": v, "overrides": " ".join(sets[v])[:6000]})
                metrics: dict[str, float] = {}
                for k, xs in r.items():
                    if xs:
                        m, s = mean_spread(xs)
                        metrics[f"{k}.mean"], metrics[f"{k}.spread"] = m, s
                        for i, x in enumerate(xs):
                            metrics[f"{k}.run{i}"] = x
                mlflow.log_metrics(metrics)
        return parent.info.run_id
