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
//! up to float rounding. The convolutions are [`crate::conv`]'s (its depthwise one for the
//! blocks' pixel-difference convs).
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

use crate::conv::{Conv2d, Depthwise, Geometry};
use crate::hed::{checked, file_getter, grey_to_rgb, level_f32, plane, safe_step, Getter};

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

struct Block {
    stride2: bool,
    /// The (converted) pixel-difference conv.
    dw: Depthwise,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if self.stride2 {
            x.max_pool2d(2)?
        } else {
            x.clone()
        };
        let y = self.conv2.forward(&self.dw.forward(&x)?.relu()?)?;
        let x = match &self.shortcut {
            Some(c) => c.forward(&x)?,
            None => x,
        };
        y + x
    }
}

struct Side {
    cdcm_conv1: Conv2d,
    cdcm_conv2: Vec<Conv2d>,
    attn_conv1: Conv2d,
    attn_conv2: Conv2d,
    reduce: Conv2d,
}

impl Side {
    /// CDCM, CSAM and MapReduce of one feature map: `[1, 1, h, w]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.cdcm_conv1.forward(&x.relu()?)?;
        let mut d = self.cdcm_conv2[0].forward(&x)?;
        for c in &self.cdcm_conv2[1..] {
            d = (d + c.forward(&x)?)?;
        }
        let a = self.attn_conv1.forward(&d.relu()?)?;
        let a = candle_nn::ops::sigmoid(&self.attn_conv2.forward(&a)?)?;
        self.reduce.forward(&d.broadcast_mul(&a)?)
    }
}

/// PiDiNet (`pidinet()`, converted).
pub struct PidiNet {
    init_block: Conv2d,
    blocks: Vec<Block>,
    sides: Vec<Side>,
    classifier: Conv2d,
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
        // a stride-1 conv keeping the size, without bias
        let same = |w: Tensor, dilation: usize| {
            let k = w.dims()[3];
            Conv2d::new(&w, None, Geometry::same(k, dilation)).map_err(|e| e.to_string())
        };
        // the 1x1 conv `{name}.weight` `[o, i, 1, 1]`, with its `{name}.bias` when `bias`
        let point = |name: &str, o: usize, i: usize, bias: bool| {
            let w = t(&format!("{name}.weight"), &[o, i, 1, 1])?;
            let b = match bias {
                true => Some(t(&format!("{name}.bias"), &[o])?),
                false => None,
            };
            Conv2d::new(&w, b.as_ref(), Geometry::default()).map_err(|e| e.to_string())
        };
        let init = t("init_block.weight", &[C, 3, 3, 3])?;
        let (iw, ik) = convert(Pdc::of_layer(0), &values(&init)?);
        let init = Tensor::from_vec(iw, (C, 3, ik, ik), device).map_err(|e| e.to_string())?;
        let mut blocks = Vec::new();
        for (layer, (n, i, o, stride)) in block_layout().into_iter().enumerate() {
            let w = t(&format!("{n}.conv1.weight"), &[i, 1, 3, 3])?;
            let (dw, k) = convert(Pdc::of_layer(layer + 1), &values(&w)?);
            let dw =
                Depthwise::new(dw, None, k, Geometry::same(k, 1)).map_err(|e| e.to_string())?;
            let shortcut = if stride > 1 {
                Some(point(&format!("{n}.shortcut"), o, i, true)?)
            } else {
                None
            };
            blocks.push(Block {
                stride2: stride > 1,
                dw,
                conv2: point(&format!("{n}.conv2"), o, i, false)?,
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
                    same(w, 2 * j + 3)
                })
                .collect::<std::result::Result<_, String>>()?;
            let attn_conv2 = t(
                &format!("attentions.{k}.conv2.weight"),
                &[1, ATTN_MID, 3, 3],
            )?;
            sides.push(Side {
                cdcm_conv1: point(&format!("dilations.{k}.conv1"), DIL, p, true)?,
                cdcm_conv2,
                attn_conv1: point(&format!("attentions.{k}.conv1"), ATTN_MID, DIL, true)?,
                attn_conv2: same(attn_conv2, 1)?,
                reduce: point(&format!("conv_reduces.{k}.conv"), 1, DIL, true)?,
            });
        }
        Ok(Self {
            init_block: same(init, 1)?,
            blocks,
            sides,
            classifier: point("classifier", 1, 4, true)?,
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
        let fused = self.classifier.forward(&Tensor::cat(&sides, 1)?)?;
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
