//! `POST /sdapi/v1/txt2img` and `/img2img`: A1111's request (`modules/api/models.py`, its
//! defaults) as `sd::Job`s, run on the engine thread through the front door, answered as A1111
//! answers (`images`, `parameters`, `info`).

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::Json;
use serde_json::{json, Map, Value};

use crate::controlnet::{self, Unit};
use crate::error::{ApiError, ApiResult};
use crate::fields::{self, Fields};
use crate::images;
use crate::queue::Engine;
use crate::state::{check_options, run_options, AppState};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Txt2Img,
    Img2Img,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Txt2Img => "txt2img",
            Mode::Img2Img => "img2img",
        }
    }
}

/// A body over the limit, or unreadable, as a JSON error.
pub fn body_error(e: BytesRejection) -> ApiError {
    let detail = if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        "the request body is larger than the server takes (sdctl serve --body-limit-mb)".into()
    } else {
        e.body_text()
    };
    ApiError::new(e.status(), "RequestBodyError", detail)
}

pub async fn txt2img(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    generate(st, body.map_err(body_error)?, Mode::Txt2Img).await
}

pub async fn img2img(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    generate(st, body.map_err(body_error)?, Mode::Img2Img).await
}

/// What one request runs: a job per `n_iter`, and the units whose maps go back.
struct Plan {
    mode: Mode,
    jobs: Vec<sd::Job>,
    units: Vec<Unit>,
    size: (usize, usize),
    batch: usize,
    /// Holds the request's images while the jobs run.
    scratch: tempfile::TempDir,
}

/// A feature A1111 has and sdctl does not yet: 501, naming the field.
fn not_yet(field: &str, what: &str) -> ApiError {
    ApiError::not_implemented(format!("{field}: {what} is not implemented by sdctl yet"))
}

/// A1111's hires fix fields of a txt2img request (`enable_hr`, `hr_scale`, `hr_upscaler`,
/// `hr_second_pass_steps`, `denoising_strength`, `hr_resize_x/y`, `hr_prompt`, ...).
fn hires(f: &Fields, mode: Mode) -> ApiResult<Option<sd::hires::Hires>> {
    if !f.bool("enable_hr", false)? || mode != Mode::Txt2Img {
        return Ok(None);
    }
    let mut h = sd::hires::Hires {
        scale: f.float_in("hr_scale", 2.0, 1.0, 8.0)?,
        steps: f.int_in("hr_second_pass_steps", 0, 0, 1000)? as usize,
        denoise: f.float_in("denoising_strength", 0.7, 0.0, 1.0)?,
        ..Default::default()
    };
    if h.denoise == 0.0 {
        return Err(ApiError::bad(
            "denoising_strength: must be above 0 for the hires pass",
        ));
    }
    let (rx, ry) = (
        f.int_in("hr_resize_x", 0, 0, 16384)? as usize,
        f.int_in("hr_resize_y", 0, 0, 16384)? as usize,
    );
    if rx > 0 || ry > 0 {
        h.resize = Some((rx, ry));
    }
    if let Some(u) = f.opt_string("hr_upscaler")?.filter(|s| !s.is_empty()) {
        h.upscaler = u
            .parse()
            .map_err(|e| ApiError::bad(format!("hr_upscaler: {e}")))?;
        // the server has no upscaler folder: a model is refused before the job runs
        if let sd::hires::HiresUpscaler::Model(name) = &h.upscaler {
            return Err(ApiError::bad(format!(
                "hr_upscaler: {name:?} is no hires upscaler sdctl serve has (use Latent ..., Lanczos or Nearest)"
            )));
        }
    }
    let text =
        |k: &str| -> ApiResult<Option<String>> { Ok(f.opt_string(k)?.filter(|s| !s.is_empty())) };
    if text("hr_checkpoint_name")?.is_some_and(|c| c != "Use same checkpoint") {
        return Err(not_yet(
            "hr_checkpoint_name",
            "another checkpoint for the hires pass",
        ));
    }
    h.prompt = text("hr_prompt")?;
    h.negative_prompt = text("hr_negative_prompt")?;
    if let Some(s) = text("hr_sampler_name")?.filter(|s| s != "Use same sampler") {
        let sched = text("hr_scheduler")?.unwrap_or_else(|| "automatic".into());
        let (k, sc) = super::samplers::resolve(&s, &sched)?;
        (h.sampler, h.schedule) = (Some(k), Some(sc));
    }
    Ok(Some(h))
}

fn plan(st: &AppState, req: &Map<String, Value>, mode: Mode) -> ApiResult<(Plan, RunInfo)> {
    let f = Fields::new(req);
    let lim = st.config.limits;
    // features sdctl does not have are refused, never silently dropped
    if f.float("subseed_strength", 0.0)? != 0.0 {
        return Err(not_yet("subseed_strength", "variation seeds"));
    }
    if f.bool("tiling", false)? {
        return Err(not_yet("tiling", "tiling"));
    }
    if f.bool("restore_faces", false)? {
        return Err(not_yet("restore_faces", "face restoration"));
    }
    if let Some(name) = f.opt_string("script_name")?.filter(|s| !s.is_empty()) {
        return Err(ApiError::invalid(format!("Script '{name}' not found")));
    }
    let mut unit_args: &[Value] = &[];
    if let Some(scripts) = f.object("alwayson_scripts")? {
        for (name, v) in scripts {
            if name.eq_ignore_ascii_case("controlnet") {
                let sf = Fields::named(
                    v.as_object().ok_or_else(|| {
                        ApiError::invalid(format!(
                            "alwayson_scripts.{name}: expected {{\"args\": [...]}}"
                        ))
                    })?,
                    format!("alwayson_scripts.{name}."),
                );
                unit_args = sf.list("args")?;
            } else {
                return Err(ApiError::invalid(format!(
                    "always on script {name} not found (sdctl has controlnet)"
                )));
            }
        }
    }
    let width = f.int_in("width", 512, 64, lim.max_size as i64)? as usize;
    let height = f.int_in("height", 512, 64, lim.max_size as i64)? as usize;
    let steps = f.int_in("steps", 50, 1, lim.max_steps as i64)? as usize;
    let batch = f.int_in("batch_size", 1, 1, lim.max_batch as i64)? as usize;
    let n_iter = f.int_in("n_iter", 1, 1, 100)? as usize;
    let cfg_scale = f.float_in("cfg_scale", 7.0, 0.0, 100.0)?;
    let seed = f.int("seed", -1)?;
    let seed = match seed {
        -1 => sd::generate::draw_seed(),
        s if s >= 0 => s as u64,
        s => {
            return Err(ApiError::bad(format!(
                "seed: must be -1 (random) or a seed >= 0, got {s}"
            )))
        }
    };
    let sampler_name = match f.opt_string("sampler_name")?.filter(|s| !s.is_empty()) {
        Some(s) => s,
        None => f.string("sampler_index", "Euler")?,
    };
    let scheduler = f.string("scheduler", "automatic")?;
    let (sampler, schedule) = super::samplers::resolve(&sampler_name, &scheduler)?;
    let given = f.object("override_settings")?.cloned().unwrap_or_default();
    let restore = f.bool("override_settings_restore_afterwards", true)?;
    let opts = {
        let catalog = st.catalog();
        let overrides = check_options(&catalog, &given, "override_settings.")?;
        let opts = run_options(&catalog, &st.options(), &overrides)?;
        if !restore {
            st.options().extend(overrides);
        }
        opts
    };

    let scratch = tempfile::Builder::new()
        .prefix("sdctl-serve-")
        .tempdir()
        .map_err(|e| ApiError::internal(format!("scratch folder: {e}")))?;
    let mut init_image: Option<PathBuf> = None;
    let mut mask: Option<PathBuf> = None;
    let mut strength = None;
    let mut inpaint = sd::inpaint::Inpaint::default();
    if mode == Mode::Img2Img {
        let inits = f.list("init_images")?;
        let first = match inits {
            [] => return Err(ApiError::bad("init_images: img2img needs an image")),
            [one] => one,
            _ => return Err(not_yet("init_images", "more than one init image")),
        };
        let text = first.as_str().ok_or_else(|| {
            ApiError::invalid(format!(
                "init_images[0]: expected a base64 image, got {}",
                fields::kind(first)
            ))
        })?;
        let path = images::save(scratch.path(), "init.png", "init_images[0]", text)?;
        let (iw, ih) = image::image_dimensions(&path)
            .map_err(|e| ApiError::bad(format!("init_images[0]: {e}")))?;
        let resize = f.int_in("resize_mode", 0, 0, 3)?;
        if resize != 0 && (iw as usize, ih as usize) != (width, height) {
            return Err(not_yet(
                "resize_mode",
                &format!("resize mode {resize} for an image of another size ({iw}x{ih}, not {width}x{height}); send it at the size or use 0 (Just resize)"),
            ));
        }
        init_image = Some(path);
        let d = f.float_in("denoising_strength", 0.75, 0.0, 1.0)?;
        if d == 0.0 {
            return Err(ApiError::bad(
                "denoising_strength: must be above 0 (0 would change nothing)",
            ));
        }
        strength = Some(d);
        if let Some(m) = f.opt_string("mask")?.filter(|s| !s.is_empty()) {
            let path = images::save(scratch.path(), "mask.png", "mask", &m)?;
            // A1111's steps around inpainting, with its API's defaults (processing.py)
            inpaint = sd::inpaint::Inpaint {
                mask_blur: f.int_in("mask_blur", 4, 0, 64)? as u32,
                invert_mask: f.int_in("inpainting_mask_invert", 0, 0, 1)? == 1,
                only_masked_padding: match f.bool("inpaint_full_res", true)? {
                    true => Some(f.int_in("inpaint_full_res_padding", 0, 0, 4096)? as u32),
                    false => None,
                },
                overlay: true,
                fill: sd::inpaint::Fill::from_a1111(f.int_in("inpainting_fill", 0, 0, 3)?)
                    .expect("0..=3"),
            };
            mask = Some(path);
        }
    }

    let units = controlnet::units(
        unit_args,
        &st.catalog(),
        &st.registry,
        scratch.path(),
        (width, height),
        init_image.as_deref(),
    )?;

    let prompt = f.string("prompt", "")?;
    let negative_prompt = f.string("negative_prompt", "")?;
    let hires = hires(&f, mode)?;
    let mut jobs = Vec::new();
    for k in 0..n_iter {
        let mut job = sd::Job::new(prompt.clone());
        job.model = Some(opts.model.path.clone());
        job.vae = opts.vae.clone();
        job.negative_prompt = Some(negative_prompt.clone());
        job.width = Some(width);
        job.height = Some(height);
        job.steps = steps;
        job.cfg_scale = cfg_scale;
        job.sampler = sampler;
        job.schedule = schedule;
        // A1111: iteration k starts at seed + k * batch_size
        job.seed = Some(seed + (k * batch) as u64);
        job.rng = opts.rng;
        job.batch = batch;
        job.clip_skip = opts.clip_skip;
        job.init_image = init_image.clone();
        job.strength = strength;
        job.mask = mask.clone();
        job.inpaint = inpaint;
        job.lora_dir = st.config.folders.loras.clone();
        job.embeddings_dir = st.config.folders.embeddings.clone();
        job.device = st.config.device.clone();
        job.lowvram = st.config.lowvram;
        job.dtype = st.config.dtype.clone();
        job.control = units
            .iter()
            .map(|u| sd::Control {
                id: None,
                spec: u.spec.clone(),
                hr: u.hr,
            })
            .collect();
        job.hires = hires.clone();
        jobs.push(job);
    }
    let info = RunInfo {
        prompt,
        negative_prompt,
        seed,
        width,
        height,
        sampler_name,
        cfg_scale,
        steps,
        model_name: opts.model.stem.clone(),
        model_hash: opts.model.short_hash(10).map(str::to_string),
        denoising_strength: strength,
        clip_skip: opts.clip_skip,
        inpainting: mask.is_some(),
    };
    Ok((
        Plan {
            mode,
            jobs,
            units,
            size: (width, height),
            batch,
            scratch,
        },
        info,
    ))
}

/// What `info` reports besides what the engine returns.
struct RunInfo {
    prompt: String,
    negative_prompt: String,
    seed: u64,
    width: usize,
    height: usize,
    sampler_name: String,
    cfg_scale: f64,
    steps: usize,
    model_name: String,
    model_hash: Option<String>,
    denoising_strength: Option<f64>,
    clip_skip: usize,
    inpainting: bool,
}

/// What the engine made for a request.
struct Made {
    images: Vec<String>,
    infotexts: Vec<String>,
    seeds: Vec<u64>,
    maps: Vec<String>,
    timings: Vec<sd::Timings>,
    job_timestamp: String,
}

/// On the engine thread: the jobs in turn (an interrupt ends the request with what is done,
/// a skip the current job), then the detected maps.
fn execute(engine: &mut Engine, plan: Plan) -> ApiResult<Made> {
    let shared = engine.shared.clone();
    shared.begin(plan.mode.name(), plan.jobs.len());
    let job_timestamp = shared.state().job_timestamp.clone();
    let r = (|| {
        let mut made = Made {
            images: Vec::new(),
            infotexts: Vec::new(),
            seeds: Vec::new(),
            maps: Vec::new(),
            timings: Vec::new(),
            job_timestamp,
        };
        for (k, job) in plan.jobs.iter().enumerate() {
            if shared.interrupted.load(std::sync::atomic::Ordering::SeqCst) && k > 0 {
                break;
            }
            shared.next(k);
            let g = engine.generate(job).map_err(|e| ApiError::engine(&e))?;
            let out = plan.scratch.path().join(format!("out-{k}.png"));
            let paths = g.write(&out, None).map_err(|e| ApiError::engine(&e))?;
            for p in paths {
                let bytes = std::fs::read(&p)
                    .map_err(|e| ApiError::internal(format!("reading the image back: {e}")))?;
                made.images.push(images::encode_b64(&bytes));
                made.infotexts.push(g.parameters.clone());
                made.seeds.push(g.seed.unwrap_or_default());
            }
            made.timings.push(g.timings);
        }
        for u in plan.units.iter().filter(|u| u.save_detected_map) {
            if let Some(png) = controlnet::detected_map(&engine.registry, &u.spec, plan.size)? {
                made.maps.push(images::encode_b64(&png));
            }
        }
        Ok(made)
    })();
    shared.end();
    r
}

async fn generate(st: Arc<AppState>, body: Bytes, mode: Mode) -> ApiResult<Json<Value>> {
    let req = fields::object(&body)?;
    let (plan, info) = plan(&st, &req, mode)?;
    let batch = plan.batch;
    let made = st.queue.run(move |engine| execute(engine, plan)).await?;

    let n = made.images.len();
    let seeds = made.seeds.clone();
    let mut images = made.images;
    images.extend(made.maps);
    let timings: Vec<Value> = made
        .timings
        .iter()
        .map(|t| {
            json!({"load_s": t.load.as_secs_f64(), "controls_s": t.controls.as_secs_f64(),
                   "sampling_s": t.sampling.as_secs_f64(), "decode_s": t.decode.as_secs_f64()})
        })
        .collect();
    let info_json = json!({
        "prompt": info.prompt,
        "all_prompts": vec![info.prompt.clone(); n],
        "negative_prompt": info.negative_prompt,
        "all_negative_prompts": vec![info.negative_prompt.clone(); n],
        "seed": info.seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": vec![-1; n],
        "subseed_strength": 0,
        "width": info.width,
        "height": info.height,
        "sampler_name": info.sampler_name,
        "cfg_scale": info.cfg_scale,
        "steps": info.steps,
        "batch_size": batch,
        "restore_faces": false,
        "face_restoration_model": null,
        "sd_model_name": info.model_name,
        "sd_model_hash": info.model_hash,
        "sd_vae_name": null,
        "sd_vae_hash": null,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": info.denoising_strength,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": made.infotexts,
        "styles": [],
        "job_timestamp": made.job_timestamp,
        "clip_skip": info.clip_skip,
        "is_using_inpainting_conditioning": info.inpainting,
        "version": format!("sdctl {}", env!("CARGO_PKG_VERSION")),
        "sdctl_timings": timings,
    });
    // A1111 echoes the request without its images
    let mut parameters = req;
    for key in ["init_images", "mask"] {
        if parameters.contains_key(key) {
            parameters.insert(key.into(), Value::Null);
        }
    }
    Ok(Json(json!({
        "images": images,
        "parameters": parameters,
        "info": info_json.to_string(),
    })))
}
