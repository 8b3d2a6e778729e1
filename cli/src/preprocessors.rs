//! `sdctl preprocessors list`.

use clap::Subcommand;

use crate::CliResult;

#[derive(Subcommand)]
pub enum PreprocessorsCommand {
    /// Every available preprocessor (built-in and loaded) with its parameters.
    List,
}

pub fn run(cmd: PreprocessorsCommand) -> CliResult {
    match cmd {
        PreprocessorsCommand::List => {
            let reg = sd_preprocessors::registry();
            println!("none  (built-in)\n    the image is used as the control image as it is");
            for (p, source) in reg.preprocessors() {
                println!("{} {}  ({source})\n    {}", p.name(), p.version(), p.description());
                for spec in p.params() {
                    println!(
                        "    {} = {}  [{}]  {}",
                        spec.name, spec.default, spec.kind, spec.help
                    );
                }
            }
            Ok(())
        }
    }
}
