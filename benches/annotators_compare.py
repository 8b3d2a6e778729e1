#!/usr/bin/env python3
"""Each annotator (preprocessor) network at full size: sdctl against the PyTorch reference, on
the same 512x512 test image, in alternating rounds on this machine.

For every annotator the reference network is built at its real size with random weights (no
weights can be downloaded here): the architectures and the weight schemes of the fixture
generators in tests/fixtures (make_softedge_fixtures.py, make_mlsd_fixtures.py,
make_lineart_fixtures.py, make_normalbae_fixtures.py, make_midas_fixtures.py,
make_zoe_fixtures.py, make_openpose_fixtures.py, make_openpose_hand_face_fixtures.py,
make_uniformer_fixtures.py), whose per-layer scales keep the activations finite and the maps
non-empty; their builders are imported. Beyond them: lineart_anime's UnetGenerator at its real
width (ngf 64; the fixture's has 2) with the fixture's scheme; Depth Anything V2 vits with
make_midas_fixtures.py's power-of-two scales (`da2_scale`); UniFormer with the real config and
make_uniformer_fixtures.py's weights and BatchNorm calibration (on 256x256 inputs); and the
OpenPose body network's last layers adjusted on the test image so that one person (one hand
box, one face box) is found (`calibrate_body`). The state dict is saved in the public file's
layout (ControlNetHED.pth,
table5_pidinet.pth, ...) under --out (reused when there) and handed to sdctl as `model=` (and
`hand_model=` / `face_model=`). Then, per round (sdctl first in even rounds, PyTorch first in
odd ones):

- sdctl: `sdctl bench annotator NAME IMAGE --resolution 512 --iters N --param model=FILE
  --json OUT` (its first run loads the weights and is not in the mean);
- PyTorch: the reference detector's whole call as a user runs it, the model already loaded,
  torch.set_num_threads(os.cpu_count()), torch.no_grad, one warm-up call, then N timed calls:
  controlnet_aux 0.0.10's `Detector(img, detect_resolution=512, image_resolution=512)` for
  softedge_hed (HEDdetector), softedge_pidinet (PidiNetDetector), mlsd (MLSDdetector),
  lineart_realistic (LineartDetector), lineart_anime (LineartAnimeDetector), normal_bae
  (NormalBaeDetector), depth_midas (MidasDetector), depth_zoe (ZoeDetector), openpose and
  openpose_full (OpenposeDetector, include_hand/include_face); sd-webui-controlnet 56cec5b2's
  processor functions `lineart_anime_denoise(img, res=512)` (annotator/manga_line, erika.pth)
  and `uniformer(img, res=512)` (seg_ufade20k: annotator/uniformer with its vendored mmseg /
  mmcv, upernet_global_small.pth), run from the bare git mirror with make_uniformer_fixtures.py's
  loader; the official Depth-Anything-V2 `infer_image(bgr, 518)` + run.py's grey map for
  depth_anything_v2 (vits).

Afterwards `sdctl detect` runs once on the image (unless --no-check) and both outputs are
summarised (levels, lit fraction; people for the pose annotators) and written to --out/maps, so
that an empty or degenerate map is reported: with random weights an empty map could make the
post-processing (peak search, line drawing) unrepresentatively cheap.

Printed per annotator: the sdctl and PyTorch means and mins over all timed runs, and the ratio
sdctl / PyTorch (the target is <= 0.8); at the end a markdown table for the README. --json
writes everything (per-round numbers included).

    /work/venv-ref/bin/python benches/annotators_compare.py [--rounds 2] [--iters 2]
        [--only a,b | --skip a,b] [--json /tmp/annot_bench/summary.json] [--merge]

Needs the fixture generators' environment (torch, controlnet-aux==0.0.10 installed with
--no-deps, timm, opencv-python-headless, einops, scipy, scikit-image, safetensors, addict,
yapf), a git mirror of Mikubill/sd-webui-controlnet (--webui) and one of
DepthAnything/Depth-Anything-V2 (--da2); an annotator whose reference cannot be built is
skipped with the reason. depth_zoe is slow (about 40 s per PyTorch call on 2 cores) and comes
last; `--only depth_zoe --merge` adds it to an earlier run's JSON and table.
"""
import argparse
import gc
import importlib
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
import tarfile
import time
import traceback
import types
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(FIXTURES))
MIRROR = Path("/work/.mirror")
RES = 512


# ----------------------------------------------------------------------------- helpers
def log(*a):
    print(*a, file=sys.stderr, flush=True)


def seed_of(name):
    return 1000 + sum((i + 1) * b for i, b in enumerate(name.encode()))


def pow2(x):
    return 2.0 ** round(math.log2(x))


def save_once(path, make):
    """torch.save(make(), path) unless the file is there (written through a temporary name)."""
    path = Path(path)
    if not path.exists():
        tmp = path.with_name(path.name + ".part")
        torch.save(make(), tmp)
        tmp.rename(path)
        log(f"  wrote {path} ({path.stat().st_size / 1e6:.0f} MB)")
    return path


def test_image(w, h):
    """A deterministic RGB test pattern: gradients, a checker patch, filled and outlined shapes,
    straight lines at several angles, text and a stick figure."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([40 + 170 * x / (w - 1), 60 + 150 * y / (h - 1),
                    128 + 80 * np.sin(x / 23.0 + y / 41.0)], -1)
    img = np.floor(img + 0.5).clip(0, 255).astype(np.uint8)
    s = min(w, h) / 512.0

    def p(px, py):
        return int(px * s), int(py * s)

    check = ((np.arange(int(96 * s))[:, None] // max(1, int(12 * s)) +
              np.arange(int(96 * s))[None, :] // max(1, int(12 * s))) % 2 * 255).astype(np.uint8)
    x0, y0 = p(390, 20)
    img[y0:y0 + check.shape[0], x0:x0 + check.shape[1]] = check[:, :, None]
    cv2.rectangle(img, p(30, 30), p(170, 140), (200, 40, 40), -1)
    cv2.rectangle(img, p(200, 40), p(340, 150), (20, 20, 120), max(1, int(6 * s)))
    cv2.circle(img, p(110, 260), int(70 * s), (40, 180, 60), -1)
    cv2.circle(img, p(110, 260), int(35 * s), (250, 250, 240), -1)
    cv2.fillPoly(img, [np.array([p(220, 330), p(330, 200), p(360, 360)], np.int32)], (230, 200, 30))
    cv2.ellipse(img, p(430, 200), p(60, 30), 30, 0, 360, (90, 30, 150), -1)
    for i, (a, b) in enumerate([((20, 500), (480, 380)), ((40, 400), (200, 480)),
                                ((250, 170), (500, 170)), ((480, 260), (480, 500)),
                                ((300, 480), (500, 300))]):
        cv2.line(img, p(*a), p(*b), (10, 10, 10) if i % 2 else (245, 245, 245), max(1, int(3 * s)),
                 cv2.LINE_AA)
    cv2.putText(img, "sdctl 512", p(200, 250), cv2.FONT_HERSHEY_SIMPLEX, 1.2 * s, (0, 0, 0),
                max(1, int(2 * s)), cv2.LINE_AA)
    # a stick figure: head, torso, arms, legs
    cx, top = 330, 250
    cv2.circle(img, p(cx, top + 25), int(22 * s), (240, 200, 170), -1)
    for a, b in [((cx, top + 47), (cx, top + 140)), ((cx, top + 65), (cx - 50, top + 110)),
                 ((cx, top + 65), (cx + 55, top + 100)), ((cx, top + 140), (cx - 35, top + 230)),
                 ((cx, top + 140), (cx + 35, top + 230))]:
        cv2.line(img, p(*a), p(*b), (60, 40, 30), max(1, int(10 * s)), cv2.LINE_AA)
    return img


def as_array(out):
    if isinstance(out, tuple):
        out = out[0]
    return np.asarray(out)


def map_stats(a):
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[2] == 3 and (a[:, :, 0] == a[:, :, 1]).all() and \
            (a[:, :, 1] == a[:, :, 2]).all():
        a = a[:, :, 0]
    flat = a.reshape(-1, a.shape[2]) if a.ndim == 3 else a.reshape(-1, 1)
    levels = len(np.unique(flat, axis=0))
    lit = float((flat > 0).any(axis=1).mean())
    st = {"shape": list(a.shape), "min": int(a.min()), "max": int(a.max()),
          "mean": round(float(a.mean()), 2), "levels": levels, "lit": round(lit, 4)}
    if levels <= 1:
        st["degenerate"] = "constant map"
    elif lit < 1e-3:
        st["degenerate"] = "almost empty map"
    return st


def write_map(path, a):
    a = np.asarray(a)
    cv2.imwrite(str(path), a if a.ndim == 2 else cv2.cvtColor(a, cv2.COLOR_RGB2BGR))


_AUX_SPEC = importlib.util.find_spec("controlnet_aux")


def controlnet_aux_ns():
    """controlnet_aux/__init__.py imports every detector: the package namespace alone, as the
    fixture generators load it. Each generator puts its own namespace module (without a
    __spec__) in sys.modules and the next one's find_spec needs one: give it the real spec."""
    pkg = sys.modules.get("controlnet_aux")
    if pkg is None:
        pkg = types.ModuleType("controlnet_aux")
        pkg.__path__ = list(_AUX_SPEC.submodule_search_locations)
        sys.modules["controlnet_aux"] = pkg
    if pkg.__spec__ is None:
        pkg.__spec__ = _AUX_SPEC
    from controlnet_aux.util import HWC3, resize_image
    return HWC3, resize_image


def fixture(name):
    """A fixture generator module (tests/fixtures/NAME.py), imported for its builders."""
    controlnet_aux_ns()
    mod = importlib.import_module(name)
    controlnet_aux_ns()
    return mod


class Ref:
    """A built reference: `call(rgb)` runs the whole detector; `params` are sdctl's --param
    files; `extra(rgb)` adds facts about the output (people for the pose detectors)."""

    def __init__(self, call, params, extra=None, note=""):
        self.call, self.params, self.extra, self.note = call, params, extra, note


# ----------------------------------------------------------------------------- references
def build_hed(a):
    fx = fixture("make_softedge_fixtures")
    from controlnet_aux.hed import HEDdetector
    model = fx.random_weights("hed", fx.ControlNetHED_Apache2())
    f = save_once(a.out / "ControlNetHED.pth", lambda: model.state_dict())
    det = HEDdetector(model)
    return Ref(lambda img: det(img, detect_resolution=RES, image_resolution=RES), {"model": f})


def build_pidinet(a):
    fx = fixture("make_softedge_fixtures")
    from controlnet_aux.pidi import PidiNetDetector
    model = fx.random_weights("pidi", fx.pidinet())
    f = save_once(a.out / "table5_pidinet.pth", lambda: {
        "epoch": 0, "state_dict": {"module." + k: v for k, v in model.state_dict().items()}})
    det = PidiNetDetector(model)
    return Ref(lambda img: det(img, detect_resolution=RES, image_resolution=RES), {"model": f})


def build_mlsd(a):
    fx = fixture("make_mlsd_fixtures")
    model = fx.random_model()
    f = save_once(a.out / "mlsd_large_512_fp32.pth", lambda: model.state_dict())
    det = fx.MLSDdetector(model)
    return Ref(lambda img: det(img, detect_resolution=RES, image_resolution=RES), {"model": f})


def build_lineart_realistic(a):
    fx = fixture("make_lineart_fixtures")
    lineart, _, _ = fx._controlnet_aux()
    model = lineart.Generator(3, 1, 3)
    model.load_state_dict(fx.random_state(model, "sk_model"))
    model.eval()
    f = save_once(a.out / "sk_model.pth", lambda: model.state_dict())
    det = lineart.LineartDetector(model, model)  # coarse=False never uses the second one
    return Ref(lambda img: det(img, detect_resolution=RES, image_resolution=RES), {"model": f})


def build_lineart_anime(a):
    import functools
    fx = fixture("make_lineart_fixtures")
    _, lineart_anime, _ = fx._controlnet_aux()
    # LineartAnimeDetector.from_pretrained's network (ngf 64), weights as the fixture's ngf-2 one
    norm_layer = functools.partial(torch.nn.InstanceNorm2d, affine=False, track_running_stats=False)
    net = lineart_anime.UnetGenerator(3, 1, 8, 64, norm_layer=norm_layer, use_dropout=False)
    sd = {}
    for key, p in net.state_dict().items():
        r = fx.randn(p.shape, f"netG/{key}")
        sd[key] = r * pow2(math.sqrt(2.0 / (p.shape[1] * p.shape[2] * p.shape[3]))) \
            if p.dim() == 4 else r / 64
    net.load_state_dict(sd)
    net.eval()
    f = save_once(a.out / "netG.pth", lambda: {"module." + k: v for k, v in sd.items()})
    det = lineart_anime.LineartAnimeDetector(net)
    return Ref(lambda img: det(img, detect_resolution=RES, image_resolution=RES), {"model": f})


_WEBUI = {}


def webui(a):
    """sd-webui-controlnet's annotator package and processor.py functions (with
    make_uniformer_fixtures.py's stand-ins for webui's modules), from the git mirror."""
    if not _WEBUI:
        import ast
        uf = fixture("make_uniformer_fixtures")
        src = a.out / "src" / "sd-webui-controlnet"
        src.mkdir(parents=True, exist_ok=True)
        U, ns = uf.load_webui(str(a.webui), src)
        text = (src / "scripts/preprocessor/legacy/processor.py").read_text()
        want = ("pad64", "safer_memory", "resize_image_with_pad", "lineart_anime_denoise")
        fns = [n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef) and n.name in want]
        assert sorted(f.name for f in fns) == sorted(want)
        from annotator.util import HWC3
        ns2 = {"np": np, "cv2": cv2, "HWC3": HWC3, "model_manga_line": None}
        exec(compile(ast.Module(body=fns, type_ignores=[]),
                     "scripts/preprocessor/legacy/processor.py", "exec"), ns2)
        _WEBUI.update(U=U, ns=ns, ns2=ns2, src=src, uf=uf)
    return _WEBUI


def build_manga(a):
    fx = fixture("make_lineart_fixtures")
    w = webui(a)
    model = fx.res_skip()
    model.load_state_dict(fx.random_state(model, "erika"))
    f = save_once(a.out / "erika.pth", lambda: model.state_dict())
    del model
    # MangaLineExtration reads <models_path>/manga_line/erika.pth (torch.load)
    from annotator.manga_line import MangaLineExtration
    d = Path(MangaLineExtration.model_dir)
    d.mkdir(parents=True, exist_ok=True)
    link = d / "erika.pth"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(f)
    m = MangaLineExtration()
    m.load_model()
    w["ns2"]["model_manga_line"] = m
    fn = w["ns2"]["lineart_anime_denoise"]
    return Ref(lambda img: fn(img, res=RES), {"model": f},
               note="sd-webui-controlnet processor.lineart_anime_denoise (annotator/manga_line)")


def build_normalbae(a):
    fx = fixture("make_normalbae_fixtures")
    normalbae, _, NNET = fx._controlnet_aux()
    model, sd = fx.make_model(NNET)
    f = save_once(a.out / "scannet.pt", lambda: {"model": {"module." + k: v for k, v in sd.items()}})
    del sd
    det = normalbae.NormalBaeDetector(model)
    return Ref(lambda img: det(img, detect_resolution=RES, image_resolution=RES), {"model": f})


def build_midas(a):
    fx = fixture("make_midas_fixtures")
    model = fx.random_model()
    f = save_once(a.out / "dpt_hybrid-midas-501f0c75.pt", lambda: model.state_dict())
    det = fx.MidasDetector(model)
    return Ref(lambda img: det(img, detect_resolution=RES, image_resolution=RES), {"model": f})


def build_zoe(a):
    fx = fixture("make_zoe_fixtures")
    model = fx.random_model()
    f = save_once(a.out / "ZoeD_M12_N.pt", lambda: {"model": model.state_dict()})
    det = fx.ZoeDetector(model)
    return Ref(lambda img: det(img, detect_resolution=RES, image_resolution=RES), {"model": f})


# an upright person in grid units (make_openpose_fixtures.py's), for the limbs' directions
SKELETON = np.array([[0.0, -5.5], [0, -4], [-1.4, -4], [-2, -2.5], [-2.2, -1], [1.4, -4], [2, -2.5],
                     [2.2, -1], [-0.8, -0.5], [-0.9, 2], [-1, 4.5], [0.8, -0.5], [0.9, 2], [1, 4.5],
                     [-0.3, -5.8], [0.3, -5.8], [-0.7, -5.6], [0.7, -5.6]])


def calibrate_body(bf, model, rgb):
    """The random body network's two last layers adjusted so that the detector finds a person
    on the test image (with plain random weights it finds none, and openpose_full would never
    run its hand and face networks): on the detector's own network input, each part heatmap
    (before the ReLU that follows Mconv7_stage6_L2) is mapped affinely so that its maximum is
    0.6 and its 99.7th percentile 0.1 (the peak threshold), and each limb's PAF pair gets the
    unit vector of an upright skeleton's limb added to its bias (the random field stays on
    top). On the 512x512 test image: 34 peaks, 1 person, 1 hand box, 1 face box."""
    from controlnet_aux.open_pose import util
    HWC3, resize_image = controlnet_aux_ns()
    bgr = resize_image(HWC3(rgb), RES)[:, :, ::-1]
    scale = 0.5 * 368 / bgr.shape[0]  # Body.__call__'s input
    x = util.smart_resize_k(bgr, fx=scale, fy=scale)
    x, _ = util.padRightDownCorner(x, 8, 128)
    x = np.ascontiguousarray(np.transpose(np.float32(x[:, :, :, None]), (3, 2, 0, 1)) / 256 - 0.5)
    heat = model.model6_2.Mconv7_stage6_L2
    seen = []
    hook = heat.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    with torch.no_grad():
        model(torch.from_numpy(x))
    hook.remove()
    pre = seen[0][0, :18].reshape(18, -1).double()
    q = torch.quantile(pre, 0.997, dim=1)
    sc = 0.5 / (pre.max(1).values - q).clamp(min=1e-6)
    with torch.no_grad():
        heat.weight[:18] *= sc.float()[:, None, None, None]
        heat.bias[:18] = heat.bias[:18] * sc.float() + (0.1 - sc * q).float()
        paf = model.model6_1.Mconv7_stage6_L1
        for (pa, pb), (cx, cy) in zip(bf.LIMB_SEQ, bf.MAP_IDX):
            v = SKELETON[pb - 1] - SKELETON[pa - 1]
            v = v / np.linalg.norm(v)
            paf.bias[cx - 19] += float(v[0])
            paf.bias[cy - 19] += float(v[1])
    return model


def openpose_parts(a, full):
    bf = fixture("make_openpose_fixtures")
    hf = fixture("make_openpose_hand_face_fixtures")
    from controlnet_aux.open_pose import OpenposeDetector
    from controlnet_aux.open_pose.body import Body
    from controlnet_aux.open_pose.face import Face, FaceNet, params
    from controlnet_aux.open_pose.hand import Hand
    from controlnet_aux.open_pose.model import handpose_model

    def flat(model):  # the files' keys (util.transfer adds the block prefix back)
        return {".".join(k.split(".")[1:]): v for k, v in model.state_dict().items()}

    body = Body.__new__(Body)
    body.model = calibrate_body(bf, bf.random_model(), a.img)
    # calibrated on the test image: one file per image size
    bodyf = "body_pose_model.pth" if a.size == "512x512" else f"body_pose_model_{a.size}.pth"
    files = {"model": save_once(a.out / bodyf, lambda: flat(body.model))}
    hand = face = None
    if full:
        hand = Hand.__new__(Hand)
        hand.model = hf.randomise(handpose_model(), True, hf.HAND_SEED)
        files["hand_model"] = save_once(a.out / "hand_pose_model.pth", lambda: flat(hand.model))
        face = Face.__new__(Face)
        face.inference_size = params["inference_img_size"]
        face.sigma = params["gaussian_sigma"]
        face.threshold = params["heatmap_peak_thresh"]
        face.model = hf.randomise(FaceNet(), False, hf.FACE_SEED)
        files["face_model"] = save_once(a.out / "facenet.pth", lambda: face.model.state_dict())
    return OpenposeDetector(body, hand, face), files


def build_openpose(a, full=False):
    HWC3, resize_image = controlnet_aux_ns()
    det, files = openpose_parts(a, full)

    def extra(img):
        with torch.no_grad():
            poses = det.detect_poses(resize_image(HWC3(img), RES), full, full)
        return {"people": len(poses),
                "hands": sum((p.left_hand is not None) + (p.right_hand is not None) for p in poses),
                "faces": sum(p.face is not None for p in poses)}

    return Ref(lambda img: det(img, detect_resolution=RES, image_resolution=RES,
                               include_hand=full, include_face=full), files, extra)


def build_openpose_full(a):
    return build_openpose(a, full=True)


def da2_scale(key, shape):
    """Power-of-two scales (as make_midas_fixtures.py's) for the official DA2 state dict."""
    if len(shape) == 4:
        return pow2(math.sqrt(2.0 / (shape[1] * shape[2] * shape[3]))), 0.0
    if len(shape) == 2:
        return pow2(math.sqrt(1.0 / shape[1])), 0.0
    last = key.split(".")[-2] if "." in key else key
    if len(shape) == 1 and "norm" in last and key.endswith(".weight"):
        return 1 / 8, 1.0
    if key.endswith(("cls_token", "pos_embed", "mask_token")):
        return 1 / 2, 0.0
    if key == "depth_head.scratch.output_conv2.2.bias":
        return 1 / 16, 0.5  # the relu'd depth positive over most of the image
    return 1 / 16, 0.0  # biases, layer scales


def build_da2(a):
    src = a.out / "src" / "Depth-Anything-V2"
    if not (src / "depth_anything_v2" / "dpt.py").exists():
        if not Path(a.da2).exists():
            raise RuntimeError(f"no Depth-Anything-V2 source ({a.da2})")
        src.mkdir(parents=True, exist_ok=True)
        tar = subprocess.run(["git", "-C", str(a.da2), "archive", "HEAD", "depth_anything_v2"],
                             check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(tar)) as t:
            t.extractall(src, filter="data")
    sys.path.insert(0, str(src))
    import logging
    logging.getLogger("dinov2").setLevel(logging.ERROR)  # "xFormers not available"
    from depth_anything_v2.dpt import DepthAnythingV2
    model = DepthAnythingV2(encoder="vits", features=64, out_channels=[48, 96, 192, 384])
    sd = {}
    for key, p in model.state_dict().items():
        s, o = da2_scale(key, tuple(p.shape))
        sd[key] = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed_of(key))) * s + o
    model.load_state_dict(sd)
    model.eval()
    f = save_once(a.out / "depth_anything_v2_vits.pth", lambda: sd)

    def call(rgb):
        # run.py: cv2.imread (BGR), infer_image, min-max to u8, --grayscale
        depth = model.infer_image(rgb[:, :, ::-1], 518)
        depth = (depth - depth.min()) / (depth.max() - depth.min()) * 255.0
        return np.repeat(depth.astype(np.uint8)[..., None], 3, axis=-1)

    return Ref(call, {"model": f}, note="official Depth-Anything-V2 infer_image + run.py --grayscale")


def build_uniformer(a):
    w = webui(a)
    U, ns, uf = w["U"], w["ns"], w["uf"]
    import annotator.mmpkg.mmcv as mmcv
    f = a.out / "upernet_global_small.pth"
    if not f.exists():
        from collections import OrderedDict
        from annotator.mmpkg.mmseg.datasets import ADE20KDataset
        # the real config (embed_dim [64,128,320,512], layers [3,4,8,3], head_dim 64, UPerHead
        # channels 512, 150 classes); the fixture's random weights, BatchNorm calibration and
        # logit scaling (on 256x256 formula inputs)
        model = U.init_segmentor(mmcv.Config.fromfile(U.config_file), None, device="cpu")
        uf.random_weights(model)
        x = torch.from_numpy(np.concatenate([uf.formula_input(256, 256, ph)
                                             for ph in (0.0, 1.5, 3.0, 4.5)]).astype(np.float32))
        uf.calibrate(model, x)
        uf.rescale_seg(model, x[:1])
        sd = OrderedDict((k, v.detach().clone().contiguous()) for k, v in model.state_dict().items())
        save_once(f, lambda: {"meta": {"CLASSES": tuple(ADE20KDataset.CLASSES),
                                       "PALETTE": [list(map(int, p)) for p in ADE20KDataset.PALETTE],
                                       "mmseg_version": "0.x",
                                       "config": "annotator/uniformer/upernet_global_small.py, "
                                                 "random weights (benches/annotators_compare.py)"},
                              "state_dict": sd})
        del model, sd
    # what apply_uniformer does on its first call: init_segmentor(config_file, checkpoint)
    U.model = U.init_segmentor(U.config_file, str(f), device="cpu")
    fn = ns["uniformer"]
    return Ref(lambda img: fn(img, res=RES), {"model": f},
               note="sd-webui-controlnet processor.uniformer (annotator/uniformer)")


# name -> (reference, builder); the order they run in (depth_zoe last: slow)
ANNOTATORS = {
    "softedge_hed": ("controlnet_aux HEDdetector", build_hed),
    "softedge_pidinet": ("controlnet_aux PidiNetDetector", build_pidinet),
    "mlsd": ("controlnet_aux MLSDdetector", build_mlsd),
    "lineart_realistic": ("controlnet_aux LineartDetector", build_lineart_realistic),
    "lineart_anime": ("controlnet_aux LineartAnimeDetector", build_lineart_anime),
    "lineart_anime_denoise": ("sd-webui-controlnet manga_line", build_manga),
    "normal_bae": ("controlnet_aux NormalBaeDetector", build_normalbae),
    "depth_midas": ("controlnet_aux MidasDetector", build_midas),
    "openpose": ("controlnet_aux OpenposeDetector", build_openpose),
    "openpose_full": ("controlnet_aux OpenposeDetector (hands, face)", build_openpose_full),
    "depth_anything_v2": ("official Depth-Anything-V2 (vits)", build_da2),
    "seg_ufade20k": ("sd-webui-controlnet uniformer", build_uniformer),
    "depth_zoe": ("controlnet_aux ZoeDetector", build_zoe),
}


# ----------------------------------------------------------------------------- sdctl
def sdctl(a, args, timeout=3600):
    """Runs sdctl; waits (up to --wait seconds) while the binary is missing or being replaced."""
    deadline = time.time() + a.wait
    while True:
        if a.sdctl.exists():
            mtime = a.sdctl.stat().st_mtime
            try:
                p = subprocess.run([str(a.sdctl), *args], capture_output=True, text=True,
                                   timeout=timeout)
            except OSError as e:  # ETXTBSY / ENOENT while it is rebuilt
                err = str(e)
            else:
                if p.returncode == 0 or (a.sdctl.exists() and a.sdctl.stat().st_mtime == mtime):
                    return p, mtime
                err = "binary replaced during the run"
        else:
            err = "binary missing"
        if time.time() > deadline:
            raise RuntimeError(f"sdctl unavailable: {err}")
        log(f"  sdctl: {err}; waiting")
        time.sleep(15)


def sdctl_names(a):
    p, _ = sdctl(a, ["preprocessors", "list"])
    return {line.split()[0] for line in p.stdout.splitlines() if line and not line[0].isspace()}


def param_args(ref):
    out = []
    for k, v in ref.params.items():
        out += ["--param", f"{k}={v}"]
    return out


def time_sdctl(a, name, ref, image):
    js = a.out / "runs" / f"{name}.json"
    js.parent.mkdir(exist_ok=True)
    if js.exists():
        js.unlink()
    p, mtime = sdctl(a, ["bench", "annotator", name, str(image), "--resolution", str(RES),
                         "--iters", str(a.iters), *param_args(ref), "--json", str(js)])
    if p.returncode != 0:
        raise RuntimeError(f"sdctl bench failed ({p.returncode}): {p.stderr.strip()[-800:]}")
    r = json.loads(js.read_text())
    return {"first": r["first_seconds"], "mean": r["mean_seconds"], "min": r["min_seconds"],
            "size": f"{r['width']}x{r['height']}", "binary_mtime": mtime}


def check_sdctl(a, name, ref, image):
    out = a.out / "maps" / f"{name}_sdctl.png"
    args = ["detect", name, str(image), "-o", str(out), "--resolution", str(RES), *param_args(ref)]
    pose = None
    if name.startswith("openpose"):
        pose = a.out / "maps" / f"{name}_sdctl.json"
        args += ["--json", str(pose)]
    p, _ = sdctl(a, args)
    if p.returncode != 0:
        return {"error": f"sdctl detect failed: {p.stderr.strip()[-400:]}"}
    st = map_stats(cv2.cvtColor(cv2.imread(str(out)), cv2.COLOR_BGR2RGB))
    if pose is not None:
        people = json.loads(pose.read_text()).get("people", [])
        st["people"] = len(people)
        st["hands"] = sum(bool(q.get(k)) for q in people
                          for k in ("hand_left_keypoints_2d", "hand_right_keypoints_2d"))
        st["faces"] = sum(bool(q.get("face_keypoints_2d")) for q in people)
    return st


# ----------------------------------------------------------------------------- PyTorch
def time_torch(a, ref, img):
    with torch.no_grad():
        t = time.perf_counter()
        ref.call(img.copy())  # warm-up
        warm = time.perf_counter() - t
        ts = []
        for _ in range(a.iters):
            x = img.copy()
            t = time.perf_counter()
            ref.call(x)
            ts.append(time.perf_counter() - t)
    return {"warmup": warm, "mean": float(np.mean(ts)), "min": float(np.min(ts)), "times": ts}


# ----------------------------------------------------------------------------- one annotator
def bench_one(a, name, img, image_path, known):
    reference, builder = ANNOTATORS[name]
    res = {"annotator": name, "reference": reference, "image": image_path.name,
           "image_size": f"{img.shape[1]}x{img.shape[0]}", "resolution": RES,
           "rounds": a.rounds, "iters": a.iters, "torch_threads": torch.get_num_threads()}
    log(f"== {name}: building the reference ({reference})")
    t = time.perf_counter()
    try:
        ref = builder(a)
    except Exception as e:  # noqa: BLE001 - reported, the others go on
        traceback.print_exc()
        res["error"] = f"reference not built: {type(e).__name__}: {e}"
        return res
    res["build_seconds"] = round(time.perf_counter() - t, 1)
    res["weights"] = {k: str(v) for k, v in ref.params.items()}
    if ref.note:
        res["reference_note"] = ref.note
    has_sdctl = name in known
    if not has_sdctl:
        res["sdctl_missing"] = f"`sdctl preprocessors list` has no {name}"
    rounds = {"sdctl": [], "torch": []}
    for r in range(a.rounds):
        order = ["sdctl", "torch"] if r % 2 == 0 else ["torch", "sdctl"]
        for who in order:
            if who == "sdctl":
                if not has_sdctl or "sdctl_error" in res:
                    continue
                try:
                    s = time_sdctl(a, name, ref, image_path)
                except RuntimeError as e:
                    res["sdctl_error"] = str(e)
                    log(f"  sdctl: {e}")
                    continue
                rounds["sdctl"].append(s)
                log(f"  round {r} sdctl: mean {s['mean']:.3f} s, min {s['min']:.3f} s, "
                    f"first {s['first']:.3f} s")
            else:
                tt = time_torch(a, ref, img)
                rounds["torch"].append(tt)
                log(f"  round {r} torch: mean {tt['mean']:.3f} s, min {tt['min']:.3f} s, "
                    f"warm-up {tt['warmup']:.3f} s")
    res["rounds_detail"] = rounds
    if rounds["torch"]:
        res["torch_mean"] = float(np.mean([x["mean"] for x in rounds["torch"]]))
        res["torch_min"] = float(min(x["min"] for x in rounds["torch"]))
    if rounds["sdctl"]:
        res["sdctl_mean"] = float(np.mean([x["mean"] for x in rounds["sdctl"]]))
        res["sdctl_min"] = float(min(x["min"] for x in rounds["sdctl"]))
        res["sdctl_first"] = [x["first"] for x in rounds["sdctl"]]
        if len({x["binary_mtime"] for x in rounds["sdctl"]}) > 1:
            res["sdctl_note"] = "the sdctl binary was rebuilt between rounds"
    if "torch_mean" in res and "sdctl_mean" in res:
        res["ratio_mean"] = res["sdctl_mean"] / res["torch_mean"]
        res["ratio_min"] = res["sdctl_min"] / res["torch_min"]
    # the outputs: non-empty, not constant
    with torch.no_grad():
        out = as_array(ref.call(img.copy()))
        res["torch_output"] = map_stats(out)
        write_map(a.out / "maps" / f"{name}_torch.png", out)
        if ref.extra:
            res["torch_output"].update(ref.extra(img.copy()))
    if has_sdctl and a.check and "sdctl_error" not in res:
        res["sdctl_output"] = check_sdctl(a, name, ref, image_path)
    return res


# ----------------------------------------------------------------------------- report
def fmt(v, nd=2):
    return "–" if v is None else f"{v:.{nd}f}"


def table(results):
    lines = ["| annotator | image size | sdctl s | PyTorch s | ratio |",
             "|---|---|---:|---:|---:|"]
    for r in results:
        sd = r.get("sdctl_mean")
        ratio = r.get("ratio_mean")
        sd_cell = fmt(sd) if sd is not None else ("missing" if "sdctl_missing" in r else "error")
        pt_cell = fmt(r.get("torch_mean")) if "torch_mean" in r else "not built"
        lines.append(f"| {r['annotator']} | {r['image_size']} | {sd_cell} | {pt_cell} | "
                     f"{fmt(ratio) if ratio is not None else '–'} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sdctl", type=Path, default=ROOT / "target" / "release" / "sdctl")
    ap.add_argument("--out", type=Path, default=Path("/tmp/annot_bench"),
                    help="weights, the test image, maps and per-run JSON (reused)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--iters", type=int, default=2, help="timed runs per round and side")
    ap.add_argument("--size", default="512x512", help="test image WxH (short side 512)")
    ap.add_argument("--only", default="", help="comma-separated annotators")
    ap.add_argument("--skip", default="", help="comma-separated annotators")
    ap.add_argument("--json", type=Path, default=None, help="summary (default OUT/summary.json)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other annotators' entries of an existing --json file")
    ap.add_argument("--no-check", dest="check", action="store_false",
                    help="skip the one `sdctl detect` run per annotator that checks its output")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--wait", type=float, default=900,
                    help="seconds to wait for a missing / rebuilt sdctl binary")
    ap.add_argument("--webui", type=Path, default=MIRROR / "Mikubill+sd-webui-controlnet" / "repo")
    ap.add_argument("--da2", type=Path, default=MIRROR / "DepthAnything+Depth-Anything-V2" / "repo")
    a = ap.parse_args()
    a.sdctl = a.sdctl.resolve()
    only = [s for s in a.only.split(",") if s]
    skip = {s for s in a.skip.split(",") if s}
    for s in [*only, *skip]:
        if s not in ANNOTATORS:
            ap.error(f"unknown annotator {s!r}; known: {', '.join(ANNOTATORS)}")
    names = [n for n in ANNOTATORS if (not only or n in only) and n not in skip]
    a.json = a.json or a.out / "summary.json"
    (a.out / "maps").mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    controlnet_aux_ns()
    w, h = (int(v) for v in a.size.split("x"))
    img = test_image(w, h)
    a.img = img
    image_path = a.out / "image.png"
    cv2.imwrite(str(image_path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    known = sdctl_names(a)
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads; image {image_path} "
        f"{w}x{h}; sdctl {a.sdctl}")

    prior = []
    if a.merge and a.json.exists():
        prior = [r for r in json.loads(a.json.read_text()).get("results", [])
                 if r["annotator"] not in names]
    results, allres = [], prior
    for name in names:
        r = bench_one(a, name, img, image_path, known)
        results.append(r)
        msg = f"{name}: sdctl {fmt(r.get('sdctl_mean'), 3)} s, PyTorch {fmt(r.get('torch_mean'), 3)} s"
        if "ratio_mean" in r:
            msg += f", ratio {r['ratio_mean']:.2f} (min/min {r['ratio_min']:.2f})"
        for k in ("error", "sdctl_missing", "sdctl_error"):
            if k in r:
                msg += f" [{r[k]}]"
        for side in ("torch_output", "sdctl_output"):
            if r.get(side, {}).get("degenerate"):
                msg += f" [{side}: {r[side]['degenerate']}]"
        print(msg, flush=True)
        order = {n: i for i, n in enumerate(ANNOTATORS)}
        allres = sorted(prior + results, key=lambda x: order.get(x["annotator"], 99))
        a.json.write_text(json.dumps({
            "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                        "torch_threads": torch.get_num_threads(), "sdctl": str(a.sdctl)},
            "results": allres}, indent=1) + "\n")
        del r
        if _WEBUI:  # the webui modules' globals hold their models
            _WEBUI["U"].model = None
            _WEBUI["ns2"]["model_manga_line"] = None
        gc.collect()
    print()
    print(table(allres))
    log(f"summary: {a.json}")


if __name__ == "__main__":
    main()
