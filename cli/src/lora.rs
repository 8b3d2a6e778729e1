//! `sdctl lora`: inspect and merge LoRA files.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use sd_lora::{load_lora, merge_into, Factors, LoraFile, LoraSpec, Targets};

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
            let f = LoraFile::load(&a.file)?;
            let mut ranks = std::collections::BTreeSet::new();
            let mut alphas = std::collections::BTreeSet::new();
            let (mut unet, mut te, mut other) = (0, 0, 0);
            let mut kinds = std::collections::BTreeMap::new();
            for (k, m) in &f.modules {
                if let Some(r) = m.rank() {
                    ranks.insert(r);
                }
                if let Some(al) = m.alpha {
                    alphas.insert(format!("{al}"));
                }
                *kinds
                    .entry(match (&m.factors, m.factors_is_conv()) {
                        (Factors::LoRA { .. }, true) => "LoCon (conv)",
                        (Factors::LoRA { .. }, false) => "LoRA",
                        (Factors::LoHa { .. }, _) => "LoHa",
                        (Factors::LoKr { .. }, _) => "LoKr",
                    })
                    .or_insert(0) += 1;
                if k.starts_with("lora_unet_") || k.starts_with("unet.") {
                    unet += 1;
                } else if k.starts_with("lora_te") || k.starts_with("text_encoder.") {
                    te += 1;
                } else {
                    other += 1;
                }
            }
            println!("file: {}", a.file.display());
            println!("format: {}", f.format);
            println!(
                "modules: {} (UNet {unet}, text encoder {te}{})",
                f.modules.len(),
                if other > 0 {
                    format!(", unprefixed {other}")
                } else {
                    String::new()
                }
            );
            println!(
                "kinds: {}",
                kinds
                    .iter()
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            println!("ranks: {:?}", ranks);
            println!(
                "alphas: {}",
                if alphas.is_empty() {
                    "none (alpha = rank)".to_string()
                } else {
                    alphas.into_iter().collect::<Vec<_>>().join(", ")
                }
            );
            Ok(())
        }
        LoraCommand::Merge(a) => {
            crate::check_output("--output", &a.output, true)?;
            let targets = Targets::from_model(&a.model)?;
            let mut patches = Vec::new();
            for l in &a.lora {
                let spec = LoraSpec::parse(l)?;
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
