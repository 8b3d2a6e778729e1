//! One settings model for every subcommand that takes generation settings: layered from
//! defaults, `--config` files, `SDCTL_*` variables and flags, then validated as a whole
//! (every problem reported at once, each naming its file, line and key) before any model loads.

mod args;
mod check;
mod plugins;
mod show;
mod table;

pub use args::SettingsArgs;
pub use check::Settings;
pub use sd::config::problem::{Problem, Problems};
pub use show::render as show;

/// Layer and validate the settings given on the command line.
pub fn load(args: &SettingsArgs) -> Result<Settings, Problems> {
    let mut problems = Vec::new();
    let files = sd::config::sources::expand_includes(&args.config, &mut problems);
    let flags = args.to_dict(&mut problems);
    // SDCTL_LORA, SDCTL_CONTROL, ...: lists come from flags and files only
    problems.extend(sd::config::sources::env_problems());
    let png = args.from_png.as_deref().and_then(|p| {
        // a PNG carries generation parameters only: plugins, outputs and other paths are
        // dropped (sd::infotext::png_may_carry), each with a warning
        match sd::infotext::png_settings(p).and_then(|s| {
            for k in &s.dropped {
                eprintln!(
                    "warning: {}: ignoring `{k}` from the PNG's settings (a PNG carries generation parameters only)",
                    p.display()
                );
            }
            figment::value::Value::serialize(s.settings).map_err(|e| e.to_string())
        }) {
            Ok(figment::value::Value::Dict(_, d)) => Some(d),
            Ok(_) => None,
            Err(e) => {
                problems.push(Problem::bare("--from-png", e));
                None
            }
        }
    });
    // unreadable files are reported and left out; the rest is still checked
    let fig = sd::config::sources::compose(&files, png, flags);
    match check::check(&fig, args.from_png.as_deref(), sd::registry()) {
        Ok(s) if problems.is_empty() => Ok(s),
        Ok(_) => Err(Problems(problems)),
        Err(Problems(more)) => {
            problems.extend(more);
            problems.sort_by_key(Problem::order);
            Err(Problems(problems))
        }
    }
}
