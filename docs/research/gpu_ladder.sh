#!/usr/bin/env bash
# Issue 8's ladder on one lent H100 (the `device` tool), exactly as run. From the repo root there:
#   MIN=6.5 bash docs/research/gpu_ladder.sh        (with the wheels in .whl/ carried; see below)
# The machine has torch + CUDA but no transformer-lens/datasets/plotly: their py3.12 wheels travel in
# .whl/ (pip download --no-deps ... transformer-lens==4.3.0 datasets==5.2.0 dill==0.4.1
# multiprocess==0.70.19 plotly==7.1.0). Results come back as tarballs under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
OUT=${OUT:-/tmp/out}
MIN=${MIN:-6}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu: a local dry run of the commands (skips the GPU benchmark)
bring_back() {  # runs even when the command is cut short: metrics of every run come back
  tar czf "$OUT/studies.tgz" --exclude=checkpoints --exclude=.datasets -C /tmp gs gs-a.log gs-b.log 2>/dev/null
  for r in control-s0 feedback-from-hops-s0; do  # one file each (16 MB cap per file)
    tar czf "$OUT/ckpt-$r.tgz" --exclude='state_*' -C /tmp "gs/main/runs/$r/checkpoints" 2>/dev/null
  done
  last=$(ls /tmp/gs/main/runs/vanilla-s0/checkpoints/ 2>/dev/null | grep -o '^step_[0-9]*' | sort -t_ -k2 -n | tail -1)
  [ -n "$last" ] && tar czf "$OUT/ckpt-vanilla-s0.tgz" -C /tmp gs/main/runs/vanilla-s0/checkpoints/$last.safetensors \
      gs/main/runs/vanilla-s0/checkpoints/$last.json
  ls -la "$OUT"
}
trap bring_back EXIT
if [ "$DEVICE" = cuda ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD
  python3 -c "import torch, models.train, analyses.grokking_speed; print(torch.__version__, torch.cuda.get_device_name())" || exit 4
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  # 1. throughput on an idle GPU (also the smoke test of the CUDA/bf16 training path)
  timeout 120 python3 benchmarks/train_throughput.py --presets tiny-composition paper-composition \
      --devices cuda --steps 100 --out "$OUT/train_throughput_h100.json" || exit 5
fi

# 2. (run at 38ef667 with --base tiny-composition, the paper recipe's name then)
#    two grids at once, every run its own process on the one GPU, each stopping after $MIN minutes
COMMON=(--device "$DEVICE" --time-budget "$MIN" --max-steps 1000000 --quiet
        --set eval.every=1000 --set run.checkpoint_every=10000 --set run.save_every=10000
        --set run.log_checkpoints=false)
python3 -m looplens study grokking-speed --out /tmp/gs/main --base tiny-composition-paper --seeds 0,1,2 \
    --interventions control,feedback-from-hops,vanilla --jobs 9 "${COMMON[@]}" > /tmp/gs-a.log 2>&1 &
A=$!
python3 -m looplens study grokking-speed --out /tmp/gs/ladder --base tiny-composition-paper --seeds 0 \
    --interventions supervise-from-hops,feedback,batch-4x,weight-decay-1,grokfast --jobs 7 "${COMMON[@]}" > /tmp/gs-b.log 2>&1 &
B=$!
sleep 60; [ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
wait $A; echo "grid A exit $?"; wait $B; echo "grid B exit $?"  # (each run stops itself after $MIN minutes)
tail -5 /tmp/gs-a.log /tmp/gs-b.log
cat /tmp/gs/*/summary.md
# 3. on exit (bring_back): everything but checkpoints, and the model checkpoints of the seed-0
#    control / vanilla / feedback-from-hops runs
