//! What a unit's model file is (sd-webui-controlnet's model guess: from the keys), and the
//! models loaded for the units of one generation.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sd_pipeline::loading::files::{tensor_shapes, weight_files};
use sd_pipeline::StableDiffusion;

use crate::error::{ControlError, Result};
use crate::ip_adapter::{is_ip_adapter, load_ip_adapter, IpAdapter};
use crate::lllite::{is_lllite, load_lllite, Lllite};
use crate::load::load_controlnet;
use crate::model::ControlNetModel;
use crate::t2i_adapter::{is_t2i_adapter, load_t2i_adapter, T2IAdapter};
use sd_pipeline::model::clip_vision::{load_clip_vision, ClipVisionModel};

/// The kinds of unit model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitKind {
    ControlNet,
    T2IAdapter,
    IpAdapter,
    Lllite,
}

impl UnitKind {
    pub fn describe(self) -> &'static str {
        match self {
            Self::ControlNet => "ControlNet",
            Self::T2IAdapter => "T2I-Adapter",
            Self::IpAdapter => "IP-Adapter",
            Self::Lllite => "ControlNet-LLLite",
        }
    }
}

/// The weights file of a unit model (a folder's first weight file, or the file).
fn weights_of(path: &Path) -> Result<PathBuf> {
    if !path.exists() {
        return Err(ControlError::file(path, "control model not found"));
    }
    if path.is_dir() {
        Ok(weight_files(path)?[0].clone())
    } else {
        Ok(path.to_path_buf())
    }
}

/// What the model at `path` is, from its keys (anything that is no adapter is read as a
/// ControlNet, whose loader names what it lacks).
pub fn unit_kind(path: &Path) -> Result<UnitKind> {
    let shapes = tensor_shapes(&weights_of(path)?)?;
    Ok(if is_t2i_adapter(&shapes) {
        UnitKind::T2IAdapter
    } else if is_ip_adapter(&shapes) {
        UnitKind::IpAdapter
    } else if is_lllite(&shapes) {
        UnitKind::Lllite
    } else {
        UnitKind::ControlNet
    })
}

/// A loaded unit model; units naming one file share it.
#[derive(Clone)]
pub enum UnitModel {
    ControlNet(Arc<ControlNetModel>),
    Adapter(Arc<T2IAdapter>),
    IpAdapter(Arc<IpAdapter>),
    Lllite(Arc<Lllite>),
    /// An IP-Adapter unit's CLIP image encoder.
    ImageEncoder(Arc<ClipVisionModel>),
}

/// The models loaded so far for one generation, by path.
pub type ModelCache = Vec<(PathBuf, UnitModel)>;

/// The model at `path`, from `cache` or loaded (in the base's dtype, on its device).
pub fn load_unit_model(
    path: &Path,
    sd: &StableDiffusion,
    cache: &mut ModelCache,
) -> Result<UnitModel> {
    if let Some((_, m)) = cache.iter().find(|(p, _)| p == path) {
        return Ok(m.clone());
    }
    let m = match unit_kind(path)? {
        UnitKind::ControlNet => UnitModel::ControlNet(Arc::new(load_controlnet(
            path,
            sd.unet.config(),
            &sd.device,
            sd.dtype,
        )?)),
        UnitKind::T2IAdapter => {
            UnitModel::Adapter(Arc::new(load_t2i_adapter(path, &sd.device, sd.dtype)?))
        }
        UnitKind::IpAdapter => UnitModel::IpAdapter(Arc::new(load_ip_adapter(
            &weights_of(path)?,
            &sd.device,
            sd.dtype,
        )?)),
        UnitKind::Lllite => UnitModel::Lllite(Arc::new(load_lllite(
            &weights_of(path)?,
            &sd.device,
            sd.dtype,
        )?)),
    };
    cache.push((path.to_path_buf(), m.clone()));
    Ok(m)
}

/// The CLIP image encoder at `path` (folder or file), from `cache` or loaded.
pub fn load_image_encoder(
    path: &Path,
    sd: &StableDiffusion,
    cache: &mut ModelCache,
) -> Result<Arc<ClipVisionModel>> {
    if let Some((_, UnitModel::ImageEncoder(m))) = cache.iter().find(|(p, _)| p == path) {
        return Ok(m.clone());
    }
    let m = Arc::new(load_clip_vision(path, &sd.device, sd.dtype)?);
    cache.push((path.to_path_buf(), UnitModel::ImageEncoder(m.clone())));
    Ok(m)
}

/// What the unit model at `path` is, in words: its kind, the model family it fits and its
/// architecture (`sdctl controlnet inspect`).
pub fn describe(path: &Path) -> Result<String> {
    let weights = weights_of(path)?;
    let shapes = tensor_shapes(&weights)?;
    if is_t2i_adapter(&shapes) {
        let c = crate::t2i_adapter::inspect(path)?.expect("keys checked");
        return Ok(format!(
            "T2I-Adapter ({}) for {} models: {}-channel input, {}x{} pixel unshuffle, feature channels {:?}, {} resnets per level",
            c.kind.name(),
            c.kind.family(),
            c.in_channels,
            c.downscale_factor,
            c.downscale_factor,
            c.channels,
            c.num_res_blocks
        ));
    }
    if is_ip_adapter(&shapes) {
        let c = crate::ip_adapter::inspect(&weights)?.expect("keys checked");
        let image = if c.uses_hidden_states() {
            "the image encoder's penultimate hidden states"
        } else {
            "the image encoder's image_embeds"
        };
        return Ok(format!(
            "IP-Adapter ({}) for {} models: {} image tokens from {image} ({} wide), {} cross-attention layers",
            c.kind.name(),
            c.family(),
            c.tokens,
            c.image_dim,
            c.layer_dims.len()
        ));
    }
    if is_lllite(&shapes) {
        let n = shapes
            .iter()
            .filter(|(n, _)| n.ends_with(".conditioning1.0.weight"))
            .count();
        return Ok(format!(
            "ControlNet-LLLite (kohya) for SDXL models: {n} modules on attention projections (not mergeable)"
        ));
    }
    let format = crate::load::detect(&shapes, &weights)?;
    let has = |suffix: &str| shapes.iter().any(|(n, _)| n.ends_with(suffix));
    let context = shapes
        .iter()
        .find(|(n, s)| n.ends_with("attn2.to_k.weight") && s.len() == 2)
        .map(|(_, s)| s[1]);
    let family = if has("add_embedding.linear_1.weight") || has("label_emb.0.0.weight") {
        "SDXL".to_string()
    } else {
        match context {
            Some(768) => "SD 1.x".into(),
            Some(1024) => "SD 2.x".into(),
            Some(d) => format!("SD 1.x/2.x-class (text width {d})"),
            None => "SD 1.x/2.x-class".into(),
        }
    };
    let union = shapes
        .iter()
        .find(|(n, _)| n.ends_with("task_embedding"))
        .map(|(_, s)| s[0]);
    let layout = match format {
        crate::load::Format::Diffusers => "diffusers",
        crate::load::Format::Ldm { .. } => "lllyasviel/A1111",
    };
    Ok(match union {
        Some(types) => format!(
            "union ControlNet ({layout} layout) for {family} models: {types} control types (type=...)"
        ),
        None => format!("ControlNet ({layout} layout) for {family} models"),
    })
}
