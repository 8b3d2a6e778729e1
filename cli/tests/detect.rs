//! `sdctl detect`: a preprocessor on an image file, with the detect-resolution rule, the
//! result cache and clear errors.

use std::path::Path;
use std::process::{Command, Output};

use sd_tests::fixtures;

fn sdctl(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdctl"))
        .args(args)
        .env("SDCTL_CACHE_DIR", cache)
        .output()
        .expect("sdctl runs")
}

#[test]
fn detect_canny_equals_opencv_and_is_cached() {
    let d = std::env::temp_dir().join(format!("sdctl-detect-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let cache = d.join("cache");
    let input = fixtures().join("preprocessors/chelsea.png");
    let out = d.join("edges.png");
    let o = sdctl(
        &[
            "detect",
            "canny",
            input.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--param",
            "low=50",
            "--param",
            "high=100",
        ],
        &cache,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // 768x512: short side 512 and multiples of 64, so processed at its own size
    let got = image::open(&out).unwrap().to_luma8();
    let want = image::open(fixtures().join("preprocessors/chelsea_canny_50_100.png"))
        .unwrap()
        .to_luma8();
    assert_eq!(got.dimensions(), want.dimensions());
    assert_eq!(got.into_raw(), want.into_raw());
    let o = sdctl(
        &[
            "detect",
            "canny",
            input.to_str().unwrap(),
            "-o",
            d.join("again.png").to_str().unwrap(),
            "--param",
            "low=50",
            "--param",
            "high=100",
        ],
        &cache,
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("(cached)"));
    assert_eq!(
        std::fs::read(d.join("again.png")).unwrap(),
        std::fs::read(&out).unwrap()
    );
    // a larger detect resolution resizes first (sides multiples of 64)
    let big = d.join("big.png");
    let o = sdctl(
        &[
            "detect",
            "invert",
            input.to_str().unwrap(),
            "-o",
            big.to_str().unwrap(),
            "--resolution",
            "640",
        ],
        &cache,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(image::open(&big).unwrap().height(), 640);
    // the webui's padded sizing: 768x512 at resolution 500 -> 750x500, detected at 768x512
    let padded = d.join("padded.png");
    let o = sdctl(
        &[
            "detect",
            "invert",
            input.to_str().unwrap(),
            "-o",
            padded.to_str().unwrap(),
            "--resolution",
            "500",
            "--pad",
        ],
        &cache,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(image::open(&padded).unwrap().width(), 750);
    for (args, want) in [
        (
            vec!["detect", "cany", "a.png", "-o", "b.png"],
            "did you mean `canny`",
        ),
        (
            vec!["detect", "canny", "a.png", "-o", "b.png", "--param", "lo=3"],
            "did you mean `low`",
        ),
        (
            vec![
                "detect", "canny", "a.png", "-o", "b.png", "--param", "low=999",
            ],
            "999 is out of range",
        ),
        (
            vec!["detect", "canny", "/no/such.png", "-o", "b.png"],
            "cannot read the image",
        ),
    ] {
        let o = sdctl(&args, &cache);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(want), "{want}: {err}");
    }
}

#[test]
fn pose_render_draws_keypoint_files() {
    let d = std::env::temp_dir().join(format!("sdctl-pose-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let cache = d.join("cache");
    let out = d.join("pose.png");
    let json = fixtures().join("preprocessors/pose_1.json");
    let o = sdctl(
        &[
            "pose",
            "render",
            json.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
        &cache,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = image::open(&out).unwrap().to_rgb8();
    let want = image::open(fixtures().join("preprocessors/pose_1.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(got.dimensions(), (768, 512));
    assert_eq!(got.into_raw(), want.into_raw());
    // another canvas size: normalised points scale with it
    let o = sdctl(
        &[
            "pose",
            "render",
            json.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--width",
            "256",
            "--height",
            "128",
        ],
        &cache,
    );
    assert!(o.status.success());
    assert_eq!(image::open(&out).unwrap().width(), 256);
    let bad = d.join("bad.json");
    std::fs::write(&bad, "{\"people\": [{\"pose_keypoints_2d\": [1, 2]}]}").unwrap();
    let o = sdctl(
        &[
            "pose",
            "render",
            bad.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
        &cache,
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("people[0]") && err.contains("triples"),
        "{err}"
    );
}
