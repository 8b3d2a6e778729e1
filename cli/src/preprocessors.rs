//! `sdctl preprocessors list`.

use clap::Subcommand;
use sd_plugins_api::ParamSpec;

use crate::settings::{self, SettingsArgs};
use crate::CliResult;

#[derive(Subcommand)]
pub enum PreprocessorsCommand {
    /// Every available preprocessor (built-in and from plugins) with its parameters.
    /// Takes --plugin, --plugin-dir and --config like `generate`.
    List(Box<SettingsArgs>),
}

/// A preprocessor's or plugin's parameters, one a line.
pub fn params(specs: &[ParamSpec]) {
    for s in specs {
        println!("    {} = {}  [{}]  {}", s.name, s.default, s.kind, s.help);
    }
}

pub fn run(cmd: PreprocessorsCommand) -> CliResult {
    let PreprocessorsCommand::List(args) = cmd;
    let st = settings::load(&args)?;
    println!("none  (built-in)\n    the image is used as the control image as it is");
    for (p, source) in st.registry.preprocessors() {
        println!(
            "{} {}  ({source})\n    {}",
            p.name(),
            p.version(),
            p.description()
        );
        params(&p.params());
    }
    Ok(())
}
