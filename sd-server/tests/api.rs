//! The server's routes in process (no sockets, no Python): what a client sends, what it gets,
//! and the image of a txt2img request against `sd::generate` with the same settings. The real
//! clients (webuiapi, a browser) are driven by tests/server/*.py, which `.ci/run` runs.

use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// A models folder with the sd1 fixture, a ControlNet folder, the fixture LoRAs.
fn config(tag: &str) -> (sd_server::Config, PathBuf) {
    let dir = std::env::temp_dir().join(format!("sd-server-test-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("models")).unwrap();
    std::fs::create_dir_all(dir.join("cn")).unwrap();
    let fx = fixtures();
    std::os::unix::fs::symlink(fx.join("models/sd1"), dir.join("models/sd1")).unwrap();
    std::os::unix::fs::symlink(
        fx.join("models/sd1-inpaint"),
        dir.join("models/sd1-inpaint"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        fx.join("models/controlnet-sd1"),
        dir.join("cn/controlnet-sd1"),
    )
    .unwrap();
    std::os::unix::fs::symlink(fx.join("models/sdxl"), dir.join("models/sdxl")).unwrap();
    std::os::unix::fs::symlink(
        fx.join("models/controlnet-sdxl-union"),
        dir.join("cn/controlnet-sdxl-union"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        fx.join("models/t2i-adapter-sd1"),
        dir.join("cn/t2i-adapter-sd1"),
    )
    .unwrap();
    std::env::set_var("SDCTL_CACHE_DIR", dir.join("cache"));
    let mut c = sd_server::Config::new("127.0.0.1:0".parse().unwrap(), dir.join("models"));
    c.folders.controlnets = Some(dir.join("cn"));
    c.folders.loras = Some(fx.join("loras"));
    (c, dir)
}

async fn call(
    app: &axum::Router,
    method: &str,
    path: &str,
    body: Option<Value>,
    auth: Option<&str>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(a) = auth {
        let b64 = base64::engine::general_purpose::STANDARD.encode(a);
        req = req.header("authorization", format!("Basic {b64}"));
    }
    let body = match body {
        Some(v) => Body::from(v.to_string()),
        None => Body::empty(),
    };
    let res = app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
    let status = res.status();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, v)
}

fn b64_file(p: &Path) -> String {
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(p).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txt2img_with_a_controlnet_unit_is_the_front_doors_image() {
    let (config, dir) = config("parity");
    let (app, _) = sd_server::app(config);
    let control = fixtures().join("inputs/control_a.png");
    let req = json!({
        "prompt": "a cat <lora:lora_b_kohya:0.7>", "negative_prompt": "ugly",
        "width": 64, "height": 64, "steps": 5, "seed": 11, "cfg_scale": 6,
        "sampler_name": "Euler a", "scheduler": "automatic",
        "alwayson_scripts": {"ControlNet": {"args": [
            {"enabled": true, "module": "invert", "model": "controlnet-sd1",
             "weight": 0.8, "image": b64_file(&control), "resize_mode": "Just Resize",
             "control_mode": 2, "guidance_start": 0.1, "guidance_end": 0.9,
             "processor_res": 64}
        ]}}
    });
    let (status, res) = call(&app, "POST", "/sdapi/v1/txt2img", Some(req), None).await;
    assert_eq!(status, 200, "{res}");
    let images = res["images"].as_array().unwrap();
    // the generated image, then the unit's detected map
    assert_eq!(images.len(), 2);
    let info: Value = serde_json::from_str(res["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["seed"], 11);
    assert_eq!(info["all_seeds"], json!([11]));
    assert!(info["infotexts"][0]
        .as_str()
        .unwrap()
        .contains("ControlNet 0: \"Module: invert, Model: controlnet-sd1 ["));
    let api_png = base64::engine::general_purpose::STANDARD
        .decode(images[0].as_str().unwrap())
        .unwrap();

    // the same settings through the library's front door
    let mut job = sd::Job::new("a cat <lora:lora_b_kohya:0.7>");
    job.model = Some(dir.join("models/sd1"));
    job.negative_prompt = Some("ugly".into());
    job.width = Some(64);
    job.height = Some(64);
    job.steps = 5;
    job.seed = Some(11);
    job.cfg_scale = 6.0;
    job.sampler = sd_pipeline::samplers::SamplerKind::EulerA;
    job.schedule = sd_pipeline::samplers::Schedule::Normal;
    job.rng = sd::Rng::Philox; // A1111's default randn_source "GPU"
    job.lora_dir = Some(fixtures().join("loras"));
    let mut unit = sd::UnitSpec::new(dir.join("cn/controlnet-sd1"), &control);
    unit.weight = 0.8;
    unit.start = 0.1;
    unit.end = 0.9;
    unit.mode = sd_controlnet::ControlMode::Control;
    unit.resize = sd_controlnet::ResizeMode::Just;
    unit.preprocessor = Some(sd_controlnet::spec::PreprocessorChoice::named("invert"));
    unit.resolution = 64;
    job.control.push(unit.into());
    let g = sd::generate(&job, &sd::registry(), Vec::new()).unwrap();
    let out = dir.join("lib.png");
    g.write(&out, None).unwrap();
    let lib = image::open(&out).unwrap().to_rgb8();
    let api = image::load_from_memory(&api_png).unwrap().to_rgb8();
    assert_eq!(api.dimensions(), (64, 64));
    assert!(api == lib, "the API's pixels differ from the front door's");
    assert_eq!(info["infotexts"][0].as_str().unwrap(), g.parameters);
    // the detected map is the inverted control image, at the generation size
    let map_png = base64::engine::general_purpose::STANDARD
        .decode(images[1].as_str().unwrap())
        .unwrap();
    let map = image::load_from_memory(&map_png).unwrap().to_rgb8();
    let src = image::open(&control).unwrap().to_rgb8();
    assert_eq!(map.dimensions(), src.dimensions());
    assert_eq!(map.get_pixel(5, 7).0[0], 255 - src.get_pixel(5, 7).0[0]);
    let _ = std::fs::remove_dir_all(dir);
}

/// SDXL with a union ControlNet unit through the API: sd-webui-controlnet's
/// `union_control_type` names the type; the image is the front door's with `type=depth`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdxl_with_a_union_unit_is_the_front_doors_image() {
    let (config, dir) = config("sdxl");
    let (app, _) = sd_server::app(config);
    let control = fixtures().join("inputs/control_a.png");
    let unit = |ty: &str| {
        json!({"enabled": true, "module": "none", "model": "controlnet-sdxl-union",
               "weight": 0.9, "image": b64_file(&control), "resize_mode": "Just Resize",
               "union_control_type": ty})
    };
    let req = |ty: &str| {
        json!({
            "prompt": "a cat", "negative_prompt": "", "width": 64, "height": 64, "steps": 3,
            "seed": 5, "cfg_scale": 5, "sampler_name": "Euler", "scheduler": "normal",
            "override_settings": {"sd_model_checkpoint": "sdxl"},
            "alwayson_scripts": {"ControlNet": {"args": [unit(ty)]}}
        })
    };
    let (status, res) = call(&app, "POST", "/sdapi/v1/txt2img", Some(req("Depth")), None).await;
    assert_eq!(status, 200, "{res}");
    let png = |res: &Value| {
        let b = base64::engine::general_purpose::STANDARD
            .decode(res["images"][0].as_str().unwrap())
            .unwrap();
        image::load_from_memory(&b).unwrap().to_rgb8()
    };
    let api = png(&res);
    let mut job = sd::Job::new("a cat");
    job.model = Some(dir.join("models/sdxl"));
    job.negative_prompt = Some(String::new());
    (job.width, job.height, job.steps, job.seed, job.cfg_scale) =
        (Some(64), Some(64), 3, Some(5), 5.0);
    job.sampler = sd_pipeline::samplers::SamplerKind::Euler;
    job.schedule = sd_pipeline::samplers::Schedule::Normal;
    job.rng = sd::Rng::Philox;
    let mut spec = sd::UnitSpec::new(dir.join("cn/controlnet-sdxl-union"), &control);
    spec.weight = 0.9;
    spec.resize = sd_controlnet::ResizeMode::Just;
    spec.control_type = Some("depth".into());
    job.control.push(spec.into());
    let g = sd::generate(&job, &sd::registry(), Vec::new()).unwrap();
    let out = dir.join("lib.png");
    g.write(&out, None).unwrap();
    assert!(
        api == image::open(&out).unwrap().to_rgb8(),
        "the API's pixels differ"
    );
    // another type is another image; an unknown one is a 400 naming the field
    let (_, other) = call(
        &app,
        "POST",
        "/sdapi/v1/txt2img",
        Some(req("Hard Edge")),
        None,
    )
    .await;
    assert!(png(&other) != api, "the union type had no effect");
    let (status, res) = call(
        &app,
        "POST",
        "/sdapi/v1/txt2img",
        Some(req("Sketchy")),
        None,
    )
    .await;
    assert_eq!(status, 400, "{res}");
    assert!(res.to_string().contains("union_control_type"), "{res}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_4xx_naming_the_field_and_the_server_goes_on() {
    let (mut config, dir) = config("bad");
    config.body_limit = 1 << 20;
    let (app, _) = sd_server::app(config);
    let ok = json!({"width": 64, "height": 64, "steps": 1, "seed": 1});
    let with = |k: &str, v: Value| {
        let mut r = ok.clone();
        r[k] = v;
        r
    };
    let cases: Vec<(Value, u16, &str)> = vec![
        (
            with("sampler_name", json!("DPM2 a")),
            400,
            "Sampler not found",
        ),
        (
            with("width", json!(100000)),
            400,
            "width: must be an integer in [64, 2048], got 100000",
        ),
        (
            with("steps", json!(0)),
            400,
            "steps: must be an integer in [1, 150], got 0",
        ),
        (
            with("batch_size", json!(-1)),
            400,
            "batch_size: must be an integer in [1, 8]",
        ),
        (
            with("cfg_scale", json!("lots")),
            422,
            "cfg_scale: expected a finite number, got \"lots\"",
        ),
        (
            with(
                "override_settings",
                json!({"sd_model_checkpoint": "../sd1"}),
            ),
            400,
            "override_settings.sd_model_checkpoint: no model \"../sd1\"",
        ),
        (
            with(
                "override_settings",
                json!({"sd_model_checkpoint": "/etc/passwd"}),
            ),
            400,
            "no model \"/etc/passwd\"",
        ),
        (
            {
                let mut r = with("enable_hr", json!(true));
                r["hr_upscaler"] = json!("R-ESRGAN 4x+");
                r
            },
            400,
            "hr_upscaler: \"R-ESRGAN 4x+\" is no hires upscaler",
        ),
        (
            with(
                "alwayson_scripts",
                json!({"controlnet": {"args": [{"model": "nope", "image": "x"}]}}),
            ),
            400,
            "controlnet unit 0: model: no ControlNet \"nope\"",
        ),
        (
            with(
                "alwayson_scripts",
                json!({"controlnet": {"args": [
            {"model": "controlnet-sd1", "module": "nope", "image": b64_file(&fixtures().join("inputs/control_a.png"))}]}}),
            ),
            400,
            "controlnet unit 0: module: no preprocessor \"nope\"",
        ),
        (
            with(
                "alwayson_scripts",
                json!({"controlnet": {"args": vec![json!({"model": "controlnet-sd1", "image": b64_file(&fixtures().join("inputs/control_a.png"))}); 17]}}),
            ),
            400,
            "alwayson_scripts.controlnet.args: 17 units, at most 16",
        ),
        (
            with(
                "alwayson_scripts",
                json!({"controlnet": {"args": vec![json!({"model": "nope"}); 2000]}}),
            ),
            400,
            "2000 units, at most 16",
        ),
        (
            with("alwayson_scripts", json!({"adetailer": {"args": []}})),
            422,
            "always on script adetailer not found",
        ),
        (
            with("prompt", json!("x".repeat(70_000))),
            400,
            "prompt: 70000 bytes",
        ),
    ];
    for (body, status, detail) in cases {
        let (s, res) = call(&app, "POST", "/sdapi/v1/txt2img", Some(body.clone()), None).await;
        assert_eq!(s.as_u16(), status, "{body}: {res}");
        let d = res["detail"].as_str().unwrap_or_default();
        assert!(d.contains(detail), "{detail:?} not in {d:?}");
    }
    let img2img: Vec<(Value, u16, &str)> = vec![
        (
            json!({"init_images": ["not base64!"]}),
            400,
            "init_images[0]: not base64",
        ),
        (
            json!({"init_images": [base64::engine::general_purpose::STANDARD.encode(b"garbage")]}),
            400,
            "init_images[0]: not an image",
        ),
        (
            json!({"init_images": []}),
            400,
            "init_images: img2img needs an image",
        ),
        (
            json!({"init_images": [b64_file(&fixtures().join("inputs/init.png"))],
                   "denoising_strength": 0}),
            400,
            "denoising_strength: must be above 0",
        ),
    ];
    for (body, status, detail) in img2img {
        let (s, res) = call(&app, "POST", "/sdapi/v1/img2img", Some(body.clone()), None).await;
        assert_eq!(s.as_u16(), status, "{body}: {res}");
        assert!(res["detail"].as_str().unwrap().contains(detail), "{res}");
    }
    // not JSON, too big, no such route: JSON answers too
    let req = Request::post("/sdapi/v1/txt2img")
        .body(Body::from("{not json"))
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), 422);
    // 100k nested lists: refused by the JSON reader's depth limit, not a stack overflow
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let req = Request::post("/sdapi/v1/txt2img")
        .body(Body::from(deep))
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), 422);
    let big = json!({"prompt": "x".repeat(2 << 20)});
    let (s, res) = call(&app, "POST", "/sdapi/v1/txt2img", Some(big), None).await;
    assert_eq!(s, 413, "{res}");
    assert!(res["detail"].is_string(), "{res}");
    let (s, res) = call(&app, "GET", "/sdapi/v1/nothing-here", None, None).await;
    assert_eq!(s, 404);
    assert!(res["detail"]
        .as_str()
        .unwrap()
        .contains("/sdapi/v1/nothing-here"));
    let (s, res) = call(&app, "POST", "/sdapi/v1/interrogate", Some(json!({})), None).await;
    assert_eq!(s, 501, "{res}");
    // and it still works
    let (s, res) = call(&app, "POST", "/sdapi/v1/txt2img", Some(ok), None).await;
    assert_eq!(s, 200, "{res}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_lists_and_auth() {
    let (mut config, dir) = config("options");
    config.auth = sd_server::auth_pairs("user:pass,other:word").unwrap();
    let (app, _) = sd_server::app(config);
    let (s, _) = call(&app, "GET", "/sdapi/v1/options", None, None).await;
    assert_eq!(s, 401);
    let (s, _) = call(&app, "GET", "/sdapi/v1/options", None, Some("user:wrong")).await;
    assert_eq!(s, 401);
    let (s, _) = call(&app, "GET", "/", None, None).await;
    assert_eq!(s, 401, "the web UI is behind the password too");
    let auth = Some("other:word");
    let (s, opts) = call(&app, "GET", "/sdapi/v1/options", None, auth).await;
    assert_eq!(s, 200);
    assert!(opts["sd_model_checkpoint"]
        .as_str()
        .unwrap()
        .starts_with("sd1 ["));
    assert_eq!(opts["randn_source"], "GPU");
    // the whole dict back, with a key sdctl does not know: kept
    let mut back = opts.clone();
    back["some_extension_option"] = json!(42);
    back["sd_model_checkpoint"] = json!("sd1");
    let (s, res) = call(&app, "POST", "/sdapi/v1/options", Some(back), auth).await;
    assert_eq!(s, 200, "{res}");
    let (_, opts2) = call(&app, "GET", "/sdapi/v1/options", None, auth).await;
    assert_eq!(opts2["some_extension_option"], 42);
    assert_eq!(
        opts2["sd_model_checkpoint"], opts["sd_model_checkpoint"],
        "canonical title"
    );
    let (s, res) = call(
        &app,
        "POST",
        "/sdapi/v1/options",
        Some(json!({"sd_model_checkpoint": "missing"})),
        auth,
    )
    .await;
    assert_eq!(s, 400);
    assert!(res["detail"]
        .as_str()
        .unwrap()
        .contains("sd_model_checkpoint: no model \"missing\""));
    let (_, samplers) = call(&app, "GET", "/sdapi/v1/samplers", None, auth).await;
    let names: Vec<&str> = samplers
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    // A1111's order (sd_samplers_kdiffusion.py, then the timestep samplers)
    assert_eq!(
        names,
        [
            "DPM++ 2M",
            "DPM++ SDE",
            "DPM++ 2M SDE",
            "Euler a",
            "Euler",
            "LMS",
            "Heun",
            "DDIM",
            "UniPC",
            "LCM"
        ]
    );
    assert_eq!(samplers[2]["options"]["scheduler"], "exponential");
    let (_, loras) = call(&app, "GET", "/sdapi/v1/loras", None, auth).await;
    assert!(loras
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l["name"] == "lora_b_kohya"));
    let (_, cn) = call(&app, "GET", "/controlnet/model_list", None, auth).await;
    assert!(cn["model_list"][0]
        .as_str()
        .unwrap()
        .starts_with("controlnet-sd1 ["));
    let (_, modules) = call(&app, "GET", "/controlnet/module_list", None, auth).await;
    assert_eq!(modules["module_list"][0], "none");
    let canny = &modules["module_detail"]["canny"]["sliders"];
    assert_eq!(canny[1]["name"], "low");
    assert_eq!(canny[2]["value"], 200.0);
    let (_, v) = call(&app, "GET", "/controlnet/version", None, auth).await;
    assert_eq!(v["version"], 2);
    let (_, p) = call(&app, "GET", "/sdapi/v1/progress", None, auth).await;
    assert_eq!(p["progress"], 0.0);
    assert_eq!(p["state"]["job_count"], 0);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detect_runs_a_module_at_the_processor_resolution() {
    let (config, dir) = config("detect");
    let (app, _) = sd_server::app(config);
    let control = fixtures().join("inputs/control_a.png");
    let (s, res) = call(&app, "POST", "/controlnet/detect", Some(json!({
        "controlnet_module": "canny", "controlnet_input_images": [b64_file(&control)],
        "controlnet_processor_res": 128, "controlnet_threshold_a": 50, "controlnet_threshold_b": 150,
    })), None).await;
    assert_eq!(s, 200, "{res}");
    let png = base64::engine::general_purpose::STANDARD
        .decode(res["images"][0].as_str().unwrap())
        .unwrap();
    let map = image::load_from_memory(&png).unwrap();
    // 64x64 brought to the processor resolution's short side
    assert_eq!((map.width(), map.height()), (128, 128));
    let (s, res) = call(
        &app,
        "POST",
        "/controlnet/detect",
        Some(json!({
            "controlnet_module": "canny", "controlnet_input_images": [b64_file(&control)],
            "controlnet_threshold_a": 999,
        })),
        None,
    )
    .await;
    assert_eq!(s, 400, "{res}");
    assert!(res["detail"].as_str().unwrap().contains("low"), "{res}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inpainting_takes_a1111s_steps_with_its_api_defaults() {
    let (config, dir) = config("inpaint");
    let (app, _) = sd_server::app(config);
    let (init, mask) = (
        fixtures().join("inputs/init.png"),
        fixtures().join("inputs/mask.png"),
    );
    let req = json!({
        "prompt": "a hat", "width": 64, "height": 64, "steps": 4, "seed": 9,
        "sampler_name": "Euler", "denoising_strength": 0.9, "inpainting_fill": 1,
        "init_images": [format!("data:image/png;base64,{}", b64_file(&init))],
        "mask": b64_file(&mask),
        "override_settings": {"sd_model_checkpoint": "sd1-inpaint"},
    });
    let (status, res) = call(&app, "POST", "/sdapi/v1/img2img", Some(req), None).await;
    assert_eq!(status, 200, "{res}");
    let info: Value = serde_json::from_str(res["info"].as_str().unwrap()).unwrap();
    let text = info["infotexts"][0].as_str().unwrap();
    assert!(
        text.contains("Mask blur: 4, Inpaint area: Only masked, Masked area padding: 0"),
        "{text}"
    );
    assert_eq!(
        res["parameters"]["init_images"],
        Value::Null,
        "images are not echoed"
    );
    let png = base64::engine::general_purpose::STANDARD
        .decode(res["images"][0].as_str().unwrap())
        .unwrap();
    let api = image::load_from_memory(&png).unwrap().to_rgb8();

    // A1111's API defaults: blur 4, only masked without padding, the original pasted over
    let mut job = sd::Job::new("a hat");
    job.model = Some(dir.join("models/sd1-inpaint"));
    job.width = Some(64);
    job.height = Some(64);
    job.steps = 4;
    job.seed = Some(9);
    job.cfg_scale = 7.0;
    job.sampler = sd_pipeline::samplers::SamplerKind::Euler;
    job.schedule = sd_pipeline::samplers::Schedule::Normal;
    job.rng = sd::Rng::Philox;
    job.init_image = Some(init.clone());
    job.mask = Some(mask.clone());
    job.strength = Some(0.9);
    job.inpaint = sd::inpaint::Inpaint {
        mask_blur: 4,
        invert_mask: false,
        only_masked_padding: Some(0),
        overlay: true,
        fill: sd::inpaint::Fill::Original,
    };
    let g = sd::generate(&job, &sd::registry(), Vec::new()).unwrap();
    let out = dir.join("lib.png");
    g.write(&out, None).unwrap();
    let lib = image::open(&out).unwrap().to_rgb8();
    assert!(
        api == lib,
        "the API's inpainting differs from the front door's"
    );
    // far from the mask (more than the blur reaches) the original is untouched
    let (orig, m) = (
        image::open(&init).unwrap().to_rgb8(),
        image::open(&mask).unwrap().to_luma8(),
    );
    let mut far = 0;
    for (x, y, p) in m.enumerate_pixels() {
        let near = (x.saturating_sub(12)..(x + 13).min(64)).any(|xx| {
            (y.saturating_sub(12)..(y + 13).min(64)).any(|yy| m.get_pixel(xx, yy).0[0] > 128)
        });
        if p.0[0] == 0 && !near {
            far += 1;
            assert_eq!(api.get_pixel(x, y), orig.get_pixel(x, y), "({x}, {y})");
        }
    }
    assert!(far > 0, "the fixture mask leaves pixels far from it");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_for_the_configured_origin_and_openpose_json_drawn() {
    let (mut config, dir) = config("cors");
    config.cors_origin = Some("http://localhost:3000".into());
    let (app, _) = sd_server::app(config);
    let req = Request::builder()
        .method("OPTIONS")
        .uri("/sdapi/v1/txt2img")
        .header("origin", "http://localhost:3000")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .body(Body::empty())
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "http://localhost:3000"
    );
    let req = Request::get("/sdapi/v1/samplers")
        .header("origin", "http://elsewhere.example")
        .body(Body::empty())
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    // the browser of another origin is told which one is allowed, never its own
    assert_ne!(
        res.headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap()),
        Some("http://elsewhere.example")
    );

    // one person: a neck and two shoulders, on a 64x48 canvas
    let pose = json!([{
        "canvas_width": 64, "canvas_height": 48,
        "people": [{"pose_keypoints_2d": [
            32, 10, 1,  32, 20, 1,  22, 20, 1,  0, 0, 0,  0, 0, 0,
            42, 20, 1,  0, 0, 0,  0, 0, 0
        ]}]
    }]);
    let (s, res) = call(
        &app,
        "POST",
        "/controlnet/render_openpose_json",
        Some(pose),
        None,
    )
    .await;
    assert_eq!(s, 200, "{res}");
    let png = base64::engine::general_purpose::STANDARD
        .decode(res["images"][0].as_str().unwrap())
        .unwrap();
    let img = image::load_from_memory(&png).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (64, 48));
    assert!(
        img.pixels().any(|p| p.0 != [0, 0, 0]),
        "the skeleton is drawn"
    );
    let (s, res) = call(
        &app,
        "POST",
        "/controlnet/render_openpose_json",
        Some(json!("x")),
        None,
    )
    .await;
    assert_eq!(s, 422, "{res}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashes_the_cache_lacks_are_read_in_the_background() {
    let (mut config, dir) = config("background");
    // a fresh hash cache, and no wait: the server starts before the hashes are read
    let cache = dir.join("fresh-cache");
    std::env::set_var("SDCTL_CACHE_DIR", &cache);
    config.hash_wait = std::time::Duration::ZERO;
    let (app, _) = sd_server::app(config);
    // the model answers to its name at once
    let (s, res) = call(
        &app,
        "POST",
        "/sdapi/v1/options",
        Some(json!({"sd_model_checkpoint": "sd1"})),
        None,
    )
    .await;
    assert_eq!(s, 200, "{res}");
    // and its title gains the hash, in the list and in the options
    let t0 = std::time::Instant::now();
    loop {
        let (_, models) = call(&app, "GET", "/sdapi/v1/sd-models", None, None).await;
        let (_, opts) = call(&app, "GET", "/sdapi/v1/options", None, None).await;
        let titled = models
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["title"].as_str().unwrap().starts_with("sd1 ["));
        if titled
            && opts["sd_model_checkpoint"]
                .as_str()
                .unwrap()
                .starts_with("sd1 [")
        {
            assert!(opts["sd_checkpoint_hash"].as_str().unwrap().len() == 64);
            break;
        }
        assert!(
            t0.elapsed().as_secs() < 60,
            "no hash after 60 s: {models} {opts}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Embeddings from `--embeddings-dir`: listed as A1111 lists them, used by a prompt that
/// names them (the image and infotext are the front door's, "TI hashes" included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_are_listed_and_used_by_prompts() {
    let (mut config, dir) = config("embeddings");
    config.folders.embeddings = Some(fixtures().join("embeddings"));
    let (app, _) = sd_server::app(config);
    let (status, res) = call(&app, "GET", "/sdapi/v1/embeddings", None, None).await;
    assert_eq!(status, 200, "{res}");
    assert_eq!(res["loaded"]["badhands"]["vectors"], 3);
    assert_eq!(res["loaded"]["badhands"]["shape"], 8);
    assert_eq!(res["loaded"]["xlstyle"]["shape"], 16);
    assert!(res["skipped"]["broken"].is_object(), "{res}");

    let req = json!({
        "prompt": "a tinystyle cat", "negative_prompt": "badhands", "width": 64, "height": 64,
        "steps": 3, "seed": 2, "cfg_scale": 5, "sampler_name": "Heun", "scheduler": "karras",
        "override_settings": {"sd_model_checkpoint": "sd1"}
    });
    let (status, res) = call(&app, "POST", "/sdapi/v1/txt2img", Some(req), None).await;
    assert_eq!(status, 200, "{res}");
    let info: Value = serde_json::from_str(res["info"].as_str().unwrap()).unwrap();
    let infotext = info["infotexts"][0].as_str().unwrap();
    assert!(
        infotext.contains("Sampler: Heun, Schedule type: Karras")
            && infotext.contains("TI hashes: \"badhands: ")
            && infotext.contains(", tinystyle: "),
        "{infotext}"
    );
    let api = base64::engine::general_purpose::STANDARD
        .decode(res["images"][0].as_str().unwrap())
        .unwrap();
    let mut job = sd::Job::new("a tinystyle cat");
    job.model = Some(dir.join("models/sd1"));
    job.negative_prompt = Some("badhands".into());
    (job.width, job.height, job.steps, job.seed, job.cfg_scale) =
        (Some(64), Some(64), 3, Some(2), 5.0);
    job.sampler = sd_pipeline::samplers::SamplerKind::Heun;
    job.schedule = sd_pipeline::samplers::Schedule::Karras;
    job.rng = sd::Rng::Philox;
    job.lora_dir = Some(fixtures().join("loras"));
    job.embeddings_dir = Some(fixtures().join("embeddings"));
    let g = sd::generate(&job, &sd::registry(), Vec::new()).unwrap();
    assert_eq!(g.parameters, infotext);
    let out = dir.join("lib.png");
    g.write(&out, None).unwrap();
    assert!(
        image::load_from_memory(&api).unwrap().to_rgb8() == image::open(&out).unwrap().to_rgb8(),
        "the API's pixels differ from the front door's"
    );
    // without the folder, the names are plain words: another image
    job.embeddings_dir = None;
    let plain = sd::generate(&job, &sd::registry(), Vec::new()).unwrap();
    assert!(!plain.parameters.contains("TI hashes"));
    let d = (plain.images - &g.images)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(d.to_scalar::<f32>().unwrap() > 1e-3);
    let _ = std::fs::remove_dir_all(dir);
}

/// POST `unit` (one ControlNet-extension unit) with a small fixed txt2img, and check the
/// image against the front door's with the same settings and `spec`, and that the unit changed
/// it.
async fn unit_matches_the_front_door(
    app: &axum::Router,
    dir: &Path,
    unit: Value,
    spec: sd::UnitSpec,
) {
    let req = json!({
        "prompt": "a cat", "negative_prompt": "ugly", "width": 64, "height": 64, "steps": 3,
        "seed": 9, "cfg_scale": 6, "sampler_name": "Euler", "scheduler": "normal",
        "alwayson_scripts": {"ControlNet": {"args": [unit]}}
    });
    let (status, res) = call(app, "POST", "/sdapi/v1/txt2img", Some(req), None).await;
    assert_eq!(status, 200, "{res}");
    let api_png = base64::engine::general_purpose::STANDARD
        .decode(res["images"][0].as_str().unwrap())
        .unwrap();
    let mut job = sd::Job::new("a cat");
    job.model = Some(dir.join("models/sd1"));
    job.negative_prompt = Some("ugly".into());
    job.width = Some(64);
    job.height = Some(64);
    job.steps = 3;
    job.seed = Some(9);
    job.cfg_scale = 6.0;
    job.sampler = sd_pipeline::samplers::SamplerKind::Euler;
    job.schedule = sd_pipeline::samplers::Schedule::Normal;
    job.rng = sd::Rng::Philox;
    job.control.push(spec.into());
    let g = sd::generate(&job, &sd::registry(), Vec::new()).unwrap();
    let out = dir.join("lib.png");
    g.write(&out, None).unwrap();
    let lib = image::open(&out).unwrap().to_rgb8();
    let api = image::load_from_memory(&api_png).unwrap().to_rgb8();
    assert!(api == lib, "the API's pixels differ from the front door's");
    job.control.clear();
    let plain = sd::generate(&job, &sd::registry(), Vec::new()).unwrap();
    plain.write(&out, None).unwrap();
    assert!(
        image::open(&out).unwrap().to_rgb8() != api,
        "the unit changed nothing"
    );
}

/// A T2I-Adapter folder is listed with the ControlNets and runs as a unit: the API's image is
/// the front door's with the same settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_t2i_adapter_unit_is_listed_and_gives_the_front_doors_image() {
    let (config, dir) = config("adapter");
    let (app, _) = sd_server::app(config);
    let (status, list) = call(&app, "GET", "/controlnet/model_list", None, None).await;
    assert_eq!(status, 200);
    let titles: Vec<&str> = list["model_list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t.as_str())
        .collect();
    assert!(
        titles.iter().any(|t| t.starts_with("t2i-adapter-sd1")),
        "{titles:?}"
    );
    let control = fixtures().join("inputs/control_b.png");
    let unit = json!({"enabled": true, "module": "none", "model": "t2i-adapter-sd1",
        "weight": 0.7, "image": b64_file(&control), "guidance_end": 0.5});
    let mut spec = sd::UnitSpec::new(dir.join("cn/t2i-adapter-sd1"), &control);
    spec.weight = 0.7;
    spec.end = 0.5;
    unit_matches_the_front_door(&app, &dir, unit, spec).await;
}

/// A reference_only unit (no model, `threshold_a` = style fidelity) through the API equals
/// the front door with the same settings; without it the image differs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reference_only_unit_needs_no_model_and_gives_the_front_doors_image() {
    let (config, dir) = config("reference");
    let (app, _) = sd_server::app(config);
    let reference = fixtures().join("inputs/init.png");
    let unit = json!({"enabled": true, "module": "reference_only", "model": "None",
        "weight": 1.0, "threshold_a": 0.7, "image": b64_file(&reference)});
    let mut spec = sd::UnitSpec::new("", &reference);
    spec.preprocessor = Some(sd_controlnet::spec::PreprocessorChoice {
        name: "reference_only".into(),
        params: vec![(
            "style_fidelity".into(),
            sd_plugins_api::ParamValue::Float(0.7),
        )],
    });
    unit_matches_the_front_door(&app, &dir, unit, spec).await;
}
