//! `sdctl model inspect` and `sdctl model convert`.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

use crate::CliResult;

#[derive(Subcommand)]
pub enum ModelCommand {
    /// What a model file or folder is: format, family, prediction type, parameters per
    /// component, dtypes, and the keys it did not understand.
    Inspect { path: PathBuf },
    /// Convert between a single-file checkpoint and a diffusers folder.
    Convert(ConvertArgs),
    /// A new diffusers folder with freshly initialised weights, from a folder of configs
    /// (unet/, vae/, text_encoder/ config.json and scheduler/scheduler_config.json), to train
    /// with `sdctl train vae|unet|controlnet`.
    New(NewArgs),
}

#[derive(Args)]
pub struct NewArgs {
    /// The folder holding the configs
    pub configs: PathBuf,
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Target {
    Diffusers,
    SingleFile,
}

#[derive(Args)]
pub struct ConvertArgs {
    /// A single-file checkpoint (.safetensors, .ckpt) or a diffusers folder
    pub input: PathBuf,
    /// The folder (diffusers) or .safetensors file (single-file, with NAME.yaml beside it) to write
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long, value_enum)]
    pub to: Target,
    /// Store the weights as float16
    #[arg(long)]
    pub half: bool,
}

pub fn run(cmd: ModelCommand) -> CliResult {
    match cmd {
        ModelCommand::Inspect { path } => {
            print!("{}", sd::model_files::describe(&path)?);
            Ok(())
        }
        ModelCommand::New(a) => {
            crate::check_output("--output", &a.output, true)?;
            sd_train::new_model(&a.configs, &a.output, a.seed)?;
            eprintln!("new model in {}", a.output.display());
            Ok(())
        }
        ModelCommand::Convert(a) => {
            crate::check_output("--output", &a.output, true)?;
            let target = match a.to {
                Target::Diffusers => sd::model_files::Target::Diffusers,
                Target::SingleFile => sd::model_files::Target::SingleFile,
            };
            sd::model_files::convert(&a.input, &a.output, target, a.half)?;
            let copy = a.input.is_dir() && matches!(a.to, Target::Diffusers);
            eprintln!(
                "wrote {}{}",
                a.output.display(),
                if copy { " (float16)" } else { "" }
            );
            Ok(())
        }
    }
}
