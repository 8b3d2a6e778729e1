#!/usr/bin/env bash
# `sdctl train unet` and `sdctl train vae` steps beside PyTorch/diffusers doing the same step
# (benches/train_base_compare.py) on the tiny-fill model at its training sizes (64x64; UNet
# batch 16, VAE batch 8), one run on one machine, alternating. Both report the steady step
# (steps 2 on: sdctl's data, loss, backward, clipping and AdamW; PyTorch's the same on random
# stand-ins of the data). Needs torch + diffusers + transformers (PYTHON) and a release sdctl
# (SDCTL). CI does not run this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
S=${SDCTL:-target/release/sdctl}
ITERS=${ITERS:-30}
ROUNDS=${ROUNDS:-2}
D=$(mktemp -d)
trap 'rm -rf "$D"' EXIT
date; grep -m1 "model name" /proc/cpuinfo || true; nproc
"$S" dataset fill --output "$D/data" --count 64 --size 64 --seed 0 > /dev/null
for round in $(seq "$ROUNDS"); do
  for part in unet vae; do
    b=$([ "$part" = unet ] && echo 16 || echo 8)
    "$PY" benches/train_base_compare.py --part "$part" --batch "$b" --size 64 --iters "$ITERS" 2>&1 |
      grep "^pytorch"
    "$S" train "$part" --model models/tiny-fill --dataset "$D/data" --output "$D/$part-$round" \
      --batch-size "$b" --max-train-steps "$ITERS" --checkpointing-steps 100000 2>&1 | tail -1
  done
done
