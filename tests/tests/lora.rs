//! LoRA against diffusers (`load_lora_weights` + `fuse_lora`) and the published formulas.
//! Tolerances: 1e-4 for single forwards and deltas, 1e-3 for the 4-step pipeline (see
//! pipelines.rs).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use sd_lora::{load_lora, merge_into, LoraFile, LoraPatch, LoraSpec, Targets};
use sd_pipeline::text::encode_prompts;
use sd_pipeline::{GenerateRequest, StableDiffusion};
use sd_plugins_api::{HookSet, WeightPatch};
use sd_tests::{assert_close, expected, fixtures, get, max_abs_diff, model_dir, Replay};

fn spec(file: &str, w: f64) -> LoraSpec {
    LoraSpec {
        path: fixtures().join("loras").join(file),
        unet_weight: w,
        te_weight: w,
    }
}

fn patched(specs: &[LoraSpec]) -> StableDiffusion {
    let targets = Targets::from_model(&model_dir("sd1")).unwrap();
    let patches: Vec<Arc<dyn WeightPatch>> = specs
        .iter()
        .map(|s| {
            let (p, report) = load_lora(s, &targets).unwrap();
            assert!(report.unmatched.is_empty(), "{}", report.summary());
            Arc::new(p) as Arc<dyn WeightPatch>
        })
        .collect();
    StableDiffusion::load(&model_dir("sd1"), &Device::Cpu, DType::F32, &patches).unwrap()
}

/// The UNet's output on the inputs of the `unet_sd1` fixture.
fn unet_on_fixture(sd: &StableDiffusion) -> Tensor {
    let u = expected("unet_sd1.safetensors");
    sd.unet
        .forward(
            get(&u, "sample"),
            get(&u, "timestep"),
            get(&u, "encoder_hidden_states"),
            None,
        )
        .unwrap()
}

fn check(sd: &StableDiffusion, tag: &str) {
    let exp = expected("lora_sd1.safetensors");
    let u = expected("unet_sd1.safetensors");
    let out = unet_on_fixture(sd);
    assert_close(
        &format!("{tag} unet"),
        &out,
        get(&exp, &format!("{tag}_unet_out")),
        1e-4,
    );
    // the LoRA really changed the output
    assert!(
        max_abs_diff(&out, get(&u, "out")) > 1e-2,
        "{tag}: no effect"
    );
    let (h, _) = encode_prompts(
        &sd.tokenizer,
        &sd.text_encoder,
        "a photo of a cat",
        None,
        1,
        &Device::Cpu,
    )
    .unwrap();
    assert_close(
        &format!("{tag} text encoder"),
        &h,
        get(&exp, &format!("{tag}_te_hidden")),
        1e-4,
    );
    // and the text encoder's part of the LoRA really changed the text encoder
    let base = patched(&[]);
    let (h0, _) = encode_prompts(
        &base.tokenizer,
        &base.text_encoder,
        "a photo of a cat",
        None,
        1,
        &Device::Cpu,
    )
    .unwrap();
    assert!(
        max_abs_diff(&h, &h0) > 1e-3,
        "{tag}: no text encoder effect"
    );
}

#[test]
fn peft_format_matches_diffusers_fuse_lora() {
    check(&patched(&[spec("lora_a_peft.safetensors", 0.7)]), "a");
}

#[test]
fn kohya_format_matches_diffusers_fuse_lora() {
    check(&patched(&[spec("lora_b_kohya.safetensors", 0.5)]), "b");
}

#[test]
fn ldm_style_kohya_names_patch_the_same_weights() {
    let sd = patched(&[spec("lora_b_ldm_names.safetensors", 0.5)]);
    let exp = expected("lora_sd1.safetensors");
    let out = unet_on_fixture(&sd);
    assert_close("ldm-named unet", &out, get(&exp, "b_unet_out"), 1e-4);
}

#[test]
fn two_loras_in_a_pipeline_match_diffusers() {
    let sd = patched(&[
        spec("lora_a_peft.safetensors", 0.7),
        spec("lora_b_kohya.safetensors", 0.5),
    ]);
    check(&sd, "ab");
    let exp = expected("lora_sd1.safetensors");
    let mut req = GenerateRequest::new("a red circle on a blue background");
    req.negative_prompt = Some("blurry, lowres".into());
    (req.width, req.height, req.steps, req.cfg_scale) = (64, 64, 4, 7.5);
    req.sampler = "euler".parse().unwrap();
    req.schedule = "normal".parse().unwrap();
    req.noise = Some(get(&exp, "ab_noise").clone());
    let latents = sd
        .denoise(&req, &mut HookSet::new(), &mut Replay::new(None))
        .unwrap();
    assert_close("two-LoRA pipeline", &latents, get(&exp, "ab_latents"), 1e-3);
}

/// LoHa, LoKr and a kohya alpha != rank against the weight change lycoris-lora's own modules
/// apply (make_reference_fixtures.py), at multiplier 1 and, through the loader, 0.5.
#[test]
fn lycoris_and_per_module_alpha_match_lycoris_itself() {
    let exp = expected("lycoris_reference.safetensors");
    let targets = Targets::from_model(&model_dir("sd1")).unwrap();
    let ly = LoraFile::load(&fixtures().join("loras/lycoris.safetensors")).unwrap();
    assert_eq!(ly.modules.len(), 2);
    let q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let c = "lora_unet_down_blocks_1_resnets_0_conv1";
    let shape = |k: &str| targets.get(k).unwrap().shape.clone();
    assert_close(
        "LoHa",
        &ly.modules[q].delta(&shape(q)).unwrap(),
        get(&exp, "loha_delta"),
        1e-5,
    );
    assert_close(
        "LoKr",
        &ly.modules[c].delta(&shape(c)).unwrap(),
        get(&exp, "lokr_delta"),
        1e-5,
    );
    let k = LoraFile::load(&fixtures().join("loras/kohya_alpha.safetensors")).unwrap();
    assert_close(
        "kohya alpha/rank",
        &k.modules[q].delta(&shape(q)).unwrap(),
        get(&exp, "alpha_delta"),
        1e-5,
    );
    // patched through the loader: W + delta x multiplier
    let (p, _) = load_lora(
        &LoraSpec {
            path: fixtures().join("loras/lycoris.safetensors"),
            unet_weight: 0.5,
            te_weight: 0.5,
        },
        &targets,
    )
    .unwrap();
    let base = Tensor::zeros(shape(c), DType::F32, &Device::Cpu).unwrap();
    let d = p
        .delta(
            sd_plugins_api::ModelPart::Unet,
            "down_blocks.1.resnets.0.conv1.weight",
            &base,
        )
        .unwrap()
        .unwrap();
    assert_close("LoKr x 0.5", &d, get(&exp, "lokr_delta_half"), 1e-5);
}

#[test]
fn merge_round_trip_gives_the_same_latents() {
    let specs = [
        spec("lora_a_peft.safetensors", 0.7),
        spec("lora_b_kohya.safetensors", 0.5),
    ];
    let targets = Targets::from_model(&model_dir("sd1")).unwrap();
    let patches: Vec<LoraPatch> = specs
        .iter()
        .map(|s| load_lora(s, &targets).unwrap().0)
        .collect();
    let out = std::env::temp_dir().join(format!("lora-merge-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    merge_into(&model_dir("sd1"), &patches, &out).unwrap();
    let merged = StableDiffusion::load(&out, &Device::Cpu, DType::F32, &[]).unwrap();
    let live = patched(&specs);
    let mut req = GenerateRequest::new("a red circle");
    (req.width, req.height, req.steps) = (64, 64, 3);
    req.noise = Some(Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &Device::Cpu).unwrap());
    let a = merged
        .denoise(&req, &mut HookSet::new(), &mut Replay::new(None))
        .unwrap();
    let b = live
        .denoise(&req, &mut HookSet::new(), &mut Replay::new(None))
        .unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-5, "{}", max_abs_diff(&a, &b));
    assert!(
        merge_into(&model_dir("sd1"), &patches, &out).is_err(),
        "existing output refused"
    );
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn bad_files_are_clear_errors_and_unmatched_keys_are_reported() {
    let targets = Targets::from_model(&model_dir("sd1")).unwrap();
    // not a LoRA
    let e = load_lora(
        &LoraSpec::parse(
            model_dir("sd1")
                .join("unet/diffusion_pytorch_model.safetensors")
                .to_str()
                .unwrap(),
        )
        .unwrap(),
        &targets,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("not a LoRA"), "{e}");
    let dir = std::env::temp_dir().join(format!("lora-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dev = Device::Cpu;
    let t = |s: &[usize]| Tensor::ones(s, DType::F32, &dev).unwrap();
    let q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    // inconsistent shapes for the model
    let bad = dir.join("bad.safetensors");
    candle_core::safetensors::save(
        &[
            (format!("{q}.lora_down.weight"), t(&[2, 5])),
            (format!("{q}.lora_up.weight"), t(&[16, 2])),
        ]
        .into_iter()
        .collect(),
        &bad,
    )
    .unwrap();
    let e = load_lora(&LoraSpec::parse(bad.to_str().unwrap()).unwrap(), &targets)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("bad.safetensors") && e.contains(q), "{e}");
    // keys that match nothing are reported
    let extra = dir.join("extra.safetensors");
    candle_core::safetensors::save(
        &[
            (format!("{q}.lora_down.weight"), t(&[2, 16])),
            (format!("{q}.lora_up.weight"), t(&[16, 2])),
            (
                "lora_unet_nonexistent_layer.lora_down.weight".to_string(),
                t(&[2, 4]),
            ),
            (
                "lora_unet_nonexistent_layer.lora_up.weight".to_string(),
                t(&[4, 2]),
            ),
        ]
        .into_iter()
        .collect(),
        &extra,
    )
    .unwrap();
    let (_, report) =
        load_lora(&LoraSpec::parse(extra.to_str().unwrap()).unwrap(), &targets).unwrap();
    assert_eq!(
        report.unmatched,
        vec!["lora_unet_nonexistent_layer".to_string()]
    );
    assert!(report.summary().contains("1 keys match nothing"));
    std::fs::remove_dir_all(&dir).unwrap();
    // PATH[:WEIGHT]
    let s = LoraSpec::parse("dir/x.safetensors:0.6").unwrap();
    assert_eq!((s.unet_weight, s.te_weight), (0.6, 0.6));
    assert_eq!(LoraSpec::parse("C:x.safetensors").unwrap().unet_weight, 1.0);
}
