"""The downstream results table in the model card's layout: task columns, model rows, our runs
beside the published figures of the matching recipe."""
from __future__ import annotations

from typing import Any, Mapping, Optional

# (column title, task, metric keys joined by "/") in the model card's order; extra tasks follow.
COLUMNS = [("SQuAD v1.1 EM/F1", "squad", ("exact_match", "f1")), ("MNLI-m", "mnli", ("m_accuracy",)),
           ("MNLI-mm", "mnli", ("mm_accuracy",)), ("QQP acc/F1", "qqp", ("accuracy", "f1")),
           ("QNLI", "qnli", ("accuracy",)), ("SST-2", "sst2", ("accuracy",)),
           ("Polarity (gensim)", "polarity", ("accuracy",))]


def _cell(values: Optional[Mapping[str, Any]], keys: tuple[str, ...]) -> str:
    if not values or any(not isinstance(values.get(k), (int, float)) for k in keys):
        return "–"
    return "/".join(f"{float(values[k]):.2f}" for k in keys)


def results_table(results: Mapping[str, Mapping[str, Any]], label: str,
                  published: Optional[Mapping[str, Mapping[str, float]]] = None, seeds: int = 1) -> str:
    """Markdown table. `results`: the finetune manifest's `stats.results` (task -> metric -> mean,
    plus `teacher` -> metric for the dense task teacher); `published`: task -> metric."""
    tasks = set(results) | set(published or {})
    cols = [c for c in COLUMNS if c[1] in tasks]
    rows = [[f"{label} (this run, mean of {seeds} seed{'s' if seeds > 1 else ''})",
             *[_cell(results.get(task), keys) for _, task, keys in cols]]]
    if any("teacher" in r for r in results.values()):
        rows.append(["dense task teacher (this run)",
                     *[_cell((results.get(task) or {}).get("teacher"), keys) for _, task, keys in cols]])
    if published:
        rows.append([f"{label} (published)", *[_cell(published.get(task), keys) for _, task, keys in cols]])
    header = ["model", *[title for title, _, _ in cols]]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def seed_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Every seed's value of every metric, so the spread behind each mean is visible."""
    lines = ["| task | seed | metrics | sparsity |", "|---|---|---|---|"]
    for task, r in results.items():
        for seed, metrics in (r.get("seeds") or {}).items():
            shown = ", ".join(f"{k}={v:.2f}" for k, v in sorted(metrics.items()))
            sp = (r.get("sparsity") or {}).get(seed)
            lines.append(f"| {task} | {seed} | {shown} | {'–' if sp is None else f'{sp:.4f}'} |")
    return "\n".join(lines)
