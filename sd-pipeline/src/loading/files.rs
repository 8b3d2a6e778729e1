//! Where a model's weights are: the weight files of a diffusers component folder, and the
//! tensor names and shapes of a file without loading it.

use std::path::{Path, PathBuf};

use crate::error::{read_json, Error, Result};

/// The weight files of one component folder, in the order diffusers looks for them.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let stems = ["diffusion_pytorch_model", "model"];
    for stem in stems {
        for variant in ["", ".fp16"] {
            let single = dir.join(format!("{stem}{variant}.safetensors"));
            if single.is_file() {
                return Ok(vec![single]);
            }
            let index = dir.join(format!("{stem}{variant}.safetensors.index.json"));
            if index.is_file() {
                let v: serde_json::Value = read_json(&index)?;
                let map = v
                    .get("weight_map")
                    .and_then(|m| m.as_object())
                    .ok_or_else(|| {
                        Error::config(&index, "no `weight_map` object in the shard index")
                    })?;
                let mut files: Vec<PathBuf> = map
                    .values()
                    .filter_map(|f| f.as_str())
                    .map(|f| dir.join(f))
                    .collect();
                files.sort();
                files.dedup();
                if let Some(missing) = files.iter().find(|f| !f.is_file()) {
                    return Err(Error::config(
                        &index,
                        format!("shard {} is missing", missing.display()),
                    ));
                }
                return Ok(files);
            }
        }
    }
    Err(Error::config(
        dir,
        "no weights found (expected diffusion_pytorch_model[.fp16].safetensors or model[.fp16].safetensors; .bin/.ckpt pickles are not loaded)",
    ))
}

/// Tensor names and shapes of a weight file, sorted by name: a safetensors file from its
/// header alone, a `.ckpt` / `.pth` from its pickle (see [`sd_weights::tensor_shapes`]).
pub fn tensor_shapes(path: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    Ok(sd_weights::tensor_shapes(path)?)
}
