"""Pure parts of the tracking layer: recipe flattening, store resolution, console hints."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from workers.run_layout import RunLayout
from orchestrator.tracking import TrackingConfig, flatten_params, mlflow_ui_command, resolve_store
from orchestrator.tracking.params import MAX_KEY_LENGTH, MAX_VALUE_LENGTH
from orchestrator.tracking.registry import RunRegistry
from orchestrator.tracking.ui import how_to_view


def test_flatten_nested_recipe_to_dotted_keys():
    recipe = {
        "name": "tiny",
        "model": {"hidden_size": 64, "layers": 2, "dropout": 0.1},
        "pruning": {"schedule": {"begin_step": 10, "target": 0.9}, "layers": ["query", "key"]},
        "empty": {},
        "flag": True,
        "nothing": None,
    }
    assert flatten_params(recipe) == {
        "name": "tiny",
        "model.hidden_size": "64",
        "model.layers": "2",
        "model.dropout": "0.1",
        "pruning.schedule.begin_step": "10",
        "pruning.schedule.target": "0.9",
        "pruning.layers": '["query", "key"]',
        "empty": "{}",
        "flag": "True",
        "nothing": "None",
    }


def test_flatten_respects_mlflow_length_limits_and_key_charset():
    flat = flatten_params({"a" * 300: {"b": "x"}, "text": "y" * 7000, "bad key!": 1})
    assert all(len(k) <= MAX_KEY_LENGTH for k in flat)
    assert len(flat["text"]) == MAX_VALUE_LENGTH
    assert flat["text"].endswith("[truncated]")
    assert flat["bad key_"] == "1"


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValidationError, match="urll"):
        TrackingConfig.model_validate({"urll": "http://x"})
    with pytest.raises(ValidationError, match="flush_interval_s"):
        TrackingConfig(flush_interval_s=0)
    with pytest.raises(ValidationError, match="tracking.uri"):
        TrackingConfig(uri="  ")


def test_store_resolution_order(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = resolve_store(TrackingConfig(), RunLayout.open(str(tmp_path / "run")))
    assert default.uri == f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"
    # Artifacts next to the database, never ./mlruns of the current directory.
    assert default.artifact_location == (tmp_path / "run" / "mlartifacts").as_uri()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    from_env = resolve_store(TrackingConfig(), RunLayout.open(str(tmp_path)))
    assert (from_env.uri, from_env.artifact_location) == ("http://tracking.example:5000", None)

    explicit = resolve_store(TrackingConfig(uri="http://other:80"), RunLayout.open(str(tmp_path)))
    assert explicit.uri == "http://other:80"


def test_ui_command_and_console_hint(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert mlflow_ui_command(uri) == f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db"
    assert mlflow_ui_command("http://host:5000") is None
    assert "mlflow ui --backend-store-uri" in how_to_view(uri, "1", "abc")
    assert how_to_view("http://host:5000/", "3", "abc") == "MLflow: http://host:5000/#/experiments/3/runs/abc"


def test_corrupt_registry_names_the_file(tmp_path):
    (tmp_path / "tracking.json").write_text("{not json")
    with pytest.raises(ValueError, match="tracking.json"):
        RunRegistry.load(tmp_path / "tracking.json")


def test_credentials_never_ride_in_a_recipe_uri_and_are_masked_when_printed():
    from orchestrator.tracking.config import shown

    with pytest.raises(ValidationError, match="carries credentials.*MLFLOW_TRACKING_USERNAME"):
        TrackingConfig(uri="postgresql://pofa:s3cret@db:5432/mlflow")
    assert shown("postgresql://pofa:s3cret@db:5432/mlflow") == "postgresql://pofa:***@db:5432/mlflow"
    assert "s3cret" not in how_to_view("http://me:s3cret@host:5000", "1", "abc")
