//! Preprocessors against OpenCV (fixtures/make_preprocessor_fixtures.py): Canny on three
//! photos at a 512 short side, three threshold pairs, every pixel equal.

use sd_plugins_api::{resolve_params, ImageBuf, ParamValue};
use sd_tests::fixtures;

fn rgb(name: &str) -> ImageBuf {
    let img = image::open(fixtures().join("preprocessors").join(name))
        .unwrap()
        .to_rgb8();
    ImageBuf::new(
        img.width() as usize,
        img.height() as usize,
        3,
        img.into_raw(),
    )
    .unwrap()
}

#[test]
fn canny_equals_opencv_pixel_for_pixel() {
    let reg = sd_preprocessors::registry();
    let p = reg.preprocessor("canny").unwrap();
    for name in ["astronaut", "coffee", "chelsea"] {
        let input = rgb(&format!("{name}.png"));
        for (lo, hi) in [(100, 200), (50, 100), (10, 250)] {
            let want =
                image::open(fixtures().join(format!("preprocessors/{name}_canny_{lo}_{hi}.png")))
                    .unwrap()
                    .to_luma8()
                    .into_raw();
            let params = resolve_params(
                &p.params(),
                &[
                    ("low".into(), ParamValue::Int(lo)),
                    ("high".into(), ParamValue::Int(hi)),
                ],
            )
            .unwrap();
            let out = p.process(&input, &params).unwrap();
            assert_eq!(out.channels, 3);
            let got: Vec<u8> = out.data.chunks(3).map(|c| c[0]).collect();
            let mismatched = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            let edges = want.iter().filter(|&&v| v > 0).count();
            assert_eq!(
                mismatched,
                0,
                "{name} ({lo}, {hi}): {mismatched} of {} pixels differ ({edges} edges)",
                want.len()
            );
        }
    }
}
