//! diffusers `UNet2DConditionModel` (SD 1.x / 2.x, and SDXL's `text_time` added embedding),
//! with per-sample timesteps and additive residuals (ControlNet) on the skip connections and
//! the mid block.

use super::nn::Linear;
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::nn::{Conv2d, GroupNorm};
use sd_plugins_api::{AddedCond, Residuals, UNetAdditions};

use super::blocks::{
    AttnExtras, Downsample2D, GnKey, RefBank, RefMode, ResnetBlock2D, ResnetConfig, Transformer2D,
    TransformerConfig, Upsample2D,
};
use super::config::{BlockKind, TextTime, UNetConfig};
use super::nn::{conv2d, group_norm, linear};
use super::shared_batch::SharedBatch;

/// Sinusoidal timestep embedding, diffusers `get_timestep_embedding` (float32 arithmetic).
pub fn timestep_embedding(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    let ln = -(10000f64.ln()) as f32;
    let denom = (half as f64 - freq_shift) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| (ln * i as f32 / denom).exp()).collect();
    let freqs = Tensor::from_vec(freqs, (1, half), timesteps.device())?;
    let args = timesteps
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    let (a, b) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[b, a], 1)?
    } else {
        Tensor::cat(&[a, b], 1)?
    };
    if dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)
    } else {
        Ok(emb)
    }
}

#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    downsampler: Option<Downsample2D>,
}

#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    upsampler: Option<Upsample2D>,
}

/// The encoder half of the UNet: `conv_in`, time embedding, down blocks and mid block, with
/// diffusers names. The UNet and ControlNet (its trainable copy) are both built on it.
#[derive(Debug, Clone)]
pub struct UNetEncoder {
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    /// SDXL's `add_embedding` (linear_1, linear_2) with its config.
    add_embedding: Option<(TextTime, Linear, Linear)>,
    down: Vec<DownBlock>,
    mid_resnets: Vec<ResnetBlock2D>,
    mid_attentions: Vec<Transformer2D>,
    config: UNetConfig,
}

fn resnet_cfg(cfg: &UNetConfig, scale: f64) -> ResnetConfig {
    ResnetConfig {
        groups: cfg.norm_num_groups,
        eps: cfg.norm_eps,
        temb_channels: Some(cfg.block_out_channels[0] * 4),
        output_scale_factor: scale,
    }
}

fn transformer_cfg(cfg: &UNetConfig, i: usize) -> TransformerConfig {
    TransformerConfig {
        heads: cfg.num_attention_heads[i],
        layers: cfg.transformer_layers_per_block[i],
        cross_attention_dim: cfg.cross_attention_dim,
        groups: cfg.norm_num_groups,
        use_linear_projection: cfg.use_linear_projection,
    }
}

impl UNetEncoder {
    pub fn new(cfg: &UNetConfig, vb: VarBuilder) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let temb_dim = ch[0] * 4;
        let resnet = |scale: f64| resnet_cfg(cfg, scale);
        let tcfg = |i: usize| transformer_cfg(cfg, i);

        let mut down = Vec::with_capacity(n);
        let mut out_c = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let in_c = out_c;
            out_c = c;
            let vb = vb.pp(format!("down_blocks.{i}"));
            let layers = cfg.layers_per_block[i];
            let resnets = (0..layers)
                .map(|j| {
                    let ic = if j == 0 { in_c } else { out_c };
                    ResnetBlock2D::new(ic, out_c, resnet(1.0), vb.pp(format!("resnets.{j}")))
                })
                .collect::<Result<Vec<_>>>()?;
            let attentions = if cfg.down_blocks[i] == BlockKind::CrossAttn {
                (0..layers)
                    .map(|j| Transformer2D::new(out_c, tcfg(i), vb.pp(format!("attentions.{j}"))))
                    .collect::<Result<Vec<_>>>()?
            } else {
                vec![]
            };
            let downsampler = if i + 1 < n {
                Some(Downsample2D::new(
                    out_c,
                    cfg.downsample_padding,
                    vb.pp("downsamplers.0"),
                )?)
            } else {
                None
            };
            down.push(DownBlock {
                resnets,
                attentions,
                downsampler,
            });
        }

        let mid_vb = vb.pp("mid_block");
        let c_mid = ch[n - 1];
        let mid_resnets = (0..2)
            .map(|j| {
                ResnetBlock2D::new(
                    c_mid,
                    c_mid,
                    resnet(cfg.mid_block_scale_factor),
                    mid_vb.pp(format!("resnets.{j}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let mid_attentions = vec![Transformer2D::new(
            c_mid,
            tcfg(n - 1),
            mid_vb.pp("attentions.0"),
        )?];
        Ok(Self {
            conv_in: conv2d(cfg.in_channels, ch[0], 3, 1, 1, vb.pp("conv_in"))?,
            time_linear_1: linear(ch[0], temb_dim, vb.pp("time_embedding.linear_1"))?,
            time_linear_2: linear(temb_dim, temb_dim, vb.pp("time_embedding.linear_2"))?,
            add_embedding: match cfg.text_time {
                Some(tt) => Some((
                    tt,
                    linear(tt.input_dim, temb_dim, vb.pp("add_embedding.linear_1"))?,
                    linear(temb_dim, temb_dim, vb.pp("add_embedding.linear_2"))?,
                )),
                None => None,
            },
            down,
            mid_resnets,
            mid_attentions,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Number of skip connections of the down path (= down residuals a ControlNet provides).
    pub fn num_skips(&self) -> usize {
        1 + self
            .down
            .iter()
            .map(|b| b.resnets.len() + usize::from(b.downsampler.is_some()))
            .sum::<usize>()
    }

    /// Channels of each skip connection, in order.
    pub fn skip_channels(&self) -> Vec<usize> {
        let ch = &self.config.block_out_channels;
        let mut out = vec![ch[0]];
        for (i, b) in self.down.iter().enumerate() {
            out.extend(std::iter::repeat_n(
                ch[i],
                b.resnets.len() + usize::from(b.downsampler.is_some()),
            ));
        }
        out
    }

    /// The time embedding `[B, 4*C0]` for per-sample timesteps `[B]`, plus SDXL's added
    /// embedding of `added` (required exactly when the model has one).
    pub fn time_embedding(
        &self,
        timesteps: &Tensor,
        added: Option<&AddedCond>,
        dtype: DType,
    ) -> Result<Tensor> {
        let t = timestep_embedding(
            timesteps,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        )?
        .to_dtype(dtype)?;
        let emb = self
            .time_linear_2
            .forward(&self.time_linear_1.forward(&t)?.silu()?)?;
        match (&self.add_embedding, added) {
            (None, None) => Ok(emb),
            (Some((tt, l1, l2)), Some(a)) => {
                // diffusers UNet2DConditionModel.get_aug_embed, "text_time"
                let b = emb.dim(0)?;
                let (tb, k) = a.time_ids.dims2()?;
                let (pb, p) = a.text_embeds.dims2()?;
                if tb != b || pb != b || p + k * tt.time_embed_dim != tt.input_dim {
                    candle_core::bail!(
                        "added conditioning of {pb}x{p} pooled and {tb}x{k} time ids does not fit a batch of {b} and add_embedding's {} inputs",
                        tt.input_dim
                    );
                }
                let ids = a.time_ids.to_dtype(DType::F32)?.flatten_all()?;
                let te = timestep_embedding(
                    &ids,
                    tt.time_embed_dim,
                    self.config.flip_sin_to_cos,
                    self.config.freq_shift,
                )?
                .reshape((b, k * tt.time_embed_dim))?;
                let x = Tensor::cat(&[&a.text_embeds.to_dtype(DType::F32)?, &te], 1)?
                    .to_dtype(emb.dtype())?;
                emb + l2.forward(&l1.forward(&x)?.silu()?)?
            }
            (Some(_), None) => candle_core::bail!(
                "this UNet has SDXL's text_time embedding: it needs the pooled text vector and time ids"
            ),
            (None, Some(_)) => candle_core::bail!(
                "added conditioning (pooled text, time ids) given to a UNet without an added embedding"
            ),
        }
    }

    /// `conv_in` of `sample` (after `center_input_sample`): where [`Self::forward`] adds a
    /// hint (a union ControlNet summarises it to build its hint).
    pub fn conv_in(&self, sample: &Tensor) -> Result<Tensor> {
        if self.config.center_input_sample {
            self.conv_in.forward(&((sample * 2.0)? - 1.0)?)
        } else {
            self.conv_in.forward(sample)
        }
    }

    /// Run conv_in (plus `hint`, a ControlNet's conditioning embedding, when given), the down
    /// blocks and the mid block. Returns the skip tensors and the mid block's output.
    pub fn forward(
        &self,
        sample: &Tensor,
        emb: &Tensor,
        ctx: &Tensor,
        hint: Option<&Tensor>,
    ) -> Result<(Vec<Tensor>, Tensor)> {
        self.forward_with_features(sample, emb, ctx, hint, &[], None)
    }

    /// [`Self::forward`] with T2I-Adapter features added inside the down blocks (diffusers'
    /// `down_intrablock_additional_residuals`, see `UNetAdditions::intrablock`): the skips
    /// carry them, as diffusers' in-place adds make its skips do.
    pub fn forward_with_features(
        &self,
        sample: &Tensor,
        emb: &Tensor,
        ctx: &Tensor,
        hint: Option<&Tensor>,
        features: &[Tensor],
        extras: Option<&AttnExtras>,
    ) -> Result<(Vec<Tensor>, Tensor)> {
        let mut features = features.iter();
        let sample = if self.config.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };
        // Items that are copies of one another (classifier-free guidance) are computed once
        // up to the first cross-attention, where the text makes them differ.
        let mut parts = vec![&sample, emb];
        parts.extend(hint);
        // while shared: the batch and the time embedding of the distinct items
        let detect = if extras.is_some_and(|e| e.reads_reference()) {
            None
        } else {
            SharedBatch::detect(&parts)?
        };
        let mut shared = match detect {
            Some(s) => {
                let e = s.shrink(emb)?;
                Some((s, e))
            }
            None => None,
        };
        let mut xs = match &shared {
            Some((s, _)) => s.shrink(&sample)?,
            None => sample,
        };
        xs = self.conv_in.forward(&xs)?;
        if let Some(h) = hint {
            // a batch-1 hint (a control image embedded once) serves every item
            xs = match &shared {
                Some((s, _)) if h.dim(0)? != 1 => (xs + s.shrink(h)?)?,
                _ => xs.broadcast_add(h)?,
            };
        }
        let full = |t: &Tensor, shared: &Option<(SharedBatch, Tensor)>| match shared {
            Some((s, _)) => s.expand(t),
            None => Ok(t.clone()),
        };
        // a feature of batch 1 serves every item; a full batch is shrunk while items are shared
        let add_feature =
            |xs: &Tensor, f: &Tensor, shared: &Option<(SharedBatch, Tensor)>| match shared {
                Some((s, _)) if f.dim(0)? != 1 => xs + s.shrink(f)?,
                _ => xs.broadcast_add(f),
            };
        let mut skips = vec![full(&xs, &shared)?];
        // LDM's input_blocks index of each resnet (+ attention): 1, 2, (3 = downsampler), 4...
        let mut ldm = 1;
        let adain =
            |key: GnKey, xs: Tensor, shared: &Option<(SharedBatch, Tensor)>| match (extras, shared)
            {
                (Some(e), None) => e.adain(key, xs),
                _ => Ok(xs),
            };
        for block in &self.down {
            let last_pair = block.attentions.len().checked_sub(1);
            for (j, resnet) in block.resnets.iter().enumerate() {
                let item_emb = shared.as_ref().map_or(emb, |(_, e)| e);
                xs = resnet.forward(&xs, Some(item_emb))?;
                if let Some(attn) = block.attentions.get(j) {
                    xs = match shared.take() {
                        Some((s, _)) => attn.forward_shared(&xs, ctx, &s, extras)?,
                        None => attn.forward_extra(&xs, ctx, extras)?,
                    };
                }
                // CrossAttnDownBlock2D: after the last resnet/attention pair
                if Some(j) == last_pair {
                    if let Some(f) = features.next() {
                        xs = add_feature(&xs, f, &shared)?;
                    }
                }
                xs = adain(GnKey::Input(ldm), xs, &shared)?;
                ldm += 1;
                skips.push(full(&xs, &shared)?);
            }
            if let Some(ds) = &block.downsampler {
                xs = ds.forward(&xs)?;
                ldm += 1;
                skips.push(full(&xs, &shared)?);
            }
            // a block without attention: after the block, its last skip included
            if last_pair.is_none() {
                if let Some(f) = features.next() {
                    xs = add_feature(&xs, f, &shared)?;
                    *skips.last_mut().expect("a skip per block") = full(&xs, &shared)?;
                }
            }
        }
        // (a down path without cross-attention)
        xs = full(&xs, &shared)?;
        xs = self.mid_resnets[0].forward(&xs, Some(emb))?;
        for (attn, resnet) in self.mid_attentions.iter().zip(&self.mid_resnets[1..]) {
            xs = attn.forward_extra(&xs, ctx, extras)?;
            xs = resnet.forward(&xs, Some(emb))?;
        }
        if let Some(e) = extras {
            xs = e.adain(GnKey::Middle, xs)?;
        }
        // SDXL adapters: a last feature of the mid block's shape
        if let Some(f) = features.next() {
            if f.dims()[1..] == xs.dims()[1..] {
                xs = xs.broadcast_add(f)?;
            }
        }
        Ok((skips, xs))
    }
}

/// diffusers `UNet2DConditionModel`: the encoder plus the up path.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    encoder: UNetEncoder,
    up: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet2DConditionModel {
    pub fn new(cfg: &UNetConfig, vb: VarBuilder) -> Result<Self> {
        let encoder = UNetEncoder::new(cfg, vb.clone())?;
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let resnet = |scale: f64| resnet_cfg(cfg, scale);
        let tcfg = |i: usize| transformer_cfg(cfg, i);
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up = Vec::with_capacity(n);
        let mut out_c = rev[0];
        for i in 0..n {
            let prev_c = out_c;
            out_c = rev[i];
            let in_c = rev[(i + 1).min(n - 1)];
            let bi = n - 1 - i; // the matching down block
            let layers = cfg.layers_per_block[bi] + 1;
            let vb = vb.pp(format!("up_blocks.{i}"));
            let resnets = (0..layers)
                .map(|j| {
                    let skip = if j == layers - 1 { in_c } else { out_c };
                    let ic = if j == 0 { prev_c } else { out_c };
                    ResnetBlock2D::new(ic + skip, out_c, resnet(1.0), vb.pp(format!("resnets.{j}")))
                })
                .collect::<Result<Vec<_>>>()?;
            let attentions = if cfg.up_blocks[i] == BlockKind::CrossAttn {
                (0..layers)
                    .map(|j| Transformer2D::new(out_c, tcfg(bi), vb.pp(format!("attentions.{j}"))))
                    .collect::<Result<Vec<_>>>()?
            } else {
                vec![]
            };
            let upsampler = if i + 1 < n {
                Some(Upsample2D::new(out_c, vb.pp("upsamplers.0"))?)
            } else {
                None
            };
            up.push(UpBlock {
                resnets,
                attentions,
                upsampler,
            });
        }

        Ok(Self {
            encoder,
            up,
            conv_norm_out: group_norm(
                cfg.norm_num_groups,
                ch[0],
                cfg.norm_eps,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: conv2d(ch[0], cfg.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }

    pub fn config(&self) -> &UNetConfig {
        self.encoder.config()
    }

    pub fn encoder(&self) -> &UNetEncoder {
        &self.encoder
    }

    /// Number of skip connections of the down path (= down residuals a ControlNet provides).
    pub fn num_skips(&self) -> usize {
        self.encoder.num_skips()
    }

    /// Predict noise (or v) for `sample` `[B, C_in, h, w]` at per-sample `timesteps` `[B]`
    /// with text conditioning `[B, S, D]`, adding `residuals` when given.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        residuals: Option<&Residuals>,
    ) -> Result<Tensor> {
        self.forward_with(sample, timesteps, encoder_hidden_states, None, residuals)
    }

    /// [`Self::forward`] with SDXL's added conditioning (pooled text and time ids).
    pub fn forward_with(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedCond>,
        residuals: Option<&Residuals>,
    ) -> Result<Tensor> {
        self.forward_full(
            sample,
            timesteps,
            encoder_hidden_states,
            added,
            residuals,
            None,
        )
    }

    /// [`Self::forward_with`] with adapters' additions inside the UNet.
    pub fn forward_full(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedCond>,
        residuals: Option<&Residuals>,
        additions: Option<&UNetAdditions>,
    ) -> Result<Tensor> {
        let b = sample.dim(0)?;
        let timesteps = match timesteps.rank() {
            0 => timesteps.broadcast_as(b)?.contiguous()?,
            _ => timesteps.clone(),
        };
        if timesteps.dim(0)? != b {
            candle_core::bail!("{} timesteps given for a batch of {b}", timesteps.dim(0)?);
        }
        if let Some(r) = residuals {
            if r.down.len() != self.num_skips() {
                candle_core::bail!(
                    "{} down residuals given, the UNet has {} skip connections",
                    r.down.len(),
                    self.num_skips()
                );
            }
        }
        let emb = self
            .encoder
            .time_embedding(&timesteps, added, sample.dtype())?;
        let ctx = encoder_hidden_states;
        let features = additions.map_or(&[][..], |a| &a.intrablock[..]);
        let sets = additions.map_or(&[][..], |a| &a.attention[..]);
        let patches = additions.map_or(&[][..], |a| &a.projections[..]);
        let refs = additions.map_or(&[][..], |a| &a.reference[..]);
        // reference-only: each reference pass first (the plain UNet writing its bank), then
        // this pass reading it
        let bank = RefBank::default();
        let attn_weights = if refs.is_empty() {
            Vec::new()
        } else {
            self.reference_weights()
        };
        for r in refs {
            let write = AttnExtras::new(&[], &[]).with_reference(RefMode::Write {
                bank: &bank,
                weight: r.weight,
                style_fidelity: r.style_fidelity,
                attn_weights: &attn_weights,
                attention: r.attention,
                adain: r.adain,
            });
            self.forward_pass(&r.latents, &emb, ctx, None, &[], Some(&write))?;
        }
        let mut extras = (!sets.is_empty() || !patches.is_empty() || !refs.is_empty())
            .then(|| AttnExtras::new(sets, patches));
        if let Some(r) = refs.first() {
            extras = extras.map(|e| {
                e.with_reference(RefMode::Read {
                    bank: &bank,
                    uncond_rows: r.uncond_rows,
                })
            });
        }
        let xs = self.forward_pass(sample, &emb, ctx, residuals, features, extras.as_ref())?;
        if let (Some(e), Some(set)) = (&extras, sets.first()) {
            let want = set.keys.len();
            if e.used() != want {
                candle_core::bail!(
                    "image prompt keys for {want} cross-attention layers; the UNet has {}",
                    e.used()
                );
            }
        }
        Ok(xs)
    }

    /// sd-webui-controlnet's `attn_weight` of each transformer layer (run order): its rank
    /// when sorted by width, widest first (a stable sort), over the count.
    fn reference_weights(&self) -> Vec<f64> {
        let layers = self.transformer_layers();
        let mut order: Vec<usize> = (0..layers.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(layers[i].1));
        let mut w = vec![0.0; layers.len()];
        for (rank, &i) in order.iter().enumerate() {
            w[i] = rank as f64 / layers.len() as f64;
        }
        w
    }

    /// One UNet pass from the time embedding on.
    fn forward_pass(
        &self,
        sample: &Tensor,
        emb: &Tensor,
        ctx: &Tensor,
        residuals: Option<&Residuals>,
        features: &[Tensor],
        extras: Option<&AttnExtras>,
    ) -> Result<Tensor> {
        let emb = emb.clone();
        let (mut skips, mut xs) = self
            .encoder
            .forward_with_features(sample, &emb, ctx, None, features, extras)?;
        if let Some(r) = residuals {
            skips = skips
                .iter()
                .zip(&r.down)
                .map(|(s, d)| s + d)
                .collect::<Result<Vec<_>>>()?;
            xs = (xs + &r.mid)?;
        }

        // LDM's output_blocks index of each resnet (+ attention, + the block's upsampler)
        let mut ldm = 0;
        let adain = |key: GnKey, xs: Tensor| match extras {
            Some(e) => e.adain(key, xs),
            None => Ok(xs),
        };
        for block in &self.up {
            let n = block.resnets.len();
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().expect("skip count matches the block layout");
                xs = Tensor::cat(&[&xs, &skip], 1)?;
                xs = resnet.forward(&xs, Some(&emb))?;
                if let Some(attn) = block.attentions.get(j) {
                    xs = attn.forward_extra(&xs, ctx, extras)?;
                }
                if j + 1 < n {
                    xs = adain(GnKey::Output(ldm), xs)?;
                    ldm += 1;
                }
            }
            if let Some(us) = &block.upsampler {
                // Resize to the next skip's size (diffusers' forward_upsample_size; equal to
                // x2 whenever the latent size is divisible).
                let next = skips.last().expect("an upsampler is followed by skips");
                let (_, _, h, w) = next.dims4()?;
                xs = us.forward(&xs, Some((h, w)))?;
            }
            xs = adain(GnKey::Output(ldm), xs)?;
            ldm += 1;
        }
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }

    /// Every transformer layer's diffusers name (`down_blocks.1.attentions.0.transformer_blocks.0`)
    /// and channels, in the order [`Self::forward_full`] runs them (down, mid, up): the index
    /// adapters' per-layer additions use.
    pub fn transformer_layers(&self) -> Vec<(String, usize)> {
        let mut out = Vec::new();
        let mut push = |prefix: String, t: &Transformer2D| {
            for (i, c) in t.cross_attention_dims().into_iter().enumerate() {
                out.push((format!("{prefix}.transformer_blocks.{i}"), c));
            }
        };
        for (b, block) in self.encoder.down.iter().enumerate() {
            for (j, a) in block.attentions.iter().enumerate() {
                push(format!("down_blocks.{b}.attentions.{j}"), a);
            }
        }
        for (j, a) in self.encoder.mid_attentions.iter().enumerate() {
            push(format!("mid_block.attentions.{j}"), a);
        }
        for (b, block) in self.up.iter().enumerate() {
            for (j, a) in block.attentions.iter().enumerate() {
                push(format!("up_blocks.{b}.attentions.{j}"), a);
            }
        }
        out
    }

    /// The channels of every cross-attention layer, in the order [`Self::forward_full`] runs
    /// them, grouped as (down blocks, mid block, up blocks).
    pub fn cross_attention_dims(&self) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
        let e = &self.encoder;
        let down = e
            .down
            .iter()
            .flat_map(|b| b.attentions.iter().flat_map(|a| a.cross_attention_dims()))
            .collect();
        let mid = e
            .mid_attentions
            .iter()
            .flat_map(|a| a.cross_attention_dims())
            .collect();
        let up = self
            .up
            .iter()
            .flat_map(|b| b.attentions.iter().flat_map(|a| a.cross_attention_dims()))
            .collect();
        (down, mid, up)
    }
}
