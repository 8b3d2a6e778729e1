//! The plugin folder: every library in it is loaded at start (`SDCTL_PLUGIN_DIR` or
//! `--plugin-dir`, else `~/.config/sdctl/plugins`). Loading a plugin runs its code in this
//! process: only libraries the user put there themselves are loaded.

use std::path::{Path, PathBuf};

use sd_plugins_api::Registry;

/// `CONFIG_DIR/sdctl/plugins` (e.g. `~/.config/sdctl/plugins`).
pub fn default_dir() -> Option<PathBuf> {
    dirs::config_dir().map(|d| d.join("sdctl").join("plugins"))
}

fn is_library(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("so" | "dylib" | "dll")
    )
}

/// Load every plugin library in `dir` (in name order) into `registry`; a library that fails
/// is skipped, and its error returned among the others.
pub fn load_folder(registry: &mut Registry, dir: &Path) -> Vec<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files
        .into_iter()
        .filter(|f| is_library(f))
        .filter_map(|f| registry.load(&f).err())
        .collect()
}
