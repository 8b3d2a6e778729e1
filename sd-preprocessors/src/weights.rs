//! Where annotator networks find their weights: a `model` parameter naming a file, or a
//! well-known file name in the annotator folder (`SDCTL_ANNOTATOR_DIR`, default
//! `~/.local/share/sdctl/annotators`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use sd_weights::Store;

use sd_plugins_api::{Params, PluginError};

/// The annotator folder: `SDCTL_ANNOTATOR_DIR`, else the user's data dir + `sdctl/annotators`.
pub fn annotator_dir() -> Option<PathBuf> {
    std::env::var_os("SDCTL_ANNOTATOR_DIR")
        .map(PathBuf::from)
        .or_else(|| dirs::data_dir().map(|d| d.join("sdctl").join("annotators")))
}

/// The weight file for `preprocessor`: the `model` parameter when set (it must exist), else
/// the first of `file_names` found in the annotator folder; otherwise an error that says which
/// file is wanted and where to put it.
pub fn find_weights(
    preprocessor: &str,
    params: &Params,
    file_names: &[&str],
) -> Result<PathBuf, PluginError> {
    find_weights_param(preprocessor, params, "model", file_names)
}

/// [`find_weights`] for a preprocessor with several networks: the weight file named by the
/// parameter `key` (`hand_model`, ...), else the first of `file_names` in the annotator folder.
pub fn find_weights_param(
    preprocessor: &str,
    params: &Params,
    key: &str,
    file_names: &[&str],
) -> Result<PathBuf, PluginError> {
    if let Some(p) = params.str(key).filter(|s| !s.is_empty()) {
        let path = PathBuf::from(p);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(PluginError::failed(
                preprocessor,
                format!("{key} file {} not found", path.display()),
            ))
        };
    }
    let dir = annotator_dir();
    if let Some(d) = &dir {
        for n in file_names {
            let p = d.join(n);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    let place = match &dir {
        Some(d) => d.display().to_string(),
        None => "$SDCTL_ANNOTATOR_DIR".into(),
    };
    Err(PluginError::failed(
        preprocessor,
        format!(
            "needs its weights: put {} in {place} (or set SDCTL_ANNOTATOR_DIR), \
             or pass --param {key}=FILE",
            file_names.join(" or ")
        ),
    ))
}

/// The cache salt of a network preprocessor: its weight file's path, size and modification
/// time (so replacing the weights invalidates cached results); missing weights are the error.
pub fn weights_salt(
    preprocessor: &str,
    params: &Params,
    file_names: &[&str],
) -> Result<String, PluginError> {
    weights_salt_param(preprocessor, params, "model", file_names)
}

/// [`weights_salt`] of the weight file [`find_weights_param`] finds.
pub fn weights_salt_param(
    preprocessor: &str,
    params: &Params,
    key: &str,
    file_names: &[&str],
) -> Result<String, PluginError> {
    let p = find_weights_param(preprocessor, params, key, file_names)?;
    let meta = std::fs::metadata(&p)
        .map_err(|e| PluginError::failed(preprocessor, format!("{}: {e}", p.display())))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Ok(format!("{}|{}|{mtime}", p.display(), meta.len()))
}

/// The tensors of a weights file as f32, named without the `model.` prefix a training
/// checkpoint puts on them (MiDaS's `BaseModel.load` takes `parameters["model"]`), those whose
/// name `keep` accepts. `key` (unprefixed) must be in the file; without it the error says the
/// file is not `what`.
pub fn read_state_dict(
    path: &Path,
    key: &str,
    what: &str,
    keep: impl Fn(&str) -> bool,
) -> Result<HashMap<String, Tensor>, String> {
    let store = Store::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let names = store.names();
    let prefix = ["", "model."]
        .into_iter()
        .find(|p| names.iter().any(|n| *n == format!("{p}{key}")))
        .ok_or_else(|| format!("{}: no tensor `{key}` (not the {what}?)", path.display()))?;
    let mut tensors = HashMap::new();
    for n in &names {
        let Some(k) = n.strip_prefix(prefix) else {
            continue;
        };
        if !keep(k) {
            continue;
        }
        let t = store
            .get(n)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| format!("{}: `{n}`: {e}", path.display()))?;
        tensors.insert(k.to_string(), t);
    }
    Ok(tensors)
}
