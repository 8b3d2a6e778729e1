//! The training benchmark: one ControlNet or T2I-Adapter training step (forward through the
//! network and the frozen UNet, backward, gradients of every trained weight) with random
//! weights, f32 on the CPU.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use sd_pipeline::model::unet::UNet2DConditionModel;
use serde::Serialize;

use super::measure::peak_rss_bytes;
use super::random::{Arch, RandomVars, RandomWeights};
use crate::error::{Error, Result};

/// The model and batch of the step.
#[derive(Clone, Debug)]
pub struct TrainBench {
    pub arch: Arch,
    /// What trains.
    pub network: sd_train::NetworkKind,
    /// Image size, a positive multiple of 8 (latents are size / 8).
    pub size: usize,
    pub batch: usize,
    /// Timed steps; at least 1.
    pub iters: usize,
    /// Record the time of each kernel (forward and backward) per step.
    pub op_profile: bool,
}

/// Seconds per step and the process's peak memory.
#[derive(Clone, Debug, Serialize)]
pub struct TrainReport {
    pub arch: Arch,
    pub size: usize,
    /// latent side (size / 8)
    pub latent: usize,
    pub batch: usize,
    pub iters: usize,
    /// mean seconds per step
    pub mean_s: f64,
    /// seconds of each step, in order (the first includes one-time set-up)
    pub step_s: Vec<f64>,
    /// of which the forward pass (the loss)
    pub forward_s: Vec<f64>,
    /// the trained network's weights
    pub trainable_tensors: usize,
    /// with `op_profile`: each step's seconds and calls per kernel, most time first
    pub op_profile: Vec<Vec<(String, f64, u64)>>,
    pub peak_rss_bytes: Option<u64>,
}

/// [`RandomVars`] kept by the benchmark too, to count the variables made.
struct Shared(Arc<RandomVars>);

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

impl TrainBench {
    /// `iters` training steps of a random ControlNet or T2I-Adapter on a random UNet.
    pub fn run(&self) -> Result<TrainReport> {
        let dev = Device::Cpu;
        let cfg = self.arch.unet_config();
        let unet = UNet2DConditionModel::new(
            &cfg,
            VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, dev.clone()),
        )?;
        let cn_cfg = sd_controlnet::config::ControlNetConfig::from_unet(&cfg);
        let backend = Arc::new(RandomVars(Mutex::new(Vec::new())));
        let vb =
            VarBuilder::from_backend(Box::new(Shared(backend.clone())), DType::F32, dev.clone());
        let cn = match self.network {
            sd_train::NetworkKind::Controlnet => sd_train::Network::ControlNet {
                model: sd_controlnet::ControlNetModel::new(&cn_cfg, vb)?,
                config: cn_cfg,
                only_mid: false,
            },
            sd_train::NetworkKind::T2iAdapter => {
                let a = sd_controlnet::init::adapter_config_for(
                    &cfg,
                    8,
                    sd_controlnet::t2i_adapter::AdapterKind::Full,
                )
                .map_err(|e| Error::Message(e.to_string()))?;
                sd_train::Network::Adapter(sd_controlnet::T2IAdapter::new(&a, vb)?)
            }
        };
        let vars = backend.0.lock().map(|v| v.len()).unwrap_or(0);
        let (b, l) = (self.batch, self.size / 8);
        let latents = Tensor::randn(0f32, 1.0, (b, 4, l, l), &dev)?;
        let noise = Tensor::randn(0f32, 1.0, (b, 4, l, l), &dev)?;
        let ehs = Tensor::randn(0f32, 1.0, (b, 77, cfg.cross_attention_dim), &dev)?;
        let cond = Tensor::rand(0f32, 1.0, (b, 3, self.size, self.size), &dev)?;
        let ts: Vec<usize> = (0..b).map(|i| 100 + 300 * i).collect();
        let alphas = sd_pipeline::samplers::alphas_cumprod(
            &sd_pipeline::samplers::SchedulerConfig::default(),
        );
        let (mut times, mut forward, mut profile) = (Vec::new(), Vec::new(), Vec::new());
        use sd_pipeline::cpu::op_profile;
        op_profile::set_enabled(self.op_profile);
        for _ in 0..self.iters {
            let t = Instant::now();
            let loss = sd_train::training_loss(
                &cn, &unet, &latents, &noise, &ts, &ehs, &cond, &alphas, false,
            )
            .map_err(|e| Error::Message(e.to_string()))?;
            forward.push(t.elapsed().as_secs_f64());
            let grads = sd_pipeline::model::checkpoint::backward(&loss)?;
            drop(grads);
            times.push(t.elapsed().as_secs_f64());
            if self.op_profile {
                let ops = op_profile::take();
                profile.push(
                    ops.into_iter()
                        .map(|(k, s, n)| (k.to_string(), s, n))
                        .collect(),
                );
            }
        }
        op_profile::set_enabled(false);
        Ok(TrainReport {
            arch: self.arch,
            size: self.size,
            latent: l,
            batch: b,
            iters: self.iters,
            mean_s: times.iter().sum::<f64>() / times.len() as f64,
            step_s: times,
            forward_s: forward,
            trainable_tensors: vars,
            op_profile: profile,
            peak_rss_bytes: peak_rss_bytes(),
        })
    }
}
