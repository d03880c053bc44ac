#!/usr/bin/env bash
# GPU session check (at most ~9 minutes): CUDA tests, CUDA-vs-CPU box parity on the VOC07 fixture,
# mining throughput at batch 1/16/64 in float32 and bf16, detector training throughput (AMP; CutLER's Cascade Mask
# R-CNN beside Mask R-CNN), one self-training prediction pass, the cut solver, VoteCut's six-backbone ensemble,
# then one summary table. Random weights throughout (speed does not depend on them). Installs nothing beyond
# `make install`. A failed or timed-out step is recorded and the script goes on to the summary.
#
#   bash benchmarks/gpu_check.sh                 # from the repository root
#   LOST_SHARED_DATA=/path/to/shared/data BUDGET_S=480 bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

BUDGET_S="${BUDGET_S:-540}"                      # whole script, seconds
export LOST_SHARED_DATA="${LOST_SHARED_DATA:-$(cd .. && pwd)/shared/data}"
PY="${PY:-.venv/bin/python}"
LOG_DIR="${LOG_DIR:-$(mktemp -d -t gpu_check.XXXXXX)}"
START=$(date +%s)
STEPS=()
STATUS=()
SECS=()

remaining() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# step NAME TIMEOUT_S CMD...: run CMD with a timeout (capped by the remaining budget), log to LOG_DIR/NAME.log
step() {
  local name="$1" limit="$2"; shift 2
  local left; left=$(remaining)
  if (( left < 15 )); then
    STEPS+=("$name"); STATUS+=("SKIPPED (budget spent)"); SECS+=(0); return 0
  fi
  (( limit > left )) && limit=$left
  echo "=== $name (timeout ${limit}s): $*"
  local t0 rc=0; t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$LOG_DIR/$name.log" 2>&1 || rc=$?
  tail -n 25 "$LOG_DIR/$name.log"
  local st="ok"
  if (( rc == 124 || rc == 137 )); then st="TIMEOUT (${limit}s)"; elif (( rc != 0 )); then st="FAILED (rc=$rc)"; fi
  STEPS+=("$name"); STATUS+=("$st"); SECS+=($(( $(date +%s) - t0 )))
  return 0
}

if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then step install 60 make install; fi
if [[ ! -x "$PY" ]]; then echo "no python at $PY after make install"; fi
step gpu_info 15 "$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), \
'bf16', torch.cuda.is_bf16_supported())"
step cuda_tests 100 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_batched.py tests/test_lost.py \
  tests/test_dinoseg.py tests/test_cut_solver.py -k cuda
step parity 80 "$PY" benchmarks/cuda_parity.py --images 60 --batch 16 --precisions fp32 bf16
step mine_fp32 70 "$PY" benchmarks/mine_throughput.py --device cuda --images 60 --batch 1 16 64 --precision fp32
step mine_bf16 60 "$PY" benchmarks/mine_throughput.py --device cuda --images 60 --batch 1 16 64 --precision bf16
step train_amp 90 "$PY" benchmarks/train_throughput.py --device cuda --presets r50_c4 r50_fpn --iters 10 --warmup 3
step train_cascade 60 "$PY" benchmarks/train_throughput.py --device cuda --presets cascade_mask_r50_fpn mask_r50_fpn \
  --iters 10 --warmup 3
step self_train_pass 45 "$PY" benchmarks/self_train_pass.py --device cuda --preset cascade_mask_r50_fpn --images 16
# the normalized cut's solver=torch on the GPU vs scipy on the CPU: one cut at 3,600 tokens, agreement of boxes
# and masks on synthetic objects (1,600 tokens) and on 20 fixture images (ViT-S/16 at 480: 900 tokens)
step cut_solver 75 "$PY" benchmarks/cut_solver.py --device cuda --repeats 3 --no-dense --synthetic 10 \
  --synthetic-side 40 --arch dino_vits16 --images 20
# VoteCut over CuVLER's six backbones (each forward and eigensolve on the GPU), 8 fixture images at 480 px
step votecut_ensemble 60 "$PY" benchmarks/mine_throughput.py --device cuda --miner votecut_ensemble --images 8 \
  --batch 1 8

echo
echo "================================ summary ================================"
printf '%-12s %-26s %6s\n' step status seconds
for i in "${!STEPS[@]}"; do printf '%-12s %-26s %6s\n' "${STEPS[$i]}" "${STATUS[$i]}" "${SECS[$i]}"; done
echo "-- GPU";            cat "$LOG_DIR/gpu_info.log" 2>/dev/null | tail -n 1 || true
echo "-- CUDA tests";     grep -E 'passed|failed|error' "$LOG_DIR/cuda_tests.log" 2>/dev/null | tail -n 1 || true
echo "-- CUDA vs CPU boxes (reference: CPU float32, one image at a time)"
grep -E '^(precision|fp32|bf16|fp16)' "$LOG_DIR/parity.log" 2>/dev/null || true
for p in fp32 bf16; do
  echo "-- mining $p (images/s; seconds: decode forward miner write idle)"
  grep -E '^(run|batch=|  peak)' "$LOG_DIR/mine_$p.log" 2>/dev/null || true
done
echo "-- training (AMP, random weights; iterations/s = 1 / s/iter)"
cat "$LOG_DIR/train_amp.log" "$LOG_DIR/train_cascade.log" 2>/dev/null | grep -E '^(preset|r50|mask|cascade)' | \
  awk '/^preset/ {if (!h++) print $0 "   iter/s"; next} {printf "%s   %.2f\n", $0, 1/$3}' || true
echo "-- self-training prediction pass (CutLER's detector, COCO fixture images)"
grep -E '^self-training pass' "$LOG_DIR/self_train_pass.log" 2>/dev/null || true
echo "-- normalized cut: solver=torch on the GPU vs scipy on the CPU (one cut; agreement of boxes and masks)"
grep -E '^  (exact|torch|λ|synthetic|VOC07|  +one cut)' "$LOG_DIR/cut_solver.log" 2>/dev/null || true
echo "-- VoteCut, six-backbone ensemble (images/s; seconds: decode forward miner write idle)"
grep -E '^(arch|batch=)' "$LOG_DIR/votecut_ensemble.log" 2>/dev/null || true
echo "logs: $LOG_DIR   total $(( $(date +%s) - START )) s"
