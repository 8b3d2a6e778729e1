#!/usr/bin/env python3
"""One ControlNet training step in PyTorch/diffusers on the same shapes as `sdctl bench train`, to
compare side by side in one run on one machine. CI does not run this.

    python benches/train_compare.py --size 256 --iters 2
    sdctl bench train --size 256 --iters 2
    python benches/train_compare.py --size 512 --gradient-checkpointing

The step is diffusers' train_controlnet.py's: random SD1.5-architecture UNet (frozen,
`requires_grad_(False)`), `ControlNetModel.from_unet`, noise added at fixed timesteps, ControlNet
residuals into the UNet, MSE against the noise, `backward()` to every ControlNet weight. f32 (or
`--dtype bf16` / `fp16`: CPU autocast, diffusers' `--mixed_precision bf16` / `fp16`), default
thread count. Peak RSS is the process's (ru_maxrss), so run one setting per process.
"""

import argparse
import resource
import time

import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--dtype", choices=["f32", "bf16", "fp16"], default="f32")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    a = ap.parse_args()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
    unet.requires_grad_(False)
    net = ControlNetModel.from_unet(unet)
    net.train()
    if a.gradient_checkpointing:
        net.enable_gradient_checkpointing()
        unet.enable_gradient_checkpointing()
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    b, l = a.batch, a.size // 8
    latents = torch.randn(b, 4, l, l)
    noise = torch.randn(b, 4, l, l)
    ehs = torch.randn(b, 77, 768)
    cond = torch.rand(b, 3, a.size, a.size)
    ts = torch.tensor([100 + 300 * i for i in range(b)])
    import contextlib
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(a.dtype)
    cast = (lambda: torch.autocast("cpu", dtype=half)) if half else contextlib.nullcontext
    times = []
    for _ in range(a.iters):
        t0 = time.perf_counter()
        noisy = sched.add_noise(latents, noise, ts)
        with cast():
            down, mid = net(noisy, ts, ehs, controlnet_cond=cond, return_dict=False)
            pred = unet(noisy, ts, ehs, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        net.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    gc = " gradient checkpointing" if a.gradient_checkpointing else ""
    print(f"pytorch train controlnet {a.size}x{a.size} batch {b} {a.dtype}{gc}: "
          f"{sum(times) / len(times):.2f} s/step (mean of {len(times)}, min {min(times):.2f}, "
          f"all {' '.join(f'{t:.2f}' for t in times)}); peak RSS {rss:.2f} GiB")


if __name__ == "__main__":
    main()
