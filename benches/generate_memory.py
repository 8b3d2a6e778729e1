#!/usr/bin/env python3
"""Peak memory and time of diffusers generating 512x512 with classifier-free guidance and one
ControlNet (f32, CPU), from the folders `make_sd15_random.py` writes: the PyTorch side of the
memory row in the README's benchmark table (`sdctl generate` under `/usr/bin/time -v` is ours).

    python benches/generate_memory.py MODEL CONTROLNET [STEPS]
"""

import resource
import sys
import time

import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from PIL import Image

model, cn = sys.argv[1], sys.argv[2]
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 2
t = time.perf_counter()
net = ControlNetModel.from_pretrained(cn, torch_dtype=torch.float32)
pipe = StableDiffusionControlNetPipeline.from_pretrained(model, controlnet=net, torch_dtype=torch.float32,
                                                         safety_checker=None)
load = time.perf_counter() - t
image = Image.new("RGB", (512, 512), (255, 255, 255))
t = time.perf_counter()
with torch.inference_mode():
    pipe("a red circle", image=image, num_inference_steps=steps, guidance_scale=7.5, height=512, width=512,
         generator=torch.Generator("cpu").manual_seed(1))
print(f"diffusers controlnet pipeline 512x512 CFG {steps} steps: load {load:.1f} s, generate "
      f"{time.perf_counter() - t:.1f} s, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
