//! TAESD / TAESDXL: madebyollin's tiny autoencoder, as diffusers' `AutoencoderTiny`
//! (`models/autoencoders/autoencoder_tiny.py`, with `EncoderTiny` / `DecoderTiny` of
//! `models/autoencoders/vae.py` and `AutoencoderTinyBlock` of `models/unets/unet_2d_blocks.py`,
//! diffusers 0.42.1).
//!
//! Two weight layouts load into the same structure:
//!
//! | diffusers folder            | madebyollin's single files (taesd.py's `nn.Sequential`) |
//! |-----------------------------|----------------------------------------------------------|
//! | `encoder.layers.N.<rest>`   | `taesd_encoder.safetensors`: `N.<rest>`                  |
//! | `decoder.layers.N.<rest>`   | `taesd_decoder.safetensors`: `{N + 1}.<rest>`            |
//!
//! (the original decoder's layer 0 is the parameterless `Clamp`, which diffusers moved into
//! `DecoderTiny.forward`; the mapping is that of diffusers'
//! `scripts/convert_tiny_autoencoder_to_diffusers.py`). A folder is `config.json` +
//! `diffusion_pytorch_model[.fp16].safetensors`. A single file's structure (stage widths,
//! blocks per stage, latent channels) is read from its tensor shapes, a folder's from its
//! `config.json`; every tensor's shape is then checked against it. Single files come as
//! `.safetensors` or `.pth` (read without running pickle code).
//!
//! Latent conventions: [`AutoencoderTiny::decode`] takes the latents the UNet works on (the
//! scaled latents the pipeline hands to
//! [`AutoencoderKL::unscale_latents`](super::vae::AutoencoderKL::unscale_latents) before
//! `AutoencoderKL::decode`); [`AutoencoderTiny::encode`] returns the encoder's raw latents, as
//! diffusers' `AutoencoderTiny.encode(x).latents` does. For TAESD and TAESDXL
//! (`scaling_factor` 1, `shift_factor` 0) both are the same space.
//!
//! Every convolution is the project's [`Conv2d`] (the CPU fast path in f32). The convolutions
//! without a bias in diffusers (the encoder's stride-2 and the decoder's post-upsample ones) get
//! a zero bias, which adds exactly nothing.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use sd_weights::Store;
use serde::Deserialize;

use super::nn::{conv2d, Conv2d};
use crate::error::{read_json, Error, Result};

// ---- configuration -------------------------------------------------------------------------

/// `config.json` of a diffusers `AutoencoderTiny` folder, with the defaults of
/// `AutoencoderTiny.__init__` (diffusers 0.42.1) for absent keys.
#[derive(Debug, Clone, Deserialize)]
pub struct TinyConfigFile {
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    #[serde(default = "tiny_d::three")]
    pub in_channels: usize,
    #[serde(default = "tiny_d::three")]
    pub out_channels: usize,
    #[serde(default = "tiny_d::channels")]
    pub encoder_block_out_channels: Vec<usize>,
    #[serde(default = "tiny_d::channels")]
    pub decoder_block_out_channels: Vec<usize>,
    #[serde(default = "tiny_d::relu")]
    pub act_fn: String,
    #[serde(default = "tiny_d::nearest")]
    pub upsample_fn: String,
    #[serde(default = "tiny_d::four")]
    pub latent_channels: usize,
    #[serde(default = "tiny_d::two")]
    pub upsampling_scaling_factor: usize,
    #[serde(default = "tiny_d::encoder_blocks")]
    pub num_encoder_blocks: Vec<usize>,
    #[serde(default = "tiny_d::decoder_blocks")]
    pub num_decoder_blocks: Vec<usize>,
    #[serde(default = "tiny_d::three_f")]
    pub latent_magnitude: f64,
    #[serde(default = "tiny_d::half")]
    pub latent_shift: f64,
    #[serde(default)]
    pub force_upcast: bool,
    #[serde(default = "tiny_d::one_f")]
    pub scaling_factor: f64,
    /// `null` is read as 0, as the pipelines' `latents / scaling_factor + shift_factor` needs.
    #[serde(default)]
    pub shift_factor: Option<f64>,
}

mod tiny_d {
    pub fn three() -> usize {
        3
    }
    pub fn four() -> usize {
        4
    }
    pub fn two() -> usize {
        2
    }
    pub fn channels() -> Vec<usize> {
        vec![64; 4]
    }
    pub fn relu() -> String {
        "relu".into()
    }
    pub fn nearest() -> String {
        "nearest".into()
    }
    pub fn encoder_blocks() -> Vec<usize> {
        vec![1, 3, 3, 3]
    }
    pub fn decoder_blocks() -> Vec<usize> {
        vec![3, 3, 3, 1]
    }
    pub fn three_f() -> f64 {
        3.0
    }
    pub fn half() -> f64 {
        0.5
    }
    pub fn one_f() -> f64 {
        1.0
    }
}

/// The validated `AutoencoderTiny` configuration. The activation is ReLU and the upsampling
/// nearest-neighbour: the only values accepted (every published TAESD uses them).
#[derive(Debug, Clone, PartialEq)]
pub struct TinyConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub encoder_block_out_channels: Vec<usize>,
    pub decoder_block_out_channels: Vec<usize>,
    pub num_encoder_blocks: Vec<usize>,
    pub num_decoder_blocks: Vec<usize>,
    pub latent_channels: usize,
    pub upsampling_scaling_factor: usize,
    /// Only for packing latents into [0, 1] (diffusers' `AutoencoderTiny.scale_latents`); not
    /// used by encode / decode.
    pub latent_magnitude: f64,
    /// See `latent_magnitude`.
    pub latent_shift: f64,
    /// diffusers always registers `force_upcast=False` for `AutoencoderTiny`; kept as read.
    pub force_upcast: bool,
    pub scaling_factor: f64,
    pub shift_factor: f64,
}

impl Default for TinyConfig {
    /// madebyollin's TAESD / TAESDXL (diffusers' defaults).
    fn default() -> Self {
        let raw: TinyConfigFile = serde_json::from_str("{}").expect("defaults");
        TinyConfig::from_raw(&raw, Path::new("<defaults>")).expect("valid defaults")
    }
}

impl TinyConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw: TinyConfigFile = read_json(path)?;
        Self::from_raw(&raw, path)
    }

    pub fn from_raw(raw: &TinyConfigFile, path: &Path) -> Result<Self> {
        let bad = |key: &str, message: String| Error::config(path, format!("`{key}`: {message}"));
        if let Some(c) = &raw.class_name {
            if c != "AutoencoderTiny" {
                return Err(bad(
                    "_class_name",
                    format!("{c:?} is not a tiny autoencoder (expected \"AutoencoderTiny\")"),
                ));
            }
        }
        // diffusers get_activation lower-cases the name
        if raw.act_fn.to_lowercase() != "relu" {
            return Err(bad(
                "act_fn",
                format!("unsupported value {:?} (only \"relu\")", raw.act_fn),
            ));
        }
        if raw.upsample_fn != "nearest" {
            return Err(bad(
                "upsample_fn",
                format!("unsupported value {:?} (only \"nearest\")", raw.upsample_fn),
            ));
        }
        let positive = |key: &str, v: usize| {
            if v == 0 {
                Err(bad(key, "must be at least 1, found 0".into()))
            } else {
                Ok(())
            }
        };
        positive("in_channels", raw.in_channels)?;
        positive("out_channels", raw.out_channels)?;
        positive("latent_channels", raw.latent_channels)?;
        positive("upsampling_scaling_factor", raw.upsampling_scaling_factor)?;
        for (ch_key, ch, n_key, n) in [
            (
                "encoder_block_out_channels",
                &raw.encoder_block_out_channels,
                "num_encoder_blocks",
                &raw.num_encoder_blocks,
            ),
            (
                "decoder_block_out_channels",
                &raw.decoder_block_out_channels,
                "num_decoder_blocks",
                &raw.num_decoder_blocks,
            ),
        ] {
            if ch.is_empty() {
                return Err(bad(ch_key, "must name at least one stage, found []".into()));
            }
            if ch.len() != n.len() {
                return Err(bad(
                    n_key,
                    format!(
                        "{n:?} has {} entries, `{ch_key}` {ch:?} has {} (diffusers requires the \
                         same length)",
                        n.len(),
                        ch.len()
                    ),
                ));
            }
            positive(ch_key, ch[0])?;
            // EncoderTiny / DecoderTiny give each stage's conv that stage's own width as input
            // (vae.py), so torch only runs models whose stages are equally wide
            if ch.iter().any(|&c| c != ch[0]) {
                return Err(bad(
                    ch_key,
                    format!(
                        "{ch:?}: stages of different widths cannot run in diffusers' \
                         EncoderTiny / DecoderTiny"
                    ),
                ));
            }
        }
        let finite = |key: &str, v: f64| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(bad(key, format!("must be a finite number, found {v}")))
            }
        };
        finite("latent_magnitude", raw.latent_magnitude)?;
        finite("latent_shift", raw.latent_shift)?;
        finite("scaling_factor", raw.scaling_factor)?;
        if raw.scaling_factor == 0.0 {
            return Err(bad("scaling_factor", "must not be 0".into()));
        }
        let shift_factor = raw.shift_factor.unwrap_or(0.0);
        finite("shift_factor", shift_factor)?;
        Ok(TinyConfig {
            in_channels: raw.in_channels,
            out_channels: raw.out_channels,
            encoder_block_out_channels: raw.encoder_block_out_channels.clone(),
            decoder_block_out_channels: raw.decoder_block_out_channels.clone(),
            num_encoder_blocks: raw.num_encoder_blocks.clone(),
            num_decoder_blocks: raw.num_decoder_blocks.clone(),
            latent_channels: raw.latent_channels,
            upsampling_scaling_factor: raw.upsampling_scaling_factor,
            latent_magnitude: raw.latent_magnitude,
            latent_shift: raw.latent_shift,
            force_upcast: raw.force_upcast,
            scaling_factor: raw.scaling_factor,
            shift_factor,
        })
    }
}

// ---- the layer plan: every convolution, under diffusers' names -----------------------------

/// One convolution of the model: its diffusers name under `encoder.` / `decoder.` (`layers.N`
/// or `layers.N.conv.K`), sizes, and whether it has a bias.
#[derive(Debug, Clone)]
struct ConvSpec {
    name: String,
    i: usize,
    o: usize,
    k: usize,
    stride: usize,
    bias: bool,
    what: String,
}

impl ConvSpec {
    fn new(name: String, i: usize, o: usize, stride: usize, bias: bool, what: String) -> Self {
        Self {
            name,
            i,
            o,
            k: 3,
            stride,
            bias,
            what,
        }
    }
}

/// The three 3x3 convs of `AutoencoderTinyBlock` at `layers.{idx}` (its `skip` is an identity:
/// the stages' input and output widths are equal).
fn block_specs(idx: usize, c: usize, what: &str, out: &mut Vec<ConvSpec>) {
    for k in 0..3 {
        out.push(ConvSpec::new(
            format!("layers.{idx}.conv.{}", 2 * k),
            c,
            c,
            1,
            true,
            format!("{what}, conv {}", 2 * k),
        ));
    }
}

/// The encoder's convolutions in diffusers' `EncoderTiny.layers` numbering: conv, blocks, then
/// per further stage a stride-2 conv without bias and its blocks, then the output conv.
fn encoder_specs(cfg: &TinyConfig) -> Vec<ConvSpec> {
    let ch = &cfg.encoder_block_out_channels;
    let mut v = Vec::new();
    let mut idx = 0;
    for (s, (&c, &n)) in ch.iter().zip(&cfg.num_encoder_blocks).enumerate() {
        if s == 0 {
            v.push(ConvSpec::new(
                format!("layers.{idx}"),
                cfg.in_channels,
                c,
                1,
                true,
                "encoder input conv".into(),
            ));
        } else {
            v.push(ConvSpec::new(
                format!("layers.{idx}"),
                c,
                c,
                2,
                false,
                format!("encoder stage {s} stride-2 conv (no bias)"),
            ));
        }
        idx += 1;
        for b in 0..n {
            block_specs(idx, c, &format!("encoder stage {s} block {b}"), &mut v);
            idx += 1;
        }
    }
    v.push(ConvSpec::new(
        format!("layers.{idx}"),
        ch[ch.len() - 1],
        cfg.latent_channels,
        1,
        true,
        "encoder output conv".into(),
    ));
    v
}

/// The decoder's convolutions in diffusers' `DecoderTiny.layers` numbering: conv, ReLU, then
/// per stage its blocks and, but for the last, an upsample and a conv without bias; the last
/// stage ends in the output conv (with bias).
fn decoder_specs(cfg: &TinyConfig) -> Vec<ConvSpec> {
    let ch = &cfg.decoder_block_out_channels;
    let last = ch.len() - 1;
    let mut v = vec![ConvSpec::new(
        "layers.0".into(),
        cfg.latent_channels,
        ch[0],
        1,
        true,
        "decoder input conv".into(),
    )];
    let mut idx = 2; // layers.1 is the ReLU
    for (s, (&c, &n)) in ch.iter().zip(&cfg.num_decoder_blocks).enumerate() {
        for b in 0..n {
            block_specs(idx, c, &format!("decoder stage {s} block {b}"), &mut v);
            idx += 1;
        }
        if s < last {
            idx += 1; // nn.Upsample
            v.push(ConvSpec::new(
                format!("layers.{idx}"),
                c,
                c,
                1,
                false,
                format!("decoder stage {s} conv after the upsample (no bias)"),
            ));
        } else {
            v.push(ConvSpec::new(
                format!("layers.{idx}"),
                c,
                cfg.out_channels,
                1,
                true,
                "decoder output conv".into(),
            ));
        }
        idx += 1;
    }
    v
}

// ---- the modules -----------------------------------------------------------------------------

/// diffusers `AutoencoderTinyBlock`: `relu(conv(relu(conv(relu(conv(x))))) + x)`.
#[derive(Debug, Clone)]
struct TinyBlock {
    convs: [Conv2d; 3],
}

impl TinyBlock {
    fn new(c: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let conv = |k: usize| conv2d(c, c, 3, 1, 1, vb.pp(format!("conv.{k}")));
        Ok(Self {
            convs: [conv(0)?, conv(2)?, conv(4)?],
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.convs[0].forward(x)?.relu()?;
        let h = self.convs[1].forward(&h)?.relu()?;
        let h = self.convs[2].forward(&h)?;
        // unet_2d_blocks.py: self.fuse(self.conv(x) + self.skip(x)), fuse = nn.ReLU()
        (h + x)?.relu()
    }
}

fn conv_of(spec: &ConvSpec, vb: &VarBuilder) -> candle_core::Result<Conv2d> {
    conv2d(spec.i, spec.o, spec.k, spec.stride, 1, vb.pp(&spec.name))
}

/// diffusers `EncoderTiny`: images `[B, in, H, W]` in [-1, 1] to raw latents
/// `[B, latent, ceil(H / 2^(stages-1)), ...]`.
#[derive(Debug, Clone)]
pub struct TinyEncoder {
    conv_in: Conv2d,
    /// Per stage: the stride-2 conv (all but the first stage) and the blocks.
    stages: Vec<(Option<Conv2d>, Vec<TinyBlock>)>,
    conv_out: Conv2d,
}

impl TinyEncoder {
    /// `vb` at the encoder (`encoder.` in a diffusers file).
    pub fn new(cfg: &TinyConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let specs = encoder_specs(cfg);
        let layers = vb.pp("layers");
        let mut idx = 1;
        let mut stages = Vec::new();
        for (s, (&c, &n)) in cfg
            .encoder_block_out_channels
            .iter()
            .zip(&cfg.num_encoder_blocks)
            .enumerate()
        {
            let down = if s == 0 {
                None
            } else {
                let d = conv2d(c, c, 3, 2, 1, layers.pp(idx))?;
                idx += 1;
                Some(d)
            };
            let mut blocks = Vec::with_capacity(n);
            for _ in 0..n {
                blocks.push(TinyBlock::new(c, layers.pp(idx))?);
                idx += 1;
            }
            stages.push((down, blocks));
        }
        Ok(Self {
            conv_in: conv_of(&specs[0], &vb)?,
            stages,
            conv_out: conv_of(&specs[specs.len() - 1], &vb)?,
        })
    }

    /// Raw (unscaled) latents of images in [-1, 1].
    pub fn forward(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        // vae.py EncoderTiny.forward: self.layers(x.add(1).div(2)) ([-1, 1] -> TAESD's [0, 1])
        let x = ((images + 1.0)? / 2.0)?;
        let mut x = self.conv_in.forward(&x)?;
        for (down, blocks) in &self.stages {
            if let Some(d) = down {
                x = d.forward(&x)?;
            }
            for b in blocks {
                x = b.forward(&x)?;
            }
        }
        self.conv_out.forward(&x)
    }
}

/// diffusers `DecoderTiny`: raw latents to images in [-1, 1] (not clamped, as diffusers).
#[derive(Debug, Clone)]
pub struct TinyDecoder {
    conv_in: Conv2d,
    /// Per stage: the blocks, and (all but the last stage) the conv after the upsample.
    stages: Vec<(Vec<TinyBlock>, Option<Conv2d>)>,
    conv_out: Conv2d,
    upsample: usize,
}

impl TinyDecoder {
    /// `vb` at the decoder (`decoder.` in a diffusers file).
    pub fn new(cfg: &TinyConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let specs = decoder_specs(cfg);
        let layers = vb.pp("layers");
        let last = cfg.decoder_block_out_channels.len() - 1;
        let mut idx = 2;
        let mut stages = Vec::new();
        for (s, (&c, &n)) in cfg
            .decoder_block_out_channels
            .iter()
            .zip(&cfg.num_decoder_blocks)
            .enumerate()
        {
            let mut blocks = Vec::with_capacity(n);
            for _ in 0..n {
                blocks.push(TinyBlock::new(c, layers.pp(idx))?);
                idx += 1;
            }
            let up = if s < last {
                let u = conv2d(c, c, 3, 1, 1, layers.pp(idx + 1))?;
                idx += 2;
                Some(u)
            } else {
                None
            };
            stages.push((blocks, up));
        }
        Ok(Self {
            conv_in: conv_of(&specs[0], &vb)?,
            stages,
            conv_out: conv_of(&specs[specs.len() - 1], &vb)?,
            upsample: cfg.upsampling_scaling_factor,
        })
    }

    /// Images in [-1, 1] of raw latents.
    pub fn forward(&self, latents: &Tensor) -> candle_core::Result<Tensor> {
        // vae.py DecoderTiny.forward: torch.tanh(x / 3) * 3 (a true division, as torch's)
        let three = Tensor::new(3f32, latents.device())?.to_dtype(latents.dtype())?;
        let x = (latents.broadcast_div(&three)?.tanh()? * 3.0)?;
        let mut x = self.conv_in.forward(&x)?.relu()?;
        for (blocks, up) in &self.stages {
            for b in blocks {
                x = b.forward(&x)?;
            }
            if let Some(conv) = up {
                let (_, _, h, w) = x.dims4()?;
                x = x.upsample_nearest2d(h * self.upsample, w * self.upsample)?;
                x = conv.forward(&x)?;
            }
        }
        // vae.py: return x.mul(2).sub(1) ([0, 1] -> [-1, 1])
        (self.conv_out.forward(&x)? * 2.0)? - 1.0
    }
}

// ---- weight files ----------------------------------------------------------------------------

/// How a part's tensors are named in its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Naming {
    /// `encoder.layers.N...` / `decoder.layers.N...`
    Diffusers,
    /// madebyollin's taesd.py: encoder `N...`, decoder `{N+1}...`
    Original,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Encoder,
    Decoder,
}

impl Part {
    fn prefix(self) -> &'static str {
        match self {
            Part::Encoder => "encoder",
            Part::Decoder => "decoder",
        }
    }
}

/// The file's key of `part`'s tensor `name` (`layers.N.<rest>` in diffusers' naming, below the
/// part).
fn file_key(naming: Naming, part: Part, name: &str) -> String {
    match naming {
        Naming::Diffusers => format!("{}.{name}", part.prefix()),
        Naming::Original => {
            let rest = name.strip_prefix("layers.").unwrap_or(name);
            let (n, tail) = rest.split_once('.').unwrap_or((rest, ""));
            let n: usize = n.parse().expect("layer names are numbered");
            // convert_tiny_autoencoder_to_diffusers.py: decoder layer_id = int(k.split(".")[0]) - 1
            let n = if part == Part::Decoder { n + 1 } else { n };
            if tail.is_empty() {
                n.to_string()
            } else {
                format!("{n}.{tail}")
            }
        }
    }
}

/// The tensors of one or more weight files (shards), by name.
struct Weights {
    shown: PathBuf,
    stores: Vec<Store>,
    shapes: BTreeMap<String, (Vec<usize>, usize)>,
}

impl Weights {
    fn open(files: &[PathBuf]) -> Result<Self> {
        let mut stores = Vec::with_capacity(files.len());
        let mut shapes = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            let store = Store::open(f)?;
            for (k, s) in store.shapes() {
                shapes.insert(k, (s, i));
            }
            stores.push(store);
        }
        Ok(Self {
            shown: files[0].clone(),
            stores,
            shapes,
        })
    }

    fn dims(&self, key: &str) -> Option<&[usize]> {
        self.shapes.get(key).map(|(s, _)| s.as_slice())
    }

    fn weights_error(&self, source: candle_core::Error) -> Error {
        Error::Weights {
            path: self.shown.clone(),
            source,
        }
    }

    /// Tensor `key`, checked to have shape `want`, as `dtype` on `device`.
    fn get(
        &self,
        key: &str,
        want: &[usize],
        what: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let Some((got, i)) = self.shapes.get(key) else {
            return Err(self.weights_error(candle_core::Error::CannotFindTensor {
                path: key.to_string(),
            }));
        };
        if got != want {
            return Err(self.weights_error(candle_core::Error::UnexpectedShape {
                msg: format!("tensor `{key}` ({what})"),
                expected: want.into(),
                got: got.as_slice().into(),
            }));
        }
        self.stores[*i]
            .get(key)
            .and_then(|t| t.to_dtype(dtype)?.to_device(device))
            .map_err(|e| self.weights_error(e))
    }

    /// Every tensor `part` needs, checked and renamed to diffusers' names below the part; the
    /// convolutions without a bias get a zero one (see the module docs).
    fn take_part(
        &self,
        naming: Naming,
        part: Part,
        specs: &[ConvSpec],
        dtype: DType,
        device: &Device,
        used: &mut Vec<String>,
    ) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for s in specs {
            let wk = file_key(naming, part, &format!("{}.weight", s.name));
            let w = self.get(&wk, &[s.o, s.i, s.k, s.k], &s.what, dtype, device)?;
            used.push(wk);
            out.insert(format!("{}.weight", s.name), w);
            let bk = file_key(naming, part, &format!("{}.bias", s.name));
            let b = if s.bias {
                let b = self.get(&bk, &[s.o], &s.what, dtype, device)?;
                used.push(bk);
                b
            } else {
                if self.shapes.contains_key(&bk) {
                    return Err(Error::config(
                        &self.shown,
                        format!(
                            "tensor `{bk}`: the {} has no bias in diffusers' AutoencoderTiny",
                            s.what
                        ),
                    ));
                }
                Tensor::zeros(s.o, dtype, device)?
            };
            out.insert(format!("{}.bias", s.name), b);
        }
        Ok(out)
    }
}

/// The tails of the keys `{start}N.<tail>` by numeric `N`, and the keys under `start` that are
/// not numbered.
fn layer_indices(w: &Weights, start: &str) -> (BTreeMap<usize, Vec<String>>, Vec<String>) {
    let mut by_index: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    let mut odd = Vec::new();
    for k in w.shapes.keys() {
        let Some(rest) = k.strip_prefix(start) else {
            continue;
        };
        let (n, tail) = rest.split_once('.').unwrap_or((rest, ""));
        match n.parse::<usize>() {
            Ok(n) => by_index.entry(n).or_default().push(tail.to_string()),
            Err(_) => odd.push(k.clone()),
        }
    }
    (by_index, odd)
}

/// What one layer index of a part holds.
#[derive(Debug, PartialEq)]
enum Layer {
    /// A conv: `[out, in, k, k]`, with a bias or not.
    Conv(Vec<usize>, bool),
    /// An `AutoencoderTinyBlock` (`conv.0.weight` `[c, c, 3, 3]` ...): its width.
    Block(usize),
    /// No parameters (ReLU, Upsample, Clamp).
    Empty,
    /// Something else (the tensor names).
    Other(Vec<String>),
}

impl std::fmt::Display for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Layer::Conv(d, bias) => {
                let with = if *bias { "with" } else { "without" };
                write!(f, "a conv {d:?} {with} bias")
            }
            Layer::Block(c) => write!(f, "a block {c} channels wide"),
            Layer::Empty => write!(f, "no tensors"),
            Layer::Other(keys) => write!(f, "the tensors {keys:?}"),
        }
    }
}

/// Read a part's structure (stage widths, blocks per stage, in/out channels) from the shapes of
/// its file, for the single files, which carry no config. `start` is the key prefix of the
/// part's layer 0 in diffusers' numbering (`""`, `"encoder.layers."`, ...); `offset` is added to
/// diffusers' index to find the file's (1 for the original decoder).
struct Reader<'a> {
    w: &'a Weights,
    layers: BTreeMap<usize, Vec<String>>,
    start: String,
    offset: usize,
    part: Part,
}

impl Reader<'_> {
    fn layer(&self, idx: usize) -> Layer {
        let n = idx + self.offset;
        let Some(tails) = self.layers.get(&n) else {
            return Layer::Empty;
        };
        let key = |t: &str| format!("{}{n}.{t}", self.start);
        let mut t = tails.clone();
        t.sort();
        if t == ["bias", "weight"] || t == ["weight"] {
            if let Some(d) = self.w.dims(&key("weight")) {
                return Layer::Conv(d.to_vec(), t.len() == 2);
            }
        }
        if t.iter().any(|t| t == "conv.0.weight") {
            if let Some(&[c, ..]) = self.w.dims(&key("conv.0.weight")) {
                return Layer::Block(c);
            }
        }
        Layer::Other(t.iter().map(|t| key(t)).collect())
    }

    fn key(&self, idx: usize) -> String {
        format!("{}{}", self.start, idx + self.offset)
    }

    fn fail(&self, idx: usize, message: &str) -> Error {
        Error::config(
            &self.w.shown,
            format!(
                "not a TAESD {} (the layers of madebyollin's taesd.py / diffusers' \
                 AutoencoderTiny): layer `{}` {message}",
                self.part.prefix(),
                self.key(idx)
            ),
        )
    }

    fn conv_dims(&self, idx: usize, what: &str) -> Result<(Vec<usize>, bool)> {
        match self.layer(idx) {
            Layer::Conv(d, bias) if d.len() == 4 => Ok((d, bias)),
            l => Err(self.fail(idx, &format!("should be the {what}, found {l}"))),
        }
    }

    /// Blocks from layer `idx` on: (count, width).
    fn blocks(&self, idx: &mut usize) -> (usize, Option<usize>) {
        let (mut n, mut c) = (0, None);
        while let Layer::Block(w) = self.layer(*idx) {
            c.get_or_insert(w);
            n += 1;
            *idx += 1;
        }
        (n, c)
    }

    /// Nothing may follow the output conv at `idx`.
    fn ends_at(&self, idx: usize) -> Result<()> {
        match self.layers.keys().next_back() {
            Some(&n) if n > idx + self.offset => Err(self.fail(
                n - self.offset,
                &format!(
                    "follows the output conv `{}`, where the network ends",
                    self.key(idx)
                ),
            )),
            _ => Ok(()),
        }
    }

    /// The encoder's structure: conv, blocks, [stride-2 conv without bias, blocks]..., conv.
    fn encoder(&self, cfg: &mut TinyConfig) -> Result<()> {
        let (d, _) = self.conv_dims(0, "input conv")?;
        let c0 = d[0];
        cfg.in_channels = d[1];
        let mut idx = 1;
        let (n, _) = self.blocks(&mut idx);
        let (mut widths, mut counts) = (vec![c0], vec![n]);
        loop {
            let (d, bias) = self.conv_dims(idx, "stride-2 conv (no bias) or the output conv")?;
            if bias {
                cfg.latent_channels = d[0];
                self.ends_at(idx)?;
                break;
            }
            idx += 1;
            let (n, c) = self.blocks(&mut idx);
            widths.push(c.unwrap_or(d[0]));
            counts.push(n);
        }
        cfg.encoder_block_out_channels = widths;
        cfg.num_encoder_blocks = counts;
        Ok(())
    }

    /// The decoder's structure: conv, ReLU, [blocks, Upsample, conv without bias]..., blocks,
    /// conv (with bias).
    fn decoder(&self, cfg: &mut TinyConfig) -> Result<()> {
        let (d, _) = self.conv_dims(0, "input conv")?;
        cfg.latent_channels = d[1];
        if self.layer(1) != Layer::Empty {
            return Err(self.fail(1, "should be the ReLU after the input conv (no tensors)"));
        }
        let mut idx = 2;
        let (mut widths, mut counts) = (vec![], vec![]);
        loop {
            let (n, c) = self.blocks(&mut idx);
            counts.push(n);
            match self.layer(idx) {
                Layer::Conv(d, true) if d.len() == 4 => {
                    widths.push(c.unwrap_or(d[1]));
                    cfg.out_channels = d[0];
                    self.ends_at(idx)?;
                    break;
                }
                Layer::Empty => {
                    let (d, bias) = self.conv_dims(idx + 1, "conv after the upsample")?;
                    if bias {
                        return Err(self.fail(
                            idx + 1,
                            "has a bias, which the conv after an upsample has not",
                        ));
                    }
                    widths.push(c.unwrap_or(d[0]));
                    idx += 2;
                }
                l => {
                    return Err(self.fail(
                        idx,
                        &format!("should be a block, the upsample or the output conv, found {l}"),
                    ))
                }
            }
        }
        cfg.decoder_block_out_channels = widths;
        cfg.num_decoder_blocks = counts;
        Ok(())
    }
}

// ---- the autoencoder -------------------------------------------------------------------------

/// A loaded part and the file it came from.
#[derive(Debug, Clone)]
struct Loaded<T> {
    net: T,
    file: PathBuf,
}

/// diffusers `AutoencoderTiny` (TAESD, TAESDXL; any latent channel count the config or the
/// shapes give, as the 16 of TAESD3 / TAEF1), either part optional when loaded from
/// madebyollin's single files.
#[derive(Debug, Clone)]
pub struct AutoencoderTiny {
    encoder: Option<Loaded<TinyEncoder>>,
    decoder: Option<Loaded<TinyDecoder>>,
    config: TinyConfig,
    dtype: DType,
    device: Device,
}

impl AutoencoderTiny {
    /// Load from a diffusers `AutoencoderTiny` folder (`config.json` +
    /// `diffusion_pytorch_model[.fp16].safetensors`), or from one of madebyollin's single files
    /// (`taesd_decoder.safetensors`, `taesdxl_encoder.pth`, ...: a decoder file gives a model
    /// that only decodes, an encoder file one that only encodes; [`Self::load_files`] takes
    /// both). A single file under diffusers' names (`decoder.layers.0.weight`...) is read too,
    /// with the `config.json` beside it when there is one.
    pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        if path.is_dir() {
            let config_path = path.join("config.json");
            if !config_path.is_file() {
                return Err(Error::config(
                    path,
                    "not a diffusers AutoencoderTiny folder: config.json not found (for \
                     madebyollin's taesd_decoder / taesd_encoder files, give the file)",
                ));
            }
            let config = TinyConfig::from_file(&config_path)?;
            let files = crate::loading::files::weight_files(path)?;
            let w = Weights::open(&files)?;
            return Self::from_weights(
                &w,
                Naming::Diffusers,
                Some(config),
                true,
                true,
                device,
                dtype,
            );
        }
        if !path.is_file() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "TAESD model not found"),
            ));
        }
        let w = Weights::open(&[path.to_path_buf()])?;
        let has = |p: &str| w.shapes.keys().any(|k| k.starts_with(p));
        if has("encoder.layers.") || has("decoder.layers.") {
            let beside = path.parent().map(|d| d.join("config.json"));
            let config = match beside.filter(|c| c.is_file()) {
                Some(c) => Some(TinyConfig::from_file(&c)?),
                None => None,
            };
            let (e, d) = (has("encoder.layers."), has("decoder.layers."));
            return Self::from_weights(&w, Naming::Diffusers, config, e, d, device, dtype);
        }
        match original_part(&w)? {
            Part::Encoder => Self::load_files(Some(path), None, device, dtype),
            Part::Decoder => Self::load_files(None, Some(path), device, dtype),
        }
    }

    /// Load madebyollin's separate encoder and decoder files (either may be left out), e.g.
    /// `taesdxl_encoder.safetensors` and `taesdxl_decoder.safetensors`. The structure is read
    /// from the shapes; the rest of the config is diffusers' defaults (scaling factor 1).
    pub fn load_files(
        encoder: Option<&Path>,
        decoder: Option<&Path>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let mut config = TinyConfig::default();
        let mut enc = None;
        let mut dec = None;
        for (path, want) in [(encoder, Part::Encoder), (decoder, Part::Decoder)] {
            let Some(path) = path else { continue };
            let w = Weights::open(&[path.to_path_buf()])?;
            let part = original_part(&w)?;
            if part != want {
                return Err(Error::config(
                    path,
                    format!(
                        "given as the TAESD {} but holds the {}",
                        want.prefix(),
                        part.prefix()
                    ),
                ));
            }
            let latent = read_original(&w, part, &mut config)?;
            let other = match part {
                Part::Encoder => dec.as_ref().map(|(_, l)| l),
                Part::Decoder => enc.as_ref().map(|(_, l)| l),
            };
            if let Some(&l) = other {
                if l != latent {
                    return Err(Error::config(
                        path,
                        format!(
                            "the {} has {latent} latent channels, the other file {l}",
                            part.prefix()
                        ),
                    ));
                }
            }
            match part {
                Part::Encoder => enc = Some((w, latent)),
                Part::Decoder => dec = Some((w, latent)),
            }
        }
        if enc.is_none() && dec.is_none() {
            return Err(Error::Invalid(
                "AutoencoderTiny::load_files: give an encoder file, a decoder file or both".into(),
            ));
        }
        let mut model = Self {
            encoder: None,
            decoder: None,
            config: config.clone(),
            dtype,
            device: device.clone(),
        };
        if let Some((w, _)) = &enc {
            let one = Self::from_weights(
                w,
                Naming::Original,
                Some(config.clone()),
                true,
                false,
                device,
                dtype,
            )?;
            model.encoder = one.encoder;
        }
        if let Some((w, _)) = &dec {
            let one = Self::from_weights(
                w,
                Naming::Original,
                Some(config.clone()),
                false,
                true,
                device,
                dtype,
            )?;
            model.decoder = one.decoder;
        }
        Ok(model)
    }

    /// Build the parts asked for from `w`, checking every tensor; `config` `None`: read the
    /// structure from diffusers-named shapes.
    fn from_weights(
        w: &Weights,
        naming: Naming,
        config: Option<TinyConfig>,
        want_encoder: bool,
        want_decoder: bool,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let config = match config {
            Some(c) => c,
            None => {
                let mut c = TinyConfig::default();
                if want_encoder {
                    read_part(w, "encoder.layers.", 0, Part::Encoder, &mut c)?;
                }
                if want_decoder {
                    let enc_latent = c.latent_channels;
                    read_part(w, "decoder.layers.", 0, Part::Decoder, &mut c)?;
                    if want_encoder && enc_latent != c.latent_channels {
                        return Err(Error::config(
                            &w.shown,
                            format!(
                                "the encoder makes {enc_latent} latent channels, the decoder \
                                 takes {}",
                                c.latent_channels
                            ),
                        ));
                    }
                }
                c
            }
        };
        let mut used = Vec::new();
        let mut tensors = HashMap::new();
        for (part, want, specs) in [
            (Part::Encoder, want_encoder, encoder_specs(&config)),
            (Part::Decoder, want_decoder, decoder_specs(&config)),
        ] {
            if want {
                for (k, t) in w.take_part(naming, part, &specs, dtype, device, &mut used)? {
                    tensors.insert(format!("{}.{k}", part.prefix()), t);
                }
            }
        }
        let used: std::collections::HashSet<&str> = used.iter().map(String::as_str).collect();
        let unused: Vec<&String> = w
            .shapes
            .keys()
            .filter(|k| !used.contains(k.as_str()))
            .collect();
        if !unused.is_empty() {
            // diffusers' from_pretrained warns about unexpected keys too, and loads
            tracing::warn!(
                file = %w.shown.display(),
                count = unused.len(),
                first = %unused[0],
                "tensors the TAESD config does not use"
            );
        }
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        let wrap = |source| Error::Weights {
            path: w.shown.clone(),
            source,
        };
        let encoder = if want_encoder {
            Some(Loaded {
                net: TinyEncoder::new(&config, vb.pp("encoder")).map_err(wrap)?,
                file: w.shown.clone(),
            })
        } else {
            None
        };
        let decoder = if want_decoder {
            Some(Loaded {
                net: TinyDecoder::new(&config, vb.pp("decoder")).map_err(wrap)?,
                file: w.shown.clone(),
            })
        } else {
            None
        };
        tracing::debug!(file = %w.shown.display(), ?config, "loaded a tiny autoencoder");
        Ok(Self {
            encoder,
            decoder,
            config,
            dtype,
            device: device.clone(),
        })
    }

    /// The configuration: the folder's `config.json`, or for single files the sizes read from
    /// their shapes and diffusers' defaults for the rest (a part not loaded keeps the default
    /// sizes).
    pub fn config(&self) -> &TinyConfig {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn encoder(&self) -> Option<&TinyEncoder> {
        self.encoder.as_ref().map(|l| &l.net)
    }

    pub fn decoder(&self) -> Option<&TinyDecoder> {
        self.decoder.as_ref().map(|l| &l.net)
    }

    /// Decode the latents the UNet works on (`[B, latent_channels, h, w]`, any dtype / device)
    /// to images `[B, out_channels, h * f, w * f]` in [-1, 1] (not clamped), in the model's
    /// dtype on its device. The latents are first unscaled as the diffusers pipelines do before
    /// `vae.decode` (`latents / scaling_factor + shift_factor`, nothing for TAESD / TAESDXL);
    /// the result is diffusers' `AutoencoderTiny.decode(...).sample`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let dec = self.decoder.as_ref().ok_or_else(|| {
            Error::Invalid(format!(
                "this TAESD was loaded without a decoder (encoder file {}): it cannot decode",
                self.encoder
                    .as_ref()
                    .map(|e| e.file.display().to_string())
                    .unwrap_or_default()
            ))
        })?;
        self.check_input("latents", latents, self.config.latent_channels)?;
        let z = self.unscale_latents(&latents.to_device(&self.device)?.to_dtype(self.dtype)?)?;
        Ok(dec.net.forward(&z)?)
    }

    /// Encode images `[B, in_channels, H, W]` in [-1, 1] to the encoder's raw latents, as
    /// diffusers' `AutoencoderTiny.encode(x).latents` (unscaled: [`Self::scale_latents`] gives
    /// the UNet's space; the identity for TAESD / TAESDXL), in the model's dtype on its device.
    pub fn encode(&self, images: &Tensor) -> Result<Tensor> {
        let enc = self.encoder.as_ref().ok_or_else(|| {
            Error::Invalid(format!(
                "this TAESD was loaded from a decoder-only file ({}): it cannot encode; load \
                 the matching *_encoder file too (AutoencoderTiny::load_files) or a diffusers \
                 AutoencoderTiny folder",
                self.decoder
                    .as_ref()
                    .map(|d| d.file.display().to_string())
                    .unwrap_or_default()
            ))
        })?;
        self.check_input("images", images, self.config.in_channels)?;
        let x = images.to_device(&self.device)?.to_dtype(self.dtype)?;
        Ok(enc.net.forward(&x)?)
    }

    /// Raw latents into the UNet's space: `(z - shift_factor) * scaling_factor` (what the
    /// diffusers pipelines do with `encode`'s latents). Not diffusers'
    /// `AutoencoderTiny.scale_latents`, which packs latents into [0, 1].
    pub fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        if c.scaling_factor == 1.0 && c.shift_factor == 0.0 {
            return Ok(z.clone());
        }
        Ok(((z - c.shift_factor)? * c.scaling_factor)?)
    }

    /// Inverse of [`Self::scale_latents`]: `z / scaling_factor + shift_factor`.
    pub fn unscale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        if c.scaling_factor == 1.0 && c.shift_factor == 0.0 {
            return Ok(z.clone());
        }
        Ok(((z / c.scaling_factor)? + c.shift_factor)?)
    }

    fn check_input(&self, what: &str, t: &Tensor, channels: usize) -> Result<()> {
        match t.dims() {
            &[b, c, h, w] if b > 0 && c == channels && h > 0 && w > 0 => Ok(()),
            d => Err(Error::Invalid(format!(
                "TAESD: {what} of shape {d:?}, expected [batch, {channels}, height, width]"
            ))),
        }
    }
}

/// Which part an original (madebyollin) file holds: the encoder has `0.weight` (its first
/// conv), the decoder starts at `1.weight` (layer 0 is `Clamp`).
fn original_part(w: &Weights) -> Result<Part> {
    let has = |k: &str| w.shapes.contains_key(k);
    if has("0.weight") && has("1.conv.0.weight") {
        Ok(Part::Encoder)
    } else if has("1.weight") && !has("0.weight") && has("3.conv.0.weight") {
        Ok(Part::Decoder)
    } else {
        let sample: Vec<&str> = w.shapes.keys().take(4).map(String::as_str).collect();
        Err(Error::config(
            &w.shown,
            format!(
                "not a TAESD file: none of madebyollin's taesd_encoder (`0.weight`, \
                 `1.conv.0.weight`) / taesd_decoder (`1.weight`, `3.conv.0.weight`) keys nor \
                 diffusers' `encoder.layers.*` / `decoder.layers.*`; its {} tensors begin \
                 {sample:?}",
                w.shapes.len()
            ),
        ))
    }
}

/// Read an original file's structure into `cfg`; the latent channels.
fn read_original(w: &Weights, part: Part, cfg: &mut TinyConfig) -> Result<usize> {
    let offset = if part == Part::Decoder { 1 } else { 0 };
    read_part(w, "", offset, part, cfg)?;
    Ok(cfg.latent_channels)
}

fn read_part(
    w: &Weights,
    start: &str,
    offset: usize,
    part: Part,
    cfg: &mut TinyConfig,
) -> Result<()> {
    let (layers, odd) = layer_indices(w, start);
    if start.is_empty() {
        if let Some(k) = odd.first() {
            return Err(Error::config(
                &w.shown,
                format!(
                    "tensor `{k}` is not one of a TAESD {}'s numbered layers",
                    part.prefix()
                ),
            ));
        }
    }
    let r = Reader {
        w,
        layers,
        start: start.to_string(),
        offset,
        part,
    };
    match part {
        Part::Encoder => r.encoder(cfg),
        Part::Decoder => r.decoder(cfg),
    }
}

/// Whether `path` holds a tiny autoencoder rather than an `AutoencoderKL`: a folder whose
/// `config.json` names `AutoencoderTiny`, or a weights file with TAESD's key layout
/// (`decoder.layers.N.`, `encoder.layers.N.`, or taesd.py's `N.conv.0.weight`).
pub fn looks_like_taesd(path: &Path) -> bool {
    if path.is_dir() {
        return std::fs::read_to_string(path.join("config.json"))
            .is_ok_and(|c| c.contains("\"AutoencoderTiny\""));
    }
    let Ok(shapes) = sd_weights::tensor_shapes(path) else {
        return false;
    };
    shapes.iter().any(|(k, _)| {
        k.starts_with("decoder.layers.")
            || k.starts_with("encoder.layers.")
            || k.split_once(".conv.0.weight")
                .is_some_and(|(n, rest)| rest.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })
}

impl AutoencoderTiny {
    /// Decode UNet latents to images in [0, 1] (the full fast decode, and live previews).
    pub fn decode_images(&self, latents: &Tensor) -> Result<Tensor> {
        let img = self.decode(latents)?.to_dtype(DType::F32)?;
        Ok(((img / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
    }
}
