//! CLIP text encoder (transformers' `CLIPTextModel`, keys under `text_model.`; with
//! `text_projection` at the root, `CLIPTextModelWithProjection`, SDXL's second encoder).

use super::nn::Linear;
use candle_core::{DType, IndexOp, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};

use super::config::{ClipActivation, ClipConfig};
use super::nn::{attention, linear, LayerNorm};

/// One transformer layer of a CLIP encoder (text: causal attention; vision: not).
#[derive(Debug, Clone)]
pub(crate) struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    activation: ClipActivation,
    causal: bool,
}

impl EncoderLayer {
    pub(crate) fn new(cfg: &ClipConfig, causal: bool, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let attn = vb.pp("self_attn");
        Ok(Self {
            layer_norm1: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            q_proj: linear(d, d, attn.pp("q_proj"))?,
            k_proj: linear(d, d, attn.pp("k_proj"))?,
            v_proj: linear(d, d, attn.pp("v_proj"))?,
            out_proj: linear(d, d, attn.pp("out_proj"))?,
            layer_norm2: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: linear(d, cfg.intermediate_size, vb.pp("mlp").pp("fc1"))?,
            fc2: linear(cfg.intermediate_size, d, vb.pp("mlp").pp("fc2"))?,
            heads: cfg.num_attention_heads,
            activation: cfg.activation,
            causal,
        })
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.layer_norm1.forward(xs)?;
        let q = self.q_proj.forward(&h)?;
        let k = self.k_proj.forward(&h)?;
        let v = self.v_proj.forward(&h)?;
        let a = self
            .out_proj
            .forward(&attention(&q, &k, &v, self.heads, self.causal)?)?;
        let xs = (xs + a)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&xs)?)?;
        let h = match self.activation {
            // transformers' QuickGELUActivation: x * sigmoid(1.702 x)
            ClipActivation::QuickGelu => (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?,
            ClipActivation::Gelu => h.gelu_erf()?,
        };
        xs + self.fc2.forward(&h)?
    }
}

/// Token embeddings to replace: `vectors` `[n, D]` from position `offset` of batch row `row`.
#[derive(Debug, Clone)]
pub struct InputFix {
    pub row: usize,
    pub offset: usize,
    pub vectors: Tensor,
}

/// The text transformer. `forward` returns the hidden states A1111's `clip_skip` asks for.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    /// `CLIPTextModelWithProjection`'s `text_projection` (no bias), when the weights have it.
    text_projection: Option<Linear>,
    config: ClipConfig,
}

impl ClipTextModel {
    /// Keys are read under `text_model.` (files saved by transformers 4, as SD repos ship) or
    /// at the root (transformers 5 drops the prefix).
    pub fn new(cfg: &ClipConfig, vb: VarBuilder) -> Result<Self> {
        let text_projection = if vb.contains_tensor("text_projection.weight") {
            let out = cfg.projection_dim.unwrap_or(512); // transformers CLIPTextConfig default
            Some(super::nn::linear_no_bias(
                cfg.hidden_size,
                out,
                vb.pp("text_projection"),
            )?)
        } else {
            None
        };
        let vb = if vb.contains_tensor("embeddings.token_embedding.weight") {
            vb
        } else {
            vb.pp("text_model")
        };
        let emb = vb.pp("embeddings");
        let token_embedding =
            candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, emb.pp("token_embedding"))?;
        let position_embedding = emb.get(
            (cfg.max_position_embeddings, cfg.hidden_size),
            "position_embedding.weight",
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(cfg, true, vb.pp(format!("encoder.layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::new(
            cfg.hidden_size,
            cfg.layer_norm_eps,
            vb.pp("final_layer_norm"),
        )?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            config: cfg.clone(),
        })
    }

    /// True for `CLIPTextModelWithProjection` weights (SDXL's second encoder).
    pub fn has_projection(&self) -> bool {
        self.text_projection.is_some()
    }

    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// Encode token ids `[B, S]` (u32 or i64). `clip_skip` uses A1111's numbering: 1 is the last
    /// layer; n > 1 takes the output of layer `L - n + 1` and applies the final layer norm.
    pub fn forward(&self, ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        self.forward_fixed(ids, &[], clip_skip)
    }

    /// [`Self::forward`] with some token embeddings replaced (textual inversion).
    pub fn forward_fixed(
        &self,
        ids: &Tensor,
        fixes: &[InputFix],
        clip_skip: usize,
    ) -> Result<Tensor> {
        let n_layers = self.layers.len();
        if clip_skip == 0 || clip_skip > n_layers {
            candle_core::bail!(
                "clip_skip {clip_skip} is out of range for a text encoder of {n_layers} layers (1..={n_layers})"
            );
        }
        let xs = self.run_layers(ids, fixes, n_layers + 1 - clip_skip, |_, _| Ok(()))?;
        self.final_layer_norm.forward(&xs)
    }

    /// SDXL's use (diffusers `encode_prompt`): `hidden_states[-(clip_skip + 1)]`, the output
    /// of layer `L - clip_skip` without the final layer norm (`clip_skip` in A1111 numbering,
    /// so 1 is the penultimate layer), and, for `CLIPTextModelWithProjection`, the pooled
    /// output: the final-normed last layer at each row's first end-of-text token (the
    /// largest id, as transformers' argmax finds it), through `text_projection`.
    pub fn forward_penultimate(
        &self,
        ids: &Tensor,
        clip_skip: usize,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.forward_penultimate_fixed(ids, &[], clip_skip)
    }

    /// [`Self::forward_penultimate`] with some token embeddings replaced (textual inversion).
    pub fn forward_penultimate_fixed(
        &self,
        ids: &Tensor,
        fixes: &[InputFix],
        clip_skip: usize,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let n_layers = self.layers.len();
        if clip_skip == 0 || clip_skip >= n_layers {
            candle_core::bail!(
                "clip_skip {clip_skip} is out of range for an SDXL text encoder of {n_layers} layers (1..={})",
                n_layers - 1
            );
        }
        let keep = n_layers - clip_skip;
        let Some(proj) = &self.text_projection else {
            return Ok((self.run_layers(ids, fixes, keep, |_, _| Ok(()))?, None));
        };
        let mut hidden = None;
        let last = self.run_layers(ids, fixes, n_layers, |i, xs| {
            if i == keep {
                hidden = Some(xs.clone());
            }
            Ok(())
        })?;
        let normed = self.final_layer_norm.forward(&last)?;
        let eos = ids.to_dtype(DType::U32)?.argmax_keepdim(1)?; // [B, 1], first maximum
        let rows = (0..normed.dim(0)?)
            .map(|b| {
                let at = eos.get(b)?.get(0)?.to_scalar::<u32>()? as usize;
                normed.get(b)?.narrow(0, at, 1)
            })
            .collect::<Result<Vec<_>>>()?;
        let pooled = proj.forward(&Tensor::cat(&rows, 0)?)?;
        Ok((hidden.expect("keep < n_layers"), Some(pooled)))
    }

    /// Embed `ids` `[B, S]` and run the first `n` layers, calling `each(i, xs)` with the
    /// output after `i` layers (`i` from 1).
    fn run_layers(
        &self,
        ids: &Tensor,
        fixes: &[InputFix],
        n: usize,
        mut each: impl FnMut(usize, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        let (_b, s) = ids.dims2()?;
        if s > self.config.max_position_embeddings {
            candle_core::bail!(
                "{s} tokens exceed the text encoder's {} positions",
                self.config.max_position_embeddings
            );
        }
        let ids = ids.to_dtype(DType::U32)?;
        let pos = self.position_embedding.i(..s)?;
        let mut xs = self.token_embedding.forward(&ids)?;
        // A1111's EmbeddingsWithFixes: the vectors replace token embeddings, before positions
        for f in fixes {
            let (b, s, d) = xs.dims3()?;
            let v = f.vectors.to_dtype(xs.dtype())?.to_device(xs.device())?;
            let (n, vd) = v.dims2()?;
            if f.row >= b || f.offset + n > s || vd != d {
                candle_core::bail!(
                    "embedding of {n}x{vd} does not fit at row {} position {} of {b}x{s}x{d} tokens",
                    f.row,
                    f.offset
                );
            }
            xs = xs.slice_assign(
                &[f.row..f.row + 1, f.offset..f.offset + n, 0..d],
                &v.unsqueeze(0)?,
            )?;
        }
        let mut xs = xs.broadcast_add(&pos)?;
        for (i, layer) in self.layers[..n].iter().enumerate() {
            xs = layer.forward(&xs)?;
            each(i + 1, &xs)?;
        }
        Ok(xs)
    }
}
