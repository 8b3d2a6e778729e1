//! `sdctl train controlnet` and `sdctl dataset fill`.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use figment::providers::{Format, Json, Serialized, Toml, Yaml};
use figment::{Figment, Source};
use indicatif::{ProgressBar, ProgressStyle};
use sd_train::fill::write_fill_dataset;
use sd_train::{train_unet, train_vae, BaseStep, BaseTrainConfig, Part, TrainConfig, Trainer};
use serde::Serialize;

use crate::CliResult;

#[derive(Subcommand)]
pub enum TrainCommand {
    /// Train a ControlNet on a dataset (fill50k layout or diffusers image folder).
    Controlnet(Box<TrainArgs>),
    /// Train a model's VAE (AutoencoderKL) on a dataset's images; measures the latent scaling
    /// factor at the end.
    Vae(Box<BaseTrainArgs>),
    /// Train a model's UNet (and with --train-text-encoder its text encoder) on a dataset's
    /// images and captions, the VAE frozen.
    Unet(Box<BaseTrainArgs>),
}

/// `sdctl train vae|unet` settings; every key of the config is also a flag.
#[derive(Args, Serialize, Default)]
pub struct BaseTrainArgs {
    /// A config file (TOML, YAML or JSON); flags override it; paths are relative to it.
    #[arg(long = "config")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// The model folder to start from (`sdctl model new` makes a fresh one)
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<PathBuf>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dataset: Option<PathBuf>,
    /// The model folder to write (the whole model, trained part replaced)
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<PathBuf>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolution: Option<u32>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_train_steps: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpointing_steps: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_grad_norm: Option<f64>,
    /// VAE: weight of the KL term
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl_weight: Option<f64>,
    /// UNet: train the text encoder too
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_text_encoder: Option<bool>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proportion_empty_prompts: Option<f64>,
}

#[derive(Subcommand)]
pub enum DatasetCommand {
    /// Write a fill50k-style synthetic dataset: circle outlines (source), filled circles in a
    /// named colour on another (target), "<colour> circle with <colour> background".
    Fill(FillArgs),
}

#[derive(Args)]
pub struct FillArgs {
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long, default_value_t = 1000)]
    pub count: usize,
    #[arg(long, default_value_t = 512)]
    pub size: u32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Every key of the training config is also a flag (`--learning-rate` = `learning_rate`).
#[derive(Args, Serialize, Default)]
pub struct TrainArgs {
    /// A training config file (TOML, YAML or JSON); flags override it. Paths in it are
    /// relative to it.
    #[arg(long = "config")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Continue from the latest checkpoint in the output folder.
    #[arg(long)]
    #[serde(skip)]
    pub resume: bool,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base: Option<PathBuf>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub controlnet: Option<PathBuf>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dataset: Option<PathBuf>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<PathBuf>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolution: Option<u32>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gradient_accumulation: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    /// constant | constant_with_warmup
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr_scheduler: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr_warmup_steps: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adam_beta1: Option<f64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adam_beta2: Option<f64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adam_weight_decay: Option<f64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adam_epsilon: Option<f64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_grad_norm: Option<f64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpointing_steps: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation_prompt: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation_image: Option<PathBuf>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation_steps: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proportion_empty_prompts: Option<f64>,
    /// false also trains the UNet decoder
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sd_locked: Option<bool>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub only_mid_control: Option<bool>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skip_bad_rows: Option<bool>,
}

const PATH_KEYS: &[&str] = &[
    "base",
    "controlnet",
    "dataset",
    "output",
    "validation_image",
];

/// Layer the config file and the flags; paths from the file are relative to it.
fn layered<A: Serialize, C: serde::de::DeserializeOwned>(
    config: Option<&Path>,
    args: &A,
    path_keys: &[&str],
) -> CliResult<C> {
    let mut fig = Figment::new();
    if let Some(path) = config {
        if !path.is_file() {
            return Err(format!("--config {}: not found", path.display()).into());
        }
        fig = match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => fig.merge(Toml::file_exact(path)),
            Some("yaml" | "yml") => fig.merge(Yaml::file_exact(path)),
            Some("json") => fig.merge(Json::file_exact(path)),
            _ => {
                return Err(
                    format!("--config {}: use .toml, .yaml or .json", path.display()).into(),
                )
            }
        };
    }
    let mut fig = fig.merge(Serialized::defaults(args));
    for key in path_keys {
        let Some(md) = fig.find_metadata(key).cloned() else {
            continue;
        };
        if let (Some(Source::File(file)), Ok(v)) = (md.source, fig.find_value(key)) {
            if let (Some(s), Some(dir)) = (v.as_str(), file.parent()) {
                let p = Path::new(s);
                if p.is_relative() {
                    fig = fig.merge(Serialized::default(key, dir.join(p)));
                }
            }
        }
    }
    let cfg: C = fig.extract().map_err(|e| {
        let e = e.to_string();
        format!("training settings: {e}")
    })?;
    Ok(cfg)
}

fn settings(args: &TrainArgs) -> CliResult<TrainConfig> {
    layered(args.config.as_deref(), args, PATH_KEYS)
}

fn run_base(args: &BaseTrainArgs, part: Part) -> CliResult {
    let cfg: BaseTrainConfig = layered(
        args.config.as_deref(),
        args,
        &["model", "dataset", "output"],
    )?;
    for (name, p) in [("model", &cfg.model), ("dataset", &cfg.dataset)] {
        if !p.exists() {
            return Err(format!("{name} {}: not found", p.display()).into());
        }
    }
    if cfg.output.exists() {
        return Err(format!(
            "output {}: already exists; choose a new folder",
            cfg.output.display()
        )
        .into());
    }
    let bar = ProgressBar::new(cfg.max_train_steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  {per_sec}  loss {msg}  eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let t0 = std::time::Instant::now();
    let mut report = |r: BaseStep| {
        bar.set_position(r.step as u64);
        bar.set_message(format!("{:.5}", r.loss));
    };
    let what = match part {
        Part::Vae => {
            let (s, mae) = train_vae(&cfg, &mut report)?;
            format!("VAE (latent scaling factor {s:.5}, reconstruction error {mae:.2}/255)")
        }
        Part::Unet => {
            train_unet(&cfg, &mut report)?;
            if cfg.train_text_encoder {
                "UNet and text encoder".to_string()
            } else {
                "UNet".to_string()
            }
        }
    };
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "{} steps in {secs:.1} s ({:.2} it/s); {what} trained into {}",
        cfg.max_train_steps,
        cfg.max_train_steps as f64 / secs.max(1e-9),
        cfg.output.display()
    );
    Ok(())
}

pub fn run(cmd: TrainCommand) -> CliResult {
    let args = match cmd {
        TrainCommand::Controlnet(args) => args,
        TrainCommand::Vae(a) => return run_base(&a, Part::Vae),
        TrainCommand::Unet(a) => return run_base(&a, Part::Unet),
    };
    let cfg = settings(&args)?;
    for (name, p) in [
        ("base", Some(&cfg.base)),
        ("dataset", Some(&cfg.dataset)),
        ("controlnet", cfg.controlnet.as_ref()),
        ("validation_image", cfg.validation_image.as_ref()),
    ] {
        if let Some(p) = p {
            if !p.exists() {
                return Err(format!("{name} {}: not found", p.display()).into());
            }
        }
    }
    let mut trainer = Trainer::new(cfg, args.resume, &mut |w| eprintln!("warning: {w}"))?;
    let bar = ProgressBar::new(trainer.cfg.max_steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  {per_sec}  loss {msg}  eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(trainer.step as u64);
    let t0 = std::time::Instant::now();
    let start = trainer.step;
    trainer.run(&mut |r| {
        bar.set_position(r.step as u64);
        bar.set_message(format!("{:.4}  lr {:.2e}", r.loss, r.lr));
    })?;
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "{} steps in {:.1} s ({:.2} it/s); ControlNet in {}",
        trainer.step - start,
        secs,
        (trainer.step - start) as f64 / secs.max(1e-9),
        trainer.cfg.output.join("controlnet").display()
    );
    Ok(())
}

pub fn run_dataset(cmd: DatasetCommand) -> CliResult {
    let DatasetCommand::Fill(a) = cmd;
    write_fill_dataset(&a.output, a.count, a.size, a.seed)?;
    eprintln!(
        "{} examples of {}x{} in {}",
        a.count,
        a.size,
        a.size,
        a.output.display()
    );
    Ok(())
}
