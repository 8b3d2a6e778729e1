//! ControlNet-LLLite against a port of kohya's `LLLiteModule` on diffusers 0.42.1's SDXL
//! pipeline (fixtures/make_lllite_fixtures.py): every module on the input and middle blocks'
//! attention projections, with a weight, and with a window. Tolerance 1e-3 max abs on the
//! final latents, as the other pipeline fixtures; each case's run without the LLLite must be
//! > 1e-2 away.

use candle_core::{DType, Device};
use sd_pipeline::StableDiffusion;
use sd_tests::{fixtures, model_dir};

use crate::adapters::run_unit_cases;
use crate::controlnet::units;

#[test]
fn controlnet_lllite_matches_kohyas_modules_on_diffusers() {
    run_unit_cases("lllite_cases.json", 2, &units);
}

/// On an SD1 model the LLLite's layers do not exist; ControlNet-only keys are refused.
#[test]
fn an_lllite_that_does_not_fit_is_refused() {
    let model = fixtures().join("models/lllite/lllite-sdxl.safetensors");
    let image = fixtures().join("inputs/control_a.png");
    let sd1 = StableDiffusion::load(&model_dir("sd1"), &Device::Cpu, DType::F32, &[]).unwrap();
    let s = sd_controlnet::UnitSpec::new(&model, &image);
    let e = match s.build(&sd1, 64, 64, &mut Vec::new(), &sd_preprocessors::registry()) {
        Ok(_) => panic!("accepted on SD1"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("lllite-sdxl") && e.contains("no such transformer layer"),
        "{e}"
    );
    let sdxl = StableDiffusion::load(&model_dir("sdxl"), &Device::Cpu, DType::F32, &[]).unwrap();
    let mut s = sd_controlnet::UnitSpec::new(&model, &image);
    s.mode = sd_controlnet::ControlMode::Prompt;
    let e = match s.build(
        &sdxl,
        64,
        64,
        &mut Vec::new(),
        &sd_preprocessors::registry(),
    ) {
        Ok(_) => panic!("mode accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("ControlNet-LLLite unit takes weight, start and end, not mode"),
        "{e}"
    );
    let e = match sd_controlnet::UnitSpec::new(&model, &image).build(
        &sdxl,
        48,
        48,
        &mut Vec::new(),
        &sd_preprocessors::registry(),
    ) {
        Ok(_) => panic!("48x48 accepted"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("multiples of 32"), "{e}");
}
