//! Every tensor of a weight file, by name.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::pickle;

/// Tensor name -> shape, sorted by name.
pub type Shapes = BTreeMap<String, Vec<usize>>;

/// The tensors of a file: memory-mapped safetensors, tensors in memory, or a pickle archive
/// whose tensors are read (inflated) one by one when asked for.
pub enum Store {
    Mmap(MmapedSafetensors),
    Mem(HashMap<String, Tensor>),
    Pickle(pickle::Archive),
}

impl Store {
    /// Open a `.safetensors`, `.ckpt`, `.pth`, `.pt` or `.bin` file (a pickle's tensor data is
    /// read by [`Store::get`], never for [`Store::shapes`]).
    pub fn open(path: &Path) -> Result<Self> {
        if pickle::is_pickle(path) {
            return pickle::Archive::open(path).map(Store::Pickle);
        }
        // SAFETY: read-only mapping of a file we do not modify (as every mmap loader).
        let m =
            unsafe { MmapedSafetensors::new(path) }.map_err(
                |source| match crate::sniff::describe(path) {
                    Some(message) => Error::Format {
                        path: path.to_path_buf(),
                        message,
                    },
                    None => Error::Tensor {
                        path: path.to_path_buf(),
                        source,
                    },
                },
            )?;
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
            Store::Pickle(a) => a.shapes().into_iter().collect(),
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
            Store::Pickle(a) => a.dtypes(),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        match self {
            Store::Mmap(m) => m.get(name).is_ok(),
            Store::Mem(m) => m.contains_key(name),
            Store::Pickle(a) => a.contains(name),
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
            Store::Pickle(a) => match a.get(name) {
                Ok(Some(t)) => Ok(t),
                Ok(None) => Err(candle_core::Error::CannotFindTensor { path: name.into() }),
                Err(m) => Err(candle_core::Error::Msg(format!(
                    "{}: {m}",
                    a.path().display()
                ))),
            },
        }
    }

    /// Tensor names in order.
    pub fn names(&self) -> Vec<String> {
        self.shapes().into_keys().collect()
    }

    /// The first tensor (by name) holding NaN or infinity, and where: `(name, "NaN at element
    /// 3")`. Reads every tensor: for finding the culprit of a failure, not for every load.
    pub fn first_non_finite(&self) -> candle_core::Result<Option<(String, String)>> {
        for name in self.names() {
            let t = self.get(&name)?;
            if !crate::finite::all_finite(&t)? {
                if let Some(found) = crate::finite::first_non_finite(&t)? {
                    return Ok(Some((name, crate::finite::describe(found))));
                }
            }
        }
        Ok(None)
    }
}
