//! SDXL against diffusers 0.42.1 (make_sdxl_fixtures.py): a tiny random SDXL model in the real
//! architecture, 4-step pipelines for txt2img (non-square, micro-conditioning, the zeroed
//! empty negative, Euler a), img2img, inpainting (mask blending and a 9-channel UNet), an SDXL ControlNet with a step window and a union
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
        // Euler a's step noise is what diffusers drew
        let mut replay = sd_tests::Replay::new(exp.get("step_noise"));
        let latents = sd.denoise(&req, &mut hooks, &mut replay).unwrap();
        if let Some(sn) = exp.get("step_noise") {
            assert_eq!(
                replay.used(),
                sn.dim(0).unwrap(),
                "{name}: every step noise drawn"
            );
        }
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

/// The diffusers folder, the same weights as an lllyasviel / A1111 file (`control_model.*`
/// with `label_emb`), and a "-small"-style net (transformer depths 0, 0, 1).
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

fn spec(model: &str, ty: Option<&str>) -> sd_controlnet::UnitSpec {
    let mut s = sd_controlnet::UnitSpec::new(
        fixtures().join(model),
        fixtures().join("inputs/control_a.png"),
    );
    s.control_type = ty.map(Into::into);
    s
}

fn build_error(base: &StableDiffusion, s: &sd_controlnet::UnitSpec) -> String {
    match s.build(base, 64, 64, &mut Vec::new(), &sd_preprocessors::registry()) {
        Ok(_) => panic!("{s:?} was accepted on a {} model", base.family()),
        Err(e) => e.to_string(),
    }
}

/// A ControlNet of the other family, a union model without a type, a type it lacks or a type
/// on an ordinary ControlNet: refused before any step, naming the file and what is wrong.
#[test]
fn controlnets_that_do_not_fit_are_refused_with_both_families_named() {
    let load =
        |m: &str| StableDiffusion::load(&model_dir(m), &Device::Cpu, DType::F32, &[]).unwrap();
    let (sdxl, sd1) = (load("sdxl"), load("sd1"));
    let e = build_error(&sdxl, &spec("models/controlnet-sd1", None));
    assert!(
        e.contains("SD 1.x/2.x ControlNet") && e.contains("SDXL model"),
        "{e}"
    );
    assert!(e.contains("controlnet-sd1"), "{e}");
    let e = build_error(&sd1, &spec("models/controlnet-sdxl", None));
    assert!(
        e.contains("SDXL ControlNet") && e.contains("SD 1.x/2.x model"),
        "{e}"
    );
    let e = build_error(&sdxl, &spec("models/controlnet-sdxl-union", None));
    assert!(e.contains("type=openpose|depth"), "{e}");
    let e = build_error(&sdxl, &spec("models/controlnet-sdxl", Some("depth")));
    assert!(e.contains("type= is for union ControlNets"), "{e}");
    let e = build_error(
        &sdxl,
        &spec("models/controlnet-sdxl-union", Some("sketchy")),
    );
    assert!(e.contains("unknown union control type \"sketchy\""), "{e}");
}

/// An SDXL LoRA on the UNet and both text encoders, as a PEFT/diffusers file and as kohya's
/// SDXL names (LDM blocks, `lora_te1_` / `lora_te2_`): every module binds, and both give
/// diffusers' latents (1e-3); the run without the LoRA is far.
#[test]
fn sdxl_loras_in_both_formats_match_diffusers() {
    use sd_lora::{load_lora, LoraSpec, Targets};
    use sd_plugins_api::WeightPatch;
    use std::sync::Arc;
    let exp = expected("sdxl_lora.safetensors");
    let weight = get(&exp, "weight").to_scalar::<f32>().unwrap() as f64;
    let targets = Targets::from_model(&model_dir("sdxl")).unwrap();
    for file in ["sdxl_peft.safetensors", "sdxl_kohya.safetensors"] {
        let spec = LoraSpec {
            path: fixtures().join("loras-sdxl").join(file),
            unet_weight: weight,
            te_weight: weight,
        };
        let (patch, report) = load_lora(&spec, &targets).unwrap();
        assert!(report.unmatched.is_empty(), "{file}: {}", report.summary());
        assert!(report.te_targets > 0 && report.unet_targets > 0, "{file}");
        let patches = vec![Arc::new(patch) as Arc<dyn WeightPatch>];
        let sd =
            StableDiffusion::load(&model_dir("sdxl"), &Device::Cpu, DType::F32, &patches).unwrap();
        let mut req = sd_pipeline::GenerateRequest::new("a red circle on a blue background");
        req.negative_prompt = Some("blurry, lowres".into());
        (req.width, req.height, req.steps, req.cfg_scale) = (64, 48, 4, 5.0);
        req.sampler = "euler".parse().unwrap();
        req.schedule = "normal".parse().unwrap();
        req.noise = Some(get(&exp, "noise").clone());
        let latents = sd
            .denoise(&req, &mut HookSet::new(), &mut sd_tests::Replay::new(None))
            .unwrap();
        assert_close(file, &latents, get(&exp, "latents"), 1e-3);
    }
    assert!(max_abs_diff(get(&exp, "latents_without"), get(&exp, "latents")) > 1e-2);
}

/// An SDXL LoRA on an SD1 model is refused naming both families (a tiny SD1 LoRA's text width
/// names no family, so the reverse is the same rule, `families_differ`);
/// `lora inspect` says the family.
#[test]
fn loras_of_the_other_family_are_refused() {
    use sd_lora::{load_lora, LoraFile, LoraSpec, Targets};
    let spec = |f: &str| LoraSpec {
        path: fixtures().join("loras-sdxl").join(f),
        unet_weight: 1.0,
        te_weight: 1.0,
    };
    let sd1 = Targets::from_model(&model_dir("sd1")).unwrap();
    let e = load_lora(&spec("sdxl_kohya.safetensors"), &sd1)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("an SDXL LoRA cannot patch an SD 1.x/2.x model"),
        "{e}"
    );
    assert!(e.contains("sdxl_kohya.safetensors"), "{e}");
    let d = LoraFile::load(&fixtures().join("loras-sdxl/sdxl_peft.safetensors"))
        .unwrap()
        .describe(std::path::Path::new("x"));
    assert!(d.contains("family: SDXL"), "{d}");
}

/// The base hands the steps after the switch to the refiner (bigG alone, aesthetic-score time
/// ids): diffusers' `denoising_end` / `denoising_start` hand-off with Euler (1e-3); the base
/// alone is far.
#[test]
fn sdxl_refiner_switch_matches_diffusers() {
    let exp = expected("sdxl_refiner.safetensors");
    let load =
        |m: &str| StableDiffusion::load(&model_dir(m), &Device::Cpu, DType::F32, &[]).unwrap();
    let (base, refiner) = (load("sdxl"), load("sdxl-refiner"));
    assert!(refiner.is_sdxl() && refiner.requires_aesthetics_score);
    let mut req = sd_pipeline::GenerateRequest::new("a red circle on a blue background");
    req.negative_prompt = Some("blurry, lowres".into());
    (req.width, req.height, req.steps, req.cfg_scale) = (64, 64, 6, 5.0);
    req.sampler = "euler".parse().unwrap();
    req.schedule = "normal".parse().unwrap();
    req.noise = Some(get(&exp, "noise").clone());
    let switch = get(&exp, "switch").to_scalar::<f32>().unwrap() as f64;
    let latents = base
        .denoise_refined(
            &req,
            Some((&refiner, switch)),
            &mut HookSet::new(),
            &mut sd_tests::Replay::new(None),
        )
        .unwrap();
    assert_close("refiner", &latents, get(&exp, "latents"), 1e-3);
    assert!(max_abs_diff(get(&exp, "latents_without"), get(&exp, "latents")) > 1e-2);
    // an SD1 model is no refiner
    let e = base
        .denoise_refined(
            &req,
            Some((&load("sd1"), 0.8)),
            &mut HookSet::new(),
            &mut sd_tests::Replay::new(None),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("no SDXL refiner"), "{e}");
    // the refiner as a single file (bigG under conditioner.embedders.0.model.) hands over alike
    let file = std::env::temp_dir().join(format!("refiner-{}.safetensors", std::process::id()));
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(file.with_extension("yaml"));
    sd_pipeline::loading::single_file::convert::to_single_file(
        &model_dir("sdxl-refiner"),
        &file,
        true,
    )
    .unwrap();
    let single = StableDiffusion::load(&file, &Device::Cpu, DType::F32, &[]).unwrap();
    assert!(single.requires_aesthetics_score && single.text_encoder_2.is_none());
    let again = base
        .denoise_refined(
            &req,
            Some((&single, switch)),
            &mut HookSet::new(),
            &mut sd_tests::Replay::new(None),
        )
        .unwrap();
    assert_eq!(
        max_abs_diff(&again, &latents),
        0.0,
        "the refiner's single file"
    );
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(file.with_extension("yaml"));
}

/// The sha256 of bytes, hex, as make_single_file_fixtures.py hashes a tensor's f16 bytes.
fn sha256(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The tiny SDXL as an A1111/ComfyUI single file: `model convert` writes the keys, shapes and
/// tensors diffusers' own `convert_diffusers_to_original_sdxl.py` wrote (recorded by hash in
/// single/sdxl_keys.json); with that script's sgm yaml beside it, or with the one `convert`
/// writes, it loads as SDXL and gives the folder's latents and images bit for bit (every
/// weight is fp16-exact); converted back to a folder it does too; a LoRA binds to it.
#[test]
fn an_sdxl_single_file_equals_its_folder() {
    let exp = expected("sdxl_txt2img_euler.safetensors");
    let case = cases()
        .into_iter()
        .find(|c| c["name"] == "sdxl_txt2img_euler")
        .unwrap();
    let req = case_request(&case, &exp);
    let run = |sd: &StableDiffusion| {
        let out = sd
            .generate(&req, &mut HookSet::new(), &mut sd_tests::Replay::new(None))
            .unwrap();
        (out.latents, out.images)
    };
    let load =
        |p: &std::path::Path| StableDiffusion::load(p, &Device::Cpu, DType::F32, &[]).unwrap();
    let convert = sd_pipeline::loading::single_file::convert::to_single_file;
    let dir = std::env::temp_dir().join(format!("sdxl-single-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("sdxl.safetensors");
    convert(&model_dir("sdxl"), &file, true).unwrap();
    // what diffusers' script wrote, key for key and tensor for tensor
    let want: serde_json::Map<String, serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("models/single/sdxl_keys.json")).unwrap(),
    )
    .unwrap();
    let bytes = std::fs::read(&file).unwrap();
    let ours = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut keys: Vec<String> = ours.names().into_iter().map(String::from).collect();
    keys.sort();
    assert_eq!(
        keys.iter().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for k in &keys {
        let t = ours.tensor(k).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::F16, "{k}");
        assert_eq!(serde_json::json!(t.shape()), want[k][0], "{k} shape");
        assert_eq!(sha256(t.data()), want[k][1].as_str().unwrap(), "{k} values");
    }
    let (la, ia) = run(&load(&model_dir("sdxl")));
    let single = load(&file);
    assert!(single.is_sdxl() && single.force_zeros_for_empty_prompt);
    let (lb, ib) = run(&single);
    assert_eq!(max_abs_diff(&la, &lb), 0.0, "latents");
    assert_eq!(max_abs_diff(&ia, &ib), 0.0, "images");
    assert_close("single file", &lb, get(&exp, "latents"), 1e-3);
    // sgm's own yaml (sd_xl_base.yaml at the tiny sizes) as the sidecar
    std::fs::copy(
        fixtures().join("models/single/sdxl.yaml"),
        file.with_extension("yaml"),
    )
    .unwrap();
    let (lc, _) = run(&load(&file));
    assert_eq!(max_abs_diff(&la, &lc), 0.0, "with sgm's yaml");
    // single file -> diffusers folder
    let back = dir.join("folder");
    sd_pipeline::loading::single_file::convert::to_diffusers(&file, &back, false).unwrap();
    let (ld, id) = run(&load(&back));
    assert_eq!(max_abs_diff(&la, &ld), 0.0, "converted latents");
    assert_eq!(max_abs_diff(&ia, &id), 0.0, "converted images");
    // a kohya SDXL LoRA binds to every module of the single file too
    let targets = sd_lora::Targets::from_model(&file).unwrap();
    let spec = sd_lora::LoraSpec {
        path: fixtures().join("loras-sdxl/sdxl_kohya.safetensors"),
        unet_weight: 1.0,
        te_weight: 1.0,
    };
    let (_, report) = sd_lora::load_lora(&spec, &targets).unwrap();
    assert!(report.unmatched.is_empty(), "{}", report.summary());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A1111's emphasis, BREAK and 75-token chunks on both SDXL encoders (each encoder's chunks
/// weighted and mean-restored on its own, side by side; pooled from bigG's first chunk) against
/// the same rules in PyTorch on the fixture's encoders (5e-4 absolute: the mean restoration
/// takes values to about 30, where f32 rounding of the chunk means is ~1e-5 relative).
#[test]
fn sdxl_prompt_weighting_applies_to_both_encoders() {
    let exp = expected("sdxl_emphasis.safetensors");
    let prompts: Vec<String> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("expected/sdxl_emphasis_prompts.json")).unwrap(),
    )
    .unwrap();
    let sd = StableDiffusion::load(&model_dir("sdxl"), &Device::Cpu, DType::F32, &[]).unwrap();
    let (te2, tok2) = sd.text_encoder_2.as_ref().unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let d = sd_pipeline::text::encode_prompts_dual(
            &[(&sd.tokenizer, &sd.text_encoder), (tok2, te2)],
            p,
            None,
            1,
            &Device::Cpu,
        )
        .unwrap();
        assert_close(p, &d.cond, get(&exp, &format!("hidden_{i}")), 5e-4);
        assert_close(p, &d.pooled, get(&exp, &format!("pooled_{i}")), 1e-4);
    }
}

/// In f16 an SDXL model's VAE runs in f32 when its config says `force_upcast` (diffusers'
/// `needs_upcasting`: the original SDXL VAE overflows f16); SD 1.x keeps f16 throughout, and
/// a VAE whose config says `force_upcast: false` (the fp16-fix VAE) stays f16.
#[test]
fn an_sdxl_vae_is_upcast_in_f16_as_diffusers_does() {
    let load =
        |m: &str| StableDiffusion::load(&model_dir(m), &Device::Cpu, DType::F16, &[]).unwrap();
    let sdxl = load("sdxl");
    assert_eq!((sdxl.dtype, sdxl.vae_dtype), (DType::F16, DType::F32));
    let sd1 = load("sd1");
    assert_eq!((sd1.dtype, sd1.vae_dtype), (DType::F16, DType::F16));
    let cfg: sd_pipeline::model::config::VaeConfigFile =
        serde_json::from_str(r#"{"force_upcast": false}"#).unwrap();
    let cfg =
        sd_pipeline::model::config::VaeConfig::from_raw(&cfg, std::path::Path::new("x")).unwrap();
    assert_eq!(cfg.run_dtype(DType::F16, true), DType::F16);
    // the decode takes f32 latents through the f32 VAE
    let lat = candle_core::Tensor::zeros((1, 4, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let img = sdxl.decode_latents(&lat).unwrap();
    assert_eq!(img.dims(), &[1, 3, 32, 32]);
}

/// LyCORIS modules on SDXL bind through the same names: a LoHa on a bigG projection
/// (`lora_te2_`) and a LoKr on a UNet attention (kohya's LDM name) patch exactly those weights
/// with the published formulas (checked against lycoris-lora itself on SD1, lora.rs).
#[test]
fn lycoris_modules_bind_to_sdxl() {
    use candle_core::Tensor;
    use sd_plugins_api::{ModelPart, WeightPatch};
    let dev = Device::Cpu;
    let r = |s: &[usize], seed: u64| {
        let n: usize = s.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (((i as u64 + 1) * (seed * 7919 + 13)) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        Tensor::from_vec(v, s, &dev).unwrap()
    };
    let te2 = "lora_te2_text_model_encoder_layers_1_self_attn_q_proj";
    let unet = "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q";
    let (w1a, w1b, w2a, w2b) = (
        r(&[16, 2], 1),
        r(&[2, 16], 2),
        r(&[16, 2], 3),
        r(&[2, 16], 4),
    );
    let (k1, k2) = (r(&[2, 2], 5), r(&[16, 16], 6));
    let mut t = std::collections::HashMap::new();
    for (k, v) in [
        (format!("{te2}.hada_w1_a"), &w1a),
        (format!("{te2}.hada_w1_b"), &w1b),
        (format!("{te2}.hada_w2_a"), &w2a),
        (format!("{te2}.hada_w2_b"), &w2b),
        (format!("{unet}.lokr_w1"), &k1),
        (format!("{unet}.lokr_w2"), &k2),
    ] {
        t.insert(k, v.clone());
    }
    t.insert(format!("{te2}.alpha"), Tensor::new(1f32, &dev).unwrap());
    let dir = std::env::temp_dir().join(format!("sdxl-lycoris-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("ly.safetensors");
    candle_core::safetensors::save(&t, &file).unwrap();
    let targets = sd_lora::Targets::from_model(&model_dir("sdxl")).unwrap();
    let spec = sd_lora::LoraSpec {
        path: file.clone(),
        unet_weight: 0.5,
        te_weight: 0.5,
    };
    let (patch, report) = sd_lora::load_lora(&spec, &targets).unwrap();
    assert!(report.unmatched.is_empty(), "{}", report.summary());
    assert_eq!((report.te_targets, report.unet_targets), (1, 1));
    let base = Tensor::zeros((16, 16), DType::F32, &dev).unwrap();
    // LoHa: (w1a @ w1b) * (w2a @ w2b) * alpha / rank, times the weight
    let d = patch
        .delta(
            ModelPart::TextEncoder2,
            "text_model.encoder.layers.1.self_attn.q_proj.weight",
            &base,
        )
        .unwrap()
        .expect("the bigG projection is patched");
    let want = ((w1a.matmul(&w1b).unwrap() * w2a.matmul(&w2b).unwrap()).unwrap() * 0.25).unwrap();
    assert!(max_abs_diff(&d, &want) < 1e-6);
    // LoKr with whole factors: kron(w1, w2), no alpha scaling
    let base = Tensor::zeros((32, 32), DType::F32, &dev).unwrap();
    let d = patch
        .delta(
            ModelPart::Unet,
            "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q.weight",
            &base,
        )
        .unwrap()
        .expect("the UNet attention is patched");
    let kron = k1
        .reshape((2, 1, 2, 1))
        .unwrap()
        .broadcast_mul(&k2.reshape((1, 16, 1, 16)).unwrap())
        .unwrap()
        .reshape((32, 32))
        .unwrap();
    assert!(max_abs_diff(&d, &(kron * 0.5).unwrap()) < 1e-6);
    let _ = std::fs::remove_dir_all(dir);
}
