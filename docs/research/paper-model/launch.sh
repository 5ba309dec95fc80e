#!/bin/bash
# usage: launch.sh NAME [extra looplens train args...]  (base: the probe-2 recipe: paper model, random-tail, cosine over 10k)
NAME=$1; shift
cd /work/main
export OMP_NUM_THREADS=1
nohup nice -n 5 .venv/bin/looplens train --preset tiny-composition --device cpu \
  --set model.feedback=0 --set recurrence.supervise=last --set data.world=random-tail \
  --time-budget 120 "$@" --out /work/runs-research/$NAME --quiet \
  > /work/runs-research/$NAME.log 2>&1 &
echo "$NAME pid $!"
