//! Stable Diffusion 1.x/2.x core: models, samplers, weight loading and the denoising loop.

pub mod error;
pub mod models;
pub mod noise;
// pub mod samplers;
pub mod tokenizer;

pub use error::{Error, Result};
