//! The UNet benchmark: seconds per UNet call and peak memory with random weights, optionally
//! against the same call with ControlNets feeding it residuals and with a merged random LoRA,
//! all timed in alternating rounds.

use std::time::Instant;

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use sd_pipeline::model::unet::UNet2DConditionModel;
use sd_plugins_api::{AddedCond, ExtraAttention, Residuals, UNetAdditions};
use serde::Serialize;

use super::measure::{dtype_name, once, peak_rss_bytes, rounds};
use super::random::{merged_unet, Arch, RandomWeights};
use crate::error::Result;

/// The UNet call to time and what to compare it with.
#[derive(Clone, Debug)]
pub struct UnetBench {
    pub arch: Arch,
    /// Image size, positive multiples of 8 (latents are size / 8).
    pub width: usize,
    pub height: usize,
    /// UNet batch (2 = one image with classifier-free guidance); at least 1.
    pub batch: usize,
    /// Timed calls after one warm-up call; at least 1.
    pub iters: usize,
    /// A device name (`cpu`, `cuda`, `cuda:1`, ...).
    pub device: String,
    /// `f32`, `f16` or `bf16`.
    pub dtype: String,
    /// Also time the call with this many ControlNets summing their residuals into it (the
    /// control image embedded once beforehand, as in a generation); 0: off.
    pub controlnet: usize,
    /// Also time the UNet with a random LoRA of this rank merged into every attention,
    /// feed-forward and projection weight; 0: off.
    pub lora: usize,
    /// Every batch item a different latent; otherwise an even batch holds each latent once
    /// per prompt, as classifier-free guidance sends it.
    pub distinct: bool,
    /// Also time the call with a T2I-Adapter's features (the released architecture, random
    /// weights; computed once beforehand, as in a generation).
    pub t2i_adapter: bool,
    /// Also time the call with an IP-Adapter's image prompt (`ip-adapter_sd15` /
    /// `ip-adapter_sdxl` layouts: 4 tokens; keys and values made once beforehand).
    pub ip_adapter: bool,
    /// After the timed rounds, one more plain call with each kernel's own time recorded.
    pub op_profile: bool,
}

/// A call with an adapter, against the plain call of the same run.
#[derive(Clone, Debug, Serialize)]
pub struct AdapterTiming {
    pub kind: &'static str,
    pub mean_s: f64,
    pub min_s: f64,
    pub first_s: f64,
    pub ratio_to_plain: f64,
    pub ratio_of_mins: f64,
    /// Seconds of the work done once per generation (adapter features, or image encoder +
    /// projection + keys/values, without the encoder here).
    pub once_s: f64,
}

/// The plain call's seconds, and the peak memory after its warm-up call.
#[derive(Clone, Debug, Serialize)]
pub struct UnetTiming {
    pub mean_s: f64,
    pub min_s: f64,
    /// the warm-up call
    pub first_s: f64,
    pub peak_rss_bytes: Option<u64>,
}

/// The call with ControlNets: seconds, ratios to the plain call, peak memory after its warm-up.
#[derive(Clone, Debug, Serialize)]
pub struct ControlNetTiming {
    pub count: usize,
    pub mean_s: f64,
    pub min_s: f64,
    pub first_s: f64,
    pub ratio_to_plain: f64,
    pub ratio_of_mins: f64,
    pub peak_rss_bytes: Option<u64>,
}

/// The UNet with a merged LoRA: its build and merge seconds, and its call's seconds and ratios
/// to the plain call.
#[derive(Clone, Debug, Serialize)]
pub struct LoraTiming {
    pub rank: usize,
    pub patched_weights: usize,
    pub build_s: f64,
    pub merge_s: f64,
    pub mean_s: f64,
    pub min_s: f64,
    pub first_s: f64,
    pub ratio_to_plain: f64,
    pub ratio_of_mins: f64,
}

/// Seconds and calls per kernel (`sd_pipeline::cpu::op_profile`), most time first.
pub type KernelTimes = Vec<(String, f64, u64)>;

/// What [`UnetBench::run`] measured.
#[derive(Clone, Debug, Serialize)]
pub struct UnetReport {
    pub arch: Arch,
    pub width: usize,
    pub height: usize,
    pub batch: usize,
    /// each latent once per prompt, as classifier-free guidance sends it
    pub cfg_batch: bool,
    #[serde(serialize_with = "dtype_name")]
    pub dtype: DType,
    pub device: String,
    pub iters: usize,
    /// seconds to build the plain UNet
    pub build_s: f64,
    pub unet: UnetTiming,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub controlnet: Option<ControlNetTiming>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraTiming>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub adapters: Vec<AdapterTiming>,
    /// with `op_profile`: the profiled call's seconds, and its seconds and calls per kernel,
    /// most time first
    #[serde(skip_serializing_if = "Option::is_none")]
    pub op_profile: Option<(f64, KernelTimes)>,
}

impl UnetReport {
    /// Whether other calls alternated with the plain one.
    pub fn alternated(&self) -> bool {
        self.controlnet.is_some() || self.lora.is_some() || !self.adapters.is_empty()
    }
}

impl UnetBench {
    /// Build the UNet (and ControlNets, merged UNet), warm each call up once, then time them
    /// in `iters` alternating rounds.
    pub fn run(&self) -> Result<UnetReport> {
        let device = crate::device::device(&self.device)?;
        let requested = crate::device::dtype(&self.dtype)?;
        let dtype = crate::device::compute_dtype(&device, requested)?;
        let cfg = self.arch.unet_config();
        let t = Instant::now();
        let vb = VarBuilder::from_backend(Box::new(RandomWeights), dtype, device.clone());
        let unet = UNet2DConditionModel::new(&cfg, vb)?;
        let build = t.elapsed();
        let (b, h, w) = (self.batch, self.height / 8, self.width / 8);
        let cfg_batch = !self.distinct && b.is_multiple_of(2);
        let x = if cfg_batch {
            let half = Tensor::randn(0f32, 1.0, (b / 2, 4, h, w), &device)?;
            Tensor::cat(&[&half, &half], 0)?
        } else {
            Tensor::randn(0f32, 1.0, (b, 4, h, w), &device)?
        }
        .to_dtype(dtype)?;
        let ctx =
            Tensor::randn(0f32, 1.0, (b, 77, cfg.cross_attention_dim), &device)?.to_dtype(dtype)?;
        let ts = Tensor::full(500f32, b, &device)?;
        // SDXL: a pooled text vector and the six micro-conditioning numbers per row
        let added = match cfg.text_time {
            Some(tt) => {
                let k = 6;
                let pooled = tt.input_dim - k * tt.time_embed_dim;
                let ids =
                    [self.height, self.width, 0, 0, self.height, self.width].map(|v| v as f32);
                Some(AddedCond {
                    text_embeds: Tensor::randn(0f32, 1.0, (b, pooled), &device)?.to_dtype(dtype)?,
                    time_ids: Tensor::new(&ids, &device)?.unsqueeze(0)?.repeat((b, 1))?,
                })
            }
            None => None,
        };
        let call = |u: &UNet2DConditionModel, r: Option<&Residuals>| -> Result<()> {
            Ok(u.forward_with(&x, &ts, &ctx, added.as_ref(), r).map(drop)?)
        };
        let call_with = |a: &UNetAdditions| -> Result<()> {
            let out = unet.forward_full(&x, &ts, &ctx, added.as_ref(), None, Some(a));
            Ok(out.map(drop)?)
        };
        let plain = || call(&unet, None);
        // the plain call's warm-up, before any ControlNet exists, gives its peak memory
        let first = once(&device, &plain)?;
        let plain_rss = peak_rss_bytes();
        let nets = {
            let cfg = sd_controlnet::config::ControlNetConfig::from_unet(&cfg);
            (0..self.controlnet)
                .map(|_| {
                    let vb =
                        VarBuilder::from_backend(Box::new(RandomWeights), dtype, device.clone());
                    sd_controlnet::ControlNetModel::new(&cfg, vb)
                })
                .collect::<candle_core::Result<Vec<_>>>()?
        };
        // the control image is embedded once per generation (as `generate` does), not per call
        let hints = if nets.is_empty() {
            Vec::new()
        } else {
            let image = Tensor::rand(0f32, 1.0, (1, 3, self.height, self.width), &device)?;
            nets.iter()
                .map(|n| n.embed_condition(&image, dtype))
                .collect::<candle_core::Result<Vec<_>>>()?
        };
        let step = (!nets.is_empty()).then_some(|| -> Result<()> {
            let mut total: Option<Residuals> = None;
            for (n, hint) in nets.iter().zip(&hints) {
                let r = n.forward_with_hint(&x, &ts, &ctx, added.as_ref(), hint)?;
                total = Some(match total {
                    None => r,
                    Some(t) => t.add(&r)?,
                });
            }
            call(&unet, total.as_ref())
        });
        let cfirst = step.as_ref().map(|f| once(&device, f)).transpose()?;
        let control_rss = peak_rss_bytes();
        // adapters: what a generation makes once (features; keys and values), then the call
        let t = Instant::now();
        let t2i = self
            .t2i_adapter
            .then(|| t2i_additions(&cfg, self.width, self.height, dtype, &device))
            .transpose()?;
        let t2i_once = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let ip = self
            .ip_adapter
            .then(|| ip_additions(&unet, b, dtype, &device))
            .transpose()?;
        let ip_once = t.elapsed().as_secs_f64();
        let t2i_call = t2i.as_ref().map(|a| move || call_with(a));
        let ip_call = ip.as_ref().map(|a| move || call_with(a));
        let tfirst = t2i_call.as_ref().map(|f| once(&device, f)).transpose()?;
        let ifirst = ip_call.as_ref().map(|f| once(&device, f)).transpose()?;
        let merged = (self.lora > 0)
            .then(|| merged_unet(&cfg, self.lora, dtype, &device))
            .transpose()?;
        let merged_call = merged.as_ref().map(|m| move || call(&m.unet, None));
        let lfirst = merged_call.as_ref().map(|f| once(&device, f)).transpose()?;
        // the plain, controlled and merged calls alternate (A B C, C B A, ...): their ratios are
        // the numbers compared
        let mut fs: Vec<&dyn Fn() -> Result<()>> = vec![&plain];
        if let Some(f) = &step {
            fs.push(f);
        }
        if let Some(f) = &merged_call {
            fs.push(f);
        }
        if let Some(f) = &t2i_call {
            fs.push(f);
        }
        if let Some(f) = &ip_call {
            fs.push(f);
        }
        let mut stats = rounds(self.iters, &device, &fs)?.into_iter();
        let (mean, min) = stats.next().expect("the plain call is timed");
        let controlnet = cfirst.map(|first_s| {
            let (cmean, cmin) = stats.next().expect("the controlled call is timed");
            ControlNetTiming {
                count: self.controlnet,
                mean_s: cmean,
                min_s: cmin,
                first_s,
                ratio_to_plain: cmean / mean,
                ratio_of_mins: cmin / min,
                peak_rss_bytes: control_rss,
            }
        });
        let lora = merged.as_ref().zip(lfirst).map(|(m, first_s)| {
            let (lmean, lmin) = stats.next().expect("the merged call is timed");
            LoraTiming {
                rank: self.lora,
                patched_weights: m.patched,
                build_s: m.build_s,
                merge_s: m.merge_s,
                mean_s: lmean,
                min_s: lmin,
                first_s,
                ratio_to_plain: lmean / mean,
                ratio_of_mins: lmin / min,
            }
        });
        let mut adapters = Vec::new();
        for (kind, first, once_s) in [
            ("t2i-adapter", tfirst, t2i_once),
            ("ip-adapter", ifirst, ip_once),
        ] {
            if let Some(first_s) = first {
                let (amean, amin) = stats.next().expect("the adapter call is timed");
                adapters.push(AdapterTiming {
                    kind,
                    mean_s: amean,
                    min_s: amin,
                    first_s,
                    ratio_to_plain: amean / mean,
                    ratio_of_mins: amin / min,
                    once_s,
                });
            }
        }
        let op_profile = if self.op_profile {
            use sd_pipeline::cpu::op_profile;
            op_profile::set_enabled(true);
            let done = once(&device, &plain);
            let ops = op_profile::take();
            op_profile::set_enabled(false);
            let call_s = done?;
            let ops = ops.into_iter().map(|(k, s, n)| (k.to_string(), s, n));
            Some((call_s, ops.collect()))
        } else {
            None
        };
        Ok(UnetReport {
            arch: self.arch,
            width: self.width,
            height: self.height,
            batch: b,
            cfg_batch,
            dtype: requested,
            device: self.device.clone(),
            iters: self.iters,
            build_s: build.as_secs_f64(),
            unet: UnetTiming {
                mean_s: mean,
                min_s: min,
                first_s: first,
                peak_rss_bytes: plain_rss,
            },
            controlnet,
            lora,
            adapters,
            op_profile,
        })
    }
}

/// A T2I-Adapter's features for one control image: the released architectures (SD1
/// `full_adapter`, channels of the UNet's blocks; SDXL `full_adapter_xl`), random weights.
fn t2i_additions(
    cfg: &sd_pipeline::model::config::UNetConfig,
    width: usize,
    height: usize,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<UNetAdditions> {
    use sd_controlnet::t2i_adapter::{AdapterKind, T2IAdapter, T2IAdapterConfig};
    let xl = cfg.text_time.is_some();
    let mut channels = cfg.block_out_channels.clone();
    if xl {
        channels.push(*channels.last().expect("blocks"));
    }
    let acfg = T2IAdapterConfig {
        kind: if xl {
            AdapterKind::FullXl
        } else {
            AdapterKind::Full
        },
        in_channels: 3,
        channels,
        num_res_blocks: 2,
        downscale_factor: if xl { 16 } else { 8 },
    };
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), dtype, device.clone());
    let adapter = T2IAdapter::new(&acfg, vb)?;
    let image = Tensor::rand(0f32, 1.0, (1, 3, height, width), device)?.to_dtype(dtype)?;
    Ok(UNetAdditions {
        intrablock: adapter.forward(&image)?,
        ..Default::default()
    })
}

/// An IP-Adapter's keys and values (base layout: 4 tokens from a 1024-wide ViT-H embedding)
/// for a batch of `b`, random weights.
fn ip_additions(
    unet: &UNet2DConditionModel,
    b: usize,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<UNetAdditions> {
    use sd_controlnet::ip_adapter::{IpAdapter, IpAdapterConfig, ProjectionKind};
    let dims = unet.cross_attention_dims();
    let cross = unet.config().cross_attention_dim;
    let cfg = IpAdapterConfig {
        kind: ProjectionKind::Base,
        tokens: 4,
        image_dim: 1024,
        cross_attention_dim: cross,
        // the file's order: down, up, mid
        layer_dims: dims
            .0
            .iter()
            .chain(&dims.2)
            .chain(&dims.1)
            .copied()
            .collect(),
        depth: 0,
        heads: 0,
    };
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), dtype, device.clone());
    let adapter = IpAdapter::new(&cfg, vb)?;
    let embeds = Tensor::randn(0f32, 1.0, (b, 1024), device)?.to_dtype(dtype)?;
    let tokens = adapter.image_tokens(&embeds)?;
    let (keys, values) =
        adapter.keys_values(&tokens, (dims.0.len(), dims.1.len(), dims.2.len()))?;
    Ok(UNetAdditions {
        attention: vec![ExtraAttention {
            keys,
            values,
            scale: 1.0,
        }],
        ..Default::default()
    })
}
