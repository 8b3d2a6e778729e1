//! Images in requests and responses: base64 (raw or as a `data:` URL) in, base64 PNG out.
//! A request's image is written, as the bytes it sent, to the request's scratch folder, so the
//! engine reads it exactly as `sdctl generate` reads the same file.

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use crate::error::{ApiError, ApiResult};

/// The bytes of a base64 image, with or without a `data:image/...;base64,` prefix.
pub fn decode_b64(field: &str, text: &str) -> ApiResult<Vec<u8>> {
    let body = match text.split_once(";base64,") {
        Some((head, rest)) if head.starts_with("data:") => rest,
        _ => text,
    };
    let clean: String = body.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    STANDARD
        .decode(clean.as_bytes())
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(clean.as_bytes()))
        .map_err(|e| ApiError::bad(format!("{field}: not base64 ({e})")))
}

pub fn encode_b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// Write a base64 image to `dir/name` and check that it is an image the engine can read
/// (format and size limits of `sd_plugins_api::image_input`); the error names the field.
pub fn save(dir: &Path, name: &str, field: &str, text: &str) -> ApiResult<PathBuf> {
    let bytes = decode_b64(field, text)?;
    let path = dir.join(name);
    std::fs::write(&path, &bytes)
        .map_err(|e| ApiError::internal(format!("writing {field} to scratch: {e}")))?;
    sd_plugins_api::image_input::open_image(&path).map_err(|e| {
        // the scratch path means nothing to the client
        let e = e.replace(&path.display().to_string(), "");
        ApiError::bad(format!(
            "{field}: not an image sdctl can read{}",
            if e.trim().is_empty() {
                String::new()
            } else {
                format!(" ({})", e.trim_start_matches([':', ' ']))
            }
        ))
    })?;
    Ok(path)
}

/// An RGB or grey 8-bit image as PNG bytes.
pub fn png_bytes(width: u32, height: u32, channels: usize, data: Vec<u8>) -> ApiResult<Vec<u8>> {
    let img = match channels {
        1 => image::GrayImage::from_raw(width, height, data).map(image::DynamicImage::from),
        3 => image::RgbImage::from_raw(width, height, data).map(image::DynamicImage::from),
        4 => image::RgbaImage::from_raw(width, height, data).map(image::DynamicImage::from),
        _ => None,
    }
    .ok_or_else(|| ApiError::internal("an image of the wrong size"))?;
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| ApiError::internal(format!("PNG encoding: {e}")))?;
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_comes_raw_or_as_a_data_url_and_garbage_is_named() {
        let raw = encode_b64(b"\x89PNG");
        assert_eq!(decode_b64("f", &raw).unwrap(), b"\x89PNG");
        let url = format!("data:image/png;base64,{raw}");
        assert_eq!(decode_b64("f", &url).unwrap(), b"\x89PNG");
        let e = decode_b64("init_images[0]", "not base64!").unwrap_err();
        assert!(
            e.detail.starts_with("init_images[0]: not base64"),
            "{}",
            e.detail
        );
        let dir = tempfile::tempdir().unwrap();
        let e = save(dir.path(), "x.png", "mask", &encode_b64(b"garbage bytes")).unwrap_err();
        assert!(e.detail.starts_with("mask: not an image"), "{}", e.detail);
        assert!(!e.detail.contains(&dir.path().display().to_string()));
    }
}
