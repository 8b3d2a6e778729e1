//! `sdctl bench`: speed and memory of the real architectures with random weights.
//! Benchmarks report; they never assert. The measuring is `sd::bench`'s; here are the
//! arguments, their checks, the printed lines and the JSON file.

use clap::{Args, Subcommand, ValueEnum};
use sd::bench::{rss_text, LoadBench, TrainBench, UnetBench};

use crate::CliResult;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Seconds per UNet call and peak memory, for SD 1.5 or 2.1 with random weights.
    Unet(UnetArgs),
    /// Seconds to load a model (diffusers folder or single file) with its memory-mapped
    /// weights, cold and warm, and the peak memory.
    Load(LoadArgs),
    /// One ControlNet training step (forward through ControlNet and frozen UNet, backward,
    /// gradients of every ControlNet weight): seconds and peak memory, random weights.
    Train(TrainBenchArgs),
    /// An SD 1.5-size VAE decode (random weights) at a size, whole or tiled: seconds and the
    /// process's peak memory (run each setting in its own process)
    Vae(VaeBenchArgs),
    /// Seconds per run of an annotator (preprocessor) on an image at a detect resolution:
    /// the first run (which loads its networks) and the runs after it, without the result cache
    Annotator(AnnotatorBenchArgs),
    /// Seconds per run of an ONNX model (the annotators' interpreter) on an input of a shape
    /// (values from a fixed formula): the first run and the runs after it
    Onnx(OnnxBenchArgs),
}

#[derive(Args, Debug)]
pub struct OnnxBenchArgs {
    /// The .onnx file
    pub model: std::path::PathBuf,
    /// The input's shape, comma-separated (e.g. 1,3,640,640); one input only
    #[arg(long)]
    pub shape: String,
    /// Timed runs after the first
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// Also print the seconds of one more run per operator
    #[arg(long)]
    pub op_profile: bool,
    /// Also write the numbers as JSON to this file
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Args, Debug)]
pub struct AnnotatorBenchArgs {
    /// Preprocessor name (`sdctl preprocessors list`)
    pub name: String,
    /// The image it runs on
    pub input: std::path::PathBuf,
    /// Detect resolution (short side), as `sdctl detect --resolution`
    #[arg(long, default_value_t = 512)]
    pub resolution: usize,
    /// Timed runs after the first
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// A preprocessor parameter, repeatable: KEY=VALUE
    #[arg(long = "param", value_name = "KEY=VALUE")]
    pub params: Vec<String>,
    /// Also write the numbers as JSON to this file
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Args, Debug)]
pub struct VaeBenchArgs {
    /// Image side in pixels
    #[arg(long, default_value_t = 512)]
    pub size: usize,
    /// Decode in tiles of this many pixels (a quarter overlap); absent: whole
    #[arg(long)]
    pub tile: Option<usize>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, bf16 (on the CPU: bf16 products with f32 sums, AVX512-BF16) or f16 (on the CPU:
    /// f16 products with f32 sums every 64, AVX512-FP16)
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

#[derive(Args, Debug)]
pub struct LoadArgs {
    /// A diffusers folder or a single-file checkpoint
    #[arg(long)]
    pub model: std::path::PathBuf,
    /// Timed loads after the first (which may read from disk)
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Also write the numbers as JSON to this file
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Args, Debug)]
pub struct TrainBenchArgs {
    #[arg(long, value_enum, default_value = "sd15")]
    pub arch: Arch,
    /// Image size (latents are size / 8)
    #[arg(long, default_value_t = 512)]
    pub size: usize,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[arg(long, default_value_t = 1)]
    pub iters: usize,
    /// What trains: controlnet | t2i-adapter
    #[arg(long, value_enum, default_value = "controlnet")]
    pub network: TrainedNetwork,
    /// no | bf16 | fp16: the step's products in bf16 or f16 with f32 sums (as `train
    /// --mixed-precision`)
    #[arg(long, default_value = "no")]
    pub mixed_precision: String,
    /// Recompute each block in the backward pass (as `train --gradient-checkpointing true`)
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Print the time of each kernel (forward and backward) in the last step
    #[arg(long)]
    pub op_profile: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum TrainedNetwork {
    Controlnet,
    T2iAdapter,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Arch {
    Sd15,
    Sd21,
    Sdxl,
}

impl From<Arch> for sd::bench::Arch {
    fn from(a: Arch) -> Self {
        match a {
            Arch::Sd15 => Self::Sd15,
            Arch::Sd21 => Self::Sd21,
            Arch::Sdxl => Self::Sdxl,
        }
    }
}

#[derive(Args, Debug)]
pub struct UnetArgs {
    #[arg(long, value_enum, default_value = "sd15")]
    pub arch: Arch,
    /// Image width [default: the architecture's own: 512 sd15, 768 sd21, 1024 sdxl]
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height [default: as the width]
    #[arg(long)]
    pub height: Option<usize>,
    /// UNet batch (2 = one image with classifier-free guidance)
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// Timed calls after one warm-up call
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Also time the UNet call with N ControlNets (random weights) feeding it residuals, and
    /// report the ratio to the plain call measured in the same run (the control image is
    /// embedded once beforehand, as in a generation)
    #[arg(long, default_value_t = 0)]
    pub controlnet: usize,
    /// Also time the UNet with a random LoRA of this rank merged into every attention,
    /// feed-forward and projection weight (as `--lora` merges while loading), and report the
    /// merge time and the ratio to the plain call (0: off)
    #[arg(long, default_value_t = 0)]
    pub lora: usize,
    /// Every batch item a different latent. By default an even batch is what classifier-free
    /// guidance sends: each latent once per prompt (the UNet computes the copies once up to
    /// the first cross-attention)
    #[arg(long)]
    pub distinct: bool,
    /// Also time the call with a T2I-Adapter's features added (the released architecture,
    /// random weights, features made once beforehand as in a generation)
    #[arg(long)]
    pub t2i_adapter: bool,
    /// Also time the call with an IP-Adapter's image prompt (4 tokens, keys and values made
    /// once beforehand as in a generation)
    #[arg(long)]
    pub ip_adapter: bool,
    /// After the timed rounds, one more plain call printing each kernel's own time
    #[arg(long)]
    pub op_profile: bool,
    /// Also write the numbers as JSON to this file
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

pub fn run(cmd: BenchCommand) -> CliResult {
    match cmd {
        BenchCommand::Unet(a) => unet(a),
        BenchCommand::Train(a) => train(a),
        BenchCommand::Load(a) => load(a),
        BenchCommand::Annotator(a) => annotator(a),
        BenchCommand::Onnx(a) => onnx(a),
        BenchCommand::Vae(a) => {
            if a.size < 64 || a.size > 8192 || a.size % 8 != 0 {
                return Err(format!("--size {}: use a multiple of 8 in 64..=8192", a.size).into());
            }
            if a.tile
                .is_some_and(|t| !(64..=4096).contains(&t) || t % 8 != 0)
            {
                return Err("--tile: use a multiple of 8 in 64..=4096".into());
            }
            let device = sd::device::device(&a.device)?;
            let dtype = sd::device::dtype(&a.dtype)?;
            let r = sd::bench::VaeBench {
                size: a.size,
                tile: a.tile,
                device,
                dtype,
            }
            .run()?;
            println!(
                "vae decode {0}x{0} {1} {4:?}: {2:.2} s, peak RSS {3}",
                r.size,
                r.tile
                    .map_or("whole".to_string(), |t| format!("tiles of {t}")),
                r.seconds,
                sd::bench::rss_text(r.peak_rss_bytes),
                dtype,
            );
            Ok(())
        }
    }
}

fn write_json(path: &std::path::Path, report: &impl serde::Serialize) -> CliResult {
    // through a JSON value: its keys sorted, as they always were
    let text = serde_json::to_value(report).and_then(|v| serde_json::to_string_pretty(&v));
    std::fs::write(path, text.expect("plain JSON values"))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}

/// A call's seconds as the lines print them.
fn per_call(mean: f64, iters: usize, min: f64, first: f64) -> String {
    format!("{mean:.3} s/call (mean of {iters}, min {min:.3}, first call {first:.3})")
}

fn train(a: TrainBenchArgs) -> CliResult {
    if matches!(a.arch, Arch::Sdxl) {
        return Err("bench train: training covers sd15 and sd21 (not SDXL yet)".into());
    }
    let (arch, size, batch, iters) = (a.arch.into(), a.size, a.batch, a.iters);
    if size == 0 || !size.is_multiple_of(8) || batch == 0 || iters == 0 {
        return Err(
            "--size must be a positive multiple of 8; --batch and --iters at least 1".into(),
        );
    }
    let network = match a.network {
        TrainedNetwork::Controlnet => sd_train::NetworkKind::Controlnet,
        TrainedNetwork::T2iAdapter => sd_train::NetworkKind::T2iAdapter,
    };
    use sd_pipeline::cpu::matmul::{set_precision, Precision};
    let precision = sd_train::control::mixed_precision(&a.mixed_precision)?;
    set_precision(precision)?;
    sd_pipeline::model::checkpoint::set_enabled(a.gradient_checkpointing);
    let r = TrainBench {
        arch,
        network,
        size,
        batch,
        iters,
        op_profile: a.op_profile,
    }
    .run()?;
    let (arch, l, mean, n) = (r.arch, r.latent, r.mean_s, r.trainable_tensors);
    let rss = rss_text(r.peak_rss_bytes);
    let what = network.folder();
    let min = r.step_s.iter().cloned().fold(f64::INFINITY, f64::min);
    let list = |v: &[f64]| {
        v.iter()
            .map(|t| format!("{t:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let (all, fwd) = (list(&r.step_s), list(&r.forward_s));
    let prec = match precision {
        Precision::F32 => "f32",
        Precision::Bf16 => "bf16 mixed precision",
        Precision::F16 => "f16 mixed precision",
    };
    let prec = if a.gradient_checkpointing {
        format!("{prec}, gradient checkpointing")
    } else {
        prec.to_string()
    };
    println!("train {what} {arch:?} {size}x{size} (latents {l}x{l}) batch {batch} {prec} on cpu: {mean:.2} s/step (mean of {iters}, min {min:.2}, all {all}; forward passes {fwd}), {n} trainable tensors; peak RSS {rss}");
    if let (Some(ops), Some(step)) = (r.op_profile.last(), r.step_s.last()) {
        print_kernels(
            &format!("kernels of the last step ({step:.2} s)"),
            *step,
            ops,
        );
    }
    Ok(())
}

/// Each kernel's own seconds in a call or step of `total` seconds, and the rest.
fn print_kernels(title: &str, total: f64, ops: &[(String, f64, u64)]) {
    let kernels: f64 = ops.iter().map(|o| o.1).sum();
    println!("{title}, their own time:");
    for (name, s, calls) in ops {
        println!(
            "  {name:<24} {s:>7.3} s  {:>5.1}%  {calls} calls",
            100.0 * s / total
        );
    }
    println!(
        "  {:<24} {:>7.3} s  {:>5.1}%",
        "other (candle ops, graph)",
        total - kernels,
        100.0 * (total - kernels) / total
    );
}

fn load(a: LoadArgs) -> CliResult {
    if a.iters == 0 {
        return Err("--iters must be at least 1".into());
    }
    let (model, iters, device, dtype) = (a.model, a.iters, a.device, a.dtype);
    let r = LoadBench {
        model,
        iters,
        device,
        dtype,
    }
    .run()?;
    let (m, dtype, dev, rss) = (
        r.model.display(),
        r.dtype,
        &r.device,
        rss_text(r.peak_rss_bytes),
    );
    let (mean, min, first) = (r.warm_mean_s, r.warm_min_s, r.first_s);
    println!("load {m} ({dtype:?} on {dev}): {mean:.3} s warm (mean of {iters}, min {min:.3}), first load {first:.3} s; peak RSS {rss}");
    a.json.map_or(Ok(()), |p| write_json(&p, &r))
}

fn unet(a: UnetArgs) -> CliResult {
    let native = sd::bench::Arch::from(a.arch).native_size();
    let width = a.width.unwrap_or(native);
    let (height, batch, iters) = (a.height.unwrap_or(width), a.batch, a.iters);
    if width == 0 || height == 0 || !width.is_multiple_of(8) || !height.is_multiple_of(8) {
        let e = format!("--width {width} / --height {height}: must be positive multiples of 8");
        return Err(e.into());
    }
    if batch == 0 || iters == 0 {
        return Err("--batch and --iters must be at least 1".into());
    }
    let (arch, device, dtype, distinct) = (a.arch.into(), a.device, a.dtype, a.distinct);
    let (controlnet, lora) = (a.controlnet, a.lora);
    let s = UnetBench {
        arch,
        width,
        height,
        batch,
        iters,
        device,
        dtype,
        controlnet,
        lora,
        distinct,
        t2i_adapter: a.t2i_adapter,
        ip_adapter: a.ip_adapter,
        op_profile: a.op_profile,
    };
    let r = s.run()?;
    let (arch, dtype, dev, p, build) = (r.arch, r.dtype, &r.device, &r.unet, r.build_s);
    let latents = if r.cfg_batch {
        "latents once per prompt, as CFG"
    } else {
        "distinct latents"
    };
    let t = per_call(p.mean_s, iters, p.min_s, p.first_s);
    let rss = rss_text(p.peak_rss_bytes);
    println!("unet {arch:?} {width}x{height} batch {batch} ({latents}) {dtype:?} on {dev}: {t}; build {build:.1} s; peak RSS {rss}");
    let alt = if r.alternated() {
        "; calls alternated with the plain ones, order reversed every round"
    } else {
        ""
    };
    if let Some(c) = &r.controlnet {
        let (n, s) = (c.count, if c.count == 1 { "" } else { "s" });
        let t = per_call(c.mean_s, iters, c.min_s, c.first_s);
        let rss = rss_text(c.peak_rss_bytes);
        let (ratio, mins) = (c.ratio_to_plain, c.ratio_of_mins);
        println!("unet + {n} controlnet{s}: {t} = {ratio:.2}x the plain call (mins: {mins:.2}x{alt}); peak RSS {rss}");
    }
    if let Some(l) = &r.lora {
        let t = per_call(l.mean_s, iters, l.min_s, l.first_s);
        let (rank, n) = (l.rank, l.patched_weights);
        let (ratio, mins, build, merge) = (l.ratio_to_plain, l.ratio_of_mins, l.build_s, l.merge_s);
        println!("unet + merged LoRA (rank {rank}, {n} weights): {t} = {ratio:.2}x the plain call (mins: {mins:.2}x{alt}); build {build:.1} s (merge {merge:.1} s)");
    }
    for ad in &r.adapters {
        let t = per_call(ad.mean_s, iters, ad.min_s, ad.first_s);
        let (kind, ratio, mins, once) = (ad.kind, ad.ratio_to_plain, ad.ratio_of_mins, ad.once_s);
        println!("unet + {kind}: {t} = {ratio:.2}x the plain call (mins: {mins:.2}x{alt}); once per generation {once:.2} s");
    }
    if let Some((call, ops)) = &r.op_profile {
        print_kernels(
            &format!("kernels of one more plain call ({call:.2} s)"),
            *call,
            ops,
        );
    }
    a.json.map_or(Ok(()), |p| write_json(&p, &r))
}

#[derive(serde::Serialize)]
struct AnnotatorReport {
    name: String,
    width: usize,
    height: usize,
    first_seconds: f64,
    mean_seconds: f64,
    min_seconds: f64,
    iters: usize,
}

fn annotator(a: AnnotatorBenchArgs) -> CliResult {
    use sd_preprocessors::detect::{detect, read_image, Sizing, RESOLUTIONS};
    if !RESOLUTIONS.contains(&a.resolution) {
        return Err(format!("--resolution {}: use {RESOLUTIONS:?}", a.resolution).into());
    }
    if a.iters == 0 || a.iters > 1000 {
        return Err(format!("--iters {}: use 1..=1000", a.iters).into());
    }
    if let Some(j) = &a.json {
        crate::check_output("--json", j, false)?;
    }
    // the built-in preprocessors and no result cache: every run computes
    let reg = sd_preprocessors::registry();
    let p = reg.preprocessor(&a.name).ok_or_else(|| {
        format!(
            "unknown preprocessor {:?} (`sdctl preprocessors list`)",
            a.name
        )
    })?;
    let params = crate::detect::cli_params(p.as_ref(), &a.params)?;
    let input = read_image(&a.input)?;
    let sizing = Sizing {
        resolution: a.resolution,
        pad: false,
    };
    let mut times = Vec::with_capacity(a.iters + 1);
    let mut size = (0, 0);
    for _ in 0..=a.iters {
        let t = std::time::Instant::now();
        let out = detect(&reg, p.as_ref(), &input, &params, sizing)
            .map_err(|e| format!("{}: {e}", a.name))?;
        times.push(t.elapsed().as_secs_f64());
        size = (out.map.width, out.map.height);
    }
    let rest = &times[1..];
    let mean = rest.iter().sum::<f64>() / rest.len() as f64;
    let min = rest.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "annotator {} {}x{}: {}",
        a.name,
        size.0,
        size.1,
        per_call(mean, a.iters, min, times[0]).replace("call", "run")
    );
    if let Some(j) = &a.json {
        write_json(
            j,
            &AnnotatorReport {
                name: a.name,
                width: size.0,
                height: size.1,
                first_seconds: times[0],
                mean_seconds: mean,
                min_seconds: min,
                iters: a.iters,
            },
        )?;
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct OnnxReport {
    model: String,
    shape: Vec<usize>,
    load_seconds: f64,
    first_seconds: f64,
    mean_seconds: f64,
    min_seconds: f64,
    iters: usize,
}

fn onnx(a: OnnxBenchArgs) -> CliResult {
    use sd_preprocessors::onnx::{Model, MAX_ELEMENTS};
    if a.iters == 0 || a.iters > 1000 {
        return Err(format!("--iters {}: use 1..=1000", a.iters).into());
    }
    let shape: Vec<usize> = a
        .shape
        .split(',')
        .map(|d| d.trim().parse::<usize>().ok().filter(|&d| d > 0))
        .collect::<Option<_>>()
        .ok_or_else(|| format!("--shape {:?}: positive sizes with commas", a.shape))?;
    let n = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= MAX_ELEMENTS)
        .ok_or_else(|| format!("--shape {:?}: more than {MAX_ELEMENTS} values", a.shape))?;
    if let Some(j) = &a.json {
        crate::check_output("--json", j, false)?;
    }
    let t = std::time::Instant::now();
    let m = Model::load(&a.model)?;
    let load = t.elapsed().as_secs_f64();
    let name = match m.input_names() {
        [one] => one.clone(),
        other => {
            return Err(format!(
                "{}: {} inputs, one expected",
                a.model.display(),
                other.len()
            )
            .into())
        }
    };
    let v: Vec<f32> = (0..n).map(|i| (i % 251) as f32 / 125.0 - 1.0).collect();
    let x = candle_core::Tensor::from_vec(v, shape.as_slice(), &candle_core::Device::Cpu)
        .map_err(|e| e.to_string())?;
    let mut times = Vec::with_capacity(a.iters + 1);
    for _ in 0..=a.iters {
        let t = std::time::Instant::now();
        m.run(&[(&name, x.clone())])
            .map_err(|e| format!("{}: {e}", a.model.display()))?;
        times.push(t.elapsed().as_secs_f64());
    }
    if a.op_profile {
        let mut ops = std::collections::HashMap::new();
        m.run_profiled(&[(&name, x.clone())], &mut ops)
            .map_err(|e| format!("{}: {e}", a.model.display()))?;
        let mut ops: Vec<(String, f64)> = ops.into_iter().collect();
        ops.sort_by(|a, b| b.1.total_cmp(&a.1));
        for (op, s) in ops {
            println!("  {s:8.4} s  {op}");
        }
    }
    let rest = &times[1..];
    let mean = rest.iter().sum::<f64>() / rest.len() as f64;
    let min = rest.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "onnx {} {shape:?} (load {load:.2} s): {}",
        a.model.display(),
        per_call(mean, a.iters, min, times[0]).replace("call", "run")
    );
    if let Some(j) = &a.json {
        write_json(
            j,
            &OnnxReport {
                model: a.model.display().to_string(),
                shape,
                load_seconds: load,
                first_seconds: times[0],
                mean_seconds: mean,
                min_seconds: min,
                iters: a.iters,
            },
        )?;
    }
    Ok(())
}
