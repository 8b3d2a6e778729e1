//! A ControlNet-guided generation with a LoRA, through the `sd` front door: the same path,
//! defaults and infotext as `sdctl generate`.
//!
//! cargo run --release -p sd --example controlnet_lora -- \
//!     MODEL CONTROLNET CONTROL_IMAGE LORA OUT.png

use std::path::{Path, PathBuf};

/// Generate with one ControlNet unit and one LoRA; write OUT.png with its infotext.
pub fn generate(
    model: &Path,
    controlnet: &Path,
    control_image: &Path,
    lora: &Path,
    out: &Path,
) -> sd::Result<sd::Generation> {
    let mut job = sd::Job::new("a dancer on a stage, best quality");
    job.model = Some(model.into());
    job.negative_prompt = Some("lowres, blurry".into());
    job.seed = Some(42);
    let mut unit = sd::UnitSpec::new(controlnet, control_image);
    unit.weight = 0.8;
    job.control.push(unit.into());
    job.lora.push(sd::LoraSpec {
        path: lora.into(),
        unet_weight: 0.7,
        te_weight: 0.7,
    });
    let made = sd::generate(&job, &sd::registry(), Vec::new())?;
    made.write(out, None)?;
    Ok(made)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [model, controlnet, image, lora, out] = args.as_slice() else {
        return Err("usage: controlnet_lora MODEL CONTROLNET CONTROL_IMAGE LORA OUT.png".into());
    };
    let made = generate(model, controlnet, image, lora, out)?;
    println!("{}", made.parameters);
    Ok(())
}
