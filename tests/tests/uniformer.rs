//! `seg_ufade20k` against sd-webui-controlnet's `annotator/uniformer` (UniFormer-S + mmseg
//! UPerHead, fixtures/make_uniformer_fixtures.py): the network on random weights of the real
//! architecture code (a narrow configuration, read from an mmcv checkpoint with `meta`), the
//! pre- and post-processing on canned logits (imrescale to a 512 short side, the B, G, R
//! normalisation, two bilinear resizes, argmax, the ADE20K palette) through webui's padded
//! sizing and controlnet_aux's plain one, and the whole preprocessor with the network.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use sd_plugins_api::{resolve_params, ImageBuf, ParamValue};
use sd_preprocessors::detect::{detect, Sizing};
use sd_preprocessors::resize::{remove_pad, resize_image, resize_image_with_pad};
use sd_preprocessors::segmentation::ADE20K_PALETTE;
use sd_preprocessors::uniformer::{self, net};
use sd_tests::fixtures;

fn dir() -> PathBuf {
    fixtures().join("uniformer")
}

fn load(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join(name), &Device::Cpu).unwrap()
}

fn rgb(name: &str) -> ImageBuf {
    let img = image::open(dir().join(name)).unwrap().to_rgb8();
    let (w, h) = img.dimensions();
    ImageBuf::new(w as usize, h as usize, 3, img.into_raw()).unwrap()
}

fn tiny() -> uniformer::UperNet {
    uniformer::load(&dir().join("upernet_tiny.pth")).unwrap()
}

/// The fixture's formula input: `2 sin(0.29c + 0.017h + 0.023w + 0.001hw)`, in f64, cast.
fn formula_input(h: usize, w: usize) -> Tensor {
    let mut v = Vec::with_capacity(3 * h * w);
    for c in 0..3 {
        for y in 0..h {
            for x in 0..w {
                let (c, y, x) = (c as f64, y as f64, x as f64);
                v.push((2.0 * (0.29 * c + 0.017 * y + 0.023 * x + 0.001 * y * x).sin()) as f32);
            }
        }
    }
    Tensor::from_vec(v, (1, 3, h, w), &Device::Cpu).unwrap()
}

/// Max |got - want| over max |want|.
fn relative(name: &str, got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims(), "{name}");
    let g = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let w = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = w.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    assert!(scale > 1e-2, "{name}: reference ~zero");
    let diff = g
        .iter()
        .zip(&w)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs() as f64));
    diff / scale
}

fn argmax_of(t: &Tensor) -> Vec<u16> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<i32>()
        .unwrap()
        .into_iter()
        .map(|v| v as u16)
        .collect()
}

#[test]
fn network_matches_mmseg_on_random_weights() {
    let net = tiny();
    let f = load("network.safetensors");
    for (suffix, (h, w)) in [("", (128, 96)), ("_odd", (100, 70))] {
        let x = formula_input(h, w);
        let feats = net.features(&x).unwrap();
        for (i, feat) in feats.iter().enumerate() {
            let Some(want) = f.get(&format!("feat{i}{suffix}")) else {
                continue;
            };
            // LayerNorm outputs of order 1 after 2-3 blocks: f32 summation order only
            let r = relative(&format!("feat{i}{suffix}"), feat, want);
            assert!(r < 1e-5, "feat{i}{suffix}: relative difference {r}");
            println!("feat{i}{suffix}: {r:.2e} relative");
        }
        let logits = net.head(&feats).unwrap();
        // The bound, 1e-4 of the largest logit; the reference's own float32 is 2.2e-6
        // from its float64 run (README of the fixtures).
        let r = relative(
            &format!("logits{suffix}"),
            &logits,
            &f[&format!("logits{suffix}")],
        );
        assert!(r < 1e-4, "logits{suffix}: relative difference {r}");
        println!("logits{suffix}: {r:.2e} relative");
        if suffix.is_empty() {
            let r64 = relative("logits_f64", &logits, &f["logits_f64"]);
            assert!(r64 < 1e-4, "logits vs float64: {r64}");
            println!("logits vs float64: {r64:.2e} relative");
        }
        // encode_decode's argmax: the f32 and f64 references themselves differ at 2 of 12,288
        // pixels (top-2 gaps down to 1.4e-6), so allow 1 in 1,000.
        let got = uniformer::classes(&logits, (w, h), (w, h)).unwrap();
        let want = argmax_of(&f[&format!("argmax{suffix}")]);
        assert_eq!(got.len(), want.len());
        let off = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert!(
            off * 1000 <= want.len(),
            "argmax{suffix}: {off} pixels differ"
        );
        let distinct: std::collections::HashSet<_> = want.iter().collect();
        assert!(distinct.len() > 10, "only {} classes", distinct.len());
    }
}

/// The fixture's canned logits `sin(0.71c + 0.113y + 0.057x + 0.0031cy) (1 + (c mod 7) / 3)`.
fn canned_logits(c: usize, h: usize, w: usize) -> Tensor {
    let mut v = Vec::with_capacity(c * h * w);
    for k in 0..c {
        for y in 0..h {
            for x in 0..w {
                let (kf, yf, xf) = (k as f64, y as f64, x as f64);
                let s = (0.71 * kf + 0.113 * yf + 0.057 * xf + 0.0031 * kf * yf).sin();
                v.push((s * (1.0 + (k % 7) as f64 / 3.0)) as f32);
            }
        }
    }
    Tensor::from_vec(v, (1, c, h, w), &Device::Cpu).unwrap()
}

#[test]
fn canned_logits_give_webuis_maps() {
    let image = rgb("image.png");
    let inputs = load("canned_inputs.safetensors");
    for (case, res, pad) in [
        ("webui_64", 64, true),
        ("plain_512", 512, false),
        ("webui_768", 768, true),
    ] {
        let (img, crop) = if pad {
            let (img, size) = resize_image_with_pad(&image, res);
            (img, Some(size))
        } else {
            (resize_image(&image, res), None)
        };
        let x = uniformer::network_input(&img).unwrap();
        let shape: Vec<usize> = inputs[&format!("{case}_input_shape")]
            .to_vec1::<i32>()
            .unwrap()
            .into_iter()
            .map(|v| v as usize)
            .collect();
        assert_eq!(x.dims(), shape.as_slice(), "{case}: network input size");
        // the input itself: exact where no rescale happens; cv2's fixed-point bilinear is
        // ported within one 8-bit level (1/57 after normalisation) otherwise
        let want = inputs[&format!("{case}_input_sub8")].squeeze(0).unwrap();
        let got = x.squeeze(0).unwrap();
        let (wc, wh, ww) = want.dims3().unwrap();
        let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let got_all = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (gh, gw) = (shape[2], shape[3]);
        let mut worst = 0f32;
        let mut off = 0;
        for c in 0..wc {
            for y in 0..wh {
                for xx in 0..ww {
                    let g = got_all[(c * gh + y * 8) * gw + xx * 8];
                    let d = (g - want[(c * wh + y) * ww + xx]).abs();
                    worst = worst.max(d);
                    off += usize::from(d > 0.0);
                }
            }
        }
        if case == "plain_512" {
            assert_eq!(off, 0, "{case}: network input differs (worst {worst})");
        } else {
            assert!(worst <= 1.0 / 57.0 + 1e-6, "{case}: input {worst} apart");
            // (the 8x upscale of webui_64 is exact; the 1088 -> 725 downscale of webui_768
            // has 717 of 17,472 sampled values a level off)
            assert!(off * 20 <= want.len(), "{case}: {off} input values differ");
        }
        // canned logits through the two resizes, argmax and palette
        let logits = canned_logits(150, gh / 4, gw / 4);
        let classes = uniformer::classes(&logits, (gw, gh), (img.width, img.height)).unwrap();
        let mut map = uniformer::colour(&classes, img.width, img.height);
        if let Some(size) = crop {
            map = remove_pad(&map, size);
        }
        let want = rgb(&format!("canned_{case}.png"));
        assert_eq!((map.width, map.height), (want.width, want.height), "{case}");
        let differ = map
            .data
            .chunks(3)
            .zip(want.data.chunks(3))
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(differ, 0, "{case}: {differ} pixels differ");
    }
}

#[test]
fn whole_preprocessor_with_the_network_matches_webui() {
    let reg = sd_preprocessors::registry();
    let p = reg.preprocessor("seg_ufade20k").unwrap();
    let params = resolve_params(
        &p.params(),
        &[(
            "model".into(),
            ParamValue::Str(dir().join("upernet_tiny.pth").display().to_string()),
        )],
    )
    .unwrap();
    let image = rgb("image.png");
    for (case, res, pad) in [("webui_64", 64, true), ("plain_128", 128, false)] {
        let sizing = Sizing {
            resolution: res,
            pad,
        };
        let out = detect(&reg, p.as_ref(), &image, &params, sizing)
            .unwrap()
            .map;
        let want = rgb(&format!("net_{case}.png"));
        assert_eq!((out.width, out.height), (want.width, want.height), "{case}");
        let differ = out
            .data
            .chunks(3)
            .zip(want.data.chunks(3))
            .filter(|(a, b)| a != b)
            .count();
        // the network input goes through cv2's bilinear upscale (ported within one level) and
        // the f32 network: class boundaries with near-ties may move by a pixel
        assert!(
            differ * 100 <= want.data.len() / 3,
            "{case}: {differ} of {} pixels differ",
            want.data.len() / 3
        );
        println!("{case}: {differ} of {} pixels differ", want.data.len() / 3);
    }
}

#[test]
fn palette_is_mmsegs_ade20k() {
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("pipeline.json")).unwrap())
            .unwrap();
    let want: Vec<[u8; 3]> = serde_json::from_value(j["palette"].clone()).unwrap();
    assert_eq!(want.as_slice(), ADE20K_PALETTE.as_slice());
}

#[test]
fn rescale_and_pool_follow_mmcv_and_torch() {
    assert_eq!(uniformer::rescale_size(512, 512), (512, 512));
    assert_eq!(uniformer::rescale_size(87, 64), (696, 512));
    // 1088 * 2/3 + 0.5 = 725.8
    assert_eq!(uniformer::rescale_size(1088, 768), (725, 512));
    // the long side bounds it: 3000 -> 2048
    assert_eq!(uniformer::rescale_size(100, 3000), (68, 2048));
    // 6 bins over 4 rows overlap: [0,1) [0,2) [1,2) [2,3) [2,4) [3,4)
    let x = Tensor::from_vec(
        (0..4).map(|v| v as f32).collect(),
        (1, 1, 4, 1),
        &Device::Cpu,
    )
    .unwrap();
    let p = net::adaptive_avg_pool(&x, 6).unwrap();
    let v = p.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(&v[..6], &[0.0; 6]);
    let col: Vec<f32> = v.chunks(6).map(|r| r[0]).collect();
    assert_eq!(col, [0.0, 0.5, 1.0, 2.0, 2.5, 3.0]);
}

#[test]
fn bad_weights_are_named() {
    let missing = dir().join("no_such_upernet.pth");
    let err = uniformer::load(&missing).err().unwrap();
    assert!(err.contains("no_such_upernet.pth"), "{err}");
    // another network's file
    let other = fixtures().join("dwpose").join("network.safetensors");
    let err = uniformer::load(&other).err().unwrap();
    assert!(err.contains("not the UniFormer"), "{err}");
    // a tensor missing from an otherwise right file
    let mut t: HashMap<String, Tensor> = sd_preprocessors::weights::read_state_dict(
        &dir().join("upernet_tiny.pth"),
        "backbone.patch_embed1.proj.weight",
        "test",
        |_| true,
    )
    .unwrap();
    t.remove("decode_head.fpn_bottleneck.bn.running_var");
    let err = net::UperNet::from_tensors(t).err().unwrap().to_string();
    assert!(
        err.contains("decode_head.fpn_bottleneck.bn.running_var"),
        "{err}"
    );
}
