//! ControlNet-LLLite against a port of kohya's `LLLiteModule` on diffusers 0.42.1's SDXL
//! pipeline (fixtures/make_lllite_fixtures.py): every module on the input and middle blocks'
//! attention projections, with a weight, and with a window. Tolerance 1e-3 max abs on the
//! final latents, as the other pipeline fixtures; each case's run without the LLLite must be
//! > 1e-2 away.

use candle_core::{DType, Device};
use sd_controlnet::ControlNetHook;
use sd_pipeline::StableDiffusion;
use sd_plugins_api::HookSet;
use sd_tests::{assert_close, case_request, expected, fixtures, get, max_abs_diff, model_dir};
use serde_json::Value;

use crate::controlnet::units;

#[test]
fn controlnet_lllite_matches_kohyas_modules_on_diffusers() {
    let text = std::fs::read_to_string(fixtures().join("lllite_cases.json")).unwrap();
    let cases: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(cases.len(), 2);
    let sd = StableDiffusion::load(&model_dir("sdxl"), &Device::Cpu, DType::F32, &[]).unwrap();
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let exp = expected(&format!("{name}.safetensors"));
        let req = case_request(case, &exp);
        let mut hooks = HookSet::new();
        hooks.push(Box::new(ControlNetHook::new(units(case, &sd))));
        let latents = sd
            .denoise(&req, &mut hooks, &mut sd_tests::Replay::new(None))
            .unwrap();
        let want = get(&exp, "latents");
        assert_close(name, &latents, want, 1e-3);
        let far = max_abs_diff(get(&exp, "latents_without"), want);
        assert!(
            far > 1e-2,
            "{name}: the run without LLLite is only {far} away"
        );
    }
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
