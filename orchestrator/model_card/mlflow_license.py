"""What MLflow's transformers flavour is told about an export's card and license.

Left alone, MLflow looks the model up on the hub by its `name_or_path` (here a local folder): it warns
"Unable to find license information" and writes a LICENSE.txt that points at `https://huggingface.co/`
followed by the folder's absolute path. Given the export's own card it records that card; the
LICENSE.txt it still derives from the path is then replaced by one that states the card's license."""
from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING, Any, Optional

from orchestrator.model_card.write import CARD_NAME

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

LICENSE_FILE = "LICENSE.txt"  # the name MLflow's transformers flavour writes
_TEXTS = {"apache-2.0": "https://www.apache.org/licenses/LICENSE-2.0"}


def folder_card(folder: str | os.PathLike[str]) -> Optional["ModelCard"]:
    """The export's card (`README.md`), None when it has none."""
    path = os.path.join(folder, CARD_NAME)
    if not os.path.isfile(path):
        return None
    from huggingface_hub import ModelCard

    return ModelCard.load(path)


def license_text(card: "ModelCard") -> str:
    name = card.data.license or "unknown"
    where = _TEXTS.get(name, "the model card")
    return (f"License: {name}, as the model's card (README.md, model_card.md and model_card_data.yaml beside "
            f"this file) declares it. Full text: {where}.\n")


def replace_license(client: Any, model_id: str, card: "ModelCard") -> None:
    """Overwrite the logged model's LICENSE.txt with the card's license."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, LICENSE_FILE)
        with open(path, "w") as f:
            f.write(license_text(card))
        client.log_model_artifact(model_id, path)
