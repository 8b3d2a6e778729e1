//! Preprocessors (annotators) producing control images, each registered as a
//! [`sd_plugins_api::Preprocessor`] so `sdctl` finds it by name. Algorithms and constants:
//! `shared/reference/preprocessors.md`.

pub mod canny;
pub mod conv;
pub mod cvresize;
pub mod cvresize_f32;
pub mod depth_anything;
pub mod detect;
pub mod draw;
pub mod dwpose;
pub mod hed;
pub mod inpaint;
pub mod lineart;
pub mod lines;
pub mod map_resize;
pub mod midas;
pub mod mlsd;
pub mod normal;
pub mod normalbae;
pub mod onnx;
pub mod openpose;
pub mod pidinet;
pub mod pose;
pub mod pose_detect;
pub mod reference;
pub mod resample;
pub mod resize;
pub mod segmentation;
mod simple;
pub mod uniformer;
pub mod weights;
pub mod zoe;

pub use sd_plugins_api::{hwc3, Registry};

/// The built-in preprocessors of this crate (plus any other linked crate's).
pub fn registry() -> Registry {
    Registry::builtin()
}
