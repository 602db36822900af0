"""`pofa export RUN_DIR --stage S --to DIR [--push REPO]`: one export of a run as a self-contained
Hugging Face folder (weights, tokenizer, config, sparsity.json, model card), optionally published.

The folder is built under a temporary sibling name and renamed when complete, so a failed export
leaves nothing behind; every check that can refuse (stage finished, target free, token present)
runs before the first file is written."""
from __future__ import annotations

import os
import shutil
from typing import Any, Optional

from orchestrator.model_card.exports import ExportRef, find_export
from orchestrator.model_card.records import RunRecords
from orchestrator.model_card.write import CARD_NAME, build_card, write_card
from workers.run_layout import RunLayout


class ExportError(ValueError):
    """Bad input to `pofa export`: one line, nothing written."""


def _target(to: str) -> str:
    target = os.path.abspath(os.path.expanduser(to))
    if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise ExportError(f"--to {target} exists and is not empty: name a new or empty folder; nothing written")
    return target


def _token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise ExportError("--push needs a Hugging Face token (set HF_TOKEN or run `hf auth login`); nothing written")
    return token


def _records(run_dir: str) -> RunRecords:
    layout = RunLayout.open(run_dir)
    # an object-store run: this node's copy of what the card is written from (exports come when chosen)
    layout.pull(layout.root, only=lambda rel: rel.endswith(("recipe.yaml", "manifest.json", "inference.json")))
    if not os.path.isfile(layout.recipe):
        raise ExportError(f"{layout.where} is not a pofa run directory (it holds no recipe.yaml)")
    return RunRecords.read(layout)


def _fill(records: RunRecords, export: ExportRef, tmp: str, load_id: str) -> None:
    """The export's files, a sparsity report where it has none (a dense model's: zero), the card; then
    the folder is loaded back with the Auto classes, as a user would."""
    from transformers import AutoConfig, AutoTokenizer

    from pipelines.sparsity.config import PruningConfig
    from pipelines.sparsity.report import prunable_weights, sparsity_report, write_report
    from pipelines.sparsity.report_files import report_paths

    shutil.copytree(export.folder, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(CARD_NAME))
    model = auto_class(export).from_pretrained(tmp)
    AutoTokenizer.from_pretrained(tmp)
    AutoConfig.from_pretrained(tmp)
    if not report_paths(tmp)[0].exists():
        student = records.recipe.student
        pruning = student.pruning if student is not None else PruningConfig()
        write_report(sparsity_report(prunable_weights(model, pruning), pruning.mask), tmp)
    write_card(build_card(records, export, folder=tmp, load_id=load_id), tmp)


def auto_class(export: ExportRef) -> Any:
    """The transformers Auto class that loads the export (its head)."""
    import transformers

    from pipelines.finetune.tasks import get_task

    if export.kind == "pretraining":
        return transformers.AutoModelForPreTraining
    return (transformers.AutoModelForQuestionAnswering if get_task(export.task or "").kind == "qa"
            else transformers.AutoModelForSequenceClassification)


def export_folder(run_dir: str, stage: str, to: str, push: Optional[str] = None) -> str:
    """Write the folder (and publish it with `push`); returns where it is."""
    target = _target(to)
    token = _token() if push else None
    records = _records(run_dir)
    export = find_export(records, stage)
    records.layout.pull(export.folder)  # this node's copy of an object-store run's export
    tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _fill(records, export, tmp, push or target)
        if os.path.isdir(target):
            os.rmdir(target)  # empty (checked above)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if push:
        publish(target, push, token, f"pofa export of {stage} from run {records.recipe.name}")
    return target


def publish(folder: str, repo_id: str, token: Optional[str], message: str) -> str:
    """Upload the folder as the model repo `repo_id` (created when missing); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", commit_message=message)
    except Exception as exc:  # noqa: BLE001 - HTTP, connection or hub errors alike: the folder stays, say so
        raise ExportError(f"push to {repo_id} failed ({str(exc).splitlines()[0]}); the folder {folder} is complete: "
                          f"push it with `hf upload {repo_id} {folder}`") from None
    return str(info.commit_url)
