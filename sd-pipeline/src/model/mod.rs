//! Model code on candle with diffusers parameter names, so diffusers-layout safetensors load
//! directly. Everything here is differentiable (no fused op without a backward pass is used
//! on a tracked tensor) and the UNet takes per-sample timesteps. The CPU kernels the layers
//! call are in [`crate::cpu`].

pub mod blocks;
pub mod checkpoint;
pub mod clip;
pub mod clip_vision;
pub mod config;
pub mod esrgan;
pub mod ldm_names;
pub mod nn;
pub mod shared_batch;
pub mod taesd;
pub mod unet;
pub mod vae;
