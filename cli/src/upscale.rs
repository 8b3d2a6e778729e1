//! `sdctl upscale IMAGE -o OUT --model FILE`: ESRGAN / Real-ESRGAN upscaling, tiled.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use sd_pipeline::model::esrgan::{UpscaleOptions, Upscaler};

use crate::CliResult;

#[derive(Args)]
pub struct UpscaleArgs {
    /// The image to upscale (PNG or JPEG)
    pub input: PathBuf,
    /// Where to write the result (.png or .jpg); it appears only when complete
    #[arg(short, long)]
    pub output: PathBuf,
    /// The upscaler: a .safetensors or .pth file (ESRGAN, Real-ESRGAN RRDBNet or
    /// SRVGGNetCompact), or with --upscaler-dir a file name (stem) inside that folder
    #[arg(long)]
    pub model: String,
    /// Folder of upscaler files that --model NAME is looked up in
    #[arg(long, value_name = "DIR")]
    pub upscaler_dir: Option<PathBuf>,
    /// Output scale, when not the model's own: the model's output is resized (Lanczos3) to
    /// int(width * scale) x int(height * scale), as Real-ESRGAN's --outscale
    #[arg(long)]
    pub scale: Option<f64>,
    /// Tile size in input pixels (0: the whole image at once)
    #[arg(long, default_value_t = 192)]
    pub tile: usize,
    /// Context around each tile, in input pixels, computed and then cropped away (Real-ESRGAN's
    /// tile_pad)
    #[arg(long, default_value_t = 16)]
    pub tile_overlap: usize,
}

pub fn run(a: UpscaleArgs) -> CliResult {
    crate::check_output("--output", &a.output, false)?;
    let format = image::ImageFormat::from_path(&a.output)
        .ok()
        .filter(|f| matches!(f, image::ImageFormat::Png | image::ImageFormat::Jpeg))
        .ok_or_else(|| format!("--output {}: use a .png or .jpg name", a.output.display()))?;
    if let Some(s) = a.scale {
        if !(s.is_finite() && s > 0.0) {
            return Err(format!("--scale {s}: expected a positive number").into());
        }
    }
    let model = model_path(&a.model, a.upscaler_dir.as_deref())?;
    sd_plugins_api::input_file::check(&a.input)?;
    let image = sd_pipeline::generation::image_io::open(&a.input)?;
    let up = Upscaler::load(&model)?;
    eprintln!("{}: {}", model.display(), up.info());
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} upscaling [{bar:30}] {pos}/{len} tiles eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let options = UpscaleOptions {
        tile: a.tile,
        overlap: a.tile_overlap,
        scale: a.scale,
    };
    let started = Instant::now();
    let out = up.upscale_image(&image, options, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    let out = out?;
    let seconds = started.elapsed().as_secs_f64();
    let out = if format == image::ImageFormat::Jpeg {
        image::DynamicImage::ImageRgb8(out.to_rgb8())
    } else {
        out
    };
    let output = &a.output;
    sd::output::write_atomic(output, |tmp: &Path| -> sd::Result<()> {
        out.save_with_format(tmp, format)
            .map_err(|e| format!("{}: {e}", output.display()).into())
    })?;
    eprintln!(
        "{}x{} -> {}x{} {} in {seconds:.1} s",
        image.width(),
        image.height(),
        out.width(),
        out.height(),
        output.display()
    );
    Ok(())
}

/// `--model`: a path, or with `dir` a name inside it (`sd::upscaler::resolve`: `NAME` or
/// `NAME.ext`, one path component, or A1111's Real-ESRGAN names).
fn model_path(model: &str, dir: Option<&Path>) -> CliResult<PathBuf> {
    Ok(sd::upscaler::resolve(model, dir).map_err(|e| format!("--model {e}"))?)
}
