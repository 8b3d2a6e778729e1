//! ControlNet configuration: the UNet encoder's config plus the conditioning embedding.

use std::path::Path;

use sd_pipeline::model::config::{UNetConfig, UNetConfigFile};
use serde_json::Value;

use crate::error::{ControlError, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct ControlNetConfig {
    /// The encoder part (conv_in, time embedding, down and mid blocks).
    pub unet: UNetConfig,
    pub conditioning_channels: usize,
    pub conditioning_embedding_out_channels: Vec<usize>,
    /// `controlnet_conditioning_channel_order == "bgr"`: the hint's channels are flipped.
    pub bgr: bool,
    /// `global_pool_conditions` (shuffle): residuals are averaged over space.
    pub global_pool: bool,
    /// Set for union ControlNets (`ControlNetUnionModel`).
    pub union: Option<crate::union::UnionConfig>,
}

/// A ControlNet config.json has no up path; give the UNet parser a mirrored one.
fn with_up_blocks(mut v: Value) -> Value {
    if let Some(obj) = v.as_object_mut() {
        let downs: Vec<Value> = obj
            .get("down_block_types")
            .and_then(|d| d.as_array().cloned())
            .unwrap_or_else(|| {
                [
                    "CrossAttnDownBlock2D",
                    "CrossAttnDownBlock2D",
                    "CrossAttnDownBlock2D",
                    "DownBlock2D",
                ]
                .iter()
                .map(|s| Value::from(*s))
                .collect()
            });
        let ups: Vec<Value> = downs
            .iter()
            .rev()
            .map(|d| {
                Value::from(if d.as_str() == Some("DownBlock2D") {
                    "UpBlock2D"
                } else {
                    "CrossAttnUpBlock2D"
                })
            })
            .collect();
        obj.insert("down_block_types".into(), Value::from(downs));
        obj.insert("up_block_types".into(), Value::from(ups));
    }
    v
}

impl ControlNetConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            sd_plugins_api::input_file::read_text(path).map_err(|e| ControlError::file(path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| ControlError::file(path, format!("invalid JSON: {e}")))?;
        Self::from_value(v, path)
    }

    pub fn from_value(v: Value, path: &Path) -> Result<Self> {
        let get_usize = |k: &str, d: usize| {
            v.get(k)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .unwrap_or(d)
        };
        let conditioning_channels = get_usize("conditioning_channels", 3);
        let emb: Vec<usize> = match v.get("conditioning_embedding_out_channels") {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64().map(|x| x as usize))
                .collect(),
            _ => vec![16, 32, 96, 256],
        };
        if emb.is_empty() {
            return Err(ControlError::file(
                path,
                "`conditioning_embedding_out_channels` is empty",
            ));
        }
        let bgr = match v
            .get("controlnet_conditioning_channel_order")
            .and_then(|x| x.as_str())
        {
            None | Some("rgb") => false,
            Some("bgr") => true,
            Some(o) => {
                return Err(ControlError::file(
                    path,
                    format!("unknown `controlnet_conditioning_channel_order` {o:?}"),
                ))
            }
        };
        let global_pool = v
            .get("global_pool_conditions")
            .and_then(|x| x.as_bool())
            .unwrap_or(false);
        let is_union = v.get("_class_name").and_then(|x| x.as_str())
            == Some("ControlNetUnionModel")
            || v.get("num_control_type").is_some();
        let union = if is_union {
            let time_embed_dim = v
                .get("addition_time_embed_dim")
                .and_then(|x| x.as_u64())
                .ok_or_else(|| {
                    ControlError::file(path, "a union ControlNet needs `addition_time_embed_dim`")
                })? as usize;
            let u = crate::union::UnionConfig {
                num_control_type: get_usize("num_control_type", 6),
                num_trans_channel: get_usize("num_trans_channel", 320),
                num_trans_head: get_usize("num_trans_head", 8),
                num_trans_layer: get_usize("num_trans_layer", 1),
                num_proj_channel: get_usize("num_proj_channel", 320),
                time_embed_dim,
            };
            if u.num_control_type == 0
                || u.num_trans_head == 0
                || !u.num_trans_channel.is_multiple_of(u.num_trans_head)
            {
                return Err(ControlError::file(
                    path,
                    format!("invalid union ControlNet settings {u:?}"),
                ));
            }
            Some(u)
        } else {
            None
        };
        let raw: UNetConfigFile = serde_json::from_value(with_up_blocks(v))
            .map_err(|e| ControlError::file(path, format!("invalid ControlNet config: {e}")))?;
        let unet = UNetConfig::from_raw(&raw, path)?;
        Ok(Self {
            unet,
            conditioning_channels,
            conditioning_embedding_out_channels: emb,
            bgr,
            global_pool,
            union,
        })
    }

    /// The config `ControlNetModel.from_unet` derives from a base UNet: the same encoder,
    /// 3 hint channels, embedding channels (16, 32, 96, 256).
    pub fn from_unet(unet: &UNetConfig) -> Self {
        Self {
            unet: unet.clone(),
            conditioning_channels: 3,
            conditioning_embedding_out_channels: vec![16, 32, 96, 256],
            bgr: false,
            global_pool: false,
            union: None,
        }
    }

    /// [`Self::from_unet`] for the model folder `base`, with a hint encoder that downsamples
    /// the control image by the base's VAE factor (diffusers' default, three stride-2 convs,
    /// is for the usual factor 8; a factor-4 VAE takes two).
    pub fn for_base(base: &std::path::Path) -> crate::error::Result<Self> {
        let unet = UNetConfig::from_file(&base.join("unet/config.json"))?;
        let mut cfg = Self::from_unet(&unet);
        let vae = base.join("vae/config.json");
        if vae.is_file() {
            let levels = sd_pipeline::model::config::VaeConfig::from_file(&vae)?
                .block_out_channels
                .len();
            let mut ch = vec![16, 32, 96, 256];
            ch.resize(levels.max(1), 256);
            cfg.conditioning_embedding_out_channels = ch;
        }
        Ok(cfg)
    }
}
