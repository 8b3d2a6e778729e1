//! Loading a diffusers-layout model folder (`model_index.json`, `unet/`, `vae/`,
//! `text_encoder/`, `tokenizer/`, `scheduler/`): fp32/fp16/bf16 safetensors, memory-mapped,
//! sharded or not, with weight patches applied as tensors are read.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use sd_plugins_api::{ModelPart, WeightPatch};

use crate::error::{read_json, Error, Result};
use crate::models::clip::ClipTextModel;
use crate::models::config::{ClipConfig, UNetConfig, VaeConfig};
use crate::models::unet::UNet2DConditionModel;
use crate::models::vae::AutoencoderKL;
use crate::samplers::SchedulerConfig;
use crate::tokenizer::ClipTokenizer;

/// The weight files of one component folder, in the order diffusers looks for them.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let stems = ["diffusion_pytorch_model", "model"];
    for stem in stems {
        for variant in ["", ".fp16"] {
            let single = dir.join(format!("{stem}{variant}.safetensors"));
            if single.is_file() {
                return Ok(vec![single]);
            }
            let index = dir.join(format!("{stem}{variant}.safetensors.index.json"));
            if index.is_file() {
                let v: serde_json::Value = read_json(&index)?;
                let map = v
                    .get("weight_map")
                    .and_then(|m| m.as_object())
                    .ok_or_else(|| {
                        Error::config(&index, "no `weight_map` object in the shard index")
                    })?;
                let mut files: Vec<PathBuf> = map
                    .values()
                    .filter_map(|f| f.as_str())
                    .map(|f| dir.join(f))
                    .collect();
                files.sort();
                files.dedup();
                if let Some(missing) = files.iter().find(|f| !f.is_file()) {
                    return Err(Error::config(
                        &index,
                        format!("shard {} is missing", missing.display()),
                    ));
                }
                return Ok(files);
            }
        }
    }
    Err(Error::config(
        dir,
        "no weights found (expected diffusion_pytorch_model[.fp16].safetensors or model[.fp16].safetensors; .bin/.ckpt pickles are not loaded)",
    ))
}

/// Tensor names and shapes of a safetensors file, from its header alone.
pub fn tensor_shapes(path: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    if crate::single_file::pickle::is_pickle(path) {
        return crate::single_file::pickle::shapes(path).map_err(|m| Error::config(path, m));
    }
    use std::io::Read;
    let bad = |m: String| Error::config(path, m);
    let mut f = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return Err(bad("not a safetensors file: header too large".into()));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let v: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("not a safetensors file".into()))?;
    Ok(obj
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, t)| {
            let shape = t["shape"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_u64())
                        .map(|x| x as usize)
                        .collect()
                })
                .unwrap_or_default();
            (k.clone(), shape)
        })
        .collect())
}

/// A safetensors backend that adds the deltas of weight patches to the tensors it reads.
struct Patched {
    inner: candle_core::safetensors::MmapedSafetensors,
    part: ModelPart,
    patches: Vec<Arc<dyn WeightPatch>>,
}

/// Add every patch's delta for `name` to `t`.
pub fn apply_patches(
    patches: &[Arc<dyn WeightPatch>],
    part: ModelPart,
    name: &str,
    mut t: Tensor,
) -> candle_core::Result<Tensor> {
    {
        for p in patches {
            let delta = p
                .delta(part, name, &t)
                .map_err(|e| candle_core::Error::Msg(format!("weight patch {}: {e}", p.name())))?;
            if let Some(d) = delta {
                if d.dims() != t.dims() {
                    candle_core::bail!(
                        "weight patch {} gives {name} a delta of shape {:?}, the weight is {:?}",
                        p.name(),
                        d.dims(),
                        t.dims()
                    );
                }
                let d = d.to_dtype(t.dtype())?.to_device(t.device())?;
                t = (t + d)?;
            }
        }
        Ok(t)
    }
}

impl Patched {
    fn apply(&self, name: &str, t: Tensor) -> candle_core::Result<Tensor> {
        apply_patches(&self.patches, self.part, name, t)
    }
}

/// `t.to_dtype(dtype)`, with f16 / bf16 -> f32 on the CPU converted in parallel chunks with
/// `half`'s vectorised slice conversion: candle converts element by element on one thread,
/// a third of loading an f16 SD1.5 folder as f32 (measured with perf).
pub(crate) fn to_dtype_fast(t: Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    use candle_core::{CpuStorage, Storage};
    use half::slice::HalfFloatSliceExt;
    use rayon::prelude::*;
    if dtype != DType::F32 || !t.device().is_cpu() || !matches!(t.dtype(), DType::F16 | DType::BF16)
    {
        return t.to_dtype(dtype);
    }
    let t = t.contiguous()?;
    const CHUNK: usize = 1 << 16;
    let n = t.elem_count();
    let mut out = vec![0f32; n];
    {
        let (storage, layout) = t.storage_and_layout();
        let start = layout.start_offset();
        match &*storage {
            Storage::Cpu(CpuStorage::F16(v)) => out
                .par_chunks_mut(CHUNK)
                .zip(v[start..start + n].par_chunks(CHUNK))
                .for_each(|(o, i)| i.convert_to_f32_slice(o)),
            Storage::Cpu(CpuStorage::BF16(v)) => out
                .par_chunks_mut(CHUNK)
                .zip(v[start..start + n].par_chunks(CHUNK))
                .for_each(|(o, i)| i.convert_to_f32_slice(o)),
            _ => return t.to_dtype(dtype),
        }
    }
    Tensor::from_vec(out, t.shape(), t.device())
}

impl SimpleBackend for Patched {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = to_dtype_fast(self.inner.load(name, dev)?, dtype)?;
        if t.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: t.shape().clone(),
            }
            .bt());
        }
        self.apply(name, t)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = to_dtype_fast(self.inner.load(name, dev)?, dtype)?;
        self.apply(name, t)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// Build a model from a component folder's weights, naming the file in any error.
pub fn load_component<T>(
    files: &[PathBuf],
    part: ModelPart,
    patches: &[Arc<dyn WeightPatch>],
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<T>,
) -> Result<T> {
    let shown = files[0].clone();
    let wrap = |source| Error::Weights {
        path: shown.clone(),
        source,
    };
    if files.len() == 1 && crate::single_file::pickle::is_pickle(&files[0]) {
        // a .pth / .ckpt: read (safely) into memory, names as stored
        let store =
            crate::single_file::pickle::load(&files[0]).map_err(|m| Error::config(&files[0], m))?;
        let backend = crate::single_file::Mapped::identity(store, part, patches);
        let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
        return build(vb).map_err(wrap);
    }
    // SAFETY: the files are memory-mapped read-only; like every mmap-based loader, we rely
    // on them not being modified while the model is alive.
    let inner =
        unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }.map_err(wrap)?;
    let backend = Patched {
        inner,
        part,
        patches: patches.to_vec(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    build(vb).map_err(wrap)
}

/// A loaded Stable Diffusion model.
pub struct StableDiffusion {
    pub root: PathBuf,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub text_encoder: ClipTextModel,
    pub tokenizer: ClipTokenizer,
    pub scheduler_config: SchedulerConfig,
    pub device: Device,
    pub dtype: DType,
}

impl StableDiffusion {
    /// Load a diffusers-layout folder. `patches` (LoRA...) are added to the weights as read.
    pub fn load(
        root: &Path,
        device: &Device,
        dtype: DType,
        patches: &[Arc<dyn WeightPatch>],
    ) -> Result<Self> {
        Self::load_with_vae(root, device, dtype, patches, None)
    }

    /// [`StableDiffusion::load`] for a diffusers folder or a single-file checkpoint, with the
    /// VAE optionally taken from its own file (`--vae`).
    pub fn load_with_vae(
        root: &Path,
        device: &Device,
        dtype: DType,
        patches: &[Arc<dyn WeightPatch>],
        vae: Option<&Path>,
    ) -> Result<Self> {
        if root.is_file() {
            return crate::single_file::Checkpoint::open(root)?.load(device, dtype, patches, vae);
        }
        if !root.is_dir() {
            return Err(Error::io(
                root,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model folder not found"),
            ));
        }
        let index = root.join("model_index.json");
        if !index.is_file() {
            return Err(Error::config(
                root,
                "not a diffusers model folder: model_index.json not found",
            ));
        }
        let _: serde_json::Value = read_json(&index)?;
        let sub = |name: &str| -> Result<PathBuf> {
            let d = root.join(name);
            if d.is_dir() {
                Ok(d)
            } else {
                Err(Error::config(
                    root,
                    format!("component folder `{name}/` not found"),
                ))
            }
        };
        let unet_dir = sub("unet")?;
        let vae_dir = sub("vae")?;
        let te_dir = sub("text_encoder")?;
        let tok_dir = sub("tokenizer")?;
        let sched_dir = sub("scheduler")?;

        let unet_cfg = UNetConfig::from_file(&unet_dir.join("config.json"))?;
        let vae_cfg = VaeConfig::from_file(&vae_dir.join("config.json"))?;
        let clip_cfg = ClipConfig::from_file(&te_dir.join("config.json"))?;
        if clip_cfg.hidden_size != unet_cfg.cross_attention_dim {
            return Err(Error::config(
                &te_dir,
                format!(
                    "text encoder width {} does not match the UNet's cross_attention_dim {}",
                    clip_cfg.hidden_size, unet_cfg.cross_attention_dim
                ),
            ));
        }
        let l = vae_cfg.latent_channels;
        if unet_cfg.in_channels != l && unet_cfg.in_channels != 2 * l + 1 {
            return Err(Error::config(
                &unet_dir,
                format!(
                    "UNet in_channels {} fits neither plain ({l}) nor inpainting ({}) use of a VAE with {l} latent channels",
                    unet_cfg.in_channels,
                    2 * l + 1
                ),
            ));
        }
        let scheduler_config =
            SchedulerConfig::from_file(&sched_dir.join("scheduler_config.json"))?;
        let tokenizer = ClipTokenizer::from_dir(&tok_dir)?;

        let unet = load_component(
            &weight_files(&unet_dir)?,
            ModelPart::Unet,
            patches,
            dtype,
            device,
            |vb| UNet2DConditionModel::new(&unet_cfg, vb),
        )?;
        let vae = match vae {
            Some(v) => crate::single_file::load_vae(v, &vae_cfg, patches, dtype, device)?,
            None => load_component(
                &weight_files(&vae_dir)?,
                ModelPart::Vae,
                patches,
                dtype,
                device,
                |vb| AutoencoderKL::new(&vae_cfg, vb),
            )?,
        };
        let text_encoder = load_component(
            &weight_files(&te_dir)?,
            ModelPart::TextEncoder,
            patches,
            dtype,
            device,
            |vb| ClipTextModel::new(&clip_cfg, vb),
        )?;
        Ok(Self {
            root: root.to_path_buf(),
            unet,
            vae,
            text_encoder,
            tokenizer,
            scheduler_config,
            device: device.clone(),
            dtype,
        })
    }

    /// True for 9-channel inpainting UNets.
    pub fn is_inpaint_model(&self) -> bool {
        self.unet.config().in_channels == 2 * self.vae.config().latent_channels + 1
    }
}
