//! The soft-edge preprocessors against controlnet_aux 0.0.10 (fixtures/make_softedge_fixtures.py):
//! HED (`ControlNetHED_Apache2`) and PiDiNet (`pidinet()`, run unconverted by the reference,
//! converted to vanilla convolutions here) on random weights redrawn with the torch CPU
//! generator port, then `softedge_hed`, `softedge_hedsafe`, `softedge_pidinet` and
//! `softedge_pidisafe` through the one detection path (resize to the processor resolution,
//! network, post-processing) against `HEDdetector` / `PidiNetDetector` maps.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use sd_pipeline::rng::TorchRng;
use sd_plugins_api::{resolve_params, ImageBuf, ParamValue};
use sd_preprocessors::detect::{detect, Sizing};
use sd_preprocessors::hed::{self, HedNet};
use sd_preprocessors::pidinet::{self, PidiNet};
use sd_tests::fixtures;

fn dir() -> PathBuf {
    fixtures().join("softedge")
}

fn fixture() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join("softedge.safetensors"), &Device::Cpu).unwrap()
}

/// The fixture script's per-layer powers of two (`extra_scale`).
fn extra_scale(net: &str, key: &str) -> f32 {
    match net {
        "hed" if key.contains(".projection.") => 0.25,
        "pidi" if key.starts_with("block") && key.ends_with(".conv2.weight") => 0.5,
        "pidi" if key == "classifier.weight" => 8.0,
        _ => 1.0,
    }
}

/// The fixture script's weights: randn from `seed(name)` times powers of two.
fn random_weights(net: &str, shapes: Vec<(String, Vec<usize>)>) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for (name, shape) in shapes {
        let seed = 1000
            + name
                .bytes()
                .enumerate()
                .map(|(i, b)| (i as u64 + 1) * b as u64)
                .sum::<u64>();
        let n: usize = shape.iter().product();
        let r = TorchRng::new(seed).randn_f32(n);
        let v: Vec<f32> = if name == "norm" {
            r.into_iter().map(|x| x * 16.0 + 128.0).collect()
        } else if shape.len() == 4 {
            let fan_in = (shape[1] * shape[2] * shape[3]) as u64;
            let bits = 64 - fan_in.leading_zeros() as i32;
            let scale = 2f32.powi(-(bits / 2)) * extra_scale(net, &name);
            r.into_iter().map(|x| x * scale).collect()
        } else {
            r.into_iter().map(|x| x / 64.0).collect()
        };
        out.insert(name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap());
    }
    out
}

fn getter(w: &HashMap<String, Tensor>) -> impl Fn(&str) -> Result<Tensor, String> + '_ {
    move |n| w.get(n).cloned().ok_or_else(|| format!("missing {n}"))
}

/// The resized image the networks saw, as `[1, 3, H, W]` (0..255, or BGR / 255 for PiDiNet).
fn net_input(f: &HashMap<String, Tensor>, bgr01: bool) -> Tensor {
    let x = f["net_input"]
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .permute((2, 0, 1))
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .contiguous()
        .unwrap();
    if bgr01 {
        (x.flip(&[1]).unwrap() / 255.0).unwrap()
    } else {
        x
    }
    .contiguous()
    .unwrap()
}

/// Max |got - want| over the max |want|, asserting the reference is not ~zero.
fn relative(name: &str, got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims(), "{name}");
    let d = sd_tests::max_abs_diff(got, want);
    let scale = sd_tests::max_abs(want);
    assert!(scale > 1e-2, "{name}: reference ~zero ({scale})");
    println!("{name}: max |diff| {d:.3e} (max |value| {scale:.3})");
    d / scale
}

#[test]
fn hed_network_matches_pytorch() {
    let w = random_weights("hed", hed::parameter_shapes());
    let net = HedNet::new(&getter(&w), &Device::Cpu).unwrap();
    let f = fixture();
    let outs = net.forward(&net_input(&f, false)).unwrap();
    assert_eq!(outs.len(), 5);
    for (i, got) in outs.iter().enumerate() {
        let name = format!("hed_p{}", i + 1);
        // 1e-4 of the output's range: f32 summation order over 13 conv layers with 0..255
        // inputs (measured ~1e-6).
        let r = relative(&name, got, &f[&name]);
        assert!(r < 1e-4, "{name}: relative difference {r}");
    }
}

#[test]
fn pidinet_converted_network_matches_unconverted_pytorch() {
    let w = random_weights("pidi", pidinet::parameter_shapes());
    let net = PidiNet::new(&getter(&w), &Device::Cpu).unwrap();
    let f = fixture();
    let outs = net.forward(&net_input(&f, true)).unwrap();
    let names = ["pidi_e1", "pidi_e2", "pidi_e3", "pidi_e4", "pidi_fused"];
    assert_eq!(outs.len(), names.len());
    for (got, name) in outs.iter().zip(names) {
        // Sigmoid outputs in 0..1: 1e-4 covers f32 rounding of the converted kernels (the
        // reference subtracts a separate centre convolution, `y - yc`) and of summation order.
        let r = relative(name, got, &f[name]);
        assert!(r < 1e-4, "{name}: relative difference {r}");
    }
    // the fused map is not flat: the test would not see a wrong network otherwise
    let fused = f["pidi_fused"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let (lo, hi) = fused
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    assert!(hi - lo > 0.5, "fused output spans only {lo}..{hi}");
}

#[test]
fn pixel_difference_conversion_follows_convert_pidinet() {
    use pidinet::{convert, Pdc};
    let k: Vec<f32> = (1..=9).map(|v| v as f32).collect();
    assert_eq!(convert(Pdc::Vanilla, &k), (k.clone(), 3));
    // centre minus the sum (45)
    let (c, n) = convert(Pdc::Central, &k);
    assert_eq!((c[4], n), (5.0 - 45.0, 3));
    assert_eq!(&c[..4], &k[..4]);
    // w - w[[3, 0, 1, 6, 4, 2, 7, 8, 5]]
    let (a, _) = convert(Pdc::Angular, &k);
    assert_eq!(a, vec![-3.0, 1.0, 1.0, -3.0, 0.0, 3.0, -1.0, -1.0, 3.0]);
    // the ring of 8 outer taps is w[1..], the inner ring -w[1..], the centre 0
    let (r, n) = convert(Pdc::Radial, &k);
    assert_eq!(n, 5);
    #[rustfmt::skip]
    let want = [
        2.0, 0.0, 3.0, 0.0, 4.0,
        0.0, -2.0, -3.0, -4.0, 0.0,
        5.0, -5.0, 0.0, -6.0, 6.0,
        0.0, -7.0, -8.0, -9.0, 0.0,
        7.0, 0.0, 8.0, 0.0, 9.0,
    ];
    assert_eq!(r, want);
}

fn save(w: &HashMap<String, Tensor>, path: &Path) {
    candle_core::safetensors::save(w, path).unwrap();
}

fn read_png(path: &Path) -> ImageBuf {
    let img = image::open(path).unwrap().to_rgb8();
    ImageBuf::new(
        img.width() as usize,
        img.height() as usize,
        3,
        img.into_raw(),
    )
    .unwrap()
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sd-softedge-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn preprocessors_match_controlnet_aux() {
    let tmp = temp_dir("weights");
    let hed_file = tmp.join("hed.safetensors");
    let pidi_file = tmp.join("pidi.safetensors");
    save(&random_weights("hed", hed::parameter_shapes()), &hed_file);
    // PiDiNet as the real checkpoint names it: DataParallel's `module.` prefix
    let pidi: HashMap<String, Tensor> = random_weights("pidi", pidinet::parameter_shapes())
        .into_iter()
        .map(|(k, v)| (format!("module.{k}"), v))
        .collect();
    save(&pidi, &pidi_file);

    let reg = sd_preprocessors::registry();
    let photo = read_png(&dir().join("input.png"));
    for (name, file) in [
        ("softedge_hed", &hed_file),
        ("softedge_hedsafe", &hed_file),
        ("softedge_pidinet", &pidi_file),
        ("softedge_pidisafe", &pidi_file),
    ] {
        let p = reg.preprocessor(name).unwrap();
        let params = resolve_params(
            &p.params(),
            &[("model".into(), ParamValue::Str(file.display().to_string()))],
        )
        .unwrap();
        // controlnet_aux: detect_resolution = image_resolution = 64 (resize_image)
        let sizing = Sizing {
            resolution: 64,
            pad: false,
        };
        let out = detect(&reg, p.as_ref(), &photo, &params, sizing)
            .unwrap()
            .map;
        let want = image::open(dir().join(format!("{}.png", &name[9..])))
            .unwrap()
            .to_luma8();
        assert_eq!(
            (out.width, out.height, out.channels),
            (want.width() as usize, want.height() as usize, 3),
            "{name}"
        );
        assert!(out.data.chunks(3).all(|c| c[0] == c[1] && c[1] == c[2]));
        let got: Vec<u8> = out.data.chunks(3).map(|c| c[0]).collect();
        let want = want.into_raw();
        let worst = sd_tests::paired(name, &got, &want)
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .max()
            .unwrap();
        let off = sd_tests::paired(name, &got, &want)
            .filter(|(a, b)| a != b)
            .count();
        let distinct = want.iter().collect::<std::collections::BTreeSet<_>>().len();
        println!(
            "{name}: {off} of {} pixels differ, worst {worst} levels; {distinct} levels",
            want.len()
        );
        // the maps are not degenerate: the safe ones hold 0, 127 and 255, the others many
        let min_levels = if name.ends_with("safe") { 3 } else { 64 };
        assert!(distinct >= min_levels, "{name}: only {distinct} levels");
        if name.ends_with("safe") {
            // safe_step leaves 0, 127, 255: an edge within float rounding (~1e-6) of 1/3 or
            // 2/3 can land one step over, so at most 1 pixel in 1000 (measured: none)
            assert!(off <= want.len() / 1000, "{name}: {off} pixels differ");
            assert!(worst <= 128, "{name}: {worst} levels apart");
        } else {
            // One 8-bit level: the truncation to 8 bits of values computed in another float
            // order (network outputs agree to ~1e-6) can fall on the other side of a level.
            assert!(worst <= 1, "{name}: {worst} levels apart");
        }
    }
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn checkpoint_formats_are_read_and_bad_files_named() {
    // ControlNetHED.pth: a plain state_dict. The partial file holds `norm` and the first conv;
    // loading reads them (shape-checked) and stops at the first missing key, named.
    let err = HedNet::load(&dir().join("partial_hed.pth"), &Device::Cpu)
        .err()
        .unwrap();
    assert!(
        err.contains("no tensor `block1.convs.1.weight`") && err.contains("ControlNetHED.pth"),
        "{err}"
    );
    // table5_pidinet.pth: {"state_dict": {"module.<key>": ...}}; the first two tensors are
    // found under `module.`, the third is missing.
    let err = PidiNet::load(&dir().join("partial_pidinet.pth"), &Device::Cpu)
        .err()
        .unwrap();
    assert!(
        err.contains("no tensor `block1_1.conv2.weight`") && err.contains("table5_pidinet.pth"),
        "{err}"
    );
    // the tensors read are the reference's
    let store = sd_weights::Store::open(&dir().join("partial_pidinet.pth")).unwrap();
    let w = random_weights("pidi", pidinet::parameter_shapes());
    let got = store.get("module.block1_1.conv1.weight").unwrap();
    assert_eq!(
        sd_tests::max_abs_diff(&got, &w["block1_1.conv1.weight"]),
        0.0
    );

    // a wrong shape names the tensor and both shapes
    let mut w = random_weights("hed", hed::parameter_shapes());
    w.insert(
        "block2.convs.0.weight".into(),
        Tensor::zeros((128, 64, 1, 1), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let err = HedNet::new(&getter(&w), &Device::Cpu).err().unwrap();
    assert!(
        err.contains("block2.convs.0.weight has shape [128, 64, 1, 1], expected [128, 64, 3, 3]"),
        "{err}"
    );
    // PiDiNet weights given to HED
    let tmp = temp_dir("wrong");
    let file = tmp.join("pidi.safetensors");
    save(&random_weights("pidi", pidinet::parameter_shapes()), &file);
    let err = HedNet::load(&file, &Device::Cpu).err().unwrap();
    std::fs::remove_dir_all(&tmp).ok();
    assert!(err.contains("no tensor `norm`"), "{err}");
}

#[test]
fn missing_weights_name_the_file() {
    let reg = sd_preprocessors::registry();
    for (name, file) in [
        ("softedge_hed", "ControlNetHED.pth"),
        ("softedge_hedsafe", "ControlNetHED.pth"),
        ("softedge_pidinet", "table5_pidinet.pth"),
        ("softedge_pidisafe", "table5_pidinet.pth"),
    ] {
        let p = reg.preprocessor(name).unwrap();
        // a model file that is not there
        let params = resolve_params(
            &p.params(),
            &[("model".into(), ParamValue::Str("/nonexistent/x.pth".into()))],
        )
        .unwrap();
        let err = p
            .process(&ImageBuf::filled(64, 64, 3, 100), &params)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/nonexistent/x.pth") && err.contains(name),
            "{err}"
        );
        // none given: looked for in the annotator folder, the file wanted named when absent
        let params = resolve_params(&p.params(), &[]).unwrap();
        let installed =
            sd_preprocessors::weights::annotator_dir().is_some_and(|d| d.join(file).is_file());
        match p.process(&ImageBuf::filled(64, 64, 3, 100), &params) {
            Ok(_) => assert!(installed, "{name}: ran without weights"),
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains(file) && e.contains("--param model="), "{e}");
            }
        }
    }
    assert_eq!(hed::WEIGHT_FILES[0], "ControlNetHED.pth");
    assert_eq!(pidinet::WEIGHT_FILES[0], "table5_pidinet.pth");
}
