//! Reading LoRA files into modules (one per target layer) of factors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{LoraError, Result};

/// The factors of one module's delta.
#[derive(Debug, Clone)]
pub enum Factors {
    /// LoRA / LoCon: `up @ down` (convs flattened), rank = `down.dim(0)`.
    LoRA { up: Tensor, down: Tensor },
    /// LoHa: `(w1a @ w1b) * (w2a @ w2b)`, rank = `w1b.dim(0)`.
    LoHa {
        w1a: Tensor,
        w1b: Tensor,
        w2a: Tensor,
        w2b: Tensor,
    },
    /// LoKr: `kron(w1, w2)`, each given whole or as `a @ b`; rank of the last factorised one.
    LoKr {
        w1: Tensor,
        w2: Tensor,
        rank: Option<usize>,
    },
}

#[derive(Debug, Clone)]
pub struct LoraModule {
    pub factors: Factors,
    pub alpha: Option<f64>,
}

impl LoraModule {
    pub fn rank(&self) -> Option<usize> {
        match &self.factors {
            Factors::LoRA { down, .. } => down.dims().first().copied(),
            Factors::LoHa { w1b, .. } => w1b.dims().first().copied(),
            Factors::LoKr { rank, .. } => *rank,
        }
    }

    /// True for convolution modules (LoCon): the down factor has a kernel.
    pub fn factors_is_conv(&self) -> bool {
        matches!(&self.factors, Factors::LoRA { down, .. } if down.rank() == 4 && down.dims()[2..].iter().product::<usize>() > 1)
    }

    /// `alpha / rank` (1 when alpha is missing or zero, or a LoKr has no factorised part).
    pub fn scale(&self) -> f64 {
        match (self.alpha, self.rank()) {
            (Some(a), Some(r)) if a != 0.0 && r > 0 => a / r as f64,
            _ => 1.0,
        }
    }

    /// The full delta for a weight of `shape`, alpha/rank applied (the multiplier is not).
    pub fn delta(&self, shape: &[usize]) -> candle_core::Result<Tensor> {
        let numel: usize = shape.iter().product();
        let flat2 = |t: &Tensor| -> candle_core::Result<Tensor> { t.flatten_from(1) };
        let d = match &self.factors {
            Factors::LoRA { up, down } => flat2(up)?.matmul(&flat2(down)?)?,
            Factors::LoHa { w1a, w1b, w2a, w2b } => {
                (flat2(w1a)?.matmul(&flat2(w1b)?)? * flat2(w2a)?.matmul(&flat2(w2b)?)?)?
            }
            Factors::LoKr { w1, w2, .. } => {
                // kron over the first two axes; the kernel (if any) comes from w2
                let (a, b) = w1.dims2()?;
                let out = shape[0];
                let inp = shape.get(1).copied().unwrap_or(1);
                let k: usize = shape.iter().skip(2).product();
                if !out.is_multiple_of(a) || !inp.is_multiple_of(b) {
                    candle_core::bail!(
                        "LoKr w1 {:?} does not divide the weight {shape:?}",
                        w1.dims()
                    );
                }
                let (p, q) = (out / a, inp / b);
                let w2 = w2.reshape((p, q, k))?;
                let w1 = w1.reshape((a, 1, b, 1, 1))?;
                let w2 = w2.reshape((1, p, 1, q, k))?;
                w1.broadcast_mul(&w2)?.reshape((a * p, b * q * k))?
            }
        };
        if d.elem_count() != numel {
            candle_core::bail!(
                "delta of {:?} elements for a weight of shape {shape:?}",
                d.dims()
            );
        }
        d.reshape(shape)? * self.scale()
    }
}

/// A LoRA file: modules by key (the file's own module name, e.g. `lora_unet_..._to_q` or
/// `unet.down_blocks.0...to_q`).
#[derive(Debug, Clone)]
pub struct LoraFile {
    pub path: PathBuf,
    pub format: String,
    pub modules: BTreeMap<String, LoraModule>,
}

#[derive(Default)]
struct Parts {
    t: BTreeMap<String, Tensor>,
}

/// Split a tensor name into (module key, role) for every layout we read.
fn split_key(name: &str) -> Option<(String, String, &'static str)> {
    // PEFT / diffusers
    for (suffix, role) in [(".lora_A.weight", "down"), (".lora_B.weight", "up")] {
        if let Some(m) = name.strip_suffix(suffix) {
            return Some((m.to_string(), role.into(), "peft"));
        }
    }
    // legacy diffusers attention processors: X.processor.to_q_lora.down.weight
    if let Some((x, rest)) = name.split_once(".processor.") {
        for proj in ["to_q", "to_k", "to_v", "to_out"] {
            for (suffix, role) in [(".down.weight", "down"), (".up.weight", "up")] {
                if rest == format!("{proj}_lora{suffix}") {
                    let target = if proj == "to_out" { "to_out.0" } else { proj };
                    return Some((format!("{x}.{target}"), role.into(), "diffusers-legacy"));
                }
            }
        }
    }
    // kohya / LyCORIS: KEY.role[.weight]
    let (m, role) = name.split_once('.')?;
    let role = role.strip_suffix(".weight").unwrap_or(role);
    let fmt = match role {
        "lora_down" | "lora_up" | "lora_mid" | "alpha" | "dora_scale" => "kohya",
        r if r.starts_with("hada_") => "loha",
        r if r.starts_with("lokr_") => "lokr",
        _ => return None,
    };
    Some((m.to_string(), role.to_string(), fmt))
}

/// A weight-file error's message without the leading `PATH: ` (the LoRA error names it).
fn strip_path(e: &sd_weights::Error, path: &Path) -> String {
    let m = e.to_string();
    m.strip_prefix(&format!("{}: ", path.display()))
        .map(str::to_string)
        .unwrap_or(m)
}

/// A LoRA alpha is one number stored as a float (kohya and PEFT save a float32 or float16
/// scalar) or an integer (`torch.tensor(4)` is int64); bytes (U8) are refused: a string
/// stored as bytes must not become a scale.
fn check_alpha(t: &Tensor) -> std::result::Result<(), String> {
    if t.elem_count() != 1 {
        return Err(format!(
            "alpha must be a single number, found a tensor of shape {:?}",
            t.dims()
        ));
    }
    match t.dtype() {
        d if d.is_float() => Ok(()),
        DType::I64 | DType::I32 | DType::I16 | DType::U32 => Ok(()),
        other => Err(format!(
            "alpha must be a floating-point (or integer) number, found dtype {other:?}"
        )),
    }
}

impl LoraFile {
    pub fn load(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(LoraError::file(path, "LoRA file not found"));
        }
        // safetensors, or a PyTorch zip pickle (read without running code); anything else is
        // named for what its first bytes say it is
        let store = sd_weights::Store::open(path)
            .map_err(|e| LoraError::file(path, format!("cannot read: {}", strip_path(&e, path))))?;
        let mut groups: BTreeMap<String, Parts> = BTreeMap::new();
        let mut formats = std::collections::BTreeSet::new();
        for name in store.names() {
            let Some((key, role, fmt)) = split_key(&name) else {
                continue;
            };
            let t = store
                .get(&name)
                .map_err(|e| LoraError::file(path, format!("tensor {name}: {e}")))?;
            if role == "alpha" {
                check_alpha(&t).map_err(|m| LoraError::file(path, format!("{name}: {m}")))?;
            }
            // LoRA files are small: every value is checked when loaded, so NaN or infinity
            // never reaches a model as a black image
            if let Some(found) = sd_weights::finite::first_non_finite(&t)? {
                return Err(LoraError::file(
                    path,
                    format!(
                        "tensor {name} holds {}; a LoRA's values must be finite numbers",
                        sd_weights::finite::describe(found)
                    ),
                ));
            }
            formats.insert(fmt);
            groups
                .entry(key)
                .or_default()
                .t
                .insert(role, t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?);
        }
        if groups.is_empty() {
            return Err(LoraError::file(
                path,
                "not a LoRA: no lora_down/lora_up, lora_A/lora_B, hada_* or lokr_* tensors",
            ));
        }
        let mut modules = BTreeMap::new();
        for (key, mut p) in groups {
            let bad = |m: String| LoraError::file(path, format!("{key}: {m}"));
            let alpha = match p.t.remove("alpha") {
                Some(a) => Some(
                    a.flatten_all()?
                        .get(0)?
                        .to_dtype(DType::F64)?
                        .to_scalar::<f64>()?,
                ),
                None => None,
            };
            for unsupported in ["lora_mid", "dora_scale", "hada_t1", "hada_t2", "lokr_t2"] {
                if p.t.contains_key(unsupported) {
                    return Err(bad(format!(
                        "`{unsupported}` (Tucker / DoRA) is not supported"
                    )));
                }
            }
            let mut take = |r: &str| p.t.remove(r);
            let factors = if let (Some(up), Some(down)) = (
                take("up").or_else(|| take("lora_up")),
                take("down").or_else(|| take("lora_down")),
            ) {
                if up.dim(1)? != down.dim(0)? {
                    return Err(bad(format!(
                        "up {:?} and down {:?} ranks differ",
                        up.dims(),
                        down.dims()
                    )));
                }
                Factors::LoRA { up, down }
            } else if let (Some(w1a), Some(w1b), Some(w2a), Some(w2b)) = (
                take("hada_w1_a"),
                take("hada_w1_b"),
                take("hada_w2_a"),
                take("hada_w2_b"),
            ) {
                Factors::LoHa { w1a, w1b, w2a, w2b }
            } else {
                let mut rank = None;
                let mut factor = |whole: &str, a: &str, b: &str| -> Result<Option<Tensor>> {
                    if let Some(w) = take(whole) {
                        return Ok(Some(w));
                    }
                    match (take(a), take(b)) {
                        (Some(a), Some(b)) => {
                            rank = Some(b.dim(0)?);
                            Ok(Some(a.matmul(&b.flatten_from(1)?)?))
                        }
                        _ => Ok(None),
                    }
                };
                match (
                    factor("lokr_w1", "lokr_w1_a", "lokr_w1_b")?,
                    factor("lokr_w2", "lokr_w2_a", "lokr_w2_b")?,
                ) {
                    (Some(w1), Some(w2)) => Factors::LoKr { w1, w2, rank },
                    _ => {
                        return Err(bad(
                            "incomplete module (missing up/down or LyCORIS factors)".into(),
                        ))
                    }
                }
            };
            modules.insert(key, LoraModule { factors, alpha });
        }
        Ok(Self {
            path: path.to_path_buf(),
            format: formats.into_iter().collect::<Vec<_>>().join("+"),
            modules,
        })
    }

    /// The model family the file was trained for, when its keys or shapes tell: a second
    /// text encoder's modules (`lora_te2_`, `text_encoder_2.`) mean SDXL; else the text width
    /// its cross-attention key projections (`attn2.to_k`) take.
    pub fn family(&self) -> Option<&'static str> {
        if self
            .modules
            .keys()
            .any(|k| k.starts_with("lora_te2_") || k.starts_with("text_encoder_2."))
        {
            return Some("SDXL");
        }
        self.modules.iter().find_map(|(k, m)| {
            if !(k.ends_with("attn2_to_k") || k.ends_with("attn2.to_k")) {
                return None;
            }
            let width = match &m.factors {
                Factors::LoRA { down, .. } => down.dims().get(1).copied(),
                Factors::LoHa { w1b, .. } => w1b.dims().get(1).copied(),
                Factors::LoKr { .. } => None,
            }?;
            Some(crate::targets::family_of_width(width)).filter(|f| *f != "unknown")
        })
    }

    /// What the file holds, one fact a line (`sdctl lora inspect`): format, modules per
    /// part, kinds, ranks, alphas.
    pub fn describe(&self, path: &std::path::Path) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let mut ranks = std::collections::BTreeSet::new();
        let mut alphas = std::collections::BTreeSet::new();
        let (mut unet, mut te, mut other) = (0, 0, 0);
        let mut kinds = std::collections::BTreeMap::new();
        for (k, m) in &self.modules {
            if let Some(r) = m.rank() {
                ranks.insert(r);
            }
            if let Some(al) = m.alpha {
                alphas.insert(format!("{al}"));
            }
            *kinds
                .entry(match (&m.factors, m.factors_is_conv()) {
                    (Factors::LoRA { .. }, true) => "LoCon (conv)",
                    (Factors::LoRA { .. }, false) => "LoRA",
                    (Factors::LoHa { .. }, _) => "LoHa",
                    (Factors::LoKr { .. }, _) => "LoKr",
                })
                .or_insert(0) += 1;
            if k.starts_with("lora_unet_") || k.starts_with("unet.") {
                unet += 1;
            } else if k.starts_with("lora_te") || k.starts_with("text_encoder") {
                te += 1;
            } else {
                other += 1;
            }
        }
        let _ = writeln!(out, "file: {}", path.display());
        let _ = writeln!(out, "format: {}", self.format);
        let _ = writeln!(
            out,
            "family: {}",
            self.family()
                .unwrap_or("unknown (no text encoder 2 or attn2.to_k module)")
        );
        let _ = writeln!(
            out,
            "modules: {} (UNet {unet}, text encoder {te}{})",
            self.modules.len(),
            if other > 0 {
                format!(", unprefixed {other}")
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            out,
            "kinds: {}",
            kinds
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(out, "ranks: {:?}", ranks);
        let _ = writeln!(
            out,
            "alphas: {}",
            if alphas.is_empty() {
                "none (alpha = rank)".to_string()
            } else {
                alphas.into_iter().collect::<Vec<_>>().join(", ")
            }
        );
        out
    }
}
