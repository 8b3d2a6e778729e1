//! `sdctl config`: inspect layered settings.

use clap::Subcommand;

use crate::settings::{self, SettingsArgs};
use crate::CliResult;

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Print the merged settings as TOML, each value with where it came from
    /// (default, FILE:LINE, env VAR, flag --NAME). Takes the same arguments as `generate`.
    Show(Box<SettingsArgs>),
}

pub fn run(cmd: ConfigCommand) -> CliResult {
    match cmd {
        ConfigCommand::Show(args) => {
            let s = settings::load(&args)?;
            print!("{}", settings::show(&s));
            Ok(())
        }
    }
}
