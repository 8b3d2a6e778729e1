//! Training a base model's own parts, for people building small models of their own:
//! `sdctl model new` (a diffusers folder with freshly initialised weights from configs),
//! `sdctl train vae` (AutoencoderKL: reconstruction + KL, then the latent scaling factor
//! measured on the data) and `sdctl train unet` (the denoising loss of diffusers'
//! `train_text_to_image.py`, optionally training the text encoder too).
//!
//! The runs write the whole model folder (trained parts replaced) atomically at each checkpoint
//! and at the end; they do not resume (ControlNet training does).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use sd_controlnet::control_image::load_control_image;
use sd_controlnet::units::ResizeMode;
use sd_pipeline::model::clip::ClipTextModel;
use sd_pipeline::model::config::{ClipConfig, UNetConfig, VaeConfig};
use sd_pipeline::model::unet::UNet2DConditionModel;
use sd_pipeline::model::vae::AutoencoderKL;
use sd_pipeline::output::StagedDir;
use sd_pipeline::rng::{NoiseSource, TorchRng};
use sd_pipeline::samplers::{alphas_cumprod, PredictionType};
use sd_pipeline::text::tokenizer::ClipTokenizer;
use sd_pipeline::StableDiffusion;
use serde::{Deserialize, Serialize};

use crate::dataset::read_dataset;
use sd_plugins_api::number::Range;

use crate::error::{Result, TrainError};
use crate::files::{io_err, load_weights, read_json, save_weights, vars_from};
use crate::optim::{AdamW, AdamWParams};
use crate::train_loop::{LoopConfig, LrSchedule, StepDone, TrainTask};

/// Fresh weights for every parameter of a module built from `build`, by PyTorch's default
/// rules: conv/linear weights U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform, a = sqrt(5)),
/// their biases 0, norm weights 1, embeddings N(0, 0.02).
pub fn fresh_weights(
    build: &dyn Fn(VarBuilder) -> candle_core::Result<()>,
    seed: u64,
) -> Result<HashMap<String, Tensor>> {
    let vm = VarMap::new();
    build(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    let data = vm.data().lock().expect("var map");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = TorchRng::new(seed);
    let mut out = HashMap::new();
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let t = if name.contains("embedding") {
            let v: Vec<f32> = rng.randn_f32(n).into_iter().map(|x| x * 0.02).collect();
            Tensor::from_vec(v, dims.as_slice(), &Device::Cpu)?
        } else if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            let b = 1.0 / (fan_in as f64).sqrt();
            let v: Vec<f32> = (0..n)
                .map(|_| ((rng.next_u32() as f64 / 4_294_967_296.0 * 2.0 - 1.0) * b) as f32)
                .collect();
            Tensor::from_vec(v, dims.as_slice(), &Device::Cpu)?
        } else if name.ends_with(".weight") || name.ends_with(".gamma") {
            Tensor::ones(dims.as_slice(), DType::F32, &Device::Cpu)?
        } else {
            Tensor::zeros(dims.as_slice(), DType::F32, &Device::Cpu)?
        };
        out.insert(name.clone(), t);
    }
    Ok(out)
}

/// Copy a folder tree (small model folders).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(io_err(to))?;
    for e in std::fs::read_dir(from).map_err(io_err(from))? {
        let e = e.map_err(io_err(from))?;
        let dst = to.join(e.file_name());
        if e.file_type().map_err(io_err(from))?.is_dir() {
            copy_tree(&e.path(), &dst)?;
        } else {
            std::fs::copy(e.path(), &dst).map_err(io_err(&dst))?;
        }
    }
    Ok(())
}

/// Write `model` with some components' weights replaced into `out`, through a staging folder
/// and a rename (an existing `out` is replaced only once the new one is complete); `finish`
/// makes last edits in the staging folder.
fn write_model(
    model: &Path,
    out: &Path,
    parts: &[(&str, &str, &HashMap<String, Tensor>)],
    log: &str,
    finish: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let staged = StagedDir::new(out)?;
    let stage = staged.path();
    copy_tree(model, stage)?;
    std::fs::write(stage.join("train_log.csv"), log).map_err(io_err(stage))?;
    for (dir, file, w) in parts {
        let d = stage.join(dir);
        std::fs::create_dir_all(&d).map_err(io_err(&d))?;
        // one weight file per component
        for e in std::fs::read_dir(&d).map_err(io_err(&d))?.flatten() {
            if e.path().extension().is_some_and(|x| x == "safetensors") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        save_weights(w, &d.join(file))?;
    }
    finish(stage)?;
    staged.commit_replacing()?;
    Ok(())
}

/// `sdctl model new`: a diffusers folder with fresh weights from the configs in `configs`
/// (`unet/config.json`, `vae/config.json`, `text_encoder/config.json`,
/// `scheduler/scheduler_config.json`); the tokenizer is the embedded CLIP BPE.
pub fn new_model(configs: &Path, out: &Path, seed: u64) -> Result<()> {
    if out.exists() {
        return Err(TrainError::file(out, "already exists; choose a new folder"));
    }
    let unet_cfg = UNetConfig::from_file(&configs.join("unet/config.json"))?;
    let vae_cfg = VaeConfig::from_file(&configs.join("vae/config.json"))?;
    let clip_cfg = ClipConfig::from_file(&configs.join("text_encoder/config.json"))?;
    let sched = configs.join("scheduler/scheduler_config.json");
    read_json(&sched)?;
    let unet = fresh_weights(
        &|vb| UNet2DConditionModel::new(&unet_cfg, vb).map(|_| ()),
        seed,
    )?;
    let vae = fresh_weights(&|vb| AutoencoderKL::new(&vae_cfg, vb).map(|_| ()), seed + 1)?;
    let clip = fresh_weights(
        // ClipTextModel reads under `text_model.` when the root has no embeddings
        &|vb| ClipTextModel::new(&clip_cfg, vb).map(|_| ()),
        seed + 2,
    )?;
    let staged = StagedDir::new(out)?;
    let stage = staged.path();
    for (dir, cfg, file, w) in [
        (
            "unet",
            "config.json",
            "diffusion_pytorch_model.safetensors",
            &unet,
        ),
        (
            "vae",
            "config.json",
            "diffusion_pytorch_model.safetensors",
            &vae,
        ),
        ("text_encoder", "config.json", "model.safetensors", &clip),
    ] {
        let d = stage.join(dir);
        std::fs::create_dir_all(&d).map_err(io_err(&d))?;
        std::fs::copy(configs.join(dir).join(cfg), d.join(cfg)).map_err(io_err(&d))?;
        save_weights(w, &d.join(file))?;
    }
    let s = stage.join("scheduler");
    std::fs::create_dir_all(&s).map_err(io_err(&s))?;
    std::fs::copy(&sched, s.join("scheduler_config.json")).map_err(io_err(&s))?;
    let t = stage.join("tokenizer");
    std::fs::create_dir_all(&t).map_err(io_err(&t))?;
    std::fs::write(
        t.join("vocab.json"),
        sd_pipeline::text::tokenizer::EMBEDDED_VOCAB,
    )
    .map_err(io_err(&t))?;
    std::fs::write(
        t.join("merges.txt"),
        sd_pipeline::text::tokenizer::EMBEDDED_MERGES,
    )
    .map_err(io_err(&t))?;
    std::fs::write(
        t.join("tokenizer_config.json"),
        r#"{"pad_token": "<|endoftext|>", "model_max_length": 77}"#,
    )
    .map_err(io_err(&t))?;
    let index = serde_json::json!({
        "_class_name": "StableDiffusionPipeline",
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    });
    std::fs::write(
        stage.join("model_index.json"),
        serde_json::to_string_pretty(&index).unwrap(),
    )
    .map_err(io_err(stage))?;
    staged.commit()?;
    Ok(())
}

fn d_bs() -> usize {
    16
}
fn d_lr() -> f64 {
    1e-3
}
fn d_res() -> u32 {
    64
}
fn d_kl() -> f64 {
    1e-4
}
fn d_ckpt() -> usize {
    500
}
fn d_clip() -> f64 {
    1.0
}
fn d_drop() -> f64 {
    0.1
}

/// Which part `sdctl train` trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    Vae,
    Unet,
}

/// `sdctl train vae|unet` settings (config keys; each is also a flag).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseTrainConfig {
    /// The model folder to start from (`sdctl model new` makes a fresh one).
    pub model: PathBuf,
    /// A fill50k-layout or metadata.jsonl dataset: targets are the training images.
    pub dataset: PathBuf,
    /// Where the trained model folder is written.
    pub output: PathBuf,
    #[serde(default = "d_res")]
    pub resolution: u32,
    #[serde(default = "d_bs")]
    pub batch_size: usize,
    pub max_train_steps: usize,
    #[serde(default = "d_lr")]
    pub learning_rate: f64,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "d_ckpt")]
    pub checkpointing_steps: usize,
    #[serde(default = "d_clip")]
    pub max_grad_norm: f64,
    /// VAE: weight of the KL term (per latent element, against the per-pixel MSE).
    #[serde(default = "d_kl")]
    pub kl_weight: f64,
    /// UNet: train the text encoder along.
    #[serde(default)]
    pub train_text_encoder: bool,
    /// UNet: the share of captions replaced by "" (for classifier-free guidance).
    #[serde(default = "d_drop")]
    pub proportion_empty_prompts: f64,
}

impl BaseTrainConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Invalid(m));
        if self.batch_size == 0 || self.max_train_steps == 0 {
            return bad("batch_size and max_train_steps must be at least 1".into());
        }
        if self.checkpointing_steps == 0 {
            return bad("checkpointing_steps must be at least 1".into());
        }
        if self.resolution < 16 || !self.resolution.is_multiple_of(8) {
            return bad(format!(
                "resolution {}: a multiple of 8, at least 16",
                self.resolution
            ));
        }
        crate::train_loop::check_numbers(&[
            ("learning_rate", self.learning_rate, Range::above(0.0)),
            ("max_grad_norm", self.max_grad_norm, Range::at_least(0.0)),
            ("kl_weight", self.kl_weight, Range::at_least(0.0)),
            (
                "proportion_empty_prompts",
                self.proportion_empty_prompts,
                Range::closed(0.0, 1.0),
            ),
        ])?;
        if !self.model.join("model_index.json").is_file() {
            return Err(TrainError::file(
                &self.model,
                "not a diffusers model folder (make one with `sdctl model new`)",
            ));
        }
        crate::train_loop::check_memory(&self.model, self.resolution, self.batch_size, 1.0)
    }
}

/// One step's report.
#[derive(Debug, Clone, Copy)]
pub struct BaseStep {
    pub step: usize,
    pub max_steps: usize,
    pub loss: f32,
}

fn current(opt: &AdamW, prefix: &str) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (name, var) in opt.vars() {
        if let Some(k) = name.strip_prefix(prefix) {
            out.insert(k.to_string(), var.as_tensor().detach().copy()?);
        }
    }
    Ok(out)
}

/// The training images in [-1, 1] (`[N, 3, R, R]`) and their prompts.
fn load_images(cfg: &BaseTrainConfig) -> Result<(Vec<Tensor>, Vec<String>)> {
    let (samples, bad, index) = read_dataset(&cfg.dataset)?;
    if !bad.is_empty() {
        return Err(TrainError::file(
            &index,
            format!("{} unusable rows, first: {}", bad.len(), bad[0]),
        ));
    }
    let r = cfg.resolution as usize;
    let mut imgs = Vec::new();
    let mut prompts = Vec::new();
    for s in samples {
        let t = load_control_image(&s.target, r, r, ResizeMode::Crop, &Device::Cpu)
            .map_err(|e| TrainError::file(&s.target, format!("dataset line {}: {e}", s.line)))?;
        imgs.push(((t * 2.0)? - 1.0)?);
        prompts.push(s.prompt);
    }
    Ok((imgs, prompts))
}

fn batch_indices(rng: &mut TorchRng, n: usize, b: usize) -> Vec<usize> {
    (0..b).map(|_| rng.next_u32() as usize % n).collect()
}

impl BaseTrainConfig {
    /// How the shared loop runs a base part: one batch a step at a constant learning rate, a
    /// checkpoint every `checkpointing_steps` before the last (the final model is written once
    /// the loop is done).
    fn loop_config(&self) -> LoopConfig {
        LoopConfig {
            max_steps: self.max_train_steps,
            lr: LrSchedule {
                lr: self.learning_rate,
                warmup_steps: 0,
            },
            gradient_accumulation: 1,
            max_grad_norm: self.max_grad_norm,
            checkpointing_steps: self.checkpointing_steps,
            checkpoint_last: false,
        }
    }

    /// The random draws of optimizer step `step` (0-based).
    fn step_rng(&self, step: usize) -> TorchRng {
        TorchRng::new(
            self.seed
                .wrapping_mul(1_000_003)
                .wrapping_add(step as u64 + 1),
        )
    }
}

/// A VAE run as the shared loop drives it.
struct VaeRun<'a> {
    cfg: &'a BaseTrainConfig,
    vae: AutoencoderKL,
    /// The latent scaling factor the checkpoints keep: the model's own until the end measures it.
    scaling: f64,
    opt: AdamW,
    imgs: Vec<Tensor>,
    log: String,
    step: usize,
}

impl VaeRun<'_> {
    /// The model with the current VAE and `scaling` as its latent scaling factor.
    fn save(&self, scaling: f64) -> Result<()> {
        let cfg = self.cfg;
        let w = current(&self.opt, "")?;
        write_model(
            &cfg.model,
            &cfg.output,
            &[("vae", "diffusion_pytorch_model.safetensors", &w)],
            &self.log,
            // the scaling factor goes in before the folder is renamed into place
            |stage| {
                let p = stage.join("vae/config.json");
                let mut c = read_json(&p)?;
                c["scaling_factor"] = serde_json::json!(scaling);
                std::fs::write(&p, serde_json::to_string_pretty(&c).unwrap()).map_err(io_err(&p))
            },
        )
    }
}

impl TrainTask for VaeRun<'_> {
    /// The reconstruction MSE and the KL term.
    type Extra = (Tensor, Tensor);
    type Report = BaseStep;

    fn optimizer(&mut self) -> &mut AdamW {
        &mut self.opt
    }

    fn steps_done(&mut self) -> &mut usize {
        &mut self.step
    }

    fn micro_loss(&mut self, step: usize, _micro: usize) -> Result<(Tensor, (Tensor, Tensor))> {
        let dev = Device::Cpu;
        let mut rng = self.cfg.step_rng(step);
        let idx = batch_indices(&mut rng, self.imgs.len(), self.cfg.batch_size);
        let x = Tensor::cat(&idx.iter().map(|&i| &self.imgs[i]).collect::<Vec<_>>(), 0)?;
        let (mean, logvar) = self.vae.encode_moments(&x)?;
        let eps = rng.randn(mean.dims(), &dev)?;
        let z = (&mean + (&logvar * 0.5)?.exp()? * eps)?;
        let rec = self.vae.decode(&z)?;
        let mse = (rec - &x)?.sqr()?.mean_all()?;
        // KL(N(mean, var) || N(0, 1)) per element
        let kl = ((((mean.sqr()? + logvar.exp()?)? - 1.0)? - &logvar)?.mean_all()? * 0.5)?;
        let loss = (&mse + (&kl * self.cfg.kl_weight)?)?;
        Ok((loss, (mse, kl)))
    }

    fn stepped(&mut self, done: StepDone<(Tensor, Tensor)>) -> Result<BaseStep> {
        let (mse, kl) = &done.extras[0];
        let mse = mse.to_scalar::<f32>()?;
        self.log.push_str(&format!(
            "{},{},{}\n",
            done.step,
            mse,
            kl.to_scalar::<f32>()?
        ));
        Ok(BaseStep {
            step: done.step,
            max_steps: done.max_steps,
            loss: mse,
        })
    }

    fn checkpoint(&mut self) -> Result<()> {
        self.save(self.scaling)
    }
}

/// Train the VAE; returns the scaling factor written into the output's config and the mean
/// absolute reconstruction error (0..255) over the first 256 images.
pub fn train_vae(cfg: &BaseTrainConfig, report: &mut dyn FnMut(BaseStep)) -> Result<(f64, f64)> {
    cfg.validate()?;
    let dev = Device::Cpu;
    let vae_cfg_path = cfg.model.join("vae/config.json");
    let vae_cfg = VaeConfig::from_file(&vae_cfg_path)?;
    let w = load_weights(&sd_pipeline::loading::files::weight_files(&cfg.model.join("vae"))?[0])?;
    let (vars, tensors) = vars_from(w)?;
    let vae = AutoencoderKL::new(
        &vae_cfg,
        VarBuilder::from_tensors(tensors, DType::F32, &dev),
    )?;
    let opt = AdamW::new(
        vars,
        AdamWParams {
            lr: cfg.learning_rate,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    );
    let (imgs, _) = load_images(cfg)?;
    let mut run = VaeRun {
        cfg,
        vae,
        scaling: vae_cfg.scaling_factor,
        opt,
        imgs,
        log: String::from("step,mse,kl\n"),
        step: 0,
    };
    cfg.loop_config().run(&mut run, report)?;
    let (vae, imgs) = (&run.vae, &run.imgs);
    // the latent scaling factor: 1 / std of the latents over (up to 256 of) the images
    let mut lat = Vec::new();
    for chunk in imgs.iter().take(256).collect::<Vec<_>>().chunks(32) {
        let x = Tensor::cat(chunk, 0)?;
        lat.push(vae.encode_mean(&x)?.detach());
    }
    let lat = Tensor::cat(&lat, 0)?;
    let m = lat.mean_all()?.to_scalar::<f32>()? as f64;
    let var = lat.sqr()?.mean_all()?.to_scalar::<f32>()? as f64 - m * m;
    let scaling = 1.0 / var.max(1e-12).sqrt();
    // reconstruction of the same images through the latent means
    let mut err = 0f64;
    let mut n = 0usize;
    for chunk in imgs.iter().take(256).collect::<Vec<_>>().chunks(32) {
        let x = Tensor::cat(chunk, 0)?;
        let rec = vae.decode(&vae.encode_mean(&x)?)?.clamp(-1f32, 1f32)?;
        err += ((rec - &x)?.abs()?.mean_all()?.to_scalar::<f32>()? as f64) * chunk.len() as f64;
        n += chunk.len();
    }
    let mae = err / n as f64 * 127.5;
    run.log.push_str(&format!(
        "# final: latent scaling factor {scaling}, reconstruction MAE {mae:.2}/255\n"
    ));
    run.save(scaling)?;
    Ok((scaling, mae))
}

/// A UNet run (with `train_text_encoder` also the text encoder's) as the shared loop drives it.
struct UnetRun<'a> {
    cfg: &'a BaseTrainConfig,
    sd: StableDiffusion,
    unet: UNet2DConditionModel,
    /// The text encoder being trained, with `train_text_encoder`; otherwise the base's is used.
    text: Option<ClipTextModel>,
    opt: AdamW,
    /// The frozen VAE's latent distribution of each image: means and standard deviations.
    means: Vec<Tensor>,
    stds: Vec<Tensor>,
    /// Each image's caption as token ids, and the empty caption's.
    ids: Vec<Vec<u32>>,
    empty: Vec<u32>,
    alphas: Vec<f32>,
    v_pred: bool,
    n_images: usize,
    log: String,
    step: usize,
}

impl UnetRun<'_> {
    /// The model with the current UNet (and text encoder).
    fn save(&self) -> Result<()> {
        let u = current(&self.opt, "unet.")?;
        let mut parts = vec![("unet", "diffusion_pytorch_model.safetensors", &u)];
        let t = current(&self.opt, "text_encoder.")?;
        if self.cfg.train_text_encoder {
            parts.push(("text_encoder", "model.safetensors", &t));
        }
        write_model(&self.cfg.model, &self.cfg.output, &parts, &self.log, |_| {
            Ok(())
        })
    }
}

impl TrainTask for UnetRun<'_> {
    type Extra = ();
    type Report = BaseStep;

    fn optimizer(&mut self) -> &mut AdamW {
        &mut self.opt
    }

    fn steps_done(&mut self) -> &mut usize {
        &mut self.step
    }

    fn micro_loss(&mut self, step: usize, _micro: usize) -> Result<(Tensor, ())> {
        let cfg = self.cfg;
        let dev = Device::Cpu;
        let (alphas, empty) = (&self.alphas, &self.empty);
        let text_model = self.text.as_ref().unwrap_or(&self.sd.text_encoder);
        let mut rng = cfg.step_rng(step);
        let idx = batch_indices(&mut rng, self.n_images, cfg.batch_size);
        let b = idx.len();
        let mut tok_ids: Vec<u32> = Vec::with_capacity(b * 77);
        let mut ts = Vec::with_capacity(b);
        for &i in &idx {
            let u = rng.next_u32() as f64 / 4_294_967_296.0;
            tok_ids.extend(if u < cfg.proportion_empty_prompts {
                empty.iter()
            } else {
                self.ids[i].iter()
            });
            ts.push(rng.next_u32() as usize % alphas.len());
        }
        let len = empty.len();
        let ehs = text_model.forward(&Tensor::from_vec(tok_ids, (b, len), &dev)?, 1)?;
        let ehs = if cfg.train_text_encoder {
            ehs
        } else {
            ehs.detach()
        };
        let mean = Tensor::cat(&idx.iter().map(|&i| &self.means[i]).collect::<Vec<_>>(), 0)?;
        let std = Tensor::cat(&idx.iter().map(|&i| &self.stds[i]).collect::<Vec<_>>(), 0)?;
        let e = rng.randn(mean.dims(), &dev)?;
        let latents = self.sd.vae.scale_latents(&(mean + (std * e)?)?)?;
        let noise = rng.randn(latents.dims(), &dev)?;
        let sa: Vec<f32> = ts.iter().map(|&t| alphas[t].sqrt()).collect();
        let so: Vec<f32> = ts.iter().map(|&t| (1.0 - alphas[t]).sqrt()).collect();
        let sa = Tensor::from_vec(sa, (b, 1, 1, 1), &dev)?;
        let so = Tensor::from_vec(so, (b, 1, 1, 1), &dev)?;
        let noisy = (latents.broadcast_mul(&sa)? + noise.broadcast_mul(&so)?)?;
        let tt = Tensor::from_vec(ts.iter().map(|&t| t as f32).collect::<Vec<_>>(), b, &dev)?;
        let pred = self.unet.forward(&noisy, &tt, &ehs, None)?;
        let target = if self.v_pred {
            (noise.broadcast_mul(&sa)? - latents.broadcast_mul(&so)?)?
        } else {
            noise
        };
        Ok(((pred - target)?.sqr()?.mean_all()?, ()))
    }

    fn stepped(&mut self, done: StepDone<()>) -> Result<BaseStep> {
        self.log.push_str(&format!("{},{}\n", done.step, done.loss));
        Ok(BaseStep {
            step: done.step,
            max_steps: done.max_steps,
            loss: done.loss,
        })
    }

    fn checkpoint(&mut self) -> Result<()> {
        self.save()
    }
}

/// Train the UNet (and the text encoder with `train_text_encoder`) on frozen VAE latents.
pub fn train_unet(cfg: &BaseTrainConfig, report: &mut dyn FnMut(BaseStep)) -> Result<()> {
    cfg.validate()?;
    let dev = Device::Cpu;
    let sd = sd_pipeline::StableDiffusion::load(&cfg.model, &dev, DType::F32, &[])?;
    let tok: &ClipTokenizer = &sd.tokenizer;
    let unet_cfg = UNetConfig::from_file(&cfg.model.join("unet/config.json"))?;
    let clip_cfg = ClipConfig::from_file(&cfg.model.join("text_encoder/config.json"))?;
    let uw = load_weights(&sd_pipeline::loading::files::weight_files(&cfg.model.join("unet"))?[0])?;
    let (mut vars, ut) = vars_from(uw)?;
    for v in vars.iter_mut() {
        v.0 = format!("unet.{}", v.0);
    }
    let unet =
        UNet2DConditionModel::new(&unet_cfg, VarBuilder::from_tensors(ut, DType::F32, &dev))?;
    let text = if cfg.train_text_encoder {
        let tw = load_weights(
            &sd_pipeline::loading::files::weight_files(&cfg.model.join("text_encoder"))?[0],
        )?;
        let (tv, tt) = vars_from(tw)?;
        vars.extend(
            tv.into_iter()
                .map(|(k, v)| (format!("text_encoder.{k}"), v)),
        );
        Some(ClipTextModel::new(
            &clip_cfg,
            VarBuilder::from_tensors(tt, DType::F32, &dev),
        )?)
    } else {
        None
    };
    let opt = AdamW::new(
        vars,
        AdamWParams {
            lr: cfg.learning_rate,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        },
    );
    let (imgs, prompts) = load_images(cfg)?;
    // the frozen VAE's latent distributions, once
    let mut means = Vec::new();
    let mut stds = Vec::new();
    for chunk in imgs.chunks(32) {
        let (m, lv) = sd.vae.encode_moments(&Tensor::cat(chunk, 0)?)?;
        for i in 0..m.dim(0)? {
            means.push(m.get(i)?.unsqueeze(0)?.detach());
            stds.push((lv.get(i)?.unsqueeze(0)? * 0.5)?.exp()?.detach());
        }
    }
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| Ok(tok.chunks(p)?.remove(0)))
        .collect::<sd_pipeline::Result<_>>()?;
    let empty = tok.chunks("")?.remove(0);
    let alphas = alphas_cumprod(&sd.scheduler_config);
    let v_pred = sd.scheduler_config.prediction_type == PredictionType::VPrediction;
    let mut run = UnetRun {
        cfg,
        sd,
        unet,
        text,
        opt,
        means,
        stds,
        ids,
        empty,
        alphas,
        v_pred,
        n_images: imgs.len(),
        log: String::from("step,loss\n"),
        step: 0,
    };
    cfg.loop_config().run(&mut run, report)?;
    run.save()
}

/// The loss target chosen for a model: epsilon or v (for messages).
pub fn prediction_of(model: &Path) -> Result<String> {
    let c = read_json(&model.join("scheduler/scheduler_config.json"))?;
    Ok(c["prediction_type"]
        .as_str()
        .unwrap_or("epsilon")
        .to_string())
}
