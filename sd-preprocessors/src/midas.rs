//! `depth_midas` and `normal_midas`: MiDaS v3 DPT-Hybrid (`dpt_hybrid-midas-501f0c75.pt` from
//! lllyasviel/Annotators) as controlnet_aux 0.0.10's `MidasDetector` runs it (the same body as
//! sd-webui-controlnet's `depth_midas` / `normal_midas`).
//!
//! The network is controlnet_aux's `DPTDepthModel(backbone="vitb_rn50_384",
//! non_negative=True)`:
//! - timm's `vit_base_resnet50_384` hybrid: a BiT ResNetV2 stem (`StdConv2dSame`: weights
//!   standardised per output channel with eps 1e-8, TensorFlow "SAME" padding; GroupNorm(32)
//!   and ReLU; a 3x3 stride-2 "SAME" max pool), bottleneck stages of [3, 4, 9] blocks (256, 512,
//!   1024 channels, strides 1, 2, 2), a 1x1 projection to 768, the class token and the 24x24
//!   position embedding resized to the 1/16 grid (`_resize_pos_embed`: bilinear,
//!   align_corners=False; Depth Anything's DINOv2 resizes bicubically with an offset, so this is
//!   another function), 12 ViT-B blocks ([`crate::depth_anything`]'s block);
//! - the DPT reassembly: ResNet stages 1 and 2 as they are, the outputs of blocks 8 and 11
//!   through the "project" readout (`Linear(1536, 768)` of each token joined with the class
//!   token, then GELU), a 1x1 conv, and for block 11 a 3x3 stride-2 conv;
//! - `scratch`: 3x3 convs to 256 channels, four fusion blocks ([`crate::depth_anything`]'s:
//!   `FeatureFusionBlock_custom(bn=False, expand=False, align_corners=True)`), and the head
//!   (3x3 conv to 128, x2 bilinear with aligned corners, 3x3 conv to 32, ReLU, 1x1 conv, ReLU).
//!
//! The detector (controlnet_aux `MidasDetector.__call__`): the image at the processor
//! resolution (done by [`crate::detect`]: `resize_image`, sides multiples of 64; with `pad`
//! sd-webui-controlnet's `resize_image_with_pad`), `x / 127.5 - 1` in RGB, no other resizing or
//! normalisation, the network, then `d -= min; d /= max; u8(clip(d * 255))` (truncated): near is
//! white, not inverted. The network needs sides that are multiples of 32 (the reference fails
//! on others); other sizes are edge-padded and the map cropped back. `normal_midas` is the same
//! run with `depth_and_normal=True` ([`crate::normal::normal_from_depth`] on the raw depth:
//! Sobel, background below `bg_threshold` flattened, `[z, y, x]`), default `bg_threshold` 0.4
//! as sd-webui-controlnet's slider (controlnet_aux's function default is 0.1).
//!
//! Weights: the state dict's own names (`pretrained.model.patch_embed.backbone.stem.conv
//! .weight`, `pretrained.act_postprocess3.0.project.0.weight`, `scratch.refinenet4...`),
//! from `dpt_hybrid-midas-501f0c75.pt` (read without running pickle code; a `{"model": ...}`
//! wrapper is unwrapped as MiDaS's `BaseModel.load` does) or a `.safetensors` with the same
//! keys.

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{linear, Linear, VarBuilder};
use sd_pipeline::cpu::activation::gelu_erf as gelu;
use sd_plugins_api::{
    hwc3, register_preprocessor, ImageBuf, ParamSpec, Params, PluginError, Preprocessor,
};

use crate::conv::{for_each_unit, Conv2d, Geometry};
use crate::depth_anything::{depth_to_grey, Block, FusionBlock};
use crate::lineart::{cached, grey_map, model_param, rgb_tensor, top_left};

/// The weight files looked for in the annotator folder.
pub const WEIGHT_FILES: [&str; 2] = [
    "dpt_hybrid-midas-501f0c75.pt",
    "dpt_hybrid-midas-501f0c75.safetensors",
];
/// The network's input sides must be multiples of this.
pub const MULTIPLE: usize = 32;

const WIDTH: usize = 768;
const HEADS: usize = 12;
const MLP: usize = 3072;
const DEPTH: usize = 12;
/// The ViT blocks whose outputs feed the head (`hooks[2..]` of `vitb_rn50_384`).
const HOOKS: [usize; 2] = [8, 11];
const FEATURES: usize = 256;
/// GroupNorm groups and eps of the ResNet stem.
const GROUPS: usize = 32;
const GN_EPS: f64 = 1e-5;
/// `StdConv2dSame(eps=1e-8)` of `_resnetv2`.
const WS_EPS: f64 = 1e-8;
/// The ResNet stages: blocks, output channels, stride.
const STAGES: [(usize, usize, usize); 3] = [(3, 256, 1), (4, 512, 2), (9, 1024, 2)];
const ROOT: &str = "pretrained.model";
const BACKBONE: &str = "pretrained.model.patch_embed.backbone";

/// timm's `StdConv2dSame` (no bias): the weight standardised per output channel (statistics in
/// f64, biased variance, eps 1e-8, as `F.batch_norm(training=True)` computes them), with
/// TensorFlow "SAME" padding, which for sides divisible by the stride is `k - stride` split
/// with the larger half after (`pad_same`; stride 1 is timm's static `k / 2`).
fn std_conv(
    vb: &VarBuilder,
    inputs: usize,
    outputs: usize,
    k: usize,
    stride: usize,
) -> Result<Conv2d> {
    let w = vb.get((outputs, inputs, k, k), "weight")?;
    let mut v = w.flatten_all()?.to_vec1::<f32>()?;
    let per = inputs * k * k;
    for row in v.chunks_exact_mut(per) {
        let mean = row.iter().map(|&a| a as f64).sum::<f64>() / per as f64;
        let var = row.iter().map(|&a| (a as f64 - mean).powi(2)).sum::<f64>() / per as f64;
        let invstd = 1.0 / (var + WS_EPS).sqrt();
        for a in row {
            *a = ((*a as f64 - mean) * invstd) as f32;
        }
    }
    let w = Tensor::from_vec(v, (outputs, inputs, k, k), &Device::Cpu)?;
    let total = k.saturating_sub(stride);
    let geo = Geometry {
        stride,
        pad: (total / 2, total - total / 2),
        dilation: 1,
    };
    Conv2d::new(&w, None, geo)
}

/// A plain `nn.Conv2d` `{vb}.weight` (`[outputs, inputs, k, k]`) with its bias when `bias`
/// (also ZoeDepth's, [`crate::zoe`]).
pub(crate) fn conv(
    vb: &VarBuilder,
    inputs: usize,
    outputs: usize,
    k: usize,
    geo: Geometry,
    bias: bool,
) -> Result<Conv2d> {
    let w = vb.get((outputs, inputs, k, k), "weight")?;
    let b = if bias {
        Some(vb.get(outputs, "bias")?)
    } else {
        None
    };
    Conv2d::new(&w, b.as_ref(), geo)
}

/// timm's `GroupNormAct` (32 groups, eps 1e-5, then ReLU when `relu`).
struct GroupNorm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

impl GroupNorm {
    fn new(vb: &VarBuilder, c: usize) -> Result<Self> {
        Ok(Self {
            gamma: vb.get(c, "weight")?.to_vec1()?,
            beta: vb.get(c, "bias")?.to_vec1()?,
        })
    }

    /// Statistics in f64 per (image, group); `x * (rstd * gamma) + (beta - mean * rstd *
    /// gamma)` per channel, as PyTorch's CPU kernel applies it.
    fn forward(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        if c != self.gamma.len() || c % GROUPS != 0 {
            candle_core::bail!("group norm of {} channels on {c}", self.gamma.len());
        }
        let hw = h * w;
        let per = c / GROUPS;
        let mut v = x.flatten_all()?.to_vec1::<f32>()?;
        for_each_unit(&mut v, per * hw, n * c * hw * 4, |i, group| {
            let len = group.len() as f64;
            let mean = group.iter().map(|&a| a as f64).sum::<f64>() / len;
            let var = group
                .iter()
                .map(|&a| (a as f64 - mean).powi(2))
                .sum::<f64>()
                / len;
            let rstd = 1.0 / (var + GN_EPS).sqrt();
            let first = (i % GROUPS) * per;
            for (j, plane) in group.chunks_exact_mut(hw).enumerate() {
                let s = rstd * self.gamma[first + j] as f64;
                let (s, b) = (s as f32, (self.beta[first + j] as f64 - mean * s) as f32);
                for a in plane {
                    let y = *a * s + b;
                    *a = if relu { y.max(0.0) } else { y };
                }
            }
        });
        Tensor::from_vec(v, (n, c, h, w), x.device())
    }
}

/// A standardised conv and its group norm.
struct ConvNorm {
    conv: Conv2d,
    norm: GroupNorm,
}

impl ConvNorm {
    fn forward(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        self.norm.forward(&self.conv.forward(x)?, relu)
    }
}

/// timm's non-pre-activation `Bottleneck` (ResNet v1.5: the stride on the 3x3 conv).
struct Bottleneck {
    downsample: Option<ConvNorm>,
    c1: ConvNorm,
    c2: ConvNorm,
    c3: ConvNorm,
}

impl Bottleneck {
    fn new(
        vb: &VarBuilder,
        inputs: usize,
        outputs: usize,
        stride: usize,
        first: bool,
    ) -> Result<Self> {
        let mid = outputs / 4;
        let cn =
            |name: &str, i: usize, o: usize, k: usize, s: usize, norm: &str| -> Result<ConvNorm> {
                Ok(ConvNorm {
                    conv: std_conv(&vb.pp(name), i, o, k, s)?,
                    norm: GroupNorm::new(&vb.pp(norm), o)?,
                })
            };
        Ok(Self {
            downsample: if first {
                Some(cn(
                    "downsample.conv",
                    inputs,
                    outputs,
                    1,
                    stride,
                    "downsample.norm",
                )?)
            } else {
                None
            },
            c1: cn("conv1", inputs, mid, 1, 1, "norm1")?,
            c2: cn("conv2", mid, mid, 3, stride, "norm2")?,
            c3: cn("conv3", mid, outputs, 1, 1, "norm3")?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let shortcut = match &self.downsample {
            Some(d) => d.forward(x, false)?,
            None => x.clone(),
        };
        let y = self.c1.forward(x, true)?;
        let y = self.c2.forward(&y, true)?;
        let y = self.c3.forward(&y, false)?;
        (y + shortcut)?.relu()
    }
}

/// timm's `MaxPool2dSame(3, stride 2)` of sides that are even: the padding (one row and column
/// after) is -inf, so a window takes the maximum of the values inside.
fn max_pool_same(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (oh, ow) = (h.div_ceil(2), w.div_ceil(2));
    let src = x.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; n * c * oh * ow];
    for (plane, dst) in src.chunks_exact(h * w).zip(out.chunks_exact_mut(oh * ow)) {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut m = f32::NEG_INFINITY;
                for y in 2 * oy..(2 * oy + 3).min(h) {
                    for xx in 2 * ox..(2 * ox + 3).min(w) {
                        m = m.max(plane[y * w + xx]);
                    }
                }
                dst[oy * ow + ox] = m;
            }
        }
    }
    Tensor::from_vec(out, (n, c, oh, ow), x.device())
}

/// torch's `F.interpolate(mode="bilinear", align_corners=False)` of an `h x w x c` (HWC) grid to
/// `oh x ow` (`size=` given: source `max((d + 0.5) * in / out - 0.5, 0)`, the upper index
/// clamped), in f32 as torch's CPU kernel.
pub fn bilinear_hwc(src: &[f32], h: usize, w: usize, c: usize, oh: usize, ow: usize) -> Vec<f32> {
    let (ty, tx) = (bilinear_taps(h, oh), bilinear_taps(w, ow));
    let mut out = vec![0f32; oh * ow * c];
    for (oy, &(y0, y1, wy0, wy1)) in ty.iter().enumerate() {
        for (ox, &(x0, x1, wx0, wx1)) in tx.iter().enumerate() {
            let at = |y: usize, x: usize| &src[(y * w + x) * c..(y * w + x + 1) * c];
            let (a, b, cc, d) = (at(y0, x0), at(y0, x1), at(y1, x0), at(y1, x1));
            let o = &mut out[(oy * ow + ox) * c..(oy * ow + ox + 1) * c];
            for i in 0..c {
                o[i] = wy0 * (wx0 * a[i] + wx1 * b[i]) + wy1 * (wx0 * cc[i] + wx1 * d[i]);
            }
        }
    }
    out
}

/// The taps of [`bilinear_hwc`] along one axis of `n` inputs and `o` outputs: per output
/// `(i0, i1, weight0, weight1)`.
pub fn bilinear_taps(n: usize, o: usize) -> Vec<(usize, usize, f32, f32)> {
    let scale = n as f32 / o as f32;
    (0..o)
        .map(|d| {
            let real = (scale * (d as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (real as usize).min(n - 1);
            let i1 = if i0 < n - 1 { i0 + 1 } else { i0 };
            let l1 = real - i0 as f32;
            (i0, i1, 1.0 - l1, l1)
        })
        .collect()
}

/// Every tensor the network reads, with its shape (the file also holds the unused ImageNet
/// classifier `pretrained.model.head.*`, the final ViT norm and `refinenet4.resConfUnit1`'s
/// convolutions; the last are read and unused, as in the reference).
pub fn parameter_shapes() -> Vec<(String, Vec<usize>)> {
    let mut v: Vec<(String, Vec<usize>)> = Vec::new();
    let mut add = |n: String, s: &[usize]| v.push((n, s.to_vec()));
    let bb = BACKBONE;
    let conv_norm = |add: &mut dyn FnMut(String, &[usize]), c: &str, n: &str, o, i, k| {
        add(format!("{c}.weight"), &[o, i, k, k]);
        add(format!("{n}.weight"), &[o]);
        add(format!("{n}.bias"), &[o]);
    };
    conv_norm(
        &mut add,
        &format!("{bb}.stem.conv"),
        &format!("{bb}.stem.norm"),
        64,
        3,
        7,
    );
    let mut inputs = 64;
    for (si, &(blocks, outputs, _)) in STAGES.iter().enumerate() {
        let mid = outputs / 4;
        for bi in 0..blocks {
            let p = format!("{bb}.stages.{si}.blocks.{bi}");
            let i = if bi == 0 { inputs } else { outputs };
            if bi == 0 {
                let (c, n) = (
                    format!("{p}.downsample.conv"),
                    format!("{p}.downsample.norm"),
                );
                conv_norm(&mut add, &c, &n, outputs, i, 1);
            }
            conv_norm(
                &mut add,
                &format!("{p}.conv1"),
                &format!("{p}.norm1"),
                mid,
                i,
                1,
            );
            conv_norm(
                &mut add,
                &format!("{p}.conv2"),
                &format!("{p}.norm2"),
                mid,
                mid,
                3,
            );
            conv_norm(
                &mut add,
                &format!("{p}.conv3"),
                &format!("{p}.norm3"),
                outputs,
                mid,
                1,
            );
        }
        inputs = outputs;
    }
    let conv_b = |add: &mut dyn FnMut(String, &[usize]), p: &str, o, i, k| {
        add(format!("{p}.weight"), &[o, i, k, k]);
        add(format!("{p}.bias"), &[o]);
    };
    conv_b(
        &mut add,
        &format!("{ROOT}.patch_embed.proj"),
        WIDTH,
        1024,
        1,
    );
    add(format!("{ROOT}.cls_token"), &[1, 1, WIDTH]);
    add(format!("{ROOT}.pos_embed"), &[1, 577, WIDTH]);
    for i in 0..DEPTH {
        let p = format!("{ROOT}.blocks.{i}");
        for (n, o, inp) in [
            ("attn.qkv", 3 * WIDTH, WIDTH),
            ("attn.proj", WIDTH, WIDTH),
            ("mlp.fc1", MLP, WIDTH),
            ("mlp.fc2", WIDTH, MLP),
        ] {
            add(format!("{p}.{n}.weight"), &[o, inp]);
            add(format!("{p}.{n}.bias"), &[o]);
        }
        for n in ["norm1", "norm2"] {
            add(format!("{p}.{n}.weight"), &[WIDTH]);
            add(format!("{p}.{n}.bias"), &[WIDTH]);
        }
    }
    for i in [3, 4] {
        let p = format!("pretrained.act_postprocess{i}");
        add(format!("{p}.0.project.0.weight"), &[WIDTH, 2 * WIDTH]);
        add(format!("{p}.0.project.0.bias"), &[WIDTH]);
        conv_b(&mut add, &format!("{p}.3"), WIDTH, WIDTH, 1);
    }
    conv_b(&mut add, "pretrained.act_postprocess4.4", WIDTH, WIDTH, 3);
    for (i, c) in [256, 512, WIDTH, WIDTH].into_iter().enumerate() {
        add(
            format!("scratch.layer{}_rn.weight", i + 1),
            &[FEATURES, c, 3, 3],
        );
    }
    for i in 1..=4 {
        let p = format!("scratch.refinenet{i}");
        conv_b(&mut add, &format!("{p}.out_conv"), FEATURES, FEATURES, 1);
        for r in 1..=2 {
            for c in 1..=2 {
                let n = format!("{p}.resConfUnit{r}.conv{c}");
                conv_b(&mut add, &n, FEATURES, FEATURES, 3);
            }
        }
    }
    conv_b(&mut add, "scratch.output_conv.0", FEATURES / 2, FEATURES, 3);
    conv_b(&mut add, "scratch.output_conv.2", 32, FEATURES / 2, 3);
    conv_b(&mut add, "scratch.output_conv.4", 1, 32, 1);
    v
}

/// The MiDaS DPT-Hybrid network.
pub struct MidasNet {
    stem_conv: Conv2d,
    stem_norm: GroupNorm,
    stages: Vec<Vec<Bottleneck>>,
    proj: Conv2d,
    cls_token: Tensor,
    /// The stored position embedding of the patch tokens, `side x side x 768` (HWC).
    pos_grid: Vec<f32>,
    pos_side: usize,
    /// The class token's position embedding `(1, 768)`.
    pos_cls: Tensor,
    blocks: Vec<Block>,
    /// `act_postprocess{3,4}.0.project.0`.
    readout: [Linear; 2],
    post3: Conv2d,
    post4: [Conv2d; 2],
    decoder: DptDecoder,
}

impl MidasNet {
    /// Load `dpt_hybrid-midas-501f0c75.pt` (or a safetensors file with its keys).
    pub fn load(path: &Path) -> std::result::Result<Self, String> {
        let key = format!("{ROOT}.pos_embed");
        let tensors = crate::weights::read_state_dict(
            path,
            &key,
            &format!("MiDaS DPT-Hybrid weights {}", WEIGHT_FILES[0]),
            |k| {
                // the ImageNet classifier and the unused final norm stay on disk
                (k.starts_with("pretrained.") || k.starts_with("scratch."))
                    && !k.starts_with("pretrained.model.head.")
            },
        )?;
        Self::from_tensors(tensors).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// From the state dict's tensors by name; a missing or misshapen tensor is an error naming
    /// it.
    pub fn from_tensors(tensors: HashMap<String, Tensor>) -> std::result::Result<Self, String> {
        let stem = format!("{BACKBONE}.stem.conv.weight");
        if !tensors.contains_key(&stem) {
            let large = tensors.contains_key(&format!("{ROOT}.patch_embed.proj.weight"));
            return Err(if large {
                format!(
                    "a ViT-only MiDaS (DPT-Large?): only DPT-Hybrid ({}) is supported",
                    WEIGHT_FILES[0]
                )
            } else {
                format!(
                    "no tensor `{stem}` (not the MiDaS DPT-Hybrid weights {}?)",
                    WEIGHT_FILES[0]
                )
            });
        }
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        Self::new(vb).map_err(|e| format!("{e} (not the MiDaS DPT-Hybrid weights?)"))
    }

    /// Build from a var builder rooted at the state dict's top level.
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let bb = vb.pp(BACKBONE);
        let stem_conv = std_conv(&bb.pp("stem.conv"), 3, 64, 7, 2)?;
        let stem_norm = GroupNorm::new(&bb.pp("stem.norm"), 64)?;
        let mut stages = Vec::new();
        let mut inputs = 64;
        for (si, &(blocks, outputs, stride)) in STAGES.iter().enumerate() {
            let mut stage = Vec::new();
            for bi in 0..blocks {
                let vbb = bb.pp(format!("stages.{si}.blocks.{bi}"));
                let (i, s) = if bi == 0 {
                    (inputs, stride)
                } else {
                    (outputs, 1)
                };
                stage.push(Bottleneck::new(&vbb, i, outputs, s, bi == 0)?);
            }
            stages.push(stage);
            inputs = outputs;
        }
        let root = vb.pp(ROOT);
        let proj = conv(
            &root.pp("patch_embed.proj"),
            1024,
            WIDTH,
            1,
            Geometry::default(),
            true,
        )?;
        let cls_token = root.get((1, 1, WIDTH), "cls_token")?;
        let pos = root.get_unchecked("pos_embed")?;
        let tokens = match pos.dims() {
            [1, n, d] if *d == WIDTH && *n > 1 => n - 1,
            s => {
                candle_core::bail!("{ROOT}.pos_embed has shape {s:?}, expected [1, 1 + N, {WIDTH}]")
            }
        };
        let pos_side = (tokens as f64).sqrt().round() as usize;
        if pos_side * pos_side != tokens {
            candle_core::bail!("{ROOT}.pos_embed: {tokens} patch positions are not a square grid");
        }
        let pos = pos.to_dtype(DType::F32)?.squeeze(0)?;
        let pos_cls = pos.narrow(0, 0, 1)?;
        let pos_grid = pos.narrow(0, 1, tokens)?.flatten_all()?.to_vec1::<f32>()?;
        let blocks = (0..DEPTH)
            .map(|i| Block::build(WIDTH, HEADS, MLP, false, root.pp(format!("blocks.{i}"))))
            .collect::<Result<_>>()?;
        let pre = vb.pp("pretrained");
        let readout = |i: usize| {
            linear(
                2 * WIDTH,
                WIDTH,
                pre.pp(format!("act_postprocess{i}.0.project.0")),
            )
        };
        let c1 = |name: &str| conv(&pre.pp(name), WIDTH, WIDTH, 1, Geometry::default(), true);
        let post4b = conv(
            &pre.pp("act_postprocess4.4"),
            WIDTH,
            WIDTH,
            3,
            Geometry::new(2, 1),
            true,
        )?;
        let decoder = DptDecoder::new(&vb.pp("scratch"), [256, 512, WIDTH, WIDTH])?;
        Ok(Self {
            stem_conv,
            stem_norm,
            stages,
            proj,
            cls_token,
            pos_grid,
            pos_side,
            pos_cls,
            blocks,
            readout: [readout(3)?, readout(4)?],
            post3: c1("act_postprocess3.3")?,
            post4: [c1("act_postprocess4.3")?, post4b],
            decoder,
        })
    }

    /// The position embeddings for a `gh x gw` token grid: `_resize_pos_embed` (always
    /// interpolated; at the stored size that is the identity), `(1 + gh * gw, 768)`.
    fn pos_embed(&self, gh: usize, gw: usize) -> Result<Tensor> {
        let s = self.pos_side;
        let grid = bilinear_hwc(&self.pos_grid, s, s, WIDTH, gh, gw);
        let grid = Tensor::from_vec(grid, (gh * gw, WIDTH), &Device::Cpu)?;
        Tensor::cat(&[&self.pos_cls, &grid], 0)
    }

    /// `ProjectReadout` then `Transpose(1, 2)` and `Unflatten`: `(B, 1 + N, 768)` ->
    /// `(B, 768, gh, gw)`.
    fn reassemble(&self, i: usize, x: &Tensor, gh: usize, gw: usize) -> Result<Tensor> {
        let (b, n1, d) = x.dims3()?;
        let n = n1 - 1;
        let cls = x.narrow(1, 0, 1)?.broadcast_as((b, n, d))?;
        let feats = Tensor::cat(&[&x.narrow(1, 1, n)?, &cls.contiguous()?], 2)?;
        gelu(&self.readout[i].forward(&feats)?)?
            .transpose(1, 2)?
            .reshape((b, d, gh, gw))
    }

    /// `DPTDepthModel.forward`: `(B, 3, H, W)` (RGB, `x / 127.5 - 1`; H, W multiples of 32) ->
    /// the relu'd relative inverse depth `(B, H, W)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if c != 3 || h == 0 || w == 0 || h % MULTIPLE != 0 || w % MULTIPLE != 0 {
            candle_core::bail!(
                "MiDaS input {:?}: 3 channels and sides that are multiples of {MULTIPLE} needed",
                x.dims()
            );
        }
        let x = x.to_dtype(DType::F32)?;
        let y = self.stem_norm.forward(&self.stem_conv.forward(&x)?, true)?;
        let mut y = max_pool_same(&y)?;
        let mut layers = Vec::with_capacity(4);
        for stage in &self.stages {
            for blk in stage {
                y = blk.forward(&y)?;
            }
            layers.push(y.clone());
        }
        let (gh, gw) = (h / 16, w / 16);
        let tokens = self
            .proj
            .forward(&layers[2])?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let cls = self.cls_token.broadcast_as((b, 1, WIDTH))?;
        let t = Tensor::cat(&[&cls, &tokens], 1)?;
        let mut t = t.broadcast_add(&self.pos_embed(gh, gw)?.unsqueeze(0)?)?;
        let mut hooked = Vec::with_capacity(2);
        for (i, blk) in self.blocks.iter().enumerate() {
            t = blk.forward(&t)?;
            if HOOKS.contains(&i) {
                hooked.push(t.clone());
            }
        }
        let l3 = self
            .post3
            .forward(&self.reassemble(0, &hooked[0], gh, gw)?)?;
        let l4 = self.reassemble(1, &hooked[1], gh, gw)?;
        let l4 = self.post4[1].forward(&self.post4[0].forward(&l4)?)?;
        let feats = [layers[0].clone(), layers[1].clone(), l3, l4];
        self.decoder.forward(&feats, false)?.rel.squeeze(1)
    }
}

/// The DPT decoder under `scratch.` (MiDaS's `_make_scratch`, four `FeatureFusionBlock_custom`
/// and the `output_conv` head), shared by MiDaS and ZoeDepth.
pub(crate) struct DptDecoder {
    layer_rn: Vec<Conv2d>,
    refine: Vec<FusionBlock>,
    head: [Conv2d; 3],
}

/// What the decoder gives: the relu'd relative depth `(B, 1, H, W)`, the head's 32-channel
/// ReLU output, `layer4_rn`'s output and the four fusion outputs (deepest first).
pub(crate) struct DptOutput {
    pub rel: Tensor,
    pub out_conv: Tensor,
    pub rn4: Tensor,
    pub paths: Vec<Tensor>,
}

impl DptDecoder {
    /// `widths`: the channels of the four backbone features.
    pub(crate) fn new(scratch: &VarBuilder, widths: [usize; 4]) -> Result<Self> {
        let g3 = Geometry::new(1, 1);
        let layer_rn = widths
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                conv(
                    &scratch.pp(format!("layer{}_rn", i + 1)),
                    c,
                    FEATURES,
                    3,
                    g3,
                    false,
                )
            })
            .collect::<Result<_>>()?;
        let refine = (1..=4)
            .map(|i| FusionBlock::new(FEATURES, scratch.pp(format!("refinenet{i}"))))
            .collect::<Result<_>>()?;
        let out = scratch.pp("output_conv");
        let head = [
            conv(&out.pp("0"), FEATURES, FEATURES / 2, 3, g3, true)?,
            conv(&out.pp("2"), FEATURES / 2, 32, 3, g3, true)?,
            conv(&out.pp("4"), 32, 1, 1, Geometry::default(), true)?,
        ];
        Ok(Self {
            layer_rn,
            refine,
            head,
        })
    }

    /// The four backbone features through the decoder. `sized`: each fusion output is resized
    /// to the next feature's size (MiDaS v3.1, as ZoeDepth runs it) instead of doubled.
    pub(crate) fn forward(&self, feats: &[Tensor], sized: bool) -> Result<DptOutput> {
        let rn: Vec<Tensor> = feats
            .iter()
            .zip(&self.layer_rn)
            .map(|(f, c)| c.forward(f))
            .collect::<Result<_>>()?;
        let size = |i: usize| -> Result<Option<(usize, usize)>> {
            if !sized {
                return Ok(None);
            }
            let (_, _, h, w) = rn[i].dims4()?;
            Ok(Some((h, w)))
        };
        let p4 = self.refine[3].forward(&rn[3], None, size(2)?)?;
        let p3 = self.refine[2].forward(&p4, Some(&rn[2]), size(1)?)?;
        let p2 = self.refine[1].forward(&p3, Some(&rn[1]), size(0)?)?;
        let p1 = self.refine[0].forward(&p2, Some(&rn[0]), None)?;
        let out = self.head[0].forward(&p1)?;
        let (_, _, oh, ow) = out.dims4()?;
        let out = out.upsample_bilinear2d(2 * oh, 2 * ow, true)?;
        let out_conv = self.head[1].forward(&out)?.relu()?;
        let rel = self.head[2].forward(&out_conv)?.relu()?;
        Ok(DptOutput {
            rel,
            out_conv,
            rn4: rn[3].clone(),
            paths: vec![p4, p3, p2, p1],
        })
    }
}

/// The memory a run on a `w x h` input needs, checked first: per pixel the head's full-size
/// 128- and 32-channel maps with their copies (about 2 KB), plus the attention scores and their
/// softmax of 12 heads over `N = w * h / 256` tokens (`96 N^2` bytes, `0.375 N` per pixel).
fn check_memory(name: &str, w: usize, h: usize) -> std::result::Result<(), String> {
    let tokens = (w * h / 256) as f64;
    let cost = sd_plugins_api::memory::Cost {
        per_pixel: 2048.0 + 0.375 * tokens,
        fixed: 64 << 20,
        peak: "MiDaS's full-size head maps and ViT attention".into(),
    };
    sd_plugins_api::memory::check(name, w, h, 1, 64, &cost)
}

/// The raw network output (relu'd inverse depth, larger = nearer) at the image's size, for an
/// image already at the processor resolution (any channel count): RGB `x / 127.5 - 1`,
/// edge-padded to multiples of 32 when it is not, the padding cropped off the output.
pub fn raw_depth(net: &MidasNet, input: &ImageBuf) -> std::result::Result<Vec<f32>, String> {
    let rgb = hwc3(input);
    let (w, h) = (rgb.width, rgb.height);
    if w == 0 || h == 0 {
        return Err("empty image".into());
    }
    let (pw, ph) = (
        w.div_ceil(MULTIPLE) * MULTIPLE,
        h.div_ceil(MULTIPLE) * MULTIPLE,
    );
    check_memory("MiDaS input", pw, ph)?;
    let padded = if (pw, ph) == (w, h) {
        rgb
    } else {
        crate::normalbae::pad_edge(&rgb, pw, ph)
    };
    let run = || -> Result<Vec<f32>> {
        let x = rgb_tensor(&padded, |v| v as f32 / 127.5 - 1.0)?;
        top_left(&net.forward(&x)?.unsqueeze(1)?, w, h)
    };
    run().map_err(|e| e.to_string())
}

/// What `depth_midas` makes of an image at the processor resolution: the min-max depth map
/// (near = white), grey in three channels.
pub fn depth_map(net: &MidasNet, input: &ImageBuf) -> std::result::Result<ImageBuf, String> {
    let d = raw_depth(net, input)?;
    Ok(grey_map(input.width, input.height, depth_to_grey(&d)))
}

/// What `normal_midas` makes of an image at the processor resolution.
pub fn normal_map(
    net: &MidasNet,
    input: &ImageBuf,
    a: f32,
    bg_threshold: f32,
) -> std::result::Result<ImageBuf, String> {
    let d = raw_depth(net, input)?;
    let (w, h) = (input.width, input.height);
    Ok(ImageBuf {
        width: w,
        height: h,
        channels: 3,
        data: crate::normal::normal_from_depth(&d, w, h, a, bg_threshold),
    })
}

type Cache = std::sync::Mutex<HashMap<std::path::PathBuf, std::sync::Arc<MidasNet>>>;
static CACHE: OnceLock<Cache> = OnceLock::new();

/// The network of `path`, loaded once per file per process (shared by both preprocessors).
pub fn cached_model(path: &Path) -> std::result::Result<std::sync::Arc<MidasNet>, String> {
    cached(&CACHE, path, MidasNet::load)
}

fn model(
    name: &str,
    params: &Params,
) -> std::result::Result<std::sync::Arc<MidasNet>, PluginError> {
    let path = crate::weights::find_weights(name, params, &WEIGHT_FILES)?;
    cached_model(&path).map_err(|e| PluginError::failed(name, e))
}

/// `depth_midas`.
pub struct DepthMidas;

impl Preprocessor for DepthMidas {
    fn name(&self) -> &str {
        "depth_midas"
    }
    fn description(&self) -> &str {
        "MiDaS DPT-Hybrid relative depth (near = white; controlnet_aux MidasDetector = \
         sd-webui-controlnet depth_midas, dpt_hybrid-midas-501f0c75.pt)"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![model_param(&WEIGHT_FILES)]
    }
    fn cache_salt(&self, params: &Params) -> std::result::Result<String, PluginError> {
        crate::weights::weights_salt(self.name(), params, &WEIGHT_FILES)
    }
    fn process(
        &self,
        input: &ImageBuf,
        params: &Params,
    ) -> std::result::Result<ImageBuf, PluginError> {
        let name = self.name();
        let net = model(name, params)?;
        depth_map(&net, input).map_err(|e| PluginError::failed(name, e))
    }
}

/// `normal_midas`.
pub struct NormalMidas;

impl Preprocessor for NormalMidas {
    fn name(&self) -> &str {
        "normal_midas"
    }
    fn description(&self) -> &str {
        "normal map from MiDaS DPT-Hybrid depth (ControlNet 1.0 normal; controlnet_aux \
         MidasDetector depth_and_normal = sd-webui-controlnet normal_midas)"
    }
    fn params(&self) -> Vec<ParamSpec> {
        let mut specs = vec![model_param(&WEIGHT_FILES)];
        specs.extend(crate::normal::normal_params());
        specs
    }
    fn cache_salt(&self, params: &Params) -> std::result::Result<String, PluginError> {
        crate::weights::weights_salt(self.name(), params, &WEIGHT_FILES)
    }
    fn process(
        &self,
        input: &ImageBuf,
        params: &Params,
    ) -> std::result::Result<ImageBuf, PluginError> {
        let name = self.name();
        let (a, th) = crate::normal::normal_settings(params);
        let net = model(name, params)?;
        normal_map(&net, input, a, th).map_err(|e| PluginError::failed(name, e))
    }
}

register_preprocessor!(DepthMidas);
register_preprocessor!(NormalMidas);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bilinear_matches_torch_on_small_grids() {
        // F.interpolate(arange(4).reshape(1,1,2,2), size=(3, 4), mode="bilinear")
        let src = [0.0, 1.0, 2.0, 3.0];
        let out = bilinear_hwc(&src, 2, 2, 1, 3, 4);
        let want = [
            0.0, 0.25, 0.75, 1.0, 1.0, 1.25, 1.75, 2.0, 2.0, 2.25, 2.75, 3.0,
        ];
        for (a, b) in out.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{out:?}");
        }
        // the stored size is the identity
        let src: Vec<f32> = (0..9 * 2).map(|v| v as f32 * 0.3).collect();
        assert_eq!(bilinear_hwc(&src, 3, 3, 2, 3, 3), src);
    }

    #[test]
    fn max_pool_pads_after_with_minus_infinity() {
        let x = Tensor::from_vec(
            vec![
                -1f32, -2., -3., -4., -5., -6., -7., -8., -9., -10., -11., -12., -13., -14., -15.,
                -16.,
            ],
            (1, 1, 4, 4),
            &Device::Cpu,
        )
        .unwrap();
        let y = max_pool_same(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // windows rows/cols {0,1,2} and {2,3}
        assert_eq!(y, [-1., -3., -9., -11.]);
    }

    #[test]
    fn parameters_are_the_state_dict_less_classifier_and_final_norm() {
        // DPTDepthModel(backbone="vitb_rn50_384"): 368 tensors, 123,146,985 values, of which
        // pretrained.model.head.* and pretrained.model.norm.* (4, 770,536) are not read
        let shapes = parameter_shapes();
        let total: usize = shapes
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!((shapes.len(), total), (364, 122_376_449));
    }

    #[test]
    fn missing_weights_name_the_file() {
        let e = MidasNet::from_tensors(HashMap::new()).err().unwrap();
        assert!(e.contains("dpt_hybrid-midas-501f0c75.pt"), "{e}");
        let t = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap();
        let large = HashMap::from([(
            "pretrained.model.patch_embed.proj.weight".to_string(),
            t(&[1024, 3, 16, 16]),
        )]);
        let e = MidasNet::from_tensors(large).err().unwrap();
        assert!(e.contains("DPT-Large"), "{e}");
        // a missing tensor is named
        let mut most: HashMap<String, Tensor> = parameter_shapes()
            .into_iter()
            .filter(|(k, _)| !k.contains("blocks.") && !k.starts_with("scratch.refinenet"))
            .map(|(k, s)| (k, t(&s)))
            .collect();
        most.remove("scratch.output_conv.2.bias");
        let e = MidasNet::from_tensors(most).err().unwrap();
        assert!(
            e.contains("stages.0.blocks.0.downsample.conv.weight"),
            "{e}"
        );
    }

    #[test]
    fn registered() {
        let reg = crate::registry();
        assert!(reg.preprocessor("depth_midas").is_some());
        assert!(reg.preprocessor("normal_midas").is_some());
    }
}
