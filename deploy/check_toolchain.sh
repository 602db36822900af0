#!/usr/bin/env bash
# DeepSpeed JIT-compiles a small C++ op on first use: it needs a C++ compiler and the
# Python headers of the interpreter that runs it. Fail early, naming what to install.
set -eu
py="${1:-python3}"
missing=()
command -v g++ >/dev/null 2>&1 || command -v c++ >/dev/null 2>&1 || missing+=("a C++ compiler (Debian/Ubuntu: apt-get install g++)")
inc=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
[ -f "$inc/Python.h" ] || missing+=("the Python headers, Python.h in $inc (Debian/Ubuntu: apt-get install python3-dev)")
if [ "${#missing[@]}" -gt 0 ]; then
  echo "pofa set-up: DeepSpeed needs these to compile its ops, and they are missing:" >&2
  for m in "${missing[@]}"; do echo "  - $m" >&2; done
  exit 1
fi
