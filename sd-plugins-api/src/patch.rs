use candle_core::Tensor;

use crate::error::HookError;

/// Which model a weight patch applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelPart {
    Unet,
    TextEncoder,
    /// SDXL's second text encoder (OpenCLIP bigG, `text_encoder_2/`).
    TextEncoder2,
    Vae,
}

/// A set of additive weight deltas (LoRA and friends), applied while a model is loaded.
///
/// Parameter names are the diffusers names inside the model's own file
/// (e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight`).
pub trait WeightPatch: Send + Sync {
    /// A short name used in messages.
    fn name(&self) -> &str;
    /// The delta to add to `name` (whose loaded value is `base`), or `None` when this patch
    /// does not touch that parameter. The delta must have `base`'s shape.
    fn delta(
        &self,
        part: ModelPart,
        name: &str,
        base: &Tensor,
    ) -> Result<Option<Tensor>, HookError>;
}
