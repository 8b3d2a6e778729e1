//! `sdctl detect --json OUT`: the pose a pose preprocessor found, as OpenPose keypoint JSON,
//! beside its map; refused for preprocessors that do not detect poses.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use sd_preprocessors::pose::Pose;
use sd_tests::fixtures;

use crate::common::{annotator_scratch, s, sdctl_annotators};

fn read_json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn detect_json_writes_the_pose_of_pose_preprocessors() {
    let (d, ann) = annotator_scratch("detect_json", "pose");
    let run = |args: &[&str]| sdctl_annotators(args, &d, &ann);

    // A keypoint file: drawn with every part (openpose_full), its pose written back with the
    // hands it has, on the map's canvas.
    let file = fixtures().join("preprocessors/pose_1.json");
    let (png, json) = (d.join("full.png"), d.join("full.json"));
    let o = run(&[
        "detect",
        "openpose_full",
        s(&file),
        "-o",
        s(&png),
        "--json",
        s(&json),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = image::open(fixtures().join("preprocessors/pose_1.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(
        image::open(&png).unwrap().to_rgb8().into_raw(),
        want.into_raw()
    );
    let v = read_json(&json);
    assert_eq!(
        (v["canvas_width"].as_u64(), v["canvas_height"].as_u64()),
        (Some(768), Some(512))
    );
    let got = Pose::from_json(&v.to_string()).unwrap();
    let src = Pose::from_file(&file).unwrap();
    assert_eq!(got.people, src.people);
    assert_eq!(got.people[0].left_hand.len(), 21, "the hands are carried");

    // Body-only openpose on a photo (weights of zeros: nobody is found): the JSON is written
    // with the map's canvas, also with the webui's padded sizing (cropped back to 750x500).
    let shapes = sd_preprocessors::openpose::net::parameter_shapes();
    let zeros: HashMap<String, Tensor> = shapes
        .into_iter()
        .map(|(n, sh)| (n, Tensor::zeros(sh, DType::F16, &Device::Cpu).unwrap()))
        .collect();
    candle_core::safetensors::save(&zeros, ann.join("body_pose_model.safetensors")).unwrap();
    drop(zeros);
    let photo = fixtures().join("preprocessors/chelsea.png");
    for (extra, size) in [
        (vec!["--resolution", "64"], (128, 64)),
        (vec!["--resolution", "100", "--pad"], (150, 100)),
    ] {
        let (png, json) = (d.join("body.png"), d.join("body.json"));
        let mut args = vec![
            "detect",
            "openpose",
            s(&photo),
            "-o",
            s(&png),
            "--json",
            s(&json),
        ];
        args.extend(extra);
        let o = run(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(
            image::open(&png).unwrap().to_rgb8().dimensions(),
            (size.0, size.1)
        );
        let v = read_json(&json);
        assert_eq!(v["people"].as_array().map(|p| p.len()), Some(0));
        assert_eq!(
            (v["canvas_width"].as_u64(), v["canvas_height"].as_u64()),
            (Some(size.0 as u64), Some(size.1 as u64))
        );
    }

    // openpose_full without the hand network: the file wanted and where; nothing written.
    let (png, json) = (d.join("none.png"), d.join("none.json"));
    let o = run(&[
        "detect",
        "openpose_full",
        s(&photo),
        "-o",
        s(&png),
        "--json",
        s(&json),
        "--resolution",
        "64",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("hand_pose_model.pth") && e.contains(s(&ann)),
        "{e}"
    );
    assert!(!png.exists() && !json.exists());

    // Not a pose preprocessor: refused before anything runs, the pose ones named.
    let o = run(&[
        "detect",
        "canny",
        s(&photo),
        "-o",
        s(&png),
        "--json",
        s(&json),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("--json") && e.contains("does not detect poses") && e.contains("openpose_full"),
        "{e}"
    );
    assert!(!png.exists() && !json.exists());
    std::fs::remove_dir_all(&d).unwrap();
}

/// An ONNX model whose one output is a constant (its input is declared and ignored): the
/// detector of `dw_openpose_full` with the fixture's canned output.
fn constant_onnx(input: &str, output: &str, value: &Tensor) -> Vec<u8> {
    use prost::Message;
    use sd_preprocessors::onnx::proto::*;
    let t = TensorProto {
        dims: value.dims().iter().map(|&d| d as i64).collect(),
        data_type: data_type::FLOAT,
        float_data: value.flatten_all().unwrap().to_vec1().unwrap(),
        ..Default::default()
    };
    let node = NodeProto {
        output: vec![output.into()],
        op_type: "Constant".into(),
        attribute: vec![AttributeProto {
            name: "value".into(),
            t: Some(t),
            r#type: 4,
            ..Default::default()
        }],
        ..Default::default()
    };
    let info = |n: &str| ValueInfoProto {
        name: n.into(),
        ..Default::default()
    };
    ModelProto {
        ir_version: 7,
        graph: Some(GraphProto {
            node: vec![node],
            name: "canned".into(),
            input: vec![info(input)],
            output: vec![info(output)],
            ..Default::default()
        }),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 11,
        }],
        ..Default::default()
    }
    .encode_to_vec()
}

#[test]
fn dw_openpose_full_runs_the_onnx_files_and_names_bad_ones() {
    let (d, ann) = annotator_scratch("detect_json", "dwpose");
    let run = |args: &[&str]| sdctl_annotators(args, &d, &ann);
    let photo = fixtures().join("preprocessors/chelsea.png");
    let (png, json) = (d.join("dw.png"), d.join("dw.json"));
    let args = [
        "detect",
        "dw_openpose_full",
        s(&photo),
        "-o",
        s(&png),
        "--json",
        s(&json),
        "--resolution",
        "128",
    ];

    // No weights yet: both files named, with the folder they go in; nothing written.
    let o = run(&args);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("yolox_l.onnx") && e.contains(s(&ann)), "{e}");
    assert!(!png.exists() && !json.exists());

    // Under the real names: the fixture's canned detector output (two people) as a constant
    // ONNX graph, and the tiny real-architecture RTMPose export; a map at the detect size and
    // the two people drawn, on its canvas.
    let fx = fixtures().join("dwpose");
    std::fs::write(ann.join("yolox_l.onnx"), canned_detector()).unwrap();
    std::fs::copy(
        fx.join("rtmpose_tiny.onnx"),
        ann.join("dw-ll_ucoco_384.onnx"),
    )
    .unwrap();
    let o = run(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let map = image::open(&png).unwrap().to_rgb8();
    let v = read_json(&json);
    assert_eq!(
        (v["canvas_width"].as_u64(), v["canvas_height"].as_u64()),
        (Some(map.width() as u64), Some(map.height() as u64))
    );
    let pose = Pose::from_json(&v.to_string()).unwrap();
    assert_eq!(pose.people.len(), 2, "the two canned people");
    let drawn = map.pixels().filter(|p| p.0 != [0, 0, 0]).count();
    assert!(drawn > 0, "nothing drawn");
    for p in &pose.people {
        assert_eq!(p.body.len(), 18);
        assert!(
            p.face.is_empty() || p.face.len() == 70,
            "68 face points and the eyes"
        );
    }

    // A file that is not an ONNX model, named by --param: refused with its name.
    let bad = d.join("not-a-model.onnx");
    std::fs::write(&bad, b"\x0a\xff\xff\xff\xff\x0fnot protobuf").unwrap();
    std::fs::remove_file(&png).unwrap();
    std::fs::remove_file(&json).unwrap();
    let param = format!("det_model={}", s(&bad));
    let mut with_bad = args.to_vec();
    with_bad.extend(["--param", &param]);
    let o = run(&with_bad);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("not-a-model.onnx") && e.contains("not an ONNX model"),
        "{e}"
    );
    assert!(!png.exists() && !json.exists());
    std::fs::remove_dir_all(&d).unwrap();
}

/// The canned two-person detector output of the DWPose fixture, as a constant ONNX graph.
fn canned_detector() -> Vec<u8> {
    let canned = candle_core::safetensors::load(
        fixtures().join("dwpose/pipeline.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut det = vec![0f32; 8400 * 85];
    let rows: Vec<i64> = canned["det_rows_index"].to_vec1().unwrap();
    let vals: Vec<f32> = canned["det_rows_values"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for (r, v) in rows.iter().zip(vals.chunks(85)) {
        det[*r as usize * 85..(*r as usize + 1) * 85].copy_from_slice(v);
    }
    let det = Tensor::from_vec(det, (1, 8400, 85), &Device::Cpu).unwrap();
    constant_onnx("images", "output", &det)
}

#[test]
fn dw_openpose_full_reads_torchscript_files_as_detect_convert_writes_them() {
    let (d, ann) = annotator_scratch("detect_json", "dwpose_torchscript");
    let run = |args: &[&str]| sdctl_annotators(args, &d, &ann);
    let ts = fixtures().join("dwpose/torchscript");
    std::fs::write(ann.join("yolox_l.onnx"), canned_detector()).unwrap();
    // only ComfyUI's TorchScript pose file in the folder: found under its name
    std::fs::copy(
        ts.join("rtmpose_tiny.torchscript.pt"),
        ann.join("dw-ll_ucoco_384_bs5.torchscript.pt"),
    )
    .unwrap();
    let photo = fixtures().join("preprocessors/chelsea.png");
    let detect = |png: &std::path::Path, json: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "detect",
            "dw_openpose_full",
            s(&photo),
            "-o",
            s(png),
            "--json",
            s(json),
            "--resolution",
            "128",
        ];
        args.extend(extra);
        let o = run(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let (png_ts, json_ts) = (d.join("ts.png"), d.join("ts.json"));
    detect(&png_ts, &json_ts, &[]);

    // --convert writes the pose network as an ONNX file; run from it, the map and the pose
    // are the same
    let onnx = d.join("converted_pose.onnx");
    let o = run(&[
        "detect",
        "--convert",
        s(&ts.join("rtmpose_tiny.torchscript.pt")),
        "-o",
        s(&onnx),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("pose network"));
    let m = sd_preprocessors::onnx::Model::load(&onnx).unwrap();
    assert_eq!(m.input_names(), ["input"]);
    assert_eq!(m.output_names(), ["simcc_x", "simcc_y"]);
    let (png_onnx, json_onnx) = (d.join("onnx.png"), d.join("onnx.json"));
    let param = format!("pose_model={}", s(&onnx));
    detect(&png_onnx, &json_onnx, &["--param", &param]);
    assert_eq!(read_json(&json_ts), read_json(&json_onnx));
    let pose = Pose::from_json(&read_json(&json_ts).to_string()).unwrap();
    assert_eq!(pose.people.len(), 2, "the two canned people");
    assert_eq!(
        image::open(&png_ts).unwrap().to_rgb8().into_raw(),
        image::open(&png_onnx).unwrap().to_rgb8().into_raw()
    );

    // the detector converts too, under its ONNX names
    let det = d.join("converted_det.onnx");
    let o = run(&[
        "detect",
        "--convert",
        s(&ts.join("yolox_tiny.torchscript.pt")),
        "-o",
        s(&det),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = sd_preprocessors::onnx::Model::load(&det).unwrap();
    assert_eq!(m.input_names(), ["images"]);
    assert_eq!(m.output_names(), ["output"]);

    // the pose network given as the detector: refused, naming the file and what it holds
    let (png, json) = (d.join("bad.png"), d.join("bad.json"));
    let param = format!("det_model={}", s(&ts.join("rtmpose_tiny.torchscript.pt")));
    let mut args = vec![
        "detect",
        "dw_openpose_full",
        s(&photo),
        "-o",
        s(&png),
        "--json",
        s(&json),
    ];
    args.extend(["--param", &param]);
    let o = run(&args);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("rtmpose_tiny.torchscript.pt") && e.contains("Pose network"),
        "{e}"
    );
    assert!(!png.exists() && !json.exists());

    // --convert of a state dict or an ONNX file: refused, nothing written
    let out = d.join("never.onnx");
    for (input, says) in [
        (
            fixtures().join("models/esrgan/tiny_x1_ema.pth"),
            "not a TorchScript archive",
        ),
        (
            fixtures().join("dwpose/yolox_tiny.onnx"),
            "not a TorchScript file",
        ),
    ] {
        let o = run(&["detect", "--convert", s(&input), "-o", s(&out)]);
        assert_eq!(o.status.code(), Some(1));
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(says) && e.contains(s(&input)), "{e}");
        assert!(!out.exists());
    }
    std::fs::remove_dir_all(&d).unwrap();
}
