//! Files named by users (flags, configs, prompts, requests) are checked here before they are
//! opened: only regular files are read. A FIFO would block `open` forever, a device such as
//! `/dev/zero` never ends, a folder or a symlink loop would otherwise surface as a bare
//! "no such file". Every reader of a user-named input goes through [`check`] or the
//! readers below; errors name the path and what was expected.

use std::fs::{File, Metadata};
use std::io::Read;
use std::path::Path;

/// The most bytes [`read_to_string`] reads: text inputs (configs, JSON, sidecars, pose
/// files, prompts from files) are small; anything larger is refused rather than read.
pub const MAX_TEXT_BYTES: u64 = 64 << 20;

/// Why a path is not a readable regular file, in words (without the path).
pub fn problem(path: &Path) -> Option<String> {
    match std::fs::metadata(path) {
        Ok(meta) => not_regular(&meta),
        Err(e) => Some(io_words(&e)),
    }
}

/// `Err("PATH: what is wrong")` unless `path` is a regular file (symlinks followed).
pub fn check(path: &Path) -> Result<Metadata, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("{}: {}", path.display(), io_words(&e)))?;
    match not_regular(&meta) {
        Some(why) => Err(format!("{}: {why}", path.display())),
        None => Ok(meta),
    }
}

/// As [`check`], for inputs that may be a regular file or a folder (a model: a single file or
/// a diffusers folder): FIFOs, devices, sockets and symlink loops are refused.
pub fn check_file_or_folder(path: &Path) -> Result<Metadata, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("{}: {}", path.display(), io_words(&e)))?;
    if meta.is_dir() {
        return Ok(meta);
    }
    match not_regular(&meta) {
        Some(why) => Err(format!(
            "{}: {}",
            path.display(),
            why.replace("regular file", "regular file or folder")
        )),
        None => Ok(meta),
    }
}

/// Open a regular file for reading, after [`check`].
pub fn open(path: &Path) -> Result<File, String> {
    check(path)?;
    File::open(path).map_err(|e| format!("{}: {}", path.display(), io_words(&e)))
}

/// Read a whole regular file of at most `max` bytes.
pub fn read_limited(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    let meta = check(path)?;
    if meta.len() > max {
        return Err(format!(
            "{}: the file is {} bytes, more than the {} bytes this reads",
            path.display(),
            meta.len(),
            max
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    File::open(path)
        .and_then(|f| f.take(max + 1).read_to_end(&mut bytes))
        .map_err(|e| format!("{}: {}", path.display(), io_words(&e)))?;
    if bytes.len() as u64 > max {
        return Err(format!(
            "{}: the file grew past {max} bytes while it was read",
            path.display()
        ));
    }
    Ok(bytes)
}

/// Read a whole text file (UTF-8, at most [`MAX_TEXT_BYTES`]).
pub fn read_to_string(path: &Path) -> Result<String, String> {
    let bytes = read_limited(path, MAX_TEXT_BYTES)?;
    String::from_utf8(bytes).map_err(|e| {
        format!(
            "{}: not a text file (invalid UTF-8 at byte {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// [`read_to_string`] for callers whose own errors name the file: the error is the words
/// alone ("is a named pipe (FIFO), not a regular file").
pub fn read_text(path: &Path) -> Result<String, String> {
    read_to_string(path).map_err(|e| {
        let named = format!("{}: ", path.display());
        e.strip_prefix(&named).map(str::to_string).unwrap_or(e)
    })
}

fn not_regular(meta: &Metadata) -> Option<String> {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    let what = if t.is_file() {
        return None;
    } else if t.is_dir() {
        "is a folder"
    } else if t.is_fifo() {
        "is a named pipe (FIFO)"
    } else if t.is_char_device() {
        "is a character device"
    } else if t.is_block_device() {
        "is a block device"
    } else if t.is_socket() {
        "is a socket"
    } else {
        "is a special file"
    };
    Some(format!("{what}, not a regular file"))
}

/// An I/O error in words: the common cases spelled out (ELOOP is not a stable `ErrorKind`).
pub fn io_words(e: &std::io::Error) -> String {
    const ELOOP: i32 = 40;
    match (e.kind(), e.raw_os_error()) {
        (_, Some(ELOOP)) => "a loop of symbolic links".into(),
        (std::io::ErrorKind::NotFound, _) => "no such file or folder".into(),
        (std::io::ErrorKind::PermissionDenied, _) => "permission denied".into(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_files_are_named_for_what_they_are() {
        let dir = std::env::temp_dir().join(format!("sd-input-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("pipe");
        let _ = std::fs::remove_file(&fifo);
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let e = read_to_string(&fifo).unwrap_err();
        assert!(e.contains("named pipe (FIFO), not a regular file"), "{e}");
        let e = read_to_string(&dir).unwrap_err();
        assert!(e.contains("is a folder"), "{e}");
        let e = read_to_string(Path::new("/dev/zero")).unwrap_err();
        assert!(e.contains("character device"), "{e}");
        let a = dir.join("a");
        let b = dir.join("b");
        let _ = std::fs::remove_file(&a);
        let _ = std::fs::remove_file(&b);
        std::os::unix::fs::symlink(&b, &a).unwrap();
        std::os::unix::fs::symlink(&a, &b).unwrap();
        let e = read_to_string(&a).unwrap_err();
        assert!(e.contains("loop of symbolic links"), "{e}");
        let e = read_to_string(&dir.join("missing")).unwrap_err();
        assert!(e.contains("no such file"), "{e}");
        assert_eq!(
            read_text(&fifo).unwrap_err(),
            "is a named pipe (FIFO), not a regular file"
        );
        let big = dir.join("big");
        std::fs::write(&big, vec![b'x'; 100]).unwrap();
        let e = read_limited(&big, 10).unwrap_err();
        assert!(e.contains("100 bytes"), "{e}");
        assert_eq!(read_limited(&big, 100).unwrap().len(), 100);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
