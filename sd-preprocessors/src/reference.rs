//! sd-webui-controlnet's reference preprocessors: the image passes through as it is (the
//! unit encodes it to latents and attends to a pass of the UNet over it: reference-only,
//! `sd_controlnet::reference`). `style_fidelity` is the extension's "Style Fidelity" slider
//! (threshold_a, default 0.5). The preprocessors differ only in name (the unit's mode).

use sd_plugins_api::{
    hwc3, register_preprocessor, ImageBuf, ParamSpec, Params, PluginError, Preprocessor,
};

/// The extension's reference modes: attention injection, AdaIN, both.
pub const MODES: [&str; 3] = ["reference_only", "reference_adain", "reference_adain+attn"];

/// A reference preprocessor: the reference image, unchanged.
pub struct Reference(pub &'static str);

impl Preprocessor for Reference {
    fn name(&self) -> &str {
        self.0
    }
    fn description(&self) -> &str {
        match self.0 {
            "reference_only" => "reference-only: the generation's self-attention also attends to the reference's features (no model)",
            "reference_adain" => "reference AdaIN: block outputs take the reference's per-channel mean and variance (no model)",
            _ => "reference AdaIN + attention: both (no model)",
        }
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::float(
            "style_fidelity",
            0.5,
            0.0,
            1.0,
            "how much the unconditional half keeps its own features (the extension's Style Fidelity)",
        )]
    }
    fn uses_resolution(&self) -> bool {
        false
    }
    fn process(&self, input: &ImageBuf, _: &Params) -> Result<ImageBuf, PluginError> {
        Ok(hwc3(input))
    }
}

register_preprocessor!(Reference("reference_only"));
register_preprocessor!(Reference("reference_adain"));
register_preprocessor!(Reference("reference_adain+attn"));
