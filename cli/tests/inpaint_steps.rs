//! `sdctl generate`'s A1111 inpainting steps as flags: refused without a mask, checked
//! values, and a run whose unmasked pixels are the init image's (the overlay), recorded in the
//! infotext. The geometry is unit-tested in `sd::inpaint`; the server's use of the same steps is
//! compared with these flags in sd-server/tests/api.rs and tests/server/test_api.py.

use std::path::Path;

use crate::common::{failed, ok_stderr, s, scratch, sdctl, sdctl_cached};

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

#[test]
fn the_inpainting_steps_need_a_mask_and_valid_values() {
    let fx = fixtures();
    let model = fx.join("models/sd1");
    let out = scratch("inpaint-steps", "errors").join("x.png");
    let base = [
        "generate",
        "--model",
        s(&model),
        "--prompt",
        "a",
        "--output",
        s(&out),
    ];
    for (extra, want) in [
        (vec!["--mask-blur", "4"], "mask_blur: needs mask"),
        (vec!["--mask-overlay"], "mask_overlay: needs mask"),
        (vec!["--inpaint-area", "masked"], "inpaint_area: needs mask"),
        (
            vec!["--inpaint-fill", "latent-noise"],
            "inpaint_fill: needs mask",
        ),
        (vec!["--mask-blur", "65"], "mask_blur"),
        (vec!["--inpaint-fill", "blur"], "\"blur\""),
    ] {
        let args: Vec<&str> = base.iter().copied().chain(extra.iter().copied()).collect();
        let err = failed(&sdctl(&args));
        assert!(err.contains(want), "{extra:?}: {want:?} not in {err}");
    }
    assert!(!out.exists());
}

#[test]
fn the_overlay_keeps_the_unmasked_original_and_the_infotext_says_so() {
    let fx = fixtures();
    let dir = scratch("inpaint-steps", "overlay");
    std::fs::create_dir_all(&dir).unwrap();
    let (init, mask) = (fx.join("inputs/init.png"), fx.join("inputs/mask.png"));
    let out = dir.join("out.png");
    let err = ok_stderr(&sdctl_cached(
        &[
            "generate",
            "--model",
            s(&fx.join("models/sd1-inpaint")),
            "--prompt",
            "a hat",
            "--steps",
            "3",
            "--seed",
            "4",
            "--init-image",
            s(&init),
            "--mask",
            s(&mask),
            "--inpaint-area",
            "masked",
            "--inpaint-padding",
            "4",
            "--mask-overlay",
            "--inpaint-fill",
            "fill",
            "--output",
            s(&out),
        ],
        &dir.join("cache"),
    ));
    assert!(out.exists(), "{err}");
    let (made, orig, m) = (
        image::open(&out).unwrap().to_rgb8(),
        image::open(&init).unwrap().to_rgb8(),
        image::open(&mask).unwrap().to_luma8(),
    );
    assert_eq!(made.dimensions(), orig.dimensions());
    let mut changed = 0;
    for (x, y, p) in m.enumerate_pixels() {
        if p.0[0] <= 128 {
            assert_eq!(
                made.get_pixel(x, y),
                orig.get_pixel(x, y),
                "unmasked ({x}, {y})"
            );
        } else if made.get_pixel(x, y) != orig.get_pixel(x, y) {
            changed += 1;
        }
    }
    assert!(changed > 0, "nothing under the mask was repainted");
    let text = sd::png_text::text_chunks(&out).unwrap();
    let params = sd::png_text::find(&text, "parameters").unwrap();
    assert!(
        params.contains("Inpaint area: Only masked, Masked area padding: 4"),
        "{params}"
    );
    assert!(params.contains("Masked content: fill"), "{params}");
    let _ = std::fs::remove_dir_all(dir);
}
