//! Training config files: a TOML, YAML or JSON file layered under the flags, its relative paths
//! taken against its folder, and the files the settings name checked before training starts.

use std::path::Path;

use figment::providers::{Format, Json, Serialized, Toml, Yaml};
use figment::value::{Dict, Value};
use figment::{Figment, Source};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::base::BaseTrainConfig;
use crate::control::TrainConfig;
use crate::error::{Result, TrainError};

/// The keys of [`TrainConfig`] that hold paths.
pub const CONTROLNET_PATH_KEYS: &[&str] = &[
    "base",
    "controlnet",
    "adapter",
    "dataset",
    "output",
    "validation_image",
];

/// The keys of [`BaseTrainConfig`] that hold paths.
pub const BASE_PATH_KEYS: &[&str] = &["model", "dataset", "output"];

fn invalid(message: String) -> TrainError {
    TrainError::Invalid(message)
}

/// The flags as a dictionary of the ones given (fields that serialize to none are left out,
/// so they don't override the file).
fn given(flags: &impl Serialize) -> Result<Dict> {
    let value = Value::serialize(flags).map_err(|e| invalid(format!("training settings: {e}")))?;
    let mut dict = value.into_dict().unwrap_or_default();
    dict.retain(|_, v| !matches!(v, Value::Empty(..)));
    Ok(dict)
}

/// The settings from the config `file` (`.toml`, `.yaml`/`.yml` or `.json`), if any, with the
/// `flags` over it (a struct or map of the config's keys; `None` fields count as not given).
/// Relative paths under `path_keys` that come from the file are taken against its folder.
pub fn layered<C: DeserializeOwned>(
    file: Option<&Path>,
    flags: &impl Serialize,
    path_keys: &[&str],
) -> Result<C> {
    let mut fig = Figment::new();
    if let Some(path) = file {
        if !path.exists() {
            return Err(invalid(format!("--config {}: not found", path.display())));
        }
        // a regular file, bounded in size and nesting, before a parser sees it
        sd_plugins_api::config_text::read_config(path)
            .map_err(|e| invalid(format!("--config {e}")))?;
        fig = match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => fig.merge(Toml::file_exact(path)),
            Some("yaml" | "yml") => fig.merge(Yaml::file_exact(path)),
            Some("json") => fig.merge(Json::file_exact(path)),
            _ => {
                return Err(invalid(format!(
                    "--config {}: use .toml, .yaml or .json",
                    path.display()
                )))
            }
        };
    }
    let mut fig = fig.merge(Serialized::defaults(given(flags)?));
    for key in path_keys {
        let Some(md) = fig.find_metadata(key).cloned() else {
            continue;
        };
        if let (Some(Source::File(file)), Ok(v)) = (md.source, fig.find_value(key)) {
            if let (Some(s), Some(dir)) = (v.as_str(), file.parent()) {
                let p = Path::new(s);
                if p.is_relative() {
                    fig = fig.merge(Serialized::default(key, dir.join(p)));
                }
            }
        }
    }
    fig.extract().map_err(|e| {
        invalid(format!(
            "training settings: {}",
            sd_plugins_api::config_text::short_message(&e.to_string(), 8)
        ))
    })
}

/// "KEY PATH: not found" for the first named path that does not exist.
fn check_exist<'a>(paths: impl IntoIterator<Item = (&'a str, Option<&'a Path>)>) -> Result<()> {
    for (key, p) in paths {
        if let Some(p) = p.filter(|p| !p.exists()) {
            return Err(invalid(format!("{key} {}: not found", p.display())));
        }
    }
    Ok(())
}

/// `train controlnet|t2i-adapter` settings ([`layered`] over [`CONTROLNET_PATH_KEYS`]), with
/// the base, dataset, starting network and validation image they name checked to exist.
pub fn controlnet_config(file: Option<&Path>, flags: &impl Serialize) -> Result<TrainConfig> {
    let cfg: TrainConfig = layered(file, flags, CONTROLNET_PATH_KEYS)?;
    check_exist([
        ("base", Some(cfg.base.as_path())),
        ("dataset", Some(cfg.dataset.as_path())),
        ("controlnet", cfg.controlnet.as_deref()),
        ("adapter", cfg.adapter.as_deref()),
        ("validation_image", cfg.validation_image.as_deref()),
    ])?;
    Ok(cfg)
}

/// `train vae|unet` settings ([`layered`] over [`BASE_PATH_KEYS`]), with the model and dataset
/// checked to exist and the output checked not to.
pub fn base_config(file: Option<&Path>, flags: &impl Serialize) -> Result<BaseTrainConfig> {
    let cfg: BaseTrainConfig = layered(file, flags, BASE_PATH_KEYS)?;
    check_exist([
        ("model", Some(cfg.model.as_path())),
        ("dataset", Some(cfg.dataset.as_path())),
    ])?;
    if cfg.output.exists() {
        return Err(invalid(format!(
            "output {}: already exists; choose a new folder",
            cfg.output.display()
        )));
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sd-train-config-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("sub")).unwrap();
        d
    }

    #[test]
    fn file_paths_are_relative_to_the_file_and_flags_win() {
        let d = scratch("layer");
        let file = d.join("sub/c.toml");
        std::fs::write(
            &file,
            "base = \"m\"\ndataset = \"/abs/data\"\noutput = \"o\"\nmax_steps = 3\nseed = 7\n",
        )
        .unwrap();
        let mut flags = BTreeMap::new();
        flags.insert("seed", Some(9u64));
        flags.insert("batch_size", None);
        let cfg: TrainConfig = layered(Some(&file), &flags, CONTROLNET_PATH_KEYS).unwrap();
        assert_eq!(cfg.base, d.join("sub/m"));
        assert_eq!(cfg.output, d.join("sub/o"));
        assert_eq!(cfg.dataset, PathBuf::from("/abs/data"));
        assert_eq!((cfg.max_steps, cfg.seed, cfg.batch_size), (3, 9, 1));
        // paths given as flags are left as they are
        let mut flags = BTreeMap::new();
        flags.insert("output", "rel");
        let cfg: TrainConfig = layered(Some(&file), &flags, CONTROLNET_PATH_KEYS).unwrap();
        assert_eq!(cfg.output, PathBuf::from("rel"));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn errors_name_the_file_and_key() {
        let d = scratch("errors");
        let none = BTreeMap::<String, String>::new();
        let missing = d.join("nope.toml");
        let e = layered::<TrainConfig>(Some(&missing), &none, &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("--config {}: not found", missing.display())
        );
        let txt = d.join("c.txt");
        std::fs::write(&txt, "").unwrap();
        let e = layered::<TrainConfig>(Some(&txt), &none, &[]).unwrap_err();
        assert!(
            e.to_string().ends_with(": use .toml, .yaml or .json"),
            "{e}"
        );
        let yaml = d.join("sub/b.yaml");
        std::fs::write(
            &yaml,
            "model: nomodel\ndataset: d\noutput: o\nmax_train_steps: 1\n",
        )
        .unwrap();
        let e = base_config(Some(&yaml), &none).unwrap_err();
        let want = format!("model {}: not found", d.join("sub/nomodel").display());
        assert_eq!(e.to_string(), want);
        std::fs::write(&yaml, "max_train_steps: 1\nlearning_rte: 1\n").unwrap();
        let e = base_config(Some(&yaml), &none).unwrap_err().to_string();
        assert!(
            e.starts_with("training settings: ") && e.contains("learning_rte"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}
