//! Single-file checkpoints made by diffusers' own conversion script
//! (fixtures/make_single_file_fixtures.py): loading one gives exactly the diffusers folder's
//! results; pickles are read without running code; wrong kinds of file are clear errors.

use candle_core::{DType, Device, Tensor};
use sd_pipeline::loading::single_file::{Checkpoint, Family};
use sd_pipeline::samplers::{SamplerKind, Schedule};
use sd_pipeline::text::tokenizer::ClipTokenizer;
use sd_pipeline::{GenerateRequest, StableDiffusion};
use sd_plugins_api::HookSet;
use sd_tests::{fixtures, max_abs_diff, model_dir};

fn single(name: &str) -> std::path::PathBuf {
    fixtures().join("models/single").join(name)
}

fn load(p: &std::path::Path) -> StableDiffusion {
    StableDiffusion::load(p, &Device::Cpu, DType::F32, &[]).unwrap()
}

/// A 3-step seeded run: final latents and decoded images.
fn run(sd: &StableDiffusion) -> (Tensor, Tensor) {
    let req = GenerateRequest {
        prompt: "a red circle, (blue:1.2) background".into(),
        negative_prompt: Some("blurry".into()),
        width: 64,
        height: 48,
        steps: 3,
        cfg_scale: 7.0,
        sampler: SamplerKind::DpmPP2M,
        schedule: Schedule::Karras,
        batch: 1,
        clip_skip: 1,
        init_image: None,
        mask: None,
        strength: None,
        noise: None,
        latent_fill: Default::default(),
        micro: Default::default(),
        init_latents: None,
        run_steps: None,
        depth: None,
    };
    let out = sd
        .generate(
            &req,
            &mut HookSet::new(),
            &mut sd_pipeline::rng::TorchRng::new(5),
        )
        .unwrap();
    (out.latents, out.images)
}

#[test]
fn single_files_give_the_folders_results_exactly() {
    for (file, folder, family, v) in [
        ("sd1.safetensors", "sd1", Family::Sd1, false),
        ("sd2.safetensors", "sd2", Family::Sd2, true),
    ] {
        let ck = Checkpoint::open(&single(file)).unwrap();
        assert_eq!(ck.detected.family, family, "{file}");
        assert_eq!(ck.detected.v_prediction, v, "{file}");
        assert!(!ck.detected.inpaint);
        assert!(ck.sidecar.is_some());
        let (a_lat, a_img) = run(&load(&single(file)));
        let (b_lat, b_img) = run(&load(&model_dir(folder)));
        assert_eq!(max_abs_diff(&a_lat, &b_lat), 0.0, "{file} latents");
        assert_eq!(max_abs_diff(&a_img, &b_img), 0.0, "{file} images");
    }
}

#[test]
fn the_embedded_tokenizer_is_the_standard_vocabulary() {
    let emb = ClipTokenizer::embedded("<|endoftext|>").unwrap();
    let dir = ClipTokenizer::from_dir(&model_dir("sd1").join("tokenizer")).unwrap();
    for text in [
        "a photo of a cat, best quality",
        "Ünïcödé, 'quotes' and 1234 numbers!!",
        "",
    ] {
        assert_eq!(
            emb.chunks(text).unwrap(),
            dir.chunks(text).unwrap(),
            "{text}"
        );
    }
    let emb2 = ClipTokenizer::embedded("!").unwrap();
    let dir2 = ClipTokenizer::from_dir(&model_dir("sd2").join("tokenizer")).unwrap();
    assert_eq!(
        emb2.chunks("a cat!!").unwrap(),
        dir2.chunks("a cat!!").unwrap()
    );
}

#[test]
fn a_tokenizer_folder_without_a_vocabulary_uses_the_standard_one() {
    // (the embedded tiny-fill model ships only tokenizer_config.json)
    let tmp = std::env::temp_dir().join(format!("tok-novocab-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("tokenizer_config.json"), r#"{"pad_token": "!"}"#).unwrap();
    let t = ClipTokenizer::from_dir(&tmp).unwrap();
    let sd2 = ClipTokenizer::from_dir(&model_dir("sd2").join("tokenizer")).unwrap();
    assert_eq!(t.chunks("a cat").unwrap(), sd2.chunks("a cat").unwrap());
    // half a vocabulary is an error naming what is missing
    std::fs::write(tmp.join("vocab.json"), "{}").unwrap();
    let e = ClipTokenizer::from_dir(&tmp).unwrap_err().to_string();
    std::fs::remove_dir_all(&tmp).unwrap();
    assert!(e.contains("merges.txt"), "{e}");
}

#[test]
fn pickled_controlnets_load_and_malicious_pickles_are_refused() {
    let base = load(&model_dir("sd1"));
    let cfg = base.unet.config();
    let a = sd_controlnet::load_controlnet(
        &single("controlnet-sd1-ldm.pth"),
        cfg,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let b = sd_controlnet::load_controlnet(
        &fixtures().join("models/controlnet-sd1-ldm.safetensors"),
        cfg,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let dev = Device::Cpu;
    let sample = Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &dev).unwrap();
    let t = Tensor::new(&[500f32], &dev).unwrap();
    let ctx = Tensor::randn(0f32, 1.0, (1, 77, 8), &dev).unwrap();
    let cond = Tensor::rand(0f32, 1.0, (1, 3, 64, 64), &dev).unwrap();
    let ra = a.forward(&sample, &t, &ctx, &cond).unwrap();
    let rb = b.forward(&sample, &t, &ctx, &cond).unwrap();
    assert_eq!(max_abs_diff(&ra.mid, &rb.mid), 0.0);
    for (x, y) in sd_tests::paired("down residuals", &ra.down, &rb.down) {
        assert_eq!(max_abs_diff(x, y), 0.0);
    }

    let _ = std::fs::remove_file("/tmp/sdctl-pwned");
    let e = StableDiffusion::load(&single("evil.ckpt"), &Device::Cpu, DType::F32, &[])
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("evil.ckpt") && e.contains("system`") && e.contains("refused"),
        "{e}"
    );
    assert!(
        !std::path::Path::new("/tmp/sdctl-pwned").exists(),
        "code ran"
    );
}

#[test]
fn other_kinds_of_file_are_clear_errors() {
    let err = |p: std::path::PathBuf| {
        StableDiffusion::load(&p, &Device::Cpu, DType::F32, &[])
            .err()
            .unwrap()
            .to_string()
    };
    let e = err(fixtures().join("models/controlnet-sd1-ldm.safetensors"));
    assert!(e.contains("this is a ControlNet, not a base model"), "{e}");
    let e = err(fixtures().join("loras/lora_b_kohya.safetensors"));
    assert!(e.contains("this is a LoRA, not a base model"), "{e}");
    let e = err(model_dir("sd1").join("unet/diffusion_pytorch_model.safetensors"));
    assert!(e.contains("not a Stable Diffusion checkpoint"), "{e}");
    // without its sidecar the tiny model's group norms cannot be known (LDM always uses 32)
    let dir = std::env::temp_dir().join(format!("sf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bare = dir.join("tiny.safetensors");
    std::fs::copy(single("sd1.safetensors"), &bare).unwrap();
    let e = err(bare.clone());
    assert!(
        e.contains("tiny.safetensors")
            && e.contains("norm_num_groups 32")
            && e.contains("no sidecar"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn folder_tensors(dir: &std::path::Path) -> std::collections::HashMap<String, Tensor> {
    let mut out = std::collections::HashMap::new();
    for part in ["unet", "vae", "text_encoder"] {
        for f in sd_pipeline::loading::files::weight_files(&dir.join(part)).unwrap() {
            for (k, v) in candle_core::safetensors::load(&f, &Device::Cpu).unwrap() {
                let k = k.strip_prefix("text_model.").unwrap_or(&k).to_string();
                if !k.ends_with("position_ids") {
                    out.insert(format!("{part}/{k}"), v);
                }
            }
        }
    }
    out
}

fn assert_same_tensors(a: &std::path::Path, b: &std::path::Path) {
    let (x, y) = (folder_tensors(a), folder_tensors(b));
    let mut kx: Vec<&String> = x.keys().collect();
    let mut ky: Vec<&String> = y.keys().collect();
    kx.sort();
    ky.sort();
    assert_eq!(kx, ky, "{} vs {}", a.display(), b.display());
    for (k, t) in &x {
        let u = &y[k];
        assert_eq!(t.dims(), u.dims(), "{k}");
        let (t, u) = (
            t.to_dtype(DType::F32).unwrap(),
            u.to_dtype(DType::F32).unwrap(),
        );
        assert_eq!(max_abs_diff(&t, &u), 0.0, "{k}");
    }
}

#[test]
fn convert_round_trips_tensor_for_tensor() {
    use sd_pipeline::loading::single_file::convert::{to_diffusers, to_single_file};
    let dir = std::env::temp_dir().join(format!("convert-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // diffusers' own conversion, undone: the committed single files back to folders
    for name in ["sd1", "sd2"] {
        let back = dir.join(format!("{name}-from-ldm"));
        to_diffusers(&single(&format!("{name}.safetensors")), &back, false).unwrap();
        assert_same_tensors(&back, &model_dir(name));
        let (a, _) = run(&load(&back));
        let (b, _) = run(&load(&model_dir(name)));
        assert_eq!(max_abs_diff(&a, &b), 0.0, "{name}");
    }
    // diffusers -> single -> diffusers, for SD1, SD2 and an inpainting model
    for name in ["sd1", "sd2", "sd1-inpaint"] {
        let file = dir.join(format!("{name}.safetensors"));
        to_single_file(&model_dir(name), &file, false).unwrap();
        assert!(file.with_extension("yaml").is_file());
        let ck = Checkpoint::open(&file).unwrap();
        assert_eq!(ck.detected.inpaint, name == "sd1-inpaint");
        let back = dir.join(format!("{name}-back"));
        to_diffusers(&file, &back, false).unwrap();
        assert_same_tensors(&back, &model_dir(name));
        if name != "sd1-inpaint" {
            let (a, _) = run(&load(&file));
            let (b, _) = run(&load(&model_dir(name)));
            assert_eq!(max_abs_diff(&a, &b), 0.0, "{name} via its single file");
        }
        // an existing output is never overwritten
        let e = to_single_file(&model_dir(name), &file, false)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("already exists"), "{e}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_controlnet_sidecar_overrides_the_base_architecture() {
    let dir = std::env::temp_dir().join(format!("cn-sidecar-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("control_tiny.safetensors");
    std::fs::copy(
        fixtures().join("models/controlnet-sd1-ldm.safetensors"),
        &file,
    )
    .unwrap();
    let sd1 = load(&model_dir("sd1"));
    let sd2 = load(&model_dir("sd2"));
    let dev = Device::Cpu;
    // the SD2 base (linear projections, other head counts) does not fit this ControlNet...
    let e = sd_controlnet::load_controlnet(&file, sd2.unet.config(), &dev, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("control_tiny.safetensors"), "{e}");
    // ...until its cldm yaml says what it is
    std::fs::write(
        file.with_extension("yaml"),
        "model:\n  target: cldm.cldm.ControlLDM\n  params:\n    control_stage_config:\n      target: cldm.cldm.ControlNet\n      params:\n        in_channels: 4\n        hint_channels: 3\n        model_channels: 16\n        attention_resolutions: [1, 2]\n        num_res_blocks: 2\n        channel_mult: [1, 2, 2]\n        num_heads: 4\n        use_linear_in_transformer: False\n        context_dim: 8\n        norm_num_groups: 8\n",
    )
    .unwrap();
    let a = sd_controlnet::load_controlnet(&file, sd2.unet.config(), &dev, DType::F32).unwrap();
    let b = sd_controlnet::load_controlnet(&file, sd1.unet.config(), &dev, DType::F32).unwrap();
    let sample = Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &dev).unwrap();
    let t = Tensor::new(&[300f32], &dev).unwrap();
    let ctx = Tensor::randn(0f32, 1.0, (1, 77, 8), &dev).unwrap();
    let cond = Tensor::rand(0f32, 1.0, (1, 3, 64, 64), &dev).unwrap();
    let (ra, rb) = (
        a.forward(&sample, &t, &ctx, &cond).unwrap(),
        b.forward(&sample, &t, &ctx, &cond).unwrap(),
    );
    assert_eq!(max_abs_diff(&ra.mid, &rb.mid), 0.0);
    // a broken sidecar names itself
    std::fs::write(file.with_extension("yaml"), "model: [1, 2\n").unwrap();
    let e = sd_controlnet::load_controlnet(&file, sd1.unet.config(), &dev, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("control_tiny.yaml"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_default_size_is_the_one_the_model_was_trained_at() {
    // diffusers: unet.config.sample_size * vae_scale_factor; from_single_file sets sample_size
    // from DIFFUSERS_TO_LDM_DEFAULT_IMAGE_SIZE_MAP (v1 512, v2 768) over the VAE's scale (8 here)
    assert_eq!(load(&model_dir("sd1")).default_size(), (64, 64)); // config sample_size 8
    assert_eq!(load(&single("sd1.safetensors")).default_size(), (512, 512));
    assert_eq!(load(&single("sd2.safetensors")).default_size(), (768, 768));
}
