//! `sdctl detect NAME INPUT -o OUTPUT`: run a preprocessor on an image.

use std::path::{Path, PathBuf};

use clap::Args;
use sd_plugins_api::{hwc3, resolve_params, ParamValue};
use sd_preprocessors::detect::{detect_file, Sizing, RESOLUTIONS};

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
    if !RESOLUTIONS.contains(&a.resolution) {
        return Err(format!(
            "--resolution {}: use {}..={}",
            a.resolution,
            RESOLUTIONS.start(),
            RESOLUTIONS.end()
        )
        .into());
    }
    let specs = p.params();
    let mut given = Vec::new();
    for kv in &a.params {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("--param {kv:?}: expected KEY=VALUE"))?;
        let kind = specs.iter().find(|s| s.name == k).map(|s| &s.kind);
        let value = ParamValue::from_text(v, kind);
        given.push((k.to_string(), value));
    }
    let params = resolve_params(&specs, &given).map_err(|errs| {
        errs.iter()
            .map(|e| format!("--param {e}"))
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    let sizing = Sizing {
        resolution: a.resolution,
        pad: a.pad,
    };
    let size = (a.resolution, a.resolution);
    sd_plugins_api::input_file::check(&a.input)?;
    let out = detect_file(reg, p.as_ref(), &a.input, &params, sizing, size)?;
    let (map, cached) = (out.map, out.cached);
    let (w, h) = (map.width as u32, map.height as u32);
    let write = |tmp: &Path| -> sd::Result<()> {
        let saved = if map.channels == 4 {
            // RGBA results (inpaint's marked pixels) keep their alpha.
            image::RgbaImage::from_raw(w, h, map.data.clone())
                .ok_or("preprocessor returned a malformed image")?
                .save_with_format(tmp, image::ImageFormat::Png)
        } else {
            image::RgbImage::from_raw(w, h, hwc3(&map).data)
                .ok_or("preprocessor returned a malformed image")?
                .save_with_format(tmp, image::ImageFormat::Png)
        };
        saved.map_err(|e| format!("{}: {e}", a.output.display()).into())
    };
    sd::output::write_atomic(&a.output, write)?;
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
