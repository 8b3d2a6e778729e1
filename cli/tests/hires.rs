//! `sdctl generate --hires-*`: A1111's hires fix against the same steps run through diffusers
//! (make_hires_fixtures.py), its infotext and `--from-png` round trip, ControlNet units on the
//! passes their `hr` option names, and bad settings named.

use sd_tests::{assert_close, expected, fixtures, get, model_dir};
use serde_json::Value;

use crate::common::{fails, latents, s, scratch, sdctl};

fn case() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected/hires.json")).unwrap())
        .unwrap()
}

fn args<'a>(model: &'a str, c: &'a Value, out: &'a str, lat: &'a str) -> Vec<String> {
    let v = |k: &str| c[k].to_string().trim_matches('"').to_string();
    [
        "generate",
        "--model",
        model,
        "--prompt",
        &v("prompt"),
        "--negative-prompt",
        &v("negative_prompt"),
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        &v("steps"),
        "--cfg-scale",
        &v("cfg_scale"),
        "--sampler",
        &v("sampler"),
        "--schedule",
        &v("schedule"),
        "--seed",
        &v("seed"),
        "--rng",
        "torch-cpu",
        "--hires-scale",
        &v("hires_scale"),
        "--hires-steps",
        &v("hires_steps"),
        "--hires-denoise",
        &v("hires_denoise"),
        "--hires-upscaler",
        &v("hires_upscaler"),
        "--output",
        out,
        "--save-latents",
        lat,
    ]
    .map(String::from)
    .to_vec()
}

/// Tolerance 1e-3 on the final latents, as the pipeline fixtures (two passes of f32 UNet
/// calls, CFG 5).
#[test]
fn hires_fix_matches_a1111s_steps_through_diffusers() {
    let dir = scratch("hires", "parity");
    let (out, lat) = (dir.join("out.png"), dir.join("lat.safetensors"));
    let model = model_dir("sd1");
    let c = case();
    let a = args(s(&model), &c, s(&out), s(&lat));
    let o = sdctl(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let exp = expected("hires.safetensors");
    assert_close("hires latents", &latents(&lat), get(&exp, "latents"), 1e-3);
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (96, 96));
    // A1111's infotext: the first pass's size and steps, the hires fields
    let info = sdctl(&["png-info", s(&out)]);
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(
        text.contains("Steps: 3,")
            && text.contains("Size: 64x64")
            && text.contains("Denoising strength: 0.6, Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Latent"),
        "{text}"
    );
    // --from-png runs it again: the same latents
    let lat2 = dir.join("again.safetensors");
    let o = sdctl(&[
        "generate",
        "--model",
        s(&model),
        "--from-png",
        s(&out),
        "--output",
        s(&dir.join("again.png")),
        "--save-latents",
        s(&lat2),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_close("from-png", &latents(&lat2), &latents(&lat), 0.0);
}

/// A ControlNet unit acts on the passes `hr=` names: `both` differs from `low` (the second
/// pass without it) and from `high` (the first pass without it), and `low` and `high` differ.
#[test]
fn control_units_act_on_the_passes_they_name() {
    let dir = scratch("hires", "control");
    let model = model_dir("sd1");
    let cn = model_dir("controlnet-sd1");
    let control = fixtures().join("inputs/control_a.png");
    let run = |hr: Option<&str>| {
        let lat = dir.join(format!("{}.safetensors", hr.unwrap_or("none")));
        let unit = format!(
            "model={},image={}{}",
            s(&cn),
            s(&control),
            hr.map(|h| format!(",hr={h}")).unwrap_or_default()
        );
        let mut a = vec![
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
            "--hires-scale",
            "1.25",
            "--output",
        ];
        let out = dir.join("o.png");
        a.push(s(&out));
        a.extend(["--save-latents", s(&lat)]);
        if hr.is_some() {
            a.extend(["--control", &unit]);
        }
        let o = sdctl(&a);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        latents(&lat)
    };
    let diff = |a: &candle_core::Tensor, b: &candle_core::Tensor| sd_tests::max_abs_diff(a, b);
    let (none, both, low, high) = (
        run(None),
        run(Some("both")),
        run(Some("low")),
        run(Some("high")),
    );
    assert_eq!(both.dims(), &[1, 4, 10, 10]);
    for (name, d) in [
        ("both/low", diff(&both, &low)),
        ("both/high", diff(&both, &high)),
        ("low/high", diff(&low, &high)),
        ("none/high", diff(&none, &high)),
        ("none/low", diff(&none, &low)),
    ] {
        assert!(d > 1e-3, "{name}: {d}");
    }
}

/// An ESRGAN model as the hires upscaler, by name in `--upscaler-dir`: the decoded first pass
/// goes through the network before it is resized and encoded again (another image than
/// Lanczos gives, the same size); a name the folder lacks is named with what it holds.
#[test]
fn an_esrgan_model_upscales_between_the_passes() {
    let dir = scratch("hires", "esrgan");
    let model = model_dir("sd1");
    let esrgan = model_dir("esrgan");
    let run = |upscaler: &str, extra: &[&str]| {
        let out = dir.join(format!("{}.png", upscaler.replace(['/', ' '], "_")));
        let mut a = vec![
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
            "--hires-scale",
            "1.5",
            "--hires-upscaler",
            upscaler,
            "--output",
            s(&out),
        ];
        a.extend_from_slice(extra);
        let o = sdctl(&a);
        (o, out)
    };
    let (o, lanczos) = run("lanczos", &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (o, net) = run("tiny_x4", &["--upscaler-dir", s(&esrgan)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (a, b) = (
        image::open(&lanczos).unwrap().to_rgb8(),
        image::open(&net).unwrap().to_rgb8(),
    );
    assert_eq!(a.dimensions(), (96, 96));
    assert_eq!(b.dimensions(), (96, 96));
    assert_ne!(a, b);
    let info = sdctl(&["png-info", s(&net)]);
    assert!(String::from_utf8_lossy(&info.stdout).contains("Hires upscaler: tiny_x4"));
    let (o, _) = run("tiny_x3", &["--upscaler-dir", s(&esrgan)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("tiny_x3") && err.contains("did you mean"),
        "{err}"
    );
}

#[test]
fn bad_hires_settings_are_named() {
    let dir = scratch("hires", "bad");
    let out = dir.join("o.png");
    let model = model_dir("sd1");
    let base = [
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
        "2",
        "--output",
        s(&out),
    ];
    for (extra, want) in [
        (vec!["--hires-scale", "0.5"], "hires_scale"),
        (
            vec!["--hires-scale", "2", "--hires-upscaler", "R-ESRGAN 4x+"],
            "R-ESRGAN 4x+",
        ),
        (vec!["--hires-size", "12xfoo"], "hires_size"),
        (
            vec!["--hires-steps", "3"],
            "needs hires_scale or hires_size",
        ),
        (
            vec!["--hires-scale", "2", "--hires-denoise", "0"],
            "hires_denoise",
        ),
        (
            vec!["--hires-scale", "2", "--hires-sampler", "plms"],
            "plms",
        ),
        (
            vec![
                "--hires-scale",
                "2",
                "--init-image",
                s(&fixtures().join("inputs/init.png")),
            ],
            "txt2img",
        ),
    ] {
        let mut a = base.to_vec();
        a.extend(extra.iter().copied());
        let err = fails(&a, &out);
        assert!(err.contains(want), "{extra:?}: {err}");
    }
}
