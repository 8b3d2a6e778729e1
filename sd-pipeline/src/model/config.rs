//! Model configs read from the model's own `config.json`. Absent keys take the defaults of
//! the diffusers / transformers class (UNet2DConditionModel, AutoencoderKL, CLIPTextConfig).
//! Options this code does not implement are rejected with the key and value named.

use std::path::Path;

use sd_plugins_api::number::Range;
use serde::Deserialize;

use crate::error::{read_json, Error, Result};

/// A JSON value that is either one number for every block or one per block.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    fn expand(&self, n: usize, key: &str, path: &Path) -> Result<Vec<usize>> {
        match self {
            PerBlock::One(v) => Ok(vec![*v; n]),
            PerBlock::Each(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Each(v) => Err(Error::config(
                path,
                format!(
                    "`{key}` has {} entries but the model has {n} blocks",
                    v.len()
                ),
            )),
        }
    }
}

fn d_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfigFile {
    #[serde(default = "UnetDefaults::in_channels")]
    pub in_channels: usize,
    #[serde(default = "UnetDefaults::in_channels")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "UnetDefaults::down_block_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "UnetDefaults::mid_block_type")]
    pub mid_block_type: Option<String>,
    #[serde(default = "UnetDefaults::up_block_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "UnetDefaults::block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "UnetDefaults::layers_per_block")]
    pub layers_per_block: PerBlock,
    #[serde(default = "UnetDefaults::one")]
    pub downsample_padding: usize,
    #[serde(default = "UnetDefaults::one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "UnetDefaults::act_fn")]
    pub act_fn: String,
    #[serde(default = "UnetDefaults::norm_num_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "UnetDefaults::norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "UnetDefaults::cross_attention_dim")]
    pub cross_attention_dim: PerBlock,
    #[serde(default = "UnetDefaults::transformer_layers")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default = "UnetDefaults::attention_head_dim")]
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default = "UnetDefaults::resnet_time_scale_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "UnetDefaults::time_embedding_type")]
    pub time_embedding_type: String,
    #[serde(default = "UnetDefaults::three")]
    pub conv_in_kernel: usize,
    #[serde(default = "UnetDefaults::three")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
}

/// The serde defaults of [`UNetConfigFile`] (diffusers' `UNet2DConditionModel` defaults).
struct UnetDefaults;

impl UnetDefaults {
    fn in_channels() -> usize {
        4
    }
    fn down_block_types() -> Vec<String> {
        [
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ]
        .map(String::from)
        .to_vec()
    }
    fn up_block_types() -> Vec<String> {
        [
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ]
        .map(String::from)
        .to_vec()
    }
    fn mid_block_type() -> Option<String> {
        Some("UNetMidBlock2DCrossAttn".into())
    }
    fn block_out_channels() -> Vec<usize> {
        vec![320, 640, 1280, 1280]
    }
    fn layers_per_block() -> PerBlock {
        PerBlock::One(2)
    }
    fn one() -> usize {
        1
    }
    fn three() -> usize {
        3
    }
    fn one_f() -> f64 {
        1.0
    }
    fn act_fn() -> String {
        "silu".into()
    }
    fn norm_num_groups() -> usize {
        32
    }
    fn norm_eps() -> f64 {
        1e-5
    }
    fn cross_attention_dim() -> PerBlock {
        PerBlock::One(1280)
    }
    fn transformer_layers() -> PerBlock {
        PerBlock::One(1)
    }
    fn attention_head_dim() -> PerBlock {
        PerBlock::One(8)
    }
    fn resnet_time_scale_shift() -> String {
        "default".into()
    }
    fn time_embedding_type() -> String {
        "positional".into()
    }
}

/// What a down/up block is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    Plain,
    CrossAttn,
}

/// The validated UNet configuration, expanded per block (down-path order).
#[derive(Debug, Clone, PartialEq)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_blocks: Vec<BlockKind>,
    pub up_blocks: Vec<BlockKind>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: Vec<usize>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub cross_attention_dim: usize,
    pub transformer_layers_per_block: Vec<usize>,
    /// Number of attention heads per block (diffusers' `attention_head_dim` quirk applied).
    pub num_attention_heads: Vec<usize>,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
    /// The latent size (height, width) the model was trained at (`sample_size`), if given.
    pub sample_size: Option<(usize, usize)>,
    /// SDXL's `addition_embed_type = "text_time"`; `None` for SD 1.x/2.x.
    pub text_time: Option<TextTime>,
}

/// SDXL's added embedding: each micro-conditioning number embedded sinusoidally to
/// `time_embed_dim`, concatenated after the pooled text vector, through `add_embedding`
/// (`input_dim` = pooled width + count of numbers x `time_embed_dim`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextTime {
    pub time_embed_dim: usize,
    pub input_dim: usize,
}

/// The largest `sample_size` (latent pixels a side) a config may give: 16384 image pixels at
/// the usual 8x VAE. Real models say 32 to 128; larger values are typos or hostile, and set
/// the default generation size.
pub const MAX_SAMPLE_SIZE: u64 = 2048;

/// `sample_size`: one integer in 1..=[`MAX_SAMPLE_SIZE`], or `[height, width]`.
fn sample_size(v: &serde_json::Value) -> Option<(usize, usize)> {
    let n = |v: &serde_json::Value| {
        v.as_u64()
            .filter(|&n| (1..=MAX_SAMPLE_SIZE).contains(&n))
            .map(|n| n as usize)
    };
    match v {
        serde_json::Value::Array(a) if a.len() == 2 => Some((n(&a[0])?, n(&a[1])?)),
        v => n(v).map(|s| (s, s)),
    }
}

impl UNetConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw: UNetConfigFile = read_json(path)?;
        Self::from_raw(&raw, path)
    }

    pub fn from_raw(raw: &UNetConfigFile, path: &Path) -> Result<Self> {
        let bad = |key: &str, value: &dyn std::fmt::Debug| {
            Error::config(path, format!("unsupported `{key}` = {value:?}"))
        };
        let n = raw.block_out_channels.len();
        if n == 0 || raw.down_block_types.len() != n || raw.up_block_types.len() != n {
            return Err(Error::config(
                path,
                format!(
                    "`block_out_channels` ({n}), `down_block_types` ({}) and `up_block_types` ({}) must have the same length",
                    raw.down_block_types.len(),
                    raw.up_block_types.len()
                ),
            ));
        }
        let kind = |s: &String, plain: &str, cross: &str, key: &str| match s.as_str() {
            x if x == plain => Ok(BlockKind::Plain),
            x if x == cross => Ok(BlockKind::CrossAttn),
            _ => Err(bad(key, s)),
        };
        let down_blocks = raw
            .down_block_types
            .iter()
            .map(|s| kind(s, "DownBlock2D", "CrossAttnDownBlock2D", "down_block_types"))
            .collect::<Result<Vec<_>>>()?;
        let up_blocks = raw
            .up_block_types
            .iter()
            .map(|s| kind(s, "UpBlock2D", "CrossAttnUpBlock2D", "up_block_types"))
            .collect::<Result<Vec<_>>>()?;
        if raw.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn") {
            return Err(bad("mid_block_type", &raw.mid_block_type));
        }
        if raw.act_fn != "silu" {
            return Err(bad("act_fn", &raw.act_fn));
        }
        if raw.class_embed_type.is_some() || raw.num_class_embeds.is_some() {
            return Err(bad("class_embed_type", &raw.class_embed_type));
        }
        let text_time = match raw.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => match (
                raw.addition_time_embed_dim,
                raw.projection_class_embeddings_input_dim,
            ) {
                (Some(t), Some(i)) if t > 0 && i > t => Some(TextTime {
                    time_embed_dim: t,
                    input_dim: i,
                }),
                (t, i) => {
                    return Err(Error::config(
                        path,
                        format!(
                            "`addition_embed_type` \"text_time\" needs positive `addition_time_embed_dim` and a larger `projection_class_embeddings_input_dim`; found {t:?} and {i:?}"
                        ),
                    ))
                }
            },
            Some(_) => return Err(bad("addition_embed_type", &raw.addition_embed_type)),
        };
        if raw.dual_cross_attention {
            return Err(bad("dual_cross_attention", &true));
        }
        match &raw.only_cross_attention {
            serde_json::Value::Null | serde_json::Value::Bool(false) => {}
            v => return Err(bad("only_cross_attention", v)),
        }
        if raw.resnet_time_scale_shift != "default" {
            return Err(bad("resnet_time_scale_shift", &raw.resnet_time_scale_shift));
        }
        if raw.time_embedding_type != "positional" {
            return Err(bad("time_embedding_type", &raw.time_embedding_type));
        }
        if raw.conv_in_kernel != 3 || raw.conv_out_kernel != 3 {
            return Err(bad(
                "conv_in_kernel/conv_out_kernel",
                &(raw.conv_in_kernel, raw.conv_out_kernel),
            ));
        }
        let cross = raw
            .cross_attention_dim
            .expand(n, "cross_attention_dim", path)?;
        if cross.iter().any(|&c| c != cross[0]) {
            return Err(bad("cross_attention_dim", &cross));
        }
        // diffusers: `num_attention_heads = num_attention_heads or attention_head_dim`
        // (the historical naming bug: SD1's `attention_head_dim: 8` means 8 heads).
        let heads = raw
            .num_attention_heads
            .as_ref()
            .unwrap_or(&raw.attention_head_dim)
            .expand(n, "attention_head_dim", path)?;
        for (i, (&c, &h)) in raw.block_out_channels.iter().zip(&heads).enumerate() {
            if h == 0 || !c.is_multiple_of(h) {
                return Err(Error::config(
                    path,
                    format!("block {i}: {c} channels cannot be split into {h} attention heads"),
                ));
            }
            if !c.is_multiple_of(raw.norm_num_groups) {
                return Err(Error::config(
                    path,
                    format!(
                        "block {i}: {c} channels are not divisible by norm_num_groups {}",
                        raw.norm_num_groups
                    ),
                ));
            }
        }
        Ok(Self {
            in_channels: raw.in_channels,
            out_channels: raw.out_channels,
            center_input_sample: raw.center_input_sample,
            flip_sin_to_cos: raw.flip_sin_to_cos,
            freq_shift: raw.freq_shift,
            down_blocks,
            up_blocks,
            block_out_channels: raw.block_out_channels.clone(),
            layers_per_block: raw.layers_per_block.expand(n, "layers_per_block", path)?,
            downsample_padding: raw.downsample_padding,
            mid_block_scale_factor: raw.mid_block_scale_factor,
            norm_num_groups: raw.norm_num_groups,
            norm_eps: raw.norm_eps,
            cross_attention_dim: cross[0],
            transformer_layers_per_block: raw.transformer_layers_per_block.expand(
                n,
                "transformer_layers_per_block",
                path,
            )?,
            num_attention_heads: heads,
            use_linear_projection: raw.use_linear_projection,
            upcast_attention: raw.upcast_attention,
            text_time,
            sample_size: match &raw.sample_size {
                None | Some(serde_json::Value::Null) => None,
                Some(v) => Some(sample_size(v).ok_or_else(|| {
                    Error::config(
                        path,
                        format!(
                            "`sample_size` = {v}: expected a latent size in 1..={MAX_SAMPLE_SIZE}, or [height, width] of them"
                        ),
                    )
                })?),
            },
        })
    }

    /// The model family this UNet belongs to, as messages name it: SDXL-class with the
    /// `text_time` embedding, SD 1.x/2.x otherwise.
    pub fn family(&self) -> &'static str {
        if self.text_time.is_some() {
            "SDXL"
        } else {
            "SD 1.x/2.x"
        }
    }

    /// Peak f32 values per latent pixel of one batch item (one UNet row of the batch).
    /// Inference: attention runs in row blocks (never the whole `(hw)^2` scores) and 3x3
    /// convolutions in bounded tiles, so what grows with the image is the skip connections
    /// kept for the up path plus the working maps of the first level (the feed-forward's 8C
    /// GEGLU projection, its 4C product, the attention's q, k, v, output and residuals:
    /// about 16C). Training keeps every block's intermediates for the backward pass: about
    /// 40C per transformer block and 10C per resnet, at every block of every level.
    pub fn values_per_latent_pixel(&self, training: bool) -> f64 {
        let mut area = 1.0;
        let mut skips = 0.0;
        let mut kept = 0.0;
        for (l, &c) in self.block_out_channels.iter().enumerate() {
            let c = c as f64;
            let layers = self.layers_per_block.get(l).copied().unwrap_or(1) as f64;
            let attn = self.down_blocks.get(l) == Some(&BlockKind::CrossAttn);
            let t = self
                .transformer_layers_per_block
                .get(l)
                .copied()
                .unwrap_or(1) as f64;
            skips += (layers + 1.0) * c * area;
            // the down blocks, then the up blocks (one more layer), per level
            let per_block = 10.0 * c + if attn { 40.0 * c * t } else { 0.0 };
            kept += (2.0 * layers + 1.0) * per_block * area;
            area /= 4.0;
        }
        let first = self.block_out_channels.first().copied().unwrap_or(0) as f64;
        if training {
            kept + skips
        } else {
            16.0 * first + skips
        }
    }

    /// The real SD 1.5 UNet (for benchmarks; loading always uses the model's own config).
    pub fn sd15() -> Self {
        let raw: UNetConfigFile = serde_json::from_str(
            r#"{"cross_attention_dim": 768, "attention_head_dim": 8, "sample_size": 64}"#,
        )
        .expect("valid built-in config");
        Self::from_raw(&raw, Path::new("<built-in sd15>")).expect("valid built-in config")
    }

    /// The real SDXL base UNet (stabilityai/stable-diffusion-xl-base-1.0's config).
    pub fn sdxl() -> Self {
        let raw: UNetConfigFile = serde_json::from_str(
            r#"{"block_out_channels": [320, 640, 1280],
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "attention_head_dim": [5, 10, 20], "transformer_layers_per_block": [1, 2, 10],
                "cross_attention_dim": 2048, "use_linear_projection": true,
                "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                "projection_class_embeddings_input_dim": 2816, "sample_size": 128}"#,
        )
        .expect("valid built-in config");
        Self::from_raw(&raw, Path::new("<built-in sdxl>")).expect("valid built-in config")
    }

    /// The real SD 2.1 UNet.
    pub fn sd21() -> Self {
        let raw: UNetConfigFile = serde_json::from_str(
            r#"{"cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
                "use_linear_projection": true, "upcast_attention": true, "sample_size": 96}"#,
        )
        .expect("valid built-in config");
        Self::from_raw(&raw, Path::new("<built-in sd21>")).expect("valid built-in config")
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfigFile {
    #[serde(default = "vae_d::three")]
    pub in_channels: usize,
    #[serde(default = "vae_d::three")]
    pub out_channels: usize,
    #[serde(default = "vae_d::down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "vae_d::up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "vae_d::block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "vae_d::one")]
    pub layers_per_block: usize,
    #[serde(default = "UnetDefaults::act_fn")]
    pub act_fn: String,
    #[serde(default = "vae_d::four")]
    pub latent_channels: usize,
    #[serde(default = "UnetDefaults::norm_num_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "vae_d::scaling_factor")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
    #[serde(default = "d_true")]
    pub force_upcast: bool,
    /// The image size it was trained at: diffusers' tile size (`enable_tiling`).
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
}

mod vae_d {
    pub fn three() -> usize {
        3
    }
    pub fn four() -> usize {
        4
    }
    pub fn one() -> usize {
        1
    }
    pub fn down() -> Vec<String> {
        vec!["DownEncoderBlock2D".into()]
    }
    pub fn up() -> Vec<String> {
        vec!["UpDecoderBlock2D".into()]
    }
    pub fn block_out_channels() -> Vec<usize> {
        vec![64]
    }
    pub fn scaling_factor() -> f64 {
        0.18215
    }
}

/// The validated AutoencoderKL configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f64,
    pub shift_factor: f64,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
    /// diffusers' `force_upcast` (default true): SDXL pipelines run such a VAE in f32 when the
    /// model runs in f16 (the original SDXL VAE overflows f16).
    pub force_upcast: bool,
    /// `sample_size` (image pixels a side; diffusers' default 32): the tile of tiled decoding.
    pub sample_size: usize,
}

impl VaeConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw: VaeConfigFile = read_json(path)?;
        Self::from_raw(&raw, path)
    }

    pub fn from_raw(raw: &VaeConfigFile, path: &Path) -> Result<Self> {
        let n = raw.block_out_channels.len();
        if n == 0 || raw.down_block_types.len() != n || raw.up_block_types.len() != n {
            return Err(Error::config(
                path,
                "`block_out_channels`, `down_block_types` and `up_block_types` must have the same length",
            ));
        }
        if let Some(b) = raw
            .down_block_types
            .iter()
            .find(|b| *b != "DownEncoderBlock2D")
        {
            return Err(Error::config(
                path,
                format!("unsupported `down_block_types` entry {b:?}"),
            ));
        }
        if let Some(b) = raw.up_block_types.iter().find(|b| *b != "UpDecoderBlock2D") {
            return Err(Error::config(
                path,
                format!("unsupported `up_block_types` entry {b:?}"),
            ));
        }
        if raw.act_fn != "silu" {
            return Err(Error::config(
                path,
                format!("unsupported `act_fn` = {:?}", raw.act_fn),
            ));
        }
        if let Some(c) = raw
            .block_out_channels
            .iter()
            .find(|&&c| !c.is_multiple_of(raw.norm_num_groups))
        {
            return Err(Error::config(
                path,
                format!(
                    "{c} channels are not divisible by norm_num_groups {}",
                    raw.norm_num_groups
                ),
            ));
        }
        // 0 gives a black image, inf or NaN garbage: refused here, naming the file
        for (key, x, range) in [
            ("scaling_factor", raw.scaling_factor, Range::above(0.0)),
            ("shift_factor", raw.shift_factor.unwrap_or(0.0), Range::ANY),
        ] {
            range
                .check(x)
                .map_err(|m| Error::config(path, format!("{key}: {m}")))?;
        }
        Ok(Self {
            in_channels: raw.in_channels,
            out_channels: raw.out_channels,
            block_out_channels: raw.block_out_channels.clone(),
            layers_per_block: raw.layers_per_block,
            latent_channels: raw.latent_channels,
            norm_num_groups: raw.norm_num_groups,
            scaling_factor: raw.scaling_factor,
            shift_factor: raw.shift_factor.unwrap_or(0.0),
            use_quant_conv: raw.use_quant_conv,
            use_post_quant_conv: raw.use_post_quant_conv,
            mid_block_add_attention: raw.mid_block_add_attention,
            force_upcast: raw.force_upcast,
            // an int, or [height, width] (the first is used, as diffusers' tiling does)
            sample_size: match &raw.sample_size {
                None | Some(serde_json::Value::Null) => 32,
                Some(v) => v
                    .as_u64()
                    .or_else(|| v.get(0).and_then(|x| x.as_u64()))
                    .filter(|&s| (8..=16384).contains(&s))
                    .ok_or_else(|| {
                        Error::config(path, format!("`sample_size` = {v}: expected 8..=16384"))
                    })? as usize,
            },
        })
    }

    /// The dtype the VAE runs in for a model running in `dtype`: f32 instead of f16 for an
    /// SDXL-class model whose VAE says `force_upcast` (diffusers' `needs_upcasting`).
    pub fn run_dtype(&self, dtype: candle_core::DType, sdxl: bool) -> candle_core::DType {
        if sdxl && self.force_upcast && dtype == candle_core::DType::F16 {
            candle_core::DType::F32
        } else {
            dtype
        }
    }

    /// Pixels per latent pixel: 2^(number of blocks - 1), as diffusers' `vae_scale_factor`.
    pub fn downscale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    /// Peak f32 values per image pixel of one decode (or encode): the convolutions run in
    /// bounded tiles and the mid-block attention in row blocks, so the peak is the few whole
    /// feature maps a resnet holds at full size (input, normed, conv out, shortcut), with the
    /// widest of the two levels that reach it (the upsampled map enters the last level with
    /// the previous level's channels).
    pub fn values_per_pixel(&self) -> f64 {
        let c = &self.block_out_channels;
        let widest = c.iter().take(2).copied().max().unwrap_or(0);
        4.0 * widest as f64
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipActivation {
    QuickGelu,
    Gelu,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ClipConfigFile {
    #[serde(default = "clip_d::vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "clip_d::hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "clip_d::intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "clip_d::num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "clip_d::num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "clip_d::max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "clip_d::hidden_act")]
    pub hidden_act: String,
    #[serde(default = "clip_d::layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub projection_dim: Option<usize>,
}

mod clip_d {
    pub fn vocab_size() -> usize {
        49408
    }
    pub fn hidden_size() -> usize {
        512
    }
    pub fn intermediate_size() -> usize {
        2048
    }
    pub fn num_hidden_layers() -> usize {
        12
    }
    pub fn num_attention_heads() -> usize {
        8
    }
    pub fn max_position_embeddings() -> usize {
        77
    }
    pub fn hidden_act() -> String {
        "quick_gelu".into()
    }
    pub fn layer_norm_eps() -> f64 {
        1e-5
    }
}

/// The validated CLIP text encoder configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub activation: ClipActivation,
    pub layer_norm_eps: f64,
    /// `text_projection`'s width (CLIPTextModelWithProjection); transformers' default 512.
    pub projection_dim: Option<usize>,
}

impl ClipConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw: ClipConfigFile = read_json(path)?;
        Self::from_raw(raw, path)
    }

    /// From `config.json` contents (built in memory for single files); errors name `path`.
    pub fn from_value(v: &serde_json::Value, path: &Path) -> Result<Self> {
        let raw: ClipConfigFile = serde_json::from_value(v.clone())
            .map_err(|e| Error::config(path, format!("text encoder config: {e}")))?;
        Self::from_raw(raw, path)
    }

    fn from_raw(raw: ClipConfigFile, path: &Path) -> Result<Self> {
        let activation = match raw.hidden_act.as_str() {
            "quick_gelu" => ClipActivation::QuickGelu,
            "gelu" => ClipActivation::Gelu,
            other => {
                return Err(Error::config(
                    path,
                    format!("unsupported `hidden_act` = {other:?}"),
                ))
            }
        };
        if raw.num_attention_heads == 0 || !raw.hidden_size.is_multiple_of(raw.num_attention_heads)
        {
            return Err(Error::config(
                path,
                format!(
                    "hidden_size {} cannot be split into {} attention heads",
                    raw.hidden_size, raw.num_attention_heads
                ),
            ));
        }
        Ok(Self {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            max_position_embeddings: raw.max_position_embeddings,
            activation,
            layer_norm_eps: raw.layer_norm_eps,
            projection_dim: raw.projection_dim,
        })
    }
}
