//! Reading a PNG's text chunks (tEXt, zTXt, iTXt), where generation settings are stored.

use std::path::Path;

/// Every tEXt / zTXt / iTXt chunk of a PNG as (keyword, text).
pub fn text_chunks(path: &Path) -> Result<Vec<(String, String)>, String> {
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

/// The text of the first chunk named `key`.
pub fn find<'a>(chunks: &'a [(String, String)], key: &str) -> Option<&'a str> {
    chunks
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}
