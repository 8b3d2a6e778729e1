//! Noise-schedule arithmetic shared by the samplers, with diffusers' float32/float64 steps:
//! betas and `alphas_cumprod` are float32 torch tensors, timestep grids are numpy float64
//! (`np.linspace`, `np.arange`), sigmas are interpolated in float64 and stored as float32.

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

/// `np.exp(np.linspace(log(sigma_max), log(sigma_min), steps))` (`_convert_to_exponential`).
pub fn exponential(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    np_linspace(sigma_max.ln(), sigma_min.ln(), steps)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// `sigma_min + ppf * (sigma_max - sigma_min)` with `ppf = scipy.stats.beta.ppf(1 - linspace(0,
/// 1, steps), 0.6, 0.6)` (`_convert_to_beta`, "Beta Sampling is All You Need").
pub fn beta_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    np_linspace(0.0, 1.0, steps)
        .into_iter()
        .map(|x| sigma_min + beta_ppf(1.0 - x, 0.6, 0.6) * (sigma_max - sigma_min))
        .collect()
}

/// The inverse of the regularized incomplete beta function `I_x(a, b)` by bisection to the
/// last bit of a double (scipy's `beta.ppf` agrees to ~1e-15).
fn beta_ppf(p: f64, a: f64, b: f64) -> f64 {
    if p <= 0.0 {
        return 0.0;
    }
    if p >= 1.0 {
        return 1.0;
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if reg_inc_beta(mid, a, b) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// `I_x(a, b)` by Lentz's continued fraction (Numerical Recipes `betai`/`betacf`).
fn reg_inc_beta(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    if x < (a + 1.0) / (a + b + 2.0) {
        ln_front.exp() * beta_cf(x, a, b) / a
    } else {
        1.0 - ln_front.exp() * beta_cf(1.0 - x, b, a) / b
    }
}

fn beta_cf(x: f64, a: f64, b: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..1000 {
        let m = m as f64;
        let m2 = 2.0 * m;
        let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 + aa * d;
        d = if d.abs() < TINY { TINY } else { d };
        c = 1.0 + aa / c;
        c = if c.abs() < TINY { TINY } else { c };
        d = 1.0 / d;
        h *= d * c;
        let aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 + aa * d;
        d = if d.abs() < TINY { TINY } else { d };
        c = 1.0 + aa / c;
        c = if c.abs() < TINY { TINY } else { c };
        d = 1.0 / d;
        let del = d * c;
        h *= del;
        if (del - 1.0).abs() < 1e-16 {
            break;
        }
    }
    h
}

/// `ln Γ(x)` for x > 0 (Lanczos, g = 7, 9 terms: ~1e-15 relative).
fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = G[0];
    let t = x + 7.5;
    for (i, g) in G.iter().enumerate().skip(1) {
        a += g / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
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
    fn beta_ppf_matches_scipy() {
        // scipy.stats.beta.ppf([0.1, 0.25, 0.5, 0.9], 0.6, 0.6)
        let want = [
            0.039_584_405_588_780_85,
            0.175_680_378_652_694_98,
            0.500_000_000_000_000_1,
            0.960_415_594_411_219_2,
        ];
        for (p, w) in [0.1, 0.25, 0.5, 0.9].into_iter().zip(want) {
            assert!((beta_ppf(p, 0.6, 0.6) - w).abs() < 1e-12, "ppf({p})");
        }
        let s = exponential(0.03, 14.6, 4);
        assert!((s[0] - 14.6).abs() < 1e-12 && (s[3] - 0.03).abs() < 1e-12);
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

/// How a schedule other than "normal" redraws the sigmas between two ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conversion {
    Karras,
    Exponential,
    Beta,
}

/// `_convert_to_karras` / `_convert_to_exponential` / `_convert_to_beta` between `min` and `max`.
pub fn convert(conv: Conversion, min: f64, max: f64, steps: usize) -> Vec<f64> {
    match conv {
        Conversion::Karras => karras(min, max, steps),
        Conversion::Exponential => exponential(min, max, steps),
        Conversion::Beta => beta_sigmas(min, max, steps),
    }
}

/// Inference timesteps (descending) of the k-diffusion-style schedulers (Euler, Heun, LMS,
/// DPM-Solver SDE), in float64: `np.linspace(0, n - 1, steps)[::-1]`, leading
/// `(arange(steps) * (n // steps)).round()[::-1] + steps_offset`, or trailing
/// `arange(n, 0, -n / steps).round() - 1`. Euler, Heun and LMS then cast to float32.
pub fn spaced_timesteps(cfg: &SchedulerConfig, steps: usize, spacing: TimestepSpacing) -> Vec<f64> {
    let n = cfg.num_train_timesteps;
    match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (n - 1) as f64, steps)
            .into_iter()
            .rev()
            .collect(),
        TimestepSpacing::Leading => (0..steps)
            .rev()
            .map(|i| (i * (n / steps)) as f64 + cfg.steps_offset as f64)
            .collect(),
        TimestepSpacing::Trailing => np_arange_down(n as f64, n as f64 / steps as f64)
            .into_iter()
            .map(|t| round_half_even(t) - 1.0)
            .collect(),
    }
}

/// The sigmas and model timesteps of a k-diffusion-style scheduler (`set_timesteps` of
/// scheduling_euler_discrete.py, _heun_discrete, _lms_discrete, _dpmsolver_sde): the train
/// sigmas interpolated at the spaced timesteps, or redrawn by `conv` between the interpolated
/// ends (or the config's `sigma_min` / `sigma_max` where `config_bounds`) with timesteps by
/// `_sigma_to_t`. `f32_grid`: the timestep grid is float32 (all but DPM-Solver SDE).
/// Returns (timesteps, sigmas), one each per step; no final zero.
pub fn discrete_sigmas(
    cfg: &SchedulerConfig,
    steps: usize,
    conv: Option<Conversion>,
    config_bounds: bool,
    f32_grid: bool,
) -> (Vec<f64>, Vec<f64>) {
    let spacing = cfg.spacing_or(TimestepSpacing::Linspace);
    let mut ts = spaced_timesteps(cfg, steps, spacing);
    if f32_grid {
        ts.iter_mut().for_each(|t| *t = *t as f32 as f64);
    }
    let train = train_sigmas(&alphas_cumprod(cfg));
    // np.interp(timesteps, arange(n), sigmas): float64
    let interpolated: Vec<f64> = ts.iter().map(|&t| interp(t, &train)).collect();
    match conv {
        None => (ts, interpolated),
        Some(conv) => {
            let (lo, hi) = (interpolated[steps - 1], interpolated[0]);
            let (lo, hi) = if config_bounds {
                (cfg.sigma_min.unwrap_or(lo), cfg.sigma_max.unwrap_or(hi))
            } else {
                (lo, hi)
            };
            let sigmas = convert(conv, lo, hi, steps);
            let log_sigmas = log_sigmas(&train);
            let t = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect();
            (t, sigmas)
        }
    }
}
