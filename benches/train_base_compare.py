"""PyTorch/diffusers doing what one `sdctl train unet` / `sdctl train vae` step does, on the
tiny-fill model (models/tiny-fill, float32), for benches/train_base_side_by_side.sh.

unet: the frozen text encoder on 77 token ids, latents drawn from per-image moments (the VAE
encoded the images once before the run, as sdctl does), v-prediction loss, backward, gradient
norm clipped to 1, AdamW (weight decay 1e-2). vae: encode, sample, decode, MSE + 1e-4 * KL,
backward, clip, AdamW. The images, prompts and moments are random stand-ins of the right
shapes: the step's arithmetic is what is timed.

    python benches/train_base_compare.py --part unet --batch 16 --size 64 --iters 20
"""
import argparse
import resource
import time

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["unet", "vae"], required=True)
    ap.add_argument("--model", default="models/tiny-fill")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    torch.manual_seed(0)
    m, b, s = a.model, a.batch, a.size
    times = []
    if a.part == "unet":
        unet = UNet2DConditionModel.from_pretrained(f"{m}/unet", torch_dtype=torch.float32)
        text = CLIPTextModel.from_pretrained(f"{m}/text_encoder", torch_dtype=torch.float32)
        text.requires_grad_(False)
        sched = DDPMScheduler.from_pretrained(f"{m}/scheduler")
        vae_cfg = AutoencoderKL.load_config(f"{m}/vae")
        f = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        scaling = vae_cfg["scaling_factor"]
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-2)
        n = 64
        means = torch.randn(n, 4, s // f, s // f)
        stds = torch.rand(n, 4, s // f, s // f) * 0.1
        ids = torch.randint(0, 49408, (n, 77))
        unet.train()
        for _ in range(a.iters):
            t0 = time.perf_counter()
            idx = torch.randint(0, n, (b,))
            with torch.no_grad():
                ehs = text(ids[idx])[0]
            latents = (means[idx] + stds[idx] * torch.randn(b, 4, s // f, s // f)) * scaling
            noise = torch.randn_like(latents)
            ts = torch.randint(0, 1000, (b,))
            noisy = sched.add_noise(latents, noise, ts)
            target = sched.get_velocity(latents, noise, ts)
            pred = unet(noisy, ts, ehs).sample
            loss = F.mse_loss(pred, target)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
    else:
        vae = AutoencoderKL.from_pretrained(f"{m}/vae", torch_dtype=torch.float32)
        opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
        imgs = torch.rand(64, 3, s, s) * 2 - 1
        vae.train()
        for _ in range(a.iters):
            t0 = time.perf_counter()
            x = imgs[torch.randint(0, 64, (b,))]
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
            mse = F.mse_loss(rec, x)
            kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
            loss = mse + 1e-4 * kl
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    steady = sum(times[1:]) / max(1, len(times) - 1)
    print(f"pytorch train {a.part} tiny-fill {s}x{s} batch {b} f32: steady {steady:.3f} s/step "
          f"(steps 2-{len(times)}; first {times[0]:.3f}); peak RSS {rss:.2f} GiB")


if __name__ == "__main__":
    main()
