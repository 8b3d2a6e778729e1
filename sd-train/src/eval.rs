//! The fill task's evaluation: how well a model with a ControlNet or a T2I-Adapter follows its
//! control.
//!
//! It draws unseen examples of the synthetic fill task ([`crate::fill`]: a white circle
//! outline on black as the control image, prompt "<colour> circle with <colour> background"),
//! generates one image per example with the outline as control, and measures the shape (IoU
//! of the disk painted in the circle's colour against the true disk) and the colours (mean
//! colour of the true disk and of the true background against the prompt's).

use sd_pipeline::output::write_atomic;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::{Rgb, RgbImage};
use sd_controlnet::control_image::{rgb_buf, to_tensor};
use sd_controlnet::unit_model::UnitModel;
use sd_controlnet::units::{AdapterUnit, Unit};
use sd_controlnet::{ControlNetHook, ControlUnit};
use sd_pipeline::generation::image_io::to_rgb8;
use sd_pipeline::rng::TorchRng;
use sd_pipeline::samplers::{SamplerKind, Schedule};
use sd_pipeline::{GenerateRequest, StableDiffusion};
use sd_plugins_api::HookSet;
use serde::Serialize;

use crate::error::{Result, TrainError};
use crate::fill::{example, COLOURS};

// ---------------------------------------------------------------------------------------------
// Metrics (pure)

/// The mean colour of one region of the image compared with the colour the prompt asked for.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RegionColour {
    /// Pixels in the region.
    pub pixels: usize,
    /// Mean RGB over the region (0..255).
    pub mean: [f64; 3],
    /// Mean absolute difference per channel between `mean` and the expected colour (0..255).
    pub error: f64,
    /// The nearest of the fill task's colours (Euclidean RGB) to `mean`.
    pub named: &'static str,
    /// Whether `named` is the expected colour.
    pub named_right: bool,
}

/// The fill task's measures for one generated image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FillMetrics {
    /// |P ∩ T| / |P ∪ T| (1 when both are empty).
    pub iou: f64,
    /// The same against the disk found without the prompt's colours ([`shape_mask`]): where
    /// the circle is drawn, whatever its colours.
    pub shape_iou: f64,
    /// |P|: pixels nearer to the circle colour than to the background colour.
    pub predicted_pixels: usize,
    /// |T|: pixels whose centre lies within r of the circle's centre.
    pub true_pixels: usize,
    /// The true disk's colour; `None` when the disk holds no pixel centre.
    pub circle: Option<RegionColour>,
    /// The true background's colour; `None` when the disk covers the whole image.
    pub background: Option<RegionColour>,
}

fn dist2(a: [f64; 3], b: [f64; 3]) -> f64 {
    (0..3).map(|c| (a[c] - b[c]).powi(2)).sum()
}

fn rgb_f64(c: [u8; 3]) -> [f64; 3] {
    c.map(f64::from)
}

/// The fill task's colour (name and RGB) nearest to `rgb` (Euclidean; the first on ties).
pub fn nearest_colour(rgb: [f64; 3]) -> (&'static str, [u8; 3]) {
    let mut best = COLOURS[0];
    for &c in &COLOURS[1..] {
        if dist2(rgb, rgb_f64(c.1)) < dist2(rgb, rgb_f64(best.1)) {
            best = c;
        }
    }
    best
}

/// Whether pixel (x, y) belongs to the true disk: its centre (x + 0.5, y + 0.5) lies within `r`
/// of `centre` (fill.rs's convention).
pub fn in_disk(x: u32, y: u32, centre: (f64, f64), r: f64) -> bool {
    let dx = x as f64 + 0.5 - centre.0;
    let dy = y as f64 + 0.5 - centre.1;
    dx * dx + dy * dy <= r * r
}

fn region(sum: [f64; 3], pixels: usize, expected: [u8; 3]) -> Option<RegionColour> {
    if pixels == 0 {
        return None;
    }
    let mean = sum.map(|s| s / pixels as f64);
    let error = (0..3)
        .map(|c| (mean[c] - expected[c] as f64).abs())
        .sum::<f64>()
        / 3.0;
    let (named, rgb) = nearest_colour(mean);
    Some(RegionColour {
        pixels,
        mean,
        error,
        named,
        named_right: rgb == expected,
    })
}

/// Measure a generated fill image against the example it was generated for: the disk at
/// `centre` with radius `r` (pixels) in colour `circle` on `background`.
///
/// - predicted disk P: pixels strictly nearer (Euclidean RGB) to `circle` than to `background`;
///   true disk T: pixels whose centre lies within `r` of `centre`; IoU = |P ∩ T| / |P ∪ T|;
///   shape IoU: the same with [`shape_mask`] as P.
/// - colour: the mean RGB over T against `circle`, and over the rest against `background`,
///   as the mean absolute difference per channel (0..255), and whether the nearest named
///   colour of the task to that mean is the expected one.
pub fn fill_metrics(
    image: &RgbImage,
    centre: (f64, f64),
    r: f64,
    circle: [u8; 3],
    background: [u8; 3],
) -> FillMetrics {
    let (mut inter, mut union, mut predicted, mut truth) = (0usize, 0usize, 0usize, 0usize);
    let (mut s_inter, mut s_union) = (0usize, 0usize);
    let mut sums = [[0f64; 3]; 2]; // [disk, background]
    let (fg, bg) = (rgb_f64(circle), rgb_f64(background));
    let shape = shape_mask(image);
    for ((x, y, Rgb(p)), &s_in) in image.enumerate_pixels().zip(&shape) {
        let pf = rgb_f64(*p);
        let p_in = dist2(pf, fg) < dist2(pf, bg);
        let t_in = in_disk(x, y, centre, r);
        predicted += p_in as usize;
        truth += t_in as usize;
        inter += (p_in && t_in) as usize;
        union += (p_in || t_in) as usize;
        s_inter += (s_in && t_in) as usize;
        s_union += (s_in || t_in) as usize;
        let s = &mut sums[if t_in { 0 } else { 1 }];
        for c in 0..3 {
            s[c] += pf[c];
        }
    }
    let total = image.width() as usize * image.height() as usize;
    let ratio = |i: usize, u: usize| if u == 0 { 1.0 } else { i as f64 / u as f64 };
    FillMetrics {
        iou: ratio(inter, union),
        shape_iou: ratio(s_inter, s_union),
        predicted_pixels: predicted,
        true_pixels: truth,
        circle: region(sums[0], truth, circle),
        background: region(sums[1], total - truth, background),
    }
}

/// The disk found in an image without knowing its colours (row-major, `true` = disk): two
/// colour clusters (k-means, Euclidean RGB, 10 rounds), seeded with the median colour of the
/// image's border (the background, which the task's disks never cover whole) and the pixel
/// farthest from it; the disk is the second cluster. An image of one colour has no disk.
pub fn shape_mask(image: &RgbImage) -> Vec<bool> {
    let (w, h) = image.dimensions();
    let px: Vec<[f64; 3]> = image.pixels().map(|p| rgb_f64(p.0)).collect();
    let border: Vec<[f64; 3]> = image
        .enumerate_pixels()
        .filter(|(x, y, _)| *x == 0 || *y == 0 || *x + 1 == w || *y + 1 == h)
        .map(|(_, _, p)| rgb_f64(p.0))
        .collect();
    let mut back = [0f64; 3];
    for (c, b) in back.iter_mut().enumerate() {
        let mut v: Vec<f64> = border.iter().map(|p| p[c]).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        *b = v[v.len() / 2];
    }
    let far = px
        .iter()
        .copied()
        .max_by(|a, b| dist2(*a, back).total_cmp(&dist2(*b, back)))
        .unwrap_or(back);
    if dist2(far, back) == 0.0 {
        return vec![false; px.len()];
    }
    let mut cent = [back, far];
    let mut label = vec![false; px.len()];
    for _ in 0..10 {
        let mut sums = [[0f64; 3]; 2];
        let mut counts = [0usize; 2];
        for (l, p) in label.iter_mut().zip(&px) {
            *l = dist2(*p, cent[1]) < dist2(*p, cent[0]);
            let k = *l as usize;
            counts[k] += 1;
            for c in 0..3 {
                sums[k][c] += p[c];
            }
        }
        for k in 0..2 {
            if counts[k] > 0 {
                cent[k] = sums[k].map(|s| s / counts[k] as f64);
            }
        }
    }
    label
}

/// The colours a fill prompt names ("<colour> circle with <colour> background"), as indices
/// into [`COLOURS`].
pub fn parse_fill_prompt(prompt: &str) -> Option<(usize, usize)> {
    let rest = prompt.strip_suffix(" background")?;
    let (fg, bg) = rest.split_once(" circle with ")?;
    let find = |n: &str| COLOURS.iter().position(|(name, _)| *name == n);
    Some((find(fg)?, find(bg)?))
}

/// One evaluated example.
#[derive(Debug, Clone, Serialize)]
pub struct FillExample {
    pub index: usize,
    pub seed: u64,
    pub prompt: String,
    pub centre: (f64, f64),
    pub radius: f64,
    pub circle_colour: &'static str,
    pub background_colour: &'static str,
    #[serde(flatten)]
    pub metrics: FillMetrics,
}

/// Mean, median and worst of a list of numbers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stats {
    pub mean: f64,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    /// `None` for an empty list.
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Self {
            mean: v.iter().sum::<f64>() / n as f64,
            median,
            min: v[0],
            max: v[n - 1],
        })
    }
}

/// Over all examples.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FillSummary {
    pub count: usize,
    pub iou: Option<Stats>,
    pub shape_iou: Option<Stats>,
    pub circle_error: Option<Stats>,
    pub background_error: Option<Stats>,
    /// Fraction of disks whose mean colour is nearest to the prompt's circle colour.
    pub circle_named_right: Option<f64>,
    /// Fraction of backgrounds whose mean colour is nearest to the prompt's background colour.
    pub background_named_right: Option<f64>,
}

pub fn summarise(examples: &[FillMetrics]) -> FillSummary {
    let all = |f: fn(&FillMetrics) -> f64| Stats::of(&examples.iter().map(f).collect::<Vec<_>>());
    let regions = |f: fn(&FillMetrics) -> Option<&RegionColour>| -> Vec<&RegionColour> {
        examples.iter().filter_map(f).collect()
    };
    let circles = regions(|m| m.circle.as_ref());
    let backs = regions(|m| m.background.as_ref());
    let errors = |r: &[&RegionColour]| Stats::of(&r.iter().map(|c| c.error).collect::<Vec<_>>());
    let right = |r: &[&RegionColour]| {
        (!r.is_empty()).then(|| r.iter().filter(|c| c.named_right).count() as f64 / r.len() as f64)
    };
    FillSummary {
        count: examples.len(),
        iou: all(|m| m.iou),
        shape_iou: all(|m| m.shape_iou),
        circle_error: errors(&circles),
        background_error: errors(&backs),
        circle_named_right: right(&circles),
        background_named_right: right(&backs),
    }
}

/// Pairs (control | generated) in a row of the grid.
pub const GRID_PAIRS_PER_ROW: usize = 4;
/// Pairs in the grid at most (the first examples).
pub const GRID_MAX_PAIRS: usize = 16;
/// Pixels between pairs and between rows.
pub const GRID_GAP: u32 = 4;

/// Control | generated pairs, `GRID_PAIRS_PER_ROW` to a row, separated by `GRID_GAP` pixels of
/// grey. All images are `size` x `size`. Width: `cols * 2 * size + (cols - 1) * GRID_GAP`,
/// height: `rows * size + (rows - 1) * GRID_GAP`.
pub fn grid(pairs: &[(RgbImage, RgbImage)], size: u32) -> RgbImage {
    let n = pairs.len().max(1) as u32;
    let per_row = GRID_PAIRS_PER_ROW as u32;
    let cols = n.min(per_row);
    let rows = n.div_ceil(per_row);
    let mut out = RgbImage::from_pixel(
        cols * 2 * size + (cols - 1) * GRID_GAP,
        rows * size + (rows - 1) * GRID_GAP,
        Rgb([128, 128, 128]),
    );
    for (i, (control, generated)) in pairs.iter().enumerate() {
        let (c, r) = (i as u32 % per_row, i as u32 / per_row);
        let x = (c * (2 * size + GRID_GAP)) as i64;
        let y = (r * (size + GRID_GAP)) as i64;
        image::imageops::replace(&mut out, control, x, y);
        image::imageops::replace(&mut out, generated, x + size as i64, y);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The evaluation

/// How the examples are drawn and generated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FillEvalConfig {
    /// Control weight; 0 runs without the ControlNet or adapter (the baseline).
    pub weight: f64,
    /// Number of examples.
    pub count: usize,
    /// Example i is drawn, and generated, with seed `seed + i`.
    pub seed: u64,
    /// Image size in pixels (square).
    pub size: u32,
    /// Denoising steps.
    pub steps: usize,
    /// Classifier-free guidance scale.
    pub cfg_scale: f64,
    pub sampler: SamplerKind,
    pub schedule: Schedule,
}

/// The unit of `net` (a ControlNet or a T2I-Adapter) for a control image at `weight`.
pub fn fill_unit(net: &UnitModel, image: Tensor, weight: f64) -> Result<Unit> {
    Ok(match net {
        UnitModel::ControlNet(n) => {
            let mut u = ControlUnit::new(n.clone(), image);
            u.weight = weight;
            u.into()
        }
        UnitModel::Adapter(a) => {
            let mut u = AdapterUnit::new(a.clone(), image);
            u.weight = weight;
            u.into()
        }
        _ => {
            return Err(TrainError::Invalid(
                "the fill task is evaluated with a ControlNet or a T2I-Adapter".into(),
            ))
        }
    })
}

/// Check that `net` fits the base model `sd` at `size` x `size`, as it must even when weight 0
/// leaves it out.
pub fn check_control_fits(
    sd: &StableDiffusion,
    net: &UnitModel,
    size: usize,
    device: &Device,
) -> Result<()> {
    let blank = Tensor::zeros((1, 3, size, size), DType::F32, device)?;
    match fill_unit(net, blank, 1.0)? {
        Unit::ControlNet(u) => u.validate_for(
            sd.unet.config(),
            sd.unet.num_skips(),
            sd.vae.config().latent_channels,
        )?,
        Unit::Adapter(u) => u
            .adapter
            .validate_for(sd.unet.config(), sd.vae_scale_factor())
            .map_err(TrainError::Invalid)?,
        _ => {}
    }
    Ok(())
}

/// Example `i`: drawn with seed `cfg.seed + i`, generated from its prompt with its outline as
/// control (weight `cfg.weight`), measured. Returns its numbers, the control image and the
/// generated image.
pub fn eval_fill_example(
    sd: &StableDiffusion,
    net: &UnitModel,
    cfg: &FillEvalConfig,
    i: usize,
    device: &Device,
) -> Result<(FillExample, RgbImage, RgbImage)> {
    let seed = cfg.seed.wrapping_add(i as u64);
    let size = cfg.size as usize;
    let (control, _, prompt, centre, radius) = example(cfg.size, &mut TorchRng::new(seed));
    let (fg, bg) = parse_fill_prompt(&prompt).ok_or_else(|| {
        TrainError::Invalid(format!(
            "example {i}: cannot read the colours of {prompt:?}"
        ))
    })?;
    let req = GenerateRequest {
        width: size,
        height: size,
        steps: cfg.steps,
        cfg_scale: cfg.cfg_scale,
        sampler: cfg.sampler,
        schedule: cfg.schedule,
        ..GenerateRequest::new(prompt.clone())
    };
    let mut hooks = HookSet::new();
    if cfg.weight != 0.0 {
        let unit = fill_unit(
            net,
            to_tensor(&rgb_buf(control.clone()), device)?,
            cfg.weight,
        )?;
        hooks.push(Box::new(ControlNetHook::new(vec![unit])));
    }
    let latents = sd.denoise(&req, &mut hooks, &mut TorchRng::new(seed))?;
    let images = sd.decode_latents(&latents)?;
    let (w, h, px) = to_rgb8(&images.get(0)?)?;
    let generated = RgbImage::from_raw(w as u32, h as u32, px).ok_or_else(|| {
        TrainError::Invalid("generated image has the wrong number of pixels".into())
    })?;
    let metrics = fill_metrics(&generated, centre, radius, COLOURS[fg].1, COLOURS[bg].1);
    let ex = FillExample {
        index: i,
        seed,
        prompt,
        centre,
        radius,
        circle_colour: COLOURS[fg].0,
        background_colour: COLOURS[bg].0,
        metrics,
    };
    Ok((ex, control, generated))
}

/// Evaluate `cfg.count` examples in order. After each, `each` gets the examples so far (the
/// new one last) and the new one's control and generated images.
pub fn eval_fill(
    sd: &StableDiffusion,
    net: &UnitModel,
    cfg: &FillEvalConfig,
    device: &Device,
    each: &mut dyn FnMut(&[FillExample], RgbImage, RgbImage),
) -> Result<Vec<FillExample>> {
    let mut examples: Vec<FillExample> = Vec::with_capacity(cfg.count);
    for i in 0..cfg.count {
        let (ex, control, generated) = eval_fill_example(sd, net, cfg, i, device)?;
        examples.push(ex);
        each(&examples, control, generated);
    }
    Ok(examples)
}

/// The summary of evaluated examples ([`summarise`] over their metrics).
pub fn summarise_examples(examples: &[FillExample]) -> FillSummary {
    let metrics: Vec<FillMetrics> = examples.iter().map(|e| e.metrics.clone()).collect();
    summarise(&metrics)
}

/// The mean IoU (prompt's colours) of evaluated examples; 0 for none.
pub fn mean_iou(examples: &[FillExample]) -> f64 {
    if examples.is_empty() {
        return 0.0;
    }
    examples.iter().map(|e| e.metrics.iou).sum::<f64>() / examples.len() as f64
}

// ---------------------------------------------------------------------------------------------
// The report

/// An evaluation run as reported: its settings, summary and examples.
#[derive(Debug, Clone)]
pub struct FillReport {
    /// The base model and the ControlNet, as given.
    pub model: PathBuf,
    pub controlnet: PathBuf,
    pub config: FillEvalConfig,
    /// The device and dtype names, as given.
    pub device: String,
    pub dtype: String,
    pub summary: FillSummary,
    pub examples: Vec<FillExample>,
}

impl FillReport {
    /// The JSON report: `task`, `settings`, `summary` and `examples`.
    pub fn to_json(&self) -> serde_json::Value {
        let c = &self.config;
        serde_json::json!({
            "task": "fill",
            "settings": {
                "model": self.model.display().to_string(),
                "controlnet": self.controlnet.display().to_string(),
                "weight": c.weight,
                "count": c.count,
                "seed": c.seed,
                "size": c.size,
                "steps": c.steps,
                "cfg_scale": c.cfg_scale,
                "sampler": c.sampler.to_string(),
                "schedule": c.schedule.to_string(),
                "device": self.device,
                "dtype": self.dtype,
            },
            "summary": self.summary,
            "examples": self.examples,
        })
    }

    /// Write the JSON report (pretty, newline-terminated) to `path`, which appears only when
    /// complete.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.to_json())
            .map_err(|e| TrainError::file(path, e.to_string()))?;
        write_atomic(path, |tmp| {
            std::fs::write(tmp, text + "\n").map_err(|e| TrainError::file(path, e.to_string()))
        })
    }

    /// The summary table as printed: a line of settings, then mean, median, min and max of
    /// each measure, then the shares of colours named right; each line ends in a newline.
    pub fn table(&self) -> String {
        let (c, s) = (&self.config, &self.summary);
        let mut out = format!(
            "eval fill: {} example{}, weight {}, seeds {}.., {}x{}, {} steps, cfg {}, {} {}\n",
            s.count,
            if s.count == 1 { "" } else { "s" },
            c.weight,
            c.seed,
            c.size,
            c.size,
            c.steps,
            c.cfg_scale,
            c.sampler,
            c.schedule
        );
        let _ = writeln!(
            out,
            "{:<26}{:>9}{:>9}{:>9}{:>9}",
            "", "mean", "median", "min", "max"
        );
        let mut row = |name: &str, st: &Option<Stats>, digits: usize| {
            let _ = match st {
                Some(st) => writeln!(
                    out,
                    "{name:<26}{:>9.d$}{:>9.d$}{:>9.d$}{:>9.d$}",
                    st.mean,
                    st.median,
                    st.min,
                    st.max,
                    d = digits
                ),
                None => writeln!(out, "{name:<26}{:>9}", "-"),
            };
        };
        row("IoU (prompt's colours)", &s.iou, 3);
        row("IoU (shape, any colours)", &s.shape_iou, 3);
        row("circle colour error", &s.circle_error, 1);
        row("background colour error", &s.background_error, 1);
        let frac = |f: Option<f64>| f.map_or("-".to_string(), |f| format!("{f:.2}"));
        let _ = writeln!(
            out,
            "{:<26}circle {}  background {}",
            "colour named right",
            frac(s.circle_named_right),
            frac(s.background_named_right)
        );
        out
    }
}

/// Write [`grid`]`(pairs, size)` as a PNG to `path`, which appears only when complete.
pub fn write_grid(path: &Path, pairs: &[(RgbImage, RgbImage)], size: u32) -> Result<()> {
    let img = grid(pairs, size);
    write_atomic(path, |tmp| {
        img.save_with_format(tmp, image::ImageFormat::Png)
            .map_err(|e| TrainError::file(path, e.to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RED: [u8; 3] = [255, 0, 0];
    const BLUE: [u8; 3] = [0, 0, 255];

    /// A `size` x `size` image: `fg` where `inside(x, y)`, else `bg`.
    fn paint(size: u32, fg: [u8; 3], bg: [u8; 3], inside: impl Fn(u32, u32) -> bool) -> RgbImage {
        RgbImage::from_fn(size, size, |x, y| Rgb(if inside(x, y) { fg } else { bg }))
    }

    #[test]
    fn perfect_image_scores_iou_one_and_no_error() {
        let (c, r) = ((20.3, 27.9), 9.4);
        let img = paint(64, RED, BLUE, |x, y| in_disk(x, y, c, r));
        let m = fill_metrics(&img, c, r, RED, BLUE);
        assert_eq!(m.iou, 1.0);
        assert_eq!(m.shape_iou, 1.0);
        assert_eq!(m.predicted_pixels, m.true_pixels);
        let (disk, back) = (m.circle.unwrap(), m.background.unwrap());
        assert_eq!(disk.error, 0.0);
        assert_eq!(back.error, 0.0);
        assert_eq!(disk.mean, [255.0, 0.0, 0.0]);
        assert_eq!((disk.named, disk.named_right), ("red", true));
        assert_eq!((back.named, back.named_right), ("blue", true));
        assert_eq!(disk.pixels + back.pixels, 64 * 64);
    }

    #[test]
    fn shifted_disk_scores_by_hand() {
        // centre (4, 4), r 1: the pixel centres within 1 are (3.5|4.5, 3.5|4.5), i.e. the 2x2
        // square x, y in {3, 4}. Painting it one pixel to the right (x in {4, 5}) leaves
        // |P ∩ T| = 2, |P ∪ T| = 6.
        let (c, r) = ((4.0, 4.0), 1.0);
        let truth: Vec<(u32, u32)> = (0..8)
            .flat_map(|y| (0..8).map(move |x| (x, y)))
            .filter(|&(x, y)| in_disk(x, y, c, r))
            .collect();
        assert_eq!(truth, vec![(3, 3), (4, 3), (3, 4), (4, 4)]);
        let img = paint(8, RED, BLUE, |x, y| {
            (4..=5).contains(&x) && (3..=4).contains(&y)
        });
        let m = fill_metrics(&img, c, r, RED, BLUE);
        assert_eq!((m.predicted_pixels, m.true_pixels), (4, 4));
        assert!((m.iou - 1.0 / 3.0).abs() < 1e-12, "{}", m.iou);
        assert!((m.shape_iou - 1.0 / 3.0).abs() < 1e-12, "{}", m.shape_iou);
        // disk: 2 red + 2 blue -> (127.5, 0, 127.5); |.| vs red: (127.5 + 0 + 127.5) / 3 = 85
        let disk = m.circle.unwrap();
        assert_eq!(disk.mean, [127.5, 0.0, 127.5]);
        assert!((disk.error - 85.0).abs() < 1e-12);
        // background: 60 pixels, 2 red + 58 blue -> (8.5, 0, 246.5); vs blue: 17 / 3
        let back = m.background.unwrap();
        assert_eq!(back.pixels, 60);
        assert!((back.mean[0] - 8.5).abs() < 1e-12 && (back.mean[2] - 246.5).abs() < 1e-12);
        assert!((back.error - 17.0 / 3.0).abs() < 1e-12);
        assert!(back.named_right);
        // (127.5, 0, 127.5) is nearest to purple (128, 0, 128), not red
        assert_eq!((disk.named, disk.named_right), ("purple", false));
    }

    #[test]
    fn no_disk_painted_scores_zero() {
        let img = paint(32, RED, BLUE, |_, _| false);
        let m = fill_metrics(&img, (16.0, 16.0), 6.0, RED, BLUE);
        assert_eq!(m.iou, 0.0);
        assert_eq!(m.shape_iou, 0.0);
        assert_eq!(m.predicted_pixels, 0);
        let disk = m.circle.unwrap();
        assert!((disk.error - 170.0).abs() < 1e-12); // (255 + 0 + 255) / 3
        assert_eq!(disk.named, "blue");
    }

    #[test]
    fn shape_iou_ignores_the_colours_and_survives_noise() {
        // the right disk in the wrong colours: no IoU in the prompt's colours, full shape IoU
        let (c, r) = ((40.0, 22.0), 12.5);
        let img = paint(64, [20, 160, 30], [250, 250, 0], |x, y| in_disk(x, y, c, r));
        let m = fill_metrics(&img, c, r, RED, BLUE);
        assert_eq!(m.iou, 0.0);
        assert_eq!(m.shape_iou, 1.0);
        // +-20 of deterministic noise per channel keeps the two clusters apart
        let mut noisy = img.clone();
        for (i, p) in noisy.pixels_mut().enumerate() {
            let n = ((i * 7919) % 41) as i32 - 20;
            p.0 = p.0.map(|v| (v as i32 + n).clamp(0, 255) as u8);
        }
        assert_eq!(fill_metrics(&noisy, c, r, RED, BLUE).shape_iou, 1.0);
        // a disk cut by the image's edge is still found: the border is mostly background
        let (c, r) = ((3.0, 30.0), 10.0);
        let img = paint(64, [200, 200, 200], [10, 10, 60], |x, y| {
            in_disk(x, y, c, r)
        });
        assert_eq!(fill_metrics(&img, c, r, RED, BLUE).shape_iou, 1.0);
    }

    #[test]
    fn colour_naming_picks_the_nearest_name() {
        assert_eq!(nearest_colour([250.0, 5.0, 5.0]).0, "red");
        assert_eq!(nearest_colour([3.0, 120.0, 6.0]).0, "green");
        assert_eq!(nearest_colour([140.0, 200.0, 230.0]).0, "sky blue");
        assert_eq!(nearest_colour([10.0, 10.0, 10.0]).0, "black");
        assert_eq!(nearest_colour([0.0, 95.0, 0.0]).0, "dark green");
        for &(name, rgb) in COLOURS {
            assert_eq!(nearest_colour(rgb.map(|v| v as f64)).0, name);
        }
        // a slightly-off colour over the true disk is still named right
        let (c, r) = ((16.0, 16.0), 8.0);
        let img = paint(32, [230, 30, 70], [250, 240, 140], |x, y| {
            in_disk(x, y, c, r)
        });
        let m = fill_metrics(&img, c, r, [220, 20, 60], [240, 230, 140]);
        assert_eq!(m.circle.as_ref().unwrap().named, "crimson");
        assert!(m.circle.unwrap().named_right);
        assert_eq!(m.background.as_ref().unwrap().named, "khaki");
        assert!(m.background.unwrap().named_right);
    }

    #[test]
    fn fill_targets_score_nearly_iou_one() {
        for seed in 0..100 {
            let (_, target, prompt, c, r) = example(64, &mut TorchRng::new(seed));
            let (fg, bg) = parse_fill_prompt(&prompt).expect(&prompt);
            let m = fill_metrics(&target, c, r, COLOURS[fg].1, COLOURS[bg].1);
            // not always exactly 1: a pixel centre just inside r is mixed half and half in the
            // target, which rounds to the midpoint, a tie that counts as background
            assert!(m.iou > 0.97, "{prompt}: {}", m.iou);
            assert!(m.shape_iou > 0.97, "{prompt}: {}", m.shape_iou);
            assert!(m.circle.as_ref().unwrap().named_right, "{prompt}");
            assert!(m.background.as_ref().unwrap().named_right, "{prompt}");
        }
    }

    #[test]
    fn prompts_parse_with_multi_word_colours() {
        let idx = |n: &str| COLOURS.iter().position(|c| c.0 == n).unwrap();
        assert_eq!(
            parse_fill_prompt("dark green circle with sky blue background"),
            Some((idx("dark green"), idx("sky blue")))
        );
        assert_eq!(parse_fill_prompt("red circle on blue background"), None);
        assert_eq!(parse_fill_prompt("mauve circle with red background"), None);
    }

    #[test]
    fn summary_and_grid() {
        let s = Stats::of(&[0.5, 1.0, 0.0, 0.25]).unwrap();
        assert_eq!((s.mean, s.median, s.min, s.max), (0.4375, 0.375, 0.0, 1.0));
        assert_eq!(Stats::of(&[]), None);
        let tile = |v| RgbImage::from_pixel(8, 8, Rgb([v, v, v]));
        let pairs: Vec<_> = (0..5).map(|i| (tile(i * 10), tile(i * 10 + 5))).collect();
        let g = grid(&pairs, 8);
        assert_eq!(g.dimensions(), (4 * 16 + 3 * GRID_GAP, 2 * 8 + GRID_GAP));
        assert_eq!(g.get_pixel(8, 0).0, [5, 5, 5]);
        let second_row = 8 + GRID_GAP;
        assert_eq!(g.get_pixel(0, second_row).0, [40, 40, 40]);
        assert_eq!(g.get_pixel(9, second_row).0, [45, 45, 45]);
    }

    #[test]
    fn report_table_lines() {
        let report = FillReport {
            model: "m".into(),
            controlnet: "c".into(),
            config: FillEvalConfig {
                weight: 1.0,
                count: 1,
                seed: 5,
                size: 64,
                steps: 2,
                cfg_scale: 5.0,
                sampler: SamplerKind::Euler,
                schedule: Schedule::Karras,
            },
            device: "cpu".into(),
            dtype: "f32".into(),
            summary: summarise(&[]),
            examples: Vec::new(),
        };
        let table = report.table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 7, "{table}");
        assert!(
            lines[0]
                .starts_with("eval fill: 0 examples, weight 1, seeds 5.., 64x64, 2 steps, cfg 5, "),
            "{table}"
        );
        assert_eq!(
            lines[2],
            format!("{:<26}{:>9}", "IoU (prompt's colours)", "-")
        );
        assert_eq!(
            lines[6],
            format!("{:<26}circle -  background -", "colour named right")
        );
        assert!(table.ends_with('\n'));
        let json = report.to_json();
        assert_eq!(json["task"], "fill");
        assert_eq!(json["settings"]["seed"], 5);
        assert_eq!(json["settings"]["device"], "cpu");
    }
}
