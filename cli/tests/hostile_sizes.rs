//! Hostile sizes and poses (issue 30): every size a user can name (flags, the UNet's
//! `sample_size`, pose canvases, training resolution and batch) is checked against one memory
//! estimate before anything is allocated, and the refusal says what would fit; pose keypoints
//! far off the canvas cost nothing; pose canvases of the wrong type are errors; a device is
//! not a pose file. The memory available is set with `SDCTL_MEMORY_LIMIT`, so the results do
//! not depend on the machine. Every payload is made here by the tests themselves.

use std::path::Path;
use std::time::{Duration, Instant};

use sd_tests::model_dir;

use crate::common::{clean_failure, copy_tree, ok, one_step, s, scratch, sdctl_with};

const LIMIT: (&str, &str) = ("SDCTL_MEMORY_LIMIT", "8G");

/// Runs sdctl with the 8 GiB limit; asserts it ended within 10 s.
fn quick(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let t = Instant::now();
    let mut all = vec![LIMIT];
    all.extend_from_slice(env);
    let o = sdctl_with(args, &all);
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "sdctl {args:?} took {:?}",
        t.elapsed()
    );
    o
}

fn pose_file(path: &Path, body: &[f64], canvas: Option<(serde_json::Value, serde_json::Value)>) {
    let mut v = serde_json::json!({ "people": [{ "pose_keypoints_2d": body }] });
    if let Some((w, h)) = canvas {
        v["canvas_width"] = w;
        v["canvas_height"] = h;
    }
    std::fs::write(path, v.to_string()).unwrap();
}

/// An 18-point body around the middle of a 64x64 canvas.
fn body() -> Vec<f64> {
    (0..18)
        .flat_map(|i| [20.0 + (i % 5) as f64 * 5.0, 10.0 + i as f64 * 2.5, 1.0])
        .collect()
}

#[test]
fn generation_sizes_beyond_memory_are_refused_with_what_fits() {
    let d = scratch("hostile-sizes", "gen");
    let out = d.join("out.png");
    let model = model_dir("sd1");
    let e = clean_failure(&quick(
        &[
            "generate",
            "--model",
            s(&model),
            "--prompt",
            "x",
            "--width",
            "16384",
            "--height",
            "16384",
            "--steps",
            "1",
            "--seed",
            "1",
            "--output",
            s(&out),
        ],
        &[],
    ));
    assert!(e.contains("16384x16384 (batch 1) would need about"), "{e}");
    assert!(
        e.contains("8.0 GiB is available (SDCTL_MEMORY_LIMIT)"),
        "{e}"
    );
    assert!(e.contains("at most ") && e.contains(" fits"), "{e}");
    // a batch that does not fit at a size that does: the batch it could be is named
    let e = clean_failure(&quick(
        &[
            "generate",
            "--model",
            s(&model),
            "--prompt",
            "x",
            "--width",
            "2048",
            "--height",
            "2048",
            "--batch",
            "256",
            "--steps",
            "1",
            "--seed",
            "1",
            "--output",
            s(&out),
        ],
        &[],
    ));
    assert!(e.contains("(batch 256) would need about"), "{e}");
    assert!(e.contains(" fits at 2048x2048"), "{e}");
    assert!(!out.exists());
    // normal sizes still run under the same limit
    ok(&quick(&one_step(&model, &out, &[]), &[]));
    assert!(out.is_file());
}

#[test]
fn unet_sample_size_is_range_checked_and_its_default_size_estimated() {
    let d = scratch("hostile-sizes", "sample");
    let model = d.join("model");
    copy_tree(&model_dir("sd1"), &model);
    let cfg_path = model.join("unet/config.json");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let out = d.join("out.png");
    let args = [
        "generate",
        "--model",
        s(&model),
        "--prompt",
        "x",
        "--steps",
        "1",
        "--seed",
        "1",
        "--output",
        s(&out),
    ];
    let mut bad = cfg.clone();
    bad["sample_size"] = serde_json::json!(100000000);
    std::fs::write(&cfg_path, bad.to_string()).unwrap();
    let e = clean_failure(&quick(&args, &[]));
    assert!(
        e.contains("config.json") && e.contains("`sample_size` = 100000000"),
        "{e}"
    );
    // the largest accepted sample_size is still estimated before its default size is used
    let mut big = cfg.clone();
    big["sample_size"] = serde_json::json!(2048);
    std::fs::write(&cfg_path, big.to_string()).unwrap();
    let e = clean_failure(&quick(&args, &[]));
    assert!(e.contains("would need about") && e.contains(" fits"), "{e}");
    assert!(!out.exists());
}

#[test]
fn far_keypoints_render_at_once() {
    let d = scratch("hostile-sizes", "far");
    for (i, far) in [1e10, -1e10, 1e308, -1e308].into_iter().enumerate() {
        let mut b = body();
        b[0] = far; // the nose: a limb (neck - nose) and a joint
        b[3 * 14 + 1] = far; // an eye's y
        let p = d.join(format!("far{i}.json"));
        pose_file(&p, &b, Some((64.into(), 64.into())));
        let out = d.join(format!("far{i}.png"));
        ok(&quick(&["pose", "render", s(&p), "-o", s(&out)], &[]));
        assert!(out.is_file());
    }
}

#[test]
fn pose_canvases_of_the_wrong_type_or_size_are_refused() {
    let d = scratch("hostile-sizes", "canvas");
    let out = d.join("out.png");
    for (w, want) in [
        (serde_json::json!("abc"), "`canvas_width` = \"abc\""),
        (serde_json::json!(3.5), "`canvas_width` = 3.5"),
        (serde_json::json!(-1), "`canvas_width` = -1"),
        (serde_json::json!(0), "`canvas_width` = 0"),
    ] {
        let p = d.join("bad.json");
        pose_file(&p, &body(), Some((w, 64.into())));
        let e = clean_failure(&quick(&["pose", "render", s(&p), "-o", s(&out)], &[]));
        assert!(e.contains(s(&p)) && e.contains(want), "{e}");
    }
    // within the side limit but not the memory: refused with what fits
    let p = d.join("big.json");
    pose_file(&p, &body(), Some((16384.into(), 16384.into())));
    let e = clean_failure(&quick(
        &["pose", "render", s(&p), "-o", s(&out)],
        &[("SDCTL_MEMORY_LIMIT", "1G")],
    ));
    assert!(
        e.contains("pose canvas 16384x16384") && e.contains(" fits"),
        "{e}"
    );
    assert!(!out.exists());
    // a device is not a pose file
    let e = clean_failure(&quick(&["pose", "render", "/dev/zero", "-o", s(&out)], &[]));
    assert!(
        e.contains("/dev/zero") && e.contains("character device"),
        "{e}"
    );
}

#[test]
fn pose_canvases_of_control_units_are_checked() {
    let d = scratch("hostile-sizes", "control");
    let out = d.join("out.png");
    let model = model_dir("sd1");
    let cn = model_dir("controlnet-sd1");
    for (canvas, env, want) in [
        (1e9, "8G", "sides must be 1..=16384"),
        (16384.0, "1G", "pose canvas 16384x16384"),
    ] {
        let p = d.join("pose.json");
        pose_file(&p, &body(), Some((canvas.into(), canvas.into())));
        let unit = format!("model={},image={},preprocessor=openpose", s(&cn), s(&p));
        let e = clean_failure(&quick(
            &one_step(&model, &out, &["--control", &unit]),
            &[("SDCTL_MEMORY_LIMIT", env)],
        ));
        assert!(e.contains(want), "{e}");
        assert!(!out.exists());
    }
}

#[test]
fn training_resolution_and_batch_are_estimated_before_loading() {
    let d = scratch("hostile-sizes", "train");
    ok(&sdctl_with(
        &[
            "dataset",
            "fill",
            "--output",
            s(&d.join("data")),
            "--count",
            "1",
            "--size",
            "64",
            "--seed",
            "1",
        ],
        &[],
    ));
    let model = model_dir("sd1");
    for (res, batch) in [("100000", "1"), ("64", "100000")] {
        // the two trainers name their model and their step limit differently
        for (trainer, model_flag, out, steps_flag) in [
            ("controlnet", "--base", "cn", "--max-steps"),
            ("unet", "--model", "unet", "--max-train-steps"),
        ] {
            let e = clean_failure(&quick(
                &[
                    "train",
                    trainer,
                    model_flag,
                    s(&model),
                    "--dataset",
                    s(&d.join("data")),
                    "--output",
                    s(&d.join(out)),
                    "--resolution",
                    res,
                    "--batch-size",
                    batch,
                    steps_flag,
                    "1",
                ],
                &[],
            ));
            assert!(
                e.contains("training resolution") && e.contains("would need about"),
                "{e}"
            );
        }
    }
    assert!(!d.join("cn").exists() && !d.join("unet").exists());
}

/// A 2x16000 strip is a small image, but at the processor resolution (short side to 512) it
/// would become 512x4096000: refused from the arithmetic, before anything is resized.
#[test]
fn detect_checks_the_size_after_its_resize_arithmetic() {
    let d = scratch("hostile-sizes", "strip");
    let strip = d.join("strip.png");
    image::RgbImage::from_pixel(2, 16000, image::Rgb([200, 100, 50]))
        .save(&strip)
        .unwrap();
    let out = d.join("map.png");
    let o = quick(&["detect", "canny", s(&strip), "-o", s(&out)], &[]);
    let err = clean_failure(&o);
    assert!(
        err.contains("2x16000") && err.contains("more than 16384 pixels a side"),
        "{err}"
    );
    assert!(!out.exists());
    // within the limits it runs (a strip whose resized size fits)
    let small = d.join("small.png");
    image::RgbImage::from_pixel(64, 256, image::Rgb([200, 100, 50]))
        .save(&small)
        .unwrap();
    ok(&quick(&["detect", "canny", s(&small), "-o", s(&out)], &[]));
    assert!(out.exists());
}
