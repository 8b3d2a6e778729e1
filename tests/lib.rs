//! Helpers for the parity tests: fixture paths, tensors, comparisons, replayed noise.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use sd_pipeline::generation::image_io::{load_image, load_mask};
use sd_pipeline::rng::NoiseSource;
use sd_pipeline::GenerateRequest;

/// `tests/fixtures/` of this workspace.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

/// All tensors of `tests/fixtures/expected/<name>`.
pub fn expected(name: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join("expected").join(name);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()))
}

pub fn get<'a>(map: &'a HashMap<String, Tensor>, name: &str) -> &'a Tensor {
    map.get(name)
        .unwrap_or_else(|| panic!("fixture tensor {name} missing"))
}

/// Largest absolute value of a tensor.
/// The pairs of `a` and `b` after checking that both hold the same, non-zero number of items
/// (a bare `zip` stops at the shorter side, and passes on an empty one).
pub fn paired<'a, A, B>(
    what: &str,
    a: &'a [A],
    b: &'a [B],
) -> std::iter::Zip<std::slice::Iter<'a, A>, std::slice::Iter<'a, B>> {
    assert_eq!(
        a.len(),
        b.len(),
        "{what}: {} items against {}",
        a.len(),
        b.len()
    );
    assert!(!a.is_empty(), "{what}: nothing to compare");
    a.iter().zip(b)
}

pub fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(candle_core::DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let f32 = |t: &Tensor| t.to_dtype(candle_core::DType::F32).unwrap();
    max_abs(&(f32(a) - f32(b)).unwrap())
}

/// Assert `a` matches `b` within `tol` (max abs), and that `b` is not trivially small, so a
/// test of an all-zero output cannot pass by accident.
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f32) {
    let d = max_abs_diff(a, b);
    let scale = max_abs(b);
    println!("{what}: max abs diff {d:.3e} (reference max abs {scale:.3})");
    assert!(
        scale > 1e-3,
        "{what}: reference is ~zero, the test would prove nothing"
    );
    assert!(d <= tol, "{what}: max abs diff {d} > {tol}");
}

/// Replays recorded per-step noise (`step_noise` [steps, ...]) to an ancestral sampler.
pub struct Replay {
    noise: Vec<Tensor>,
    next: usize,
}

impl Replay {
    pub fn new(step_noise: Option<&Tensor>) -> Self {
        let noise = match step_noise {
            Some(t) => (0..t.dim(0).unwrap()).map(|i| t.get(i).unwrap()).collect(),
            None => vec![],
        };
        Self { noise, next: 0 }
    }

    pub fn used(&self) -> usize {
        self.next
    }
}

impl NoiseSource for Replay {
    fn randn(&mut self, shape: &[usize], device: &Device) -> candle_core::Result<Tensor> {
        let t = self.noise.get(self.next).ok_or_else(|| {
            candle_core::Error::Msg(format!("replay noise exhausted after {} draws", self.next))
        })?;
        if t.dims() != shape {
            candle_core::bail!(
                "replay noise {} has shape {:?}, {shape:?} asked",
                self.next,
                t.dims()
            );
        }
        self.next += 1;
        t.to_device(device)
    }
}

/// The generation request of a fixture case (cases.json / controlnet_cases.json), with the
/// case's recorded initial noise when it has one.
pub fn case_request(case: &serde_json::Value, exp: &HashMap<String, Tensor>) -> GenerateRequest {
    let u = |k: &str| case[k].as_u64().unwrap() as usize;
    let (width, height) = (u("width"), u("height"));
    let path = |k: &str| case[k].as_str().map(|p| fixtures().join(p));
    GenerateRequest {
        prompt: case["prompt"].as_str().unwrap().into(),
        negative_prompt: case["negative_prompt"].as_str().map(Into::into),
        width,
        height,
        steps: u("steps"),
        cfg_scale: case["cfg_scale"].as_f64().unwrap(),
        sampler: case["sampler"].as_str().unwrap().parse().unwrap(),
        schedule: case["schedule"].as_str().unwrap().parse().unwrap(),
        batch: u("batch"),
        clip_skip: u("clip_skip"),
        init_image: path("init_image")
            .map(|p| load_image(&p, width, height, &Device::Cpu).unwrap()),
        mask: path("mask").map(|p| load_mask(&p, width, height, &Device::Cpu).unwrap()),
        strength: case["strength"].as_f64(),
        noise: exp.get("noise").cloned(),
        latent_fill: Default::default(),
        micro: micro_conditioning(case),
        init_latents: None,
        run_steps: None,
        depth: None,
    }
}

/// A case's SDXL micro-conditioning, given in diffusers' order: sizes `[height, width]`, the
/// crop `[top, left]`.
fn micro_conditioning(case: &serde_json::Value) -> sd_pipeline::MicroConditioning {
    let pair = |k: &str| {
        case[k].as_array().map(|a| {
            let v = |i: usize| a[i].as_u64().unwrap() as usize;
            (v(1), v(0))
        })
    };
    sd_pipeline::MicroConditioning {
        original_size: pair("original_size"),
        target_size: pair("target_size"),
        crop_top_left: pair("crop_top_left").unwrap_or((0, 0)),
        ..Default::default()
    }
}

/// The OpenPose fixture scripts' random weights, redrawn: for each `(name, shape)`, torch's
/// `randn` from seed `1000 + seed_add + sum((i + 1) * byte)` over the name's bytes, times the
/// power of two nearest sqrt(2 / fan_in) (4-d weights) or 1/64 (biases).
pub fn openpose_weights(
    shapes: impl IntoIterator<Item = (String, Vec<usize>)>,
    seed_add: u64,
) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for (name, shape) in shapes {
        let seed = 1000
            + seed_add
            + name
                .bytes()
                .enumerate()
                .map(|(i, b)| (i as u64 + 1) * b as u64)
                .sum::<u64>();
        let n: usize = shape.iter().product();
        let scale = if shape.len() == 4 {
            let fan_in = (shape[1] * shape[2] * shape[3]) as f64;
            2f64.powi((2.0 / fan_in).sqrt().log2().round() as i32) as f32
        } else {
            1.0 / 64.0
        };
        let v: Vec<f32> = sd_pipeline::rng::TorchRng::new(seed)
            .randn_f32(n)
            .into_iter()
            .map(|x| x * scale)
            .collect();
        out.insert(name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap());
    }
    out
}

/// A fixture script's `(scale, offset)` for a tensor, by name and shape.
pub type ScaleOffset = dyn Fn(&str, &[usize]) -> (f32, f32);

/// The depth fixture scripts' random weights (make_midas_fixtures.py, make_zoe_fixtures.py),
/// redrawn: for each `(name, shape)`, torch's `randn` from seed `1000 + sum((i + 1) * byte)`
/// over the name's bytes, times the power of two nearest sqrt(2 / fan_in) (4-d weights) or
/// sqrt(1 / fan_in) (2-d), rounded half to even as Python; any other tensor is `x * scale +
/// offset` with `(scale, offset) = other(name, shape)` (each script's own rules).
pub fn depth_weights(
    shapes: impl IntoIterator<Item = (String, Vec<usize>)>,
    other: &ScaleOffset,
) -> HashMap<String, Tensor> {
    let pow2 = |x: f64| 2f64.powi(x.log2().round_ties_even() as i32) as f32;
    let mut out = HashMap::new();
    for (name, shape) in shapes {
        let seed = 1000
            + name
                .bytes()
                .enumerate()
                .map(|(i, b)| (i as u64 + 1) * b as u64)
                .sum::<u64>();
        let (scale, offset) = match shape.len() {
            4 => (
                pow2((2.0 / (shape[1] * shape[2] * shape[3]) as f64).sqrt()),
                0.0,
            ),
            2 => (pow2((1.0 / shape[1] as f64).sqrt()), 0.0),
            _ => other(&name, &shape),
        };
        let n: usize = shape.iter().product();
        let v: Vec<f32> = sd_pipeline::rng::TorchRng::new(seed)
            .randn_f32(n)
            .into_iter()
            .map(|x| x * scale + offset)
            .collect();
        out.insert(name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap());
    }
    out
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    /// Every file under tests/fixtures is in MANIFEST.json (make_manifest.py) with the script
    /// that makes it, and has the bytes recorded there: a fixture edited by hand, or left over
    /// by a script that no longer writes it, fails here.
    #[test]
    fn every_fixture_file_is_in_the_manifest_as_made() {
        let root = super::fixtures();
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(root.join("MANIFEST.json")).unwrap())
                .unwrap();
        let files = m["files"].as_object().unwrap();
        let scripts = m["scripts"].as_object().unwrap();
        let mut found = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                let name = e.file_name().to_string_lossy().to_string();
                if name.starts_with('.') || name.starts_with('_') {
                    continue;
                }
                if p.is_dir() {
                    stack.push(p);
                    continue;
                }
                let rel = p
                    .strip_prefix(&root)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                let top_script = !rel.contains('/') && name.ends_with(".py");
                if top_script
                    || name == "README.md"
                    || name == "MANIFEST.json"
                    || name.ends_with(".pyc")
                {
                    continue;
                }
                found.push(rel);
            }
        }
        found.sort();
        let listed: Vec<&String> = files.keys().collect();
        assert_eq!(
            found.iter().collect::<Vec<_>>(),
            listed,
            "files under tests/fixtures and MANIFEST.json differ (run make_manifest.py after a make_*.py)"
        );
        for (rel, e) in files {
            let bytes = std::fs::read(root.join(rel)).unwrap();
            assert_eq!(
                bytes.len() as u64,
                e["size"].as_u64().unwrap(),
                "{rel}: size"
            );
            let hex: String = Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(
                hex,
                e["sha256"].as_str().unwrap(),
                "{rel}: not the bytes its script made"
            );
            let by = e["made_by"].as_str().unwrap();
            assert!(
                scripts.contains_key(by) && root.join(by).is_file(),
                "{rel}: made by {by}?"
            );
        }
        assert!(files.len() > 150, "{}", files.len());
    }

    #[test]
    #[should_panic(expected = "draw: 3 items against 2")]
    fn paired_refuses_sides_of_different_lengths() {
        let _ = super::paired("draw", &[1, 2, 3], &[1, 2]).count();
    }

    #[test]
    #[should_panic(expected = "draw: nothing to compare")]
    fn paired_refuses_to_compare_nothing() {
        // what an RNG returning no values would give: a bare zip calls it equal
        let (got, want): (Vec<f32>, Vec<f32>) = (Vec::new(), Vec::new());
        let _ = super::paired("draw", &got, &want).all(|(a, b)| a == b);
    }
}
