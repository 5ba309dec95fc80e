#!/usr/bin/env bash
# Issue 16.3: GPU training measurements, prepared for a session with a lent GPU (none was available when
# this was written, so nothing here has been run yet). Run from the repository root:
#     bash benchmarks/gpu_train.sh            # ~5 minutes on one H100/H200
# Writes benchmarks/results/*_gpu.json (copy them back and commit). Each step is independent: a failure
# is reported and the next one runs.
set -u
export OMP_NUM_THREADS=4
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
run() { echo "== $*"; "$@" || echo "FAILED ($?): $*"; }
# steps/s, tokens/s and MFU of the tiny and paper presets (bf16 autocast, fused AdamW: the trainer's CUDA defaults)
run timeout 900 "$PY" benchmarks/train_throughput.py --presets tiny-composition paper-composition \
    --devices cuda --steps 100 --warmup 10 --out benchmarks/results/train_throughput_gpu.json
# the same with the step compiled, CUDA graphs (run.compile_mode=reduce-overhead); warm-up covers the compile
run timeout 1200 "$PY" benchmarks/train_throughput.py --presets tiny-composition paper-composition \
    --devices cuda --steps 100 --warmup 30 --set run.compile=true run.compile_mode=reduce-overhead \
    --out benchmarks/results/train_throughput_gpu_compiled.json
# 8 seeds as one vmapped model vs one seed (issue 16.4's GPU half)
run timeout 900 "$PY" benchmarks/ensemble_train.py --device cuda --threads 4 --repeats 5 \
    --out benchmarks/results/ensemble_train_gpu.json
# host synchronisations inside one training step (CUDA's sync debug mode counts them; goal: none)
run timeout 300 "$PY" - <<'PY'
import json, tempfile, time, warnings
from pathlib import Path
import torch
from looplens.models.train import preset
from looplens.models.train.trainer import Trainer
warnings.filterwarnings("ignore")
out = {}
for name in ("tiny-composition", "paper-composition"):
    tr = Trainer(preset(name).with_overrides(["run.device=cuda"]), Path(tempfile.mkdtemp()) / "r", False, None)
    for _ in range(3):
        tr.train_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.train_step()
    torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(50):
        tr.train_step()
    torch.cuda.synchronize()
    out[name] = {"host_syncs_per_step": len(syncs), "sync_messages": syncs[:10],
                 "steps_per_s_eager": round(50 / (time.perf_counter() - t0), 2)}
    print(name, out[name])
out["device"] = torch.cuda.get_device_name()
Path("benchmarks/results/gpu_step_syncs.json").write_text(json.dumps(out, indent=2) + "\n")
PY
