//! diffusers `ControlNetModel` (controlnets/controlnet.py) on the shared UNet encoder.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use sd_pipeline::model::nn::Conv2d;
use sd_pipeline::model::unet::UNetEncoder;
use sd_plugins_api::{AddedCond, Residuals};

use crate::config::ControlNetConfig;
use crate::union::{UnionCondition, UnionParts};

fn conv(i: usize, o: usize, k: usize, stride: usize, vb: VarBuilder) -> Result<Conv2d> {
    sd_pipeline::model::nn::conv2d(i, o, k, stride, k / 2, vb)
}

/// The hint encoder: conv_in, pairs of (3x3, stride-2 3x3) convs with SiLU, conv_out.
#[derive(Debug, Clone)]
struct ConditioningEmbedding {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
}

impl ConditioningEmbedding {
    fn new(cfg: &ControlNetConfig, vb: VarBuilder) -> Result<Self> {
        let ch = &cfg.conditioning_embedding_out_channels;
        let mut blocks = Vec::new();
        for i in 0..ch.len() - 1 {
            blocks.push(conv(
                ch[i],
                ch[i],
                3,
                1,
                vb.pp(format!("blocks.{}", 2 * i)),
            )?);
            blocks.push(conv(
                ch[i],
                ch[i + 1],
                3,
                2,
                vb.pp(format!("blocks.{}", 2 * i + 1)),
            )?);
        }
        Ok(Self {
            conv_in: conv(cfg.conditioning_channels, ch[0], 3, 1, vb.pp("conv_in"))?,
            blocks,
            conv_out: conv(
                ch[ch.len() - 1],
                cfg.unet.block_out_channels[0],
                3,
                1,
                vb.pp("conv_out"),
            )?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(x)?.silu()?;
        for b in &self.blocks {
            x = b.forward(&x)?.silu()?;
        }
        self.conv_out.forward(&x)
    }
}

#[derive(Debug, Clone)]
pub struct ControlNetModel {
    encoder: UNetEncoder,
    cond_embedding: ConditioningEmbedding,
    down_zero: Vec<Conv2d>,
    mid_zero: Conv2d,
    /// A union ControlNet's extra parts.
    union: Option<UnionParts>,
    config: ControlNetConfig,
}

impl ControlNetModel {
    /// Build with diffusers names (`controlnet_cond_embedding`, `controlnet_down_blocks.N`,
    /// `controlnet_mid_block` plus the UNet encoder's own names).
    pub fn new(cfg: &ControlNetConfig, vb: VarBuilder) -> Result<Self> {
        let encoder = UNetEncoder::new(&cfg.unet, vb.clone())?;
        let down_zero = encoder
            .skip_channels()
            .iter()
            .enumerate()
            .map(|(i, &c)| conv(c, c, 1, 1, vb.pp(format!("controlnet_down_blocks.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let c_mid = *cfg
            .unet
            .block_out_channels
            .last()
            .expect("at least one block");
        Ok(Self {
            cond_embedding: ConditioningEmbedding::new(cfg, vb.pp("controlnet_cond_embedding"))?,
            down_zero,
            mid_zero: conv(c_mid, c_mid, 1, 1, vb.pp("controlnet_mid_block"))?,
            union: match cfg.union {
                Some(u) => Some(UnionParts::new(
                    u,
                    cfg.unet.block_out_channels[0],
                    cfg.unet.block_out_channels[0] * 4,
                    vb.clone(),
                )?),
                None => None,
            },
            encoder,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ControlNetConfig {
        &self.config
    }

    /// True for union ControlNets (one model, many control types).
    pub fn is_union(&self) -> bool {
        self.union.is_some()
    }

    /// A union ControlNet's residuals for `conds` (each an embedded control image, its type
    /// and scale; see [`UnionParts::fuse`] for how scales apply), diffusers
    /// `ControlNetUnionModel.forward`. One condition's residuals are unscaled.
    pub fn forward_union(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        ctx: &Tensor,
        added: Option<&AddedCond>,
        conds: &[UnionCondition<'_>],
    ) -> Result<Residuals> {
        let Some(u) = &self.union else {
            candle_core::bail!("not a union ControlNet");
        };
        let dtype = sample.dtype();
        let types: Vec<usize> = conds.iter().map(|c| c.type_index).collect();
        let cu = &self.config.unet;
        let emb = self
            .encoder
            .time_embedding(timesteps, added, dtype)?
            .broadcast_add(&u.type_embedding(
                &types,
                sample.dim(0)?,
                cu.flip_sin_to_cos,
                cu.freq_shift,
                dtype,
            )?)?;
        let fused = u.fuse(&self.encoder.conv_in(sample)?, conds)?;
        let (skips, mid) = self.encoder.forward(sample, &emb, ctx, Some(&fused))?;
        let down = skips
            .iter()
            .zip(&self.down_zero)
            .map(|(s, c)| c.forward(s))
            .collect::<Result<Vec<_>>>()?;
        Ok(Residuals {
            down,
            mid: self.mid_zero.forward(&mid)?,
        })
    }

    /// Number of down residuals (= the base UNet's skip connections).
    pub fn num_down(&self) -> usize {
        self.down_zero.len()
    }

    /// Unscaled residuals for latents `sample` `[B, C, h, w]`, per-sample `timesteps` `[B]`,
    /// text `ctx` and the control image `cond` `[B, 3, H, W]` in [0, 1].
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        ctx: &Tensor,
        cond: &Tensor,
    ) -> Result<Residuals> {
        let hint = self.embed_condition(cond, sample.dtype())?;
        self.forward_with_hint(sample, timesteps, ctx, None, &hint)
    }

    /// The control image's embedding (`controlnet_cond_embedding`) in `dtype`: it depends on
    /// the image alone, so a generation computes it once and passes it to
    /// [`Self::forward_with_hint`] at every step (diffusers recomputes it each step).
    pub fn embed_condition(&self, cond: &Tensor, dtype: candle_core::DType) -> Result<Tensor> {
        let cond = if self.config.bgr {
            cond.flip(&[1])?
        } else {
            cond.clone()
        };
        self.cond_embedding.forward(&cond.to_dtype(dtype)?)
    }

    /// [`Self::forward`] with the control image already embedded ([`Self::embed_condition`],
    /// batch 1 or the sample's batch), and SDXL's added conditioning for SDXL ControlNets.
    pub fn forward_with_hint(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        ctx: &Tensor,
        added: Option<&AddedCond>,
        hint: &Tensor,
    ) -> Result<Residuals> {
        let emb = self
            .encoder
            .time_embedding(timesteps, added, sample.dtype())?;
        let (skips, mid) = self.encoder.forward(sample, &emb, ctx, Some(hint))?;
        let mut down = skips
            .iter()
            .zip(&self.down_zero)
            .map(|(s, c)| c.forward(s))
            .collect::<Result<Vec<_>>>()?;
        let mut mid = self.mid_zero.forward(&mid)?;
        if self.config.global_pool {
            down = down
                .iter()
                .map(|d| d.mean_keepdim(3)?.mean_keepdim(2))
                .collect::<Result<Vec<_>>>()?;
            mid = mid.mean_keepdim(3)?.mean_keepdim(2)?;
        }
        Ok(Residuals { down, mid })
    }
}
