//! Stable Diffusion 1.x/2.x core: models, samplers, weight loading and the denoising loop.
//!
//! The folders, from the bottom up (each uses only those above it in this list, and
//! [`error`]):
//!
//! - [`output`]: all-or-nothing writing (a file through a temporary name, several files
//!   committed together, a folder staged as `.NAME.partial` and renamed into place), which
//!   every crate that writes files uses (it uses only [`error`]).
//! - [`cpu`]: the CPU kernels the layers call in f32 (im2col + gemm convolution, fused and
//!   recomputed attention, GEGLU, group norm, run-time SIMD dispatch), with backward passes.
//! - [`model`]: the networks on candle with diffusers parameter names: UNet, VAE, CLIP text
//!   model, their blocks and layers (`nn`), their configs, the LDM names of UNet parameters,
//!   and the classifier-free-guidance batch sharing.
//! - [`samplers`]: noise schedules and the samplers (DDIM, Euler, Euler a, DPM++ 2M), with the
//!   [`samplers::NoiseSource`] trait they draw noise through.
//! - [`rng`]: seeded noise sources bit-exact with PyTorch (CPU mt19937, CUDA Philox).
//! - [`text`]: the CLIP tokenizer, A1111 prompt emphasis syntax, and prompt encoding.
//! - [`stable_diffusion`]: [`StableDiffusion`], the networks, tokenizer and scheduler config
//!   of one loaded model.
//! - [`loading`]: building a [`StableDiffusion`] from a diffusers folder or a single-file
//!   checkpoint (detection, LDM <-> diffusers names, conversion), weight patches applied as
//!   tensors are read; the files themselves are read by the `sd-weights` crate.
//! - [`generation`]: the denoising loop ([`GenerateRequest`] -> [`GenerateOutput`]) and image
//!   reading / writing.
//! - [`error`]: [`Error`], which names the file, tensor or value at fault (it uses only
//!   [`samplers`], for their error).

pub mod cpu;
pub mod error;
pub mod generation;
pub mod loading;
pub mod model;
pub mod output;
pub mod rng;
pub mod samplers;
pub mod stable_diffusion;
pub mod text;

pub use error::{Error, Result};
pub use generation::pipeline::{GenerateOutput, GenerateRequest, LatentFill, MicroConditioning};
pub use stable_diffusion::{Offload, StableDiffusion, VaeTiling, VAE_TILING_BUDGET};
