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
    let (out, cached) = if a.pad {
        let (padded, size) = sd_preprocessors::resize::resize_image_with_pad(&input, a.resolution);
        let (out, cached) = reg.run(p.as_ref(), &padded, &params)?;
        (sd_preprocessors::resize::remove_pad(&out, size), cached)
    } else {
        let input = sd_preprocessors::resize::resize_image(&input, a.resolution);
        reg.run(p.as_ref(), &input, &params)?
    };
    let out = sd_plugins_api::hwc3(&out);
    let rgb = image::RgbImage::from_raw(out.width as u32, out.height as u32, out.data)
        .ok_or("preprocessor returned a malformed image")?;
    let tmp = a.output.with_extension("png.tmp");
    rgb.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| format!("{}: {e}", a.output.display()))?;
    std::fs::rename(&tmp, &a.output).map_err(|e| format!("{}: {e}", a.output.display()))?;
    eprintln!(
        "{} {}x{} -> {}{}",
        a.name,
        out.width,
        out.height,
        a.output.display(),
        if cached { " (cached)" } else { "" }
    );
    Ok(())
}
