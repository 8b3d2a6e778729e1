//! Loading a diffusers-layout model folder (`model_index.json`, `unet/`, `vae/`,
//! `text_encoder/`, `tokenizer/`, `scheduler/`): fp32/fp16/bf16 safetensors, memory-mapped,
//! sharded or not, with weight patches applied as tensors are read. [`StableDiffusion::load`]
//! hands a single file over to [`super::single_file`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use sd_plugins_api::{ModelPart, WeightPatch};

use super::backend::{apply_patches, to_dtype_fast};
use super::files::weight_files;
use super::single_file::{self, Mapped};
use crate::error::{read_json, Error, Result};
use crate::model::clip::ClipTextModel;
use crate::model::config::{ClipConfig, UNetConfig, VaeConfig};
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::AutoencoderKL;
use crate::samplers::SchedulerConfig;
use crate::stable_diffusion::{Offload, StableDiffusion};
use crate::text::tokenizer::ClipTokenizer;

/// A safetensors backend that adds the deltas of weight patches to the tensors it reads.
struct Patched {
    inner: candle_core::safetensors::MmapedSafetensors,
    part: ModelPart,
    patches: Vec<Arc<dyn WeightPatch>>,
}

impl Patched {
    fn apply(&self, name: &str, t: Tensor) -> candle_core::Result<Tensor> {
        apply_patches(&self.patches, self.part, name, t)
    }
}

impl SimpleBackend for Patched {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = to_dtype_fast(self.inner.load(name, dev)?, dtype)?;
        if t.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: t.shape().clone(),
            }
            .bt());
        }
        self.apply(name, t)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = to_dtype_fast(self.inner.load(name, dev)?, dtype)?;
        self.apply(name, t)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// Build a model from a component folder's weights, naming the file in any error.
pub fn load_component<T>(
    files: &[PathBuf],
    part: ModelPart,
    patches: &[Arc<dyn WeightPatch>],
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<T>,
) -> Result<T> {
    let shown = files[0].clone();
    tracing::debug!(file = %shown.display(), files = files.len(), ?part, "reading weights");
    let wrap = |source| Error::Weights {
        path: shown.clone(),
        source,
    };
    if files.len() == 1 && sd_weights::pickle::is_pickle(&files[0]) {
        // a .pth / .ckpt: read (safely) into memory, names as stored
        let store = sd_weights::pickle::load(&files[0])?;
        let backend = Mapped::identity(store, part, patches);
        let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
        return build(vb).map_err(wrap);
    }
    // SAFETY: the files are memory-mapped read-only; like every mmap-based loader, we rely
    // on them not being modified while the model is alive.
    let inner =
        unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }.map_err(wrap)?;
    let backend = Patched {
        inner,
        part,
        patches: patches.to_vec(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    build(vb).map_err(wrap)
}

impl StableDiffusion {
    /// Load a diffusers-layout folder. `patches` (LoRA...) are added to the weights as read.
    pub fn load(
        root: &Path,
        device: &Device,
        dtype: DType,
        patches: &[Arc<dyn WeightPatch>],
    ) -> Result<Self> {
        Self::load_with_vae(root, device, dtype, patches, None)
    }

    /// [`StableDiffusion::load`] for a diffusers folder or a single-file checkpoint, with the
    /// VAE optionally taken from its own file (`--vae`).
    pub fn load_with_vae(
        root: &Path,
        device: &Device,
        dtype: DType,
        patches: &[Arc<dyn WeightPatch>],
        vae: Option<&Path>,
    ) -> Result<Self> {
        Self::load_placed(root, device, dtype, patches, vae, Offload::None)
    }

    /// [`StableDiffusion::load_with_vae`] with the text encoders and the VAE placed by
    /// `offload`.
    pub fn load_placed(
        root: &Path,
        device: &Device,
        dtype: DType,
        patches: &[Arc<dyn WeightPatch>],
        vae: Option<&Path>,
        offload: Offload,
    ) -> Result<Self> {
        if root.is_file() {
            return single_file::Checkpoint::open(root)?
                .load_placed(device, dtype, patches, vae, offload);
        }
        if !root.is_dir() {
            return Err(Error::io(
                root,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model folder not found"),
            ));
        }
        let index = root.join("model_index.json");
        if !index.is_file() {
            return Err(Error::config(
                root,
                "not a diffusers model folder: model_index.json not found",
            ));
        }
        let index: serde_json::Value = read_json(&index)?;
        let sub = |name: &str| -> Result<PathBuf> {
            let d = root.join(name);
            if d.is_dir() {
                Ok(d)
            } else {
                Err(Error::config(
                    root,
                    format!("component folder `{name}/` not found"),
                ))
            }
        };
        let unet_dir = sub("unet")?;
        let vae_dir = sub("vae")?;
        let flag = |k: &str| index.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
        // the SDXL refiner has only the second text encoder: it is then the one encoder
        let only_second =
            !root.join("text_encoder").is_dir() && root.join("text_encoder_2").is_dir();
        let (te_dir, tok_dir, te_part) = if only_second {
            (
                sub("text_encoder_2")?,
                sub("tokenizer_2")?,
                ModelPart::TextEncoder2,
            )
        } else {
            (
                sub("text_encoder")?,
                sub("tokenizer")?,
                ModelPart::TextEncoder,
            )
        };
        let sched_dir = sub("scheduler")?;

        let unet_cfg = UNetConfig::from_file(&unet_dir.join("config.json"))?;
        let vae_cfg = VaeConfig::from_file(&vae_dir.join("config.json"))?;
        let clip_cfg = ClipConfig::from_file(&te_dir.join("config.json"))?;
        // SDXL: a second encoder (and tokenizer) whose features are concatenated after the
        // first's; its projected pooled output feeds the UNet's added embedding
        let second = if unet_cfg.text_time.is_some() && !only_second {
            let dir = sub("text_encoder_2")?;
            let cfg = ClipConfig::from_file(&dir.join("config.json"))?;
            let tok = ClipTokenizer::from_dir(&sub("tokenizer_2")?)?;
            tok.check_fits(cfg.vocab_size, &dir)?;
            Some((dir, cfg, tok))
        } else {
            None
        };
        let text_width = clip_cfg.hidden_size + second.as_ref().map_or(0, |s| s.1.hidden_size);
        if text_width != unet_cfg.cross_attention_dim {
            return Err(Error::config(
                &te_dir,
                format!(
                    "text encoder width {text_width}{} does not match the UNet's cross_attention_dim {}",
                    if second.is_some() { " (both encoders)" } else { "" },
                    unet_cfg.cross_attention_dim
                ),
            ));
        }
        let l = vae_cfg.latent_channels;
        if ![l, l + 1, 2 * l + 1].contains(&unet_cfg.in_channels) {
            return Err(Error::config(
                &unet_dir,
                format!(
                    "UNet in_channels {} fits neither plain ({l}), depth ({}) nor inpainting ({}) use of a VAE with {l} latent channels",
                    unet_cfg.in_channels,
                    l + 1,
                    2 * l + 1
                ),
            ));
        }
        let scheduler_config =
            SchedulerConfig::from_file(&sched_dir.join("scheduler_config.json"))?;
        let tokenizer = ClipTokenizer::from_dir(&tok_dir)?;
        tokenizer.check_fits(clip_cfg.vocab_size, &te_dir)?;

        let unet = load_component(
            &weight_files(&unet_dir)?,
            ModelPart::Unet,
            patches,
            dtype,
            device,
            |vb| UNet2DConditionModel::new(&unet_cfg, vb),
        )?;
        let (aux, te_dtype) = offload.text_placement(device, dtype);
        let vae_dtype = offload.vae_dtype(vae_cfg.run_dtype(dtype, unet_cfg.text_time.is_some()));
        let vae = match vae {
            Some(v) => single_file::load_vae(v, &vae_cfg, patches, vae_dtype, &aux)?,
            None => load_component(
                &weight_files(&vae_dir)?,
                ModelPart::Vae,
                patches,
                vae_dtype,
                &aux,
                |vb| AutoencoderKL::new(&vae_cfg, vb),
            )?,
        };
        let text_encoder = load_component(
            &weight_files(&te_dir)?,
            te_part,
            patches,
            te_dtype,
            &aux,
            |vb| ClipTextModel::new(&clip_cfg, vb),
        )?;
        let text_encoder_2 = match second {
            Some((dir, cfg, tok)) => {
                let te = load_component(
                    &weight_files(&dir)?,
                    ModelPart::TextEncoder2,
                    patches,
                    te_dtype,
                    &aux,
                    |vb| ClipTextModel::new(&cfg, vb),
                )?;
                if !te.has_projection() {
                    return Err(Error::config(
                        &dir,
                        "SDXL's second text encoder needs `text_projection.weight` (a CLIPTextModelWithProjection)",
                    ));
                }
                Some((te, tok))
            }
            None => None,
        };
        if only_second && !text_encoder.has_projection() {
            return Err(Error::config(
                &te_dir,
                "an SDXL refiner's text encoder needs `text_projection.weight` (a CLIPTextModelWithProjection)",
            ));
        }
        let force_zeros_for_empty_prompt = flag("force_zeros_for_empty_prompt");
        let requires_aesthetics_score = flag("requires_aesthetics_score");
        tracing::debug!(root = %root.display(), ?dtype, "loaded a diffusers model folder");
        Ok(Self {
            root: root.to_path_buf(),
            unet,
            vae,
            text_encoder,
            tokenizer,
            text_encoder_2,
            force_zeros_for_empty_prompt,
            requires_aesthetics_score,
            vae_dtype,
            scheduler_config,
            device: device.clone(),
            dtype,
            aux_device: aux,
            embeddings: Default::default(),
            vae_tiling: Default::default(),
        })
    }
}
