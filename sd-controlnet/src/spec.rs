//! A control unit as the user describes it (the keys of a `[[control]]` table, or of
//! `sdctl --control model=...,image=...`; parsing and checking those is the CLI settings'
//! job), and how it becomes a [`ControlUnit`]: ControlNet loaded, image preprocessed and sized.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use sd_pipeline::StableDiffusion;
use sd_plugins_api::{
    hwc3, resolve_params, ImageBuf, InputKind, ParamValue, Params, Preprocessor, Registry,
};

use crate::control_image::{
    fit_map, inpaint_tensor, load_control_image, load_unit_mask, to_tensor,
};
use sd_preprocessors::detect::{detect_file, Sizing, RESOLUTIONS};

use crate::error::{ControlError, Result};
use crate::ip_adapter::IpAdapter;
use crate::lllite::Lllite;
use crate::reference::ReferenceUnit;
use crate::t2i_adapter::T2IAdapter;
use crate::unit_model::{load_image_encoder, load_unit_model, ModelCache, UnitModel};
use crate::units::{
    check_span, AdapterUnit, ControlMode, ControlUnit, IpAdapterUnit, LlliteUnit, ResizeMode, Unit,
};

/// A preprocessor by name with its parameters as given (checked against its declaration).
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessorChoice {
    pub name: String,
    pub params: Vec<(String, ParamValue)>,
}

impl PreprocessorChoice {
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            params: Vec::new(),
        }
    }

    /// `none` means the image is used as it is.
    pub fn is_none(&self) -> bool {
        self.name == "none"
    }

    /// Check the name and parameters against the registry; every problem is listed.
    pub fn resolve(&self, registry: &Registry) -> std::result::Result<Params, Vec<String>> {
        if self.is_none() {
            return match self.params.first() {
                Some((k, _)) => Err(vec![format!("{k}: preprocessor none takes no parameters")]),
                None => Ok(Params::default()),
            };
        }
        let Some(p) = registry.preprocessor(&self.name) else {
            let mut names = registry.preprocessor_names();
            names.insert(0, "none");
            let hint = match sd_plugins_api::params::closest(&self.name, &names) {
                Some(c) => format!("did you mean `{c}`?"),
                None => format!("available: {}", names.join(", ")),
            };
            return Err(vec![format!(
                "unknown preprocessor {:?} ({hint})",
                self.name
            )]);
        };
        resolve_params(&p.params(), &self.params).map_err(|errs| {
            errs.into_iter()
                .map(|e| format!("preprocessor {} parameter {e}", self.name))
                .collect()
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct UnitSpec {
    pub model: PathBuf,
    pub image: PathBuf,
    pub weight: f64,
    pub start: f64,
    pub end: f64,
    pub mode: ControlMode,
    pub resize: ResizeMode,
    pub preprocessor: Option<PreprocessorChoice>,
    pub mask: Option<PathBuf>,
    pub layer_weights: Option<Vec<f64>>,
    /// The processor resolution a preprocessor runs at (sd-webui-controlnet's
    /// `processor_res`), as `sdctl detect --resolution`.
    pub resolution: usize,
    /// A union ControlNet's control type by name (`type=openpose|depth|...`).
    pub control_type: Option<String>,
    /// An IP-Adapter's CLIP image encoder (folder or file); default: an `image_encoder`
    /// folder beside the IP-Adapter file or one level up (the h94/IP-Adapter layout).
    pub encoder: Option<PathBuf>,
}

/// References an IP-Adapter unit takes from one folder at most (each is encoded).
pub const MAX_REFERENCES: usize = 64;

/// An IP-Adapter unit's reference images: the file, or every image in the folder (sorted by
/// name; A1111's multi-input, averaged after encoding).
fn reference_images(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if !path.is_dir() {
        return Err(ControlError::file(path, "reference image not found"));
    }
    let read = std::fs::read_dir(path).map_err(|e| ControlError::file(path, e.to_string()))?;
    let mut found: Vec<PathBuf> = read
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                    ["png", "jpg", "jpeg", "webp", "bmp"].contains(&e.to_ascii_lowercase().as_str())
                })
        })
        .take(MAX_REFERENCES + 1)
        .collect();
    if found.is_empty() {
        return Err(ControlError::file(
            path,
            "no reference images (.png, .jpg, .webp, .bmp) in this folder",
        ));
    }
    if found.len() > MAX_REFERENCES {
        return Err(ControlError::file(
            path,
            format!("more than {MAX_REFERENCES} reference images in this folder"),
        ));
    }
    found.sort();
    Ok(found)
}

impl UnitSpec {
    pub fn new(model: impl Into<PathBuf>, image: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            image: image.into(),
            weight: 1.0,
            start: 0.0,
            end: 1.0,
            mode: ControlMode::Balanced,
            resize: ResizeMode::Crop,
            preprocessor: None,
            mask: None,
            layer_weights: None,
            resolution: Sizing::default().resolution,
            control_type: None,
            encoder: None,
        }
    }

    /// Check values that need no files.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ControlError::Invalid(m));
        check_span(self.start, self.end)?;
        if !RESOLUTIONS.contains(&self.resolution) {
            return bad(format!(
                "control resolution={}: use {}..={}",
                self.resolution,
                RESOLUTIONS.start(),
                RESOLUTIONS.end()
            ));
        }
        if let Err(m) = sd_plugins_api::number::Range::ANY.check(self.weight) {
            return bad(format!("control weight: {m}"));
        }
        if let Some(t) = &self.control_type {
            crate::union::type_index(t)?;
        }
        Ok(())
    }

    /// Load the ControlNet, the image (and mask) at the generation size, checking that the
    /// ControlNet fits the base model, before any denoising.
    pub fn build(
        &self,
        sd: &StableDiffusion,
        width: usize,
        height: usize,
        cache: &mut ModelCache,
        registry: &Registry,
    ) -> Result<Unit> {
        self.validate()?;
        if let Some(p) = self
            .preprocessor
            .as_ref()
            .filter(|p| p.name.starts_with("reference"))
        {
            return self.build_reference(p, sd, width, height, registry);
        }
        let pre = match &self.preprocessor {
            Some(choice) if !choice.is_none() => {
                let params = choice
                    .resolve(registry)
                    .map_err(|e| ControlError::Invalid(e.join("; ")))?;
                let p = registry
                    .preprocessor(&choice.name)
                    .cloned()
                    .ok_or_else(|| {
                        ControlError::Invalid(format!("unknown preprocessor {:?}", choice.name))
                    })?;
                Some((p, params))
            }
            _ => None,
        };
        let device: &Device = &sd.device;
        let model = load_unit_model(&self.model, sd, cache)?;
        if let UnitModel::Adapter(a) = &model {
            self.check_adapter(a, sd, width, height)?;
        }
        if let UnitModel::IpAdapter(a) = &model {
            return self.build_ip(a.clone(), sd, cache);
        }
        if self.image.is_dir() {
            return Err(ControlError::file(
                &self.image,
                "a folder of images is for IP-Adapter units; this unit takes one control image",
            ));
        }
        let fitted =
            |out: ImageBuf| to_tensor(&fit_map(&hwc3(&out), width, height, self.resize), device);
        let image = if let Some(kind) = InputKind::of_file(&self.image) {
            // A file that is not a picture (an OpenPose keypoint file): read by the chosen
            // preprocessor, or without one by the first registered that takes such files.
            let (p, params) = self.file_reader(kind, pre, registry)?;
            let out = p
                .process_file(&self.image, (width, height), &params)
                .map_err(|e| ControlError::file(&self.image, e.to_string()))?;
            fitted(out)?
        } else if let Some((p, params)) = pre {
            // the same path as `sdctl detect`: at the unit's processor resolution
            if !self.image.is_file() {
                return Err(ControlError::file(&self.image, "control image not found"));
            }
            let sizing = Sizing {
                resolution: self.resolution,
                pad: false,
            };
            let out = detect_file(
                registry,
                p.as_ref(),
                &self.image,
                &params,
                sizing,
                (width, height),
            )
            .map_err(ControlError::Invalid)?
            .map;
            let out = ImageBuf::new(out.width, out.height, out.channels, out.data)
                .map_err(|e| ControlError::Invalid(format!("preprocessor {}: {e}", p.name())))?;
            // a preprocessor taking a masked image returns the marked image, RGBA
            if p.takes(InputKind::MaskedImage) && out.channels == 4 {
                inpaint_tensor(&out, width, height, self.resize, device)?
            } else {
                fitted(out)?
            }
        } else {
            load_control_image(&self.image, width, height, self.resize, device)?
        };
        let mask = self
            .mask
            .as_deref()
            .map(|m| load_unit_mask(m, device))
            .transpose()?;
        let net = match model {
            UnitModel::ControlNet(net) => net,
            UnitModel::Adapter(adapter) => {
                return Ok(Unit::Adapter(AdapterUnit {
                    adapter,
                    image,
                    weight: self.weight,
                    start: self.start,
                    end: self.end,
                }))
            }
            UnitModel::Lllite(model) => {
                let layers = self.check_lllite(&model, sd, width, height)?;
                return Ok(Unit::Lllite(LlliteUnit {
                    model,
                    image,
                    weight: self.weight,
                    start: self.start,
                    end: self.end,
                    layers,
                }));
            }
            UnitModel::IpAdapter(_) | UnitModel::ImageEncoder(_) => {
                return Err(ControlError::file(&self.model, "not a control unit model"))
            }
        };
        let unit = ControlUnit {
            net,
            image,
            weight: self.weight,
            start: self.start,
            end: self.end,
            mode: self.mode,
            layer_weights: self.layer_weights.clone(),
            mask,
            union_type: self
                .control_type
                .as_deref()
                .map(crate::union::type_index)
                .transpose()?,
        };
        let latent_channels = sd.vae.config().latent_channels;
        unit.validate_for(sd.unet.config(), sd.unet.num_skips(), latent_channels)
            .map_err(|e| match e {
                ControlError::Invalid(m) => ControlError::file(&self.model, m),
                e => e,
            })?;
        Ok(Unit::ControlNet(unit))
    }

    /// A reference unit (sd-webui-controlnet's `reference_only`): no model, the image fitted
    /// to the generation size and encoded to latents (the VAE's mean).
    fn build_reference(
        &self,
        choice: &PreprocessorChoice,
        sd: &StableDiffusion,
        width: usize,
        height: usize,
        registry: &Registry,
    ) -> Result<Unit> {
        let refuse =
            |m: String| ControlError::Invalid(format!("preprocessor {}: {m}", choice.name));
        let (attention, adain) = match choice.name.as_str() {
            "reference_only" => (true, false),
            "reference_adain" => (false, true),
            "reference_adain+attn" => (true, true),
            _ => return Err(refuse(
                "unknown reference mode: reference_only, reference_adain or reference_adain+attn"
                    .into(),
            )),
        };
        let model = self.model.to_string_lossy();
        if !(model.is_empty() || model == "none" || model == "None") {
            return Err(refuse(format!(
                "a reference unit takes no model (model = \"{model}\"): leave it out or set none"
            )));
        }
        let extra = self.controlnet_only_keys();
        if !extra.is_empty() {
            return Err(refuse(format!(
                "a reference unit takes image, weight, start, end and resize, not {}",
                extra.join(", ")
            )));
        }
        let params = choice
            .resolve(registry)
            .map_err(|e| ControlError::Invalid(e.join("; ")))?;
        let style_fidelity = params
            .float("style_fidelity")
            .unwrap_or(0.5)
            .clamp(0.0, 1.0);
        let image = load_control_image(&self.image, width, height, self.resize, &sd.device)?;
        // the VAE runs where the model placed it (`--lowvram`: the CPU)
        let pixels = ((image * 2.0)? - 1.0)?
            .to_device(&sd.aux_device)?
            .to_dtype(sd.vae_dtype)?;
        let latents = sd
            .vae
            .scale_latents(&sd.vae.encode_mean(&pixels)?)?
            .to_device(&sd.device)?;
        Ok(Unit::Reference(ReferenceUnit {
            latents,
            weight: self.weight,
            start: self.start,
            end: self.end,
            style_fidelity,
            alphas_cumprod: sd_pipeline::samplers::alphas_cumprod(&sd.scheduler_config),
            seed: 0,
            attention,
            adain,
        }))
    }

    /// The keys only ControlNets take, when set.
    fn controlnet_only_keys(&self) -> Vec<&'static str> {
        let mut extra = Vec::new();
        if self.mode != ControlMode::Balanced {
            extra.push("mode");
        }
        if self.mask.is_some() {
            extra.push("mask");
        }
        if self.layer_weights.is_some() {
            extra.push("layer_weights");
        }
        if self.control_type.is_some() {
            extra.push("type");
        }
        extra
    }

    /// An IP-Adapter unit: the adapter against the base UNet, its image encoder, the
    /// reference image encoded at the encoder's size (not fitted to the generation).
    fn build_ip(
        &self,
        adapter: Arc<IpAdapter>,
        sd: &StableDiffusion,
        cache: &mut ModelCache,
    ) -> Result<Unit> {
        let refuse = |m: String| Err(ControlError::file(&self.model, m));
        let mut extra = self.controlnet_only_keys();
        // A1111's IP-Adapter preprocessors name the image encoder; here `encoder=` does
        let ip_pre = |n: &str| n.starts_with("ip-adapter") || n.starts_with("clip_vision");
        if self
            .preprocessor
            .as_ref()
            .is_some_and(|p| !p.is_none() && !ip_pre(&p.name))
        {
            extra.push("preprocessor");
        }
        if !extra.is_empty() {
            return refuse(format!(
                "an IP-Adapter unit takes image, weight, start, end and encoder, not {}",
                extra.join(", ")
            ));
        }
        let dims = sd.unet.cross_attention_dims();
        let base = sd.unet.config();
        if let Err(m) = adapter.validate_for(&dims, base.cross_attention_dim, base.family()) {
            return refuse(m);
        }
        let encoder_path = match &self.encoder {
            Some(p) => p.clone(),
            None => {
                let dir = self.model.parent().unwrap_or(Path::new("."));
                let found = [dir.join("image_encoder"), dir.join("../image_encoder")]
                    .into_iter()
                    .find(|p| p.is_dir());
                match found {
                    Some(p) => p,
                    None => {
                        return refuse(
                            "an IP-Adapter needs its CLIP image encoder: set encoder=FOLDER_OR_FILE (no image_encoder folder beside it)".into(),
                        )
                    }
                }
            }
        };
        let encoder = load_image_encoder(&encoder_path, sd, cache)?;
        let want = adapter.config().image_dim;
        let ec = encoder.config();
        let got = if adapter.config().uses_hidden_states() {
            ec.hidden_size
        } else {
            ec.projection_dim
        };
        if got != want {
            return Err(ControlError::file(
                &encoder_path,
                format!(
                    "this image encoder gives {got}-wide outputs; the IP-Adapter {} takes {want} (ViT-H is 1024/1280 wide, ViT-bigG 1280/1664)",
                    self.model.display()
                ),
            ));
        }
        let mut pixels = Vec::new();
        for path in reference_images(&self.image)? {
            let img = sd_plugins_api::image_input::open_image(&path)
                .map_err(|e| ControlError::file(&path, e.to_string()))?
                .to_rgb8();
            pixels.push(encoder.preprocess(
                img.as_raw(),
                img.width() as usize,
                img.height() as usize,
            )?);
        }
        let pixels = Tensor::cat(&pixels, 0)?.to_device(&sd.device)?;
        Ok(Unit::IpAdapter(IpAdapterUnit {
            adapter,
            encoder,
            pixels,
            weight: self.weight,
            start: self.start,
            end: self.end,
            counts: (dims.0.len(), dims.1.len(), dims.2.len()),
        }))
    }

    /// A ControlNet-LLLite unit: the keys it takes, its modules' layers in the base UNet,
    /// the image size its strided embeddings need. Returns the layers.
    fn check_lllite(
        &self,
        m: &Lllite,
        sd: &StableDiffusion,
        width: usize,
        height: usize,
    ) -> Result<Vec<usize>> {
        let refuse = |m: String| ControlError::file(&self.model, m);
        let extra = self.controlnet_only_keys();
        if !extra.is_empty() {
            return Err(refuse(format!(
                "a ControlNet-LLLite unit takes weight, start and end, not {}",
                extra.join(", ")
            )));
        }
        let layers = m
            .layer_indices(&sd.unet.transformer_layers(), sd.unet.config())
            .map_err(refuse)?;
        if !width.is_multiple_of(m.stride) || !height.is_multiple_of(m.stride) {
            return Err(refuse(format!(
                "this ControlNet-LLLite needs width and height that are multiples of {}; the generation is {width}x{height}",
                m.stride
            )));
        }
        Ok(layers)
    }

    /// A T2I-Adapter unit: the keys it takes, its family and channels against the base, and
    /// the image size its unshuffle needs; errors name the model file.
    fn check_adapter(
        &self,
        a: &T2IAdapter,
        sd: &StableDiffusion,
        width: usize,
        height: usize,
    ) -> Result<()> {
        let refuse = |m: String| Err(ControlError::file(&self.model, m));
        let extra = self.controlnet_only_keys();
        if !extra.is_empty() {
            return refuse(format!(
                "a T2I-Adapter unit takes weight, start and end (its features are added inside the UNet), not {}",
                extra.join(", ")
            ));
        }
        if let Err(m) = a.validate_for(sd.unet.config(), sd.vae_scale_factor()) {
            return refuse(m);
        }
        let f = a.config().downscale_factor;
        if !width.is_multiple_of(f) || !height.is_multiple_of(f) {
            return refuse(format!(
                "this T2I-Adapter needs width and height that are multiples of {f}; the generation is {width}x{height}"
            ));
        }
        Ok(())
    }

    /// The preprocessor reading this unit's image, a file of `kind`, with its parameters:
    /// the chosen one when it takes such files, else (none chosen) the registry's first
    /// that does, with its defaults.
    fn file_reader(
        &self,
        kind: InputKind,
        chosen: Option<(Arc<dyn Preprocessor>, Params)>,
        registry: &Registry,
    ) -> Result<(Arc<dyn Preprocessor>, Params)> {
        let refuse = || {
            let readers: Vec<&str> = registry.taking(kind).map(|p| p.name()).collect();
            let how = if readers.is_empty() {
                "no registered preprocessor reads it".to_string()
            } else {
                format!(
                    "use it with preprocessor {} (or none)",
                    readers.join(" or ")
                )
            };
            let ext = self.image.extension().unwrap_or_default().to_string_lossy();
            ControlError::file(
                &self.image,
                format!("a .{ext} control image is {}: {how}", kind.describe()),
            )
        };
        match chosen {
            Some((p, params)) if p.takes(kind) => Ok((p, params)),
            Some(_) => Err(refuse()),
            None => {
                let p = registry.taking(kind).next().ok_or_else(refuse)?.clone();
                let params = resolve_params(&p.params(), &[]).map_err(|errs| {
                    let errs: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
                    ControlError::Invalid(format!("preprocessor {}: {}", p.name(), errs.join("; ")))
                })?;
                Ok((p, params))
            }
        }
    }
}
