//! Every sampler x schedule, step by step, against diffusers' schedulers driven by the same
//! deterministic stand-in model (make_fixtures.py `fake_model`): 5 and 20 steps, img2img
//! starts, leading / trailing / linspace spacings, epsilon and v-prediction, scaled-linear and
//! linear betas. Tolerance 1e-4 max abs on every intermediate sample, relative to the sample's
//! scale when that exceeds 1 (linear betas start at sigma ~157: f32 arithmetic whose scalar
//! coefficients we compute in f64 where torch uses f32 differs by ~1e-6 relative there).

use candle_core::{DType, Device, Tensor};
use sd_pipeline::samplers::{build_sampler, img2img_start_index, SchedulerConfig};
use sd_tests::{assert_close, expected, fixtures, get, Replay};
use serde_json::Value;

fn fake_model(x: &Tensor, t: f64) -> Tensor {
    ((x.tanh().unwrap() * 0.5).unwrap() + 0.1 * ((t as f32 / 100.0).sin() as f64)).unwrap()
}

#[test]
fn every_sampler_matches_diffusers_step_by_step() {
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("expected/samplers.json")).unwrap(),
    )
    .unwrap();
    let exp = expected("samplers.safetensors");
    let cases = meta["cases"].as_array().unwrap();
    assert!(cases.len() >= 100);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let cfg = SchedulerConfig::from_json_str(
            &meta["configs"][case["config"].as_str().unwrap()].to_string(),
        )
        .unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        let mut s = build_sampler(
            case["sampler"].as_str().unwrap().parse().unwrap(),
            case["schedule"].as_str().unwrap().parse().unwrap(),
            &cfg,
            steps,
        )
        .unwrap();
        let want_ts: Vec<f64> = get(&exp, &format!("{name}.timesteps")).to_vec1().unwrap();
        assert_eq!(
            s.timesteps().len(),
            want_ts.len(),
            "{name}: number of timesteps"
        );
        for (a, b) in s.timesteps().iter().zip(&want_ts) {
            assert!(
                (a - b).abs() < 1e-4,
                "{name}: timesteps {:?} vs {want_ts:?}",
                s.timesteps()
            );
        }
        let sigma = case["init_noise_sigma"].as_f64().unwrap();
        assert!(
            (s.init_noise_sigma() - sigma).abs() <= 1e-5 * sigma,
            "{name}: init_noise_sigma {} vs {sigma}",
            s.init_noise_sigma()
        );

        let noise = get(&exp, &format!("{name}.noise"));
        let start = match case["strength"].as_f64() {
            Some(strength) => {
                let start = img2img_start_index(steps, strength);
                assert_eq!(
                    start as u64,
                    case["start"].as_u64().unwrap(),
                    "{name}: start index"
                );
                let x = s
                    .add_noise(get(&exp, &format!("{name}.init")), noise, start)
                    .unwrap();
                assert_close(
                    &format!("{name} add_noise"),
                    &x,
                    get(&exp, &format!("{name}.noised")),
                    1e-5,
                );
                start
            }
            None => 0,
        };
        let mut x = match case["strength"].as_f64() {
            Some(_) => get(&exp, &format!("{name}.noised")).clone(),
            None => (noise * s.init_noise_sigma()).unwrap(),
        };
        let mut replay = Replay::new(exp.get(&format!("{name}.step_noise")));
        let samples = get(&exp, &format!("{name}.samples"));
        for (k, i) in (start..steps).enumerate() {
            let t = s.timesteps()[i];
            let inp = s.scale_model_input(&x, i).unwrap();
            x = s.step(&fake_model(&inp, t), i, &x, &mut replay).unwrap();
            let want = samples.get(k).unwrap();
            let d = sd_tests::max_abs_diff(&x, &want);
            let scale = want
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .max(1.0);
            assert!(
                d <= 1e-4 * scale,
                "{name}: step {i} differs by {d} (scale {scale})"
            );
        }
        assert_eq!(x.dtype(), DType::F32);
        let _ = Device::Cpu;
    }
}
