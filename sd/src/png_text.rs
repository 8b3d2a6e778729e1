//! Reading a PNG's text chunks (tEXt, zTXt, iTXt), where generation settings are stored.
//!
//! Compressed chunks (zTXt, iTXt) are inflated with a bound: a few kilobytes of zeros can
//! claim gigabytes of text, and A1111's infotext is a few kilobytes.

use std::path::Path;

/// The most text one chunk may inflate to.
pub const MAX_CHUNK_TEXT: usize = 1 << 20;
/// The most text all of a PNG's chunks may hold together.
pub const MAX_TOTAL_TEXT: usize = 4 << 20;

/// Every tEXt / zTXt / iTXt chunk of a PNG as (keyword, text). A compressed chunk that
/// inflates past [`MAX_CHUNK_TEXT`], or text past [`MAX_TOTAL_TEXT`] in all, is refused with
/// an error naming the PNG and the chunk's keyword.
pub fn text_chunks(path: &Path) -> Result<Vec<(String, String)>, String> {
    let file = sd_plugins_api::input_file::open(path)?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let reader = decoder
        .read_info()
        .map_err(|e| format!("{}: not a readable PNG: {e}", path.display()))?;
    let info = reader.info();
    let too_long = |kind: &str, keyword: &str, limit: usize| {
        let what = if limit == MAX_TOTAL_TEXT {
            format!("the text chunks up to the {kind} chunk `{keyword}` hold")
        } else {
            format!("the {kind} text chunk `{keyword}` holds")
        };
        format!(
            "{}: {what} more than {} KiB of text \
             (at most {} KiB a chunk and {} KiB in all are read)",
            path.display(),
            limit >> 10,
            MAX_CHUNK_TEXT >> 10,
            MAX_TOTAL_TEXT >> 10
        )
    };
    let mut out: Vec<(String, String)> = Vec::new();
    let mut total = 0usize;
    let mut push = |kind: &str, keyword: &str, text: String| {
        total += text.len();
        if total > MAX_TOTAL_TEXT {
            return Err(too_long(kind, keyword, MAX_TOTAL_TEXT));
        }
        out.push((keyword.to_string(), text));
        Ok(())
    };
    for t in &info.uncompressed_latin1_text {
        push("tEXt", &t.keyword, t.text.clone())?;
    }
    for t in &info.compressed_latin1_text {
        let mut t = t.clone();
        match t.decompress_text_with_limit(MAX_CHUNK_TEXT) {
            Ok(()) => {}
            Err(e) if out_of_space(&e) => return Err(too_long("zTXt", &t.keyword, MAX_CHUNK_TEXT)),
            Err(_) => continue, // an unreadable chunk is no settings
        }
        if let Ok(text) = t.get_text() {
            push("zTXt", &t.keyword, text)?;
        }
    }
    for t in &info.utf8_text {
        let mut t = t.clone();
        match t.decompress_text_with_limit(MAX_CHUNK_TEXT) {
            Ok(()) => {}
            Err(e) if out_of_space(&e) => return Err(too_long("iTXt", &t.keyword, MAX_CHUNK_TEXT)),
            Err(_) => continue,
        }
        if let Ok(text) = t.get_text() {
            push("iTXt", &t.keyword, text)?;
        }
    }
    Ok(out)
}

/// Whether inflating stopped at the limit (png's error kind for it is private: "Out of
/// decompression space").
fn out_of_space(e: &png::DecodingError) -> bool {
    e.to_string().contains("decompression space")
}

/// The text of the first chunk named `key`.
pub fn find<'a>(chunks: &'a [(String, String)], key: &str) -> Option<&'a str> {
    chunks
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}
