//! Union ControlNets (ControlNet++ / xinsir "union" and "promax"; diffusers
//! `ControlNetUnionModel`, controlnets/controlnet_union.py): one model for many control types.
//! Each condition's embedding is summarised (spatial mean + the type's `task_embedding`), a
//! small transformer mixes the summaries with the latents', and each condition enters the
//! encoder as its embedding plus a per-channel shift (`spatial_ch_projs`); the set of types
//! in use is embedded into the time embedding (`control_add_embedding`).

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use sd_pipeline::model::nn::{attention, linear, LayerNorm, Linear};
use sd_pipeline::model::unet::timestep_embedding;

use crate::error::ControlError;

/// A union model's extra configuration (diffusers' defaults: 6 types, 320 channels, 8 heads,
/// one layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnionConfig {
    pub num_control_type: usize,
    pub num_trans_channel: usize,
    pub num_trans_head: usize,
    pub num_trans_layer: usize,
    pub num_proj_channel: usize,
    /// `addition_time_embed_dim`: each type flag's sinusoidal width.
    pub time_embed_dim: usize,
}

/// The control types by name (ComfyUI's names and numbering, semantics.md).
pub const TYPES: &[(&str, usize)] = &[
    ("openpose", 0),
    ("depth", 1),
    ("hed", 2),
    ("pidi", 2),
    ("scribble", 2),
    ("canny", 3),
    ("lineart", 3),
    ("mlsd", 3),
    ("normal", 4),
    ("segment", 5),
    ("tile", 6),
    ("repaint", 7),
];

/// The names [`TYPES`] knows, in order (config checks list them).
pub const TYPE_NAMES: [&str; 12] = [
    "openpose", "depth", "hed", "pidi", "scribble", "canny", "lineart", "mlsd", "normal",
    "segment", "tile", "repaint",
];

/// The index of a union type name (`type=` of a unit).
pub fn type_index(name: &str) -> std::result::Result<usize, ControlError> {
    TYPES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, i)| *i)
        .ok_or_else(|| {
            let names: Vec<&str> = TYPES.iter().map(|(n, _)| *n).collect();
            ControlError::Invalid(format!(
                "unknown union control type {name:?}: use one of {}",
                names.join(", ")
            ))
        })
}

/// OpenAI CLIP's `ResidualAttentionBlock` (nn.MultiheadAttention, QuickGELU MLP).
#[derive(Debug, Clone)]
struct ResidualAttentionBlock {
    in_proj: Linear,
    out_proj: Linear,
    ln_1: LayerNorm,
    c_fc: Linear,
    c_proj: Linear,
    ln_2: LayerNorm,
    heads: usize,
}

impl ResidualAttentionBlock {
    fn new(d: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        let attn = vb.pp("attn");
        let w = attn.get((3 * d, d), "in_proj_weight")?;
        let b = attn.get(3 * d, "in_proj_bias")?;
        Ok(Self {
            in_proj: Linear::new(w, Some(b)),
            out_proj: linear(d, d, attn.pp("out_proj"))?,
            ln_1: LayerNorm::new(d, 1e-5, vb.pp("ln_1"))?,
            c_fc: linear(d, 4 * d, vb.pp("mlp.c_fc"))?,
            c_proj: linear(4 * d, d, vb.pp("mlp.c_proj"))?,
            ln_2: LayerNorm::new(d, 1e-5, vb.pp("ln_2"))?,
            heads,
        })
    }

    /// `x` is `[L, N, D]` as nn.MultiheadAttention reads it without `batch_first`: attention
    /// runs along the first axis. diffusers passes `[batch, conditions + 1, D]`, so the
    /// mixing is across the batch rows, per condition slot; kept as it is, for parity.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.ln_1.forward(x)?;
        let qkv = self.in_proj.forward(&h.transpose(0, 1)?.contiguous()?)?; // [N, L, 3D]
        let d = x.dim(D::Minus1)?;
        let (q, k, v) = (
            qkv.narrow(2, 0, d)?,
            qkv.narrow(2, d, d)?,
            qkv.narrow(2, 2 * d, d)?,
        );
        let a = attention(
            &q.contiguous()?,
            &k.contiguous()?,
            &v.contiguous()?,
            self.heads,
            false,
        )?;
        let a = self.out_proj.forward(&a)?.transpose(0, 1)?;
        let x = (x + a)?;
        let h = self.c_fc.forward(&self.ln_2.forward(&x)?)?;
        let h = (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?; // QuickGELU
        x + self.c_proj.forward(&h)?
    }
}

/// The union model's parts beside the ordinary ControlNet.
#[derive(Debug, Clone)]
pub struct UnionParts {
    task_embedding: Tensor,
    layers: Vec<ResidualAttentionBlock>,
    spatial_ch_projs: Linear,
    control_add_1: Linear,
    control_add_2: Linear,
    config: UnionConfig,
}

/// One condition of a union forward: its embedded control image (`[1 or B, C0, H, W]`), type
/// and scale.
pub struct UnionCondition<'a> {
    pub embedded: &'a Tensor,
    pub type_index: usize,
    pub scale: f64,
}

impl UnionParts {
    pub fn new(cfg: UnionConfig, channels: usize, temb_dim: usize, vb: VarBuilder) -> Result<Self> {
        let c = cfg.num_trans_channel;
        if c != channels || cfg.num_proj_channel != channels {
            candle_core::bail!(
                "union ControlNet: num_trans_channel {c} and num_proj_channel {} must equal the first block's {channels} channels",
                cfg.num_proj_channel
            );
        }
        Ok(Self {
            task_embedding: vb.get((cfg.num_control_type, c), "task_embedding")?,
            layers: (0..cfg.num_trans_layer)
                .map(|i| {
                    ResidualAttentionBlock::new(
                        c,
                        cfg.num_trans_head,
                        vb.pp(format!("transformer_layes.{i}")),
                    )
                })
                .collect::<Result<Vec<_>>>()?,
            spatial_ch_projs: linear(c, cfg.num_proj_channel, vb.pp("spatial_ch_projs"))?,
            control_add_1: linear(
                cfg.time_embed_dim * cfg.num_control_type,
                temb_dim,
                vb.pp("control_add_embedding.linear_1"),
            )?,
            control_add_2: linear(temb_dim, temb_dim, vb.pp("control_add_embedding.linear_2"))?,
            config: cfg,
        })
    }

    pub fn config(&self) -> &UnionConfig {
        &self.config
    }

    /// `control_add_embedding` of the types in use, `[batch, temb]` (to add to the time
    /// embedding). `flip` and `shift` are the model's `flip_sin_to_cos` and `freq_shift`.
    pub fn type_embedding(
        &self,
        types: &[usize],
        batch: usize,
        flip: bool,
        shift: f64,
        dtype: DType,
    ) -> Result<Tensor> {
        let n = self.config.num_control_type;
        let mut flags = vec![0f32; n];
        for &t in types {
            flags[t] = 1.0;
        }
        let dev = self.task_embedding.device();
        let e = timestep_embedding(
            &Tensor::from_vec(flags, n, dev)?,
            self.config.time_embed_dim,
            flip,
            shift,
        )?
        .reshape((1, n * self.config.time_embed_dim))?
        .to_dtype(dtype)?;
        let e = self
            .control_add_2
            .forward(&self.control_add_1.forward(&e)?.silu()?)?;
        e.broadcast_as((batch, e.dim(1)?))?.contiguous()
    }

    /// What is added to `conv_in`'s output (`[B, C0, h, w]`): each condition's embedding and
    /// its per-channel shift. With one condition nothing is scaled here (its scale applies to
    /// the residuals); with several, each condition's summary, embedding and shift are
    /// scaled by its own scale and the residuals are not (diffusers).
    pub fn fuse(&self, conv_in: &Tensor, conds: &[UnionCondition<'_>]) -> Result<Tensor> {
        let b = conv_in.dim(0)?;
        let c = conv_in.dim(1)?;
        let multi = conds.len() > 1;
        let mut seq = Vec::with_capacity(conds.len() + 1);
        let mut embedded = Vec::with_capacity(conds.len());
        for cond in conds {
            let e = cond.embedded.to_dtype(conv_in.dtype())?;
            let feat = e.mean(D::Minus1)?.mean(D::Minus1)?; // [1 or B, C]
            let task = self
                .task_embedding
                .get(cond.type_index)?
                .to_dtype(conv_in.dtype())?
                .unsqueeze(0)?;
            let feat = feat.broadcast_add(&task)?.broadcast_as((b, c))?;
            let s = if multi { cond.scale } else { 1.0 };
            seq.push((feat * s)?.unsqueeze(1)?);
            embedded.push((e * s)?);
        }
        seq.push(conv_in.mean(D::Minus1)?.mean(D::Minus1)?.unsqueeze(1)?);
        let mut x = Tensor::cat(&seq, 1)?; // [B, n + 1, C]
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        let mut fuser: Option<Tensor> = None;
        for (i, (cond, e)) in conds.iter().zip(&embedded).enumerate() {
            let alpha = self
                .spatial_ch_projs
                .forward(&x.get_on_dim(1, i)?)?
                .unsqueeze(2)?
                .unsqueeze(3)?;
            let alpha = if multi { (alpha * cond.scale)? } else { alpha };
            let term = e.broadcast_add(&alpha)?;
            fuser = Some(match fuser {
                None => term,
                Some(f) => f.broadcast_add(&term)?,
            });
        }
        match fuser {
            Some(f) => f.broadcast_as(conv_in.shape())?.contiguous(),
            None => candle_core::bail!("a union ControlNet forward needs at least one condition"),
        }
    }
}
