//! `sdctl detect NAME INPUT -o OUTPUT`: run a preprocessor on an image.

use std::path::{Path, PathBuf};

use clap::Args;
use sd_plugins_api::{hwc3, resolve_params, ParamValue};
use sd_preprocessors::detect::{detect_file, Sizing, RESOLUTIONS};
use sd_preprocessors::pose_detect::{detect_file_with_pose, pose_detector, pose_detector_names};

use crate::settings::{self, SettingsArgs};
use crate::CliResult;

#[derive(Args)]
pub struct DetectArgs {
    /// Preprocessor name (`sdctl preprocessors list`)
    #[arg(required_unless_present = "convert")]
    pub name: Option<String>,
    #[arg(required_unless_present = "convert")]
    pub input: Option<PathBuf>,
    #[arg(short, long)]
    pub output: PathBuf,
    /// Convert a network file instead of detecting: a TorchScript file of DWPose's detector or
    /// pose network (ComfyUI's yolox_l.torchscript.pt, dw-ll_ucoco_384_bs5.torchscript.pt)
    /// written as the ONNX file dw_openpose_full reads (-o yolox_l.onnx). dw_openpose_full
    /// also reads the TorchScript files directly, converting them at every start
    #[arg(long, value_name = "FILE", conflicts_with_all = ["name", "input", "json"])]
    pub convert: Option<PathBuf>,
    /// Detect resolution (short side); an input whose short side is this and whose sides are
    /// multiples of 64 is processed at its own size
    #[arg(long, default_value_t = 512)]
    pub resolution: usize,
    /// sd-webui-controlnet's sizing: short side to the resolution without rounding to 64,
    /// padded to multiples of 64 for detection and cropped back after (resize_image_with_pad)
    #[arg(long)]
    pub pad: bool,
    /// Also write the detected pose as OpenPose keypoint JSON (people[].pose_keypoints_2d,
    /// hand_left/right_keypoints_2d, face_keypoints_2d, normalised, with canvas_width/height):
    /// pose preprocessors only (openpose, openpose_hand, openpose_face, ...). The detection
    /// then runs (the result cache holds maps, not poses)
    #[arg(long, value_name = "OUT")]
    pub json: Option<PathBuf>,
    /// A preprocessor parameter, repeatable: KEY=VALUE
    #[arg(long = "param", value_name = "KEY=VALUE")]
    pub params: Vec<String>,
    /// A plugin providing preprocessors, repeatable
    #[arg(long)]
    pub plugin: Vec<String>,
    #[arg(long)]
    pub plugin_dir: Option<PathBuf>,
}

/// A preprocessor's `--param KEY=VALUE` arguments resolved against its parameters (defaults
/// filled in, unknown keys and bad values named).
pub fn cli_params(
    p: &dyn sd_plugins_api::Preprocessor,
    args: &[String],
) -> Result<sd_plugins_api::Params, String> {
    let specs = p.params();
    let mut given = Vec::new();
    for kv in args {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("--param {kv:?}: expected KEY=VALUE"))?;
        let kind = specs.iter().find(|s| s.name == k).map(|s| &s.kind);
        let value = ParamValue::from_text(v, kind);
        given.push((k.to_string(), value));
    }
    resolve_params(&specs, &given).map_err(|errs| {
        errs.iter()
            .map(|e| format!("--param {e}"))
            .collect::<Vec<_>>()
            .join("; ")
    })
}

/// `--convert FILE -o OUT.onnx`: a DWPose TorchScript file written as ONNX.
fn convert(input: &Path, output: &Path) -> CliResult {
    sd_plugins_api::input_file::check(input)?;
    if !sd_preprocessors::dwpose::is_torchscript(input) {
        return Err(format!(
            "--convert {}: not a TorchScript file (a zip archive, as torch.jit.save writes)",
            input.display()
        )
        .into());
    }
    let (model, role) = sd_preprocessors::dwpose::convert_torchscript(input)?;
    let bytes = sd_preprocessors::onnx::encode(&model);
    // the written graph must load as any ONNX file does
    sd_preprocessors::onnx::Model::from_bytes(&bytes)
        .map_err(|e| format!("--convert {}: {e}", input.display()))?;
    sd_pipeline::output::write_file(output, &bytes)?;
    let nodes = model.graph.as_ref().map_or(0, |g| g.node.len());
    eprintln!(
        "{}: DWPose's {} network, {nodes} ONNX nodes, written to {}",
        input.display(),
        match role {
            sd_preprocessors::dwpose::Role::Detector => "detector",
            sd_preprocessors::dwpose::Role::Pose => "pose",
        },
        output.display()
    );
    Ok(())
}

pub fn run(a: DetectArgs) -> CliResult {
    crate::check_output("--output", &a.output, false)?;
    if let Some(c) = &a.convert {
        return convert(c, &a.output);
    }
    let (Some(name), Some(input)) = (&a.name, &a.input) else {
        return Err("a preprocessor name and an input image are needed (or --convert FILE)".into());
    };
    let (name, input) = (name.as_str(), input.as_path());
    if let Some(j) = &a.json {
        crate::check_output("--json", j, false)?;
    }
    let st = settings::load(&SettingsArgs {
        plugin: a.plugin.clone(),
        plugin_dir: a.plugin_dir.clone(),
        ..Default::default()
    })?;
    let reg = &st.registry;
    let p = reg.preprocessor(name).ok_or_else(|| {
        let names = reg.preprocessor_names();
        match sd_plugins_api::params::closest(name, &names) {
            Some(c) => format!("unknown preprocessor {:?} (did you mean `{c}`?)", name),
            None => format!(
                "unknown preprocessor {:?} (available: {})",
                name,
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
    let params = cli_params(p.as_ref(), &a.params)?;
    // --json: the pose detector behind the preprocessor, before anything runs
    let detector = match &a.json {
        Some(_) => Some(pose_detector(p.name()).ok_or_else(|| {
            format!(
                "--json: `{}` does not detect poses (pose preprocessors: {})",
                name,
                pose_detector_names().join(", ")
            )
        })?),
        None => None,
    };
    let sizing = Sizing {
        resolution: a.resolution,
        pad: a.pad,
    };
    let size = (a.resolution, a.resolution);
    sd_plugins_api::input_file::check(input)?;
    let (map, cached, pose) = match &detector {
        Some(det) => {
            let d =
                detect_file_with_pose(reg, p.as_ref(), det.as_ref(), input, &params, sizing, size)?;
            (d.map, false, Some(d.pose))
        }
        None => {
            let out = detect_file(reg, p.as_ref(), input, &params, sizing, size)?;
            (out.map, out.cached, None)
        }
    };
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
    // the map and the pose JSON are written together, or neither
    let mut staged = sd::output::Staged::new();
    staged.write(&a.output, write)?;
    if let (Some(path), Some(pose)) = (&a.json, &pose) {
        let text =
            serde_json::to_string_pretty(&pose.to_json()).map_err(|e| format!("--json: {e}"))?;
        staged.write(path, |tmp: &Path| -> sd::Result<()> {
            std::fs::write(tmp, text + "\n").map_err(|e| format!("{}: {e}", path.display()).into())
        })?;
    }
    staged.commit()?;
    if let Some(path) = &a.json {
        eprintln!("pose -> {}", path.display());
    }
    eprintln!(
        "{} {}x{} -> {}{}",
        name,
        w,
        h,
        a.output.display(),
        if cached { " (cached)" } else { "" }
    );
    Ok(())
}
