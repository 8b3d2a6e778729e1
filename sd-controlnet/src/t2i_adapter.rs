//! T2I-Adapters (diffusers `T2IAdapter`, models/adapter.py): `full_adapter`, `light_adapter`
//! and `full_adapter_xl`, from a diffusers folder or file (`adapter.*` keys) or TencentARC's
//! original files (`body.N.*` keys, converted as diffusers' `convert_original_t2i_adapter.py`),
//! the kind detected from the keys. The features are computed once per generation and added
//! inside the UNet's down blocks (`UNetAdditions::intrablock`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Result as CResult, Tensor};
use candle_nn::VarBuilder;
use sd_pipeline::loading::diffusers::load_component;
use sd_pipeline::loading::files::{tensor_shapes, weight_files};
use sd_pipeline::model::config::UNetConfig;
use sd_pipeline::model::nn::{conv2d, Conv2d};
use sd_plugins_api::ModelPart;

use crate::error::{ControlError, Result};

/// diffusers' `adapter_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterKind {
    Full,
    Light,
    FullXl,
}

impl AdapterKind {
    /// The kind diffusers' `adapter_type` names.
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Full, Self::Light, Self::FullXl]
            .into_iter()
            .find(|k| k.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Full => "full_adapter",
            Self::Light => "light_adapter",
            Self::FullXl => "full_adapter_xl",
        }
    }
    /// The model family the adapter's features fit.
    pub fn family(self) -> &'static str {
        match self {
            Self::FullXl => "SDXL",
            _ => "SD 1.x/2.x",
        }
    }
}

/// An adapter's architecture (diffusers' `T2IAdapter` config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct T2IAdapterConfig {
    pub kind: AdapterKind,
    pub in_channels: usize,
    pub channels: Vec<usize>,
    pub num_res_blocks: usize,
    pub downscale_factor: usize,
}

/// How the adapter's keys are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// diffusers, under `adapter.`
    Diffusers,
    /// TencentARC's original files
    Original,
}

/// Whether `names` are a T2I-Adapter's (either layout).
pub fn is_t2i_adapter(names: &[(String, Vec<usize>)]) -> bool {
    layout(names).is_some()
}

fn layout(names: &[(String, Vec<usize>)]) -> Option<Layout> {
    let has = |k: &str| names.iter().any(|(n, _)| n == k);
    if has("adapter.body.0.resnets.0.block1.weight") {
        Some(Layout::Diffusers)
    } else if has("body.0.block1.weight") && has("conv_in.weight")
        || has("body.0.body.0.block1.weight") && has("body.0.in_conv.weight")
    {
        Some(Layout::Original)
    } else {
        None
    }
}

/// The architecture read from the weights' names and shapes (a diffusers `config.json`, when
/// given, names the kind for the ambiguous full adapters).
fn config_from_keys(
    names: &[(String, Vec<usize>)],
    layout: Layout,
    json: Option<&serde_json::Value>,
    path: &Path,
) -> Result<T2IAdapterConfig> {
    let shape = |k: &str| names.iter().find(|(n, _)| n == k).map(|(_, s)| s.clone());
    let bad = |m: String| ControlError::file(path, m);
    let count = |f: &dyn Fn(usize) -> String| (0..).take_while(|&i| shape(&f(i)).is_some()).count();
    // diffusers names: per body block, resnets; original light: body.i.body.j; original full:
    // body.(i * rb + j)
    let light = match layout {
        Layout::Diffusers => shape("adapter.body.0.out_conv.weight").is_some(),
        Layout::Original => shape("body.0.body.0.block1.weight").is_some(),
    };
    let key = |block: usize, res: Option<usize>, leaf: &str, rb: usize| -> String {
        match (layout, res) {
            (Layout::Diffusers, Some(j)) => format!("adapter.body.{block}.resnets.{j}.{leaf}"),
            (Layout::Diffusers, None) => format!("adapter.body.{block}.{leaf}"),
            (Layout::Original, Some(j)) if light => format!("body.{block}.body.{j}.{leaf}"),
            (Layout::Original, Some(j)) => format!("body.{}.{leaf}", block * rb + j),
            (Layout::Original, None) if light => format!("body.{block}.{leaf}"),
            (Layout::Original, None) => format!("body.{}.{leaf}", block * rb),
        }
    };
    let (rb, blocks) = match (layout, light) {
        (Layout::Original, false) => {
            // body.(level * rb + j): the second level starts at the first in_conv after 0
            // (the released files: 4 levels of 2)
            let total = count(&|i| format!("body.{i}.block1.weight"));
            let rb = (1..total)
                .find(|k| shape(&format!("body.{k}.in_conv.weight")).is_some())
                .unwrap_or(2);
            if total == 0 || total % rb != 0 {
                return Err(bad(format!(
                    "T2I-Adapter with {total} resnet blocks: not levels of {rb}"
                )));
            }
            (rb, total / rb)
        }
        _ => {
            let blocks = count(&|i| key(i, Some(0), "block1.weight", 1));
            let rb = count(&|j| key(0, Some(j), "block1.weight", 1));
            (rb, blocks)
        }
    };
    if blocks == 0 || rb == 0 {
        return Err(bad("T2I-Adapter without blocks".into()));
    }
    let conv_in = if light {
        shape(&key(0, None, "in_conv.weight", rb))
    } else {
        shape(match layout {
            Layout::Diffusers => "adapter.conv_in.weight",
            Layout::Original => "conv_in.weight",
        })
    }
    .ok_or_else(|| bad("T2I-Adapter without its input convolution".into()))?;
    let mut channels = Vec::new();
    for i in 0..blocks {
        let leaf = if light {
            "out_conv.weight"
        } else {
            "block1.weight"
        };
        let res = (!light).then_some(0);
        let s = shape(&key(i, res, leaf, rb))
            .ok_or_else(|| bad(format!("T2I-Adapter block {i} incomplete")))?;
        channels.push(s[0]);
    }
    let unshuffled = conv_in[1];
    let kind = if light {
        AdapterKind::Light
    } else {
        match json.and_then(|j| j["adapter_type"].as_str()) {
            Some("full_adapter_xl") => AdapterKind::FullXl,
            Some("full_adapter") => AdapterKind::Full,
            Some(o) => return Err(bad(format!("unsupported adapter_type {o:?}"))),
            // 8x8 unshuffle of 1 or 3 channels (SD1) vs 16x16 (SDXL)
            None if unshuffled % 256 == 0 && [1, 3].contains(&(unshuffled / 256)) => {
                AdapterKind::FullXl
            }
            None => AdapterKind::Full,
        }
    };
    let downscale_factor = json
        .and_then(|j| j["downscale_factor"].as_u64())
        .map(|d| d as usize)
        .unwrap_or(if kind == AdapterKind::FullXl { 16 } else { 8 });
    let in_channels = unshuffled / (downscale_factor * downscale_factor);
    if in_channels == 0 || in_channels * downscale_factor * downscale_factor != unshuffled {
        return Err(bad(format!(
            "T2I-Adapter input convolution takes {unshuffled} channels: not a {downscale_factor}x{downscale_factor} unshuffled image"
        )));
    }
    // a light adapter's config lists all but its last level (which repeats the last channels)
    if light {
        channels.pop();
    }
    Ok(T2IAdapterConfig {
        kind,
        in_channels,
        channels,
        num_res_blocks: rb,
        downscale_factor,
    })
}

/// One level: optional 2x2 average pool (ceil mode), optional 1x1 in_conv, resnets
/// (3x3, ReLU, 1x1 or 3x3, + input), and for light adapters a 1x1 out_conv.
#[derive(Debug, Clone)]
struct Block {
    down: bool,
    in_conv: Option<Conv2d>,
    resnets: Vec<(Conv2d, Conv2d)>,
    out_conv: Option<Conv2d>,
}

impl Block {
    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let mut x = if self.down {
            avg_pool_ceil(x)?
        } else {
            x.clone()
        };
        if let Some(c) = &self.in_conv {
            x = c.forward(&x)?;
        }
        for (b1, b2) in &self.resnets {
            let h = b2.forward(&b1.forward(&x)?.relu()?)?;
            x = (h + x)?;
        }
        match &self.out_conv {
            Some(c) => c.forward(&x),
            None => Ok(x),
        }
    }
}

/// `nn.AvgPool2d(2, 2, ceil_mode=True)`: a window cut by the edge averages what it covers.
fn avg_pool_ceil(x: &Tensor) -> CResult<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if h % 2 == 0 && w % 2 == 0 {
        return x.avg_pool2d(2);
    }
    let x = x.pad_with_zeros(2, 0, h % 2)?.pad_with_zeros(3, 0, w % 2)?;
    let summed = (x.avg_pool2d(2)? * 4.0)?;
    let (oh, ow) = (h.div_ceil(2), w.div_ceil(2));
    let count: Vec<f32> = (0..oh)
        .flat_map(|i| {
            (0..ow).map(move |j| {
                let rows = if 2 * i + 1 < h { 2.0 } else { 1.0 };
                let cols = if 2 * j + 1 < w { 2.0 } else { 1.0 };
                rows * cols
            })
        })
        .collect();
    let count = Tensor::from_vec(count, (1, 1, oh, ow), x.device())?.to_dtype(x.dtype())?;
    summed.broadcast_div(&count)
}

/// `nn.PixelUnshuffle(f)`: `[B, C, H, W]` to `[B, C*f*f, H/f, W/f]`, channel `c*f*f + i*f + j`.
fn pixel_unshuffle(x: &Tensor, f: usize) -> CResult<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h / f, f, w / f, f))?
        .permute((0, 1, 3, 5, 2, 4))?
        .reshape((b, c * f * f, h / f, w / f))
}

/// A loaded T2I-Adapter.
#[derive(Debug, Clone)]
pub struct T2IAdapter {
    config: T2IAdapterConfig,
    conv_in: Option<Conv2d>,
    body: Vec<Block>,
}

impl T2IAdapter {
    /// Build from a VarBuilder with diffusers' names (under `adapter.`).
    pub fn new(cfg: &T2IAdapterConfig, vb: VarBuilder) -> CResult<Self> {
        let vb = vb.pp("adapter");
        let f2 = cfg.downscale_factor * cfg.downscale_factor;
        let cin = cfg.in_channels * f2;
        let ch = &cfg.channels;
        let conv = |i, o, k, vb: VarBuilder| conv2d(i, o, k, 1, k / 2, vb);
        let mut body = Vec::new();
        let resnets = |c: usize, k2: usize, vb: VarBuilder| -> CResult<Vec<(Conv2d, Conv2d)>> {
            (0..cfg.num_res_blocks)
                .map(|j| {
                    let vb = vb.pp(format!("resnets.{j}"));
                    Ok((
                        conv(c, c, 3, vb.pp("block1"))?,
                        conv(c, c, k2, vb.pp("block2"))?,
                    ))
                })
                .collect()
        };
        let conv_in = match cfg.kind {
            AdapterKind::Light => {
                // levels: (cin -> ch0), (ch_i -> ch_i+1, down), (last -> last, down)
                let mut levels = vec![(cin, ch[0], false)];
                for i in 0..ch.len() - 1 {
                    levels.push((ch[i], ch[i + 1], true));
                }
                levels.push((ch[ch.len() - 1], ch[ch.len() - 1], true));
                for (i, (ci, co, down)) in levels.into_iter().enumerate() {
                    let vb = vb.pp(format!("body.{i}"));
                    let mid = co / 4;
                    body.push(Block {
                        down,
                        in_conv: Some(conv(ci, mid, 1, vb.pp("in_conv"))?),
                        resnets: resnets(mid, 3, vb.clone())?,
                        out_conv: Some(conv(mid, co, 1, vb.pp("out_conv"))?),
                    });
                }
                None
            }
            AdapterKind::Full | AdapterKind::FullXl => {
                for i in 0..ch.len() {
                    let (ci, down) = match cfg.kind {
                        AdapterKind::Full if i > 0 => (ch[i - 1], true),
                        AdapterKind::FullXl if i == 1 => (ch[0], false),
                        AdapterKind::FullXl if i == 2 => (ch[1], true),
                        _ => (ch[i], false),
                    };
                    let vb = vb.pp(format!("body.{i}"));
                    body.push(Block {
                        down,
                        in_conv: (ci != ch[i])
                            .then(|| conv(ci, ch[i], 1, vb.pp("in_conv")))
                            .transpose()?,
                        resnets: resnets(ch[i], 1, vb.clone())?,
                        out_conv: None,
                    });
                }
                Some(conv(cin, ch[0], 3, vb.pp("conv_in"))?)
            }
        };
        Ok(Self {
            config: cfg.clone(),
            conv_in,
            body,
        })
    }

    pub fn config(&self) -> &T2IAdapterConfig {
        &self.config
    }

    /// The family this adapter's features fit.
    pub fn family(&self) -> &'static str {
        self.config.kind.family()
    }

    /// The features of a control image `[B, C, H, W]` in [0, 1] (C = 3; a 1-channel adapter
    /// takes the channels' mean, as ComfyUI's `T2IAdapter.get_control`).
    pub fn forward(&self, image: &Tensor) -> CResult<Vec<Tensor>> {
        let f = self.config.downscale_factor;
        let (_, c, h, w) = image.dims4()?;
        if h % f != 0 || w % f != 0 {
            candle_core::bail!(
                "a T2I-Adapter ({}) needs an image whose sides are multiples of {f}; this one is {w}x{h}",
                self.config.kind.name()
            );
        }
        let x = if self.config.in_channels == 1 && c != 1 {
            image.mean_keepdim(1)?
        } else {
            image.clone()
        };
        let mut x = pixel_unshuffle(&x, f)?;
        if let Some(ci) = &self.conv_in {
            x = ci.forward(&x)?;
        }
        let mut out = Vec::with_capacity(self.body.len());
        for b in &self.body {
            x = b.forward(&x)?;
            out.push(x.clone());
        }
        Ok(out)
    }

    /// Check the adapter against a base UNet and its VAE's scale factor: family, the first
    /// feature's size against the latents' (`full_adapter_xl`'s at half of it), and each
    /// feature's channels against the down block it is added to (an extra last feature goes
    /// to the mid block).
    pub fn validate_for(
        &self,
        base: &UNetConfig,
        vae_scale_factor: usize,
    ) -> std::result::Result<(), String> {
        if self.family() != base.family() {
            return Err(format!(
                "an {} T2I-Adapter ({}) cannot guide an {} model",
                self.family(),
                self.config.kind.name(),
                base.family()
            ));
        }
        let f = self.config.downscale_factor;
        let want = match self.config.kind {
            AdapterKind::FullXl => 2 * vae_scale_factor,
            _ => vae_scale_factor,
        };
        if f != want {
            return Err(format!(
                "the T2I-Adapter ({}) unshuffles {f}x{f} pixels; this base needs {want}x{want} (latents at 1/{vae_scale_factor} of the image)",
                self.config.kind.name()
            ));
        }
        let feats = self.feature_channels();
        let blocks = &base.block_out_channels;
        let fits = feats.len() >= blocks.len()
            && feats.len() <= blocks.len() + 1
            && feats.iter().zip(blocks).all(|(a, b)| a == b)
            && feats[blocks.len()..]
                .iter()
                .all(|c| Some(c) == blocks.last());
        if !fits {
            return Err(format!(
                "the T2I-Adapter's features have {feats:?} channels; the base UNet's blocks have {blocks:?}"
            ));
        }
        Ok(())
    }

    /// The channels of each feature.
    pub fn feature_channels(&self) -> Vec<usize> {
        let ch = &self.config.channels;
        match self.config.kind {
            AdapterKind::Light => ch.iter().chain(ch.last()).copied().collect(),
            _ => ch.clone(),
        }
    }
}

/// The weight files and the config of a diffusers adapter folder, or a single file.
fn files_of(path: &Path) -> Result<(Vec<PathBuf>, Option<serde_json::Value>)> {
    let read_json = |p: &Path| -> Result<serde_json::Value> {
        let text = std::fs::read_to_string(p).map_err(|e| ControlError::file(p, e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| ControlError::file(p, e.to_string()))
    };
    if path.is_dir() {
        let cfg = path.join("config.json");
        let json = cfg.is_file().then(|| read_json(&cfg)).transpose()?;
        return Ok((weight_files(path)?, json));
    }
    let beside = path.with_extension("json");
    let json = beside.is_file().then(|| read_json(&beside)).transpose()?;
    Ok((vec![path.to_path_buf()], json))
}

/// The architecture of the adapter at `path` (folder or file), or `None` when its weights are
/// not a T2I-Adapter's.
pub fn inspect(path: &Path) -> Result<Option<T2IAdapterConfig>> {
    let (files, json) = files_of(path)?;
    let shapes = tensor_shapes(&files[0])?;
    match layout(&shapes) {
        Some(l) => config_from_keys(&shapes, l, json.as_ref(), &files[0]).map(Some),
        None => Ok(None),
    }
}

/// Load a T2I-Adapter (folder or file, either layout).
pub fn load_t2i_adapter(path: &Path, device: &Device, dtype: DType) -> Result<T2IAdapter> {
    let (files, json) = files_of(path)?;
    let shapes = tensor_shapes(&files[0])?;
    let Some(layout) = layout(&shapes) else {
        return Err(ControlError::file(
            path,
            "not a T2I-Adapter: neither diffusers keys (adapter.body.*) nor TencentARC keys (body.N.*) found",
        ));
    };
    let cfg = config_from_keys(&shapes, layout, json.as_ref(), &files[0])?;
    let light = cfg.kind == AdapterKind::Light;
    let rb = cfg.num_res_blocks;
    Ok(load_component(
        &files,
        ModelPart::Unet,
        &[],
        dtype,
        device,
        |vb| {
            let vb = match layout {
                Layout::Diffusers => vb,
                Layout::Original => vb.rename_f(move |n: &str| original_name(n, light, rb)),
            };
            T2IAdapter::new(&cfg, vb)
        },
    )?)
}

/// TencentARC's name of a diffusers adapter parameter (`convert_original_t2i_adapter.py`
/// backwards).
fn original_name(name: &str, light: bool, rb: usize) -> String {
    let n = name.strip_prefix("adapter.").unwrap_or(name);
    let parts: Vec<&str> = n.split('.').collect();
    match parts.as_slice() {
        ["body", i, "resnets", j, rest @ ..] => {
            let (i, j): (usize, usize) = (i.parse().unwrap_or(0), j.parse().unwrap_or(0));
            if light {
                format!("body.{i}.body.{j}.{}", rest.join("."))
            } else {
                format!("body.{}.{}", i * rb + j, rest.join("."))
            }
        }
        ["body", i, "in_conv", rest @ ..] if !light => {
            let i: usize = i.parse().unwrap_or(0);
            format!("body.{}.in_conv.{}", i * rb, rest.join("."))
        }
        _ => n.to_string(),
    }
}
