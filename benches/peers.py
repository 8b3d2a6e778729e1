#!/usr/bin/env python3
"""The fastest CPU runtimes beside sdctl: OpenVINO and ONNX Runtime running the same random SD1.5
UNet (diffusers' architecture, `torch.manual_seed(0)`) on the shapes of `sdctl bench unet`. CI
does not run this; `benches/peers.sh` installs each runtime into its own venv and runs it.

    python peers.py export OUT_DIR          # torch + diffusers + openvino + onnx + onnxscript
    python peers.py openvino OUT_DIR [--precision f32|default] [--width 512 --height 512 --batch 2 --iters 3]
    python peers.py onnxruntime OUT_DIR [--width ...]

`export` writes OUT_DIR/unet.xml (OpenVINO IR, converted straight from the PyTorch module, f32
weights) and OUT_DIR/unet.onnx (torch.onnx, dynamo exporter, external data: the UNet is over
2 GB), both with the batch, latent size and 77 text tokens fixed at export time (as
../shared/reference/cpu-peers.md ran them). The timing modes need only their runtime and numpy.
OpenVINO's `default` precision is what it picks by itself: bf16 on CPUs with AVX512-BF16 (it
prints which); `f32` sets INFERENCE_PRECISION_HINT=f32.
"""

import argparse
import os
import resource
import time

import numpy as np


def shapes(a):
    return (a.batch, 4, a.height // 8, a.width // 8), (a.batch,), (a.batch, 77, 768)


def inputs(a):
    rng = np.random.default_rng(0)
    x_shape, t_shape, c_shape = shapes(a)
    half = rng.standard_normal((a.batch // 2, *x_shape[1:]), dtype=np.float32)
    x = np.concatenate([half, half]) if a.batch % 2 == 0 else rng.standard_normal(x_shape, dtype=np.float32)
    t = np.full(t_shape, 500.0, dtype=np.float32)
    c = rng.standard_normal(c_shape, dtype=np.float32)
    return x, t, c


def export(a):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64).eval()

    class Wrapper(torch.nn.Module):
        def __init__(self, u):
            super().__init__()
            self.u = u

        def forward(self, x, t, c):
            return self.u(x, t, c, return_dict=False)[0]

    w = Wrapper(unet).eval()
    x, t, c = (torch.from_numpy(v) for v in inputs(a))
    os.makedirs(a.out, exist_ok=True)
    with torch.inference_mode():
        want = w(x, t, c).numpy()
    np.save(os.path.join(a.out, "want.npy"), want)
    import openvino as ov
    s = time.perf_counter()
    m = ov.convert_model(w, example_input=(x, t, c))
    ov.save_model(m, os.path.join(a.out, "unet.xml"), compress_to_fp16=False)
    print(f"openvino convert + save: {time.perf_counter() - s:.1f} s")
    s = time.perf_counter()
    torch.onnx.export(w, (x, t, c), os.path.join(a.out, "unet.onnx"), dynamo=True, external_data=True,
                      opset_version=20, input_names=["x", "t", "c"], output_names=["y"])
    print(f"torch.onnx export: {time.perf_counter() - s:.1f} s")


def report(name, run, a):
    x, t, c = inputs(a)
    want = np.load(os.path.join(a.out, "want.npy"))
    ts = []
    for _ in range(a.iters + 1):
        s = time.perf_counter()
        y = run(x, t, c)
        ts.append(time.perf_counter() - s)
    first, rest = ts[0], ts[1:]
    err = np.linalg.norm(y - want) / np.linalg.norm(want)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{name} unet sd15 {a.width}x{a.height} batch {a.batch}: {sum(rest) / len(rest):.3f} s/call "
          f"(mean of {a.iters}, min {min(rest):.3f}, first {first:.3f}); rel. L2 error vs PyTorch f32 "
          f"{err:.1e}; peak RSS {rss:.2f} GiB")


def openvino(a):
    import openvino as ov
    core = ov.Core()
    cfg = {"PERFORMANCE_HINT": "LATENCY"}
    if a.precision == "f32":
        cfg["INFERENCE_PRECISION_HINT"] = "f32"
    compiled = core.compile_model(os.path.join(a.out, "unet.xml"), "CPU", cfg)
    prec = compiled.get_property("INFERENCE_PRECISION_HINT")
    req = compiled.create_infer_request()

    def run(x, t, c):
        return req.infer([x, t, c])[compiled.output(0)]
    report(f"openvino {ov.__version__} ({prec})", run, a)


def onnxruntime(a):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(os.path.join(a.out, "unet.onnx"), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]

    def run(x, t, c):
        return sess.run(None, dict(zip(names, [x, t, c])))[0]
    report(f"onnxruntime {ort.__version__} (f32)", run, a)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["export", "openvino", "onnxruntime"])
    ap.add_argument("out")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--precision", choices=["f32", "default"], default="default")
    a = ap.parse_args()
    {"export": export, "openvino": openvino, "onnxruntime": onnxruntime}[a.mode](a)


if __name__ == "__main__":
    main()
