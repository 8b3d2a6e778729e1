//! `sdctl generate --depth-map` with an SD 2 depth model: the latents of diffusers'
//! StableDiffusionDepth2ImgPipeline (make_depth2img_fixtures.py, tolerance 1e-3 as the pipeline
//! fixtures), and the errors of depth settings that cannot work.

use sd_tests::{assert_close, expected, fixtures, get, model_dir};

use crate::common::{fails, latents, s, scratch, sdctl};

/// sd2's parts with the depth UNet, as a model folder of symlinks.
fn depth_model(dir: &std::path::Path) -> std::path::PathBuf {
    let m = dir.join("sd2-depth");
    std::fs::create_dir_all(&m).unwrap();
    for part in [
        "vae",
        "text_encoder",
        "tokenizer",
        "scheduler",
        "model_index.json",
    ] {
        std::os::unix::fs::symlink(model_dir("sd2").join(part), m.join(part)).unwrap();
    }
    std::os::unix::fs::symlink(model_dir("sd2-depth-unet"), m.join("unet")).unwrap();
    m
}

#[test]
fn depth_map_generation_matches_diffusers() {
    let dir = scratch("depth2img", "ok");
    let model = depth_model(&dir);
    let (out, lat) = (dir.join("o.png"), dir.join("l.safetensors"));
    let noise = fixtures().join("expected/depth2img.safetensors");
    let o = sdctl(&[
        "generate",
        "--model",
        s(&model),
        "--prompt",
        "a red circle on a blue background",
        "--negative-prompt",
        "blurry",
        "--init-image",
        s(&fixtures().join("inputs/init.png")),
        "--depth-map",
        s(&fixtures().join("inputs/depth16.png")),
        "--strength",
        "0.7",
        "--steps",
        "4",
        "--cfg-scale",
        "6",
        "--sampler",
        "euler",
        "--schedule",
        "normal",
        "--noise",
        s(&noise),
        "--output",
        s(&out),
        "--save-latents",
        s(&lat),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let exp = expected("depth2img.safetensors");
    assert_close("cli depth2img", &latents(&lat), get(&exp, "latents"), 1e-3);
}

#[test]
fn depth_settings_that_cannot_work_are_named() {
    let models = scratch("depth2img", "bad-models");
    let model = depth_model(&models);
    let dir = scratch("depth2img", "bad");
    let out = dir.join("o.png");
    let init = fixtures().join("inputs/init.png");
    let depth = fixtures().join("inputs/depth16.png");
    let sd1 = model_dir("sd1");
    for (m, extra, want) in [
        (&model, vec!["--init-image", s(&init)], "needs a depth map"),
        (&model, vec!["--depth-map", s(&depth)], "init image"),
        (
            &sd1,
            vec!["--init-image", s(&init), "--depth-map", s(&depth)],
            "depth model",
        ),
        (
            &model,
            vec![
                "--init-image",
                s(&init),
                "--depth-estimator",
                "no_such_thing",
            ],
            "no_such_thing",
        ),
        (
            &model,
            vec![
                "--init-image",
                s(&init),
                "--depth-map",
                s(&init),
                "--depth-estimator",
                "depth_anything_v2",
            ],
            "not both",
        ),
    ] {
        let mut a = vec![
            "generate",
            "--model",
            s(m),
            "--prompt",
            "x",
            "--steps",
            "2",
            "--width",
            "64",
            "--height",
            "64",
            "--output",
            s(&out),
        ];
        a.extend(extra.iter().copied());
        let err = fails(&a, &out);
        assert!(err.contains(want), "{extra:?}: {err}");
    }
}
