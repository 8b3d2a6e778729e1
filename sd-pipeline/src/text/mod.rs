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
    let ids: Vec<Vec<u32>> = chunks.iter().map(|c| c.ids.clone()).collect();
    let z = encode_chunks(clip, &ids, clip_skip, device)?;
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
