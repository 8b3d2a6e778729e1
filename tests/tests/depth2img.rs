//! depth2img (SD 2 depth models, a 5-channel UNet) against diffusers'
//! StableDiffusionDepth2ImgPipeline (make_depth2img_fixtures.py): the depth map read from a
//! 16-bit PNG, resized to the latents (bicubic) and scaled to [-1, 1] as `prepare_depth_map`,
//! then 4 Euler img2img steps. Tolerance 1e-3 on the latents, as the pipeline fixtures.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sd_pipeline::{GenerateRequest, StableDiffusion};
use sd_plugins_api::HookSet;
use sd_tests::{assert_close, expected, fixtures, get, model_dir, Replay};

/// A model folder: sd2's parts with the depth UNet (symlinks in a temporary folder).
pub fn depth_model() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd-depth-model-{}", std::process::id()));
    if !dir.join("unet").exists() {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for part in [
            "vae",
            "text_encoder",
            "tokenizer",
            "scheduler",
            "model_index.json",
        ] {
            std::os::unix::fs::symlink(model_dir("sd2").join(part), dir.join(part)).unwrap();
        }
        std::os::unix::fs::symlink(model_dir("sd2-depth-unet"), dir.join("unet")).unwrap();
    }
    dir
}

fn depth_png() -> Tensor {
    let img = image::open(fixtures().join("inputs/depth16.png"))
        .unwrap()
        .to_luma16();
    let (w, h) = img.dimensions();
    let v: Vec<f32> = img.into_raw().into_iter().map(f32::from).collect();
    Tensor::from_vec(v, (1, 1, h as usize, w as usize), &Device::Cpu).unwrap()
}

#[test]
fn depth2img_matches_diffusers() {
    let sd = StableDiffusion::load(&depth_model(), &Device::Cpu, DType::F32, &[]).unwrap();
    assert!(sd.is_depth_model());
    let exp = expected("depth2img.safetensors");
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("expected/depth2img.json")).unwrap(),
    )
    .unwrap();
    let mut req = GenerateRequest::new(meta["prompt"].as_str().unwrap());
    req.negative_prompt = Some(meta["negative_prompt"].as_str().unwrap().into());
    (req.width, req.height, req.steps) = (64, 64, 4);
    req.cfg_scale = meta["cfg_scale"].as_f64().unwrap();
    req.strength = meta["strength"].as_f64();
    req.sampler = "euler".parse().unwrap();
    req.schedule = "normal".parse().unwrap();
    req.init_image = Some(
        sd_pipeline::generation::image_io::load_image(
            &fixtures().join("inputs/init.png"),
            64,
            64,
            &Device::Cpu,
        )
        .unwrap(),
    );
    req.noise = Some(get(&exp, "noise").clone());
    req.depth = Some(depth_png());
    let latents = sd
        .denoise(&req, &mut HookSet::new(), &mut Replay::new(None))
        .unwrap();
    assert_close("depth2img latents", &latents, get(&exp, "latents"), 1e-3);

    // without a depth map, or with one for a plain model: errors naming what is missing
    req.depth = None;
    let e = sd.validate(&req).unwrap_err().to_string();
    assert!(e.contains("depth map"), "{e}");
    let plain = StableDiffusion::load(&model_dir("sd2"), &Device::Cpu, DType::F32, &[]).unwrap();
    req.depth = Some(depth_png());
    let e = plain.validate(&req).unwrap_err().to_string();
    assert!(e.contains("depth model"), "{e}");
}
