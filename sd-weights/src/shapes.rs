//! Names and shapes of a weight file's tensors, without reading the tensors.

use std::path::Path;

use safetensors::SafeTensors;

use crate::error::{Error, Result};
use crate::pickle;

/// Tensor names and shapes of a weight file, sorted by name: for safetensors from its header
/// alone (the file is memory-mapped and only the header is parsed), for a `.ckpt` / `.pth`
/// from the pickle's tensor records (after the safety scan of [`pickle`]).
pub fn tensor_shapes(path: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    if pickle::is_pickle(path) {
        return pickle::shapes(path);
    }
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: a read-only mapping of a file we do not modify; like every mmap-based loader, we
    // rely on it not being modified while the map is alive (only for this call).
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let (_, metadata) =
        SafeTensors::read_metadata(&mmap).map_err(|source| match crate::sniff::not_safetensors(
            &mmap[..mmap.len().min(64)],
        ) {
            Some(message) => Error::Format {
                path: path.to_path_buf(),
                message,
            },
            None => Error::Safetensors {
                path: path.to_path_buf(),
                source,
            },
        })?;
    let mut out: Vec<(String, Vec<usize>)> = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| (name, info.shape.clone()))
        .collect();
    out.sort();
    tracing::debug!(path = %path.display(), tensors = out.len(), "read a safetensors header");
    Ok(out)
}

/// Where a safetensors file's tensor data starts (8 + the header's length) and its
/// `__metadata__` strings, from the header alone.
pub fn safetensors_metadata(
    path: &Path,
) -> Result<(usize, std::collections::HashMap<String, String>)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: as in `tensor_shapes`: a read-only map, alive only for this call
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let (n, metadata) = SafeTensors::read_metadata(&mmap).map_err(|source| Error::Safetensors {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((8 + n, metadata.metadata().clone().unwrap_or_default()))
}
