//! `sdctl generate` on the tiny SDXL fixtures: the flags reach the engine as the parity
//! fixtures (make_sdxl_fixtures.py) expect, so the CLI's latents are diffusers' within 1e-3
//! (micro-conditioning flags, batch, the refiner), and the PNG says what ran.

use candle_core::Device;
use sd_tests::{assert_close, expected, fixtures, get, model_dir};

use crate::common::{fails, one_step, s, scratch, sdctl};

fn run(name: &str, extra: &[&str]) -> (String, candle_core::Tensor) {
    let dir = scratch("sdxl", name);
    let (out, lat) = (dir.join("out.png"), dir.join("latents.safetensors"));
    let noise = fixtures().join(format!("expected/{name}.safetensors"));
    let model = model_dir("sdxl");
    let mut args = vec![
        "generate",
        "--model",
        s(&model),
        "--prompt",
        "a red circle on a blue background",
        "--negative-prompt",
        "blurry, lowres",
        "--cfg-scale",
        "5",
        "--noise",
        s(&noise),
        "--output",
        s(&out),
        "--save-latents",
        s(&lat),
    ];
    args.extend_from_slice(extra);
    let o = sdctl(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // a batch writes out-1.png, out-2.png...
    let png = std::fs::read(&out).or_else(|_| std::fs::read(dir.join("out-1.png")));
    let text = String::from_utf8_lossy(&png.unwrap()).to_string();
    let got = candle_core::safetensors::load(&lat, &Device::Cpu).unwrap();
    (text, get(&got, "latents").clone())
}

/// Sizes are WxH and the crop X,Y (left, top); diffusers' fixture took (h, w) and (top, left).
#[test]
fn micro_conditioning_flags_and_batch_match_diffusers() {
    let name = "sdxl_txt2img_micro";
    let (_, got) = run(
        name,
        &[
            "--width",
            "64",
            "--height",
            "48",
            "--steps",
            "4",
            "--sampler",
            "dpmpp_2m",
            "--schedule",
            "karras",
            "--batch",
            "2",
            "--original-size",
            "128x96",
            "--target-size",
            "56x40",
            "--crop-top-left",
            "16,8",
        ],
    );
    assert_close(
        name,
        &got,
        get(&expected(&format!("{name}.safetensors")), "latents"),
        1e-3,
    );
}

#[test]
fn the_refiner_takes_over_at_the_switch_and_the_png_says_so() {
    let name = "sdxl_refiner";
    let refiner = model_dir("sdxl-refiner");
    let (text, got) = run(
        name,
        &[
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "6",
            "--sampler",
            "euler",
            "--schedule",
            "normal",
            "--refiner",
            s(&refiner),
            "--refiner-switch",
            "0.6",
        ],
    );
    assert_close(
        name,
        &got,
        get(&expected(&format!("{name}.safetensors")), "latents"),
        1e-3,
    );
    assert!(text.contains("Refiner: sdxl-refiner ["), "{text}");
    assert!(text.contains("Refiner switch at: 0.6"), "{text}");
}

#[test]
fn a_refiner_needs_sdxl_and_a_fraction() {
    let dir = scratch("sdxl", "bad-refiner");
    let out = dir.join("out.png");
    let (sd1, sdxl, refiner) = (
        model_dir("sd1"),
        model_dir("sdxl"),
        model_dir("sdxl-refiner"),
    );
    let e = fails(&one_step(&sd1, &out, &["--refiner", s(&refiner)]), &out);
    assert!(
        e.contains("a refiner works with SDXL models: the model is SD 1.x/2.x"),
        "{e}"
    );
    let switch = ["--refiner", s(&refiner), "--refiner-switch", "1.5"];
    let e = fails(&one_step(&sdxl, &out, &switch), &out);
    assert!(e.contains("refiner_switch") && e.contains("1.5"), "{e}");
}

#[test]
fn model_inspect_names_the_sdxl_family() {
    use crate::common::ok;
    let dir = scratch("sdxl", "inspect");
    let file = dir.join("sdxl.safetensors");
    ok(&sdctl(&[
        "model",
        "convert",
        s(&model_dir("sdxl")),
        "--to",
        "single-file",
        "--half",
        "--output",
        s(&file),
    ]));
    for (p, want) in [
        (
            model_dir("sdxl"),
            "family: SDXL (CLIP-L text_encoder, OpenCLIP bigG text_encoder_2)",
        ),
        (model_dir("sdxl-refiner"), "family: SDXL refiner"),
        (
            file.clone(),
            "family: SDXL (CLIP-L conditioner.embedders.0.transformer.*",
        ),
    ] {
        let out = ok(&sdctl(&["model", "inspect", s(&p)]));
        assert!(out.contains(want), "{out}");
        assert!(!out.contains("not understood: 1"), "{out}");
    }
    let out = ok(&sdctl(&[
        "lora",
        "inspect",
        s(&fixtures().join("loras-sdxl/sdxl_kohya.safetensors")),
    ]));
    assert!(out.contains("family: SDXL"), "{out}");
}

/// An SDXL PNG carries what made it, so `--from-png` gives the same latents: the absent
/// negative prompt (zeros) and a given empty one (encoded) stay apart, and the
/// micro-conditioning and the refiner come back.
#[test]
fn an_sdxl_png_round_trips() {
    use crate::common::{latents_f32, ok};
    let dir = scratch("sdxl", "png");
    let (sdxl, refiner) = (model_dir("sdxl"), model_dir("sdxl-refiner"));
    for (i, extra) in [
        vec!["--original-size", "128x96", "--crop-top-left", "16,8"],
        vec![
            "--negative-prompt",
            "",
            "--refiner",
            s(&refiner),
            "--refiner-switch",
            "0.5",
        ],
    ]
    .into_iter()
    .enumerate()
    {
        let (a, lat_a) = (
            dir.join(format!("a{i}.png")),
            dir.join(format!("a{i}.safetensors")),
        );
        let mut args = vec![
            "generate",
            "--model",
            s(&sdxl),
            "--prompt",
            "a red circle",
            "--width",
            "64",
            "--height",
            "48",
            "--steps",
            "3",
            "--seed",
            "7",
            "--sampler",
            "euler",
            "--output",
            s(&a),
            "--save-latents",
            s(&lat_a),
        ];
        args.extend(extra);
        ok(&sdctl(&args));
        let lat_b = dir.join(format!("b{i}.safetensors"));
        ok(&sdctl(&[
            "generate",
            "--from-png",
            s(&a),
            "--output",
            s(&dir.join(format!("b{i}.png"))),
            "--save-latents",
            s(&lat_b),
        ]));
        assert_eq!(latents_f32(&lat_a), latents_f32(&lat_b), "case {i}");
    }
    // the empty negative prompt is not the absent one on SDXL base
    assert_ne!(
        latents_f32(&dir.join("a0.safetensors")),
        latents_f32(&dir.join("a1.safetensors"))
    );
}

/// Bad SDXL settings are clear errors naming the key and value, before anything loads.
#[test]
fn bad_sdxl_settings_name_the_key() {
    let dir = scratch("sdxl", "bad-keys");
    let out = dir.join("out.png");
    let sdxl = model_dir("sdxl");
    for (flag, value, want) in [
        ("--original-size", "1024", "original_size"),
        ("--target-size", "0x64", "target_size"),
        ("--crop-top-left", "3;4", "crop_top_left"),
    ] {
        let e = fails(&one_step(&sdxl, &out, &[flag, value]), &out);
        assert!(e.contains(want) && e.contains(value), "{flag} {value}: {e}");
    }
    let cn = model_dir("controlnet-sdxl-union");
    let image = fixtures().join("inputs/control_a.png");
    let unit = format!("model={},image={},type=sketch", s(&cn), s(&image));
    let e = fails(&one_step(&sdxl, &out, &["--control", &unit]), &out);
    assert!(e.contains("type") && e.contains("sketch"), "{e}");
}

/// A refiner path that is a FIFO (or any non-file, non-folder) is refused before anything is
/// read (no hang on the pipe), and nothing is written.
#[test]
fn a_refiner_that_is_no_file_or_folder_is_refused() {
    use crate::common::mkfifo;
    let (dir, src) = (scratch("sdxl", "fifo-refiner"), scratch("sdxl", "fifo-src"));
    let (out, fifo) = (dir.join("out.png"), src.join("refiner"));
    mkfifo(&fifo);
    let e = fails(
        &one_step(&model_dir("sdxl"), &out, &["--refiner", s(&fifo)]),
        &out,
    );
    assert!(e.contains("refiner") && e.contains("named pipe"), "{e}");
}
