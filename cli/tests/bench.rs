//! `sdctl bench annotator` and `sdctl bench onnx`: they time what they say, write their JSON,
//! and refuse bad input with a message naming it.

use sd_tests::fixtures;

use crate::common::{s, scratch, sdctl_command};

fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn bench_annotator_times_a_detection_and_names_bad_input() {
    let d = scratch("bench", "annotator");
    let photo = fixtures().join("preprocessors/chelsea.png");
    let out = d.join("canny.json");
    let o = sdctl_command()
        .args([
            "bench",
            "annotator",
            "canny",
            s(&photo),
            "--resolution",
            "128",
        ])
        .args(["--iters", "2", "--param", "low=50", "--json", s(&out)])
        .env("SDCTL_CACHE_DIR", d.join("cache"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j = json(&out);
    assert_eq!(j["name"], "canny");
    assert_eq!(j["iters"], 2);
    // the detect size: short side 128, a multiple of 64
    assert_eq!(
        j["height"]
            .as_u64()
            .unwrap()
            .min(j["width"].as_u64().unwrap()),
        128
    );
    let (mean, min) = (
        j["mean_seconds"].as_f64().unwrap(),
        j["min_seconds"].as_f64().unwrap(),
    );
    assert!(min > 0.0 && min <= mean, "{j}");
    // nothing was cached: the cache folder holds no result
    assert!(!d.join("cache").join("preprocessed").exists());

    for (args, want) in [
        (vec!["no_such_annotator", s(&photo)], "no_such_annotator"),
        (vec!["canny", s(&photo), "--param", "low=abc"], "low"),
        (vec!["canny", s(&photo), "--iters", "0"], "--iters"),
        (vec!["canny", "/no/such/image.png"], "/no/such/image.png"),
    ] {
        let o = sdctl_command()
            .arg("bench")
            .arg("annotator")
            .args(&args)
            .output()
            .unwrap();
        assert!(!o.status.success(), "{args:?}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(want), "{args:?}: {e}");
    }
}

#[test]
fn bench_onnx_runs_a_model_and_profiles_its_operators() {
    let d = scratch("bench", "onnx");
    let model = fixtures().join("dwpose/rtmpose_tiny.onnx");
    let out = d.join("onnx.json");
    let o = sdctl_command()
        .args([
            "bench",
            "onnx",
            s(&model),
            "--shape",
            "1,3,384,288",
            "--iters",
            "1",
        ])
        .args(["--op-profile", "--json", s(&out)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    // the profile names the graph's operators
    assert!(text.contains("Conv") && text.contains("MatMul"), "{text}");
    let j = json(&out);
    assert!(j["mean_seconds"].as_f64().unwrap() > 0.0, "{j}");

    // a shape the graph cannot take, and a file that is not ONNX: both named
    let o = sdctl_command()
        .args(["bench", "onnx", s(&model), "--shape", "1,3,100,100"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let not_onnx = fixtures().join("uniformer/keys.json");
    let o2 = sdctl_command()
        .args(["bench", "onnx", s(&not_onnx), "--shape", "1,3,8,8"])
        .output()
        .unwrap();
    assert!(!o2.status.success());
    let e = String::from_utf8_lossy(&o2.stderr);
    assert!(e.contains("keys.json"), "{e}");
}

#[test]
fn bench_unet_profiles_each_kernel_of_a_call() {
    let d = scratch("bench", "unet-profile");
    let out = d.join("unet.json");
    let o = sdctl_command()
        .args([
            "bench", "unet", "--arch", "sd15", "--width", "64", "--iters", "1",
        ])
        .args(["--op-profile", "--json", s(&out)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("kernels of one more plain call"), "{text}");
    let j = json(&out);
    let p = &j["op_profile"];
    let call = p[0].as_f64().unwrap();
    let kernels = p[1].as_array().unwrap();
    let calls = |name: &str| {
        kernels
            .iter()
            .find(|k| k[0] == name)
            .unwrap_or_else(|| panic!("{name} missing: {p}"))[2]
            .as_u64()
            .unwrap()
    };
    // SD1.5's UNet, counted from its config. 16 transformer blocks: 2 attentions, 1 GEGLU, 3
    // layer norms and 10 linear layers each (q, k, v, out twice; GEGLU's in, feed-forward out).
    // 22 ResNet blocks: 2 GroupNorms, 2 convolutions and a time projection each. Convolutions:
    // 44 in ResNets, 14 shortcuts (channel changes), 3 down- and 3 upsamplers, conv_in and
    // conv_out, 32 1x1 projections in and out of the transformers. GroupNorms: 44 + one per
    // transformer + conv_norm_out. Linear: 160 + 22 + the time embedding's 2.
    assert_eq!(calls("attention fwd"), 32, "{p}");
    assert_eq!(calls("geglu fwd"), 16, "{p}");
    assert_eq!(calls("layer norm (candle)"), 48, "{p}");
    assert_eq!(calls("upsample fwd"), 3, "{p}");
    assert_eq!(calls("conv fwd"), 98, "{p}");
    assert_eq!(calls("group norm fwd"), 61, "{p}");
    assert_eq!(calls("linear (candle)"), 184, "{p}");
    // the spans exclude one another: their seconds add up to at most the call's
    let total: f64 = kernels.iter().map(|k| k[1].as_f64().unwrap()).sum();
    assert!(
        total > 0.0 && total <= call * 1.01,
        "{total} of {call}: {p}"
    );
}
