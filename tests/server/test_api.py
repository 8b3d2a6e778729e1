#!/usr/bin/env python3
"""Client-side integration tests for `sdctl serve` (the AUTOMATIC1111-compatible HTTP API).

    python tests/server/test_api.py --sdctl target/debug/sdctl [--only WORD] [--artifacts DIR]

Run from the repository root. Needs `pip install -r tests/server/requirements.txt` (webuiapi,
requests, pillow). The real `webuiapi.WebUIApi` client is used wherever it has a method; raw
`requests` for everything else (status codes, error bodies, routes it lacks).

Every image the API makes is compared pixel for pixel with what `sdctl generate` writes for the
same settings (the server contract's "CLI equivalents"), with the API's defaults spelled out:
A1111's randn_source "GPU" = `--rng philox`, clip skip 1, the sampler's own schedule.

Servers listen on 127.0.0.1 port 0 (the port is read from the `listening on` stderr line), every
wait loop is bounded, every request has a timeout, and every server is stopped at the end.
Plain Python: the test_* functions run in the order of TESTS, each printed PASS/FAIL with its
time; the exit status is 1 when any fails.
"""

import argparse
import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types

import requests
import webuiapi
import webuiapi.webuiapi as _webuiapi_module
from PIL import Image

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
FIX = os.path.join(REPO, "tests", "fixtures")
MODELS = os.path.join(FIX, "models")
INPUTS = os.path.join(FIX, "inputs")
LORAS = os.path.join(FIX, "loras")

HTTP_TIMEOUT = 120  # seconds, any single request (a generation here takes well under 10 s)
START_TIMEOUT = 60  # seconds for a server to print its listening line
CLI_TIMEOUT = 120

W = H = 64
STEPS = 6
PROMPT = "a red fox in the snow"
NEGATIVE = "blurry"


# webuiapi's Session has no timeout; give every request one (webuiapi only calls
# requests.Session(), so a namespace with our Session class is all it needs).
class TimeoutSession(requests.Session):
    def request(self, *args, **kwargs):
        kwargs.setdefault("timeout", HTTP_TIMEOUT)
        return super().request(*args, **kwargs)


_webuiapi_module.requests = types.SimpleNamespace(Session=TimeoutSession)


class TestFailure(AssertionError):
    pass


def check(cond, msg):
    if not cond:
        raise TestFailure(msg)


# ---------------------------------------------------------------------------------------------
# Server and CLI plumbing


def make_dirs(tmp):
    """The temp models / controlnet dirs (symlinks to the fixtures) and an `outside` folder with
    a real model, reachable from the models dir only through `../` (path traversal bait)."""
    models = os.path.join(tmp, "models")
    cns = os.path.join(tmp, "controlnet")
    outside = os.path.join(tmp, "outside")
    for d in (models, cns, outside):
        os.makedirs(d, exist_ok=True)
    for name in ("sd1", "sd1-inpaint"):
        os.symlink(os.path.join(MODELS, name), os.path.join(models, name))
    for name in ("controlnet-sd1", "controlnet-sd1-b"):
        os.symlink(os.path.join(MODELS, name), os.path.join(cns, name))
    os.symlink(os.path.join(MODELS, "sd1"), os.path.join(outside, "sd1"))
    os.symlink(os.path.join(MODELS, "controlnet-sd1"), os.path.join(outside, "controlnet-sd1"))
    os.symlink(os.path.join(LORAS, "lora_b_kohya.safetensors"),
               os.path.join(outside, "lora_b_kohya.safetensors"))
    return models, cns, outside


class Server:
    """One `sdctl serve` process; stderr is collected by a thread (and searched for the port)."""

    LISTEN_RE = re.compile(r"sdctl serve: listening on http://127\.0\.0\.1:(\d+)")

    def __init__(self, sdctl, models, cns, extra, env, name):
        self.name = name
        self.lines = []
        self.port = None
        self._ready = threading.Event()
        cmd = [sdctl, "serve", "--listen", "127.0.0.1:0", "--models-dir", models,
               "--controlnet-dir", cns, "--lora-dir", LORAS] + list(extra)
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, env=env, cwd=REPO)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(START_TIMEOUT) or self.port is None:
            tail = self.stderr_tail()
            self.stop()
            raise TestFailure(f"server {name} did not print its listening line in {START_TIMEOUT} s "
                              f"or exited (exit {self.proc.poll()}); stderr:\n{tail}")
        self.base = f"http://127.0.0.1:{self.port}"

    def _read(self):
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            m = self.LISTEN_RE.search(line)
            if m and self.port is None:
                self.port = int(m.group(1))
                self._ready.set()
        self._ready.set()  # exited before listening

    def stderr_tail(self, n=30):
        return "\n".join(self.lines[-n:])

    def alive(self):
        return self.proc.poll() is None

    def stop(self, timeout=15):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)

    def api(self, username=None, password=None):
        return webuiapi.WebUIApi(host="127.0.0.1", port=self.port, username=username,
                                 password=password)

    def url(self, route):
        return self.base + route


class Ctx:
    def __init__(self, sdctl, artifacts):
        self.sdctl = sdctl
        self.artifacts = artifacts
        self.tmp = tempfile.mkdtemp(prefix="sdctl-api-test-")
        self.cache = os.path.join(self.tmp, "cache")
        os.makedirs(self.cache)
        self.env = dict(os.environ, SDCTL_CACHE_DIR=self.cache)
        self.models, self.cns, self.outside = make_dirs(self.tmp)
        self.servers = {}
        self.failed_starts = {}
        self._cli_cache = {}
        self._n = 0

    def server(self, name, extra=()):
        """A server started once on first use (a failed start is not retried)."""
        if name in self.failed_starts:
            raise TestFailure(f"server {name} failed to start earlier: {self.failed_starts[name]}")
        if name not in self.servers:
            try:
                self.servers[name] = Server(self.sdctl, self.models, self.cns, extra, self.env, name)
            except TestFailure as e:
                self.failed_starts[name] = str(e).splitlines()[0]
                raise
        s = self.servers[name]
        check(s.alive(), f"server {name} has exited (code {s.proc.poll()}); stderr:\n{s.stderr_tail()}")
        return s

    def main(self):
        return self.server("main")

    def stop_all(self):
        for s in self.servers.values():
            try:
                s.stop()
            except Exception:  # keep stopping the others
                traceback.print_exc()

    def tmpfile(self, suffix):
        self._n += 1
        return os.path.join(self.tmp, f"f{self._n:04d}{suffix}")

    def save_png(self, img):
        """Writes an image we send to the API to a temp PNG for the CLI (same pixels)."""
        path = self.tmpfile(".png")
        img.save(path, format="PNG")
        return path

    def cli_generate(self, args, batch=1):
        """Runs `sdctl generate ARGS --output OUT` and returns the images (cached by ARGS)."""
        key = (tuple(args), batch)
        if key in self._cli_cache:
            return self._cli_cache[key]
        out = self.tmpfile(".png")
        cmd = [self.sdctl, "generate"] + list(args) + ["--output", out]
        try:
            p = subprocess.run(cmd, cwd=REPO, env=self.env, stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=CLI_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise TestFailure(f"sdctl generate ran over {CLI_TIMEOUT} s: {cmd}")
        check(p.returncode == 0, f"sdctl generate failed ({p.returncode}): {' '.join(cmd)}\n"
                                 f"{p.stderr.decode(errors='replace')[-3000:]}")
        if batch == 1:
            paths = [out]
        else:
            paths = [out[:-4] + f"-{i}.png" for i in range(batch)]
        imgs = []
        for path in paths:
            with Image.open(path) as im:
                im.load()
                imgs.append(im.copy())
        self._cli_cache[key] = imgs
        return imgs

    def cli_detect(self, module, image_path, resolution, params):
        out = self.tmpfile(".png")
        cmd = [self.sdctl, "detect", module, image_path, "-o", out, "--resolution", str(resolution)]
        for k, v in params:
            cmd += ["--param", f"{k}={v}"]
        p = subprocess.run(cmd, cwd=REPO, env=self.env, stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=CLI_TIMEOUT)
        check(p.returncode == 0, f"sdctl detect failed: {' '.join(cmd)}\n"
                                 f"{p.stderr.decode(errors='replace')[-2000:]}")
        with Image.open(out) as im:
            im.load()
            return im.copy()


CTX = None  # set in main()


# ---------------------------------------------------------------------------------------------
# Helpers: CLI equivalents, pixel comparison, request shortcuts

# A1111 sampler name -> (sdctl sampler, schedule that "automatic" means for it)
SAMPLER_CLI = {
    "DPM++ 2M": ("dpmpp_2m", "karras"),
    "Euler a": ("euler_a", "normal"),
    "Euler": ("euler", "normal"),
    "DDIM": ("ddim", "normal"),
    "DPM++ 2M Karras": ("dpmpp_2m", "karras"),
    "k_dpmpp_2m": ("dpmpp_2m", "karras"),
    "k_euler_a": ("euler_a", "normal"),
    "k_euler": ("euler", "normal"),
    "ddim": ("ddim", "normal"),
    "Heun": ("heun", "normal"),
    "LMS": ("lms", "normal"),
    "UniPC": ("unipc", "normal"),
    "DPM++ SDE": ("dpmpp_sde", "karras"),
    "DPM++ 2M SDE": ("dpmpp_2m_sde", "exponential"),
    "LCM": ("lcm", "normal"),
}


def cli_args(*, prompt=PROMPT, negative=NEGATIVE, model="sd1", width=W, height=H, steps=STEPS,
             cfg=7.0, sampler="Euler a", scheduler="automatic", seed, rng="philox", clip_skip=1,
             batch=1, init=None, strength=None, mask=None, controls=(), configs=(), extra=()):
    s, sched = SAMPLER_CLI[sampler]
    if scheduler and scheduler != "automatic":
        sched = scheduler
    a = ["--model", os.path.join(CTX.models, model), "--prompt", prompt,
         "--negative-prompt", negative, "--width", str(width), "--height", str(height),
         "--steps", str(steps), "--cfg-scale", repr(float(cfg)), "--sampler", s,
         "--schedule", sched, "--seed", str(seed), "--rng", rng, "--clip-skip", str(clip_skip),
         "--batch", str(batch), "--lora-dir", LORAS]
    if init:
        a += ["--init-image", init]
    if strength is not None:
        a += ["--strength", repr(float(strength))]
    if mask:
        a += ["--mask", mask]
    for c in controls:
        a += ["--control", c]
    for c in configs:
        a += ["--config", c]
    return a + list(extra)


def rgb_bytes(img):
    return img.convert("RGB").tobytes()


def same_pixels(api_img, cli_img, what):
    """Fails with the size or the number of differing values and the largest difference."""
    check(api_img.size == cli_img.size,
          f"{what}: API image is {api_img.size}, CLI image is {cli_img.size}")
    a, b = rgb_bytes(api_img), rgb_bytes(cli_img)
    if a == b:
        return
    diffs = [(i, abs(x - y)) for i, (x, y) in enumerate(zip(a, b)) if x != y]
    first = diffs[0][0] // 3
    w = api_img.size[0]
    if CTX.artifacts:
        os.makedirs(CTX.artifacts, exist_ok=True)
        tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", what)[:80]
        api_img.save(os.path.join(CTX.artifacts, tag + ".api.png"))
        cli_img.save(os.path.join(CTX.artifacts, tag + ".cli.png"))
    raise TestFailure(f"{what}: pixels differ from `sdctl generate`: {len(diffs)} of {len(a)} "
                      f"channel values, max |diff| {max(d for _, d in diffs)}, first at "
                      f"(x={first % w}, y={first // w})")


def load_input(name):
    with Image.open(os.path.join(INPUTS, name)) as im:
        im.load()
        return im.copy()


def b64_png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode_b64_png(s):
    with Image.open(io.BytesIO(base64.b64decode(s))) as im:
        im.load()
        return im.copy()


def generated(result, batch):
    """The generated images of a webuiapi result: `batch` images (a leading grid, as A1111's
    return_grid gives for batches, is skipped when present)."""
    imgs = result.images
    if batch > 1 and len(imgs) == batch + 1 and imgs[0].size != imgs[1].size:
        imgs = imgs[1:]
    return imgs


def txt2img(api, **kw):
    """webuiapi txt2img with this suite's small defaults. alwayson_scripts is always passed:
    webuiapi's default is a shared mutable dict that keeps earlier ControlNet units."""
    kw.setdefault("prompt", PROMPT)
    kw.setdefault("negative_prompt", NEGATIVE)
    kw.setdefault("width", W)
    kw.setdefault("height", H)
    kw.setdefault("steps", STEPS)
    kw.setdefault("alwayson_scripts", {})
    return api.txt2img(**kw)


def img2img(api, **kw):
    kw.setdefault("prompt", PROMPT)
    kw.setdefault("negative_prompt", NEGATIVE)
    kw.setdefault("width", W)
    kw.setdefault("height", H)
    kw.setdefault("steps", STEPS)
    kw.setdefault("alwayson_scripts", {})
    return api.img2img(**kw)


def txt2img_vs_cli(api, *, sampler="Euler a", scheduler=None, seed, what, batch=1,
                   cli_extra=None, **kw):
    """Runs txt2img through webuiapi and checks every image against `sdctl generate`."""
    r = txt2img(api, sampler_name=sampler, scheduler=scheduler, seed=seed, batch_size=batch, **kw)
    check(isinstance(r.info, dict), f"{what}: info is not a JSON object: {r.info!r}"[:500])
    real_seed = r.info.get("seed")
    if seed != -1:
        check(real_seed == seed, f"{what}: info seed {real_seed} != requested {seed}")
    imgs = generated(r, batch)
    check(len(imgs) == batch, f"{what}: {len(r.images)} images for batch {batch}")
    a = dict(prompt=kw.get("prompt", PROMPT), negative=kw.get("negative_prompt", NEGATIVE),
             steps=kw.get("steps", STEPS), cfg=kw.get("cfg_scale", 7.0), sampler=sampler,
             scheduler=scheduler or "automatic", seed=real_seed, batch=batch,
             width=kw.get("width", W), height=kw.get("height", H))
    a.update(cli_extra or {})
    cli = CTX.cli_generate(cli_args(**a), batch)
    for i, (x, y) in enumerate(zip(imgs, cli)):
        check(x.size == (a["width"], a["height"]), f"{what}: image {i} is {x.size}")
        same_pixels(x, y, f"{what} image {i}")
    return r


def get(server, route, **kw):
    kw.setdefault("timeout", HTTP_TIMEOUT)
    return requests.get(server.url(route), **kw)


def post(server, route, **kw):
    kw.setdefault("timeout", HTTP_TIMEOUT)
    return requests.post(server.url(route), **kw)


def small_payload(**kw):
    p = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "width": W, "height": H, "steps": STEPS,
         "seed": 1, "sampler_name": "Euler a", "batch_size": 1}
    p.update(kw)
    return p


def titles(server):
    api = server.api()
    return {m["title"].split(" [")[0]: m["title"] for m in api.get_sd_models()}


def wait_progress(api, pred, timeout, interval=0.05):
    """Polls /sdapi/v1/progress until pred(progress_json) holds; returns (json, seen_list)."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        p = api.get_progress()
        seen.append(p)
        if pred(p):
            return p, seen
        time.sleep(interval)
    return None, seen


def is_sampling(p):
    return (p.get("progress") or 0) > 0 and ((p.get("state") or {}).get("sampling_step") or 0) > 0


class Bg(threading.Thread):
    """Runs fn in a thread, keeping its result or exception and its finish time."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn = fn
        self.result = self.error = self.done_at = None

    def run(self):
        try:
            self.result = self.fn()
        except BaseException as e:  # reported by the test
            self.error = e
        self.done_at = time.monotonic()


# ---------------------------------------------------------------------------------------------
# Tests: catalog and options


def test_model_list():
    s = CTX.main()
    api = s.api()
    models = api.get_sd_models()
    check(isinstance(models, list), f"sd-models: not a list: {models!r}"[:300])
    ts = sorted(m["title"] for m in models)
    check(len(ts) == 2, f"sd-models: expected the 2 models of the dir, got {ts}")
    check(re.fullmatch(r"sd1 \[[0-9a-f]{10}\]", ts[0] or ""), f"sd-models title {ts[0]!r}")
    check(re.fullmatch(r"sd1-inpaint \[[0-9a-f]{10}\]", ts[1] or ""), f"sd-models title {ts[1]!r}")
    for m in models:
        h = m["title"].split("[")[1].rstrip("]")
        if m.get("hash") is not None:
            check(m["hash"] == h, f"sd-models: hash {m['hash']!r} vs title {m['title']!r}")
        if m.get("sha256"):
            check(m["sha256"].startswith(h), f"sd-models: sha256 {m['sha256']!r} vs {m['title']!r}")
    check(api.util_get_model_names() == ts, "util_get_model_names")
    # the hash is the one sdctl itself writes for the model (sha256 in its PNG metadata)
    img = CTX.cli_generate(cli_args(seed=1))[0]
    meta = json.loads(img.info["sdctl"])
    sha = next(iter(meta["sha256"].values()))
    check(ts[0] == f"sd1 [{sha[:10]}]", f"sd1 title {ts[0]!r}, sdctl's sha256 of the model {sha}")


def test_get_routes():
    s = CTX.main()
    for route in ["/sdapi/v1/sd-models", "/sdapi/v1/sd-vae", "/sdapi/v1/samplers",
                  "/sdapi/v1/schedulers", "/sdapi/v1/upscalers", "/sdapi/v1/latent-upscale-modes",
                  "/sdapi/v1/loras", "/sdapi/v1/embeddings", "/sdapi/v1/scripts",
                  "/sdapi/v1/script-info", "/sdapi/v1/progress", "/sdapi/v1/memory",
                  "/sdapi/v1/cmd-flags", "/sdapi/v1/options", "/controlnet/version",
                  "/controlnet/model_list", "/controlnet/module_list?alias_names=false",
                  "/controlnet/control_types"]:
        r = get(s, route)
        check(r.status_code == 200, f"GET {route}: {r.status_code} {r.text[:300]}")
        r.json()
    for route in ["/sdapi/v1/refresh-checkpoints", "/sdapi/v1/refresh-loras",
                  "/sdapi/v1/interrupt", "/sdapi/v1/skip"]:
        r = post(s, route, json={})
        check(r.status_code == 200, f"POST {route}: {r.status_code} {r.text[:300]}")
    api = s.api()
    check(api.controlnet_version() == 2, "controlnet version")


def test_options_roundtrip_and_model_switch():
    s = CTX.main()
    api = s.api()
    t = titles(s)
    opts = api.get_options()
    check(isinstance(opts, dict), f"options: {opts!r}"[:300])
    for k in ("sd_model_checkpoint", "CLIP_stop_at_last_layers", "randn_source"):
        check(k in opts, f"options lacks {k}: keys {sorted(opts)[:40]}")
    check(opts["randn_source"] == "GPU", f"randn_source default {opts['randn_source']!r}")
    check(opts["CLIP_stop_at_last_layers"] == 1, f"clip skip default {opts['CLIP_stop_at_last_layers']}")
    # POST the whole dict back
    r = post(s, "/sdapi/v1/options", json=opts)
    check(r.status_code == 200, f"POST options (whole dict back): {r.status_code} {r.text[:500]}")
    check(api.get_options() == opts, "options changed by posting them back unchanged")
    try:
        # webuiapi's own helper (closest title), then the NAME alone
        api.util_set_model("sd1-inpaint")
        cur = api.get_options()["sd_model_checkpoint"]
        check(cur in (t["sd1-inpaint"], "sd1-inpaint"), f"after util_set_model: {cur!r}")
        check(api.util_get_current_model() == cur, "util_get_current_model")
        api.set_options({"sd_model_checkpoint": "sd1"})
        cur = api.get_options()["sd_model_checkpoint"]
        check(cur in (t["sd1"], "sd1"), f"after set_options sd1: {cur!r}")
        r = post(s, "/sdapi/v1/options", json={"sd_model_checkpoint": t["sd1-inpaint"]})
        check(r.status_code == 200, f"POST options title: {r.status_code} {r.text[:300]}")
        cur = api.get_options()["sd_model_checkpoint"]
        check(cur in (t["sd1-inpaint"], "sd1-inpaint"), f"after POST title: {cur!r}")
    finally:
        post(s, "/sdapi/v1/options", json={"sd_model_checkpoint": "sd1"})
    cur = api.get_options()["sd_model_checkpoint"]
    check(cur in (t["sd1"], "sd1"), f"model not back to sd1: {cur!r}")


def test_samplers_schedulers_loras_listed():
    api = CTX.main().api()
    names = set(api.util_get_sampler_names())
    for n in ("DPM++ 2M", "Euler a", "Euler", "DDIM"):
        check(n in names, f"samplers: {n!r} missing from {sorted(names)}")
    sch = set(api.util_get_scheduler_names())
    for n in ("automatic", "karras", "normal"):
        check(n in sch, f"schedulers: {n!r} missing from {sorted(sch)}")
    loras = api.get_loras()
    check(any(l.get("name") == "lora_b_kohya" for l in loras),
          f"loras: lora_b_kohya missing: {[l.get('name') for l in loras]}")


# ---------------------------------------------------------------------------------------------
# Tests: generation, each image compared with `sdctl generate`


def test_txt2img_fixed_seed_and_info():
    s = CTX.main()
    api = s.api()
    r = txt2img_vs_cli(api, seed=1234, what="txt2img seed 1234")
    info = r.info
    for k in ("seed", "all_seeds", "subseed", "all_subseeds", "prompt", "all_prompts",
              "negative_prompt", "width", "height", "sampler_name", "cfg_scale", "steps",
              "batch_size", "sd_model_name", "sd_model_hash", "seed_resize_from_w",
              "seed_resize_from_h", "denoising_strength", "clip_skip", "infotexts",
              "job_timestamp"):
        check(k in info, f"info lacks {k!r}: keys {sorted(info)}")
    check(info["all_seeds"] == [1234], f"all_seeds {info['all_seeds']}")
    check(info["prompt"] == PROMPT and info["negative_prompt"] == NEGATIVE, "info prompts")
    check(info["width"] == W and info["height"] == H and info["steps"] == STEPS, "info size/steps")
    check(info["sampler_name"] == "Euler a", f"info sampler_name {info['sampler_name']!r}")
    t = titles(s)["sd1"]
    check(info["sd_model_name"] == "sd1", f"sd_model_name {info['sd_model_name']!r}")
    check(info["sd_model_hash"] == t.split("[")[1].rstrip("]"),
          f"sd_model_hash {info['sd_model_hash']!r} vs title {t!r}")
    check(isinstance(r.parameters, dict) and r.parameters.get("prompt") == PROMPT,
          f"parameters echo: {str(r.parameters)[:300]}")
    png_text = r.images[0].info.get("parameters", "")
    check("Steps: 6" in png_text and "Seed: 1234" in png_text,
          f"PNG parameters chunk: {png_text!r}")
    check(info["infotexts"][0] == png_text, "infotexts[0] differs from the PNG's parameters chunk")


def test_txt2img_random_seed():
    api = CTX.main().api()
    r = txt2img_vs_cli(api, seed=-1, what="txt2img seed -1")
    seed = r.info["seed"]
    check(isinstance(seed, int) and seed >= 0, f"drawn seed {seed!r}")
    check(r.info["all_seeds"] == [seed], f"all_seeds {r.info['all_seeds']} vs seed {seed}")
    check(f"Seed: {seed}," in r.images[0].info.get("parameters", ""), "drawn seed not in infotext")


def test_txt2img_each_sampler():
    api = CTX.main().api()
    cases = [("DPM++ 2M", None), ("Euler a", None), ("Euler", None), ("DDIM", None),
             ("DPM++ 2M Karras", None), ("k_dpmpp_2m", None), ("k_euler_a", None),
             ("k_euler", None), ("ddim", None), ("Euler", "karras"), ("DPM++ 2M", "normal"),
             ("Euler a", "automatic"), ("Heun", None), ("LMS", "karras"), ("UniPC", None),
             ("DPM++ SDE", None), ("DPM++ 2M SDE", None), ("LCM", None),
             ("Euler", "sgm_uniform"), ("DPM++ 2M", "beta"), ("Heun", "exponential")]
    failures = []
    for sampler, sched in cases:
        try:
            txt2img_vs_cli(api, sampler=sampler, scheduler=sched, seed=77,
                           what=f"txt2img {sampler}/{sched or 'default'}")
        except Exception as e:  # report every sampler, not only the first
            failures.append(str(e).splitlines()[0][:300])
    check(not failures, "; ".join(failures))


def test_txt2img_hires_fix():
    """A1111's hires fix through webuiapi: the image is the second pass's size, equal to
    `sdctl generate --hires-*` with the same settings, and its infotext has the hires fields."""
    api = CTX.main().api()
    r = txt2img(api, sampler_name="Euler", scheduler="normal", seed=21, batch_size=1,
                enable_hr=True, hr_scale=1.5, hr_upscaler=webuiapi.HiResUpscaler.Latent,
                hr_second_pass_steps=2, denoising_strength=0.6)
    imgs = generated(r, 1)
    want = (int(W * 1.5) // 8 * 8, int(H * 1.5) // 8 * 8)
    check(imgs[0].size == want, f"hires image is {imgs[0].size}, expected {want}")
    text = imgs[0].info.get("parameters", "")
    check("Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Latent" in text,
          f"hires infotext: {text!r}")
    cli = CTX.cli_generate(cli_args(sampler="Euler", scheduler="normal", seed=21, extra=[
        "--hires-scale", "1.5", "--hires-steps", "2", "--hires-denoise", "0.6"]), 1)
    same_pixels(imgs[0], cli[0], "hires fix")


def test_txt2img_batch():
    api = CTX.main().api()
    r = txt2img_vs_cli(api, seed=99, batch=2, what="txt2img batch 2")
    check(len(r.info["all_seeds"]) == 2 and r.info["all_seeds"][0] == 99,
          f"all_seeds {r.info['all_seeds']}")


def test_override_settings_rng_cpu_and_clip_skip():
    s = CTX.main()
    api = s.api()
    txt2img_vs_cli(api, seed=5, what="randn_source CPU",
                   override_settings={"randn_source": "CPU"}, cli_extra={"rng": "torch-cpu"})
    txt2img_vs_cli(api, seed=5, what="CLIP_stop_at_last_layers 2",
                   override_settings={"CLIP_stop_at_last_layers": 2}, cli_extra={"clip_skip": 2})
    opts = api.get_options()
    check(opts["randn_source"] == "GPU" and opts["CLIP_stop_at_last_layers"] == 1,
          "override_settings were not restored afterwards")


def test_img2img():
    api = CTX.main().api()
    init = load_input("init.png")
    init_path = CTX.save_png(init)
    for sampler, strength in (("Euler a", 0.75), ("DPM++ 2M", 0.5)):
        r = img2img(api, images=[init], denoising_strength=strength, sampler_name=sampler,
                    seed=321)
        check(len(r.images) == 1, f"img2img: {len(r.images)} images")
        cli = CTX.cli_generate(cli_args(sampler=sampler, seed=321, init=init_path,
                                        strength=strength))[0]
        same_pixels(r.images[0], cli, f"img2img {sampler} strength {strength}")


def test_inpaint():
    """img2img with a mask on the inpainting model, with A1111's image steps: its API defaults
    (mask blur 4, only masked, the original pasted over the unmasked part), then the whole
    picture with an inverted mask and padding ignored; each equal to sdctl generate with the
    same steps as flags."""
    s = CTX.main()
    api = s.api()
    init = load_input("init.png")
    mask = load_input("mask.png")
    init_path, mask_path = CTX.save_png(init), CTX.save_png(mask)
    cases = [
        (dict(inpainting_fill=1), ["--mask-blur", "4", "--inpaint-area", "masked",
                                   "--inpaint-padding", "0", "--mask-overlay"]),
        (dict(inpainting_fill=1, mask_blur=2, inpaint_full_res=True, inpaint_full_res_padding=8),
         ["--mask-blur", "2", "--inpaint-area", "masked", "--inpaint-padding", "8",
          "--mask-overlay"]),
        (dict(inpainting_fill=1, mask_blur=0, inpaint_full_res=False, inpainting_mask_invert=1),
         ["--invert-mask", "--mask-overlay"]),
    ]
    for fields, flags in cases:
        r = img2img(api, images=[init], mask_image=mask, denoising_strength=0.9,
                    sampler_name="Euler", seed=555,
                    override_settings={"sd_model_checkpoint": "sd1-inpaint"}, **fields)
        check(r.info.get("sd_model_name") == "sd1-inpaint", f"inpaint model {r.info.get('sd_model_name')}")
        cli = CTX.cli_generate(cli_args(model="sd1-inpaint", sampler="Euler", seed=555,
                                        init=init_path, strength=0.9, mask=mask_path,
                                        extra=flags))[0]
        same_pixels(r.images[0], cli, f"inpaint sd1-inpaint {fields}")
        if fields.get("mask_blur", 4):
            check(f"Mask blur: {fields.get('mask_blur', 4)}" in r.info["infotexts"][0],
                  f"infotext without the mask blur: {r.info['infotexts'][0]!r}")
    # A1111's masked-content modes: its default "fill" (0) and the latent ones, on the
    # 4-channel model at denoising 0.75 (where the start matters)
    made = {}
    for fill, name in [(0, "fill"), (1, "original"), (2, "latent-noise"), (3, "latent-nothing")]:
        kw = {} if fill == 0 else {"inpainting_fill": fill}
        r = img2img(api, images=[init], mask_image=mask, sampler_name="Euler", seed=556, **kw)
        cli = CTX.cli_generate(cli_args(sampler="Euler", seed=556, init=init_path, strength=0.75,
                                        mask=mask_path,
                                        extra=["--mask-blur", "4", "--inpaint-area", "masked",
                                               "--inpaint-padding", "0", "--mask-overlay",
                                               "--inpaint-fill", name]))[0]
        same_pixels(r.images[0], cli, f"inpaint sd1 inpainting_fill {fill}")
        made[fill] = rgb_bytes(r.images[0])
        if fill != 1:
            want = {0: "fill", 2: "latent noise", 3: "latent nothing"}[fill]
            check(f"Masked content: {want}" in r.info["infotexts"][0],
                  f"infotext without the masked content: {r.info['infotexts'][0]!r}")
    check(len(set(made.values())) == 4, "the four masked-content modes do not all differ")
    cur = api.get_options()["sd_model_checkpoint"]
    check(cur.startswith("sd1 ") or cur == "sd1", f"override model not restored: {cur!r}")


def test_lora_tag():
    api = CTX.main().api()
    prompt = PROMPT + " <lora:lora_b_kohya:0.8>"
    r = txt2img_vs_cli(api, seed=42, prompt=prompt, what="txt2img with <lora:lora_b_kohya:0.8>")
    plain = txt2img(api, seed=42, sampler_name="Euler a")
    check(rgb_bytes(r.images[0]) != rgb_bytes(plain.images[0]),
          "the LoRA tag changed nothing (same pixels as without it)")


def test_controlnet_lists():
    api = CTX.main().api()
    ml = api.controlnet_model_list()
    for name in ("controlnet-sd1", "controlnet-sd1-b"):
        check(any(re.fullmatch(re.escape(name) + r" \[[0-9a-f]{8}\]", t) for t in ml),
              f"controlnet model_list lacks {name} [hash8]: {ml}")
    mods = api.controlnet_module_list()
    check("none" in mods and "canny" in mods, f"module_list: {mods}")


def cn_title(name):
    ml = CTX.main().api().controlnet_model_list()
    return next(t for t in ml if t.startswith(name + " ["))


def test_controlnet_one_unit():
    api = CTX.main().api()
    ctrl = load_input("control_a.png")
    unit = webuiapi.ControlNetUnit(image=ctrl, module="none", model=cn_title("controlnet-sd1"))
    r = txt2img(api, seed=11, sampler_name="Euler a", controlnet_units=[unit])
    check(len(r.images) == 1, f"module none: expected 1 image (no detected map), got {len(r.images)}")
    cpath = CTX.save_png(ctrl)
    cli = CTX.cli_generate(cli_args(seed=11, controls=[
        f"model={os.path.join(CTX.cns, 'controlnet-sd1')},image={cpath},weight=1.0,start=0.0,"
        f"end=1.0,mode=balanced,resize=fill,preprocessor=none,resolution=512"]))[0]
    same_pixels(r.images[0], cli, "controlnet one unit")


def test_controlnet_two_units_canny():
    api = CTX.main().api()
    a, b = load_input("control_a.png"), load_input("control_b.png")
    ua = webuiapi.ControlNetUnit(image=a, module="canny", model="controlnet-sd1", weight=0.7,
                                 guidance_start=0.0, guidance_end=0.8, processor_res=64,
                                 threshold_a=50, threshold_b=150, control_mode=1)
    ub = webuiapi.ControlNetUnit(image=b, module="none", model=cn_title("controlnet-sd1-b"),
                                 weight=0.5, guidance_start=0.2, guidance_end=1.0,
                                 resize_mode="Just Resize", control_mode=2)
    r = txt2img(api, seed=12, sampler_name="DPM++ 2M", controlnet_units=[ua, ub])
    check(len(r.images) == 2, f"two units (canny + none): expected image + 1 detected map, "
                              f"got {len(r.images)} images")
    apath, bpath = CTX.save_png(a), CTX.save_png(b)
    cfg = CTX.tmpfile(".toml")
    with open(cfg, "w") as f:
        f.write(f"""
[[control]]
model = {json.dumps(os.path.join(CTX.cns, 'controlnet-sd1'))}
image = {json.dumps(apath)}
weight = 0.7
start = 0.0
end = 0.8
mode = "prompt"
resize = "fill"
resolution = 64
preprocessor = {{ name = "canny", low = 50, high = 150 }}

[[control]]
model = {json.dumps(os.path.join(CTX.cns, 'controlnet-sd1-b'))}
image = {json.dumps(bpath)}
weight = 0.5
start = 0.2
end = 1.0
mode = "control"
resize = "just"
resolution = 512
preprocessor = "none"
""")
    cli = CTX.cli_generate(cli_args(seed=12, sampler="DPM++ 2M", configs=[cfg]))[0]
    same_pixels(r.images[0], cli, "controlnet two units")
    edges = CTX.cli_detect("canny", apath, 64, [("low", 50), ("high", 150)])
    same_pixels(r.images[1], edges, "detected canny map vs `sdctl detect canny`")


def test_controlnet_detect():
    api = CTX.main().api()
    a = load_input("control_a.png")
    r = api.controlnet_detect([a], module="canny", processor_res=64, threshold_a=50,
                              threshold_b=150)
    check(len(r.images) == 1, f"detect: {len(r.images)} images; {str(r.json)[:300]}")
    edges = CTX.cli_detect("canny", CTX.save_png(a), 64, [("low", 50), ("high", 150)])
    same_pixels(r.images[0], edges, "/controlnet/detect canny vs `sdctl detect canny`")
    # the other input field name of the contract
    s = CTX.main()
    raw = post(s, "/controlnet/detect", json={
        "controlnet_module": "canny", "controlnet_input_images": [b64_png(a)],
        "controlnet_processor_res": 64, "controlnet_threshold_a": 50,
        "controlnet_threshold_b": 150})
    check(raw.status_code == 200, f"detect with controlnet_input_images: {raw.status_code} {raw.text[:300]}")
    same_pixels(decode_b64_png(raw.json()["images"][0]), edges, "detect (controlnet_input_images)")


def test_controlnet_field_spellings():
    """Raw request with the contract's other spellings: key "controlnet", input_image as a data:
    URL, the {"image", "mask"} form, int resize_mode / control_mode; a disabled unit is ignored."""
    s = CTX.main()
    a, b, mask = load_input("control_a.png"), load_input("control_b.png"), load_input("mask.png")
    apath, bpath, mpath = CTX.save_png(a), CTX.save_png(b), CTX.save_png(mask)
    units = [
        {"enabled": True, "module": "none", "model": "controlnet-sd1",
         "input_image": "data:image/png;base64," + b64_png(a), "weight": 0.9,
         "guidance_start": 0.1, "guidance_end": 0.9, "resize_mode": 0, "control_mode": 2,
         "processor_res": 512},
        {"enabled": True, "module": "none", "model": cn_title("controlnet-sd1-b"),
         "image": {"image": b64_png(b), "mask": b64_png(mask)}, "weight": 0.6,
         "resize_mode": "Crop and Resize", "control_mode": 1, "processor_res": 512},
        {"enabled": False, "module": "canny", "model": "controlnet-sd1",
         "image": b64_png(a), "weight": 1.0},
    ]
    r = post(s, "/sdapi/v1/txt2img", json=small_payload(
        seed=13, alwayson_scripts={"controlnet": {"args": units}}))
    check(r.status_code == 200, f"txt2img: {r.status_code} {r.text[:300]}")
    imgs = r.json()["images"]
    check(len(imgs) == 1, f"expected 1 image (modules none, third unit disabled), got {len(imgs)}")
    cli = CTX.cli_generate(cli_args(seed=13, controls=[
        f"model={os.path.join(CTX.cns, 'controlnet-sd1')},image={apath},weight=0.9,start=0.1,"
        f"end=0.9,mode=control,resize=just,preprocessor=none,resolution=512",
        f"model={os.path.join(CTX.cns, 'controlnet-sd1-b')},image={bpath},mask={mpath},"
        f"weight=0.6,start=0.0,end=1.0,mode=prompt,resize=crop,preprocessor=none,"
        f"resolution=512"]))[0]
    same_pixels(decode_b64_png(imgs[0]), cli, "controlnet field spellings")
    # save_detected_map false: no map after the image
    unit = {"enabled": True, "module": "canny", "model": "controlnet-sd1", "image": b64_png(a),
            "processor_res": 64, "threshold_a": 50, "threshold_b": 150,
            "save_detected_map": False}
    r = post(s, "/sdapi/v1/txt2img", json=small_payload(
        seed=13, alwayson_scripts={"ControlNet": {"args": [unit]}}))
    check(r.status_code == 200, f"txt2img canny: {r.status_code} {r.text[:300]}")
    check(len(r.json()["images"]) == 1, "save_detected_map false: the map was still returned")


def test_img2img_controlnet():
    api = CTX.main().api()
    init, ctrl = load_input("init.png"), load_input("control_a.png")
    unit = webuiapi.ControlNetUnit(image=ctrl, module="none", model="controlnet-sd1", weight=0.8)
    r = img2img(api, images=[init], denoising_strength=0.6, sampler_name="Euler", seed=14,
                controlnet_units=[unit])
    check(len(r.images) == 1, f"img2img + controlnet: {len(r.images)} images")
    cli = CTX.cli_generate(cli_args(sampler="Euler", seed=14, init=CTX.save_png(init),
                                    strength=0.6, controls=[
        f"model={os.path.join(CTX.cns, 'controlnet-sd1')},image={CTX.save_png(ctrl)},weight=0.8,"
        f"start=0.0,end=1.0,mode=balanced,resize=fill,preprocessor=none,resolution=512"]))[0]
    same_pixels(r.images[0], cli, "img2img + controlnet")


def test_png_info():
    api = CTX.main().api()
    r = txt2img(api, seed=2024, sampler_name="Euler a")
    p = api.png_info(r.images[0])
    text = p.info if isinstance(p.info, str) else json.dumps(p.info)
    check("Steps:" in text and "2024" in text, f"png-info: {str(p.json)[:500]}")


# ---------------------------------------------------------------------------------------------
# Tests: progress, interrupt, concurrency


LONG = dict(steps=150, batch_size=8, seed=3, sampler_name="Euler a")


def test_progress_and_interrupt():
    s = CTX.main()
    api = s.api()
    job = Bg(lambda: txt2img(s.api(), **LONG))
    job.start()
    try:
        p, seen = wait_progress(api, is_sampling, 60)
        check(p is not None, f"progress never showed sampling (last: {str(seen[-1:])[:400]})")
        check(0 < p["progress"] <= 1, f"progress {p['progress']}")
        check(p["state"]["sampling_steps"] == 150, f"sampling_steps {p['state']['sampling_steps']}")
        check("eta_relative" in p and "textinfo" in p, f"progress keys {sorted(p)}")
        q, seen2 = wait_progress(api, lambda x: x.get("current_image"), 15, interval=0.2)
        check(q is not None, "current_image stayed null while sampling")
        decode_b64_png(q["current_image"])
        check(job.is_alive(), "the long job ended before the interrupt could be tested")
        t0 = time.monotonic()
        api.interrupt()
        job.join(30)
        check(not job.is_alive(), "txt2img still running 30 s after interrupt")
        took = job.done_at - t0
        check(job.error is None, f"interrupted txt2img: {job.error!r}"[:500])
        check(took < 5, f"txt2img returned {took:.1f} s after interrupt (want < 5 s)")
        check(len(job.result.images) >= 1, "interrupted txt2img returned no image")
    finally:
        if job.is_alive():
            try:
                api.interrupt()
            except Exception:
                pass
            job.join(60)
    p, seen = wait_progress(api, lambda x: x.get("progress") == 0, 10)
    check(p is not None, f"progress not 0 when idle: {str(seen[-1:])[:300]}")
    check(p["state"].get("job_count", 0) == 0, f"job_count {p['state'].get('job_count')} when idle")


def test_skip():
    """skip ends the current generation of a request early and goes on with the next
    (A1111's n_iter): two iterations, the first skipped, still two images; the second is the
    image the same request gives alone for its seed (seed + batch_size)."""
    s = CTX.main()
    api = s.api()
    long = dict(steps=150, batch_size=1, seed=40, sampler_name="Euler a")
    job = Bg(lambda: txt2img(s.api(), n_iter=2, **long))
    job.start()
    try:
        p, seen = wait_progress(api, lambda x: is_sampling(x) and x["state"]["job_no"] == 0, 60)
        check(p is not None, f"the first iteration never sampled: {str(seen[-1:])[:300]}")
        api.skip()
        job.join(120)
        check(not job.is_alive(), "txt2img still running 120 s after skip")
        check(job.error is None, f"skipped txt2img: {job.error!r}"[:500])
        check(len(job.result.images) == 2, f"{len(job.result.images)} images, want 2")
        check(job.result.info["all_seeds"] == [40, 41], f"all_seeds {job.result.info['all_seeds']}")
    finally:
        if job.is_alive():
            api.interrupt()
            job.join(60)
    alone = txt2img(api, **dict(long, seed=41))
    check(rgb_bytes(alone.images[0]) == rgb_bytes(job.result.images[1]),
          "the iteration after the skipped one differs from the same seed alone")
    check(rgb_bytes(alone.images[0]) != rgb_bytes(job.result.images[0]),
          "the skipped iteration looks finished")


def test_parallel_requests():
    api = CTX.main().api()
    seeds = [201, 202, 203]
    jobs = [Bg(lambda sd=sd: txt2img(CTX.main().api(), seed=sd, sampler_name="DPM++ 2M"))
            for sd in seeds]
    for j in jobs:
        j.start()
    for j in jobs:
        j.join(HTTP_TIMEOUT)
    for sd, j in zip(seeds, jobs):
        check(not j.is_alive(), f"parallel seed {sd}: no answer in {HTTP_TIMEOUT} s")
        check(j.error is None, f"parallel seed {sd}: {j.error!r}"[:500])
        check(j.result.info["seed"] == sd, f"parallel seed {sd}: info seed {j.result.info['seed']}")
    for sd, j in zip(seeds, jobs):
        alone = txt2img(api, seed=sd, sampler_name="DPM++ 2M")
        same_pixels(j.result.images[0], alone.images[0], f"parallel seed {sd} vs alone (API)")
        cli = CTX.cli_generate(cli_args(sampler="DPM++ 2M", seed=sd))[0]
        same_pixels(j.result.images[0], cli, f"parallel seed {sd}")


# ---------------------------------------------------------------------------------------------
# Tests: auth, bad inputs, queue


def test_auth():
    s = CTX.server("auth", ["--api-auth", "user:pass"])
    for route in ("/sdapi/v1/options", "/sdapi/v1/sd-models", "/controlnet/model_list"):
        r = get(s, route)
        check(r.status_code == 401, f"GET {route} without auth: {r.status_code} (want 401)")
        r = get(s, route, auth=("user", "wrong"))
        check(r.status_code == 401, f"GET {route} wrong password: {r.status_code} (want 401)")
        r = get(s, route, auth=("user", "pass"))
        check(r.status_code == 200, f"GET {route} right password: {r.status_code} {r.text[:200]}")
    r = post(s, "/sdapi/v1/txt2img", json=small_payload())
    check(r.status_code == 401, f"POST txt2img without auth: {r.status_code} (want 401)")
    api = s.api()
    api.set_auth("user", "pass")
    check("sd_model_checkpoint" in api.get_options(), "webuiapi with set_auth: options")
    res = txt2img(api, seed=8, sampler_name="Euler a")
    check(len(res.images) == 1, "webuiapi with set_auth: txt2img")
    bad = s.api()
    bad.set_auth("user", "nope")
    try:
        txt2img(bad, seed=8, sampler_name="Euler a")
        raise TestFailure("txt2img with a wrong password succeeded")
    except RuntimeError as e:
        check(e.args and e.args[0] == 401, f"wrong password txt2img: {e!r}"[:300])


def expect_error(resp, needles, what, statuses=range(400, 500)):
    """A 4xx (or the given statuses) whose JSON body has error and a detail naming the field
    or value (any of needles, case-insensitive)."""
    check(resp.status_code in statuses,
          f"{what}: status {resp.status_code} (want {statuses}); body {resp.text[:300]!r}")
    try:
        body = resp.json()
    except ValueError:
        raise TestFailure(f"{what}: body is not JSON: {resp.text[:300]!r}")
    check(isinstance(body, dict) and "detail" in body,
          f"{what}: JSON body without detail: {str(body)[:300]}")
    check("error" in body, f"{what}: JSON body without error: {str(body)[:300]}")
    detail = body["detail"] if isinstance(body["detail"], str) else json.dumps(body["detail"])
    check(any(n.lower() in detail.lower() for n in needles),
          f"{what}: detail {detail[:300]!r} names none of {needles}")


def still_answers(s, what):
    r = get(s, "/sdapi/v1/options", timeout=30)
    check(r.status_code == 200, f"after {what}: GET options {r.status_code}")


def test_bad_inputs():
    s = CTX.server("limits", ["--body-limit-mb", "1"])
    garbage = base64.b64encode(b"this is not an image, just bytes" * 4).decode()
    cases = [
        ("unknown sampler", "/sdapi/v1/txt2img", small_payload(sampler_name="No Such Sampler"),
         ["Sampler not found"], [400]),
        ("unknown model in override_settings", "/sdapi/v1/txt2img",
         small_payload(override_settings={"sd_model_checkpoint": "nosuchmodel"}),
         ["nosuchmodel"], None),
        ("width 100000", "/sdapi/v1/txt2img", small_payload(width=100000), ["width"], None),
        ("steps 0", "/sdapi/v1/txt2img", small_payload(steps=0), ["steps"], None),
        ("steps 100000", "/sdapi/v1/txt2img", small_payload(steps=100000), ["steps"], None),
        ("batch_size -2", "/sdapi/v1/txt2img", small_payload(batch_size=-2), ["batch_size"], None),
        ("batch_size 9 (over --max-batch 8)", "/sdapi/v1/txt2img", small_payload(batch_size=9),
         ["batch_size"], None),
        ("steps 151 (over --max-steps 150)", "/sdapi/v1/txt2img", small_payload(steps=151),
         ["steps"], None),
        ("init_images not base64", "/sdapi/v1/img2img",
         small_payload(init_images=["%%% not base64 %%%"]), ["init_images", "base64"], None),
        ("init_images base64 of garbage", "/sdapi/v1/img2img",
         small_payload(init_images=[garbage]), ["init_images", "image"], None),
        ("controlnet model unknown", "/sdapi/v1/txt2img",
         small_payload(alwayson_scripts={"controlnet": {"args": [
             {"enabled": True, "module": "none", "model": "nosuchcn",
              "image": b64_png(load_input("control_a.png"))}]}}),
         ["nosuchcn"], None),
        ("controlnet module unknown", "/sdapi/v1/txt2img",
         small_payload(alwayson_scripts={"controlnet": {"args": [
             {"enabled": True, "module": "nosuchmodule", "model": "controlnet-sd1",
              "image": b64_png(load_input("control_a.png"))}]}}),
         ["nosuchmodule"], None),
    ]
    failures = []
    for what, route, body, needles, statuses in cases:
        try:
            r = post(s, route, json=body)
            expect_error(r, needles, what, statuses or range(400, 500))
        except Exception as e:
            failures.append(str(e)[:400])
        try:
            still_answers(s, what)
        except Exception as e:
            failures.append(str(e)[:300])
    # malformed JSON
    try:
        r = post(s, "/sdapi/v1/txt2img", data=b'{"prompt": "a", "steps": ',
                 headers={"Content-Type": "application/json"})
        expect_error(r, ["json", "body", "EOF", "parse"], "malformed JSON")
    except Exception as e:
        failures.append(str(e)[:400])
    # body over --body-limit-mb 1
    try:
        big = json.dumps(small_payload(prompt="x" * (2 * 1024 * 1024)))
        r = post(s, "/sdapi/v1/txt2img", data=big, headers={"Content-Type": "application/json"})
        expect_error(r, ["body", "limit", "large", "size", "MB", "bytes"], "body over 1 MB")
    except requests.RequestException as e:
        failures.append(f"body over 1 MB: no HTTP answer ({e!r})"[:400])
    except Exception as e:
        failures.append(str(e)[:400])
    # unknown route
    try:
        r = get(s, "/sdapi/v1/no-such-route")
        check(r.status_code == 404, f"unknown route: {r.status_code}")
        try:
            r.json()
        except ValueError:
            raise TestFailure(f"unknown route: 404 body is not JSON: {r.text[:200]!r}")
    except Exception as e:
        failures.append(str(e)[:400])
    for what in ("malformed JSON", "body over limit", "unknown route"):
        try:
            still_answers(s, what)
        except Exception as e:
            failures.append(str(e)[:300])
    check(not failures, "\n    ".join([""] + failures))


def test_path_traversal():
    s = CTX.server("limits", ["--body-limit-mb", "1"])
    outside_sd1 = os.path.join(CTX.outside, "sd1")
    failures = []
    cases = []
    for name in ("../outside/sd1", "sd1/../../outside/sd1", outside_sd1):
        cases.append((f"override sd_model_checkpoint {name!r}", "/sdapi/v1/txt2img",
                      small_payload(override_settings={"sd_model_checkpoint": name})))
        cases.append((f"POST options sd_model_checkpoint {name!r}", "/sdapi/v1/options",
                      {"sd_model_checkpoint": name}))
    for name in ("../outside/controlnet-sd1", os.path.join(CTX.outside, "controlnet-sd1")):
        cases.append((f"controlnet model {name!r}", "/sdapi/v1/txt2img",
                      small_payload(alwayson_scripts={"controlnet": {"args": [
                          {"enabled": True, "module": "none", "model": name,
                           "image": b64_png(load_input("control_a.png"))}]}})))
    for what, route, body in cases:
        try:
            r = post(s, route, json=body)
            check(400 <= r.status_code < 500, f"{what}: {r.status_code} (want 4xx) {r.text[:200]!r}")
        except Exception as e:
            failures.append(str(e)[:300])
    try:
        cur = get(s, "/sdapi/v1/options").json().get("sd_model_checkpoint", "")
        check(cur.startswith("sd1") and "outside" not in cur and ".." not in cur,
              f"model after traversal attempts: {cur!r}")
    except Exception as e:
        failures.append(str(e)[:300])
    # a LoRA tag with ../ must not load the file outside --lora-dir: refused (4xx) or ignored
    try:
        lora_out = small_payload(prompt=PROMPT + " <lora:../outside/lora_b_kohya:0.8>", seed=42)
        r = post(s, "/sdapi/v1/txt2img", json=lora_out)
        if r.status_code == 200:
            got = decode_b64_png(r.json()["images"][0])
            with_lora = CTX.cli_generate(cli_args(prompt=PROMPT + " <lora:lora_b_kohya:0.8>",
                                                  seed=42))[0]
            check(rgb_bytes(got) != rgb_bytes(with_lora),
                  "<lora:../outside/lora_b_kohya:0.8> loaded the LoRA from outside --lora-dir")
        else:
            check(400 <= r.status_code < 500, f"lora ../ tag: {r.status_code} {r.text[:200]!r}")
    except Exception as e:
        failures.append(str(e)[:300])
    try:
        still_answers(s, "path traversal")
    except Exception as e:
        failures.append(str(e)[:300])
    check(not failures, "\n    ".join([""] + failures))


def test_queue_full():
    s = CTX.server("queue1", ["--queue-size", "1"])
    api = s.api()
    job = Bg(lambda: txt2img(s.api(), **LONG))
    job.start()
    extras = []
    try:
        p, seen = wait_progress(api, is_sampling, 60)
        check(p is not None, f"long job never sampling: {str(seen[-1:])[:300]}")

        def one(i):
            t0 = time.monotonic()
            r = post(s, "/sdapi/v1/txt2img", json=small_payload(seed=300 + i))
            return r.status_code, time.monotonic() - t0, r.text[:200]

        extras = [Bg(lambda i=i: one(i)) for i in range(3)]
        for e in extras:
            e.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(
                e.result and e.result[0] == 503 for e in extras):
            time.sleep(0.05)
        got503 = [e.result for e in extras if e.result and e.result[0] == 503]
        check(job.is_alive(), "the long job ended before the queue could be tested")
        check(got503, f"no 503 while the queue was full: "
                      f"{[e.result or e.error for e in extras]}")
        check(all(r[1] < 10 for r in got503), f"503 answers were slow: {got503}")
    finally:
        try:
            api.interrupt()
        except Exception:
            pass
        job.join(60)
        for e in extras:
            e.join(HTTP_TIMEOUT)
    statuses = [e.result[0] if e.result else repr(e.error) for e in extras]
    check(all(st in (200, 503) for st in statuses), f"extra requests' statuses {statuses}")
    still_answers(s, "queue full")


def test_sigterm_cancels_job():
    s = CTX.server("sigterm")
    api = s.api()
    job = Bg(lambda: txt2img(s.api(), **LONG))
    job.start()
    p, _ = wait_progress(api, is_sampling, 60)
    check(p is not None, "long job never sampling")
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    try:
        code = s.proc.wait(15)
    except subprocess.TimeoutExpired:
        raise TestFailure("server still running 15 s after SIGTERM during a job")
    took = time.monotonic() - t0
    job.join(30)
    check(took < 10, f"SIGTERM during a job: exit took {took:.1f} s")
    check(code == 0, f"SIGTERM: exit code {code}")


TESTS = [
    test_model_list,
    test_get_routes,
    test_options_roundtrip_and_model_switch,
    test_samplers_schedulers_loras_listed,
    test_txt2img_fixed_seed_and_info,
    test_txt2img_random_seed,
    test_txt2img_each_sampler,
    test_txt2img_hires_fix,
    test_txt2img_batch,
    test_override_settings_rng_cpu_and_clip_skip,
    test_img2img,
    test_inpaint,
    test_lora_tag,
    test_controlnet_lists,
    test_controlnet_one_unit,
    test_controlnet_two_units_canny,
    test_controlnet_detect,
    test_controlnet_field_spellings,
    test_img2img_controlnet,
    test_png_info,
    test_progress_and_interrupt,
    test_skip,
    test_parallel_requests,
    test_auth,
    test_bad_inputs,
    test_path_traversal,
    test_queue_full,
    test_sigterm_cancels_job,
]


def main():
    global CTX
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sdctl", required=True, help="the sdctl binary")
    ap.add_argument("--only", action="append", default=[],
                    help="run only tests whose name contains this (repeatable)")
    ap.add_argument("--artifacts", help="save mismatching API/CLI image pairs here")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (server logs)")
    args = ap.parse_args()
    sdctl = os.path.abspath(args.sdctl)
    if not os.access(sdctl, os.X_OK):
        print(f"not an executable: {sdctl}", file=sys.stderr)
        return 2
    CTX = Ctx(sdctl, args.artifacts)
    tests = [t for t in TESTS if not args.only or any(o in t.__name__ for o in args.only)]
    failed = []
    t_all = time.monotonic()
    try:
        for t in tests:
            t0 = time.monotonic()
            try:
                t()
                print(f"PASS {t.__name__} ({time.monotonic() - t0:.1f} s)", flush=True)
            except Exception as e:
                failed.append(t.__name__)
                print(f"FAIL {t.__name__} ({time.monotonic() - t0:.1f} s): {e}", flush=True)
                if not isinstance(e, TestFailure):
                    traceback.print_exc(limit=6)
                    print(flush=True)
    finally:
        for name, s in CTX.servers.items():
            if failed and s.lines:
                print(f"--- server {name} stderr (tail) ---\n{s.stderr_tail(15)}", flush=True)
        CTX.stop_all()
        if args.keep_tmp:
            print(f"temp dir kept: {CTX.tmp}")
        else:
            shutil.rmtree(CTX.tmp, ignore_errors=True)
    print(f"\n{len(tests) - len(failed)} passed, {len(failed)} failed "
          f"in {time.monotonic() - t_all:.1f} s" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
