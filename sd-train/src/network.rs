//! What a control trainer trains beside the frozen base: a ControlNet (its residuals added to
//! the UNet's skips) or a T2I-Adapter (its features added inside the UNet's down blocks,
//! diffusers' `down_intrablock_additional_residuals`), and what differs between the two:
//! how a new one is made, where its checkpoints go, and how timesteps are drawn.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sd_controlnet::config::ControlNetConfig;
use sd_controlnet::init::{
    adapter_config_for, adapter_config_json, init_adapter_weights, init_config_json, init_weights,
};
use sd_controlnet::t2i_adapter::{AdapterKind, T2IAdapterConfig};
use sd_controlnet::units::{AdapterUnit, ControlUnit, Unit};
use sd_controlnet::{ControlNetModel, T2IAdapter};
use sd_pipeline::model::unet::UNet2DConditionModel;
use sd_plugins_api::{Residuals, UNetAdditions};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Result, TrainError};

/// Which network a run trains (`sdctl train controlnet` or `sdctl train t2i-adapter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkKind {
    #[default]
    Controlnet,
    T2iAdapter,
}

impl NetworkKind {
    /// The folder a checkpoint and the finished run keep the network in.
    pub fn folder(self) -> &'static str {
        match self {
            Self::Controlnet => "controlnet",
            Self::T2iAdapter => "t2iadapter",
        }
    }

    /// The network's name in messages.
    pub fn label(self) -> &'static str {
        match self {
            Self::Controlnet => "ControlNet",
            Self::T2iAdapter => "T2I-Adapter",
        }
    }

    /// The training timestep for a random draw out of `n` train timesteps: a ControlNet's
    /// uniform (`train_controlnet.py`), an adapter's cubic, weighted to the noisy early steps
    /// where structure is decided (`train_t2i_adapter_sdxl.py`: `(1 - u**3) * n`, truncated,
    /// clamped).
    pub fn timestep(self, draw: u32, n: usize) -> usize {
        match self {
            Self::Controlnet => draw as usize % n,
            Self::T2iAdapter => {
                let u = draw as f64 / 4_294_967_296.0;
                (((1.0 - u * u * u) * n as f64) as usize).min(n - 1)
            }
        }
    }
}

/// A trained network, built over the optimizer's variables (one per run: its size is no matter).
#[allow(clippy::large_enum_variant)]
pub enum Network {
    ControlNet {
        model: ControlNetModel,
        config: ControlNetConfig,
        /// Only the mid-block residual is added (lllyasviel's `only_mid_control`).
        only_mid: bool,
    },
    Adapter(T2IAdapter),
}

/// A new network's weights and its diffusers config.json.
pub struct NewNetwork {
    pub weights: HashMap<String, Tensor>,
    pub config: Value,
}

impl Network {
    /// Build the network of `kind` from `tensors` (the optimizer's variables) and its config.
    pub fn build(
        kind: NetworkKind,
        config_json: &Value,
        config_path: &Path,
        tensors: HashMap<String, Tensor>,
        only_mid: bool,
    ) -> Result<Self> {
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        Ok(match kind {
            NetworkKind::Controlnet => {
                let config = ControlNetConfig::from_value(config_json.clone(), config_path)?;
                Self::ControlNet {
                    model: ControlNetModel::new(&config, vb)?,
                    config,
                    only_mid,
                }
            }
            NetworkKind::T2iAdapter => Self::Adapter(T2IAdapter::new(
                &adapter_config_from_json(config_json, config_path)?,
                vb,
            )?),
        })
    }

    /// A new network for the diffusers base at `base`: a ControlNet copied from its UNet, or a
    /// T2I-Adapter of `adapter_type` (default `full_adapter`) at PyTorch's default init.
    pub fn new_for(
        kind: NetworkKind,
        base: &Path,
        adapter_type: Option<&str>,
        seed: u64,
    ) -> Result<NewNetwork> {
        let unet_cfg_path = base.join("unet/config.json");
        match kind {
            NetworkKind::Controlnet => {
                let c = ControlNetConfig::for_base(base)?;
                Ok(NewNetwork {
                    weights: init_weights(&base.join("unet"), &c, seed)?,
                    config: init_config_json(&unet_cfg_path, &c)?,
                })
            }
            NetworkKind::T2iAdapter => {
                let unet = sd_pipeline::model::config::UNetConfig::from_file(&unet_cfg_path)?;
                let vae = sd_pipeline::model::config::VaeConfig::from_file(
                    &base.join("vae/config.json"),
                )?;
                let kind = parse_adapter_type(adapter_type.unwrap_or("full_adapter"))?;
                let c = adapter_config_for(&unet, vae.downscale_factor(), kind)?;
                Ok(NewNetwork {
                    weights: init_adapter_weights(&c, seed)?,
                    config: adapter_config_json(&c),
                })
            }
        }
    }

    /// The prediction of `unet` for `noisy` at `ts` with this network's control from `cond`
    /// (`[B, 3, H, W]` in [0, 1]).
    pub fn predict(
        &self,
        unet: &UNet2DConditionModel,
        noisy: &Tensor,
        ts: &Tensor,
        ehs: &Tensor,
        cond: &Tensor,
    ) -> Result<Tensor> {
        Ok(match self {
            Self::ControlNet {
                model, only_mid, ..
            } => {
                let mut res = model.forward(noisy, ts, ehs, cond)?;
                if *only_mid {
                    res = Residuals {
                        down: res
                            .down
                            .iter()
                            .map(|d| d.zeros_like())
                            .collect::<candle_core::Result<_>>()?,
                        mid: res.mid,
                    };
                }
                unet.forward(noisy, ts, ehs, Some(&res))?
            }
            Self::Adapter(adapter) => {
                let additions = UNetAdditions {
                    intrablock: adapter.forward(cond)?,
                    ..Default::default()
                };
                unet.forward_full(noisy, ts, ehs, None, None, Some(&additions))?
            }
        })
    }

    /// Check the network against the base: a T2I-Adapter's features must fit the UNet's
    /// blocks (a ControlNet's fit is checked by its first forward).
    pub fn validate_for(
        &self,
        sd: &sd_pipeline::StableDiffusion,
    ) -> std::result::Result<(), String> {
        match self {
            Self::ControlNet { .. } => Ok(()),
            Self::Adapter(a) => a.validate_for(sd.unet.config(), sd.vae_scale_factor()),
        }
    }

    /// A generation unit of this network (a copy of its current weights) for a control image.
    pub fn unit(&self, weights: HashMap<String, Tensor>, image: Tensor) -> Result<Unit> {
        let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
        Ok(match self {
            Self::ControlNet { config, .. } => {
                ControlUnit::new(Arc::new(ControlNetModel::new(config, vb)?), image).into()
            }
            Self::Adapter(a) => {
                AdapterUnit::new(Arc::new(T2IAdapter::new(a.config(), vb)?), image).into()
            }
        })
    }
}

fn parse_adapter_type(name: &str) -> Result<AdapterKind> {
    AdapterKind::from_name(name).ok_or_else(|| {
        TrainError::Invalid(format!(
            "adapter_type {name:?}: expected full_adapter or light_adapter"
        ))
    })
}

/// A T2I-Adapter's architecture from its diffusers config.json.
fn adapter_config_from_json(v: &Value, path: &Path) -> Result<T2IAdapterConfig> {
    let bad = |m: &str| TrainError::file(path, m.to_string());
    let num = |k: &str| {
        v[k].as_u64()
            .map(|n| n as usize)
            .ok_or_else(|| bad(&format!("{k}: expected a whole number")))
    };
    let channels = v["channels"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .map(|c| c.as_u64().map(|n| n as usize))
                .collect::<Option<Vec<_>>>()
        })
        .filter(|c| !c.is_empty())
        .ok_or_else(|| bad("channels: expected a list of whole numbers"))?;
    let kind = v["adapter_type"]
        .as_str()
        .ok_or_else(|| bad("adapter_type: missing"))?;
    let cfg = T2IAdapterConfig {
        kind: parse_adapter_type(kind)?,
        in_channels: num("in_channels")?,
        channels,
        num_res_blocks: num("num_res_blocks")?,
        downscale_factor: num("downscale_factor")?,
    };
    // sizes a trained adapter has; the features are checked against the base before training
    if !(1..=4).contains(&cfg.in_channels)
        || !(1..=8).contains(&cfg.num_res_blocks)
        || ![2, 4, 8, 16].contains(&cfg.downscale_factor)
        || cfg.channels.len() > 8
        || cfg.channels.iter().any(|&c| c == 0 || c > 4096)
    {
        return Err(bad(
            "not a T2I-Adapter's architecture (in_channels 1..4, num_res_blocks 1..8, downscale_factor 2, 4, 8 or 16, up to 8 levels of up to 4096 channels)",
        ));
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::NetworkKind;

    #[test]
    fn timesteps_are_uniform_for_controlnets_and_cubic_for_adapters() {
        let n = 1000;
        assert_eq!(NetworkKind::Controlnet.timestep(1234, n), 234);
        // u = 0 gives the noisiest step, u near 1 the cleanest, u = 0.5 gives (1 - 1/8) n
        let a = NetworkKind::T2iAdapter;
        assert_eq!(a.timestep(0, n), 999);
        assert_eq!(a.timestep(u32::MAX, n), 0);
        assert_eq!(a.timestep(1 << 31, n), 875);
        // three quarters of the draws land in the noisier half (1 - u^3 > 0.5 for u < 0.794)
        let draws = 10_000u32;
        let noisy = (0..draws)
            .filter(|i| a.timestep(i * (u32::MAX / draws), n) >= 500)
            .count();
        assert!((7_900..=7_950).contains(&noisy), "{noisy}");
    }
}
