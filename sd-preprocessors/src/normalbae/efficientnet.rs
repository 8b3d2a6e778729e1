//! The NormalBAE encoder: geffnet's `tf_efficientnet_b5_ap` (as vendored in controlnet_aux
//! `normalbae/nets/submodules/efficientnet_repo`) without its pooling and classifier.
//!
//! Architecture (`_gen_efficientnet`, channel multiplier 1.6, depth multiplier 2.2, swish,
//! BatchNorm eps 1e-3, TF "same" padding): a 3x3 stride-2 stem (48 channels), seven stages of
//! 3, 5, 5, 7, 7, 9, 3 blocks (`ds` k3 -> 24; `ir` expansion 6: k3 s2 -> 40, k5 s2 -> 64, k3 s2
//! -> 128, k5 s1 -> 176, k5 s2 -> 304, k3 s1 -> 512), each with a squeeze-excite of a quarter
//! of the block's input channels, then the 1x1 `conv_head` (2048). A block: [1x1 expansion +
//! BN + swish], depthwise kxk + BN + swish, squeeze-excite (mean, 1x1 + swish, 1x1 + sigmoid,
//! times), 1x1 projection + BN, plus the input when the shape is kept. "Same" padding: stride
//! 1 pads `k / 2` all round; stride 2 pads `max((ceil(i / 2) - 1) * 2 + k - i, 0)` split with
//! the smaller half before (top / left).
//!
//! `Encoder.forward` collects every child's output: the decoder reads the stage outputs 0, 1,
//! 2 and 4 (`features[4, 5, 6, 8]`) and the conv_head output before its BatchNorm
//! (`features[11]`; `bn2` / `act2` are never used).
//!
//! BatchNorms are folded into the conv before them; the squeeze-excite gate into the
//! projection's weight columns.

use candle_core::{Device, Tensor};

use super::layers::{par_planes, swish, Map, Pointwise, Source};
use crate::conv::{Conv2d, Depthwise, Geometry};

/// BatchNorm eps of the TF-ported models (`BN_EPS_TF_DEFAULT`).
const BN_EPS: f64 = 1e-3;
const PREFIX: &str = "encoder.original_model";

const STEM: usize = 48;
const HEAD: usize = 2048;

/// One block of the network, as `EfficientNetBuilder` makes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSpec {
    pub stage: usize,
    pub index: usize,
    /// `ir` (with the 1x1 expansion) rather than `ds`.
    pub expand: bool,
    pub inputs: usize,
    pub mid: usize,
    pub outputs: usize,
    pub kernel: usize,
    pub stride: usize,
    /// Squeeze-excite channels.
    pub reduced: usize,
}

impl BlockSpec {
    fn prefix(&self) -> String {
        format!("{PREFIX}.blocks.{}.{}", self.stage, self.index)
    }

    fn residual(&self) -> bool {
        self.stride == 1 && self.inputs == self.outputs
    }
}

/// geffnet's `make_divisible` (divisor 8 unless given).
fn make_divisible(v: f64, divisor: usize) -> usize {
    let d = divisor as f64;
    let new = (((v + d / 2.0) as usize) / divisor * divisor).max(divisor);
    if (new as f64) < 0.9 * v {
        new + divisor
    } else {
        new
    }
}

/// The 39 blocks of `tf_efficientnet_b5_ap`.
pub fn blocks() -> Vec<BlockSpec> {
    // (ds?, repeats, kernel, stride, expansion, base channels) of `_gen_efficientnet`
    const ARCH: [(bool, usize, usize, usize, usize, usize); 7] = [
        (true, 1, 3, 1, 1, 16),
        (false, 2, 3, 2, 6, 24),
        (false, 2, 5, 2, 6, 40),
        (false, 3, 3, 2, 6, 80),
        (false, 3, 5, 1, 6, 112),
        (false, 4, 5, 2, 6, 192),
        (false, 1, 3, 1, 6, 320),
    ];
    let (cmul, dmul) = (1.6, 2.2);
    let mut inputs = STEM;
    let mut out = Vec::new();
    for (stage, &(ds, r, k, s, e, c)) in ARCH.iter().enumerate() {
        let repeats = (r as f64 * dmul).ceil() as usize;
        let outputs = make_divisible(c as f64 * cmul, 8);
        for index in 0..repeats {
            let mid = if ds {
                inputs
            } else {
                make_divisible((inputs * e) as f64, 8)
            };
            out.push(BlockSpec {
                stage,
                index,
                expand: !ds,
                inputs,
                mid,
                outputs,
                kernel: k,
                stride: if index == 0 { s } else { 1 },
                reduced: make_divisible(inputs as f64 * 0.25, 1),
            });
            inputs = outputs;
        }
    }
    out
}

/// Every encoder tensor of the state dict with its shape (`bn2`, unused, included).
pub fn parameter_shapes() -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    let bn = |out: &mut Vec<(String, Vec<usize>)>, name: String, c: usize| {
        for s in ["weight", "bias", "running_mean", "running_var"] {
            out.push((format!("{name}.{s}"), vec![c]));
        }
    };
    out.push((format!("{PREFIX}.conv_stem.weight"), vec![STEM, 3, 3, 3]));
    bn(&mut out, format!("{PREFIX}.bn1"), STEM);
    for b in blocks() {
        let p = b.prefix();
        let (dw_bn, pw, pw_bn) = if b.expand {
            out.push((format!("{p}.conv_pw.weight"), vec![b.mid, b.inputs, 1, 1]));
            bn(&mut out, format!("{p}.bn1"), b.mid);
            ("bn2", "conv_pwl", "bn3")
        } else {
            ("bn1", "conv_pw", "bn2")
        };
        out.push((
            format!("{p}.conv_dw.weight"),
            vec![b.mid, 1, b.kernel, b.kernel],
        ));
        bn(&mut out, format!("{p}.{dw_bn}"), b.mid);
        out.push((
            format!("{p}.se.conv_reduce.weight"),
            vec![b.reduced, b.mid, 1, 1],
        ));
        out.push((format!("{p}.se.conv_reduce.bias"), vec![b.reduced]));
        out.push((
            format!("{p}.se.conv_expand.weight"),
            vec![b.mid, b.reduced, 1, 1],
        ));
        out.push((format!("{p}.se.conv_expand.bias"), vec![b.mid]));
        out.push((format!("{p}.{pw}.weight"), vec![b.outputs, b.mid, 1, 1]));
        bn(&mut out, format!("{p}.{pw_bn}"), b.outputs);
    }
    let last = blocks().last().map_or(0, |b| b.outputs);
    out.push((format!("{PREFIX}.conv_head.weight"), vec![HEAD, last, 1, 1]));
    bn(&mut out, format!("{PREFIX}.bn2"), HEAD);
    out
}

/// TF "same" padding of a side `i` for kernel `k`, stride `s`: (before, after, output size).
pub fn same_pad(i: usize, k: usize, s: usize) -> (usize, usize, usize) {
    let o = i.div_ceil(s);
    let pad = ((o.max(1) - 1) * s + k).saturating_sub(i);
    (pad / 2, pad - pad / 2, o)
}

/// A depthwise convolution ([`crate::conv::Depthwise`]) with its BatchNorm folded in and TF
/// "same" padding, then swish.
struct DepthwiseSame {
    k: usize,
    stride: usize,
    conv: Depthwise,
}

impl DepthwiseSame {
    fn new(w: Vec<f32>, b: Vec<f32>, k: usize, stride: usize) -> candle_core::Result<Self> {
        // stride 1 pads k / 2 all round; stride 2 depends on each side's size (added to the
        // input in `forward`)
        let geo = if stride == 1 {
            Geometry::same(k, 1)
        } else {
            Geometry::new(stride, 0)
        };
        Ok(Self {
            k,
            stride,
            conv: Depthwise::new(w, Some(b), k, geo)?,
        })
    }

    /// The layer on `x` and the mean of each output plane (the squeeze-excite's input).
    fn forward(&self, x: Map) -> candle_core::Result<(Map, Vec<f32>)> {
        let (c, h, w) = (x.c, x.h, x.w);
        let mut t = Tensor::from_vec(x.data, (1, c, h, w), &Device::Cpu)?;
        if self.stride != 1 {
            let (top, bottom, _) = same_pad(h, self.k, self.stride);
            let (left, right, _) = same_pad(w, self.k, self.stride);
            t = t
                .pad_with_zeros(2, top, bottom)?
                .pad_with_zeros(3, left, right)?;
        }
        let mut y = Map::from_tensor(&self.conv.forward(&t)?)?;
        drop(t);
        let n = y.pixels();
        let means = par_planes(&mut y.data, n, |_, plane| {
            let mut sum = 0f64;
            for v in plane.iter_mut() {
                *v = swish(*v);
                sum += *v as f64;
            }
            (sum / n as f64) as f32
        });
        Ok((y, means))
    }
}

/// Squeeze-and-excitation: the gate `sigmoid(expand(swish(reduce(mean))))` per channel.
struct SqueezeExcite {
    /// `[r, c]`.
    reduce_w: Vec<f32>,
    reduce_b: Vec<f32>,
    /// `[c, r]`.
    expand_w: Vec<f32>,
    expand_b: Vec<f32>,
}

impl SqueezeExcite {
    fn gate(&self, means: &[f32]) -> Vec<f32> {
        let c = means.len();
        let r = self.reduce_b.len();
        let hidden: Vec<f32> = (0..r)
            .map(|j| {
                let row = &self.reduce_w[j * c..(j + 1) * c];
                let s: f64 = row
                    .iter()
                    .zip(means)
                    .map(|(w, m)| *w as f64 * *m as f64)
                    .sum();
                swish((s + self.reduce_b[j] as f64) as f32)
            })
            .collect();
        (0..c)
            .map(|i| {
                let row = &self.expand_w[i * r..(i + 1) * r];
                let s: f64 = row
                    .iter()
                    .zip(&hidden)
                    .map(|(w, h)| *w as f64 * *h as f64)
                    .sum();
                1.0 / (1.0 + (-((s + self.expand_b[i] as f64) as f32)).exp())
            })
            .collect()
    }
}

/// A `DepthwiseSeparableConv` (no expansion) or `InvertedResidual`.
struct Block {
    expand: Option<Pointwise>,
    dw: DepthwiseSame,
    se: SqueezeExcite,
    project: Pointwise,
    residual: bool,
}

impl Block {
    fn forward(&self, x: &Map) -> candle_core::Result<Map> {
        let y = match &self.expand {
            Some(e) => e.forward(x, None, swish)?,
            None => x.clone(),
        };
        let (z, means) = self.dw.forward(y)?;
        let gate = self.se.gate(&means);
        let mut out = self.project.forward(&z, Some(&gate), |v| v)?;
        if self.residual {
            for (o, i) in out.data.iter_mut().zip(&x.data) {
                *o += i;
            }
        }
        Ok(out)
    }
}

/// The encoder outputs the decoder reads.
pub struct Features {
    /// After stage 0 (24 channels, 1/2 size).
    pub block0: Map,
    /// After stage 1 (40, 1/4).
    pub block1: Map,
    /// After stage 2 (64, 1/8).
    pub block2: Map,
    /// After stage 4 (176, 1/16).
    pub block3: Map,
    /// conv_head (2048, 1/32), before its BatchNorm.
    pub head: Map,
}

/// The EfficientNet-B5 encoder.
pub struct EfficientNet {
    /// 3x3 stride 2, unpadded (the "same" padding is added to its input), bn1 folded in.
    stem: Conv2d,
    stages: Vec<Vec<Block>>,
    head: Pointwise,
}

impl EfficientNet {
    pub fn new(src: &Source) -> Result<Self, String> {
        let conv_err = |e: candle_core::Error| e.to_string();
        let mut w = src.get(&format!("{PREFIX}.conv_stem.weight"), &[STEM, 3, 3, 3])?;
        let mut b = vec![0f32; STEM];
        src.fold_bn(&format!("{PREFIX}.bn1"), BN_EPS, &mut w, &mut b)?;
        let dev = &candle_core::Device::Cpu;
        let stem = Conv2d::new(
            &Tensor::from_vec(w, (STEM, 3, 3, 3), dev).map_err(conv_err)?,
            Some(&Tensor::from_vec(b, STEM, dev).map_err(conv_err)?),
            Geometry::new(2, 0),
        )
        .map_err(conv_err)?;
        let mut stages: Vec<Vec<Block>> = Vec::new();
        for spec in blocks() {
            if spec.index == 0 {
                stages.push(Vec::new());
            }
            stages.last_mut().expect("a stage").push(block(src, &spec)?);
        }
        let last = blocks().last().map_or(0, |b| b.outputs);
        let hw = src.get(&format!("{PREFIX}.conv_head.weight"), &[HEAD, last, 1, 1])?;
        let head = Pointwise::new(hw, vec![0.0; HEAD]).map_err(conv_err)?;
        Ok(Self { stem, stages, head })
    }

    /// `[1, 3, h, w]` (normalised RGB) -> the features the decoder reads.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Features> {
        let (_, _, h, w) = x.dims4()?;
        let (top, bottom, _) = same_pad(h, 3, 2);
        let (left, right, _) = same_pad(w, 3, 2);
        let padded = x
            .pad_with_zeros(2, top, bottom)?
            .pad_with_zeros(3, left, right)?;
        let mut m = Map::from_tensor(&self.stem.forward(&padded)?)?;
        let n = m.pixels();
        par_planes(&mut m.data, n, |_, p| {
            p.iter_mut().for_each(|v| *v = swish(*v))
        });
        let mut kept = Vec::new();
        for (i, stage) in self.stages.iter().enumerate() {
            for b in stage {
                m = b.forward(&m)?;
            }
            if matches!(i, 0 | 1 | 2 | 4) {
                kept.push(m.clone());
            }
        }
        let head = self.head.forward(&m, None, |v| v)?;
        let mut kept = kept.into_iter();
        let mut next = || kept.next().expect("four stage outputs");
        Ok(Features {
            block0: next(),
            block1: next(),
            block2: next(),
            block3: next(),
            head,
        })
    }
}

fn block(src: &Source, b: &BlockSpec) -> Result<Block, String> {
    let p = b.prefix();
    let conv_err = |e: candle_core::Error| format!("{p}: {e}");
    let pointwise = |conv: &str, bn: &str, cin: usize, cout: usize| -> Result<Pointwise, String> {
        let mut w = src.get(&format!("{p}.{conv}.weight"), &[cout, cin, 1, 1])?;
        let mut bias = vec![0f32; cout];
        src.fold_bn(&format!("{p}.{bn}"), BN_EPS, &mut w, &mut bias)?;
        Pointwise::new(w, bias).map_err(conv_err)
    };
    let (expand, dw_bn, pw, pw_bn) = if b.expand {
        (
            Some(pointwise("conv_pw", "bn1", b.inputs, b.mid)?),
            "bn2",
            "conv_pwl",
            "bn3",
        )
    } else {
        (None, "bn1", "conv_pw", "bn2")
    };
    let k = b.kernel;
    let mut dw_w = src.get(&format!("{p}.conv_dw.weight"), &[b.mid, 1, k, k])?;
    let mut dw_b = vec![0f32; b.mid];
    src.fold_bn(&format!("{p}.{dw_bn}"), BN_EPS, &mut dw_w, &mut dw_b)?;
    let se = SqueezeExcite {
        reduce_w: src.get(
            &format!("{p}.se.conv_reduce.weight"),
            &[b.reduced, b.mid, 1, 1],
        )?,
        reduce_b: src.get(&format!("{p}.se.conv_reduce.bias"), &[b.reduced])?,
        expand_w: src.get(
            &format!("{p}.se.conv_expand.weight"),
            &[b.mid, b.reduced, 1, 1],
        )?,
        expand_b: src.get(&format!("{p}.se.conv_expand.bias"), &[b.mid])?,
    };
    Ok(Block {
        expand,
        dw: DepthwiseSame::new(dw_w, dw_b, k, b.stride).map_err(conv_err)?,
        se,
        project: pointwise(pw, pw_bn, b.mid, b.outputs)?,
        residual: b.residual(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn b5_layout() {
        let b = blocks();
        assert_eq!(b.len(), 39);
        let per_stage: Vec<usize> = (0..7)
            .map(|s| b.iter().filter(|x| x.stage == s).count())
            .collect();
        assert_eq!(per_stage, [3, 5, 5, 7, 7, 9, 3]);
        let outs: Vec<usize> = (0..7)
            .map(|s| b.iter().find(|x| x.stage == s).unwrap().outputs)
            .collect();
        assert_eq!(outs, [24, 40, 64, 128, 176, 304, 512]);
        // the first block: ds on the 48-channel stem, SE 12; stage 1's first: 24 * 6 = 144
        assert_eq!((b[0].mid, b[0].reduced, b[0].residual()), (48, 12, false));
        assert!(b[1].residual());
        assert_eq!((b[3].mid, b[3].reduced, b[3].stride), (144, 6, 2));
    }

    #[test]
    fn same_padding_is_tf_same() {
        // stride 1: k / 2 each side; stride 2: the extra pixel after
        assert_eq!(same_pad(10, 5, 1), (2, 2, 10));
        assert_eq!(same_pad(64, 3, 2), (0, 1, 32));
        assert_eq!(same_pad(64, 5, 2), (1, 2, 32));
        assert_eq!(same_pad(3, 5, 2), (2, 2, 2));
        assert_eq!(same_pad(1, 3, 2), (1, 1, 1));
    }

    /// The depthwise layer (TF "same" padding, swish, plane means) against the definition,
    /// strides 1 and 2, odd and even sides.
    #[test]
    fn depthwise_is_the_definition() {
        for (k, s, h, w) in [
            (3, 1, 5, 4),
            (5, 2, 7, 6),
            (3, 2, 6, 5),
            (5, 1, 3, 3),
            (5, 1, 8, 16),
        ] {
            let c = 3;
            let x: Vec<f32> = (0..c * h * w)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) / 4.0)
                .collect();
            let wv: Vec<f32> = (0..c * k * k)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) / 8.0)
                .collect();
            let bv = vec![0.25, -0.5, 0.0];
            let dw = DepthwiseSame::new(wv.clone(), bv.clone(), k, s).unwrap();
            let (y, means) = dw.forward(Map::new(c, h, w, x.clone())).unwrap();
            let (top, _, oh) = same_pad(h, k, s);
            let (left, _, ow) = same_pad(w, k, s);
            assert_eq!((y.h, y.w), (oh, ow));
            for ch in 0..c {
                let mut sum = 0f32;
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = 0f32;
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (oy * s + ky) as isize - top as isize;
                                let ix = (ox * s + kx) as isize - left as isize;
                                if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                    acc += x[(ch * h + iy as usize) * w + ix as usize]
                                        * wv[(ch * k + ky) * k + kx];
                                }
                            }
                        }
                        let want = swish(acc + bv[ch]);
                        let got = y.data[(ch * oh + oy) * ow + ox];
                        assert!((got - want).abs() < 1e-5, "{k} {s}: {got} vs {want}");
                        sum += want;
                    }
                }
                assert!((means[ch] - sum / (oh * ow) as f32).abs() < 1e-5);
            }
        }
    }
}
