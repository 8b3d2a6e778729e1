//! What the configured folders hold: models, ControlNets, LoRAs, VAEs and embeddings, each
//! known by a name (its path inside the folder) and a title with its hash, as A1111 and
//! sd-webui-controlnet list them. Requests name entries; a name is looked up here and never
//! used as a path, so no request reaches a file outside the folders.

use std::path::{Path, PathBuf};

use sd::hashes::HashCache;

/// One file or folder in a catalog.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The path inside the folder, `/`-separated, with its extension (A1111's checkpoint name).
    pub name: String,
    /// The name without its extension (A1111's `model_name`).
    pub stem: String,
    pub path: PathBuf,
    /// Full SHA-256 in hex, when it could be read.
    pub sha256: Option<String>,
    /// `name [hash]`: A1111's title (the hash's first 10 digits for checkpoints, 8 for ControlNets).
    pub title: String,
}

impl Entry {
    /// The first `n` hex digits of the hash.
    pub fn short_hash(&self, n: usize) -> Option<&str> {
        self.sha256.as_deref().map(|h| &h[..n.min(h.len())])
    }

    /// A request's name for this entry: the title, the name, the name without extension, or
    /// the short hash (A1111's `get_closet_checkpoint_match` order, exact matches only).
    fn answers_to(&self, q: &str) -> bool {
        let q = q.trim();
        // a title from another tool ("name [hash]", its hash from another convention) names
        // the entry by its name, as sd-webui-controlnet matches model names
        let named = |q: &str| q == self.name || q == self.stem;
        q == self.title
            || named(q)
            || q.strip_suffix(']')
                .and_then(|t| t.rsplit_once(" ["))
                .is_some_and(|(name, _)| named(name))
            || self.short_hash(q.len().max(8)).is_some_and(|h| h == q)
    }
}

/// How deep folder scans go (A1111 scans model folders recursively).
const MAX_DEPTH: usize = 4;
/// More files than this in one folder tree is a misconfiguration (a home directory), not a
/// model folder.
const MAX_ENTRIES: usize = 10_000;

fn has_ext(p: &Path, exts: &[&str]) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| exts.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// A folder holds a diffusers model of this `_class_name` (for pipelines: a `model_index.json`).
fn is_diffusers(dir: &Path, class: &str) -> bool {
    if class == "pipeline" {
        return dir.join("model_index.json").is_file();
    }
    // every unit model (a union ControlNet, a T2I-Adapter) is listed with the ControlNets,
    // as the extension lists them
    let units = class == "ControlNetModel";
    sd_plugins_api::input_file::read_text(&dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| {
            let c = v["_class_name"].as_str();
            c == Some(class) || (units && matches!(c, Some("ControlNetUnionModel" | "T2IAdapter")))
        })
}

/// The hash a title shows, as A1111 and its extensions show it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TitleHash {
    None,
    /// The first digits of the SHA-256 (A1111's checkpoints: 10).
    Sha256(usize),
    /// sd-webui-controlnet's: the legacy model hash of a file (`sd::hashes::controlnet_short`).
    ControlNet,
}

/// What a scan looks for.
#[derive(Debug, Clone, Copy)]
pub struct Kind {
    /// A folder with this diffusers class is one entry (`pipeline`: a `model_index.json`).
    pub folder_class: Option<&'static str>,
    pub extensions: &'static [&'static str],
    /// The hash in the title.
    pub title_hash: TitleHash,
    /// Whether the title keeps the file extension (A1111 checkpoints do, ControlNets do not).
    pub title_ext: bool,
}

pub const MODELS: Kind = Kind {
    folder_class: Some("pipeline"),
    extensions: &["safetensors", "ckpt"],
    title_hash: TitleHash::Sha256(10),
    title_ext: true,
};
pub const CONTROLNETS: Kind = Kind {
    folder_class: Some("ControlNetModel"),
    extensions: &["safetensors", "pth", "ckpt", "bin"],
    title_hash: TitleHash::ControlNet,
    title_ext: false,
};
pub const LORAS: Kind = Kind {
    folder_class: None,
    extensions: &["safetensors", "pt", "ckpt"],
    title_hash: TitleHash::None,
    title_ext: false,
};
pub const VAES: Kind = Kind {
    folder_class: None,
    extensions: &["safetensors", "pt", "ckpt"],
    title_hash: TitleHash::None,
    title_ext: true,
};
pub const EMBEDDINGS: Kind = Kind {
    folder_class: None,
    extensions: &["safetensors", "pt", "bin"],
    title_hash: TitleHash::None,
    title_ext: false,
};

/// Every entry of `kind` under `root`, sorted by name, with its hash (read now when the cache
/// lacks it). A missing folder is an empty list.
pub fn scan(root: Option<&Path>, kind: Kind, hashes: &mut HashCache) -> Vec<Entry> {
    scan_with(root, kind, hashes, true)
}

fn scan_with(root: Option<&Path>, kind: Kind, hashes: &mut HashCache, read: bool) -> Vec<Entry> {
    let Some(root) = root else {
        return Vec::new();
    };
    let mut found = Vec::new();
    walk(root, root, 0, kind, &mut found);
    found.sort();
    found.dedup();
    found
        .into_iter()
        .map(|path| {
            let rel = path.strip_prefix(root).unwrap_or(&path);
            let name = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            let stem = match path.is_file() {
                true => name
                    .rsplit_once('.')
                    .map_or(name.clone(), |(s, _)| s.to_string()),
                false => name.clone(),
            };
            // without `read`, only what the cache knows: A1111 too titles a checkpoint
            // without its hash until the hash is known
            let sha256 = match (kind.title_hash != TitleHash::None, read) {
                (false, _) => None,
                (true, true) => hashes.sha256(&path),
                (true, false) => hashes.sha256_if_cached(&path),
            };
            let shown = if kind.title_ext { &name } else { &stem };
            let title = match (kind.title_hash, &sha256) {
                (TitleHash::Sha256(n), Some(h)) => format!("{shown} [{}]", &h[..n]),
                (TitleHash::ControlNet, Some(_)) => {
                    format!("{shown} [{}]", hashes.controlnet_short(&path))
                }
                _ => shown.clone(),
            };
            Entry {
                name,
                stem,
                path,
                sha256,
                title,
            }
        })
        .collect()
}

fn walk(root: &Path, dir: &Path, depth: usize, kind: Kind, found: &mut Vec<PathBuf>) {
    let Ok(read) = std::fs::read_dir(dir) else {
        return;
    };
    let mut children: Vec<PathBuf> = read.flatten().map(|e| e.path()).collect();
    children.sort();
    for p in children {
        if found.len() >= MAX_ENTRIES {
            return;
        }
        let hidden = p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden {
            continue;
        }
        if p.is_dir() {
            if kind.folder_class.is_some_and(|c| is_diffusers(&p, c)) {
                found.push(p);
            } else if depth + 1 < MAX_DEPTH && p.canonicalize().is_ok_and(|c| c != *root) {
                walk(root, &p, depth + 1, kind, found);
            }
        } else if p.is_file() && has_ext(&p, kind.extensions) {
            found.push(p);
        }
    }
}

/// The folders the server was given, and what is in them now.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub models: Vec<Entry>,
    pub controlnets: Vec<Entry>,
    pub loras: Vec<Entry>,
    pub vaes: Vec<Entry>,
    pub embeddings: Vec<Entry>,
}

/// The configured folders.
#[derive(Debug, Clone, Default)]
pub struct Folders {
    pub models: PathBuf,
    pub controlnets: Option<PathBuf>,
    pub loras: Option<PathBuf>,
    pub vaes: Option<PathBuf>,
    pub embeddings: Option<PathBuf>,
}

impl Catalog {
    /// The folders' entries, every hash read (files the hash cache does not know are read
    /// whole: minutes for a folder of large new checkpoints).
    pub fn scan(f: &Folders) -> Self {
        Self::scan_reading(f, true)
    }

    /// The folders' entries at once: hashes only from the cache, the rest titled by name
    /// until [`Catalog::scan`] (run in the background at start-up) has read them.
    pub fn scan_cached(f: &Folders) -> Self {
        Self::scan_reading(f, false)
    }

    /// Whether every entry that shows a hash has one.
    pub fn complete(&self) -> bool {
        self.models
            .iter()
            .chain(&self.controlnets)
            .all(|e| e.sha256.is_some())
    }

    fn scan_reading(f: &Folders, read: bool) -> Self {
        let mut hashes = HashCache::open();
        let c = Self {
            models: scan_with(Some(&f.models), MODELS, &mut hashes, read),
            controlnets: scan_with(f.controlnets.as_deref(), CONTROLNETS, &mut hashes, read),
            loras: scan_with(f.loras.as_deref(), LORAS, &mut hashes, read),
            vaes: scan_with(f.vaes.as_deref(), VAES, &mut hashes, read),
            embeddings: scan_with(f.embeddings.as_deref(), EMBEDDINGS, &mut hashes, read),
        };
        if read {
            hashes.save();
        }
        c
    }

    pub fn model(&self, q: &str) -> Option<&Entry> {
        self.models.iter().find(|e| e.answers_to(q))
    }

    pub fn controlnet(&self, q: &str) -> Option<&Entry> {
        self.controlnets.iter().find(|e| e.answers_to(q))
    }

    pub fn vae(&self, q: &str) -> Option<&Entry> {
        self.vaes.iter().find(|e| e.answers_to(q))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models")
    }

    #[test]
    fn folders_and_files_are_entries_by_kind_with_a1111_titles() {
        let mut hashes = HashCache::open();
        let models = scan(Some(&fixtures()), MODELS, &mut hashes);
        let names: Vec<&str> = models.iter().map(|e| e.name.as_str()).collect();
        // pipeline folders and single files; ControlNet folders are not models
        assert!(names.contains(&"sd1"), "{names:?}");
        assert!(names.contains(&"single/sd1.safetensors"), "{names:?}");
        assert!(!names.contains(&"controlnet-sd1"), "{names:?}");
        let single = models
            .iter()
            .find(|e| e.name == "single/sd1.safetensors")
            .unwrap()
            .clone();
        let h = single.sha256.clone().unwrap();
        assert_eq!(
            single.title,
            format!("single/sd1.safetensors [{}]", &h[..10])
        );
        assert_eq!(single.stem, "single/sd1");
        let cat = Catalog {
            models,
            ..Catalog::default()
        };
        for q in [
            single.title.as_str(),
            "single/sd1.safetensors",
            "single/sd1",
            &h[..10],
        ] {
            assert_eq!(cat.model(q).unwrap().name, "single/sd1.safetensors", "{q}");
        }
        // A1111's title with another hash convention still names it
        assert_eq!(
            cat.model("single/sd1.safetensors [0123456789]")
                .unwrap()
                .name,
            "single/sd1.safetensors"
        );
        assert_eq!(
            cat.model("single/sd1 [abcd]").unwrap().name,
            "single/sd1.safetensors"
        );
        assert!(cat.model("single/sd9 [abcd]").is_none());
        assert!(cat.model("../sd1").is_none());
        assert!(cat.model("/etc/passwd").is_none());

        let cns = scan(Some(&fixtures()), CONTROLNETS, &mut hashes);
        let cn = cns.iter().find(|e| e.name == "controlnet-sd1").unwrap();
        assert!(cn.title.starts_with("controlnet-sd1 ["), "{}", cn.title);
        assert_eq!(cn.title.len(), "controlnet-sd1 [12345678]".len());
        assert!(!cns.iter().any(|e| e.name == "sd1"));
        // a ControlNet file is titled with sd-webui-controlnet's (legacy) hash, as hashlib
        // computes it after A1111's code (tests/fixtures/make_hash_fixtures.py)
        let big = scan(
            Some(&fixtures().join("../hashes")),
            CONTROLNETS,
            &mut hashes,
        );
        let titles: Vec<&str> = big.iter().map(|e| e.title.as_str()).collect();
        assert!(titles.contains(&"controlnet_big [9df683a1]"), "{titles:?}");
    }
}
