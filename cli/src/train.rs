//! `sdctl train controlnet|t2i-adapter|vae|unet` and `sdctl dataset fill`: flags, progress and messages;
//! the config file handling is `sd_train::config`'s.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use sd_train::config::{base_config, controlnet_config};
use sd_train::{train_unet, train_vae, BaseStep, NetworkKind, Part, Trainer};
use serde::Serialize;

use crate::CliResult;

#[derive(Subcommand)]
pub enum TrainCommand {
    /// Train a ControlNet on a dataset (fill50k layout or diffusers image folder).
    Controlnet(Box<TrainArgs>),
    /// Train a T2I-Adapter on the same datasets, with the same settings and checkpoints
    /// (`output/checkpoint-N/t2iadapter/`, the last in `output/t2iadapter/`).
    T2iAdapter(Box<TrainArgs>),
    /// Train a model's VAE (AutoencoderKL) on a dataset's images; measures the latent scaling
    /// factor at the end.
    Vae(Box<BaseTrainArgs>),
    /// Train a model's UNet (and with --train-text-encoder its text encoder) on a dataset's
    /// images and captions, the VAE frozen.
    Unet(Box<BaseTrainArgs>),
}

/// `sdctl train vae|unet` settings; every key of the config is also a flag (unset flags are
/// `None` and leave the file's value).
#[derive(Args, Serialize, Default)]
pub struct BaseTrainArgs {
    /// A config file (TOML, YAML or JSON); flags override it; paths are relative to it.
    #[arg(long = "config")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// The model folder to start from (`sdctl model new` makes a fresh one)
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// The model folder to write (the whole model, trained part replaced)
    #[arg(long)]
    pub output: Option<PathBuf>,
    #[arg(long)]
    pub resolution: Option<u32>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub max_train_steps: Option<usize>,
    #[arg(long)]
    pub learning_rate: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub checkpointing_steps: Option<usize>,
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// VAE: weight of the KL term
    #[arg(long)]
    pub kl_weight: Option<f64>,
    /// UNet: train the text encoder too
    #[arg(long)]
    pub train_text_encoder: Option<bool>,
    #[arg(long)]
    pub proportion_empty_prompts: Option<f64>,
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
    /// Set by the subcommand.
    #[arg(skip)]
    pub network: Option<NetworkKind>,
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// train controlnet: a ControlNet to start from (diffusers folder)
    #[arg(long)]
    pub controlnet: Option<PathBuf>,
    /// train t2i-adapter: a T2I-Adapter to start from (diffusers folder)
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// train t2i-adapter: full_adapter (default) | light_adapter
    #[arg(long)]
    pub adapter_type: Option<String>,
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    #[arg(long)]
    pub output: Option<PathBuf>,
    #[arg(long)]
    pub resolution: Option<u32>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub gradient_accumulation: Option<usize>,
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// constant | constant_with_warmup
    #[arg(long)]
    pub lr_scheduler: Option<String>,
    #[arg(long)]
    pub lr_warmup_steps: Option<usize>,
    #[arg(long)]
    pub adam_beta1: Option<f64>,
    #[arg(long)]
    pub adam_beta2: Option<f64>,
    #[arg(long)]
    pub adam_weight_decay: Option<f64>,
    #[arg(long)]
    pub adam_epsilon: Option<f64>,
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    #[arg(long)]
    pub max_steps: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub checkpointing_steps: Option<usize>,
    #[arg(long)]
    pub validation_prompt: Option<String>,
    #[arg(long)]
    pub validation_image: Option<PathBuf>,
    #[arg(long)]
    pub validation_steps: Option<usize>,
    #[arg(long)]
    pub proportion_empty_prompts: Option<f64>,
    /// false also trains the UNet decoder
    #[arg(long)]
    pub sd_locked: Option<bool>,
    #[arg(long)]
    pub only_mid_control: Option<bool>,
    /// no | bf16 | fp16 (half products, f32 sums and weights; CPUs with AVX512-BF16 / AVX512-FP16)
    #[arg(long)]
    pub mixed_precision: Option<String>,
    #[arg(long)]
    pub skip_bad_rows: Option<bool>,
    /// true: keep only each block's inputs and recompute the block in the backward pass
    /// (less memory, more time)
    #[arg(long)]
    pub gradient_checkpointing: Option<bool>,
}

fn bar(len: usize) -> ProgressBar {
    let style = "{bar:30} {pos}/{len} steps  {per_sec}  loss {msg}  eta {eta}";
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template(style).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// ", steady X s/step" from the second step on (the first pays one-time set-up), given the
/// instants each step ended; empty for fewer than three steps. Checkpoints and validation
/// images in between count.
fn steady(ends: &[std::time::Instant]) -> String {
    match (ends.first(), ends.last()) {
        (Some(a), Some(b)) if ends.len() >= 3 => format!(
            ", steady {:.3} s/step",
            (*b - *a).as_secs_f64() / (ends.len() - 1) as f64
        ),
        _ => String::new(),
    }
}

fn run_base(args: &BaseTrainArgs, part: Part) -> CliResult {
    let cfg = base_config(args.config.as_deref(), args)?;
    let bar = bar(cfg.max_train_steps);
    let t0 = std::time::Instant::now();
    let mut ends = Vec::new();
    let mut report = |r: BaseStep| {
        ends.push(std::time::Instant::now());
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
        "{} steps in {secs:.1} s ({:.2} it/s{}); {what} trained into {}",
        cfg.max_train_steps,
        cfg.max_train_steps as f64 / secs.max(1e-9),
        steady(&ends),
        cfg.output.display()
    );
    Ok(())
}

pub fn run(cmd: TrainCommand) -> CliResult {
    let mut args = match cmd {
        TrainCommand::Controlnet(args) => args,
        TrainCommand::T2iAdapter(mut args) => {
            args.network = Some(NetworkKind::T2iAdapter);
            args
        }
        TrainCommand::Vae(a) => return run_base(&a, Part::Vae),
        TrainCommand::Unet(a) => return run_base(&a, Part::Unet),
    };
    args.network.get_or_insert(NetworkKind::Controlnet);
    let cfg = controlnet_config(args.config.as_deref(), &*args)?;
    let mut trainer = Trainer::new(cfg, args.resume, &mut |w| eprintln!("warning: {w}"))?;
    let bar = bar(trainer.cfg.max_steps);
    bar.set_position(trainer.step as u64);
    let t0 = std::time::Instant::now();
    let start = trainer.step;
    let mut ends = Vec::new();
    trainer.run(&mut |r| {
        ends.push(std::time::Instant::now());
        bar.set_position(r.step as u64);
        bar.set_message(format!("{:.4}  lr {:.2e}", r.loss, r.lr));
    })?;
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let kind = trainer.cfg.network;
    eprintln!(
        "{} steps in {:.1} s ({:.2} it/s{}); {} in {}",
        trainer.step - start,
        secs,
        (trainer.step - start) as f64 / secs.max(1e-9),
        steady(&ends),
        kind.label(),
        trainer.cfg.output.join(kind.folder()).display()
    );
    Ok(())
}
