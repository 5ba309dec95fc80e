#!/usr/bin/env bash
# Install everything the tests need (idempotent) and run the whole suite, slow tests included: this is
# the command CI runs (.ci/run). Extra arguments go to the main pytest run, e.g.
#   bash scripts/test.sh -k patching
# The fast tier (no install, no slow tests) is `.venv/bin/python -m pytest -m "not slow"` (CONTRIBUTING.md).
# Main environment: TransformerLens 4.x in .venv. Compatibility: TransformerLens 3.9 in .venv-tl39, where
# the tests marked tl_compat compare our model with HookedTransformer at 1e-5, and the plumbing tests rerun.
# System packages are never installed here: without Chromium the browser tests skip and say so
# (.ci/run installs it explicitly).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PIP_DISABLE_PIP_VERSION_CHECK=1

install_env() {  # $1 = venv dir, $2 = transformer-lens requirement
  if [ ! -x "$1/bin/python" ]; then "$PY" -m venv "$1"; fi
  # CPU torch first, so nothing later pulls a CUDA build (the dependency range accepts any torch >= 2.6).
  "$1/bin/pip" install -q torch==2.13.0
  "$1/bin/pip" install -q -e ".[dev]" "$2"
}

chromium_found() {
  if [ -n "${LOOPLENS_CHROMIUM:-}" ]; then command -v "$LOOPLENS_CHROMIUM" >/dev/null 2>&1; return; fi
  for name in chromium chromium-browser google-chrome google-chrome-stable; do
    command -v "$name" >/dev/null 2>&1 && return 0
  done
  return 1
}
if ! chromium_found; then
  echo "scripts/test.sh: chromium is missing, so the browser tests will be skipped" \
       "(install it as root: apt-get install -y chromium; .ci/run does)" >&2
fi

install_env .venv "transformer-lens>=4,<5"
.venv/bin/ruff check .
# Doctests run inside the suite (tests/test_doctests.py imports each looplens.* module by its real name).
.venv/bin/python -m pytest -q -m "not tl_compat" "$@"

install_env .venv-tl39 "transformer-lens>=3.9,<4"
# Here HookedTransformer must exist: a missing one is an error, not a skip.
# Also under 3.9: the tests of the TransformerLens plumbing every looped model relies on (the cache's helpers,
# foreign wrapped models, patching), fast tier.
LOOPLENS_REQUIRE_HOOKED_TRANSFORMER=1 .venv-tl39/bin/python -m pytest -q -m "tl_compat or not slow" -p no:cacheprovider \
  tests/test_tl_compat.py tests/test_cache_methods.py tests/test_foreign.py tests/test_interp_patching.py
