"""Turn a resolved recipe into MLflow params: flat `a.b.c` keys, string values within MLflow's limits."""
from __future__ import annotations

import json
import re
from typing import Any, Mapping

# MLflow's limits (mlflow.utils.validation): a longer key is rejected, a longer value truncated
# by some stores and rejected by others, so pofa shortens both itself, deterministically.
MAX_KEY_LENGTH = 250
MAX_VALUE_LENGTH = 6000
_TRUNCATED = "...[truncated]"
# MLflow accepts alphanumerics, underscores, dashes, periods, spaces, slashes and colons in keys.
_BAD_KEY_CHARS = re.compile(r"[^\w\-. /:]")


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings into `a.b.c` keys; lists and other leaves become strings.

    Lists are kept whole as JSON (e.g. `finetune.tasks = ["sst2", "mnli"]`) rather than
    exploded into indexed keys, so a recipe value maps to exactly one param.
    """
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, name))
        else:
            flat[clean_key(name)] = _clip(_to_text(value), MAX_VALUE_LENGTH)
    return flat


def _to_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def clean_key(key: str) -> str:
    """A key MLflow accepts: other characters become `_`, at most MAX_KEY_LENGTH long."""
    key = _BAD_KEY_CHARS.sub("_", key)
    return _clip(key, MAX_KEY_LENGTH)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(_TRUNCATED)] + _TRUNCATED
