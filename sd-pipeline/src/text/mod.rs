//! Prompt encoding as AUTOMATIC1111 does it: emphasis `(word:1.2)` / `[word]` / `BREAK`, 75-token
//! chunks through the CLIP text encoder, `clip_skip` on both prompts. The CLIP BPE tokenizer
//! is in [`tokenizer`], the emphasis syntax in [`prompt`], the text model in
//! [`crate::model::clip`].

pub mod embeddings;
pub mod prompt;
pub mod tokenizer;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::model::clip::{ClipTextModel, InputFix};
use embeddings::EmbeddingSet;
use prompt::parse_prompt_attention;
use tokenizer::{ClipTokenizer, WeightedChunk, CHUNK_TOKENS};

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
    let fixes = chunk_fixes(chunks, &EmbeddingSet::default(), clip, device)?;
    encode_weighted_with(chunks, device, |ids| {
        clip.forward_fixed(ids, &fixes, clip_skip)
    })
}

/// The token-embedding replacements the chunks' embedding slots ask for, with the vectors
/// `embeddings` holds for `clip`'s width (at most as many as fit one chunk).
fn chunk_fixes(
    chunks: &[WeightedChunk],
    embeddings: &EmbeddingSet,
    clip: &ClipTextModel,
    device: &Device,
) -> Result<Vec<InputFix>> {
    let d = clip.config().hidden_size;
    let mut out = Vec::new();
    for (row, c) in chunks.iter().enumerate() {
        for f in &c.fixes {
            let v = embeddings.vectors(f.embedding, d, device, candle_core::DType::F32)?;
            let n = v.dim(0)?.min(CHUNK_TOKENS);
            out.push(InputFix {
                row,
                offset: f.offset,
                vectors: v.narrow(0, 0, n)?,
            });
        }
    }
    Ok(out)
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
    prompt_chunks_with(tok, prompt, &EmbeddingSet::default())
}

/// [`prompt_chunks`] with the names of `embeddings` matched in the prompt.
pub fn prompt_chunks_with(
    tok: &ClipTokenizer,
    prompt: &str,
    embeddings: &EmbeddingSet,
) -> Result<Vec<WeightedChunk>> {
    let table = if embeddings.is_empty() {
        Vec::new()
    } else {
        embeddings.token_table(tok)?
    };
    tok.weighted_chunks_with(&parse_prompt_attention(prompt), &table)
}

/// The names of the embeddings a prompt uses, in the order of `embeddings`.
pub fn embeddings_used(
    tok: &ClipTokenizer,
    prompt: &str,
    embeddings: &EmbeddingSet,
) -> Result<Vec<String>> {
    let mut used = vec![false; embeddings.items().len()];
    for c in prompt_chunks_with(tok, prompt, embeddings)? {
        for f in c.fixes {
            used[f.embedding] = true;
        }
    }
    Ok(embeddings
        .items()
        .iter()
        .zip(used)
        .filter(|(_, u)| *u)
        .map(|(t, _)| t.name.clone())
        .collect())
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
    let none = EmbeddingSet::default();
    encode_prompts_with(tok, clip, prompt, negative, clip_skip, &none, device)
}

/// [`encode_prompts`] with textual-inversion `embeddings` in both prompts.
pub fn encode_prompts_with(
    tok: &ClipTokenizer,
    clip: &ClipTextModel,
    prompt: &str,
    negative: Option<&str>,
    clip_skip: usize,
    embeddings: &EmbeddingSet,
    device: &Device,
) -> Result<(Tensor, Option<Tensor>)> {
    let layers = clip.config().num_hidden_layers;
    if clip_skip == 0 || clip_skip > layers {
        return Err(Error::Invalid(format!(
            "clip_skip {clip_skip} is out of range: this text encoder has {layers} layers (use 1..={layers})"
        )));
    }
    let encode = |chunks: &[WeightedChunk]| -> Result<Tensor> {
        let fixes = chunk_fixes(chunks, embeddings, clip, device)?;
        encode_weighted_with(chunks, device, |ids| {
            clip.forward_fixed(ids, &fixes, clip_skip)
        })
    };
    let mut pos = prompt_chunks_with(tok, prompt, embeddings)?;
    let Some(negative) = negative else {
        return Ok((encode(&pos)?, None));
    };
    let mut neg = prompt_chunks_with(tok, negative, embeddings)?;
    let empty = prompt_chunks(tok, "")?.remove(0);
    while neg.len() < pos.len() {
        neg.push(empty.clone());
    }
    while pos.len() < neg.len() {
        pos.push(empty.clone());
    }
    let uncond = encode(&neg)?;
    let cond = encode(&pos)?;
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
    let none = EmbeddingSet::default();
    encode_prompts_dual_with(encoders, prompt, negative, clip_skip, &none, device)
}

/// [`encode_prompts_dual`] with textual-inversion `embeddings` (each encoder gets the
/// vectors of its width: `clip_l` and `clip_g`).
pub fn encode_prompts_dual_with(
    encoders: &[(&ClipTokenizer, &ClipTextModel)],
    prompt: &str,
    negative: Option<Option<&str>>,
    clip_skip: usize,
    embeddings: &EmbeddingSet,
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
            .map(|(tok, _)| prompt_chunks_with(tok, text, embeddings))
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
            let fixes = chunk_fixes(c, embeddings, model, device)?;
            hidden.push(encode_weighted_with(c, device, |ids| {
                let (h, p) = model.forward_penultimate_fixed(ids, &fixes, clip_skip)?;
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
