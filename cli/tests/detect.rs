//! `sdctl detect`: a preprocessor on an image file, with the detect-resolution rule, the
//! result cache and clear errors.

use sd_tests::fixtures;

use crate::common::{annotator_scratch, s, scratch, sdctl_annotators, sdctl_cached, sdctl_command};

#[test]
fn detect_canny_equals_opencv_and_is_cached() {
    let d = scratch("detect", "detect");
    let cache = d.join("cache");
    let input = fixtures().join("preprocessors/chelsea.png");
    let out = d.join("edges.png");
    let o = sdctl_cached(
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
    let o = sdctl_cached(
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
    let o = sdctl_cached(
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
    let o = sdctl_cached(
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
            "/no/such.png: no such file",
        ),
    ] {
        let o = sdctl_cached(&args, &cache);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(want), "{want}: {err}");
    }
}

#[test]
fn pose_render_draws_keypoint_files() {
    let d = scratch("detect", "pose");
    let cache = d.join("cache");
    let out = d.join("pose.png");
    let json = fixtures().join("preprocessors/pose_1.json");
    let o = sdctl_cached(
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
    let o = sdctl_cached(
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
    let o = sdctl_cached(
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

#[test]
fn openpose_takes_keypoint_files_and_names_missing_weights() {
    let d = scratch("detect", "openpose");
    let cache = d.join("cache");
    // A keypoint JSON is drawn, as controlnet_aux draws it.
    let out = d.join("pose.png");
    let json = fixtures().join("preprocessors/pose_0.json");
    let o = sdctl_cached(
        &[
            "detect",
            "openpose",
            json.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
        &cache,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = image::open(&out).unwrap().to_rgb8();
    let want = image::open(fixtures().join("preprocessors/pose_0.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(got.into_raw(), want.into_raw());
    // ... only by openpose
    let o = sdctl_cached(
        &[
            "detect",
            "canny",
            json.to_str().unwrap(),
            "-o",
            d.join("x.png").to_str().unwrap(),
        ],
        &cache,
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("openpose"));
    // No weights: the file wanted and the folder to put it in; nothing written.
    let empty = d.join("annotators");
    std::fs::create_dir_all(&empty).unwrap();
    let photo = fixtures().join("preprocessors/chelsea.png");
    let none = d.join("none.png");
    let o = sdctl_command()
        .args([
            "detect",
            "openpose",
            photo.to_str().unwrap(),
            "-o",
            none.to_str().unwrap(),
        ])
        .env("SDCTL_CACHE_DIR", &cache)
        .env("SDCTL_ANNOTATOR_DIR", &empty)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("body_pose_model.pth") && e.contains(empty.to_str().unwrap()),
        "{e}"
    );
    assert!(!none.exists());
    // A model file that is not the body model: the missing tensor is named.
    let partial = fixtures().join("openpose/partial_body.pth");
    let o = sdctl_cached(
        &[
            "detect",
            "openpose",
            photo.to_str().unwrap(),
            "-o",
            none.to_str().unwrap(),
            "--param",
            &format!("model={}", partial.display()),
        ],
        &cache,
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("conv2_1.weight"));
    assert!(!none.exists());
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn detect_inpaint_keeps_the_mark_as_alpha() {
    let d = scratch("detect", "inpaint");
    // 128x64: short side 64, multiples of 64, so processed at its own size at --resolution 64.
    let nearest = image::imageops::FilterType::Nearest;
    let src = image::open(fixtures().join("preprocessors/inpaint_src.png"))
        .unwrap()
        .resize_exact(128, 64, nearest)
        .to_rgb8();
    let m = image::open(fixtures().join("preprocessors/inpaint_mask.png"))
        .unwrap()
        .resize_exact(128, 64, nearest)
        .to_luma8();
    let (src_p, mask_p) = (d.join("src.png"), d.join("mask.png"));
    src.save(&src_p).unwrap();
    m.save(&mask_p).unwrap();
    // The same mask as transparency (transparent = repaint).
    let mut rgba = image::RgbaImage::new(128, 64);
    for ((o, c), mv) in rgba.pixels_mut().zip(src.pixels()).zip(m.pixels()) {
        *o = image::Rgba([c.0[0], c.0[1], c.0[2], 255 - mv.0[0]]);
    }
    let alpha_p = d.join("alpha.png");
    rgba.save(&alpha_p).unwrap();
    let mask_arg = format!("mask={}", mask_p.display());
    for (input, extra) in [
        (&src_p, vec!["--param", mask_arg.as_str()]),
        (&alpha_p, vec![]),
    ] {
        let out = d.join("marked.png");
        let mut args = vec![
            "detect",
            "inpaint",
            input.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--resolution",
            "64",
        ];
        args.extend(extra);
        let o = sdctl_cached(&args, &d.join("cache"));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let got = image::open(&out).unwrap().to_rgba8();
        assert_eq!(got.dimensions(), (128, 64));
        let masked = got.pixels().filter(|p| p.0[3] == 0).count();
        assert!(masked > 100);
        for ((p, c), mv) in got.pixels().zip(src.pixels()).zip(m.pixels()) {
            assert_eq!(
                p.0[3] == 0,
                mv.0[0] > 127,
                "alpha 0 exactly where the mask is > 0.5"
            );
            assert_eq!(&p.0[..3], &c.0[..], "colours kept");
        }
    }
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn network_results_are_cached_per_weight_file() {
    // depth_anything_v2 with the tiny fixture network in the annotator folder: the second run
    // is a cache hit; other weights are a miss; removed weights are the error, not a stale hit.
    let d = scratch("detect", "depthcache");
    let ann = d.join("annotators");
    std::fs::create_dir_all(&ann).unwrap();
    let weights = ann.join("depth_anything_v2_vits.safetensors");
    std::fs::copy(fixtures().join("depth/tiny_da2.safetensors"), &weights).unwrap();
    let photo = fixtures().join("depth/chelsea.png");
    let run = |out: &str| {
        sdctl_command()
            .args([
                "detect",
                "depth_anything_v2",
                photo.to_str().unwrap(),
                "-o",
                d.join(out).to_str().unwrap(),
                "--resolution",
                "64",
                "--param",
                "input_size=56",
            ])
            .env("SDCTL_CACHE_DIR", d.join("cache"))
            .env("SDCTL_ANNOTATOR_DIR", &ann)
            .output()
            .unwrap()
    };
    let first = run("a.png");
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(!String::from_utf8_lossy(&first.stderr).contains("cached"));
    let again = run("b.png");
    assert!(String::from_utf8_lossy(&again.stderr).contains("cached"));
    assert_eq!(
        std::fs::read(d.join("a.png")).unwrap(),
        std::fs::read(d.join("b.png")).unwrap()
    );
    // replaced weights (another size or time): recomputed
    let mut w = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
    let k = w
        .keys()
        .find(|k| k.contains("output_conv2.2.bias"))
        .unwrap()
        .clone();
    let t = (w[&k].clone() + 1.0).unwrap();
    w.insert(k, t);
    std::thread::sleep(std::time::Duration::from_millis(20));
    candle_core::safetensors::save(&w, &weights).unwrap();
    let changed = run("c.png");
    assert!(changed.status.success());
    assert!(!String::from_utf8_lossy(&changed.stderr).contains("cached"));
    std::fs::remove_file(&weights).unwrap();
    let gone = run("d.png");
    assert!(!gone.status.success());
    let e = String::from_utf8_lossy(&gone.stderr);
    assert!(
        e.contains("depth_anything_v2_vits.pth") && e.contains(ann.to_str().unwrap()),
        "{e}"
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn seg_ufade20k_segments_with_the_checkpoint_and_names_bad_files() {
    let (d, ann) = annotator_scratch("detect", "seg_ufade20k");
    let run = |args: &[&str]| sdctl_annotators(args, &d, &ann);
    let photo = fixtures().join("uniformer/image.png");
    let png = d.join("seg.png");
    let args = [
        "detect",
        "seg_ufade20k",
        s(&photo),
        "-o",
        s(&png),
        "--resolution",
        "64",
        "--pad",
    ];
    // no weights: the file and the folder named, nothing written
    let o = run(&args);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("upernet_global_small.pth") && e.contains(s(&ann)),
        "{e}"
    );
    assert!(!png.exists());

    // another network's checkpoint under the name: named, nothing written
    std::fs::copy(
        fixtures().join("dwpose/network.safetensors"),
        ann.join("upernet_global_small.safetensors"),
    )
    .unwrap();
    let o = run(&args);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("upernet_global_small.safetensors") && e.contains("UniFormer"),
        "{e}"
    );
    assert!(!png.exists());
    std::fs::remove_file(ann.join("upernet_global_small.safetensors")).unwrap();

    // the tiny real-architecture checkpoint (an mmcv .pth with meta) under the real name: the
    // map webui makes, every pixel an ADE20K colour
    std::fs::copy(
        fixtures().join("uniformer/upernet_tiny.pth"),
        ann.join("upernet_global_small.pth"),
    )
    .unwrap();
    let o = run(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = image::open(&png).unwrap().to_rgb8();
    let want = image::open(fixtures().join("uniformer/net_webui_64.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(got.dimensions(), want.dimensions());
    let differ = got
        .pixels()
        .zip(want.pixels())
        .filter(|(a, b)| a != b)
        .count();
    // as the parity test: near-ties at class boundaries (2 of 5,568 there)
    assert!(differ <= 20, "{differ} pixels differ");
    let palette = sd_preprocessors::segmentation::ADE20K_PALETTE;
    assert!(got.pixels().all(|p| palette.contains(&p.0)));
}
