//! Helpers shared by the fuzz targets: the readers under test take paths, so each input is
//! written to a scratch file first (in /dev/shm where it exists, one per process and target).

use std::path::PathBuf;

/// Write `bytes` to this process's scratch file for `name` (its extension picks the reader)
/// and return its path.
pub fn scratch(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let path = dir.join(format!("sd-fuzz-{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).expect("scratch file");
    path
}
