//! `sdctl upscale`: ESRGAN-family models on an image file, by path or by name in
//! --upscaler-dir, with clean errors and no partial output.

use sd_tests::fixtures;

use crate::common::{clean_failure, fails, ok_stderr, s, scratch, sdctl};

fn esrgan(name: &str) -> std::path::PathBuf {
    fixtures().join("models/esrgan").join(name)
}

#[test]
fn upscale_writes_the_models_scale_or_the_asked_one() {
    let d = scratch("upscale", "sizes");
    let input = fixtures().join("inputs/init.png"); // 64x64
    let out = d.join("x4.png");
    let err = ok_stderr(&sdctl(&[
        "upscale",
        s(&input),
        "-o",
        s(&out),
        "--model",
        s(&esrgan("tiny_x4.safetensors")),
        "--tile",
        "24",
        "--tile-overlap",
        "8",
    ]));
    assert!(err.contains("RRDBNet x4"), "{err}");
    assert!(err.contains("64x64 -> 256x256"), "{err}");
    assert_eq!(
        image::open(&out).unwrap().into_rgb8().dimensions(),
        (256, 256)
    );
    // by name in --upscaler-dir (a .pth with params_ema), another scale, JPEG out
    let out = d.join("x1_5.jpg");
    ok_stderr(&sdctl(&[
        "upscale",
        s(&input),
        "-o",
        s(&out),
        "--upscaler-dir",
        s(&fixtures().join("models/esrgan")),
        "--model",
        "tiny_x1_ema",
        "--scale",
        "1.5",
    ]));
    assert_eq!(
        image::open(&out).unwrap().into_rgb8().dimensions(),
        (96, 96)
    );
    let leftovers: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers.len(), 2, "{leftovers:?}");
}

#[test]
fn a_file_that_is_not_an_upscaler_is_a_clean_error() {
    let d = scratch("upscale", "bad-model");
    let input = fixtures().join("inputs/init.png");
    let out = d.join("out").join("x.png");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    // weights of another network
    let vae = fixtures().join("models/sd1/vae/diffusion_pytorch_model.safetensors");
    let err = fails(
        &["upscale", s(&input), "-o", s(&out), "--model", s(&vae)],
        &out,
    );
    assert!(err.contains("not an ESRGAN / Real-ESRGAN model"), "{err}");
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
    // not weights at all
    let junk = d.join("junk.pth");
    std::fs::write(&junk, "not a model").unwrap();
    let err = fails(
        &["upscale", s(&input), "-o", s(&out), "--model", s(&junk)],
        &out,
    );
    assert!(err.contains("junk.pth"), "{err}");
    // a truncated copy of a real one
    let cut = d.join("cut.safetensors");
    let bytes = std::fs::read(esrgan("tiny_x4.safetensors")).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = fails(
        &["upscale", s(&input), "-o", s(&out), "--model", s(&cut)],
        &out,
    );
    assert!(err.contains("cut.safetensors"), "{err}");
    clean_failure(&sdctl(&[
        "upscale",
        s(&input),
        "-o",
        s(&out),
        "--model",
        s(&cut),
    ]));
}

#[test]
fn missing_files_and_names_are_clean_errors() {
    let d = scratch("upscale", "missing");
    let out = d.join("out.png");
    let model = esrgan("tiny_x4.safetensors");
    let input = fixtures().join("inputs/init.png");
    let err = fails(
        &[
            "upscale",
            s(&d.join("nope.png")),
            "-o",
            s(&out),
            "--model",
            s(&model),
        ],
        &out,
    );
    assert!(err.contains("nope.png"), "{err}");
    let err = fails(
        &[
            "upscale",
            s(&input),
            "-o",
            s(&out),
            "--model",
            s(&d.join("nope.pth")),
        ],
        &out,
    );
    assert!(err.contains("--model") && err.contains("nope.pth"), "{err}");
    let err = fails(
        &[
            "upscale",
            s(&input),
            "-o",
            s(&out),
            "--upscaler-dir",
            s(&fixtures().join("models/esrgan")),
            "--model",
            "tiny_x4_olt",
        ],
        &out,
    );
    assert!(err.contains("did you mean `tiny_x4_old`"), "{err}");
    let err = fails(
        &[
            "upscale",
            s(&input),
            "-o",
            s(&out),
            "--upscaler-dir",
            s(&fixtures().join("models/esrgan")),
            "--model",
            "../esrgan/tiny_x4",
        ],
        &out,
    );
    assert!(err.contains("no folders"), "{err}");
    let err = fails(
        &[
            "upscale",
            s(&input),
            "-o",
            s(&d.join("out.webp")),
            "--model",
            s(&model),
        ],
        &out,
    );
    assert!(err.contains(".png or .jpg"), "{err}");
    let err = fails(
        &[
            "upscale",
            s(&input),
            "-o",
            s(&out),
            "--model",
            s(&model),
            "--scale",
            "0",
        ],
        &out,
    );
    assert!(err.contains("--scale 0"), "{err}");
}
