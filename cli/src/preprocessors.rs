//! `sdctl preprocessors list` and `sdctl plugins list`.

use clap::Subcommand;
use sd_plugins_api::{ParamSpec, PluginSource};

use crate::settings::{self, SettingsArgs};
use crate::CliResult;

#[derive(Subcommand)]
pub enum PreprocessorsCommand {
    /// Every available preprocessor (built-in and from plugins) with its parameters.
    /// Takes --plugin, --plugin-dir and --config like `generate`.
    List(Box<SettingsArgs>),
}

#[derive(Subcommand)]
pub enum PluginsCommand {
    /// Built-in preprocessors and loaded plugins: kind, version, source, parameters.
    /// Takes --plugin, --plugin-dir and --config like `generate`.
    List(Box<SettingsArgs>),
}

fn params(specs: &[ParamSpec]) {
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

pub fn run_plugins(cmd: PluginsCommand) -> CliResult {
    let PluginsCommand::List(args) = cmd;
    let st = settings::load(&args)?;
    println!("{:<14} {:<13} {:<8} source", "name", "kind", "version");
    for (p, source) in st.registry.preprocessors() {
        if *source == PluginSource::Builtin {
            println!(
                "{:<14} {:<13} {:<8} built-in",
                p.name(),
                "preprocessor",
                p.version()
            );
            params(&p.params());
        }
    }
    for lib in st.registry.libraries() {
        let m = &lib.manifest;
        println!(
            "{:<14} {:<13} {:<8} {}",
            m.name,
            m.kind.to_string(),
            m.version,
            lib.path.display()
        );
        params(&m.params);
    }
    Ok(())
}
