//! diffusers `AutoencoderKL` (encoder, decoder, quant convs).

use super::nn::Linear;
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

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

/// Tiled VAE work as diffusers' `AutoencoderKL.enable_tiling()` does it: tiles of `sample`
/// image pixels (`sample / 2^(levels - 1)` latent pixels) stepping by `1 - overlap` of a tile,
/// neighbours blended linearly over `overlap` of a tile, each tile cropped to its step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VaeTiles {
    pub sample: usize,
    pub overlap: f64,
}

impl AutoencoderKL {
    /// diffusers' tile sizes for this VAE: its `sample_size`, a quarter overlap.
    pub fn default_tiles(&self) -> VaeTiles {
        VaeTiles {
            sample: self.config.sample_size,
            overlap: 0.25,
        }
    }

    /// The latent side of a `sample`-pixel tile (`tile_latent_min_size`).
    fn latent_tile(&self, sample: usize) -> usize {
        sample / (1 << (self.config.block_out_channels.len() - 1))
    }

    /// [`Self::decode`] in tiles (diffusers' `tiled_decode`) when the latents are larger than a
    /// tile, else whole.
    pub fn decode_tiled(&self, latents: &Tensor, t: VaeTiles) -> Result<Tensor> {
        let lt = self.latent_tile(t.sample).max(1);
        let (_, _, h, w) = latents.dims4()?;
        if h <= lt && w <= lt {
            return self.decode(latents);
        }
        let step = ((lt as f64 * (1.0 - t.overlap)) as usize).max(1);
        let blend = (t.sample as f64 * t.overlap) as usize;
        tiled(latents, lt, step, blend, t.sample - blend, |x| {
            self.decode(x)
        })
    }

    /// [`Self::encode_mean`] in tiles (diffusers' `_tiled_encode`) when the images are larger
    /// than a tile, else whole.
    pub fn encode_mean_tiled(&self, images: &Tensor, t: VaeTiles) -> Result<Tensor> {
        let (_, _, h, w) = images.dims4()?;
        if h <= t.sample && w <= t.sample {
            return self.encode_mean(images);
        }
        let lt = self.latent_tile(t.sample).max(1);
        let step = ((t.sample as f64 * (1.0 - t.overlap)) as usize).max(1);
        let blend = (lt as f64 * t.overlap) as usize;
        let moments = tiled(images, t.sample, step, blend, lt - blend, |x| {
            let m = self.encoder.forward(x)?;
            match &self.quant_conv {
                Some(q) => q.forward(&m),
                None => Ok(m),
            }
        })?;
        moments.narrow(1, 0, self.config.latent_channels)
    }
}

/// diffusers' tile loop: `f` on every `tile`-sized window stepping by `step`, then each tile
/// blended with the (already blended) tile above and to its left over `blend` rows/columns
/// (`blend_v`, `blend_h`: `a * (1 - y / e) + b * (y / e)`), cropped to `keep` and joined.
fn tiled(
    x: &Tensor,
    tile: usize,
    step: usize,
    blend: usize,
    keep: usize,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let mut rows: Vec<Vec<Tensor>> = Vec::new();
    for i in (0..h).step_by(step) {
        let mut row = Vec::new();
        for j in (0..w).step_by(step) {
            let t = x
                .narrow(2, i, tile.min(h - i))?
                .narrow(3, j, tile.min(w - j))?;
            row.push(f(&t)?);
        }
        rows.push(row);
    }
    // the blend weights, float64 divisions cast to float32 as torch multiplies by them
    let weights = |e: usize, axis: usize, like: &Tensor| -> Result<(Tensor, Tensor)> {
        let b: Vec<f32> = (0..e).map(|y| (y as f64 / e as f64) as f32).collect();
        let a: Vec<f32> = (0..e).map(|y| (1.0 - y as f64 / e as f64) as f32).collect();
        let shape: Vec<usize> = (0..4).map(|d| if d == axis { e } else { 1 }).collect();
        Ok((
            Tensor::from_vec(a, shape.as_slice(), like.device())?.to_dtype(like.dtype())?,
            Tensor::from_vec(b, shape.as_slice(), like.device())?.to_dtype(like.dtype())?,
        ))
    };
    let mix = |a: &Tensor, b: &Tensor, axis: usize| -> Result<Tensor> {
        let e = blend.min(a.dim(axis)?).min(b.dim(axis)?);
        if e == 0 {
            return Ok(b.clone());
        }
        let (wa, wb) = weights(e, axis, b)?;
        let top = (a.narrow(axis, a.dim(axis)? - e, e)?.broadcast_mul(&wa)?
            + b.narrow(axis, 0, e)?.broadcast_mul(&wb)?)?;
        Tensor::cat(&[&top, &b.narrow(axis, e, b.dim(axis)? - e)?], axis)
    };
    let mut out_rows = Vec::new();
    for i in 0..rows.len() {
        let mut out_row = Vec::new();
        for j in 0..rows[i].len() {
            let mut t = rows[i][j].clone();
            if i > 0 {
                t = mix(&rows[i - 1][j], &t, 2)?;
            }
            if j > 0 {
                t = mix(&rows[i][j - 1], &t, 3)?;
            }
            // blended in place in diffusers: later neighbours see this version
            rows[i][j] = t.clone();
            let (th, tw) = (t.dim(2)?.min(keep), t.dim(3)?.min(keep));
            out_row.push(t.narrow(2, 0, th)?.narrow(3, 0, tw)?);
        }
        out_rows.push(Tensor::cat(&out_row, 3)?);
    }
    Tensor::cat(&out_rows, 2)
}
