//! All-or-nothing output: every file is written under a temporary name first and renamed
//! over its target only when all of them were written, so a failure leaves no half-written
//! file and no leftover temporary.

use std::path::{Path, PathBuf};

use crate::error::Result;

/// Output file names: OUT.png, or OUT-0.png, OUT-1.png, ... for batches.
pub fn output_paths(out: &Path, batch: usize) -> Vec<PathBuf> {
    if batch == 1 {
        return vec![out.to_path_buf()];
    }
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let ext = out
        .extension()
        .map(|e| e.to_string_lossy().to_string())
        .unwrap_or_else(|| "png".into());
    (0..batch)
        .map(|i| out.with_file_name(format!("{stem}-{i}.{ext}")))
        .collect()
}

/// What a non-regular file is, for messages.
fn file_kind(t: std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_dir() {
        "a folder"
    } else {
        "not a regular file"
    }
}

/// Outputs replace only regular files: `path` must not exist, or be a regular file (a
/// symlink is followed and its target checked; a dangling one is replaced). A FIFO, device,
/// socket or folder is refused, as the rename that puts an output in place would replace it.
/// The message names the path; callers add the flag.
pub fn check_output_target(path: &Path) -> std::result::Result<(), String> {
    check_target(path, false)
}

/// As [`check_output_target`], for outputs that may be a file or a folder (a model written
/// as a diffusers folder): only FIFOs, devices and sockets are refused.
pub fn check_output_target_or_dir(path: &Path) -> std::result::Result<(), String> {
    check_target(path, true)
}

fn check_target(path: &Path, dir_ok: bool) -> std::result::Result<(), String> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() || (dir_ok && m.is_dir()) => Ok(()),
        Ok(m) => Err(format!(
            "{}: exists and is {}; outputs are written only as new or regular files",
            path.display(),
            file_kind(m.file_type())
        )),
        // nothing there, or a dangling symlink (the rename replaces the link itself)
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Files staged under temporary names (`NAME.EXT.tmp`), renamed into place by [`Staged::commit`];
/// dropped without a commit, the temporaries are removed.
#[derive(Default)]
pub struct Staged {
    files: Vec<(PathBuf, PathBuf)>,
}

impl Staged {
    pub fn new() -> Self {
        Self::default()
    }

    /// Write `target` through its temporary name with `write`. A target (or temporary name)
    /// that exists and is not a regular file is refused (see [`check_output_target`]).
    pub fn write(&mut self, target: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        check_output_target(target)?;
        let ext = target
            .extension()
            .map(|e| format!("{}.tmp", e.to_string_lossy()))
            .unwrap_or_else(|| "tmp".into());
        let tmp = target.with_extension(ext);
        // a leftover temporary that is a symlink, FIFO or device is not written through
        if tmp.symlink_metadata().is_ok_and(|m| !m.is_file()) {
            return Err(format!(
                "{}: temporary name exists and is not a regular file",
                tmp.display()
            )
            .into());
        }
        self.files.push((tmp.clone(), target.to_path_buf()));
        write(&tmp)
    }

    /// Rename every staged file over its target.
    pub fn commit(mut self) -> Result<()> {
        let files = std::mem::take(&mut self.files);
        for (i, (tmp, target)) in files.iter().enumerate() {
            if let Err(e) = std::fs::rename(tmp, target) {
                for (left, _) in &files[i..] {
                    let _ = std::fs::remove_file(left);
                }
                return Err(format!("{}: {e}", target.display()).into());
            }
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        for (tmp, _) in &self.files {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Write one file atomically (see [`Staged`]).
pub fn write_atomic(target: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let mut s = Staged::new();
    s.write(target, write)?;
    s.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A FIFO (or any non-regular file) is never replaced by an output.
    #[cfg(unix)]
    #[test]
    fn staged_write_refuses_a_fifo() {
        let d = std::env::temp_dir().join(format!("sd-output-fifo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let fifo = d.join("out.png");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if !made.is_ok_and(|s| s.success()) {
            return; // no mkfifo here
        }
        let e = write_atomic(&fifo, |tmp| {
            std::fs::write(tmp, b"x").map_err(|e| e.to_string().into())
        })
        .unwrap_err();
        assert!(e.to_string().contains("a FIFO"), "{e}");
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
        assert!(!d.join("out.png.tmp").exists());
        assert!(check_output_target(Path::new("/dev/null")).is_err());
        assert!(check_output_target_or_dir(&d).is_ok());
        assert!(check_output_target(&d).is_err());
        assert!(check_output_target(&d.join("new.png")).is_ok());
        let _ = std::fs::remove_dir_all(&d);
    }
}
