//! The server's state: its settings, the catalog of the folders, A1111's options, the queue.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Mutex, RwLock};

use serde_json::{json, Map, Value};

use crate::catalog::{Catalog, Entry, Folders};
use crate::error::{ApiError, ApiResult};
use crate::queue::Queue;

/// Limits on what one request may ask for (4xx beyond them, naming the field).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest width or height.
    pub max_size: usize,
    pub max_steps: usize,
    /// Largest `batch_size`; `n_iter` is limited to 100 as in A1111's UI.
    pub max_batch: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_size: 2048,
            max_steps: 150,
            max_batch: 8,
        }
    }
}

/// What `sdctl serve` was started with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub folders: Folders,
    /// HTTP Basic credentials; empty: no authentication.
    pub auth: Vec<(String, String)>,
    pub queue_size: usize,
    pub cors_origin: Option<String>,
    pub body_limit: usize,
    pub limits: Limits,
    /// How long start-up waits for hashes the cache lacks before serving (titles show the
    /// hash once it is read, in the background).
    pub hash_wait: std::time::Duration,
    /// Where jobs run (`cpu`, `cuda`, `cuda:N`) and in what precision (`f32`, `f16`, `bf16`), as
    /// `sdctl generate --device --dtype`.
    pub device: String,
    pub dtype: String,
    /// `generate --lowvram`: the text encoders and the VAE on the CPU.
    pub lowvram: bool,
    /// A TAESD / TAESDXL decoder for the live preview (`current_image`); `None`: A1111's
    /// "Approx cheap".
    pub taesd: Option<PathBuf>,
}

impl Config {
    pub fn new(listen: SocketAddr, models: PathBuf) -> Self {
        Self {
            listen,
            folders: Folders {
                models,
                ..Folders::default()
            },
            auth: Vec::new(),
            queue_size: 32,
            cors_origin: None,
            body_limit: 50 << 20,
            limits: Limits::default(),
            hash_wait: std::time::Duration::from_secs(5),
            device: "cpu".into(),
            lowvram: false,
            dtype: "f32".into(),
            taesd: None,
        }
    }
}

pub struct AppState {
    pub config: Config,
    pub catalog: RwLock<Catalog>,
    pub options: Mutex<Map<String, Value>>,
    pub queue: Queue,
    /// The preprocessors, for listing and checking requests (the engine thread has its own).
    pub registry: sd_plugins_api::Registry,
}

impl AppState {
    pub fn catalog(&self) -> std::sync::RwLockReadGuard<'_, Catalog> {
        self.catalog.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn options(&self) -> std::sync::MutexGuard<'_, Map<String, Value>> {
        self.options.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Read the folders again, every hash included, and bring the current model's title in
    /// the options up to date (it may have been known by name only).
    pub fn rescan(&self) {
        let fresh = Catalog::scan(&self.config.folders);
        let mut options = self.options();
        let current = options
            .get("sd_model_checkpoint")
            .and_then(Value::as_str)
            .and_then(|t| fresh.model(t))
            .cloned();
        if let Some(e) = current {
            options.insert("sd_model_checkpoint".into(), e.title.clone().into());
            options.insert("sd_checkpoint_hash".into(), json!(e.sha256));
        }
        *self.catalog.write().unwrap_or_else(|p| p.into_inner()) = fresh;
    }
}

/// A1111's options with the values sdctl uses; keys sdctl does not read are kept as given.
pub fn default_options(catalog: &Catalog) -> Map<String, Value> {
    let first = catalog.models.first();
    let v = json!({
        "sd_model_checkpoint": first.map(|e| e.title.clone()),
        "sd_checkpoint_hash": first.and_then(|e| e.sha256.clone()),
        "sd_vae": "Automatic",
        "CLIP_stop_at_last_layers": 1,
        "randn_source": "GPU",
        "eta_noise_seed_delta": 0,
        "samples_format": "png",
        "samples_save": false,
        "grid_save": false,
        "live_previews_enable": true,
        "live_previews_image_format": "png",
        "show_progress_every_n_steps": 1,
        "show_progress_type": "Approx cheap",
        "sd_lora": "None",
        "lora_preferred_name": "Alias from file",
        "control_net_unit_count": 3,
        "control_net_model_cache_size": 1,
        "sd_checkpoints_limit": 1,
        "token_merging_ratio": 0.0,
        "enable_pnginfo": true,
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!("an object literal"),
    }
}

/// The options a request runs with (sdctl reads these).
pub struct RunOptions {
    pub model: Entry,
    pub vae: Option<PathBuf>,
    pub clip_skip: usize,
    pub rng: sd::Rng,
}

/// Check the options sdctl reads, in `given` (a POST to options or a request's
/// `override_settings`), and return them with the model's title in its canonical form.
pub fn check_options(
    catalog: &Catalog,
    given: &Map<String, Value>,
    field: &str,
) -> ApiResult<Map<String, Value>> {
    let mut out = given.clone();
    let f = crate::fields::Fields::named(given, field);
    if let Some(name) = f.opt_string("sd_model_checkpoint")? {
        let e = catalog.model(&name).ok_or_else(|| {
            ApiError::bad(format!(
                "{field}sd_model_checkpoint: no model {name:?} in --models-dir (GET /sdapi/v1/sd-models lists them)"
            ))
        })?;
        out.insert("sd_model_checkpoint".into(), e.title.clone().into());
        out.insert("sd_checkpoint_hash".into(), json!(e.sha256));
    }
    if let Some(vae) = f.opt_string("sd_vae")? {
        if !matches!(vae.as_str(), "Automatic" | "None") && catalog.vae(&vae).is_none() {
            return Err(ApiError::bad(format!(
                "{field}sd_vae: no VAE {vae:?} in --vae-dir (GET /sdapi/v1/sd-vae lists them; \"Automatic\" is the model's own)"
            )));
        }
    }
    if given.contains_key("CLIP_stop_at_last_layers") {
        f.int_in("CLIP_stop_at_last_layers", 1, 1, 12)?;
    }
    if let Some(src) = f.opt_string("randn_source")? {
        if !matches!(src.as_str(), "GPU" | "CPU" | "NV") {
            return Err(ApiError::bad(format!(
                "{field}randn_source: {src:?} is not one of GPU, CPU, NV"
            )));
        }
    }
    Ok(out)
}

/// The settings sdctl reads from the options with a request's overrides (checked by
/// [`check_options`]) on top.
pub fn run_options(
    catalog: &Catalog,
    options: &Map<String, Value>,
    overrides: &Map<String, Value>,
) -> ApiResult<RunOptions> {
    let mut all = options.clone();
    all.extend(overrides.clone());
    let f = crate::fields::Fields::new(&all);
    let model = match f.opt_string("sd_model_checkpoint")? {
        Some(name) => catalog.model(&name).cloned().ok_or_else(|| {
            ApiError::bad(format!(
                "sd_model_checkpoint: no model {name:?} in --models-dir"
            ))
        })?,
        None => catalog.models.first().cloned().ok_or_else(|| {
            ApiError::bad("no model: --models-dir holds no diffusers folder or checkpoint file")
        })?,
    };
    let vae = match f.string("sd_vae", "Automatic")?.as_str() {
        "Automatic" | "None" => None,
        name => Some(
            catalog
                .vae(name)
                .ok_or_else(|| ApiError::bad(format!("sd_vae: no VAE {name:?} in --vae-dir")))?
                .path
                .clone(),
        ),
    };
    let clip_skip = f.int_in("CLIP_stop_at_last_layers", 1, 1, 12)? as usize;
    // semantics.md: A1111's randn_source, "GPU" (its default) = philox, "CPU" = torch's CPU
    let rng = match f.string("randn_source", "GPU")?.as_str() {
        "CPU" => sd::Rng::TorchCpu,
        _ => sd::Rng::Philox,
    };
    Ok(RunOptions {
        model,
        vae,
        clip_skip,
        rng,
    })
}
