//! `sdctl pose render`: an OpenPose keypoint JSON (from any pose editor) as a control image.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use sd_preprocessors::pose::{render, Pose};

use crate::CliResult;

#[derive(Subcommand)]
pub enum PoseCommand {
    /// Draw a keypoint JSON as controlnet_aux draws poses.
    Render(RenderArgs),
}

#[derive(Args)]
pub struct RenderArgs {
    pub keypoints: PathBuf,
    #[arg(short, long)]
    pub output: PathBuf,
    /// Canvas width [default: the file's canvas_width, else 512]
    #[arg(long)]
    pub width: Option<usize>,
    /// Canvas height [default: the file's canvas_height, else 512]
    #[arg(long)]
    pub height: Option<usize>,
}

pub fn run(cmd: PoseCommand) -> CliResult {
    let PoseCommand::Render(a) = cmd;
    crate::check_output("--output", &a.output, false)?;
    let text = sd_plugins_api::input_file::read_to_string(&a.keypoints)?;
    let pose = Pose::from_json(&text).map_err(|e| format!("{}: {e}", a.keypoints.display()))?;
    let w = a.width.or(pose.canvas_width).unwrap_or(512);
    let h = a.height.or(pose.canvas_height).unwrap_or(512);
    if !(1..=16384).contains(&w) || !(1..=16384).contains(&h) {
        return Err(format!("canvas {w}x{h}: sides must be 1..=16384").into());
    }
    let c = render(&pose, w, h);
    let img = image::RgbImage::from_raw(w as u32, h as u32, c.data).ok_or("bad canvas")?;
    sd_pipeline::output::write_atomic(&a.output, |tmp| -> CliResult {
        img.save_with_format(tmp, image::ImageFormat::Png)
            .map_err(|e| format!("{}: {e}", a.output.display()))?;
        Ok(())
    })?;
    eprintln!(
        "{} people on {w}x{h} -> {}",
        pose.people.len(),
        a.output.display()
    );
    Ok(())
}
