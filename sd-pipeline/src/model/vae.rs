//! diffusers `AutoencoderKL` (encoder, decoder, quant convs).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::nn::{Conv2d, GroupNorm};

use super::blocks::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use super::config::VaeConfig;
use super::nn::{attention, conv2d, group_norm, linear};

/// The single-head self-attention of the VAE mid block (diffusers `Attention` with a group norm
/// and a residual connection; old `query/key/value/proj_attn` names are accepted too).
#[derive(Debug, Clone)]
struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl VaeAttention {
    fn new(c: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        let legacy = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let name = |new: &str, old: &str| {
            if legacy {
                old.to_string()
            } else {
                new.to_string()
            }
        };
        Ok(Self {
            group_norm: group_norm(groups, c, 1e-6, vb.pp("group_norm"))?,
            to_q: linear(c, c, vb.pp(name("to_q", "query")))?,
            to_k: linear(c, c, vb.pp(name("to_k", "key")))?,
            to_v: linear(c, c, vb.pp(name("to_v", "value")))?,
            to_out: linear(c, c, vb.pp(name("to_out.0", "proj_attn")))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let t = self
            .group_norm
            .forward(xs)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?;
        let q = self.to_q.forward(&t)?;
        let k = self.to_k.forward(&t)?;
        let v = self.to_v.forward(&t)?;
        let o = self.to_out.forward(&attention(&q, &k, &v, 1, false)?)?;
        let o = o.transpose(1, 2)?.reshape((b, c, h, w))?;
        o + xs
    }
}

#[derive(Debug, Clone)]
struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attention: Option<VaeAttention>,
}

impl MidBlock {
    fn new(c: usize, cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let r = resnet_cfg(cfg);
        Ok(Self {
            resnets: vec![
                ResnetBlock2D::new(c, c, r, vb.pp("resnets.0"))?,
                ResnetBlock2D::new(c, c, r, vb.pp("resnets.1"))?,
            ],
            attention: if cfg.mid_block_add_attention {
                Some(VaeAttention::new(
                    c,
                    cfg.norm_num_groups,
                    vb.pp("attentions.0"),
                )?)
            } else {
                None
            },
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.resnets[0].forward(xs, None)?;
        if let Some(a) = &self.attention {
            xs = a.forward(&xs)?;
        }
        self.resnets[1].forward(&xs, None)
    }
}

fn resnet_cfg(cfg: &VaeConfig) -> ResnetConfig {
    ResnetConfig {
        groups: cfg.norm_num_groups,
        eps: 1e-6,
        temb_channels: None,
        output_scale_factor: 1.0,
    }
}

#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    blocks: Vec<(Vec<ResnetBlock2D>, Option<Downsample2D>)>,
    mid: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let mut blocks = Vec::with_capacity(n);
        let mut out_c = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let in_c = out_c;
            out_c = c;
            let bvb = vb.pp(format!("down_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let ic = if j == 0 { in_c } else { out_c };
                    ResnetBlock2D::new(ic, out_c, resnet_cfg(cfg), bvb.pp(format!("resnets.{j}")))
                })
                .collect::<Result<Vec<_>>>()?;
            let ds = if i + 1 < n {
                Some(Downsample2D::new(out_c, 0, bvb.pp("downsamplers.0"))?)
            } else {
                None
            };
            blocks.push((resnets, ds));
        }
        Ok(Self {
            conv_in: conv2d(cfg.in_channels, ch[0], 3, 1, 1, vb.pp("conv_in"))?,
            blocks,
            mid: MidBlock::new(ch[n - 1], cfg, vb.pp("mid_block"))?,
            conv_norm_out: group_norm(
                cfg.norm_num_groups,
                ch[n - 1],
                1e-6,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: conv2d(
                ch[n - 1],
                2 * cfg.latent_channels,
                3,
                1,
                1,
                vb.pp("conv_out"),
            )?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.conv_in.forward(xs)?;
        for (resnets, ds) in &self.blocks {
            for r in resnets {
                xs = r.forward(&xs, None)?;
            }
            if let Some(ds) = ds {
                xs = ds.forward(&xs)?;
            }
        }
        let xs = self.mid.forward(&xs)?;
        self.conv_out
            .forward(&self.conv_norm_out.forward_silu(&xs)?)
    }
}

#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    blocks: Vec<(Vec<ResnetBlock2D>, Option<Upsample2D>)>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let n = rev.len();
        let mut blocks = Vec::with_capacity(n);
        let mut out_c = rev[0];
        for (i, &c) in rev.iter().enumerate() {
            let prev_c = out_c;
            out_c = c;
            let bvb = vb.pp(format!("up_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let ic = if j == 0 { prev_c } else { out_c };
                    ResnetBlock2D::new(ic, out_c, resnet_cfg(cfg), bvb.pp(format!("resnets.{j}")))
                })
                .collect::<Result<Vec<_>>>()?;
            let us = if i + 1 < n {
                Some(Upsample2D::new(out_c, bvb.pp("upsamplers.0"))?)
            } else {
                None
            };
            blocks.push((resnets, us));
        }
        Ok(Self {
            conv_in: conv2d(cfg.latent_channels, rev[0], 3, 1, 1, vb.pp("conv_in"))?,
            mid: MidBlock::new(rev[0], cfg, vb.pp("mid_block"))?,
            blocks,
            conv_norm_out: group_norm(
                cfg.norm_num_groups,
                rev[n - 1],
                1e-6,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: conv2d(rev[n - 1], cfg.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut xs = self.mid.forward(&self.conv_in.forward(z)?)?;
        for (resnets, us) in &self.blocks {
            for r in resnets {
                xs = r.forward(&xs, None)?;
            }
            if let Some(us) = us {
                xs = us.forward(&xs, None)?;
            }
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward_silu(&xs)?)
    }
}

#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: VaeConfig,
}

impl AutoencoderKL {
    pub fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let l2 = 2 * cfg.latent_channels;
        Ok(Self {
            encoder: Encoder::new(cfg, vb.pp("encoder"))?,
            decoder: Decoder::new(cfg, vb.pp("decoder"))?,
            quant_conv: if cfg.use_quant_conv {
                Some(conv2d(l2, l2, 1, 1, 0, vb.pp("quant_conv"))?)
            } else {
                None
            },
            post_quant_conv: if cfg.use_post_quant_conv {
                let l = cfg.latent_channels;
                Some(conv2d(l, l, 1, 1, 0, vb.pp("post_quant_conv"))?)
            } else {
                None
            },
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The mean of the latent distribution for images `[B, 3, H, W]` in [-1, 1] (unscaled).
    /// Encoding is deterministic: the distribution's mean, never a sample.
    pub fn encode_mean(&self, images: &Tensor) -> Result<Tensor> {
        let mut moments = self.encoder.forward(images)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        moments.narrow(1, 0, self.config.latent_channels)
    }

    /// Mean and log-variance of the latent distribution (log-variance clamped to [-30, 20], as
    /// diffusers' `DiagonalGaussianDistribution`); training samples `mean + exp(logvar / 2) * e`.
    pub fn encode_moments(&self, images: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut moments = self.encoder.forward(images)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        let l = self.config.latent_channels;
        let mean = moments.narrow(1, 0, l)?;
        let logvar = moments.narrow(1, l, l)?.clamp(-30f32, 20f32)?;
        Ok((mean, logvar))
    }

    /// Decode unscaled latents to images in roughly [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(latents)?,
            None => latents.clone(),
        };
        self.decoder.forward(&z)
    }

    /// Scale encoder latents into the diffusion model's space: `(z - shift) * scaling`.
    pub fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        (z - self.config.shift_factor)? * self.config.scaling_factor
    }

    /// Inverse of [`scale_latents`](Self::scale_latents).
    pub fn unscale_latents(&self, z: &Tensor) -> Result<Tensor> {
        (z / self.config.scaling_factor)? + self.config.shift_factor
    }
}
