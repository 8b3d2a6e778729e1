//! CLIP BPE tokenizer built from `tokenizer/vocab.json` + `merges.txt` (real SD repos ship no
//! tokenizer.json), and AUTOMATIC1111's 75-token prompt chunking.

use std::path::{Path, PathBuf};

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSeq, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};

/// Tokens of one chunk between BOS and EOS (A1111's `chunk_length`).
pub const CHUNK_TOKENS: usize = 75;
/// A1111's `comma_padding_backtrack` default: a chunk that fills up is cut after a comma found
/// within this many tokens of its end.
pub const COMMA_BACKTRACK: usize = 20;

/// CLIP's pre-tokenization pattern (transformers' CLIPTokenizer, minus the special tokens
/// which are matched as added tokens).
const CLIP_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// The standard CLIP BPE vocabulary (`vocab.json`), as SD 1.x/2.x repos ship it.
pub const EMBEDDED_VOCAB: &str = include_str!("../../assets/clip/vocab.json");
/// Its merges (`merges.txt`).
pub const EMBEDDED_MERGES: &str = include_str!("../../assets/clip/merges.txt");

#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    pub bos: u32,
    pub eos: u32,
    pub pad: u32,
    comma: Option<u32>,
    path: PathBuf,
}

fn token_content(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

impl ClipTokenizer {
    /// Load from a diffusers `tokenizer/` folder. The pad token comes from the folder's own
    /// `special_tokens_map.json` / `tokenizer_config.json` (SD1 pads with `<|endoftext|>`,
    /// SD2 with `!`).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        if !vocab.exists() && !merges.exists() {
            // A folder with only its config (the embedded tiny-fill model's): SD1 and SD2 both
            // use the standard CLIP vocabulary, so that one, with the folder's pad token.
            let pad = Self::pad_token(dir)?;
            return Self::embedded(pad.as_deref().unwrap_or("<|endoftext|>"));
        }
        for f in [&vocab, &merges] {
            if !f.is_file() {
                return Err(Error::Tokenizer {
                    path: f.clone(),
                    message: "file not found".into(),
                });
            }
        }
        let err = |message: String| Error::Tokenizer {
            path: dir.to_path_buf(),
            message,
        };
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .end_of_word_suffix("</w>".into())
            .unk_token("<|endoftext|>".into())
            .build()
            .map_err(|e| err(format!("cannot read vocab.json/merges.txt: {e}")))?;
        Self::build(bpe, Self::pad_token(dir)?, dir)
    }

    /// The pad token a tokenizer folder names (`special_tokens_map.json`, then
    /// `tokenizer_config.json`), if any.
    fn pad_token(dir: &Path) -> Result<Option<String>> {
        for name in ["special_tokens_map.json", "tokenizer_config.json"] {
            let p = dir.join(name);
            if p.is_file() {
                let v: serde_json::Value = crate::error::read_json(&p)?;
                if let Some(t) = v.get("pad_token").and_then(token_content) {
                    return Ok(Some(t));
                }
            }
        }
        Ok(None)
    }

    /// The standard CLIP BPE vocabulary embedded in the binary, for single-file checkpoints,
    /// which carry none: `pad` is `<|endoftext|>` for SD1's CLIP, `!` for SD2's OpenCLIP.
    pub fn embedded(pad: &str) -> Result<Self> {
        let here = Path::new("<embedded CLIP vocabulary>");
        let err = |message: String| Error::Tokenizer {
            path: here.to_path_buf(),
            message,
        };
        let vocab: tokenizers::models::bpe::Vocab =
            serde_json::from_str(EMBEDDED_VOCAB).map_err(|e| err(e.to_string()))?;
        let merges: Vec<(String, String)> = EMBEDDED_MERGES
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .filter_map(|l| l.split_once(' '))
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .end_of_word_suffix("</w>".into())
            .unk_token("<|endoftext|>".into())
            .build()
            .map_err(|e| err(e.to_string()))?;
        Self::build(bpe, Some(pad.to_string()), here)
    }

    fn build(bpe: BPE, pad_token: Option<String>, dir: &Path) -> Result<Self> {
        let err = |message: String| Error::Tokenizer {
            path: dir.to_path_buf(),
            message,
        };
        let mut tk = Tokenizer::new(bpe);
        let norm = NormSeq::new(vec![
            NFC.into(),
            Replace::new(
                tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
                " ",
            )
            .map_err(|e| err(e.to_string()))?
            .into(),
            Lowercase.into(),
        ]);
        tk.with_normalizer(Some(norm));
        let split = Split::new(
            SplitPattern::Regex(CLIP_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| err(e.to_string()))?;
        tk.with_pre_tokenizer(Some(PreSeq::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ])));
        tk.add_special_tokens(&[
            AddedToken::from("<|startoftext|>", true),
            AddedToken::from("<|endoftext|>", true),
        ]);

        let id = |t: &str| {
            tk.token_to_id(t)
                .ok_or_else(|| err(format!("token {t:?} is not in vocab.json")))
        };
        let bos = id("<|startoftext|>")?;
        let eos = id("<|endoftext|>")?;
        let pad = match pad_token {
            Some(t) => {
                // transformers treats the pad token as a special token that splits the text
                // (SD2's "!!" becomes two pad tokens, not the BPE token "!!"); so do we.
                let pad = id(&t)?;
                tk.add_special_tokens(&[AddedToken::from(t.clone(), true)]);
                pad
            }
            None => eos,
        };
        let comma = tk.token_to_id(",</w>");
        Ok(Self {
            inner: tk,
            bos,
            eos,
            pad,
            comma,
            path: dir.to_path_buf(),
        })
    }

    /// Check that every id this tokenizer can produce has a row in a text encoder's token
    /// embedding of `rows` rows (`encoder` names it): a larger vocabulary would fail at the
    /// lookup with a bare "invalid index".
    pub fn check_fits(&self, rows: usize, encoder: &Path) -> Result<()> {
        let vocab = self.inner.get_vocab(true);
        if let Some((token, id)) = vocab.iter().max_by_key(|(_, id)| **id) {
            if *id as usize >= rows {
                return Err(Error::Tokenizer {
                    path: self.path.clone(),
                    message: format!(
                        "token {token:?} has id {id}, but the text encoder {} has {rows} \
                         token embeddings (ids 0..{}): the tokenizer does not belong to it",
                        encoder.display(),
                        rows.saturating_sub(1)
                    ),
                });
            }
        }
        Ok(())
    }

    /// Token ids of `text` without BOS/EOS.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text.trim(), false)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                message: format!("cannot tokenize {text:?}: {e}"),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// A1111 chunking (modules/sd_hijack_clip.py `tokenize_line`): 75-token chunks, a full chunk
    /// cut after a comma within the last 20 tokens, each chunk `[BOS] + tokens + [EOS]` padded
    /// to 77 with the pad token. An empty prompt gives one chunk.
    pub fn chunks(&self, text: &str) -> Result<Vec<Vec<u32>>> {
        Ok(self
            .weighted_chunks(&[(text.to_string(), 1.0)])?
            .into_iter()
            .map(|c| c.ids)
            .collect())
    }

    /// A1111 chunking of weighted fragments (`prompt::parse_prompt_attention`): each fragment
    /// is tokenized on its own and its weight given to its tokens; `("BREAK", -1)` ends the
    /// chunk. BOS, EOS and padding have weight 1.
    pub fn weighted_chunks(&self, fragments: &[(String, f32)]) -> Result<Vec<WeightedChunk>> {
        self.weighted_chunks_with(fragments, &[])
    }

    /// [`Self::weighted_chunks`] with textual-inversion embeddings (A1111 `tokenize_line`):
    /// where the tokens hold an embedding's name (`embeddings`, longest names first), its
    /// vectors take `vectors` slots (token id 0, the fragment's weight), starting a new chunk
    /// when they do not fit in this one.
    pub fn weighted_chunks_with(
        &self,
        fragments: &[(String, f32)],
        embeddings: &[TokenEmbedding],
    ) -> Result<Vec<WeightedChunk>> {
        let mut chunks: Vec<WeightedChunk> = Vec::new();
        // (token, weight, embedding index starting at this slot)
        let mut chunk: Vec<(u32, f32, Option<usize>)> = Vec::new();
        let mut last_comma: Option<usize> = None;
        let finish = |chunk: Vec<(u32, f32, Option<usize>)>, chunks: &mut Vec<WeightedChunk>| {
            let mut ids = Vec::with_capacity(CHUNK_TOKENS + 2);
            let mut weights = Vec::with_capacity(CHUNK_TOKENS + 2);
            let mut fixes = Vec::new();
            ids.push(self.bos);
            weights.push(1.0);
            for (t, w, e) in chunk {
                if let Some(embedding) = e {
                    fixes.push(ChunkFix {
                        offset: ids.len(),
                        embedding,
                    });
                }
                ids.push(t);
                weights.push(w);
            }
            ids.push(self.eos);
            weights.push(1.0);
            ids.resize(CHUNK_TOKENS + 2, self.pad);
            weights.resize(CHUNK_TOKENS + 2, 1.0);
            chunks.push(WeightedChunk {
                ids,
                weights,
                fixes,
            });
        };
        for (text, weight) in fragments {
            if text == "BREAK" && *weight == -1.0 {
                finish(std::mem::take(&mut chunk), &mut chunks);
                last_comma = None;
                continue;
            }
            let tokens = self.encode(text)?;
            let mut position = 0;
            while position < tokens.len() {
                let token = tokens[position];
                if Some(token) == self.comma {
                    last_comma = Some(chunk.len());
                } else if let Some(lc) = last_comma {
                    if chunk.len() == CHUNK_TOKENS && chunk.len() - lc <= COMMA_BACKTRACK {
                        // the relocated tokens keep their embedding slots (A1111 leaves the
                        // fix behind in the finished chunk, a corner case not reproduced)
                        let reloc = chunk.split_off(lc + 1);
                        finish(std::mem::replace(&mut chunk, reloc), &mut chunks);
                        last_comma = None;
                    }
                }
                if chunk.len() == CHUNK_TOKENS {
                    finish(std::mem::take(&mut chunk), &mut chunks);
                    last_comma = None;
                }
                let found = embeddings
                    .iter()
                    .find(|e| tokens[position..].starts_with(&e.ids));
                let Some(e) = found else {
                    chunk.push((token, *weight, None));
                    position += 1;
                    continue;
                };
                let n = e.vectors.min(CHUNK_TOKENS);
                if chunk.len() + n > CHUNK_TOKENS {
                    finish(std::mem::take(&mut chunk), &mut chunks);
                    last_comma = None;
                }
                chunk.push((0, *weight, Some(e.index)));
                chunk.extend(std::iter::repeat_n((0, *weight, None), n - 1));
                position += e.ids.len();
            }
        }
        if !chunk.is_empty() || chunks.is_empty() {
            finish(chunk, &mut chunks);
        }
        Ok(chunks)
    }
}

/// An embedding as the tokenizer matches it: the ids its name tokenizes to, how many slots
/// its vectors take, and its index in the [`super::embeddings::EmbeddingSet`].
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEmbedding {
    pub ids: Vec<u32>,
    pub vectors: usize,
    pub index: usize,
}

/// Embedding `embedding`'s vectors replace the token embeddings from position `offset` of a
/// chunk's ids (BOS is position 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkFix {
    pub offset: usize,
    pub embedding: usize,
}

/// 77 token ids and their emphasis weights.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedChunk {
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
    /// Textual-inversion vectors that replace token embeddings.
    pub fixes: Vec<ChunkFix>,
}
