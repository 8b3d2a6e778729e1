//! OpenPose against controlnet_aux 0.0.10 (fixtures/make_openpose_fixtures.py): the body
//! network on random weights (redrawn here with the torch CPU generator port), and the whole
//! keypoint pipeline (x8 upsampling, smoothing, peaks, PAF matching, assembly, drawing) on
//! canned network outputs, through the preprocessor's own path from image to drawn map.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use sd_plugins_api::ImageBuf;
use sd_preprocessors::openpose::{assemble, maps, net, people, pose_map, BodyNet, PoseNetwork};
use sd_tests::fixtures;

fn fixture() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join("openpose/openpose.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

/// The fixture script's weights: randn from `seed(name)` times a power of two.
fn random_weights() -> HashMap<String, Tensor> {
    sd_tests::openpose_weights(net::parameter_shapes(), 0)
}

#[test]
fn body_network_matches_pytorch() {
    let w = random_weights();
    let net = BodyNet::new(
        &|n| w.get(n).cloned().ok_or_else(|| format!("missing {n}")),
        &Device::Cpu,
    )
    .unwrap();
    let f = fixture();
    let (paf, heat) = net.forward(&f["input"]).unwrap();
    // Tolerance 1e-4 absolute on outputs of magnitude ~0.1: f32 summation order over ~60
    // conv layers (measured well below it).
    for (name, got) in [("paf", paf), ("heat", heat)] {
        let want = &f[name];
        assert_eq!(got.dims(), want.dims(), "{name}");
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let scale = want
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        eprintln!("{name}: max |diff| {diff:e} (max |value| {scale})");
        assert!(
            scale > 1e-2,
            "{name}: outputs vanished ({scale}), the test would prove nothing"
        );
        assert!(diff < 1e-4, "{name}: {diff}");
    }
}

/// controlnet_aux's `Body.model` replaced by canned stride-8 outputs (two people), as
/// `make_openpose_fixtures.py` replaces it; the input's shape is checked as the fixture's
/// stand-in checks it.
struct Canned {
    paf: Tensor,
    heat: Tensor,
}

impl PoseNetwork for Canned {
    fn part_maps(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let (_, _, h, w) = x.dims4()?;
        let (_, _, gh, gw) = self.heat.dims4()?;
        assert_eq!((h / 8, w / 8), (gh, gw), "network input {:?}", x.dims());
        Ok((self.paf.clone(), self.heat.clone()))
    }
}

#[test]
fn keypoint_pipeline_matches_controlnet_aux_on_canned_maps() {
    let f = fixture();
    let size = f["image_size"].to_vec1::<i64>().unwrap();
    let (w, h) = (size[0] as usize, size[1] as usize);
    let canned = Canned {
        paf: f["canned_paf"].unsqueeze(0).unwrap(),
        heat: f["canned_heat"].unsqueeze(0).unwrap(),
    };
    // Any photo: the canned outputs ignore it (the fixture ran on a black one).
    let img = image::open(fixtures().join("preprocessors/chelsea.png"))
        .unwrap()
        .resize_exact(w as u32, h as u32, image::imageops::FilterType::Triangle)
        .to_rgb8();
    let input = ImageBuf::new(w, h, 3, img.into_raw()).unwrap();
    let m = maps(&canned, &input, &candle_core::Device::Cpu).unwrap();
    let (cands, rows) = people(&m);

    let want_c = f["candidate"].to_vec2::<f64>().unwrap();
    assert_eq!(cands.len(), want_c.len(), "number of peaks");
    for (c, want) in sd_tests::paired("cands", &cands, &want_c) {
        assert_eq!(
            (c.x, c.y, c.id),
            (want[0] as i64, want[1] as i64, want[3] as usize)
        );
        // Scores are the upsampled heatmap values: float resize differences only.
        assert!((c.score - want[2]).abs() < 1e-5, "{c:?} vs {want:?}");
    }
    let want_s = f["subset"].to_vec2::<f64>().unwrap();
    assert_eq!(rows.len(), want_s.len(), "number of people");
    assert_eq!(rows.len(), 2, "the fixture has two people");
    for (r, want) in sd_tests::paired("rows", &rows, &want_s) {
        assert_eq!(&r[..18], &want[..18], "part assignment");
        assert!(
            (r[18] - want[18]).abs() < 1e-4,
            "total score {} vs {}",
            r[18],
            want[18]
        );
        assert_eq!(r[19], want[19], "part count");
    }

    // The preprocessor's whole path (image in, drawn map out) with the canned network, drawn
    // as controlnet_aux draws it: every pixel.
    let canvas = pose_map(&canned, &input).unwrap();
    assert_eq!((canvas.width, canvas.height, canvas.channels), (w, h, 3));
    let png = image::open(fixtures().join("openpose/pipeline_pose.png"))
        .unwrap()
        .to_rgb8();
    let (got, want): (Vec<&[u8]>, Vec<&[u8]>) = (
        canvas.data.chunks(3).collect(),
        png.as_raw().chunks(3).collect(),
    );
    let lit = got.iter().filter(|p| p.iter().any(|&v| v > 0)).count();
    assert!(lit > 200, "the two skeletons are drawn ({lit} pixels)");
    let differ = sd_tests::paired("pose drawing", &got, &want)
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(
        differ, 0,
        "{differ} pixels differ from controlnet_aux's drawing"
    );
}

#[test]
fn assembly_needs_four_parts() {
    // One limb alone (two parts) is not a person.
    let (w, h) = (64usize, 64usize);
    let mut heat = vec![0f64; w * h * 19];
    for (part, (x, y)) in [(1usize, (20usize, 20usize)), (2, (30, 20))] {
        heat[(y * w + x) * 19 + part] = 1.0;
    }
    let mut peaks = assemble::find_peaks(&heat, w, h);
    // A delta smoothed by sigma 3 peaks at 1/(2 pi 9) < 0.1: no peaks at all.
    assert!(peaks.iter().all(|p| p.is_empty()));
    peaks[1].push(assemble::Candidate {
        x: 20,
        y: 20,
        score: 1.0,
        id: 0,
    });
    peaks[2].push(assemble::Candidate {
        x: 30,
        y: 20,
        score: 1.0,
        id: 1,
    });
    let mut paf = vec![0f64; w * h * 38];
    for x in 20..=30 {
        paf[(20 * w + x) * 38 + 12] = 1.0; // limb [2, 3] uses PAF channels 12, 13
    }
    let (_, rows) = assemble::assemble(&peaks, &paf, w, h);
    assert!(rows.is_empty());
}

#[test]
fn weights_come_from_pth_without_running_pickle_code() {
    // partial_body.pth (torch.save zip) holds conv1_1/conv1_2: read by the pickle-free
    // loader they equal the regenerated weights; the missing layers are named.
    let path = fixtures().join("openpose/partial_body.pth");
    let store = sd_weights::Store::open(&path).unwrap();
    let w = random_weights();
    for n in [
        "conv1_1.weight",
        "conv1_1.bias",
        "conv1_2.weight",
        "conv1_2.bias",
    ] {
        let got = store.get(n).unwrap();
        assert_eq!(sd_tests::max_abs_diff(&got, &w[n]), 0.0, "{n}");
    }
    let e = BodyNet::load(&path, &Device::Cpu).err().unwrap();
    assert!(
        e.contains("conv2_1.weight") && e.contains("partial_body.pth"),
        "{e}"
    );
}

#[test]
fn the_preprocessor_loads_safetensors_and_names_missing_weights() {
    use sd_plugins_api::{resolve_params, ImageBuf, ParamValue};
    let dir = std::env::temp_dir().join(format!("openpose-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let reg = sd_preprocessors::registry();
    let p = reg.preprocessor("openpose").unwrap();
    let img = image::open(fixtures().join("preprocessors/chelsea.png"))
        .unwrap()
        .resize_exact(96, 64, image::imageops::FilterType::Triangle)
        .to_rgb8();
    let input = ImageBuf::new(96, 64, 3, img.into_raw()).unwrap();

    // Missing: the error says which file and where.
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

    // f16 safetensors (cast on load): runs end to end at the input's size.
    let w: HashMap<String, Tensor> = random_weights()
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(candle_core::DType::F16).unwrap()))
        .collect();
    let file = dir.join("body_pose_model.safetensors");
    candle_core::safetensors::save(&w, &file).unwrap();
    let params = resolve_params(
        &p.params(),
        &[("model".into(), ParamValue::Str(file.display().to_string()))],
    )
    .unwrap();
    let out = p.process(&input, &params).unwrap();
    assert_eq!((out.width, out.height, out.channels), (96, 64, 3));
    // Random weights give heatmaps below the 0.1 peak threshold: nobody, a black canvas.
    assert!(out.data.iter().all(|&v| v == 0));
    std::fs::remove_dir_all(&dir).unwrap();
}
