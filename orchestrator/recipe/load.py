"""Loading a recipe: built-in name or YAML path, `--set a.b=value` overrides, errors that name the key."""
from __future__ import annotations

import difflib
import os
import typing
from importlib import resources
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ValidationError

from orchestrator.recipe.schema import Recipe

BUILTIN_PACKAGE = "orchestrator.builtin_recipes"


class RecipeError(ValueError):
    """A recipe that cannot run; `problems` lists each key with what is wrong with it."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"recipe {source} is invalid:\n" + "\n".join(f"  - {p}" for p in problems))


def builtin_recipes() -> dict[str, str]:
    """name -> one-line description of every recipe shipped with pofa."""
    out = {}
    for entry in sorted(resources.files(BUILTIN_PACKAGE).iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            data = yaml.safe_load(entry.read_text()) or {}
            out[entry.name[:-5]] = str(data.get("description", "")).strip().splitlines()[0:1][0] if data.get(
                "description") else ""
    return out


def read_recipe_document(name_or_path: str) -> tuple[dict[str, Any], str]:
    """The raw YAML mapping and where it came from."""
    if os.path.exists(name_or_path):
        with open(name_or_path) as f:
            text, source = f.read(), os.path.abspath(name_or_path)
    else:
        entry = resources.files(BUILTIN_PACKAGE) / f"{name_or_path}.yaml"
        if not entry.is_file():
            known = ", ".join(builtin_recipes())
            raise RecipeError(name_or_path, [f"no such file and no built-in recipe of that name (built-in: {known})"])
        text, source = entry.read_text(), f"built-in:{name_or_path}"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(source, [f"not valid YAML: {exc}"]) from exc
    if not isinstance(data, dict):
        raise RecipeError(source, ["the document must be a mapping of sections"])
    return data, source


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """`a.b=value`: the value is parsed as a YAML scalar (so `3`, `0.5`, `true`, `null` keep their types)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError("--set", [f"{item!r}: expected KEY=VALUE, e.g. preprocess.num_workers=2"])
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise RecipeError("--set", [f"{key}: value {raw!r} is not a YAML scalar: {exc}"]) from exc
        node: Any = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = _child(node, part, key)
        if isinstance(node, list):
            node[_index(node, parts[-1], key)] = value
        else:
            node[parts[-1]] = value
    return data


def _index(node: list, part: str, key: str) -> int:
    """`finetune.tasks.0.epochs`: a number addresses an existing list item."""
    if not part.isdigit() or int(part) >= len(node):
        raise RecipeError("--set", [f"{key}: {part!r} is not an index of a list of {len(node)} item(s)"])
    return int(part)


def _child(node: Any, part: str, key: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, key)]
    child = node.setdefault(part, {})
    if not isinstance(child, (dict, list)):
        raise RecipeError("--set", [f"{key}: {part!r} is not a section"])
    return child


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in error["loc"]) or "(recipe)"
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(error["loc"][-1]), _keys_at(error["loc"][:-1]), n=1, cutoff=0.7)
        return f"{key}: unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    msg = error["msg"].removeprefix("Value error, ")
    if "input" in error and not isinstance(error["input"], dict):
        return f"{key}: {msg} (got {error['input']!r})"
    return f"{key}: {msg}"


def _keys_at(loc: tuple) -> list[str]:
    """The keys the recipe's schema allows in the section at `loc` ([] where it cannot tell)."""
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue  # a list item: its type was taken with the list
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return []
        model = _model_in(fields[part].annotation)
    fields = getattr(model, "model_fields", None)
    return list(fields) if fields else []


def _model_in(annotation: Any) -> Any:
    """The pydantic model inside Optional[...], list[...] or a union of one model and None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def validate_recipe(data: dict[str, Any], source: str) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(source, [_describe(e) for e in exc.errors()]) from None


def load_recipe(name_or_path: str, overrides: Iterable[str] = ()) -> Recipe:
    data, source = read_recipe_document(name_or_path)
    return validate_recipe(apply_overrides(data, overrides), source)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
