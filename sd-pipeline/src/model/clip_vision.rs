//! CLIP image encoder (transformers' `CLIPVisionModelWithProjection`: keys `vision_model.*`
//! and `visual_projection.weight`), the image encoder of IP-Adapters (ViT-H/14, ViT-bigG/14),
//! and its input preprocessing (transformers' `CLIPImageProcessor`).

use std::path::{Path, PathBuf};

use super::nn::Linear;
use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};

use super::clip::EncoderLayer;
use super::config::{ClipActivation, ClipConfig};
use super::nn::LayerNorm;
use crate::error::Error;
use crate::generation::pil_resize::{pil_resize, Fixed, PilFilter};

/// The vision tower's architecture.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub activation: ClipActivation,
    pub layer_norm_eps: f64,
    pub projection_dim: usize,
}

impl ClipVisionConfig {
    /// From a transformers `config.json` (a `CLIPVisionConfig`, or a `CLIPConfig` with
    /// `vision_config`); `projection_dim` from the file when the config lacks it.
    fn from_json(v: &serde_json::Value, projection: usize, path: &Path) -> crate::Result<Self> {
        let v = if v.get("vision_config").is_some() {
            &v["vision_config"]
        } else {
            v
        };
        let num = |k: &str| -> crate::Result<usize> {
            v[k].as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| Error::config(path, format!("image encoder config lacks `{k}`")))
        };
        let act = v["hidden_act"].as_str().unwrap_or("quick_gelu");
        Ok(Self {
            hidden_size: num("hidden_size")?,
            intermediate_size: num("intermediate_size")?,
            num_hidden_layers: num("num_hidden_layers")?,
            num_attention_heads: num("num_attention_heads")?,
            image_size: num("image_size")?,
            patch_size: num("patch_size")?,
            activation: parse_act(act, path)?,
            layer_norm_eps: v["layer_norm_eps"].as_f64().unwrap_or(1e-5),
            projection_dim: v["projection_dim"]
                .as_u64()
                .map(|n| n as usize)
                .unwrap_or(projection),
        })
    }

    /// From the weights alone (a single file): the released encoders' heads (16; 12 for a
    /// 768-wide ViT-B) and activation (OpenAI's 1024-wide ViT-L: quick GELU; LAION's ViT-H
    /// and ViT-bigG: GELU).
    fn from_shapes(shapes: &[(String, Vec<usize>)], path: &Path) -> crate::Result<Self> {
        let shape = |k: &str| {
            shapes
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, s)| s.clone())
                .ok_or_else(|| Error::config(path, format!("image encoder lacks `{k}`")))
        };
        let patch = shape("vision_model.embeddings.patch_embedding.weight")?;
        let pos = shape("vision_model.embeddings.position_embedding.weight")?;
        let fc1 = shape("vision_model.encoder.layers.0.mlp.fc1.weight")?;
        let proj = shape("visual_projection.weight")?;
        let layers = (0..)
            .take_while(|i| {
                shapes.iter().any(|(n, _)| {
                    n == &format!("vision_model.encoder.layers.{i}.layer_norm1.weight")
                })
            })
            .count();
        let d = patch[0];
        let grid = ((pos[0] - 1) as f64).sqrt().round() as usize;
        Ok(Self {
            hidden_size: d,
            intermediate_size: fc1[0],
            num_hidden_layers: layers,
            num_attention_heads: if d == 768 { 12 } else { 16 },
            image_size: grid * patch[2],
            patch_size: patch[2],
            activation: if d == 1024 {
                ClipActivation::QuickGelu
            } else {
                ClipActivation::Gelu
            },
            layer_norm_eps: 1e-5,
            projection_dim: proj[0],
        })
    }

    fn as_clip(&self) -> ClipConfig {
        ClipConfig {
            vocab_size: 0,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            max_position_embeddings: 0,
            activation: self.activation,
            layer_norm_eps: self.layer_norm_eps,
            projection_dim: Some(self.projection_dim),
        }
    }
}

fn parse_act(a: &str, path: &Path) -> crate::Result<ClipActivation> {
    match a {
        "quick_gelu" => Ok(ClipActivation::QuickGelu),
        "gelu" => Ok(ClipActivation::Gelu),
        o => Err(Error::config(
            path,
            format!("unsupported image encoder hidden_act {o:?}"),
        )),
    }
}

/// What the encoder gives for a batch of images.
pub struct VisionOutput {
    /// `visual_projection(post_layernorm(CLS))`, `[B, projection_dim]` (`image_embeds`).
    pub image_embeds: Tensor,
    /// The penultimate layer's hidden states, `[B, tokens, hidden]` (`hidden_states[-2]`).
    pub penultimate: Tensor,
}

/// A loaded CLIP image encoder.
#[derive(Debug, Clone)]
pub struct ClipVisionModel {
    config: ClipVisionConfig,
    class_embedding: Tensor,
    patch_embedding: Conv2d,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    visual_projection: Linear,
}

impl ClipVisionModel {
    pub fn new(cfg: &ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let vm = vb.pp("vision_model");
        let emb = vm.pp("embeddings");
        let tokens = (cfg.image_size / cfg.patch_size).pow(2) + 1;
        let patch_w = emb.get(
            (d, 3, cfg.patch_size, cfg.patch_size),
            "patch_embedding.weight",
        )?;
        let clip = cfg.as_clip();
        Ok(Self {
            config: cfg.clone(),
            class_embedding: emb.get(d, "class_embedding")?,
            patch_embedding: Conv2d::new(
                patch_w,
                None,
                Conv2dConfig {
                    stride: cfg.patch_size,
                    ..Default::default()
                },
            ),
            position_embedding: emb.get((tokens, d), "position_embedding.weight")?,
            pre_layrnorm: LayerNorm::new(d, cfg.layer_norm_eps, vm.pp("pre_layrnorm"))?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| EncoderLayer::new(&clip, false, vm.pp(format!("encoder.layers.{i}"))))
                .collect::<Result<Vec<_>>>()?,
            post_layernorm: LayerNorm::new(d, cfg.layer_norm_eps, vm.pp("post_layernorm"))?,
            visual_projection: super::nn::linear_no_bias(
                d,
                cfg.projection_dim,
                vb.pp("visual_projection"),
            )?,
        })
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// Encode preprocessed pixels `[B, 3, S, S]` (see [`Self::preprocess`]).
    pub fn forward(&self, pixels: &Tensor) -> Result<VisionOutput> {
        let b = pixels.dim(0)?;
        let d = self.config.hidden_size;
        let patches = self
            .patch_embedding
            .forward(&pixels.to_dtype(self.class_embedding.dtype())?)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let cls = self.class_embedding.reshape((1, 1, d))?.repeat((b, 1, 1))?;
        let xs = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        let mut xs = self.pre_layrnorm.forward(&xs)?;
        let n = self.layers.len();
        let mut penultimate = xs.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            xs = layer.forward(&xs)?;
            if i + 2 == n {
                penultimate = xs.clone();
            }
        }
        let pooled = self.post_layernorm.forward(&xs.i((.., 0, ..))?)?;
        Ok(VisionOutput {
            image_embeds: self.visual_projection.forward(&pooled)?,
            penultimate,
        })
    }

    /// transformers' `CLIPImageProcessor` (torchvision backend) on an RGB image `[H, W, 3]`
    /// of bytes: the short side to `image_size` (PIL's bicubic on bytes, as torchvision's),
    /// centre crop, `/255`, OpenAI CLIP's mean and std. Returns `[1, 3, S, S]` f32.
    pub fn preprocess(&self, rgb: &[u8], width: usize, height: usize) -> Result<Tensor> {
        preprocess(rgb, width, height, self.config.image_size)
    }
}

/// OpenAI CLIP's normalisation (transformers' `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`).
const MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// See [`ClipVisionModel::preprocess`].
pub fn preprocess(rgb: &[u8], width: usize, height: usize, size: usize) -> Result<Tensor> {
    if rgb.len() != width * height * 3 || width == 0 || height == 0 {
        candle_core::bail!("image encoder input: {width}x{height} RGB expected");
    }
    // get_resize_output_image_size(default_to_square=False): the long side int(size * l / s)
    let (nh, nw) = if width <= height {
        (size * height / width, size)
    } else {
        (size, size * width / height)
    };
    // torchvision's uint8 bicubic resize (torch's int16 fixed point)
    let resized = pil_resize(
        rgb,
        width,
        height,
        3,
        nw,
        nh,
        PilFilter::Bicubic,
        Fixed::Torch,
    );
    let x = Tensor::from_vec(
        resized.iter().map(|&b| b as f32).collect::<Vec<_>>(),
        (nh, nw, 3),
        &Device::Cpu,
    )?
    .permute((2, 0, 1))?
    .unsqueeze(0)?;
    // torchvision's center_crop: int(round((h - s) / 2)), round half to even
    let offset = |n: usize| ((n - size.min(n)) as f64 / 2.0).round_ties_even() as usize;
    let x = x
        .narrow(2, offset(nh), size.min(nh))?
        .narrow(3, offset(nw), size.min(nw))?;
    let mean = Tensor::from_vec(MEAN.to_vec(), (1, 3, 1, 1), &Device::Cpu)?;
    let std = Tensor::from_vec(STD.to_vec(), (1, 3, 1, 1), &Device::Cpu)?;
    (x / 255.0)?.broadcast_sub(&mean)?.broadcast_div(&std)
}

/// Where an image encoder's weights and config are: a folder (config.json + weights) or a
/// file (a config `NAME.json` beside it, else read from the weights).
fn encoder_files(path: &Path) -> crate::Result<(Vec<PathBuf>, Option<PathBuf>)> {
    if path.is_dir() {
        let cfg = path.join("config.json");
        let files = crate::loading::files::weight_files(path)?;
        return Ok((files, cfg.is_file().then_some(cfg)));
    }
    let beside = path.with_extension("json");
    Ok((vec![path.to_path_buf()], beside.is_file().then_some(beside)))
}

/// Load an image encoder (folder or file; safetensors, or a pickle through the safe
/// loader).
pub fn load_clip_vision(
    path: &Path,
    device: &Device,
    dtype: DType,
) -> crate::Result<ClipVisionModel> {
    if !path.exists() {
        return Err(Error::config(path, "image encoder not found"));
    }
    let (files, cfg_path) = encoder_files(path)?;
    let shapes = crate::loading::files::tensor_shapes(&files[0])?;
    let projection = shapes
        .iter()
        .find(|(n, _)| n == "visual_projection.weight")
        .map(|(_, s)| s[0]);
    let Some(projection) = projection else {
        return Err(Error::config(
            &files[0],
            "not a CLIP image encoder with projection (no visual_projection.weight)",
        ));
    };
    let cfg = match &cfg_path {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| Error::config(p, e.to_string()))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::config(p, e.to_string()))?;
            ClipVisionConfig::from_json(&v, projection, p)?
        }
        None => ClipVisionConfig::from_shapes(&shapes, &files[0])?,
    };
    crate::loading::diffusers::load_component(
        &files,
        sd_plugins_api::ModelPart::TextEncoder,
        &[],
        dtype,
        device,
        |vb| ClipVisionModel::new(&cfg, vb),
    )
}
