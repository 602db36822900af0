"""The report stage's README on a finished run made by pofa's real producers (tests/orchestrator/
card_run.py): skipped documents as a table, the training curves beside it, wall times readable with
their total, how to load the sparse model, the recipe linked and folded; MLflow gets every image."""
from __future__ import annotations

import os

from orchestrator.recipe.load import load_recipe
from orchestrator.rundir import RunDir
from orchestrator.stages.base import StageContext
from orchestrator.stages.report import ReportStage, render_report
from orchestrator.tracking.plots import plot_series
from tests.orchestrator.card_run import OVERRIDES, make_card_run
from workers.stage_outputs import load_manifest
from workers.tracking import NullTracker


class Artifacts(NullTracker):
    def __init__(self) -> None:
        self.logged: list[tuple[str, str]] = []

    def log_artifact(self, path: str, artifact_path: str = "") -> None:
        self.logged.append((os.path.basename(path), artifact_path))


def test_the_report_reads_as_a_model_card(tmp_path) -> None:
    layout = make_card_run(str(tmp_path / "run"))
    for stage in ("teacher", "student"):  # the charts a tracked training stage leaves (TrackingSession.log_stage_plots)
        plot_series({"loss": [(1, 5.0), (2, 4.0)]}, os.path.join(layout.plots(stage), "loss.png"), title="Loss",
                    ylabel="loss")
    plot_series({"sparsity/global": [(0, 0.0), (20, 0.9)]}, os.path.join(layout.plots("student"), "sparsity.png"),
                title="Sparsity schedule", ylabel="sparsity")
    tracker = Artifacts()
    ctx = StageContext(load_recipe("tiny", OVERRIDES), RunDir(layout.root), tracker=tracker)
    ReportStage().run(ctx)
    report = os.path.dirname(layout.report)
    text = open(layout.report).read()

    assert "Skipped documents: {" not in text  # no raw JSON
    assert "No document was skipped." in text  # this corpus has none; one with some gets a table:
    manifests = {s: load_manifest(layout, s) for s in ("preprocess", "teacher", "student", "finetune")}
    pre = manifests["preprocess"]
    manifests["preprocess"] = pre.model_copy(update={"stats": {**pre.stats, "documents_skipped": {"too_short": 3,
                                                                                                "malformed_record": 1}}})
    skipped = render_report(ctx.recipe, layout, manifests)
    assert "| reason | documents |\n|---|---|\n| malformed_record | 1 |\n| too_short | 3 |" in skipped
    assert "## Training curves" in text
    for name in ("teacher-loss.png", "student-loss.png", "student-sparsity.png"):
        assert f"]({name})" in text and os.path.exists(os.path.join(report, name))
    wall = text[text.index("## Wall time"):text.index("## Exported models")]
    assert "| stage | time |" in wall and "| **total** |" in wall and ".0000" not in wall
    assert 'AutoModelForPreTraining.from_pretrained("student/model")' in text
    assert "[recipe.yaml](../recipe.yaml)" in text and "<details><summary>recipe</summary>" in text
    assert os.path.exists(os.path.join(layout.root, "recipe.yaml"))  # the link resolves
    logged = {name for name, where in tracker.logged if where == "report"}
    assert {"README.md", "sparsity.png", "teacher-loss.png", "student-loss.png", "student-sparsity.png"} <= logged
