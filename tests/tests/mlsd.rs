//! M-LSD against controlnet_aux 0.0.10 (fixtures/make_mlsd_fixtures.py):
//! - `MobileV2_MLSD_Large` on random weights (redrawn here with the torch CPU generator port):
//!   the network input built from the photo equal to pred_lines', the TP map within 1e-4 of its
//!   largest value;
//! - the whole detector on those random weights (network, decoding, drawing): the same lines
//!   and every pixel of the map;
//! - decoding and drawing on canned TP maps fed through the reference's own `pred_lines` and
//!   `MLSDdetector.__call__`: the same lines (bit for bit) and every pixel;
//! - `cv_line` against cv2.line(..., 1) on 400 segments, many off the canvas.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use sd_pipeline::rng::TorchRng;
use sd_plugins_api::{resolve_params, ImageBuf, ParamValue};
use sd_preprocessors::draw::{cv_line, Canvas};
use sd_preprocessors::mlsd::{
    mlsd_map, net, network_input, output_side, pred_lines, LineNetwork, MlsdNet,
};
use sd_tests::{fixtures, max_abs, max_abs_diff};

fn fixture() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("mlsd/mlsd.safetensors"), &Device::Cpu).unwrap()
}

fn get<'a>(f: &'a HashMap<String, Tensor>, name: &str) -> &'a Tensor {
    f.get(name)
        .unwrap_or_else(|| panic!("fixture tensor {name} missing"))
}

/// The fixture script's weights: randn from `seed(name)`, then per kind of tensor the exact
/// scalings it applies.
fn random_weights() -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for (name, shape) in net::parameter_shapes() {
        let seed = 1000
            + name
                .bytes()
                .enumerate()
                .map(|(i, b)| (i as u64 + 1) * b as u64)
                .sum::<u64>();
        let n: usize = shape.iter().product();
        let r = TorchRng::new(seed).randn_f32(n);
        let v: Vec<f32> = if shape.len() == 4 {
            let fan_in = (shape[1] * shape[2] * shape[3]) as f64;
            // Python's round() of the exponent: ties to even (fan_in 64 gives 2^-2)
            let e = (2.0 / fan_in).sqrt().log2().round_ties_even();
            let mut s = 2f64.powi(e as i32) as f32;
            if name == "block23.conv3.weight" {
                s /= 16.0;
            }
            r.iter().map(|x| x * s).collect()
        } else if name.ends_with("running_var") {
            r.iter().map(|x| x.abs() * 0.25 + 0.5).collect()
        } else if name.ends_with("running_mean") || name.ends_with(".bias") {
            r.iter().map(|x| x * (1.0 / 16.0)).collect()
        } else {
            r.iter().map(|x| x * 0.125 + 1.0).collect()
        };
        out.insert(name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap());
    }
    out
}

fn random_net() -> MlsdNet {
    let w = random_weights();
    MlsdNet::new(
        &|n| w.get(n).cloned().ok_or_else(|| format!("missing {n}")),
        &Device::Cpu,
    )
    .unwrap()
}

/// An HxWx3 u8 fixture tensor as an image.
fn image(t: &Tensor) -> ImageBuf {
    let (h, w, c) = t.dims3().unwrap();
    ImageBuf::new(w, h, c, t.flatten_all().unwrap().to_vec1::<u8>().unwrap()).unwrap()
}

/// The drawn map against the reference's first channel (all three are equal there): every
/// pixel, every channel. Returns the number of lit pixels.
fn assert_same_map(what: &str, got: &ImageBuf, want: &Tensor) -> usize {
    let (h, w) = want.dims2().unwrap();
    assert_eq!((got.width, got.height, got.channels), (w, h, 3), "{what}");
    let want = want.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let got: Vec<&[u8]> = got.data.chunks(3).collect();
    let differ = sd_tests::paired(what, &got, &want)
        .filter(|(g, &v)| g.iter().any(|&c| c != v))
        .count();
    assert_eq!(
        differ, 0,
        "{what}: {differ} pixels differ from controlnet_aux"
    );
    want.iter().filter(|&&v| v > 0).count()
}

#[test]
fn network_matches_pytorch() {
    let f = fixture();
    let net = random_net();
    let img = image(get(&f, "net_image"));
    let x = network_input(&img).unwrap();
    // The input is exact: u8 / 127.5 - 1 in f32 on both sides.
    assert_eq!(max_abs_diff(&x, get(&f, "net_input")), 0.0, "network input");
    let got = net.forward(&x).unwrap();
    let want = get(&f, "net_output");
    assert_eq!(got.dims(), want.dims());
    // 1e-4 of the largest output (~30): f32 sums in another order through 50 layers, and
    // BatchNorm folded into the convs (measured 4.0e-4 on 30.5, 1.3e-5 relative).
    let (diff, scale) = (max_abs_diff(&got, want), max_abs(want));
    eprintln!("TP map: max |diff| {diff:e}, max |value| {scale}");
    assert!(scale > 1.0, "outputs vanished ({scale})");
    assert!(diff <= 1e-4 * scale, "{diff} vs {scale}");
}

#[test]
fn detector_on_random_weights_matches_controlnet_aux() {
    let f = fixture();
    let net = random_net();
    let img = image(get(&f, "net_image"));
    let lines = pred_lines(&net, &img, 0.1, 0.1).unwrap().unwrap();
    let want = get(&f, "net_lines").to_vec2::<f64>().unwrap();
    // The fixture's photo keeps every coordinate 1e-3 away from an integer and every score
    // and length 1e-3 away from the thresholds, so network differences of ~1e-5 cannot change
    // which lines are drawn or their pixels.
    for (g, w) in sd_tests::paired("lines", &lines, &want) {
        for k in 0..4 {
            assert!((g[k] - w[k]).abs() < 1e-3, "{g:?} vs {w:?}");
        }
    }
    let map = mlsd_map(&net, &img, 0.1, 0.1).unwrap();
    let lit = assert_same_map("random-weights map", &map, get(&f, "net_map"));
    assert!(lit > 500, "the lines are drawn ({lit} pixels)");
}

/// The reference's `model` replaced by a canned TP map, as the fixture script replaces it; the
/// input's shape checked as its stand-in checks it.
struct Canned(Tensor);

impl LineNetwork for Canned {
    fn tp_map(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        let (_, _, th, tw) = self.0.dims4()?;
        assert_eq!(
            (c, h / 2, w / 2),
            (4, th, tw),
            "network input {:?}",
            x.dims()
        );
        Ok(self.0.clone())
    }
}

#[test]
fn decoding_and_drawing_match_controlnet_aux_on_canned_maps() {
    let f = fixture();
    for (case, min_lines, min_lit) in [("designed", 11, 600), ("noise", 200, 4000)] {
        let img = image(get(&f, &format!("{case}_image")));
        let canned = Canned(get(&f, &format!("{case}_tp")).unsqueeze(0).unwrap());
        let thr = get(&f, &format!("{case}_thr")).to_vec1::<f64>().unwrap();
        let lines = pred_lines(&canned, &img, thr[0], thr[1]).unwrap().unwrap();
        let want = get(&f, &format!("{case}_lines")).to_vec2::<f64>().unwrap();
        assert_eq!(lines.len(), min_lines, "{case}: number of lines");
        // Same f32 map, same f64 arithmetic: the same numbers, in the same order.
        for (g, w) in sd_tests::paired(case, &lines, &want) {
            assert_eq!(&g[..], &w[..], "{case}");
        }
        let map = mlsd_map(&canned, &img, thr[0], thr[1]).unwrap();
        let lit = assert_same_map(case, &map, get(&f, &format!("{case}_map")));
        assert!(lit > min_lit, "{case}: {lit} lit pixels");
    }
}

#[test]
fn cv_line_matches_cv2() {
    let f = fixture();
    let pts = get(&f, "line_pts").to_vec2::<i64>().unwrap();
    let size = get(&f, "line_size").to_vec1::<i64>().unwrap();
    let (w, h) = (size[0] as usize, size[1] as usize);
    let packed = get(&f, "line_bits").to_vec1::<u8>().unwrap();
    let bit = |i: usize| packed[i / 8] >> (7 - i % 8) & 1 == 1;
    let mut bad = Vec::new();
    let mut lit = 0;
    for (k, p) in pts.iter().enumerate() {
        let mut c = Canvas::new(w, h);
        cv_line(
            &mut c,
            (p[0] as i32, p[1] as i32),
            (p[2] as i32, p[3] as i32),
            [255, 255, 255],
        );
        for i in 0..w * h {
            let want = bit(k * w * h + i);
            lit += want as usize;
            if (c.data[i * 3] == 255) != want {
                bad.push(k);
                break;
            }
        }
    }
    assert!(lit > 2000, "{lit}");
    assert!(
        bad.is_empty(),
        "segments drawn differently: {:?}",
        bad.iter().map(|&k| &pts[k]).collect::<Vec<_>>()
    );
}

#[test]
fn sizes_the_reference_fails_on_give_a_black_map() {
    // Sides other than 16k / 16k+1 break the decoder's concatenation, and a map of fewer than
    // 200 cells breaks topk: the reference's try/except leaves the canvas black.
    assert_eq!(output_side(64), Some(32));
    assert_eq!(output_side(65), Some(32));
    assert_eq!(output_side(72), None);
    assert_eq!(output_side(8), None);
    let net = random_net();
    for (w, h) in [(72, 64), (64, 40), (32, 16)] {
        let img = ImageBuf::new(w, h, 3, vec![90; w * h * 3]).unwrap();
        assert!(pred_lines(&net, &img, 0.1, 0.1).unwrap().is_none());
        let map = mlsd_map(&net, &img, 0.1, 0.1).unwrap();
        assert_eq!((map.width, map.height), (w, h));
        assert!(map.data.iter().all(|&v| v == 0), "{w}x{h}");
    }
}

#[test]
fn weights_come_from_pth_and_missing_ones_are_named() {
    // partial_mlsd.pth (torch.save zip) holds backbone.features.0: read by the pickle-free
    // loader it equals the regenerated weights; the first missing tensor is named.
    let path = fixtures().join("mlsd/partial_mlsd.pth");
    let store = sd_weights::Store::open(&path).unwrap();
    let w = random_weights();
    for n in [
        "backbone.features.0.0.weight",
        "backbone.features.0.1.weight",
        "backbone.features.0.1.running_var",
    ] {
        assert_eq!(max_abs_diff(&store.get(n).unwrap(), &w[n]), 0.0, "{n}");
    }
    let e = MlsdNet::load(&path, &Device::Cpu).err().unwrap();
    assert!(
        e.contains("backbone.features.1.conv.0.0.weight") && e.contains("partial_mlsd.pth"),
        "{e}"
    );
    // A wrong shape names the tensor.
    let mut bad = random_weights();
    bad.insert(
        "block16.conv1.0.weight".into(),
        Tensor::zeros((128, 128, 1, 1), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = MlsdNet::new(
        &|n| bad.get(n).cloned().ok_or_else(|| format!("missing {n}")),
        &Device::Cpu,
    )
    .err()
    .unwrap();
    assert!(e.contains("block16.conv1.0.weight"), "{e}");
}

#[test]
fn the_preprocessor_runs_from_safetensors_and_names_missing_weights() {
    let dir = std::env::temp_dir().join(format!("mlsd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let reg = sd_preprocessors::registry();
    let p = reg.preprocessor("mlsd").unwrap();
    let f = fixture();
    let input = image(get(&f, "net_image"));

    let missing = dir.join("nothing-here.pth");
    let params = resolve_params(
        &p.params(),
        &[(
            "model".into(),
            ParamValue::Str(missing.display().to_string()),
        )],
    )
    .unwrap();
    let e = p.process(&input, &params).unwrap_err().to_string();
    assert!(e.contains("nothing-here.pth"), "{e}");

    // safetensors with the .pth keys; defaults value 0.1 / distance 0.1: the fixture's map.
    let file = dir.join("mlsd_large_512_fp32.safetensors");
    candle_core::safetensors::save(&random_weights(), &file).unwrap();
    let params = resolve_params(
        &p.params(),
        &[("model".into(), ParamValue::Str(file.display().to_string()))],
    )
    .unwrap();
    assert_eq!(params.float("value_threshold"), Some(0.1));
    assert_eq!(params.float("distance_threshold"), Some(0.1));
    let out = p.process(&input, &params).unwrap();
    assert_same_map("preprocessor", &out, get(&f, "net_map"));
    std::fs::remove_dir_all(&dir).unwrap();
}
