//! All-or-nothing output: every file is written under a temporary name first and renamed
//! over its target only when all of them were written, so a failure leaves no half-written
//! file and no leftover temporary.

use std::path::{Path, PathBuf};

use crate::error::Result;

/// Output file names: OUT.png, or OUT-0.png, OUT-1.png, ... for batches.
pub fn output_paths(out: &Path, batch: usize) -> Vec<PathBuf> {
    if batch == 1 {
        return vec![out.to_path_buf()];
    }
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let ext = out
        .extension()
        .map(|e| e.to_string_lossy().to_string())
        .unwrap_or_else(|| "png".into());
    (0..batch)
        .map(|i| out.with_file_name(format!("{stem}-{i}.{ext}")))
        .collect()
}

/// Files staged under temporary names (`NAME.EXT.tmp`), renamed into place by [`Staged::commit`];
/// dropped without a commit, the temporaries are removed.
#[derive(Default)]
pub struct Staged {
    files: Vec<(PathBuf, PathBuf)>,
}

impl Staged {
    pub fn new() -> Self {
        Self::default()
    }

    /// Write `target` through its temporary name with `write`.
    pub fn write(&mut self, target: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let ext = target
            .extension()
            .map(|e| format!("{}.tmp", e.to_string_lossy()))
            .unwrap_or_else(|| "tmp".into());
        let tmp = target.with_extension(ext);
        self.files.push((tmp.clone(), target.to_path_buf()));
        write(&tmp)
    }

    /// Rename every staged file over its target.
    pub fn commit(mut self) -> Result<()> {
        let files = std::mem::take(&mut self.files);
        for (i, (tmp, target)) in files.iter().enumerate() {
            if let Err(e) = std::fs::rename(tmp, target) {
                for (left, _) in &files[i..] {
                    let _ = std::fs::remove_file(left);
                }
                return Err(format!("{}: {e}", target.display()).into());
            }
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        for (tmp, _) in &self.files {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Write one file atomically (see [`Staged`]).
pub fn write_atomic(target: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let mut s = Staged::new();
    s.write(target, write)?;
    s.commit()
}
