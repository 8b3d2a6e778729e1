//! `sdctl dataset fill`: a fill50k-style synthetic dataset, so that training can be tried with
//! no download. Source: a circle's outline in white on black; target: the same circle filled
//! with one named CSS colour on a background of another; prompt "<colour> circle with
//! <colour> background" (colour names as words, as fill50k writes them).

use std::io::Write;
use std::path::Path;

use image::{Rgb, RgbImage};
use sd_pipeline::output::StagedDir;
use sd_pipeline::rng::TorchRng;

use crate::error::{Result, TrainError};

/// A selection of CSS colour names with their RGB values.
pub const COLOURS: &[(&str, [u8; 3])] = &[
    ("red", [255, 0, 0]),
    ("green", [0, 128, 0]),
    ("blue", [0, 0, 255]),
    ("yellow", [255, 255, 0]),
    ("orange", [255, 165, 0]),
    ("purple", [128, 0, 128]),
    ("white", [255, 255, 255]),
    ("black", [0, 0, 0]),
    ("gray", [128, 128, 128]),
    ("pink", [255, 192, 203]),
    ("brown", [165, 42, 42]),
    ("cyan", [0, 255, 255]),
    ("magenta", [255, 0, 255]),
    ("navy", [0, 0, 128]),
    ("teal", [0, 128, 128]),
    ("olive", [128, 128, 0]),
    ("maroon", [128, 0, 0]),
    ("lime", [0, 255, 0]),
    ("gold", [255, 215, 0]),
    ("silver", [192, 192, 192]),
    ("indigo", [75, 0, 130]),
    ("violet", [238, 130, 238]),
    ("coral", [255, 127, 80]),
    ("salmon", [250, 128, 114]),
    ("khaki", [240, 230, 140]),
    ("turquoise", [64, 224, 208]),
    ("orchid", [218, 112, 214]),
    ("tan", [210, 180, 140]),
    ("dark green", [0, 100, 0]),
    ("sky blue", [135, 206, 235]),
    ("light green", [144, 238, 144]),
    ("dark blue", [0, 0, 139]),
    ("hot pink", [255, 105, 180]),
    ("chocolate", [210, 105, 30]),
    ("crimson", [220, 20, 60]),
    ("lavender", [230, 230, 250]),
];

/// A uniform draw in [0, 1).
fn uniform(rng: &mut TorchRng) -> f64 {
    rng.next_u32() as f64 / 4_294_967_296.0
}

/// One example: (source, target, prompt, centre, radius).
pub fn example(size: u32, rng: &mut TorchRng) -> (RgbImage, RgbImage, String, (f64, f64), f64) {
    let s = size as f64;
    let r = s * (0.1 + 0.25 * uniform(rng));
    let cx = s * (0.15 + 0.7 * uniform(rng));
    let cy = s * (0.15 + 0.7 * uniform(rng));
    let fg = (uniform(rng) * COLOURS.len() as f64) as usize % COLOURS.len();
    let mut bg = (uniform(rng) * COLOURS.len() as f64) as usize % COLOURS.len();
    if bg == fg {
        bg = (bg + 1) % COLOURS.len();
    }
    let (fname, fc) = COLOURS[fg];
    let (bname, bcol) = COLOURS[bg];
    let width = (s / 64.0).max(1.0);
    let mut source = RgbImage::new(size, size);
    let mut target = RgbImage::from_pixel(size, size, Rgb(bcol));
    for y in 0..size {
        for x in 0..size {
            let d = ((x as f64 + 0.5 - cx).powi(2) + (y as f64 + 0.5 - cy).powi(2)).sqrt();
            // anti-aliased outline: coverage falls off over one pixel around the ring
            let cover = (1.0 - ((d - r).abs() - width / 2.0).max(0.0)).clamp(0.0, 1.0);
            let v = (cover * 255.0).round() as u8;
            source.put_pixel(x, y, Rgb([v, v, v]));
            let inside = (r + 0.5 - d).clamp(0.0, 1.0);
            let mix = |a: u8, b: u8| (a as f64 * inside + b as f64 * (1.0 - inside)).round() as u8;
            target.put_pixel(
                x,
                y,
                Rgb([
                    mix(fc[0], bcol[0]),
                    mix(fc[1], bcol[1]),
                    mix(fc[2], bcol[2]),
                ]),
            );
        }
    }
    (
        source,
        target,
        format!("{fname} circle with {bname} background"),
        (cx, cy),
        r,
    )
}

/// Write `count` examples of `size` x `size` into `out` (fill50k layout), all or nothing.
pub fn write_fill_dataset(out: &Path, count: usize, size: u32, seed: u64) -> Result<()> {
    if out.exists() {
        return Err(TrainError::file(out, "already exists: choose a new folder"));
    }
    if count == 0 || !(16..=2048).contains(&size) {
        return Err(TrainError::Invalid(format!(
            "count {count} and size {size}: need count >= 1 and 16 <= size <= 2048"
        )));
    }
    let stage = StagedDir::new(out)?;
    let tmp = stage.path();
    let io = |e: std::io::Error| TrainError::file(tmp, e.to_string());
    std::fs::create_dir_all(tmp.join("source")).map_err(io)?;
    std::fs::create_dir_all(tmp.join("target")).map_err(io)?;
    let mut index = std::fs::File::create(tmp.join("prompt.json")).map_err(io)?;
    let mut rng = TorchRng::new(seed);
    for i in 0..count {
        let (source, target, prompt, _, _) = example(size, &mut rng);
        let img =
            |im: &RgbImage, p: &Path| im.save(p).map_err(|e| TrainError::file(p, e.to_string()));
        img(&source, &tmp.join(format!("source/{i}.png")))?;
        img(&target, &tmp.join(format!("target/{i}.png")))?;
        let line = serde_json::json!({
            "source": format!("source/{i}.png"),
            "target": format!("target/{i}.png"),
            "prompt": prompt,
        });
        writeln!(index, "{line}").map_err(io)?;
    }
    drop(index);
    stage.commit()?;
    Ok(())
}
