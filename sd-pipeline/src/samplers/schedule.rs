//! Noise-schedule arithmetic shared by the samplers, with diffusers' float32/float64 steps:
//! betas and `alphas_cumprod` are float32 torch tensors, timestep grids are numpy float64
//! (`np.linspace`, `np.arange`), sigmas are interpolated in float64 and stored as float32.

use super::config::{BetaSchedule, SchedulerConfig};

/// `torch.linspace(start, end, n, dtype=float32)` (ATen's two-sided formula in float32).
fn linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    if n == 1 {
        return vec![s];
    }
    let step = (e - s) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                s + step * i as f32
            } else {
                e - step * (n - i - 1) as f32
            }
        })
        .collect()
}

/// `alphas_cumprod` as diffusers computes it: float32 betas, `1.0 - betas` in float32, and
/// `torch.cumprod`, which on CPU accumulates float32 in double (`acc_type<float>`).
pub fn alphas_cumprod(cfg: &SchedulerConfig) -> Vec<f32> {
    let n = cfg.num_train_timesteps;
    let betas: Vec<f32> = match (&cfg.trained_betas, cfg.beta_schedule) {
        (Some(b), _) => b.iter().map(|&v| v as f32).collect(),
        (None, BetaSchedule::Linear) => linspace_f32(cfg.beta_start, cfg.beta_end, n),
        (None, BetaSchedule::ScaledLinear) => {
            linspace_f32(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), n)
                .into_iter()
                .map(|b| b * b)
                .collect()
        }
        (None, BetaSchedule::SquaredCosCapV2) => {
            // scheduling_ddim.py betas_for_alpha_bar (cosine): Python floats, then float32
            let ab = |t: f64| {
                ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                    .cos()
                    .powi(2)
            };
            (0..n)
                .map(|i| {
                    let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                    (1.0 - ab(t2) / ab(t1)).min(0.999) as f32
                })
                .collect()
        }
    };
    let mut acc = 1f64;
    betas
        .iter()
        .map(|&b| {
            acc *= (1.0f32 - b) as f64;
            acc as f32
        })
        .collect()
}

/// Train sigmas `((1 - a) / a) ** 0.5` in float32, indexed by train timestep.
pub fn train_sigmas(ac: &[f32]) -> Vec<f32> {
    ac.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
}

/// `np.log(sigmas)` of float32 sigmas, as float32. numpy's SIMD float32 log is within an ulp
/// or so of the correctly rounded value computed here; the effect on `_sigma_to_t` is ~1e-5.
pub fn log_sigmas(sigmas: &[f32]) -> Vec<f32> {
    sigmas.iter().map(|&s| (s as f64).ln() as f32).collect()
}

/// numpy's `round` (half to even).
pub fn round_half_even(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.linspace(start, stop, n)` in float64: `i * step + start`, the last value exactly `stop`.
pub fn np_linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    v[n - 1] = stop;
    v
}

/// `np.arange(start, 0, -step)` in float64. numpy fills `start + i * delta` with
/// `delta = (start - step) - start`, not `-step` (`DOUBLE_fill`).
pub fn np_arange_down(start: f64, step: f64) -> Vec<f64> {
    let len = (start / step).ceil().max(0.0) as usize;
    let delta = (start - step) - start;
    (0..len)
        .map(|i| {
            if i == 0 {
                start
            } else {
                start + i as f64 * delta
            }
        })
        .collect()
}

/// `np.interp(x, arange(len(ys)), ys)` in double (`arr_interp`: `slope * (x - xp[j]) + fp[j]`).
pub fn interp(x: f64, ys: &[f32]) -> f64 {
    let last = ys.len() - 1;
    if x <= 0.0 {
        return ys[0] as f64;
    }
    if x >= last as f64 {
        return ys[last] as f64;
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return ys[j] as f64;
    }
    let slope = ys[j + 1] as f64 - ys[j] as f64;
    slope * (x - j as f64) + ys[j] as f64
}

/// Karras et al. sigmas from `sigma_max` down to `sigma_min`, rho 7 (`_convert_to_karras`,
/// scheduling_euler_discrete.py; `ramp = np.linspace(0, 1, steps)`, all float64).
pub fn karras(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, steps)
        .into_iter()
        .map(|ramp| (max_inv + ramp * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// diffusers `_sigma_to_t`: fractional train timestep of `sigma` (float64) by interpolating
/// the float32 `log_sigmas`; note `low - high` is a float32 difference there.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // low_idx = cumsum(dists >= 0).argmax().clip(max=n-2): the first index holding the count of
    // log_sigmas <= log_sigma (0 when there are none), i.e. the last such index
    let count = log_sigmas
        .iter()
        .filter(|&&l| log_sigma - l as f64 >= 0.0)
        .count();
    let low = count.saturating_sub(1).min(n - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo as f64 - log_sigma) / (lo - hi) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn karras_ends_at_the_bounds() {
        let k = karras(0.03, 14.6, 5);
        assert!((k[0] - 14.6).abs() < 1e-9 && (k[4] - 0.03).abs() < 1e-9);
        assert!(k.windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn sigma_to_t_inverts_the_train_sigmas() {
        let cfg = SchedulerConfig::from_json_str(
            r#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}"#,
        )
        .unwrap();
        let s = train_sigmas(&alphas_cumprod(&cfg));
        let ls = log_sigmas(&s);
        for t in [0usize, 10, 500, 999] {
            assert!((sigma_to_t(s[t] as f64, &ls) - t as f64).abs() < 1e-3);
        }
    }

    #[test]
    fn numpy_grids() {
        assert_eq!(
            np_arange_down(1000.0, 250.0),
            vec![1000.0, 750.0, 500.0, 250.0]
        );
        assert_eq!(np_arange_down(1000.0, 1000.0 / 3.0).len(), 3);
        assert_eq!(np_linspace(0.0, 999.0, 4), vec![0.0, 333.0, 666.0, 999.0]);
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(3.5), 4.0);
    }
}
