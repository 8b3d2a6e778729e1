//! Training data: the fill50k layout (`prompt.json` lines with `source`, `target`, `prompt`)
//! and diffusers' image-folder layout (`metadata.jsonl` lines with `image`,
//! `conditioning_image`, `text`). Bad rows are reported with their line number.

use std::path::{Path, PathBuf};

use crate::error::{Result, TrainError};

/// One training example.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The image to learn to produce.
    pub target: PathBuf,
    /// The control image.
    pub source: PathBuf,
    pub prompt: String,
    pub line: usize,
}

/// A bad row: where and why.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRow {
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for BadRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// Read a dataset folder. Rows that cannot be used (bad JSON, missing keys or files) are
/// returned separately; the caller decides whether they are fatal.
pub fn read_dataset(dir: &Path) -> Result<(Vec<Sample>, Vec<BadRow>, PathBuf)> {
    // `exists`, not `is_file`: an index that is a FIFO or a folder is named as such when read
    let (index, keys) = if dir.join("prompt.json").exists() {
        (dir.join("prompt.json"), ("target", "source", "prompt"))
    } else if dir.join("metadata.jsonl").exists() {
        (
            dir.join("metadata.jsonl"),
            ("image", "conditioning_image", "text"),
        )
    } else {
        return Err(TrainError::file(
            dir,
            "not a dataset: expected prompt.json (fill50k layout) or metadata.jsonl (diffusers image folder)",
        ));
    };
    let text =
        sd_plugins_api::input_file::read_text(&index).map_err(|e| TrainError::file(&index, e))?;
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let row = (|| -> std::result::Result<Sample, String> {
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
            let get = |k: &str| -> std::result::Result<String, String> {
                v.get(k)
                    .and_then(|x| x.as_str())
                    .map(String::from)
                    .ok_or_else(|| format!("missing string `{k}`"))
            };
            let target = dir.join(get(keys.0)?);
            let source = dir.join(get(keys.1)?);
            let prompt = get(keys.2)?;
            for p in [&target, &source] {
                if p.symlink_metadata().is_err() {
                    return Err(format!("no such file: {}", p.display()));
                }
                readable_image(p)?;
            }
            Ok(Sample {
                target,
                source,
                prompt,
                line: line_no,
            })
        })();
        match row {
            Ok(s) => good.push(s),
            Err(message) => bad.push(BadRow {
                line: line_no,
                message,
            }),
        }
    }
    Ok((good, bad, index))
}

/// A row's image is a regular file whose header reads as an image (its pixels are decoded
/// when a batch needs them): an unreadable image is a bad row, not a failure mid-run.
fn readable_image(p: &Path) -> std::result::Result<(), String> {
    sd_plugins_api::input_file::check(p)?;
    image::ImageReader::open(p)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| format!("{}: {e}", p.display()))?
        .into_dimensions()
        .map_err(|e| format!("{}: not a readable image ({e})", p.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_folder_layout_and_bad_rows() {
        let d = std::env::temp_dir().join(format!("ds-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("img")).unwrap();
        for f in ["a.png", "a_c.png"] {
            image::RgbImage::new(2, 2)
                .save(d.join("img").join(f))
                .unwrap();
        }
        // not an image: a bad row naming the file
        std::fs::write(d.join("img/bad.png"), b"x").unwrap();
        std::fs::write(
            d.join("metadata.jsonl"),
            "{\"image\": \"img/a.png\", \"conditioning_image\": \"img/a_c.png\", \"text\": \"a cat\"}\n\n{\"image\": \"img/b.png\", \"conditioning_image\": \"img/a_c.png\", \"text\": \"b\"}\n{\"image\": \"img/a.png\", \"text\": \"c\"}\n{\"image\": \"img/bad.png\", \"conditioning_image\": \"img/a_c.png\", \"text\": \"d\"}\n",
        )
        .unwrap();
        let (good, bad, index) = read_dataset(&d).unwrap();
        assert_eq!(index, d.join("metadata.jsonl"));
        assert_eq!(good.len(), 1);
        assert_eq!((good[0].prompt.as_str(), good[0].line), ("a cat", 1));
        assert_eq!(good[0].source, d.join("img/a_c.png"));
        assert_eq!(bad.len(), 3);
        assert!(
            bad[2].to_string().starts_with("line 5: ") && bad[2].message.contains("bad.png"),
            "{}",
            bad[2]
        );
        assert_eq!(bad[0].line, 3);
        assert!(bad[0].message.contains("b.png"));
        assert!(bad[1]
            .to_string()
            .starts_with("line 4: missing string `conditioning_image`"));
        let e = read_dataset(&d.join("img")).err().unwrap().to_string();
        assert!(e.contains("not a dataset"), "{e}");
        let _ = std::fs::remove_dir_all(d);
    }
}
