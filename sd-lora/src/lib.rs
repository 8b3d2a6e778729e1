//! LoRA files turned into `sd_plugins_api::WeightPatch`es: kohya (`lora_unet_*` / `lora_te_*`
//! with diffusers-style or LDM-style names, LoCon convs), PEFT / diffusers (`lora_A` /
//! `lora_B`), legacy diffusers attention-processor keys, LoHa (`hada_*`) and LoKr (`lokr_*`).
//! Deltas are merged into the weights as the model is built:
//! `delta = up @ down * (alpha / rank) * multiplier` (a missing or zero alpha means rank).

mod error;
mod file;
mod merge;
mod patch;
mod prompt;
mod targets;

pub use error::{LoraError, Result};
pub use file::{Factors, LoraFile, LoraModule};
pub use merge::merge_into;
pub use patch::{load_lora, LoraPatch, LoraReport, LoraSpec};
pub use prompt::{check_weight, extract_lora_tags, resolve_tag, LoraTag, WEIGHT_RANGE};
pub use targets::Targets;
