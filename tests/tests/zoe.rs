//! `depth_zoe` (ZoeDepth N: MiDaS v3.1 BEiT-L/16 + metric bins) against controlnet_aux 0.0.10
//! (fixtures/make_zoe_fixtures.py). The network is the real architecture (345M parameters)
//! with random weights drawn again here as the script draws them (torch's `randn` per tensor,
//! seeded by the key's name, times a power of two, plus an offset for the norm gains and
//! MiDaS's last bias), so no weights file is stored.
//! - `model.infer` on controlnet_aux's `resize_image(chelsea, 64)` (128x64: reflect-padded to
//!   176x96, MiDaS's resize to 512x288, an 18x32 token grid, so the 47x47 relative position
//!   tables are resized both ways; flip averaging, bicubic back): max abs difference <= 1e-4
//!   of the largest depth (f32 sums in another order through 24 BEiT-L blocks, the DPT decoder
//!   and the bins head; measured 5.4e-7 of 0.78);
//! - the whole preprocessor (our `resize_image` to 128x64, which must give the fixture's input
//!   exactly, `infer`, numpy's percentiles 2 / 85, `1 - x`, u8) against `ZoeDetector.__call__`
//!   with and without `gamma_corrected`: every pixel within one level (u8 truncation of values
//!   computed in another order);
//! - the tensors of a `{"model": state_dict}` `.pt` (ZoeD_M12_N.pt's layout) read by the
//!   pickle-free loader.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use sd_plugins_api::{resolve_params, ImageBuf};
use sd_preprocessors::zoe::{depth_to_u8, parameter_shapes, percentile, ZoeNet};
use sd_tests::{fixtures, max_abs, max_abs_diff};

fn dir() -> PathBuf {
    fixtures().join("zoe")
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
    } else if key.ends_with("cls_token") {
        (0.5, 0.0)
    } else if key.ends_with("scratch.output_conv.4.bias") {
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

fn random_net() -> ZoeNet {
    ZoeNet::from_tensors(sd_tests::depth_weights(parameter_shapes(), &scale_offset)).unwrap()
}

fn luma(name: &str) -> Vec<u8> {
    image::open(dir().join(name))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .to_luma8()
        .into_raw()
}

/// One test: the 345M random weights are drawn once.
#[test]
fn zoe_matches_controlnet_aux() {
    let t = std::time::Instant::now();
    let net = random_net();
    println!("weights drawn in {:?}", t.elapsed());

    let photo = image::open(dir().join("chelsea.png")).unwrap().to_rgb8();
    let photo = ImageBuf::new(
        photo.width() as usize,
        photo.height() as usize,
        3,
        photo.into_raw(),
    )
    .unwrap();
    let input = sd_preprocessors::resize::resize_image(&photo, 64);
    assert_eq!((input.width, input.height), (128, 64));
    let (w, h) = (input.width, input.height);

    // our resize gives the fixture's network input exactly
    let io = candle_core::safetensors::load(dir().join("io.safetensors"), &Device::Cpu).unwrap();
    let x: Vec<f32> = (0..3)
        .flat_map(|c| {
            input
                .data
                .iter()
                .skip(c)
                .step_by(3)
                .map(|&v| v as f32 / 255.0)
        })
        .collect();
    let want_x = io["input"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(x, want_x, "resize_image differs from the fixture's input");

    // the preprocessor's path: u8 / 255 RGB planes, `infer`
    let t = std::time::Instant::now();
    let got = sd_preprocessors::zoe::raw_depth(&net, &input).unwrap();
    let got_t = Tensor::from_vec(got.clone(), (1, 1, h, w), &Device::Cpu).unwrap();
    let want = &io["depth"];
    let d = max_abs_diff(&got_t, want);
    let scale = max_abs(want);
    println!(
        "infer {:?}: max abs diff {d:.3e} (max depth {scale:.4}, {:?})",
        want.dims(),
        t.elapsed()
    );
    assert!(scale > 0.1, "reference depth is ~zero");
    assert!(
        d <= 1e-4 * scale,
        "infer: max abs diff {d} > 1e-4 * {scale}"
    );

    for (gamma, file) in [(false, "depth_64.png"), (true, "depth_64_gamma.png")] {
        let map = depth_to_u8(&got, gamma);
        let want = luma(file);
        let worst = sd_tests::paired(file, &map, &want)
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .max()
            .unwrap();
        let differ = sd_tests::paired(file, &map, &want)
            .filter(|(a, b)| a != b)
            .count();
        println!(
            "{file}: {differ} of {} pixels differ, worst {worst} levels",
            want.len()
        );
        assert!(worst <= 1, "{file}: a pixel {worst} levels apart");
    }

    // a {"model": ...} .pt through the pickle-free loader, its values the same draw
    let store = sd_weights::Store::open(&dir().join("partial.pt")).unwrap();
    let mut names = store.names();
    names.sort();
    assert_eq!(names.len(), 3);
    for n in names {
        let key = n.strip_prefix("model.").expect("model. prefix");
        let t = store.get(&n).unwrap();
        let want = random_tensor(key, t.dims());
        assert_eq!(max_abs_diff(&t, &want), 0.0, "{n}");
    }
}

#[test]
fn percentile_is_numpys() {
    // np.percentile(np.arange(10, dtype=np.float32) ** 2, q) for q = 2, 85, 50, 100
    let v: Vec<f32> = (0..10).map(|i| (i * i) as f32).collect();
    assert_eq!(percentile(&v, 2.0), 0.18);
    assert_eq!(percentile(&v, 85.0), 58.75);
    assert_eq!(percentile(&v, 50.0), 20.5);
    assert_eq!(percentile(&v, 100.0), 81.0);
}

#[test]
fn missing_weights_name_the_file() {
    let dir = std::env::temp_dir().join(format!("sd-zoe-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::env::set_var("SDCTL_ANNOTATOR_DIR", &dir);
    let reg = sd_preprocessors::registry();
    let p = reg.preprocessor("depth_zoe").unwrap();
    let params = resolve_params(&p.params(), &[]).unwrap();
    let err = p
        .process(&ImageBuf::filled(64, 64, 3, 100), &params)
        .unwrap_err()
        .to_string();
    assert!(err.contains("ZoeD_M12_N.pt"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
    // a file that is not the ZoeDepth weights names what it lacks
    let other = fixtures().join("midas").join("partial.pt");
    let err = ZoeNet::load(&other).err().unwrap();
    assert!(
        err.contains("core.core.pretrained.model.cls_token"),
        "{err}"
    );
    // the ZoeDepth layout with tensors missing names the first missing one
    let err = ZoeNet::load(&fixtures().join("zoe").join("partial.pt"))
        .err()
        .unwrap();
    assert!(
        err.contains("no tensor `core.core.pretrained.model.cls_token`"),
        "{err}"
    );
}
