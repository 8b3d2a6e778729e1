//! ESRGAN / Real-ESRGAN upscalers: basicsr's `RRDBNet` (ESRGAN, Real-ESRGAN x4plus / x2plus /
//! anime_6B, BSRGAN, old-ESRGAN community models) and Real-ESRGAN's `SRVGGNetCompact`
//! (realesr-general-x4v3, realesr-animevideov3), with the configuration read from the weights,
//! and Real-ESRGAN's tiled processing ([`Upscaler::upscale`]).
//!
//! Weight files: `.safetensors` or `.pth` (read without running pickle code), plain state dicts
//! or Real-ESRGAN's `{"params_ema": ..., "params": ...}` (`params_ema` preferred), under any of
//! three namings, mapped to basicsr's as A1111 (`modules/esrgan_model.py`, `resrgan2normal` /
//! `mod2normal`) and spandrel (`architectures/ESRGAN`) map them:
//!
//! | basicsr (Real-ESRGAN)       | BSRGAN / RealSR              | old ESRGAN                        |
//! |-----------------------------|------------------------------|-----------------------------------|
//! | `conv_first`                | `conv_first`                 | `model.0`                         |
//! | `body.N.rdbM.convK`         | `RRDB_trunk.N.RDBM.convK`    | `model.1.sub.N.RDBM.convK.0`      |
//! | `conv_body`                 | `trunk_conv`                 | `model.1.sub.{num_block}`         |
//! | `conv_up1`, `conv_up2`, ... | `upconv1`, `upconv2`, ...    | `model.3`, `model.6`, ...         |
//! | `conv_hr`                   | `HRconv`                     | `model.{3 * ups + 2}` (`model.8`) |
//! | `conv_last`                 | `conv_last`                  | `model.{3 * ups + 4}` (`model.10`)|
//!
//! The computation is on the CPU in f32: every 3x3 convolution a phase-layout Winograd one with
//! its activation or residual fused in ([`crate::cpu::winograd_phase`], [`Upscaler::forward`]);
//! the same networks op by op on candle with the project's convolution
//! ([`crate::model::nn::Conv2d`]) are kept as the reference ([`Upscaler::forward_reference`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use sd_weights::Store;

use crate::cpu::winograd_phase::{conv3x3, Epilogue, Phased, WinoWeights};
use crate::model::nn::{conv2d, Conv2d};

/// A weight file that is not a usable upscaler, or an upscaling request that cannot be done.
/// Every variant about a file names it, and the tensor where there is one.
#[derive(Debug, thiserror::Error)]
pub enum UpscaleError {
    /// The file could not be read at all (missing, not a weight file, a refused pickle).
    #[error(transparent)]
    Read(Box<sd_weights::Error>),
    /// The file holds weights, but not an ESRGAN-family network's.
    #[error("{path}: not an ESRGAN / Real-ESRGAN model: {message}")]
    NotEsrgan { path: PathBuf, message: String },
    /// A tensor the detected network needs is not in the file.
    #[error("{path}: no tensor `{key}` ({what})")]
    MissingTensor {
        path: PathBuf,
        key: String,
        what: String,
    },
    /// A tensor has a shape other than the detected network needs.
    #[error("{path}: tensor `{key}` has shape {got:?}, expected {want:?} ({what})")]
    Shape {
        path: PathBuf,
        key: String,
        got: Vec<usize>,
        want: Vec<usize>,
        what: String,
    },
    /// A tensor could not be read or converted.
    #[error("{path}: tensor `{key}`: {source}")]
    Tensor {
        path: PathBuf,
        key: String,
        source: Box<candle_core::Error>,
    },
    /// A request the upscaler cannot serve (an empty image, a bad tile size).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Compute(Box<candle_core::Error>),
}

impl From<sd_weights::Error> for UpscaleError {
    fn from(e: sd_weights::Error) -> Self {
        UpscaleError::Read(Box::new(e))
    }
}

impl From<candle_core::Error> for UpscaleError {
    fn from(e: candle_core::Error) -> Self {
        UpscaleError::Compute(Box::new(e))
    }
}

pub type Result<T, E = UpscaleError> = std::result::Result<T, E>;

/// Which network a file holds, with its sizes as read from the weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Architecture {
    /// basicsr `RRDBNet`: `2^upsamples / unshuffle` is the scale.
    Rrdb {
        in_ch: usize,
        out_ch: usize,
        num_feat: usize,
        num_block: usize,
        num_grow_ch: usize,
        /// Nearest-x2 + conv stages (2 in every basicsr model; old ESRGAN files have 1 to 3).
        upsamples: usize,
        /// `pixel_unshuffle` factor on the input (1, or 2 for x2 and 4 for x1 Real-ESRGAN).
        unshuffle: usize,
    },
    /// Real-ESRGAN `SRVGGNetCompact` with PReLU activations.
    Compact {
        in_ch: usize,
        out_ch: usize,
        num_feat: usize,
        num_conv: usize,
        upscale: usize,
    },
}

impl Architecture {
    /// Output pixels per input pixel along each side.
    pub fn scale(&self) -> usize {
        match *self {
            Architecture::Rrdb {
                upsamples,
                unshuffle,
                ..
            } => (1 << upsamples) / unshuffle,
            Architecture::Compact { upscale, .. } => upscale,
        }
    }

    /// Channels of the network's output (3 for RGB models).
    pub fn out_channels(&self) -> usize {
        match *self {
            Architecture::Rrdb { out_ch, .. } | Architecture::Compact { out_ch, .. } => out_ch,
        }
    }

    /// Input sides must be multiples of this (the `pixel_unshuffle` factor); Real-ESRGAN's
    /// `mod_scale`.
    pub fn multiple(&self) -> usize {
        match *self {
            Architecture::Rrdb { unshuffle, .. } => unshuffle,
            Architecture::Compact { .. } => 1,
        }
    }
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Architecture::Rrdb {
                num_feat,
                num_block,
                num_grow_ch,
                unshuffle,
                ..
            } => {
                write!(
                    f,
                    "RRDBNet x{} ({num_feat} features, {num_block} blocks, growth {num_grow_ch}",
                    self.scale()
                )?;
                if unshuffle > 1 {
                    write!(f, ", pixel_unshuffle {unshuffle}")?;
                }
                write!(f, ")")
            }
            Architecture::Compact {
                num_feat, num_conv, ..
            } => write!(
                f,
                "SRVGGNetCompact x{} ({num_feat} features, {num_conv} convolutions)",
                self.scale()
            ),
        }
    }
}

/// The key naming a file uses (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    Basicsr,
    Bsrgan,
    OldEsrgan,
    Compact,
}

impl Naming {
    pub fn describe(self) -> &'static str {
        match self {
            Naming::Basicsr => "basicsr names",
            Naming::Bsrgan => "BSRGAN names",
            Naming::OldEsrgan => "old ESRGAN names",
            Naming::Compact => "SRVGGNetCompact names",
        }
    }
}

/// What was read from a file: the network, its naming, and the prefix its tensors sit under
/// (`params_ema.`, `params.`, `module.` or nothing).
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub architecture: Architecture,
    pub naming: Naming,
    pub prefix: String,
}

impl std::fmt::Display for ModelInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}, {}", self.architecture, self.naming.describe())?;
        if !self.prefix.is_empty() {
            write!(f, " under `{}`", self.prefix.trim_end_matches('.'))?;
        }
        Ok(())
    }
}

/// The file's keys without their prefix: `params_ema` is preferred to `params` (Real-ESRGAN's
/// `RealESRGANer` and spandrel), and `module.` (DataParallel) is dropped.
fn strip_prefix(shapes: &BTreeMap<String, Vec<usize>>) -> (String, BTreeMap<String, Vec<usize>>) {
    for prefix in ["params_ema.", "params.", "module."] {
        let under: BTreeMap<String, Vec<usize>> = shapes
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v.clone())))
            .collect();
        if !under.is_empty() && (prefix != "module." || under.len() == shapes.len()) {
            return (prefix.to_string(), under);
        }
    }
    (String::new(), shapes.clone())
}

/// The largest `N + 1` over keys `{start}N{rest}`, for a numeric `N` (0 when none).
fn count_indexed(shapes: &BTreeMap<String, Vec<usize>>, start: &str) -> usize {
    shapes
        .keys()
        .filter_map(|k| {
            let tail = k.strip_prefix(start)?;
            let digits: String = tail.chars().take_while(|c| c.is_ascii_digit()).collect();
            digits.parse::<usize>().ok().map(|n| n + 1)
        })
        .max()
        .unwrap_or(0)
}

/// The `model.N.weight` indices of an old-ESRGAN file (top-level layers only).
fn old_layer_indices(shapes: &BTreeMap<String, Vec<usize>>) -> Vec<usize> {
    let mut v: Vec<usize> = shapes
        .keys()
        .filter_map(|k| {
            k.strip_prefix("model.")?
                .strip_suffix(".weight")?
                .parse()
                .ok()
        })
        .collect();
    v.sort_unstable();
    v
}

/// The canonical (basicsr) layer names of an RRDBNet, each with what it is.
fn rrdb_layers(num_block: usize, upsamples: usize) -> Vec<String> {
    let mut v = vec!["conv_first".to_string()];
    for b in 0..num_block {
        for r in 1..=3 {
            for c in 1..=5 {
                v.push(format!("body.{b}.rdb{r}.conv{c}"));
            }
        }
    }
    v.push("conv_body".into());
    for u in 1..=upsamples {
        v.push(format!("conv_up{u}"));
    }
    v.push("conv_hr".into());
    v.push("conv_last".into());
    v
}

/// The file's name of canonical layer `layer` under `naming`.
fn file_layer(naming: Naming, layer: &str, num_block: usize, upsamples: usize) -> String {
    let body = |l: &str| -> Option<(String, String, String)> {
        let mut it = l.strip_prefix("body.")?.split('.');
        let (n, rdb, conv) = (it.next()?, it.next()?, it.next()?);
        Some((
            n.to_string(),
            rdb.strip_prefix("rdb")?.to_string(),
            conv.to_string(),
        ))
    };
    match naming {
        Naming::Basicsr | Naming::Compact => layer.to_string(),
        Naming::Bsrgan => match layer {
            "conv_body" => "trunk_conv".into(),
            "conv_hr" => "HRconv".into(),
            l if l.starts_with("conv_up") => format!("upconv{}", &l["conv_up".len()..]),
            l => match body(l) {
                Some((n, m, c)) => format!("RRDB_trunk.{n}.RDB{m}.{c}"),
                None => l.to_string(),
            },
        },
        // A1111 modules/esrgan_model.py resrgan2normal: body.N.rdbM.convK -> model.1.sub.N.RDBM.convK.0
        Naming::OldEsrgan => match layer {
            "conv_first" => "model.0".into(),
            "conv_body" => format!("model.1.sub.{num_block}"),
            "conv_hr" => format!("model.{}", 3 * upsamples + 2),
            "conv_last" => format!("model.{}", 3 * upsamples + 4),
            l if l.starts_with("conv_up") => {
                let u: usize = l["conv_up".len()..].parse().unwrap_or(0);
                format!("model.{}", 3 * u)
            }
            l => match body(l) {
                Some((n, m, c)) => format!("model.1.sub.{n}.RDB{m}.{c}.0"),
                None => l.to_string(),
            },
        },
    }
}

/// The network and naming the keys and shapes describe (no tensor data read).
pub fn detect(path: &Path, all: &BTreeMap<String, Vec<usize>>) -> Result<ModelInfo> {
    let (prefix, shapes) = strip_prefix(all);
    let not = |message: String| UpscaleError::NotEsrgan {
        path: path.to_path_buf(),
        message,
    };
    let has = |k: &str| shapes.contains_key(k);
    let dims = |k: &str| shapes.get(k).cloned().unwrap_or_default();
    let conv_dims = |k: &str| -> Result<[usize; 4]> {
        if !has(k) {
            return Err(UpscaleError::MissingTensor {
                path: path.to_path_buf(),
                key: format!("{prefix}{k}"),
                what: "a 3x3 convolution the other keys imply".into(),
            });
        }
        let d = dims(k);
        match d[..] {
            [o, i, 3, 3] => Ok([o, i, 3, 3]),
            _ => Err(UpscaleError::Shape {
                path: path.to_path_buf(),
                key: format!("{prefix}{k}"),
                got: d,
                want: vec![0, 0, 3, 3],
                what: "a 3x3 convolution".into(),
            }),
        }
    };
    if has("model.1.sub.0.RDB1.conv1x1.weight") {
        return Err(not(
            "an ESRGAN+ model (conv1x1 in its dense blocks), which is not supported".into(),
        ));
    }
    let naming = if has("conv_first.weight") && has("body.0.rdb1.conv1.weight") {
        Naming::Basicsr
    } else if has("conv_first.weight") && has("RRDB_trunk.0.RDB1.conv1.weight") {
        Naming::Bsrgan
    } else if has("model.0.weight") && has("model.1.sub.0.RDB1.conv1.0.weight") {
        Naming::OldEsrgan
    } else if has("body.0.weight") && dims("body.1.weight").len() == 1 {
        Naming::Compact
    } else {
        let sample: Vec<&str> = all.keys().take(4).map(String::as_str).collect();
        return Err(not(format!(
            "none of the RRDBNet (`conv_first.weight` + `body.0.rdb1.conv1.weight`, or old \
             ESRGAN `model.0.weight` + `model.1.sub.0.RDB1.conv1.0.weight`) or \
             SRVGGNetCompact (`body.0.weight` + PReLU `body.1.weight`) keys; its {} tensors \
             begin {sample:?}",
            all.len()
        )));
    };
    if naming == Naming::Compact {
        let n = count_indexed(&shapes, "body.");
        // body: conv, prelu, (conv, prelu) x num_conv, conv
        if n < 3 || n.is_multiple_of(2) {
            return Err(not(format!(
                "SRVGGNetCompact keys with {n} body layers (expected an odd number, at least 3)"
            )));
        }
        let [num_feat, in_ch, _, _] = conv_dims("body.0.weight")?;
        let last = format!("body.{}.weight", n - 1);
        let [o, _, _, _] = conv_dims(&last)?;
        let upscale = (1..=8).find(|s| o % (s * s) == 0 && o / (s * s) == in_ch);
        let Some(upscale) = upscale else {
            return Err(not(format!(
                "`{prefix}{last}` makes {o} channels: not {in_ch} x scale^2"
            )));
        };
        return Ok(ModelInfo {
            architecture: Architecture::Compact {
                in_ch,
                out_ch: o / (upscale * upscale),
                num_feat,
                num_conv: (n - 3) / 2,
                upscale,
            },
            naming,
            prefix,
        });
    }
    let (num_block, upsamples) = match naming {
        Naming::Basicsr => (
            count_indexed(&shapes, "body."),
            count_indexed(&shapes, "conv_up").saturating_sub(1),
        ),
        Naming::Bsrgan => (
            count_indexed(&shapes, "RRDB_trunk."),
            count_indexed(&shapes, "upconv").saturating_sub(1),
        ),
        _ => {
            // spandrel ESRGAN _get_scale: [Upsample, conv, LeakyReLU] per x2 after model.1,
            // then conv_hr, LeakyReLU, conv_last
            let idx = old_layer_indices(&shapes);
            let last = idx.last().copied().unwrap_or(0);
            if last < 4 || (last - 4) % 3 != 0 {
                return Err(not(format!(
                    "old ESRGAN keys whose last layer is `model.{last}` (expected model.4, \
                     model.7, model.10, ...: conv_last after x2 upsampling stages)"
                )));
            }
            (count_indexed(&shapes, "model.1.sub."), (last - 4) / 3)
        }
    };
    // the old naming's conv_body is model.1.sub.{num_block}, one past the blocks
    let num_block = if naming == Naming::OldEsrgan {
        num_block.saturating_sub(1)
    } else {
        num_block
    };
    let name = |layer: &str| file_layer(naming, layer, num_block, upsamples);
    let [num_feat, in_ch, _, _] = conv_dims(&format!("{}.weight", name("conv_first")))?;
    let [num_grow_ch, _, _, _] = conv_dims(&format!("{}.weight", name("body.0.rdb1.conv1")))?;
    let last = format!("{}.weight", name("conv_last"));
    if !has(&last) {
        return Err(UpscaleError::MissingTensor {
            path: path.to_path_buf(),
            key: format!("{prefix}{last}"),
            what: format!("conv_last of an RRDBNet with {upsamples} upsampling stages"),
        });
    }
    let [out_ch, _, _, _] = conv_dims(&last)?;
    // spandrel: pixel_unshuffle when the input has 4 or 16 times the output's channels
    // (basicsr RRDBNet scale 2 / scale 1)
    let unshuffle = match in_ch {
        c if c == out_ch * 4 => 2,
        c if c == out_ch * 16 => 4,
        c if c == out_ch => 1,
        c => {
            return Err(not(format!(
                "conv_first takes {c} channels and conv_last makes {out_ch}: neither equal nor \
                 a pixel_unshuffle of 2 or 4"
            )))
        }
    };
    if (1 << upsamples) < unshuffle {
        return Err(not(format!(
            "{upsamples} upsampling stages after a pixel_unshuffle of {unshuffle}: a scale below 1"
        )));
    }
    Ok(ModelInfo {
        architecture: Architecture::Rrdb {
            in_ch,
            out_ch,
            num_feat,
            num_block,
            num_grow_ch,
            upsamples,
            unshuffle,
        },
        naming,
        prefix,
    })
}

/// Every tensor the network needs: canonical name, shape, what it is.
fn expected_tensors(arch: &Architecture) -> Vec<(String, Vec<usize>, String)> {
    let mut v = Vec::new();
    let conv = |v: &mut Vec<_>, name: &str, o: usize, i: usize, what: String| {
        v.push((format!("{name}.weight"), vec![o, i, 3, 3], what.clone()));
        v.push((format!("{name}.bias"), vec![o], what));
    };
    match *arch {
        Architecture::Rrdb {
            in_ch,
            out_ch,
            num_feat: f,
            num_block,
            num_grow_ch: g,
            upsamples,
            ..
        } => {
            for layer in rrdb_layers(num_block, upsamples) {
                let (o, i) = match layer.as_str() {
                    "conv_first" => (f, in_ch),
                    "conv_last" => (out_ch, f),
                    l => match l.rsplit_once(".conv") {
                        Some((_, "5")) => (f, f + 4 * g),
                        Some((_, k)) => (g, f + (k.parse::<usize>().unwrap_or(1) - 1) * g),
                        None => (f, f),
                    },
                };
                conv(&mut v, &layer, o, i, format!("{layer} of {arch}"));
            }
        }
        Architecture::Compact {
            in_ch,
            out_ch,
            num_feat: f,
            num_conv,
            upscale,
        } => {
            conv(&mut v, "body.0", f, in_ch, format!("conv 1 of {arch}"));
            for k in 0..=num_conv {
                let what = format!("PReLU {} of {arch}", k + 1);
                v.push((format!("body.{}.weight", 2 * k + 1), vec![f], what));
                if k < num_conv {
                    let what = format!("conv {} of {arch}", k + 2);
                    conv(&mut v, &format!("body.{}", 2 * k + 2), f, f, what);
                }
            }
            let o = out_ch * upscale * upscale;
            let what = format!("the last conv of {arch}");
            conv(&mut v, &format!("body.{}", 2 * num_conv + 2), o, f, what);
        }
    }
    v
}

/// One residual dense block: five convs over the growing concatenation.
struct DenseBlock {
    convs: [Conv2d; 5],
}

impl DenseBlock {
    fn new(vb: VarBuilder, f: usize, g: usize) -> candle_core::Result<Self> {
        let c = |k: usize| {
            let o = if k == 5 { f } else { g };
            conv2d(f + (k - 1) * g, o, 3, 1, 1, vb.pp(format!("conv{k}")))
        };
        Ok(Self {
            convs: [c(1)?, c(2)?, c(3)?, c(4)?, c(5)?],
        })
    }

    // basicsr ResidualDenseBlock.forward: x5 * 0.2 + x
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut cat = x.clone();
        for conv in &self.convs[..4] {
            let y = leaky_relu(&conv.forward(&cat)?)?;
            cat = Tensor::cat(&[&cat, &y], 1)?;
        }
        let x5 = self.convs[4].forward(&cat)?;
        (x5 * 0.2)? + x
    }
}

struct Rrdb {
    rdbs: [DenseBlock; 3],
}

impl Rrdb {
    // basicsr RRDB.forward: rdb3(rdb2(rdb1(x))) * 0.2 + x
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut out = x.clone();
        for r in &self.rdbs {
            out = r.forward(&out)?;
        }
        (out * 0.2)? + x
    }
}

struct RrdbNet {
    unshuffle: usize,
    conv_first: Conv2d,
    body: Vec<Rrdb>,
    conv_body: Conv2d,
    ups: Vec<Conv2d>,
    conv_hr: Conv2d,
    conv_last: Conv2d,
}

impl RrdbNet {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let feat = if self.unshuffle > 1 {
            pixel_unshuffle(x, self.unshuffle)?
        } else {
            x.clone()
        };
        let feat = self.conv_first.forward(&feat)?;
        let mut h = feat.clone();
        for b in &self.body {
            h = b.forward(&h)?;
        }
        let mut feat = (self.conv_body.forward(&h)? + feat)?;
        for up in &self.ups {
            let (_, _, hh, ww) = feat.dims4()?;
            feat = leaky_relu(&up.forward(&feat.upsample_nearest2d(2 * hh, 2 * ww)?)?)?;
        }
        self.conv_last
            .forward(&leaky_relu(&self.conv_hr.forward(&feat)?)?)
    }
}

struct Compact {
    upscale: usize,
    convs: Vec<Conv2d>,
    /// Per-channel PReLU slopes, `[1, C, 1, 1]`.
    slopes: Vec<Tensor>,
}

impl Compact {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut out = x.clone();
        for (i, conv) in self.convs.iter().enumerate() {
            out = conv.forward(&out)?;
            if let Some(a) = self.slopes.get(i) {
                // PReLU: max(0, x) + a * min(0, x)
                out = (out.relu()? + out.minimum(0f32)?.broadcast_mul(a)?)?;
            }
        }
        let out = pixel_shuffle(&out, self.upscale)?;
        let (_, _, h, w) = x.dims4()?;
        // srvgg_arch.py: out += F.interpolate(x, scale_factor=upscale, mode='nearest')
        out + x.upsample_nearest2d(h * self.upscale, w * self.upscale)?
    }
}

enum Net {
    Rrdb(Box<RrdbNet>),
    Compact(Compact),
}

/// The networks on [`crate::cpu::winograd_phase`]: every 3x3 convolution a phase-layout
/// Winograd one with its activation or residual fused in (the CPU path [`Upscaler::forward`]
/// takes; [`Net`] is the op-by-op candle reference).
enum FastNet {
    Rrdb(Box<FastRrdb>),
    Compact {
        upscale: usize,
        convs: Vec<WinoWeights>,
        slopes: Vec<Vec<f32>>,
    },
}

struct FastRrdb {
    unshuffle: usize,
    conv_first: WinoWeights,
    /// Per RRDB, per dense block, its five convolutions.
    body: Vec<[[WinoWeights; 5]; 3]>,
    conv_body: WinoWeights,
    ups: Vec<WinoWeights>,
    conv_hr: WinoWeights,
    conv_last: WinoWeights,
}

/// basicsr's activation slope.
const SLOPE: f32 = 0.2;

impl FastNet {
    fn new(arch: &Architecture, t: &HashMap<String, Tensor>) -> Result<Self> {
        let vec = |name: &str| -> Result<Vec<f32>> {
            let x = t
                .get(name)
                .ok_or_else(|| UpscaleError::Invalid(format!("no tensor {name} for {arch}")))?;
            Ok(x.flatten_all()?.to_vec1::<f32>()?)
        };
        let conv = |name: &str, o: usize, c: usize| -> Result<WinoWeights> {
            let w = vec(&format!("{name}.weight"))?;
            let b = vec(&format!("{name}.bias"))?;
            if w.len() != o * c * 9 || b.len() != o {
                return Err(UpscaleError::Invalid(format!(
                    "{name}: {} weights and {} biases for {o}x{c}x3x3",
                    w.len(),
                    b.len()
                )));
            }
            Ok(WinoWeights::new(&w, Some(&b), o, c))
        };
        Ok(match *arch {
            Architecture::Rrdb {
                in_ch,
                out_ch,
                num_feat: f,
                num_block,
                num_grow_ch: g,
                upsamples,
                unshuffle,
            } => {
                let rdb = |b: usize, r: usize| -> Result<[WinoWeights; 5]> {
                    let k = |k: usize| {
                        let o = if k == 5 { f } else { g };
                        conv(&format!("body.{b}.rdb{r}.conv{k}"), o, f + (k - 1) * g)
                    };
                    Ok([k(1)?, k(2)?, k(3)?, k(4)?, k(5)?])
                };
                FastNet::Rrdb(Box::new(FastRrdb {
                    unshuffle,
                    conv_first: conv("conv_first", f, in_ch)?,
                    body: (0..num_block)
                        .map(|b| Ok([rdb(b, 1)?, rdb(b, 2)?, rdb(b, 3)?]))
                        .collect::<Result<_>>()?,
                    conv_body: conv("conv_body", f, f)?,
                    ups: (1..=upsamples)
                        .map(|u| conv(&format!("conv_up{u}"), f, f))
                        .collect::<Result<_>>()?,
                    conv_hr: conv("conv_hr", f, f)?,
                    conv_last: conv("conv_last", out_ch, f)?,
                }))
            }
            Architecture::Compact {
                in_ch,
                out_ch,
                num_feat: f,
                num_conv,
                upscale,
            } => {
                let mut convs = vec![conv("body.0", f, in_ch)?];
                let mut slopes = Vec::new();
                for k in 0..=num_conv {
                    slopes.push(vec(&format!("body.{}.weight", 2 * k + 1))?);
                    if k < num_conv {
                        convs.push(conv(&format!("body.{}", 2 * k + 2), f, f)?);
                    }
                }
                let o = out_ch * upscale * upscale;
                convs.push(conv(&format!("body.{}", 2 * num_conv + 2), o, f)?);
                FastNet::Compact {
                    upscale,
                    convs,
                    slopes,
                }
            }
        })
    }

    /// One image `[1, C, H, W]` (f32, contiguous).
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            FastNet::Rrdb(net) => {
                let FastRrdb {
                    unshuffle,
                    conv_first,
                    body,
                    conv_body,
                    ups,
                    conv_hr,
                    conv_last,
                } = &**net;
                let x = if *unshuffle > 1 {
                    pixel_unshuffle(x, *unshuffle)?
                } else {
                    x.clone()
                };
                let (_, c, h, w) = x.dims4()?;
                let input = Phased::from_planar(&x.flatten_all()?.to_vec1::<f32>()?, c, h, w);
                let feat = conv3x3(&[&input], conv_first, Epilogue::None);
                let mut trunk: Option<Phased> = None;
                for rrdb in body {
                    let x0 = trunk.as_ref().unwrap_or(&feat);
                    let mut out = dense_block(x0, &rrdb[0]);
                    out = dense_block(&out, &rrdb[1]);
                    out = dense_block(&out, &rrdb[2]);
                    // basicsr RRDB.forward: out * 0.2 + x
                    out.scale_add(0.2, x0);
                    trunk = Some(out);
                }
                let trunk = trunk.as_ref().unwrap_or(&feat);
                let res = Epilogue::Residual {
                    scale: 1.0,
                    add: &feat,
                };
                let mut feat = conv3x3(&[trunk], conv_body, res);
                for up in ups {
                    let big = feat.upsample_nearest2x();
                    feat = conv3x3(&[&big], up, Epilogue::LeakyRelu(SLOPE));
                }
                let hr = conv3x3(&[&feat], conv_hr, Epilogue::LeakyRelu(SLOPE));
                let out = conv3x3(&[&hr], conv_last, Epilogue::None);
                Tensor::from_vec(out.to_planar(), (1, out.c, out.h, out.w), &Device::Cpu)
            }
            FastNet::Compact {
                upscale,
                convs,
                slopes,
            } => {
                let (_, c, h, w) = x.dims4()?;
                let mut out = Phased::from_planar(&x.flatten_all()?.to_vec1::<f32>()?, c, h, w);
                for (i, conv) in convs.iter().enumerate() {
                    let epi = match slopes.get(i) {
                        Some(a) => Epilogue::PRelu(a),
                        None => Epilogue::None,
                    };
                    out = conv3x3(&[&out], conv, epi);
                }
                let y = Tensor::from_vec(out.to_planar(), (1, out.c, h, w), &Device::Cpu)?;
                let y = pixel_shuffle(&y, *upscale)?;
                // srvgg_arch.py: out += F.interpolate(x, scale_factor=upscale, mode='nearest')
                y + x.upsample_nearest2d(h * upscale, w * upscale)?
            }
        }
    }
}

/// basicsr ResidualDenseBlock: `x_k = lrelu(conv_k(cat(x, x1 .. x_{k-1})))` for k < 5, then
/// `conv5(cat(x, x1 .. x4)) * 0.2 + x`; the concatenations are never built.
fn dense_block(x: &Phased, convs: &[WinoWeights; 5]) -> Phased {
    let mut feats: Vec<Phased> = Vec::with_capacity(4);
    for conv in &convs[..4] {
        let y = {
            let inputs: Vec<&Phased> = std::iter::once(x).chain(feats.iter()).collect();
            conv3x3(&inputs, conv, Epilogue::LeakyRelu(SLOPE))
        };
        feats.push(y);
    }
    let inputs: Vec<&Phased> = std::iter::once(x).chain(feats.iter()).collect();
    conv3x3(
        &inputs,
        &convs[4],
        Epilogue::Residual { scale: 0.2, add: x },
    )
}

/// `leaky_relu(x, 0.2)`, basicsr's activation.
fn leaky_relu(x: &Tensor) -> candle_core::Result<Tensor> {
    // max(x, 0.2 x) = leaky_relu for a slope below 1
    x.maximum(&(x * 0.2)?)
}

/// basicsr arch_util.pixel_unshuffle (= torch.pixel_unshuffle): `[B, C, H*r, W*r]` ->
/// `[B, C*r*r, H, W]`.
pub fn pixel_unshuffle(x: &Tensor, r: usize) -> candle_core::Result<Tensor> {
    let (b, c, hh, ww) = x.dims4()?;
    let (h, w) = (hh / r, ww / r);
    x.reshape((b, c, h, r, w, r))?
        .permute([0, 1, 3, 5, 2, 4])?
        .reshape((b, c * r * r, h, w))
}

/// torch.pixel_shuffle: `[B, C*r*r, H, W]` -> `[B, C, H*r, W*r]`.
pub fn pixel_shuffle(x: &Tensor, r: usize) -> candle_core::Result<Tensor> {
    let (b, crr, h, w) = x.dims4()?;
    let c = crr / (r * r);
    x.reshape((b, c, r, r, h, w))?
        .permute([0, 1, 4, 2, 5, 3])?
        .reshape((b, c, h * r, w * r))
}

/// A loaded upscaler.
pub struct Upscaler {
    info: ModelInfo,
    net: Net,
    fast: FastNet,
}

impl Upscaler {
    /// Read `path` (`.safetensors` / `.pth`), detect the network, check every tensor's shape.
    pub fn load(path: &Path) -> Result<Self> {
        let store = Store::open(path)?;
        let shapes = store.shapes();
        let info = detect(path, &shapes)?;
        let (num_block, upsamples) = match info.architecture {
            Architecture::Rrdb {
                num_block,
                upsamples,
                ..
            } => (num_block, upsamples),
            Architecture::Compact { .. } => (0, 0),
        };
        let mut tensors = HashMap::new();
        for (name, want, what) in expected_tensors(&info.architecture) {
            let (layer, kind) = name.rsplit_once('.').unwrap_or((&name, ""));
            let key = format!(
                "{}{}.{kind}",
                info.prefix,
                file_layer(info.naming, layer, num_block, upsamples)
            );
            let Some(got) = shapes.get(&key) else {
                return Err(UpscaleError::MissingTensor {
                    path: path.to_path_buf(),
                    key,
                    what,
                });
            };
            if *got != want {
                return Err(UpscaleError::Shape {
                    path: path.to_path_buf(),
                    key,
                    got: got.clone(),
                    want,
                    what,
                });
            }
            let t = store
                .get(&key)
                .and_then(|t| t.to_dtype(DType::F32))
                .map_err(|source| UpscaleError::Tensor {
                    path: path.to_path_buf(),
                    key: key.clone(),
                    source: Box::new(source),
                })?;
            tensors.insert(name, t);
        }
        let fast = FastNet::new(&info.architecture, &tensors)?;
        let net = build(&info.architecture, tensors)?;
        tracing::debug!(path = %path.display(), model = %info, "loaded an upscaler");
        Ok(Self { info, net, fast })
    }

    /// Build from tensors under basicsr (or SRVGGNetCompact) names, f32 on the CPU.
    pub fn from_tensors(
        architecture: Architecture,
        tensors: HashMap<String, Tensor>,
    ) -> Result<Self> {
        let fast = FastNet::new(&architecture, &tensors)?;
        let net = build(&architecture, tensors)?;
        Ok(Self {
            info: ModelInfo {
                architecture,
                naming: Naming::Basicsr,
                prefix: String::new(),
            },
            net,
            fast,
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The model's own scale.
    pub fn scale(&self) -> usize {
        self.info.architecture.scale()
    }

    /// The network on `[B, 3, H, W]` in [0, 1] (sides multiples of
    /// [`Architecture::multiple`]): `[B, 3, H*scale, W*scale]`, not clamped. Every convolution
    /// is a phase-layout Winograd one ([`crate::cpu::winograd_phase`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.checked(x)?;
        let outs = (0..x.dim(0)?)
            .map(|i| self.fast.forward(&x.narrow(0, i, 1)?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&outs, 0)?)
    }

    /// [`Upscaler::forward`] op by op with candle (and the project's im2col / Winograd
    /// convolution): the reference the fast path is tested against.
    pub fn forward_reference(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.checked(x)?;
        Ok(match &self.net {
            Net::Rrdb(n) => n.forward(&x)?,
            Net::Compact(n) => n.forward(&x)?,
        })
    }

    /// `x` as contiguous f32, its sides checked.
    fn checked(&self, x: &Tensor) -> Result<Tensor> {
        let m = self.info.architecture.multiple();
        let (_, c, h, w) = x.dims4()?;
        let want = match self.info.architecture {
            Architecture::Rrdb {
                in_ch, unshuffle, ..
            } => in_ch / (unshuffle * unshuffle),
            Architecture::Compact { in_ch, .. } => in_ch,
        };
        if h % m != 0 || w % m != 0 || h == 0 || w == 0 || c != want {
            return Err(UpscaleError::Invalid(format!(
                "the network takes {want} channels and sides that are non-zero multiples of \
                 {m}, got {c} channels of {w}x{h}"
            )));
        }
        Ok(x.to_dtype(DType::F32)?.contiguous()?)
    }

    /// Upscale `image` `[1, C, H, W]` in [0, 1] by the model's scale, in tiles of `tile`
    /// input pixels (0: the whole image at once) each seen with `overlap` pixels of context on
    /// every side, as Real-ESRGAN's `RealESRGANer` (`pre_process` mod pad, `tile_process`,
    /// `post_process`): every output pixel comes from exactly one tile, computed with that
    /// context, so there is no blending and no seam beyond what the missing context changes.
    /// `progress(done, total)` is called after each tile. Not clamped.
    pub fn upscale(
        &self,
        image: &Tensor,
        tile: usize,
        overlap: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let (b, _, h, w) = image.dims4()?;
        let c = self.info.architecture.out_channels();
        if h == 0 || w == 0 || b != 1 {
            return Err(UpscaleError::Invalid(format!(
                "cannot upscale an image of shape {:?}",
                image.dims()
            )));
        }
        let s = self.scale();
        let m = self.info.architecture.multiple();
        // realesrgan/utils.py pre_process: reflect-pad bottom and right to multiples of mod_scale
        let (ph, pw) = ((m - h % m) % m, (m - w % m) % m);
        let img = reflect_pad(&image.to_dtype(DType::F32)?, ph, pw)?;
        let (hh, ww) = (h + ph, w + pw);
        let out = if tile == 0 || (tile >= hh && tile >= ww) {
            progress(0, 1);
            let y = self.forward(&img)?;
            progress(1, 1);
            y
        } else {
            // tile and context rounded up to the unshuffle factor, so every tile divides
            let tile = tile.div_ceil(m) * m;
            let pad = overlap.div_ceil(m) * m;
            let (tx, ty) = (ww.div_ceil(tile), hh.div_ceil(tile));
            let (oh, ow) = (hh * s, ww * s);
            let mut out = vec![0f32; c * oh * ow];
            let total = tx * ty;
            progress(0, total);
            for yi in 0..ty {
                for xi in 0..tx {
                    // realesrgan/utils.py tile_process
                    let (x0, x1) = (xi * tile, ((xi + 1) * tile).min(ww));
                    let (y0, y1) = (yi * tile, ((yi + 1) * tile).min(hh));
                    let (px0, px1) = (x0.saturating_sub(pad), (x1 + pad).min(ww));
                    let (py0, py1) = (y0.saturating_sub(pad), (y1 + pad).min(hh));
                    let input = img.narrow(2, py0, py1 - py0)?.narrow(3, px0, px1 - px0)?;
                    let y = self.forward(&input)?;
                    let y = y
                        .narrow(2, (y0 - py0) * s, (y1 - y0) * s)?
                        .narrow(3, (x0 - px0) * s, (x1 - x0) * s)?
                        .squeeze(0)?
                        .to_vec3::<f32>()?;
                    for (ci, plane) in y.iter().enumerate() {
                        for (r, row) in plane.iter().enumerate() {
                            let at = (ci * oh + y0 * s + r) * ow + x0 * s;
                            out[at..at + row.len()].copy_from_slice(row);
                        }
                    }
                    progress(yi * tx + xi + 1, total);
                }
            }
            Tensor::from_vec(out, (1, c, oh, ow), &Device::Cpu)?
        };
        // post_process: drop the mod pad
        Ok(out.narrow(2, 0, h * s)?.narrow(3, 0, w * s)?)
    }
}

/// Reflect-pad (PyTorch's `reflect`: the edge not repeated) `ph` rows at the bottom and `pw`
/// columns at the right of `[B, C, H, W]`; an edge too short to reflect is repeated instead.
fn reflect_pad(x: &Tensor, ph: usize, pw: usize) -> candle_core::Result<Tensor> {
    let pad = |x: &Tensor, dim: usize, n: usize| -> candle_core::Result<Tensor> {
        if n == 0 {
            return Ok(x.clone());
        }
        let len = x.dim(dim)?;
        let idx: Vec<u32> = (0..len + n)
            .map(|i| {
                if i < len {
                    i
                } else if len > n {
                    2 * (len - 1) - i
                } else {
                    len - 1
                }
            })
            .map(|i| i as u32)
            .collect();
        let idx = Tensor::from_vec(idx, len + n, x.device())?;
        x.index_select(&idx, dim)
    };
    pad(&pad(x, 2, ph)?, 3, pw)?.contiguous()
}

fn build(arch: &Architecture, tensors: HashMap<String, Tensor>) -> Result<Net> {
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    Ok(match *arch {
        Architecture::Rrdb {
            in_ch,
            out_ch,
            num_feat: f,
            num_block,
            num_grow_ch: g,
            upsamples,
            unshuffle,
        } => {
            let c = |i: usize, o: usize, name: &str| conv2d(i, o, 3, 1, 1, vb.pp(name));
            let body = (0..num_block)
                .map(|b| {
                    let r = |k: usize| DenseBlock::new(vb.pp(format!("body.{b}.rdb{k}")), f, g);
                    Ok(Rrdb {
                        rdbs: [r(1)?, r(2)?, r(3)?],
                    })
                })
                .collect::<candle_core::Result<_>>()?;
            Net::Rrdb(Box::new(RrdbNet {
                unshuffle,
                conv_first: c(in_ch, f, "conv_first")?,
                body,
                conv_body: c(f, f, "conv_body")?,
                ups: (1..=upsamples)
                    .map(|u| c(f, f, &format!("conv_up{u}")))
                    .collect::<candle_core::Result<_>>()?,
                conv_hr: c(f, f, "conv_hr")?,
                conv_last: c(f, out_ch, "conv_last")?,
            }))
        }
        Architecture::Compact {
            in_ch,
            out_ch,
            num_feat: f,
            num_conv,
            upscale,
        } => {
            let mut convs = vec![conv2d(in_ch, f, 3, 1, 1, vb.pp("body.0"))?];
            let mut slopes = Vec::new();
            for k in 0..=num_conv {
                slopes.push(
                    vb.get(f, &format!("body.{}.weight", 2 * k + 1))?
                        .reshape((1, f, 1, 1))?,
                );
                if k < num_conv {
                    convs.push(conv2d(f, f, 3, 1, 1, vb.pp(format!("body.{}", 2 * k + 2)))?);
                }
            }
            let o = out_ch * upscale * upscale;
            convs.push(conv2d(
                f,
                o,
                3,
                1,
                1,
                vb.pp(format!("body.{}", 2 * num_conv + 2)),
            )?);
            Net::Compact(Compact {
                upscale,
                convs,
                slopes,
            })
        }
    })
}

/// The largest output side [`Upscaler::upscale_image`] makes (the input limit of image files,
/// so an output can be read back).
pub const MAX_OUTPUT_SIDE: u32 = sd_plugins_api::image_input::MAX_SIDE;

/// How [`Upscaler::upscale_image`] works: tile size and context in input pixels (tile 0: the
/// whole image), and the output scale when it is not the model's.
#[derive(Debug, Clone, Copy)]
pub struct UpscaleOptions {
    pub tile: usize,
    pub overlap: usize,
    pub scale: Option<f64>,
}

impl Default for UpscaleOptions {
    fn default() -> Self {
        Self {
            tile: 192,
            overlap: 16,
            scale: None,
        }
    }
}

/// The output size of a `width x height` image at `scale` (Real-ESRGAN `enhance`:
/// `int(w_input * outscale)`), refused when empty or larger than [`MAX_OUTPUT_SIDE`].
pub fn output_size(width: u32, height: u32, scale: f64) -> Result<(u32, u32)> {
    if !(scale.is_finite() && scale > 0.0) {
        return Err(UpscaleError::Invalid(format!(
            "scale {scale}: expected a positive number"
        )));
    }
    let side = |v: u32| (v as f64 * scale).floor();
    let (w, h) = (side(width), side(height));
    if w < 1.0 || h < 1.0 || w > MAX_OUTPUT_SIDE as f64 || h > MAX_OUTPUT_SIDE as f64 {
        return Err(UpscaleError::Invalid(format!(
            "{width}x{height} at scale {scale} makes {w}x{h}: each side must be 1 to {MAX_OUTPUT_SIDE}"
        )));
    }
    Ok((w as u32, h as u32))
}

impl Upscaler {
    /// Upscale an 8-bit image: RGB through the network ([`Upscaler::upscale`], clamped and
    /// rounded as Real-ESRGAN's `enhance`), alpha (if any) resized bilinearly (Real-ESRGAN's
    /// non-network `alpha_upsampler`), then, when `options.scale` is not the model's, the result
    /// resized with Lanczos3 to `int(side * scale)` (Real-ESRGAN `outscale`, which uses OpenCV's
    /// LANCZOS4; A1111 PIL's LANCZOS). `progress(done, total)` counts tiles.
    pub fn upscale_image(
        &self,
        image: &image::DynamicImage,
        options: UpscaleOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<image::DynamicImage> {
        use image::imageops::FilterType;
        let (w, h) = (image.width(), image.height());
        let s = self.scale();
        let target = output_size(w, h, options.scale.unwrap_or(s as f64))?;
        let (mw, mh) = (w as usize * s, h as usize * s);
        if mw.max(mh) > 4 * MAX_OUTPUT_SIDE as usize {
            return Err(UpscaleError::Invalid(format!(
                "{w}x{h} at the model's scale {s} makes {mw}x{mh}: too large to compute"
            )));
        }
        let rgb = image.to_rgb8();
        let data: Vec<f32> = rgb.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
        let x = Tensor::from_vec(data, (h as usize, w as usize, 3), &Device::Cpu)?
            .permute((2, 0, 1))?
            .unsqueeze(0)?;
        let y = self.upscale(&x, options.tile, options.overlap, progress)?;
        let pixels: Vec<u8> = y
            .squeeze(0)?
            .clamp(0f32, 1f32)?
            .permute((1, 2, 0))?
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|v| (v * 255.0).round() as u8)
            .collect();
        let color = image::RgbImage::from_raw(mw as u32, mh as u32, pixels)
            .ok_or_else(|| UpscaleError::Invalid("the network made a malformed image".into()))?;
        let mut out = if image.color().has_alpha() {
            let alpha = image::imageops::resize(
                &image.to_luma_alpha8(),
                mw as u32,
                mh as u32,
                FilterType::Triangle,
            );
            let mut rgba = image::RgbaImage::new(mw as u32, mh as u32);
            for ((d, c), a) in rgba.pixels_mut().zip(color.pixels()).zip(alpha.pixels()) {
                *d = image::Rgba([c[0], c[1], c[2], a[1]]);
            }
            image::DynamicImage::ImageRgba8(rgba)
        } else {
            image::DynamicImage::ImageRgb8(color)
        };
        if (out.width(), out.height()) != target {
            out = out.resize_exact(target.0, target.1, FilterType::Lanczos3);
        }
        Ok(out)
    }
}
