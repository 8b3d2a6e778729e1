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
            for (part, name, _, shape) in ck.inventory()?.params {
                match part {
                    ModelPart::Unet => t.add_unet(&name, shape, &unet_cfg),
                    // the loader reads a single file's text encoder without `text_model.`
                    ModelPart::TextEncoder => {
                        let bare = name
                            .strip_prefix("text_model.")
                            .unwrap_or(&name)
                            .to_string();
                        t.add_te(&bare, shape)
                    }
                    // SDXL LoRAs are not mapped yet (issue 21)
                    ModelPart::Vae | ModelPart::TextEncoder2 => {}
                }
            }
            return Ok(t);
        }
        let unet_cfg = UNetConfig::from_file(&root.join("unet/config.json"))?;
        for f in weight_files(&root.join("unet"))? {
            for (name, shape) in tensor_shapes(&f)? {
                t.add_unet(&name, shape, &unet_cfg);
            }
        }
        for f in weight_files(&root.join("text_encoder"))? {
            for (name, shape) in tensor_shapes(&f)? {
                t.add_te(&name, shape);
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

    fn add_te(&mut self, name: &str, shape: Vec<usize>) {
        let Some(module) = name.strip_suffix(".weight") else {
            return;
        };
        let short = module.strip_prefix("text_model.").unwrap_or(module);
        let full = format!("text_model.{short}");
        let target = Target {
            part: ModelPart::TextEncoder,
            param: name.to_string(),
            shape,
        };
        for m in [short, full.as_str()] {
            for k in [
                format!("lora_te_{}", kohya(m)),
                format!("lora_te1_{}", kohya(m)),
                format!("text_encoder.{m}"),
            ] {
                self.by_key.insert(k, target.clone());
            }
        }
    }

    pub fn get(&self, key: &str) -> Option<&Target> {
        self.by_key.get(key)
    }
}
