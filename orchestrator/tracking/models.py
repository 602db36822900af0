"""Log an exported Hugging Face model folder as an MLflow model (transformers flavour)."""
from __future__ import annotations

import os
import threading
from importlib import metadata
from pathlib import Path
from typing import Mapping, Sequence

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
    metrics: Mapping[str, float] | None = None,
    params: Mapping[str, str] | None = None,
    source: str | None = None,
    step: int = 0,
) -> str:
    """Log `model_dir` (a `save_pretrained` folder with its tokenizer) into run `run_id`.

    Returns the model URI (`models:/<model id>`) that `mlflow.transformers.load_model`,
    `mlflow.pyfunc.load_model` and `mlflow.register_model` accept. The model is created in the run's
    own experiment, so its files land in that experiment's artifact location (inside the run directory
    by default). `metrics` and `params` are the model's own (MLflow's model page and its comparison);
    `source` names the folder relative to the run directory (a tag; default: the folder's path).
    `step`: the training step the model is from; MLflow links the run's metrics at that step to the
    model (so not 0, where a stage run keeps its summary statistics).
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
        experiment_id, name=name, source_run_id=run_id, params=dict(params or {}) or None,
        tags={"pofa.model_dir": source or str(folder.resolve())},
    )
    requirements = list(pip_requirements) if pip_requirements is not None else default_pip_requirements()
    from orchestrator.model_card.mlflow_license import folder_card, replace_license

    card = folder_card(folder)  # the export's own card and license, not a hub lookup of a local path
    with _GLOBAL_URI_LOCK, _use_tracking_uri(tracking_uri):
        info = mlflow.transformers.log_model(
            pipe,
            name=name,
            task=task,
            pip_requirements=requirements,
            registered_model_name=registered_model_name,
            run_id=run_id,
            model_id=logged.model_id,
            model_card=card,
            step=step,
        )
    if card is not None:
        replace_license(client, logged.model_id, card)
    linked = {m.key for m in client.get_logged_model(logged.model_id).metrics or []}
    extra = {k: v for k, v in (metrics or {}).items() if k not in linked}
    if extra:
        from mlflow.entities import Metric

        # linked to the model (its page, and the experiment's Models tab) and to the run it came from
        client.log_batch(run_id, metrics=[Metric(k, float(v), _now_ms(), step, model_id=logged.model_id)
                                          for k, v in extra.items()])
    return info.model_uri


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
