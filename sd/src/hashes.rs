//! Model hashes as A1111 writes them into infotext (`modules/hashes.py`, `sd_models.py`, the
//! Lora extension's `network.py`): "Model hash" the first 10 hex digits of the file's SHA-256
//! (AutoV2); a ControlNet the legacy hash (SHA-256 of the 64 KiB at 1 MiB, 8 digits, as
//! sd-webui-controlnet names models); a LoRA the first 12 digits of its metadata's
//! `sshs_model_hash`, else of the SHA-256 of a safetensors file's tensor data (kohya's "addnet"
//! hash), else of the file. Folders (diffusers layouts, which A1111 does not load) hash their
//! weight files in path order. Full hashes are cached by path, size and mtime as A1111 caches
//! them, so multi-GB checkpoints are read once.

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

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A1111's legacy model hash (`sd_models.model_hash`): the SHA-256 of the 64 KiB at offset
/// 1 MiB, 8 hex digits (a smaller file hashes what is there: nothing, for one under 1 MiB).
pub fn legacy_model_hash(path: &Path) -> Option<String> {
    use std::io::Seek;
    let mut f = std::fs::File::open(path).ok()?;
    f.seek(std::io::SeekFrom::Start(0x100000)).ok()?;
    let mut buf = Vec::with_capacity(0x10000);
    f.take(0x10000).read_to_end(&mut buf).ok()?;
    Some(hex(&Sha256::digest(&buf))[..8].to_string())
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
        Self::open_at(cache_dir().map(|d| d.join("hashes.json")))
    }

    /// The cache in `file` (`None`: in memory only).
    fn open_at(file: Option<PathBuf>) -> Self {
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
        self.cached(key, path, 0)
    }

    /// The SHA-256 of a model file or folder if the cache already holds it for the file as it
    /// is now (same size and mtime); nothing is read but the cache.
    pub fn sha256_if_cached(&self, path: &Path) -> Option<String> {
        let key = path.canonicalize().ok()?.display().to_string();
        let (size, mtime_ns) = stamp(&parts(path))?;
        self.entries
            .get(&key)
            .filter(|e| e.size == size && e.mtime_ns == mtime_ns)
            .map(|e| e.sha256.clone())
    }

    /// A1111's LoRA hash in full: the metadata's `sshs_model_hash`, else the SHA-256 of a
    /// safetensors file's tensor data (after its header), else of the file.
    pub fn lora_sha256(&mut self, path: &Path) -> Option<String> {
        // network.py decides by the extension, as here
        let safetensors = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
        if safetensors && path.is_file() {
            if let Ok((offset, meta)) = sd_weights::safetensors_metadata(path) {
                // a hash, or nothing: the metadata is the file's to say, and goes into infotext
                let given = meta.get("sshs_model_hash").filter(|h| {
                    !h.is_empty() && h.len() <= 64 && h.bytes().all(|b| b.is_ascii_hexdigit())
                });
                if let Some(h) = given {
                    return Some(h.clone());
                }
                let key = format!("addnet:{}", path.canonicalize().ok()?.display());
                return self.cached(key, path, offset as u64);
            }
        }
        self.sha256(path)
    }

    /// The SHA-256 of `path`'s bytes from `skip` on (of a folder's weight files), cached
    /// under `key`.
    fn cached(&mut self, key: String, path: &Path, skip: u64) -> Option<String> {
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
            if skip > 0 {
                std::io::Seek::seek(&mut r, std::io::SeekFrom::Start(skip)).ok()?;
            }
            loop {
                let n = r.read(&mut buf).ok()?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
        }
        let hex = hex(&h.finalize());
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

    /// A1111's "Lora hashes" value for a LoRA file: 12 hex digits, or "unknown".
    pub fn lora_short(&mut self, path: &Path) -> String {
        self.lora_sha256(path)
            .map(|h| h[..h.len().min(12)].to_string())
            .unwrap_or_else(|| "unknown".into())
    }

    /// sd-webui-controlnet's hash of a ControlNet: for a file the legacy model hash, for a
    /// folder the first 8 digits of its SHA-256.
    pub fn controlnet_short(&mut self, path: &Path) -> String {
        if path.is_file() {
            legacy_model_hash(path).unwrap_or_else(|| "unknown".into())
        } else {
            self.short(path, 8)
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A LoRA's metadata is the file's to say and goes into infotext: a `sshs_model_hash` that is
    /// not a hex hash (a line break and a forged field, a long text) is ignored for kohya's
    /// addnet hash of the tensor data.
    #[test]
    fn a_forged_metadata_hash_is_not_taken() {
        let dir = std::env::temp_dir().join(format!("sd-hash-forged-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data = [0u8, 0, 128, 63]; // one f32 1.0
        let write = |name: &str, meta: &str| {
            let header = format!(
                r#"{{"__metadata__":{{"sshs_model_hash":{meta}}},"a":{{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}}}"#
            );
            let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
            bytes.extend(header.as_bytes());
            bytes.extend(data);
            let p = dir.join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        let mut cache = HashCache::open_at(None);
        let addnet = hex(&Sha256::digest(data));
        for (name, meta) in [
            (
                "newline.safetensors",
                serde_json::json!("abc\nSteps: 99").to_string(),
            ),
            (
                "long.safetensors",
                serde_json::json!("a".repeat(100)).to_string(),
            ),
            (
                "words.safetensors",
                serde_json::json!("not a hash").to_string(),
            ),
        ] {
            let p = write(name, &meta);
            assert_eq!(cache.lora_sha256(&p).unwrap(), addnet, "{name}");
        }
        let p = write("good.safetensors", r#""ABCDEF0123""#);
        assert_eq!(cache.lora_short(&p), "ABCDEF0123");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Expected values from hashlib following A1111's code (tests/fixtures/make_hash_fixtures.py).
    #[test]
    fn a1111_hashes_match_hashlib_after_a1111s_code() {
        let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let text = std::fs::read_to_string(fx.join("expected/a1111_hashes.json")).unwrap();
        let expected: BTreeMap<String, BTreeMap<String, serde_json::Value>> =
            serde_json::from_str(&text).unwrap();
        let dir = std::env::temp_dir().join(format!("sd-hash-test-{}", std::process::id()));
        let file = Some(dir.join("hashes.json"));
        let mut cache = HashCache::open_at(file.clone());
        let mut checked = 0;
        for (rel, want) in &expected {
            let p = fx.join(rel);
            assert_eq!(
                std::fs::metadata(&p).unwrap().len(),
                want["size"].as_u64().unwrap(),
                "{rel}: not the file the hashes were made from"
            );
            for (kind, v) in want {
                let got = match kind.as_str() {
                    "sha256" => cache.sha256(&p).unwrap(),
                    "legacy" => cache.controlnet_short(&p),
                    "lora" => cache.lora_short(&p),
                    _ => continue,
                };
                assert_eq!(got, v.as_str().unwrap(), "{rel}: {kind}");
                checked += 1;
            }
        }
        // the legacy hash of a file over 1 MiB reads real bytes; a LoRA's metadata hash wins
        assert!(checked >= 12, "{checked}");
        assert_ne!(
            expected["hashes/controlnet_big.safetensors"]["legacy"],
            "e3b0c442"
        );
        // cached hashes give the same answers
        cache.save();
        let mut again = HashCache::open_at(file);
        assert!(!again.entries.is_empty(), "the cache was written");
        let big = fx.join("hashes/controlnet_big.safetensors");
        assert_eq!(
            again.lora_short(&big),
            expected["hashes/controlnet_big.safetensors"]["lora"]
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
