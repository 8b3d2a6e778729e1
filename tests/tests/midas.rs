//! `depth_midas` / `normal_midas` (MiDaS DPT-Hybrid) against controlnet_aux 0.0.10
//! (fixtures/make_midas_fixtures.py). The network is the real architecture (123M parameters)
//! with random weights drawn again here as the script draws them (torch's `randn` per tensor,
//! seeded by the key's name, times a power of two, plus an offset for the norm gains and the
//! last bias), so no weights file is stored.
//! - the network on a 64x96 photo and a 96x64 random input (token grids 4x6 and 6x4: the
//!   position embedding resized from 24x24 both ways): max abs difference <= 1e-4 of the
//!   largest depth (f32 sums in another order through 12 ViT blocks, 16 bottlenecks and the
//!   DPT head; measured 2.8e-5 and 3.5e-5, where PyTorch's own float32 result is 2.8e-5 and
//!   2.1e-5 from its float64 one);
//! - the whole preprocessor (controlnet_aux's `resize_image` to 192x128, `x / 127.5 - 1`, the
//!   network, min-max to u8) against `MidasDetector.__call__`: every pixel within one level
//!   (u8 truncation of values computed in another order);
//! - `normal_midas` (`depth_and_normal=True`, `bg_th` 0.4): every pixel within one level but
//!   for a few where a depth within rounding of the background threshold, or a tiny Sobel
//!   gradient, flips (at most 0.1% of the values; none on the fixture);
//! - the tensors of a zip-format `.pt` state dict read by the pickle-free loader.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use sd_plugins_api::{resolve_params, ImageBuf};
use sd_preprocessors::midas::{depth_map, normal_map, parameter_shapes, MidasNet};
use sd_tests::{fixtures, max_abs, max_abs_diff};

fn dir() -> PathBuf {
    fixtures().join("midas")
}

/// The script's `scale_offset` for tensors that are neither 4-d nor 2-d.
fn scale_offset(key: &str, shape: &[usize]) -> (f32, f32) {
    let parts: Vec<&str> = key.split('.').collect();
    let last = if parts.len() > 1 {
        parts[parts.len() - 2]
    } else {
        key
    };
    if shape.len() == 1 && last.contains("norm") && key.ends_with(".weight") {
        (0.125, 1.0)
    } else if key.ends_with("cls_token") || key.ends_with("pos_embed") {
        (0.5, 0.0)
    } else if key == "scratch.output_conv.4.bias" {
        (0.0625, 0.5)
    } else {
        (0.0625, 0.0)
    }
}

fn random_tensor(key: &str, shape: &[usize]) -> Tensor {
    sd_tests::depth_weights([(key.to_string(), shape.to_vec())], &scale_offset)
        .remove(key)
        .unwrap()
}

fn random_net() -> MidasNet {
    MidasNet::from_tensors(sd_tests::depth_weights(parameter_shapes(), &scale_offset)).unwrap()
}

fn rgb(path: PathBuf) -> ImageBuf {
    let img = image::open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8();
    ImageBuf::new(
        img.width() as usize,
        img.height() as usize,
        3,
        img.into_raw(),
    )
    .unwrap()
}

fn levels_apart(got: &[u8], want: &[u8]) -> (usize, i32) {
    let off = sd_tests::paired("map", got, want)
        .filter(|(a, b)| (**a as i32 - **b as i32).abs() > 1)
        .count();
    let worst = sd_tests::paired("map", got, want)
        .map(|(a, b)| (*a as i32 - *b as i32).abs())
        .max()
        .unwrap();
    (off, worst)
}

/// One test: the 123M random weights are drawn once.
#[test]
fn midas_matches_controlnet_aux() {
    let t = std::time::Instant::now();
    let net = random_net();
    println!("weights drawn in {:?}", t.elapsed());

    let io = candle_core::safetensors::load(dir().join("io.safetensors"), &Device::Cpu).unwrap();
    for case in ["a", "b"] {
        let t = std::time::Instant::now();
        let got = net.forward(&io[&format!("input_{case}")]).unwrap();
        let want = &io[&format!("depth_{case}")];
        let d = max_abs_diff(&got, want);
        let scale = max_abs(want);
        println!(
            "depth_{case} {:?}: max abs diff {d:.3e} (max depth {scale:.3}, {:?})",
            want.dims(),
            t.elapsed()
        );
        assert!(scale > 1.0, "reference depth is ~zero");
        assert!(
            d <= 1e-4 * scale,
            "depth_{case}: max abs diff {d} > 1e-4 * {scale}"
        );
    }

    // the detector: resize_image to 192x128 (what sd_preprocessors::detect does), the network
    let photo = rgb(dir().join("chelsea.png"));
    let input = sd_preprocessors::resize::resize_image(&photo, 128);
    assert_eq!((input.width, input.height), (192, 128));
    let depth = depth_map(&net, &input).unwrap();
    assert_eq!((depth.width, depth.height, depth.channels), (192, 128, 3));
    assert!(depth.data.chunks(3).all(|c| c[0] == c[1] && c[1] == c[2]));
    let got: Vec<u8> = depth.data.chunks(3).map(|c| c[0]).collect();
    let want = image::open(dir().join("depth_128.png"))
        .unwrap()
        .to_luma8()
        .into_raw();
    let (off, worst) = levels_apart(&got, &want);
    let differ = sd_tests::paired("depth", &got, &want)
        .filter(|(a, b)| a != b)
        .count();
    println!(
        "depth map: {differ} of {} pixels differ, worst {worst} levels",
        want.len()
    );
    assert_eq!(off, 0, "depth map: {off} pixels more than one level apart");

    let normal = normal_map(&net, &input, std::f32::consts::TAU, 0.4).unwrap();
    let want = rgb(dir().join("normal_128.png"));
    let (off, worst) = levels_apart(&normal.data, &want.data);
    println!(
        "normal map: {off} of {} values more than one level apart (worst {worst})",
        want.data.len()
    );
    assert!(
        off * 1000 <= want.data.len(),
        "normal map: {off} values more than one level apart"
    );

    // sides that are not multiples of 32 (the reference fails on them): edge-padded, cropped
    let odd = sd_preprocessors::resize::resize_image(&photo, 64);
    let odd = ImageBuf::new(
        90,
        50,
        3,
        (0..50)
            .flat_map(|y| odd.data[y * odd.width * 3..(y * odd.width + 90) * 3].to_vec())
            .collect(),
    )
    .unwrap();
    let m = depth_map(&net, &odd).unwrap();
    assert_eq!((m.width, m.height), (90, 50));
    assert!(m.data.contains(&255) && m.data.contains(&0));

    // a zip-format .pt state dict through the pickle-free loader, its values the same draw
    let store = sd_weights::Store::open(&dir().join("partial.pt")).unwrap();
    let mut names = store.names();
    names.sort();
    assert_eq!(names.len(), 3);
    for n in names {
        let t = store.get(&n).unwrap();
        let want = random_tensor(&n, t.dims());
        assert_eq!(max_abs_diff(&t, &want), 0.0, "{n}");
    }
}

#[test]
fn missing_weights_name_the_file() {
    let dir = std::env::temp_dir().join(format!("sd-midas-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::env::set_var("SDCTL_ANNOTATOR_DIR", &dir);
    let reg = sd_preprocessors::registry();
    for name in ["depth_midas", "normal_midas"] {
        let p = reg.preprocessor(name).unwrap();
        let params = resolve_params(&p.params(), &[]).unwrap();
        let err = p
            .process(&ImageBuf::filled(64, 64, 3, 100), &params)
            .unwrap_err()
            .to_string();
        assert!(err.contains("dpt_hybrid-midas-501f0c75.pt"), "{err}");
    }
    std::fs::remove_dir_all(&dir).ok();
    // a file that is not the MiDaS weights names what it lacks
    let other = fixtures().join("midas").join("partial.pt");
    let err = MidasNet::load(&other).err().unwrap();
    assert!(err.contains("pretrained.model.pos_embed"), "{err}");
}
