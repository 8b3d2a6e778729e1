//! `softedge_hed` / `softedge_hedsafe`: lllyasviel's Apache-2.0 HED (`ControlNetHED_Apache2`,
//! weights `ControlNetHED.pth` from lllyasviel/Annotators) as controlnet_aux 0.0.10's
//! `HEDdetector` runs it (sd-webui-controlnet's `annotator/hed` is the same network and
//! post-processing).
//!
//! The network takes RGB 0..255 minus a learned `norm`, five VGG-like blocks (2, 2, 3, 3, 3
//! 3x3 convs with ReLU; 2x2 max pools between blocks) each ending in a 1x1 `projection` to one
//! channel. The map: every side output resized to the image by `cv2.resize` INTER_LINEAR
//! (float32), their mean (float32, summed in order), `1 / (1 + exp(-mean))` in float64, and
//! `(edge * 255).clip(0, 255)` truncated to 8 bits; the `safe` variant first applies
//! `safe_step` (`floor(edge * 3) / 2` in float32), leaving the levels 0, 127 and 255.
//! Keys: `norm` `[1, 3, 1, 1]`, `block{1..5}.convs.{i}.{weight,bias}`,
//! `block{1..5}.projection.{weight,bias}`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{DType, Device, Tensor};
use sd_plugins_api::{
    hwc3, register_preprocessor, ImageBuf, ParamSpec, Params, PluginError, Preprocessor,
};

use crate::conv::{Conv2d, Geometry};
use crate::cvresize_f32::{resize_f32, Interp};

/// The weight files looked for in the annotator folder.
pub const WEIGHT_FILES: [&str; 2] = ["ControlNetHED.pth", "ControlNetHED.safetensors"];

/// Per block: input channels, output channels, number of 3x3 convs.
const BLOCKS: [(usize, usize, usize); 5] = [
    (3, 64, 2),
    (64, 128, 2),
    (128, 256, 3),
    (256, 512, 3),
    (512, 512, 3),
];

/// Every weight of the network with its shape.
pub fn parameter_shapes() -> Vec<(String, Vec<usize>)> {
    let mut out = vec![("norm".to_string(), vec![1, 3, 1, 1])];
    for (b, &(i, o, n)) in BLOCKS.iter().enumerate() {
        for c in 0..n {
            let cin = if c == 0 { i } else { o };
            out.push((
                format!("block{}.convs.{c}.weight", b + 1),
                vec![o, cin, 3, 3],
            ));
            out.push((format!("block{}.convs.{c}.bias", b + 1), vec![o]));
        }
        out.push((
            format!("block{}.projection.weight", b + 1),
            vec![1, o, 1, 1],
        ));
        out.push((format!("block{}.projection.bias", b + 1), vec![1]));
    }
    out
}

/// A tensor getter by name (the file's keys), giving an error that names what is wrong.
pub type Getter<'a> = &'a dyn Fn(&str) -> Result<Tensor, String>;

/// `name` from `get` as f32 on `device`, checked to have `shape`; `what` names the file kind in
/// the error ("ControlNetHED.pth").
pub(crate) fn checked(
    get: Getter,
    name: &str,
    shape: &[usize],
    what: &str,
    device: &Device,
) -> Result<Tensor, String> {
    let t = get(name)?;
    if t.dims() != shape {
        return Err(format!(
            "{name} has shape {:?}, expected {shape:?} (not {what}?)",
            t.dims()
        ));
    }
    t.to_dtype(DType::F32)
        .and_then(|t| t.to_device(device))
        .map_err(|e| format!("{name}: {e}"))
}

/// A getter over a weight file (`.pth` read without running pickle code, or `.safetensors`),
/// trying each of `prefixes` before the name (PiDiNet's checkpoints carry `module.`).
pub(crate) fn file_getter(
    path: &Path,
    prefixes: &'static [&'static str],
    what: &'static str,
) -> Result<impl Fn(&str) -> Result<Tensor, String>, String> {
    let store = sd_weights::Store::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let path = path.to_path_buf();
    Ok(move |name: &str| {
        for p in prefixes {
            let key = format!("{p}{name}");
            if store.contains(&key) {
                return store
                    .get(&key)
                    .map_err(|e| format!("{}: {key}: {e}", path.display()));
            }
        }
        Err(format!(
            "{}: no tensor `{name}` (not {what}?)",
            path.display()
        ))
    })
}

struct Block {
    convs: Vec<Conv2d>,
    projection: Conv2d,
}

/// `ControlNetHED_Apache2`.
pub struct HedNet {
    norm: Tensor,
    blocks: Vec<Block>,
}

const WHAT: &str = "ControlNetHED.pth";

impl HedNet {
    /// Build from a tensor getter, checking every shape.
    pub fn new(get: Getter, device: &Device) -> Result<Self, String> {
        let norm = checked(get, "norm", &[1, 3, 1, 1], WHAT, device)?;
        // 3x3 convs keep the size (padding 1); the 1x1 projections have none
        let conv = |name: String, o, i, k| -> Result<Conv2d, String> {
            let w = checked(get, &format!("{name}.weight"), &[o, i, k, k], WHAT, device)?;
            let b = checked(get, &format!("{name}.bias"), &[o], WHAT, device)?;
            Conv2d::new(&w, Some(&b), Geometry::same(k, 1)).map_err(|e| e.to_string())
        };
        let mut blocks = Vec::new();
        for (b, &(i, o, n)) in BLOCKS.iter().enumerate() {
            let convs = (0..n)
                .map(|c| {
                    let cin = if c == 0 { i } else { o };
                    conv(format!("block{}.convs.{c}", b + 1), o, cin, 3)
                })
                .collect::<Result<_, _>>()?;
            let projection = conv(format!("block{}.projection", b + 1), 1, o, 1)?;
            blocks.push(Block { convs, projection });
        }
        Ok(Self { norm, blocks })
    }

    /// Load `ControlNetHED.pth` or a safetensors file with its keys.
    pub fn load(path: &Path, device: &Device) -> Result<Self, String> {
        let get = file_getter(path, &[""], WHAT)?;
        Self::new(&get, device)
    }

    /// `x`: `[1, 3, H, W]` RGB 0..255. Returns the five side outputs `[1, 1, H / 2^i, W / 2^i]`
    /// (pools round down), before any sigmoid.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        let mut h = x.broadcast_sub(&self.norm)?;
        let mut out = Vec::with_capacity(self.blocks.len());
        for (i, b) in self.blocks.iter().enumerate() {
            if i > 0 {
                h = h.max_pool2d(2)?;
            }
            for c in &b.convs {
                h = c.forward(&h)?.relu()?;
            }
            out.push(b.projection.forward(&h)?);
        }
        Ok(out)
    }
}

/// `safe_step(x, 2)` of controlnet_aux's util: `int32(float32(x) * 3) / 2` in float32.
pub fn safe_step(x: f32) -> f32 {
    ((x * 3.0) as i32) as f32 / 2.0
}

/// An 8-bit level from an edge strength in 0..1 computed in float32: `(e * 255).clip(0, 255)`
/// truncated.
pub fn level_f32(e: f32) -> u8 {
    (e * 255.0).clamp(0.0, 255.0) as u8
}

/// A grey map as an RGB image (`HWC3`).
pub fn grey_to_rgb(grey: &[u8], width: usize, height: usize) -> ImageBuf {
    ImageBuf {
        width,
        height,
        channels: 3,
        data: grey.iter().flat_map(|&v| [v, v, v]).collect(),
    }
}

/// A `[1, 1, h, w]` tensor as its values and size.
pub(crate) fn plane(t: &Tensor) -> candle_core::Result<(Vec<f32>, usize, usize)> {
    let (_, _, h, w) = t.dims4()?;
    Ok((t.flatten_all()?.to_vec1::<f32>()?, h, w))
}

/// The edge map of an image (any channel count) at its own size: `HEDdetector.__call__`
/// after its resize (controlnet_aux resizes to `detect_resolution` first, as the caller does).
pub fn edge_map(net: &HedNet, input: &ImageBuf, safe: bool) -> Result<ImageBuf, String> {
    let rgb = hwc3(input);
    let (w, h) = (rgb.width, rgb.height);
    if w < 16 || h < 16 {
        return Err(format!(
            "image {w}x{h} is too small for HED (16 pixels a side at least)"
        ));
    }
    let run = || -> candle_core::Result<Vec<(Vec<f32>, usize, usize)>> {
        let x: Vec<f32> = rgb.data.iter().map(|&v| v as f32).collect();
        let x = Tensor::from_vec(x, (h, w, 3), &Device::Cpu)?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .contiguous()?;
        net.forward(&x)?.iter().map(plane).collect()
    };
    let sides = run().map_err(|e| e.to_string())?;
    let sides: Vec<Vec<f32>> = sides
        .into_iter()
        .map(|(v, sh, sw)| resize_f32(&v, sw, sh, 1, w, h, Interp::Linear))
        .collect();
    let n = sides.len() as f32;
    let grey: Vec<u8> = (0..w * h)
        .map(|i| {
            // np.mean over the stacked maps: a float32 sum in order, then / 5
            let mean = sides.iter().fold(0.0f32, |s, m| s + m[i]) / n;
            let edge = 1.0 / (1.0 + (-(mean as f64)).exp());
            if safe {
                level_f32(safe_step(edge as f32))
            } else {
                (edge * 255.0).clamp(0.0, 255.0) as u8
            }
        })
        .collect();
    Ok(grey_to_rgb(&grey, w, h))
}

fn model_cache() -> &'static Mutex<HashMap<PathBuf, Arc<HedNet>>> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, Arc<HedNet>>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// The network at `path`, loaded once per process (shared by both preprocessor names).
pub fn load_cached(path: &Path) -> Result<Arc<HedNet>, String> {
    let mut cache = model_cache().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = cache.get(path) {
        return Ok(n.clone());
    }
    let n = Arc::new(HedNet::load(path, &Device::Cpu)?);
    cache.insert(path.to_path_buf(), n.clone());
    Ok(n)
}

/// `softedge_hed` (`safe: false`) and `softedge_hedsafe` (`safe: true`).
pub struct SoftedgeHed {
    pub safe: bool,
}

impl Preprocessor for SoftedgeHed {
    fn name(&self) -> &str {
        if self.safe {
            "softedge_hedsafe"
        } else {
            "softedge_hed"
        }
    }
    fn description(&self) -> &str {
        if self.safe {
            "Soft edges by HED (ControlNetHED.pth), quantised to 3 levels by safe_step \
             (controlnet_aux HEDdetector safe=True)"
        } else {
            "Soft edges by HED (ControlNetHED.pth, lllyasviel's Apache-2.0 model; \
             controlnet_aux HEDdetector)"
        }
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::string(
            "model",
            "",
            "ControlNetHED.pth or .safetensors; empty: looked for in the annotator folder",
        )]
    }
    fn cache_salt(&self, params: &Params) -> Result<String, PluginError> {
        crate::weights::weights_salt(self.name(), params, &WEIGHT_FILES)
    }
    fn process(&self, input: &ImageBuf, params: &Params) -> Result<ImageBuf, PluginError> {
        let path = crate::weights::find_weights(self.name(), params, &WEIGHT_FILES)?;
        let net = load_cached(&path).map_err(|e| PluginError::failed(self.name(), e))?;
        edge_map(&net, input, self.safe).map_err(|e| PluginError::failed(self.name(), e))
    }
}

register_preprocessor!(SoftedgeHed { safe: false });
register_preprocessor!(SoftedgeHed { safe: true });
