use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use candle_core::Tensor;

use crate::error::HookError;
use crate::step::StepInfo;

/// Text conditioning, `[batch, tokens, dim]`. `uncond` is `None` when CFG is off. SDXL-class
/// models also take a pooled text vector per prompt (`[batch, dim]`, the second text
/// encoder's projected output); `None` for SD 1.x/2.x.
#[derive(Debug, Clone)]
pub struct Conditioning {
    pub cond: Tensor,
    pub uncond: Option<Tensor>,
    pub pooled: Option<Tensor>,
    pub uncond_pooled: Option<Tensor>,
}

/// SDXL's added conditioning (diffusers' `added_cond_kwargs`) for every row of a UNet batch:
/// the pooled text vector `text_embeds` `[n, P]` and the micro-conditioning `time_ids`
/// `[n, k]` (original size, crop top-left, target size; or the refiner's aesthetic score).
#[derive(Debug, Clone)]
pub struct AddedCond {
    pub text_embeds: Tensor,
    pub time_ids: Tensor,
}

impl AddedCond {
    /// Rows `start..start + len` (the conditional half of a CFG batch, say).
    pub fn narrow(&self, start: usize, len: usize) -> candle_core::Result<AddedCond> {
        Ok(AddedCond {
            text_embeds: self.text_embeds.narrow(0, start, len)?,
            time_ids: self.time_ids.narrow(0, start, len)?,
        })
    }
}

/// What a residual provider (a ControlNet, an adapter) sees at one step.
#[derive(Debug)]
pub struct ResidualInput<'a> {
    /// The scaled latent model input, `[n * batch, C, h, w]`: with CFG the unconditional
    /// half comes first, then the conditional half (diffusers' order).
    pub sample: &'a Tensor,
    /// The 4 latent channels of `sample` when the UNet takes extra channels (inpainting
    /// UNets concatenate mask and masked image); the same tensor as `sample` otherwise.
    pub latents: &'a Tensor,
    pub encoder_hidden_states: &'a Tensor,
    /// SDXL's added conditioning for the rows of `sample`; `None` for SD 1.x/2.x.
    pub added: Option<&'a AddedCond>,
}

/// Additive UNet residuals: one per skip connection of the down path, plus the mid block.
#[derive(Debug, Clone)]
pub struct Residuals {
    pub down: Vec<Tensor>,
    pub mid: Tensor,
}

impl Residuals {
    /// Element-wise sum of two residual sets (several providers are summed).
    pub fn add(&self, other: &Residuals) -> Result<Residuals, HookError> {
        if self.down.len() != other.down.len() {
            return Err(HookError::failed(
                "residuals",
                format!(
                    "cannot sum residual sets of {} and {} down tensors",
                    self.down.len(),
                    other.down.len()
                ),
            ));
        }
        let down = self
            .down
            .iter()
            .zip(&other.down)
            .map(|(a, b)| a.add(b))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Residuals {
            down,
            mid: self.mid.add(&other.mid)?,
        })
    }
}

/// What adapters add inside the UNet at one step (beside a ControlNet's [`Residuals`]).
#[derive(Debug, Clone, Default)]
pub struct UNetAdditions {
    /// T2I-Adapter features (diffusers' `down_intrablock_additional_residuals`): one per down
    /// block, added to its output (after the last resnet/attention pair, or after a block
    /// without attention); a feature left over that has the mid block's shape is added to the
    /// mid block's output (SDXL adapters). Batch 1 (broadcast) or the UNet's batch.
    pub intrablock: Vec<Tensor>,
    /// IP-Adapter image prompts: extra keys and values for every cross-attention layer.
    pub attention: Vec<ExtraAttention>,
    /// Deltas on the attention projections' inputs (ControlNet-LLLite).
    pub projections: Vec<Arc<dyn ProjectionInputs>>,
    /// Reference passes (sd-webui-controlnet's reference-only): the UNet runs on each first,
    /// keeping its self-attention inputs, which the main pass then attends to as well.
    pub reference: Vec<ReferencePass>,
}

/// One reference pass (sd-webui-controlnet's `AttentionInjection`, "write" then "read").
#[derive(Debug, Clone)]
pub struct ReferencePass {
    /// The reference latents noised to this step, one row per UNet batch row.
    pub latents: Tensor,
    /// The unit's weight: transformer layers ranked below it (by width, widest first,
    /// `rank / count`) keep their inputs.
    pub weight: f64,
    /// The extension's style fidelity (threshold_a): how much the unconditional rows keep
    /// their plain self-attention.
    pub style_fidelity: f64,
    /// The first rows of the batch that are unconditional (CFG), 0 without CFG.
    pub uncond_rows: usize,
    /// Attention injection (`reference_only`, `reference_adain+attn`).
    pub attention: bool,
    /// AdaIN on block outputs (`reference_adain`, `reference_adain+attn`).
    pub adain: bool,
}

/// An attention projection whose input an adapter may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Projection {
    /// The self-attention's query, key and value (`attn1.to_q/k/v`).
    SelfQ,
    SelfK,
    SelfV,
    /// The cross-attention's query (`attn2.to_q`).
    CrossQ,
}

/// Adds to the input of attention projections (kohya's ControlNet-LLLite): for transformer
/// layer `layer` (its index in the order the UNet runs them: down blocks, mid, up blocks),
/// what to add to `x` before projection `which`, or `None`.
pub trait ProjectionInputs: Send + Sync + std::fmt::Debug {
    fn delta(
        &self,
        layer: usize,
        which: Projection,
        x: &Tensor,
    ) -> candle_core::Result<Option<Tensor>>;
}

/// One image prompt's keys and values for the UNet's cross-attention layers (diffusers'
/// `IPAdapterAttnProcessor`): layer `i` adds `scale * attention(q, keys[i], values[i])` to its
/// text attention, before the output projection. Layers in the order the UNet runs them (down
/// blocks, mid block, up blocks); each `[n, tokens, inner]` for the UNet's batch `n`.
#[derive(Debug, Clone)]
pub struct ExtraAttention {
    pub keys: Vec<Tensor>,
    pub values: Vec<Tensor>,
    pub scale: f64,
}

impl UNetAdditions {
    /// Whether nothing is added.
    pub fn is_empty(&self) -> bool {
        self.intrablock.is_empty()
            && self.attention.is_empty()
            && self.projections.is_empty()
            && self.reference.is_empty()
    }

    /// Element-wise sum of two sets (several adapters are summed, diffusers' `MultiAdapter`).
    pub fn add(&self, other: &UNetAdditions) -> Result<UNetAdditions, HookError> {
        let intrablock = match (self.intrablock.is_empty(), other.intrablock.is_empty()) {
            (true, _) => other.intrablock.clone(),
            (_, true) => self.intrablock.clone(),
            _ => {
                if self.intrablock.len() != other.intrablock.len() {
                    return Err(HookError::failed(
                        "adapters",
                        format!(
                            "cannot sum adapter feature sets of {} and {} tensors",
                            self.intrablock.len(),
                            other.intrablock.len()
                        ),
                    ));
                }
                self.intrablock
                    .iter()
                    .zip(&other.intrablock)
                    .map(|(a, b)| a.broadcast_add(b))
                    .collect::<candle_core::Result<Vec<_>>>()?
            }
        };
        let attention = self
            .attention
            .iter()
            .chain(&other.attention)
            .cloned()
            .collect();
        let projections = self
            .projections
            .iter()
            .chain(&other.projections)
            .cloned()
            .collect();
        let reference = self
            .reference
            .iter()
            .chain(&other.reference)
            .cloned()
            .collect();
        Ok(UNetAdditions {
            intrablock,
            attention,
            projections,
            reference,
        })
    }
}

/// The UNet's predictions at one step, to be combined into one.
#[derive(Debug)]
pub struct NoisePrediction<'a> {
    pub uncond: Option<&'a Tensor>,
    pub cond: &'a Tensor,
    pub guidance_scale: f64,
}

/// Read access to the sampler's noise schedule (inpaint blending re-noises with it).
pub trait NoiseLevels {
    /// Timesteps of the full schedule.
    fn timesteps(&self) -> &[f64];
    /// `original` noised to the level of schedule index `index`.
    fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        index: usize,
    ) -> candle_core::Result<Tensor>;
}

/// A typed hook into the denoising loop. Every method has a do-nothing default.
pub trait Hook: Send {
    fn name(&self) -> &str;

    /// Edit the text conditioning once, before sampling.
    fn on_conditioning(&mut self, _cond: &mut Conditioning) -> Result<(), HookError> {
        Ok(())
    }

    /// Read or edit the latents before the UNet runs at this step.
    fn before_step(&mut self, _step: &StepInfo, _latents: &mut Tensor) -> Result<(), HookError> {
        Ok(())
    }

    /// Additive residuals for the UNet at this step (ControlNet is one provider).
    fn residuals(
        &mut self,
        _step: &StepInfo,
        _input: &ResidualInput<'_>,
    ) -> Result<Option<Residuals>, HookError> {
        Ok(None)
    }

    /// Additions inside the UNet at this step (T2I-Adapters are providers).
    fn additions(
        &mut self,
        _step: &StepInfo,
        _input: &ResidualInput<'_>,
    ) -> Result<Option<UNetAdditions>, HookError> {
        Ok(None)
    }

    /// Combine cond/uncond predictions. The first hook that returns `Some` wins; plain
    /// classifier-free guidance is used when none does.
    fn on_noise_pred(
        &mut self,
        _step: &StepInfo,
        _pred: &NoisePrediction<'_>,
    ) -> Result<Option<Tensor>, HookError> {
        Ok(None)
    }

    /// Read or edit the latents after the sampler stepped.
    fn after_step(
        &mut self,
        _step: &StepInfo,
        _levels: &dyn NoiseLevels,
        _latents: &mut Tensor,
    ) -> Result<(), HookError> {
        Ok(())
    }

    /// Post-process decoded images, `[batch, 3, H, W]` in [0, 1].
    fn on_image(&mut self, _images: &mut Tensor) -> Result<(), HookError> {
        Ok(())
    }
}

/// An ordered list of hooks, called in order at each hook point.
#[derive(Default)]
pub struct HookSet {
    hooks: Vec<Box<dyn Hook>>,
}

impl HookSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, hook: Box<dyn Hook>) {
        self.hooks.push(hook);
    }

    pub fn len(&self) -> usize {
        self.hooks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hooks.is_empty()
    }

    pub fn names(&self) -> Vec<&str> {
        self.hooks.iter().map(|h| h.name()).collect()
    }

    /// This set with `hooks` in front: they are called first at every hook point, in their
    /// order, until the returned guard is dropped, which removes them again (also when an
    /// error ends the run early). The pipeline adds its own hooks for one generation this
    /// way (the inpaint blend), leaving the caller's set as it was.
    pub fn with_leading(&mut self, hooks: Vec<Box<dyn Hook>>) -> LeadingHooks<'_> {
        let leading = hooks.len();
        self.hooks.splice(0..0, hooks);
        LeadingHooks { set: self, leading }
    }

    pub fn on_conditioning(&mut self, cond: &mut Conditioning) -> Result<(), HookError> {
        self.hooks
            .iter_mut()
            .try_for_each(|h| h.on_conditioning(cond))
    }

    pub fn before_step(&mut self, step: &StepInfo, latents: &mut Tensor) -> Result<(), HookError> {
        self.hooks
            .iter_mut()
            .try_for_each(|h| h.before_step(step, latents))
    }

    /// The sum of every provider's residuals, or `None` when no hook provides any.
    pub fn residuals(
        &mut self,
        step: &StepInfo,
        input: &ResidualInput<'_>,
    ) -> Result<Option<Residuals>, HookError> {
        let mut total: Option<Residuals> = None;
        for hook in self.hooks.iter_mut() {
            if let Some(r) = hook.residuals(step, input)? {
                total = Some(match total {
                    None => r,
                    Some(t) => t.add(&r)?,
                });
            }
        }
        Ok(total)
    }

    /// The sum of every provider's additions, or `None` when no hook provides any.
    pub fn additions(
        &mut self,
        step: &StepInfo,
        input: &ResidualInput<'_>,
    ) -> Result<Option<UNetAdditions>, HookError> {
        let mut total: Option<UNetAdditions> = None;
        for hook in self.hooks.iter_mut() {
            if let Some(a) = hook.additions(step, input)? {
                total = Some(match total {
                    None => a,
                    Some(t) => t.add(&a)?,
                });
            }
        }
        Ok(total.filter(|t| !t.is_empty()))
    }

    /// The guided prediction: the first hook's answer, else plain CFG
    /// `uncond + scale * (cond - uncond)` (or `cond` alone without CFG).
    pub fn noise_pred(
        &mut self,
        step: &StepInfo,
        pred: &NoisePrediction<'_>,
    ) -> Result<Tensor, HookError> {
        for hook in self.hooks.iter_mut() {
            if let Some(t) = hook.on_noise_pred(step, pred)? {
                return Ok(t);
            }
        }
        Ok(classifier_free_guidance(pred)?)
    }

    pub fn after_step(
        &mut self,
        step: &StepInfo,
        levels: &dyn NoiseLevels,
        latents: &mut Tensor,
    ) -> Result<(), HookError> {
        self.hooks
            .iter_mut()
            .try_for_each(|h| h.after_step(step, levels, latents))
    }

    pub fn on_image(&mut self, images: &mut Tensor) -> Result<(), HookError> {
        self.hooks.iter_mut().try_for_each(|h| h.on_image(images))
    }
}

/// A [`HookSet`] with hooks in front for a while (see [`HookSet::with_leading`]); use it as
/// the set itself.
pub struct LeadingHooks<'a> {
    set: &'a mut HookSet,
    leading: usize,
}

impl Deref for LeadingHooks<'_> {
    type Target = HookSet;
    fn deref(&self) -> &HookSet {
        self.set
    }
}

impl DerefMut for LeadingHooks<'_> {
    fn deref_mut(&mut self) -> &mut HookSet {
        self.set
    }
}

impl Drop for LeadingHooks<'_> {
    fn drop(&mut self) {
        // `push` appends, so the leading hooks are still the first ones.
        self.set.hooks.drain(..self.leading);
    }
}

/// Plain classifier-free guidance (diffusers: `uncond + g * (text - uncond)`).
pub fn classifier_free_guidance(pred: &NoisePrediction<'_>) -> candle_core::Result<Tensor> {
    match pred.uncond {
        None => Ok(pred.cond.clone()),
        Some(u) => u.add(&((pred.cond - u)? * pred.guidance_scale)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    struct Const(f32);
    impl Hook for Const {
        fn name(&self) -> &str {
            "const"
        }
        fn residuals(
            &mut self,
            _step: &StepInfo,
            input: &ResidualInput<'_>,
        ) -> Result<Option<Residuals>, HookError> {
            let t = (input.sample.ones_like()? * self.0 as f64)?;
            Ok(Some(Residuals {
                down: vec![t.clone(), t.clone()],
                mid: t,
            }))
        }
    }

    fn step() -> StepInfo {
        StepInfo {
            index: 1,
            first_index: 0,
            total: 4,
            timestep: 500.0,
            batch: 1,
            cfg: true,
        }
    }

    #[test]
    fn residuals_of_several_providers_are_summed() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 2, 2, 2), candle_core::DType::F32, &dev).unwrap();
        let mut set = HookSet::new();
        set.push(Box::new(Const(1.5)));
        set.push(Box::new(Const(2.0)));
        let input = ResidualInput {
            sample: &x,
            latents: &x,
            encoder_hidden_states: &x,
            added: None,
        };
        let r = set.residuals(&step(), &input).unwrap().unwrap();
        let v: Vec<f32> = r.mid.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|&a| (a - 3.5).abs() < 1e-6));
        assert_eq!(r.down.len(), 2);
    }

    #[test]
    fn no_provider_means_no_residuals_and_default_cfg() {
        let dev = Device::Cpu;
        let mut set = HookSet::new();
        let x = Tensor::new(&[1f32, 2.0], &dev).unwrap();
        let input = ResidualInput {
            sample: &x,
            latents: &x,
            encoder_hidden_states: &x,
            added: None,
        };
        assert!(set.residuals(&step(), &input).unwrap().is_none());
        let u = Tensor::new(&[1f32, 1.0], &dev).unwrap();
        let c = Tensor::new(&[2f32, 3.0], &dev).unwrap();
        let g = set
            .noise_pred(
                &step(),
                &NoisePrediction {
                    uncond: Some(&u),
                    cond: &c,
                    guidance_scale: 7.5,
                },
            )
            .unwrap();
        assert_eq!(g.to_vec1::<f32>().unwrap(), vec![8.5, 16.0]);
    }

    /// Appends its name and the latents' first value to a shared log at `after_step`, then
    /// adds 1 to the latents.
    struct Log(&'static str, std::sync::Arc<std::sync::Mutex<Vec<String>>>);
    impl Hook for Log {
        fn name(&self) -> &str {
            self.0
        }
        fn after_step(
            &mut self,
            _step: &StepInfo,
            _levels: &dyn NoiseLevels,
            latents: &mut Tensor,
        ) -> Result<(), HookError> {
            let v = latents.to_vec1::<f32>()?[0];
            self.1.lock().unwrap().push(format!("{}:{v}", self.0));
            *latents = (&*latents + 1.0)?;
            Ok(())
        }
    }

    struct NoLevels;
    impl NoiseLevels for NoLevels {
        fn timesteps(&self) -> &[f64] {
            &[]
        }
        fn add_noise(&self, o: &Tensor, _: &Tensor, _: usize) -> candle_core::Result<Tensor> {
            Ok(o.clone())
        }
    }

    #[test]
    fn leading_hooks_run_first_and_leave_with_the_guard() {
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut set = HookSet::new();
        set.push(Box::new(Log("user", log.clone())));
        let mut x = Tensor::new(&[0f32], &Device::Cpu).unwrap();
        {
            let mut with = set.with_leading(vec![Box::new(Log("builtin", log.clone()))]);
            assert_eq!(with.names(), vec!["builtin", "user"]);
            with.push(Box::new(Log("late", log.clone())));
            with.after_step(&step(), &NoLevels, &mut x).unwrap();
        }
        assert_eq!(set.names(), vec!["user", "late"]);
        assert_eq!(*log.lock().unwrap(), vec!["builtin:0", "user:1", "late:2"]);
    }

    #[test]
    fn fraction_counts_from_the_full_schedule() {
        let s = StepInfo {
            index: 10,
            first_index: 10,
            total: 20,
            ..step()
        };
        assert_eq!(s.fraction(), 0.5);
    }
}
