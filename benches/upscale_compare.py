#!/usr/bin/env python3
"""Time basicsr's RRDBNet x4plus (23 blocks, 64 features, growth 32, random weights) against
`sdctl upscale` on the same weights, image and tiling, in one run on one machine. CI does not
run this.

    cargo build --release -p sdctl
    python benches/upscale_compare.py --sdctl target/release/sdctl [--size 512 --tile 192 --overlap 16]

Writes to --work (default /tmp/upscale-compare): `x4plus_random.safetensors` (basicsr names,
seed 0, basicsr's own init: kaiming normal x 0.1 in the dense blocks, PyTorch's default
elsewhere), `input.png` (random RGB, seed 0), `torch.png` and `sdctl.png`. PyTorch runs
Real-ESRGAN's `RealESRGANer` path (tile_process with tile_pad = --overlap, pre_pad 0), f32,
CPU, torch.inference_mode, default thread count; the tiling is the one sdctl uses by default
(tile 192, overlap 16). Both times are whole runs of the upscale (PyTorch: tiles only, after
the model is built; sdctl: the process, weights loading and PNG writing included, plus the
time it reports for the tiles alone), as wall time and as CPU time (all threads; less
sensitive to other load on a shared machine). The two outputs are compared as 8-bit images.

Needs torch, safetensors, numpy, pillow (the RRDBNet class is the copy in
tests/fixtures/make_upscaler_fixtures.py).
"""

import argparse
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "fixtures"))
from make_upscaler_fixtures import RRDBNet, realesrgan_tiled  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sdctl", help="the sdctl binary (a release build); omitted: PyTorch only")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--tile", type=int, default=192)
    ap.add_argument("--overlap", type=int, default=16)
    ap.add_argument("--work", default="/tmp/upscale-compare")
    ap.add_argument("--skip-torch", action="store_true", help="only write the files and run sdctl")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = RRDBNet(3, 3, scale=4, num_feat=64, num_block=23, num_grow_ch=32).eval()
    weights = work / "x4plus_random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    rng = np.random.default_rng(0)
    # a smooth random image (noise at 1/8 resolution, enlarged) rather than white noise
    small = rng.integers(0, 256, (a.size // 8, a.size // 8, 3), dtype=np.uint8)
    Image.fromarray(small).resize((a.size, a.size), Image.BICUBIC).save(work / "input.png")
    img = np.asarray(Image.open(work / "input.png").convert("RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0).contiguous()

    t_torch = None
    if not a.skip_torch:
        with torch.inference_mode():
            s, cpu = time.perf_counter(), time.process_time()
            y = realesrgan_tiled(model, x, 4, a.tile, a.overlap) if a.tile > 0 else model(x)
            t_torch = time.perf_counter() - s
            cpu_torch = time.process_time() - cpu
        out = (y[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
        Image.fromarray(out).save(work / "torch.png")
        print(f"pytorch RRDBNet x4plus {a.size}x{a.size} -> {4 * a.size}x{4 * a.size}, tile {a.tile} "
              f"overlap {a.overlap}, f32 cpu (torch {torch.__version__}, {torch.get_num_threads()} "
              f"threads): {t_torch:.1f} s (CPU time {cpu_torch:.1f} s)", flush=True)

    if a.sdctl:
        cmd = [a.sdctl, "upscale", str(work / "input.png"), "-o", str(work / "sdctl.png"),
               "--model", str(weights), "--tile", str(a.tile), "--tile-overlap", str(a.overlap)]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        s = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "SDCTL_LOG": "warn"})
        t_sdctl = time.perf_counter() - s
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_sdctl = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if r.returncode != 0:
            sys.exit(f"sdctl failed: {r.stderr}")
        m = re.search(r"in ([0-9.]+) s", r.stderr)
        tiles = f" (tiles alone {m.group(1)} s)" if m else ""
        print(f"sdctl upscale, same weights, image and tiling: {t_sdctl:.1f} s{tiles} "
              f"(CPU time {cpu_sdctl:.1f} s)")
        if t_torch is not None:
            print(f"ratio sdctl / pytorch: {t_sdctl / t_torch:.2f}x wall, {cpu_sdctl / cpu_torch:.2f}x "
                  f"CPU time (whole sdctl process against PyTorch's tiles alone)")
            ours = np.asarray(Image.open(work / "sdctl.png").convert("RGB"), dtype=np.int16)
            theirs = np.asarray(Image.open(work / "torch.png").convert("RGB"), dtype=np.int16)
            d = np.abs(ours - theirs)
            print(f"8-bit outputs: max diff {d.max()}, pixels differing {np.mean(d > 0) * 100:.3f}%")


if __name__ == "__main__":
    main()
