//! ControlNet against diffusers: one forward (1e-4), both checkpoint formats, and full 4-step
//! pipelines with one unit, two units with weights and windows, guess mode, v-prediction,
//! img2img and both kinds of inpainting (final latents, 1e-3; see pipelines.rs). Plus the
//! invariants: a freshly initialised ControlNet changes nothing, modes, masks, bad input.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use sd_controlnet::init::write_initial_controlnet;
use sd_controlnet::{
    load_controlnet, ControlMode, ControlNetHook, ControlNetModel, ControlUnit, Unit, UnitSpec,
};
use sd_pipeline::{GenerateRequest, StableDiffusion};
use sd_plugins_api::HookSet;
use sd_tests::{
    assert_close, case_request, expected, fixtures, get, max_abs_diff, model_dir, Replay,
};
use serde_json::Value;

fn sd(name: &str) -> StableDiffusion {
    StableDiffusion::load(&model_dir(name), &Device::Cpu, DType::F32, &[]).unwrap()
}

fn net(path: &str, base: &StableDiffusion) -> ControlNetModel {
    load_controlnet(
        &fixtures().join(path),
        base.unet.config(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
}

fn forward(cn: &ControlNetModel) -> sd_plugins_api::Residuals {
    let exp = expected("controlnet_sd1.safetensors");
    cn.forward(
        get(&exp, "sample"),
        get(&exp, "timestep"),
        get(&exp, "encoder_hidden_states"),
        get(&exp, "cond"),
    )
    .unwrap()
}

/// Residuals against what diffusers computes: the folder by `from_pretrained`
/// (controlnet_sd1), and the lllyasviel-format single file read by diffusers' own
/// `ControlNetModel.from_single_file` key conversion (make_reference_fixtures.py).
#[test]
fn controlnet_forward_matches_diffusers() {
    let base = sd("sd1");
    for (model, exp) in [
        ("models/controlnet-sd1", "controlnet_sd1.safetensors"),
        (
            "models/controlnet-sd1-ldm.safetensors",
            "controlnet_single_file_diffusers.safetensors",
        ),
    ] {
        residuals_match(&net(model, &base), &expected(exp), base.unet.num_skips());
    }
}

fn residuals_match(cn: &ControlNetModel, exp: &HashMap<String, Tensor>, skips: usize) {
    let r = forward(cn);
    assert_eq!(r.down.len(), skips);
    for (i, d) in r.down.iter().enumerate() {
        assert_close(
            &format!("down {i}"),
            d,
            get(exp, &format!("down_{i}")),
            1e-4,
        );
    }
    assert_close("mid", &r.mid, get(exp, "mid"), 1e-4);
}

#[test]
fn both_checkpoint_formats_give_identical_residuals() {
    let base = sd("sd1");
    let a = forward(&net("models/controlnet-sd1", &base));
    let b = forward(&net("models/controlnet-sd1-ldm.safetensors", &base));
    for (x, y) in sd_tests::paired("down residuals", &a.down, &b.down) {
        assert_eq!(max_abs_diff(x, y), 0.0);
    }
    assert_eq!(max_abs_diff(&a.mid, &b.mid), 0.0);
}

pub(crate) fn units(case: &Value, base: &StableDiffusion) -> Vec<Unit> {
    let mut cache = Vec::new();
    case["control"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let mut s = UnitSpec::new(
                fixtures().join(c["model"].as_str().unwrap()),
                fixtures().join(c["image"].as_str().unwrap()),
            );
            s.weight = c["weight"].as_f64().unwrap_or(1.0);
            s.start = c["start"].as_f64().unwrap_or(0.0);
            s.end = c["end"].as_f64().unwrap_or(1.0);
            if let Some(m) = c["mode"].as_str() {
                s.mode = m.parse().unwrap();
            }
            s.control_type = c["type"].as_str().map(Into::into);
            s.build(
                base,
                case["width"].as_u64().unwrap() as usize,
                case["height"].as_u64().unwrap() as usize,
                &mut cache,
                &sd_preprocessors::registry(),
            )
            .unwrap()
        })
        .collect()
}

#[test]
fn controlnet_pipelines_match_diffusers() {
    let text = std::fs::read_to_string(fixtures().join("controlnet_cases.json")).unwrap();
    let cases: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert!(cases.len() >= 7);
    let mut models: HashMap<String, StableDiffusion> = HashMap::new();
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let model = case["model"].as_str().unwrap().to_string();
        let base = models.entry(model.clone()).or_insert_with(|| sd(&model));
        let exp = expected(&format!("pipe_{name}.safetensors"));
        let req = case_request(case, &exp);
        let mut hooks = HookSet::new();
        hooks.push(Box::new(ControlNetHook::new(units(case, base))));
        let mut replay = Replay::new(exp.get("step_noise"));
        let latents = base.denoise(&req, &mut hooks, &mut replay).unwrap();
        assert_close(name, &latents, get(&exp, "latents"), 1e-3);
        // The ControlNet really acted: without it the result is far off.
        let plain = base
            .denoise(
                &req,
                &mut HookSet::new(),
                &mut Replay::new(exp.get("step_noise")),
            )
            .unwrap();
        assert!(
            max_abs_diff(&plain, get(&exp, "latents")) > 1e-2,
            "{name}: control had no effect"
        );
    }
}

fn simple_request() -> GenerateRequest {
    let mut r = GenerateRequest::new("a red circle");
    r.negative_prompt = Some("blurry".into());
    r.width = 64;
    r.height = 64;
    r.steps = 3;
    r.noise = Some(Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &Device::Cpu).unwrap());
    r
}

fn run(base: &StableDiffusion, req: &GenerateRequest, units: Vec<ControlUnit>) -> Tensor {
    let mut hooks = HookSet::new();
    if !units.is_empty() {
        hooks.push(Box::new(ControlNetHook::new(units)));
    }
    base.denoise(req, &mut hooks, &mut Replay::new(None))
        .unwrap()
}

fn image_a() -> Tensor {
    sd_controlnet::control_image::load_control_image(
        &fixtures().join("inputs/control_a.png"),
        64,
        64,
        sd_controlnet::ResizeMode::Just,
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn a_freshly_initialised_controlnet_changes_nothing() {
    let base = sd("sd1");
    let dir = std::env::temp_dir().join(format!("cn-init-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write_initial_controlnet(&model_dir("sd1"), &dir, 0).unwrap();
    // weight by weight: the encoder is a copy of the base UNet's (diffusers' `from_unet`), the
    // zero convolutions are zero; only the control-image embedding is new
    let cn_w = candle_core::safetensors::load(
        dir.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let unet_w = candle_core::safetensors::load(
        model_dir("sd1").join("unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut copied = 0;
    for (k, t) in &cn_w {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        match unet_w.get(k) {
            Some(u) => {
                assert_eq!(max_abs_diff(&f32(t), &f32(u)), 0.0, "{k}: not the base's");
                copied += 1;
            }
            None if k.starts_with("controlnet_down_blocks.")
                || k.starts_with("controlnet_mid_block.") =>
            {
                assert_eq!(
                    sd_tests::max_abs(&f32(t)),
                    0.0,
                    "{k}: not a zero convolution"
                );
            }
            None => assert!(
                k.starts_with("controlnet_cond_embedding."),
                "{k}: neither the base's nor the ControlNet's own"
            ),
        }
    }
    let encoder = unet_w
        .keys()
        .filter(|k| {
            !k.starts_with("up_blocks.")
                && !k.starts_with("conv_norm_out.")
                && !k.starts_with("conv_out.")
        })
        .count();
    assert_eq!(
        copied, encoder,
        "every encoder weight of the base is copied"
    );
    let cn = Arc::new(load_controlnet(&dir, base.unet.config(), &Device::Cpu, DType::F32).unwrap());
    // the encoder is the base UNet's, the zero convolutions are zero
    let r = forward(&cn);
    assert!(r
        .down
        .iter()
        .all(|d| max_abs_diff(d, &d.zeros_like().unwrap()) == 0.0));
    let req = simple_request();
    let plain = run(&base, &req, vec![]);
    let mut unit = ControlUnit::new(cn, image_a());
    unit.weight = 1.7;
    let with = run(&base, &req, vec![unit]);
    assert_eq!(max_abs_diff(&plain, &with), 0.0, "bit-identical");
    // writing over an existing folder is refused and leaves it alone
    assert!(write_initial_controlnet(&model_dir("sd1"), &dir, 0).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `mode=prompt` is sd-webui-controlnet's "My prompt is more important": its soft-injection
/// scales (evaluated from the extension's hook.py by make_reference_fixtures.py) on both halves,
/// the first as many as the net has residuals.
#[test]
fn prompt_mode_uses_the_extension_soft_injection_scales_on_both_halves() {
    let f: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("expected/a1111_control_scales.json")).unwrap(),
    )
    .unwrap();
    let weight = f["weight"].as_f64().unwrap();
    let ext: Vec<f64> = f["scales"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(ext.len(), 13);
    let base = sd("sd1");
    let cn = Arc::new(net("models/controlnet-sd1", &base));
    let n = cn.num_down() + 1;
    let mut prompt = ControlUnit::new(cn.clone(), image_a());
    prompt.mode = ControlMode::Prompt;
    prompt.weight = weight;
    for (i, (got, want)) in sd_tests::paired("scales", &prompt.scales(), &ext[..n]).enumerate() {
        assert!((got - want).abs() < 1e-12, "residual {i}: {got} vs {want}");
    }
    // the same as a plain unit whose layer weights are the extension's scales
    let mut manual = ControlUnit::new(cn.clone(), image_a());
    manual.layer_weights = Some(ext[..n].iter().map(|s| s / weight).collect());
    manual.weight = weight;
    let req = simple_request();
    let a = run(&base, &req, vec![prompt]);
    let b = run(&base, &req, vec![manual]);
    assert!(max_abs_diff(&a, &b) < 1e-5, "{}", max_abs_diff(&a, &b));
    let plain = run(&base, &req, vec![ControlUnit::new(cn, image_a())]);
    assert!(max_abs_diff(&a, &plain) > 1e-3);
}

#[test]
fn unit_masks_limit_where_control_applies() {
    let base = sd("sd1");
    let cn = Arc::new(net("models/controlnet-sd1", &base));
    let req = simple_request();
    let plain = run(&base, &req, vec![]);
    let full = run(&base, &req, vec![ControlUnit::new(cn.clone(), image_a())]);
    let mut zero = ControlUnit::new(cn.clone(), image_a());
    zero.mask = Some(Tensor::zeros((1, 1, 64, 64), DType::F32, &Device::Cpu).unwrap());
    assert_eq!(max_abs_diff(&run(&base, &req, vec![zero]), &plain), 0.0);
    let mut one = ControlUnit::new(cn, image_a());
    one.mask = Some(Tensor::ones((1, 1, 64, 64), DType::F32, &Device::Cpu).unwrap());
    assert_eq!(max_abs_diff(&run(&base, &req, vec![one]), &full), 0.0);
}

/// A mask covering part of the image keeps each residual where the mask is 1 and zeroes it
/// where it is 0, at every residual's own resolution (nearest resampling of the mask), on a
/// non-square generation: the left 24 of 48 columns, the top 32 of 64 rows.
/// A unit mask (non-square, partial, a grey band, colour in the other channels) as
/// sd-webui-controlnet applies it: its first channel, bilinear to each residual's size
/// (`apply_effective_region_mask`, run by make_reference_fixtures.py), times the residual.
#[test]
fn a_partial_unit_mask_scales_the_residuals_as_the_extension_does() {
    use sd_plugins_api::{Hook, ResidualInput, StepInfo};
    let exp = expected("a1111_region_mask.safetensors");
    let base = sd("sd1");
    let cn = Arc::new(net("models/controlnet-sd1", &base));
    let dev = Device::Cpu;
    let img = get(&exp, "image");
    let (h, w, _) = img.dims3().unwrap();
    let dir = std::env::temp_dir().join(format!("cn-region-mask-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("mask.png");
    image::RgbImage::from_raw(
        w as u32,
        h as u32,
        img.flatten_all().unwrap().to_vec1::<u8>().unwrap(),
    )
    .unwrap()
    .save(&file)
    .unwrap();
    let mask = sd_controlnet::control_image::load_unit_mask(&file, &dev).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(mask.dims(), &[1, 1, h, w]);

    let image = Tensor::rand(0f32, 1.0, (1, 3, h, w), &dev).unwrap();
    let f = base.vae_scale_factor();
    let latents = Tensor::randn(0f32, 1.0, (1, 4, h / f, w / f), &dev).unwrap();
    let ctx = Tensor::randn(0f32, 1.0, (1, 77, 8), &dev).unwrap();
    let residuals = |m: Option<Tensor>| {
        let mut unit = ControlUnit::new(cn.clone(), image.clone());
        unit.mask = m;
        let mut hook = ControlNetHook::new(vec![unit]);
        let step = StepInfo {
            index: 0,
            first_index: 0,
            total: 1,
            timestep: 500.0,
            batch: 1,
            cfg: false,
        };
        let input = ResidualInput {
            sample: &latents,
            latents: &latents,
            encoder_hidden_states: &ctx,
            added: None,
        };
        hook.residuals(&step, &input).unwrap().unwrap()
    };
    let (plain, masked) = (residuals(None), residuals(Some(mask)));
    let all: Vec<(&Tensor, &Tensor)> = sd_tests::paired("down", &plain.down, &masked.down)
        .chain([(&plain.mid, &masked.mid)])
        .collect();
    let mut partial = 0;
    for (k, (p, m)) in all.into_iter().enumerate() {
        let (_, _, rh, rw) = p.dims4().unwrap();
        let ext = get(&exp, &format!("mask_{rh}x{rw}"));
        let want = p.broadcast_mul(ext).unwrap();
        let d = max_abs_diff(m, &want);
        assert!(
            d < 1e-6,
            "residual {k} ({rh}x{rw}): {d} from the extension's masking"
        );
        let v = ext.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        partial += v.iter().filter(|&&x| x > 0.0 && x < 1.0).count();
    }
    assert!(
        partial > 0,
        "the mask's edges and band are fractional somewhere"
    );
}

#[test]
fn mismatched_or_missing_inputs_are_clear_errors() {
    let base = sd("sd1");
    let spec =
        |model: &str, image: &str| UnitSpec::new(fixtures().join(model), fixtures().join(image));
    let err = |s: UnitSpec| {
        s.build(
            &base,
            64,
            64,
            &mut Vec::new(),
            &sd_preprocessors::registry(),
        )
        .err()
        .unwrap()
        .to_string()
    };
    // layer_weights of the wrong length for this model's residual count
    let mut s = spec("models/controlnet-sd1", "inputs/control_a.png");
    s.layer_weights = Some(vec![1.0; 3]);
    let e = err(s);
    assert!(e.contains("layer_weights has 3 values"), "{e}");
    let e = err(spec("models/controlnet-sd1", "inputs/missing.png"));
    assert!(e.contains("missing.png"), "{e}");
    let e = err(spec("models/nope", "inputs/control_a.png"));
    assert!(e.contains("nope"), "{e}");
    // not a ControlNet at all
    let e = err(spec(
        "models/sd1/unet/diffusion_pytorch_model.safetensors",
        "inputs/control_a.png",
    ));
    assert!(
        e.contains("not a ControlNet") || e.contains("config"),
        "{e}"
    );
    // a ControlNet for another model family (other block channels, other text width)
    let misfit = |edit: &dyn Fn(&mut sd_controlnet::config::ControlNetConfig)| {
        let mut other = sd_controlnet::config::ControlNetConfig::from_unet(base.unet.config());
        edit(&mut other);
        let vb = candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu);
        let unit = ControlUnit::new(
            Arc::new(ControlNetModel::new(&other, vb).unwrap()),
            image_a(),
        );
        unit.validate_for(base.unet.config(), base.unet.num_skips(), 4)
            .unwrap_err()
            .to_string()
    };
    let e = misfit(&|c| c.unet.block_out_channels = vec![16, 32, 64]);
    assert!(e.contains("[16, 32, 64]"), "{e}");
    let e = misfit(&|c| c.unet.cross_attention_dim = 16);
    assert!(e.contains("width 16"), "{e}");
}

#[test]
fn single_files_load_in_every_layout() {
    let base = sd("sd1");
    let want = forward(&net("models/controlnet-sd1", &base));
    let dir = std::env::temp_dir().join(format!("cn-layouts-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // a diffusers-keyed single file with NAME.json beside it
    let src = fixtures().join("models/controlnet-sd1");
    std::fs::copy(
        src.join("diffusion_pytorch_model.safetensors"),
        dir.join("canny.safetensors"),
    )
    .unwrap();
    std::fs::copy(src.join("config.json"), dir.join("canny.json")).unwrap();
    // lllyasviel names without the control_model. prefix (an extracted ControlNet)
    let ldm = candle_core::safetensors::load(
        fixtures().join("models/controlnet-sd1-ldm.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let stripped: HashMap<String, Tensor> = ldm
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix("control_model.").map(|k| (k.to_string(), v)))
        .collect();
    candle_core::safetensors::save(&stripped, dir.join("extracted.safetensors")).unwrap();
    for f in ["canny.safetensors", "extracted.safetensors"] {
        let cn =
            load_controlnet(&dir.join(f), base.unet.config(), &Device::Cpu, DType::F32).unwrap();
        let got = forward(&cn);
        for (x, y) in sd_tests::paired(f, &got.down, &want.down) {
            assert_eq!(max_abs_diff(x, y), 0.0, "{f}");
        }
    }
    // a diffusers-keyed file without any config is a clear error
    std::fs::remove_file(dir.join("canny.json")).unwrap();
    let e = load_controlnet(
        &dir.join("canny.safetensors"),
        base.unet.config(),
        &Device::Cpu,
        DType::F32,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("canny.safetensors") && e.contains("config"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_unit_preprocessor_runs_before_the_resize() {
    // `invert` on the image equals no preprocessor on the inverted image file
    let base = sd("sd1");
    let reg = sd_preprocessors::registry();
    let img = fixtures().join("inputs/control_a.png");
    let inverted = std::env::temp_dir().join(format!("inverted-{}.png", std::process::id()));
    let mut rgb = image::open(&img).unwrap().to_rgb8();
    rgb.pixels_mut().for_each(|p| p.0 = p.0.map(|v| 255 - v));
    rgb.save(&inverted).unwrap();
    let cn = fixtures().join("models/controlnet-sd1");
    let mut with_pre = UnitSpec::new(&cn, &img);
    with_pre.preprocessor = Some(sd_controlnet::spec::PreprocessorChoice::named("invert"));
    // the 64x64 image is preprocessed at its own size at a processor resolution of 64
    with_pre.resolution = 64;
    let a = with_pre
        .build(&base, 64, 48, &mut Vec::new(), &reg)
        .unwrap();
    let b = UnitSpec::new(&cn, &inverted)
        .build(&base, 64, 48, &mut Vec::new(), &reg)
        .unwrap();
    let plain = UnitSpec::new(&cn, &img)
        .build(&base, 64, 48, &mut Vec::new(), &reg)
        .unwrap();
    assert_eq!(max_abs_diff(a.image(), b.image()), 0.0);
    assert!(max_abs_diff(a.image(), plain.image()) > 0.5);
    // parameters are checked against the preprocessor's declaration
    let mut bad = UnitSpec::new(&cn, &img);
    bad.preprocessor = Some(sd_controlnet::spec::PreprocessorChoice {
        name: "threshold".into(),
        params: vec![("threshold".into(), sd_plugins_api::ParamValue::Int(999))],
    });
    let e = bad
        .build(&base, 64, 48, &mut Vec::new(), &reg)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("threshold: 999 is out of range 0..=255"), "{e}");
    let _ = std::fs::remove_file(inverted);
}

#[test]
fn an_inpaint_unit_sends_minus_one_at_the_mask() {
    // preprocessor `inpaint` with a mask file: the unit's control tensor is diffusers'
    // make_inpaint_condition (fixture) at the generation size (64x48, the image's own).
    let base = sd("sd1");
    let reg = sd_preprocessors::registry();
    let cn = fixtures().join("models/controlnet-sd1");
    let img = fixtures().join("preprocessors/inpaint_src.png");
    let mask = fixtures().join("preprocessors/inpaint_mask.png");
    let mut unit = UnitSpec::new(&cn, &img);
    unit.preprocessor = Some(sd_controlnet::spec::PreprocessorChoice {
        name: "inpaint".into(),
        params: vec![(
            "mask".into(),
            sd_plugins_api::ParamValue::Str(mask.display().to_string()),
        )],
    });
    let u = unit.build(&base, 64, 48, &mut Vec::new(), &reg).unwrap();
    let want = candle_core::safetensors::load(
        fixtures().join("preprocessors/inpaint_control.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap()["control"]
        .permute((2, 0, 1))
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    assert_eq!(u.image().dims(), want.dims());
    assert_eq!(max_abs_diff(u.image(), &want), 0.0);
}

#[test]
fn a_keypoint_json_is_a_control_image() {
    // pose_1.json drawn by the unit equals the controlnet_aux drawing of it (fixture PNG)
    // used as the control image; with another preprocessor it is refused.
    let base = sd("sd1");
    let reg = sd_preprocessors::registry();
    let cn = fixtures().join("models/controlnet-sd1");
    let json = fixtures().join("preprocessors/pose_1.json");
    let png = fixtures().join("preprocessors/pose_1.png");
    let a = UnitSpec::new(&cn, &json)
        .build(&base, 64, 48, &mut Vec::new(), &reg)
        .unwrap();
    let mut with_pre = UnitSpec::new(&cn, &json);
    with_pre.preprocessor = Some(sd_controlnet::spec::PreprocessorChoice::named("openpose"));
    let b = with_pre
        .build(&base, 64, 48, &mut Vec::new(), &reg)
        .unwrap();
    let c = UnitSpec::new(&cn, &png)
        .build(&base, 64, 48, &mut Vec::new(), &reg)
        .unwrap();
    assert_eq!(max_abs_diff(a.image(), c.image()), 0.0);
    assert_eq!(max_abs_diff(b.image(), c.image()), 0.0);
    let mut wrong = UnitSpec::new(&cn, &json);
    wrong.preprocessor = Some(sd_controlnet::spec::PreprocessorChoice::named("canny"));
    let e = wrong
        .build(&base, 64, 48, &mut Vec::new(), &reg)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("pose_1.json") && e.contains("openpose"), "{e}");
}

#[test]
fn copies_of_one_latent_give_what_separate_calls_give() {
    // Classifier-free guidance runs one latent twice: the shared prefix (computed once) must
    // give each item what a batch-1 call gives, with a batch-1 hint serving both.
    let base = sd("sd1");
    let cn = net("models/controlnet-sd1", &base);
    let exp = expected("controlnet_sd1.safetensors");
    let (x, t, ctx) = (
        get(&exp, "sample").narrow(0, 0, 1).unwrap(),
        get(&exp, "timestep"),
        get(&exp, "encoder_hidden_states"),
    );
    let ctx2 = Tensor::cat(
        &[
            &ctx.narrow(0, 0, 1).unwrap(),
            &(ctx.narrow(0, 0, 1).unwrap() * -1.0).unwrap(),
        ],
        0,
    )
    .unwrap();
    let t1 = t.flatten_all().unwrap().narrow(0, 0, 1).unwrap();
    let hint = cn
        .embed_condition(&get(&exp, "cond").narrow(0, 0, 1).unwrap(), DType::F32)
        .unwrap();
    let both = cn
        .forward_with_hint(
            &Tensor::cat(&[&x, &x], 0).unwrap(),
            &Tensor::cat(&[&t1, &t1], 0).unwrap(),
            &ctx2,
            None,
            &hint,
        )
        .unwrap();
    for i in 0..2 {
        let one = cn
            .forward_with_hint(&x, &t1, &ctx2.narrow(0, i, 1).unwrap(), None, &hint)
            .unwrap();
        for (k, (a, b)) in both.down.iter().zip(&one.down).enumerate() {
            assert_close(
                &format!("item {i} down {k}"),
                &a.narrow(0, i, 1).unwrap(),
                b,
                1e-5,
            );
        }
        assert_close(
            &format!("item {i} mid"),
            &both.mid.narrow(0, i, 1).unwrap(),
            &one.mid,
            1e-5,
        );
    }
    // the two prompts really differ after the first cross-attention
    assert!(
        max_abs_diff(
            &both.mid.narrow(0, 0, 1).unwrap(),
            &both.mid.narrow(0, 1, 1).unwrap()
        ) > 1e-4
    );
}

#[test]
fn a_unit_preprocessor_and_detect_run_at_the_processor_resolution_alike() {
    // A large photo (chelsea scaled to 1804x1200): `sdctl detect` and a unit's
    // `preprocessor = "canny"` run the same code at the processor resolution (512 by
    // default: 768x512 here), so with the generation at that size the unit's control image is
    // the detected map exactly; canny at the photo's own size would give another map.
    use sd_preprocessors::detect::{detect, detect_file, read_image, Sizing};
    let base = sd("sd1");
    let reg = sd_preprocessors::registry();
    let photo = std::env::temp_dir().join(format!("big-photo-{}.png", std::process::id()));
    image::open(fixtures().join("preprocessors/chelsea.png"))
        .unwrap()
        .resize_exact(1804, 1200, image::imageops::FilterType::Triangle)
        .to_rgb8()
        .save(&photo)
        .unwrap();
    let canny = reg.preprocessor("canny").unwrap().clone();
    let params = sd_plugins_api::resolve_params(&canny.params(), &[]).unwrap();
    let map = detect_file(
        &reg,
        canny.as_ref(),
        &photo,
        &params,
        Sizing::default(),
        (0, 0),
    )
    .unwrap()
    .map;
    assert_eq!((map.width, map.height), (768, 512));
    let mut unit = UnitSpec::new(fixtures().join("models/controlnet-sd1"), &photo);
    unit.preprocessor = Some(sd_controlnet::spec::PreprocessorChoice::named("canny"));
    unit.resize = sd_controlnet::ResizeMode::Just;
    let built = unit.build(&base, 768, 512, &mut Vec::new(), &reg).unwrap();
    let rgb = sd_plugins_api::hwc3(&map);
    let want = Tensor::from_vec(
        rgb.data
            .iter()
            .map(|&v| v as f32 / 255.0)
            .collect::<Vec<_>>(),
        (512, 768, 3),
        &Device::Cpu,
    )
    .unwrap()
    .permute((2, 0, 1))
    .unwrap()
    .unsqueeze(0)
    .unwrap();
    assert_eq!(max_abs_diff(built.image(), &want), 0.0);
    // at the photo's own size (a resolution of its short side) canny finds other edges
    let full = detect(
        &reg,
        canny.as_ref(),
        &read_image(&photo).unwrap(),
        &params,
        Sizing {
            resolution: 1200,
            pad: false,
        },
    )
    .unwrap()
    .map;
    assert_eq!((full.width, full.height), (1792, 1216));
    let _ = std::fs::remove_file(photo);
}

/// sd-webui-controlnet's `detectmap_proc` + `high_quality_resize`, run by
/// `make_map_resize_fixtures.py` on six non-square maps, two sizes, three modes. Exact for
/// nearest (segmentation), area (every shrink) and the binary paths (Otsu; nms + thinning of
/// one-pixel edges); bicubic enlarging within one level (OpenCV's SIMD rounding, as
/// `cvresize` documents) and the inpaint map's colours within one level of the extension's
/// float32 path clamped to [0, 255] (we resize 8-bit); its repaint mark exact.
#[test]
fn control_maps_resize_as_the_extension_does() {
    use sd_controlnet::control_image::fit_map;
    use sd_controlnet::ResizeMode;
    let f = candle_core::safetensors::load(
        fixtures().join("map_resize/map_resize.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut cases = 0;
    for name in ["photo", "seg", "shapes", "edges", "greys", "inpaint"] {
        let input = &f[&format!("{name}.input")];
        let (h, w, c) = input.dims3().unwrap();
        let mut data = input.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        if c == 4 {
            // the extension's alpha is 255 = repaint; ours 0 = repaint
            data.iter_mut()
                .skip(3)
                .step_by(4)
                .for_each(|a| *a = 255 - *a);
        }
        let img = sd_plugins_api::ImageBuf::new(w, h, c, data).unwrap();
        for (tw, th) in [(96usize, 64usize), (40, 24)] {
            for (mode, ext) in [
                (ResizeMode::Just, "resize"),
                (ResizeMode::Crop, "inner_fit"),
                (ResizeMode::Fill, "outer_fit"),
            ] {
                let key = format!("{name}.{ext}.{tw}x{th}");
                let want = f[&key]
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let got = fit_map(&img, tw, th, mode);
                assert_eq!((got.width, got.height, got.channels), (tw, th, c), "{key}");
                let (mut max, mut mark_differ) = (0f32, 0usize);
                for (i, (&g, &e)) in sd_tests::paired(&key, &got.data, &want).enumerate() {
                    if c == 4 && i % 4 == 3 {
                        mark_differ += ((255 - g) as f32 != e) as usize;
                    } else {
                        max = max.max((g as f32 - e.clamp(0.0, 255.0)).abs());
                    }
                }
                assert_eq!(mark_differ, 0, "{key}: inpaint mark");
                let cubic = tw == 96 && matches!(name, "photo" | "greys");
                let tol = if cubic || c == 4 { 1.0 } else { 0.0 };
                assert!(max <= tol, "{key}: {max} levels from the extension");
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 36);
}
