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

/// Every tEXt / zTXt / iTXt chunk of a PNG as (keyword, text).
pub fn text_chunks(path: &std::path::Path) -> CliResult<Vec<(String, String)>> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let reader = decoder
        .read_info()
        .map_err(|e| format!("{}: not a readable PNG: {e}", path.display()))?;
    let info = reader.info();
    let mut out: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    for t in &info.compressed_latin1_text {
        if let Ok(text) = t.get_text() {
            out.push((t.keyword.clone(), text));
        }
    }
    for t in &info.utf8_text {
        if let Ok(text) = t.get_text() {
            out.push((t.keyword.clone(), text));
        }
    }
    Ok(out)
}

pub fn run(a: PngInfoArgs) -> CliResult {
    let chunks = text_chunks(&a.image)?;
    let find = |k: &str| {
        chunks
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    if a.json {
        let j = find(crate::infotext::JSON_CHUNK).ok_or_else(|| {
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
