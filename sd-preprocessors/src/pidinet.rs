//! `softedge_pidinet` / `softedge_pidisafe`: PiDiNet (Su et al., 2021; weights
//! `table5_pidinet.pth` from lllyasviel/Annotators) as controlnet_aux 0.0.10's
//! `PidiNetDetector` runs it (sd-webui-controlnet's `annotator/pidinet` is the same).
//!
//! The network is `pidinet()`: the `carv4` layout (layer `i` is a central, angular, radial
//! pixel-difference or vanilla conv for `i % 4` = 0, 1, 2, 3), 60 channels, CDCM with 24
//! channels and CSAM attention. The pixel-difference convolutions are converted to vanilla
//! convolutions when the weights load, as PiDiNet's `convert_pidinet` does: central (`cd`)
//! subtracts the kernel's sum from its centre tap, angular (`ad`) is `w - w[3,0,1,6,4,2,7,8,5]`,
//! radial (`rd`) becomes a 5x5 kernel (padding 2); the results equal the unconverted network's
//! up to float rounding. Depthwise convolutions are computed directly (candle splits grouped
//! convolutions into one call per channel).
//!
//! The map: the image as BGR / 255, the fused output (`outputs[-1]`, after its sigmoid),
//! `(edge * 255).clip(0, 255)` truncated in float32; the `safe` variant first applies
//! `safe_step` (`floor(edge * 3) / 2`). Keys: the `table5_pidinet.pth` state_dict with or
//! without the `module.` prefix of its DataParallel training.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{Device, Result, Tensor};
use sd_plugins_api::{
    hwc3, register_preprocessor, ImageBuf, ParamSpec, Params, PluginError, Preprocessor,
};

use crate::hed::{
    checked, file_getter, grey_to_rgb, level_f32, plane, safe_step, threads, Getter, SameConv,
};

/// The weight files looked for in the annotator folder.
pub const WEIGHT_FILES: [&str; 2] = ["table5_pidinet.pth", "table5_pidinet.safetensors"];

const WHAT: &str = "table5_pidinet.pth";
/// `inplane` of `pidinet()`.
const C: usize = 60;
/// `dil` of `pidinet()`: the CDCM width.
const DIL: usize = 24;
/// CSAM's middle width.
const ATTN_MID: usize = 4;

/// The 15 blocks after `init_block` (layers 1..=15): name, input and output channels, stride.
fn block_layout() -> Vec<(String, usize, usize, usize)> {
    let mut v = Vec::new();
    let stages = [
        (C, C, 1),
        (C, 2 * C, 2),
        (2 * C, 4 * C, 2),
        (4 * C, 4 * C, 2),
    ];
    for (s, &(i, o, stride)) in stages.iter().enumerate() {
        let n = if s == 0 { 3 } else { 4 };
        for b in 0..n {
            let name = format!("block{}_{}", s + 1, b + 1);
            if s > 0 && b == 0 {
                v.push((name, i, o, stride));
            } else {
                v.push((name, o, o, 1));
            }
        }
    }
    v
}

/// The channels of the four feature maps fed to the side outputs.
const FUSE_PLANES: [usize; 4] = [C, 2 * C, 4 * C, 4 * C];

/// Every weight of the network with its shape (the unconverted checkpoint's, without
/// `module.`).
pub fn parameter_shapes() -> Vec<(String, Vec<usize>)> {
    let mut out = vec![("init_block.weight".to_string(), vec![C, 3, 3, 3])];
    for (n, i, o, stride) in block_layout() {
        if stride > 1 {
            out.push((format!("{n}.shortcut.weight"), vec![o, i, 1, 1]));
            out.push((format!("{n}.shortcut.bias"), vec![o]));
        }
        out.push((format!("{n}.conv1.weight"), vec![i, 1, 3, 3]));
        out.push((format!("{n}.conv2.weight"), vec![o, i, 1, 1]));
    }
    for (k, &p) in FUSE_PLANES.iter().enumerate() {
        out.push((format!("dilations.{k}.conv1.weight"), vec![DIL, p, 1, 1]));
        out.push((format!("dilations.{k}.conv1.bias"), vec![DIL]));
        for j in 1..=4 {
            out.push((
                format!("dilations.{k}.conv2_{j}.weight"),
                vec![DIL, DIL, 3, 3],
            ));
        }
        out.push((
            format!("attentions.{k}.conv1.weight"),
            vec![ATTN_MID, DIL, 1, 1],
        ));
        out.push((format!("attentions.{k}.conv1.bias"), vec![ATTN_MID]));
        out.push((
            format!("attentions.{k}.conv2.weight"),
            vec![1, ATTN_MID, 3, 3],
        ));
        out.push((format!("conv_reduces.{k}.conv.weight"), vec![1, DIL, 1, 1]));
        out.push((format!("conv_reduces.{k}.conv.bias"), vec![1]));
    }
    out.push(("classifier.weight".into(), vec![1, 4, 1, 1]));
    out.push(("classifier.bias".into(), vec![1]));
    out
}

/// The pixel-difference operation of layer `i` in `carv4`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pdc {
    Central,
    Angular,
    Radial,
    Vanilla,
}

impl Pdc {
    pub fn of_layer(i: usize) -> Pdc {
        [Pdc::Central, Pdc::Angular, Pdc::Radial, Pdc::Vanilla][i % 4]
    }
}

/// Convert 3x3 pixel-difference kernels (`[.., 9]` row-major, one after another) to vanilla
/// kernels: 3x3 for central / angular / vanilla, 5x5 for radial (`convert_pidinet`). Returns
/// the kernels and their size.
pub fn convert(pdc: Pdc, w: &[f32]) -> (Vec<f32>, usize) {
    match pdc {
        Pdc::Vanilla => (w.to_vec(), 3),
        Pdc::Central => {
            let mut out = w.to_vec();
            for k in out.chunks_exact_mut(9) {
                let sum: f32 = k.iter().sum();
                k[4] -= sum;
            }
            (out, 3)
        }
        Pdc::Angular => {
            const PERM: [usize; 9] = [3, 0, 1, 6, 4, 2, 7, 8, 5];
            let out = w
                .chunks_exact(9)
                .flat_map(|k| (0..9).map(move |j| k[j] - k[PERM[j]]))
                .collect();
            (out, 3)
        }
        Pdc::Radial => {
            const OUTER: [usize; 8] = [0, 2, 4, 10, 14, 20, 22, 24];
            const INNER: [usize; 8] = [6, 7, 8, 11, 13, 16, 17, 18];
            let mut out = Vec::with_capacity(w.len() / 9 * 25);
            for k in w.chunks_exact(9) {
                let mut b = [0f32; 25];
                for j in 0..8 {
                    b[OUTER[j]] = k[j + 1];
                    b[INNER[j]] = -k[j + 1];
                }
                out.extend_from_slice(&b);
            }
            (out, 5)
        }
    }
}

/// A depthwise convolution (one `k` x `k` kernel per channel, zero padding `k / 2`, stride 1,
/// no bias) of a `[1, C, H, W]` f32 tensor on the CPU, channels split over the cores.
fn depthwise(x: &Tensor, kernels: &[f32], k: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if n != 1 || kernels.len() != c * k * k {
        candle_core::bail!(
            "depthwise: input {:?}, {} kernel values of size {k}",
            x.dims(),
            kernels.len()
        );
    }
    let src = x.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; src.len()];
    let p = k / 2;
    let per = c.div_ceil(threads().min(c).max(1));
    std::thread::scope(|s| {
        for (t, dst) in out.chunks_mut(per * h * w).enumerate() {
            let src = &src;
            s.spawn(move || {
                for (ci, dst) in dst.chunks_mut(h * w).enumerate() {
                    let ch = t * per + ci;
                    let img = &src[ch * h * w..(ch + 1) * h * w];
                    let ker = &kernels[ch * k * k..(ch + 1) * k * k];
                    for ky in 0..k {
                        for kx in 0..k {
                            let v = ker[ky * k + kx];
                            if v == 0.0 {
                                continue;
                            }
                            // output x reads input x + kx - p
                            let x0 = p.saturating_sub(kx);
                            let x1 = (w + p).saturating_sub(kx).min(w);
                            if x0 >= x1 {
                                continue;
                            }
                            for y in 0..h {
                                let iy = y + ky;
                                if iy < p || iy - p >= h {
                                    continue;
                                }
                                let row = &img[(iy - p) * w..(iy - p + 1) * w];
                                let o = &mut dst[y * w..(y + 1) * w];
                                for xx in x0..x1 {
                                    o[xx] += v * row[xx + kx - p];
                                }
                            }
                        }
                    }
                }
            });
        }
    });
    Tensor::from_vec(out, (1, c, h, w), x.device())
}

/// A 1x1 convolution as a matrix product: `w` `[O, I]`, `b` `[O]`.
fn pointwise(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (_, c, h, wd) = x.dims4()?;
    let (o, _) = w.dims2()?;
    let y = w.matmul(&x.reshape((c, h * wd))?)?;
    let y = match b {
        Some(b) => y.broadcast_add(&b.reshape((o, 1))?)?,
        None => y,
    };
    y.reshape((1, o, h, wd))
}

struct Block {
    stride2: bool,
    dw: Vec<f32>,
    k: usize,
    conv2: Tensor,
    shortcut: Option<(Tensor, Tensor)>,
}

impl Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if self.stride2 {
            x.max_pool2d(2)?
        } else {
            x.clone()
        };
        let y = depthwise(&x, &self.dw, self.k)?.relu()?;
        let y = pointwise(&y, &self.conv2, None)?;
        let x = match &self.shortcut {
            Some((w, b)) => pointwise(&x, w, Some(b))?,
            None => x,
        };
        y + x
    }
}

struct Side {
    cdcm_conv1: (Tensor, Tensor),
    cdcm_conv2: Vec<SameConv>,
    attn_conv1: (Tensor, Tensor),
    attn_conv2: SameConv,
    reduce: (Tensor, Tensor),
}

impl Side {
    /// CDCM, CSAM and MapReduce of one feature map: `[1, 1, h, w]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = pointwise(&x.relu()?, &self.cdcm_conv1.0, Some(&self.cdcm_conv1.1))?;
        let mut d = self.cdcm_conv2[0].forward(&x)?;
        for c in &self.cdcm_conv2[1..] {
            d = (d + c.forward(&x)?)?;
        }
        let a = pointwise(&d.relu()?, &self.attn_conv1.0, Some(&self.attn_conv1.1))?;
        let a = candle_nn::ops::sigmoid(&self.attn_conv2.forward(&a)?)?;
        let f = d.broadcast_mul(&a)?;
        pointwise(&f, &self.reduce.0, Some(&self.reduce.1))
    }
}

/// PiDiNet (`pidinet()`, converted).
pub struct PidiNet {
    init_block: SameConv,
    blocks: Vec<Block>,
    sides: Vec<Side>,
    classifier: (Tensor, Tensor),
}

/// `[O, I, 1, 1]` as `[O, I]`.
fn matrix(t: Tensor) -> std::result::Result<Tensor, String> {
    let (o, i) = (t.dims()[0], t.dims()[1]);
    t.reshape((o, i)).map_err(|e| e.to_string())
}

impl PidiNet {
    /// Build from a tensor getter (the checkpoint's names without `module.`), checking every
    /// shape and converting the pixel-difference convolutions.
    pub fn new(get: Getter, device: &Device) -> std::result::Result<Self, String> {
        let t = |name: &str, shape: &[usize]| checked(get, name, shape, WHAT, device);
        let values = |t: &Tensor| -> std::result::Result<Vec<f32>, String> {
            t.flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| e.to_string())
        };
        let conv = |w: Tensor, dilation: usize| {
            SameConv::new(w, None, dilation).map_err(|e| e.to_string())
        };
        let init = t("init_block.weight", &[C, 3, 3, 3])?;
        let (iw, ik) = convert(Pdc::of_layer(0), &values(&init)?);
        let init = Tensor::from_vec(iw, (C, 3, ik, ik), device).map_err(|e| e.to_string())?;
        let mut blocks = Vec::new();
        for (layer, (n, i, o, stride)) in block_layout().into_iter().enumerate() {
            let w = t(&format!("{n}.conv1.weight"), &[i, 1, 3, 3])?;
            let (dw, k) = convert(Pdc::of_layer(layer + 1), &values(&w)?);
            let conv2 = matrix(t(&format!("{n}.conv2.weight"), &[o, i, 1, 1])?)?;
            let shortcut = if stride > 1 {
                Some((
                    matrix(t(&format!("{n}.shortcut.weight"), &[o, i, 1, 1])?)?,
                    t(&format!("{n}.shortcut.bias"), &[o])?,
                ))
            } else {
                None
            };
            blocks.push(Block {
                stride2: stride > 1,
                dw,
                k,
                conv2,
                shortcut,
            });
        }
        let mut sides = Vec::new();
        for (k, &p) in FUSE_PLANES.iter().enumerate() {
            let cdcm_conv2 = (1..=4)
                .map(|j| {
                    let w = t(
                        &format!("dilations.{k}.conv2_{j}.weight"),
                        &[DIL, DIL, 3, 3],
                    )?;
                    // dilations 5, 7, 9, 11 with as much padding
                    conv(w, 2 * j + 3)
                })
                .collect::<std::result::Result<_, String>>()?;
            sides.push(Side {
                cdcm_conv1: (
                    matrix(t(&format!("dilations.{k}.conv1.weight"), &[DIL, p, 1, 1])?)?,
                    t(&format!("dilations.{k}.conv1.bias"), &[DIL])?,
                ),
                cdcm_conv2,
                attn_conv1: (
                    matrix(t(
                        &format!("attentions.{k}.conv1.weight"),
                        &[ATTN_MID, DIL, 1, 1],
                    )?)?,
                    t(&format!("attentions.{k}.conv1.bias"), &[ATTN_MID])?,
                ),
                attn_conv2: conv(
                    t(
                        &format!("attentions.{k}.conv2.weight"),
                        &[1, ATTN_MID, 3, 3],
                    )?,
                    1,
                )?,
                reduce: (
                    matrix(t(
                        &format!("conv_reduces.{k}.conv.weight"),
                        &[1, DIL, 1, 1],
                    )?)?,
                    t(&format!("conv_reduces.{k}.conv.bias"), &[1])?,
                ),
            });
        }
        let classifier = (
            matrix(t("classifier.weight", &[1, 4, 1, 1])?)?,
            t("classifier.bias", &[1])?,
        );
        Ok(Self {
            init_block: conv(init, 1)?,
            blocks,
            sides,
            classifier,
        })
    }

    /// Load `table5_pidinet.pth` (its `state_dict`, `module.` keys) or a safetensors file with
    /// the same keys, with or without `module.`.
    pub fn load(path: &Path, device: &Device) -> std::result::Result<Self, String> {
        let get = file_getter(path, &["module.", ""], WHAT)?;
        Self::new(&get, device)
    }

    /// `x`: `[1, 3, H, W]`, BGR / 255. Returns the four side outputs and the fused one, each
    /// `[1, 1, H, W]` after its sigmoid (`PiDiNet.forward`).
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let (_, _, h, w) = x.dims4()?;
        let mut x = self.init_block.forward(x)?;
        let mut feats = Vec::with_capacity(4);
        for (i, b) in self.blocks.iter().enumerate() {
            x = b.forward(&x)?;
            if matches!(i, 2 | 6 | 10 | 14) {
                feats.push(x.clone());
            }
        }
        let mut sides = Vec::with_capacity(5);
        for (s, f) in self.sides.iter().zip(&feats) {
            let e = s.forward(f)?;
            let (_, _, eh, ew) = e.dims4()?;
            sides.push(if (eh, ew) == (h, w) {
                e
            } else {
                e.upsample_bilinear2d(h, w, false)?
            });
        }
        let fused = pointwise(
            &Tensor::cat(&sides, 1)?,
            &self.classifier.0,
            Some(&self.classifier.1),
        )?;
        sides.push(fused);
        sides.iter().map(candle_nn::ops::sigmoid).collect()
    }
}

/// The edge map of an image (any channel count) at its own size: `PidiNetDetector.__call__`
/// after its resize (controlnet_aux resizes to `detect_resolution` first, as the caller does).
pub fn edge_map(
    net: &PidiNet,
    input: &ImageBuf,
    safe: bool,
) -> std::result::Result<ImageBuf, String> {
    let rgb = hwc3(input);
    let (w, h) = (rgb.width, rgb.height);
    if w < 8 || h < 8 {
        return Err(format!(
            "image {w}x{h} is too small for PiDiNet (8 pixels a side at least)"
        ));
    }
    let run = || -> Result<(Vec<f32>, usize, usize)> {
        // BGR / 255
        let x: Vec<f32> = rgb
            .data
            .chunks_exact(3)
            .flat_map(|p| [p[2], p[1], p[0]])
            .map(|v| v as f32 / 255.0)
            .collect();
        let x = Tensor::from_vec(x, (h, w, 3), &Device::Cpu)?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .contiguous()?;
        let outs = net.forward(&x)?;
        plane(&outs[4])
    };
    let (edge, _, _) = run().map_err(|e| e.to_string())?;
    let grey: Vec<u8> = edge
        .iter()
        .map(|&e| level_f32(if safe { safe_step(e) } else { e }))
        .collect();
    Ok(grey_to_rgb(&grey, w, h))
}

fn model_cache() -> &'static Mutex<HashMap<PathBuf, Arc<PidiNet>>> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, Arc<PidiNet>>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// The network at `path`, loaded once per process (shared by both preprocessor names).
pub fn load_cached(path: &Path) -> std::result::Result<Arc<PidiNet>, String> {
    let mut cache = model_cache().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = cache.get(path) {
        return Ok(n.clone());
    }
    let n = Arc::new(PidiNet::load(path, &Device::Cpu)?);
    cache.insert(path.to_path_buf(), n.clone());
    Ok(n)
}

/// `softedge_pidinet` (`safe: false`) and `softedge_pidisafe` (`safe: true`).
pub struct SoftedgePidinet {
    pub safe: bool,
}

impl Preprocessor for SoftedgePidinet {
    fn name(&self) -> &str {
        if self.safe {
            "softedge_pidisafe"
        } else {
            "softedge_pidinet"
        }
    }
    fn description(&self) -> &str {
        if self.safe {
            "Soft edges by PiDiNet (table5_pidinet.pth), quantised to 3 levels by safe_step \
             (controlnet_aux PidiNetDetector safe=True)"
        } else {
            "Soft edges by PiDiNet (table5_pidinet.pth; controlnet_aux PidiNetDetector)"
        }
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::string(
            "model",
            "",
            "table5_pidinet.pth or .safetensors; empty: looked for in the annotator folder",
        )]
    }
    fn cache_salt(&self, params: &Params) -> std::result::Result<String, PluginError> {
        crate::weights::weights_salt(self.name(), params, &WEIGHT_FILES)
    }
    fn process(
        &self,
        input: &ImageBuf,
        params: &Params,
    ) -> std::result::Result<ImageBuf, PluginError> {
        let path = crate::weights::find_weights(self.name(), params, &WEIGHT_FILES)?;
        let net = load_cached(&path).map_err(|e| PluginError::failed(self.name(), e))?;
        edge_map(&net, input, self.safe).map_err(|e| PluginError::failed(self.name(), e))
    }
}

register_preprocessor!(SoftedgePidinet { safe: false });
register_preprocessor!(SoftedgePidinet { safe: true });

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The hand-written convolutions against candle's, on odd sizes and paddings wider than
    /// the image.
    #[test]
    fn convolutions_match_candle() {
        let dev = Device::Cpu;
        for (h, w) in [(7, 13), (16, 5), (1, 1)] {
            let x = Tensor::randn(0f32, 1.0, (1, 6, h, w), &dev).unwrap();
            for (k, d) in [(3, 1), (5, 1), (3, 5), (3, 11), (1, 1)] {
                let wt = Tensor::randn(0f32, 1.0, (4, 6, k, k), &dev).unwrap();
                let b = Tensor::randn(0f32, 1.0, 4, &dev).unwrap();
                let pad = d * (k / 2);
                let want = x
                    .conv2d(&wt, pad, 1, d, 1)
                    .unwrap()
                    .broadcast_add(&b.reshape((1, 4, 1, 1)).unwrap())
                    .unwrap();
                let got = SameConv::new(wt, Some(b), d).unwrap().forward(&x).unwrap();
                assert!(max_diff(&got, &want) < 1e-4, "{h}x{w} k{k} d{d}");
            }
            for k in [3, 5] {
                let wt = Tensor::randn(0f32, 1.0, (6, 1, k, k), &dev).unwrap();
                let want = x.conv2d(&wt, k / 2, 1, 1, 6).unwrap();
                let kernels = wt.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let got = depthwise(&x, &kernels, k).unwrap();
                assert_eq!(got.dtype(), DType::F32);
                assert!(max_diff(&got, &want) < 1e-4, "{h}x{w} depthwise k{k}");
            }
        }
    }
}
