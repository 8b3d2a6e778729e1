//! `--vae-tiling`: `on` decodes in tiles (the parity of the tiles themselves is in the parity
//! tests), `auto` leaves small images whole, bad values are named.

use sd_tests::model_dir;

use crate::common::{fails, s, scratch, sdctl};

#[test]
fn tiling_on_decodes_in_tiles_and_auto_leaves_small_images_whole() {
    let dir = scratch("vae-tiling", "ok");
    let model = model_dir("sd1");
    let run = |name: &str, extra: &[&str]| {
        let out = dir.join(format!("{name}.png"));
        let mut a = vec![
            "generate",
            "--model",
            s(&model),
            "--prompt",
            "a cat",
            "--width",
            "128",
            "--height",
            "96",
            "--steps",
            "2",
            "--seed",
            "3",
            "--output",
            s(&out),
        ];
        a.extend_from_slice(extra);
        let o = sdctl(&a);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        image::open(&out).unwrap().to_rgb8()
    };
    let off = run("off", &["--vae-tiling", "off"]);
    let auto = run("auto", &[]);
    let on = run("on", &["--vae-tiling", "on"]);
    let small = run(
        "small",
        &[
            "--vae-tiling",
            "on",
            "--vae-tile-size",
            "64",
            "--vae-tile-overlap",
            "0.5",
        ],
    );
    assert_eq!(off, auto, "auto tiles a small image");
    assert_ne!(off, on, "the VAE's own 64-pixel tiles changed nothing");
    assert_ne!(on, small, "another overlap changed nothing");
    assert_eq!(on.dimensions(), (128, 96));
}

#[test]
fn bad_tiling_settings_are_named() {
    let dir = scratch("vae-tiling", "bad");
    let out = dir.join("o.png");
    let model = model_dir("sd1");
    for (extra, want) in [
        (vec!["--vae-tiling", "maybe"], "vae_tiling"),
        (vec!["--vae-tile-size", "16"], "vae_tile_size"),
        (vec!["--vae-tile-overlap", "0.9"], "vae_tile_overlap"),
    ] {
        let mut a = vec![
            "generate",
            "--model",
            s(&model),
            "--prompt",
            "x",
            "--output",
            s(&out),
        ];
        a.extend(extra.iter().copied());
        let err = fails(&a, &out);
        assert!(err.contains(want), "{extra:?}: {err}");
    }
}
