//! sd-webui-controlnet's API: units in `alwayson_scripts.controlnet.args` as control units of
//! the job, and its `/controlnet/...` routes, on sdctl's preprocessors and the ControlNets in
//! `--controlnet-dir`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::Json;
use sd_controlnet::spec::PreprocessorChoice;
use sd_controlnet::UnitSpec;
use sd_controlnet::{ControlMode, ResizeMode};
use sd_plugins_api::{ParamKind, ParamValue, Preprocessor, Registry};
use sd_preprocessors::detect::{detect_file, Sizing};
use serde_json::{json, Map, Value};

use crate::catalog::Catalog;
use crate::error::{ApiError, ApiResult};
use crate::fields::{self, Fields};
use crate::images;
use crate::state::AppState;

/// The extension's API version (`/controlnet/version`).
pub const API_VERSION: u32 = 2;

/// Units in one request at most (the extension's `control_net_max_models_num` goes to 10).
pub const MAX_UNITS: usize = 16;

/// A unit ready for the job, and what to append to the response.
pub struct Unit {
    pub spec: UnitSpec,
    /// The detected map goes into the response's images.
    pub save_detected_map: bool,
    /// The hires fix's passes it acts on (`hr_option`).
    pub hr: sd::hires::HrOption,
}

/// One of three names, given as the name (or an old alias) or as its number 0/1/2.
fn choice(
    f: &Fields,
    key: &str,
    names: [&str; 3],
    aliases: &[(&str, usize)],
) -> ApiResult<Option<usize>> {
    let i = match f.get(key) {
        None => return Ok(None),
        Some(Value::Number(_)) => usize::try_from(f.int(key, 0)?).ok().filter(|&i| i < 3),
        Some(_) => {
            let name = f.string(key, "")?;
            names
                .iter()
                .position(|n| *n == name)
                .or_else(|| aliases.iter().find(|(a, _)| *a == name).map(|(_, i)| *i))
        }
    };
    i.map(Some).ok_or_else(|| {
        ApiError::bad(format!(
            "{}: {} is not one of {:?} (or 0, 1, 2)",
            f.name(key),
            fields::shown(&f.map[key]),
            names
        ))
    })
}

/// `resize_mode` (sd-webui-controlnet's `ResizeMode`); "Resize and Fill" by default.
fn resize_mode(f: &Fields) -> ApiResult<ResizeMode> {
    let names = ["Just Resize", "Crop and Resize", "Resize and Fill"];
    let old = [("Scale to Fit (Inner Fit)", 1), ("Envelope (Outer Fit)", 2)];
    Ok([ResizeMode::Just, ResizeMode::Crop, ResizeMode::Fill]
        [choice(f, "resize_mode", names, &old)?.unwrap_or(2)])
}

/// `control_mode` (also the old `guessmode` flag); "Balanced" by default.
fn control_mode(f: &Fields) -> ApiResult<ControlMode> {
    let names = [
        "Balanced",
        "My prompt is more important",
        "ControlNet is more important",
    ];
    let guess = if f.bool("guessmode", false)? { 2 } else { 0 };
    Ok([
        ControlMode::Balanced,
        ControlMode::Prompt,
        ControlMode::Control,
    ][choice(f, "control_mode", names, &[])?.unwrap_or(guess)])
}

/// `union_control_type` (sd-webui-controlnet's `ControlNetUnionControlType`, its value or
/// one of its tags): the unit's `type=` for a union ControlNet; "Unknown" or absent: none.
fn union_type(f: &Fields) -> ApiResult<Option<String>> {
    let given = f.string("union_control_type", "Unknown")?;
    let ty = match given.to_lowercase().as_str() {
        "unknown" | "" => return Ok(None),
        "openpose" => "openpose",
        "depth" => "depth",
        "soft edge" | "softedge" | "scribble" => "hed",
        "hard edge" | "canny" | "lineart" | "mlsd" => "canny",
        "normal map" | "normalmap" => "normal",
        "segmentation" => "segment",
        "tile" | "blur" => "tile",
        "inpaint" => "repaint",
        _ => {
            return Err(ApiError::bad(format!(
                "{}: {given:?} is not one of \"OpenPose\", \"Depth\", \"Soft Edge\", \"Hard Edge\", \"Normal Map\", \"Segmentation\", \"Tile\", \"Inpaint\", \"Unknown\"",
                f.name("union_control_type")
            )))
        }
    };
    Ok(Some(ty.into()))
}

/// A module as a request names it: the preprocessor, and its parameters as given and checked.
pub struct Module {
    pub choice: PreprocessorChoice,
    pub preprocessor: Arc<dyn Preprocessor>,
    pub params: sd_plugins_api::Params,
}

/// A preprocessor by sd-webui-controlnet's module name, with `threshold_a` / `threshold_b` as its
/// first two numeric parameters (the extension's two sliders; -1 or absent: the default).
pub fn module_choice(
    registry: &Registry,
    module: &str,
    threshold_a: f64,
    threshold_b: f64,
    field: &str,
) -> ApiResult<Option<Module>> {
    if module.is_empty() || module == "none" || module == "None" {
        return Ok(None);
    }
    let Some(p) = registry.preprocessor(module) else {
        return Err(ApiError::bad(format!(
            "{field}module: no preprocessor {module:?} (GET /controlnet/module_list lists them)"
        )));
    };
    let mut choice = PreprocessorChoice::named(module);
    let numeric = p
        .params()
        .into_iter()
        .filter(|s| matches!(s.kind, ParamKind::Int { .. } | ParamKind::Float { .. }));
    for (spec, v) in numeric.zip([threshold_a, threshold_b]) {
        if v == -1.0 {
            continue;
        }
        let value = match spec.kind {
            ParamKind::Int { .. } => ParamValue::Int(v.round() as i64),
            _ => ParamValue::Float(v),
        };
        choice.params.push((spec.name.clone(), value));
    }
    let params = choice.resolve(registry).map_err(|errs| {
        ApiError::bad(format!(
            "{field}threshold_a/threshold_b: {}",
            errs.join("; ")
        ))
    })?;
    Ok(Some(Module {
        choice,
        preprocessor: p.clone(),
        params,
    }))
}

/// sd-webui-controlnet's pixel-perfect processor resolution for an image of `raw` size and a
/// generation of `target` size (`external_code.pixel_perfect_resolution`).
pub fn pixel_perfect(raw: (u32, u32), target: (usize, usize), resize: ResizeMode) -> usize {
    let (rw, rh) = (raw.0 as f64, raw.1 as f64);
    let k0 = target.1 as f64 / rh;
    let k1 = target.0 as f64 / rw;
    let e = if resize == ResizeMode::Fill {
        k0.min(k1) * rw.min(rh)
    } else {
        k0.max(k1) * rw.min(rh)
    };
    e.round() as usize
}

/// The image of a unit: a base64 string, or `{"image": ..., "mask": ...}`.
fn unit_image<'a>(f: &Fields<'a>) -> ApiResult<(Option<&'a str>, Option<&'a str>)> {
    for key in ["image", "input_image"] {
        match f.get(key) {
            None => {}
            Some(Value::String(s)) if s.is_empty() => {}
            Some(Value::String(s)) => return Ok((Some(s), None)),
            Some(Value::Object(m)) => {
                let img = m.get("image").and_then(Value::as_str);
                let mask = m
                    .get("mask")
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty());
                return Ok((img, mask));
            }
            Some(v) => {
                return Err(ApiError::invalid(format!(
                    "{}: expected a base64 image or {{\"image\", \"mask\"}}, got {}",
                    f.name(key),
                    fields::kind(v)
                )))
            }
        }
    }
    Ok((None, None))
}

/// The units of `alwayson_scripts.controlnet.args`: disabled units and units without a model
/// are skipped, as the extension skips them. `init_image`: img2img's image, used by units that
/// bring none.
pub fn units(
    args: &[Value],
    catalog: &Catalog,
    registry: &Registry,
    scratch: &Path,
    size: (usize, usize),
    init_image: Option<&Path>,
) -> ApiResult<Vec<Unit>> {
    // every unit's image is decoded and every ControlNet run at each step: a bounded number
    let too_many = |n: usize| {
        ApiError::bad(format!(
            "alwayson_scripts.controlnet.args: {n} units, at most {MAX_UNITS} in one request"
        ))
    };
    if args.len() > 4 * MAX_UNITS {
        return Err(too_many(args.len()));
    }
    let mut out = Vec::new();
    for (i, arg) in args.iter().enumerate() {
        let prefix = format!("controlnet unit {i}: ");
        let map = match arg {
            Value::Object(m) => m,
            // the extension's scripts also take positional booleans; nothing to do with them
            Value::Bool(_) | Value::Null => continue,
            v => {
                return Err(ApiError::invalid(format!(
                    "{prefix}expected an object, got {}",
                    fields::kind(v)
                )))
            }
        };
        let f = Fields::named(map, prefix.clone());
        if !f.bool("enabled", true)? {
            continue;
        }
        let model = f.string("model", "None")?;
        let module = f.string("module", "none")?;
        // the extension's reference modules run without a model
        let reference = module.starts_with("reference");
        if (model.is_empty() || model == "None") && !reference {
            continue;
        }
        let model_path = if reference {
            PathBuf::new()
        } else {
            let entry = catalog.controlnet(&model).ok_or_else(|| {
                ApiError::bad(format!(
                    "{prefix}model: no ControlNet {model:?} in --controlnet-dir (GET /controlnet/model_list lists them)"
                ))
            })?;
            entry.path.clone()
        };
        let (img, dict_mask) = unit_image(&f)?;
        let image: PathBuf = match (img, init_image) {
            (Some(b64), _) => images::save(
                scratch,
                &format!("unit{i}.png"),
                &format!("{prefix}image"),
                b64,
            )?,
            (None, Some(init)) => init.to_path_buf(),
            (None, None) => {
                return Err(ApiError::bad(format!(
                    "{prefix}image: a unit needs an image (base64 PNG or JPEG)"
                )))
            }
        };
        let mask = match f
            .opt_string("mask")?
            .or(f.opt_string("mask_image")?)
            .filter(|s| !s.is_empty())
            .or(dict_mask.map(str::to_string))
        {
            Some(b64) => Some(images::save(
                scratch,
                &format!("unit{i}-mask.png"),
                &format!("{prefix}mask"),
                &b64,
            )?),
            None => None,
        };
        let resize = resize_mode(&f)?;
        let pre = module_choice(
            registry,
            &module,
            f.float("threshold_a", -1.0)?,
            f.float("threshold_b", -1.0)?,
            &prefix,
        )?;
        let mut resolution = f.int("processor_res", 512)?;
        if resolution == -1 {
            resolution = 512;
        }
        if f.bool("pixel_perfect", false)? {
            let raw = image::image_dimensions(&image)
                .map_err(|e| ApiError::bad(format!("{prefix}image: {e}")))?;
            resolution = pixel_perfect(raw, size, resize) as i64;
        }
        let mut spec = UnitSpec::new(&model_path, image);
        spec.weight = f.float("weight", 1.0)?;
        spec.start = f.float("guidance_start", 0.0)?;
        spec.end = f.float("guidance_end", 1.0)?;
        spec.mode = control_mode(&f)?;
        spec.control_type = union_type(&f)?;
        spec.resize = resize;
        spec.preprocessor = pre.map(|m| m.choice);
        spec.mask = mask;
        spec.resolution = usize::try_from(resolution).unwrap_or(0);
        spec.validate()
            .map_err(|e| ApiError::bad(format!("{prefix}{e}")))?;
        let hr = [
            sd::hires::HrOption::Both,
            sd::hires::HrOption::LowResOnly,
            sd::hires::HrOption::HighResOnly,
        ][choice(
            &f,
            "hr_option",
            ["Both", "Low res only", "High res only"],
            &[],
        )?
        .unwrap_or(0)];
        out.push(Unit {
            save_detected_map: f.bool("save_detected_map", true)?,
            hr,
            spec,
        });
        if out.len() > MAX_UNITS {
            return Err(too_many(out.len()));
        }
    }
    Ok(out)
}

/// A unit's detected map (its preprocessor at its processor resolution, as the unit runs it)
/// as PNG bytes; `None` for units without a preprocessor.
pub fn detected_map(
    registry: &Registry,
    spec: &UnitSpec,
    size: (usize, usize),
) -> ApiResult<Option<Vec<u8>>> {
    let Some(choice) = &spec.preprocessor else {
        return Ok(None);
    };
    let Some(p) = registry.preprocessor(&choice.name) else {
        return Ok(None);
    };
    let params = choice
        .resolve(registry)
        .map_err(|e| ApiError::bad(e.join("; ")))?;
    let map = detect_map(
        registry,
        p.as_ref(),
        &spec.image,
        &params,
        spec.resolution,
        size,
    )?;
    // the extension appends the map as the unit used it: fitted to the generation size
    let map = sd_plugins_api::hwc3(&map);
    let fitted = sd_controlnet::control_image::fit_map(&map, size.0, size.1, spec.resize);
    images::png_bytes(fitted.width as u32, fitted.height as u32, 3, fitted.data).map(Some)
}

fn detect_map(
    registry: &Registry,
    p: &dyn Preprocessor,
    path: &Path,
    params: &sd_plugins_api::Params,
    resolution: usize,
    size: (usize, usize),
) -> ApiResult<sd_plugins_api::ImageBuf> {
    let sizing = Sizing {
        resolution,
        pad: false,
    };
    Ok(detect_file(registry, p, path, params, sizing, size)
        .map_err(ApiError::bad)?
        .map)
}

fn map_png(
    registry: &Registry,
    p: &dyn Preprocessor,
    path: &Path,
    params: &sd_plugins_api::Params,
    resolution: usize,
    size: (usize, usize),
) -> ApiResult<Vec<u8>> {
    let map = detect_map(registry, p, path, params, resolution, size)?;
    images::png_bytes(map.width as u32, map.height as u32, map.channels, map.data)
}

/// `GET /controlnet/version`
pub async fn version() -> Json<Value> {
    Json(json!({ "version": API_VERSION }))
}

/// `GET /controlnet/model_list`
pub async fn model_list(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({ "model_list": controlnet_titles(&st) }))
}

/// The ControlNets' titles, as the extension lists them.
fn controlnet_titles(st: &AppState) -> Vec<String> {
    st.catalog()
        .controlnets
        .iter()
        .map(|e| e.title.clone())
        .collect()
}

/// The module names: `none`, then every preprocessor.
fn module_names(registry: &Registry) -> Vec<String> {
    std::iter::once("none".to_string())
        .chain(registry.preprocessors().map(|(p, _)| p.name().to_string()))
        .collect()
}

/// sd-webui-controlnet's slider descriptions for a module: its first two numeric parameters.
fn sliders(p: &dyn Preprocessor) -> Vec<Value> {
    let mut out = vec![
        json!({"name": "Preprocessor Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}),
    ];
    let numeric = p
        .params()
        .into_iter()
        .filter(|s| matches!(s.kind, ParamKind::Int { .. } | ParamKind::Float { .. }))
        .take(2);
    for s in numeric {
        let (min, max) = match s.kind {
            ParamKind::Int { min, max } => (min as f64, max as f64),
            ParamKind::Float { min, max } => (min, max),
            _ => continue,
        };
        let value = match s.default {
            ParamValue::Int(i) => i as f64,
            ParamValue::Float(f) => f,
            _ => continue,
        };
        out.push(json!({"name": s.name, "value": value, "min": min, "max": max}));
    }
    if !p.uses_resolution() {
        out.remove(0);
    }
    out
}

/// `GET /controlnet/module_list`: `module_list` and `module_detail`.
pub async fn module_list(State(st): State<Arc<AppState>>) -> Json<Value> {
    let mut detail = Map::new();
    detail.insert("none".into(), json!({"model_free": false, "sliders": []}));
    for (p, _) in st.registry.preprocessors() {
        detail.insert(
            p.name().to_string(),
            json!({"model_free": false, "sliders": sliders(p.as_ref()), "description": p.description()}),
        );
    }
    Json(json!({ "module_list": module_names(&st.registry), "module_detail": detail }))
}

/// `GET /controlnet/control_types`: "All", then a type per preprocessor family with the
/// ControlNets whose names mention it.
pub async fn control_types(State(st): State<Arc<AppState>>) -> Json<Value> {
    let models = controlnet_titles(&st);
    let modules = module_names(&st.registry);
    let mut types = Map::new();
    let mut all_models = vec!["None".to_string()];
    all_models.extend(models.iter().cloned());
    types.insert(
        "All".into(),
        json!({"module_list": modules, "model_list": all_models, "default_option": "none", "default_model": "None"}),
    );
    for (label, key) in [
        ("Canny", "canny"),
        ("Depth", "depth"),
        ("OpenPose", "openpose"),
        ("Lineart", "lineart"),
        ("Scribble", "scribble"),
        ("Segmentation", "seg"),
        ("Normal", "normal"),
        ("Tile", "tile"),
        ("Shuffle", "shuffle"),
        ("Inpaint", "inpaint"),
    ] {
        let ms: Vec<&String> = modules.iter().filter(|m| m.contains(key)).collect();
        let mut cns = vec!["None".to_string()];
        cns.extend(
            models
                .iter()
                .filter(|m| m.to_lowercase().contains(key))
                .cloned(),
        );
        types.insert(
            label.into(),
            json!({"module_list": ms, "model_list": cns,
                   "default_option": ms.first().map_or("none", |s| s.as_str()),
                   "default_model": cns.get(1).map_or("None", |s| s.as_str())}),
        );
    }
    Json(json!({ "control_types": types }))
}

/// `POST /controlnet/detect`: run a module on images at a processor resolution.
pub async fn detect(
    State(st): State<Arc<AppState>>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    let map = fields::object(&body)?;
    let f = Fields::new(&map);
    let module = f.string("controlnet_module", "none")?;
    let list = match f.get("controlnet_input_images") {
        Some(_) => f.list("controlnet_input_images")?,
        None => f.list("controlnet_images")?,
    };
    if list.is_empty() {
        return Err(ApiError::bad("controlnet_input_images: no image given"));
    }
    if list.len() > 16 {
        return Err(ApiError::bad(format!(
            "controlnet_input_images: {} images, at most 16 a request",
            list.len()
        )));
    }
    let mut res = f.int("controlnet_processor_res", 512)?;
    if res == -1 {
        res = 512;
    }
    let (a, b) = (
        f.float("controlnet_threshold_a", -1.0)?,
        f.float("controlnet_threshold_b", -1.0)?,
    );
    let registry = &st.registry;
    let choice = module_choice(registry, &module, a, b, "controlnet_")?;
    let scratch =
        tempfile::tempdir().map_err(|e| ApiError::internal(format!("scratch folder: {e}")))?;
    let mut inputs = Vec::new();
    for (i, v) in list.iter().enumerate() {
        let field = format!("controlnet_input_images[{i}]");
        let text = v
            .as_str()
            .ok_or_else(|| ApiError::invalid(format!("{field}: expected a base64 image")))?;
        inputs.push(images::save(
            scratch.path(),
            &format!("in{i}.png"),
            &field,
            text,
        )?);
    }
    let resolution = usize::try_from(res)
        .ok()
        .filter(|r| sd_preprocessors::detect::RESOLUTIONS.contains(r))
        .ok_or_else(|| {
            ApiError::bad(format!(
                "controlnet_processor_res: {res} is not in {:?}",
                sd_preprocessors::detect::RESOLUTIONS
            ))
        })?;
    // preprocessors run on the engine thread, in turn with generations
    let out = st
        .queue
        .run(move |engine| {
            let _keep = scratch;
            let mut out = Vec::new();
            for path in &inputs {
                let bytes = match &choice {
                    None => std::fs::read(path)
                        .map_err(|e| ApiError::internal(format!("reading scratch: {e}")))?,
                    Some(m) => {
                        let (w, h) = image::image_dimensions(path)
                            .map_err(|e| ApiError::bad(e.to_string()))?;
                        map_png(
                            &engine.registry,
                            m.preprocessor.as_ref(),
                            path,
                            &m.params,
                            resolution,
                            (w as usize, h as usize),
                        )?
                    }
                };
                out.push(Value::String(images::encode_b64(&bytes)));
            }
            Ok(out)
        })
        .await?;
    Ok(Json(json!({ "images": out, "info": "Success" })))
}

/// `POST /controlnet/render_openpose_json`: OpenPose keypoint JSON (a list of poses, or one)
/// drawn by the `openpose` preprocessor's file reader, as `sdctl pose render` draws it.
pub async fn render_openpose_json(
    State(st): State<Arc<AppState>>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    let v: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("the request body is not JSON: {e}")))?;
    let poses = match v {
        Value::Array(a) => a,
        o @ Value::Object(_) => vec![o],
        other => {
            return Err(ApiError::invalid(format!(
                "expected a list of OpenPose JSON objects, got {}",
                fields::kind(&other)
            )))
        }
    };
    if poses.len() > 16 {
        return Err(ApiError::bad("at most 16 poses a request"));
    }
    let registry = &st.registry;
    let p = registry
        .preprocessor("openpose")
        .cloned()
        .ok_or_else(|| ApiError::not_implemented("no openpose renderer is registered"))?;
    let scratch =
        tempfile::tempdir().map_err(|e| ApiError::internal(format!("scratch folder: {e}")))?;
    let mut out = Vec::new();
    for (i, pose) in poses.iter().enumerate() {
        let path = scratch.path().join(format!("pose{i}.json"));
        std::fs::write(&path, pose.to_string())
            .map_err(|e| ApiError::internal(format!("scratch: {e}")))?;
        let w = pose["canvas_width"].as_u64().unwrap_or(512) as usize;
        let h = pose["canvas_height"].as_u64().unwrap_or(512) as usize;
        let params = sd_plugins_api::resolve_params(&p.params(), &[])
            .map_err(|e| ApiError::internal(format!("{e:?}")))?;
        let img = p
            .process_file(&path, (w, h), &params)
            .map_err(|e| ApiError::bad(format!("pose {i}: {e}")))?;
        let png = images::png_bytes(img.width as u32, img.height as u32, img.channels, img.data)?;
        out.push(Value::String(images::encode_b64(&png)));
    }
    Ok(Json(json!({ "images": out, "info": "Success" })))
}

/// Query of `/controlnet/module_list` and `/model_list` (`alias_names`, `update`): accepted.
pub type ListQuery = Query<std::collections::HashMap<String, String>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_by_name_number_or_old_name_and_pixel_perfect() {
        let read = |v: Value| {
            let m = json!({ "resize_mode": v.clone(), "control_mode": v });
            let m = m.as_object().unwrap().clone();
            let f = Fields::named(&m, "unit 0: ");
            (resize_mode(&f).ok(), control_mode(&f).ok())
        };
        assert_eq!(
            read(json!(0)),
            (Some(ResizeMode::Just), Some(ControlMode::Balanced))
        );
        assert_eq!(read(json!("Crop and Resize")).0, Some(ResizeMode::Crop));
        assert_eq!(
            read(json!("Envelope (Outer Fit)")).0,
            Some(ResizeMode::Fill)
        );
        assert_eq!(
            read(json!("ControlNet is more important")).1,
            Some(ControlMode::Control)
        );
        assert_eq!(read(json!(3)), (None, None));
        let m = json!({"resize_mode": "Stretch"});
        let m = m.as_object().unwrap();
        let e = resize_mode(&Fields::named(m, "unit 1: ")).unwrap_err();
        assert!(
            e.detail
                .starts_with("unit 1: resize_mode: \"Stretch\" is not one of"),
            "{}",
            e.detail
        );
        let none = Map::new();
        assert_eq!(resize_mode(&Fields::new(&none)).unwrap(), ResizeMode::Fill);
        let guess = json!({"guessmode": true});
        assert_eq!(
            control_mode(&Fields::new(guess.as_object().unwrap())).unwrap(),
            ControlMode::Control
        );
        // sd-webui-controlnet: a 64x32 image for 512x512, inner fit: the short side to 512
        assert_eq!(pixel_perfect((64, 32), (512, 512), ResizeMode::Crop), 512);
        assert_eq!(pixel_perfect((64, 32), (512, 512), ResizeMode::Fill), 256);
    }
}
