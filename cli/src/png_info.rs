//! `sdctl png-info`: the generation settings stored in a PNG (ours and AUTOMATIC1111's
//! `parameters` text chunk, ComfyUI's `prompt` / `workflow` JSON chunks).

use std::path::PathBuf;

use clap::Args;

use crate::CliResult;

#[derive(Args, Debug)]
pub struct PngInfoArgs {
    pub image: PathBuf,
    /// Print sdctl's full JSON settings chunk instead of the A1111-style text
    #[arg(long)]
    pub json: bool,
}

/// A PNG's text as it may reach a terminal: control characters (C0 but newline and tab, DEL,
/// C1) escaped as `\u{1b}`, so an image cannot send escape sequences (OSC titles, cursor
/// moves, hyperlinks) to the terminal that shows it.
fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

pub fn run(a: PngInfoArgs) -> CliResult {
    let chunks = sd::png_text::text_chunks(&a.image)?;
    let find = |k: &str| sd::png_text::find(&chunks, k);
    if a.json {
        let j = find(sd::infotext::JSON_CHUNK).ok_or_else(|| {
            format!(
                "{}: no sdctl settings chunk (not made by sdctl)",
                a.image.display()
            )
        })?;
        let v: serde_json::Value = serde_json::from_str(j)
            .map_err(|e| format!("{}: sdctl chunk: {e}", a.image.display()))?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if let Some(p) = find("parameters") {
        println!("{}", printable(p));
    } else if let Some(prompt) = find("prompt") {
        // ComfyUI: the API-format graph; report the text of its CLIPTextEncode nodes
        let v: serde_json::Value = serde_json::from_str(prompt).map_err(|e| {
            format!(
                "{}: ComfyUI prompt chunk is not JSON: {e}",
                a.image.display()
            )
        })?;
        println!("ComfyUI workflow");
        if let Some(nodes) = v.as_object() {
            let mut ids: Vec<&String> = nodes.keys().collect();
            ids.sort();
            for id in ids {
                let n = &nodes[id];
                if let Some(text) = n["inputs"]["text"].as_str() {
                    println!(
                        "node {} ({}): {}",
                        printable(id),
                        printable(n["class_type"].as_str().unwrap_or("?")),
                        printable(text)
                    );
                }
            }
        }
    } else {
        return Err(format!(
            "{}: no generation settings found (no `parameters` or ComfyUI `prompt` chunk)",
            a.image.display()
        )
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(
            super::printable("a\x1b]0;pwned\x07b\n\tc\u{9b}d\r\x7f"),
            "a\\u{1b}]0;pwned\\u{7}b\n\tc\\u{9b}d\\u{d}\\u{7f}"
        );
    }
}
