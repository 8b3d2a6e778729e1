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
        println!("{p}");
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
                        "node {id} ({}): {text}",
                        n["class_type"].as_str().unwrap_or("?")
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
