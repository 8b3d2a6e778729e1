//! IP-Adapters (an image as a prompt): the original files users have (`ip-adapter_sd15.bin`,
//! `ip-adapter-plus_sdxl_vit-h.safetensors`, ...: `image_proj.*` and `ip_adapter.N.to_k_ip` /
//! `to_v_ip` keys), read as diffusers' `_convert_ip_adapter_image_proj_to_diffusers` /
//! `_convert_ip_adapter_attn_to_diffusers` read them. The projection kinds: base
//! (`ImageProjection`, 4 tokens from `image_embeds`), plus / plus-face (the resampler,
//! `IPAdapterPlusImageProjection`, on the penultimate hidden states) and full-face
//! (`IPAdapterFullImageProjection`, an MLP on the penultimate hidden states).

use std::path::Path;

use candle_core::{DType, Device, Module, Result as CResult, Tensor};
use candle_nn::VarBuilder;
use sd_pipeline::loading::diffusers::load_component;
use sd_pipeline::loading::files::tensor_shapes;
use sd_pipeline::model::nn::Linear;
use sd_pipeline::model::nn::{attention, LayerNorm};
use sd_plugins_api::ModelPart;

use crate::error::{ControlError, Result};

/// The image projection's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjectionKind {
    /// `image_proj.proj` + `norm`: 4 tokens from the CLIP image embedding.
    Base,
    /// The resampler (`image_proj.latents`, `layers.N`): plus and plus-face.
    Plus,
    /// `image_proj.proj.0/2/3`: full-face.
    FullFace,
}

impl ProjectionKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Base => "base",
            Self::Plus => "plus (resampler)",
            Self::FullFace => "full-face",
        }
    }
}

/// An IP-Adapter's architecture, read from its keys.
#[derive(Debug, Clone, PartialEq)]
pub struct IpAdapterConfig {
    pub kind: ProjectionKind,
    /// Image tokens it gives (4 for base, the resampler's queries, 257 for full-face).
    pub tokens: usize,
    /// The image encoder output width it takes (projection dim for base, hidden width else).
    pub image_dim: usize,
    /// The text width of the UNet it fits (768 SD1, 1024 SD2, 2048 SDXL).
    pub cross_attention_dim: usize,
    /// Each cross-attention layer's channels, in the file's order (diffusers'
    /// `attn_processors`: down blocks, up blocks, mid block).
    pub layer_dims: Vec<usize>,
    /// The resampler's depth and heads.
    pub depth: usize,
    pub heads: usize,
}

impl IpAdapterConfig {
    /// Whether it reads the image encoder's penultimate hidden states (else `image_embeds`).
    pub fn uses_hidden_states(&self) -> bool {
        self.kind != ProjectionKind::Base
    }
    /// The model family by text width (the released files' widths).
    pub fn family(&self) -> String {
        match self.cross_attention_dim {
            2048 => "SDXL".into(),
            768 | 1024 => "SD 1.x/2.x".into(),
            _ => "other".into(),
        }
    }
}

/// Whether `names` are an IP-Adapter's.
pub fn is_ip_adapter(names: &[(String, Vec<usize>)]) -> bool {
    names
        .iter()
        .any(|(n, _)| n.starts_with("ip_adapter.") && n.ends_with(".to_k_ip.weight"))
        && names.iter().any(|(n, _)| n.starts_with("image_proj."))
}

fn config_from_keys(names: &[(String, Vec<usize>)], path: &Path) -> Result<IpAdapterConfig> {
    let shape = |k: &str| names.iter().find(|(n, _)| n == k).map(|(_, s)| s.clone());
    let need =
        |k: &str| shape(k).ok_or_else(|| ControlError::file(path, format!("IP-Adapter lacks {k}")));
    let mut layers: Vec<(usize, usize, usize)> = names
        .iter()
        .filter_map(|(n, s)| {
            let id = n
                .strip_prefix("ip_adapter.")?
                .strip_suffix(".to_k_ip.weight")?;
            Some((id.parse().ok()?, s[0], s[1]))
        })
        .collect();
    layers.sort_by_key(|l| l.0);
    // diffusers: key ids 1, 3, 5, ... (every processor counted, the self-attentions unused)
    if layers.iter().enumerate().any(|(i, l)| l.0 != 2 * i + 1) {
        return Err(ControlError::file(
            path,
            "IP-Adapter's ip_adapter.N keys are not 1, 3, 5, ... (not a layout diffusers reads)",
        ));
    }
    let cross = layers.first().map(|l| l.2).unwrap_or(0);
    let (kind, tokens, image_dim, depth, heads) = if shape("image_proj.proj.weight").is_some() {
        let p = need("image_proj.proj.weight")?;
        let n = need("image_proj.norm.weight")?[0];
        (ProjectionKind::Base, p[0] / n.max(1), p[1], 0, 0)
    } else if shape("image_proj.proj.3.weight").is_some() {
        let p = need("image_proj.proj.0.weight")?;
        (ProjectionKind::FullFace, 257, p[1], 0, 0)
    } else if shape("image_proj.latents").is_some() {
        let l = need("image_proj.latents")?;
        let pin = need("image_proj.proj_in.weight")?;
        let depth = (0..)
            .take_while(|i| shape(&format!("image_proj.layers.{i}.0.to_q.weight")).is_some())
            .count();
        let q = need("image_proj.layers.0.0.to_q.weight")?;
        (ProjectionKind::Plus, l[1], pin[1], depth, q[0] / 64)
    } else {
        return Err(ControlError::file(
            path,
            "unsupported IP-Adapter image projection (FaceID files are not supported)",
        ));
    };
    Ok(IpAdapterConfig {
        kind,
        tokens,
        image_dim,
        cross_attention_dim: cross,
        layer_dims: layers.iter().map(|l| l.1).collect(),
        depth,
        heads,
    })
}

/// One resampler block (`PerceiverAttention` + `FeedForward`, the original names).
#[derive(Debug, Clone)]
struct ResamplerLayer {
    norm1: LayerNorm,
    norm2: LayerNorm,
    to_q: Linear,
    to_kv: Linear,
    to_out: Linear,
    ff_norm: LayerNorm,
    ff1: Linear,
    ff2: Linear,
    heads: usize,
}

impl ResamplerLayer {
    fn new(dim: usize, heads: usize, vb: VarBuilder) -> CResult<Self> {
        let a = vb.pp("0");
        let f = vb.pp("1");
        let inner = heads * 64;
        Ok(Self {
            norm1: LayerNorm::new(dim, 1e-5, a.pp("norm1"))?,
            norm2: LayerNorm::new(dim, 1e-5, a.pp("norm2"))?,
            to_q: sd_pipeline::model::nn::linear_no_bias(dim, inner, a.pp("to_q"))?,
            to_kv: sd_pipeline::model::nn::linear_no_bias(dim, 2 * inner, a.pp("to_kv"))?,
            to_out: sd_pipeline::model::nn::linear_no_bias(inner, dim, a.pp("to_out"))?,
            ff_norm: LayerNorm::new(dim, 1e-5, f.pp("0"))?,
            ff1: sd_pipeline::model::nn::linear_no_bias(dim, 4 * dim, f.pp("1"))?,
            ff2: sd_pipeline::model::nn::linear_no_bias(4 * dim, dim, f.pp("3"))?,
            heads,
        })
    }

    /// `latents = attn(x, latents) + latents; latents = ff(latents) + latents`.
    fn forward(&self, x: &Tensor, latents: &Tensor) -> CResult<Tensor> {
        let xn = self.norm1.forward(x)?;
        let ln = self.norm2.forward(latents)?;
        let q = self.to_q.forward(&ln)?;
        let kv = self.to_kv.forward(&Tensor::cat(&[&xn, &ln], 1)?)?;
        let inner = self.heads * 64;
        let k = kv.narrow(2, 0, inner)?.contiguous()?;
        let v = kv.narrow(2, inner, inner)?.contiguous()?;
        let a = self
            .to_out
            .forward(&attention(&q, &k, &v, self.heads, false)?)?;
        let latents = (a + latents)?;
        let h = self
            .ff1
            .forward(&self.ff_norm.forward(&latents)?)?
            .gelu_erf()?;
        self.ff2.forward(&h)? + latents
    }
}

#[derive(Debug, Clone)]
enum Projection {
    Base {
        proj: Linear,
        norm: LayerNorm,
        tokens: usize,
    },
    FullFace {
        fc1: Linear,
        fc2: Linear,
        norm: LayerNorm,
    },
    Plus {
        latents: Tensor,
        proj_in: Linear,
        proj_out: Linear,
        norm_out: LayerNorm,
        layers: Vec<ResamplerLayer>,
    },
}

/// A loaded IP-Adapter.
#[derive(Debug, Clone)]
pub struct IpAdapter {
    config: IpAdapterConfig,
    projection: Projection,
    /// `to_k_ip` / `to_v_ip` per cross-attention layer, in the file's order.
    to_k: Vec<Linear>,
    to_v: Vec<Linear>,
}

impl IpAdapter {
    pub fn new(cfg: &IpAdapterConfig, vb: VarBuilder) -> CResult<Self> {
        let p = vb.pp("image_proj");
        let cross = cfg.cross_attention_dim;
        let projection = match cfg.kind {
            ProjectionKind::Base => Projection::Base {
                proj: sd_pipeline::model::nn::linear(
                    cfg.image_dim,
                    cfg.tokens * cross,
                    p.pp("proj"),
                )?,
                norm: LayerNorm::new(cross, 1e-5, p.pp("norm"))?,
                tokens: cfg.tokens,
            },
            ProjectionKind::FullFace => Projection::FullFace {
                fc1: sd_pipeline::model::nn::linear(cfg.image_dim, cfg.image_dim, p.pp("proj.0"))?,
                fc2: sd_pipeline::model::nn::linear(cfg.image_dim, cross, p.pp("proj.2"))?,
                norm: LayerNorm::new(cross, 1e-5, p.pp("proj.3"))?,
            },
            ProjectionKind::Plus => {
                let lat = p.get_unchecked("latents")?;
                let hidden = lat.dim(2)?;
                let out = p.get_unchecked("proj_out.weight")?.dim(0)?;
                Projection::Plus {
                    latents: lat,
                    proj_in: sd_pipeline::model::nn::linear(
                        cfg.image_dim,
                        hidden,
                        p.pp("proj_in"),
                    )?,
                    proj_out: sd_pipeline::model::nn::linear(hidden, out, p.pp("proj_out"))?,
                    norm_out: LayerNorm::new(out, 1e-5, p.pp("norm_out"))?,
                    layers: (0..cfg.depth)
                        .map(|i| {
                            ResamplerLayer::new(hidden, cfg.heads, p.pp(format!("layers.{i}")))
                        })
                        .collect::<CResult<Vec<_>>>()?,
                }
            }
        };
        let ip = vb.pp("ip_adapter");
        let mut to_k = Vec::new();
        let mut to_v = Vec::new();
        for (i, &d) in cfg.layer_dims.iter().enumerate() {
            let l = ip.pp((2 * i + 1).to_string());
            to_k.push(sd_pipeline::model::nn::linear_no_bias(
                cross,
                d,
                l.pp("to_k_ip"),
            )?);
            to_v.push(sd_pipeline::model::nn::linear_no_bias(
                cross,
                d,
                l.pp("to_v_ip"),
            )?);
        }
        Ok(Self {
            config: cfg.clone(),
            projection,
            to_k,
            to_v,
        })
    }

    pub fn config(&self) -> &IpAdapterConfig {
        &self.config
    }

    /// The image prompt tokens `[B, T, cross_attention_dim]` from the image encoder's output
    /// (`image_embeds` `[B, D]` for base, the penultimate hidden states otherwise).
    pub fn image_tokens(&self, encoded: &Tensor) -> CResult<Tensor> {
        match &self.projection {
            Projection::Base { proj, norm, tokens } => {
                let b = encoded.dim(0)?;
                norm.forward(&proj.forward(encoded)?.reshape((b, *tokens, ()))?)
            }
            Projection::FullFace { fc1, fc2, norm } => {
                norm.forward(&fc2.forward(&fc1.forward(encoded)?.gelu_erf()?)?)
            }
            Projection::Plus {
                latents,
                proj_in,
                proj_out,
                norm_out,
                layers,
            } => {
                let b = encoded.dim(0)?;
                let x = proj_in.forward(encoded)?;
                let mut l = latents.repeat((b, 1, 1))?;
                for layer in layers {
                    l = layer.forward(&x, &l)?;
                }
                norm_out.forward(&proj_out.forward(&l)?)
            }
        }
    }

    /// The keys and values of `tokens` for every cross-attention layer, in the UNet's run
    /// order: the file holds them as diffusers' `attn_processors` lists them (down, up, mid),
    /// the UNet runs down, mid, up; `counts` = (down, mid, up) layer counts.
    pub fn keys_values(
        &self,
        tokens: &Tensor,
        counts: (usize, usize, usize),
    ) -> CResult<(Vec<Tensor>, Vec<Tensor>)> {
        let (d, m, u) = counts;
        let order = (0..d).chain(d + u..d + u + m).chain(d..d + u);
        let mut keys = Vec::new();
        let mut values = Vec::new();
        for i in order {
            keys.push(self.to_k[i].forward(tokens)?);
            values.push(self.to_v[i].forward(tokens)?);
        }
        Ok((keys, values))
    }

    /// Check against a base UNet's cross-attention layers ((down, mid, up) channels, as
    /// `UNet2DConditionModel::cross_attention_dims`) and text width.
    pub fn validate_for(
        &self,
        dims: &(Vec<usize>, Vec<usize>, Vec<usize>),
        cross_attention_dim: usize,
        family: &str,
    ) -> std::result::Result<(), String> {
        let c = &self.config;
        if c.cross_attention_dim != cross_attention_dim {
            return Err(format!(
                "an IP-Adapter for {} models (text width {}) cannot guide an {family} model (text width {cross_attention_dim})",
                c.family(),
                c.cross_attention_dim
            ));
        }
        // the file's order: down, up, mid
        let file: Vec<usize> = dims
            .0
            .iter()
            .chain(&dims.2)
            .chain(&dims.1)
            .copied()
            .collect();
        if file != c.layer_dims {
            return Err(format!(
                "the IP-Adapter has {} cross-attention layers {:?}; the base UNet's are {:?}",
                c.layer_dims.len(),
                c.layer_dims,
                file
            ));
        }
        Ok(())
    }
}

/// The architecture of the IP-Adapter file at `path`, or `None` when it is none.
pub fn inspect(path: &Path) -> Result<Option<IpAdapterConfig>> {
    let shapes = tensor_shapes(path)?;
    if !is_ip_adapter(&shapes) {
        return Ok(None);
    }
    config_from_keys(&shapes, path).map(Some)
}

/// Load an IP-Adapter file (safetensors, or a pickled `.bin` through the safe loader).
pub fn load_ip_adapter(path: &Path, device: &Device, dtype: DType) -> Result<IpAdapter> {
    let shapes = tensor_shapes(path)?;
    if !is_ip_adapter(&shapes) {
        return Err(ControlError::file(
            path,
            "not an IP-Adapter: no image_proj.* and ip_adapter.N.to_k_ip keys",
        ));
    }
    let cfg = config_from_keys(&shapes, path)?;
    Ok(load_component(
        &[path.to_path_buf()],
        ModelPart::Unet,
        &[],
        dtype,
        device,
        |vb| IpAdapter::new(&cfg, vb),
    )?)
}
