"""What a run would do to each stage, decided from the run directory alone before any cluster work.

skip    the stage's manifest matches its result-defining config and inputs, outputs intact
resume  an earlier attempt with the same result-defining config left work (checkpoints, shards,
        finished fine-tuning runs): continue it; operational changes (workers, cadence, failure
        policy) never invalidate a stage
run     nothing of the stage exists yet
redo    start the stage over, deleting what it has: only with the user's word for it (`--force`,
        `--redo STAGE`), or because a stage before it is being redone

A stage whose result-defining keys or inputs changed while it holds progress is refused: the error
names every changed key with its old and new value, what would be lost, and what would be redone
after it. pofa never deletes a run's progress silently.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Optional

from orchestrator.fingerprints import fingerprint, outputs_problem
from orchestrator.recipe.schema import Recipe
from orchestrator.stages import STAGES, StageContext
from pipelines.config_keys import changed_keys, operational_paths
from workers.run_layout import RunLayout
from workers.stage_outputs import ManifestError, load_manifest

Action = Literal["skip", "resume", "run", "redo"]
OPERATIONAL = operational_paths(Recipe)


class PlanRefused(ValueError):
    """Going ahead would delete progress the user did not name."""


@dataclass
class StagePlan:
    stage: str
    action: Action
    reason: str
    fingerprint: str
    config: dict[str, Any]
    inputs: dict[str, Any]
    changes: list[tuple[str, Any, Any]] = field(default_factory=list)
    progress: Optional[str] = None  # what the stage holds that a redo would delete
    refused: bool = False

    def line(self) -> str:
        text = f"[{self.stage}] {self.action}: {self.reason}"
        if self.refused:
            text += f" -- refused: would delete {self.progress}; rerun with --redo {self.stage} (or --force)"
        return text


def plan_run(recipe: Recipe, ctx: StageContext, stages: Iterable[str], force: bool = False,
             redo: Iterable[str] = ()) -> list[StagePlan]:
    """One StagePlan per selected stage, in order."""
    redo = set(redo)
    plans: list[StagePlan] = []
    for name in stages:
        stage = STAGES[name]
        config, inputs = stage.config(recipe), stage.inputs(ctx)
        fp = fingerprint({"stage": name, "config": config, "inputs": inputs})
        plan = StagePlan(name, "skip", "", fp, config, inputs)
        renewed = [p.stage for p in plans if p.action in ("redo", "run")]
        if force or name in redo:
            plan.action, plan.reason = "redo", "--force" if force else "--redo"
        else:
            _decide(plan, ctx.layout, renewed)
        if plan.action == "redo" and not (force or name in redo or stage.rebuilt_freely):
            plan.progress = describe_progress(ctx.layout, name)
            plan.refused = plan.progress is not None and not _cascade(plan, plans)
        plans.append(plan)
    return plans


def _cascade(plan: StagePlan, before: list[StagePlan]) -> bool:
    """Redone because an earlier stage is redone with the user's word: that word covers this one."""
    return any(p.action == "redo" and not p.refused for p in before if p.stage in plan.inputs)


def _decide(plan: StagePlan, layout: RunLayout, renewed: list[str]) -> None:
    upstream = [s for s in renewed if s in plan.inputs]
    try:
        manifest = load_manifest(layout, plan.stage)
    except ManifestError as exc:
        plan.action, plan.reason = "redo", f"its manifest cannot be used ({str(exc).split('; redo')[0]})"
        return
    if upstream and (manifest is not None or _attempt(layout, plan.stage) is not None):
        plan.action, plan.reason = "redo", f"{', '.join(upstream)} before it is redone or run again"
        return
    if manifest is not None:
        changes = _changes(manifest.config, plan.config, manifest.inputs, plan.inputs)
        if manifest.fingerprint == plan.fingerprint or not changes:
            problem = outputs_problem(layout, plan.stage, manifest)
            plan.action, plan.reason = ("skip", "up to date (manifest matches)") if problem is None else \
                ("resume", f"{problem}: made again from what the stage kept")
            return
        plan.action, plan.changes = "redo", changes
        plan.reason = "changed: " + "; ".join(_describe(c) for c in changes)
        return
    attempt = _attempt(layout, plan.stage)
    if attempt is None:
        plan.action, plan.reason = "run", "not started"
        return
    if attempt.get("fingerprint") == plan.fingerprint or (
            "config" in attempt and not _changes(attempt["config"], plan.config, attempt["inputs"], plan.inputs)):
        plan.action, plan.reason = "resume", resume_point(layout, plan.stage)
        return
    plan.action = "redo"
    if "config" in attempt:
        plan.changes = _changes(attempt["config"], plan.config, attempt["inputs"], plan.inputs)
        plan.reason = "changed since its unfinished attempt: " + "; ".join(_describe(c) for c in plan.changes)
    else:  # an attempt recorded by an older pofa, with its fingerprint only
        plan.reason = "its unfinished attempt was started with another recipe section or inputs"


def _changes(old_config: dict, new_config: dict, old_inputs: dict, new_inputs: dict) -> list[tuple[str, Any, Any]]:
    # configs are keyed like the recipe (seed, teacher.*, finetune.*): the recipe's operational paths apply
    return (changed_keys(old_config, new_config, ignore=OPERATIONAL)
            + [(f"inputs.{k}", a, b) for k, a, b in changed_keys(old_inputs, new_inputs)])


def _describe(change: tuple[str, Any, Any]) -> str:
    key, old, new = change
    if key.startswith("inputs."):
        return f"{key.removeprefix('inputs.')} (an input) changed"
    return f"{key} {old!r} -> {new!r}"


def _attempt(layout: RunLayout, stage: str) -> Optional[dict[str, Any]]:
    path = layout.attempt(stage)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def describe_progress(layout: RunLayout, stage: str) -> Optional[str]:
    """What of value the stage holds (None: nothing a redo would lose)."""
    held = ["its finished outputs"] if os.path.exists(layout.manifest(stage)) else []
    return ", ".join(held + STAGES[stage].held(layout)) or None


def resume_point(layout: RunLayout, stage: str) -> str:
    """How the stage continues, as its console header says it: "resuming from step 50 (checkpoint ...)"."""
    return STAGES[stage].resume_point(layout)


def refusal(plans: list[StagePlan]) -> Optional[str]:
    """The error text when any stage is refused, else None."""
    refused = [p for p in plans if p.refused]
    if not refused:
        return None
    lines = ["this run would delete progress you did not name:"]
    for p in refused:
        lines.append(f"  [{p.stage}] {p.reason}")
        lines.append(f"      redoing it deletes {p.progress}")
    after = [p.stage for p in plans if p.action == "redo" and not p.refused and p.stage not in {r.stage for r in refused}]
    if after:
        lines.append(f"  and after it: {', '.join(after)} would be redone")
    first = refused[0].stage
    lines.append(f"restore the value(s), use a new --run-dir, or go ahead with --redo {first} (or --force); "
                 "nothing was deleted")
    return "\n".join(lines)
