//! All-or-nothing output, the one implementation every writer of the workspace uses: a file is
//! written under a temporary name beside its target and renamed over it only when complete;
//! several files are staged and renamed together; a folder is built under a hidden staging
//! name beside its target and renamed into place. A failure (or a value dropped before its
//! commit) leaves no temporary and no half-written target.
//!
//! Names: a file `NAME.EXT` is written as `NAME.EXT.tmp`; a folder `NAME` is staged as
//! `.NAME.partial` (`.NAME.partial-PID` with [`StagedDir::per_process`]).
//!
//! The writers are generic over their error `E` (anything a [`crate::Error`] converts into), so
//! a caller keeps its own messages; a failed rename is an [`Error::Io`] naming the target.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The temporaries and staging folders of this process that exist now (registered when
/// created, removed from the set when committed or cleaned up): what [`remove_temporaries`]
/// removes when the process is interrupted, as `Drop` does not run then.
static LIVE: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

fn live() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

fn register(p: &Path) {
    live().push(p.to_path_buf());
}

fn unregister(p: &Path) {
    let mut l = live();
    if let Some(i) = l.iter().rposition(|q| q == p) {
        l.swap_remove(i);
    }
}

/// Remove every temporary file and staging folder this process has open now: for a signal
/// handler that ends the process (SIGINT, SIGTERM), where no `Drop` runs. Other threads may
/// still be writing into a staging folder, so each removal is retried a few times; the set
/// stays locked afterwards until the process exits, so no new temporary is registered.
/// Returns the paths removed.
pub fn remove_temporaries() -> Vec<PathBuf> {
    let l = live();
    let paths = l.clone();
    remove_all(&paths);
    // keep the lock: a writer about to register a new temporary waits until the exit
    std::mem::forget(l);
    paths
}

/// Remove these files and folders, a few times over while a writer may still add to them.
fn remove_all(paths: &[PathBuf]) {
    for _ in 0..5 {
        for p in paths {
            remove_any(p);
        }
        if paths.iter().all(|p| p.symlink_metadata().is_err()) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// The temporary name `target` is written under: `NAME.EXT.tmp` (`NAME.tmp` without an
/// extension), beside it.
pub fn temporary_file(target: &Path) -> PathBuf {
    let ext = target
        .extension()
        .map(|e| format!("{}.tmp", e.to_string_lossy()))
        .unwrap_or_else(|| "tmp".into());
    target.with_extension(ext)
}

/// A hidden sibling of `target` named `.NAME.SUFFIX`.
fn hidden_sibling(target: &Path, suffix: &str) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}.{suffix}"))
}

/// Remove a file or a folder tree, ignoring errors (cleanup after a failure).
fn remove_any(p: &Path) {
    if p.is_dir() {
        let _ = std::fs::remove_dir_all(p);
    } else {
        let _ = std::fs::remove_file(p);
    }
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

/// Files staged under temporary names ([`temporary_file`]), renamed into place together by
/// [`Staged::commit`]; dropped without a commit, the temporaries are removed.
#[derive(Default)]
pub struct Staged {
    files: Vec<(PathBuf, PathBuf)>,
}

impl Staged {
    pub fn new() -> Self {
        Self::default()
    }

    /// Write `target` through its temporary name with `write` (which gets the temporary path).
    pub fn write<E: From<Error>>(
        &mut self,
        target: &Path,
        write: impl FnOnce(&Path) -> Result<(), E>,
    ) -> Result<(), E> {
        check_output_target(target).map_err(Error::Invalid)?;
        let tmp = temporary_file(target);
        // a leftover temporary that is a symlink, FIFO or device is not written through
        if tmp.symlink_metadata().is_ok_and(|m| !m.is_file()) {
            return Err(Error::Invalid(format!(
                "{}: temporary name exists and is not a regular file",
                tmp.display()
            ))
            .into());
        }
        register(&tmp);
        self.files.push((tmp.clone(), target.to_path_buf()));
        write(&tmp)
    }

    /// Rename every staged file over its target. If one rename fails, the temporaries left are
    /// removed and so are the targets already renamed: all of the set is committed or none.
    pub fn commit(mut self) -> Result<()> {
        let files = std::mem::take(&mut self.files);
        for (i, (tmp, target)) in files.iter().enumerate() {
            if let Err(e) = std::fs::rename(tmp, target) {
                for (left, _) in &files[i..] {
                    let _ = std::fs::remove_file(left);
                }
                for (_, done) in &files[..i] {
                    let _ = std::fs::remove_file(done);
                }
                files.iter().for_each(|(tmp, _)| unregister(tmp));
                return Err(Error::io(target, e));
            }
        }
        files.iter().for_each(|(tmp, _)| unregister(tmp));
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        for (tmp, _) in &self.files {
            let _ = std::fs::remove_file(tmp);
            unregister(tmp);
        }
    }
}

/// Write one file atomically: `write` writes the temporary path, which is then renamed over
/// `target` (see [`Staged`]).
pub fn write_atomic<E: From<Error>>(
    target: &Path,
    write: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    let mut s = Staged::new();
    s.write(target, write)?;
    Ok(s.commit()?)
}

/// Write `contents` to `target` atomically; an error names `target`.
pub fn write_file(target: &Path, contents: impl AsRef<[u8]>) -> Result<()> {
    write_atomic(target, |tmp| {
        std::fs::write(tmp, contents.as_ref()).map_err(|e| Error::io(target, e))
    })
}

/// A folder built under a hidden staging name beside its target (`.NAME.partial`) and renamed
/// into place by [`StagedDir::commit`] or [`StagedDir::commit_replacing`]; dropped without a
/// commit (an error on the way), the staging folder is removed.
pub struct StagedDir {
    stage: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl StagedDir {
    /// Stage `target` in `.NAME.partial` (a stale one, from a run that was killed, is removed
    /// first); the staging folder is created empty.
    pub fn new(target: &Path) -> Result<Self> {
        Self::at(target, hidden_sibling(target, "partial"))
    }

    /// Stage `target` in `.NAME.partial-PID`: for writers that may race another process for
    /// the same target (the first rename wins; see [`StagedDir::commit`]).
    pub fn per_process(target: &Path) -> Result<Self> {
        let suffix = format!("partial-{}", std::process::id());
        Self::at(target, hidden_sibling(target, &suffix))
    }

    fn at(target: &Path, stage: PathBuf) -> Result<Self> {
        let _ = std::fs::remove_dir_all(&stage);
        register(&stage);
        let s = Self {
            stage,
            target: target.to_path_buf(),
            committed: false,
        };
        std::fs::create_dir_all(&s.stage).map_err(|e| Error::io(&s.stage, e))?;
        Ok(s)
    }

    /// The staging folder to write into.
    pub fn path(&self) -> &Path {
        &self.stage
    }

    /// Where the folder goes on commit.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Rename the staging folder to the target, which must not exist (or be an empty folder);
    /// on error the staging folder is removed.
    pub fn commit(mut self) -> Result<PathBuf> {
        std::fs::rename(&self.stage, &self.target).map_err(|e| Error::io(&self.target, e))?;
        self.committed = true;
        unregister(&self.stage);
        Ok(self.target.clone())
    }

    /// Rename the staging folder to the target, replacing an existing one: the old target is
    /// moved aside (`.NAME.old`) first, put back if the rename fails, and removed after.
    pub fn commit_replacing(mut self) -> Result<PathBuf> {
        let old = hidden_sibling(&self.target, "old");
        remove_any(&old);
        let had = self.target.symlink_metadata().is_ok();
        if had {
            std::fs::rename(&self.target, &old).map_err(|e| Error::io(&self.target, e))?;
        }
        if let Err(e) = std::fs::rename(&self.stage, &self.target) {
            if had {
                let _ = std::fs::rename(&old, &self.target);
            }
            return Err(Error::io(&self.target, e));
        }
        self.committed = true;
        unregister(&self.stage);
        remove_any(&old);
        Ok(self.target.clone())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.stage);
            unregister(&self.stage);
        }
    }
}

/// Build the folder `target` atomically: `write` fills the staging folder ([`StagedDir::new`]),
/// which is then renamed into place ([`StagedDir::commit`]); on error it is removed.
pub fn write_dir<E: From<Error>>(
    target: &Path,
    write: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    let stage = StagedDir::new(target)?;
    write(stage.path())?;
    stage.commit()?;
    Ok(())
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
            std::fs::write(tmp, b"x").map_err(|e| Error::io(tmp, e))
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

    /// A fresh empty folder for one test.
    fn scratch(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("sd-pipeline-output-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn entries(d: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    }

    fn failing(tmp: &Path) -> Result<()> {
        std::fs::write(tmp, b"half").map_err(|e| Error::io(tmp, e))?;
        Err(Error::Invalid("the writer failed".into()))
    }

    /// Temporaries and staging folders are listed while they exist (what a signal handler
    /// removes), and leave the list when committed or dropped.
    #[test]
    fn live_temporaries_are_listed_until_done() {
        let d = scratch("live");
        let target = d.join("a.png");
        let tmp = temporary_file(&target);
        let mut s = Staged::new();
        s.write(&target, |t| -> Result<()> {
            std::fs::write(t, b"x").map_err(|e| Error::io(t, e))
        })
        .unwrap();
        let stage = StagedDir::new(&d.join("folder")).unwrap();
        std::fs::write(stage.path().join("f"), b"x").unwrap();
        let staged = stage.path().to_path_buf();
        let listed = live().clone();
        assert!(listed.contains(&tmp) && listed.contains(&staged));
        // what the handler does, without keeping the lock (other tests run in this process)
        remove_all(&[tmp.clone(), staged.clone()]);
        assert_eq!(entries(&d), Vec::<String>::new());
        drop(stage);
        drop(s);
        let listed = live().clone();
        assert!(!listed.contains(&tmp) && !listed.contains(&staged));
        // committed: off the list too
        write_file(&target, b"y").unwrap();
        let stage = StagedDir::new(&d.join("folder")).unwrap();
        stage.commit().unwrap();
        let listed = live().clone();
        assert!(!listed.contains(&tmp) && !listed.contains(&staged));
        assert_eq!(entries(&d), ["a.png", "folder"]);
    }

    #[test]
    fn temporary_names() {
        assert_eq!(
            temporary_file(Path::new("d/img.png")),
            Path::new("d/img.png.tmp")
        );
        assert_eq!(
            temporary_file(Path::new("d/latest")),
            Path::new("d/latest.tmp")
        );
        assert_eq!(
            hidden_sibling(Path::new("d/model.v1"), "partial"),
            Path::new("d/.model.v1.partial")
        );
    }

    #[test]
    fn one_file_is_written_whole() {
        let d = scratch("one");
        let t = d.join("a.txt");
        write_file(&t, "hello").unwrap();
        assert_eq!(std::fs::read_to_string(&t).unwrap(), "hello");
        write_file(&t, "again").unwrap();
        assert_eq!(std::fs::read_to_string(&t).unwrap(), "again");
        assert_eq!(entries(&d), ["a.txt"]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_failing_writer_leaves_neither_target_nor_temporary() {
        let d = scratch("failing");
        let t = d.join("a.png");
        let e = write_atomic(&t, failing).unwrap_err();
        assert_eq!(e.to_string(), "the writer failed");
        assert!(entries(&d).is_empty(), "{:?}", entries(&d));
        // an existing target is kept as it was
        std::fs::write(&t, "old").unwrap();
        write_atomic(&t, failing).unwrap_err();
        assert_eq!(std::fs::read_to_string(&t).unwrap(), "old");
        assert_eq!(entries(&d), ["a.png"]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_failed_rename_names_the_target_and_removes_the_temporary() {
        let d = scratch("rename");
        // a non-empty folder where the file should go: the rename fails
        let t = d.join("out.bin");
        std::fs::create_dir_all(t.join("x")).unwrap();
        let e = write_file(&t, "data").unwrap_err();
        assert!(e.to_string().starts_with(&t.display().to_string()), "{e}");
        assert_eq!(entries(&d), ["out.bin"]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_staged_set_commits_all_or_none() {
        let d = scratch("set");
        let (a, b, c) = (d.join("a.png"), d.join("b.png"), d.join("c.safetensors"));
        // all
        let mut s = Staged::new();
        for p in [&a, &b, &c] {
            s.write(p, |tmp| {
                std::fs::write(tmp, "x").map_err(|e| Error::io(tmp, e))
            })
            .unwrap();
        }
        assert!(!a.exists(), "nothing is in place before the commit");
        s.commit().unwrap();
        assert_eq!(entries(&d), ["a.png", "b.png", "c.safetensors"]);
        for p in [&a, &b, &c] {
            std::fs::remove_file(p).unwrap();
        }
        // none: the second writer fails, the set is dropped uncommitted
        let r = (|| -> Result<()> {
            let mut s = Staged::new();
            s.write(&a, |tmp| {
                std::fs::write(tmp, "x").map_err(|e| Error::io(tmp, e))
            })?;
            s.write(&b, failing)?;
            s.write(&c, |tmp| {
                std::fs::write(tmp, "x").map_err(|e| Error::io(tmp, e))
            })?;
            s.commit()
        })();
        assert!(r.is_err());
        assert!(entries(&d).is_empty(), "{:?}", entries(&d));
        // none: every file written, the last rename fails (a folder took its name meanwhile;
        // one there before is refused by `write`)
        let mut s = Staged::new();
        for p in [&a, &b, &c] {
            s.write(p, |tmp| {
                std::fs::write(tmp, "x").map_err(|e| Error::io(tmp, e))
            })
            .unwrap();
        }
        std::fs::create_dir_all(c.join("x")).unwrap();
        let e = s.commit().unwrap_err();
        assert!(e.to_string().contains("c.safetensors"), "{e}");
        assert_eq!(entries(&d), ["c.safetensors"]);
        assert!(c.is_dir());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_staged_folder_is_renamed_into_place() {
        let d = scratch("dir");
        let t = d.join("model");
        write_dir(&t, |stage| -> Result<()> {
            assert_eq!(stage, d.join(".model.partial"));
            std::fs::create_dir_all(stage.join("unet")).map_err(|e| Error::io(stage, e))?;
            std::fs::write(stage.join("unet/w"), "w").map_err(|e| Error::io(stage, e))
        })
        .unwrap();
        assert_eq!(entries(&d), ["model"]);
        assert_eq!(std::fs::read_to_string(t.join("unet/w")).unwrap(), "w");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_staged_folder_that_fails_is_removed() {
        let d = scratch("dirfail");
        let t = d.join("model");
        // a stale staging folder from a killed run does not get in the way
        std::fs::create_dir_all(d.join(".model.partial/stale")).unwrap();
        let e = write_dir(&t, |stage| -> Result<()> {
            std::fs::write(stage.join("half"), "h").map_err(|e| Error::io(stage, e))?;
            Err(Error::Invalid("stop".into()))
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "stop");
        assert!(entries(&d).is_empty(), "{:?}", entries(&d));
        // a failed rename (the target is a non-empty folder) removes the stage too
        std::fs::create_dir_all(t.join("keep")).unwrap();
        let s = StagedDir::per_process(&t).unwrap();
        std::fs::write(s.path().join("f"), "f").unwrap();
        let e = s.commit().unwrap_err();
        assert!(e.to_string().starts_with(&t.display().to_string()), "{e}");
        assert_eq!(entries(&d), ["model"]);
        assert!(t.join("keep").is_dir());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn commit_replacing_swaps_the_folder() {
        let d = scratch("replace");
        let t = d.join("checkpoint-3");
        std::fs::create_dir_all(&t).unwrap();
        std::fs::write(t.join("old"), "o").unwrap();
        let s = StagedDir::new(&t).unwrap();
        std::fs::write(s.path().join("new"), "n").unwrap();
        s.commit_replacing().unwrap();
        assert_eq!(entries(&d), ["checkpoint-3"]);
        assert_eq!(entries(&t), ["new"]);
        // no old one: a plain rename
        let u = d.join("fresh");
        let s = StagedDir::new(&u).unwrap();
        s.commit_replacing().unwrap();
        assert_eq!(entries(&d), ["checkpoint-3", "fresh"]);
        let _ = std::fs::remove_dir_all(&d);
    }
}
