//! sd-pipeline's integration tests, one binary: each module is one area (its own file).

mod gradient_store;
mod samplers;
mod unet_training;
