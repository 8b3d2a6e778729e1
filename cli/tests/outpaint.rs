//! `sdctl generate --outpaint`: the init image padded and its new border repainted, the
//! original kept (A1111's overlay) away from the feather, on a 4-channel model with mask
//! blending, on a 9-channel inpainting model, and with a ControlNet unit; bad settings named.

use sd_tests::{fixtures, model_dir};

use crate::common::{fails, s, scratch, sdctl};

fn run(model: &str, extra: &[&str], out: &std::path::Path) -> image::RgbImage {
    let init = fixtures().join("inputs/init.png");
    let mut a = vec![
        "generate",
        "--model",
        model,
        "--prompt",
        "a red circle",
        "--steps",
        "3",
        "--seed",
        "4",
        "--init-image",
        s(&init),
        "--output",
        s(out),
    ];
    a.extend_from_slice(extra);
    let o = sdctl(&a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    image::open(out).unwrap().to_rgb8()
}

#[test]
fn the_border_is_repainted_and_the_original_kept() {
    let dir = scratch("outpaint", "ok");
    let init = image::open(fixtures().join("inputs/init.png"))
        .unwrap()
        .to_rgb8();
    let sd1 = model_dir("sd1");
    let inpaint = model_dir("sd1-inpaint");
    let cn = model_dir("controlnet-sd1");
    let unit = format!(
        "model={},image={}",
        s(&cn),
        s(&fixtures().join("inputs/control_a.png"))
    );
    for (name, model, extra) in [
        ("edge", &sd1, vec!["--outpaint", "16,0,8,16"]),
        (
            "mirror",
            &sd1,
            vec!["--outpaint", "16,0,8,16", "--outpaint-fill", "mirror"],
        ),
        (
            "nine-channel",
            &inpaint,
            vec!["--outpaint", "16,0,8,16", "--outpaint-fill", "noise"],
        ),
        (
            "control",
            &sd1,
            vec!["--outpaint", "16,0,8,16", "--control", &unit],
        ),
    ] {
        let out = dir.join(format!("{name}.png"));
        let img = run(s(model), &extra, &out);
        assert_eq!(img.dimensions(), (80, 88), "{name}");
        // far from the feather (3 sigma of the 8 px blur) the original is pasted back
        for (x, y) in [(50, 40), (70, 34), (78, 47)] {
            assert_eq!(
                img.get_pixel(x, y),
                init.get_pixel(x - 16, y - 8),
                "{name} at {x},{y}"
            );
        }
        // the new border is the model's, not the fill (edge: the column next to the image
        // repeated; the result varies along it)
        let border: Vec<_> = (0..8).map(|y| img.get_pixel(2, 20 + 8 * y).0).collect();
        assert!(
            border.windows(2).any(|w| w[0] != w[1]),
            "{name}: {border:?}"
        );
        let info = sdctl(&["png-info", s(&out)]);
        assert!(
            String::from_utf8_lossy(&info.stdout).contains("Outpaint: \"16,0,8,16"),
            "{name}"
        );
    }
}

#[test]
fn bad_outpaint_settings_are_named() {
    let dir = scratch("outpaint", "bad");
    let out = dir.join("o.png");
    let model = model_dir("sd1");
    let init = fixtures().join("inputs/init.png");
    let mask = fixtures().join("inputs/mask.png");
    for (extra, want) in [
        (
            vec!["--outpaint", "16,0,8", "--init-image", s(&init)],
            "LEFT,RIGHT,TOP,BOTTOM",
        ),
        (vec!["--outpaint", "16,0,8,16"], "needs an init image"),
        (
            vec!["--outpaint", "5,0,0,0", "--init-image", s(&init)],
            "multiple of 8",
        ),
        (
            vec![
                "--outpaint",
                "16,0,8,16",
                "--init-image",
                s(&init),
                "--mask",
                s(&mask),
            ],
            "own mask",
        ),
        (vec!["--outpaint-fill", "mirror"], "needs outpaint"),
    ] {
        let mut a = vec![
            "generate",
            "--model",
            s(&model),
            "--prompt",
            "x",
            "--steps",
            "2",
            "--output",
            s(&out),
        ];
        a.extend(extra.iter().copied());
        let err = fails(&a, &out);
        assert!(err.contains(want), "{extra:?}: {err}");
    }
}
