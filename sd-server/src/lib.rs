//! `sdctl serve`: an AUTOMATIC1111-compatible HTTP API with sd-webui-controlnet's routes, and a
//! web UI, on axum. Requests are queued and run one at a time on an engine thread through the
//! `sd` front door (the same path as `sdctl generate`), so the API gives the image the CLI
//! gives for the same settings.
//!
//! Modules: [`catalog`] (what the folders hold), [`state`] (settings, options), [`queue`]
//! (the engine thread), [`progress`], `a1111` (the `/sdapi/v1` routes), [`controlnet`],
//! `auth`, `webui`.

mod a1111;
mod auth;
pub mod catalog;
pub mod controlnet;
mod error;
mod fields;
mod images;
pub mod progress;
pub mod queue;
pub mod state;
mod webui;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};

use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, Method};
use axum::Router;
use tower_http::cors::{AllowOrigin, CorsLayer};

pub use auth::parse as auth_pairs;
pub use error::ApiError;
pub use state::{AppState, Config, Limits};

use catalog::Catalog;
use queue::Queue;

/// The app: routes, authentication, body limit, CORS.
pub fn app(config: Config) -> (Router, Arc<AppState>) {
    // the folders at once, hashes from the cache; new files are hashed in the background (a
    // few seconds are waited for, so small folders start complete)
    let catalog = Catalog::scan_cached(&config.folders);
    let complete = catalog.complete();
    let options = state::default_options(&catalog);
    let registry = sd::registry();
    // a TAESD that does not load falls back to the cheap preview (`sdctl serve` checks it)
    let preview = config
        .taesd
        .as_deref()
        .and_then(|p| {
            sd_pipeline::model::taesd::AutoencoderTiny::load(
                p,
                &candle_core::Device::Cpu,
                candle_core::DType::F32,
            )
            .ok()
        })
        .map(|t| sd_pipeline::generation::preview::PreviewDecoder::Taesd(Arc::new(t)))
        .unwrap_or_default();
    let state = Arc::new(AppState {
        queue: Queue::start(sd::registry(), config.queue_size.max(1), preview),
        registry,
        catalog: RwLock::new(catalog),
        options: Mutex::new(options),
        config,
    });
    if !complete {
        let (st, (done, wait)) = (state.clone(), std::sync::mpsc::channel());
        let spawned = std::thread::Builder::new()
            .name("hashes".into())
            .spawn(move || {
                st.rescan();
                let _ = done.send(());
            });
        if spawned.is_ok() {
            let _ = wait.recv_timeout(state.config.hash_wait);
        }
    }
    let mut router = a1111::routes()
        .merge(controlnet_routes())
        .merge(webui::routes())
        .fallback(|uri: axum::http::Uri| async move {
            ApiError::not_found(format!(
                "Not Found: {} is not a route of sdctl serve",
                uri.path()
            ))
        })
        .layer(DefaultBodyLimit::max(state.config.body_limit));
    if !state.config.auth.is_empty() {
        router = router.layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require,
        ));
    }
    if let Some(origin) = &state.config.cors_origin {
        let allow = if origin == "*" {
            AllowOrigin::any()
        } else {
            AllowOrigin::exact(
                HeaderValue::from_str(origin).unwrap_or(HeaderValue::from_static("null")),
            )
        };
        router = router.layer(
            CorsLayer::new()
                .allow_origin(allow)
                .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
                .allow_headers([
                    axum::http::header::CONTENT_TYPE,
                    axum::http::header::AUTHORIZATION,
                ]),
        );
    }
    (router.with_state(state.clone()), state)
}

fn controlnet_routes() -> Router<Arc<AppState>> {
    use axum::routing::{get, post};
    Router::new()
        .route("/controlnet/version", get(controlnet::version))
        .route("/controlnet/model_list", get(controlnet::model_list))
        .route("/controlnet/module_list", get(controlnet::module_list))
        .route("/controlnet/control_types", get(controlnet::control_types))
        .route("/controlnet/detect", post(controlnet::detect))
        .route(
            "/controlnet/render_openpose_json",
            post(controlnet::render_openpose_json),
        )
}

/// Serve on `listener` until `shutdown` completes; then the running job is interrupted, the
/// queued ones answered 503, and the requests in flight finished before returning.
pub async fn serve(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (router, state) = app(config);
    let closing = state.clone();
    let stop = async move {
        shutdown.await;
        closing.queue.closing.store(true, Ordering::SeqCst);
        closing
            .queue
            .shared
            .interrupted
            .store(true, Ordering::SeqCst);
    };
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(stop)
    .await
}

/// Run the server on its own runtime until SIGINT or SIGTERM; `ready` gets the bound address.
pub fn run(config: Config, ready: impl FnOnce(SocketAddr)) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // handlers installed before the address is announced: a SIGTERM sent as soon as the
        // server answers is a clean stop, not the default kill
        let shutdown = signals();
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        ready(listener.local_addr()?);
        serve(config, listener, shutdown).await
    })
}

/// Installs the SIGTERM and SIGINT handlers now (inside the runtime) and returns the future
/// that ends at the first of them.
fn signals() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let streams = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = streams else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        eprintln!("sdctl serve: stopping (the running job is interrupted)");
    }
}
