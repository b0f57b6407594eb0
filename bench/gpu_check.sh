#!/usr/bin/env bash
# bench/gpu_check.sh: the GPU path in one go, under 5 minutes on one GPU. Run from anywhere:
#
#   bash bench/gpu_check.sh                       # data: demo (synthetic, made on the spot, no network needed)
#   DATA=../shared/data/cxr bash bench/gpu_check.sh --pretrained false
#
# 1. the tests marked `gpu` (cached body features on the GPU, bf16 autocast on CUDA);
# 2. a 1-epoch `best` (python -m covid_fastai recipe best --epochs 1);
# 3. a 2-process DDP run (torchrun --standalone --nproc_per_node 2): nccl on 2 GPUs where there are 2; on a
#    one-GPU machine one-GPU-per-process nccl cannot start 2 ranks, so the 2 ranks run under gloo on the CPU,
#    and the log says so.
# Extra arguments go to both runs (e.g. --pretrained false where the weights cannot be downloaded).
# Everything it prints is also written to bench/gpu-check-<UTC time>.log; runs go to a temporary folder.
set -u -o pipefail
cd "$(dirname "$0")/.."
LOG="bench/gpu-check-$(date -u +%Y%m%dT%H%M%SZ).log"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
DATA="${DATA:-demo}"
RECIPE_DDP="${RECIPE_DDP:-resnet18_full}"
fail=0
step() {  # step NAME TIMEOUT_S COMMAND...: run it, print its status and seconds; a failure marks the check failed
  local name="$1" limit="$2"; shift 2
  echo "== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "== $name: exit $rc in $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || fail=1
}
{
  echo "gpu_check $(date -u '+%Y-%m-%d %H:%M UTC') commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "nvidia-smi: not found"
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), 'devices', torch.cuda.device_count(), 'bf16', torch.cuda.is_available() and torch.cuda.is_bf16_supported())"
  if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA GPU visible to torch; fix: run this on a GPU machine with a CUDA build of torch"
    exit 2
  fi
  NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
  step "tests marked gpu" 120 python -m pytest -m gpu -q -p no:xdist -rs tests/test_gpu.py
  step "best, 1 epoch" 120 python -m covid_fastai recipe best --epochs 1 --data "$DATA" --out "$TMP/best" "$@"
  if [ "$NGPU" -ge 2 ]; then
    step "DDP, 2 processes on 2 GPUs (nccl)" 120 torchrun --standalone --nproc_per_node 2 -m covid_fastai recipe \
      "$RECIPE_DDP" --epochs 1 --data "$DATA" --out "$TMP/ddp" "$@"
  else
    echo "only $NGPU GPU: the 2 ranks run on the CPU under gloo (nccl needs one GPU per process)"
    step "DDP, 2 processes on the CPU (gloo)" 150 env CUDA_VISIBLE_DEVICES= torchrun --standalone --nproc_per_node 2 \
      -m covid_fastai recipe "$RECIPE_DDP" --epochs 1 --size 64 --data "$DATA" --out "$TMP/ddp" "$@"
  fi
  for r in "$TMP"/best/* "$TMP"/ddp/*; do [ -f "$r/report.md" ] && { echo "-- $r/report.md"; head -40 "$r/report.md"; }; done
  echo "gpu_check: $([ $fail -eq 0 ] && echo passed || echo FAILED)"
  exit $fail
} 2>&1 | tee "$LOG"
