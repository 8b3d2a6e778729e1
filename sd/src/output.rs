//! Output names, and all-or-nothing writing: [`Staged`] and [`write_atomic`] are
//! `sd_pipeline::output`'s (every file is written under a temporary name first and renamed
//! over its target only when all of them were written, so a failure leaves no half-written
//! file and no leftover temporary).

use std::path::{Path, PathBuf};

pub use sd_pipeline::output::{
    check_output_target, check_output_target_or_dir, write_atomic, Staged,
};

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
