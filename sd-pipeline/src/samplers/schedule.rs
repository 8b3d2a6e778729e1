//! Noise-schedule arithmetic shared by the samplers, with diffusers' float32/float64 steps.

use super::config::{BetaSchedule, SchedulerConfig, TimestepSpacing};

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

/// `alphas_cumprod` as diffusers computes it (float32 betas, cumprod accumulated in double).
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
            // betas_for_alpha_bar (cosine), computed in double then stored as float32
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

/// `np.round(np.arange(n, 0, -ratio))`: the trailing spacing before its `- 1`.
pub fn trailing(n: usize, ratio: f64) -> impl Iterator<Item = f64> {
    let count = (n as f64 / ratio).ceil() as usize;
    (0..count).map(move |k| round_half_even(n as f64 - k as f64 * ratio))
}

/// numpy's `round` (half to even).
pub fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
}

/// Inference timesteps (descending) of the Euler-family schedulers, as float32 values.
pub fn euler_timesteps(cfg: &SchedulerConfig, steps: usize, spacing: TimestepSpacing) -> Vec<f32> {
    let n = cfg.num_train_timesteps;
    match spacing {
        TimestepSpacing::Linspace => {
            // np.linspace(0, n - 1, steps, dtype=float32)[::-1]
            let mut v: Vec<f32> = (0..steps)
                .map(|i| {
                    if steps == 1 {
                        0.0
                    } else {
                        (i as f64 * ((n - 1) as f64 / (steps - 1) as f64)) as f32
                    }
                })
                .collect();
            if steps > 1 {
                v[steps - 1] = (n - 1) as f32;
            }
            v.reverse();
            v
        }
        TimestepSpacing::Leading => {
            let ratio = n / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio) as f32 + cfg.steps_offset as f32)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = n as f64 / steps as f64;
            trailing(n, ratio).map(|t| t as f32 - 1.0).collect()
        }
    }
}

/// `np.interp(x, arange(len(ys)), ys)` in double.
pub fn interp(x: f64, ys: &[f32]) -> f64 {
    if x <= 0.0 {
        return ys[0] as f64;
    }
    let last = ys.len() - 1;
    if x >= last as f64 {
        return ys[last] as f64;
    }
    let i = x.floor() as usize;
    let w = x - i as f64;
    ys[i] as f64 + w * (ys[i + 1] as f64 - ys[i] as f64)
}

/// Karras et al. sigmas between `sigma_min` and `sigma_max`, rho 7 (diffusers `_convert_to_karras`).
pub fn karras(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    (0..steps)
        .map(|i| {
            let ramp = if steps == 1 {
                0.0
            } else {
                i as f64 / (steps - 1) as f64
            };
            (max_inv + ramp * (min_inv - max_inv)).powf(rho)
        })
        .collect()
}

/// diffusers `_sigma_to_t`: fractional train timestep of `sigma` by interpolating log sigmas
/// (`log_sigmas` float32, as numpy computes them from the float32 sigmas).
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // low_idx = cumsum(dists >= 0).argmax().clip(max=n-2): the last index with log_sigma >= ls[i]
    let count = log_sigmas
        .iter()
        .filter(|&&l| log_sigma - l as f64 >= 0.0)
        .count();
    let low = if count == 0 {
        0
    } else {
        (count - 1).min(n - 2)
    };
    let (lo, hi) = (log_sigmas[low] as f64, log_sigmas[low + 1] as f64);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
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
        let ls: Vec<f32> = s.iter().map(|v| v.ln()).collect();
        for t in [0usize, 10, 500, 999] {
            assert!((sigma_to_t(s[t] as f64, &ls) - t as f64).abs() < 1e-3);
        }
    }
}
