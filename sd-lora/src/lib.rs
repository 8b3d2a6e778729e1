//! LoRA formats (kohya, PEFT/diffusers, LyCORIS) turned into `sd_plugins_api::WeightPatch`es.
//! Not built yet: see the LoRA issue. The loader in `sd-pipeline` already applies patches.
