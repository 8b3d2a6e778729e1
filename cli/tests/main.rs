//! The CLI's integration tests, one binary: each module is one area (its own file), `common`
//! holds what they share. One binary links once, where one per file linked 17 times.

mod adapters;
mod bench;
mod cli;
mod common;
mod config;
mod depth2img;
mod detect;
mod detect_json;
mod device_path;
mod embedded;
mod eval;
mod front_door;
mod hires;
mod hostile;
mod hostile_config;
mod hostile_files;
mod hostile_sizes;
mod hostile_weights;
mod infotext;
mod inpaint_steps;
mod model;
mod outpaint;
mod plugins;
mod previews;
mod sdxl;
mod serve;
mod train;
mod upscale;
mod vae_tiling;
