//! Seeded noise identical to PyTorch's CPU generator: `torch.randn(shape,
//! generator=torch.Generator("cpu").manual_seed(seed))`, so a seed gives the same initial
//! noise as diffusers (and ComfyUI, which draws on the CPU) for the same shape.
//!
//! Port of ATen's mt19937 engine (aten/src/ATen/core/MT19937RNGEngine.h) and the float32
//! `normal_fill` path of `normal_kernel` (aten/src/ATen/native/cpu/DistributionTemplates.h).

use candle_core::{Device, Result, Tensor};

const N: usize = 624;
const M: usize = 397;

/// Mersenne twister with PyTorch's seeding and output.
#[derive(Clone)]
pub struct TorchRng {
    state: [u32; N],
    index: usize,
    /// Cached second Box-Muller value of the double path (`next_double_normal_sample`).
    next_double_normal: Option<f64>,
}

impl std::fmt::Debug for TorchRng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TorchRng {{ index: {} }}", self.index)
    }
}

impl TorchRng {
    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; N];
        state[0] = (seed & 0xffff_ffff) as u32;
        for i in 1..N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Self {
            state,
            index: N,
            next_double_normal: None,
        }
    }

    fn twist(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        const MATRIX_A: u32 = 0x9908_b0df;
        for i in 0..N {
            let y = (self.state[i] & UPPER) | (self.state[(i + 1) % N] & LOWER);
            let mut v = self.state[(i + M) % N] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= MATRIX_A;
            }
            self.state[i] = v;
        }
        self.index = 0;
    }

    /// The next 32-bit output (`generator->random()`).
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (hi << 32) | lo
    }

    /// `uniform_real_distribution<float>(0, 1)`: 24 random bits.
    fn uniform_f32(&mut self) -> f32 {
        let x = self.next_u32() & ((1 << 24) - 1);
        (x as f64 * (2f64).powi(-24)) as f32
    }

    /// `uniform_real_distribution<double>(0, 1)`: 53 random bits.
    fn uniform_f64(&mut self) -> f64 {
        let x = self.next_u64() & ((1u64 << 53) - 1);
        x as f64 * (2f64).powi(-53)
    }

    /// `at::normal_distribution<double>` (used for tensors of fewer than 16 elements).
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.next_double_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(n)` values for a contiguous float32 tensor of `n` elements.
    pub fn randn_f32(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        let fill16 = |d: &mut [f32]| {
            // normal_fill_16_AVX2 (ATen DistributionTemplates.h), one lane at a time
            let two_pi = (2.0 * std::f64::consts::PI) as f32;
            for j in 0..8 {
                let radius = (-2.0f32 * cephes_log(1.0 - d[j])).sqrt();
                let (sin, cos) = cephes_sincos(two_pi * d[j + 8]);
                d[j] = radius * cos;
                d[j + 8] = radius * sin;
            }
        };
        let mut i = 0;
        while i + 16 <= n {
            fill16(&mut data[i..i + 16]);
            i += 16;
        }
        if !n.is_multiple_of(16) {
            // Recompute the last 16 values, as ATen does.
            for v in data[n - 16..].iter_mut() {
                *v = self.uniform_f32();
            }
            fill16(&mut data[n - 16..]);
        }
        data
    }
}

/// `log256_ps` of ATen's `avx_mathfun.h` (Cephes polynomial, not libm) for one lane, with the
/// fused multiply-adds the shipped torch build contracts its mul/add pairs into. Inputs are
/// in (0, 1] here.
#[allow(clippy::excessive_precision)] // Cephes' coefficients as published
fn cephes_log(v: f32) -> f32 {
    let mut x = v.max(f32::from_bits(0x0080_0000));
    let bits = x.to_bits();
    let mut e = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
    x = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    let below = x < std::f32::consts::FRAC_1_SQRT_2;
    let tmp = if below { x } else { 0.0 };
    x -= 1.0;
    if below {
        e -= 1.0;
    }
    x += tmp;
    let z = x * x;
    let mut y = 7.037_683_6e-2_f32;
    for c in [
        -1.151_461_1e-1,
        1.167_699_9e-1,
        -1.242_014_1e-1,
        1.424_932_3e-1,
        -1.666_805_8e-1,
        2.000_071_4e-1,
        -2.499_999_4e-1,
        3.333_333_1e-1_f32,
    ] {
        y = y.mul_add(x, c);
    }
    y *= x;
    y = y.mul_add(z, e * -2.121_944_4e-4);
    y = z.mul_add(-0.5, y);
    x += y;
    e.mul_add(0.693_359_4, x)
}

/// `sincos256_ps` of `avx_mathfun.h` for one lane (same contraction rules): `(sin, cos)`.
fn cephes_sincos(theta: f32) -> (f32, f32) {
    let mut sign_sin = theta.to_bits() & 0x8000_0000;
    let mut x = theta.abs();
    let mut j = (x * 1.273_239_5_f32) as i32; // 4 / pi, truncated as cvttps
    j = (j + 1) & !1;
    let q = j as f32;
    sign_sin ^= ((j & 4) as u32) << 29;
    let sign_cos = ((!(j - 2) & 4) as u32) << 29;
    let sine_poly = (j & 2) == 0;
    x = q.mul_add(-0.785_156_25, x);
    x = q.mul_add(-2.418_756_5e-4, x);
    x = q.mul_add(-3.774_895e-8, x);
    let z = x * x;
    let mut c = 2.443_315_7e-5_f32.mul_add(z, -1.388_731_6e-3);
    c = c.mul_add(z, 4.166_664_6e-2);
    c *= z;
    c = c.mul_add(z, -(z * 0.5));
    c += 1.0;
    let mut s = (-1.951_529_6e-4_f32).mul_add(z, 8.332_161e-3);
    s = s.mul_add(z, -1.666_665_5e-1);
    s *= z;
    s = s.mul_add(x, x);
    let (sin, cos) = if sine_poly { (s, c) } else { (c, s) };
    (
        f32::from_bits(sin.to_bits() ^ sign_sin),
        f32::from_bits(cos.to_bits() ^ sign_cos),
    )
}

use crate::samplers::NoiseSource;

impl NoiseSource for TorchRng {
    fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n = shape.iter().product();
        Tensor::from_vec(self.randn_f32(n), shape, &Device::Cpu)?.to_device(device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_the_reference_sequence() {
        // std::mt19937 with the default seed 5489: the 10000th output is 4123659995
        // (C++ standard, [rand.predef]).
        let mut r = TorchRng::new(5489);
        let mut last = 0;
        for _ in 0..10000 {
            last = r.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    fn close(a: &[f32], b: &[f32]) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-6, "{a:?} vs {b:?}");
        }
    }

    #[test]
    #[allow(clippy::excessive_precision)]
    fn randn_matches_torch_cpu_generator() {
        // Expected values printed by torch 2.15: g = torch.Generator("cpu").manual_seed(seed);
        // torch.randn(n, generator=g) twice (first 4 of the first draw, last 2 of the second).
        let cases: [(u64, usize, &[f32], [f32; 2]); 4] = [
            (
                42,
                40,
                &[1.9269153, 1.4872841, 0.9007172, -2.105521],
                [-0.0013108636, -0.30360377],
            ),
            (
                0,
                16,
                &[-1.1258398, -1.1523602, -0.25057858, -0.4338788],
                [0.9462984, -0.84367675],
            ),
            (
                7,
                3,
                &[-0.1467951, 0.78614128, 0.94682163],
                [1.6907902, -0.8948279],
            ),
            (
                123,
                256,
                &[0.33737019, -0.17777722, -0.30352759, -0.58801186],
                [-1.0639814, 0.94171143],
            ),
        ];
        for (seed, n, first, last) in cases {
            let mut r = TorchRng::new(seed);
            let a = r.randn_f32(n);
            let b = r.randn_f32(n);
            close(&a[..first.len()], first);
            close(&b[n - 2..], &last);
        }
    }
}
