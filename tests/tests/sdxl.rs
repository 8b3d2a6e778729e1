//! SDXL against diffusers 0.42.1 (make_sdxl_fixtures.py): a tiny random SDXL model in the real
//! architecture, 4-step pipelines for txt2img (non-square, micro-conditioning, the zeroed
//! empty negative), img2img, inpainting, an SDXL ControlNet with a step window and a union
//! ControlNet. Tolerance 1e-3 max abs on the final latents, as the SD1/2 pipelines
//! (pipelines.rs). Each fixture also holds what diffusers makes with the feature taken away
//! (`latents_without`), which must be more than 10x the tolerance from the expected latents:
//! a test that passes without the feature is no test of it.

use std::collections::HashMap;

use candle_core::{DType, Device};
use sd_controlnet::ControlNetHook;
use sd_pipeline::StableDiffusion;
use sd_plugins_api::HookSet;
use sd_tests::{assert_close, case_request, expected, fixtures, get, max_abs_diff, model_dir};
use serde_json::Value;

use crate::controlnet::units;

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(fixtures().join("sdxl_cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn run_matching(filter: impl Fn(&Value) -> bool) {
    let mut models: HashMap<String, StableDiffusion> = HashMap::new();
    let selected: Vec<Value> = cases().into_iter().filter(|c| filter(c)).collect();
    assert!(!selected.is_empty(), "no fixture case selected");
    for case in &selected {
        let name = case["name"].as_str().unwrap();
        let model = case["model"].as_str().unwrap().to_string();
        let sd = models.entry(model.clone()).or_insert_with(|| {
            StableDiffusion::load(&model_dir(&model), &Device::Cpu, DType::F32, &[]).unwrap()
        });
        assert!(sd.is_sdxl(), "{model} loads as SDXL");
        let exp = expected(&format!("{name}.safetensors"));
        let req = case_request(case, &exp);
        let mut hooks = HookSet::new();
        if case.get("control").is_some() {
            hooks.push(Box::new(ControlNetHook::new(units(case, sd))));
        }
        let latents = sd
            .denoise(&req, &mut hooks, &mut sd_tests::Replay::new(None))
            .unwrap();
        let want = get(&exp, "latents");
        assert_close(name, &latents, want, 1e-3);
        let far = max_abs_diff(get(&exp, "latents_without"), want);
        assert!(
            far > 1e-2,
            "{name}: the run without the feature is only {far} away"
        );
    }
}

fn has_control(c: &Value) -> bool {
    c.get("control").is_some()
}

fn union(c: &Value) -> bool {
    c["control"]
        .as_array()
        .is_some_and(|u| u.iter().any(|u| u.get("type").is_some()))
}

#[test]
fn sdxl_txt2img_img2img_inpaint_match_diffusers() {
    run_matching(|c| !has_control(c));
}

#[test]
fn sdxl_controlnet_with_a_window_matches_diffusers() {
    run_matching(|c| has_control(c) && !union(c));
}

/// One type (canny; the fixture's `latents_without` is the same image as depth, far away) and
/// two units of one union model (openpose + depth) run as diffusers' one forward with both
/// conditions.
#[test]
fn sdxl_union_controlnet_types_match_diffusers() {
    run_matching(union);
}
