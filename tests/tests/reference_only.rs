//! Reference units against a port of sd-webui-controlnet's `reference_only` /
//! `reference_adain` / `reference_adain+attn` on diffusers 0.42.1's SD1 pipeline
//! (fixtures/make_reference_only_fixtures.py): attention on every transformer layer (weight 1)
//! and on part (weight 0.6: the layers ranked by width below it) with a window, AdaIN alone
//! (weight 1.5) and with attention; style fidelity 0.25 to 1. The reference noise is the torch CPU generator's stream
//! from the unit's seed, as the port draws it. Tolerance 1e-3 max abs on the final latents, as
//! the other pipeline fixtures; each case's run without the unit must be > 1e-2 away.

use candle_core::{DType, Device};
use sd_controlnet::spec::PreprocessorChoice;
use sd_controlnet::{Unit, UnitSpec};
use sd_pipeline::StableDiffusion;
use sd_plugins_api::ParamValue;
use sd_tests::{fixtures, model_dir};
use serde_json::Value;

use crate::adapters::run_unit_cases;

fn unit(c: &Value, base: &StableDiffusion, seed: u64) -> Unit {
    let mut s = UnitSpec::new("", fixtures().join(c["image"].as_str().unwrap()));
    s.weight = c["weight"].as_f64().unwrap();
    s.end = c["end"].as_f64().unwrap_or(1.0);
    s.preprocessor = Some(PreprocessorChoice {
        name: c["preprocessor"].as_str().unwrap().into(),
        params: vec![(
            "style_fidelity".into(),
            ParamValue::Float(c["style_fidelity"].as_f64().unwrap()),
        )],
    });
    let mut u = s
        .build(base, 64, 64, &mut Vec::new(), &sd_preprocessors::registry())
        .unwrap();
    if let Unit::Reference(r) = &mut u {
        r.seed = seed;
    } else {
        panic!("not a reference unit");
    }
    u
}

#[test]
fn reference_only_matches_the_extension_on_diffusers() {
    run_unit_cases("reference_only_cases.json", 4, &|case, sd| {
        let seed = case["seed"].as_u64().unwrap();
        case["control"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| unit(c, sd, seed))
            .collect()
    });
}

/// A model on a reference unit, or a mode that does not exist: refused, the preprocessor named.
#[test]
fn reference_units_that_cannot_run_are_refused() {
    let sd = StableDiffusion::load(&model_dir("sd1"), &Device::Cpu, DType::F32, &[]).unwrap();
    let image = fixtures().join("inputs/init.png");
    let build = |model: &str, pre: &str| {
        let mut s = UnitSpec::new(model, &image);
        s.preprocessor = Some(PreprocessorChoice::named(pre));
        match s.build(&sd, 64, 64, &mut Vec::new(), &sd_preprocessors::registry()) {
            Ok(_) => panic!("{pre} with model {model:?} accepted"),
            Err(e) => e.to_string(),
        }
    };
    let e = build("models/controlnet-sd1", "reference_only");
    assert!(
        e.contains("reference_only") && e.contains("takes no model"),
        "{e}"
    );
    let e = build("", "reference_bogus");
    assert!(
        e.contains("reference_bogus") && e.contains("unknown reference mode"),
        "{e}"
    );
}
