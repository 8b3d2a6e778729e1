//! The front door: everything `sdctl generate` does, as a library. One [`Job`] (the settings a
//! user gives, with sdctl's defaults) names the model, its LoRAs, control units and plugins;
//! [`generate`](fn@generate) loads the model with them and returns the images, the latents and the
//! infotext that the PNGs carry. The CLI and the server are thin shells over this crate, so the
//! same settings give the same image through every door.
//!
//! A ControlNet-guided generation with a LoRA:
//!
//! ```
//! use sd::{Job, LoraSpec, UnitSpec};
//!
//! # fn main() -> sd::Result<()> {
//! # let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");
//! # let model = format!("{fixtures}/models/sd1");
//! # let controlnet = format!("{fixtures}/models/controlnet-sd1");
//! # let pose = format!("{fixtures}/inputs/control_a.png");
//! # let lora = format!("{fixtures}/loras/lora_b_kohya.safetensors");
//! # let out = std::env::temp_dir().join(format!("sd-doc-{}.png", std::process::id()));
//! let mut job = Job::new("a dancer on a stage, best quality");
//! job.model = Some(model.into()); // a diffusers folder, a single file or a HF cache id
//! job.negative_prompt = Some("lowres, blurry".into());
//! job.seed = Some(42);
//! job.control.push(UnitSpec::new(controlnet, pose).into());
//! job.lora.push(LoraSpec { path: lora.into(), unet_weight: 0.8, te_weight: 0.8 });
//! let made = sd::generate(&job, &sd::registry(), Vec::new())?;
//! made.write(&out, None)?; // the PNG carries A1111's infotext
//! println!("seed {:?}\n{}", made.seed, made.parameters);
//! # assert!(made.parameters.contains("ControlNet 0: \"Module: none"));
//! # std::fs::remove_file(&out).unwrap();
//! # Ok(())
//! # }
//! ```
//!
//! Modules: [`job`] (the settings), [`generate`](mod@generate) (load and run), [`infotext`]
//! (what the PNG remembers, and reading it back), [`png_text`], [`hashes`] (A1111's model
//! hashes), [`hub`] (models by Hugging Face id), [`embedded`] (the built-in tiny-fill model),
//! [`output`] (all-or-nothing writing), [`device`].

pub mod bench;
pub mod config;
pub mod device;
pub mod embedded;
mod error;
pub mod generate;
pub mod hashes;
pub mod hires;
pub mod hub;
pub mod infotext;
pub mod inpaint;
pub mod job;
pub mod model_files;
mod non_finite;
pub mod outpaint;
pub mod output;
pub mod plugins;
pub mod png_text;
pub mod process;
pub mod schema;
pub mod upscaler;

pub use error::{Error, Result};
pub use generate::{generate, load, run, Generation, Loaded, Timings};
pub use job::{Control, Job, Plugin, Rng};
pub use sd_controlnet::UnitSpec;
pub use sd_lora::LoraSpec;

/// The built-in preprocessors (and those of any other linked crate), for control units'
/// `preprocessor`, their results cached in sdctl's cache folder (`preprocessed/`), so a map
/// made once (by `sdctl detect`, a unit, the server's detected maps) is not made again.
pub fn registry() -> sd_plugins_api::Registry {
    let r = sd_preprocessors::registry();
    match hashes::cache_dir() {
        Some(d) => r.with_cache(sd_plugins_api::cache::PreprocessCache::new(
            d.join("preprocessed"),
        )),
        None => r,
    }
}
