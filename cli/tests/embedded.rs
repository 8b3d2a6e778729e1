#![cfg(feature = "embedded-model")]
//! The embedded tiny-fill model (`models/tiny-fill`): the README's first command works with no
//! model given, and the ControlNet places the circle where the outline says (a behaviour test
//! with a loose bound; the model card has the full evaluation).

use std::path::{Path, PathBuf};

use crate::common::{scratch, sdctl_cached};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn the_readme_command_runs_on_the_embedded_model() {
    let d = scratch("embedded", "readme");
    let out = d.join("circle.png");
    let outline = root().join("models/tiny-fill/outline.png");
    let o = sdctl_cached(
        &[
            "generate",
            "--prompt",
            "red circle with sky blue background",
            "--control",
            &format!("image={}", outline.display()),
            "--seed",
            "1",
            "--output",
            out.to_str().unwrap(),
        ],
        &d.join("cache"),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = image::open(&out).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (64, 64));
    // written out once, then reused
    let n = std::fs::read_dir(d.join("cache/embedded")).unwrap().count();
    assert_eq!(n, 1);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn the_embedded_controlnet_places_the_circle() {
    let d = scratch("embedded", "iou");
    let report = d.join("report.json");
    let run = |weight: &str, json: &Path| {
        let o = sdctl_cached(
            &[
                "eval",
                "fill",
                "--count",
                "6",
                "--seed",
                "777000",
                "--weight",
                weight,
                "--json",
                json.to_str().unwrap(),
            ],
            &d.join("cache"),
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
        let mean = |k: &str| v["summary"][k]["mean"].as_f64().unwrap();
        (mean("iou"), mean("shape_iou"), mean("circle_error"))
    };
    let (with, with_shape, with_colour) = run("1", &report);
    let (without, _, without_colour) = run("0", &d.join("base.json"));
    eprintln!(
        "mean IoU: ControlNet {with:.3} (shape {with_shape:.3}), without {without:.3}; \
         circle colour error {with_colour:.1} vs {without_colour:.1}"
    );
    // loose bounds: these 6 seeds gave 0.77 / shape 0.80 / 0.06, colour error 19 vs 115 when
    // written; the model card's 100 unseen examples: IoU 0.875 vs 0.131, colour error 18.6 vs 86.4
    assert!(with >= 0.6, "IoU with the ControlNet {with}");
    assert!(
        with_shape >= 0.6,
        "shape IoU with the ControlNet {with_shape}"
    );
    assert!(with > without + 0.4, "{with} vs {without}");
    // the circle in the prompt's colour where the outline is (0..255 per channel)
    assert!(with_colour < 40.0, "circle colour error {with_colour}");
    std::fs::remove_dir_all(&d).unwrap();
}
