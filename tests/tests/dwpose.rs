//! DWPose (`dw_openpose_full`) against sd-webui-controlnet's ONNX pipeline
//! (fixtures/make_dwpose_fixtures.py): the ONNX interpreter on tiny random-weight YOLOX and
//! RTMPose exports of the real architectures (exported and simplified as the real files were),
//! and the whole pipeline (letterbox, box decoding and NMS, crops by warpAffine,
//! normalisation, SimCC decoding, keypoint order, drawing, JSON) on canned network outputs.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::{Device, Tensor};
use sd_plugins_api::ImageBuf;
use sd_preprocessors::dwpose::{self, DwNetworks};
use sd_preprocessors::onnx::Model;
use sd_tests::fixtures;

fn dir() -> std::path::PathBuf {
    fixtures().join("dwpose")
}

fn load(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join(name), &Device::Cpu).unwrap()
}

fn vec_f32(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn vec_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(candle_core::DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The fixture's formula inputs (computed in float64, cast to float32).
fn formula(c: usize, h: usize, w: usize, f: impl Fn(f64, f64, f64) -> f64) -> Tensor {
    let mut v = Vec::with_capacity(c * h * w);
    for ci in 0..c {
        for hi in 0..h {
            for wi in 0..w {
                v.push(f(ci as f64, hi as f64, wi as f64) as f32);
            }
        }
    }
    Tensor::from_vec(v, (1, c, h, w), &Device::Cpu).unwrap()
}

/// The detector's formula input `[1, 3, 640, 640]`.
fn det_formula() -> Tensor {
    formula(3, 640, 640, |c, h, w| {
        127.5 + 127.5 * (0.37 * c + 0.013 * h + 0.021 * w + 0.5 * c * h / 640.0).sin()
    })
}

/// The pose network's formula input `[1, 3, 384, 288]`.
fn pose_formula() -> Tensor {
    formula(3, 384, 288, |c, h, w| {
        (0.29 * c + 0.017 * h + 0.023 * w).sin() * 2.0
    })
}

/// Rows 0, 16, 32, ... of the detector's `[1, 8400, 85]` output, as the fixtures keep them.
fn every_16th_row(out: &Tensor) -> Vec<f32> {
    vec_f32(out)
        .chunks(85)
        .step_by(16)
        .flat_map(|r| r.iter().copied())
        .collect()
}

/// Largest |a - b| relative to the largest |b|.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn the_yolox_export_runs_as_onnxruntime_runs_it() {
    let m = Model::load(&dir().join("yolox_tiny.onnx")).unwrap();
    let x = det_formula();
    let out = m.run(&[("images", x)]).unwrap();
    assert_eq!(out[0].dims(), &[1, 8400, 85]);
    let rows = every_16th_row(&out[0]);
    let f = load("network.safetensors");
    let ort = vec_f32(&f["det_rows"]);
    let f64_ref = vec_f32(&f["det_rows_f64"].to_dtype(candle_core::DType::F32).unwrap());
    // Every float32 run of this network is ~1e-4 of its largest output from the float64 one
    // (ONNX Runtime 1.2e-4, PyTorch 2.0e-4: ~60 layers of random weights on 0-255 input), so
    // the float64 run is the reference: within 1.5x of PyTorch's float32 distance from it (a
    // wrong operator is off by O(1)).
    let d = rel_diff(&rows, &f64_ref);
    println!(
        "YOLOX: {d} from float64, {} from onnxruntime",
        rel_diff(&rows, &ort)
    );
    assert!(d < 3.0e-4, "YOLOX output off by {d} (relative to float64)");
}

#[test]
fn the_rtmpose_export_runs_as_onnxruntime_runs_it() {
    let m = Model::load(&dir().join("rtmpose_tiny.onnx")).unwrap();
    let x = pose_formula();
    let out = m.run(&[("input", x)]).unwrap();
    let f = load("network.safetensors");
    for (i, k) in ["simcc_x", "simcc_y"].iter().enumerate() {
        assert_eq!(out[i].dims(), f[*k].dims(), "{k}");
        let d = rel_diff(&vec_f32(&out[i]), &vec_f32(&f[*k]));
        assert!(d < 1e-4, "{k} off by {d} (relative)");
    }
}

/// The fixture's stand-in networks: canned outputs, and what they were given.
struct Canned {
    det: Tensor,
    simcc: Vec<(Tensor, Tensor)>,
    seen_det: RefCell<Vec<Tensor>>,
    seen_pose: RefCell<Vec<Tensor>>,
}

impl DwNetworks for Canned {
    fn detect(&self, input: &Tensor) -> Result<Tensor, String> {
        self.seen_det.borrow_mut().push(input.clone());
        Ok(self.det.clone())
    }
    fn pose(&self, input: &Tensor) -> Result<(Tensor, Tensor), String> {
        let i = self.seen_pose.borrow().len();
        self.seen_pose.borrow_mut().push(input.clone());
        self.simcc
            .get(i)
            .cloned()
            .ok_or_else(|| format!("pose network called {} times", i + 1))
    }
}

fn png(name: &str) -> ImageBuf {
    let img = image::open(dir().join(name)).unwrap().to_rgb8();
    ImageBuf {
        width: img.width() as usize,
        height: img.height() as usize,
        channels: 3,
        data: img.into_raw(),
    }
}

fn canned(f: &HashMap<String, Tensor>, with_people: bool) -> Canned {
    let mut det = vec![0f32; 8400 * 85];
    if with_people {
        let idx: Vec<i64> = f["det_rows_index"].to_vec1().unwrap();
        let vals = vec_f32(&f["det_rows_values"]);
        for (r, v) in idx.iter().zip(vals.chunks(85)) {
            det[*r as usize * 85..(*r as usize + 1) * 85].copy_from_slice(v);
        }
    }
    let peaks = |ik: &str, vk: &str, bins: usize| -> Vec<Tensor> {
        let ix: Vec<Vec<i64>> = f[ik].to_vec2().unwrap();
        let vx: Vec<Vec<f32>> = f[vk].to_vec2().unwrap();
        ix.iter()
            .zip(&vx)
            .map(|(ix, vx)| {
                let mut t = vec![0f32; 133 * bins];
                for k in 0..133 {
                    if vx[k] != 0.0 {
                        t[k * bins + ix[k] as usize] = vx[k];
                    }
                }
                Tensor::from_vec(t, (1, 133, bins), &Device::Cpu).unwrap()
            })
            .collect()
    };
    let (xs, ys) = (
        peaks("simcc_ix", "simcc_vx", 576),
        peaks("simcc_iy", "simcc_vy", 768),
    );
    Canned {
        det: Tensor::from_vec(det, (1, 8400, 85), &Device::Cpu).unwrap(),
        simcc: xs.into_iter().zip(ys).collect(),
        seen_det: RefCell::new(vec![]),
        seen_pose: RefCell::new(vec![]),
    }
}

/// The fixture's two sums of a network input: plain, and weighted by (i % 251 + 1).
fn stats(t: &Tensor) -> [f64; 2] {
    let v = vec_f32(t);
    let mut s = [0f64; 2];
    for (i, x) in v.iter().enumerate() {
        s[0] += *x as f64;
        s[1] += *x as f64 * ((i % 251) + 1) as f64;
    }
    s
}

#[test]
fn every_step_of_the_pipeline_matches_sd_webui_controlnet() {
    let f = load("pipeline.safetensors");
    let image = png("image.png");
    let nets = canned(&f, true);

    // letterbox: 2x bilinear to 640x512, padded with 114
    let (input, ratio) = dwpose::det_input(&image).unwrap();
    assert_eq!(ratio, 2.0);
    let want: Vec<f32> = vec_f32(&f["det_input_row301"]);
    let row: Vec<f32> = (0..3)
        .flat_map(|c| vec_f32(&input.get(0).unwrap().get(c).unwrap().get(301).unwrap()))
        .collect();
    assert_eq!(row, want, "letterboxed row 301");
    let (s, w) = (stats(&input), vec_f64(&f["det_input_stats"]));
    for k in 0..2 {
        assert!(
            (s[k] - w[k]).abs() <= 1e-12 * w[k].abs(),
            "letterbox: {s:?} vs {w:?}"
        );
    }

    // boxes: decoding, NMS (C removed), class and score filters (D, E dropped)
    let boxes = dwpose::det_boxes(&nets.det, ratio).unwrap();
    let want = vec_f64(&f["boxes"]);
    assert_eq!(boxes.len(), 2);
    for (b, w) in boxes.iter().flatten().zip(&want) {
        // numpy's float32 exp may differ from Rust's in the last bit
        assert!((b - w).abs() < 1e-4, "box {boxes:?} vs {want:?}");
    }
    let (centers, scales) = (vec_f64(&f["centers"]), vec_f64(&f["scales"]));
    let info = vec_f64(&f["keypoints_info"]);
    let want_rows: Vec<Vec<f32>> = f["pose_input_row192"]
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_from(1)
        .unwrap()
        .to_vec2()
        .unwrap();
    let want_stats = vec_f64(&f["pose_input_stats"]);
    for i in 0..boxes.len() {
        // the reference's own boxes, so the crops compare exactly
        let rb = [
            want[i * 4],
            want[i * 4 + 1],
            want[i * 4 + 2],
            want[i * 4 + 3],
        ];
        let c = dwpose::crop(&image, rb).unwrap();
        assert_eq!(c.center, [centers[i * 2], centers[i * 2 + 1]], "center {i}");
        assert_eq!(c.scale, [scales[i * 2], scales[i * 2 + 1]], "scale {i}");
        let ref_crop = png(&format!("crop_{i}.png"));
        assert_eq!((ref_crop.width, ref_crop.height), (288, 384));
        // OpenCV 5's float warp, reproduced but for source positions a float32 step apart at
        // the image's last column (6 of the two crops' 221,184 pixels): one level at most
        let diffs: Vec<u8> = c
            .pixels
            .iter()
            .zip(&ref_crop.data)
            .map(|(a, b)| a.abs_diff(*b))
            .collect();
        let off = diffs.iter().filter(|&&d| d > 0).count();
        let worst = diffs.iter().copied().max().unwrap_or(0);
        assert!(
            worst <= 1 && off <= 20,
            "crop {i}: {off} values off, by up to {worst}"
        );
        // the normalisation of the reference's own crop: the network input, exactly
        let c = dwpose::Crop {
            pixels: ref_crop.data.clone(),
            ..c
        };
        let x = dwpose::pose_input(&c).unwrap();
        let row: Vec<f32> = vec_f32(&x.get(0).unwrap().narrow(1, 192, 1).unwrap());
        assert_eq!(row, want_rows[i], "pose input row 192 of box {i}");
        // float64 sums of the same values (numpy sums pairwise): equal to 1e-12
        let (s, w) = (stats(&x), [want_stats[i * 2], want_stats[i * 2 + 1]]);
        for k in 0..2 {
            assert!(
                (s[k] - w[k]).abs() <= 1e-12 * w[k].abs(),
                "pose input {i}: {s:?} vs {w:?}"
            );
        }
        // decoding, rescaling, neck and reordering
        let (sx, sy) = &nets.simcc[i];
        let kp = dwpose::openpose_order(&dwpose::keypoints(sx, sy, &c).unwrap());
        assert_eq!(kp.len(), 134);
        for (k, p) in kp.iter().enumerate() {
            let w = &info[(i * 134 + k) * 3..(i * 134 + k + 1) * 3];
            let close = (p.0 - w[0]).abs() < 1e-9 && (p.1 - w[1]).abs() < 1e-9;
            assert!(close && p.2 == w[2], "person {i} point {k}: {p:?} vs {w:?}");
        }
    }
}

#[test]
fn the_whole_preprocessor_draws_and_writes_what_the_webui_does() {
    let f = load("pipeline.safetensors");
    let image = png("image.png");
    let nets = canned(&f, true);
    let mut pose = dwpose::detect_pose(&nets, &image).unwrap();
    assert_eq!(nets.seen_det.borrow().len(), 1);
    assert_eq!(nets.seen_pose.borrow().len(), 2);
    let map = dwpose::draw(&pose, image.width, image.height);
    let want = png("pipeline_map.png");
    assert_eq!((map.width, map.height), (want.width, want.height));
    let off = map
        .data
        .iter()
        .zip(&want.data)
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(off, 0, "{off} map values differ from draw_poses'");
    assert!(
        want.data.iter().filter(|&&v| v > 0).count() > 2000,
        "a map with little drawn"
    );

    // the JSON: the webui writes DWPose's pixels, sdctl normalised points (as for every pose)
    pose.canvas_width = Some(image.width);
    pose.canvas_height = Some(image.height);
    let ours = pose.to_json();
    let text = std::fs::read_to_string(dir().join("pipeline_pose.json")).unwrap();
    let theirs: serde_json::Value = serde_json::from_str(&text).unwrap();
    let (people, ref_people) = (
        ours["people"].as_array().unwrap(),
        theirs["people"].as_array().unwrap(),
    );
    assert_eq!(people.len(), 2);
    assert_eq!(ref_people.len(), 2);
    for (p, r) in people.iter().zip(ref_people) {
        for key in [
            "pose_keypoints_2d",
            "face_keypoints_2d",
            "hand_left_keypoints_2d",
            "hand_right_keypoints_2d",
        ] {
            let rv: Vec<f64> = match r[key].as_array() {
                Some(a) => a.iter().map(|v| v.as_f64().unwrap()).collect(),
                None => vec![], // a part format_result left out
            };
            let ov: Vec<f64> = p[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_eq!(ov.len(), rv.len(), "{key}");
            for (i, (o, w)) in ov.chunks(3).zip(rv.chunks(3)).enumerate() {
                let px = [o[0] * image.width as f64, o[1] * image.height as f64];
                // the boxes carry numpy's float32 exp (see above): 1e-4 px
                let same = (px[0] - w[0]).abs() < 1e-4 && (px[1] - w[1]).abs() < 1e-4;
                assert!(same && o[2] == w[2], "{key} point {i}: {o:?} vs {w:?}");
            }
        }
    }
}

#[test]
fn no_detection_gives_no_people_and_a_black_map() {
    let f = load("pipeline.safetensors");
    let image = png("image.png");
    let nets = canned(&f, false);
    let pose = dwpose::detect_pose(&nets, &image).unwrap();
    assert!(pose.people.is_empty());
    assert!(nets.seen_pose.borrow().is_empty(), "the pose network ran");
    let map = dwpose::draw(&pose, image.width, image.height);
    assert!(map.data.iter().all(|&v| v == 0));
}

// ------------------------------------------------------------------------------------------
// TorchScript files (fixtures/make_dwpose_torchscript_fixtures.py): the same tiny networks
// traced with torch.jit.trace, converted to ONNX graphs and run by the interpreter.

fn ts(name: &str) -> std::path::PathBuf {
    dir().join("torchscript").join(name)
}

fn ts_outputs() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(ts("outputs.safetensors"), &Device::Cpu).unwrap()
}

#[test]
fn a_traced_yolox_converts_and_runs_as_torchscript_runs_it() {
    let m = dwpose::load_network(&ts("yolox_tiny.torchscript.pt"), dwpose::Role::Detector).unwrap();
    let x = det_formula();
    assert_eq!(m.batch, 1);
    let out = m.model.run(&[("images", x)]).unwrap();
    assert_eq!(out[0].dims(), &[1, 8400, 85]);
    let rows = every_16th_row(&out[0]);
    let f = ts_outputs();
    // as for the ONNX file: float32 runs are ~2e-4 from the float64 one (the TorchScript run
    // 2.3e-4), so the float64 run is the reference, within 1.5x of PyTorch's own distance
    let d = rel_diff(&rows, &vec_f32(&f["det_rows_f64"]));
    let t = rel_diff(&rows, &vec_f32(&f["det_rows"]));
    println!("traced YOLOX: {d} from float64, {t} from TorchScript's float32 run");
    assert!(d < 3.5e-4, "YOLOX output off by {d} (relative to float64)");
}

#[test]
fn a_traced_rtmpose_of_batch_five_converts_and_runs_one_crop_as_torchscript_does() {
    let m = dwpose::load_network(&ts("rtmpose_tiny.torchscript.pt"), dwpose::Role::Pose).unwrap();
    let x = pose_formula();
    assert_eq!(m.batch, 1, "converted for one crop");
    let out = m.model.run(&[("input", x)]).unwrap();
    let f = ts_outputs();
    for (i, k) in ["simcc_x", "simcc_y"].iter().enumerate() {
        assert_eq!(out[i].dims(), f[*k].dims(), "{k}");
        // the ONNX export's tolerance against ONNX Runtime (BatchNorm folded here as there)
        let d = rel_diff(&vec_f32(&out[i]), &vec_f32(&f[*k]));
        println!("traced RTMPose {k}: {d} from TorchScript");
        assert!(d < 1e-4, "{k} off by {d} (relative)");
    }
}

#[test]
fn a_torchscript_file_of_the_other_network_is_refused_by_name() {
    let e = dwpose::load_network(&ts("yolox_tiny.torchscript.pt"), dwpose::Role::Pose)
        .err()
        .unwrap();
    assert!(
        e.contains("yolox_tiny.torchscript.pt") && e.contains("Detector"),
        "{e}"
    );
    // an operator the converter does not write: refused by name, with the code that calls it
    let e = dwpose::convert_torchscript(&ts("gelu.torchscript.pt"))
        .err()
        .unwrap();
    assert!(
        e.contains("gelu.torchscript.pt")
            && e.contains("`gelu` is not supported")
            && e.contains("activation.py, line"),
        "{e}"
    );
    // a state dict is not TorchScript
    let e = dwpose::convert_torchscript(&fixtures().join("models/esrgan/tiny_x1_ema.pth"))
        .err()
        .unwrap();
    assert!(e.contains("not a TorchScript archive"), "{e}");
}

#[test]
fn a_pose_file_traced_for_a_fixed_batch_of_five_runs_one_crop_padded_with_zeros() {
    use std::sync::Arc;
    let path = ts("rtmpose_tiny_static5.torchscript.pt");
    let pose = dwpose::load_network(&path, dwpose::Role::Pose).unwrap();
    assert_eq!(pose.batch, 5, "its code reshapes to a batch of 5");
    let det =
        dwpose::load_network(&ts("yolox_tiny.torchscript.pt"), dwpose::Role::Detector).unwrap();
    let nets = dwpose::OnnxNetworks {
        det: Arc::new(det),
        pose: Arc::new(pose),
    };
    let x = pose_formula();
    let (sx, sy) = nets.pose(&x).unwrap();
    let first_x = vec_f32(&sx);
    let f = ts_outputs();
    for (k, out) in [("simcc_x", sx), ("simcc_y", sy)] {
        assert_eq!(out.dims(), f[k].dims(), "{k}: one crop's rows");
        let d = rel_diff(&vec_f32(&out), &vec_f32(&f[k]));
        assert!(d < 1e-4, "{k} off by {d} (relative)");
    }
    // written as ONNX (detect --convert), the file declares its batch and runs the same way
    let (model, _) = dwpose::convert_torchscript(&path).unwrap();
    let onnx = std::env::temp_dir().join(format!("sdctl-static5-{}.onnx", std::process::id()));
    std::fs::write(&onnx, sd_preprocessors::onnx::encode(&model)).unwrap();
    let pose = dwpose::load_network(&onnx, dwpose::Role::Pose).unwrap();
    std::fs::remove_file(&onnx).unwrap();
    assert_eq!(pose.batch, 5);
    let nets = dwpose::OnnxNetworks {
        det: nets.det.clone(),
        pose: Arc::new(pose),
    };
    let (sx2, _) = nets.pose(&x).unwrap();
    assert_eq!(vec_f32(&sx2), first_x, "the same numbers");
}

#[test]
fn the_converters_other_operators_run_as_torchscript_runs_them() {
    // OpsNet: dilated and grouped convolutions, BatchNorm, in-place arithmetic, ceil-mode
    // pooling, upsampling to a size read from a shape, chunk, mean, linear, softmax, view...
    let program =
        sd_preprocessors::onnx::torchscript::Program::open(&ts("ops.torchscript.pt")).unwrap();
    assert_eq!(program.outputs(), 3);
    let model = program
        .to_onnx("x", &[1, 3, 32, 32], &["u", "t", "w"])
        .unwrap();
    let m = Model::from_proto(model).unwrap();
    let f = ts_outputs();
    let out = m.run(&[("x", f["ops_x"].clone())]).unwrap();
    for (i, k) in ["ops_u", "ops_t", "ops_w"].iter().enumerate() {
        assert_eq!(out[i].dims(), f[*k].dims(), "{k}");
        // a few layers of O(1) values: float32 rounding only
        let d = rel_diff(&vec_f32(&out[i]), &vec_f32(&f[*k]));
        println!("OpsNet {k}: {d} from TorchScript");
        assert!(d < 1e-5, "{k} off by {d} (relative)");
    }
}
