"""Result-defining versus operational recipe keys.

A result-defining key (data, model, optimisation, pruning, seed, global batch) changes what a stage
produces; an operational key (worker count, resources, placement, failure policy, checkpoint and
evaluation cadence) changes only how it runs. Fields declare which they are where they are defined
(`operational(...)` instead of `Field(...)`); only result-defining values enter a stage's
fingerprint, so changing an operational key resumes a stage instead of invalidating it.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Iterator, get_args, get_origin

from pydantic import BaseModel, Field

_MARK = {"operational": True}


def operational(default: Any = ..., **kwargs: Any) -> Any:
    """`Field(...)` for a key that never changes a stage's result."""
    return Field(default, json_schema_extra=_MARK, **kwargs)


def is_operational(model: type[BaseModel], name: str) -> bool:
    extra = model.model_fields[name].json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("operational"))


def result_defining(model: BaseModel) -> dict[str, Any]:
    """The model as JSON values without its operational fields (at any depth)."""
    return _strip(model)


def _strip(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return {name: _strip(getattr(value, name)) for name in type(value).model_fields
                if not is_operational(type(value), name)}
    if isinstance(value, (list, tuple)):
        return [_strip(v) for v in value]
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items()}
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else _json(value)


def _json(value: Any) -> Any:
    from pydantic_core import to_jsonable_python

    return to_jsonable_python(value)


def operational_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted paths of every operational key under `model` ("*" stands for a list index)."""
    paths: set[str] = set()
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        if is_operational(model, name):
            paths.add(path)
            continue
        for inner, listed in _models_in(field.annotation):
            paths |= operational_paths(inner, f"{path}.*." if listed else f"{path}.")
    return paths


def _models_in(annotation: Any, listed: bool = False) -> Iterator[tuple[type[BaseModel], bool]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation, listed
        return
    origin = get_origin(annotation)
    for arg in get_args(annotation):
        yield from _models_in(arg, listed or origin in (list, tuple))


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c": [{"d": 2}]} -> {"a.b": 1, "c.0.d": 2}."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out or ({prefix[:-1]: {}} if prefix else {})
    if isinstance(value, list) and value and all(isinstance(v, (dict, list)) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: value}


def changed_keys(old: dict[str, Any], new: dict[str, Any], ignore: set[str] = frozenset()) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every key whose value differs, keys matching an `ignore`
    pattern left out (an older pofa recorded operational keys in its configs)."""
    a, b = flatten(old), flatten(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if any(fnmatch.fnmatchcase(key, p) or fnmatch.fnmatchcase(key, p + ".*") for p in ignore):
            continue
        if a.get(key, _MISSING) != b.get(key, _MISSING):
            out.append((key, a.get(key, _MISSING), b.get(key, _MISSING)))
    return out


class _Missing:
    def __repr__(self) -> str:
        return "(unset)"


_MISSING = _Missing()
