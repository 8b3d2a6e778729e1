//! The workspace's parity tests against the reference fixtures, one binary: each module is
//! one area (its own file).

mod adapters;
mod clip;
mod controlnet;
mod depth2img;
mod depth_anything;
mod dwpose;
mod embeddings;
mod hires;
mod ip_adapter;
mod lineart;
mod lllite;
mod lora;
mod midas;
mod mlsd;
mod module_graph;
mod normalbae;
mod openpose;
mod openpose_hand_face;
mod pipelines;
mod preprocessors;
mod reference_only;
mod rng;
mod samplers;
mod sdxl;
mod single_file;
mod softedge;
mod taesd;
mod train;
mod unet_vae;
mod uniformer;
mod upscaler;
mod vae_tiling;
mod zoe;
