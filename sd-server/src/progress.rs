//! What the engine is doing, for `/sdapi/v1/progress`, and the interrupt / skip flags: A1111's
//! `shared.state`. A hook in the denoising loop updates it at every step and stops sampling
//! when asked (the image so far is still decoded and returned, as A1111 does).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::Tensor;
use sd_pipeline::generation::preview::{preview_rgb, PreviewDecoder};
use sd_plugins_api::{Hook, HookError, NoiseLevels, StepInfo};
use serde_json::{json, Value};

/// The state of the running request (none when idle).
#[derive(Default)]
pub struct State {
    /// `txt2img`, `img2img` (empty when idle).
    pub job: String,
    pub job_count: usize,
    pub job_no: usize,
    pub job_timestamp: String,
    pub sampling_step: usize,
    pub sampling_steps: usize,
    pub started: Option<Instant>,
    /// The latents after the last step, for the live preview.
    pub latents: Option<Tensor>,
}

/// Shared between the HTTP side and the engine thread.
#[derive(Default)]
pub struct Shared {
    pub state: Mutex<State>,
    pub interrupted: AtomicBool,
    pub skipped: AtomicBool,
    /// How `current_image` is made.
    pub preview: PreviewDecoder,
}

impl Shared {
    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A request starts: `count` generations (A1111's `n_iter`).
    pub fn begin(&self, job: &str, count: usize) {
        self.interrupted.store(false, Ordering::SeqCst);
        self.skipped.store(false, Ordering::SeqCst);
        let mut s = self.state();
        *s = State {
            job: job.to_string(),
            job_count: count,
            job_timestamp: timestamp(),
            started: Some(Instant::now()),
            ..State::default()
        };
    }

    /// The next generation of the request starts.
    pub fn next(&self, job_no: usize) {
        self.skipped.store(false, Ordering::SeqCst);
        let mut s = self.state();
        s.job_no = job_no;
        s.sampling_step = 0;
        s.latents = None;
    }

    pub fn end(&self) {
        *self.state() = State::default();
        self.interrupted.store(false, Ordering::SeqCst);
        self.skipped.store(false, Ordering::SeqCst);
    }

    /// A1111's `/sdapi/v1/progress` answer (`modules/api/api.py` `progressapi`).
    pub fn progress_json(&self, skip_current_image: bool) -> Value {
        let s = self.state();
        let state = json!({
            "skipped": self.skipped.load(Ordering::SeqCst),
            "interrupted": self.interrupted.load(Ordering::SeqCst),
            "stopping_generation": false,
            "job": s.job,
            "job_count": s.job_count,
            "job_timestamp": if s.job_timestamp.is_empty() { "0".to_string() } else { s.job_timestamp.clone() },
            "job_no": s.job_no,
            "sampling_step": s.sampling_step,
            "sampling_steps": s.sampling_steps,
        });
        if s.job_count == 0 {
            return json!({"progress": 0.0, "eta_relative": 0.0, "state": state,
                          "current_image": null, "textinfo": null, "current_task": null});
        }
        let mut progress = 0.01 + s.job_no as f64 / s.job_count as f64;
        if s.sampling_steps > 0 {
            progress += 1.0 / s.job_count as f64 * s.sampling_step as f64 / s.sampling_steps as f64;
        }
        let since = s.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
        let eta_relative = since / progress - since;
        let image = if skip_current_image {
            None
        } else {
            s.latents
                .as_ref()
                .and_then(|l| preview_png(l, &self.preview))
        };
        json!({
            "progress": progress.min(1.0),
            "eta_relative": eta_relative,
            "state": state,
            "current_image": image,
            "textinfo": null,
            "current_task": null,
        })
    }
}

/// The step hook: progress, preview latents, and a stop when interrupted or skipped.
pub struct ProgressHook(pub Arc<Shared>);

impl Hook for ProgressHook {
    fn name(&self) -> &str {
        "server progress"
    }

    fn before_step(&mut self, step: &StepInfo, _latents: &mut Tensor) -> Result<(), HookError> {
        let shared = &self.0;
        if shared.interrupted.load(Ordering::SeqCst) || shared.skipped.load(Ordering::SeqCst) {
            return Err(HookError::Stop {
                hook: "interrupt".into(),
            });
        }
        let mut s = shared.state();
        s.sampling_steps = step.total - step.first_index;
        Ok(())
    }

    fn after_step(
        &mut self,
        step: &StepInfo,
        _levels: &dyn NoiseLevels,
        latents: &mut Tensor,
    ) -> Result<(), HookError> {
        let mut s = self.0.state();
        s.sampling_step = step.index + 1 - step.first_index;
        s.latents = Some(latents.clone());
        Ok(())
    }
}

/// The live preview of the first image as base64 PNG: A1111's "Approx cheap" at the latents'
/// size (the page scales it up), or a TAESD decode when the server has one (`--taesd`).
fn preview_png(latents: &Tensor, decoder: &PreviewDecoder) -> Option<String> {
    let (w, h, rgb) = preview_rgb(latents, decoder).ok()??;
    crate::images::png_bytes(w as u32, h as u32, 3, rgb)
        .ok()
        .map(|b| crate::images::encode_b64(&b))
}

/// Now as A1111's `job_timestamp`, `%Y%m%d%H%M%S` (UTC).
pub fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_793), (2026, 12, 6));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn progress_follows_a1111s_formula() {
        let shared = Shared::default();
        let idle = shared.progress_json(false);
        assert_eq!(idle["progress"], 0.0);
        assert_eq!(idle["state"]["job_count"], 0);
        shared.begin("txt2img", 2);
        shared.next(1);
        {
            let mut s = shared.state();
            s.sampling_steps = 10;
            s.sampling_step = 5;
        }
        let p = shared.progress_json(true);
        // 0.01 + 1/2 + 1/2 * 5/10
        assert!(
            (p["progress"].as_f64().unwrap() - 0.76).abs() < 1e-12,
            "{p}"
        );
        assert_eq!(p["state"]["job"], "txt2img");
        assert!(p["current_image"].is_null());
        assert_eq!(p["state"]["job_timestamp"].as_str().unwrap().len(), 14);
    }

    #[test]
    fn the_preview_is_the_cheap_approximation() {
        // one latent pixel of ones: R = 0.298+0.187-0.158-0.184 = 0.143 -> (1.143/2)*255
        let t = Tensor::ones((1, 4, 1, 1), DType::F32, &candle_core::Device::Cpu).unwrap();
        let b64 = preview_png(&t, &PreviewDecoder::Cheap).unwrap();
        let png = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).unwrap();
        let img = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (1, 1));
        assert_eq!(img.get_pixel(0, 0).0[0], (1.143f32 / 2.0 * 255.0) as u8);
    }

    /// With `--taesd`, the preview is the tiny decoder's image at the image size.
    #[test]
    fn a_taesd_preview_is_image_sized() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/models/taesd-tiny");
        let t = sd_pipeline::model::taesd::AutoencoderTiny::load(
            &dir,
            &candle_core::Device::Cpu,
            DType::F32,
        )
        .unwrap();
        let latents = Tensor::randn(0f32, 1.0, (2, 4, 3, 5), &candle_core::Device::Cpu).unwrap();
        let want = t.decode_images(&latents.narrow(0, 0, 1).unwrap()).unwrap();
        let b64 = preview_png(&latents, &PreviewDecoder::Taesd(Arc::new(t))).unwrap();
        let png = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).unwrap();
        let img = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (40, 24));
        let v = want
            .get(0)
            .unwrap()
            .get(1)
            .unwrap()
            .get(7)
            .unwrap()
            .get(9)
            .unwrap();
        let v = (v.to_scalar::<f32>().unwrap() * 255.0).round() as u8;
        assert_eq!(img.get_pixel(9, 7).0[1], v);
    }
}
