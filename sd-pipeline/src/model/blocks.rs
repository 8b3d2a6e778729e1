//! Building blocks shared by the UNet, the VAE and (later) ControlNet, with diffusers names.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use super::nn::Linear;
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use std::sync::Arc;

use sd_plugins_api::{ExtraAttention, Projection, ProjectionInputs};

use super::checkpoint;
use super::nn::{Conv2d, GroupNorm};
use super::shared_batch::SharedBatch;

use super::nn::{attention, conv2d, group_norm, linear, linear_no_bias, LayerNorm};

/// diffusers `ResnetBlock2D` (time_embedding_norm "default", SiLU).
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub groups: usize,
    pub eps: f64,
    pub temb_channels: Option<usize>,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(i: usize, o: usize, cfg: ResnetConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: group_norm(cfg.groups, i, cfg.eps, vb.pp("norm1"))?,
            conv1: conv2d(i, o, 3, 1, 1, vb.pp("conv1"))?,
            time_emb_proj: cfg
                .temb_channels
                .map(|t| linear(t, o, vb.pp("time_emb_proj")))
                .transpose()?,
            norm2: group_norm(cfg.groups, o, cfg.eps, vb.pp("norm2"))?,
            conv2: conv2d(o, o, 3, 1, 1, vb.pp("conv2"))?,
            conv_shortcut: if i != o {
                Some(conv2d(i, o, 1, 1, 0, vb.pp("conv_shortcut"))?)
            } else {
                None
            },
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let inputs: Vec<&Tensor> = std::iter::once(xs).chain(temb).collect();
        if checkpoint::wanted(&inputs) {
            let me = self.clone();
            return checkpoint::checkpointed(&inputs, move |t| me.forward_plain(&t[0], t.get(1)));
        }
        self.forward_plain(xs, temb)
    }

    fn forward_plain(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&temb.silu()?)?.unsqueeze(2)?.unsqueeze(3)?;
            h = h.broadcast_add(&t)?;
        }
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(xs)?,
            None => xs.clone(),
        };
        let out = (skip + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// diffusers `Attention` as used by `BasicTransformerBlock` (no q/k/v bias).
#[derive(Debug, Clone)]
struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl CrossAttention {
    fn new(dim: usize, ctx_dim: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            to_q: linear_no_bias(dim, dim, vb.pp("to_q"))?,
            to_k: linear_no_bias(ctx_dim, dim, vb.pp("to_k"))?,
            to_v: linear_no_bias(ctx_dim, dim, vb.pp("to_v"))?,
            to_out: linear(dim, dim, vb.pp("to_out.0"))?,
            heads,
        })
    }

    /// Self-attention of `xs` with keys and values from `kv` (no extras).
    fn attend(&self, xs: &Tensor, kv: &Tensor) -> Result<Tensor> {
        let q = self.to_q.forward(xs)?;
        let k = self.to_k.forward(kv)?;
        let v = self.to_v.forward(kv)?;
        self.to_out
            .forward(&attention(&q, &k, &v, self.heads, false)?)
    }

    /// With the extras of transformer layer `at` (its index in run order): adapters' deltas
    /// on the projections' inputs (ControlNet-LLLite), and for a cross-attention layer the
    /// image prompts' keys and values (IP-Adapter).
    fn forward_extra(
        &self,
        xs: &Tensor,
        ctx: Option<&Tensor>,
        at: Option<(&AttnExtras, usize)>,
    ) -> Result<Tensor> {
        let text = ctx.unwrap_or(xs);
        let patched = |which: Projection, x: &Tensor| -> Result<Tensor> {
            let Some((e, layer)) = at else {
                return Ok(x.clone());
            };
            let mut out = x.clone();
            for p in e.patches {
                if let Some(d) = p.delta(layer, which, x)? {
                    out = (out + d)?;
                }
            }
            Ok(out)
        };
        let has_patches = at.is_some_and(|(e, _)| !e.patches.is_empty());
        let (q, k, v) = match (ctx, has_patches) {
            (_, false) => (
                self.to_q.forward(xs)?,
                self.to_k.forward(text)?,
                self.to_v.forward(text)?,
            ),
            (None, true) => (
                self.to_q.forward(&patched(Projection::SelfQ, xs)?)?,
                self.to_k.forward(&patched(Projection::SelfK, xs)?)?,
                self.to_v.forward(&patched(Projection::SelfV, xs)?)?,
            ),
            (Some(_), true) => (
                self.to_q.forward(&patched(Projection::CrossQ, xs)?)?,
                self.to_k.forward(text)?,
                self.to_v.forward(text)?,
            ),
        };
        let mut h = attention(&q, &k, &v, self.heads, false)?;
        if let (Some((extras, layer)), Some(_)) = (at, ctx) {
            for set in extras.sets {
                let (Some(k), Some(v)) = (set.keys.get(layer), set.values.get(layer)) else {
                    candle_core::bail!(
                        "image prompt keys for {} cross-attention layers; the UNet has more",
                        set.keys.len()
                    );
                };
                h = (h + (attention(&q, k, v, self.heads, false)? * set.scale)?)?;
            }
        }
        self.to_out.forward(&h)
    }
}

/// What adapters add inside the attention of the transformer layers, handed to them in the
/// order they run: image prompts' keys and values (`sd_plugins_api::ExtraAttention`) and
/// deltas on the projections' inputs (`sd_plugins_api::ProjectionInputs`).
pub struct AttnExtras<'a> {
    sets: &'a [ExtraAttention],
    patches: &'a [Arc<dyn ProjectionInputs>],
    next: Cell<usize>,
    reference: Option<RefMode<'a>>,
}

/// The self-attention inputs reference passes keep, per transformer layer (with each pass's
/// style fidelity).
#[derive(Default)]
pub struct RefBank {
    layers: RefCell<HashMap<usize, Vec<(Tensor, f64)>>>,
    /// AdaIN: per block output, the reference passes' statistics.
    gn: RefCell<HashMap<GnKey, Vec<GnStats>>>,
}

/// A reference pass's per-channel mean and variance of one block output, with its style
/// fidelity.
type GnStats = (Tensor, Tensor, f64);

/// A UNet block whose output AdaIN normalises, by its LDM index (sd-webui-controlnet hooks
/// `input_blocks[4, 5, 7, 8, 10, 11]`, `middle_block`, `output_blocks[0..8]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GnKey {
    Input(usize),
    Middle,
    Output(usize),
}

impl GnKey {
    /// The extension's `gn_weight` (doubled, as it doubles them), or `None` for a block it
    /// does not hook.
    fn weight(self) -> Option<f64> {
        const INPUT: [usize; 6] = [4, 5, 7, 8, 10, 11];
        let w = match self {
            Self::Middle => 0.0,
            Self::Input(k) => {
                let w = INPUT.iter().position(|&i| i == k)?;
                1.0 - w as f64 / INPUT.len() as f64
            }
            Self::Output(k) if k < 8 => k as f64 / 8.0,
            Self::Output(_) => return None,
        };
        Some(w * 2.0)
    }
}

/// What a pass does with the bank: a reference pass writes the layers its weight reaches
/// (`attn_weights[layer] < weight`), the main pass reads.
pub enum RefMode<'a> {
    Write {
        bank: &'a RefBank,
        weight: f64,
        style_fidelity: f64,
        attn_weights: &'a [f64],
        /// Which banks this pass writes: attention inputs, AdaIN statistics.
        attention: bool,
        adain: bool,
    },
    Read {
        bank: &'a RefBank,
        uncond_rows: usize,
    },
}

impl<'a> AttnExtras<'a> {
    pub fn new(sets: &'a [ExtraAttention], patches: &'a [Arc<dyn ProjectionInputs>]) -> Self {
        Self {
            sets,
            patches,
            next: Cell::new(0),
            reference: None,
        }
    }

    /// These extras in a reference mode.
    pub fn with_reference(mut self, mode: RefMode<'a>) -> Self {
        self.reference = Some(mode);
        self
    }

    /// Whether the main pass reads a reference bank (its batch rows then differ throughout).
    pub fn reads_reference(&self) -> bool {
        matches!(self.reference, Some(RefMode::Read { .. }))
    }

    /// AdaIN at a block's output (sd-webui-controlnet's `hacked_group_norm_forward`): a
    /// reference pass keeps the output's per-channel mean and variance; the main pass moves
    /// its own to their average, the unconditional rows mixed back by the style fidelity.
    pub fn adain(&self, key: GnKey, x: Tensor) -> Result<Tensor> {
        let (Some(mode), Some(gn_weight)) = (&self.reference, key.weight()) else {
            return Ok(x);
        };
        let stats = |x: &Tensor| -> Result<(Tensor, Tensor)> {
            let x32 = x.to_dtype(candle_core::DType::F32)?;
            let mean = x32.mean_keepdim(3)?.mean_keepdim(2)?;
            let var = x32
                .broadcast_sub(&mean)?
                .sqr()?
                .mean_keepdim(3)?
                .mean_keepdim(2)?;
            Ok((mean, var))
        };
        match mode {
            RefMode::Write {
                bank,
                weight,
                style_fidelity,
                adain: true,
                ..
            } if *weight > gn_weight => {
                let (mean, var) = stats(&x)?;
                let mut b = bank.gn.borrow_mut();
                b.entry(key).or_default().push((mean, var, *style_fidelity));
                Ok(x)
            }
            RefMode::Read { bank, uncond_rows } => {
                let Some(entries) = bank.gn.borrow_mut().remove(&key) else {
                    return Ok(x);
                };
                if entries.is_empty() {
                    return Ok(x);
                }
                let n = entries.len() as f64;
                let style = entries.iter().map(|e| e.2).sum::<f64>() / n;
                let eps = 1e-6;
                let mut mean_acc = entries[0].0.clone();
                let mut var_acc = entries[0].1.clone();
                for e in &entries[1..] {
                    mean_acc = (mean_acc + &e.0)?;
                    var_acc = (var_acc + &e.1)?;
                }
                let (mean_acc, var_acc) = ((mean_acc / n)?, (var_acc / n)?);
                let (mean, var) = stats(&x)?;
                let std = var.maximum(eps)?.sqrt()?;
                let std_acc = var_acc.maximum(eps)?.sqrt()?;
                let x32 = x.to_dtype(candle_core::DType::F32)?;
                let y_uc = x32
                    .broadcast_sub(&mean)?
                    .broadcast_div(&std)?
                    .broadcast_mul(&std_acc)?
                    .broadcast_add(&mean_acc)?;
                let uc = *uncond_rows;
                let y = if uc > 0 && style > 1e-5 {
                    let rows = x32.dim(0)?;
                    let y_c = Tensor::cat(
                        &[&x32.narrow(0, 0, uc)?, &y_uc.narrow(0, uc, rows - uc)?],
                        0,
                    )?;
                    ((y_c * style)? + (y_uc * (1.0 - style))?)?
                } else {
                    y_uc
                };
                y.to_dtype(x.dtype())
            }
            _ => Ok(x),
        }
    }

    fn next_layer(&self) -> usize {
        let i = self.next.get();
        self.next.set(i + 1);
        i
    }

    /// How many transformer layers ran.
    pub fn used(&self) -> usize {
        self.next.get()
    }
}

/// diffusers `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward.
#[derive(Debug, Clone)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: CrossAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff_proj: Linear,
    ff_out: Linear,
}

impl BasicTransformerBlock {
    fn new(dim: usize, ctx_dim: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            norm1: LayerNorm::new(dim, 1e-5, vb.pp("norm1"))?,
            attn1: CrossAttention::new(dim, dim, heads, vb.pp("attn1"))?,
            norm2: LayerNorm::new(dim, 1e-5, vb.pp("norm2"))?,
            attn2: CrossAttention::new(dim, ctx_dim, heads, vb.pp("attn2"))?,
            norm3: LayerNorm::new(dim, 1e-5, vb.pp("norm3"))?,
            ff_proj: linear(dim, 2 * inner, vb.pp("ff.net.0.proj"))?,
            ff_out: linear(inner, dim, vb.pp("ff.net.2"))?,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        ctx: &Tensor,
        at: Option<(&AttnExtras, usize)>,
    ) -> Result<Tensor> {
        self.after_self_attention(&self.self_attention(xs, at)?, ctx, at)
    }

    /// The part that does not see the text: norm1, self-attention, residual. A reference pass
    /// keeps `norm1(x)`; the main pass attends to it too (sd-webui-controlnet's
    /// `hacked_basic_transformer_inner_forward`).
    fn self_attention(&self, xs: &Tensor, at: Option<(&AttnExtras, usize)>) -> Result<Tensor> {
        let xn = self.norm1.forward(xs)?;
        match at.and_then(|(e, l)| e.reference.as_ref().map(|r| (r, l))) {
            Some((
                RefMode::Write {
                    bank,
                    weight,
                    style_fidelity,
                    attn_weights,
                    attention: true,
                    ..
                },
                layer,
            )) if *weight > attn_weights.get(layer).copied().unwrap_or(f64::MAX) => {
                let mut b = bank.layers.borrow_mut();
                b.entry(layer)
                    .or_default()
                    .push((xn.clone(), *style_fidelity));
            }
            Some((RefMode::Read { bank, uncond_rows }, layer)) => {
                let entries = bank.layers.borrow_mut().remove(&layer);
                if let Some(entries) = entries.filter(|e| !e.is_empty()) {
                    let style = entries.iter().map(|e| e.1).sum::<f64>() / entries.len() as f64;
                    let mut ctx = vec![xn.clone()];
                    ctx.extend(entries.into_iter().map(|e| e.0));
                    let with_ref = self.attn1.attend(&xn, &Tensor::cat(&ctx, 1)?)?;
                    let uc = *uncond_rows;
                    let out = if uc > 0 && style > 1e-5 {
                        let plain = self
                            .attn1
                            .attend(&xn.narrow(0, 0, uc)?, &xn.narrow(0, 0, uc)?)?;
                        let n = xn.dim(0)?;
                        let c = Tensor::cat(&[&plain, &with_ref.narrow(0, uc, n - uc)?], 0)?;
                        ((c * style)? + (with_ref * (1.0 - style))?)?
                    } else {
                        with_ref
                    };
                    return out + xs;
                }
            }
            _ => {}
        }
        self.attn1.forward_extra(&xn, None, at)? + xs
    }

    /// Cross-attention with the text and the feed-forward, each with its residual.
    fn after_self_attention(
        &self,
        xs: &Tensor,
        ctx: &Tensor,
        at: Option<(&AttnExtras, usize)>,
    ) -> Result<Tensor> {
        let xs = (self
            .attn2
            .forward_extra(&self.norm2.forward(xs)?, Some(ctx), at)?
            + xs)?;
        let h = self.ff_proj.forward(&self.norm3.forward(&xs)?)?;
        // GEGLU with exact (erf) GELU, as diffusers.
        let h = crate::cpu::geglu::geglu(&h)?;
        self.ff_out.forward(&h)? + xs
    }
}

#[derive(Debug, Clone)]
enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

/// diffusers `Transformer2DModel` with continuous input (SD1 conv / SD2 linear projections).
#[derive(Debug, Clone)]
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
}

#[derive(Debug, Clone, Copy)]
pub struct TransformerConfig {
    pub heads: usize,
    pub layers: usize,
    pub cross_attention_dim: usize,
    pub groups: usize,
    pub use_linear_projection: bool,
}

impl Transformer2D {
    pub fn new(channels: usize, cfg: TransformerConfig, vb: VarBuilder) -> Result<Self> {
        let proj = |name: &str| -> Result<Proj> {
            Ok(if cfg.use_linear_projection {
                Proj::Linear(linear(channels, channels, vb.pp(name))?)
            } else {
                Proj::Conv(conv2d(channels, channels, 1, 1, 0, vb.pp(name))?)
            })
        };
        Ok(Self {
            norm: group_norm(cfg.groups, channels, 1e-6, vb.pp("norm"))?,
            proj_in: proj("proj_in")?,
            blocks: (0..cfg.layers)
                .map(|i| {
                    BasicTransformerBlock::new(
                        channels,
                        cfg.cross_attention_dim,
                        cfg.heads,
                        vb.pp(format!("transformer_blocks.{i}")),
                    )
                })
                .collect::<Result<Vec<_>>>()?,
            proj_out: proj("proj_out")?,
        })
    }

    pub fn forward(&self, xs: &Tensor, ctx: &Tensor) -> Result<Tensor> {
        self.forward_inner(xs, ctx, None, None)
    }

    /// [`Self::forward`] with image-prompt keys and values for its cross-attention layers.
    pub fn forward_extra(
        &self,
        xs: &Tensor,
        ctx: &Tensor,
        extras: Option<&AttnExtras>,
    ) -> Result<Tensor> {
        self.forward_inner(xs, ctx, None, extras)
    }

    /// The channels of its cross-attention layers, one per layer.
    pub fn cross_attention_dims(&self) -> Vec<usize> {
        self.blocks
            .iter()
            .map(|b| b.attn2.to_q.out_features())
            .collect()
    }

    /// [`Self::forward`] for `xs` holding only the distinct items of the batch that `ctx`
    /// has (see [`SharedBatch`]): they stay shrunk up to the first self-attention's output and
    /// are expanded to the full batch before the text enters. Returns the full batch.
    pub fn forward_shared(
        &self,
        xs: &Tensor,
        ctx: &Tensor,
        shared: &SharedBatch,
        extras: Option<&AttnExtras>,
    ) -> Result<Tensor> {
        self.forward_inner(xs, ctx, Some(shared), extras)
    }

    fn forward_inner(
        &self,
        xs: &Tensor,
        ctx: &Tensor,
        shared: Option<&SharedBatch>,
        extras: Option<&AttnExtras>,
    ) -> Result<Tensor> {
        if shared.is_none() && extras.is_none() && checkpoint::wanted(&[xs, ctx]) {
            let me = self.clone();
            return checkpoint::checkpointed(&[xs, ctx], move |t| {
                me.forward_inner(&t[0], &t[1], None, None)
            });
        }
        let (_, c, h, w) = xs.dims4()?;
        let to_tokens = |t: &Tensor| {
            let b = t.dim(0)?;
            t.permute((0, 2, 3, 1))?.reshape((b, h * w, c))
        };
        let to_image = |t: &Tensor| {
            let b = t.dim(0)?;
            t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()
        };
        let normed = self.norm.forward(xs)?;
        let mut t = match &self.proj_in {
            Proj::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
            Proj::Linear(l) => l.forward(&to_tokens(&normed)?)?,
        };
        let mut blocks = self.blocks.iter();
        let at = || extras.map(|e| (e, e.next_layer()));
        if let (Some(shared), Some(first)) = (shared, self.blocks.first()) {
            blocks.next();
            let at = at();
            t = shared.expand(&first.self_attention(&t, at)?)?;
            t = first.after_self_attention(&t, ctx, at)?;
        }
        for block in blocks {
            t = block.forward(&t, ctx, at())?;
        }
        let out = match &self.proj_out {
            Proj::Conv(conv) => conv.forward(&to_image(&t)?)?,
            Proj::Linear(l) => to_image(&l.forward(&t)?)?,
        };
        match shared {
            Some(s) if self.blocks.is_empty() => s.expand(&(out + xs)?),
            Some(s) => out + s.expand(xs)?,
            None => out + xs,
        }
    }
}

/// diffusers `Downsample2D` with a conv. `padding == 0` means the VAE's asymmetric (0,1,0,1) pad.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    padding: usize,
}

impl Downsample2D {
    pub fn new(c: usize, padding: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv2d(c, c, 3, 2, padding, vb.pp("conv"))?,
            padding,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.padding == 0 {
            let xs = xs.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            self.conv.forward(&xs)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// diffusers `Upsample2D` with a conv: nearest resize (to `size`, or x2) then 3x3 conv.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv2d(c, c, 3, 1, 1, vb.pp("conv"))?,
        })
    }

    pub fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        self.conv
            .forward(&crate::cpu::upsample_op::upsample_nearest2d(xs, th, tw)?)
    }
}
