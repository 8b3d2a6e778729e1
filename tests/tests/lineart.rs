//! The line-art networks against their references (fixtures/make_lineart_fixtures.py), on
//! random weights of the real architectures: `lineart_realistic` / `lineart_coarse`
//! (controlnet_aux 0.0.10 LineartDetector, weights redrawn here with the torch CPU generator
//! port), `lineart_anime` (controlnet_aux 0.0.10 LineartAnimeDetector; a narrow ngf=2 U-Net
//! saved as a PyTorch .pth with netG.pth's `module.` keys) and `lineart_anime_denoise`
//! (sd-webui-controlnet's manga_line `res_skip`, redrawn). Each network's raw output on the
//! reference's own input, and each preprocessor's whole path (resize at resolution 64, network,
//! post-processing and inversion) from the photo to the map.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use sd_pipeline::rng::TorchRng;
use sd_plugins_api::{resolve_params, ImageBuf, ParamValue};
use sd_preprocessors::detect::{detect, Sizing};
use sd_preprocessors::lineart::{anime, manga, realistic, Tensors};
use sd_tests::fixtures;

fn dir() -> PathBuf {
    fixtures().join("lineart")
}

fn fixture() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join("lineart.safetensors"), &Device::Cpu).unwrap()
}

fn png(name: &str) -> image::DynamicImage {
    image::open(dir().join(name)).unwrap()
}

fn rgb(name: &str) -> ImageBuf {
    let img = png(name).to_rgb8();
    let (w, h) = img.dimensions();
    ImageBuf::new(w as usize, h as usize, 3, img.into_raw()).unwrap()
}

/// `[1, c, h, w]` from an 8-bit PNG, `f` per value.
fn input(name: &str, channels: usize, f: impl Fn(u8) -> f32) -> Tensor {
    let img = png(name);
    let (w, h) = (img.width() as usize, img.height() as usize);
    let data = if channels == 1 {
        img.to_luma8().into_raw()
    } else {
        img.to_rgb8().into_raw()
    };
    let mut x = vec![0f32; data.len()];
    for (i, px) in data.chunks_exact(channels).enumerate() {
        for (c, &v) in px.iter().enumerate() {
            x[c * w * h + i] = f(v);
        }
    }
    Tensor::from_vec(x, (1, channels, h, w), &Device::Cpu).unwrap()
}

/// The fixture script's regenerable weights for `file` (see its docstring).
fn random_weights(file: &str, shapes: &[(String, Vec<usize>)]) -> HashMap<String, Tensor> {
    let dims: HashMap<&str, usize> = shapes.iter().map(|(n, s)| (n.as_str(), s.len())).collect();
    let mut out = HashMap::new();
    for (name, shape) in shapes {
        let key = format!("{file}/{name}");
        let seed = 1000
            + key
                .bytes()
                .enumerate()
                .map(|(i, b)| (i as u64 + 1) * b as u64)
                .sum::<u64>();
        let n: usize = shape.iter().product();
        let r = TorchRng::new(seed).randn_f32(n);
        let sibling = name.rsplit_once('.').map(|(p, _)| format!("{p}.weight"));
        let batch_norm = sibling.and_then(|s| dims.get(s.as_str()).copied()) == Some(1);
        let mut v: Vec<f32> = if shape.len() == 4 {
            let fan_in = (shape[1] * shape[2] * shape[3]) as f64;
            let scale = 2f64.powi((2.0 / fan_in).sqrt().log2().round() as i32) as f32;
            let gain = if file == "erika" && name.contains(".residual.") {
                1.0 / 16.0
            } else {
                1.0
            };
            r.into_iter().map(|x| x * scale * gain).collect()
        } else if name.ends_with("running_var") {
            r.into_iter().map(|x| 0.5 + x * x / 2.0).collect()
        } else if name.ends_with("running_mean") {
            r.into_iter().map(|x| x / 8.0).collect()
        } else if batch_norm && name.ends_with("weight") {
            r.into_iter().map(|x| 1.0 + x / 8.0).collect()
        } else if batch_norm {
            r.into_iter().map(|x| x / 16.0).collect()
        } else {
            r.into_iter().map(|x| x / 64.0).collect()
        };
        if file == "erika" && name == "conv15.model.2.weight" {
            v.iter_mut().for_each(|x| *x /= 128.0);
        }
        if file == "erika" && name == "conv15.model.2.bias" {
            v.iter_mut().for_each(|x| *x = *x * 64.0 + 256.0);
        }
        out.insert(
            name.clone(),
            Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap(),
        );
    }
    out
}

/// The weights written to a safetensors file, as a user's converted file would be; removed
/// when dropped (erika's is 170 MB).
struct WeightsFile(PathBuf);

impl WeightsFile {
    fn new(file: &str, tensors: &HashMap<String, Tensor>) -> Self {
        let name = format!("sd-lineart-{}-{file}.safetensors", std::process::id());
        let path = std::env::temp_dir().join(name);
        candle_core::safetensors::save(tensors, &path).unwrap();
        Self(path)
    }
}

impl Drop for WeightsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The network's output against the reference's: within 1e-4 of the largest value (f32
/// sums in another order through up to ~100 conv layers; measured far below it).
fn assert_network(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{what}");
    let scale = sd_tests::max_abs(want);
    let diff = sd_tests::max_abs_diff(got, want);
    eprintln!("{what}: max |diff| {diff:.3e}, max |value| {scale:.3}");
    assert!(scale > 1e-2, "{what}: output vanished");
    assert!(diff <= 1e-4 * scale, "{what}: {diff} > 1e-4 x {scale}");
}

/// The preprocessor `name` at resolution 64 on the photo (with the webui's padding when
/// `pad`), with `--param model=weights`.
fn run(name: &str, weights: &Path, pad: bool) -> ImageBuf {
    let reg = sd_preprocessors::registry();
    let p = reg.preprocessor(name).unwrap();
    let given = vec![(
        "model".to_string(),
        ParamValue::Str(weights.display().to_string()),
    )];
    let params = resolve_params(&p.params(), &given).unwrap();
    let sizing = Sizing {
        resolution: 64,
        pad,
    };
    detect(&reg, p.as_ref(), &rgb("photo.png"), &params, sizing)
        .unwrap()
        .map
}

/// The map against the reference's PNG: same size, grey, every pixel within one level (the
/// float output truncated to 8 bits flips where it lies within float error of an integer).
fn assert_map(what: &str, got: &ImageBuf, want_png: &str) {
    let want = png(want_png).to_luma8();
    assert_eq!(
        (got.width, got.height),
        (want.width() as usize, want.height() as usize),
        "{what}: size"
    );
    assert_eq!(got.channels, 3);
    let mut off = 0;
    for (px, w) in sd_tests::paired(what, &got.data.chunks(3).collect::<Vec<_>>(), want.as_raw()) {
        assert!(px[0] == px[1] && px[1] == px[2], "{what}: not grey");
        let d = (px[0] as i32 - *w as i32).abs();
        assert!(d <= 1, "{what}: {} vs {w}", px[0]);
        off += (d > 0) as usize;
    }
    let distinct: std::collections::HashSet<_> = want.as_raw().iter().collect();
    assert!(distinct.len() > 50, "{what}: the reference map is flat");
    eprintln!(
        "{what}: {off} of {} pixels one level off",
        want.as_raw().len()
    );
}

#[test]
fn realistic_and_coarse_match_controlnet_aux() {
    let f = fixture();
    let x = input("realistic_in.png", 3, |v| v as f32 / 255.0);
    for (file, tag, pre) in [
        ("sk_model", "realistic", "lineart_realistic"),
        ("sk_model2", "coarse", "lineart_coarse"),
    ] {
        let w = random_weights(file, &realistic::parameter_shapes(realistic::BLOCKS));
        let file = WeightsFile::new(file, &w);
        let net = realistic::Generator::load(&file.0).unwrap();
        assert_network(tag, &net.forward(&x).unwrap(), &f[&format!("{tag}_out")]);
        assert_map(pre, &run(pre, &file.0, false), &format!("{tag}_map.png"));
    }
}

#[test]
fn anime_matches_controlnet_aux() {
    let f = fixture();
    // netG.pth's layout: a PyTorch zip pickle whose keys start with `module.`
    let pth = dir().join("netG_ngf2.pth");
    let net = anime::UnetGenerator::load(&pth).unwrap();
    assert_eq!(net.multiple(), 256, "eight levels, as the real one");
    let x = input("anime_in.png", 3, |v| v as f32 / 127.5 - 1.0);
    assert_network("anime", &net.forward(&x).unwrap(), &f["anime_out"]);
    // Through the preprocessor the 256x256 INTER_CUBIC input differs from the reference's in
    // one value by one level (an exact .5: OpenCV's vectorised cubic rounds it to even,
    // crate::cvresize up), which the U-Net spreads to ~50 map pixels, one level each.
    assert_map(
        "lineart_anime",
        &run("lineart_anime", &pth, false),
        "anime_map.png",
    );
}

#[test]
fn anime_denoise_matches_sd_webui_controlnet() {
    let f = fixture();
    let w = random_weights("erika", &manga::parameter_shapes());
    let file = WeightsFile::new("erika", &w);
    let net = manga::ResSkip::load(&file.0).unwrap();
    let x = input("manga_in.png", 1, |v| v as f32);
    assert_network("manga", &net.forward(&x).unwrap(), &f["manga_out"]);
    // sd-webui-controlnet's sizing: resize_image_with_pad, the map cropped back to 100x64
    assert_map(
        "lineart_anime_denoise",
        &run("lineart_anime_denoise", &file.0, true),
        "manga_map.png",
    );
}

#[test]
fn bad_weights_are_named() {
    let reg = sd_preprocessors::registry();
    let attempt = |pre: &str, model: &str| -> String {
        let p = reg.preprocessor(pre).unwrap();
        let given = vec![("model".to_string(), ParamValue::Str(model.into()))];
        let params = resolve_params(&p.params(), &given).unwrap();
        let img = ImageBuf::filled(64, 64, 3, 128);
        p.process(&img, &params).unwrap_err().to_string()
    };
    let e = attempt("lineart_realistic", "/nonexistent/sk_model.pth");
    assert!(
        e.contains("/nonexistent/sk_model.pth") && e.contains("not found"),
        "{e}"
    );
    let pth = dir().join("netG_ngf2.pth").display().to_string();
    for pre in ["lineart_realistic", "lineart_coarse"] {
        let e = attempt(pre, &pth);
        assert!(
            e.contains("model0.1.weight") && e.contains("sk_model"),
            "{e}"
        );
    }
    let e = attempt("lineart_anime_denoise", &pth);
    assert!(e.contains("block0.model.0.conv1.model.0.weight"), "{e}");
    // a tensor of the wrong shape is named with both shapes
    let mut w = HashMap::new();
    w.insert(
        "model.model.0.weight".to_string(),
        Tensor::zeros((8, 4, 4, 4), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let e = anime::UnetGenerator::new(&Tensors::from_map(w, "lineart_anime (netG)"))
        .err()
        .unwrap();
    assert!(
        e.contains("`model.model.0.weight` has shape [8, 4, 4, 4]"),
        "{e}"
    );
    // without the `model` parameter, the wanted file is named (unless the annotator folder
    // of this machine has it)
    let p = reg.preprocessor("lineart_anime").unwrap();
    let params = resolve_params(&p.params(), &[]).unwrap();
    if let Err(e) = p.process(&ImageBuf::filled(64, 64, 3, 128), &params) {
        assert!(e.to_string().contains("netG.pth"), "{e}");
    }
}
