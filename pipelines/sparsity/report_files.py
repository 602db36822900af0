"""Where a model folder keeps its sparsity report (apart from `report.py`, which needs torch, so the
orchestrator can name the files without importing it)."""
from __future__ import annotations

import os
from pathlib import Path


def report_paths(out_dir: str | os.PathLike, stem: str = "sparsity") -> tuple[Path, Path]:
    """`<stem>.json` and `<stem>.png` in `out_dir`."""
    return Path(out_dir) / f"{stem}.json", Path(out_dir) / f"{stem}.png"
