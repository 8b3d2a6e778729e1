//! The embedded default model (`models/tiny-fill`): a tiny Stable Diffusion (real
//! architecture, scaled down) and a ControlNet trained by this project on the synthetic fill
//! task, compiled into the binary (feature `embedded-model`) so that `sdctl generate` works
//! with no download. On first use it is written out as a diffusers folder under the cache dir
//! (content-addressed, and checked byte for byte on each use: a damaged copy is written out
//! again). Without the feature (on by default) there is no default model.

use std::path::PathBuf;

use sd_pipeline::output::StagedDir;
use sha2::{Digest, Sha256};

use crate::error::Result;

#[cfg(feature = "embedded-model")]
macro_rules! files {
    ($($p:literal),* $(,)?) => {
        &[$(($p, include_bytes!(concat!("../../models/tiny-fill/", $p)) as &[u8])),*]
    };
}

/// Whether this build carries the embedded model.
pub const AVAILABLE: bool = cfg!(feature = "embedded-model");

#[cfg(not(feature = "embedded-model"))]
const FILES: &[(&str, &[u8])] = &[];

/// Every file of the model folder (the tokenizer's vocabulary comes from sd-pipeline).
#[cfg(feature = "embedded-model")]
const FILES: &[(&str, &[u8])] = files![
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "controlnet/config.json",
    "controlnet/diffusion_pytorch_model.safetensors",
];

/// The embedded model written out (once) as a diffusers folder; returns its path.
pub fn base_dir() -> Result<PathBuf> {
    if !AVAILABLE {
        return Err("no model given, and this build has no embedded model: pass --model".into());
    }
    // checked (and written out) once per process: asked for once per control unit without a
    // model, and both the hash and the byte-for-byte check read megabytes
    static READY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    if let Some(root) = READY.get() {
        return Ok(root.clone());
    }
    let root = write_out()?;
    Ok(READY.get_or_init(|| root).clone())
}

/// Verify the cached folder, writing it out afresh when missing or damaged.
fn write_out() -> Result<PathBuf> {
    static TAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let tag = TAG.get_or_init(|| {
        let mut h = Sha256::new();
        for (p, bytes) in FILES {
            h.update(p.as_bytes());
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        }
        h.finalize()[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    });
    let root = crate::hashes::cache_dir()
        .ok_or("no cache folder for the embedded model: set SDCTL_CACHE_DIR")?
        .join("embedded")
        .join(format!("tiny-fill-{tag}"));
    if intact(&root) {
        return Ok(root);
    }
    // missing, or damaged (a file truncated, edited or removed): written out afresh
    // staged per process: two first uses may race, and the first rename wins
    let stage = StagedDir::per_process(&root)?;
    let write = |rel: &str, bytes: &[u8]| -> Result<()> {
        let p = stage.path().join(rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        std::fs::write(&p, bytes).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(())
    };
    // model_index.json last: its presence marks a complete folder
    for (p, bytes) in FILES.iter().filter(|(p, _)| *p != "model_index.json") {
        write(p, bytes)?;
    }
    for (p, bytes) in contents().skip(FILES.len()) {
        write(p, bytes)?;
    }
    write("model_index.json", FILES[0].1)?;
    let committed = if root.symlink_metadata().is_ok() {
        stage.commit_replacing()
    } else {
        stage.commit()
    };
    match committed {
        Ok(root) => Ok(root),
        // another process finished first (our staging folder is removed)
        Err(_) if intact(&root) => Ok(root),
        Err(e) => Err(e.into()),
    }
}

/// Every file of the written-out model, with its content.
fn contents() -> impl Iterator<Item = (&'static str, &'static [u8])> {
    FILES.iter().copied().chain([
        (
            "tokenizer/vocab.json",
            sd_pipeline::text::tokenizer::EMBEDDED_VOCAB.as_bytes(),
        ),
        (
            "tokenizer/merges.txt",
            sd_pipeline::text::tokenizer::EMBEDDED_MERGES.as_bytes(),
        ),
    ])
}

/// Whether the folder holds every file of the embedded model, byte for byte (a few MB read
/// per use: a damaged cache is written out again instead of failing or misleading).
fn intact(root: &std::path::Path) -> bool {
    contents().all(|(rel, bytes)| {
        let p = root.join(rel);
        std::fs::metadata(&p).is_ok_and(|m| m.is_file() && m.len() == bytes.len() as u64)
            && std::fs::read(&p).is_ok_and(|b| b == bytes)
    })
}

/// The embedded canny-outline ControlNet (a folder inside [`base_dir`]).
pub fn controlnet_dir() -> Result<PathBuf> {
    Ok(base_dir()?.join("controlnet"))
}
