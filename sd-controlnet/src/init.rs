//! A new ControlNet from a base model, as diffusers' `ControlNetModel.from_unet` and
//! lllyasviel's `tool_add_control.py` make it: the encoder copied from the base UNet, the hint
//! block's convs randomly initialised except its last conv, which is zero, and every zero
//! convolution zero. Written in diffusers format (config.json + safetensors).
//!
//! A new T2I-Adapter for a base (diffusers' `T2IAdapter(...)` as `train_t2i_adapter_sdxl.py`
//! makes it): one feature level per UNet block, every conv at PyTorch's default init.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sd_pipeline::loading::files::weight_files;
use sd_pipeline::rng::TorchRng;
use serde_json::Value;

use crate::config::ControlNetConfig;
use crate::error::{ControlError, Result};
use crate::t2i_adapter::{AdapterKind, T2IAdapter, T2IAdapterConfig};
use sd_pipeline::model::config::UNetConfig;

/// PyTorch's default conv init: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
fn torch_default(shape: &[usize], fan_in: usize, rng: &mut TorchRng) -> Result<Tensor> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| ((rng.next_u32() as f64 / u32::MAX as f64) * 2.0 - 1.0) as f32 * bound as f32)
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// The weights of a freshly initialised ControlNet for the UNet at `unet_dir`.
pub fn init_weights(
    unet_dir: &Path,
    cfg: &ControlNetConfig,
    seed: u64,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for f in weight_files(unet_dir)? {
        let tensors = candle_core::safetensors::load(&f, &Device::Cpu).map_err(|e| {
            ControlError::Weights {
                path: f.clone(),
                source: e,
            }
        })?;
        for (k, t) in tensors {
            if ["conv_in.", "time_embedding.", "down_blocks.", "mid_block."]
                .iter()
                .any(|p| k.starts_with(p))
            {
                out.insert(k, t.to_dtype(DType::F32)?);
            }
        }
    }
    if !out.contains_key("conv_in.weight") {
        return Err(ControlError::file(
            unet_dir,
            "no conv_in.weight: not a diffusers UNet",
        ));
    }
    let mut rng = TorchRng::new(seed);
    let ch = &cfg.conditioning_embedding_out_channels;
    let mut conv = |name: &str,
                    i: usize,
                    o: usize,
                    k: usize,
                    zero: bool,
                    out: &mut HashMap<String, Tensor>|
     -> Result<()> {
        let (w, b) = if zero {
            (
                Tensor::zeros((o, i, k, k), DType::F32, &Device::Cpu)?,
                Tensor::zeros(o, DType::F32, &Device::Cpu)?,
            )
        } else {
            (
                torch_default(&[o, i, k, k], i * k * k, &mut rng)?,
                torch_default(&[o], i * k * k, &mut rng)?,
            )
        };
        out.insert(format!("{name}.weight"), w);
        out.insert(format!("{name}.bias"), b);
        Ok(())
    };
    let e = "controlnet_cond_embedding";
    conv(
        &format!("{e}.conv_in"),
        cfg.conditioning_channels,
        ch[0],
        3,
        false,
        &mut out,
    )?;
    for i in 0..ch.len() - 1 {
        conv(
            &format!("{e}.blocks.{}", 2 * i),
            ch[i],
            ch[i],
            3,
            false,
            &mut out,
        )?;
        conv(
            &format!("{e}.blocks.{}", 2 * i + 1),
            ch[i],
            ch[i + 1],
            3,
            false,
            &mut out,
        )?;
    }
    let c0 = cfg.unet.block_out_channels[0];
    conv(
        &format!("{e}.conv_out"),
        ch[ch.len() - 1],
        c0,
        3,
        true,
        &mut out,
    )?;
    // one zero 1x1 conv per skip: conv_in's output, then each resnet and downsampler
    let mut skips = vec![c0];
    for (i, &c) in cfg.unet.block_out_channels.iter().enumerate() {
        let n =
            cfg.unet.layers_per_block[i] + usize::from(i + 1 < cfg.unet.block_out_channels.len());
        skips.extend(std::iter::repeat_n(c, n));
    }
    for (i, &c) in skips.iter().enumerate() {
        conv(
            &format!("controlnet_down_blocks.{i}"),
            c,
            c,
            1,
            true,
            &mut out,
        )?;
    }
    let cm = *cfg.unet.block_out_channels.last().expect("blocks");
    conv("controlnet_mid_block", cm, cm, 1, true, &mut out)?;
    Ok(out)
}

/// The diffusers config.json of a ControlNet made from the UNet config at `unet_config`.
pub fn init_config_json(unet_config: &Path, cfg: &ControlNetConfig) -> Result<Value> {
    let text = sd_plugins_api::input_file::read_text(unet_config)
        .map_err(|e| ControlError::file(unet_config, e))?;
    let mut v: Value =
        serde_json::from_str(&text).map_err(|e| ControlError::file(unet_config, e.to_string()))?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| ControlError::file(unet_config, "not a JSON object"))?;
    for k in [
        "up_block_types",
        "out_channels",
        "center_input_sample",
        "sample_size",
        "time_cond_proj_dim",
        "conv_in_kernel",
        "conv_out_kernel",
        "dual_cross_attention",
        "mid_block_only_cross_attention",
        "num_class_embeds",
        "resnet_out_scale_factor",
        "resnet_skip_time_act",
        "timestep_post_act",
        "class_embeddings_concat",
        "cross_attention_norm",
        "reverse_transformer_layers_per_block",
        "attention_type",
        "dropout",
        "time_embedding_act_fn",
        "time_embedding_dim",
        "time_embedding_type",
        "_diffusers_version",
    ] {
        obj.remove(k);
    }
    obj.insert("_class_name".into(), "ControlNetModel".into());
    obj.insert("_diffusers_version".into(), "0.42.1".into());
    obj.insert(
        "conditioning_channels".into(),
        cfg.conditioning_channels.into(),
    );
    obj.insert(
        "conditioning_embedding_out_channels".into(),
        cfg.conditioning_embedding_out_channels.clone().into(),
    );
    obj.insert("controlnet_conditioning_channel_order".into(), "rgb".into());
    obj.insert("global_pool_conditions".into(), false.into());
    Ok(v)
}

/// Write a new ControlNet for the diffusers model at `base` into `out` (a folder): config.json
/// and diffusion_pytorch_model.safetensors. Nothing is left behind on error.
pub fn write_initial_controlnet(base: &Path, out: &Path, seed: u64) -> Result<()> {
    let unet_dir = base.join("unet");
    let unet_cfg_path = unet_dir.join("config.json");
    let unet_cfg = sd_pipeline::model::config::UNetConfig::from_file(&unet_cfg_path)?;
    let _ = unet_cfg;
    let cfg = ControlNetConfig::for_base(base)?;
    let weights = init_weights(&unet_dir, &cfg, seed)?;
    let config = init_config_json(&unet_cfg_path, &cfg)?;
    if out.exists() {
        return Err(ControlError::file(
            out,
            "output already exists; choose a new folder",
        ));
    }
    let stage = sd_pipeline::output::StagedDir::new(out)?;
    let tmp = stage.path();
    std::fs::write(
        tmp.join("config.json"),
        serde_json::to_string_pretty(&config).expect("json"),
    )
    .map_err(|e| ControlError::file(tmp, e.to_string()))?;
    candle_core::safetensors::save(&weights, tmp.join("diffusion_pytorch_model.safetensors"))?;
    stage.commit()?;
    Ok(())
}

/// The architecture of a new T2I-Adapter for the base UNet `unet`: one feature per down block
/// (`full_adapter`: `channels` = the blocks' widths; `light_adapter`: the same less a repeated
/// last width, which its extra last level gives back). SD 1.x/2.x bases only; the first
/// feature at the latents' size, so `downscale_factor` is the VAE's (8 as TencentARC's SD 1.5
/// adapters).
pub fn adapter_config_for(
    unet: &UNetConfig,
    vae_scale_factor: usize,
    kind: AdapterKind,
) -> Result<T2IAdapterConfig> {
    if unet.family() != "SD 1.x/2.x" || kind == AdapterKind::FullXl {
        return Err(ControlError::Invalid(format!(
            "a new T2I-Adapter can be made for SD 1.x/2.x bases (full_adapter or light_adapter); this is {} with {}",
            unet.family(),
            kind.name()
        )));
    }
    let blocks = &unet.block_out_channels;
    let mut channels = blocks.clone();
    if kind == AdapterKind::Light
        && channels.len() > 1
        && blocks[blocks.len() - 1] == blocks[blocks.len() - 2]
    {
        channels.pop();
    }
    Ok(T2IAdapterConfig {
        kind,
        in_channels: 3,
        channels,
        num_res_blocks: 2,
        downscale_factor: vae_scale_factor,
    })
}

/// The weights of a new T2I-Adapter (diffusers names, under `adapter.`): every conv weight and
/// bias drawn uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) as PyTorch's default init, in name order.
pub fn init_adapter_weights(cfg: &T2IAdapterConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    // the parameters' names and shapes, as the model asks for them
    let map = candle_nn::VarMap::new();
    T2IAdapter::new(
        cfg,
        candle_nn::VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu),
    )?;
    let mut shapes: Vec<(String, Vec<usize>)> = map
        .data()
        .lock()
        .map_err(|_| ControlError::Invalid("adapter init: poisoned lock".into()))?
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect();
    shapes.sort();
    let fan_in = |name: &str| -> usize {
        let w = format!("{}.weight", name.rsplit_once('.').map_or(name, |(a, _)| a));
        shapes
            .iter()
            .find(|(k, _)| *k == w)
            .map_or(1, |(_, s)| s[1..].iter().product())
    };
    let mut rng = TorchRng::new(seed);
    let mut out = HashMap::new();
    for (name, shape) in &shapes {
        out.insert(name.clone(), torch_default(shape, fan_in(name), &mut rng)?);
    }
    Ok(out)
}

/// The diffusers config.json of a T2I-Adapter.
pub fn adapter_config_json(cfg: &T2IAdapterConfig) -> Value {
    serde_json::json!({
        "_class_name": "T2IAdapter",
        "_diffusers_version": "0.42.1",
        "adapter_type": cfg.kind.name(),
        "channels": cfg.channels,
        "downscale_factor": cfg.downscale_factor,
        "in_channels": cfg.in_channels,
        "num_res_blocks": cfg.num_res_blocks,
    })
}
