//! Which weight of the base model each LoRA module key names, for every naming scheme.

use std::collections::HashMap;
use std::path::Path;

use sd_pipeline::loading::files::{tensor_shapes, weight_files};
use sd_pipeline::model::config::UNetConfig;
use sd_pipeline::model::ldm_names::unet_ldm_name;
use sd_plugins_api::ModelPart;

use crate::error::Result;

/// A target weight: the model part, the tensor name in its file, its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub part: ModelPart,
    pub param: String,
    pub shape: Vec<usize>,
}

/// LoRA module keys (in every accepted spelling) of a model's weights.
#[derive(Debug, Default)]
pub struct Targets {
    by_key: HashMap<String, Target>,
    /// The model's family ([`family_of`]); `None` when not read yet.
    pub family: Option<&'static str>,
}

/// A model family from its UNet: SDXL-class with the `text_time` embedding, else by the text
/// width the cross-attention takes (768 SD 1.x, 1024 SD 2.x; other widths SD 1.x/2.x).
pub fn family_of(unet: &UNetConfig) -> &'static str {
    match (
        unet.text_time.is_some(),
        family_of_width(unet.cross_attention_dim),
    ) {
        (true, _) => "SDXL",
        (false, "unknown" | "SDXL") => "SD 1.x/2.x",
        (false, f) => f,
    }
}

/// Whether a LoRA of family `a` cannot patch a model of family `b`: SDXL against the others,
/// or SD 1.x against SD 2.x (a family from shapes alone, "SD 1.x/2.x", fits either).
pub fn families_differ(a: &str, b: &str) -> bool {
    let xl = |f: &str| f == "SDXL";
    let specific = |f: &str| f == "SD 1.x" || f == "SD 2.x";
    xl(a) != xl(b) || (specific(a) && specific(b) && a != b)
}

/// The family whose cross-attention takes text of `width` (a LoRA's `attn2.to_k` input).
pub fn family_of_width(width: usize) -> &'static str {
    match width {
        768 => "SD 1.x",
        1024 => "SD 2.x",
        1280 | 2048 => "SDXL",
        _ => "unknown",
    }
}

fn kohya(s: &str) -> String {
    s.replace('.', "_")
}

impl Targets {
    /// Read the weight names of a model's UNet and text encoder: a diffusers folder, or a
    /// single-file checkpoint (its parameters under the names the loader asks for).
    pub fn from_model(root: &Path) -> Result<Self> {
        let mut t = Targets::default();
        if root.is_file() {
            let ck = sd_pipeline::loading::single_file::Checkpoint::open(root)?;
            let unet_cfg = ck.unet_config()?;
            t.family = Some(family_of(&unet_cfg));
            for (part, name, _, shape) in ck.inventory()?.params {
                match part {
                    ModelPart::Unet => t.add_unet(&name, shape, &unet_cfg),
                    // the loader reads a single file's text encoder without `text_model.`
                    ModelPart::TextEncoder => {
                        let bare = name
                            .strip_prefix("text_model.")
                            .unwrap_or(&name)
                            .to_string();
                        t.add_te(&bare, shape, ModelPart::TextEncoder)
                    }
                    ModelPart::TextEncoder2 => {
                        let bare = name
                            .strip_prefix("text_model.")
                            .unwrap_or(&name)
                            .to_string();
                        t.add_te(&bare, shape, ModelPart::TextEncoder2)
                    }
                    ModelPart::Vae => {}
                }
            }
            return Ok(t);
        }
        let unet_cfg = UNetConfig::from_file(&root.join("unet/config.json"))?;
        t.family = Some(family_of(&unet_cfg));
        for f in weight_files(&root.join("unet"))? {
            for (name, shape) in tensor_shapes(&f)? {
                t.add_unet(&name, shape, &unet_cfg);
            }
        }
        for f in weight_files(&root.join("text_encoder"))? {
            for (name, shape) in tensor_shapes(&f)? {
                t.add_te(&name, shape, ModelPart::TextEncoder);
            }
        }
        // SDXL's second text encoder (kohya `lora_te2_`, PEFT `text_encoder_2.`)
        let te2 = root.join("text_encoder_2");
        if te2.is_dir() {
            for f in weight_files(&te2)? {
                for (name, shape) in tensor_shapes(&f)? {
                    t.add_te(&name, shape, ModelPart::TextEncoder2);
                }
            }
        }
        Ok(t)
    }

    fn add_unet(&mut self, name: &str, shape: Vec<usize>, unet_cfg: &UNetConfig) {
        let Some(module) = name.strip_suffix(".weight") else {
            return;
        };
        let target = Target {
            part: ModelPart::Unet,
            param: name.to_string(),
            shape,
        };
        let mut keys = vec![
            format!("lora_unet_{}", kohya(module)),
            format!("unet.{module}"),
            module.to_string(),
        ];
        if let Some(ldm) = unet_ldm_name(module, unet_cfg) {
            keys.push(format!("lora_unet_{}", kohya(&ldm)));
        }
        for k in keys {
            self.by_key.insert(k, target.clone());
        }
    }

    fn add_te(&mut self, name: &str, shape: Vec<usize>, part: ModelPart) {
        let Some(module) = name.strip_suffix(".weight") else {
            return;
        };
        let short = module.strip_prefix("text_model.").unwrap_or(module);
        let full = format!("text_model.{short}");
        let target = Target {
            part,
            param: name.to_string(),
            shape,
        };
        for m in [short, full.as_str()] {
            let keys = match part {
                ModelPart::TextEncoder2 => vec![
                    format!("lora_te2_{}", kohya(m)),
                    format!("text_encoder_2.{m}"),
                ],
                _ => vec![
                    format!("lora_te_{}", kohya(m)),
                    format!("lora_te1_{}", kohya(m)),
                    format!("text_encoder.{m}"),
                ],
            };
            for k in keys {
                self.by_key.insert(k, target.clone());
            }
        }
    }

    pub fn get(&self, key: &str) -> Option<&Target> {
        self.by_key.get(key)
    }
}
