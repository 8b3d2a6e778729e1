//! `sdctl lora`: inspect and merge LoRA files.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use sd_lora::{load_lora, merge_into, LoraFile, LoraSpec, Targets};
use sd_plugins_api::input_file;

use crate::CliResult;

#[derive(Subcommand, Debug)]
pub enum LoraCommand {
    /// Format, ranks, alphas, number of target modules and which model parts a LoRA touches
    Inspect(InspectArgs),
    /// Write a model with LoRAs merged in (diffusers layout)
    Merge(MergeArgs),
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    pub file: PathBuf,
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// PATH[:WEIGHT], repeatable
    #[arg(long, required = true)]
    pub lora: Vec<String>,
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long)]
    pub strict_lora: bool,
}

pub fn run(cmd: LoraCommand) -> CliResult {
    match cmd {
        LoraCommand::Inspect(a) => {
            input_file::check(&a.file)?;
            print!("{}", LoraFile::load(&a.file)?.describe(&a.file));
            Ok(())
        }
        LoraCommand::Merge(a) => {
            crate::check_output("--output", &a.output, true)?;
            input_file::check_file_or_folder(&a.model).map_err(|e| format!("--model {e}"))?;
            let specs = (a.lora.iter())
                .map(|l| {
                    let spec = LoraSpec::parse(l)?;
                    input_file::check(&spec.path).map_err(|e| format!("--lora {e}"))?;
                    Ok(spec)
                })
                .collect::<CliResult<Vec<_>>>()?;
            let targets = Targets::from_model(&a.model)?;
            let mut patches = Vec::new();
            for spec in specs {
                let (p, report) = load_lora(&spec, &targets)?;
                eprintln!("lora {}", report.summary());
                if a.strict_lora && !report.unmatched.is_empty() {
                    return Err(format!("--strict-lora: {}", report.summary()).into());
                }
                patches.push(p);
            }
            merge_into(&a.model, &patches, &a.output)?;
            eprintln!("wrote {}", a.output.display());
            Ok(())
        }
    }
}
