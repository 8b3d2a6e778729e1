//! The front door: everything `sdctl generate` does, as a library. One [`Job`] (the settings a
//! user gives, with sdctl's defaults) names the model, its LoRAs, control units and plugins;
//! [`generate`] loads the model with them and returns the images, the latents and the
//! infotext that the PNGs carry. The CLI and the server are thin shells over this crate, so the
//! same settings give the same image through every door.
//!
//! A ControlNet-guided generation with a LoRA:
//!
//! ```no_run
//! use sd::{Control, Job, UnitSpec};
//! use sd_lora::LoraSpec;
//!
//! # fn main() -> sd::Result<()> {
//! let mut job = Job::new("a dancer on a stage, best quality");
//! job.model = Some("models/stable-diffusion-v1-5".into());
//! job.negative_prompt = "lowres, blurry".into();
//! job.seed = Some(42);
//! job.control.push(Control::from(UnitSpec::new(
//!     "models/control_v11p_sd15_openpose",
//!     "inputs/pose.png",
//! )));
//! job.lora.push(LoraSpec::parse("loras/watercolor.safetensors:0.8")?);
//! let out = sd::generate(&job, &sd::registry(), Vec::new())?;
//! out.write("dancer.png".as_ref(), None)?;
//! println!("seed {:?}\n{}", out.seed, out.parameters);
//! # Ok(())
//! # }
//! ```
//!
//! Modules: [`job`] (the settings), [`generate`](mod@generate) (load and run), [`infotext`]
//! (what the PNG remembers, and reading it back), [`png_text`], [`hashes`] (A1111's model
//! hashes), [`hub`] (models by Hugging Face id), [`embedded`] (the built-in tiny-fill model),
//! [`output`] (all-or-nothing writing), [`device`].

pub mod device;
pub mod embedded;
mod error;
pub mod generate;
pub mod hashes;
pub mod hub;
pub mod infotext;
pub mod job;
pub mod output;
pub mod png_text;

pub use error::{Error, Result};
pub use generate::{generate, load, run, Generation, Loaded, Timings};
pub use job::{Control, Job, Plugin, Rng};
pub use sd_controlnet::UnitSpec;
pub use sd_lora::LoraSpec;

/// The built-in preprocessors (and those of any other linked crate), for control units'
/// `preprocessor`.
pub fn registry() -> sd_plugins_api::Registry {
    sd_preprocessors::registry()
}
