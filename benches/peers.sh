#!/usr/bin/env bash
# OpenVINO and ONNX Runtime beside PyTorch and sdctl on the SD1.5 UNet (one CFG call, random
# weights): each runtime installed into its own venv under $VENVS, the UNet exported once from
# the torch venv ($PYTHON, which gets openvino + onnx + onnxscript for the export), then every
# runtime timed on the same shapes in one run. CI does not run this.
#   PYTHON=/path/to/torch-venv/bin/python benches/peers.sh [WIDTH] [HEIGHT]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
S=${SDCTL:-target/release/sdctl}
W=${1:-512}; H=${2:-512}; ITERS=${ITERS:-3}
OUT=${PEERS_DIR:-/tmp/peers-$W-$H}
VENVS=${VENVS:-/tmp/peer-venvs}
mkdir -p "$VENVS"
[ -x "$VENVS/ov/bin/python" ] || { python3 -m venv "$VENVS/ov" && "$VENVS/ov/bin/pip" install -q openvino numpy; }
[ -x "$VENVS/ort/bin/python" ] || { python3 -m venv "$VENVS/ort" && "$VENVS/ort/bin/pip" install -q onnxruntime numpy; }
"$PY" -c "import openvino, onnx, onnxscript" 2>/dev/null || "$PY" -m pip install -q openvino onnx onnxscript
[ -f "$OUT/unet.xml" ] && [ -f "$OUT/unet.onnx" ] || "$PY" benches/peers.py export "$OUT" --width "$W" --height "$H"
date; grep -m1 "model name" /proc/cpuinfo || true; nproc
"$PY" benches/compare.py --width "$W" --height "$H" --batch 2 --iters "$ITERS"
"$VENVS/ort/bin/python" benches/peers.py onnxruntime "$OUT" --width "$W" --height "$H" --iters "$ITERS"
"$VENVS/ov/bin/python" benches/peers.py openvino "$OUT" --width "$W" --height "$H" --iters "$ITERS" --precision f32
"$VENVS/ov/bin/python" benches/peers.py openvino "$OUT" --width "$W" --height "$H" --iters "$ITERS"
"$S" bench unet --width "$W" --height "$H" --batch 2 --iters "$ITERS"
"$S" bench unet --width "$W" --height "$H" --batch 2 --iters "$ITERS" --dtype bf16
date
