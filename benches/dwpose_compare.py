#!/usr/bin/env python3
"""DWPose's two networks at full size (YOLOX-L, RTMPose-L whole-body: the real architectures with
random weights, built and exported as tests/fixtures/make_dwpose_fixtures.py builds its tiny ones)
timed as sd-webui-controlnet runs them (cv2.dnn), as ComfyUI / rtmlib run them (onnxruntime), and
as sdctl runs them (`sdctl bench onnx`), in alternating rounds on this machine.

    python benches/dwpose_compare.py --sdctl target/release/sdctl --out /tmp/dwfull [--rounds 3]

With --torchscript the same networks are also traced as ComfyUI's TorchScript files
(yolox_l.torchscript.pt, dw-ll_ucoco_384_bs5.torchscript.pt, the pose network traced on a batch
of 5), timed as ComfyUI runs them (torch.jit.load, one image / crop) and converted by `sdctl
detect --convert` (`sdctl (TorchScript)`: the converted graph in `sdctl bench onnx`).

Needs the fixture script's environment (see its docstring). The models are written to --out
(yolox_l.onnx ~217 MB, dw-ll_ucoco_384.onnx ~135 MB) and reused when there.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "fixtures"))
import make_dwpose_fixtures as fx  # noqa: E402

SHAPES = {"yolox_l.onnx": (1, 3, 640, 640), "dw-ll_ucoco_384.onnx": (1, 3, 384, 288)}


def build(out: Path):
    import onnx
    import torch
    fx.YOLOX_DEPTH, fx.YOLOX_WIDTH = 1.0, 1.0
    fx.POSE_DEEPEN, fx.POSE_WIDEN = 1.0, 1.0
    fx.GAU = dict(fx.GAU, hidden_dims=256, s=128)
    args = argparse.Namespace(webui=None, yolox=str(fx.MIRROR / "Megvii-BaseDetection+YOLOX" / "repo"),
                              mmpose=str(fx.MIRROR / "open-mmlab+mmpose" / "repo"))
    torch.set_num_threads(os.cpu_count())
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        if not all((out / f).exists() for f in ("yolox_l.onnx", "yolox_l.torchscript.pt")):
            yolox, get_model = fx.load_yolox(args.yolox, tmp / "yolox")
            det = fx.build_yolox(yolox, get_model)
            if not (out / "yolox_l.onnx").exists():
                onnx.save(fx.export(det, fx.det_input(), "images", ["output"]),
                          str(out / "yolox_l.onnx"))
            with torch.no_grad():
                torch.jit.trace(det, torch.from_numpy(fx.det_input())).save(
                    str(out / "yolox_l.torchscript.pt"))
        pose_files = ("dw-ll_ucoco_384.onnx", "dw-ll_ucoco_384_bs5.torchscript.pt")
        if not all((out / f).exists() for f in pose_files):
            CSPNeXt, RTMCCHead = fx.load_mmpose(args.mmpose, tmp / "mmpose")
            pose = fx.build_rtmpose(CSPNeXt, RTMCCHead)
            if not (out / "dw-ll_ucoco_384.onnx").exists():
                onnx.save(fx.export(pose, fx.pose_input(), "input", ["simcc_x", "simcc_y"]),
                          str(out / "dw-ll_ucoco_384.onnx"))
            x5 = torch.from_numpy(fx.pose_input()).repeat(5, 1, 1, 1)
            with torch.no_grad():
                torch.jit.trace(pose, x5).save(str(out / "dw-ll_ucoco_384_bs5.torchscript.pt"))


def time_ort(path, shape, iters):
    import onnxruntime as ort
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    name = s.get_inputs()[0].name
    s.run(None, {name: x})
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        s.run(None, {name: x})
        ts.append(time.perf_counter() - t)
    return float(np.mean(ts)), float(np.min(ts))


def time_cv2(path, shape, iters):
    import cv2
    cv2.setNumThreads(os.cpu_count())
    net = cv2.dnn.readNetFromONNX(str(path))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    names = net.getUnconnectedOutLayersNames()
    net.setInput(x)
    net.forward(names)
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        net.setInput(x)
        net.forward(names)
        ts.append(time.perf_counter() - t)
    return float(np.mean(ts)), float(np.min(ts))


TORCHSCRIPT = {"yolox_l.onnx": "yolox_l.torchscript.pt",
               "dw-ll_ucoco_384.onnx": "dw-ll_ucoco_384_bs5.torchscript.pt"}


def time_jit(path, shape, iters):
    import torch
    torch.set_num_threads(os.cpu_count())
    m = torch.jit.load(str(path)).eval()
    x = torch.from_numpy(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    ts = []
    with torch.no_grad():
        m(x)
        for _ in range(iters):
            t = time.perf_counter()
            m(x)
            ts.append(time.perf_counter() - t)
    return float(np.mean(ts)), float(np.min(ts))


def time_sdctl(sdctl, path, shape, iters):
    with tempfile.TemporaryDirectory() as t:
        j = Path(t) / "r.json"
        subprocess.run([sdctl, "bench", "onnx", str(path), "--shape", ",".join(map(str, shape)),
                        "--iters", str(iters), "--json", str(j)], check=True, stdout=subprocess.DEVNULL)
        r = json.loads(j.read_text())
    return r["mean_seconds"], r["min_seconds"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sdctl", default=str(HERE.parent / "target" / "release" / "sdctl"))
    ap.add_argument("--out", default="/tmp/dwfull")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--skip-cv2", action="store_true")
    ap.add_argument("--torchscript", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    build(out)
    runners = [("sdctl", lambda p, s: time_sdctl(a.sdctl, p, s, a.iters)),
               ("onnxruntime", lambda p, s: time_ort(p, s, a.iters))]
    if not a.skip_cv2:
        runners.append(("cv2.dnn", lambda p, s: time_cv2(p, s, a.iters)))
    if a.torchscript:
        for onnx_file, ts in TORCHSCRIPT.items():
            conv = out / (ts + ".converted.onnx")
            if not conv.exists():
                subprocess.run([a.sdctl, "detect", "--convert", str(out / ts), "-o", str(conv)],
                               check=True)
        runners.append(("sdctl (TorchScript)", lambda p, s: time_sdctl(
            a.sdctl, out / (TORCHSCRIPT[p.name] + ".converted.onnx"), s, a.iters)))
        runners.append(("torch.jit", lambda p, s: time_jit(out / TORCHSCRIPT[p.name], s, a.iters)))
    res = {}
    for r in range(a.rounds):
        order = runners if r % 2 == 0 else runners[::-1]
        for file, shape in SHAPES.items():
            for name, f in order:
                mean, mn = f(out / file, shape)
                res.setdefault((file, name), []).append(mean)
                print(f"round {r} {file:22s} {name:20s} {mean:.3f} s (min {mn:.3f})", flush=True)
    print()
    for file in SHAPES:
        base = np.mean(res[(file, "sdctl")])
        for name, _ in runners:
            v = np.mean(res[(file, name)])
            print(f"{file:22s} {name:20s} {v:.3f} s  sdctl/this = {base / v:.2f}x")


if __name__ == "__main__":
    main()
