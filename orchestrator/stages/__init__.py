"""The job graph's stages, in the order they run."""
from orchestrator.stages.base import Stage, StageContext
from orchestrator.stages.finetune import FinetuneStage
from orchestrator.stages.preprocess import PreprocessStage
from orchestrator.stages.report import ReportStage
from orchestrator.stages.training import StudentStage, TeacherStage

# in the order they run (upstream first); every reader of a run loops over this registry
STAGES: dict[str, Stage] = {s.name: s for s in (PreprocessStage(), TeacherStage(), StudentStage(), FinetuneStage(), ReportStage())}

__all__ = ["STAGES", "Stage", "StageContext"]
