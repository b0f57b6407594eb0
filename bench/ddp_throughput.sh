#!/usr/bin/env bash
# 1 process (2 torch threads) vs 2 data-parallel processes (torchrun, gloo, 1 thread each) on the real data:
# effnet_lite0_full, 1 epoch at 128 px, batch 32 per process. Run from the repository root; prints each run's
# summary line (training images/s) and wall time. One fresh cache folder: the first run builds the decode store
# (a second or two here), the second reuses it.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/cxr}
OUT=$(mktemp -d)
export COVID_FASTAI_CACHE=$OUT/cache
ARGS="--data $DATA --epochs 1 --size 128 --bs 32 --out $OUT/runs"
python -m covid_fastai check --data "$DATA" >/dev/null    # the pre-scan, outside both timings
/usr/bin/time -f "1 process: wall %e s" python -m covid_fastai recipe effnet_lite0_full $ARGS 2>&1 | tail -2
OMP_NUM_THREADS=1 /usr/bin/time -f "2 processes: wall %e s" \
    torchrun --standalone --nproc_per_node 2 -m covid_fastai recipe effnet_lite0_full $ARGS 2>&1 | tail -2
rm -rf "$OUT"
