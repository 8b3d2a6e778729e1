//! `sdctl dataset fill`: a synthetic training dataset.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use sd_train::fill::write_fill_dataset;

use crate::CliResult;

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

pub fn run(cmd: DatasetCommand) -> CliResult {
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
