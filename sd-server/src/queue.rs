//! One engine thread runs the requests, first come first served, while the HTTP side stays
//! responsive. The engine keeps the last model loaded (with its LoRAs) for the next request
//! that names the same ones, as A1111 keeps its checkpoint.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use sd_plugins_api::Registry;

use crate::error::{ApiError, ApiResult};
use crate::progress::{ProgressHook, Shared};

/// The engine thread's state.
pub struct Engine {
    loaded: Option<(Key, sd::Loaded)>,
    pub registry: Registry,
    pub shared: Arc<Shared>,
}

/// What a loaded model was loaded with.
type Key = (PathBuf, Option<PathBuf>, Vec<sd::LoraSpec>);

impl Engine {
    /// Run a job through the front door (`sd::load` + `sd::run`, as `sdctl generate`),
    /// loading the model only when the job names another model, VAE or LoRAs than the last.
    pub fn generate(&mut self, job: &sd::Job) -> sd::Result<sd::Generation> {
        let (_, loras) = sd::generate::resolve_loras(job)?;
        let key = (sd::generate::model_path(job)?, job.vae.clone(), loras);
        let t0 = std::time::Instant::now();
        if self.loaded.as_ref().map(|(k, _)| k) != Some(&key) {
            // the old model goes before the new one loads
            self.loaded = None;
            self.loaded = Some((key, sd::load(job)?));
        }
        let load = t0.elapsed();
        let (_, loaded) = self.loaded.as_ref().expect("loaded above");
        let mut g = sd::run(
            loaded,
            job,
            &self.registry,
            vec![Box::new(ProgressHook(self.shared.clone()))],
        )?;
        g.timings.load = load;
        Ok(g)
    }

    /// Forget the loaded model (`/sdapi/v1/unload-checkpoint`, and after a panic).
    pub fn unload(&mut self) {
        self.loaded = None;
    }
}

type Task = Box<dyn FnOnce(&mut Engine) + Send>;

/// The queue in front of the engine thread.
pub struct Queue {
    tx: Mutex<mpsc::Sender<Task>>,
    /// Requests queued or running.
    pending: Arc<AtomicUsize>,
    size: usize,
    pub closing: Arc<AtomicBool>,
    pub shared: Arc<Shared>,
}

impl Queue {
    /// Start the engine thread. `size`: requests queued or running at most (more: 503).
    pub fn start(
        registry: Registry,
        size: usize,
        preview: sd_pipeline::generation::preview::PreviewDecoder,
    ) -> Self {
        let shared = Arc::new(Shared {
            preview,
            ..Shared::default()
        });
        let (tx, rx) = mpsc::channel::<Task>();
        let pending = Arc::new(AtomicUsize::new(0));
        let closing = Arc::new(AtomicBool::new(false));
        let mut engine = Engine {
            loaded: None,
            registry,
            shared: shared.clone(),
        };
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                // each task counts itself out of `pending` before it answers
                while let Ok(task) = rx.recv() {
                    task(&mut engine);
                }
            })
            .expect("starting the engine thread");
        Self {
            tx: Mutex::new(tx),
            pending,
            size,
            closing,
            shared,
        }
    }

    /// Requests queued or running now.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }

    /// Run `f` on the engine thread after the requests before it; a full queue is a 503, a
    /// panic in `f` a 500 for this request (the engine goes on, its model unloaded).
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Engine) -> ApiResult<R> + Send + 'static,
    ) -> ApiResult<R> {
        if self.closing.load(Ordering::SeqCst) {
            return Err(shutting_down());
        }
        if self.pending.fetch_add(1, Ordering::SeqCst) >= self.size {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "QueueFull",
                format!(
                    "the queue is full ({} requests queued or running, --queue-size {}); try again later",
                    self.size, self.size
                ),
            ));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let closing = self.closing.clone();
        let pending = self.pending.clone();
        let task: Task = Box::new(move |engine: &mut Engine| {
            if closing.load(Ordering::SeqCst) {
                pending.fetch_sub(1, Ordering::SeqCst);
                let _ = tx.send(Err(shutting_down()));
                return;
            }
            let r = std::panic::catch_unwind(AssertUnwindSafe(|| f(engine)));
            let r = r.unwrap_or_else(|panic| {
                engine.unload();
                engine.shared.end();
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                tracing::error!("a job panicked: {what}");
                Err(ApiError::internal(format!(
                    "the job failed with an internal error ({what}); the server goes on"
                )))
            });
            // out of the count before the answer, so a caller that has it sees the queue as it is
            pending.fetch_sub(1, Ordering::SeqCst);
            let _ = tx.send(r);
        });
        let sent = self.tx.lock().unwrap_or_else(|p| p.into_inner()).send(task);
        if sent.is_err() {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::internal("the engine thread has stopped"));
        }
        rx.await
            .unwrap_or_else(|_| Err(ApiError::internal("the engine thread has stopped")))
    }
}

fn shutting_down() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "ShuttingDown",
        "the server is shutting down",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_panicking_job_is_a_500_and_the_engine_goes_on() {
        let q = Queue::start(Registry::builtin(), 4, Default::default());
        runtime().block_on(async {
            let e = q
                .run(|_| -> ApiResult<()> { panic!("boom in a job") })
                .await
                .unwrap_err();
            assert_eq!(e.status, 500);
            assert!(e.detail.contains("boom in a job"), "{}", e.detail);
            assert_eq!(q.run(|_| Ok(7)).await.unwrap(), 7);
            assert_eq!(q.pending(), 0);
        });
    }

    #[test]
    fn a_full_queue_is_a_503_and_closing_refuses_new_work() {
        let q = Arc::new(Queue::start(Registry::builtin(), 1, Default::default()));
        let (release, wait) = mpsc::channel::<()>();
        let rt = runtime();
        let busy = {
            let q = q.clone();
            rt.spawn(async move {
                q.run(move |_| {
                    wait.recv().ok();
                    Ok(())
                })
                .await
            })
        };
        rt.block_on(async {
            while q.pending() == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            let e = q.run(|_| Ok(())).await.unwrap_err();
            assert_eq!(e.status, 503);
            assert!(e.detail.contains("--queue-size 1"), "{}", e.detail);
            release.send(()).unwrap();
            busy.await.unwrap().unwrap();
            q.closing.store(true, Ordering::SeqCst);
            assert_eq!(q.run(|_| Ok(())).await.unwrap_err().status, 503);
        });
    }
}
