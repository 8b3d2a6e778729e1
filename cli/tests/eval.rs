//! `sdctl eval fill` end to end on the tiny fixture models: the JSON report and the grid, and
//! clear errors (non-zero exit, no panic, no report) on bad input. The fixture models are
//! random, so the numbers are checked for range only.

use sd_tests::model_dir;

use crate::common::{fails, s, scratch, sdctl};

#[test]
fn eval_fill_writes_report_and_grid() {
    let dir = scratch("eval", "ok");
    let (json, grid) = (dir.join("report.json"), dir.join("grid.png"));
    let (model, cn) = (model_dir("sd1"), model_dir("controlnet-sd1"));
    let o = sdctl(&[
        "eval",
        "fill",
        "--model",
        s(&model),
        "--controlnet",
        s(&cn),
        "--count",
        "3",
        "--size",
        "64",
        "--steps",
        "2",
        "--json",
        s(&json),
        "--grid",
        s(&grid),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("IoU"), "{stdout}");
    assert!(stdout.contains("colour named right"), "{stdout}");

    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let examples = doc["examples"].as_array().unwrap();
    assert_eq!(examples.len(), 3);
    for (i, e) in examples.iter().enumerate() {
        assert_eq!(e["index"], i);
        assert_eq!(e["seed"], 1_000_000 + i as u64);
        let iou = e["iou"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&iou), "{e}");
        for region in ["circle", "background"] {
            let r = &e[region];
            let err = r["error"].as_f64().unwrap();
            assert!((0.0..=255.0).contains(&err), "{e}");
            assert!(r["named_right"].is_boolean(), "{e}");
            assert_eq!(r["mean"].as_array().unwrap().len(), 3);
        }
        let prompt = e["prompt"].as_str().unwrap();
        assert_eq!(
            prompt,
            format!(
                "{} circle with {} background",
                e["circle_colour"].as_str().unwrap(),
                e["background_colour"].as_str().unwrap()
            )
        );
        let px =
            e["circle"]["pixels"].as_u64().unwrap() + e["background"]["pixels"].as_u64().unwrap();
        assert_eq!(px, 64 * 64);
    }
    let summary = &doc["summary"];
    assert_eq!(summary["count"], 3);
    let mean = summary["iou"]["mean"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&mean));
    let frac = summary["circle_named_right"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&frac));
    assert_eq!(doc["settings"]["weight"], 1.0);

    // 3 pairs of 64 x 64 (control | generated) in one row, 4 px between pairs
    let img = image::open(&grid).unwrap();
    assert_eq!((img.width(), img.height()), (3 * 2 * 64 + 2 * 4, 64));
    // the first control image is a white outline on black
    let rgb = img.to_rgb8();
    let control_max = (0..64)
        .flat_map(|y| (0..64).map(move |x| (x, y)))
        .map(|(x, y)| rgb.get_pixel(x, y).0[0])
        .max()
        .unwrap();
    assert_eq!(rgb.get_pixel(0, 0).0, [0, 0, 0]);
    assert_eq!(control_max, 255);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn eval_fill_weight_zero_is_the_baseline_and_runs() {
    let dir = scratch("eval", "w0");
    let json = dir.join("report.json");
    let (model, cn) = (model_dir("sd1"), model_dir("controlnet-sd1"));
    let o = sdctl(&[
        "eval",
        "fill",
        "--model",
        s(&model),
        "--controlnet",
        s(&cn),
        "--weight",
        "0",
        "--count",
        "1",
        "--steps",
        "1",
        "--sampler",
        "euler",
        "--json",
        s(&json),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(doc["examples"].as_array().unwrap().len(), 1);
    assert_eq!(doc["settings"]["weight"], 0.0);
    assert_eq!(doc["settings"]["sampler"], "euler");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn eval_fill_errors_are_clear() {
    let dir = scratch("eval", "err");
    let json = dir.join("report.json");
    let model = model_dir("sd1");
    let cn = model_dir("controlnet-sd1");
    let missing = dir.join("no-such-controlnet");
    let args = |cn: &str, count: &str| -> Vec<String> {
        [
            "eval",
            "fill",
            "--model",
            s(&model),
            "--controlnet",
            cn,
            "--count",
            count,
            "--steps",
            "1",
            "--json",
            s(&json),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let run = |v: Vec<String>| fails(&v.iter().map(|a| a.as_str()).collect::<Vec<_>>(), &dir);

    let err = run(args(s(&missing), "1"));
    assert!(err.contains("--controlnet"), "{err}");
    assert!(err.contains(s(&missing)), "{err}");

    // a model folder is not a ControlNet
    let err = run(args(s(&model), "1"));
    assert!(err.contains("--controlnet"), "{err}");
    assert!(err.contains(s(&model)), "{err}");

    let err = run(args(s(&cn), "0"));
    assert!(err.contains("--count"), "{err}");

    let mut v = args(s(&cn), "1");
    v[3] = s(&dir.join("no-such-model")).to_string();
    let err = run(v);
    assert!(err.contains("--model"), "{err}");
    assert!(err.contains("no-such-model"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
