//! A1111's `<lora:NAME:WEIGHT>` / `<lora:NAME:TE_WEIGHT:UNET_WEIGHT>` prompt tags: their
//! names resolve only inside the LoRA folder, their weights are range-checked as `--lora`'s.

use std::path::{Component, Path, PathBuf};

/// LoRA weights (`--lora F:W`, `[[lora]]` tables, prompt tags) outside this range need
/// `allow_extreme_weights` (negative weights are a common way to subtract a concept, so the
/// range is symmetric). Every weight must be finite.
pub const WEIGHT_RANGE: (f64, f64) = (-2.0, 2.0);

/// A LoRA weight: finite, and within [`WEIGHT_RANGE`] unless `allow_extreme`. The message
/// says what was expected and what was found (callers add the tag or flag).
pub fn check_weight(w: f64, allow_extreme: bool) -> Result<(), String> {
    use sd_plugins_api::number::Range;
    let (lo, hi) = WEIGHT_RANGE;
    let r = if allow_extreme {
        Range::ANY.check(w)
    } else {
        Range::closed(lo, hi).check_noted(w, " (allow more with --allow-extreme-weights)")
    };
    r.map(|_| ()).map_err(|m| format!("weight {m}"))
}

impl LoraTag {
    /// The tag as written in a prompt, for messages.
    pub fn shown(&self) -> String {
        use sd_plugins_api::number::show;
        if self.te_weight == self.unet_weight {
            format!("<lora:{}:{}>", self.name, show(self.te_weight))
        } else {
            format!(
                "<lora:{}:{}:{}>",
                self.name,
                show(self.te_weight),
                show(self.unet_weight)
            )
        }
    }

    /// Both weights checked with [`check_weight`].
    pub fn check_weights(&self, allow_extreme: bool) -> Result<(), String> {
        check_weight(self.te_weight, allow_extreme)
            .and_then(|()| check_weight(self.unet_weight, allow_extreme))
            .map_err(|e| format!("{}: {e}", self.shown()))
    }
}

/// The file a tag's NAME names: `NAME.safetensors` in `dir` (or `NAME` itself when it ends in
/// `.safetensors`, `.pt` or `.ckpt`). A name is a name, not a path: no `/` or `\`, no `..`,
/// not absolute, no NUL; and the file, symlinks resolved, must lie inside `dir` (symlinks
/// resolved too). No `dir`: an error saying to set `--lora-dir`.
pub fn resolve_tag(dir: Option<&Path>, name: &str) -> Result<PathBuf, String> {
    let tag = format!("<lora:{name}>");
    let single = {
        let mut c = Path::new(name).components();
        matches!((c.next(), c.next()), (Some(Component::Normal(_)), None))
    };
    if name.is_empty()
        || name.contains(['/', '\\', '\0'])
        || name.contains("..")
        || Path::new(name).is_absolute()
        || !single
    {
        return Err(format!(
            "{tag}: a tag names a LoRA in --lora-dir, not a path (no /, \\, .. or absolute paths); use --lora PATH for a file elsewhere"
        ));
    }
    let Some(dir) = dir else {
        return Err(format!(
            "{tag}: set --lora-dir to the folder holding {name}.safetensors (prompt tags are looked up only there)"
        ));
    };
    let file = if [".safetensors", ".pt", ".ckpt"]
        .iter()
        .any(|e| name.ends_with(e))
    {
        name.to_string()
    } else {
        format!("{name}.safetensors")
    };
    let path = dir.join(&file);
    if !path.is_file() {
        return Err(format!(
            "{tag}: no file {} (set --lora-dir to the folder holding NAME.safetensors)",
            path.display()
        ));
    }
    let root = dir
        .canonicalize()
        .map_err(|e| format!("--lora-dir {}: {e}", dir.display()))?;
    let real = path
        .canonicalize()
        .map_err(|e| format!("{tag}: {}: {e}", path.display()))?;
    if !real.starts_with(&root) {
        return Err(format!(
            "{tag}: {} leads outside --lora-dir {} (to {})",
            path.display(),
            dir.display(),
            real.display()
        ));
    }
    Ok(path)
}

/// A tag found in a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTag {
    pub name: String,
    pub te_weight: f64,
    pub unet_weight: f64,
}

/// Remove every `<lora:...>` tag from `prompt`, returning the cleaned text and the tags.
/// A tag with an unreadable weight is an error naming it.
pub fn extract_lora_tags(prompt: &str) -> Result<(String, Vec<LoraTag>), String> {
    let mut out = String::with_capacity(prompt.len());
    let mut tags = Vec::new();
    let mut rest = prompt;
    while let Some(start) = rest.find("<lora:") {
        let Some(end) = rest[start..].find('>') else {
            break;
        };
        out.push_str(&rest[..start]);
        let body = &rest[start + 6..start + end];
        let parts: Vec<&str> = body.split(':').collect();
        let num = |s: &str| {
            s.trim()
                .parse::<f64>()
                .map_err(|_| format!("<lora:{body}>: weight {s:?} is not a number"))
        };
        let tag = match parts.as_slice() {
            [name] => LoraTag {
                name: name.trim().into(),
                te_weight: 1.0,
                unet_weight: 1.0,
            },
            [name, w] => LoraTag {
                name: name.trim().into(),
                te_weight: num(w)?,
                unet_weight: num(w)?,
            },
            [name, te, unet, ..] => LoraTag {
                name: name.trim().into(),
                te_weight: num(te)?,
                unet_weight: num(unet)?,
            },
            [] => return Err("<lora:> without a name".into()),
        };
        if tag.name.is_empty() {
            return Err(format!("<lora:{body}>: empty name"));
        }
        tags.push(tag);
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    let cleaned = out.split_whitespace().collect::<Vec<_>>().join(" ");
    Ok((cleaned, tags))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_removed_and_parsed() {
        let (p, t) =
            extract_lora_tags("a cat <lora:watercolor:0.8>, sitting <lora:detail:0.5:1.2>")
                .unwrap();
        assert_eq!(p, "a cat , sitting");
        assert_eq!(
            t[0],
            LoraTag {
                name: "watercolor".into(),
                te_weight: 0.8,
                unet_weight: 0.8
            }
        );
        assert_eq!(
            t[1],
            LoraTag {
                name: "detail".into(),
                te_weight: 0.5,
                unet_weight: 1.2
            }
        );
        let (p, t) = extract_lora_tags("<lora:x>plain").unwrap();
        assert_eq!((p.as_str(), t[0].unet_weight), ("plain", 1.0));
        assert!(extract_lora_tags("<lora:x:abc>")
            .unwrap_err()
            .contains("abc"));
        assert_eq!(extract_lora_tags("no tags").unwrap().0, "no tags");
    }

    #[test]
    fn tag_weights_are_finite_and_in_range() {
        let tags = |p: &str| extract_lora_tags(p).unwrap().1;
        for bad in [
            "<lora:x:inf>",
            "<lora:x:NaN>",
            "<lora:x:1e30>",
            "<lora:x:1:-3>",
        ] {
            let e = tags(bad)[0].check_weights(false).unwrap_err();
            assert!(
                e.contains("weight must be a finite number in [-2, 2]")
                    && e.contains("--allow-extreme-weights"),
                "{bad}: {e}"
            );
        }
        let e = tags("<lora:x:inf>")[0].check_weights(false).unwrap_err();
        assert!(
            e.starts_with("<lora:x:inf>: ") && e.ends_with("got inf"),
            "{e}"
        );
        assert!(tags("<lora:x:-2>")[0].check_weights(false).is_ok());
        assert!(tags("<lora:x:1e30>")[0].check_weights(true).is_ok());
        assert!(tags("<lora:x:inf>")[0].check_weights(true).is_err());
        assert!(tags("<lora:x:nan>")[0].check_weights(true).is_err());
    }

    #[test]
    fn tag_names_stay_in_their_folder() {
        let d = std::env::temp_dir().join(format!("sd-lora-tags-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let loras = d.join("loras");
        std::fs::create_dir_all(&loras).unwrap();
        std::fs::write(d.join("outside.safetensors"), b"x").unwrap();
        std::fs::write(loras.join("in.safetensors"), b"x").unwrap();
        std::fs::write(loras.join("old.pt"), b"x").unwrap();
        assert_eq!(
            resolve_tag(Some(&loras), "in").unwrap(),
            loras.join("in.safetensors")
        );
        assert_eq!(
            resolve_tag(Some(&loras), "in.safetensors").unwrap(),
            loras.join("in.safetensors")
        );
        assert_eq!(
            resolve_tag(Some(&loras), "old.pt").unwrap(),
            loras.join("old.pt")
        );
        let outside = d.join("outside.safetensors");
        for bad in [
            "../outside",
            "..",
            "a/b",
            "a\\b",
            "/etc/passwd",
            outside.to_str().unwrap(),
            "x\0y",
            "",
        ] {
            let e = resolve_tag(Some(&loras), bad).unwrap_err();
            assert!(e.contains("not a path"), "{bad:?}: {e}");
        }
        let e = resolve_tag(None, "in").unwrap_err();
        assert!(e.contains("set --lora-dir"), "{e}");
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&outside, loras.join("link.safetensors")).unwrap();
            let e = resolve_tag(Some(&loras), "link").unwrap_err();
            assert!(e.contains("outside --lora-dir"), "{e}");
        }
        let _ = std::fs::remove_dir_all(&d);
    }
}
