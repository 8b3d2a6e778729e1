//! T2I-Adapters against diffusers 0.42.1 (fixtures/make_adapter_fixtures.py): a diffusers
//! `full_adapter` folder, a 1-channel full adapter and a light adapter in TencentARC's original
//! layout (safetensors and a pickled .pth), two adapters summed (`MultiAdapter`), an SDXL
//! `full_adapter_xl` with a window (`adapter_conditioning_factor`), and a ControlNet with a
//! T2I-Adapter in one generation. Tolerance 1e-3 max abs on the final latents, as the other
//! pipeline fixtures; each case's run without the adapter must be > 1e-2 away.

use std::collections::HashMap;

use candle_core::{DType, Device};
use sd_controlnet::ControlNetHook;
use sd_pipeline::StableDiffusion;
use sd_plugins_api::HookSet;
use sd_tests::{assert_close, case_request, expected, fixtures, get, max_abs_diff, model_dir};
use serde_json::Value;

use crate::controlnet::units;

/// Run every case of a unit fixture file (`FILE_cases.json`: settings, `control` units) with
/// the units `units_of` builds, against the expected latents within 1e-3; each case's run
/// without the feature (`latents_without`) must be > 1e-2 away. `count` guards against a
/// fixture file that lost cases.
pub(crate) fn run_unit_cases(
    file: &str,
    count: usize,
    units_of: &dyn Fn(&Value, &StableDiffusion) -> Vec<sd_controlnet::Unit>,
) {
    let text = std::fs::read_to_string(fixtures().join(file)).unwrap();
    let all: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(all.len(), count, "{file}");
    let mut models: HashMap<String, StableDiffusion> = HashMap::new();
    for case in &all {
        let name = case["name"].as_str().unwrap();
        let model = case["model"].as_str().unwrap().to_string();
        let sd = models.entry(model.clone()).or_insert_with(|| {
            StableDiffusion::load(&model_dir(&model), &Device::Cpu, DType::F32, &[]).unwrap()
        });
        let exp = expected(&format!("{name}.safetensors"));
        let req = case_request(case, &exp);
        let mut hooks = HookSet::new();
        hooks.push(Box::new(ControlNetHook::new(units_of(case, sd))));
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

#[test]
fn t2i_adapters_match_diffusers() {
    run_unit_cases("adapter_cases.json", 5, &units);
}

fn build_error(
    base: &StableDiffusion,
    model: &str,
    edit: impl Fn(&mut sd_controlnet::UnitSpec),
) -> String {
    let mut s = sd_controlnet::UnitSpec::new(
        fixtures().join(model),
        fixtures().join("inputs/control_a.png"),
    );
    edit(&mut s);
    match s.build(base, 64, 64, &mut Vec::new(), &sd_preprocessors::registry()) {
        Ok(_) => panic!("{s:?} was accepted on a {} model", base.family()),
        Err(e) => e.to_string(),
    }
}

/// An adapter of the other family, or with keys only ControlNets take: refused before any
/// step, naming the file and the problem.
#[test]
fn adapters_that_do_not_fit_are_refused() {
    let load =
        |m: &str| StableDiffusion::load(&model_dir(m), &Device::Cpu, DType::F32, &[]).unwrap();
    let (sdxl, sd1) = (load("sdxl"), load("sd1"));
    let e = build_error(&sdxl, "models/t2i-adapter-sd1", |_| {});
    assert!(
        e.contains("SD 1.x/2.x T2I-Adapter")
            && e.contains("SDXL model")
            && e.contains("t2i-adapter-sd1"),
        "{e}"
    );
    let e = build_error(&sd1, "models/t2i-adapter-sdxl", |_| {});
    assert!(
        e.contains("SDXL T2I-Adapter") && e.contains("SD 1.x/2.x model"),
        "{e}"
    );
    let e = build_error(&sd1, "models/t2i-adapter-sd1-light.pth", |s| {
        s.mode = sd_controlnet::ControlMode::Control;
        s.layer_weights = Some(vec![1.0; 4]);
    });
    assert!(
        e.contains("takes weight, start and end") && e.contains("mode, layer_weights"),
        "{e}"
    );
}

/// The kinds read from the keys: the diffusers folder, the original-layout files, and a
/// ControlNet, which is not an adapter.
#[test]
fn unit_kinds_are_read_from_the_keys() {
    use sd_controlnet::t2i_adapter::{inspect, AdapterKind};
    use sd_controlnet::unit_model::{unit_kind, UnitKind};
    let f = |p: &str| fixtures().join(p);
    let c = inspect(&f("models/t2i-adapter-sd1")).unwrap().unwrap();
    assert_eq!(
        (c.kind, c.in_channels, c.channels.clone()),
        (AdapterKind::Full, 3, vec![16, 32, 32])
    );
    let c = inspect(&f("models/t2i-adapter-sd1-sketch.safetensors"))
        .unwrap()
        .unwrap();
    assert_eq!(
        (c.kind, c.in_channels, c.num_res_blocks),
        (AdapterKind::Full, 1, 2)
    );
    let c = inspect(&f("models/t2i-adapter-sd1-light.pth"))
        .unwrap()
        .unwrap();
    assert_eq!(
        (c.kind, c.channels.clone()),
        (AdapterKind::Light, vec![16, 32])
    );
    let c = inspect(&f("models/t2i-adapter-sdxl")).unwrap().unwrap();
    assert_eq!((c.kind, c.downscale_factor), (AdapterKind::FullXl, 16));
    assert_eq!(
        unit_kind(&f("models/t2i-adapter-sd1-light.pth")).unwrap(),
        UnitKind::T2IAdapter
    );
    assert_eq!(
        unit_kind(&f("models/controlnet-sd1")).unwrap(),
        UnitKind::ControlNet
    );
    assert!(inspect(&f("models/controlnet-sd1")).unwrap().is_none());
}
