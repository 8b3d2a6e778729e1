#!/usr/bin/env bash
# Issue 27's GPU check: one script for the device machine (an H100 / H200 lent for minutes, with
# the CUDA driver, PyTorch and NVIDIA's library wheels, but no Rust). Build and pack here first:
#   bash benches/build_cuda.sh        # .gpu/sdctl.gz (built with --features cuda) and .gpu/whl/
# then run it there, from the repository root, with .gpu carried (the device tool's `carry`):
#   bash benches/gpu_check.sh         # about 5 minutes; $OUT gets gpu_check.md and the JSON
# It prints one table:
#   1. parity: the tiny SD1 + ControlNet fixture generated on the GPU in f32 against the CPU's
#      latents (bound 1e-3, as the CPU against diffusers) and against diffusers' (1e-3); f16 on
#      the GPU against f32 (relative RMS, bound 0.3% as the CPU's f16 test);
#   2. `sdctl bench unet --device cuda --dtype f16` for SD1.5 at 512 and SDXL at 1024, with 0, 1
#      and 2 ControlNets, beside benches/compare.py (diffusers, fp16, SDPA) on the same shapes:
#      seconds per CFG call, ratios, and the peak GPU memory of each process (nvidia-smi's
#      used memory sampled every 20 ms, less the idle level: both runtimes measured alike; the
#      PyTorch allocator's own peak beside it).
# A self-test on a machine without a GPU (tiny sizes, the CPU for both runtimes):
#   GPU_CHECK_DEVICE=cpu SDCTL=target/release/sdctl bash benches/gpu_check.sh --smoke
set -uo pipefail
cd "$(dirname "$0")/.."
dev=${GPU_CHECK_DEVICE:-cuda}
smoke=0
[ "${1:-}" = --smoke ] && smoke=1
py=${PYTHON:-python3}
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
work=$(mktemp -d)
bin=${SDCTL:-}
if [ -z "$bin" ] && [ -f .gpu/sdctl.gz ]; then
  gunzip -c .gpu/sdctl.gz >"$work/sdctl" && chmod +x "$work/sdctl" && bin="$work/sdctl"
fi
report="$out/gpu_check.md"
fail=0
say() { echo "$*" | tee -a "$report"; }
: >"$report"

[ -n "$bin" ] && [ -x "$bin" ] ||
  { echo "gpu_check: no sdctl (.gpu/sdctl.gz: run benches/build_cuda.sh here first; or SDCTL=PATH)" >&2; exit 1; }
# diffusers is not in the device image: the wheels build_cuda.sh packed
if ! "$py" -c 'import diffusers' 2>/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target "$work/site" .gpu/whl/*.whl ||
    { echo "gpu_check: diffusers: installing .gpu/whl failed" >&2; exit 1; }
  export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "$dev" = cuda ]; then
  # sdctl loads libcuda (the driver's) and cuBLAS / cuRAND / NVRTC at run time: from the nvidia
  # wheels beside the device's PyTorch
  libs=$("$py" -c 'import glob, os, site
print(":".join(sorted({d for sp in site.getsitepackages() for d in glob.glob(os.path.join(sp, "nvidia", "*", "lib"))})))')
  export LD_LIBRARY_PATH="$libs:/usr/local/nvidia/lib64:/usr/local/nvidia/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  say "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
fi
say "sdctl: $("$bin" --version 2>&1); torch $("$py" -c 'import torch; print(torch.__version__)'); diffusers $("$py" -c 'import diffusers; print(diffusers.__version__)')"

# Runs a command while sampling the GPU's used memory; prints the peak MiB above the level
# before it (0 without a GPU). The command's own output goes to $work/last.log.
with_peak() {
  if [ "$dev" != cuda ]; then
    "$@" >"$work/last.log" 2>&1
    local rc=$?
    echo 0
    return $rc
  fi
  local q=(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0)
  local base
  base=$("${q[@]}")
  "${q[@]}" -lms 20 >"$work/mem.log" 2>/dev/null &
  local smi=$!
  "$@" >"$work/last.log" 2>&1
  local rc=$?
  kill "$smi" 2>/dev/null
  wait "$smi" 2>/dev/null
  echo $(($(sort -n "$work/mem.log" | tail -n1) - base))
  return $rc
}
show_failure() {
  say "FAILED: $*"
  sed 's/^/    /' "$work/last.log" | tail -n 30 | tee -a "$report"
  fail=1
}

# 1. parity on the tiny fixtures
fx=tests/fixtures
gen() { # DEVICE DTYPE NAME
  "$bin" generate --model "$fx/models/sd1" --prompt "a red circle on a blue background" \
    --negative-prompt "blurry, lowres" --width 64 --height 64 --steps 4 --cfg-scale 7.5 \
    --sampler euler --schedule normal --noise "$fx/expected/pipe_cn_sd1_one_unit.safetensors" \
    --control "model=$fx/models/controlnet-sd1,image=$fx/inputs/control_a.png,weight=0.8" \
    --device "$1" --dtype "$2" --output "$work/$3.png" --save-latents "$work/$3.safetensors"
}
say ""
say "## Parity (tiny SD1 + 1 ControlNet, 4 steps, CFG 7.5)"
runs_ok=1
for r in "cpu f32 cpu32" "$dev f32 dev32" "$dev f16 dev16"; do
  set -- $r
  with_peak gen "$1" "$2" "$3" >/dev/null || { show_failure "sdctl generate --device $1 --dtype $2"; runs_ok=0; }
done
if [ $runs_ok = 1 ]; then
  "$py" - "$work" "$fx/expected/pipe_cn_sd1_one_unit.safetensors" "$dev" <<'EOF' | tee -a "$report"
import sys
import numpy as np
from safetensors.numpy import load_file
work, exp, dev = sys.argv[1:]
lat = lambda n: load_file(f"{work}/{n}.safetensors")["latents"].astype(np.float64)
want = load_file(exp)["latents"].astype(np.float64)
cpu, d32, d16 = lat("cpu32"), lat("dev32"), lat("dev16")
mx = lambda a, b: float(np.abs(a - b).max())
rel = lambda a, b: float(np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean()))
rows = [(f"{dev} f32 vs cpu f32, max abs", mx(d32, cpu), 1e-3),
        (f"{dev} f32 vs diffusers f32, max abs", mx(d32, want), 1e-3),
        (f"{dev} f16 vs {dev} f32, relative RMS", rel(d16, d32), 3e-3)]
print("| check | value | bound | |\n|---|---|---|---|")
bad = 0
for name, v, bound in rows:
    ok = v <= bound
    bad += not ok
    print(f"| {name} | {v:.3g} | {bound:g} | {'ok' if ok else 'FAILED'} |")
sys.exit(1 if bad else 0)
EOF
  [ "${PIPESTATUS[0]}" = 0 ] || fail=1
fi

# 2. speed and memory, sdctl and diffusers on the same shapes
if [ $smoke = 1 ]; then
  shapes=("sd15 128 0" "sd15 128 1")
  iters=1
  dtype=$([ "$dev" = cuda ] && echo f16 || echo f32)
else
  shapes=("sd15 512 0" "sd15 512 1" "sd15 512 2" "sdxl 1024 0" "sdxl 1024 1" "sdxl 1024 2")
  iters=10
  dtype=f16
fi
say ""
say "## UNet CFG call (batch 2), $dtype on $dev: seconds (mean of $iters after a warm-up) and peak GPU memory"
say "| model | ControlNets | sdctl s | PyTorch s | sdctl / PyTorch | sdctl GPU MiB | PyTorch GPU MiB (allocator peak GiB) |"
say "|---|---|---|---|---|---|---|"
for s in "${shapes[@]}"; do
  set -- $s
  arch=$1 size=$2 cn=$3
  j1="$out/sdctl_${arch}_${size}_${cn}.json" j2="$out/torch_${arch}_${size}_${cn}.json"
  m1=$(with_peak "$bin" bench unet --arch "$arch" --width "$size" --height "$size" --batch 2 \
    --iters "$iters" --device "$dev" --dtype "$dtype" --controlnet "$cn" --json "$j1") ||
    { show_failure "sdctl bench unet $s"; continue; }
  m2=$(with_peak "$py" benches/compare.py --arch "$arch" --width "$size" --height "$size" --batch 2 \
    --iters "$iters" --device "$dev" --dtype "$dtype" --controlnet "$cn" --json "$j2") ||
    { show_failure "benches/compare.py $s"; continue; }
  "$py" - "$j1" "$j2" "$arch $size" "$cn" "$m1" "$m2" <<'EOF' | tee -a "$report"
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
name, cn, m1, m2 = sys.argv[3:]
# with ControlNets: the controlled call, timed alternating with the plain one in each process
sa = a["controlnet"]["mean_s"] if int(cn) else a["unet"]["mean_s"]
sb, peak = ((b["controlnet"]["mean_s"], b["controlnet"]["peak_gpu_gib"]) if int(cn)
            else (b["unet"]["mean_s"], b["unet"]["peak_gpu_gib"]))
print(f"| {name} | {cn} | {sa:.4f} | {sb:.4f} | {sa / sb:.2f}x | {m1} | {m2} ({peak:.2f}) |")
EOF
done

rm -rf "$work"
say ""
[ $fail = 0 ] && say "gpu_check: all checks passed" || say "gpu_check: FAILED (above)"
exit $fail
