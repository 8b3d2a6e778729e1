#!/usr/bin/env bash
# ControlNet training step, sdctl beside PyTorch/diffusers (issue: training at PyTorch's speed),
# one run on one machine: SD1.5 architecture, random weights, batch 1, at each SIZES, f32, bf16
# and fp16 mixed precision (PyTorch: CPU autocast), with and without gradient checkpointing
# (MODES), each setting in its own process (peak RSS is
# the process's), sdctl and PyTorch alternating. Each line lists every step: the first one
# includes one-time set-up (page faults of fresh memory, first packing), so compare the later
# ones. Needs torch + diffusers (PYTHON) and a release sdctl (SDCTL). CI does not run this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
S=${SDCTL:-target/release/sdctl}
ITERS=${ITERS:-4}
SIZES=${SIZES:-256 512}
# f32, bf16 and fp16 (mixed precision: fp16 where the CPU has AVX512-FP16, bf16 where it has
# AVX512-BF16), f32-ckpt, fp16-ckpt... (with gradient checkpointing)
MODES=${MODES:-f32 bf16 f32-ckpt}
date; grep -m1 "model name" /proc/cpuinfo || true; nproc; grep -o -E "avx512_(bf16|fp16)" /proc/cpuinfo | sort -u || true
for size in $SIZES; do
  for mode in $MODES; do
    prec=${mode%-ckpt}
    mp=$([ "$prec" = f32 ] && echo no || echo "$prec")
    gc=()
    [ "$mode" != "$prec" ] && gc=(--gradient-checkpointing)
    "$PY" benches/train_compare.py --size "$size" --iters "$ITERS" --dtype "$prec" "${gc[@]}"
    "$S" bench train --size "$size" --iters "$ITERS" --mixed-precision "$mp" "${gc[@]}"
  done
done
