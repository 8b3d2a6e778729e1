//! Stable Diffusion 1.x/2.x core: models, samplers, weight loading and the denoising loop.

pub mod error;
pub mod image_io;
pub mod loader;
pub mod models;
pub mod noise;
pub mod philox;
pub mod pipeline;
pub mod prompt;
pub mod samplers;
pub mod single_file;
pub mod text;
pub mod tokenizer;

pub use error::{Error, Result};
pub use loader::StableDiffusion;
pub use pipeline::{GenerateOutput, GenerateRequest};
