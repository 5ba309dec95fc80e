#!/usr/bin/env bash
# Install everything the tests need (idempotent) and run the whole suite.
# Main environment: TransformerLens 4.x in .venv. Compatibility: TransformerLens 3.9 in .venv-tl39,
# where the tests marked tl_compat compare our model with HookedTransformer at 1e-5.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PIP_DISABLE_PIP_VERSION_CHECK=1

install_env() {  # $1 = venv dir, $2 = transformer-lens requirement
  if [ ! -x "$1/bin/python" ]; then "$PY" -m venv "$1"; fi
  # CPU torch first (a file on disk here), so nothing later pulls a CUDA build.
  "$1/bin/pip" install -q torch==2.13.0
  "$1/bin/pip" install -q -e ".[dev]" "$2"
}

# Headless Chromium for the browser test of `looplens app` (Debian's package; root installs it).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "scripts/test.sh: chromium is missing (apt-get install chromium); the browser test will fail" >&2
  fi
fi

install_env .venv "transformer-lens>=4,<5"
.venv/bin/ruff check .
.venv/bin/python -m pytest -q -m "not tl_compat" --doctest-modules tests models data interp analyses "$@"

install_env .venv-tl39 "transformer-lens>=3.9,<4"
.venv-tl39/bin/python -m pytest -q -m tl_compat -p no:cacheprovider tests/test_tl_compat.py
