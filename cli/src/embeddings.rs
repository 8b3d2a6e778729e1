//! `sdctl embeddings`: what an embeddings folder holds.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use sd_pipeline::text::embeddings::scan_dir;
use serde_json::json;

use crate::CliResult;

#[derive(Subcommand, Debug)]
pub enum EmbeddingsCommand {
    /// Every textual-inversion embedding in a folder: name (what a prompt writes), vectors,
    /// widths and the model family they are for; files that are no embedding, with why
    List(ListArgs),
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// The embeddings folder (as --embeddings-dir)
    pub dir: PathBuf,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

/// The model family an embedding's widths are for (CLIP-L 768, OpenCLIP-H 1024, bigG 1280).
fn family(widths: &[usize]) -> &'static str {
    match widths {
        [768] => "SD 1.x",
        [1024] => "SD 2.x",
        [768, 1280] => "SDXL",
        [1280] => "SDXL refiner",
        _ => "other",
    }
}

pub fn run(cmd: EmbeddingsCommand) -> CliResult {
    match cmd {
        EmbeddingsCommand::List(a) => {
            let scan = scan_dir(&a.dir).map_err(|e| format!("embeddings list: {e}"))?;
            if a.json {
                let loaded: Vec<_> = scan
                    .loaded
                    .iter()
                    .map(|t| {
                        json!({"name": t.name, "vectors": t.vectors, "widths": t.widths(),
                               "family": family(&t.widths()), "path": t.path})
                    })
                    .collect();
                let skipped: Vec<_> = scan
                    .skipped
                    .iter()
                    .map(|(p, why)| json!({"path": p, "reason": why}))
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({"loaded": loaded, "skipped": skipped}))?
                );
                return Ok(());
            }
            if scan.loaded.is_empty() {
                println!("no embeddings in {}", a.dir.display());
            }
            for t in &scan.loaded {
                let w = t.widths();
                println!(
                    "{:24} {} vector{}  width {:12} {:12} {}",
                    t.name,
                    t.vectors,
                    if t.vectors == 1 { " " } else { "s" },
                    w.iter()
                        .map(|x| x.to_string())
                        .collect::<Vec<_>>()
                        .join("+"),
                    family(&w),
                    t.path.display()
                );
            }
            for (p, why) in &scan.skipped {
                println!("skipped {}: {why}", p.display());
            }
            Ok(())
        }
    }
}
