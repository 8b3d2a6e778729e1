#!/usr/bin/env bash
# Half precision on the CPU (issue: CPU speed, round two), one run on one machine: the SD1.5 UNet
# CFG step at 512 (+ 1 ControlNet) and the SD1.5 VAE decode at 512 in f32 and HALF (bf16, the
# default, or f16), PyTorch (f32, and HALF through CPU autocast) beside sdctl; then the accuracy
# of HALF: one 512x512 generation of the random SD1.5 folder in f32 and in HALF (same seed), the
# PSNR of the HALF image against the f32 one. Needs torch + diffusers (PYTHON) and a release sdctl
# (SDCTL). CI does not run this. PARTS (default "unet vae generate") picks the parts; ROUNDS
# (default 1) repeats the UNet and VAE parts, PyTorch and sdctl alternating; ARCH=sdxl (with
# SIZE, default 512) times the SDXL UNet instead of SD1.5's.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
S=${SDCTL:-target/release/sdctl}
SD15=${SD15:-/tmp/sd15-random}
ITERS=${ITERS:-3}
PARTS=${PARTS:-unet vae generate}
ROUNDS=${ROUNDS:-1}
HALF=${HALF:-bf16}
ARCH=${ARCH:-sd15}
SIZE=${SIZE:-512}
CN=$([ "$ARCH" = sd15 ] && echo 1 || echo 0)
part() { [[ " $PARTS " == *" $1 "* ]]; }
date; grep -m1 "model name" /proc/cpuinfo || true; nproc; grep -o -m2 "avx512_bf16\|avx512_fp16" /proc/cpuinfo || true
part unet && for _ in $(seq "$ROUNDS"); do for dt in f32 "$HALF"; do
  "$PY" benches/compare.py --arch "$ARCH" --width "$SIZE" --height "$SIZE" --batch 2 --iters "$ITERS" --controlnet "$CN" --dtype "$dt"
  "$S" bench unet --arch "$ARCH" --width "$SIZE" --height "$SIZE" --batch 2 --iters "$ITERS" --controlnet "$CN" --dtype "$dt"
done; done
part vae && for _ in $(seq "$ROUNDS"); do for dt in f32 "$HALF"; do
  "$PY" - "$dt" <<'PY'
import sys, time, torch, contextlib
from diffusers import AutoencoderKL
torch.manual_seed(0)
vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                    up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4).eval()
z = torch.randn(1, 4, 64, 64)
half = {"bf16": torch.bfloat16, "f16": torch.float16}.get(sys.argv[1])
cast = torch.autocast("cpu", dtype=half) if half else contextlib.nullcontext()
ts = []
with torch.inference_mode(), cast:
    for _ in range(3):
        t = time.perf_counter(); vae.decode(z); ts.append(time.perf_counter() - t)
print(f"diffusers vae decode 512x512 {sys.argv[1]}: {min(ts):.2f} s (min of 3, first {ts[0]:.2f})")
PY
  for _ in 1 2; do "$S" bench vae --size 512 --dtype "$dt"; done
done; done
part generate || exit 0
[ -d "$SD15" ] || "$PY" benches/make_sd15_random.py "$SD15"
for dt in f32 "$HALF"; do
  "$S" generate --model "$SD15" --prompt "a red circle on a blue background" --steps 4 \
    --sampler "DPM++ 2M" --schedule karras --width 512 --height 512 --seed 7 --dtype "$dt" \
    --output "/tmp/half-check-$dt.png"
done
"$PY" - "$HALF" <<'PY'
import sys
import numpy as np
from PIL import Image
a = np.asarray(Image.open("/tmp/half-check-f32.png")).astype(np.float64)
b = np.asarray(Image.open(f"/tmp/half-check-{sys.argv[1]}.png")).astype(np.float64)
mse = ((a - b) ** 2).mean()
print(f"{sys.argv[1]} vs f32 image, SD1.5-size random model, 512x512, 4 steps DPM++ 2M Karras: "
      f"PSNR {10 * np.log10(255 ** 2 / mse):.1f} dB, max |diff| {np.abs(a - b).max():.0f} levels")
PY
date
