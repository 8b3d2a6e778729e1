//! Loading ControlNets: the diffusers format (a folder with config.json, or a diffusers-keyed
//! safetensors file with `NAME.json` or `config.json` beside it) and the lllyasviel / A1111
//! format (`control_model.*` keys, or the same names without the prefix), detected from the
//! keys. Full ControlLDM files that also carry `model.diffusion_model.*` load their control part.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use sd_pipeline::loading::diffusers::load_component;
use sd_pipeline::loading::files::{tensor_shapes, weight_files};
use sd_pipeline::model::config::UNetConfig;
use sd_pipeline::model::ldm_names::unet_ldm_name;
use sd_plugins_api::ModelPart;

use crate::config::ControlNetConfig;
use crate::error::{ControlError, Result};
use crate::model::ControlNetModel;

/// Checkpoint layouts we read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    Diffusers,
    /// lllyasviel / A1111 names, under this prefix (`control_model.` or empty).
    Ldm {
        prefix: String,
    },
}

pub fn detect(names: &[(String, Vec<usize>)], path: &Path) -> Result<Format> {
    let has = |k: &str| names.iter().any(|(n, _)| n == k);
    if has("controlnet_cond_embedding.conv_in.weight") {
        Ok(Format::Diffusers)
    } else if has("control_model.input_hint_block.0.weight") {
        Ok(Format::Ldm {
            prefix: "control_model.".into(),
        })
    } else if has("input_hint_block.0.weight") {
        Ok(Format::Ldm {
            prefix: String::new(),
        })
    } else {
        Err(ControlError::file(
            path,
            "not a ControlNet: neither diffusers keys (controlnet_cond_embedding.*) nor lllyasviel/A1111 keys (input_hint_block.*) found",
        ))
    }
}

/// The lllyasviel / LDM name of a diffusers ControlNet parameter: the encoder's names as the
/// UNet's, plus the hint block, zero convolutions and the mid block's output conv.
pub fn ldm_name(name: &str, unet: &UNetConfig, hint_blocks: usize) -> String {
    if let Some(n) = unet_ldm_name(name, unet) {
        return n;
    }
    let parts: Vec<&str> = name.split('.').collect();
    let rest = |k: usize| parts[k..].join(".");
    match parts.as_slice() {
        ["controlnet_cond_embedding", "conv_in", ..] => format!("input_hint_block.0.{}", rest(2)),
        ["controlnet_cond_embedding", "blocks", k, ..] => {
            format!(
                "input_hint_block.{}.{}",
                2 * k.parse::<usize>().unwrap_or(0) + 2,
                rest(3)
            )
        }
        ["controlnet_cond_embedding", "conv_out", ..] => {
            format!("input_hint_block.{}.{}", 2 * hint_blocks + 2, rest(2))
        }
        ["controlnet_down_blocks", n, ..] => format!("zero_convs.{n}.0.{}", rest(2)),
        ["controlnet_mid_block", ..] => format!("middle_block_out.0.{}", rest(1)),
        _ => name.to_string(),
    }
}

/// Where the weights and the config of a diffusers-format ControlNet are.
fn diffusers_files(path: &Path) -> Result<(Vec<PathBuf>, PathBuf)> {
    if path.is_dir() {
        let cfg = path.join("config.json");
        if !cfg.exists() {
            return Err(ControlError::file(
                path,
                "ControlNet folder without config.json",
            ));
        }
        return Ok((weight_files(path)?, cfg));
    }
    let beside = path.with_extension("json");
    let dir_cfg = path.parent().unwrap_or(Path::new(".")).join("config.json");
    let cfg = [beside, dir_cfg]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| ControlError::file(path, "diffusers-format ControlNet file without a config (NAME.json or config.json beside it)"))?;
    Ok((vec![path.to_path_buf()], cfg))
}

/// Load a ControlNet for a base model whose UNet config is `base` (the architecture of
/// lllyasviel/A1111 files, which carry no config, is the base's; shapes are checked).
pub fn load_controlnet(
    path: &Path,
    base: &UNetConfig,
    device: &Device,
    dtype: DType,
) -> Result<ControlNetModel> {
    if !path.exists() {
        return Err(ControlError::file(path, "ControlNet not found"));
    }
    let weights_path = if path.is_dir() {
        diffusers_files(path)?.0[0].clone()
    } else {
        path.to_path_buf()
    };
    let shapes = tensor_shapes(&weights_path)?;
    let format = detect(&shapes, &weights_path)?;
    let (files, cfg) = match &format {
        Format::Diffusers => {
            let (files, cfg_path) = diffusers_files(path)?;
            (files, ControlNetConfig::from_file(&cfg_path)?)
        }
        Format::Ldm { prefix } => {
            let shape = |k: &str| {
                shapes
                    .iter()
                    .find(|(n, _)| n == &format!("{prefix}{k}"))
                    .map(|(_, s)| s.clone())
            };
            let mut hint: Vec<(usize, Vec<usize>)> = shapes
                .iter()
                .filter_map(|(n, s)| {
                    let r = n
                        .strip_prefix(prefix.as_str())?
                        .strip_prefix("input_hint_block.")?;
                    let (idx, leaf) = r.split_once('.')?;
                    (leaf == "weight")
                        .then(|| (idx.parse().ok(), s.clone()))
                        .and_then(|(i, s)| Some((i?, s)))
                })
                .collect();
            hint.sort_by_key(|(i, _)| *i);
            if hint.len() < 2 || hint.iter().any(|(_, s)| s.len() != 4) {
                return Err(ControlError::file(path, "malformed input_hint_block"));
            }
            // conv_in, (3x3, stride-2) pairs, conv_out: embedding channels are the outputs of
            // conv_in and of every stride-2 conv.
            let outs: Vec<usize> = hint.iter().map(|(_, s)| s[0]).collect();
            let mut emb = vec![outs[0]];
            emb.extend(outs[1..outs.len() - 1].iter().skip(1).step_by(2));
            let mut unet = base.clone();
            if let Some(s) = shape("input_blocks.0.0.weight") {
                unet.in_channels = s[1];
            }
            // A1111's sidecar NAME.yaml (cldm config) overrides the base's architecture
            let yaml = weights_path.with_extension("yaml");
            let side = if yaml.is_file() {
                let s = sd_pipeline::loading::single_file::detect::read_control_sidecar(&yaml)
                    .map_err(|m| ControlError::file(&yaml, m))?;
                s.apply(&mut unet);
                Some(s)
            } else {
                None
            };
            let cfg = ControlNetConfig {
                unet,
                conditioning_channels: side.and_then(|s| s.hint_channels).unwrap_or(hint[0].1[1]),
                conditioning_embedding_out_channels: emb,
                bgr: false,
                global_pool: false,
                union: None,
            };
            (vec![weights_path.clone()], cfg)
        }
    };
    let unet_cfg = cfg.unet.clone();
    let hint_blocks = 2 * (cfg.conditioning_embedding_out_channels.len() - 1);
    let model = load_component(&files, ModelPart::Unet, &[], dtype, device, |vb| {
        let vb = match &format {
            Format::Diffusers => vb,
            Format::Ldm { prefix } => {
                let prefix = prefix.clone();
                vb.rename_f(move |n: &str| {
                    format!("{prefix}{}", ldm_name(n, &unet_cfg, hint_blocks))
                })
            }
        };
        ControlNetModel::new(&cfg, vb)
    })?;
    Ok(model)
}
