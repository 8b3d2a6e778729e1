//! OpenPose hands and faces against controlnet_aux 0.0.10
//! (fixtures/make_openpose_hand_face_fixtures.py): the hand and face networks on random
//! weights (redrawn here with the torch CPU generator port), the OpenCV blur and PyTorch
//! interpolation they rely on, and the whole `openpose_hand` / `openpose_face` /
//! `openpose_faceonly` / `openpose_full` path (body maps, hand and face boxes, crops, blur,
//! resizes, multi-scale heatmaps, peaks, keypoints, drawing) with the three networks replaced
//! by canned outputs, as the fixture script replaces them.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use candle_core::{Device, Tensor};
use sd_plugins_api::ImageBuf;
use sd_preprocessors::openpose::cpm::{self, CpmNet};
use sd_preprocessors::openpose::face::{
    face_box, interpolate_bilinear, FaceNetwork, OUTPUTS as FACE_OUTPUTS,
};
use sd_preprocessors::openpose::hand::{
    gaussian_blur_u8, hand_boxes, HandNetwork, OUTPUTS as HAND_OUTPUTS,
};
use sd_preprocessors::openpose::variants::{detect_parts, draw_parts, Networks, Parts};
use sd_preprocessors::openpose::{maps, people, PoseNetwork};
use sd_preprocessors::pose::{Keypoint, Pose};
use sd_tests::fixtures;

fn fixture() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join("openpose/hand_face.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

/// The fixture script's weights: randn from `seed(key) + seed_add` times a power of two.
fn random_weights(outputs: usize, seed_add: u64) -> HashMap<String, Tensor> {
    sd_tests::openpose_weights(cpm::parameter_shapes(outputs), seed_add)
}

fn max_of(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn hand_and_face_networks_match_pytorch() {
    let f = fixture();
    for (outputs, seed_add, what, want) in [
        (HAND_OUTPUTS, 1, "hand", "hand_net_out"),
        (FACE_OUTPUTS, 2, "face", "face_net_out"),
    ] {
        let w = random_weights(outputs, seed_add);
        let net = CpmNet::new(
            &|n| w.get(n).cloned().ok_or_else(|| format!("missing {n}")),
            outputs,
            what,
            &Device::Cpu,
        )
        .unwrap();
        let got = net.forward(&f["net_input"]).unwrap();
        let want = &f[want];
        assert_eq!(got.dims(), want.dims(), "{what}");
        let diff = max_of(&(got - want).unwrap());
        let scale = max_of(want);
        eprintln!("{what} network: max |diff| {diff:e} (max |value| {scale})");
        assert!(scale > 1e-2, "{what}: outputs vanished ({scale})");
        // 1e-4 relative: f32 summation order over 29 conv layers (measured well below it)
        assert!(diff < 1e-4 * scale, "{what}: {diff}");
    }
}

#[test]
fn opencv_blur_and_torch_interpolation_are_exact() {
    let f = fixture();
    let img = &f["blur_in"];
    let (h, w, c) = img.dims3().unwrap();
    let input =
        ImageBuf::new(w, h, c, img.flatten_all().unwrap().to_vec1::<u8>().unwrap()).unwrap();
    for sigma in [0.8, 2.0] {
        let got = gaussian_blur_u8(&input, sigma);
        let want = f[&format!("blur_{sigma:.1}")]
            .flatten_all()
            .unwrap()
            .to_vec1::<u8>()
            .unwrap();
        let differ = sd_tests::paired("blur", &got.data, &want)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            differ, 0,
            "cv2.GaussianBlur sigma {sigma}: {differ} values differ"
        );
    }
    let x = &f["interp_in"];
    let (_, ci, ih, iw) = x.dims4().unwrap();
    let want = &f["interp_out"];
    let (_, _, oh, ow) = want.dims4().unwrap();
    let got = interpolate_bilinear(
        &x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        (ci, ih, iw),
        (oh, ow),
    );
    let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let differ = sd_tests::paired("interpolate", &got, &want)
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(differ, 0, "F.interpolate: {differ} values differ");
}

/// controlnet_aux's `Body.model` replaced by canned stride-8 outputs.
struct CannedBody {
    paf: Tensor,
    heat: Tensor,
}

impl PoseNetwork for CannedBody {
    fn part_maps(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let (_, _, h, w) = x.dims4()?;
        let (_, _, gh, gw) = self.heat.dims4()?;
        assert_eq!((h / 8, w / 8), (gh, gw), "network input {:?}", x.dims());
        Ok((self.paf.clone(), self.heat.clone()))
    }
}

/// The fixture's `canned_grid`: per channel the sum of two blobs `(u, v, amplitude, sigma)`
/// (relative coordinates; amplitude 0: none), rounded to multiples of 1/4096.
fn canned_grid(g: usize, blobs: &[f64], channels: usize) -> Vec<f32> {
    let coord = |i: usize| (i as f64 + 0.5) / g as f64;
    let mut out = vec![0f32; channels * g * g];
    for ch in 0..channels {
        for y in 0..g {
            for x in 0..g {
                let mut acc = 0f64;
                for b in 0..2 {
                    let p = &blobs[(ch * 2 + b) * 4..][..4];
                    let (u, v, a, s) = (p[0], p[1], p[2], p[3]);
                    if a == 0.0 {
                        continue;
                    }
                    let (dx, dy) = (coord(x) - u, coord(y) - v);
                    acc += a * (-(dx * dx + dy * dy) / (2.0 * s * s)).exp();
                }
                out[(ch * g + y) * g + x] = ((acc * 4096.0).round_ties_even() / 4096.0) as f32;
            }
        }
    }
    out
}

/// What a stand-in was given: side, side, sum, and the sum weighted by (index % 251) + 1
/// (exact in float64: the inputs are multiples of 1/256).
fn stats(x: &Tensor) -> [f64; 4] {
    let (_, _, h, w) = x.dims4().unwrap();
    let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (mut s, mut ws) = (0f64, 0f64);
    for (i, &e) in v.iter().enumerate() {
        s += e as f64;
        ws += e as f64 * ((i % 251) + 1) as f64;
    }
    [h as f64, w as f64, s, ws]
}

/// The hand or face network replaced by canned heatmaps: table `calls / per` (modulo the
/// tables), recording its inputs.
struct Canned {
    tables: Vec<f64>,
    n_tables: usize,
    channels: usize,
    per: usize,
    calls: Cell<usize>,
    seen: RefCell<Vec<[f64; 4]>>,
}

impl Canned {
    fn new(t: &Tensor, per: usize) -> Self {
        let (n, c, _, _) = t.dims4().unwrap();
        Self {
            tables: t.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            n_tables: n,
            channels: c,
            per,
            calls: Cell::new(0),
            seen: RefCell::new(Vec::new()),
        }
    }

    fn table(&self, k: usize) -> &[f64] {
        let len = self.channels * 8;
        &self.tables[(k % self.n_tables) * len..][..len]
    }

    fn run(&self, x: &Tensor, g: usize) -> candle_core::Result<Tensor> {
        let k = self.calls.get() / self.per;
        self.calls.set(self.calls.get() + 1);
        self.seen.borrow_mut().push(stats(x));
        let grid = canned_grid(g, self.table(k), self.channels);
        Tensor::from_vec(grid, (1, self.channels, g, g), &Device::Cpu)
    }
}

impl HandNetwork for Canned {
    fn hand_maps(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        assert!(h == w && h % 8 == 0, "hand network input {:?}", x.dims());
        self.run(x, h / 8)
    }
}

impl FaceNetwork for Canned {
    fn face_maps(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        assert_eq!(x.dims(), [1, 3, 384, 384], "face network input");
        self.run(x, 48)
    }
}

/// The fixture's input image: `pattern()` of the script.
fn pattern(w: usize, h: usize) -> ImageBuf {
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                data.push((((x * 7 + y * 3) ^ ((x * y) >> 4) ^ (c * 85)) & 255) as u8);
            }
        }
    }
    ImageBuf::new(w, h, 3, data).unwrap()
}

fn png(name: &str) -> Vec<u8> {
    image::open(fixtures().join(format!("openpose/hand_face_{name}.png")))
        .unwrap()
        .to_rgb8()
        .into_raw()
}

fn rows(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap()
}

#[test]
fn hand_face_pipeline_matches_controlnet_aux_on_canned_maps() {
    let f = fixture();
    let size = f["image_size"].to_vec1::<i64>().unwrap();
    let (w, h) = (size[0] as usize, size[1] as usize);
    let body = CannedBody {
        paf: f["canned_paf"].unsqueeze(0).unwrap(),
        heat: f["canned_heat"].unsqueeze(0).unwrap(),
    };
    let input = pattern(w, h);

    // The canned formula gives the script's floats.
    let hand = Canned::new(&f["hand_table"], 4);
    let want = f["hand_canned_23"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(canned_grid(23, hand.table(0), HAND_OUTPUTS), want);

    // Hand and face boxes from the body keypoints (util.handDetect / faceDetect).
    let m = maps(&body, &input, &Device::Cpu).unwrap();
    let (cands, subset) = people(&m);
    let mut hboxes = Vec::new();
    let mut fboxes = Vec::new();
    for (i, r) in subset.iter().enumerate() {
        let kp: Vec<Keypoint> = r[..18]
            .iter()
            .map(|&c| (c >= 0.0).then(|| (cands[c as usize].x as f64, cands[c as usize].y as f64)))
            .collect();
        for b in hand_boxes(&kp, w, h) {
            hboxes.push(vec![
                b.x as f64,
                b.y as f64,
                b.side as f64,
                b.left as u8 as f64,
                i as f64,
            ]);
        }
        if let Some(b) = face_box(&kp, w, h) {
            fboxes.push(vec![b.x as f64, b.y as f64, b.side as f64, i as f64]);
        }
    }
    assert_eq!(hboxes, rows(&f["hand_boxes"]), "hand boxes");
    assert_eq!(fboxes, rows(&f["face_boxes"]), "face boxes");

    // The whole detection with hands and face; what the stand-ins were given (the crops after
    // blur, resize and normalisation) and the keypoints, exactly.
    let face = Canned::new(&f["face_table"], 1);
    let nets = Networks {
        body: &body,
        hand: Some(&hand),
        face: Some(&face),
    };
    let pose = detect_parts(&nets, &input).unwrap();
    for (name, c) in [("hand_inputs", &hand), ("face_inputs", &face)] {
        let want = rows(&f[name]);
        let got: Vec<Vec<f64>> = c.seen.borrow().iter().map(|s| s.to_vec()).collect();
        assert_eq!(got.len(), want.len(), "{name}: number of network runs");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "{name}[{i}]: side, side, sum, weighted sum");
        }
    }
    let text = std::fs::read_to_string(fixtures().join("openpose/hand_face_poses.json")).unwrap();
    let want = Pose::from_json(&text).unwrap();
    assert_eq!(pose.people.len(), 2);
    for (i, (g, e)) in sd_tests::paired("people", &pose.people, &want.people).enumerate() {
        assert_eq!(g.body, e.body, "person {i}: body");
        assert_eq!(g.left_hand, e.left_hand, "person {i}: left hand");
        assert_eq!(g.right_hand, e.right_hand, "person {i}: right hand");
        assert_eq!(g.face, e.face, "person {i}: face");
    }
    // the fixture exercises: a person without a right hand, hand parts not found (drawn
    // nowhere, at -1 / side), faces with parts left out (70 + background, and fewer)
    assert!(pose.people[1].right_hand.is_empty());
    let lost = pose
        .people
        .iter()
        .flat_map(|p| p.left_hand.iter().chain(&p.right_hand))
        .filter(|k| k.is_some_and(|(x, _)| x < 0.0))
        .count();
    assert!(lost >= 3, "{lost} hand points not found");
    assert_eq!(
        pose.people.iter().map(|p| p.face.len()).collect::<Vec<_>>(),
        f["face_counts"]
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|&n| n as usize)
            .collect::<Vec<_>>()
    );
    // The pose JSON carries the hands and the face.
    let back = Pose::from_json(&pose.to_json().to_string()).unwrap();
    assert_eq!(back.people, pose.people);

    // Each preprocessor's path with only its networks, drawn as draw_poses draws: every pixel.
    for (name, parts) in [
        (
            "full",
            Parts {
                body: true,
                hands: true,
                face: true,
            },
        ),
        (
            "hand",
            Parts {
                body: true,
                hands: true,
                face: false,
            },
        ),
        (
            "face",
            Parts {
                body: true,
                hands: false,
                face: true,
            },
        ),
        (
            "faceonly",
            Parts {
                body: false,
                hands: false,
                face: true,
            },
        ),
    ] {
        let hand = Canned::new(&f["hand_table"], 4);
        let face = Canned::new(&f["face_table"], 1);
        let nets = Networks {
            body: &body,
            hand: parts.hands.then_some(&hand as &dyn HandNetwork),
            face: parts.face.then_some(&face as &dyn FaceNetwork),
        };
        let pose = detect_parts(&nets, &input).unwrap();
        let map = draw_parts(&pose, w, h, parts, true);
        let want = png(name);
        let (got, want): (Vec<&[u8]>, Vec<&[u8]>) =
            (map.data.chunks(3).collect(), want.chunks(3).collect());
        let lit = got.iter().filter(|p| p.iter().any(|&v| v > 0)).count();
        assert!(lit > 100, "{name}: something is drawn ({lit} pixels)");
        let differ = sd_tests::paired(name, &got, &want)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            differ, 0,
            "{name}: {differ} pixels differ from controlnet_aux's drawing"
        );
        assert_eq!(
            hand.calls.get(),
            if parts.hands { 12 } else { 0 },
            "{name}: hand runs"
        );
        assert_eq!(
            face.calls.get(),
            if parts.face { 2 } else { 0 },
            "{name}: face runs"
        );
    }
}

#[test]
fn the_preprocessors_name_missing_and_wrong_weights() {
    use sd_plugins_api::{resolve_params, ParamValue};
    let reg = sd_preprocessors::registry();
    let body = fixtures().join("openpose/partial_body.pth");
    let input = pattern(64, 64);
    for name in [
        "openpose_hand",
        "openpose_face",
        "openpose_faceonly",
        "openpose_full",
    ] {
        let p = reg.preprocessor(name).unwrap();
        let keys: Vec<String> = p.params().iter().map(|s| s.name.clone()).collect();
        let wants_hand = name == "openpose_hand" || name == "openpose_full";
        assert_eq!(
            keys.contains(&"hand_model".to_string()),
            wants_hand,
            "{name}: {keys:?}"
        );
        assert_eq!(
            keys.contains(&"face_model".to_string()),
            name != "openpose_hand",
            "{name}"
        );
        // the body weights are there; the hand or face file is not: named before anything runs
        let key = if wants_hand {
            "hand_model"
        } else {
            "face_model"
        };
        let params = resolve_params(
            &p.params(),
            &[
                ("model".into(), ParamValue::Str(body.display().to_string())),
                (key.into(), ParamValue::Str("/no/such/weights.pth".into())),
            ],
        )
        .unwrap();
        let e = p.process(&input, &params).unwrap_err().to_string();
        assert!(
            e.contains(key) && e.contains("/no/such/weights.pth"),
            "{name}: {e}"
        );
        let e = p.cache_salt(&params).unwrap_err().to_string();
        assert!(e.contains("/no/such/weights.pth"), "{name}: {e}");
    }
    // a file that is not the face network: the missing tensor is named
    let e = CpmNet::load(&body, FACE_OUTPUTS, "OpenPose face model", &Device::Cpu)
        .err()
        .unwrap();
    assert!(
        e.contains("conv2_1.weight") && e.contains("partial_body.pth") && e.contains("face"),
        "{e}"
    );
    // the hand network's weights where the face's are wanted: the shape is named
    let w: HashMap<String, Vec<usize>> = cpm::parameter_shapes(HAND_OUTPUTS).into_iter().collect();
    let e = CpmNet::new(
        &|n| {
            let shape = w.get(n).ok_or_else(|| format!("missing {n}"))?;
            Tensor::zeros(shape.as_slice(), candle_core::DType::F32, &Device::Cpu)
                .map_err(|e| e.to_string())
        },
        FACE_OUTPUTS,
        "OpenPose face model",
        &Device::Cpu,
    )
    .err()
    .unwrap();
    assert!(
        e.contains("conv6_2_CPM") && e.contains("[71, 512, 1, 1]"),
        "{e}"
    );
}
