//! Single-file checkpoints as A1111 and ComfyUI users have them: LDM-format `.safetensors`,
//! and `.ckpt` / `.pth` pickles read without executing code (both read by `sd-weights`). The
//! architecture comes from the keys and shapes ([`detect`]), or from a sidecar `NAME.yaml`
//! (the original LDM config) when present; [`names`] maps diffusers parameter names to the
//! file's, and [`convert`] turns a single file into a diffusers folder and back.

pub mod convert;
pub mod detect;
pub mod names;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use sd_plugins_api::{ModelPart, WeightPatch};
use sd_weights::Store;

use crate::error::{Error, Result};
use crate::loading::backend::{apply_patches, to_dtype_fast};
use crate::model::clip::ClipTextModel;
use crate::model::config::{ClipConfig, UNetConfig, UNetConfigFile, VaeConfig, VaeConfigFile};
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::AutoencoderKL;
use crate::samplers::SchedulerConfig;
use crate::stable_diffusion::{Offload, StableDiffusion};
use crate::text::tokenizer::ClipTokenizer;

pub use detect::{Detected, Family, Kind, Sidecar, TextEncoderFile, TextLayout};
use names::{Source, Transform};

type NameMap = Box<dyn Fn(&str) -> Option<Source> + Send + Sync>;

/// A VarBuilder backend reading diffusers names from a single file through a name map, with
/// weight patches applied as tensors are read.
pub struct Mapped {
    store: Arc<Store>,
    map: NameMap,
    part: ModelPart,
    patches: Vec<Arc<dyn WeightPatch>>,
}

impl Mapped {
    /// Tensors read under their own names.
    pub fn identity(
        store: HashMap<String, Tensor>,
        part: ModelPart,
        patches: &[Arc<dyn WeightPatch>],
    ) -> Self {
        Self {
            store: Arc::new(Store::Mem(store)),
            map: Box::new(|n: &str| {
                Some(Source {
                    name: n.to_string(),
                    transform: Transform::None,
                })
            }),
            part,
            patches: patches.to_vec(),
        }
    }

    fn fetch(&self, name: &str) -> candle_core::Result<Tensor> {
        let src = (self.map)(name).ok_or_else(|| candle_core::Error::CannotFindTensor {
            path: name.to_string(),
        })?;
        let t = self.store.get(&src.name)?;
        match src.transform {
            Transform::None => Ok(t),
            Transform::Squeeze1x1 => match t.dims() {
                [o, i, 1, 1] => t.reshape((*o, *i)),
                _ => Ok(t),
            },
            Transform::Third(k) => {
                let n = t.dim(0)? / 3;
                t.narrow(0, k * n, n)?.contiguous()
            }
            Transform::Transpose => t.t()?.contiguous(),
        }
    }
}

impl SimpleBackend for Mapped {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.fetch(name)?;
        if t.shape() != &s {
            candle_core::bail!(
                "{name}: the file's tensor has shape {:?}, the model expects {:?}",
                t.dims(),
                s.dims()
            );
        }
        let t = to_dtype_fast(t, dtype)?.to_device(dev)?;
        apply_patches(&self.patches, self.part, name, t)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = to_dtype_fast(self.fetch(name)?, dtype)?.to_device(dev)?;
        apply_patches(&self.patches, self.part, name, t)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        (self.map)(name).is_some_and(|s| self.store.contains(&s.name))
    }
}

/// `NAME.yaml` next to `NAME.safetensors|.ckpt|.pth`.
pub fn sidecar_path(path: &Path) -> PathBuf {
    path.with_extension("yaml")
}

/// A full checkpoint, opened and detected.
pub struct Checkpoint {
    pub path: PathBuf,
    pub store: Arc<Store>,
    pub detected: Detected,
    /// The sidecar yaml, when one was used.
    pub sidecar: Option<PathBuf>,
}

impl Checkpoint {
    pub fn open(path: &Path) -> Result<Self> {
        let store = Store::open(path)?;
        let shapes = store.shapes();
        match detect::kind(&shapes) {
            Kind::Checkpoint => {}
            Kind::ControlNet => {
                return Err(Error::config(
                    path,
                    "this is a ControlNet, not a base model: use it in a control unit (--control model=...)",
                ))
            }
            Kind::Lora => {
                return Err(Error::config(
                    path,
                    "this is a LoRA, not a base model: use --lora or a [[lora]] table",
                ))
            }
            Kind::Vae => {
                return Err(Error::config(
                    path,
                    "this is a VAE on its own, not a base model: use --vae",
                ))
            }
            Kind::Unknown => {
                return Err(Error::config(
                    path,
                    "not a Stable Diffusion checkpoint: no model.diffusion_model.* keys (see `sdctl model inspect`)",
                ))
            }
        }
        let yaml = sidecar_path(path);
        let (side, sidecar) = if yaml.is_file() {
            let s = detect::read_sidecar(&yaml).map_err(|m| Error::config(&yaml, m))?;
            (s, Some(yaml.clone()))
        } else {
            (Sidecar::default(), None)
        };
        let hint = |m: String| {
            if sidecar.is_none() {
                format!("{m} (no sidecar {} next to it: a non-standard or tiny model needs its original LDM config there)", yaml.display())
            } else {
                m
            }
        };
        let detected = detect::detect(&shapes, &side).map_err(|m| Error::config(path, hint(m)))?;
        let ck = Self {
            path: path.to_path_buf(),
            store: Arc::new(store),
            detected,
            sidecar: sidecar.clone(),
        };
        // every config is checked now, so a bad one is an error before anything loads
        let checked = ck.unet_config().and(ck.vae_config()).and(ck.clip_config());
        if let Err(e) = checked {
            return Err(Error::config(path, hint(e.to_string())));
        }
        tracing::debug!(
            path = %path.display(),
            family = ?ck.detected.family,
            sidecar = ?ck.sidecar,
            "detected a single-file checkpoint"
        );
        Ok(ck)
    }

    pub fn unet_config(&self) -> Result<UNetConfig> {
        let raw: UNetConfigFile = serde_json::from_value(self.detected.unet.clone())
            .map_err(|e| Error::config(&self.path, format!("detected UNet config: {e}")))?;
        UNetConfig::from_raw(&raw, &self.path)
    }

    pub fn vae_config(&self) -> Result<VaeConfig> {
        let raw: VaeConfigFile = serde_json::from_value(self.detected.vae.clone())
            .map_err(|e| Error::config(&self.path, format!("detected VAE config: {e}")))?;
        VaeConfig::from_raw(&raw, &self.path)
    }

    /// The first text encoder's config (SDXL: CLIP-L; the refiner: bigG).
    pub fn clip_config(&self) -> Result<ClipConfig> {
        self.text_config(0)
    }

    /// The config of text encoder `i` of [`Detected::text_encoders`].
    pub fn text_config(&self, i: usize) -> Result<ClipConfig> {
        let te = self.detected.text_encoders.get(i).ok_or_else(|| {
            Error::config(
                &self.path,
                format!("this checkpoint has no text encoder {}", i + 1),
            )
        })?;
        ClipConfig::from_value(&te.config, &self.path)
    }

    /// The text encoder loaded as `part`.
    fn text_encoder_file(&self, part: ModelPart) -> Option<&TextEncoderFile> {
        self.detected.text_encoders.iter().find(|t| t.part == part)
    }

    /// The name map of one component (diffusers name -> the file's tensor).
    pub fn name_map(&self, part: ModelPart) -> Result<NameMap> {
        Ok(match part {
            ModelPart::Unet => {
                let cfg = self.unet_config()?;
                Box::new(move |n: &str| names::unet(n, &cfg))
            }
            ModelPart::Vae => {
                let levels = self.vae_config()?.block_out_channels.len();
                Box::new(move |n: &str| names::vae(n, levels))
            }
            ModelPart::TextEncoder | ModelPart::TextEncoder2 => {
                let te = self.text_encoder_file(part).ok_or_else(|| {
                    Error::config(
                        &self.path,
                        format!(
                            "this {} checkpoint has no {}",
                            self.detected.family.name(),
                            if part == ModelPart::TextEncoder2 {
                                "second (SDXL) text encoder"
                            } else {
                                "text encoder"
                            }
                        ),
                    )
                })?;
                match te.layout {
                    TextLayout::Clip { prefix, text_model } => {
                        Box::new(move |n: &str| names::clip(n, prefix, text_model))
                    }
                    TextLayout::OpenClip { prefix, .. } => {
                        // SD2 files carry an unused text_projection: only SDXL's bigG has one
                        let projected = te.config.get("projection_dim").is_some();
                        Box::new(move |n: &str| {
                            if n == "text_projection.weight" && !projected {
                                return None;
                            }
                            names::openclip(n, prefix)
                        })
                    }
                }
            }
        })
    }

    fn vb(
        &self,
        part: ModelPart,
        patches: &[Arc<dyn WeightPatch>],
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>> {
        let backend = Mapped {
            store: self.store.clone(),
            map: self.name_map(part)?,
            part,
            patches: patches.to_vec(),
        };
        Ok(VarBuilder::from_backend(
            Box::new(backend),
            dtype,
            device.clone(),
        ))
    }

    /// Build the pipeline's models from the file.
    pub fn load(
        &self,
        device: &Device,
        dtype: DType,
        patches: &[Arc<dyn WeightPatch>],
        vae_override: Option<&Path>,
    ) -> Result<StableDiffusion> {
        self.load_placed(device, dtype, patches, vae_override, Offload::None)
    }

    /// [`Checkpoint::load`] with the text encoders and the VAE placed by `offload`.
    pub fn load_placed(
        &self,
        device: &Device,
        dtype: DType,
        patches: &[Arc<dyn WeightPatch>],
        vae_override: Option<&Path>,
        offload: Offload,
    ) -> Result<StableDiffusion> {
        let wrap = |source| Error::Weights {
            path: self.path.clone(),
            source,
        };
        let unet_cfg = self.unet_config()?;
        let vae_cfg = self.vae_config()?;
        let unet =
            UNet2DConditionModel::new(&unet_cfg, self.vb(ModelPart::Unet, patches, dtype, device)?)
                .map_err(wrap)?;
        let (aux, te_dtype) = offload.text_placement(device, dtype);
        let vae_dtype = offload.vae_dtype(vae_cfg.run_dtype(dtype, unet_cfg.text_time.is_some()));
        let vae = match vae_override {
            Some(v) => load_vae(v, &vae_cfg, patches, vae_dtype, &aux)?,
            None => {
                AutoencoderKL::new(&vae_cfg, self.vb(ModelPart::Vae, patches, vae_dtype, &aux)?)
                    .map_err(wrap)?
            }
        };
        // SD 1.x/2.x and SDXL base: the first encoder is `text_encoder`; SDXL's bigG is
        // `text_encoder_2`, or the refiner's only encoder
        let mut encoders = Vec::new();
        for (i, te) in self.detected.text_encoders.iter().enumerate() {
            let cfg = self.text_config(i)?;
            let model = ClipTextModel::new(&cfg, self.vb(te.part, patches, te_dtype, &aux)?)
                .map_err(wrap)?;
            let tok = ClipTokenizer::embedded(te.pad_token)?;
            tok.check_fits(cfg.vocab_size, &self.path)?;
            encoders.push((model, tok));
        }
        let mut encoders = encoders.into_iter();
        let (text_encoder, tokenizer) = encoders
            .next()
            .ok_or_else(|| Error::config(&self.path, "no text encoder in the checkpoint"))?;
        let text_encoder_2 = encoders.next();
        let scheduler_config = SchedulerConfig::from_json_str(&self.detected.scheduler.to_string())
            .map_err(|e| Error::config(&self.path, e.to_string()))?;
        tracing::debug!(path = %self.path.display(), ?dtype, "loaded a single-file checkpoint");
        Ok(StableDiffusion {
            root: self.path.clone(),
            unet,
            vae,
            text_encoder,
            tokenizer,
            text_encoder_2,
            force_zeros_for_empty_prompt: self.detected.force_zeros_for_empty_prompt,
            requires_aesthetics_score: self.detected.requires_aesthetics_score,
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

/// Every tensor of a checkpoint, sorted into what the models use, what is known and unused,
/// and what is not understood.
#[derive(Debug, Default)]
pub struct Inventory {
    /// (component, diffusers parameter name, where it is in the file, its shape as a parameter)
    pub params: Vec<(ModelPart, String, Source, Vec<usize>)>,
    /// Known but unused: EMA copies, LDM schedule buffers, OpenCLIP's unused last block and
    /// projection.
    pub ignored: Vec<String>,
    pub unknown: Vec<String>,
}

/// LDM training buffers that carry no weights the pipeline needs.
const LDM_BUFFERS: &[&str] = &[
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
];

impl Checkpoint {
    /// Sort every tensor of the file (see [`Inventory`]).
    pub fn inventory(&self) -> Result<Inventory> {
        let unet = self.unet_config()?;
        let levels = self.vae_config()?.block_out_channels.len();
        let mut inv = Inventory::default();
        let shapes = self.store.shapes();
        let plain = |n: &str| Source {
            name: n.to_string(),
            transform: Transform::None,
        };
        for (key, shape) in &shapes {
            let mut push = |part, name: String, src: Source, shape: Vec<usize>| {
                inv.params.push((part, name, src, shape))
            };
            if let Some(r) = key.strip_prefix(names::UNET) {
                match names::unet_inverse(r, &unet) {
                    Some(n) => push(ModelPart::Unet, n, plain(key), shape.clone()),
                    None => inv.unknown.push(key.clone()),
                }
            } else if let Some(r) = key.strip_prefix(names::VAE) {
                match names::vae_inverse(r, levels) {
                    Some(n) => {
                        let src = names::vae(&n, levels).unwrap_or_else(|| plain(key));
                        let sh = match (src.transform, shape.as_slice()) {
                            (Transform::Squeeze1x1, [o, i, 1, 1]) => vec![*o, *i],
                            _ => shape.clone(),
                        };
                        push(ModelPart::Vae, n, src, sh)
                    }
                    None => inv.unknown.push(key.clone()),
                }
            } else if let Some((te, r)) = self
                .detected
                .text_encoders
                .iter()
                .find_map(|te| key.strip_prefix(te.prefix()).map(|r| (te, r)))
            {
                match te.layout {
                    TextLayout::OpenClip { layers, .. } => {
                        let block = r
                            .strip_prefix("transformer.resblocks.")
                            .and_then(|b| b.split('.').next())
                            .and_then(|b| b.parse::<usize>().ok());
                        let names = names::openclip_inverse(r);
                        let projected = te.config.get("projection_dim").is_some();
                        if r == "text_projection" && projected {
                            // stored for x @ P: the linear weight is its transpose
                            let src = Source {
                                name: key.clone(),
                                transform: Transform::Transpose,
                            };
                            let sh = shape.iter().rev().copied().collect();
                            push(te.part, "text_projection.weight".into(), src, sh);
                        } else if block.is_some_and(|b| b >= layers)
                            || r == "text_projection"
                            || r == "logit_scale"
                        {
                            inv.ignored.push(key.clone());
                        } else if names.is_empty() {
                            inv.unknown.push(key.clone());
                        } else if names.len() == 3 {
                            let mut sh = shape.clone();
                            sh[0] /= 3;
                            for (k, n) in names.into_iter().enumerate() {
                                let src = Source {
                                    name: key.clone(),
                                    transform: Transform::Third(k),
                                };
                                push(te.part, n, src, sh.clone());
                            }
                        } else {
                            push(te.part, names[0].clone(), plain(key), shape.clone());
                        }
                    }
                    TextLayout::Clip { .. } => {
                        let bare = r.strip_prefix("text_model.").unwrap_or(r);
                        if bare.ends_with("position_ids") {
                            inv.ignored.push(key.clone());
                        } else {
                            push(
                                te.part,
                                format!("text_model.{bare}"),
                                plain(key),
                                shape.clone(),
                            );
                        }
                    }
                }
            } else if key.starts_with("model_ema.") || LDM_BUFFERS.contains(&key.as_str()) {
                inv.ignored.push(key.clone());
            } else {
                inv.unknown.push(key.clone());
            }
        }
        Ok(inv)
    }

    /// A component's parameter as the models name it, read through the file's layout.
    pub fn tensor(&self, src: &Source) -> Result<Tensor> {
        let backend = Mapped {
            store: self.store.clone(),
            map: {
                let s = src.clone();
                Box::new(move |_: &str| Some(s.clone()))
            },
            part: ModelPart::Unet,
            patches: Vec::new(),
        };
        backend.fetch(&src.name).map_err(|source| Error::Weights {
            path: self.path.clone(),
            source,
        })
    }

    /// The configs a diffusers folder needs (`config.json` of each component, scheduler).
    pub fn detected(&self) -> &Detected {
        &self.detected
    }
}

/// A VAE from its own file (A1111 VAE files: bare LDM names `encoder.*`, `decoder.*`, or
/// `first_stage_model.*`, or a diffusers VAE), with the architecture of `cfg`.
pub fn load_vae(
    path: &Path,
    cfg: &VaeConfig,
    patches: &[Arc<dyn WeightPatch>],
    dtype: DType,
    device: &Device,
) -> Result<AutoencoderKL> {
    let store = Arc::new(Store::open(path)?);
    let shapes = store.shapes();
    let levels = cfg.block_out_channels.len();
    let map: NameMap = if shapes.keys().any(|k| k.starts_with("encoder.down_blocks.")) {
        Box::new(|n: &str| {
            Some(Source {
                name: n.to_string(),
                transform: Transform::None,
            })
        })
    } else {
        let prefixed = shapes.keys().any(|k| k.starts_with(names::VAE));
        Box::new(move |n: &str| {
            let s = names::vae(n, levels)?;
            Some(if prefixed {
                s
            } else {
                Source {
                    name: s
                        .name
                        .strip_prefix(names::VAE)
                        .unwrap_or(&s.name)
                        .to_string(),
                    transform: s.transform,
                }
            })
        })
    };
    let backend = Mapped {
        store,
        map,
        part: ModelPart::Vae,
        patches: patches.to_vec(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    AutoencoderKL::new(cfg, vb).map_err(|source| Error::Weights {
        path: path.to_path_buf(),
        source,
    })
}
