#!/usr/bin/env bash
# Install looplens into .venv and run the main job: the tiny reproduction plan end to end on the CPU
# (extra arguments go to `looplens reproduce`, e.g. --preset smoke --out runs/smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
export OMP_NUM_THREADS=1 PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
.venv/bin/pip install -q torch==2.13.0   # the CPU build first, so nothing pulls a CUDA torch
.venv/bin/pip install -q -e ".[dev]" "transformer-lens>=4,<5"
.venv/bin/python -m looplens reproduce --preset tiny --out runs/repro "$@"
