//! Image files from user paths, decoded only after their declared size is checked: a tiny
//! file whose header claims 20000 x 20000 pixels is refused before any pixel is allocated.
//! The one place where init images, masks, control images and `detect` inputs are opened.

use std::path::Path;

/// The widest / tallest image accepted.
pub const MAX_SIDE: u32 = 16384;
/// The most bytes the decoder may allocate for one image.
pub const MAX_DECODED_BYTES: u64 = 1 << 30;

/// Decode the image file at `path` with the limits above. Errors say what is wrong (when
/// the size is the problem, the size the file declares); callers name the file.
pub fn open_image(path: &Path) -> Result<image::DynamicImage, String> {
    if let Some(why) = crate::input_file::problem(path) {
        return Err(why);
    }
    let reader = |path: &Path| {
        image::ImageReader::open(path)
            .and_then(|r| r.with_guessed_format())
            .map_err(|e| e.to_string())
    };
    let too_large = |w: u32, h: u32| {
        format!(
            "the image is {w}x{h} pixels, more than this reads \
             (at most {MAX_SIDE}x{MAX_SIDE} and {} MiB decoded)",
            MAX_DECODED_BYTES >> 20
        )
    };
    // The header alone gives the size; check it before decoding anything.
    let dims = reader(path)?.into_dimensions().ok();
    if let Some((w, h)) = dims {
        let bytes = w as u64 * h as u64 * 4;
        if w > MAX_SIDE || h > MAX_SIDE || bytes > MAX_DECODED_BYTES {
            return Err(too_large(w, h));
        }
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODED_BYTES);
    let mut r = reader(path)?;
    r.limits(limits);
    r.decode().map_err(|e| match (e, dims) {
        (image::ImageError::Limits(_), Some((w, h))) => too_large(w, h),
        (e, _) => e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid 1x1 PNG whose IHDR is patched to declare `w` x `h` (with a correct CRC).
    fn png_declaring(w: u32, h: u32) -> Vec<u8> {
        let mut bytes = Vec::new();
        image::RgbImage::new(1, 1)
            .write_to(
                &mut std::io::Cursor::new(&mut bytes),
                image::ImageFormat::Png,
            )
            .unwrap();
        // Signature (8), IHDR length (4), "IHDR" (4), width, height, 5 more bytes, CRC.
        bytes[16..20].copy_from_slice(&w.to_be_bytes());
        bytes[20..24].copy_from_slice(&h.to_be_bytes());
        let crc = crc32(&bytes[12..29]);
        bytes[29..33].copy_from_slice(&crc.to_be_bytes());
        bytes
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut c = 0xffff_ffffu32;
        for &b in data {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }

    #[test]
    fn a_huge_declared_size_is_refused_before_decoding() {
        let dir = std::env::temp_dir().join(format!("sd-image-input-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("huge.png");
        std::fs::write(&path, png_declaring(20000, 20000)).unwrap();
        let t = std::time::Instant::now();
        let err = open_image(&path).unwrap_err();
        assert!(t.elapsed().as_secs() < 10);
        assert!(err.contains("20000x20000"), "{err}");
        let small = dir.join("small.png");
        std::fs::write(&small, png_declaring(1, 1)).unwrap();
        assert_eq!(open_image(&small).unwrap().width(), 1);
        std::fs::remove_dir_all(&dir).ok();
    }
}
