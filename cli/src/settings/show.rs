//! `sdctl config show`: the merged settings as TOML, each value annotated with its origin.

use crate::settings::check::Settings;
use crate::settings::table::{Shown, Typed};

fn literal(v: &Typed) -> String {
    match v {
        Typed::Str(s) => toml::Value::String(s.clone()).to_string(),
        Typed::Int(i) => i.to_string(),
        Typed::Float(x) => toml::Value::Float(*x).to_string(),
        Typed::Bool(b) => b.to_string(),
        Typed::Path(p) => toml::Value::String(p.to_string_lossy().into()).to_string(),
        Typed::Preprocessor(p) if p.params.is_empty() => {
            toml::Value::String(p.name.clone()).to_string()
        }
        Typed::Preprocessor(p) => {
            let mut parts = vec![format!("name = {}", toml::Value::String(p.name.clone()))];
            for (k, v) in &p.params {
                let lit = match v {
                    sd_plugins_api::ParamValue::Bool(b) => b.to_string(),
                    sd_plugins_api::ParamValue::Int(i) => i.to_string(),
                    sd_plugins_api::ParamValue::Float(x) => toml::Value::Float(*x).to_string(),
                    sd_plugins_api::ParamValue::Str(s) => {
                        toml::Value::String(s.clone()).to_string()
                    }
                };
                parts.push(format!("{k} = {lit}"));
            }
            format!("{{ {} }}", parts.join(", "))
        }
    }
}

fn lines(out: &mut String, shown: &[Shown]) {
    let rows: Vec<(String, String)> = shown
        .iter()
        .map(|s| {
            (
                format!("{} = {}", s.key, literal(&s.value)),
                s.origin.to_string(),
            )
        })
        .collect();
    let width = rows
        .iter()
        .map(|(l, _)| l.chars().count())
        .max()
        .unwrap_or(0);
    for (l, o) in rows {
        let pad = width - l.chars().count();
        out.push_str(&format!("{l}{}  # {o}\n", " ".repeat(pad)));
    }
}

/// The settings as TOML that `--config` reads back, with `# origin` comments.
pub fn render(s: &Settings) -> String {
    let mut out = String::new();
    lines(&mut out, &s.shown);
    for (table, entries) in [
        ("control", &s.control_shown),
        ("lora", &s.lora_shown),
        ("plugins", &s.plugin_shown),
    ] {
        for shown in entries {
            out.push_str(&format!("\n[[{table}]]\n"));
            lines(&mut out, shown);
        }
    }
    out
}
