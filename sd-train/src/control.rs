//! Training ControlNets and T2I-Adapters: a frozen base (UNet, VAE, text encoder), gradients
//! flowing through the frozen UNet into the trained network (and, for a ControlNet with
//! `sd_locked = false`, into the UNet's decoder too), noise, timesteps and targets as diffusers'
//! `examples/controlnet/train_controlnet.py` and `examples/t2i_adapter/train_t2i_adapter_sdxl.py`,
//! AdamW, checkpoints written atomically, and resumption that reproduces an uninterrupted run
//! (every random draw is keyed by the step, so a resumed run draws the same).

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use sd_controlnet::control_image::load_control_image;
use sd_controlnet::units::{ControlNetHook, ResizeMode};
use sd_pipeline::cpu::matmul::{set_precision, Precision};
use sd_pipeline::model::unet::UNet2DConditionModel;
use sd_pipeline::output::{write_file, StagedDir};
use sd_pipeline::rng::{NoiseSource, TorchRng};
use sd_pipeline::samplers::{alphas_cumprod, PredictionType};
use sd_pipeline::{GenerateRequest, StableDiffusion};
use sd_plugins_api::HookSet;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::dataset::{read_dataset, Sample};
use sd_plugins_api::number::Range;

use crate::error::{Result, TrainError};
use crate::files::{io_err, load_raw, read_json, save_weights, vars_from, weights_of};
use crate::network::{Network, NetworkKind, NewNetwork};
use crate::optim::{AdamW, AdamWParams};
use crate::train_loop::{LoopConfig, LrSchedule, StepDone, TrainTask};

fn d_resolution() -> u32 {
    512
}
fn d_one() -> usize {
    1
}
fn d_lr() -> f64 {
    1e-5
}
fn d_sched() -> String {
    "constant".into()
}
fn d_b1() -> f64 {
    0.9
}
fn d_b2() -> f64 {
    0.999
}
fn d_wd() -> f64 {
    1e-2
}
fn d_eps() -> f64 {
    1e-8
}
fn d_clip() -> f64 {
    1.0
}
fn d_ckpt() -> usize {
    500
}
fn d_val() -> usize {
    100
}
fn d_true() -> bool {
    true
}

/// `sdctl train controlnet` and `sdctl train t2i-adapter` settings (config keys; every one is
/// also a flag).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// What is trained (the subcommand sets it).
    #[serde(default)]
    pub network: NetworkKind,
    /// The base model (diffusers folder).
    pub base: PathBuf,
    /// A ControlNet to start from (diffusers folder); otherwise one made from the base.
    #[serde(default)]
    pub controlnet: Option<PathBuf>,
    /// A T2I-Adapter to start from (diffusers folder); otherwise a new one.
    #[serde(default)]
    pub adapter: Option<PathBuf>,
    /// A new T2I-Adapter's architecture: `full_adapter` (default) or `light_adapter`.
    #[serde(default)]
    pub adapter_type: Option<String>,
    pub dataset: PathBuf,
    pub output: PathBuf,
    #[serde(default = "d_resolution")]
    pub resolution: u32,
    #[serde(default = "d_one")]
    pub batch_size: usize,
    #[serde(default = "d_one")]
    pub gradient_accumulation: usize,
    #[serde(default = "d_lr")]
    pub learning_rate: f64,
    /// `constant` or `constant_with_warmup` (linear warm-up over `lr_warmup_steps`).
    #[serde(default = "d_sched")]
    pub lr_scheduler: String,
    #[serde(default)]
    pub lr_warmup_steps: usize,
    #[serde(default = "d_b1")]
    pub adam_beta1: f64,
    #[serde(default = "d_b2")]
    pub adam_beta2: f64,
    #[serde(default = "d_wd")]
    pub adam_weight_decay: f64,
    #[serde(default = "d_eps")]
    pub adam_epsilon: f64,
    #[serde(default = "d_clip")]
    pub max_grad_norm: f64,
    pub max_steps: usize,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "d_ckpt")]
    pub checkpointing_steps: usize,
    #[serde(default)]
    pub validation_prompt: Option<String>,
    #[serde(default)]
    pub validation_image: Option<PathBuf>,
    #[serde(default = "d_val")]
    pub validation_steps: usize,
    /// Caption dropout: the share of prompts replaced by "" (for classifier-free guidance).
    #[serde(default)]
    pub proportion_empty_prompts: f64,
    /// `false` also trains the UNet's decoder (up blocks and output), as lllyasviel allows.
    #[serde(default = "d_true")]
    pub sd_locked: bool,
    /// Only the mid-block residual is added (lllyasviel's `only_mid_control`).
    #[serde(default)]
    pub only_mid_control: bool,
    /// Skip unusable dataset rows (reported) instead of stopping.
    #[serde(default)]
    pub skip_bad_rows: bool,
    /// `no` (f32), `bf16` or `fp16`: the products of the forward and backward passes in bf16
    /// (a CPU with AVX512-BF16) or f16 (AVX512-FP16) with f32 sums (weights, gradients and AdamW
    /// state stay f32, as diffusers' `--mixed_precision` keeps f32 master weights).
    #[serde(default = "d_precision")]
    pub mixed_precision: String,
    /// Keep only each ResNet and transformer block's inputs for the backward pass and run the
    /// block again there (the ControlNet's and the UNet decoder's): less memory, more time.
    #[serde(default)]
    pub gradient_checkpointing: bool,
}

fn d_precision() -> String {
    "no".into()
}

impl TrainConfig {
    /// Values that need no files (the memory estimate reads the base's configs if it can).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Invalid(m));
        if self.max_steps == 0 {
            return bad("max_steps must be at least 1".into());
        }
        if self.batch_size == 0
            || self.gradient_accumulation == 0
            || self.checkpointing_steps == 0
            || self.validation_steps == 0
        {
            return bad("batch_size, gradient_accumulation, checkpointing_steps and validation_steps must be at least 1".into());
        }
        if self.resolution == 0 || !self.resolution.is_multiple_of(8) {
            return bad(format!(
                "resolution {} is not a positive multiple of 8",
                self.resolution
            ));
        }
        crate::train_loop::check_numbers(&[
            ("learning_rate", self.learning_rate, Range::above(0.0)),
            ("adam_beta1", self.adam_beta1, Range::half_open(0.0, 1.0)),
            ("adam_beta2", self.adam_beta2, Range::half_open(0.0, 1.0)),
            (
                "adam_weight_decay",
                self.adam_weight_decay,
                Range::at_least(0.0),
            ),
            ("adam_epsilon", self.adam_epsilon, Range::above(0.0)),
            ("max_grad_norm", self.max_grad_norm, Range::at_least(0.0)),
            (
                "proportion_empty_prompts",
                self.proportion_empty_prompts,
                Range::closed(0.0, 1.0),
            ),
        ])?;
        if !["constant", "constant_with_warmup"].contains(&self.lr_scheduler.as_str()) {
            return bad(format!(
                "lr_scheduler {:?}: expected constant or constant_with_warmup",
                self.lr_scheduler
            ));
        }
        self.precision()?;
        if self.validation_prompt.is_some() != self.validation_image.is_some() {
            return bad("validation needs both validation_prompt and validation_image".into());
        }
        let other = match self.network {
            NetworkKind::Controlnet => [
                ("adapter", self.adapter.is_some()),
                ("adapter_type", self.adapter_type.is_some()),
            ],
            NetworkKind::T2iAdapter => [
                ("controlnet", self.controlnet.is_some()),
                ("sd_locked = false", !self.sd_locked),
            ],
        };
        let only_mid = self.network == NetworkKind::T2iAdapter && self.only_mid_control;
        if let Some((key, _)) = other
            .iter()
            .find(|(_, set)| *set)
            .or(only_mid.then_some(&("only_mid_control", true)))
        {
            return bad(format!(
                "{key}: not a setting for training a {}",
                self.network.label()
            ));
        }
        if self.adapter.is_some() && self.adapter_type.is_some() {
            return bad("adapter_type: the adapter given as adapter has its own type".into());
        }
        // the base's configs if readable (this needs no other file); an adapter's own
        // activations are small beside the UNet's
        let networks = match self.network {
            NetworkKind::Controlnet => 2.0,
            NetworkKind::T2iAdapter => 1.2,
        };
        crate::train_loop::check_memory(&self.base, self.resolution, self.batch_size, networks)
    }

    /// The products' precision that `mixed_precision` names (refused on a CPU without the
    /// instructions it needs).
    pub fn precision(&self) -> Result<Precision> {
        mixed_precision(&self.mixed_precision).map_err(TrainError::Invalid)
    }

    /// The learning rate schedule (diffusers' `constant` or `constant_with_warmup`).
    pub fn lr_schedule(&self) -> LrSchedule {
        LrSchedule {
            lr: self.learning_rate,
            warmup_steps: match self.lr_scheduler.as_str() {
                "constant_with_warmup" => self.lr_warmup_steps,
                _ => 0,
            },
        }
    }

    /// The learning rate at optimizer step `step` (0-based), as diffusers' schedulers.
    pub fn lr_at(&self, step: usize) -> f64 {
        self.lr_schedule().at(step)
    }

    /// How the shared training loop runs: every `checkpointing_steps` and after the last step
    /// a checkpoint.
    pub fn loop_config(&self) -> LoopConfig {
        LoopConfig {
            max_steps: self.max_steps,
            lr: self.lr_schedule(),
            gradient_accumulation: self.gradient_accumulation,
            max_grad_norm: self.max_grad_norm,
            checkpointing_steps: self.checkpointing_steps,
            checkpoint_last: true,
        }
    }
}

/// The products' precision a `mixed_precision` value names, as diffusers' `--mixed_precision`:
/// `no`, `bf16` (AVX512-BF16) or `fp16` (AVX512-FP16); refused on a CPU without the
/// instructions; for the trainers and `sdctl bench train`.
pub fn mixed_precision(name: &str) -> std::result::Result<Precision, String> {
    use sd_pipeline::cpu::matmul::{bf16_supported, f16_supported};
    match name {
        "no" => Ok(Precision::F32),
        "bf16" if bf16_supported() => Ok(Precision::Bf16),
        "bf16" => {
            Err("mixed_precision bf16: this CPU lacks AVX512-BF16 (vdpbf16ps); use no".into())
        }
        "fp16" if f16_supported() => Ok(Precision::F16),
        "fp16" => {
            Err("mixed_precision fp16: this CPU lacks AVX512-FP16 (vfmadd231ph); use no".into())
        }
        other => Err(format!(
            "mixed_precision {other:?}: expected no, bf16 or fp16"
        )),
    }
}

/// The loss of one batch: noise added at `timesteps` (DDPMScheduler.add_noise), the network's
/// control into the UNet, MSE against epsilon or v (diffusers' train_controlnet.py; the
/// T2I-Adapter script's sigma-weighted loss on denoised latents is the same MSE against epsilon).
#[allow(clippy::too_many_arguments)]
pub fn training_loss(
    net: &Network,
    unet: &UNet2DConditionModel,
    latents: &Tensor,
    noise: &Tensor,
    timesteps: &[usize],
    ehs: &Tensor,
    cond: &Tensor,
    alphas_cumprod: &[f32],
    v_prediction: bool,
) -> Result<Tensor> {
    let dev = latents.device();
    let b = timesteps.len();
    let sa: Vec<f32> = timesteps
        .iter()
        .map(|&t| alphas_cumprod[t].sqrt())
        .collect();
    let so: Vec<f32> = timesteps
        .iter()
        .map(|&t| (1.0 - alphas_cumprod[t]).sqrt())
        .collect();
    let sa = Tensor::from_vec(sa, (b, 1, 1, 1), dev)?;
    let so = Tensor::from_vec(so, (b, 1, 1, 1), dev)?;
    let noisy = (latents.broadcast_mul(&sa)? + noise.broadcast_mul(&so)?)?;
    let ts = Tensor::from_vec(
        timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(),
        b,
        dev,
    )?;
    let pred = net.predict(unet, &noisy, &ts, ehs, cond)?;
    let target = if v_prediction {
        (noise.broadcast_mul(&sa)? - latents.broadcast_mul(&so)?)?
    } else {
        noise.clone()
    };
    Ok((pred - target)?.sqr()?.mean_all()?)
}

/// What one optimizer step reports.
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    /// Steps done (1-based).
    pub step: usize,
    pub max_steps: usize,
    pub loss: f32,
    pub lr: f64,
}

/// A training run.
pub struct Trainer {
    pub cfg: TrainConfig,
    sd: StableDiffusion,
    /// The UNet the loss runs through: the base's, or one with a trainable decoder.
    unet: Option<UNet2DConditionModel>,
    net: Network,
    /// The network's diffusers config.json.
    net_config: Value,
    opt: AdamW,
    samples: Vec<Sample>,
    alphas: Vec<f32>,
    v_prediction: bool,
    /// Optimizer steps done.
    pub step: usize,
}

impl Trainer {
    /// Set up a run (or continue the latest checkpoint in `output` with `resume`).
    pub fn new(cfg: TrainConfig, resume: bool, warn: &mut dyn FnMut(String)) -> Result<Self> {
        cfg.validate()?;
        let dev = Device::Cpu;
        if !cfg.base.join("model_index.json").is_file() {
            return Err(TrainError::file(
                &cfg.base,
                "training needs a diffusers model folder as base (convert a single file with `sdctl model convert --to diffusers`)",
            ));
        }
        let (samples, bad, index) = read_dataset(&cfg.dataset)?;
        if !bad.is_empty() {
            let list: Vec<String> = bad.iter().take(10).map(|b| b.to_string()).collect();
            let msg = format!(
                "{}: {} unusable row{}: {}{}",
                index.display(),
                bad.len(),
                if bad.len() == 1 { "" } else { "s" },
                list.join("; "),
                if bad.len() > 10 { "; ..." } else { "" }
            );
            if !cfg.skip_bad_rows {
                return Err(TrainError::Invalid(format!(
                    "{msg} (set skip_bad_rows to skip them)"
                )));
            }
            warn(format!("{msg} (skipped)"));
        }
        if samples.is_empty() {
            return Err(TrainError::file(&index, "no usable rows"));
        }
        let sd = StableDiffusion::load(&cfg.base, &dev, DType::F32, &[])?;
        let kind = cfg.network;

        // where to start: the latest checkpoint, a given ControlNet, or a new one
        let latest = cfg.output.join("latest");
        let (start_dir, step) = if resume {
            let name = std::fs::read_to_string(&latest).map_err(|_| {
                TrainError::file(
                    &latest,
                    "nothing to resume: no checkpoint has been written yet",
                )
            })?;
            let dir = cfg.output.join(name.trim());
            let state: Value = serde_json::from_str(
                &std::fs::read_to_string(dir.join("state.json")).map_err(io_err(&dir))?,
            )
            .map_err(|e| TrainError::file(dir.join("state.json"), e.to_string()))?;
            let step = state["step"].as_u64().unwrap_or(0) as usize;
            let was: NetworkKind =
                serde_json::from_value(state["config"]["network"].clone()).unwrap_or_default();
            if was != kind {
                return Err(TrainError::file(
                    &dir,
                    format!(
                        "is a checkpoint of a {} run; this run trains a {}",
                        was.label(),
                        kind.label()
                    ),
                ));
            }
            (Some(dir.join(kind.folder())), step)
        } else {
            if latest.exists() {
                return Err(TrainError::file(
                    &cfg.output,
                    "holds checkpoints of an earlier run: use --resume, or another output folder",
                ));
            }
            (cfg.controlnet.clone().or(cfg.adapter.clone()), 0)
        };
        let cfg_path = start_dir.as_ref().map_or_else(
            || cfg.base.join("unet/config.json"),
            |d| d.join("config.json"),
        );
        let NewNetwork { weights, config } = match &start_dir {
            Some(dir) => NewNetwork {
                config: read_json(&cfg_path)?,
                weights: weights_of(dir)?,
            },
            None => Network::new_for(kind, &cfg.base, cfg.adapter_type.as_deref(), cfg.seed)?,
        };
        let (mut vars, tensors) = vars_from(weights)?;
        let net = Network::build(kind, &config, &cfg_path, tensors, cfg.only_mid_control)?;
        net.validate_for(&sd)
            .map_err(|m| TrainError::file(&cfg_path, m))?;

        // sd_locked = false: the UNet's decoder trains too
        let unet = if cfg.sd_locked {
            None
        } else {
            let mut w = weights_of(&cfg.base.join("unet"))?;
            if let Some(dir) = &start_dir {
                let dec = dir.with_file_name("unet_decoder.safetensors");
                if dec.is_file() {
                    w.extend(load_raw(&dec)?);
                }
            }
            let mut tensors = HashMap::new();
            for (k, t) in w {
                if is_decoder(&k) {
                    let v = Var::from_tensor(&t)?;
                    tensors.insert(k.clone(), v.as_tensor().clone());
                    vars.push((format!("unet.{k}"), v));
                } else {
                    tensors.insert(k, t);
                }
            }
            Some(UNet2DConditionModel::new(
                sd.unet.config(),
                VarBuilder::from_tensors(tensors, DType::F32, &dev),
            )?)
        };
        let params = AdamWParams {
            lr: cfg.learning_rate,
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_epsilon,
            weight_decay: cfg.adam_weight_decay,
        };
        let mut opt = AdamW::new(vars, params);
        if let Some(dir) = start_dir.as_ref().filter(|_| resume) {
            let f = dir.with_file_name("optimizer.safetensors");
            opt.load_state(load_raw(&f)?, step as u64);
        }
        let alphas = alphas_cumprod(&sd.scheduler_config);
        let v_prediction = sd.scheduler_config.prediction_type == PredictionType::VPrediction;
        std::fs::create_dir_all(&cfg.output).map_err(io_err(&cfg.output))?;
        // the log keeps the steps the model has: a resumed run drops rows after its checkpoint
        let log = cfg.output.join("log.csv");
        let kept: Vec<String> = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                l.starts_with("step")
                    || l.split(',')
                        .next()
                        .and_then(|s| s.parse::<usize>().ok())
                        .is_some_and(|s| resume && s <= step)
            })
            .map(String::from)
            .collect();
        let mut text = if kept.is_empty() {
            "step,loss,lr\n".to_string()
        } else {
            kept.join("\n") + "\n"
        };
        if !text.starts_with("step") {
            text = format!("step,loss,lr\n{text}");
        }
        write_file(&log, &text)?;
        Ok(Self {
            cfg,
            sd,
            unet,
            net,
            net_config: config,
            opt,
            samples,
            alphas,
            v_prediction,
            step,
        })
    }

    /// The dataset example used at global example index `k` (a seeded shuffle per epoch).
    fn example(&self, k: usize) -> &Sample {
        let n = self.samples.len();
        let (epoch, pos) = (k / n, k % n);
        let mut perm: Vec<usize> = (0..n).collect();
        let mut rng = TorchRng::new(self.cfg.seed ^ (0x5DEE_CE66 + epoch as u64 * 0x9E37_79B9));
        for i in (1..n).rev() {
            let j = (rng.next_u32() as usize) % (i + 1);
            perm.swap(i, j);
        }
        &self.samples[perm[pos]]
    }

    /// The loss of micro-batch `micro` of optimizer step `step` (its gradients are taken by
    /// the caller).
    fn batch_loss(&self, step: usize, micro: usize) -> Result<Tensor> {
        let cfg = &self.cfg;
        // set for every batch: a validation image in between generates in f32
        set_precision(cfg.precision()?).map_err(TrainError::Invalid)?;
        sd_pipeline::model::checkpoint::set_enabled(cfg.gradient_checkpointing);
        let dev = Device::Cpu;
        let r = cfg.resolution as usize;
        let global = step * cfg.gradient_accumulation + micro;
        let mut rng = TorchRng::new(
            cfg.seed
                .wrapping_mul(1_000_003)
                .wrapping_add(global as u64 + 1),
        );
        let mut targets = Vec::new();
        let mut conds = Vec::new();
        let mut ehs = Vec::new();
        let mut timesteps = Vec::new();
        let n_train = self.alphas.len();
        for j in 0..cfg.batch_size {
            let s = self.example(global * cfg.batch_size + j).clone();
            let target =
                load_control_image(&s.target, r, r, ResizeMode::Crop, &dev).map_err(|e| {
                    TrainError::file(&s.target, format!("dataset line {}: {e}", s.line))
                })?;
            targets.push(((target * 2.0)? - 1.0)?);
            conds.push(
                load_control_image(&s.source, r, r, ResizeMode::Crop, &dev).map_err(|e| {
                    TrainError::file(&s.source, format!("dataset line {}: {e}", s.line))
                })?,
            );
            let u = rng.next_u32() as f64 / 4_294_967_296.0;
            let prompt = if u < cfg.proportion_empty_prompts {
                ""
            } else {
                s.prompt.as_str()
            };
            let chunk = self.sd.tokenizer.chunks(prompt)?.remove(0);
            ehs.push(sd_pipeline::text::encode_chunks(
                &self.sd.text_encoder,
                &[chunk],
                1,
                &dev,
            )?);
            timesteps.push(self.cfg.network.timestep(rng.next_u32(), n_train));
        }
        let target = Tensor::cat(&targets, 0)?;
        let cond = Tensor::cat(&conds, 0)?;
        let ehs = Tensor::cat(&ehs, 0)?.detach();
        let (mean, logvar) = self.sd.vae.encode_moments(&target)?;
        let eps = rng.randn(mean.dims(), &dev)?;
        let z = (mean + (logvar * 0.5)?.exp()? * eps)?;
        let latents = self.sd.vae.scale_latents(&z)?.detach();
        let noise = rng.randn(latents.dims(), &dev)?;
        let unet = self.unet.as_ref().unwrap_or(&self.sd.unet);
        training_loss(
            &self.net,
            unet,
            &latents,
            &noise,
            &timesteps,
            &ehs,
            &cond,
            &self.alphas,
            self.v_prediction,
        )
    }

    /// The mean loss over `n` fixed batches (the same examples, noise and timesteps every
    /// time it is called): progress measured without the noise of random timesteps.
    pub fn eval_loss(&self, n: usize) -> Result<f32> {
        let mut sum = 0f32;
        for i in 0..n {
            sum += self
                .batch_loss(1_000_000_000 + i, 0)?
                .detach()
                .to_scalar::<f32>()?;
        }
        Ok(sum / n as f32)
    }

    /// One optimizer step: accumulated gradients, clipped, AdamW. Returns the mean loss.
    pub fn train_step(&mut self) -> Result<f32> {
        Ok(self.cfg.loop_config().step(self)?.loss)
    }

    /// The trained network's current weights (detached copies).
    pub fn network_weights(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (name, var) in self.opt.vars() {
            if !name.starts_with("unet.") {
                out.insert(name.clone(), var.as_tensor().detach().copy()?);
            }
        }
        Ok(out)
    }

    /// Write `output/checkpoint-STEP/` (controlnet/ or t2iadapter/ in diffusers format,
    /// optimizer state, step, trained UNet decoder) under a temporary name, rename it, then
    /// point `latest` at it: a run killed at any moment leaves `latest` naming a complete
    /// checkpoint.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let out = &self.cfg.output;
        let name = format!("checkpoint-{}", self.step);
        let dir = out.join(&name);
        let stage = StagedDir::new(&dir)?;
        let tmp = stage.path();
        let net_dir = tmp.join(self.cfg.network.folder());
        std::fs::create_dir_all(&net_dir).map_err(io_err(tmp))?;
        save_weights(
            &self.network_weights()?,
            &net_dir.join("diffusion_pytorch_model.safetensors"),
        )?;
        std::fs::write(
            net_dir.join("config.json"),
            serde_json::to_string_pretty(&self.net_config).unwrap_or_default(),
        )
        .map_err(io_err(tmp))?;
        save_weights(&self.opt.state(), &tmp.join("optimizer.safetensors"))?;
        let dec: HashMap<String, Tensor> = self
            .opt
            .vars()
            .iter()
            .filter_map(|(n, v)| {
                Some((n.strip_prefix("unet.")?.to_string(), v.as_tensor().detach()))
            })
            .collect();
        if !dec.is_empty() {
            save_weights(&dec, &tmp.join("unet_decoder.safetensors"))?;
        }
        std::fs::write(
            tmp.join("state.json"),
            serde_json::json!({ "step": self.step, "config": self.cfg }).to_string(),
        )
        .map_err(io_err(tmp))?;
        stage.commit_replacing()?;
        write_file(&out.join("latest"), &name)?;
        Ok(dir)
    }

    /// A validation image with the current network: `output/validation/step-STEP.png`.
    pub fn validate_image(&self) -> Result<Option<PathBuf>> {
        let (Some(prompt), Some(image)) = (&self.cfg.validation_prompt, &self.cfg.validation_image)
        else {
            return Ok(None);
        };
        let dev = Device::Cpu;
        let r = self.cfg.resolution as usize;
        let unit = self.net.unit(
            self.network_weights()?,
            load_control_image(image, r, r, ResizeMode::Crop, &dev)?,
        )?;
        let mut hooks = HookSet::new();
        hooks.push(Box::new(ControlNetHook::new(vec![unit])));
        // sdctl's defaults (20 steps of DPM++ 2M Karras, CFG 7.5) at the training resolution
        let req = GenerateRequest {
            width: r,
            height: r,
            ..GenerateRequest::new(prompt.clone())
        };
        let out = self
            .sd
            .generate(&req, &mut hooks, &mut TorchRng::new(self.cfg.seed))?;
        let dir = self.cfg.output.join("validation");
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let path = dir.join(format!("step-{}.png", self.step));
        sd_pipeline::generation::image_io::save_png(
            &path,
            &out.images.get(0)?,
            &[("parameters", prompt.as_str())],
        )?;
        Ok(Some(path))
    }

    /// Train to `max_steps`, checkpointing and validating on schedule; `report` is called
    /// after every step. The final network is also written to `output/controlnet/` (or
    /// `output/t2iadapter/`).
    pub fn run(&mut self, report: &mut dyn FnMut(StepReport)) -> Result<()> {
        self.cfg.loop_config().run(self, report)?;
        // the final network, ready for --control
        let folder = self.cfg.network.folder();
        let last = self
            .cfg
            .output
            .join(format!("checkpoint-{}", self.step))
            .join(folder);
        if !last.is_dir() {
            self.save_checkpoint()?;
        }
        let dst = self.cfg.output.join(folder);
        let stage = StagedDir::new(&dst)?;
        let tmp = stage.path();
        for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
            std::fs::copy(last.join(f), tmp.join(f)).map_err(io_err(tmp))?;
        }
        stage.commit_replacing()?;
        Ok(())
    }
}

/// The run as the shared loop drives it: a non-finite loss stops it, each step is a
/// row of `output/log.csv`, validation images follow checkpoints.
impl TrainTask for Trainer {
    type Extra = ();
    type Report = StepReport;

    fn optimizer(&mut self) -> &mut AdamW {
        &mut self.opt
    }

    fn steps_done(&mut self) -> &mut usize {
        &mut self.step
    }

    fn micro_loss(&mut self, step: usize, micro: usize) -> Result<(Tensor, ())> {
        Ok((self.batch_loss(step, micro)?, ()))
    }

    fn stepped(&mut self, done: StepDone<()>) -> Result<StepReport> {
        let StepDone {
            step,
            max_steps,
            loss,
            lr,
            ..
        } = done;
        if !loss.is_finite() {
            return Err(TrainError::Invalid(format!(
                "step {step}: the loss is {loss}; lower learning_rate"
            )));
        }
        let log = self.cfg.output.join("log.csv");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .map_err(io_err(&log))?;
        writeln!(f, "{step},{loss},{lr}").map_err(io_err(&log))?;
        Ok(StepReport {
            step,
            max_steps,
            loss,
            lr,
        })
    }

    fn checkpoint(&mut self) -> Result<()> {
        self.save_checkpoint().map(|_| ())
    }

    fn after_step(&mut self) -> Result<()> {
        if self.step.is_multiple_of(self.cfg.validation_steps) {
            self.validate_image()?;
        }
        Ok(())
    }
}

/// UNet parameters that `sd_locked = false` trains: the decoder and the output.
fn is_decoder(name: &str) -> bool {
    name.starts_with("up_blocks.")
        || name.starts_with("conv_norm_out.")
        || name.starts_with("conv_out.")
}
