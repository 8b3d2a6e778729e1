//! sd-webui-controlnet's reference preprocessors: the image passes through as it is (the
//! unit encodes it to latents and attends to a pass of the UNet over it: reference-only,
//! `sd_controlnet::reference`). `style_fidelity` is the extension's "Style Fidelity" slider
//! (threshold_a, default 0.5).

use sd_plugins_api::{
    hwc3, register_preprocessor, ImageBuf, ParamSpec, Params, PluginError, Preprocessor,
};

/// The extension's reference modes (`reference_adain` and `reference_adain+attn` also exist
/// there: refused by the unit for now).
pub const MODES: [&str; 3] = ["reference_only", "reference_adain", "reference_adain+attn"];

/// `reference_only`: the reference image, unchanged.
pub struct ReferenceOnly;

impl Preprocessor for ReferenceOnly {
    fn name(&self) -> &str {
        "reference_only"
    }
    fn description(&self) -> &str {
        "reference-only: the generation attends to the reference image's features (no model; the unit's model is none)"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::float(
            "style_fidelity",
            0.5,
            0.0,
            1.0,
            "how much the unconditional half keeps its own self-attention (the extension's Style Fidelity)",
        )]
    }
    fn uses_resolution(&self) -> bool {
        false
    }
    fn process(&self, input: &ImageBuf, _: &Params) -> Result<ImageBuf, PluginError> {
        Ok(hwc3(input))
    }
}

register_preprocessor!(ReferenceOnly);
