//! The optimizer loop every trainer runs: step counting, the learning-rate schedule, gradient
//! accumulation, global-norm clipping, the AdamW update, and the report and checkpoint cadence.
//! What differs between trainers (the loss, the log, what a checkpoint holds) comes through
//! [`TrainTask`].

use std::collections::HashMap;

use candle_core::Tensor;

use crate::error::Result;
use crate::optim::AdamW;

/// A learning rate held constant after an optional linear warm-up from 0 (diffusers'
/// `constant` and `constant_with_warmup` schedulers).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub lr: f64,
    /// Steps of linear warm-up; 0 for none.
    pub warmup_steps: usize,
}

impl LrSchedule {
    /// The learning rate at optimizer step `step` (0-based).
    pub fn at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            self.lr * (step as f64 / self.warmup_steps.max(1) as f64)
        } else {
            self.lr
        }
    }
}

/// How the loop runs.
#[derive(Debug, Clone, Copy)]
pub struct LoopConfig {
    /// The loop ends when this many optimizer steps are done.
    pub max_steps: usize,
    pub lr: LrSchedule,
    /// Micro-batches per optimizer step; their gradients are averaged.
    pub gradient_accumulation: usize,
    /// The gradients' global norm is clipped to this (`torch.nn.utils.clip_grad_norm_`); 0
    /// leaves them as they are.
    pub max_grad_norm: f64,
    /// A checkpoint after every this many steps.
    pub checkpointing_steps: usize,
    /// Whether the last step writes a checkpoint as well (so that a resumable run ends on one),
    /// or leaves the end to the caller.
    pub checkpoint_last: bool,
}

/// One optimizer step, done.
#[derive(Debug, Clone)]
pub struct StepDone<E> {
    /// Steps done, this one included (1-based).
    pub step: usize,
    pub max_steps: usize,
    /// The loss, averaged over the micro-batches.
    pub loss: f32,
    /// The learning rate the step used.
    pub lr: f64,
    /// What each micro-batch gave beside its loss, in order.
    pub extras: Vec<E>,
}

/// What a trainer gives the loop.
pub trait TrainTask {
    /// What a micro-batch gives beside its loss (numbers for the trainer's log).
    type Extra;
    /// What the trainer reports after each step.
    type Report;
    /// The optimizer over the trained variables.
    fn optimizer(&mut self) -> &mut AdamW;
    /// Optimizer steps done; the loop advances it after each update.
    fn steps_done(&mut self) -> &mut usize;
    /// The loss of micro-batch `micro` of optimizer step `step` (0-based); the loop takes its
    /// gradients.
    fn micro_loss(&mut self, step: usize, micro: usize) -> Result<(Tensor, Self::Extra)>;
    /// After an optimizer step: check and log it; returns what to report.
    fn stepped(&mut self, done: StepDone<Self::Extra>) -> Result<Self::Report>;
    /// Write a checkpoint of the current state.
    fn checkpoint(&mut self) -> Result<()>;
    /// Called after each step's report and checkpoint; does nothing unless overridden.
    fn after_step(&mut self) -> Result<()> {
        Ok(())
    }
}

impl LoopConfig {
    /// One optimizer step: the micro-batches' gradients averaged, their global norm clipped,
    /// one AdamW update at the schedule's learning rate; advances the step count.
    pub fn step<T: TrainTask>(&self, task: &mut T) -> Result<StepDone<T::Extra>> {
        let step = *task.steps_done();
        let lr = self.lr.at(step);
        let accum = self.gradient_accumulation;
        let mut sum: HashMap<String, Tensor> = HashMap::new();
        let mut loss_sum = 0f32;
        let mut extras = Vec::with_capacity(accum);
        for micro in 0..accum {
            let (loss, extra) = task.micro_loss(step, micro)?;
            loss_sum += loss.to_scalar::<f32>()?;
            extras.push(extra);
            let grads = sd_pipeline::model::checkpoint::backward(&loss)?;
            for (name, var) in task.optimizer().vars() {
                if let Some(g) = grads.get(var.as_tensor()) {
                    // one micro-batch: the gradient as it is (dividing by 1 would only turn
                    // -0 into +0, which no later operation tells apart)
                    let g = if accum == 1 {
                        g.clone()
                    } else {
                        (g / accum as f64)?
                    };
                    let e = match sum.remove(name) {
                        Some(s) => (s + g)?,
                        None => g,
                    };
                    sum.insert(name.clone(), e);
                }
            }
        }
        // torch.nn.utils.clip_grad_norm_, the squares summed in the variables' (sorted) order
        if self.max_grad_norm > 0.0 {
            let mut total = 0f64;
            for (name, _) in task.optimizer().vars() {
                if let Some(g) = sum.get(name) {
                    total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
                }
            }
            let coef = self.max_grad_norm / (total.sqrt() + 1e-6);
            if coef < 1.0 {
                for g in sum.values_mut() {
                    *g = (&*g * coef)?;
                }
            }
        }
        task.optimizer().step(&sum, lr)?;
        *task.steps_done() += 1;
        Ok(StepDone {
            step: step + 1,
            max_steps: self.max_steps,
            loss: loss_sum / accum as f32,
            lr,
            extras,
        })
    }

    /// Whether a checkpoint follows step `step` (1-based).
    pub fn checkpoint_due(&self, step: usize) -> bool {
        if step >= self.max_steps {
            self.checkpoint_last
        } else {
            step.is_multiple_of(self.checkpointing_steps)
        }
    }

    /// Step until `max_steps` are done (from wherever the task's count stands): after each
    /// step the task logs it, `report` gets its report, a checkpoint follows when due, then
    /// the task's `after_step`.
    pub fn run<T: TrainTask>(&self, task: &mut T, report: &mut dyn FnMut(T::Report)) -> Result<()> {
        while *task.steps_done() < self.max_steps {
            let done = self.step(task)?;
            let step = done.step;
            report(task.stepped(done)?);
            if self.checkpoint_due(step) {
                task.checkpoint()?;
            }
            task.after_step()?;
        }
        Ok(())
    }
}

/// Refuse a training run whose step at `resolution` x `resolution`, `batch` images at a
/// time, would not fit in the memory available (`sd_plugins_api::memory`), before anything
/// is loaded. The estimate is the larger of the UNet's kept activations (at latent size,
/// times `networks`: 2 where a ControlNet trains beside the frozen UNet) and the VAE's (at
/// full size, activations kept through encoder and decoder); the configs are the model
/// folder's, SD 1.5's where they cannot be read (a bad config is reported when loading).
pub fn check_memory(
    model: &std::path::Path,
    resolution: u32,
    batch: usize,
    networks: f64,
) -> Result<()> {
    use sd_pipeline::model::config::{UNetConfig, VaeConfig};
    let unet = UNetConfig::from_file(&model.join("unet/config.json"))
        .unwrap_or_else(|_| UNetConfig::sd15());
    let vae = VaeConfig::from_file(&model.join("vae/config.json")).ok();
    let f = vae.as_ref().map_or(8, |v| v.downscale_factor()) as f64;
    let vae_values = vae.as_ref().map_or(4.0 * 256.0, |v| v.values_per_pixel());
    let unet_bytes = 4.0 * networks * unet.values_per_latent_pixel(true) / (f * f);
    // encoder and decoder, each keeping about four times its working maps for the backward
    let vae_bytes = 4.0 * 8.0 * vae_values;
    let cost = sd_plugins_api::memory::Cost {
        per_pixel: unet_bytes.max(vae_bytes),
        fixed: 0,
        peak: if unet_bytes > vae_bytes {
            "the UNet's activations kept for the backward pass".into()
        } else {
            "the VAE's activations kept for the backward pass".into()
        },
    };
    sd_plugins_api::memory::check(
        "training resolution",
        resolution as usize,
        resolution as usize,
        batch,
        8,
        &cost,
    )
    .map_err(|e| crate::error::TrainError::Invalid(format!("{e} (resolution, batch_size)")))
}

/// Every training number finite and in its range: the first that is not, as
/// `adam_weight_decay: must be a finite number at least 0, got -1` (the one message style of
/// `sd_plugins_api::number`).
pub fn check_numbers(values: &[(&str, f64, sd_plugins_api::number::Range)]) -> Result<()> {
    for (key, x, range) in values {
        range
            .check(*x)
            .map_err(|m| crate::error::TrainError::Invalid(format!("{key}: {m}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_up_is_linear_then_constant() {
        let s = LrSchedule {
            lr: 1e-3,
            warmup_steps: 2,
        };
        assert_eq!(
            [s.at(0), s.at(1), s.at(2), s.at(9)],
            [0.0, 5e-4, 1e-3, 1e-3]
        );
        let c = LrSchedule {
            lr: 1e-3,
            warmup_steps: 0,
        };
        assert_eq!(c.at(0), 1e-3);
    }

    #[test]
    fn checkpoint_cadence() {
        let mut c = LoopConfig {
            max_steps: 5,
            lr: LrSchedule {
                lr: 1.0,
                warmup_steps: 0,
            },
            gradient_accumulation: 1,
            max_grad_norm: 0.0,
            checkpointing_steps: 2,
            checkpoint_last: true,
        };
        let due = |c: &LoopConfig| (1..=5).filter(|&s| c.checkpoint_due(s)).collect::<Vec<_>>();
        assert_eq!(due(&c), [2, 4, 5]);
        c.checkpoint_last = false;
        c.max_steps = 4;
        assert_eq!(due(&c)[..], [2]);
    }
}

#[cfg(test)]
mod number_tests {
    #[test]
    fn optimiser_numbers_are_range_checked() {
        use sd_plugins_api::number::Range;
        let e = super::check_numbers(&[
            ("learning_rate", 1e-4, Range::above(0.0)),
            ("adam_weight_decay", -1.0, Range::at_least(0.0)),
        ])
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "adam_weight_decay: must be a finite number at least 0, got -1"
        );
        let e = super::check_numbers(&[("max_grad_norm", f64::NAN, Range::at_least(0.0))])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "max_grad_norm: must be a finite number at least 0, got NaN"
        );
    }
}
