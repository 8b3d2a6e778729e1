//! `sdctl model convert`: single file <-> diffusers folder, tensor for tensor.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use sd_plugins_api::ModelPart;
use serde_json::json;

use super::names::{self, Transform};
use super::Checkpoint;
use super::TextLayout;
use crate::error::{read_json, Error, Result};
use crate::loading::files::weight_files;
use crate::model::clip::ClipTextModel;
use crate::model::config::{ClipConfig, UNetConfig, VaeConfig};
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::AutoencoderKL;
use crate::output::{Staged, StagedDir};
use crate::text::tokenizer::{EMBEDDED_MERGES, EMBEDDED_VOCAB};

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::io(path, e)
}

fn save(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    candle_core::safetensors::save(tensors, path).map_err(|source| Error::Weights {
        path: path.to_path_buf(),
        source,
    })
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).unwrap_or_default();
    std::fs::write(path, text).map_err(io(path))
}

fn cast(t: Tensor, half: bool) -> Result<Tensor> {
    if half && t.dtype() != DType::F16 {
        return Ok(t.to_dtype(DType::F16)?);
    }
    Ok(t)
}

/// `out` must not exist yet: conversions never overwrite.
fn check_new(out: &Path) -> Result<()> {
    if out.exists() {
        return Err(Error::config(
            out,
            "already exists: choose a new output name",
        ));
    }
    Ok(())
}

/// Build the three networks from the tensors about to be written (no copy: the builders only
/// look the tensors up): their constructors check every tensor against the config, so a
/// tensor whose shape does not fit the architecture is an error naming it, the expected and
/// the found shape, and no checkpoint is written that would not load back.
fn check_shapes(
    unet: (&UNetConfig, &HashMap<String, Tensor>),
    vae: (&VaeConfig, &HashMap<String, Tensor>),
    clips: &[(&ClipConfig, &HashMap<String, Tensor>)],
    src: &Path,
) -> Result<()> {
    fn vb(m: &HashMap<String, Tensor>) -> candle_nn::VarBuilder<'static> {
        let dtype = m
            .values()
            .map(|t| t.dtype())
            .find(|d| d.is_float())
            .unwrap_or(DType::F32);
        candle_nn::VarBuilder::from_tensors(m.clone(), dtype, &candle_core::Device::Cpu)
    }
    let wrap = |part: &'static str| {
        move |e: candle_core::Error| {
            Error::config(
                src,
                format!("{part}: {e} (the weights do not fit the model's architecture); nothing written"),
            )
        }
    };
    UNet2DConditionModel::new(unet.0, vb(unet.1)).map_err(wrap("UNet"))?;
    AutoencoderKL::new(vae.0, vb(vae.1)).map_err(wrap("VAE"))?;
    for clip in clips {
        ClipTextModel::new(clip.0, vb(clip.1)).map_err(wrap("text encoder"))?;
    }
    Ok(())
}

/// A single-file checkpoint -> a diffusers folder `out`.
pub fn to_diffusers(src: &Path, out: &Path, half: bool) -> Result<()> {
    let ck = Checkpoint::open(src)?;
    let inv = ck.inventory()?;
    check_new(out)?;
    let stage = StagedDir::new(out)?;
    let tmp = stage.path();
    let d = &ck.detected;
    // (text encoder folder, tokenizer folder) of each encoder: the refiner's bigG alone is
    // `text_encoder_2/`, as in its diffusers repository
    let text_dirs: Vec<(&str, &str)> = d
        .text_encoders
        .iter()
        .map(|t| match t.part {
            ModelPart::TextEncoder2 => ("text_encoder_2", "tokenizer_2"),
            _ => ("text_encoder", "tokenizer"),
        })
        .collect();
    let mut dirs = vec!["unet", "vae", "scheduler"];
    dirs.extend(text_dirs.iter().flat_map(|(a, b)| [*a, *b]));
    for d in &dirs {
        std::fs::create_dir_all(tmp.join(d)).map_err(io(tmp))?;
    }
    let mut parts: HashMap<&str, HashMap<String, Tensor>> = HashMap::new();
    for (part, name, source, _) in &inv.params {
        let dir = match part {
            ModelPart::Unet => "unet",
            ModelPart::Vae => "vae",
            ModelPart::TextEncoder => "text_encoder",
            ModelPart::TextEncoder2 => "text_encoder_2",
        };
        let t = cast(ck.tensor(source)?, half)?;
        parts.entry(dir).or_default().insert(name.clone(), t);
    }
    let empty = HashMap::new();
    let part = |d: &str| parts.get(d).unwrap_or(&empty);
    let text_cfgs = (0..d.text_encoders.len())
        .map(|i| ck.text_config(i))
        .collect::<Result<Vec<_>>>()?;
    let clips: Vec<_> = text_cfgs
        .iter()
        .zip(&text_dirs)
        .map(|(c, (dir, _))| (c, part(dir)))
        .collect();
    check_shapes(
        (&ck.unet_config()?, part("unet")),
        (&ck.vae_config()?, part("vae")),
        &clips,
        src,
    )?;
    let mut files = vec![
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
    ];
    files.extend(text_dirs.iter().map(|(dir, _)| (*dir, "model.safetensors")));
    for (dir, file) in files {
        save(
            &parts.remove(dir).unwrap_or_default(),
            &tmp.join(dir).join(file),
        )?;
    }
    write_json(&tmp.join("unet/config.json"), &d.unet)?;
    write_json(&tmp.join("vae/config.json"), &d.vae)?;
    write_json(&tmp.join("scheduler/scheduler_config.json"), &d.scheduler)?;
    let mut index = json!({
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", d.scheduler["_class_name"].as_str().unwrap_or("DDIMScheduler")],
    });
    for (te, (te_dir, tok_dir)) in d.text_encoders.iter().zip(&text_dirs) {
        let projected = te.config.get("projection_dim").is_some();
        let class = if projected {
            "CLIPTextModelWithProjection"
        } else {
            "CLIPTextModel"
        };
        let mut cfg = te.config.clone();
        cfg["architectures"] = json!([class]);
        cfg["model_type"] = json!("clip_text_model");
        write_json(&tmp.join(te_dir).join("config.json"), &cfg)?;
        let tok = tmp.join(tok_dir);
        std::fs::write(tok.join("vocab.json"), EMBEDDED_VOCAB).map_err(io(&tok))?;
        std::fs::write(tok.join("merges.txt"), EMBEDDED_MERGES).map_err(io(&tok))?;
        write_json(
            &tok.join("tokenizer_config.json"),
            &json!({
                "tokenizer_class": "CLIPTokenizer",
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": te.pad_token,
                "model_max_length": 77,
            }),
        )?;
        index[*te_dir] = json!(["transformers", class]);
        index[*tok_dir] = json!(["transformers", "CLIPTokenizer"]);
    }
    match d.family {
        super::Family::Sdxl => {
            index["_class_name"] = json!("StableDiffusionXLPipeline");
            index["force_zeros_for_empty_prompt"] = json!(d.force_zeros_for_empty_prompt);
        }
        super::Family::SdxlRefiner => {
            index["_class_name"] = json!("StableDiffusionXLImg2ImgPipeline");
            index["requires_aesthetics_score"] = json!(d.requires_aesthetics_score);
            index["force_zeros_for_empty_prompt"] = json!(false);
            index["text_encoder"] = json!([null, null]);
            index["tokenizer"] = json!([null, null]);
        }
        _ => {}
    }
    write_json(&tmp.join("model_index.json"), &index)?;
    stage.commit()?;
    Ok(())
}

fn all_tensors(dir: &Path) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for f in weight_files(dir)? {
        let m =
            candle_core::safetensors::load(&f, &candle_core::Device::Cpu).map_err(|source| {
                Error::Weights {
                    path: f.clone(),
                    source,
                }
            })?;
        out.extend(m);
    }
    Ok(out)
}

/// The sidecar yaml a converted file needs to load back as it was (LDM layout plus sdctl's
/// keys for group norms and text-encoder heads).
fn sidecar(
    unet: &UNetConfig,
    vae: &VaeConfig,
    heads: usize,
    openclip: bool,
    sched: &serde_json::Value,
) -> String {
    let h = &unet.num_attention_heads;
    let attn = if h.iter().all(|x| *x == h[0]) {
        format!("num_heads: {}", h[0])
    } else {
        format!("num_head_channels: {}", unet.block_out_channels[0] / h[0])
    };
    let mult: Vec<String> = unet
        .block_out_channels
        .iter()
        .map(|c| (c / unet.block_out_channels[0]).to_string())
        .collect();
    let vmult: Vec<String> = vae
        .block_out_channels
        .iter()
        .map(|c| (c / vae.block_out_channels[0]).to_string())
        .collect();
    let v = sched["prediction_type"].as_str() == Some("v_prediction");
    let target = if openclip {
        "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"
    } else {
        "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
    };
    format!(
        r#"# written by sdctl model convert: the original-LDM-style config of this checkpoint
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
{param}    linear_start: {ls}
    linear_end: {le}
    timesteps: {ts}
    scale_factor: {sf}
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        in_channels: {inc}
        out_channels: {outc}
        model_channels: {mc}
        num_res_blocks: {nrb}
        channel_mult: [{mult}]
        context_dim: {ctx}
        {attn}
        use_linear_in_transformer: {lin}
        norm_num_groups: {ug}
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: {lat}
        ddconfig:
          z_channels: {lat}
          ch: {vch}
          ch_mult: [{vmult}]
          num_res_blocks: {vnrb}
          norm_num_groups: {vg}
    cond_stage_config:
      target: {target}
      params:
        layer: "last"
        heads: {heads}
"#,
        param = if v {
            "    parameterization: \"v\"\n"
        } else {
            ""
        },
        ls = sched["beta_start"].as_f64().unwrap_or(0.00085),
        le = sched["beta_end"].as_f64().unwrap_or(0.012),
        ts = sched["num_train_timesteps"].as_u64().unwrap_or(1000),
        sf = vae.scaling_factor,
        inc = unet.in_channels,
        outc = unet.out_channels,
        mc = unet.block_out_channels[0],
        nrb = unet.layers_per_block[0],
        mult = mult.join(", "),
        ctx = unet.cross_attention_dim,
        lin = unet.use_linear_projection,
        ug = unet.norm_num_groups,
        lat = vae.latent_channels,
        vch = vae.block_out_channels[0],
        vmult = vmult.join(", "),
        vnrb = vae.layers_per_block,
        vg = vae.norm_num_groups,
    )
}

/// A diffusers folder -> a single LDM-layout `.safetensors` file `out`, with its sidecar yaml
/// (`out` with the `.yaml` extension).
pub fn to_single_file(folder: &Path, out: &Path, half: bool) -> Result<()> {
    let unet_cfg = UNetConfig::from_file(&folder.join("unet/config.json"))?;
    let vae_cfg = VaeConfig::from_file(&folder.join("vae/config.json"))?;
    let sched: serde_json::Value = read_json(&folder.join("scheduler/scheduler_config.json"))?;
    let xl = unet_cfg.text_time.is_some();
    // each text encoder: its folder and where its weights go in the file
    let encoders: Vec<(&str, TextLayout)> = if !xl {
        let te: serde_json::Value = read_json(&folder.join("text_encoder/config.json"))?;
        let layout = if te["hidden_act"].as_str() == Some("gelu") {
            TextLayout::OpenClip {
                prefix: names::OPENCLIP,
                layers: 0,
            }
        } else {
            TextLayout::Clip {
                prefix: names::CLIP,
                text_model: true,
            }
        };
        vec![("text_encoder", layout)]
    } else {
        let bigg = |prefix| TextLayout::OpenClip { prefix, layers: 0 };
        if folder.join("text_encoder").is_dir() {
            vec![
                (
                    "text_encoder",
                    TextLayout::Clip {
                        prefix: names::SDXL_CLIP,
                        text_model: true,
                    },
                ),
                ("text_encoder_2", bigg(names::SDXL_BIGG)),
            ]
        } else {
            vec![("text_encoder_2", bigg(names::SDXL_REFINER_BIGG))]
        }
    };
    let levels = vae_cfg.block_out_channels.len();
    let unet_t: HashMap<String, Tensor> = all_tensors(&folder.join("unet"))?.into_iter().collect();
    let vae_t: HashMap<String, Tensor> = all_tensors(&folder.join("vae"))?.into_iter().collect();
    let mut texts = Vec::new();
    for (dir, _) in &encoders {
        let cfg = ClipConfig::from_file(&folder.join(dir).join("config.json"))?;
        let t: HashMap<String, Tensor> = all_tensors(&folder.join(dir))?.into_iter().collect();
        texts.push((cfg, t));
    }
    let clips: Vec<_> = texts.iter().map(|(c, t)| (c, t)).collect();
    check_shapes((&unet_cfg, &unet_t), (&vae_cfg, &vae_t), &clips, folder)?;
    let heads: Vec<usize> = clips.iter().map(|(c, _)| c.num_attention_heads).collect();
    drop(clips);
    let mut state: HashMap<String, Tensor> = HashMap::new();
    let missing = |dir: &str, name: &str| {
        Error::config(
            folder.join(dir),
            format!("{name}: no place for it in the LDM layout"),
        )
    };
    for (name, t) in unet_t {
        let s = names::unet(&name, &unet_cfg).ok_or_else(|| missing("unet", &name))?;
        state.insert(s.name, cast(t, half)?);
    }
    for (name, t) in vae_t {
        let s = names::vae(&name, levels).ok_or_else(|| missing("vae", &name))?;
        let t = match (s.transform, t.dims()) {
            (Transform::Squeeze1x1, [o, i]) => t.reshape((*o, *i, 1, 1))?,
            _ => t,
        };
        state.insert(s.name, cast(t, half)?);
    }
    for ((dir, layout), (_, te_t)) in encoders.iter().zip(texts) {
        let mut fused: HashMap<String, [Option<Tensor>; 3]> = HashMap::new();
        for (name, t) in te_t {
            if name.ends_with("position_ids") {
                continue;
            }
            let s = match *layout {
                TextLayout::OpenClip { prefix, .. } => names::openclip(&name, prefix),
                TextLayout::Clip { prefix, text_model } => names::clip(&name, prefix, text_model),
            }
            .ok_or_else(|| missing(dir, &name))?;
            match s.transform {
                Transform::Third(k) => fused.entry(s.name).or_default()[k] = Some(cast(t, half)?),
                // OpenCLIP keeps the projection for x @ P
                Transform::Transpose => {
                    state.insert(s.name, cast(t.t()?.contiguous()?, half)?);
                }
                _ => {
                    state.insert(s.name, cast(t, half)?);
                }
            }
        }
        for (name, parts) in fused {
            let parts: Vec<Tensor> = parts
                .into_iter()
                .map(|p| p.ok_or_else(|| missing(dir, &format!("{name} (q, k and v)"))))
                .collect::<Result<_>>()?;
            state.insert(name, Tensor::cat(&parts, 0)?);
        }
    }
    let yaml_text = if xl {
        sdxl_sidecar(&unet_cfg, &vae_cfg, &heads)
    } else {
        let openclip = matches!(encoders[0].1, TextLayout::OpenClip { .. });
        sidecar(&unet_cfg, &vae_cfg, heads[0], openclip, &sched)
    };
    check_new(out)?;
    let yaml = out.with_extension("yaml");
    check_new(&yaml)?;
    // the weights and their sidecar appear together or not at all
    let mut staged = Staged::new();
    staged.write(out, |tmp| save(&state, tmp))?;
    staged.write(&yaml, |tmp| {
        std::fs::write(tmp, &yaml_text).map_err(io(&yaml))
    })?;
    staged.commit()
}

/// The sgm-style sidecar (`sd_xl_base.yaml` / `sd_xl_refiner.yaml` keys) an SDXL file needs to
/// load back as it was: head sizes, group norms and text-encoder heads, which the shapes of a
/// non-standard model do not tell.
fn sdxl_sidecar(unet: &UNetConfig, vae: &VaeConfig, text_heads: &[usize]) -> String {
    let depth: Vec<String> = unet
        .transformer_layers_per_block
        .iter()
        .map(|d| d.to_string())
        .collect();
    let head_channels = unet.block_out_channels[0] / unet.num_attention_heads[0].max(1);
    let mult = |c: &[usize]| -> String {
        c.iter()
            .map(|x| (x / c[0]).to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let embedders: String = text_heads
        .iter()
        .map(|h| {
            format!(
                "          - target: sgm.modules.encoders.modules.FrozenCLIPEmbedder\n            params:\n              heads: {h}\n"
            )
        })
        .collect();
    format!(
        r#"# written by sdctl model convert: the sgm-style config of this checkpoint
model:
  target: sgm.models.diffusion.DiffusionEngine
  params:
    scale_factor: {sf}
    network_config:
      target: sgm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        in_channels: {inc}
        out_channels: {outc}
        model_channels: {mc}
        num_res_blocks: {nrb}
        channel_mult: [{mult}]
        num_head_channels: {head_channels}
        transformer_depth: [{depth}]
        context_dim: {ctx}
        use_linear_in_transformer: {lin}
        norm_num_groups: {ug}
    conditioner_config:
      target: sgm.modules.GeneralConditioner
      params:
        emb_models:
{embedders}    first_stage_config:
      target: sgm.models.autoencoder.AutoencoderKLInferenceWrapper
      params:
        embed_dim: {lat}
        ddconfig:
          z_channels: {lat}
          ch: {vch}
          ch_mult: [{vmult}]
          num_res_blocks: {vnrb}
          norm_num_groups: {vg}
"#,
        sf = vae.scaling_factor,
        inc = unet.in_channels,
        outc = unet.out_channels,
        mc = unet.block_out_channels[0],
        nrb = unet.layers_per_block[0],
        mult = mult(&unet.block_out_channels),
        depth = depth.join(", "),
        ctx = unet.cross_attention_dim,
        lin = unet.use_linear_projection,
        ug = unet.norm_num_groups,
        lat = vae.latent_channels,
        vch = vae.block_out_channels[0],
        vmult = mult(&vae.block_out_channels),
        vnrb = vae.layers_per_block,
        vg = vae.norm_num_groups,
    )
}
