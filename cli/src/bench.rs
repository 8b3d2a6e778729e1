//! `sdctl bench`: speed and memory of the real architectures with random weights.
//! Benchmarks report; they never assert.

use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use clap::{Args, Subcommand, ValueEnum};
use sd::bench::{
    merged_unet, once, peak_rss, peak_rss_bytes, rounds, timed, RandomVars, RandomWeights,
};
use sd_pipeline::model::config::UNetConfig;
use sd_pipeline::model::unet::UNet2DConditionModel;
use sd_plugins_api::Residuals;

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
}

fn train(a: TrainBenchArgs) -> CliResult {
    if a.size == 0 || !a.size.is_multiple_of(8) || a.batch == 0 || a.iters == 0 {
        return Err(
            "--size must be a positive multiple of 8; --batch and --iters at least 1".into(),
        );
    }
    let dev = Device::Cpu;
    let cfg = match a.arch {
        Arch::Sd15 => UNetConfig::sd15(),
        Arch::Sd21 => UNetConfig::sd21(),
    };
    let unet = UNet2DConditionModel::new(
        &cfg,
        VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, dev.clone()),
    )?;
    let cn_cfg = sd_controlnet::config::ControlNetConfig::from_unet(&cfg);
    let backend = std::sync::Arc::new(RandomVars(std::sync::Mutex::new(Vec::new())));
    struct Shared(std::sync::Arc<RandomVars>);
    impl SimpleBackend for Shared {
        fn get(
            &self,
            s: Shape,
            n: &str,
            h: Init,
            d: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            self.0.get(s, n, h, d, dev)
        }
        fn get_unchecked(&self, n: &str, d: DType, dev: &Device) -> candle_core::Result<Tensor> {
            self.0.get_unchecked(n, d, dev)
        }
        fn contains_tensor(&self, n: &str) -> bool {
            self.0.contains_tensor(n)
        }
    }
    let cn = sd_controlnet::ControlNetModel::new(
        &cn_cfg,
        VarBuilder::from_backend(Box::new(Shared(backend.clone())), DType::F32, dev.clone()),
    )?;
    let vars = backend.0.lock().map(|v| v.len()).unwrap_or(0);
    let l = a.size / 8;
    let latents = Tensor::randn(0f32, 1.0, (a.batch, 4, l, l), &dev)?;
    let noise = Tensor::randn(0f32, 1.0, (a.batch, 4, l, l), &dev)?;
    let ehs = Tensor::randn(0f32, 1.0, (a.batch, 77, cfg.cross_attention_dim), &dev)?;
    let cond = Tensor::rand(0f32, 1.0, (a.batch, 3, a.size, a.size), &dev)?;
    let ts: Vec<usize> = (0..a.batch).map(|i| 100 + 300 * i).collect();
    let alphas =
        sd_pipeline::samplers::alphas_cumprod(&sd_pipeline::samplers::SchedulerConfig::default());
    let mut times = Vec::new();
    for _ in 0..a.iters {
        let t = Instant::now();
        let loss = sd_train::training_loss(
            &cn, &unet, &latents, &noise, &ts, &ehs, &cond, &alphas, false, false,
        )?;
        let grads = loss.backward()?;
        drop(grads);
        times.push(t.elapsed().as_secs_f64());
    }
    let rss = peak_rss();
    println!(
        "train controlnet {:?} {}x{} (latents {l}x{l}) batch {} f32 on cpu: {:.1} s/step (mean of {}), {} trainable tensors; peak RSS {rss}",
        a.arch,
        a.size,
        a.size,
        a.batch,
        times.iter().sum::<f64>() / times.len() as f64,
        times.len(),
        vars,
    );
    Ok(())
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Arch {
    Sd15,
    Sd21,
}

#[derive(Args, Debug)]
pub struct UnetArgs {
    #[arg(long, value_enum, default_value = "sd15")]
    pub arch: Arch,
    #[arg(long, default_value_t = 512)]
    pub width: usize,
    #[arg(long, default_value_t = 512)]
    pub height: usize,
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
    /// Also write the numbers as JSON to this file
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

pub fn run(cmd: BenchCommand) -> CliResult {
    match cmd {
        BenchCommand::Unet(a) => unet(a),
        BenchCommand::Train(a) => train(a),
        BenchCommand::Load(a) => load(a),
    }
}

fn write_json(path: &std::path::Path, report: &serde_json::Value) -> CliResult {
    let text = serde_json::to_string_pretty(report).expect("plain JSON values");
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}

fn load(a: LoadArgs) -> CliResult {
    if a.iters == 0 {
        return Err("--iters must be at least 1".into());
    }
    let device = sd::device::device(&a.device)?;
    let dtype = sd::device::dtype(&a.dtype)?;
    sd::device::check_dtype(&device, dtype)?;
    let (mean, min, first) = timed(a.iters, &device, &|| {
        sd_pipeline::StableDiffusion::load_with_vae(&a.model, &device, dtype, &[], None)?;
        Ok(())
    })?;
    println!(
        "load {} ({:?} on {}): {:.3} s warm (mean of {}, min {:.3}), first load {:.3} s; peak RSS {}",
        a.model.display(),
        dtype,
        a.device,
        mean,
        a.iters,
        min,
        first,
        peak_rss()
    );
    if let Some(p) = &a.json {
        let report = serde_json::json!({
            "model": a.model, "dtype": a.dtype, "device": a.device, "iters": a.iters,
            "first_s": first, "warm_mean_s": mean, "warm_min_s": min,
            "peak_rss_bytes": peak_rss_bytes(),
        });
        write_json(p, &report)?;
    }
    Ok(())
}

fn unet(a: UnetArgs) -> CliResult {
    if a.width == 0 || a.height == 0 || !a.width.is_multiple_of(8) || !a.height.is_multiple_of(8) {
        return Err(format!(
            "--width {} / --height {}: must be positive multiples of 8",
            a.width, a.height
        )
        .into());
    }
    if a.batch == 0 || a.iters == 0 {
        return Err("--batch and --iters must be at least 1".into());
    }
    let device = sd::device::device(&a.device)?;
    let dtype = sd::device::dtype(&a.dtype)?;
    sd::device::check_dtype(&device, dtype)?;
    let cfg = match a.arch {
        Arch::Sd15 => UNetConfig::sd15(),
        Arch::Sd21 => UNetConfig::sd21(),
    };
    let t = Instant::now();
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), dtype, device.clone());
    let unet = UNet2DConditionModel::new(&cfg, vb)?;
    let build = t.elapsed();
    let (h, w) = (a.height / 8, a.width / 8);
    let cfg_batch = !a.distinct && a.batch.is_multiple_of(2);
    let x = if cfg_batch {
        let half = Tensor::randn(0f32, 1.0, (a.batch / 2, 4, h, w), &device)?;
        Tensor::cat(&[&half, &half], 0)?
    } else {
        Tensor::randn(0f32, 1.0, (a.batch, 4, h, w), &device)?
    }
    .to_dtype(dtype)?;
    let ctx = Tensor::randn(0f32, 1.0, (a.batch, 77, cfg.cross_attention_dim), &device)?
        .to_dtype(dtype)?;
    let ts = Tensor::full(500f32, a.batch, &device)?;
    let call = |u: &UNet2DConditionModel, r: Option<&Residuals>| -> sd::Result<()> {
        Ok(u.forward(&x, &ts, &ctx, r).map(drop)?)
    };
    let plain = || call(&unet, None);
    // the plain call's warm-up, before any ControlNet exists, gives its peak memory
    let first = once(&device, &plain)?;
    let plain_rss = (peak_rss(), peak_rss_bytes());
    let nets = {
        let cfg = sd_controlnet::config::ControlNetConfig::from_unet(&cfg);
        (0..a.controlnet)
            .map(|_| {
                let vb = VarBuilder::from_backend(Box::new(RandomWeights), dtype, device.clone());
                sd_controlnet::ControlNetModel::new(&cfg, vb)
            })
            .collect::<candle_core::Result<Vec<_>>>()?
    };
    // the control image is embedded once per generation (as `generate` does), not per call
    let hints = if nets.is_empty() {
        Vec::new()
    } else {
        let image = Tensor::rand(0f32, 1.0, (1, 3, a.height, a.width), &device)?;
        nets.iter()
            .map(|n| n.embed_condition(&image, dtype))
            .collect::<candle_core::Result<Vec<_>>>()?
    };
    let step = (!nets.is_empty()).then_some(|| -> sd::Result<()> {
        let mut total: Option<Residuals> = None;
        for (n, hint) in nets.iter().zip(&hints) {
            let r = n.forward_with_hint(&x, &ts, &ctx, hint)?;
            total = Some(match total {
                None => r,
                Some(t) => t.add(&r).map_err(|e| e.to_string())?,
            });
        }
        call(&unet, total.as_ref())
    });
    let cfirst = step.as_ref().map(|f| once(&device, f)).transpose()?;
    let control_rss = (peak_rss(), peak_rss_bytes());
    let merged = (a.lora > 0)
        .then(|| merged_unet(&cfg, a.lora, dtype, &device))
        .transpose()?;
    let merged_call = merged.as_ref().map(|m| move || call(&m.unet, None));
    let lfirst = merged_call.as_ref().map(|f| once(&device, f)).transpose()?;
    // the plain, controlled and merged calls alternate (A B C, C B A, ...): their ratios are the
    // numbers compared
    let mut fs: Vec<&dyn Fn() -> sd::Result<()>> = vec![&plain];
    if let Some(f) = &step {
        fs.push(f);
    }
    if let Some(f) = &merged_call {
        fs.push(f);
    }
    let mut stats = rounds(a.iters, &device, &fs)?.into_iter();
    let (mean, min) = stats.next().expect("the plain call is timed");
    println!(
        "unet {:?} {}x{} batch {} ({}) {:?} on {}: {:.3} s/call (mean of {}, min {:.3}, first call {:.3}); build {:.1} s; peak RSS {}",
        a.arch,
        a.width,
        a.height,
        a.batch,
        if cfg_batch { "latents once per prompt, as CFG" } else { "distinct latents" },
        dtype,
        a.device,
        mean,
        a.iters,
        min,
        first,
        build.as_secs_f64(),
        plain_rss.0
    );
    let mut report = serde_json::json!({
        "arch": format!("{:?}", a.arch).to_lowercase(), "width": a.width, "height": a.height,
        "batch": a.batch, "cfg_batch": cfg_batch, "dtype": a.dtype, "device": a.device, "iters": a.iters,
        "build_s": build.as_secs_f64(),
        "unet": {"mean_s": mean, "min_s": min, "first_s": first, "peak_rss_bytes": plain_rss.1},
    });
    let alternated = if fs.len() > 1 {
        "; calls alternated with the plain ones, order reversed every round"
    } else {
        ""
    };
    if let Some(cfirst) = cfirst {
        let (cmean, cmin) = stats.next().expect("the controlled call is timed");
        report["controlnet"] = serde_json::json!({
            "count": a.controlnet, "mean_s": cmean, "min_s": cmin, "first_s": cfirst,
            "ratio_to_plain": cmean / mean, "ratio_of_mins": cmin / min,
            "peak_rss_bytes": control_rss.1,
        });
        println!(
            "unet + {} controlnet{}: {:.3} s/call (mean of {}, min {:.3}, first call {:.3}) = {:.2}x the plain call (mins: {:.2}x{alternated}); peak RSS {}",
            a.controlnet,
            if a.controlnet == 1 { "" } else { "s" },
            cmean,
            a.iters,
            cmin,
            cfirst,
            cmean / mean,
            cmin / min,
            control_rss.0
        );
    }
    if let (Some(m), Some(lfirst)) = (&merged, lfirst) {
        let (lmean, lmin) = stats.next().expect("the merged call is timed");
        report["lora"] = serde_json::json!({
            "rank": a.lora, "patched_weights": m.patched, "build_s": m.build_s,
            "merge_s": m.merge_s, "mean_s": lmean, "min_s": lmin,
            "first_s": lfirst, "ratio_to_plain": lmean / mean, "ratio_of_mins": lmin / min,
        });
        println!(
            "unet + merged LoRA (rank {}, {} weights): {:.3} s/call (mean of {}, min {:.3}, first call {:.3}) = {:.2}x the plain call (mins: {:.2}x{alternated}); build {:.1} s (merge {:.1} s)",
            a.lora,
            m.patched,
            lmean,
            a.iters,
            lmin,
            lfirst,
            lmean / mean,
            lmin / min,
            m.build_s,
            m.merge_s,
        );
    }
    if let Some(p) = &a.json {
        write_json(p, &report)?;
    }
    Ok(())
}
