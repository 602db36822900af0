"""Which models a run exported, named as the report's inference table names them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from orchestrator.model_card.records import RunRecords


class ExportNotFound(ValueError):
    """The named export does not exist or its stage did not finish; says what exists."""


@dataclass(frozen=True)
class ExportRef:
    name: str  # teacher, student, <task>/teacher, <task>/seed-<s>, <task>/model (the first seed's copy)
    folder: str  # this node's copy of the Hugging Face folder
    kind: Literal["pretraining", "finetuned"]
    sparse: bool  # the student and everything fine-tuned from it
    task: Optional[str] = None
    seed: Optional[int] = None
    measured_as: Optional[str] = None  # its row in report/inference.json (the task model is seed 0's copy)


def list_exports(records: RunRecords) -> list[ExportRef]:
    layout = records.layout
    out = [ExportRef(stage, layout.path(t.model), "pretraining", stage == "student", measured_as=stage)
           for stage, t in records.training.items()]
    if records.finetune is None:
        return out
    for task, t in records.finetune.tasks.items():
        if t.teacher is not None:
            out.append(ExportRef(f"{task}/teacher", layout.path(t.teacher.model), "finetuned", False, task,
                                 t.teacher.seed, f"{task}/teacher"))
        for run in t.seeds.values():
            out.append(ExportRef(f"{task}/{run.name}", layout.path(run.model), "finetuned", True, task, run.seed,
                                 f"{task}/{run.name}"))
        first = next(iter(t.seeds.values()), None)
        if first is not None:
            out.append(ExportRef(f"{task}/model", layout.path(t.model), "finetuned", True, task, first.seed,
                                 f"{task}/{first.name}"))
    return out


def find_export(records: RunRecords, stage: str) -> ExportRef:
    """`stage`: teacher, student, or finetune/TASK/SEED (SEED: 42, seed-42, or teacher for the dense task
    teacher)."""
    name = stage
    if stage.startswith("finetune/"):
        parts = stage.split("/")
        if len(parts) != 3:
            raise ExportNotFound(f"--stage {stage}: expected finetune/TASK/SEED, e.g. finetune/polarity/42")
        seed = parts[2] if parts[2] == "teacher" or parts[2].startswith("seed-") else f"seed-{parts[2]}"
        name = f"{parts[1]}/{seed}"
    exports = {e.name: e for e in list_exports(records) if not e.name.endswith("/model")}
    if name in exports:
        return exports[name]
    shown = [n if n in ("teacher", "student") else "finetune/" + n.replace("/seed-", "/") for n in exports]
    head = stage.split("/")[0]
    if head in ("teacher", "student", "finetune") and head not in records.manifests:
        raise ExportNotFound(f"the {head} stage of {records.layout.where} has not finished (no manifest): "
                             f"nothing to export{'; finished: ' + ', '.join(shown) if shown else ''}")
    raise ExportNotFound(f"--stage {stage}: no such export in {records.layout.where}"
                         f"{' (finished: ' + ', '.join(shown) + ')' if shown else ' (no stage has finished)'}")
