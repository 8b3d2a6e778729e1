//! Preprocessor results cached by content: the hash of (image, preprocessor, version,
//! parameters), so repeated generations with the same control input do not recompute it.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::params::json::params_to_json;
use crate::params::Params;
use crate::preprocess::{ImageBuf, PluginError, Preprocessor};

/// A folder of cached results (`SDCTL_CACHE_DIR/preprocessed`, by default under the user's
/// cache folder).
#[derive(Debug, Clone)]
pub struct PreprocessCache {
    pub dir: PathBuf,
}

impl PreprocessCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn key(p: &dyn Preprocessor, input: &ImageBuf, params: &Params, salt: &str) -> String {
        let mut h = Sha256::new();
        h.update(p.name().as_bytes());
        h.update([0]);
        h.update(p.version().as_bytes());
        h.update([0]);
        h.update(salt.as_bytes());
        h.update([0]);
        h.update(params_to_json(params).as_bytes());
        h.update((input.width as u64).to_le_bytes());
        h.update((input.height as u64).to_le_bytes());
        h.update((input.channels as u64).to_le_bytes());
        h.update(&input.data);
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.bin"))
    }

    fn read(path: &Path) -> Option<ImageBuf> {
        let bytes = std::fs::read(path).ok()?;
        let word = |i: usize| -> Option<usize> {
            Some(u64::from_le_bytes(bytes.get(i..i + 8)?.try_into().ok()?) as usize)
        };
        ImageBuf::new(word(0)?, word(8)?, word(16)?, bytes.get(24..)?.to_vec()).ok()
    }

    /// The preprocessor's output, from the cache when it has it (a damaged entry is
    /// recomputed). Writing is best effort: a read-only cache only costs time.
    pub fn run(
        &self,
        p: &dyn Preprocessor,
        input: &ImageBuf,
        params: &Params,
    ) -> Result<(ImageBuf, bool), PluginError> {
        // what else the result depends on (a network's weight file); its errors (missing
        // weights) are reported even when an older result is cached
        let salt = p.cache_salt(params)?;
        let key = Self::key(p, input, params, &salt);
        let path = self.path(&key);
        if let Some(img) = Self::read(&path) {
            return Ok((img, true));
        }
        let out = p.process(input, params)?;
        let mut bytes = Vec::with_capacity(24 + out.data.len());
        for v in [out.width, out.height, out.channels] {
            bytes.extend((v as u64).to_le_bytes());
        }
        bytes.extend(&out.data);
        if std::fs::create_dir_all(&self.dir).is_ok() {
            let tmp = path.with_extension("tmp");
            if std::fs::write(&tmp, bytes).is_ok() {
                let _ = std::fs::rename(&tmp, &path);
            }
        }
        Ok((out, false))
    }
}
