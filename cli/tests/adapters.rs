//! Adapter units through `sdctl`: `--control` with a T2I-Adapter (next to a ControlNet) gives
//! diffusers' latents (make_adapter_fixtures.py, 1e-3 as the library test), the PNG's
//! infotext names the unit, and `sdctl controlnet inspect` says what a unit file is.

use candle_core::Device;
use sd_tests::{assert_close, expected, fixtures, get, model_dir};

use crate::common::{base_args, fails, ok, s, scratch, sdctl};

fn unit(model: &str, image: &str, weight: &str) -> String {
    format!(
        "model={},image={},weight={weight}",
        s(&fixtures().join(model)),
        s(&fixtures().join(image))
    )
}

/// `sdctl generate` with the fixture cases' settings (SD1, 64x64, 4 Euler steps, CFG 7.5), the
/// case's noise and these units: the PNG's text and the final latents, checked against the
/// case's expected latents (1e-3).
fn generate_case(name: &str, units: &[String]) -> String {
    let dir = scratch("adapters", name);
    let (out, lat) = (dir.join("out.png"), dir.join("latents.safetensors"));
    let noise = fixtures().join(format!("expected/{name}.safetensors"));
    let model = model_dir("sd1");
    let mut args = base_args(s(&model), s(&noise), s(&out));
    args.extend(["--save-latents", s(&lat)]);
    for u in units {
        args.extend(["--control", u.as_str()]);
    }
    ok(&sdctl(&args));
    let got = candle_core::safetensors::load(&lat, &Device::Cpu).unwrap();
    let want = expected(&format!("{name}.safetensors"));
    assert_close(name, get(&got, "latents"), get(&want, "latents"), 1e-3);
    String::from_utf8_lossy(&std::fs::read(&out).unwrap()).to_string()
}

#[test]
fn a_controlnet_and_a_t2i_adapter_from_the_command_line_match_diffusers() {
    let png = generate_case(
        "adapter_sd1_with_controlnet",
        &[
            unit("models/controlnet-sd1", "inputs/control_a.png", "0.8"),
            unit("models/t2i-adapter-sd1", "inputs/control_b.png", "0.7"),
        ],
    );
    assert!(
        png.contains("t2i-adapter-sd1"),
        "the infotext names the adapter unit"
    );
}

#[test]
fn controlnet_inspect_says_what_a_unit_file_is() {
    let f = |p: &str| fixtures().join(p);
    let said = |p: &str| ok(&sdctl(&["controlnet", "inspect", s(&f(p))]));
    let t = said("models/t2i-adapter-sd1");
    assert!(
        t.contains("T2I-Adapter (full_adapter) for SD 1.x/2.x models"),
        "{t}"
    );
    let t = said("models/t2i-adapter-sdxl");
    assert!(
        t.contains("T2I-Adapter (full_adapter_xl) for SDXL models"),
        "{t}"
    );
    let t = said("models/t2i-adapter-sd1-light.pth");
    assert!(
        t.contains("light_adapter") && t.contains("3-channel"),
        "{t}"
    );
    let t = said("models/t2i-adapter-sd1-sketch.safetensors");
    assert!(t.contains("1-channel"), "{t}");
    let t = said("models/controlnet-sd1-ldm.safetensors");
    assert!(t.contains("ControlNet (lllyasviel/A1111 layout)"), "{t}");
    let t = said("models/controlnet-sdxl-union");
    assert!(
        t.contains("union ControlNet (diffusers layout) for SDXL models: 8 control types"),
        "{t}"
    );
    let o = sdctl(&["controlnet", "inspect", s(&f("inputs/control_a.png"))]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("control_a.png"), "{e}");
}

#[test]
fn an_ip_adapter_from_the_command_line_matches_diffusers() {
    // the image encoder named (it is also found beside the adapter file without `encoder=`)
    let ip = format!(
        "{},encoder={}",
        unit("models/ip-adapter/ip-adapter_sd1.bin", "ip/ref.png", "0.6"),
        s(&fixtures().join("models/ip-adapter/image_encoder"))
    );
    generate_case("ip_sd1_base", &[ip]);
    let t = ok(&sdctl(&[
        "controlnet",
        "inspect",
        s(&fixtures().join("models/ip-adapter/ip-adapter-plus_sd1.safetensors")),
    ]));
    assert!(
        t.contains("IP-Adapter (plus (resampler))") && t.contains("6 image tokens"),
        "{t}"
    );
    // an encoder that is not there: named, nothing generated
    let dir = scratch("adapters", "bad-encoder");
    let bad = format!(
        "{},encoder={}",
        unit("models/ip-adapter/ip-adapter_sd1.bin", "ip/ref.png", "0.6"),
        s(&dir.join("no-such-encoder"))
    );
    let out = dir.join("never.png");
    let model = model_dir("sd1");
    let e = fails(
        &[
            "generate",
            "--model",
            s(&model),
            "--prompt",
            "x",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "1",
            "--control",
            &bad,
            "--output",
            s(&out),
        ],
        &out,
    );
    assert!(e.contains("no-such-encoder"), "{e}");
}

/// `preprocessor=reference_only` needs no model; the PNG says `Model: None` and `--from-png`
/// repeats the image exactly.
#[test]
fn a_reference_only_unit_runs_without_a_model_and_round_trips() {
    let dir = scratch("adapters", "reference");
    let (out, again) = (dir.join("ref.png"), dir.join("again.png"));
    let model = model_dir("sd1");
    let unit = format!(
        "preprocessor=reference_only,image={},weight=0.8",
        s(&fixtures().join("inputs/init.png"))
    );
    ok(&sdctl(&[
        "generate",
        "--model",
        s(&model),
        "--prompt",
        "a cat",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "--seed",
        "5",
        "--control",
        &unit,
        "--output",
        s(&out),
    ]));
    let png = String::from_utf8_lossy(&std::fs::read(&out).unwrap()).to_string();
    assert!(
        png.contains("Module: reference_only, Model: None, Weight: 0.8"),
        "infotext"
    );
    ok(&sdctl(&[
        "generate",
        "--from-png",
        s(&out),
        "--output",
        s(&again),
    ]));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&again).unwrap());
}
