//! Control units composed through the residual hook: any number, summed as diffusers'
//! `MultiControlNetModel` does, each with its weight, step window, mode, per-layer weights and
//! spatial mask.

use std::str::FromStr;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use sd_pipeline::model::clip_vision::ClipVisionModel;
use sd_plugins_api::{
    ExtraAttention, Hook, HookError, ResidualInput, Residuals, StepInfo, UNetAdditions,
};

use crate::error::ControlError;
use crate::ip_adapter::IpAdapter;
use crate::lllite::{Lllite, LllitePatch};
use crate::model::ControlNetModel;
use crate::reference::ReferenceUnit;
use crate::t2i_adapter::T2IAdapter;
use crate::union::UnionCondition;
use sd_pipeline::rng::TorchRng;

/// A unit's start and end (fractions of the schedule): 0 <= start <= end <= 1.
pub fn check_span(start: f64, end: f64) -> Result<(), ControlError> {
    if (0.0..=1.0).contains(&start) && (0.0..=1.0).contains(&end) && start <= end {
        return Ok(());
    }
    Err(ControlError::Invalid(format!(
        "control start={start} end={end}: need 0 <= start <= end <= 1"
    )))
}
/// How a unit's residuals are scaled and where they apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlMode {
    /// Plain: `weight` on every residual, both CFG halves.
    Balanced,
    /// sd-webui-controlnet's "My prompt is more important" (soft injection): `weight` x
    /// `0.825^(12 - i)` on residual i, both halves (scripts/hook.py; a net with fewer than 13
    /// residuals takes the first ones, as its `zip` and SDXL's `[:10]` do).
    Prompt,
    /// diffusers guess mode: `weight` x `logspace(-1, 0, N)` (within 0.5% of 0.825^(12 - i)
    /// for N = 13), on the conditional half only.
    Control,
}

impl ControlMode {
    /// The name configs use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Balanced => "balanced",
            Self::Prompt => "prompt",
            Self::Control => "control",
        }
    }
    /// sd-webui-controlnet's name (infotext).
    pub fn a1111_name(self) -> &'static str {
        match self {
            Self::Balanced => "Balanced",
            Self::Prompt => "My prompt is more important",
            Self::Control => "ControlNet is more important",
        }
    }
}

impl FromStr for ControlMode {
    type Err = ControlError;
    fn from_str(s: &str) -> Result<Self, ControlError> {
        match s {
            "balanced" => Ok(Self::Balanced),
            "prompt" => Ok(Self::Prompt),
            "control" => Ok(Self::Control),
            o => Err(ControlError::Invalid(format!(
                "unknown control mode {o:?}: expected balanced, prompt or control"
            ))),
        }
    }
}

/// Fitting the control image to the generation size (sd-webui-controlnet's resize modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeMode {
    Just,
    Crop,
    Fill,
}

impl ResizeMode {
    /// The name configs use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Just => "just",
            Self::Crop => "crop",
            Self::Fill => "fill",
        }
    }
    /// sd-webui-controlnet's name (infotext).
    pub fn a1111_name(self) -> &'static str {
        match self {
            Self::Just => "Just Resize",
            Self::Crop => "Crop and Resize",
            Self::Fill => "Resize and Fill",
        }
    }
}

impl FromStr for ResizeMode {
    type Err = ControlError;
    fn from_str(s: &str) -> Result<Self, ControlError> {
        match s {
            "just" => Ok(Self::Just),
            "crop" => Ok(Self::Crop),
            "fill" => Ok(Self::Fill),
            o => Err(ControlError::Invalid(format!(
                "unknown resize mode {o:?}: expected just, crop or fill"
            ))),
        }
    }
}

/// diffusers' keep rule over the steps that run: off when `i/N < start` or `(i+1)/N > end`
/// (for a T2I-Adapter's `end`, the same steps as diffusers' `i < int(N * factor)`).
pub fn window_active(start: f64, end: f64, step: &StepInfo) -> bool {
    let n = (step.total - step.first_index) as f64;
    let i = (step.index - step.first_index) as f64;
    !(i / n < start || (i + 1.0) / n > end)
}

/// A T2I-Adapter with its image and settings: its features are computed once (at the first
/// active step), scaled by `weight` (diffusers' `adapter_conditioning_scale`) and added
/// inside the UNet while the unit is active.
#[derive(Clone)]
pub struct AdapterUnit {
    pub adapter: Arc<T2IAdapter>,
    /// `[1, 3, H, W]` in [0, 1] at the generation size.
    pub image: Tensor,
    pub weight: f64,
    pub start: f64,
    pub end: f64,
}

impl AdapterUnit {
    pub fn new(adapter: Arc<T2IAdapter>, image: Tensor) -> Self {
        Self {
            adapter,
            image,
            weight: 1.0,
            start: 0.0,
            end: 1.0,
        }
    }

    /// The scaled features in `dtype`.
    fn features(&self, dtype: DType) -> candle_core::Result<Vec<Tensor>> {
        self.adapter
            .forward(&self.image.to_dtype(dtype)?)?
            .into_iter()
            .map(|f| f * self.weight)
            .collect()
    }
}

/// An IP-Adapter with its reference image(s) and image encoder: the image prompt's keys and
/// values are made once (at the first active step) and added to every cross-attention layer
/// with `weight` (diffusers' `ip_adapter_scale`) while the unit is active.
#[derive(Clone)]
pub struct IpAdapterUnit {
    pub adapter: Arc<IpAdapter>,
    pub encoder: Arc<ClipVisionModel>,
    /// The reference images, preprocessed for the encoder, `[N, 3, S, S]`; several are
    /// averaged after encoding (one image prompt).
    pub pixels: Tensor,
    pub weight: f64,
    pub start: f64,
    pub end: f64,
    /// The base UNet's cross-attention layers (down, mid, up).
    pub counts: (usize, usize, usize),
}

impl IpAdapterUnit {
    /// The image prompt tokens for the conditional and the unconditional rows: the encoder's
    /// output averaged over the images; the negative is diffusers' (zero `image_embeds`, or
    /// the hidden states of a zero image).
    fn tokens(&self, dtype: DType) -> candle_core::Result<(Tensor, Tensor)> {
        let pixels = self.pixels.to_dtype(dtype)?;
        let out = self.encoder.forward(&pixels)?;
        let hidden = self.adapter.config().uses_hidden_states();
        let (cond, uncond) = if hidden {
            let zero = self
                .encoder
                .forward(&pixels.narrow(0, 0, 1)?.zeros_like()?)?;
            (out.penultimate.mean_keepdim(0)?, zero.penultimate)
        } else {
            let e = out.image_embeds.mean_keepdim(0)?;
            let z = e.zeros_like()?;
            (e, z)
        };
        Ok((
            self.adapter.image_tokens(&cond)?,
            self.adapter.image_tokens(&uncond)?,
        ))
    }

    /// The keys and values for a UNet batch of `batch` items (with CFG: the unconditional
    /// half first).
    fn extra(&self, step: &StepInfo, dtype: DType) -> candle_core::Result<ExtraAttention> {
        let (cond, uncond) = self.tokens(dtype)?;
        let b = step.batch;
        let rows = if step.cfg {
            Tensor::cat(&[&uncond.repeat((b, 1, 1))?, &cond.repeat((b, 1, 1))?], 0)?
        } else {
            cond.repeat((b, 1, 1))?
        };
        let (keys, values) = self.adapter.keys_values(&rows, self.counts)?;
        Ok(ExtraAttention {
            keys,
            values,
            scale: self.weight,
        })
    }
}

/// A ControlNet-LLLite with its control image: the control embedded once (at the first
/// active step), its modules change the attention projections' inputs while active.
#[derive(Clone)]
pub struct LlliteUnit {
    pub model: Arc<Lllite>,
    /// `[1, 3, H, W]` in [0, 1] at the generation size.
    pub image: Tensor,
    pub weight: f64,
    pub start: f64,
    pub end: f64,
    /// Each module's transformer layer in the base UNet's run order.
    pub layers: Vec<usize>,
}

/// Any unit: a ControlNet (residuals), a T2I-Adapter (features inside the UNet), an
/// IP-Adapter (an image prompt in the cross-attention) or a ControlNet-LLLite (the attention
/// projections' inputs).
#[derive(Clone)]
pub enum Unit {
    ControlNet(ControlUnit),
    Adapter(AdapterUnit),
    IpAdapter(IpAdapterUnit),
    Lllite(LlliteUnit),
    Reference(ReferenceUnit),
}

impl Unit {
    /// The unit's control image at the generation size.
    pub fn image(&self) -> &Tensor {
        match self {
            Self::ControlNet(u) => &u.image,
            Self::Adapter(a) => &a.image,
            Self::IpAdapter(a) => &a.pixels,
            Self::Lllite(a) => &a.image,
            Self::Reference(r) => &r.latents,
        }
    }
}

impl From<ControlUnit> for Unit {
    fn from(u: ControlUnit) -> Self {
        Self::ControlNet(u)
    }
}

impl From<ReferenceUnit> for Unit {
    fn from(u: ReferenceUnit) -> Self {
        Self::Reference(u)
    }
}

impl From<LlliteUnit> for Unit {
    fn from(u: LlliteUnit) -> Self {
        Self::Lllite(u)
    }
}

impl From<IpAdapterUnit> for Unit {
    fn from(u: IpAdapterUnit) -> Self {
        Self::IpAdapter(u)
    }
}

impl From<AdapterUnit> for Unit {
    fn from(u: AdapterUnit) -> Self {
        Self::Adapter(u)
    }
}

/// One ControlNet with its image and settings.
#[derive(Clone)]
pub struct ControlUnit {
    pub net: Arc<ControlNetModel>,
    /// `[1, 3, H, W]` in [0, 1] at the generation size.
    pub image: Tensor,
    pub weight: f64,
    pub start: f64,
    pub end: f64,
    pub mode: ControlMode,
    /// One scale per residual (down residuals then mid), replacing the mode's ramp.
    pub layer_weights: Option<Vec<f64>>,
    /// `[1, 1, H, W]` in [0, 1], any size: where the unit applies. Each residual is multiplied
    /// by it resized bilinearly to the residual's size (sd-webui-controlnet's
    /// `apply_effective_region_mask`: `F.interpolate(mask, size, mode="bilinear")`).
    pub mask: Option<Tensor>,
    /// A union ControlNet's control type (`crate::union::TYPES`); `None` for other models.
    pub union_type: Option<usize>,
}

impl ControlUnit {
    pub fn new(net: Arc<ControlNetModel>, image: Tensor) -> Self {
        Self {
            net,
            image,
            weight: 1.0,
            start: 0.0,
            end: 1.0,
            mode: ControlMode::Balanced,
            layer_weights: None,
            mask: None,
            union_type: None,
        }
    }

    /// The scale of each residual (down..., mid).
    pub fn scales(&self) -> Vec<f64> {
        let n = self.net.num_down() + 1;
        if let Some(lw) = &self.layer_weights {
            return lw.iter().map(|w| w * self.weight).collect();
        }
        match self.mode {
            ControlMode::Balanced => vec![self.weight; n],
            ControlMode::Prompt => (0..n)
                .map(|i| self.weight * 0.825f64.powf(12.0 - i as f64))
                .collect(),
            // torch.logspace(-1, 0, n): 10^(-1 + i/(n-1))
            ControlMode::Control => (0..n)
                .map(|i| {
                    let e = if n == 1 {
                        0.0
                    } else {
                        -1.0 + i as f64 / (n - 1) as f64
                    };
                    (10f64.powf(e) as f32) as f64 * self.weight
                })
                .collect(),
        }
    }

    /// diffusers' keep rule over the steps that run: off when `i/N < start` or `(i+1)/N > end`.
    pub fn active(&self, step: &StepInfo) -> bool {
        window_active(self.start, self.end, step)
    }

    /// Check the unit against the base UNet before any denoising.
    pub fn validate_for(
        &self,
        base: &sd_pipeline::model::config::UNetConfig,
        base_skips: usize,
        latent_channels: usize,
    ) -> Result<(), ControlError> {
        let cn = &self.net.config().unet;
        if cn.family() != base.family() {
            return Err(ControlError::Invalid(format!(
                "an {} ControlNet cannot guide an {} model",
                cn.family(),
                base.family()
            )));
        }
        if cn.block_out_channels != base.block_out_channels {
            return Err(ControlError::Invalid(format!(
                "the ControlNet's block channels {:?} do not match the base UNet's {:?} (a ControlNet for another model family?)",
                cn.block_out_channels, base.block_out_channels
            )));
        }
        if cn.cross_attention_dim != base.cross_attention_dim {
            return Err(ControlError::Invalid(format!(
                "the ControlNet expects text embeddings of width {} but the base model's are {} (SD1 is 768, SD2 1024)",
                cn.cross_attention_dim, base.cross_attention_dim
            )));
        }
        self.validate(base_skips, latent_channels)
    }

    /// Check the residual count, latent channels, window and layer weights.
    pub fn validate(&self, base_skips: usize, base_in_channels: usize) -> Result<(), ControlError> {
        if self.net.num_down() != base_skips {
            return Err(ControlError::Invalid(format!(
                "the ControlNet gives {} down residuals but the base UNet has {base_skips} skip connections",
                self.net.num_down()
            )));
        }
        let cin = self.net.config().unet.in_channels;
        if cin != base_in_channels {
            return Err(ControlError::Invalid(format!(
                "the ControlNet takes {cin} latent channels but the base model's latents have {base_in_channels}"
            )));
        }
        check_span(self.start, self.end)?;
        match (&self.net.config().union, self.union_type) {
            (Some(_), None) => {
                return Err(ControlError::Invalid(format!(
                    "a union ControlNet needs the unit's control type: type={}",
                    crate::union::TYPES
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join("|")
                )))
            }
            (None, Some(_)) => {
                return Err(ControlError::Invalid(
                    "type= is for union ControlNets; this ControlNet has one control type".into(),
                ))
            }
            (Some(u), Some(t)) if t >= u.num_control_type => {
                return Err(ControlError::Invalid(format!(
                    "control type {t} is beyond this union ControlNet's {} types (repaint needs an 8-type \"promax\" file)",
                    u.num_control_type
                )))
            }
            _ => {}
        }
        if let Some(lw) = &self.layer_weights {
            if lw.len() != base_skips + 1 {
                return Err(ControlError::Invalid(format!(
                    "layer_weights has {} values; this model needs {} (one per residual)",
                    lw.len(),
                    base_skips + 1
                )));
            }
        }
        Ok(())
    }

    /// The control image's embedding in `dtype`, made once and kept in `hint`.
    fn embedded(&self, hint: &mut Option<Tensor>, dtype: DType) -> candle_core::Result<Tensor> {
        Ok(match hint {
            Some(h) if h.dtype() == dtype => h.clone(),
            _ => {
                let h = self.net.embed_condition(&self.image, dtype)?;
                *hint = Some(h.clone());
                h
            }
        })
    }

    /// This unit's residuals for one step; `cache` keeps the control image's embedding (batch
    /// 1) and the mask at each residual size from the first step for the later ones.
    fn residuals(
        &self,
        step: &StepInfo,
        input: &ResidualInput<'_>,
        cache: &mut UnitCache,
    ) -> candle_core::Result<Residuals> {
        let hint = &mut cache.hint;
        let b = step.batch;
        let cond_only = self.mode == ControlMode::Control && step.cfg;
        let (sample, ctx, added) = if cond_only {
            (
                input.latents.narrow(0, b, b)?,
                input.encoder_hidden_states.narrow(0, b, b)?,
                input.added.map(|a| a.narrow(b, b)).transpose()?,
            )
        } else {
            (
                input.latents.clone(),
                input.encoder_hidden_states.clone(),
                input.added.cloned(),
            )
        };
        let n = sample.dim(0)?;
        let dtype = sample.dtype();
        let embedded = self.embedded(hint, dtype)?;
        let ts = Tensor::full(step.timestep as f32, n, sample.device())?;
        let r = match self.union_type {
            Some(t) => self.net.forward_union(
                &sample,
                &ts,
                &ctx,
                added.as_ref(),
                &[UnionCondition {
                    embedded: &embedded,
                    type_index: t,
                    scale: 1.0,
                }],
            )?,
            None => self
                .net
                .forward_with_hint(&sample, &ts, &ctx, added.as_ref(), &embedded)?,
        };
        let scales = self.scales();
        let masks = &mut cache.masks;
        let mut apply = |t: &Tensor, s: f64| -> candle_core::Result<Tensor> {
            let mut t = (t * s)?;
            if let Some(m) = &self.mask {
                let (_, _, h, w) = t.dims4()?;
                let m = match masks.iter().find(|(size, _)| *size == (h, w)) {
                    Some((_, m)) => m.clone(),
                    None => {
                        let r = m.to_dtype(DType::F32)?.upsample_bilinear2d(h, w, false)?;
                        masks.push(((h, w), r.clone()));
                        r
                    }
                };
                t = t.broadcast_mul(&m.to_dtype(dtype)?)?;
            }
            if cond_only {
                t = Tensor::cat(&[&t.zeros_like()?, &t], 0)?;
            }
            Ok(t)
        };
        let down = r
            .down
            .iter()
            .zip(&scales)
            .map(|(t, &s)| apply(t, s))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mid = apply(&r.mid, scales[scales.len() - 1])?;
        Ok(Residuals { down, mid })
    }
}

/// The residual provider that runs every active unit and sums their residuals (ControlNets)
/// and features (T2I-Adapters).
pub struct ControlNetHook {
    units: Vec<ControlUnit>,
    /// What each unit computes at its first active step and keeps.
    caches: Vec<UnitCache>,
    adapters: Vec<AdapterUnit>,
    /// Each adapter's scaled features, made at its first active step.
    features: Vec<Option<Vec<Tensor>>>,
    ip: Vec<IpAdapterUnit>,
    /// Each IP-Adapter's keys and values, made at its first active step.
    ip_kv: Vec<Option<ExtraAttention>>,
    lllite: Vec<LlliteUnit>,
    /// Each LLLite's control embeddings, made at its first active step.
    lllite_patch: Vec<Option<Arc<LllitePatch>>>,
    /// Reference-only units, each with its noise stream.
    reference: Vec<(ReferenceUnit, TorchRng)>,
}

/// A unit's control image embedding, and its mask resized to each residual's size (the
/// extension's bilinear `apply_effective_region_mask`).
#[derive(Default)]
struct UnitCache {
    hint: Option<Tensor>,
    masks: Vec<((usize, usize), Tensor)>,
}

impl ControlNetHook {
    /// A hook for any mix of units (ControlNets and T2I-Adapters).
    pub fn new<U: Into<Unit>>(units: Vec<U>) -> Self {
        let (mut nets, mut adapters, mut ip) = (Vec::new(), Vec::new(), Vec::new());
        let mut lllite = Vec::new();
        let mut reference = Vec::new();
        for u in units {
            match u.into() {
                Unit::Reference(r) => {
                    let rng = TorchRng::new(r.seed);
                    reference.push((r, rng))
                }
                Unit::ControlNet(u) => nets.push(u),
                Unit::Adapter(a) => adapters.push(a),
                Unit::IpAdapter(a) => ip.push(a),
                Unit::Lllite(a) => lllite.push(a),
            }
        }
        let lllite_patch = lllite.iter().map(|_| None).collect();
        let caches = nets.iter().map(|_| UnitCache::default()).collect();
        let features = adapters.iter().map(|_| None).collect();
        let ip_kv = ip.iter().map(|_| None).collect();
        Self {
            units: nets,
            caches,
            adapters,
            features,
            ip,
            ip_kv,
            lllite,
            lllite_patch,
            reference,
        }
    }
}

impl ControlNetHook {
    /// Several units of one union model at one step: one forward with each unit's image, type
    /// and weight; the residuals are not scaled again (diffusers). Per-unit modes, layer
    /// weights and masks cannot apply inside one forward, so they are refused.
    fn union_group(
        &mut self,
        group: &[usize],
        step: &StepInfo,
        input: &ResidualInput<'_>,
    ) -> Result<Residuals, HookError> {
        for &j in group {
            let u = &self.units[j];
            if u.mode != ControlMode::Balanced || u.layer_weights.is_some() || u.mask.is_some() {
                return Err(HookError::failed(
                    "controlnet",
                    format!(
                        "units {} share one union ControlNet and run as one forward: they take no mode, layer_weights or mask (unit {} has one)",
                        group.iter().map(|g| (g + 1).to_string()).collect::<Vec<_>>().join(", "),
                        j + 1
                    ),
                ));
            }
        }
        let dtype = input.latents.dtype();
        let mut embedded = Vec::with_capacity(group.len());
        for &j in group {
            let unit = &self.units[j];
            embedded.push(unit.embedded(&mut self.caches[j].hint, dtype)?);
        }
        let conds: Vec<UnionCondition<'_>> = group
            .iter()
            .zip(&embedded)
            .map(|(&j, e)| UnionCondition {
                embedded: e,
                type_index: self.units[j].union_type.expect("a union unit"),
                scale: self.units[j].weight,
            })
            .collect();
        let n = input.latents.dim(0)?;
        let ts = Tensor::full(step.timestep as f32, n, input.latents.device())?;
        Ok(self.units[group[0]].net.forward_union(
            input.latents,
            &ts,
            input.encoder_hidden_states,
            input.added,
            &conds,
        )?)
    }
}

impl Hook for ControlNetHook {
    fn name(&self) -> &str {
        "controlnet"
    }

    /// The active adapters' features, summed (diffusers' `MultiAdapter` with the units'
    /// weights).
    fn additions(
        &mut self,
        step: &StepInfo,
        input: &ResidualInput<'_>,
    ) -> Result<Option<UNetAdditions>, HookError> {
        let dtype = input.latents.dtype();
        let mut total: Option<UNetAdditions> = None;
        for (a, cached) in self.adapters.iter().zip(self.features.iter_mut()) {
            if !window_active(a.start, a.end, step) {
                continue;
            }
            let f = match cached {
                Some(f) if f.first().is_some_and(|t| t.dtype() == dtype) => f.clone(),
                _ => {
                    let f = a.features(dtype)?;
                    *cached = Some(f.clone());
                    f
                }
            };
            let add = UNetAdditions {
                intrablock: f,
                ..Default::default()
            };
            total = Some(match total {
                None => add,
                Some(t) => t.add(&add)?,
            });
        }
        let rows = input.encoder_hidden_states.dim(0)?;
        for (u, cached) in self.ip.iter().zip(self.ip_kv.iter_mut()) {
            if !window_active(u.start, u.end, step) {
                continue;
            }
            let fits = |e: &ExtraAttention| {
                e.keys
                    .first()
                    .is_some_and(|k| k.dtype() == dtype && k.dim(0).ok() == Some(rows))
            };
            let e = match cached {
                Some(e) if fits(e) => e.clone(),
                _ => {
                    let e = u.extra(step, dtype)?;
                    *cached = Some(e.clone());
                    e
                }
            };
            let add = UNetAdditions {
                attention: vec![e],
                ..Default::default()
            };
            total = Some(match total {
                None => add,
                Some(t) => t.add(&add)?,
            });
        }
        let channels = input.sample.dim(1)?;
        for (u, rng) in self.reference.iter_mut() {
            if !window_active(u.start, u.end, step) {
                continue;
            }
            let add = UNetAdditions {
                reference: vec![u.pass(step, rows, channels, dtype, rng)?],
                ..Default::default()
            };
            total = Some(match total {
                None => add,
                Some(t) => t.add(&add)?,
            });
        }
        for (u, cached) in self.lllite.iter().zip(self.lllite_patch.iter_mut()) {
            if !window_active(u.start, u.end, step) {
                continue;
            }
            let p = match cached {
                Some(p) => p.clone(),
                None => {
                    let image = u.image.to_dtype(dtype)?;
                    let p: Arc<LllitePatch> = Arc::new(u.model.patch(&image, &u.layers, u.weight)?);
                    *cached = Some(p.clone());
                    p
                }
            };
            let add = UNetAdditions {
                projections: vec![p as Arc<dyn sd_plugins_api::ProjectionInputs>],
                ..Default::default()
            };
            total = Some(match total {
                None => add,
                Some(t) => t.add(&add)?,
            });
        }
        Ok(total)
    }

    fn residuals(
        &mut self,
        step: &StepInfo,
        input: &ResidualInput<'_>,
    ) -> Result<Option<Residuals>, HookError> {
        let mut total: Option<Residuals> = None;
        let active: Vec<usize> = (0..self.units.len())
            .filter(|&i| self.units[i].active(step))
            .collect();
        let mut done = vec![false; self.units.len()];
        for &i in &active {
            if done[i] {
                continue;
            }
            let unit = &self.units[i];
            // the active units of one union model run as one forward (diffusers' several
            // conditions of a ControlNetUnionModel)
            let group: Vec<usize> = match unit.union_type {
                Some(_) => active
                    .iter()
                    .copied()
                    .filter(|&j| Arc::ptr_eq(&self.units[j].net, &unit.net))
                    .collect(),
                None => vec![i],
            };
            for &j in &group {
                done[j] = true;
            }
            let r = if group.len() == 1 {
                unit.residuals(step, input, &mut self.caches[i])?
            } else {
                self.union_group(&group, step, input)?
            };
            total = Some(match total {
                None => r,
                Some(t) => t.add(&r)?,
            });
        }
        Ok(total)
    }
}
