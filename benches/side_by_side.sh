#!/usr/bin/env bash
# Every row of the README's benchmark table in one run on one machine: diffusers / PyTorch, then
# sdctl, for each case. Needs a Python with torch + diffusers (PYTHON, default python3) and a
# release build of sdctl (SDCTL, default target/release/sdctl); SD15 is a folder written by
# benches/make_sd15_random.py (made when missing). CI does not run this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
S=${SDCTL:-target/release/sdctl}
SD15=${SD15:-/tmp/sd15-random}
[ -d "$SD15" ] || "$PY" benches/make_sd15_random.py "$SD15"
date; grep -m1 "model name" /proc/cpuinfo || true; nproc
"$PY" benches/compare.py --width 256 --height 256 --batch 2 --iters 3 --controlnet 1
"$S" bench unet --width 256 --height 256 --batch 2 --iters 3 --controlnet 1
"$PY" benches/compare.py --width 512 --height 512 --batch 2 --iters 4 --controlnet 1
"$S" bench unet --width 512 --height 512 --batch 2 --iters 4 --controlnet 1 --lora 16
"$PY" benches/compare.py --width 512 --height 512 --batch 2 --iters 4 --controlnet 2
"$S" bench unet --width 512 --height 512 --batch 2 --iters 4 --controlnet 2
"$S" bench unet --width 512 --height 512 --batch 2 --iters 2 --distinct
"$S" bench load --model "$SD15" --iters 3
[ -f "$SD15.safetensors" ] || "$S" model convert "$SD15" --to single-file --half --output "$SD15.safetensors"
"$S" bench load --model "$SD15.safetensors" --iters 3
"$PY" - "$SD15" <<'PY'
import sys, time, torch
from diffusers import StableDiffusionPipeline
for i in range(4):
    t = time.perf_counter()
    StableDiffusionPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.float32, safety_checker=None)
    print(f"diffusers from_pretrained (f32) load {i}: {time.perf_counter() - t:.2f} s")
PY
"$PY" -c "from PIL import Image; Image.new('RGB', (512, 512), (255, 255, 255)).save('/tmp/white512.png')"
/usr/bin/time -f "sdctl generate 512x512 CFG + 1 ControlNet, 2 steps: %e s wall, peak RSS %M KiB" \
  "$S" generate --model "$SD15" --control "model=$SD15-controlnet,image=/tmp/white512.png" --steps 2 \
  --width 512 --height 512 --prompt "a red circle" --seed 1 --output /tmp/side-by-side.png
"$PY" benches/generate_memory.py "$SD15" "$SD15-controlnet" 2
date
