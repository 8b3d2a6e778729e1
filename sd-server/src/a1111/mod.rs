//! A1111's `/sdapi/v1/...` routes (`modules/api/api.py`): generation in [`generate`], sampler
//! names in [`samplers`], the lists, options, progress, png-info and the rest here.

pub mod generate;
pub mod samplers;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult};
use crate::fields::{self, Fields};
use crate::state::{check_options, AppState};

type St = State<Arc<AppState>>;

pub fn routes() -> Router<Arc<AppState>> {
    let mut r = Router::new()
        .route("/sdapi/v1/txt2img", post(generate::txt2img))
        .route("/sdapi/v1/img2img", post(generate::img2img))
        .route("/sdapi/v1/options", get(get_options).post(set_options))
        .route("/sdapi/v1/sd-models", get(sd_models))
        .route("/sdapi/v1/sd-vae", get(sd_vae))
        .route(
            "/sdapi/v1/samplers",
            get(|| async { Json(samplers::list()) }),
        )
        .route(
            "/sdapi/v1/schedulers",
            get(|| async { Json(samplers::schedulers()) }),
        )
        .route("/sdapi/v1/upscalers", get(upscalers))
        .route(
            "/sdapi/v1/latent-upscale-modes",
            get(|| async { Json(json!([])) }),
        )
        .route("/sdapi/v1/loras", get(loras))
        .route("/sdapi/v1/refresh-loras", post(refresh))
        .route("/sdapi/v1/refresh-checkpoints", post(refresh))
        .route("/sdapi/v1/refresh-vae", post(refresh))
        .route("/sdapi/v1/refresh-embeddings", post(refresh))
        .route("/sdapi/v1/embeddings", get(embeddings))
        .route("/sdapi/v1/scripts", get(scripts))
        .route("/sdapi/v1/script-info", get(script_info))
        .route("/sdapi/v1/progress", get(progress))
        .route("/sdapi/v1/interrupt", post(interrupt))
        .route("/sdapi/v1/skip", post(skip))
        .route("/sdapi/v1/png-info", post(png_info))
        .route("/sdapi/v1/memory", get(memory))
        .route("/sdapi/v1/cmd-flags", get(cmd_flags))
        .route("/sdapi/v1/unload-checkpoint", post(unload))
        .route(
            "/sdapi/v1/reload-checkpoint",
            post(|| async { Json(json!({})) }),
        );
    // lists of things sdctl has none of: empty, as A1111 answers with nothing installed
    for path in [
        "/sdapi/v1/hypernetworks",
        "/sdapi/v1/face-restorers",
        "/sdapi/v1/realesrgan-models",
        "/sdapi/v1/prompt-styles",
        "/sdapi/v1/sd-modules",
        "/sdapi/v1/extensions",
    ] {
        r = r.route(path, get(|| async { Json(json!([])) }));
    }
    // A1111 routes sdctl does not have yet: 501 with the route named
    for path in [
        "/sdapi/v1/extra-single-image",
        "/sdapi/v1/extra-batch-images",
        "/sdapi/v1/interrogate",
        "/sdapi/v1/create/embedding",
        "/sdapi/v1/create/hypernetwork",
        "/sdapi/v1/train/embedding",
        "/sdapi/v1/train/hypernetwork",
        "/sdapi/v1/server-kill",
        "/sdapi/v1/server-restart",
        "/sdapi/v1/server-stop",
    ] {
        r = r.route(
            path,
            get(move || not_implemented(path)).post(move || not_implemented(path)),
        );
    }
    r
}

async fn not_implemented(path: &'static str) -> ApiError {
    ApiError::not_implemented(format!("{path} is not implemented by sdctl serve yet"))
}

async fn get_options(State(st): St) -> Json<Value> {
    Json(Value::Object(st.options().clone()))
}

/// Every key is kept (a client may POST the whole GET dict back); the ones sdctl reads are
/// checked first, and a model switch takes effect for the next request.
async fn set_options(State(st): St, body: Result<Bytes, BytesRejection>) -> ApiResult<Json<Value>> {
    let body = body.map_err(generate::body_error)?;
    let given = fields::object(&body)?;
    let checked = check_options(&st.catalog(), &given, "")?;
    st.options().extend(checked);
    Ok(Json(Value::Null))
}

async fn sd_models(State(st): St) -> Json<Value> {
    let list: Vec<Value> = st
        .catalog()
        .models
        .iter()
        .map(|e| {
            json!({"title": e.title, "model_name": e.stem, "hash": e.short_hash(10),
                   "sha256": e.sha256, "filename": e.path, "config": null})
        })
        .collect();
    Json(Value::Array(list))
}

async fn sd_vae(State(st): St) -> Json<Value> {
    let list: Vec<Value> = st
        .catalog()
        .vaes
        .iter()
        .map(|e| json!({"model_name": e.name, "filename": e.path}))
        .collect();
    Json(Value::Array(list))
}

async fn upscalers() -> Json<Value> {
    Json(
        json!([{"name": "None", "model_name": null, "model_path": null, "model_url": null, "scale": 4}]),
    )
}

async fn loras(State(st): St) -> Json<Value> {
    let list: Vec<Value> = st
        .catalog()
        .loras
        .iter()
        .map(|e| json!({"name": e.stem, "alias": e.stem, "path": e.path, "metadata": {}}))
        .collect();
    Json(Value::Array(list))
}

async fn refresh(State(st): St) -> Json<Value> {
    tokio::task::spawn_blocking(move || st.rescan()).await.ok();
    Json(Value::Null)
}

/// The embeddings of `--embeddings-dir` (A1111's shape: `shape` is the vector width, the
/// widest for SDXL ones); files that are no embedding under `skipped`. Which of them fit a
/// model is decided per generation (the others are skipped then, as A1111 does).
async fn embeddings(State(st): St) -> Json<Value> {
    let Some(dir) = st.config.folders.embeddings.clone() else {
        return Json(json!({"loaded": {}, "skipped": {}}));
    };
    let scan = tokio::task::spawn_blocking(move || sd_pipeline::text::embeddings::scan_dir(&dir))
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or_default();
    let entry = |shape: Value, vectors: Value| {
        json!({"step": null, "sd_checkpoint": null, "sd_checkpoint_name": null,
               "shape": shape, "vectors": vectors})
    };
    let loaded: serde_json::Map<String, Value> = scan
        .loaded
        .iter()
        .map(|t| {
            let shape = t.widths().last().copied().unwrap_or(0);
            (t.name.clone(), entry(shape.into(), t.vectors.into()))
        })
        .collect();
    let skipped: serde_json::Map<String, Value> = scan
        .skipped
        .iter()
        .map(|(p, _)| {
            let stem = p
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            (stem, entry(Value::Null, Value::Null))
        })
        .collect();
    Json(json!({"loaded": loaded, "skipped": skipped}))
}

async fn scripts() -> Json<Value> {
    Json(json!({"txt2img": ["controlnet"], "img2img": ["controlnet"]}))
}

async fn script_info() -> Json<Value> {
    let unit = |img2img: bool| {
        json!({"name": "controlnet", "is_alwayson": true, "is_img2img": img2img,
               "args": [{"label": "ControlNet Unit 0", "value": null, "minimum": null,
                         "maximum": null, "step": null, "choices": null}]})
    };
    Json(json!([unit(false), unit(true)]))
}

async fn progress(State(st): St, Query(q): Query<HashMap<String, String>>) -> Json<Value> {
    let skip = q
        .get("skip_current_image")
        .is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    let shared = st.queue.shared.clone();
    // the preview decodes latents: off the async threads
    let v = tokio::task::spawn_blocking(move || shared.progress_json(skip))
        .await
        .unwrap_or(Value::Null);
    Json(v)
}

async fn interrupt(State(st): St) -> Json<Value> {
    if st.queue.pending() > 0 {
        st.queue.shared.interrupted.store(true, Ordering::SeqCst);
    }
    Json(Value::Null)
}

async fn skip(State(st): St) -> Json<Value> {
    if st.queue.pending() > 0 {
        st.queue.shared.skipped.store(true, Ordering::SeqCst);
    }
    Json(Value::Null)
}

async fn unload(State(st): St) -> ApiResult<Json<Value>> {
    st.queue
        .run(|engine| {
            engine.unload();
            Ok(())
        })
        .await?;
    Ok(Json(Value::Null))
}

/// `POST /sdapi/v1/png-info`: the infotext of a PNG (A1111's `parameters` chunk, or what
/// sdctl reads from ComfyUI's), and its fields.
async fn png_info(body: Result<Bytes, BytesRejection>) -> ApiResult<Json<Value>> {
    let body = body.map_err(generate::body_error)?;
    let map = fields::object(&body)?;
    let f = Fields::new(&map);
    let text = f.string("image", "")?;
    if text.is_empty() {
        return Ok(Json(json!({"info": "", "items": {}, "parameters": {}})));
    }
    let dir = tempfile::tempdir().map_err(|e| ApiError::internal(format!("scratch: {e}")))?;
    let path = crate::images::save(dir.path(), "image.png", "image", &text)?;
    let chunks = sd::png_text::text_chunks(&path).unwrap_or_default();
    let info = chunks
        .iter()
        .find(|(k, _)| k == "parameters")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let parameters = if info.is_empty() {
        json!({})
    } else {
        Value::Object(infotext_fields(&info))
    };
    let items: serde_json::Map<String, Value> = chunks
        .into_iter()
        .filter(|(k, _)| k != "parameters")
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    Ok(Json(
        json!({"info": info, "items": items, "parameters": parameters}),
    ))
}

async fn memory() -> Json<Value> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kb = |key: &str| {
        meminfo
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|v| v * 1024)
    };
    let (total, free) = (kb("MemTotal:"), kb("MemAvailable:"));
    let ram = match (total, free) {
        (Some(t), Some(f)) => json!({"free": f, "used": t.saturating_sub(f), "total": t}),
        _ => json!({"error": "unknown"}),
    };
    Json(
        json!({"ram": ram, "cuda": {"error": "sdctl serve reports CUDA memory only on CUDA builds"}}),
    )
}

async fn cmd_flags(State(st): St) -> Json<Value> {
    let c = &st.config;
    let f = &c.folders;
    Json(json!({
        "listen": !c.listen.ip().is_loopback(),
        "port": c.listen.port(),
        "api": true,
        "nowebui": false,
        "api_auth": if c.auth.is_empty() { Value::Null } else { json!("(set)") },
        "ckpt_dir": f.models,
        "controlnet_dir": f.controlnets,
        "lora_dir": f.loras,
        "embeddings_dir": f.embeddings,
        "vae_dir": f.vaes,
        "queue_size": c.queue_size,
        "cors_allow_origins": c.cors_origin,
    }))
}

/// A1111's `parse_generation_parameters`: `Prompt`, `Negative prompt` and the `Key: value`
/// fields of the last line (quoted values unquoted), `Size-1` / `Size-2` from `Size`.
fn infotext_fields(text: &str) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    let lines: Vec<&str> = text.lines().collect();
    let Some(last) = lines.iter().rposition(|l| l.starts_with("Steps: ")) else {
        out.insert("Prompt".into(), text.into());
        return out;
    };
    let (mut prompt, mut negative, mut in_negative) = (Vec::new(), Vec::new(), false);
    for l in &lines[..last] {
        if let Some(n) = l.strip_prefix("Negative prompt: ") {
            in_negative = true;
            negative.push(n);
        } else if in_negative {
            negative.push(l);
        } else {
            prompt.push(*l);
        }
    }
    out.insert("Prompt".into(), prompt.join("\n").into());
    out.insert("Negative prompt".into(), negative.join("\n").into());
    // modules/infotext_utils.py re_param
    let re = regex::Regex::new(r#"\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)"#)
        .expect("a valid regex");
    for c in re.captures_iter(lines[last]) {
        let key = c[1].to_string();
        let raw = c[2].trim();
        let v = if raw.starts_with('"') {
            serde_json::from_str::<String>(raw).unwrap_or_else(|_| raw.to_string())
        } else {
            raw.to_string()
        };
        if key == "Size" {
            if let Some((w, h)) = v.split_once('x') {
                out.insert("Size-1".into(), w.into());
                out.insert("Size-2".into(), h.into());
            }
        }
        out.insert(key, v.into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infotext_fields_as_a1111_parses_them() {
        let t = "a cat\nin a hat\nNegative prompt: ugly\nSteps: 20, Sampler: Euler a, Seed: 42, Size: 64x32, ControlNet 0: \"Module: none, Model: cn [12345678]\", Version: sdctl";
        let f = infotext_fields(t);
        assert_eq!(f["Prompt"], "a cat\nin a hat");
        assert_eq!(f["Negative prompt"], "ugly");
        assert_eq!(f["Steps"], "20");
        assert_eq!(f["Sampler"], "Euler a");
        assert_eq!(f["Size-1"], "64");
        assert_eq!(f["Size-2"], "32");
        assert_eq!(f["ControlNet 0"], "Module: none, Model: cn [12345678]");
        assert_eq!(f["Version"], "sdctl");
    }
}
