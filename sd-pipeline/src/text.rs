//! Prompt encoding: A1111 chunks through the CLIP text encoder, `clip_skip` on both prompts.

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::models::clip::ClipTextModel;
use crate::tokenizer::ClipTokenizer;

/// Encode token chunks `[n, 77]` and lay them end to end: `[1, 77 * n, D]`.
fn encode_chunks(
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

/// Token chunks of a prompt (A1111 rules), for display and tests.
pub fn prompt_chunks(tok: &ClipTokenizer, prompt: &str) -> Result<Vec<Vec<u32>>> {
    tok.chunks(prompt)
}

/// Conditioning for `prompt` and, when `negative` is given, the unconditional embedding.
/// When one prompt has fewer chunks, the encoding of the empty prompt is appended to it
/// until both match (A1111). Both use `clip_skip` (A1111 numbering, 1 = last layer).
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
    let mut pos = tok.chunks(prompt)?;
    let Some(negative) = negative else {
        return Ok((encode_chunks(clip, &pos, clip_skip, device)?, None));
    };
    let mut neg = tok.chunks(negative)?;
    let empty = tok.chunks("")?.remove(0);
    while neg.len() < pos.len() {
        neg.push(empty.clone());
    }
    while pos.len() < neg.len() {
        pos.push(empty.clone());
    }
    let both = encode_chunks(clip, &[neg, pos].concat(), clip_skip, device)?;
    let (_, s, _) = both.dims3()?;
    let half = s / 2;
    let uncond = both.narrow(1, 0, half)?;
    let cond = both.narrow(1, half, half)?;
    Ok((cond, Some(uncond)))
}
