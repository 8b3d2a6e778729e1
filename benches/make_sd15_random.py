#!/usr/bin/env python3
"""An SD1.5-architecture model folder with random weights (f16 safetensors, diffusers layout) and
an SD1.5 ControlNet beside it, for the load and memory benchmarks (`sdctl bench load`,
`benches/side_by_side.sh`). No download: the tokenizer files come from this repository.

    python benches/make_sd15_random.py OUT      # writes OUT/ and OUT-controlnet/
"""

import os
import shutil
import sys

import torch
from diffusers import (AutoencoderKL, ControlNetModel, DDIMScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

out = sys.argv[1]
assets = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "sd-pipeline", "assets", "clip")
torch.manual_seed(0)
unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                    up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4,
                    sample_size=512)
te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                  num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu",
                                  vocab_size=49408, max_position_embeddings=77))
sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1)
tok = CLIPTokenizer(os.path.join(assets, "vocab.json"), os.path.join(assets, "merges.txt"))
pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
for name in ("vocab.json", "merges.txt"):
    shutil.copy(os.path.join(assets, name), os.path.join(out, "tokenizer", name))
ControlNetModel.from_unet(unet).to(torch.float16).save_pretrained(out + "-controlnet", safe_serialization=True)
print(f"wrote {out} and {out}-controlnet")
