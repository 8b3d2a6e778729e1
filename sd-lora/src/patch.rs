//! A loaded LoRA bound to a model's weights: a `WeightPatch` for the loader.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Tensor;
use sd_plugins_api::{HookError, ModelPart, WeightPatch};

use crate::error::{LoraError, Result};
use crate::file::{LoraFile, LoraModule};
use crate::targets::Targets;

/// A LoRA to apply: `--lora PATH[:WEIGHT]`, or `<lora:NAME:TE:UNET>` in a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub unet_weight: f64,
    pub te_weight: f64,
}

impl LoraSpec {
    /// `PATH[:WEIGHT]` (one weight for both parts; the default is 1).
    /// After the last `:` a weight is expected unless that part names a file (`C:x.safetensors`,
    /// a path with separators, or an existing file): `F:notanumber` is a bad weight, not a
    /// missing file.
    pub fn parse(s: &str) -> Result<Self> {
        let (path, weight) = match s.rsplit_once(':') {
            Some((p, w)) if !p.is_empty() => match w.trim().parse::<f64>() {
                Ok(x) => (p, x),
                Err(_) if !names_a_file(s, w) => {
                    return Err(LoraError::Invalid(format!(
                        "--lora {s:?}: weight {w:?} is not a number (expected PATH[:WEIGHT])"
                    )))
                }
                Err(_) => (s, 1.0),
            },
            _ => (s, 1.0),
        };
        if path.is_empty() {
            return Err(LoraError::Invalid(format!(
                "--lora {s:?}: expected PATH[:WEIGHT]"
            )));
        }
        Ok(Self {
            path: PathBuf::from(path),
            unet_weight: weight,
            te_weight: weight,
        })
    }
}

/// Whether the text after a `--lora` value's last `:` is part of its file name.
fn names_a_file(whole: &str, after: &str) -> bool {
    after.contains(['/', '\\'])
        || [".safetensors", ".pt", ".ckpt", ".bin", ".pth"]
            .iter()
            .any(|e| after.to_ascii_lowercase().ends_with(e))
        || Path::new(whole).exists()
}

/// What binding a LoRA to a model found.
#[derive(Debug, Clone)]
pub struct LoraReport {
    pub path: PathBuf,
    pub format: String,
    pub modules: usize,
    pub unet_targets: usize,
    pub te_targets: usize,
    /// Module keys that name no weight of the model.
    pub unmatched: Vec<String>,
}

impl LoraReport {
    /// One line for people: counts and the first few unmatched keys.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{}: {} ({} modules: {} UNet, {} text encoder)",
            self.path.display(),
            self.format,
            self.modules,
            self.unet_targets,
            self.te_targets
        );
        if !self.unmatched.is_empty() {
            let first: Vec<&str> = self.unmatched.iter().take(3).map(|s| s.as_str()).collect();
            s.push_str(&format!(
                "; {} keys match nothing in the model, e.g. {}",
                self.unmatched.len(),
                first.join(", ")
            ));
        }
        s
    }
}

/// The deltas of one LoRA file at given multipliers. Factors stay in memory: re-weighting
/// (`with_weights`) needs no re-read of the LoRA; applying it means rebuilding the model from
/// its memory-mapped base files (pages come from the OS cache), the base is never modified.
#[derive(Clone)]
pub struct LoraPatch {
    name: String,
    modules: Arc<HashMap<(ModelPart, String), Arc<LoraModule>>>,
    pub unet_weight: f64,
    pub te_weight: f64,
}

impl LoraPatch {
    pub fn with_weights(&self, unet_weight: f64, te_weight: f64) -> Self {
        Self {
            unet_weight,
            te_weight,
            ..self.clone()
        }
    }
}

impl WeightPatch for LoraPatch {
    fn name(&self) -> &str {
        &self.name
    }

    fn delta(
        &self,
        part: ModelPart,
        name: &str,
        base: &Tensor,
    ) -> Result<Option<Tensor>, HookError> {
        let Some(m) = self.modules.get(&(part, name.to_string())) else {
            return Ok(None);
        };
        let w = match part {
            ModelPart::TextEncoder | ModelPart::TextEncoder2 => self.te_weight,
            _ => self.unet_weight,
        };
        if w == 0.0 {
            return Ok(None);
        }
        Ok(Some((m.delta(base.dims())? * w)?))
    }
}

/// Load a LoRA and bind it to the model at `model_root` (a diffusers folder). Shapes are
/// checked here, so a LoRA for another model is an error before anything runs.
pub fn load_lora(spec: &LoraSpec, targets: &Targets) -> Result<(LoraPatch, LoraReport)> {
    let file = LoraFile::load(&spec.path)?;
    if let (Some(lora), Some(model)) = (file.family(), targets.family) {
        // SD 1.x and 2.x share block names; SDXL shares them too at other shapes
        if crate::targets::families_differ(lora, model) {
            return Err(LoraError::file(
                &spec.path,
                format!("an {lora} LoRA cannot patch an {model} model"),
            ));
        }
    }
    let mut modules = HashMap::new();
    let mut unmatched = Vec::new();
    let (mut unet, mut te) = (0, 0);
    for (key, module) in &file.modules {
        let Some(t) = targets.get(key) else {
            unmatched.push(key.clone());
            continue;
        };
        // compute once to check the shapes
        module.delta(&t.shape).map_err(|e| {
            LoraError::file(
                &spec.path,
                format!(
                    "{key}: inconsistent with the model's {} {:?}: {e}",
                    t.param, t.shape
                ),
            )
        })?;
        match t.part {
            ModelPart::TextEncoder | ModelPart::TextEncoder2 => te += 1,
            _ => unet += 1,
        }
        modules.insert((t.part, t.param.clone()), Arc::new(module.clone()));
    }
    let report = LoraReport {
        path: spec.path.clone(),
        format: file.format.clone(),
        modules: file.modules.len(),
        unet_targets: unet,
        te_targets: te,
        unmatched,
    };
    let patch = LoraPatch {
        name: spec
            .path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default(),
        modules: Arc::new(modules),
        unet_weight: spec.unet_weight,
        te_weight: spec.te_weight,
    };
    Ok((patch, report))
}

#[cfg(test)]
mod parse_tests {
    use super::*;

    /// `F:notanumber` is a bad weight, not a missing file; `C:x.safetensors` stays a path.
    #[test]
    fn a_weight_that_is_not_a_number_is_named() {
        let e = LoraSpec::parse("/no/such.safetensors:notanumber").unwrap_err();
        assert!(
            e.to_string()
                .contains("weight \"notanumber\" is not a number"),
            "{e}"
        );
        assert_eq!(
            LoraSpec::parse("x.safetensors:0.5").unwrap().unet_weight,
            0.5
        );
        let s = LoraSpec::parse("C:x.safetensors").unwrap();
        assert_eq!(
            (s.path, s.unet_weight),
            (PathBuf::from("C:x.safetensors"), 1.0)
        );
        assert_eq!(
            LoraSpec::parse("a:dir/b").unwrap().path,
            PathBuf::from("a:dir/b")
        );
    }
}
