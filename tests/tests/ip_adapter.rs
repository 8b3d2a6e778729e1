//! IP-Adapters against diffusers 0.42.1 (fixtures/make_ip_adapter_fixtures.py): the original
//! file layouts (a pickled base `.bin`, resampler "plus" safetensors for SD1 and SDXL) read as
//! diffusers' `load_ip_adapter` converts them, a tiny CLIP image encoder with transformers'
//! preprocessing, a window (end), and ControlNet + T2I-Adapter + IP-Adapter in one generation.
//! Tolerance 1e-3 max abs on the final latents, as the other pipeline fixtures; each case's run
//! without the IP-Adapter must be > 1e-2 away.

use candle_core::{DType, Device};
use sd_pipeline::model::clip_vision::load_clip_vision;
use sd_pipeline::StableDiffusion;
use sd_tests::{assert_close, expected, fixtures, get, model_dir};

use crate::adapters::run_unit_cases;
use crate::controlnet::units;

/// transformers' CLIPImageProcessor (resize of the short side with antialiased bicubic,
/// rounding to bytes, centre crop, normalisation) on a 48x40 image, and the encoder's
/// `image_embeds` and penultimate hidden states. Tolerance: pixels 1e-5 (f32 arithmetic of
/// the same formula), outputs 1e-4 (3 f32 layers).
#[test]
fn the_image_encoder_and_its_preprocessing_match_transformers() {
    let enc = load_clip_vision(
        &fixtures().join("models/ip-adapter/image_encoder"),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let img = image::open(fixtures().join("ip/ref.png"))
        .unwrap()
        .to_rgb8();
    let px = enc
        .preprocess(img.as_raw(), img.width() as usize, img.height() as usize)
        .unwrap();
    let exp = expected("ip_encoder.safetensors");
    assert_close("pixels", &px, get(&exp, "pixels"), 1e-5);
    let out = enc.forward(get(&exp, "pixels")).unwrap();
    assert_close(
        "image_embeds",
        &out.image_embeds,
        get(&exp, "image_embeds"),
        1e-4,
    );
    assert_close(
        "penultimate",
        &out.penultimate,
        get(&exp, "penultimate"),
        1e-4,
    );
}

#[test]
fn ip_adapters_match_diffusers() {
    run_unit_cases("ip_adapter_cases.json", 7, &units);
}

/// An IP-Adapter for the other family, a wrong image encoder, keys only ControlNets take:
/// refused before any step, naming the file.
#[test]
fn ip_adapters_that_do_not_fit_are_refused() {
    let load =
        |m: &str| StableDiffusion::load(&model_dir(m), &Device::Cpu, DType::F32, &[]).unwrap();
    let sd1 = load("sd1");
    let build = |model: &str, edit: &dyn Fn(&mut sd_controlnet::UnitSpec)| {
        let mut s =
            sd_controlnet::UnitSpec::new(fixtures().join(model), fixtures().join("ip/ref.png"));
        edit(&mut s);
        match s.build(&sd1, 64, 64, &mut Vec::new(), &sd_preprocessors::registry()) {
            Ok(_) => panic!("{model} was accepted"),
            Err(e) => e.to_string(),
        }
    };
    let e = build(
        "models/ip-adapter/ip-adapter-plus_sdxl.safetensors",
        &|_| {},
    );
    assert!(
        e.contains("(text width 24) cannot guide an SD 1.x/2.x model (text width 8)"),
        "{e}"
    );
    let e = build("models/ip-adapter/ip-adapter_sd1.bin", &|s| {
        s.mask = Some(fixtures().join("inputs/mask.png"));
    });
    assert!(e.contains("not mask"), "{e}");
    // the T2I-Adapter folder is no image encoder
    let e = build("models/ip-adapter/ip-adapter_sd1.bin", &|s| {
        s.encoder = Some(fixtures().join("models/t2i-adapter-sd1"));
    });
    assert!(e.contains("visual_projection"), "{e}");
}

/// A reference folder is bounded: more than `MAX_REFERENCES` images is refused before any is
/// read, and an empty folder is named too (hostile input: a folder of thousands of images).
#[test]
fn reference_folders_are_bounded() {
    let sd1 = StableDiffusion::load(&model_dir("sd1"), &Device::Cpu, DType::F32, &[]).unwrap();
    let dir = std::env::temp_dir().join(format!("ip-refs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let build = || {
        let s = sd_controlnet::UnitSpec::new(
            fixtures().join("models/ip-adapter/ip-adapter_sd1.bin"),
            &dir,
        );
        match s.build(&sd1, 64, 64, &mut Vec::new(), &sd_preprocessors::registry()) {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    };
    let e = build();
    assert!(e.contains("no reference images"), "{e}");
    let png = std::fs::read(fixtures().join("ip/ref.png")).unwrap();
    for i in 0..=sd_controlnet::spec::MAX_REFERENCES {
        std::fs::write(dir.join(format!("r{i:03}.png")), &png).unwrap();
    }
    let e = build();
    assert!(e.contains("more than 64 reference images"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
