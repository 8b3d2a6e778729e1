//! Shared layers: layer norm, attention, convolutions, with a differentiable path.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{Conv2dConfig, VarBuilder};
use std::sync::{Arc, RwLock};

/// Layer norm over the last dimension. Uses candle's fused kernel for inference; when a gradient
/// is tracked, [`crate::cpu::layer_norm_op`] on the CPU in f32, candle's differentiable formula
/// elsewhere (the fused op has no backward).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let tracked = x.track_op() || self.weight.track_op() || self.bias.track_op();
        let cpu_f32 = crate::cpu::serve(x.device())
            && [x, &self.weight, &self.bias]
                .iter()
                .all(|t| t.dtype() == candle_core::DType::F32);
        if tracked && cpu_f32 {
            crate::cpu::layer_norm_op::layer_norm_train(
                x,
                &self.weight,
                &self.bias,
                self.eps as f32,
            )
        } else if tracked {
            candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, self.eps as f32)
        } else {
            let _span = crate::cpu::op_profile::span("layer norm (candle)");
            candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps as f32)
        }
    }
}

/// Softmax over the last dimension, fused for inference, differentiable when tracked.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.track_op() {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// A linear layer: candle's, except on the CPU in f32 with a gradient tracked
/// ([`crate::cpu::linear_op::linear_train`]: no gradient for a frozen weight) and for inference
/// in a half precision ([`crate::cpu::matmul::Precision`], [`crate::cpu::linear_op::linear_half`]).
/// In a process that asked for it ([`crate::cpu::linear_op::set_release_packed`]) the f32 weight
/// is dropped once it is packed in a half precision: the layer then runs in that precision only.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `None` once released after packing.
    weight: Arc<RwLock<Option<Tensor>>>,
    bias: Option<Tensor>,
    out_features: usize,
    packed: crate::cpu::linear_op::PackedWeight,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            out_features: weight.dims().first().copied().unwrap_or(0),
            weight: Arc::new(RwLock::new(Some(weight))),
            bias,
            packed: Default::default(),
        }
    }
    fn new_from(inner: candle_nn::Linear) -> Self {
        Self::new(inner.weight().clone(), inner.bias().cloned())
    }
    /// The f32 (or model-dtype) weight, unless it was released after packing.
    pub fn weight(&self) -> Option<Tensor> {
        self.weight
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
    /// The number of outputs (the weight's first dimension).
    pub fn out_features(&self) -> usize {
        self.out_features
    }
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        use crate::cpu::linear_op;
        use crate::cpu::matmul::precision;
        let b = self.bias.as_ref();
        let Some(w) = self.weight() else {
            return linear_op::linear_released(x, b, &self.packed, precision().half());
        };
        let cpu_f32 = crate::cpu::serve(x.device())
            && x.dtype() == candle_core::DType::F32
            && w.dtype() == candle_core::DType::F32
            && b.is_none_or(|b| b.dtype() == candle_core::DType::F32);
        let tracked = x.track_op() || w.track_op() || b.is_some_and(|b| b.track_op());
        if cpu_f32 && tracked {
            linear_op::linear_train(x, &w, b)
        } else if let Some(half) = precision().half().filter(|_| cpu_f32) {
            let y = linear_op::linear_half(x, &w, b, &self.packed, half)?;
            if linear_op::release_packed() {
                *self.weight.write().unwrap_or_else(|e| e.into_inner()) = None;
            }
            Ok(y)
        } else {
            let _span = crate::cpu::op_profile::span("linear (candle)");
            candle_nn::Linear::new(w, b.cloned()).forward(x)
        }
    }
}

pub fn linear(i: usize, o: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear::new_from(candle_nn::linear(i, o, vb)?))
}

pub fn linear_no_bias(i: usize, o: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear::new_from(candle_nn::linear_no_bias(i, o, vb)?))
}

/// A 2-D convolution. On the CPU in f32: [`crate::cpu::conv_op::conv2d_infer`] (im2col + one gemm
/// into the output) for inference, [`crate::cpu::conv_op::conv2d_train`] (matmul gradients) when a
/// gradient is tracked; candle's elsewhere.
#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }
    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.inner.weight();
        let b = self.inner.bias();
        let tracked = x.track_op() || w.track_op() || b.is_some_and(|b| b.track_op());
        let f32s = x.dtype() == candle_core::DType::F32 && w.dtype() == candle_core::DType::F32;
        if !(crate::cpu::serve(x.device()) && f32s) {
            self.inner.forward(x)
        } else if tracked {
            crate::cpu::conv_op::conv2d_train(x, w, b, self.stride, self.padding)
        } else {
            crate::cpu::conv_op::conv2d_infer(x, w, b, self.stride, self.padding)
        }
    }
}

pub fn conv2d(
    i: usize,
    o: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    Ok(Conv2d {
        inner: candle_nn::conv2d(i, o, kernel, cfg, vb)?,
        stride,
        padding,
    })
}

/// GroupNorm: one fused CPU pass for f32 ([`crate::cpu::group_norm_op`], with its own backward),
/// candle-nn's op-by-op formula elsewhere. `forward_silu` fuses the SiLU that follows most
/// norms in the UNet and the VAE.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    fn run(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let f32s = [x, &self.weight, &self.bias]
            .iter()
            .all(|t| t.dtype() == candle_core::DType::F32);
        if crate::cpu::serve(x.device()) && f32s {
            x.contiguous()?.apply_op3(
                &self.weight,
                &self.bias,
                crate::cpu::group_norm_op::GroupNormOp {
                    groups: self.groups,
                    eps: self.eps,
                    silu,
                },
            )
        } else {
            let y = self.inner.forward(x)?;
            if silu {
                y.silu()
            } else {
                Ok(y)
            }
        }
    }

    /// `silu(group_norm(x))`.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, true)
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, false)
    }
}

pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    let weight = vb.get(channels, "weight")?;
    let bias = vb.get(channels, "bias")?;
    Ok(GroupNorm {
        inner: candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?,
        weight,
        bias,
        groups,
        eps,
    })
}

/// Upper bound on the bytes of one block of attention scores; queries are processed in
/// chunks so that memory stays bounded at large resolutions. Results are identical.
const ATTENTION_CHUNK_BYTES: usize = 256 << 20;

/// Scaled dot-product attention over `[B, S, H*D]` inputs with `heads` heads.
/// `causal` masks future positions (CLIP). Inference on the CPU in f32 without a mask takes
/// [`crate::cpu::fused_attention`]; everything else the chunked formula below.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Result<Tensor> {
    let (b, sq, inner) = q.dims3()?;
    let sk = k.dim(1)?;
    let tracked = q.track_op() || k.track_op() || v.track_op();
    let f32s = [q, k, v]
        .iter()
        .all(|t| t.dtype() == candle_core::DType::F32);
    if !tracked && !causal && crate::cpu::serve(q.device()) && f32s {
        return crate::cpu::fused_attention::fused_attention(q, k, v, heads);
    }
    let hd = inner / heads;
    let split = |t: &Tensor, s: usize| -> Result<Tensor> {
        t.reshape((b, s, heads, hd))?.transpose(1, 2)?.contiguous()
    };
    let k = split(k, sk)?;
    let v = split(v, sk)?;
    if tracked && !causal && crate::cpu::serve(q.device()) && f32s {
        // training: keep only q, k, v and the output; scores are recomputed in backward (and
        // scaled inside, as the inference kernel scales them)
        let op = crate::cpu::attention_op::RecomputedAttention {
            rows: crate::cpu::attention_op::BLOCK_ROWS,
            scale: (hd as f32).powf(-0.5),
        };
        let out = split(q, sq)?.apply_op3(&k, &v, op)?;
        return out.transpose(1, 2)?.reshape((b, sq, inner));
    }
    let q = (split(q, sq)? * (hd as f64).powf(-0.5))?;
    let rows_per_chunk = (ATTENTION_CHUNK_BYTES / (4 * b * heads * sk).max(1)).clamp(1, sq);
    let kt = k.t()?;
    let mut outs = Vec::with_capacity(sq.div_ceil(rows_per_chunk));
    let mut start = 0;
    while start < sq {
        let len = rows_per_chunk.min(sq - start);
        let qc = if len == sq {
            q.clone()
        } else {
            q.narrow(2, start, len)?
        };
        let mut scores = qc.matmul(&kt)?;
        if causal {
            let mask: Vec<f32> = (start..start + len)
                .flat_map(|i| (0..sk).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
                .collect();
            let mask = Tensor::from_vec(mask, (len, sk), q.device())?.to_dtype(scores.dtype())?;
            scores = scores.broadcast_add(&mask)?;
        }
        let probs = softmax_last_dim(&scores)?;
        outs.push(probs.matmul(&v)?);
        start += len;
    }
    let out = if outs.len() == 1 {
        outs.pop().unwrap()
    } else {
        Tensor::cat(&outs, 2)?
    };
    out.transpose(1, 2)?.reshape((b, sq, inner))
}
