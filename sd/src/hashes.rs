//! SHA-256 of model files for infotext (A1111's "Model hash" is its first 10 hex digits,
//! LoRA hashes 12, sd-webui-controlnet's model hash 8), cached by path, size and mtime as A1111
//! caches them, so multi-GB checkpoints are read once.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

#[derive(serde::Serialize, serde::Deserialize, Clone)]
struct Entry {
    size: u64,
    mtime_ns: u128,
    sha256: String,
}

/// sdctl's cache folder: `SDCTL_CACHE_DIR`, else the user's cache folder (`~/.cache/sdctl`).
pub fn cache_dir() -> Option<PathBuf> {
    std::env::var_os("SDCTL_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| dirs::cache_dir().map(|d| d.join("sdctl")))
}

pub struct HashCache {
    file: Option<PathBuf>,
    entries: BTreeMap<String, Entry>,
    dirty: bool,
}

/// The files whose bytes make up a model: the file itself, or a folder's weight files
/// (`*.safetensors`, recursively, in path order).
fn parts(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_path_buf()];
    }
    let mut out = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "safetensors") {
                    out.push(p);
                }
            }
        }
    }
    out.sort();
    out
}

fn stamp(files: &[PathBuf]) -> Option<(u64, u128)> {
    let mut size = 0;
    let mut mtime = 0;
    for f in files {
        let m = std::fs::metadata(f).ok()?;
        size += m.len();
        let t = m
            .modified()
            .ok()?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?;
        mtime = mtime.max(t.as_nanos());
    }
    Some((size, mtime))
}

impl HashCache {
    /// The cache in `SDCTL_CACHE_DIR` or the user's cache folder (`~/.cache/sdctl`).
    pub fn open() -> Self {
        let file = cache_dir().map(|d| d.join("hashes.json"));
        let entries = file
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        Self {
            file,
            entries,
            dirty: false,
        }
    }

    /// Full hex SHA-256 of a model file or folder (`None` if unreadable).
    pub fn sha256(&mut self, path: &Path) -> Option<String> {
        let key = path.canonicalize().ok()?.display().to_string();
        let files = parts(path);
        if files.is_empty() {
            return None;
        }
        let (size, mtime_ns) = stamp(&files)?;
        if let Some(e) = self.entries.get(&key) {
            if e.size == size && e.mtime_ns == mtime_ns {
                return Some(e.sha256.clone());
            }
        }
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        for f in &files {
            let mut r = std::fs::File::open(f).ok()?;
            loop {
                let n = r.read(&mut buf).ok()?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
        }
        let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        self.entries.insert(
            key,
            Entry {
                size,
                mtime_ns,
                sha256: hex.clone(),
            },
        );
        self.dirty = true;
        Some(hex)
    }

    /// The first `n` hex digits, or "unknown".
    pub fn short(&mut self, path: &Path, n: usize) -> String {
        self.sha256(path)
            .map(|h| h[..n].to_string())
            .unwrap_or_else(|| "unknown".into())
    }

    /// Write the cache back (best effort: a read-only cache folder only costs time).
    pub fn save(&self) {
        let Some(f) = &self.file else { return };
        if !self.dirty {
            return;
        }
        if let Some(d) = f.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        if let Ok(text) = serde_json::to_string_pretty(&self.entries) {
            let _ = sd_pipeline::output::write_file(f, text);
        }
    }
}
