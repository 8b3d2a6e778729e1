//! Finding an upscaler model (ESRGAN / Real-ESRGAN) by name in an upscaler folder, as A1111
//! lists them (file stems, plus its names for the Real-ESRGAN releases), or by path.

use std::path::{Component, Path, PathBuf};

/// The weight files an upscaler folder is searched for, in this order.
pub const EXTENSIONS: [&str; 5] = ["safetensors", "pth", "pt", "ckpt", "bin"];

/// A1111's names for the Real-ESRGAN releases (`modules/realesrgan_model.py`) and their files.
const A1111_NAMES: [(&str, &str); 3] = [
    ("R-ESRGAN 4x+", "RealESRGAN_x4plus"),
    ("R-ESRGAN 4x+ Anime6B", "RealESRGAN_x4plus_anime_6B"),
    ("R-ESRGAN General 4xV3", "realesr-general-x4v3"),
];

/// The upscaler `name` names: a file `dir/NAME.{safetensors,pth,...}` (NAME a file stem, with
/// or without its extension, or one of A1111's Real-ESRGAN names), or, without a folder, a
/// path. Errors say what the folder holds.
pub fn resolve(name: &str, dir: Option<&Path>) -> Result<PathBuf, String> {
    let Some(dir) = dir else {
        let p = PathBuf::from(name);
        return match sd_plugins_api::input_file::check(&p) {
            Ok(_) => Ok(p),
            Err(e) => Err(format!(
                "{e} (give an upscaler file, or its name with an upscaler folder)"
            )),
        };
    };
    let name = A1111_NAMES
        .iter()
        .find(|(a, _)| a.eq_ignore_ascii_case(name.trim()))
        .map_or(name, |(_, file)| file);
    let single = {
        let mut c = Path::new(name).components();
        matches!((c.next(), c.next()), (Some(Component::Normal(_)), None))
    };
    if name.is_empty() || !single {
        return Err(format!(
            "{name:?}: a file name inside {} (no folders)",
            dir.display()
        ));
    }
    if !dir.is_dir() {
        return Err(format!("upscaler folder {}: not a folder", dir.display()));
    }
    let exact = dir.join(name);
    let has_ext = Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
    let found = if has_ext && exact.is_file() {
        Some(exact)
    } else {
        EXTENSIONS
            .iter()
            .map(|e| dir.join(format!("{name}.{e}")))
            .find(|p| p.is_file())
    };
    if let Some(p) = found {
        sd_plugins_api::input_file::check(&p)?;
        return Ok(p);
    }
    let names = available(dir);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let hint = match sd_plugins_api::params::closest(name, &refs) {
        Some(c) => format!(" (did you mean `{c}`?)"),
        None if names.is_empty() => " (it holds no .safetensors or .pth files)".into(),
        None => format!(" (available: {})", names.join(", ")),
    };
    Err(format!(
        "{name}: no upscaler of that name in {}{hint}",
        dir.display()
    ))
}

/// The upscaler names in `dir` (file stems of weight files), sorted.
pub fn available(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        })
        .filter_map(|p| Some(p.file_stem()?.to_string_lossy().into_owned()))
        .collect();
    v.sort();
    v.dedup();
    v
}
