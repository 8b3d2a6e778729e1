//! Random weights for the real architectures (no files) and a random LoRA merged through the
//! loader's patch step.

use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use sd_pipeline::model::config::UNetConfig;
use sd_pipeline::model::unet::UNet2DConditionModel;
use serde::Serialize;

use crate::error::Result;

/// The architectures benchmarked: SD 1.5, 2.1 and SDXL base (serialized as `sd15`, `sd21`,
/// `sdxl`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Sd15,
    Sd21,
    Sdxl,
}

impl Arch {
    /// The UNet's configuration.
    pub fn unet_config(self) -> UNetConfig {
        match self {
            Arch::Sd15 => UNetConfig::sd15(),
            Arch::Sd21 => UNetConfig::sd21(),
            Arch::Sdxl => UNetConfig::sdxl(),
        }
    }

    /// The image size the model was trained at (512, 768, 1024).
    pub fn native_size(self) -> usize {
        let (h, _) = self.unet_config().sample_size.unwrap_or((64, 64));
        h * 8
    }
}

/// Random weights that are trainable variables (for the training benchmark).
pub struct RandomVars(pub std::sync::Mutex<Vec<candle_core::Var>>);

impl SimpleBackend for RandomVars {
    fn get(
        &self,
        s: Shape,
        _: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let v =
            candle_core::Var::from_tensor(&Tensor::randn(0f32, 0.02, s, dev)?.to_dtype(dtype)?)?;
        let t = v.as_tensor().clone();
        self.0.lock().expect("not poisoned").push(v);
        Ok(t)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights have no unshaped tensor {name}")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// The UNet weights a LoRA for SD usually patches (kohya's and PEFT's default targets).
const LORA_TARGETS: [&str; 8] = [
    "to_q.weight",
    "to_k.weight",
    "to_v.weight",
    "to_out.0.weight",
    "ff.net.0.proj.weight",
    "ff.net.2.weight",
    "proj_in.weight",
    "proj_out.weight",
];

/// A LoRA of random factors (N(0, 0.02), alpha = rank) on [`LORA_TARGETS`]: each delta is
/// computed by `sd_lora`'s module code, as for a LoRA read from a file.
struct RandomLora {
    rank: usize,
    patched: std::sync::atomic::AtomicUsize,
}

impl sd_plugins_api::WeightPatch for RandomLora {
    fn name(&self) -> &str {
        "random-lora"
    }
    fn delta(
        &self,
        part: sd_plugins_api::ModelPart,
        name: &str,
        base: &Tensor,
    ) -> Result<Option<Tensor>, sd_plugins_api::HookError> {
        if part != sd_plugins_api::ModelPart::Unet
            || !LORA_TARGETS.iter().any(|t| name.ends_with(t))
        {
            return Ok(None);
        }
        let out = base.dim(0)?;
        let inp = base.elem_count() / out;
        let (dev, dt) = (base.device(), base.dtype());
        let module = sd_lora::LoraModule {
            factors: sd_lora::Factors::LoRA {
                up: Tensor::randn(0f32, 0.02, (out, self.rank), dev)?.to_dtype(dt)?,
                down: Tensor::randn(0f32, 0.02, (self.rank, inp), dev)?.to_dtype(dt)?,
            },
            alpha: Some(self.rank as f64),
        };
        self.patched
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Some(module.delta(base.dims())?))
    }
}

/// [`RandomWeights`] with weight patches added through the loader's own patch step; `nanos`
/// sums the time spent patching (the merge, without drawing the random base weights).
struct PatchedRandom {
    patches: Vec<std::sync::Arc<dyn sd_plugins_api::WeightPatch>>,
    nanos: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl SimpleBackend for PatchedRandom {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = RandomWeights.get(s, name, h, dtype, dev)?;
        let start = Instant::now();
        let t = sd_pipeline::loading::backend::apply_patches(
            &self.patches,
            sd_plugins_api::ModelPart::Unet,
            name,
            t,
        )?;
        self.nanos.fetch_add(
            start.elapsed().as_nanos() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(t)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        RandomWeights.get_unchecked(name, dtype, dev)
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Random weights of any requested shape (N(0, 0.02)): real architecture, no files.
pub struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        _: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        Tensor::randn(0f32, 0.02, s, dev)?.to_dtype(dtype)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights have no unshaped tensor {name}")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// A UNet with a random LoRA of `rank` merged into its weights while loading.
pub struct MergedUnet {
    pub unet: UNet2DConditionModel,
    /// seconds to build it, random base weights included
    pub build_s: f64,
    /// seconds of those spent in the loader's patch step
    pub merge_s: f64,
    pub patched: usize,
}

pub fn merged_unet(
    cfg: &UNetConfig,
    rank: usize,
    dtype: DType,
    device: &Device,
) -> Result<MergedUnet> {
    let patch = std::sync::Arc::new(RandomLora {
        rank,
        patched: Default::default(),
    });
    let t = Instant::now();
    let nanos = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let backend = PatchedRandom {
        patches: vec![patch.clone()],
        nanos: nanos.clone(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    let unet = UNet2DConditionModel::new(cfg, vb)?;
    Ok(MergedUnet {
        unet,
        build_s: t.elapsed().as_secs_f64(),
        merge_s: nanos.load(std::sync::atomic::Ordering::Relaxed) as f64 * 1e-9,
        patched: patch.patched.load(std::sync::atomic::Ordering::Relaxed),
    })
}
