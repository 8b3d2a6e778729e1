#!/usr/bin/env bash
# Builds the CUDA sdctl for the device machine (issue 27) and packs what benches/gpu_check.sh
# needs there into .gpu/ (git-ignored: name it in the device tool's `carry`):
#   .gpu/sdctl.gz  `cargo build --release -p sdctl --features cuda`, stripped, gzipped; candle's
#                kernels as PTX for sm_90 (H100 / H200; CUDA_COMPUTE_CAP=NN for another card)
#                made by nvcc 13.0: a driver JIT-loads PTX up to its own CUDA release, and the
#                device machines' 580 driver is CUDA 13.0
#   .gpu/whl/    the diffusers 0.42.1 and importlib_metadata wheels (not in the device image)
# The CUDA libraries are not carried: sdctl loads libcuda (the driver's) and cuBLAS, cuRAND and
# NVRTC at run time (candle-core's cudarc with `dynamic-loading`, vendor/README.md), and
# gpu_check.sh finds them in the nvidia wheels beside the device's PyTorch.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(CUDA_RELEASE=13.0 .ci/cuda-toolkit)"
# candle-kernels' MoE kernels link `-lcudart`: the wheel has no libcudart.so to link against,
# and a dynamic cudart would stop the binary from starting where CUDA is absent. Offered
# libcudart.a (the toolkit's libcudart_static.a) under that name, the linker takes the static
# one, which finds the driver at run time. LIBRARY_PATH reaches the linker without touching
# RUSTFLAGS (which would rebuild every crate).
mkdir -p target/cuda/link
ln -sf "$CUDA_ROOT/lib/libcudart_static.a" target/cuda/link/libcudart.a
LIBRARY_PATH="$PWD/target/cuda/link${LIBRARY_PATH:+:$LIBRARY_PATH}" CARGO_TARGET_DIR=target/cuda \
  cargo build --release -p sdctl --features cuda
rm -rf .gpu
mkdir -p .gpu/whl
cp target/cuda/release/sdctl .gpu/sdctl
strip .gpu/sdctl
# about 97 MB stripped (a third of it the MoE kernels' sm_90a code, a third PTX and data), 32 MB
# gzipped: gpu_check.sh unpacks it
gzip -9 -f .gpu/sdctl
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 -d .gpu/whl \
  diffusers==0.42.1 importlib_metadata==8.7.0
carried=$(du -sb .gpu | cut -f1)
tracked=$(git ls-files -z | du --files0-from=- -cb | tail -n1 | cut -f1)
mib() { echo "$(($1 >> 20)) MiB"; }
echo "build_cuda: .gpu/ is $(mib "$carried") (sdctl.gz $(mib "$(stat -c %s .gpu/sdctl.gz)")); with the tracked tree ($(mib "$tracked")) $(mib $((carried + tracked))) would travel, against the device tool's 64 MiB"
if [ $((carried + tracked)) -gt $((64 << 20)) ]; then
  echo "build_cuda: WARNING: that is too large to travel to the device machine (README, On a GPU)" >&2
fi
