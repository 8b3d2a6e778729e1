//! The network of `upernet_global_small.pth`: sd-webui-controlnet's `annotator/uniformer`
//! UniFormer backbone (`uniformer.py`, `windows=False, hybrid=False`) and the vendored mmseg
//! 0.x `UPerHead` (`decode_heads/uper_head.py`, `psp_head.py` `PPM`), eval mode.
//!
//! - UniFormer: four stages, each a `PatchEmbed` (a `p` x `p` stride-`p` conv, `p` = 4, 2, 2,
//!   2, then LayerNorm eps 1e-5 over the channels) and blocks; stages 1 and 2 are `CBlock`s
//!   (`x += dw3x3(x)`; `x += conv2(dw5x5(conv1(BN(x))))`; `x += fc2(GELU(fc1(BN(x))))`, the
//!   BatchNorms folded into the 1x1 convs after them), stages 3 and 4 `SABlock`s (`x +=
//!   dw3x3(x)`, then a pre-norm ViT block over the flattened tokens: LayerNorm eps 1e-6, global
//!   multi-head attention of 64 channels per head, exact-GELU MLP of 4x width). Each stage's
//!   output goes through its own LayerNorm (`norm1`..`norm4`, eps 1e-6) to the head.
//! - UPerHead (`channels` from the weights, 512 in the real file): a `PPM` on the last stage
//!   (adaptive average pools to 1, 2, 3, 6, each a 1x1 `ConvModule`, bilinear back,
//!   `align_corners=False`) concatenated and reduced by the 3x3 `bottleneck`; 1x1 `lateral_convs`
//!   for stages 1-3; the top-down sums (each coarser level resized bilinearly to the next finer
//!   and added); 3x3 `fpn_convs`; every level resized to the finest and concatenated; the 3x3
//!   `fpn_bottleneck` and the 1x1 `conv_seg` to the 150 ADE20K classes. A `ConvModule` is a
//!   bias-free conv, BatchNorm (eps 1e-5, folded) and ReLU.
//!
//! Keys: the mmseg checkpoint's (`backbone.patch_embed1.proj.weight`, `backbone.blocks3.0.attn
//! .qkv.weight`, `decode_head.psp_modules.0.1.conv.weight`, `decode_head.conv_seg.bias`, ...);
//! the training-only `auxiliary_head.*` is not read.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{layer_norm, LayerNorm, LayerNormConfig, VarBuilder};
use sd_pipeline::cpu::activation::gelu_erf as gelu;

use crate::conv::{fold_batch_norm, Conv2d, Depthwise, Geometry};
use crate::depth_anything::Block;

/// Channels per attention head (`head_dim=64` of the config; not in the weights).
pub const HEAD_DIM: usize = 64;
/// The PPM's pooled sizes (`pool_scales`).
pub const POOL_SCALES: [usize; 4] = [1, 2, 3, 6];
/// `PatchEmbed` strides of the four stages.
const PATCH: [usize; 4] = [4, 2, 2, 2];
const BN_EPS: f64 = 1e-5;

/// The tensors of the file by name (f32); errors name the key.
pub struct Weights<'a> {
    pub map: &'a HashMap<String, Tensor>,
}

impl Weights<'_> {
    pub fn get(&self, key: &str) -> Result<Tensor> {
        self.map
            .get(key)
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg(format!("no tensor `{key}`")))
    }
    fn vec(&self, key: &str, len: usize) -> Result<Vec<f32>> {
        let t = self.get(key)?;
        if t.elem_count() != len {
            candle_core::bail!("`{key}` has shape {:?}, expected [{len}]", t.dims());
        }
        t.flatten_all()?.to_vec1()
    }
    /// `key`'s dims, which must number `rank`.
    fn dims(&self, key: &str, rank: usize) -> Result<Vec<usize>> {
        let t = self.get(key)?;
        if t.rank() != rank {
            candle_core::bail!("`{key}` has shape {:?}, expected rank {rank}", t.dims());
        }
        Ok(t.dims().to_vec())
    }
    /// A BatchNorm's `[weight, bias, running_mean, running_var]`.
    fn bn(&self, prefix: &str, c: usize) -> Result<[Vec<f32>; 4]> {
        Ok([
            self.vec(&format!("{prefix}.weight"), c)?,
            self.vec(&format!("{prefix}.bias"), c)?,
            self.vec(&format!("{prefix}.running_mean"), c)?,
            self.vec(&format!("{prefix}.running_var"), c)?,
        ])
    }
    /// How many `{prefix}.{i}.` entries there are.
    fn count(&self, prefix: &str) -> usize {
        (0..)
            .find(|i| {
                let p = format!("{prefix}.{i}.");
                !self.map.keys().any(|k| k.starts_with(&p))
            })
            .unwrap_or(0)
    }
}

/// `nn.Conv2d` `{prefix}` with bias, `inputs` channels, a `k` x `k` kernel; with its outputs.
fn conv(w: &Weights, prefix: &str, inputs: usize, k: usize, geo: Geometry) -> Result<Conv2d> {
    let wt = w.get(&format!("{prefix}.weight"))?;
    let d = wt.dims();
    if d.len() != 4 || d[1] != inputs || d[2] != k || d[3] != k {
        candle_core::bail!("`{prefix}.weight` has shape {d:?}, expected [out, {inputs}, {k}, {k}]");
    }
    let b = w.get(&format!("{prefix}.bias"))?;
    if b.dims() != [d[0]] {
        candle_core::bail!(
            "`{prefix}.bias` has shape {:?}, expected [{}]",
            b.dims(),
            d[0]
        );
    }
    Conv2d::new(&wt, Some(&b), geo)
}

/// A depthwise `k` x `k` `nn.Conv2d(c, c, k, padding=k // 2, groups=c)` with bias.
fn depthwise(w: &Weights, prefix: &str, c: usize, k: usize) -> Result<Depthwise> {
    let key = format!("{prefix}.weight");
    let d = w.dims(&key, 4)?;
    if d != [c, 1, k, k] {
        candle_core::bail!("`{key}` has shape {d:?}, expected [{c}, 1, {k}, {k}]");
    }
    let wt = w.vec(&key, c * k * k)?;
    let b = w.vec(&format!("{prefix}.bias"), c)?;
    Depthwise::new(wt, Some(b), k, Geometry::new(1, k / 2))
}

/// A 1x1 conv `{prefix}` of `c` inputs applied after an eval BatchNorm `{bn}` of its input,
/// as one conv: `W (s x + t) + b` = `(W s) x + (W t + b)` with `s = gamma / sqrt(var + eps)`,
/// `t = beta - mean s`, in f64.
fn conv1x1_after_bn(w: &Weights, prefix: &str, bn: &str, c: usize) -> Result<Conv2d> {
    let key = format!("{prefix}.weight");
    let d = w.dims(&key, 4)?;
    if d[1] != c || d[2] != 1 || d[3] != 1 {
        candle_core::bail!("`{key}` has shape {d:?}, expected [out, {c}, 1, 1]");
    }
    let o = d[0];
    let mut wt = w.vec(&key, o * c)?;
    let mut b = w.vec(&format!("{prefix}.bias"), o)?;
    let [g, beta, mean, var] = w.bn(bn, c)?;
    let (s, t): (Vec<f64>, Vec<f64>) = (0..c)
        .map(|i| {
            let s = g[i] as f64 / (var[i] as f64 + BN_EPS).sqrt();
            (s, beta[i] as f64 - mean[i] as f64 * s)
        })
        .unzip();
    for (row, bo) in wt.chunks_exact_mut(c).zip(b.iter_mut()) {
        let shift: f64 = row.iter().zip(&t).map(|(&a, &t)| a as f64 * t).sum();
        *bo = (*bo as f64 + shift) as f32;
        for (a, s) in row.iter_mut().zip(&s) {
            *a = (*a as f64 * s) as f32;
        }
    }
    let wt = Tensor::from_vec(wt, (o, c, 1, 1), &Device::Cpu)?;
    let b = Tensor::from_vec(b, o, &Device::Cpu)?;
    Conv2d::new(&wt, Some(&b), Geometry::new(1, 0))
}

/// mmcv's `ConvModule` (bias-free conv, BatchNorm, ReLU) `{prefix}.conv` / `{prefix}.bn`, the
/// norm folded; `k` x `k` with padding `k / 2`. Returns the conv and its outputs.
fn conv_module(w: &Weights, prefix: &str, inputs: usize, k: usize) -> Result<(Conv2d, usize)> {
    let key = format!("{prefix}.conv.weight");
    let d = w.dims(&key, 4)?;
    if d[1] != inputs || d[2] != k || d[3] != k {
        candle_core::bail!("`{key}` has shape {d:?}, expected [out, {inputs}, {k}, {k}]");
    }
    let o = d[0];
    let mut wt = w.vec(&key, o * inputs * k * k)?;
    let mut b = vec![0f32; o];
    let [g, beta, mean, var] = w.bn(&format!("{prefix}.bn"), o)?;
    fold_batch_norm(&mut wt, &mut b, [&g, &beta, &mean, &var], BN_EPS);
    let wt = Tensor::from_vec(wt, (o, inputs, k, k), &Device::Cpu)?;
    let b = Tensor::from_vec(b, o, &Device::Cpu)?;
    Ok((Conv2d::new(&wt, Some(&b), Geometry::new(1, k / 2))?, o))
}

/// A LayerNorm over the channels of an `[n, c, h, w]` map.
fn norm_channels(ln: &LayerNorm, x: &Tensor) -> Result<Tensor> {
    ln.forward(&x.permute((0, 2, 3, 1))?)?
        .permute((0, 3, 1, 2))?
        .contiguous()
}

fn ln(c: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    layer_norm(
        c,
        LayerNormConfig {
            eps,
            ..Default::default()
        },
        vb,
    )
}

/// `PatchEmbed`: a stride-`p` `p` x `p` conv and a LayerNorm (eps 1e-5) over the channels.
struct PatchEmbed {
    proj: Conv2d,
    norm: LayerNorm,
}

impl PatchEmbed {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        norm_channels(&self.norm, &self.proj.forward(x)?)
    }
}

/// The convolutional block of stages 1 and 2.
struct CBlock {
    pos_embed: Depthwise,
    conv1: Conv2d,
    attn: Depthwise,
    conv2: Conv2d,
    fc1: Conv2d,
    fc2: Conv2d,
}

impl CBlock {
    fn new(w: &Weights, p: &str, c: usize) -> Result<Self> {
        let fc1 = conv1x1_after_bn(w, &format!("{p}.mlp.fc1"), &format!("{p}.norm2"), c)?;
        let hidden = fc1.outputs();
        Ok(Self {
            pos_embed: depthwise(w, &format!("{p}.pos_embed"), c, 3)?,
            conv1: conv1x1_after_bn(w, &format!("{p}.conv1"), &format!("{p}.norm1"), c)?,
            attn: depthwise(w, &format!("{p}.attn"), c, 5)?,
            conv2: conv(w, &format!("{p}.conv2"), c, 1, Geometry::new(1, 0))?,
            fc1,
            fc2: conv(w, &format!("{p}.mlp.fc2"), hidden, 1, Geometry::new(1, 0))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (x + self.pos_embed.forward(x)?)?;
        let a = self.conv1.forward(&x)?;
        let a = self.conv2.forward(&self.attn.forward(&a)?)?;
        let x = (x + a)?;
        let m = gelu(&self.fc1.forward(&x)?)?;
        x + self.fc2.forward(&m)?
    }
}

/// The attention block of stages 3 and 4: the position conv, then a ViT block on the tokens.
struct SABlock {
    pos_embed: Depthwise,
    block: Block,
}

impl SABlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (x + self.pos_embed.forward(x)?)?;
        let (n, c, h, w) = x.dims4()?;
        let tokens = x.flatten_from(2)?.transpose(1, 2)?.contiguous()?;
        let y = self.block.forward(&tokens)?;
        y.transpose(1, 2)?.reshape((n, c, h, w))
    }
}

enum Blocks {
    Conv(Vec<CBlock>),
    Attention(Vec<SABlock>),
}

struct Stage {
    embed: PatchEmbed,
    blocks: Blocks,
    norm: LayerNorm,
}

impl Stage {
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut x = self.embed.forward(x)?;
        match &self.blocks {
            Blocks::Conv(b) => {
                for blk in b {
                    x = blk.forward(&x)?;
                }
            }
            Blocks::Attention(b) => {
                for blk in b {
                    x = blk.forward(&x)?;
                }
            }
        }
        let out = norm_channels(&self.norm, &x)?;
        Ok((x, out))
    }
}

/// UniFormer + UPerHead with the weights of an mmseg checkpoint.
pub struct UperNet {
    stages: Vec<Stage>,
    ppm: Vec<Conv2d>,
    bottleneck: Conv2d,
    lateral: Vec<Conv2d>,
    fpn: Vec<Conv2d>,
    fpn_bottleneck: Conv2d,
    conv_seg: Conv2d,
    classes: usize,
}

/// `AdaptiveAvgPool2d(s)` of an `[n, c, h, w]` map: cell `i` averages rows
/// `floor(i h / s) .. ceil((i + 1) h / s)` (and the same for columns).
pub fn adaptive_avg_pool(x: &Tensor, s: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let v = x.flatten_all()?.to_vec1::<f32>()?;
    let range = |i: usize, len: usize| (i * len / s, ((i + 1) * len).div_ceil(s));
    let mut out = Vec::with_capacity(n * c * s * s);
    for plane in v.chunks_exact(h * w) {
        for i in 0..s {
            let (y0, y1) = range(i, h);
            for j in 0..s {
                let (x0, x1) = range(j, w);
                let mut sum = 0f32;
                for y in y0..y1 {
                    for xx in x0..x1 {
                        sum += plane[y * w + xx];
                    }
                }
                // AdaptiveAvgPoolKernel.cpp: sum / kh / kw
                out.push(sum / (y1 - y0) as f32 / (x1 - x0) as f32);
            }
        }
    }
    Tensor::from_vec(out, (n, c, s, s), &Device::Cpu)
}

/// One bilinear value as torch's separable CPU kernel (`upsample_bilinear2d`, the generic
/// `Interpolate` loop, contracted to fused multiply-adds) computes it: along x within each
/// row, then along y (identity taps give `a` exactly).
#[inline(always)]
pub(crate) fn lerp2(
    a: f32,
    b: f32,
    c: f32,
    d: f32,
    (wx0, wx1): (f32, f32),
    (wy0, wy1): (f32, f32),
) -> f32 {
    let t0 = a.mul_add(wx0, b * wx1);
    let t1 = c.mul_add(wx0, d * wx1);
    t0.mul_add(wy0, t1 * wy1)
}

/// `F.interpolate(mode="bilinear", align_corners=False)` of an `h x w x c` grid to `oh x ow`
/// with [`lerp2`]'s arithmetic.
pub(crate) fn bilinear_hwc(
    src: &[f32],
    hwc: (usize, usize, usize),
    ohw: (usize, usize),
) -> Vec<f32> {
    bilinear_hwc_run(src, hwc, ohw)
}

sd_pipeline::simd_dispatch!(fn bilinear_hwc_run(src: &[f32], hwc: (usize, usize, usize), ohw: (usize, usize)) -> Vec<f32> = bilinear_hwc_body);

#[inline(always)]
fn bilinear_hwc_body(
    src: &[f32],
    (h, w, c): (usize, usize, usize),
    (oh, ow): (usize, usize),
) -> Vec<f32> {
    let (ty, tx) = (
        crate::midas::bilinear_taps(h, oh),
        crate::midas::bilinear_taps(w, ow),
    );
    let mut out = vec![0f32; oh * ow * c];
    for (oy, &(y0, y1, wy0, wy1)) in ty.iter().enumerate() {
        for (ox, &(x0, x1, wx0, wx1)) in tx.iter().enumerate() {
            let at = |y: usize, x: usize| &src[(y * w + x) * c..(y * w + x + 1) * c];
            let (a, b, cc, d) = (at(y0, x0), at(y0, x1), at(y1, x0), at(y1, x1));
            let o = &mut out[(oy * ow + ox) * c..(oy * ow + ox + 1) * c];
            for i in 0..c {
                o[i] = lerp2(a[i], b[i], cc[i], d[i], (wx0, wx1), (wy0, wy1));
            }
        }
    }
    out
}

/// `F.interpolate(x, (oh, ow), mode="bilinear", align_corners=False)` of an `[n, c, h, w]` map.
pub fn resize_bilinear(x: &Tensor, oh: usize, ow: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if (h, w) == (oh, ow) {
        return Ok(x.clone());
    }
    let hwc = x.permute((0, 2, 3, 1))?.contiguous()?;
    let v = hwc.flatten_all()?.to_vec1::<f32>()?;
    let mut out = Vec::with_capacity(n * oh * ow * c);
    for img in v.chunks_exact(h * w * c) {
        out.extend(bilinear_hwc(img, (h, w, c), (oh, ow)));
    }
    Tensor::from_vec(out, (n, oh, ow, c), &Device::Cpu)?
        .permute((0, 3, 1, 2))?
        .contiguous()
}

impl UperNet {
    /// From the checkpoint's tensors (f32, by name).
    pub fn from_tensors(map: HashMap<String, Tensor>) -> Result<Self> {
        let w = Weights { map: &map };
        let vb = VarBuilder::from_tensors(map.clone(), DType::F32, &Device::Cpu);
        let mut stages = Vec::with_capacity(4);
        let mut inputs = 3;
        for (s, &p) in PATCH.iter().enumerate() {
            let pre = format!("backbone.patch_embed{}", s + 1);
            let proj = conv(&w, &format!("{pre}.proj"), inputs, p, Geometry::new(p, 0))?;
            let c = proj.outputs();
            let embed = PatchEmbed {
                proj,
                norm: ln(c, 1e-5, vb.pp(format!("{pre}.norm")))?,
            };
            let name = format!("backbone.blocks{}", s + 1);
            let count = w.count(&name);
            if count == 0 {
                candle_core::bail!("no tensor `{name}.0.pos_embed.weight`");
            }
            let blocks = if s < 2 {
                Blocks::Conv(
                    (0..count)
                        .map(|i| CBlock::new(&w, &format!("{name}.{i}"), c))
                        .collect::<Result<_>>()?,
                )
            } else {
                if c % HEAD_DIM != 0 {
                    candle_core::bail!(
                        "stage {} has {c} channels, not a multiple of {HEAD_DIM} per head",
                        s + 1
                    );
                }
                let hidden = w.dims(&format!("{name}.0.mlp.fc1.weight"), 2)?[0];
                Blocks::Attention(
                    (0..count)
                        .map(|i| {
                            let p = format!("{name}.{i}");
                            Ok(SABlock {
                                pos_embed: depthwise(&w, &format!("{p}.pos_embed"), c, 3)?,
                                block: Block::build(c, c / HEAD_DIM, hidden, false, vb.pp(&p))?,
                            })
                        })
                        .collect::<Result<_>>()?,
                )
            };
            let norm = ln(c, 1e-6, vb.pp(format!("backbone.norm{}", s + 1)))?;
            stages.push(Stage {
                embed,
                blocks,
                norm,
            });
            inputs = c;
        }
        let dims: Vec<usize> = stages.iter().map(|s| s.embed.proj.outputs()).collect();
        let h = "decode_head";
        let mut ppm = Vec::new();
        let mut channels = 0;
        for i in 0..POOL_SCALES.len() {
            let (c, o) = conv_module(&w, &format!("{h}.psp_modules.{i}.1"), dims[3], 1)?;
            channels = o;
            ppm.push(c);
        }
        let (bottleneck, _) = conv_module(
            &w,
            &format!("{h}.bottleneck"),
            dims[3] + POOL_SCALES.len() * channels,
            3,
        )?;
        let mut lateral = Vec::new();
        let mut fpn = Vec::new();
        for (i, &d) in dims[..3].iter().enumerate() {
            lateral.push(conv_module(&w, &format!("{h}.lateral_convs.{i}"), d, 1)?.0);
            fpn.push(conv_module(&w, &format!("{h}.fpn_convs.{i}"), channels, 3)?.0);
        }
        let (fpn_bottleneck, _) = conv_module(&w, &format!("{h}.fpn_bottleneck"), 4 * channels, 3)?;
        let conv_seg = conv(
            &w,
            &format!("{h}.conv_seg"),
            channels,
            1,
            Geometry::new(1, 0),
        )?;
        let classes = conv_seg.outputs();
        Ok(Self {
            stages,
            ppm,
            bottleneck,
            lateral,
            fpn,
            fpn_bottleneck,
            conv_seg,
            classes,
        })
    }

    /// The number of classes (`conv_seg`'s outputs; 150 for ADE20K).
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The backbone's four normed stage outputs of an `[n, 3, h, w]` input.
    pub fn features(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut x = x.clone();
        let mut outs = Vec::with_capacity(4);
        for s in &self.stages {
            let (next, out) = s.forward(&x)?;
            outs.push(out);
            x = next;
        }
        Ok(outs)
    }

    /// The head's class logits at the finest stage's size (a quarter of the input).
    pub fn head(&self, feats: &[Tensor]) -> Result<Tensor> {
        let top = &feats[3];
        let (_, _, th, tw) = top.dims4()?;
        let mut psp = vec![top.clone()];
        for (conv, &s) in self.ppm.iter().zip(&POOL_SCALES) {
            let p = conv.forward(&adaptive_avg_pool(top, s)?)?.relu()?;
            psp.push(resize_bilinear(&p, th, tw)?);
        }
        let psp = self.bottleneck.forward(&Tensor::cat(&psp, 1)?)?.relu()?;
        let mut laterals: Vec<Tensor> = self
            .lateral
            .iter()
            .zip(feats)
            .map(|(c, f)| c.forward(f)?.relu())
            .collect::<Result<_>>()?;
        laterals.push(psp);
        for i in (1..laterals.len()).rev() {
            let (_, _, h, w) = laterals[i - 1].dims4()?;
            let up = resize_bilinear(&laterals[i], h, w)?;
            laterals[i - 1] = (&laterals[i - 1] + up)?;
        }
        let (_, _, h0, w0) = laterals[0].dims4()?;
        let mut outs = Vec::with_capacity(4);
        for (i, l) in laterals.iter().enumerate() {
            let o = match self.fpn.get(i) {
                Some(c) => c.forward(l)?.relu()?,
                None => l.clone(),
            };
            outs.push(resize_bilinear(&o, h0, w0)?);
        }
        let y = self
            .fpn_bottleneck
            .forward(&Tensor::cat(&outs, 1)?)?
            .relu()?;
        self.conv_seg.forward(&y)
    }

    /// Logits of `[n, 3, h, w]` normalised input at a quarter of its size.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.head(&self.features(x)?)
    }
}
