#!/usr/bin/env bash
# Fills bench-out/wheels/ (git-ignored) with what `make bench-gpu` needs on a lent GPU machine and that
# machine's image lacks: DeepSpeed and pydantic (with their small dependencies), for its Python 3.12 on
# x86-64. Run it here, where PyPI is reachable; the GPU machine reaches nothing, and its torch,
# transformers, numpy and pyarrow are its own (a project pin does not apply there).
# Versions: those of pofa's virtualenv (pyproject.toml pins DeepSpeed).
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=bench-out/wheels
PY=${PY:-.venv/bin/python}
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: two would stop the install there
binary=(pydantic=="$(version pydantic)" pydantic-core=="$(version pydantic-core)"
        annotated-types=="$(version annotated-types)" typing-inspection=="$(version typing-inspection)"
        typing-extensions=="$(version typing-extensions)" hjson=="$(version hjson)")
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$DEST" "${binary[@]}"
# DeepSpeed ships a source archive only: a pure-Python wheel of it, its ops left to build at first use
# (pofa's GPU path loads none: torch's AdamW, no CPU communication op)
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" deepspeed=="$(version deepspeed)"
ls -l "$DEST"
