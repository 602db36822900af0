#!/usr/bin/env bash
# `make bench-gpu`: the benchmark under the python that has the machine's torch, with the carried
# wheels (tests/bench/gpu_wheels.sh) added where that python lacks DeepSpeed or pydantic.
# pofa's virtualenv where there is one; else python3 (a lent GPU machine's image, whose torch is its
# CUDA build: the virtualenv does not travel there, and nothing can be installed from a registry).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${BENCH_PY:-}
if [[ -z $PY ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
WHEELS=bench-out/wheels
missing() { ! "$PY" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ('deepspeed', 'pydantic', 'hjson')))" 2>/dev/null; }
if missing && compgen -G "$WHEELS/*.whl" >/dev/null; then
  site=${TMPDIR:-/tmp}/pofa-bench-site
  echo "bench-gpu: installing $(ls "$WHEELS"/*.whl | wc -l) carried wheels into $site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$WHEELS"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1  # each line as it happens: a stopped run still shows how far it got
exec "$PY" tests/bench/bench_gpu.py "$@"
