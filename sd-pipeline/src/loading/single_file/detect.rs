//! What a single file holds, read from its keys and shapes (and a sidecar `NAME.yaml`, the
//! original LDM config A1111 keeps next to a checkpoint, which overrides detection): the
//! family, inpainting, prediction type, and diffusers-style configs for every component.

use sd_plugins_api::ModelPart;
use sd_weights::Shapes;
use serde_json::{json, Value};

use super::names::{CLIP, OPENCLIP, SDXL_BIGG, SDXL_CLIP, SDXL_REFINER_BIGG, UNET, VAE};

/// What kind of file this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A full SD checkpoint (UNet, VAE, text encoder).
    Checkpoint,
    ControlNet,
    Lora,
    /// A VAE on its own (A1111's `vae-ft-mse-*.safetensors`).
    Vae,
    Unknown,
}

pub fn kind(shapes: &Shapes) -> Kind {
    let any = |f: &dyn Fn(&str) -> bool| shapes.keys().any(|k| f(k));
    if any(&|k| k.starts_with(UNET)) {
        // full ControlLDM files hold a UNet too; their control part decides
        if any(&|k| k.starts_with("control_model.")) {
            return Kind::ControlNet;
        }
        return Kind::Checkpoint;
    }
    if any(&|k| {
        k.starts_with("control_model.")
            || k.starts_with("zero_convs.")
            || k.starts_with("input_hint_block.")
    }) || any(&|k| k.starts_with("controlnet_cond_embedding."))
    {
        return Kind::ControlNet;
    }
    if any(&|k| {
        k.contains("lora_up")
            || k.contains("lora_down")
            || k.contains("lora_A")
            || k.contains(".hada_w1")
            || k.contains(".lokr_w1")
    }) {
        return Kind::Lora;
    }
    if any(&|k| {
        k.starts_with("encoder.down.")
            || k.starts_with("decoder.up.")
            || k.starts_with("encoder.down_blocks.")
    }) {
        return Kind::Vae;
    }
    Kind::Unknown
}

/// The model family, by its text encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// OpenAI CLIP under `cond_stage_model.transformer.` (SD 1.x).
    Sd1,
    /// OpenCLIP under `cond_stage_model.model.` (SD 2.x).
    Sd2,
    /// sgm's conditioner: CLIP-L under `conditioner.embedders.0.transformer.`, OpenCLIP bigG
    /// under `conditioner.embedders.1.model.` (SDXL base and its fine-tunes).
    Sdxl,
    /// bigG alone under `conditioner.embedders.0.model.` (the SDXL refiner).
    SdxlRefiner,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd1 => "SD 1.x",
            Family::Sd2 => "SD 2.x",
            Family::Sdxl => "SDXL",
            Family::SdxlRefiner => "SDXL refiner",
        }
    }
}

/// Where a text encoder's weights are in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextLayout {
    /// transformers' CLIP names under `prefix`, with or without the `text_model.` level.
    Clip {
        prefix: &'static str,
        text_model: bool,
    },
    /// OpenCLIP names under `prefix` (fused `in_proj`); resblocks from `layers` on are unused.
    OpenClip { prefix: &'static str, layers: usize },
}

/// One text encoder of a checkpoint: the model part it loads as, where it is, its
/// transformers config and its tokenizer's pad token.
#[derive(Debug, Clone)]
pub struct TextEncoderFile {
    pub part: sd_plugins_api::ModelPart,
    pub layout: TextLayout,
    pub config: Value,
    pub pad_token: &'static str,
}

impl TextEncoderFile {
    /// The key prefix of its weights in the file.
    pub fn prefix(&self) -> &'static str {
        match self.layout {
            TextLayout::Clip { prefix, .. } | TextLayout::OpenClip { prefix, .. } => prefix,
        }
    }
}

/// The sidecar yaml's settings that matter here (all optional).
#[derive(Debug, Clone, Default)]
pub struct Sidecar {
    pub parameterization_v: Option<bool>,
    pub scale_factor: Option<f64>,
    pub linear_start: Option<f64>,
    pub linear_end: Option<f64>,
    pub timesteps: Option<usize>,
    pub unet_num_heads: Option<i64>,
    pub unet_head_channels: Option<i64>,
    pub unet_norm_groups: Option<usize>,
    pub vae_norm_groups: Option<usize>,
    pub text_heads: Option<usize>,
    /// `cond_stage_config.target` names OpenCLIP.
    pub openclip: Option<bool>,
    /// OpenCLIP `layer`: "penultimate" (SD2) or "last".
    pub penultimate: Option<bool>,
    /// sgm's `conditioner_config` text embedders' `heads` (an sdctl extension for tiny
    /// models), in order.
    pub embedder_heads: Vec<Option<usize>>,
}

/// Read a sidecar yaml; errors name the file.
pub fn read_sidecar(path: &std::path::Path) -> Result<Sidecar, String> {
    // a regular file, bounded in size and nesting (libyaml is quadratic in flow nesting)
    let text = sd_plugins_api::config_text::read_config(path)
        .map_err(|m| sd_plugins_api::config_text::without_path(path, &m).to_string())?;
    let y: serde_yaml::Value = serde_yaml::from_str(&text)
        .map_err(|e| sd_plugins_api::config_text::short_message(&e.to_string(), 8))?;
    let p = &y["model"]["params"];
    if p.is_null() {
        return Err("no model.params: not an LDM config".into());
    }
    let f = |v: &serde_yaml::Value| v.as_f64();
    let u = |v: &serde_yaml::Value| v.as_u64().map(|x| x as usize);
    // LDM's unet_config, or sgm's network_config (SDXL)
    let unet = if p["unet_config"].is_null() {
        &p["network_config"]["params"]
    } else {
        &p["unet_config"]["params"]
    };
    let embedders = p["conditioner_config"]["params"]["emb_models"]
        .as_sequence()
        .map(|s| {
            s.iter()
                .filter(|m| m["target"].as_str().is_some_and(|t| t.contains("CLIP")))
                .map(|m| u(&m["params"]["heads"]))
                .collect()
        })
        .unwrap_or_default();
    let dd = &p["first_stage_config"]["params"]["ddconfig"];
    let cond = &p["cond_stage_config"];
    let target = cond["target"].as_str().unwrap_or("");
    Ok(Sidecar {
        parameterization_v: Some(p["parameterization"].as_str() == Some("v")),
        scale_factor: f(&p["scale_factor"]),
        linear_start: f(&p["linear_start"]),
        linear_end: f(&p["linear_end"]),
        timesteps: u(&p["timesteps"]),
        unet_num_heads: unet["num_heads"].as_i64(),
        unet_head_channels: unet["num_head_channels"].as_i64(),
        unet_norm_groups: u(&unet["norm_num_groups"]),
        vae_norm_groups: u(&dd["norm_num_groups"]),
        text_heads: u(&cond["params"]["heads"]),
        openclip: (!target.is_empty()).then(|| target.contains("OpenCLIP")),
        penultimate: cond["params"]["layer"].as_str().map(|l| l == "penultimate"),
        embedder_heads: embedders,
    })
}

/// Everything needed to build the models from a checkpoint.
#[derive(Debug, Clone)]
pub struct Detected {
    pub family: Family,
    pub inpaint: bool,
    pub v_prediction: bool,
    /// diffusers-style `config.json` contents.
    pub unet: Value,
    pub vae: Value,
    pub scheduler: Value,
    /// The text encoders, the first loading as `text_encoder` (SDXL: CLIP-L, then bigG).
    pub text_encoders: Vec<TextEncoderFile>,
    /// `model_index.json` flags diffusers gives the family's pipeline (SDXL base:
    /// `force_zeros_for_empty_prompt`; the refiner: `requires_aesthetics_score`).
    pub force_zeros_for_empty_prompt: bool,
    pub requires_aesthetics_score: bool,
}

/// The SDXL base scheduler config (stabilityai/stable-diffusion-xl-base-1.0), which diffusers'
/// `from_single_file` takes for SDXL files.
fn sdxl_scheduler() -> Value {
    json!({
        "_class_name": "EulerDiscreteScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": false,
        "interpolation_type": "linear",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "sample_max_value": 1.0,
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "use_karras_sigmas": false,
    })
}

/// An OpenCLIP tower's transformers config; `layers` of its resblocks are used.
fn openclip_config(
    s: &Shapes,
    prefix: &str,
    layers: usize,
    heads: Option<usize>,
) -> Result<Value, String> {
    let tok = shape(s, &format!("{prefix}token_embedding.weight"))?;
    let hidden = tok[1];
    let mut v = json!({
        "vocab_size": tok[0],
        "hidden_size": hidden,
        "intermediate_size": shape(s, &format!("{prefix}transformer.resblocks.0.mlp.c_fc.weight"))?[0],
        "num_hidden_layers": layers,
        "num_attention_heads": heads.unwrap_or(hidden / 64),
        "max_position_embeddings": shape(s, &format!("{prefix}positional_embedding"))?[0],
        "hidden_act": "gelu",
    });
    // stored as x @ P: [hidden, projection]
    if let Some(p) = s.get(&format!("{prefix}text_projection")) {
        v["projection_dim"] = json!(p.get(1).copied().unwrap_or(hidden));
    }
    Ok(v)
}

/// A CLIP (transformers names) tower's config and whether it keeps the `text_model.` level.
fn clip_config(s: &Shapes, prefix: &str, heads: Option<usize>) -> Result<(Value, bool), String> {
    let tm = s
        .keys()
        .any(|k| k.starts_with(&format!("{prefix}text_model.")));
    let p = if tm {
        format!("{prefix}text_model.")
    } else {
        prefix.to_string()
    };
    let tok = shape(s, &format!("{p}embeddings.token_embedding.weight"))?;
    let hidden = tok[1];
    Ok((
        json!({
            "vocab_size": tok[0],
            "hidden_size": hidden,
            "intermediate_size": shape(s, &format!("{p}encoder.layers.0.mlp.fc1.weight"))?[0],
            "num_hidden_layers": count(s, &format!("{p}encoder.layers.")),
            "num_attention_heads": heads.unwrap_or(hidden / 64),
            "max_position_embeddings": shape(s, &format!("{p}embeddings.position_embedding.weight"))?[0],
            "hidden_act": "quick_gelu",
        }),
        tm,
    ))
}

fn shape<'a>(s: &'a Shapes, k: &str) -> Result<&'a Vec<usize>, String> {
    s.get(k).ok_or_else(|| format!("missing tensor {k}"))
}

fn count(s: &Shapes, prefix: &str) -> usize {
    (0..)
        .take_while(|i| s.keys().any(|k| k.starts_with(&format!("{prefix}{i}."))))
        .count()
}

/// Detect a full checkpoint's architecture from its shapes, the sidecar winning.
pub fn detect(s: &Shapes, side: &Sidecar) -> Result<Detected, String> {
    // --- UNet
    let conv_in = shape(s, &format!("{UNET}input_blocks.0.0.weight"))?;
    let (model_channels, in_channels) = (conv_in[0], conv_in[1]);
    let out_channels = shape(s, &format!("{UNET}out.2.weight"))?[0];
    let inputs = count(s, &format!("{UNET}input_blocks."));
    let mut levels: Vec<(usize, bool)> = Vec::new(); // (channels, attention)
    let mut per_level = 0;
    let mut cur = (0, false, 0usize); // channels, attention, resnets
    for n in 1..inputs {
        let b = format!("{UNET}input_blocks.{n}.");
        if s.contains_key(&format!("{b}0.op.weight")) {
            levels.push((cur.0, cur.1));
            per_level = cur.2;
            cur = (0, false, 0);
        } else {
            cur.0 = shape(s, &format!("{b}0.out_layers.3.weight"))?[0];
            cur.1 |= s.contains_key(&format!("{b}1.proj_in.weight"));
            cur.2 += 1;
        }
    }
    levels.push((cur.0, cur.1));
    if per_level == 0 {
        per_level = cur.2;
    }
    let attn_key = s
        .keys()
        .find(|k| k.starts_with(UNET) && k.ends_with("attn2.to_k.weight"))
        .ok_or("no cross-attention in the UNet")?;
    let context_dim = s[attn_key][1];
    let proj_in = s
        .iter()
        .find(|(k, _)| k.starts_with(UNET) && k.ends_with(".1.proj_in.weight"))
        .map(|(_, v)| v.len())
        .unwrap_or(4);
    let linear = proj_in == 2;
    let has = |p: &str| s.keys().any(|k| k.starts_with(p));
    let family = if has(SDXL_BIGG) {
        Family::Sdxl
    } else if has(SDXL_REFINER_BIGG) {
        Family::SdxlRefiner
    } else if side
        .openclip
        .unwrap_or_else(|| s.keys().any(|k| k.starts_with(OPENCLIP)))
    {
        Family::Sd2
    } else {
        Family::Sd1
    };
    let xl = matches!(family, Family::Sdxl | Family::SdxlRefiner);
    let chans: Vec<usize> = levels.iter().map(|l| l.0).collect();
    let heads: Vec<usize> = match (side.unet_num_heads, side.unet_head_channels) {
        (Some(h), _) if h > 0 => vec![h as usize; chans.len()],
        (_, Some(c)) if c > 0 => chans.iter().map(|ch| (ch / c as usize).max(1)).collect(),
        // SD1: 8 heads; SD2 and SDXL: 64 channels per head
        _ if family != Family::Sd1 => chans.iter().map(|c| (c / 64).max(1)).collect(),
        _ => vec![8; chans.len()],
    };
    // transformer blocks per level (SDXL: 1, 2, 10), counted at each level's first block
    let mut depth = Vec::with_capacity(levels.len());
    let mut block = 1;
    for _ in &levels {
        let n = (0..)
            .take_while(|i| {
                s.contains_key(&format!(
                    "{UNET}input_blocks.{block}.1.transformer_blocks.{i}.norm1.weight"
                ))
            })
            .count();
        depth.push(n.max(1));
        block += per_level + 1;
    }
    let down: Vec<&str> = levels
        .iter()
        .map(|l| {
            if l.1 {
                "CrossAttnDownBlock2D"
            } else {
                "DownBlock2D"
            }
        })
        .collect();
    let up: Vec<&str> = levels
        .iter()
        .rev()
        .map(|l| {
            if l.1 {
                "CrossAttnUpBlock2D"
            } else {
                "UpBlock2D"
            }
        })
        .collect();
    let _ = model_channels;
    let mut unet = json!({
        "_class_name": "UNet2DConditionModel",
        "in_channels": in_channels,
        "out_channels": out_channels,
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": chans,
        "layers_per_block": per_level,
        "cross_attention_dim": context_dim,
        "attention_head_dim": heads,
        "use_linear_projection": linear,
        "transformer_layers_per_block": depth,
        "norm_num_groups": side.unet_norm_groups.unwrap_or(32),
        "upcast_attention": family == Family::Sd2,
    });
    // SDXL's added embedding (sgm's `label_emb`): pooled text + sinusoidal time ids
    if let Some(l) = s.get(&format!("{UNET}label_emb.0.0.weight")) {
        let (n_ids, bigg) = if family == Family::SdxlRefiner {
            (5, SDXL_REFINER_BIGG)
        } else {
            (6, SDXL_BIGG)
        };
        let pooled = s
            .get(&format!("{bigg}text_projection"))
            .and_then(|p| p.get(1).copied())
            .ok_or("label_emb without a bigG text_projection to size it")?;
        let input = l[1];
        if input <= pooled || !(input - pooled).is_multiple_of(n_ids) {
            return Err(format!(
                "label_emb takes {input} inputs, which is no {pooled}-wide pooled vector plus {n_ids} time embeddings"
            ));
        }
        unet["addition_embed_type"] = json!("text_time");
        unet["addition_time_embed_dim"] = json!((input - pooled) / n_ids);
        unet["projection_class_embeddings_input_dim"] = json!(input);
    }

    // --- VAE
    let vae_levels = count(s, &format!("{VAE}encoder.down."));
    if vae_levels == 0 {
        return Err("no VAE (first_stage_model.*) in the file".into());
    }
    let vch: Vec<usize> = (0..vae_levels)
        .map(|i| {
            let n = count(s, &format!("{VAE}encoder.down.{i}.block."));
            shape(
                s,
                &format!(
                    "{VAE}encoder.down.{i}.block.{}.conv2.weight",
                    n.saturating_sub(1)
                ),
            )
            .map(|v| v[0])
        })
        .collect::<Result<_, _>>()?;
    let vlayers = count(s, &format!("{VAE}encoder.down.0.block."));
    let latent = shape(s, &format!("{VAE}decoder.conv_in.weight"))?[1];
    let vae = json!({
        "_class_name": "AutoencoderKL",
        "in_channels": shape(s, &format!("{VAE}encoder.conv_in.weight"))?[1],
        "out_channels": shape(s, &format!("{VAE}decoder.conv_out.weight"))?[0],
        "down_block_types": vec!["DownEncoderBlock2D"; vae_levels],
        "up_block_types": vec!["UpDecoderBlock2D"; vae_levels],
        "block_out_channels": vch,
        "layers_per_block": vlayers,
        "latent_channels": latent,
        "norm_num_groups": side.vae_norm_groups.unwrap_or(32),
        "scaling_factor": side.scale_factor.unwrap_or(if xl { 0.13025 } else { 0.18215 }),
        // the size the VAE configs of the reference repos give (the tiled decode's tile)
        "sample_size": if xl { 1024 } else { 512 },
    });

    // --- text encoders
    let heads = |i: usize| {
        side.embedder_heads
            .get(i)
            .copied()
            .flatten()
            .or(side.text_heads)
    };
    let mut text_encoders = Vec::new();
    match family {
        Family::Sd1 => {
            let (config, tm) = clip_config(s, CLIP, heads(0))?;
            text_encoders.push(TextEncoderFile {
                part: ModelPart::TextEncoder,
                layout: TextLayout::Clip {
                    prefix: CLIP,
                    text_model: tm,
                },
                config,
                pad_token: "<|endoftext|>",
            });
        }
        Family::Sd2 => {
            let blocks = count(s, &format!("{OPENCLIP}transformer.resblocks."));
            // LDM's FrozenOpenCLIPEmbedder(layer="penultimate") stops one resblock early, then
            // applies ln_final: diffusers' SD2 text encoder has one layer fewer than the tower
            let layers = if side.penultimate.unwrap_or(true) {
                blocks - 1
            } else {
                blocks
            };
            let mut config = openclip_config(s, OPENCLIP, layers, heads(0))?;
            config.as_object_mut().map(|o| o.remove("projection_dim"));
            text_encoders.push(TextEncoderFile {
                part: ModelPart::TextEncoder,
                layout: TextLayout::OpenClip {
                    prefix: OPENCLIP,
                    layers,
                },
                config,
                pad_token: "!",
            });
        }
        Family::Sdxl | Family::SdxlRefiner => {
            let bigg = if family == Family::Sdxl {
                let (config, tm) = clip_config(s, SDXL_CLIP, heads(0))?;
                text_encoders.push(TextEncoderFile {
                    part: ModelPart::TextEncoder,
                    layout: TextLayout::Clip {
                        prefix: SDXL_CLIP,
                        text_model: tm,
                    },
                    config,
                    pad_token: "<|endoftext|>",
                });
                SDXL_BIGG
            } else {
                SDXL_REFINER_BIGG
            };
            // SDXL uses bigG's hidden states by index: every resblock is loaded
            let layers = count(s, &format!("{bigg}transformer.resblocks."));
            let i = text_encoders.len();
            text_encoders.push(TextEncoderFile {
                part: ModelPart::TextEncoder2,
                layout: TextLayout::OpenClip {
                    prefix: bigg,
                    layers,
                },
                config: openclip_config(s, bigg, layers, heads(i))?,
                pad_token: "!",
            });
        }
    }

    // --- scheduler: LDM's training schedule; v-prediction for SD2 unless the yaml says
    let v = side.parameterization_v.unwrap_or(family == Family::Sd2);
    let ldm_scheduler = json!({
        "_class_name": "DDIMScheduler",
        "beta_start": side.linear_start.unwrap_or(0.00085),
        "beta_end": side.linear_end.unwrap_or(0.012),
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": side.timesteps.unwrap_or(1000),
        "prediction_type": if v { "v_prediction" } else { "epsilon" },
        "steps_offset": 1,
        "set_alpha_to_one": false,
        "clip_sample": false,
    });
    let scheduler = if xl { sdxl_scheduler() } else { ldm_scheduler };
    let inpaint = in_channels == 2 * latent + 1;
    // diffusers' from_single_file: DIFFUSERS_TO_LDM_DEFAULT_IMAGE_SIZE_MAP (v2 768, others
    // 512), except that a yaml declaring epsilon prediction (2.x 512-base) keeps 512
    let image_size = if xl {
        1024
    } else if family == Family::Sd2 && v && !inpaint {
        768
    } else {
        512
    };
    unet["sample_size"] = json!(image_size >> (vae_levels - 1));
    Ok(Detected {
        family,
        inpaint,
        v_prediction: v,
        unet,
        vae,
        scheduler,
        text_encoders,
        force_zeros_for_empty_prompt: family == Family::Sdxl,
        requires_aesthetics_score: family == Family::SdxlRefiner,
    })
}

/// A ControlNet's sidecar yaml (`cldm_v15.yaml` style: `model.params.control_stage_config`),
/// which overrides the architecture otherwise taken from the base model.
#[derive(Debug, Clone, Default)]
pub struct ControlSidecar {
    pub model_channels: Option<usize>,
    pub channel_mult: Option<Vec<usize>>,
    pub num_res_blocks: Option<usize>,
    pub attention_resolutions: Option<Vec<usize>>,
    pub num_heads: Option<i64>,
    pub num_head_channels: Option<i64>,
    pub use_linear: Option<bool>,
    pub context_dim: Option<usize>,
    pub hint_channels: Option<usize>,
    pub norm_groups: Option<usize>,
}

/// Read a ControlNet sidecar; errors say what is wrong with it.
pub fn read_control_sidecar(path: &std::path::Path) -> Result<ControlSidecar, String> {
    // a regular file, bounded in size and nesting (libyaml is quadratic in flow nesting)
    let text = sd_plugins_api::config_text::read_config(path)
        .map_err(|m| sd_plugins_api::config_text::without_path(path, &m).to_string())?;
    let y: serde_yaml::Value = serde_yaml::from_str(&text)
        .map_err(|e| sd_plugins_api::config_text::short_message(&e.to_string(), 8))?;
    let p = &y["model"]["params"]["control_stage_config"]["params"];
    if p.is_null() {
        return Err(
            "no model.params.control_stage_config.params: not a ControlNet (cldm) config".into(),
        );
    }
    let u = |v: &serde_yaml::Value| v.as_u64().map(|x| x as usize);
    let list = |v: &serde_yaml::Value| {
        v.as_sequence().map(|s| {
            s.iter()
                .filter_map(|x| x.as_u64().map(|x| x as usize))
                .collect()
        })
    };
    Ok(ControlSidecar {
        model_channels: u(&p["model_channels"]),
        channel_mult: list(&p["channel_mult"]),
        num_res_blocks: u(&p["num_res_blocks"]),
        attention_resolutions: list(&p["attention_resolutions"]),
        num_heads: p["num_heads"].as_i64(),
        num_head_channels: p["num_head_channels"].as_i64(),
        use_linear: p["use_linear_in_transformer"].as_bool(),
        context_dim: u(&p["context_dim"]),
        hint_channels: u(&p["hint_channels"]),
        norm_groups: u(&p["norm_num_groups"]),
    })
}

impl ControlSidecar {
    /// Apply to the encoder config (a copy of the base UNet's).
    pub fn apply(&self, cfg: &mut crate::model::config::UNetConfig) {
        use crate::model::config::BlockKind;
        if let (Some(mc), Some(mult)) = (self.model_channels, &self.channel_mult) {
            cfg.block_out_channels = mult.iter().map(|m| m * mc).collect();
        }
        let n = cfg.block_out_channels.len();
        if let Some(r) = self.num_res_blocks {
            cfg.layers_per_block = vec![r; n];
        }
        if let Some(res) = &self.attention_resolutions {
            cfg.down_blocks = (0..n)
                .map(|i| {
                    if res.contains(&(1 << i)) {
                        BlockKind::CrossAttn
                    } else {
                        BlockKind::Plain
                    }
                })
                .collect();
            cfg.up_blocks = cfg.down_blocks.iter().rev().copied().collect();
        }
        match (self.num_heads, self.num_head_channels) {
            (Some(h), _) if h > 0 => cfg.num_attention_heads = vec![h as usize; n],
            (_, Some(c)) if c > 0 => {
                cfg.num_attention_heads = cfg
                    .block_out_channels
                    .iter()
                    .map(|ch| ch / c as usize)
                    .collect()
            }
            _ => {}
        }
        if let Some(l) = self.use_linear {
            cfg.use_linear_projection = l;
        }
        if let Some(c) = self.context_dim {
            cfg.cross_attention_dim = c;
        }
        if let Some(g) = self.norm_groups {
            cfg.norm_num_groups = g;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sidecar of 400 KB of `[` took libyaml over a minute; a sidecar that is some other
    /// text is not quoted whole.
    #[test]
    fn hostile_sidecars_are_refused_quickly_and_briefly() {
        let dir = std::env::temp_dir().join(format!("sd-sidecar-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let deep = dir.join("deep.yaml");
        std::fs::write(&deep, format!("model: {}\n", "[".repeat(400_000))).unwrap();
        let t = std::time::Instant::now();
        let e = read_sidecar(&deep).unwrap_err();
        assert!(t.elapsed().as_secs() < 5, "{:?}", t.elapsed());
        assert!(e.contains("nested more than 64 levels"), "{e}");
        let e = read_control_sidecar(&deep).unwrap_err();
        assert!(e.contains("nested more than 64 levels"), "{e}");
        let log = dir.join("log.yaml");
        let text: String = (0..10_000)
            .map(|i| format!("root{i}:x:0:0:root:/root:/bin/bash {}\n", "y".repeat(60)))
            .collect();
        std::fs::write(&log, text).unwrap();
        let e = read_sidecar(&log).unwrap_err();
        assert!(e.len() < 600, "{}", e.len());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
