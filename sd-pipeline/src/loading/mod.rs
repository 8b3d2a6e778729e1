//! Building a [`crate::StableDiffusion`] from weights on disk: a diffusers folder
//! ([`diffusers`]) or a single-file checkpoint ([`single_file`]), with weight patches (LoRA...)
//! applied as tensors are read ([`backend`]). [`files`] finds a component folder's weight files
//! and reads tensor shapes without loading; the files themselves are read by `sd-weights`.

pub mod backend;
pub mod diffusers;
pub mod files;
pub mod single_file;
