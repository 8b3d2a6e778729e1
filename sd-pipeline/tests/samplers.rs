//! Sampler parity with diffusers 0.42.1: replays `tests/fixtures/expected/samplers_sd.*`
//! (made by `tests/fixtures/make_sampler_fixtures.py`) through `build_sampler`, with the same
//! stand-in model, and checks timesteps, init_noise_sigma, add_noise and every intermediate sample.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sd_pipeline::samplers::{
    build_sampler, img2img_start_index, NoiseSource, PredictionType, SamplerError, SamplerKind,
    Schedule, SchedulerConfig, TimestepSpacing,
};
use serde_json::Value;

fn expected_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/expected")
}

fn get<'a>(m: &'a HashMap<String, Tensor>, k: &str) -> &'a Tensor {
    m.get(k)
        .unwrap_or_else(|| panic!("fixture tensor {k} missing"))
}

/// Largest absolute difference; NaN where exactly one side is NaN. Where both are NaN (diffusers'
/// Euler a on the cosine schedule: `sigma_to**2 - sigma_up**2` rounds below 0) they agree.
fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    a.iter().zip(&b).fold(0f64, |m, (&x, &y)| {
        let d = if x.is_nan() && y.is_nan() {
            0.0
        } else {
            (x as f64 - y as f64).abs()
        };
        if d.is_nan() || m.is_nan() {
            f64::NAN
        } else {
            m.max(d)
        }
    })
}

fn max_abs(a: &Tensor) -> f64 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    a.iter()
        .filter(|v| v.is_finite())
        .fold(0f64, |m, &v| m.max(v.abs() as f64))
}

/// Hands out the recorded ancestral noises in order.
struct Replay {
    noise: Vec<Tensor>,
    next: usize,
}

impl NoiseSource for Replay {
    fn randn(&mut self, shape: &[usize], device: &Device) -> candle_core::Result<Tensor> {
        let t = self
            .noise
            .get(self.next)
            .ok_or_else(|| candle_core::Error::Msg(format!("noise exhausted at {}", self.next)))?;
        assert_eq!(t.dims(), shape);
        self.next += 1;
        t.to_device(device)
    }
}

/// The fixture's stand-in UNet: `0.3 * x + 0.1 * sin(t / 100) + R`.
fn fake_model(x: &Tensor, t: f64, r: &Tensor) -> Tensor {
    ((x * 0.3).unwrap() + 0.1 * (t / 100.0).sin())
        .unwrap()
        .broadcast_add(r)
        .unwrap()
}

#[derive(Default)]
struct Worst {
    timesteps: f64,
    sigma_rel: f64,
    add_noise: f64,
    sample: f64,
    sample_rel: f64,
}

#[test]
fn every_sampler_replays_diffusers() {
    let dir = expected_dir();
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("samplers_sd.json")).unwrap())
            .unwrap();
    let exp =
        candle_core::safetensors::load(dir.join("samplers_sd.safetensors"), &Device::Cpu).unwrap();
    let r = get(&exp, "model_bias");
    let cases = meta["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 333);
    let mut worst: HashMap<String, Worst> = HashMap::new();
    // cases whose diffusers samples hold NaN, and how many of their values are finite
    let mut nan_cases: Vec<(String, usize, usize)> = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let cname = case["config"].as_str().unwrap();
        // sd15 / sd21 (the real configs) get the absolute tolerance; the cosine config, whose
        // sigmas reach 2e4, is checked relative to the sample's magnitude.
        let strict = cname != "cosine";
        let cfg = SchedulerConfig::from_json_str(&meta["configs"][cname].to_string()).unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        let kind: SamplerKind = case["sampler"].as_str().unwrap().parse().unwrap();
        let schedule: Schedule = case["schedule"].as_str().unwrap().parse().unwrap();
        let w = worst
            .entry(format!(
                "{kind}/{schedule}{}",
                if strict { "" } else { " (cosine)" }
            ))
            .or_default();
        let mut s = build_sampler(kind, schedule, &cfg, steps).unwrap();

        let want_ts: Vec<f64> = get(&exp, &format!("{name}.timesteps")).to_vec1().unwrap();
        assert_eq!(s.timesteps().len(), want_ts.len(), "{name}: timestep count");
        for (a, b) in s.timesteps().iter().zip(&want_ts) {
            let d = (a - b).abs();
            w.timesteps = w.timesteps.max(d);
            assert!(
                d <= 1e-4,
                "{name}: timesteps {:?} vs {want_ts:?}",
                s.timesteps()
            );
        }
        let sigma = case["init_noise_sigma"].as_f64().unwrap();
        let rel = (s.init_noise_sigma() - sigma).abs() / sigma;
        w.sigma_rel = w.sigma_rel.max(rel);
        assert!(
            rel <= 1e-5,
            "{name}: init_noise_sigma {} vs {sigma}",
            s.init_noise_sigma()
        );

        let noise = get(&exp, &format!("{name}.noise"));
        let orig = get(&exp, &format!("{name}.orig"));
        let tol = |want: &Tensor| {
            if strict {
                1e-4
            } else {
                1e-4 * max_abs(want).max(1.0)
            }
        };
        for i in case["add_noise_indices"].as_array().unwrap() {
            let i = i.as_u64().unwrap() as usize;
            let want = get(&exp, &format!("{name}.add_noise.{i}"));
            let d = max_abs_diff(&s.add_noise(orig, noise, i).unwrap(), want);
            w.add_noise = w
                .add_noise
                .max(d / want.abs().unwrap().max_keepdim(0).is_ok() as u8 as f64);
            assert!(d <= tol(want), "{name}: add_noise at {i} differs by {d}");
        }

        let (start, mut x) = match case["strength"].as_f64() {
            Some(strength) => {
                let start = img2img_start_index(steps, strength);
                assert_eq!(start as u64, case["start"].as_u64().unwrap(), "{name}");
                // t_start * scheduler.order: two model calls per step for Heun / DPM++ SDE
                let start = start * s.order();
                let x = s.add_noise(orig, noise, start).unwrap();
                let want = get(&exp, &format!("{name}.noised"));
                assert!(max_abs_diff(&x, want) <= tol(want), "{name}: img2img start");
                (start, x)
            }
            None => (0, (noise * s.init_noise_sigma()).unwrap()),
        };
        let mut replay = Replay {
            noise: match exp.get(&format!("{name}.step_noise")) {
                Some(t) => (0..t.dim(0).unwrap()).map(|k| t.get(k).unwrap()).collect(),
                None => vec![],
            },
            next: 0,
        };
        let samples = get(&exp, &format!("{name}.samples"));
        let total = s.timesteps().len();
        assert_eq!(samples.dim(0).unwrap(), total - start, "{name}: step count");
        let all: Vec<f32> = samples.flatten_all().unwrap().to_vec1().unwrap();
        let nans = all.iter().filter(|v| v.is_nan()).count();
        if nans > 0 {
            nan_cases.push((name.to_string(), nans, all.len() - nans));
        }
        for (k, i) in (start..total).enumerate() {
            let t = s.timesteps()[i];
            let inp = s.scale_model_input(&x, i).unwrap();
            x = s.step(&fake_model(&inp, t, r), i, &x, &mut replay).unwrap();
            assert_eq!(x.dtype(), DType::F32);
            let want = samples.get(k).unwrap();
            let d = max_abs_diff(&x, &want);
            if strict {
                w.sample = w.sample.max(d);
            } else {
                w.sample_rel = w.sample_rel.max(d / max_abs(&want).max(1.0));
            }
            assert!(d <= tol(&want), "{name}: step {i} differs by {d}");
        }
        assert_eq!(
            replay.next,
            replay.noise.len(),
            "{name}: ancestral noise draws"
        );
    }
    // NaN is compared as "NaN at the same places" (max_abs_diff): it must stay the exception
    // diffusers really produces (Euler a on the cosine config, `sigma_to**2 - sigma_up**2`
    // rounding below 0 at its largest sigma), with finite cases of the same sampler beside it
    let nan_names: Vec<&str> = nan_cases.iter().map(|(n, _, _)| n.as_str()).collect();
    assert!(
        nan_names.iter().all(|n| n.starts_with("cosine.euler_a.")),
        "unexpected NaN in diffusers' samples: {nan_cases:?}"
    );
    assert!(nan_cases.len() <= 2, "{nan_cases:?}");
    let finite_cosine_euler_a = cases
        .iter()
        .filter_map(|c| c["name"].as_str())
        .filter(|n| n.starts_with("cosine.euler_a.") && !nan_names.contains(n))
        .count();
    assert!(
        finite_cosine_euler_a >= 1,
        "no finite Euler a case on the cosine config beside the NaN ones: {nan_cases:?}"
    );
    eprintln!("cases with NaN (compared by position): {nan_cases:?}");
    let mut keys: Vec<_> = worst.keys().cloned().collect();
    keys.sort();
    for k in keys {
        let w = &worst[&k];
        eprintln!(
            "{k:28} timesteps {:.1e}  init_sigma rel {:.1e}  add_noise {:.1e}  samples {:.1e}  (rel {:.1e})",
            w.timesteps, w.sigma_rel, w.add_noise, w.sample, w.sample_rel
        );
    }
}

#[test]
fn sampler_ops_keep_any_latent_shape() {
    let cfg = SchedulerConfig::from_json_str(SD15).unwrap();
    let x = Tensor::ones((2, 4, 3, 5), DType::F32, &Device::Cpu).unwrap();
    struct Zeros;
    impl NoiseSource for Zeros {
        fn randn(&mut self, shape: &[usize], device: &Device) -> candle_core::Result<Tensor> {
            Tensor::zeros(shape, DType::F32, device)
        }
    }
    for kind in SamplerKind::ALL {
        for schedule in Schedule::ALL {
            if kind == SamplerKind::Lcm && schedule != Schedule::Normal {
                let e = build_sampler(kind, schedule, &cfg, 3)
                    .err()
                    .expect("lcm takes no sigma schedule")
                    .to_string();
                assert!(e.contains("lcm") && e.contains(schedule.name()), "{e}");
                continue;
            }
            let mut s = build_sampler(kind, schedule, &cfg, 3).unwrap();
            let mut y = (&x * s.init_noise_sigma()).unwrap();
            for i in 0..s.timesteps().len() {
                let inp = s.scale_model_input(&y, i).unwrap();
                y = s.step(&(&inp * 0.1).unwrap(), i, &y, &mut Zeros).unwrap();
                assert_eq!(y.dims(), &[2, 4, 3, 5]);
            }
            let n = s.add_noise(&x, &x, 1).unwrap();
            assert_eq!(n.dims(), &[2, 4, 3, 5]);
            assert!(max_abs(&y).is_finite(), "{kind}/{schedule}");
        }
    }
}

const SD15: &str = r#"{"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0",
  "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
  "num_train_timesteps": 1000, "set_alpha_to_one": false, "skip_prk_steps": true,
  "steps_offset": 1, "trained_betas": null, "clip_sample": false}"#;

#[test]
fn unknown_names_list_the_valid_ones() {
    let e = "dpm++".parse::<SamplerKind>().unwrap_err().to_string();
    for valid in ["ddim", "euler", "euler_a", "dpmpp_2m", "dpm++"] {
        assert!(e.contains(valid), "{e}");
    }
    let e = "polyexponential"
        .parse::<Schedule>()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("normal") && e.contains("karras") && e.contains("beta"),
        "{e}"
    );
    for k in [
        "ddim", "euler", "euler_a", "dpmpp_2m", "heun", "lms", "unipc", "lcm",
    ] {
        assert_eq!(k.parse::<SamplerKind>().unwrap().to_string(), k);
    }
    assert_eq!(
        "v_prediction".parse::<PredictionType>().unwrap(),
        PredictionType::VPrediction
    );
    assert!("sample"
        .parse::<PredictionType>()
        .unwrap_err()
        .to_string()
        .contains("sample"));
}

#[test]
fn config_defaults_follow_the_target_class() {
    let c = SchedulerConfig::from_json_str(SD15).unwrap();
    assert_eq!(c.num_train_timesteps, 1000);
    assert_eq!(c.steps_offset, 1);
    assert_eq!(c.prediction_type, PredictionType::Epsilon);
    assert_eq!(c.timestep_spacing, None);
    assert_eq!(c.set_alpha_to_one, Some(false));
    assert_eq!(c.clip_sample, Some(false));
    // leading for DDIM, linspace for the others: 4 steps of SD1.5
    let ddim = build_sampler(SamplerKind::Ddim, Schedule::Normal, &c, 4).unwrap();
    assert_eq!(ddim.timesteps(), &[751.0, 501.0, 251.0, 1.0]);
    let euler = build_sampler(SamplerKind::Euler, Schedule::Normal, &c, 4).unwrap();
    assert_eq!(euler.timesteps(), &[999.0, 666.0, 333.0, 0.0]);

    // Every key absent: diffusers' own __init__ defaults
    let d = SchedulerConfig::from_json_str("{}").unwrap();
    assert_eq!(d.num_train_timesteps, 1000);
    assert_eq!((d.beta_start, d.beta_end), (0.0001, 0.02));
    assert_eq!(d.steps_offset, 0);
    assert_eq!(d.set_alpha_to_one, None); // DDIM: true
    assert_eq!(d.clip_sample, None); // DDIM: true
    assert_eq!(d.clip_sample_range, 1.0);

    let sd2 = SchedulerConfig::from_json_str(
        r#"{"_class_name": "DDIMScheduler", "prediction_type": "v_prediction",
            "timestep_spacing": "trailing"}"#,
    )
    .unwrap();
    assert_eq!(sd2.prediction_type, PredictionType::VPrediction);
    assert_eq!(sd2.timestep_spacing, Some(TimestepSpacing::Trailing));
}

#[test]
fn config_errors_name_the_file_key_and_value() {
    let e = SchedulerConfig::from_json_str(r#"{"beta_schedule": "foo"}"#).unwrap_err();
    assert!(matches!(e, SamplerError::Config { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("beta_schedule") && msg.contains("foo"),
        "{msg}"
    );

    let dir = std::env::temp_dir().join(format!("sd-samplers-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("scheduler_config.json");
    std::fs::write(&path, r#"{"prediction_type": "sample"}"#).unwrap();
    let msg = SchedulerConfig::from_file(&path).unwrap_err().to_string();
    assert!(
        msg.contains("scheduler_config.json")
            && msg.contains("prediction_type")
            && msg.contains("sample"),
        "{msg}"
    );
    std::fs::write(&path, r#"{"timestep_spacing": "even"}"#).unwrap();
    let msg = SchedulerConfig::from_file(&path).unwrap_err().to_string();
    assert!(
        msg.contains("timestep_spacing") && msg.contains("even"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(SchedulerConfig::from_file(&dir.join("missing.json"))
        .unwrap_err()
        .to_string()
        .contains("missing.json"));

    let c = SchedulerConfig::from_json_str(SD15).unwrap();
    assert!(build_sampler(SamplerKind::Euler, Schedule::Normal, &c, 0).is_err());
    assert!(build_sampler(SamplerKind::Euler, Schedule::Normal, &c, 1001).is_err());
}

#[test]
fn img2img_start_index_matches_diffusers() {
    // init_timestep = min(int(steps * strength), steps); t_start = max(steps - init_timestep, 0)
    assert_eq!(img2img_start_index(7, 0.6), 3);
    assert_eq!(img2img_start_index(20, 0.75), 5);
    assert_eq!(img2img_start_index(20, 1.0), 0);
    assert_eq!(img2img_start_index(20, 1.5), 0);
    assert_eq!(img2img_start_index(10, 0.0), 10);
    assert_eq!(img2img_start_index(3, 0.3), 3); // int(0.9) == 0
}

/// NaN agrees only with NaN at the same place; the finite rest is still compared.
#[test]
fn nan_compares_by_position() {
    let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
    assert_eq!(
        max_abs_diff(&t(&[f32::NAN, 1.0]), &t(&[f32::NAN, 3.0])),
        2.0
    );
    assert!(max_abs_diff(&t(&[f32::NAN, 1.0]), &t(&[1.0, 1.0])).is_nan());
    assert!(max_abs_diff(&t(&[1.0, 1.0]), &t(&[1.0, f32::NAN])).is_nan());
    assert!(max_abs_diff(&t(&[0.0, f32::NAN]), &t(&[0.0, 5.0])).is_nan());
}

/// The SDE samplers against diffusers' own noise, statistically: DPM++ SDE with torchsde's
/// Brownian tree (whose draws sdctl does not reproduce bit for bit) and DPM++ 2M SDE, each over
/// 4 seeds x 16384 independent elements (`samplers_sde_stats.json`). sdctl runs the same
/// schedule with its Philox noise. Bounds: pooled mean within 0.12 (5 standard errors of the
/// difference of two 65536-sample means at std ~4.5) and std within 2% (5 standard errors of
/// the ratio). Drawing the two stages of a DPM++ SDE step independently instead of as one
/// Brownian motion shrinks the final std by ~13%, far outside.
#[test]
fn sde_samplers_match_diffusers_noise_statistics() {
    use sd_pipeline::rng::PhiloxRng;
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(expected_dir().join("samplers_sde_stats.json")).unwrap(),
    )
    .unwrap();
    let shape: Vec<usize> = meta["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let bias = meta["bias"].as_f64().unwrap();
    let cfg = SchedulerConfig::from_json_str(SD15).unwrap();
    let runs = meta["runs"].as_array().unwrap();
    let mut groups: Vec<(String, String, usize)> = Vec::new();
    for r in runs {
        let g = (
            r["sampler"].as_str().unwrap().to_string(),
            r["schedule"].as_str().unwrap().to_string(),
            r["steps"].as_u64().unwrap() as usize,
        );
        if !groups.contains(&g) {
            groups.push(g);
        }
    }
    assert_eq!(groups.len(), 4);
    for (sampler, schedule, steps) in groups {
        let theirs: Vec<&Value> = runs
            .iter()
            .filter(|r| r["sampler"] == sampler.as_str() && r["schedule"] == schedule.as_str())
            .collect();
        let n = theirs.len() as f64;
        let want_mean = theirs
            .iter()
            .map(|r| r["mean"].as_f64().unwrap())
            .sum::<f64>()
            / n;
        let want_std = theirs
            .iter()
            .map(|r| r["std"].as_f64().unwrap())
            .sum::<f64>()
            / n;
        let (mut mean, mut std) = (0.0, 0.0);
        for seed in 0..theirs.len() as u64 {
            let kind: SamplerKind = sampler.parse().unwrap();
            let mut s = build_sampler(kind, schedule.parse().unwrap(), &cfg, steps).unwrap();
            let mut rng = PhiloxRng::new(7 + seed);
            let mut x = (rng.randn(&shape, &Device::Cpu).unwrap() * s.init_noise_sigma()).unwrap();
            for i in 0..s.timesteps().len() {
                let t = s.timesteps()[i];
                let inp = s.scale_model_input(&x, i).unwrap();
                let out = ((inp * 0.3).unwrap() + (0.1 * (t / 100.0).sin() + bias)).unwrap();
                x = s.step(&out, i, &x, &mut rng).unwrap();
            }
            let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let m = v.iter().map(|&a| a as f64).sum::<f64>() / v.len() as f64;
            let var = v.iter().map(|&a| (a as f64 - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64;
            mean += m / n;
            std += var.sqrt() / n;
        }
        eprintln!(
            "{sampler}/{schedule} {steps} steps: mean {mean:.4} vs {want_mean:.4}, std {std:.4} vs {want_std:.4}"
        );
        assert!(
            (mean - want_mean).abs() <= 0.12,
            "{sampler}/{schedule}: mean {mean} vs diffusers' {want_mean}"
        );
        assert!(
            (std / want_std - 1.0).abs() <= 0.02,
            "{sampler}/{schedule}: std {std} vs diffusers' {want_std}"
        );
    }
}
