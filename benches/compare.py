#!/usr/bin/env python3
"""Time diffusers' UNet (and UNet + ControlNet) on the same shapes as `sdctl bench unet`, so the
two can be compared side by side in one run on one machine. CI does not run this.

    python benches/compare.py --width 512 --height 512 --batch 2 --iters 2 [--controlnet 1]
    sdctl bench unet --arch sd15 --width 512 --height 512 --batch 2 --iters 2 [--controlnet 1]
    python benches/compare.py --arch sdxl --width 1024 --height 1024 --iters 2 --controlnet 1
    sdctl bench unet --arch sdxl --iters 2 --controlnet 1
    python benches/compare.py --iters 3 --t2i-adapter --ip-adapter
    sdctl bench unet --arch sd15 --iters 3 --t2i-adapter --ip-adapter

    python benches/compare.py --device cuda --dtype f16 --iters 10 --controlnet 2 --json o.json
    sdctl bench unet --device cuda --dtype f16 --iters 10 --controlnet 2 --json o.json

Needs torch and diffusers (see tests/fixtures/make_fixtures.py for the pinned versions). Random
weights with the real SD1.5 (or SDXL base) architecture, f32 (or `--dtype bf16` / `f16`: CPU
autocast to bf16 / f16, PyTorch's own half-precision paths), CPU, torch.inference_mode, default thread count. On `--device
cuda` the weights and inputs are on the GPU in the dtype (f16 / bf16 / f32), attention is
PyTorch's SDPA (diffusers' default), every call ends with a synchronize, and the peak of
PyTorch's allocator is reported (benches/gpu_check.sh).
"""

import argparse
import resource
import time

import torch
from diffusers import ControlNetModel, UNet2DConditionModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--controlnet", type=int, default=0)
    ap.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    ap.add_argument("--t2i-adapter", action="store_true")
    ap.add_argument("--ip-adapter", action="store_true")
    ap.add_argument("--dtype", choices=["f32", "bf16", "f16"], default="f32",
                    help="cpu bf16 / f16: torch.autocast('cpu', torch.bfloat16 / float16) around every call (f32 weights); "
                         "cuda: weights and inputs in this dtype")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--json", help="also write the numbers to this file")
    a = ap.parse_args()
    torch.manual_seed(0)
    gpu = a.device == "cuda"
    wdtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype] if gpu else torch.float32
    # on the GPU the random weights are made there (an SDXL UNet's init on the CPU takes minutes)
    import contextlib
    made_on = torch.device("cuda") if gpu else contextlib.nullcontext()
    made_on.__enter__()
    if a.arch == "sdxl":  # stabilityai/stable-diffusion-xl-base-1.0's UNet config
        unet = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, sample_size=128).eval()
        ctx_dim = 2048
    else:
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64).eval()
        ctx_dim = 768
    nets = [ControlNetModel.from_unet(unet).eval() for _ in range(a.controlnet)]
    made_on.__exit__(None, None, None)
    if gpu:
        unet = unet.to(dtype=wdtype)
        nets = [n.to(dtype=wdtype) for n in nets]
    # an even batch is one CFG step, as sdctl bench sends it: each latent once per prompt
    shape = (4, a.height // 8, a.width // 8)
    if a.batch % 2 == 0:
        x = torch.randn(a.batch // 2, *shape)
        x = torch.cat([x, x])
    else:
        x = torch.randn(a.batch, *shape)
    ctx = torch.randn(a.batch, 77, ctx_dim)
    t = torch.full((a.batch,), 500.0)
    hint = torch.rand(a.batch, 3, a.height, a.width)
    added = None
    if a.arch == "sdxl":
        ids = torch.tensor([[a.height, a.width, 0, 0, a.height, a.width]], dtype=torch.float32)
        added = dict(text_embeds=torch.randn(a.batch, 1280), time_ids=ids.repeat(a.batch, 1))
    if gpu:
        x, ctx, hint = (v.to("cuda", wdtype) for v in (x, ctx, hint))
        t = t.to("cuda")
        if added:
            added = {k: v.to("cuda", wdtype) for k, v in added.items()}

    half = {"bf16": torch.bfloat16, "f16": torch.float16}.get(a.dtype)
    cast = (lambda: torch.autocast("cpu", dtype=half)) if half and not gpu else contextlib.nullcontext
    sync = torch.cuda.synchronize if gpu else (lambda: None)

    def run(with_control):
        with torch.inference_mode(), cast():
            down, mid = None, None
            if with_control:
                for n in nets:
                    d, m = n(x, t, ctx, hint, added_cond_kwargs=added, return_dict=False)
                    down = d if down is None else [p + q for p, q in zip(down, d)]
                    mid = m if mid is None else mid + m
            unet(x, t, ctx, added_cond_kwargs=added, down_block_additional_residuals=down,
                 mid_block_additional_residual=mid)

    def once(with_control):
        s = time.perf_counter()
        run(with_control)
        sync()
        return time.perf_counter() - s

    # adapters, as their pipelines call the UNet: T2I-Adapter features made once
    # (down_intrablock_additional_residuals, cloned per call); an IP-Adapter (ip-adapter_sd15 /
    # _sdxl layout: 4 tokens from a 1024-wide image embedding) loaded into a copy of the UNet
    extra = {}
    if a.t2i_adapter:
        from diffusers import T2IAdapter
        xl = a.arch == "sdxl"
        ch = list(unet.config.block_out_channels) + ([unet.config.block_out_channels[-1]] if xl else [])
        ad = T2IAdapter(in_channels=3, channels=ch, num_res_blocks=2,
                        adapter_type="full_adapter_xl" if xl else "full_adapter",
                        downscale_factor=16 if xl else 8).eval()
        s0 = time.perf_counter()
        with torch.inference_mode():
            feats = [f.repeat(a.batch, 1, 1, 1) for f in ad(torch.rand(1, 3, a.height, a.width))]
        t2i_once = time.perf_counter() - s0

        def t2i():
            with torch.inference_mode(), cast():
                unet(x, t, ctx, added_cond_kwargs=added,
                     down_intrablock_additional_residuals=[f.clone() for f in feats])
        extra["t2i-adapter"] = (t2i, t2i_once)
    if a.ip_adapter:
        import copy
        ipu = copy.deepcopy(unet)
        cross = ipu.config.cross_attention_dim
        sd = {"image_proj": {"proj.weight": torch.randn(4 * cross, 1024) * 0.02, "proj.bias": torch.zeros(4 * cross),
                             "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)},
              "ip_adapter": {}}
        k = 1
        for name, proc in ipu.attn_processors.items():
            if name.endswith("attn2.processor"):
                mod = ipu.get_submodule(name[: -len(".processor")])
                hid = mod.to_q.out_features
                sd["ip_adapter"][f"{k}.to_k_ip.weight"] = torch.randn(hid, cross) * 0.02
                sd["ip_adapter"][f"{k}.to_v_ip.weight"] = torch.randn(hid, cross) * 0.02
                k += 2  # diffusers' key ids: 1, 3, 5, ... over the cross-attention processors
        ipu._load_ip_adapter_weights([sd])
        embeds = torch.randn(a.batch, 1, 1024)
        ip_added = dict(added or {}, image_embeds=[embeds])

        def ip():
            with torch.inference_mode(), cast():
                ipu(x, t, ctx, added_cond_kwargs=ip_added)
        extra["ip-adapter"] = (ip, 0.0)

    def timed(f):
        s = time.perf_counter()
        f()
        return time.perf_counter() - s

    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    # the GPU allocator's peak (weights included)
    gpu_peak = (lambda: torch.cuda.max_memory_allocated() / 2**30) if gpu else (lambda: 0.0)
    # warm-ups; the plain call's peak memory is read before any ControlNet call
    first = once(False)
    plain_rss, plain_gpu = rss(), gpu_peak()
    cfirst = once(True) if nets else 0.0
    control_gpu = gpu_peak()
    # with ControlNets, plain and controlled calls alternate, order reversed every round (as
    # sdctl bench): a drift in the machine's speed falls on both alike
    plain, control = [], []
    for i in range(a.iters):
        for with_control in ([False, True] if i % 2 == 0 else [True, False]):
            if with_control and nets:
                control.append(once(True))
            elif not with_control:
                plain.append(once(False))
    # adapters: alternate with the plain call, order reversed every round
    ad_times = {k: [] for k in extra}
    ad_first = {k: timed(f) for k, (f, _) in extra.items()}
    for i in range(a.iters if extra else 0):
        order = [None] + list(extra)
        for k in (order if i % 2 == 0 else order[::-1]):
            if k is None:
                plain.append(once(False))
            else:
                ad_times[k].append(timed(extra[k][0]))
    mean, mn = sum(plain) / len(plain), min(plain)
    where = torch.cuda.get_device_name() if gpu else f"cpu, {torch.get_num_threads()} threads"
    mem = f"; peak GPU allocation {plain_gpu:.2f} GiB" if gpu else ""
    print(f"diffusers unet {a.arch} {a.width}x{a.height} batch {a.batch} {a.dtype} {where} (torch {torch.__version__}): "
          f"{mean:.3f} s/call (mean of {a.iters}, min {mn:.3f}, first {first:.3f}); "
          f"peak RSS {plain_rss:.2f} GiB{mem}")
    report = dict(arch=a.arch, width=a.width, height=a.height, batch=a.batch, dtype=a.dtype, device=where,
                  torch=torch.__version__, unet=dict(mean_s=mean, min_s=mn, first_s=first, peak_gpu_gib=plain_gpu))
    if nets:
        cmean, cmn = sum(control) / a.iters, min(control)
        report["controlnet"] = dict(count=len(nets), mean_s=cmean, min_s=cmn, first_s=cfirst,
                                    ratio_to_plain=cmean / mean, peak_gpu_gib=control_gpu)
        print(f"diffusers unet + {len(nets)} controlnet: {cmean:.3f} s/call (min {cmn:.3f}, first {cfirst:.3f}) = "
              f"{cmean / mean:.2f}x the plain call (mins: {cmn / mn:.2f}x; calls alternated with the plain ones, order reversed every round); "
              f"peak RSS {rss():.2f} GiB")
    for k, ts in ad_times.items():
        am, amn = sum(ts) / len(ts), min(ts)
        print(f"diffusers unet + {k}: {am:.3f} s/call (min {amn:.3f}, first {ad_first[k]:.3f}) = {am / mean:.2f}x the "
              f"plain call (mins: {amn / mn:.2f}x; alternated, order reversed every round); once per generation "
              f"{extra[k][1]:.2f} s")

    if a.json:
        import json
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
