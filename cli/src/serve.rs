//! `sdctl serve`: the A1111-compatible HTTP API and web UI (the sd-server crate). Settings
//! come from flags, `--config` files (TOML, YAML or JSON, the flag names as keys:
//! `models_dir = "..."`) and `SDCTL_SERVE_*` variables; flags win.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use figment::providers::{Env, Format, Json, Serialized, Toml, Yaml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::CliResult;

#[derive(Args, Debug, Default, Serialize, Deserialize)]
pub struct ServeArgs {
    /// A settings file (TOML, YAML or JSON; keys as the flags: models_dir, api_auth, ...).
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Vec<PathBuf>,
    /// Address to listen on (loopback unless told; port 0 picks a free one).
    #[arg(long, value_name = "ADDR:PORT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Models: every diffusers folder and .safetensors/.ckpt checkpoint here (recursively).
    #[arg(long, value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub models_dir: Option<PathBuf>,
    /// ControlNets: diffusers folders and single files.
    #[arg(long, value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub controlnet_dir: Option<PathBuf>,
    /// LoRAs for `<lora:NAME:WEIGHT>` prompt tags.
    #[arg(long, value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_dir: Option<PathBuf>,
    /// Textual-inversion embeddings, used by prompts that name them.
    #[arg(long, value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embeddings_dir: Option<PathBuf>,
    /// VAEs, chosen with the `sd_vae` option.
    #[arg(long, value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vae_dir: Option<PathBuf>,
    /// A TAESD / TAESDXL decoder (folder or taesd_decoder file) for the live preview
    /// (`/sdapi/v1/progress` current_image); without it, A1111's "Approx cheap".
    #[arg(long, value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub taesd: Option<PathBuf>,
    /// HTTP Basic authentication on every route: user:pass[,user2:pass2].
    #[arg(long, value_name = "USER:PASS,...")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_auth: Option<String>,
    /// Requests queued or running at most; more get 503 (default 32).
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_size: Option<usize>,
    /// Allow browser pages from this origin (CORS), e.g. http://localhost:3000, or *.
    #[arg(long, value_name = "ORIGIN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cors_origin: Option<String>,
    /// Largest width or height a request may ask for (default 2048).
    #[arg(long, value_name = "PIXELS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_size: Option<usize>,
    /// Most steps a request may ask for (default 150).
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<usize>,
    /// Largest batch_size (default 8).
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_batch: Option<usize>,
    /// Largest request body in MB (default 50).
    #[arg(long, value_name = "MB")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_limit_mb: Option<usize>,
    /// Where the jobs run: cpu, cuda or cuda:N (default cpu).
    #[arg(long, value_name = "cpu|cuda[:N]")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Precision: f32, f16 or bf16 (default f32).
    #[arg(long, value_name = "f32|f16|bf16")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    /// The text encoders and the VAE on the CPU in f32 (as `generate --lowvram`)
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub lowvram: bool,
}

/// The settings after layering: what the server runs with.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default = "default_listen")]
    listen: String,
    models_dir: Option<PathBuf>,
    controlnet_dir: Option<PathBuf>,
    lora_dir: Option<PathBuf>,
    embeddings_dir: Option<PathBuf>,
    vae_dir: Option<PathBuf>,
    taesd: Option<PathBuf>,
    api_auth: Option<String>,
    #[serde(default = "default_queue")]
    queue_size: usize,
    cors_origin: Option<String>,
    max_size: Option<usize>,
    max_steps: Option<usize>,
    max_batch: Option<usize>,
    #[serde(default = "default_body")]
    body_limit_mb: usize,
    device: Option<String>,
    dtype: Option<String>,
    #[serde(default)]
    lowvram: bool,
}

fn default_listen() -> String {
    "127.0.0.1:7860".into()
}
fn default_queue() -> usize {
    32
}
fn default_body() -> usize {
    50
}

fn settings(args: &ServeArgs) -> CliResult<Settings> {
    let mut fig = Figment::new();
    for f in &args.config {
        // a regular file, bounded in size and nesting, as every config file sdctl reads
        let text =
            sd_plugins_api::config_text::read_config(f).map_err(|e| format!("--config {e}"))?;
        fig = match f.extension().and_then(|e| e.to_str()) {
            Some("toml") => fig.merge(Toml::string(&text)),
            Some("yaml" | "yml") => fig.merge(Yaml::string(&text)),
            Some("json") => fig.merge(Json::string(&text)),
            _ => {
                return Err(
                    format!("--config {}: use a .toml, .yaml or .json file", f.display()).into(),
                )
            }
        };
    }
    fig = fig
        .merge(Env::prefixed("SDCTL_SERVE_"))
        .merge(Serialized::defaults(args));
    fig.extract::<Settings>()
        .map_err(|e| format!("serve settings: {e}").into())
}

fn existing_dir(flag: &str, p: &Option<PathBuf>) -> CliResult<Option<PathBuf>> {
    match p {
        Some(d) if !d.is_dir() => Err(format!("{flag} {}: not a folder", d.display()).into()),
        other => Ok(other.clone()),
    }
}

pub fn run(args: ServeArgs) -> CliResult {
    let s = settings(&args)?;
    let listen: SocketAddr = s.listen.parse().map_err(|e| {
        format!(
            "--listen {:?}: {e} (give ADDRESS:PORT, e.g. 127.0.0.1:7860)",
            s.listen
        )
    })?;
    let models = existing_dir("--models-dir", &s.models_dir)?
        .ok_or("--models-dir is required: the folder of models to serve")?;
    let mut config = sd_server::Config::new(listen, models);
    config.folders.controlnets = existing_dir("--controlnet-dir", &s.controlnet_dir)?;
    config.folders.loras = existing_dir("--lora-dir", &s.lora_dir)?;
    config.folders.embeddings = existing_dir("--embeddings-dir", &s.embeddings_dir)?;
    config.folders.vaes = existing_dir("--vae-dir", &s.vae_dir)?;
    if let Some(a) = &s.api_auth {
        config.auth = sd_server::auth_pairs(a)?;
    }
    if s.queue_size == 0 {
        return Err("--queue-size must be at least 1".into());
    }
    config.queue_size = s.queue_size;
    if let Some(t) = &s.taesd {
        sd_pipeline::model::taesd::AutoencoderTiny::load(
            t,
            &candle_core::Device::Cpu,
            candle_core::DType::F32,
        )
        .map_err(|e| format!("--taesd: {e}"))?;
        config.taesd = Some(t.clone());
    }
    config.cors_origin = s.cors_origin;
    if s.body_limit_mb == 0 || s.body_limit_mb > 4096 {
        return Err(format!("--body-limit-mb {}: use 1..=4096", s.body_limit_mb).into());
    }
    config.body_limit = s.body_limit_mb << 20;
    let l = &mut config.limits;
    for (flag, given, slot, range) in [
        ("--max-size", s.max_size, &mut l.max_size, 64..=16384),
        ("--max-steps", s.max_steps, &mut l.max_steps, 1..=10_000),
        ("--max-batch", s.max_batch, &mut l.max_batch, 1..=256),
    ] {
        if let Some(v) = given {
            if !range.contains(&v) {
                return Err(format!("{flag} {v}: use {}..={}", range.start(), range.end()).into());
            }
            *slot = v;
        }
    }
    // checked now, as generate checks them, not at the first request
    if let Some(d) = s.device {
        config.device = d;
    }
    if let Some(d) = s.dtype {
        config.dtype = d;
    }
    config.lowvram = s.lowvram;
    let probe = sd::Job {
        device: config.device.clone(),
        dtype: config.dtype.clone(),
        ..sd::Job::default()
    };
    sd::generate::device_and_dtype(&probe)?;
    if !listen.ip().is_loopback() {
        eprintln!(
            "sdctl serve: listening on {} (not loopback): {}",
            listen.ip(),
            if config.auth.is_empty() {
                "anyone who can reach this address can use the server; consider --api-auth"
            } else {
                "HTTP Basic authentication is on"
            }
        );
    }
    // a client hanging up is an error on its connection, not the end of the process
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: no other thread changes signal dispositions
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    sd_server::run(config, |addr| {
        eprintln!("sdctl serve: listening on http://{addr}");
    })?;
    eprintln!("sdctl serve: stopped");
    Ok(())
}
