//! Textual-inversion embeddings as AUTOMATIC1111 uses them (`modules/textual_inversion` and
//! `sd_hijack_clip.py`): every file of an embeddings folder is an embedding named by its file
//! stem; where a prompt's tokens hold the name's tokens, the embedding's vectors take their
//! place (an n-vector embedding takes n token slots, with the emphasis weight there).
//!
//! Formats: A1111 `.pt` (`string_to_param.*`, read through the safe unpickler), `.bin`
//! (diffusers' `learned_embeds.bin`, `{token: tensor}`), `.safetensors` (`emb_params`, or one
//! tensor), and SDXL embeddings (`clip_l` + `clip_g`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// The file types an embeddings folder is scanned for.
pub const EXTENSIONS: [&str; 4] = ["safetensors", "pt", "bin", "ckpt"];

/// The most files an embeddings folder is scanned for (the rest are skipped, named).
pub const MAX_FILES: usize = 4096;

/// Largest embedding file read (real ones are a few KB to a few MB).
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// One textual-inversion embedding: its vectors for each text-encoder width it has.
#[derive(Debug, Clone)]
pub struct TextualInversion {
    /// The file stem: what a prompt names.
    pub name: String,
    pub path: PathBuf,
    /// `[vectors, width]` f32 tensors, one per encoder width (one for SD 1/2, CLIP-L's 768 and
    /// bigG's 1280 for SDXL).
    by_width: BTreeMap<usize, Tensor>,
    pub vectors: usize,
}

fn bad(path: &Path, message: impl Into<String>) -> Error {
    Error::Config {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

impl TextualInversion {
    /// Read one embedding file.
    pub fn load(path: &Path) -> Result<Self> {
        let meta = sd_plugins_api::input_file::check(path).map_err(|m| bad(path, m))?;
        if meta.len() > MAX_FILE_BYTES {
            return Err(bad(
                path,
                format!(
                    "{} bytes is too large for an embedding (at most {MAX_FILE_BYTES})",
                    meta.len()
                ),
            ));
        }
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let store = sd_weights::Store::open(path)?;
        let names = store.names();
        let get = |k: &str| -> Result<Tensor> {
            store
                .get(k)
                .and_then(|t| t.to_dtype(DType::F32))
                .map_err(|source| Error::Weights {
                    path: path.to_path_buf(),
                    source,
                })
        };
        // which tensors hold the vectors, in A1111's order of checks
        let keys: Vec<String> =
            if names.iter().any(|n| n == "clip_l") && names.iter().any(|n| n == "clip_g") {
                vec!["clip_l".into(), "clip_g".into()]
            } else if let Some(k) = names.iter().find(|n| n.starts_with("string_to_param.")) {
                vec![k.clone()]
            } else if names.iter().any(|n| n == "emb_params") {
                vec!["emb_params".into()]
            } else if names.len() == 1 {
                vec![names[0].clone()]
            } else {
                return Err(bad(
                    path,
                    format!(
                        "not a textual-inversion embedding: expected string_to_param, emb_params, \
                     clip_l + clip_g or a single tensor, found {}",
                        if names.is_empty() {
                            "no tensors".to_string()
                        } else {
                            names.join(", ")
                        }
                    ),
                ));
            };
        let mut by_width = BTreeMap::new();
        let mut vectors = None;
        for k in &keys {
            let t = get(k)?;
            let t = match t.rank() {
                1 => t.unsqueeze(0)?,
                2 => t,
                _ => {
                    return Err(bad(
                        path,
                        format!("{k}: shape {:?} is no [vectors, width] embedding", t.dims()),
                    ))
                }
            };
            let (n, w) = t.dims2()?;
            if n == 0 || w == 0 {
                return Err(bad(path, format!("{k}: empty embedding {:?}", t.dims())));
            }
            if *vectors.get_or_insert(n) != n {
                return Err(bad(
                    path,
                    format!(
                        "{k}: {n} vectors, but {} has {}",
                        keys[0],
                        vectors.unwrap_or(0)
                    ),
                ));
            }
            if !sd_weights::finite::all_finite(&t)? {
                return Err(bad(path, format!("{k}: holds NaN or infinity")));
            }
            by_width.insert(w, t);
        }
        Ok(Self {
            name,
            path: path.to_path_buf(),
            by_width,
            vectors: vectors.unwrap_or(0),
        })
    }

    /// The widths it has vectors for.
    pub fn widths(&self) -> Vec<usize> {
        self.by_width.keys().copied().collect()
    }

    /// Its vectors for a text encoder of width `d`.
    pub fn for_width(&self, d: usize) -> Option<&Tensor> {
        self.by_width.get(&d)
    }

    /// Whether it is for a model whose text encoders have `widths`: the same widths (an SD 1.x
    /// embedding is no SDXL one, nor the reverse, as A1111 checks the shape), or, for a model
    /// with one encoder (the SDXL refiner, bigG alone), an SDXL embedding's wider vectors.
    pub fn fits(&self, widths: &[usize]) -> bool {
        let mine = self.widths();
        let mut theirs = widths.to_vec();
        theirs.sort_unstable();
        mine == theirs || (theirs.len() == 1 && mine.len() == 2 && mine[1] == theirs[0])
    }
}

/// The embeddings of a folder that fit one model.
#[derive(Debug, Clone, Default)]
pub struct EmbeddingSet {
    items: Vec<TextualInversion>,
}

/// What scanning a folder found: the embeddings, and each file that was skipped with why.
#[derive(Debug, Default)]
pub struct Scan {
    pub loaded: Vec<TextualInversion>,
    pub skipped: Vec<(PathBuf, String)>,
}

/// Read every embedding file in `dir` (not its subfolders' hidden files; subfolders are
/// scanned, as A1111 does). Unreadable files are skipped with their reason; two files of one
/// name keep the first in path order.
pub fn scan_dir(dir: &Path) -> Result<Scan> {
    let meta = std::fs::metadata(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(bad(dir, "embeddings_dir is not a folder"));
    }
    let mut files = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), 0)];
    while let Some((d, depth)) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|source| Error::Io {
            path: d.clone(),
            source,
        })?;
        for e in entries.flatten() {
            let p = e.path();
            let hidden = e.file_name().to_string_lossy().starts_with('.');
            let Ok(ft) = e.file_type() else { continue };
            if hidden {
                continue;
            }
            if ft.is_dir() && depth < 4 {
                stack.push((p, depth + 1));
            } else if ft.is_file()
                && p.extension()
                    .and_then(|x| x.to_str())
                    .is_some_and(|x| EXTENSIONS.contains(&x.to_ascii_lowercase().as_str()))
            {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut scan = Scan::default();
    if files.len() > MAX_FILES {
        for f in files.split_off(MAX_FILES) {
            scan.skipped.push((
                f,
                format!("more than {MAX_FILES} embedding files in the folder"),
            ));
        }
    }
    for f in files {
        match TextualInversion::load(&f) {
            Ok(t) if scan.loaded.iter().any(|o| o.name == t.name) => scan
                .skipped
                .push((f, format!("another embedding is named {:?}", t.name))),
            Ok(t) => scan.loaded.push(t),
            Err(Error::Config { message, .. }) => scan.skipped.push((f, message)),
            Err(e) => scan.skipped.push((f, e.to_string())),
        }
    }
    Ok(scan)
}

impl EmbeddingSet {
    /// The embeddings that fit a model whose text encoders have `widths`; the others are
    /// returned with why (A1111 skips them the same way).
    pub fn for_model(all: &[TextualInversion], widths: &[usize]) -> (Self, Vec<(String, String)>) {
        let (fit, skip): (Vec<_>, Vec<_>) = all.iter().cloned().partition(|t| t.fits(widths));
        let skipped = skip
            .into_iter()
            .map(|t| {
                let why = format!(
                    "vectors of width {:?}, the model's text encoders take {widths:?}",
                    t.widths()
                );
                (t.name, why)
            })
            .collect();
        (Self { items: fit }, skipped)
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn items(&self) -> &[TextualInversion] {
        &self.items
    }

    /// The token ids each embedding's name tokenizes to, for matching in prompts.
    pub fn token_table(
        &self,
        tok: &super::tokenizer::ClipTokenizer,
    ) -> Result<Vec<super::tokenizer::TokenEmbedding>> {
        let mut out = Vec::with_capacity(self.items.len());
        for (index, t) in self.items.iter().enumerate() {
            let ids = tok.encode(&t.name)?;
            if !ids.is_empty() {
                out.push(super::tokenizer::TokenEmbedding {
                    ids,
                    vectors: t.vectors,
                    index,
                });
            }
        }
        // longest names first, so a longer name wins over its prefix (A1111's ids_lookup)
        out.sort_by_key(|e| std::cmp::Reverse(e.ids.len()));
        Ok(out)
    }

    /// Vectors of embedding `index` for an encoder of width `d`, on `device` in `dtype`.
    pub fn vectors(&self, index: usize, d: usize, device: &Device, dtype: DType) -> Result<Tensor> {
        let t = self
            .items
            .get(index)
            .and_then(|t| t.for_width(d))
            .ok_or_else(|| {
                Error::Invalid(format!("embedding {index} has no vectors of width {d}"))
            })?;
        Ok(t.to_device(device)?.to_dtype(dtype)?)
    }
}
