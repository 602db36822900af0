"""A card for one export (huggingface_hub `ModelCard`), and the cards of every export of a run."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

from orchestrator.model_card.body import card_body
from orchestrator.model_card.exports import ExportRef, list_exports
from orchestrator.model_card.metadata import card_data
from orchestrator.model_card.records import RunRecords, read_sparsity
from pipelines.atomic import write_text_atomic

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

    from orchestrator.recipe.schema import Recipe
    from workers.run_layout import RunLayout

CARD_NAME = "README.md"  # where the hub, `ModelCard.load` and MLflow look for a card


def build_card(records: RunRecords, export: ExportRef, folder: Optional[str] = None,
               load_id: Optional[str] = None) -> "ModelCard":
    """`folder`: where the export's files are read (its sparsity report), default its place in the run;
    `load_id`: what the card's snippet passes to `from_pretrained` (a hub repo, or the folder)."""
    from huggingface_hub import ModelCard

    sparsity = read_sparsity(folder or export.folder) if export.sparse else None  # a dense one: "dense"
    data = card_data(records, export, sparsity)
    body = card_body(records, export, sparsity, load_id or "path/to/" + os.path.basename(folder or export.folder))
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def write_card(card: "ModelCard", folder: str) -> str:
    path = os.path.join(folder, CARD_NAME)
    write_text_atomic(str(card), path)
    return path


def write_run_cards(records: RunRecords, stages: Optional[set[str]] = None) -> list[str]:
    """A card into every export folder of the run (`stages`: only exports of those stages); returns the
    files written. Cards are no stage's recorded outputs, so rewriting one (the report does, once
    results are known) never makes a stage look changed."""
    written = []
    for export in list_exports(records):
        stage = "finetune" if export.kind == "finetuned" else export.name
        if stages is not None and stage not in stages or not os.path.isdir(export.folder):
            continue
        written.append(write_card(build_card(records, export), export.folder))
    return written


def write_stage_cards(recipe: "Recipe", layout: "RunLayout", stage: str) -> list[str]:
    """Right after `stage` finished: a card for each model it exported, from what the run knows so far
    (MLflow records it with the model; the report rewrites it with the downstream and inference results)."""
    return write_run_cards(RunRecords.read(layout, recipe), {stage})
