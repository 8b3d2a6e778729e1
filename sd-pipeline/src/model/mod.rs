//! Model code on candle with diffusers parameter names, so diffusers-layout safetensors load
//! directly. Everything here is differentiable (no fused op without a backward pass is used
//! on a tracked tensor) and the UNet takes per-sample timesteps.

pub mod attention_op;
pub mod blocks;
pub mod clip;
pub mod config;
pub mod conv_op;
pub mod fused_attention;
pub mod geglu;
pub mod group_norm_op;
pub mod ldm_names;
pub mod nn;
pub mod shared_batch;
mod simd;
pub mod unet;
pub mod vae;
