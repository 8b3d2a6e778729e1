//! Single-file checkpoints through the CLI: `model inspect`, `model convert`, generating from a
//! single file (with LoRAs, a pickled ControlNet, a swapped VAE), and clear refusals.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use candle_core::{Device, Tensor};
use sd_tests::{fixtures, model_dir};

use crate::common::{latents_f32, ok, s, scratch, sdctl_cached};

/// sdctl with this file's cache folder (shared by its tests).
fn sdctl(args: &[&str]) -> Output {
    sdctl_cached(
        args,
        &std::env::temp_dir().join(format!("sdctl-model-test-cache-{}", std::process::id())),
    )
}

fn single(name: &str) -> PathBuf {
    fixtures().join("models/single").join(name)
}

/// A short seeded generation; returns its latents.
fn generate(dir: &Path, name: &str, model: &Path, extra: &[&str]) -> Vec<f32> {
    let lat = dir.join(format!("{name}.safetensors"));
    let out = dir.join(format!("{name}.png"));
    let mut args = vec![
        "generate",
        "--model",
        s(model),
        "--prompt",
        "a red circle",
        "--negative-prompt",
        "blue",
        "--width",
        "64",
        "--height",
        "48",
        "--steps",
        "3",
        "--seed",
        "9",
        "--output",
        s(&out),
        "--save-latents",
        s(&lat),
    ];
    args.extend(extra);
    ok(&sdctl(&args));
    latents_f32(&lat)
}

#[test]
fn inspect_tells_what_a_file_is() {
    let out = ok(&sdctl(&["model", "inspect", s(&single("sd1.safetensors"))]));
    for want in [
        "format: safetensors, 790 tensors",
        "kind: single-file checkpoint (LDM layout)",
        "family: SD 1.x (CLIP text encoder: cond_stage_model.transformer.*)",
        "prediction: epsilon",
        "inpainting: no",
        "config: sidecar",
        "parameters unet: 0.54 M",
        "not understood: 0 keys",
    ] {
        assert!(out.contains(want), "missing {want:?}:\n{out}");
    }
    let out = ok(&sdctl(&["model", "inspect", s(&single("sd2.safetensors"))]));
    assert!(
        out.contains("family: SD 2.x (OpenCLIP") && out.contains("prediction: v_prediction"),
        "{out}"
    );
    assert!(out.contains("OpenCLIP's last resblock (unused"), "{out}");
    let out = ok(&sdctl(&[
        "model",
        "inspect",
        s(&fixtures().join("models/controlnet-sd1-ldm.safetensors")),
    ]));
    assert!(out.contains("kind: ControlNet"), "{out}");
    let out = ok(&sdctl(&[
        "model",
        "inspect",
        s(&fixtures().join("loras/lora_b_kohya.safetensors")),
    ]));
    assert!(out.contains("kind: LoRA"), "{out}");
    let out = ok(&sdctl(&["model", "inspect", s(&model_dir("sd2"))]));
    assert!(
        out.contains("format: diffusers folder") && out.contains("v_prediction"),
        "{out}"
    );

    // a key nothing maps: listed as not understood
    let d = scratch("model", "inspect");
    let mut t: HashMap<String, Tensor> =
        candle_core::safetensors::load(single("sd1.safetensors"), &Device::Cpu).unwrap();
    t.insert(
        "model.diffusion_model.extra_head.weight".into(),
        Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    t.insert(
        "model_ema.decay".into(),
        Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let f = d.join("odd.safetensors");
    candle_core::safetensors::save(&t, &f).unwrap();
    std::fs::copy(single("sd1.yaml"), d.join("odd.yaml")).unwrap();
    let out = ok(&sdctl(&["model", "inspect", s(&f)]));
    assert!(
        out.contains("not understood: 1 keys\n  model.diffusion_model.extra_head.weight"),
        "{out}"
    );
    assert!(out.contains("model_ema.*: 1"), "{out}");

    // a malicious pickle: refused, nothing run
    let _ = std::fs::remove_file("/tmp/sdctl-pwned");
    let o = sdctl(&["model", "inspect", s(&single("evil.ckpt"))]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("`posix.system`") && err.contains("refused"),
        "{err}"
    );
    assert!(!Path::new("/tmp/sdctl-pwned").exists());
}

#[test]
fn generate_from_single_files_with_loras_controlnets_and_vaes() {
    let d = scratch("model", "gen");
    let fx = fixtures();
    // the single file and its folder give the same latents, with a LoRA too
    let a = generate(&d, "a", &single("sd1.safetensors"), &[]);
    let b = generate(&d, "b", &model_dir("sd1"), &[]);
    assert_eq!(a, b);
    let lora = format!(
        "{}:0.8",
        fx.join("loras/lora_b_kohya.safetensors").display()
    );
    let a = generate(&d, "al", &single("sd1.safetensors"), &["--lora", &lora]);
    let b = generate(&d, "bl", &model_dir("sd1"), &["--lora", &lora]);
    assert_eq!(a, b);
    assert_ne!(a, generate(&d, "b0", &model_dir("sd1"), &[]));
    // a pickled ControlNet equals its safetensors twin
    let unit = |m: &Path| {
        format!(
            "model={},image={}",
            m.display(),
            fx.join("inputs/control_a.png").display()
        )
    };
    let p = generate(
        &d,
        "cp",
        &single("sd1.safetensors"),
        &["--control", &unit(&single("controlnet-sd1-ldm.pth"))],
    );
    let q = generate(
        &d,
        "cq",
        &single("sd1.safetensors"),
        &[
            "--control",
            &unit(&fx.join("models/controlnet-sd1-ldm.safetensors")),
        ],
    );
    assert_eq!(p, q);

    // --vae with A1111-style VAE files (bare LDM names, or first_stage_model.*), made from
    // the fixture's VAE with its output bias shifted so that it draws differently
    let sd1: HashMap<String, Tensor> =
        candle_core::safetensors::load(single("sd1.safetensors"), &Device::Cpu).unwrap();
    let mut prefixed: HashMap<String, Tensor> = sd1
        .into_iter()
        .filter(|(k, _)| k.starts_with("first_stage_model."))
        .collect();
    let bias = "first_stage_model.decoder.conv_out.bias".to_string();
    let shifted = (prefixed[&bias].to_dtype(candle_core::DType::F32).unwrap() + 0.25).unwrap();
    prefixed.insert(bias, shifted);
    let bare: HashMap<String, Tensor> = prefixed
        .iter()
        .map(|(k, v)| {
            (
                k.strip_prefix("first_stage_model.").unwrap().to_string(),
                v.clone(),
            )
        })
        .collect();
    let vae_bare = d.join("vae-ft-test.safetensors");
    candle_core::safetensors::save(&bare, &vae_bare).unwrap();
    let vae_prefixed = d.join("vae-prefixed.safetensors");
    candle_core::safetensors::save(&prefixed, &vae_prefixed).unwrap();
    let img = |name: &str| {
        image::open(d.join(format!("{name}.png")))
            .unwrap()
            .to_rgb8()
            .into_raw()
    };
    generate(
        &d,
        "v1",
        &single("sd1.safetensors"),
        &["--vae", s(&vae_bare)],
    );
    generate(&d, "v2", &model_dir("sd1"), &["--vae", s(&vae_bare)]);
    generate(&d, "v3", &model_dir("sd1"), &["--vae", s(&vae_prefixed)]);
    assert_eq!(img("v1"), img("v2"));
    assert_eq!(img("v3"), img("v2"));
    assert_ne!(img("v1"), img("a"));
    // the shift is what changed: the image is brighter
    let mean = |v: Vec<u8>| v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
    assert!(mean(img("v1")) > mean(img("a")) + 5.0);

    // wrong kinds of file are clear errors
    for (f, want) in [
        (
            fx.join("loras/lora_b_kohya.safetensors"),
            "this is a LoRA, not a base model",
        ),
        (
            fx.join("models/controlnet-sd1-ldm.safetensors"),
            "this is a ControlNet, not a base model",
        ),
    ] {
        let o = sdctl(&[
            "generate",
            "--model",
            s(&f),
            "--prompt",
            "x",
            "--output",
            s(&d.join("x.png")),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(want), "{err}");
    }
}

#[test]
fn convert_through_the_cli() {
    let d = scratch("model", "convert");
    let file = d.join("tiny.safetensors");
    ok(&sdctl(&[
        "model",
        "convert",
        s(&model_dir("sd2")),
        "--output",
        s(&file),
        "--to",
        "single-file",
        "--half",
    ]));
    assert!(file.with_extension("yaml").is_file());
    let back = d.join("tiny-diffusers");
    ok(&sdctl(&[
        "model",
        "convert",
        s(&file),
        "--output",
        s(&back),
        "--to",
        "diffusers",
    ]));
    let a = generate(&d, "a", &back, &[]);
    let b = generate(&d, "b", &model_dir("sd2"), &[]);
    let c = generate(&d, "c", &file, &[]);
    assert_eq!(a, b);
    assert_eq!(c, b);
    // refusals
    let o = sdctl(&[
        "model",
        "convert",
        s(&file),
        "--output",
        s(&back),
        "--to",
        "diffusers",
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("already exists"));
    let o = sdctl(&[
        "model",
        "convert",
        s(&model_dir("sd1")),
        "--output",
        s(&d.join("x.bin")),
        "--to",
        "single-file",
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("name it NAME.safetensors"));
}
