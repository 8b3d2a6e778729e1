//! Every tensor of a weight file, by name.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::pickle;

/// Tensor name -> shape, sorted by name.
pub type Shapes = BTreeMap<String, Vec<usize>>;

/// The tensors of a file: memory-mapped safetensors, or a pickle read into memory.
pub enum Store {
    Mmap(MmapedSafetensors),
    Mem(HashMap<String, Tensor>),
}

impl Store {
    /// Open a `.safetensors`, `.ckpt`, `.pth`, `.pt` or `.bin` file.
    pub fn open(path: &Path) -> Result<Self> {
        if pickle::is_pickle(path) {
            return pickle::load(path).map(Store::Mem);
        }
        // SAFETY: read-only mapping of a file we do not modify (as every mmap loader).
        let m = unsafe { MmapedSafetensors::new(path) }.map_err(|source| Error::Tensor {
            path: path.to_path_buf(),
            source,
        })?;
        tracing::debug!(path = %path.display(), "memory-mapped a safetensors file");
        Ok(Store::Mmap(m))
    }

    pub fn shapes(&self) -> Shapes {
        match self {
            Store::Mmap(m) => m
                .tensors()
                .into_iter()
                .map(|(k, v)| (k, v.shape().to_vec()))
                .collect(),
            Store::Mem(m) => m
                .iter()
                .map(|(k, t)| (k.clone(), t.dims().to_vec()))
                .collect(),
        }
    }

    pub fn dtypes(&self) -> Vec<(String, DType)> {
        match self {
            Store::Mmap(m) => m
                .tensors()
                .into_iter()
                .filter_map(|(k, v)| Some((k, DType::try_from(v.dtype()).ok()?)))
                .collect(),
            Store::Mem(m) => m.iter().map(|(k, t)| (k.clone(), t.dtype())).collect(),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        match self {
            Store::Mmap(m) => m.get(name).is_ok(),
            Store::Mem(m) => m.contains_key(name),
        }
    }

    /// A tensor on the CPU in its stored dtype.
    pub fn get(&self, name: &str) -> candle_core::Result<Tensor> {
        match self {
            Store::Mmap(m) => m.load(name, &Device::Cpu),
            Store::Mem(m) => m
                .get(name)
                .cloned()
                .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.into() }),
        }
    }
}
