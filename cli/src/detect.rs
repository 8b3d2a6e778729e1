//! `sdctl detect NAME INPUT -o OUTPUT`: run a preprocessor on an image.

use std::path::PathBuf;

use clap::Args;
use sd_plugins_api::{resolve_params, ImageBuf, ParamKind, ParamValue};

use crate::settings::{self, SettingsArgs};
use crate::CliResult;

#[derive(Args)]
pub struct DetectArgs {
    /// Preprocessor name (`sdctl preprocessors list`)
    pub name: String,
    pub input: PathBuf,
    #[arg(short, long)]
    pub output: PathBuf,
    /// Detect resolution (short side); an input whose short side is this and whose sides are
    /// multiples of 64 is processed at its own size
    #[arg(long, default_value_t = 512)]
    pub resolution: usize,
    /// sd-webui-controlnet's sizing: short side to the resolution without rounding to 64,
    /// padded to multiples of 64 for detection and cropped back after (resize_image_with_pad)
    #[arg(long)]
    pub pad: bool,
    /// A preprocessor parameter, repeatable: KEY=VALUE
    #[arg(long = "param", value_name = "KEY=VALUE")]
    pub params: Vec<String>,
    /// A plugin providing preprocessors, repeatable
    #[arg(long)]
    pub plugin: Vec<String>,
    #[arg(long)]
    pub plugin_dir: Option<PathBuf>,
}

pub fn run(a: DetectArgs) -> CliResult {
    crate::check_output("--output", &a.output, false)?;
    let st = settings::load(&SettingsArgs {
        plugin: a.plugin.clone(),
        plugin_dir: a.plugin_dir.clone(),
        ..Default::default()
    })?;
    let reg = &st.registry;
    let p = reg.preprocessor(&a.name).ok_or_else(|| {
        let names = reg.preprocessor_names();
        match sd_plugins_api::params::closest(&a.name, &names) {
            Some(c) => format!("unknown preprocessor {:?} (did you mean `{c}`?)", a.name),
            None => format!(
                "unknown preprocessor {:?} (available: {})",
                a.name,
                names.join(", ")
            ),
        }
    })?;
    if !(64..=8192).contains(&a.resolution) {
        return Err(format!("--resolution {}: use 64..=8192", a.resolution).into());
    }
    let specs = p.params();
    let mut given = Vec::new();
    for kv in &a.params {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("--param {kv:?}: expected KEY=VALUE"))?;
        let kind = specs.iter().find(|s| s.name == k).map(|s| &s.kind);
        let value = match kind {
            Some(ParamKind::Int { .. }) => v.parse().map(ParamValue::Int).ok(),
            Some(ParamKind::Float { .. }) => v.parse().map(ParamValue::Float).ok(),
            Some(ParamKind::Bool) => v.parse().map(ParamValue::Bool).ok(),
            _ => None,
        }
        .unwrap_or_else(|| ParamValue::Str(v.to_string()));
        given.push((k.to_string(), value));
    }
    let params = resolve_params(&specs, &given).map_err(|errs| {
        errs.iter()
            .map(|e| format!("--param {e}"))
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    if a.input
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
    {
        return detect_json(&a);
    }
    let img = image::open(&a.input)
        .map_err(|e| format!("{}: cannot read the image: {e}", a.input.display()))?;
    let input = if img.color().has_alpha() {
        let rgba = img.to_rgba8();
        ImageBuf::new(
            rgba.width() as usize,
            rgba.height() as usize,
            4,
            rgba.into_raw(),
        )?
    } else {
        let rgb = img.to_rgb8();
        ImageBuf::new(
            rgb.width() as usize,
            rgb.height() as usize,
            3,
            rgb.into_raw(),
        )?
    };
    // The inpaint preprocessor reads transparency as its mask: resize it along.
    let keep_alpha = p.name() == "inpaint" && input.channels == 4;
    let alpha = keep_alpha.then(|| alpha_of(&input));
    let input = if keep_alpha {
        colours_of(&input)
    } else {
        input
    };
    let (out, cached) = if a.pad {
        let (padded, size) = sd_preprocessors::resize::resize_image_with_pad(&input, a.resolution);
        let padded = if keep_alpha {
            let alpha = alpha.as_ref().expect("alpha kept");
            let (alpha, _) = sd_preprocessors::resize::resize_image_with_pad(alpha, a.resolution);
            with_alpha(&padded, &alpha)
        } else {
            padded
        };
        let (out, cached) = reg.run(p.as_ref(), &padded, &params)?;
        (sd_preprocessors::resize::remove_pad(&out, size), cached)
    } else {
        let resized = sd_preprocessors::resize::resize_image(&input, a.resolution);
        let resized = if keep_alpha {
            let alpha = alpha.as_ref().expect("alpha kept");
            let alpha = sd_preprocessors::resize::resize_image(alpha, a.resolution);
            with_alpha(&resized, &alpha)
        } else {
            resized
        };
        reg.run(p.as_ref(), &resized, &params)?
    };
    let (w, h) = (out.width as u32, out.height as u32);
    if out.channels == 4 {
        // RGBA results (inpaint's marked pixels) keep their alpha.
        let rgba = image::RgbaImage::from_raw(w, h, out.data)
            .ok_or("preprocessor returned a malformed image")?;
        save_atomic(&a.output, |tmp| {
            rgba.save_with_format(tmp, image::ImageFormat::Png)
        })?;
    } else {
        let out = sd_plugins_api::hwc3(&out);
        let rgb = image::RgbImage::from_raw(w, h, out.data)
            .ok_or("preprocessor returned a malformed image")?;
        save_atomic(&a.output, |tmp| {
            rgb.save_with_format(tmp, image::ImageFormat::Png)
        })?;
    }
    eprintln!(
        "{} {}x{} -> {}{}",
        a.name,
        w,
        h,
        a.output.display(),
        if cached { " (cached)" } else { "" }
    );
    Ok(())
}

/// The alpha channel of an RGBA image as a grey image.
fn alpha_of(img: &ImageBuf) -> ImageBuf {
    ImageBuf {
        width: img.width,
        height: img.height,
        channels: 1,
        data: img.data.chunks_exact(4).map(|p| p[3]).collect(),
    }
}

/// The colours of an RGBA image, not composited (transparent pixels keep their colour).
fn colours_of(img: &ImageBuf) -> ImageBuf {
    ImageBuf {
        width: img.width,
        height: img.height,
        channels: 3,
        data: img
            .data
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
    }
}

/// RGB (3 channels) plus the first channel of `alpha` as RGBA.
fn with_alpha(rgb: &ImageBuf, alpha: &ImageBuf) -> ImageBuf {
    let data = rgb
        .data
        .chunks_exact(3)
        .zip(alpha.data.chunks_exact(alpha.channels))
        .flat_map(|(c, a)| [c[0], c[1], c[2], a[0]])
        .collect();
    ImageBuf {
        width: rgb.width,
        height: rgb.height,
        channels: 4,
        data,
    }
}

/// Write through `OUTPUT.png.tmp` and rename, so a failure leaves no half-written file.
fn save_atomic(
    out: &std::path::Path,
    write: impl FnOnce(&std::path::Path) -> image::ImageResult<()>,
) -> CliResult {
    let tmp = out.with_extension("png.tmp");
    write(&tmp).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("{}: {e}", out.display())
    })?;
    std::fs::rename(&tmp, out).map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(())
}

/// `sdctl detect openpose KEYPOINTS.json`: the pose file drawn as the detector draws.
fn detect_json(a: &DetectArgs) -> CliResult {
    if a.name != "openpose" {
        return Err(format!(
            "{}: a .json input is an OpenPose keypoint file; only `openpose` takes it",
            a.input.display()
        )
        .into());
    }
    let pose = sd_preprocessors::pose::Pose::from_file(&a.input)
        .map_err(|e| format!("{}: {e}", a.input.display()))?;
    let w = pose.canvas_width.unwrap_or(a.resolution);
    let h = pose.canvas_height.unwrap_or(a.resolution);
    if !(1..=16384).contains(&w) || !(1..=16384).contains(&h) {
        return Err(format!(
            "{}: canvas {w}x{h}: sides must be 1..=16384",
            a.input.display()
        )
        .into());
    }
    let c = sd_preprocessors::pose::render(&pose, w, h);
    let rgb = image::RgbImage::from_raw(w as u32, h as u32, c.data).ok_or("bad canvas")?;
    save_atomic(&a.output, |tmp| {
        rgb.save_with_format(tmp, image::ImageFormat::Png)
    })?;
    eprintln!(
        "openpose: {} people from {} on {w}x{h} -> {}",
        pose.people.len(),
        a.input.display(),
        a.output.display()
    );
    Ok(())
}
