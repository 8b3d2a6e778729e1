//! `sdctl plugins list`.

use clap::Subcommand;
use sd_plugins_api::PluginSource;

use crate::preprocessors::params;
use crate::settings::{self, SettingsArgs};
use crate::CliResult;

#[derive(Subcommand)]
pub enum PluginsCommand {
    /// Built-in preprocessors and loaded plugins: kind, version, source, parameters.
    /// Takes --plugin, --plugin-dir and --config like `generate`.
    List(Box<SettingsArgs>),
}

pub fn run(cmd: PluginsCommand) -> CliResult {
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
