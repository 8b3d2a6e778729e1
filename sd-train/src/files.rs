//! File helpers the trainers share: I/O errors naming their path, JSON and weight files, and
//! weights turned into trainable variables (atomic writes are `sd_pipeline::output`'s).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use sd_pipeline::loading::files::weight_files;
use serde_json::Value;

use crate::error::{Result, TrainError};

/// An I/O error as a [`TrainError::File`] naming `p`.
pub(crate) fn io_err(p: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |e| TrainError::file(p, e.to_string())
}

pub(crate) fn read_json(p: &Path) -> Result<Value> {
    serde_json::from_str(
        &sd_plugins_api::input_file::read_text(p).map_err(|e| TrainError::file(p, e))?,
    )
    .map_err(|e| TrainError::file(p, e.to_string()))
}

pub(crate) fn save_weights(w: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    candle_core::safetensors::save(w, path).map_err(|e| TrainError::weights(path, e))
}

/// A safetensors file as it is stored (no conversion).
pub(crate) fn load_raw(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| TrainError::weights(path, e))
}

/// A safetensors file's tensors in f32.
pub(crate) fn load_weights(path: &Path) -> Result<HashMap<String, Tensor>> {
    load_raw(path)?
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
        .collect()
}

/// Every weight file of a component folder, in f32.
pub(crate) fn weights_of(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for f in weight_files(dir)? {
        out.extend(load_weights(&f)?);
    }
    Ok(out)
}

/// Named variables, and the same tensors by name for a VarBuilder.
pub(crate) type VarsAndTensors = (Vec<(String, Var)>, HashMap<String, Tensor>);

/// Every weight as a trainable variable (sorted by name), and the variables' tensors by name.
pub(crate) fn vars_from(weights: HashMap<String, Tensor>) -> Result<VarsAndTensors> {
    let mut vars = Vec::new();
    let mut tensors = HashMap::new();
    for (k, t) in weights {
        let v = Var::from_tensor(&t)?;
        tensors.insert(k.clone(), v.as_tensor().clone());
        vars.push((k, v));
    }
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((vars, tensors))
}
