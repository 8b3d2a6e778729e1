//! `normal_bae` against controlnet_aux 0.0.10's NormalBaeDetector
//! (fixtures/make_normalbae_fixtures.py), on random weights of the real architecture (the
//! EfficientNet-B5 encoder and the BN decoder, 72.6M parameters) drawn again here with the
//! torch CPU generator port instead of read from a 290 MB file: the network's raw output on
//! the reference's own input (a 128x64 and a 64x48 image), the whole map at resolution 64
//! (resize, network, colours) as controlnet_aux and sd-webui-controlnet's padded sizing make
//! it, the state dict's key list, and scannet.pt's nested layout through the pickle-free
//! loader.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use sd_pipeline::rng::TorchRng;
use sd_plugins_api::{resolve_params, ImageBuf, ParamValue};
use sd_preprocessors::lineart::Tensors;
use sd_preprocessors::normalbae::{self, Map, NormalNet, Source};
use sd_preprocessors::resize::{remove_pad, resize_image, resize_image_with_pad};
use sd_tests::fixtures;

fn dir() -> PathBuf {
    fixtures().join("normalbae")
}

fn fixture() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join("normalbae.safetensors"), &Device::Cpu).unwrap()
}

fn rgb(name: &str) -> ImageBuf {
    let img = image::open(dir().join(name)).unwrap().to_rgb8();
    let (w, h) = img.dimensions();
    ImageBuf::new(w as usize, h as usize, 3, img.into_raw()).unwrap()
}

/// The fixture script's seed of a tensor.
fn seed(key: &str) -> u64 {
    1000 + key
        .bytes()
        .enumerate()
        .map(|(i, b)| (i as u64 + 1) * b as u64)
        .sum::<u64>()
}

/// The fixture script's regenerable weights (see its docstring), under scannet.pt's names
/// (`model.` + `module.` + key) so the loader's prefix handling is exercised.
fn random_weights() -> HashMap<String, Tensor> {
    let shapes = normalbae::parameter_shapes();
    let dims: HashMap<&str, usize> = shapes.iter().map(|(n, s)| (n.as_str(), s.len())).collect();
    let mut out = HashMap::new();
    for (name, shape) in &shapes {
        let n: usize = shape.iter().product();
        let r = TorchRng::new(seed(&format!("scannet/{name}"))).randn_f32(n);
        let sibling = name.rsplit_once('.').map(|(p, _)| format!("{p}.weight"));
        let batch_norm = sibling.and_then(|s| dims.get(s.as_str()).copied()) == Some(1);
        let v: Vec<f32> = if shape.len() >= 3 {
            let fan_in = shape[1..].iter().product::<usize>() as f64;
            // Python's round(): halves to even (fan_in 64 gives log2 -2.5 -> -2)
            let scale = 2f64.powi((2.0 / fan_in).sqrt().log2().round_ties_even() as i32) as f32;
            r.into_iter().map(|x| x * scale).collect()
        } else if name.ends_with("running_var") {
            r.into_iter().map(|x| 1.0 + x * x / 2.0).collect()
        } else if name.ends_with("running_mean") {
            r.into_iter().map(|x| x / 8.0).collect()
        } else if batch_norm && name.ends_with("weight") {
            r.into_iter().map(|x| 1.0 + x / 8.0).collect()
        } else if batch_norm {
            r.into_iter().map(|x| x / 16.0).collect()
        } else {
            r.into_iter().map(|x| x / 64.0).collect()
        };
        out.insert(
            format!("model.module.{name}"),
            Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap(),
        );
    }
    out
}

/// The network with the random weights, built once for the module's tests.
fn net() -> &'static NormalNet {
    static NET: OnceLock<NormalNet> = OnceLock::new();
    NET.get_or_init(|| {
        let t = Tensors::from_map(random_weights(), "NormalBAE (scannet.pt)");
        NormalNet::new(&t).unwrap()
    })
}

fn tensor(m: &Map) -> Tensor {
    m.tensor().unwrap()
}

/// The network's output against the reference's: within 1e-4 of the largest value. The
/// normals are unit vectors and kappa about 1, so this is ~1e-4 absolute; PyTorch's own
/// float32 and float64 runs differ by 1.7e-6 here (the script prints it), and our f32 sums
/// run in other orders (folded BatchNorms, the squeeze-excite gate folded into the
/// projection, other matrix blocking).
fn assert_network(what: &str, got: &Map, want: &Tensor) {
    let got = tensor(got);
    assert_eq!(got.dims(), want.dims(), "{what}");
    let scale = sd_tests::max_abs(want);
    let diff = sd_tests::max_abs_diff(&got, want);
    eprintln!("{what}: max |diff| {diff:.3e}, max |value| {scale:.3}");
    assert!(scale > 0.5, "{what}: output vanished");
    assert!(diff <= 1e-4 * scale, "{what}: {diff} > 1e-4 x {scale}");
}

#[test]
fn network_matches_pytorch() {
    let f = fixture();
    let x = normalbae::network_input(&rgb("net_in.png")).unwrap();
    let [res8, _, _, res1] = net().forward(&x).unwrap();
    assert_network("out_res8 (128x64)", &res8, &f["out_res8"]);
    assert_network("out_res1 (128x64)", &res1, &f["out_res1"]);
}

/// Sides that are not multiples of 32: TF "same" padding on odd sizes (48 -> ... 3 -> 2).
#[test]
fn network_matches_pytorch_on_odd_deep_sizes() {
    let f = fixture();
    let x = normalbae::network_input(&rgb("small_in.png")).unwrap();
    let [_, _, _, res1] = net().forward(&x).unwrap();
    assert_network("out_res1 (64x48)", &res1, &f["small_out_res1"]);
}

/// The map against the reference's PNG: same size, every value within one level (the float
/// output truncated to 8 bits flips where it lies within float error of an integer).
fn assert_map(what: &str, got: &ImageBuf, want_png: &str) {
    let want = rgb(want_png);
    assert_eq!(
        (got.width, got.height, got.channels),
        (want.width, want.height, 3),
        "{what}"
    );
    let mut off = 0;
    for (a, b) in got.data.iter().zip(&want.data) {
        let d = (*a as i32 - *b as i32).abs();
        assert!(d <= 1, "{what}: {a} vs {b}");
        off += usize::from(d > 0);
    }
    eprintln!("{what}: {off} of {} values one level off", want.data.len());
}

/// NormalBaeDetector(photo, detect_resolution=64, image_resolution=64): `resize_image` to
/// 128x64, the network, the colours (what `detect` runs for `normal_bae` at resolution 64).
#[test]
fn map_matches_controlnet_aux() {
    let input = resize_image(&rgb("photo.png"), 64);
    let map = normalbae::normal_map(net(), &input).unwrap();
    assert_map("controlnet_aux", &map, "map.png");
}

/// sd-webui-controlnet's `normal_bae(img, res=64)`: padded to 128x64, cropped back to 100x64
/// (`detect` with `pad`).
#[test]
fn map_matches_the_webui_with_padding() {
    let (padded, size) = resize_image_with_pad(&rgb("photo.png"), 64);
    let map = normalbae::normal_map(net(), &padded).unwrap();
    assert_map("webui", &remove_pad(&map, size), "webui_map.png");
}

/// The network's parameter list names exactly the tensors of NNET's state dict.
#[test]
fn parameters_are_the_state_dict() {
    let text = std::fs::read_to_string(dir().join("keys.json")).unwrap();
    let want: Vec<(String, Vec<usize>)> = serde_json::from_str(&text).unwrap();
    let mut want: Vec<_> = want.into_iter().collect();
    let mut got = normalbae::parameter_shapes();
    want.sort();
    got.sort();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g, w);
    }
}

/// scannet.pt's layout (`{"model": {"module.<key>": tensor}}`, torch.save zip) read without
/// running pickle code, the tensors found under the network's own keys.
#[test]
fn reads_scannet_pt_layout() {
    let t = Tensors::open(&dir().join("scannet_partial.pt"), "NormalBAE (scannet.pt)").unwrap();
    let src = Source::new(&t).unwrap();
    let got = src.get("decoder.conv2.bias", &[2048]).unwrap();
    // a conv bias: r / 64
    let want: Vec<f32> = TorchRng::new(seed("scannet/decoder.conv2.bias"))
        .randn_f32(2048)
        .into_iter()
        .map(|x| x / 64.0)
        .collect();
    assert_eq!(got, want);
    let e = src
        .get("decoder.conv2.weight", &[2048, 2048, 1, 1])
        .unwrap_err();
    assert!(e.contains("decoder.conv2.weight"), "{e}");
}

/// The registered preprocessor asks for scannet.pt by name when it has no weights.
#[test]
fn missing_weights_name_the_file() {
    let reg = sd_preprocessors::registry();
    let p = reg.preprocessor("normal_bae").unwrap();
    let given = vec![(
        "model".to_string(),
        ParamValue::Str("/nonexistent/scannet.pt".into()),
    )];
    let params = resolve_params(&p.params(), &given).unwrap();
    let e = p
        .process(&rgb("net_in.png"), &params)
        .unwrap_err()
        .to_string();
    assert!(e.contains("scannet.pt"), "{e}");
}
