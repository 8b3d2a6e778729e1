//! Preprocessors (annotators) producing control images, each registered as a
//! [`sd_plugins_api::Preprocessor`] so `sdctl` finds it by name. Algorithms and constants:
//! `shared/reference/preprocessors.md`.

pub mod canny;
pub mod cvresize;
pub mod draw;
pub mod lines;
pub mod pose;
pub mod resample;
pub mod resize;
mod simple;

pub use sd_plugins_api::{hwc3, Registry};

/// The built-in preprocessors of this crate (plus any other linked crate's).
pub fn registry() -> Registry {
    Registry::builtin()
}
