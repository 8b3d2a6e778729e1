//! Models by Hugging Face repo id (`--model runwayml/stable-diffusion-v1-5`): found in the
//! standard local cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`;
//! `refs/main` -> `snapshots/<commit>/`), downloaded with hf-hub when missing and the network
//! allows (not with `HF_HUB_OFFLINE=1`).

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::Cache;

/// `owner/name`, as opposed to a path that exists.
pub fn looks_like_repo_id(s: &str) -> bool {
    let ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!(s.split_once('/'), Some((a, b)) if ok(a) && ok(b))
}

fn cache() -> Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(p) => Cache::new(PathBuf::from(p)),
        None => Cache::from_env(),
    }
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.to_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

/// The files of a diffusers repo worth fetching: configs, tokenizer files and one set of
/// safetensors weights per folder (the full-precision file when there is one, else fp16);
/// root-level single-file checkpoints and other formats are skipped.
fn wanted(files: &[String]) -> Vec<String> {
    let pipeline = files.iter().any(|f| f == "model_index.json");
    let dir = |f: &str| {
        Path::new(f)
            .parent()
            .map(|p| p.to_string_lossy().to_string())
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for f in files {
        let d = dir(f);
        if pipeline && d.is_empty() && f != "model_index.json" {
            continue;
        }
        if pipeline
            && !d.is_empty()
            && !["unet", "vae", "text_encoder", "tokenizer", "scheduler"].contains(&d.as_str())
        {
            continue;
        }
        if d.contains('/') {
            continue;
        }
        if f.ends_with(".json") || f.ends_with(".txt") {
            out.push(f.clone());
        } else if f.ends_with(".safetensors") {
            let variant = f.contains(".fp16.") || f.contains("ema");
            let plain_exists = files.iter().any(|g| {
                dir(g) == d
                    && g.ends_with(".safetensors")
                    && !g.contains(".fp16.")
                    && !g.contains("ema")
            });
            if !variant || (!plain_exists && f.contains(".fp16.")) {
                out.push(f.clone());
            }
        }
    }
    out
}

/// The local folder of repo `id`, downloading it if needed and allowed.
pub fn resolve(id: &str) -> Result<PathBuf, String> {
    let cache = cache();
    let repo = cache.model(id.to_string());
    for marker in ["model_index.json", "config.json"] {
        if let Some(p) = repo.get(marker) {
            return Ok(p.parent().map(Path::to_path_buf).unwrap_or(p));
        }
    }
    let folder = cache
        .path()
        .join(format!("models--{}", id.replace('/', "--")));
    let not_cached = format!(
        "{id}: not a file or folder here, and not in the Hugging Face cache (looked for {}/refs/main and its snapshot)",
        folder.display()
    );
    if offline() {
        return Err(format!(
            "{not_cached}; HF_HUB_OFFLINE is set, so nothing was downloaded"
        ));
    }
    let api = ApiBuilder::from_cache(cache.clone())
        .with_progress(true)
        .build()
        .map_err(|e| format!("{not_cached}; the hub client failed: {e}"))?;
    let r = api.model(id.to_string());
    let info = r
        .info()
        .map_err(|e| format!("{not_cached}, and the hub could not be reached: {e}"))?;
    let files: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
    let files = wanted(&files);
    eprintln!(
        "downloading {id}: {} files into {}",
        files.len(),
        cache.path().display()
    );
    let mut root = None;
    for f in &files {
        let p = r
            .get(f)
            .map_err(|e| format!("{id}: downloading {f}: {e}"))?;
        if f == "model_index.json" || (f == "config.json" && root.is_none()) {
            root = p.parent().map(Path::to_path_buf);
        }
    }
    root.ok_or_else(|| format!("{id}: the repo has neither model_index.json nor config.json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_and_file_choice() {
        assert!(looks_like_repo_id("runwayml/stable-diffusion-v1-5"));
        assert!(!looks_like_repo_id("./models/sd15"));
        assert!(!looks_like_repo_id("models/sd15/unet"));
        assert!(!looks_like_repo_id("sd15"));
        let files: Vec<String> = [
            "model_index.json",
            "v1-5-pruned.safetensors",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.bin",
            "vae/diffusion_pytorch_model.fp16.safetensors",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "safety_checker/model.safetensors",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let w = wanted(&files);
        assert!(w.contains(&"unet/diffusion_pytorch_model.safetensors".to_string()));
        assert!(!w.contains(&"unet/diffusion_pytorch_model.fp16.safetensors".to_string()));
        assert!(w.contains(&"vae/diffusion_pytorch_model.fp16.safetensors".to_string()));
        assert!(!w.contains(&"v1-5-pruned.safetensors".to_string()));
        assert!(!w.iter().any(|f| f.ends_with(".bin")));
        assert!(w.contains(&"tokenizer/merges.txt".to_string()));
        assert!(!w.iter().any(|f| f.starts_with("safety_checker")));
    }
}
