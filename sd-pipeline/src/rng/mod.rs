//! Seeded noise sources, bit-exact with PyTorch: [`TorchRng`] (the CPU generator, as diffusers
//! and ComfyUI draw) and [`PhiloxRng`] (`randn` on CUDA, A1111's "NV" source). Both implement
//! the samplers' [`NoiseSource`].

mod philox;
mod torch;

pub use crate::samplers::NoiseSource;
pub use philox::PhiloxRng;
pub use torch::TorchRng;
