//! Prompt encoding as AUTOMATIC1111 does it: emphasis `(word:1.2)` / `[word]` / `BREAK`, 75-token
//! chunks through the CLIP text encoder, `clip_skip` on both prompts. The CLIP BPE tokenizer
//! is in [`tokenizer`], the emphasis syntax in [`prompt`], the text model in
//! [`crate::model::clip`].

pub mod prompt;
pub mod tokenizer;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::model::clip::ClipTextModel;
use prompt::parse_prompt_attention;
use tokenizer::{ClipTokenizer, WeightedChunk};

/// Encode token chunks `[n, 77]` and lay them end to end: `[1, 77 * n, D]`.
pub fn encode_chunks(
    clip: &ClipTextModel,
    chunks: &[Vec<u32>],
    clip_skip: usize,
    device: &Device,
) -> Result<Tensor> {
    let n = chunks.len();
    let len = chunks[0].len();
    let flat: Vec<u32> = chunks.concat();
    let ids = Tensor::from_vec(flat, (n, len), device)?;
    let h = clip.forward(&ids, clip_skip)?;
    let d = h.dim(2)?;
    Ok(h.reshape((1, n * len, d))?)
}

/// Encode weighted chunks: each chunk's hidden states are scaled per token by its weight and
/// then rescaled to the chunk's original mean (A1111's `process_tokens`, "Original" emphasis).
/// Chunks whose weights are all 1 are returned exactly as encoded.
pub fn encode_weighted(
    clip: &ClipTextModel,
    chunks: &[WeightedChunk],
    clip_skip: usize,
    device: &Device,
) -> Result<Tensor> {
    encode_weighted_with(chunks, device, |ids| clip.forward(ids, clip_skip))
}

/// [`encode_weighted`] through any encoder: `encode` maps token ids `[n, 77]` to hidden
/// states `[n, 77, D]`.
pub fn encode_weighted_with(
    chunks: &[WeightedChunk],
    device: &Device,
    encode: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
) -> Result<Tensor> {
    let ids: Vec<Vec<u32>> = chunks.iter().map(|c| c.ids.clone()).collect();
    let flat: Vec<u32> = ids.concat();
    let h = encode(&Tensor::from_vec(flat, (ids.len(), ids[0].len()), device)?)?;
    let (n, len, d) = h.dims3()?;
    let z = h.reshape((1, n * len, d))?;
    if chunks.iter().all(|c| c.weights.iter().all(|&w| w == 1.0)) {
        return Ok(z);
    }
    let (_, total, d) = z.dims3()?;
    let len = total / chunks.len();
    let z = z.reshape((chunks.len(), len, d))?;
    let mut out = Vec::with_capacity(chunks.len());
    for (i, c) in chunks.iter().enumerate() {
        let zi = z.get(i)?;
        if c.weights.iter().all(|&w| w == 1.0) {
            out.push(zi);
            continue;
        }
        let original_mean = zi.mean_all()?;
        let w = Tensor::from_vec(c.weights.clone(), (len, 1), device)?.to_dtype(zi.dtype())?;
        let weighted = zi.broadcast_mul(&w)?;
        let new_mean = weighted.mean_all()?;
        out.push(weighted.broadcast_mul(&(original_mean / new_mean)?)?);
    }
    Ok(Tensor::cat(&out, 0)?.reshape((1, total, d))?)
}

/// Token chunks of a prompt (A1111 rules, emphasis parsed), for display and tests.
pub fn prompt_chunks(tok: &ClipTokenizer, prompt: &str) -> Result<Vec<WeightedChunk>> {
    tok.weighted_chunks(&parse_prompt_attention(prompt))
}

/// Conditioning for `prompt` and, when `negative` is given, the unconditional embedding.
/// Emphasis syntax is honoured in both. When one prompt has fewer chunks, the encoding of the
/// empty prompt is appended to it until both match (A1111). Both use `clip_skip` (A1111
/// numbering, 1 = last layer).
pub fn encode_prompts(
    tok: &ClipTokenizer,
    clip: &ClipTextModel,
    prompt: &str,
    negative: Option<&str>,
    clip_skip: usize,
    device: &Device,
) -> Result<(Tensor, Option<Tensor>)> {
    let layers = clip.config().num_hidden_layers;
    if clip_skip == 0 || clip_skip > layers {
        return Err(Error::Invalid(format!(
            "clip_skip {clip_skip} is out of range: this text encoder has {layers} layers (use 1..={layers})"
        )));
    }
    let mut pos = prompt_chunks(tok, prompt)?;
    let Some(negative) = negative else {
        return Ok((encode_weighted(clip, &pos, clip_skip, device)?, None));
    };
    let mut neg = prompt_chunks(tok, negative)?;
    let empty = prompt_chunks(tok, "")?.remove(0);
    while neg.len() < pos.len() {
        neg.push(empty.clone());
    }
    while pos.len() < neg.len() {
        pos.push(empty.clone());
    }
    let uncond = encode_weighted(clip, &neg, clip_skip, device)?;
    let cond = encode_weighted(clip, &pos, clip_skip, device)?;
    Ok((cond, Some(uncond)))
}

/// What an SDXL-class UNet is conditioned on: the hidden states of both encoders laid side by
/// side (`[1, 77 * chunks, D1 + D2]`) and the pooled vector (`[1, P]`) of each prompt.
#[derive(Debug, Clone)]
pub struct DualEncoded {
    pub cond: Tensor,
    pub pooled: Tensor,
    pub uncond: Option<(Tensor, Tensor)>,
}

/// SDXL prompt encoding (diffusers `StableDiffusionXLPipeline.encode_prompt`, with A1111's
/// chunks and emphasis applied per encoder as its SDXL embedders do): each encoder's
/// penultimate hidden states (moved `clip_skip - 1` further back, no final layer norm),
/// CLIP-L first; pooled = the last encoder's projected output for the first chunk (A1111's
/// `zs[0].pooled`). `encoders`: CLIP-L and bigG for the base, bigG alone for the refiner.
/// `negative`: `None` without CFG; `Some(None)` for CFG with zeros as the unconditional
/// embeddings (no negative given and `force_zeros_for_empty_prompt`).
pub fn encode_prompts_dual(
    encoders: &[(&ClipTokenizer, &ClipTextModel)],
    prompt: &str,
    negative: Option<Option<&str>>,
    clip_skip: usize,
    device: &Device,
) -> Result<DualEncoded> {
    let Some(&(_, last)) = encoders.last() else {
        return Err(Error::Invalid("no text encoder".into()));
    };
    let layers = encoders
        .iter()
        .map(|(_, m)| m.config().num_hidden_layers)
        .min()
        .unwrap_or(0);
    if clip_skip == 0 || clip_skip >= layers {
        return Err(Error::Invalid(format!(
            "clip_skip {clip_skip} is out of range: SDXL's text encoders take 1..={}",
            layers.saturating_sub(1)
        )));
    }
    let chunks = |text: &str| -> Result<Vec<Vec<WeightedChunk>>> {
        encoders
            .iter()
            .map(|(tok, _)| prompt_chunks(tok, text))
            .collect()
    };
    let mut pos = chunks(prompt)?;
    let mut neg = match negative {
        Some(Some(n)) => Some(chunks(n)?),
        _ => None,
    };
    // one chunk count for all (A1111 pads the shorter prompt with the empty prompt's chunk)
    let count = pos
        .iter()
        .chain(neg.iter().flatten())
        .map(Vec::len)
        .max()
        .unwrap_or(1);
    let empty: Vec<WeightedChunk> = chunks("")?.into_iter().map(|mut c| c.remove(0)).collect();
    for (i, e) in empty.iter().enumerate() {
        pos[i].resize(count, e.clone());
        if let Some(n) = neg.as_mut() {
            n[i].resize(count, e.clone());
        }
    }
    let encode = |lists: &[Vec<WeightedChunk>]| -> Result<(Tensor, Tensor)> {
        let mut hidden = Vec::with_capacity(encoders.len());
        let mut pooled = None;
        for (c, (_, model)) in lists.iter().zip(encoders) {
            hidden.push(encode_weighted_with(c, device, |ids| {
                let (h, p) = model.forward_penultimate(ids, clip_skip)?;
                if std::ptr::eq(*model, last) {
                    pooled = p.map(|p| p.narrow(0, 0, 1)).transpose()?;
                }
                Ok(h)
            })?);
        }
        let pooled = pooled.ok_or_else(|| {
            Error::Invalid("SDXL's last text encoder has no text_projection".into())
        })?;
        Ok((Tensor::cat(&hidden, 2)?, pooled))
    };
    let (cond, pooled) = encode(&pos)?;
    let uncond = match (negative, neg) {
        (None, _) => None,
        (Some(_), Some(n)) => Some(encode(&n)?),
        (Some(_), None) => Some((cond.zeros_like()?, pooled.zeros_like()?)),
    };
    Ok(DualEncoded {
        cond,
        pooled,
        uncond,
    })
}
