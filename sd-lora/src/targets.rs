//! Which weight of the base model each LoRA module key names, for every naming scheme.

use std::collections::HashMap;
use std::path::Path;

use sd_pipeline::loader::{tensor_shapes, weight_files};
use sd_pipeline::models::config::UNetConfig;
use sd_pipeline::models::ldm_names::unet_ldm_name;
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
    /// Read the weight names of a diffusers model folder's UNet and text encoder.
    pub fn from_model(root: &Path) -> Result<Self> {
        let mut t = Targets::default();
        let unet_cfg = UNetConfig::from_file(&root.join("unet/config.json"))?;
        for f in weight_files(&root.join("unet"))? {
            for (name, shape) in tensor_shapes(&f)? {
                let Some(module) = name.strip_suffix(".weight") else {
                    continue;
                };
                let target = Target {
                    part: ModelPart::Unet,
                    param: name.clone(),
                    shape,
                };
                let mut keys = vec![
                    format!("lora_unet_{}", kohya(module)),
                    format!("unet.{module}"),
                    module.to_string(),
                ];
                if let Some(ldm) = unet_ldm_name(module, &unet_cfg) {
                    keys.push(format!("lora_unet_{}", kohya(&ldm)));
                }
                for k in keys {
                    t.by_key.insert(k, target.clone());
                }
            }
        }
        for f in weight_files(&root.join("text_encoder"))? {
            for (name, shape) in tensor_shapes(&f)? {
                let Some(module) = name.strip_suffix(".weight") else {
                    continue;
                };
                let short = module.strip_prefix("text_model.").unwrap_or(module);
                let full = format!("text_model.{short}");
                let target = Target {
                    part: ModelPart::TextEncoder,
                    param: name.clone(),
                    shape,
                };
                for m in [short, full.as_str()] {
                    for k in [
                        format!("lora_te_{}", kohya(m)),
                        format!("lora_te1_{}", kohya(m)),
                        format!("text_encoder.{m}"),
                    ] {
                        t.by_key.insert(k, target.clone());
                    }
                }
            }
        }
        Ok(t)
    }

    pub fn get(&self, key: &str) -> Option<&Target> {
        self.by_key.get(key)
    }
}
