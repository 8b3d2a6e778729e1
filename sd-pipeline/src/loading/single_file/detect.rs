//! What a single file holds, read from its keys and shapes (and a sidecar `NAME.yaml`, the
//! original LDM config A1111 keeps next to a checkpoint, which overrides detection): the
//! family, inpainting, prediction type, and diffusers-style configs for every component.

use sd_weights::Shapes;
use serde_json::{json, Value};

use super::names::{CLIP, OPENCLIP, UNET, VAE};

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
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd1 => "SD 1.x",
            Family::Sd2 => "SD 2.x",
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
    let unet = &p["unet_config"]["params"];
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
    pub text_encoder: Value,
    pub scheduler: Value,
    /// SD1 files keep transformers' `text_model.` level (most do).
    pub clip_text_model: bool,
    /// The pad token of the family's tokenizer.
    pub pad_token: &'static str,
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
    let openclip = side
        .openclip
        .unwrap_or_else(|| s.keys().any(|k| k.starts_with(OPENCLIP)));
    let family = if openclip { Family::Sd2 } else { Family::Sd1 };
    let chans: Vec<usize> = levels.iter().map(|l| l.0).collect();
    let heads: Vec<usize> = match (side.unet_num_heads, side.unet_head_channels) {
        (Some(h), _) if h > 0 => vec![h as usize; chans.len()],
        (_, Some(c)) if c > 0 => chans.iter().map(|ch| ch / c as usize).collect(),
        // SD1: 8 heads; SD2: 64 channels per head
        _ if family == Family::Sd2 => chans.iter().map(|c| (c / 64).max(1)).collect(),
        _ => vec![8; chans.len()],
    };
    let depth = (0..)
        .take_while(|i| {
            s.keys()
                .any(|k| k.starts_with(UNET) && k.contains(&format!(".1.transformer_blocks.{i}.")))
        })
        .count()
        .max(1);
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
        "scaling_factor": side.scale_factor.unwrap_or(0.18215),
    });

    // --- text encoder
    let (te, clip_text_model, pad) = if openclip {
        let tok = shape(s, &format!("{OPENCLIP}token_embedding.weight"))?;
        let blocks = count(s, &format!("{OPENCLIP}transformer.resblocks."));
        // LDM's FrozenOpenCLIPEmbedder(layer="penultimate") stops one resblock early, then
        // applies ln_final: diffusers' SD2 text encoder has one layer fewer than the tower
        let layers = if side.penultimate.unwrap_or(true) {
            blocks - 1
        } else {
            blocks
        };
        let hidden = tok[1];
        (
            json!({
                "vocab_size": tok[0],
                "hidden_size": hidden,
                "intermediate_size": shape(s, &format!("{OPENCLIP}transformer.resblocks.0.mlp.c_fc.weight"))?[0],
                "num_hidden_layers": layers,
                "num_attention_heads": side.text_heads.unwrap_or(hidden / 64),
                "max_position_embeddings": shape(s, &format!("{OPENCLIP}positional_embedding"))?[0],
                "hidden_act": "gelu",
            }),
            false,
            "!",
        )
    } else {
        let tm = s
            .keys()
            .any(|k| k.starts_with(&format!("{CLIP}text_model.")));
        let p = if tm {
            format!("{CLIP}text_model.")
        } else {
            CLIP.to_string()
        };
        let tok = shape(s, &format!("{p}embeddings.token_embedding.weight"))?;
        let hidden = tok[1];
        (
            json!({
                "vocab_size": tok[0],
                "hidden_size": hidden,
                "intermediate_size": shape(s, &format!("{p}encoder.layers.0.mlp.fc1.weight"))?[0],
                "num_hidden_layers": count(s, &format!("{p}encoder.layers.")),
                "num_attention_heads": side.text_heads.unwrap_or(hidden / 64),
                "max_position_embeddings": shape(s, &format!("{p}embeddings.position_embedding.weight"))?[0],
                "hidden_act": "quick_gelu",
            }),
            tm,
            "<|endoftext|>",
        )
    };

    // --- scheduler: LDM's training schedule; v-prediction for SD2 unless the yaml says
    let v = side.parameterization_v.unwrap_or(family == Family::Sd2);
    let scheduler = json!({
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
    let inpaint = in_channels == 2 * latent + 1;
    // diffusers' from_single_file: DIFFUSERS_TO_LDM_DEFAULT_IMAGE_SIZE_MAP (v2 768, others
    // 512), except that a yaml declaring epsilon prediction (2.x 512-base) keeps 512
    let image_size = if family == Family::Sd2 && v && !inpaint {
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
        text_encoder: te,
        scheduler,
        clip_text_model,
        pad_token: pad,
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
