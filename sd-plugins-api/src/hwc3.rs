//! ControlNet's `HWC3`: any 8-bit image to 3-channel RGB.

use crate::preprocess::ImageBuf;

/// Gray is repeated to RGB; RGBA is composited over white as
/// `(rgb * a + 255 * (1 - a)).clip(0, 255).astype(uint8)` in float32 (annotator/util.py HWC3).
pub fn hwc3(img: &ImageBuf) -> ImageBuf {
    let n = img.width * img.height;
    let mut data = Vec::with_capacity(n * 3);
    match img.channels {
        3 => return img.clone(),
        1 => img.data.iter().for_each(|&g| data.extend([g, g, g])),
        4 => {
            for px in img.data.chunks_exact(4) {
                let a = px[3] as f32 / 255.0;
                for &c in &px[..3] {
                    let y = c as f32 * a + 255.0 * (1.0 - a);
                    data.push(y.clamp(0.0, 255.0) as u8);
                }
            }
        }
        c => unreachable!("ImageBuf with {c} channels"),
    }
    ImageBuf {
        width: img.width,
        height: img.height,
        channels: 3,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gray_and_alpha() {
        let g = ImageBuf::new(2, 1, 1, vec![0, 200]).unwrap();
        assert_eq!(hwc3(&g).data, vec![0, 0, 0, 200, 200, 200]);
        // half-transparent black over white: 255 * (1 - 128/255) is 126.99999 in float32 (numpy too): 126
        let a = ImageBuf::new(1, 1, 4, vec![0, 0, 0, 128]).unwrap();
        assert_eq!(hwc3(&a).data, vec![126, 126, 126]);
        let opaque = ImageBuf::new(1, 1, 4, vec![10, 20, 30, 255]).unwrap();
        assert_eq!(hwc3(&opaque).data, vec![10, 20, 30]);
    }
}
