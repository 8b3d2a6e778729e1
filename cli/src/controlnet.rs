//! `sdctl controlnet`: tools for ControlNet files.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::CliResult;

#[derive(Subcommand, Debug)]
pub enum ControlNetCommand {
    /// Write a new ControlNet for a base model (diffusers format): the encoder copied from the
    /// base UNet, zero convolutions zero, so it changes nothing until trained.
    Init(InitArgs),
    /// Say what a unit model file or folder is (ControlNet, union ControlNet, T2I-Adapter),
    /// the model family it fits and its architecture, read from its keys.
    Inspect(InspectArgs),
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The model file (.safetensors, .pth) or diffusers folder
    pub model: PathBuf,
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// diffusers-layout base model folder
    #[arg(long)]
    pub base: PathBuf,
    /// New folder to write (config.json + diffusion_pytorch_model.safetensors)
    #[arg(long)]
    pub output: PathBuf,
    /// Seed of the hint encoder's random initialisation
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(cmd: ControlNetCommand) -> CliResult {
    match cmd {
        ControlNetCommand::Init(a) => {
            crate::check_output("--output", &a.output, true)?;
            if !a.base.join("unet").is_dir() {
                return Err(format!(
                    "--base {}: not a diffusers model folder (no unet/)",
                    a.base.display()
                )
                .into());
            }
            sd_controlnet::init::write_initial_controlnet(&a.base, &a.output, a.seed)?;
            eprintln!("wrote {}", a.output.display());
            Ok(())
        }
        ControlNetCommand::Inspect(a) => {
            let what = sd_controlnet::unit_model::describe(&a.model)?;
            println!("{}: {what}", a.model.display());
            Ok(())
        }
    }
}
