"""`report.inference` in a recipe: defaults, the tiny recipe's settings, and refused values naming the key."""
import pytest
from pydantic import ValidationError

from orchestrator.recipe.load import load_recipe
from orchestrator.stages import STAGES
from pipelines.inference.config import InferenceConfig


def test_defaults_and_the_tiny_recipe() -> None:
    cfg = InferenceConfig()
    assert (cfg.enabled, cfg.batch_sizes, cfg.seq_len, cfg.runtime) == (True, [1, 32], 128, "onnxruntime")
    tiny = load_recipe("tiny").report.inference
    assert tiny.enabled and tiny.batch_sizes == [1, 32] and tiny.seq_len == 128 and tiny.min_seconds < 1


def test_bad_values_are_refused() -> None:
    with pytest.raises(ValidationError, match="batch_sizes"):
        InferenceConfig(batch_sizes=[0, 32])
    with pytest.raises(ValidationError, match="runtime"):
        InferenceConfig(runtime="tensorrt")
    with pytest.raises(ValidationError, match="warmup"):
        InferenceConfig.model_validate({"warmup": 3})  # extra keys are errors


def test_only_the_report_stage_depends_on_it() -> None:
    a, b = load_recipe("tiny"), load_recipe("tiny", ["report.inference.seq_len=64"])
    changed = [name for name, stage in STAGES.items() if stage.config(a) != stage.config(b)]
    assert changed == ["report"]
