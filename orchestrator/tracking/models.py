"""Log an exported Hugging Face model folder as an MLflow model (transformers flavour)."""
from __future__ import annotations

import os
import threading
from importlib import metadata
from pathlib import Path
from typing import Sequence

# MLflow's model logging resolves the tracking URI from process-global state, so calls that
# switch it are serialized.
_GLOBAL_URI_LOCK = threading.Lock()
# Packages a served pofa model needs; pinned to what produced it.
_RUNTIME_PACKAGES = ("mlflow", "transformers", "tokenizers", "torch", "safetensors")


def default_pip_requirements() -> list[str]:
    """Explicit requirements: MLflow's inference imports packages and fails on missing torchvision."""
    requirements = []
    for name in _RUNTIME_PACKAGES:
        try:
            version = metadata.version(name).split("+")[0]  # drop local tags like "+cpu"
        except metadata.PackageNotFoundError:
            continue
        requirements.append(f"{name}=={version}")
    return requirements


def log_hf_model(
    tracking_uri: str,
    run_id: str,
    model_dir: str | os.PathLike[str],
    *,
    name: str = "model",
    task: str = "fill-mask",
    registered_model_name: str | None = None,
    pip_requirements: Sequence[str] | None = None,
) -> str:
    """Log `model_dir` (a `save_pretrained` folder with its tokenizer) into run `run_id`.

    Returns the model URI (`models:/<model id>`) that `mlflow.transformers.load_model` and
    `mlflow.register_model` accept. The model is created in the run's own experiment, so its
    files land in that experiment's artifact location (inside the run directory by default).
    """
    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise ValueError(f"model_dir {str(folder)!r}: no config.json, not a save_pretrained folder")
    import mlflow
    import transformers
    from mlflow import MlflowClient
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    # A pipeline object, not the folder path: MLflow's path-based logging breaks with
    # transformers 5, and a pipeline carries the tokenizer and the task together.
    pipe = transformers.pipeline(task=task, model=str(folder), tokenizer=str(folder))
    client = MlflowClient(tracking_uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    # Creating the logged model ourselves pins it to the run's experiment; left to MLflow it
    # would go to the process's active experiment (by default "0", under ./mlruns).
    logged = client.create_logged_model(
        experiment_id, name=name, source_run_id=run_id, tags={"pofa.model_dir": str(folder.resolve())}
    )
    requirements = list(pip_requirements) if pip_requirements is not None else default_pip_requirements()
    with _GLOBAL_URI_LOCK, _use_tracking_uri(tracking_uri):
        info = mlflow.transformers.log_model(
            pipe,
            name=name,
            task=task,
            pip_requirements=requirements,
            registered_model_name=registered_model_name,
            run_id=run_id,
            model_id=logged.model_id,
        )
    return info.model_uri
