"""The job graph's stages, in the order they run."""
from orchestrator.stages.base import Stage, StageContext
from orchestrator.stages.preprocess import PreprocessStage

STAGES: dict[str, Stage] = {s.name: s for s in (PreprocessStage(),)}
ORDER = list(STAGES)

__all__ = ["STAGES", "ORDER", "Stage", "StageContext"]
