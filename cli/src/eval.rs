//! `sdctl eval`: measure how well a model with a ControlNet follows its control.
//!
//! `eval fill` draws unseen examples of the synthetic fill task (`sdctl dataset fill`: a white
//! circle outline on black as the control image, prompt "<colour> circle with <colour>
//! background"), generates one image per example with the outline as control, and measures
//! the shape (IoU of the disk painted in the circle's colour against the true disk) and the
//! colours (mean colour of the true disk and of the true background against the prompt's).
//! The evaluation and its measures are `sd_train::eval`'s; this parses the flags, loads the
//! models, shows progress and prints the table; the report is `sd_train::eval::FillReport`'s.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use image::RgbImage;
use indicatif::{ProgressBar, ProgressStyle};
use sd_controlnet::unit_model::load_unit_model;
use sd_pipeline::samplers::{SamplerKind, Schedule};
use sd_pipeline::StableDiffusion;
use sd_train::eval::{
    check_control_fits, eval_fill, mean_iou, summarise_examples, write_grid, FillEvalConfig,
    FillReport, GRID_MAX_PAIRS,
};

use crate::CliResult;

#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// Control fidelity on the synthetic fill task: for each of --count unseen examples,
    /// generate from the prompt with the circle outline as control, then measure the IoU of
    /// the painted disk with the true disk and the colour error of disk and background.
    Fill(FillArgs),
}

#[derive(Args, Debug)]
pub struct FillArgs {
    /// Base model: a diffusers folder or a single-file checkpoint [default: the embedded
    /// tiny-fill model]
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The ControlNet or T2I-Adapter (diffusers folder or single file) trained on the fill
    /// task [default: the embedded model's ControlNet, when --model is not given]
    #[arg(long)]
    pub controlnet: Option<PathBuf>,
    /// Control weight; 0 runs without the ControlNet (the baseline)
    #[arg(long, default_value_t = 1.0)]
    pub weight: f64,
    /// Number of examples
    #[arg(long, default_value_t = 50)]
    pub count: usize,
    /// Example i is drawn, and generated, with seed SEED + i (far from training seeds, so
    /// the outlines and prompts are unseen)
    #[arg(long, default_value_t = 1_000_000)]
    pub seed: u64,
    /// Image size in pixels (square; a multiple of the VAE's scale factor, 16..=2048)
    #[arg(long, default_value_t = 64)]
    pub size: u32,
    /// Denoising steps
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Classifier-free guidance scale
    #[arg(long, default_value_t = 5.0)]
    pub cfg_scale: f64,
    /// ddim | euler | euler_a | dpmpp_2m | dpmpp_2m_sde | dpmpp_sde | heun | lms | unipc | lcm
    /// (A1111, ComfyUI and diffusers names work too)
    #[arg(long, default_value = "dpmpp_2m")]
    pub sampler: String,
    /// normal | karras | exponential | beta | sgm_uniform | simple (default karras, normal for
    /// lcm, or what the sampler name says)
    #[arg(long)]
    pub schedule: Option<String>,
    /// cpu | cuda
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32 | f16 | bf16
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Write every example's numbers and the summary as JSON
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a PNG of control | generated pairs for the first examples (up to 16, 4 pairs a row)
    #[arg(long)]
    pub grid: Option<PathBuf>,
}

pub fn run(cmd: EvalCommand) -> CliResult {
    match cmd {
        EvalCommand::Fill(a) => fill(a),
    }
}

// ---------------------------------------------------------------------------------------------
// The command

fn check_parent(flag: &str, p: &Path) -> CliResult {
    let parent = p.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(d) = parent {
        if !d.is_dir() {
            return Err(format!("{flag} {}: folder {} not found", p.display(), d.display()).into());
        }
    }
    Ok(())
}

/// "FLAG PATH: message", without naming the path twice when the library's message names it.
fn flag_error(flag: &str, path: &Path, e: &dyn std::fmt::Display) -> String {
    let (msg, shown) = (e.to_string(), path.display().to_string());
    match msg.strip_prefix(&shown) {
        Some(rest) if rest.starts_with(':') => format!("{flag} {shown}{rest}"),
        _ => format!("{flag} {shown}: {msg}"),
    }
}

fn fill(a: FillArgs) -> CliResult {
    if a.count == 0 {
        return Err("--count must be at least 1".into());
    }
    if !(16..=2048).contains(&a.size) {
        return Err(format!("--size {}: need 16 <= size <= 2048", a.size).into());
    }
    if a.steps == 0 {
        return Err("--steps must be at least 1".into());
    }
    for (flag, x) in [("--weight", a.weight), ("--cfg-scale", a.cfg_scale)] {
        sd_plugins_api::number::Range::ANY
            .check(x)
            .map_err(|m| format!("{flag}: {m}"))?;
    }
    let (sampler, implied) =
        SamplerKind::parse_alias(&a.sampler).map_err(|e| format!("--sampler: {e}"))?;
    let schedule = match &a.schedule {
        Some(s) => s
            .parse::<Schedule>()
            .map_err(|e| format!("--schedule: {e}"))?,
        None => implied.unwrap_or(sampler.default_schedule()),
    };
    let (model, controlnet) = match (&a.model, &a.controlnet) {
        (Some(m), Some(c)) => (m.clone(), c.clone()),
        (None, None) => (sd::embedded::base_dir()?, sd::embedded::controlnet_dir()?),
        (Some(_), None) => return Err("--model needs --controlnet too".into()),
        (None, Some(c)) => (sd::embedded::base_dir()?, c.clone()),
    };
    for (flag, p) in [("--model", &model), ("--controlnet", &controlnet)] {
        if !p.exists() {
            return Err(format!("{flag} {}: not found", p.display()).into());
        }
    }
    if let Some(p) = &a.json {
        check_parent("--json", p)?;
    }
    if let Some(p) = &a.grid {
        check_parent("--grid", p)?;
    }
    let device = sd::device::device(&a.device)?;
    let dtype = sd::device::dtype(&a.dtype)?;
    let dtype = sd::device::compute_dtype(&device, dtype)?;

    let sd = StableDiffusion::load_with_vae(&model, &device, dtype, &[], None)
        .map_err(|e| flag_error("--model", &model, &e))?;
    let f = sd.vae_scale_factor();
    let size = a.size as usize;
    if !size.is_multiple_of(f) {
        return Err(
            format!("--size {size} is not a multiple of the VAE's scale factor {f}").into(),
        );
    }
    let cn_err = |e: &dyn std::fmt::Display| flag_error("--controlnet", &controlnet, e);
    let net = load_unit_model(&controlnet, &sd, &mut Vec::new()).map_err(|e| cn_err(&e))?;
    // the network must fit the base model even when --weight 0 leaves it out
    check_control_fits(&sd, &net, size, &device).map_err(|e| cn_err(&e))?;

    let bar = ProgressBar::new(a.count as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} eval fill [{bar:30}] {pos}/{len} {msg} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let cfg = FillEvalConfig {
        weight: a.weight,
        count: a.count,
        seed: a.seed,
        size: a.size,
        steps: a.steps,
        cfg_scale: a.cfg_scale,
        sampler,
        schedule,
    };
    let mut pairs: Vec<(RgbImage, RgbImage)> = Vec::new();
    let examples = eval_fill(&sd, &net, &cfg, &device, &mut |done, control, generated| {
        if a.grid.is_some() && pairs.len() < GRID_MAX_PAIRS {
            pairs.push((control, generated));
        }
        bar.set_message(format!("mean IoU {:.3}", mean_iou(done)));
        bar.inc(1);
    })?;
    bar.finish_and_clear();

    let report = FillReport {
        model,
        controlnet,
        config: cfg,
        device: a.device,
        dtype: a.dtype,
        summary: summarise_examples(&examples),
        examples,
    };
    print!("{}", report.table());
    if let Some(p) = &a.json {
        report
            .write_json(p)
            .map_err(|e| flag_error("--json", p, &e))?;
        eprintln!("wrote {}", p.display());
    }
    if let Some(p) = &a.grid {
        write_grid(p, &pairs, a.size).map_err(|e| flag_error("--grid", p, &e))?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}
