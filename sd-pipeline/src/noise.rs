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
            for j in 0..8 {
                let u1 = 1.0f32 - d[j];
                let u2 = d[j + 8];
                let radius = (-2.0f32 * u1.ln()).sqrt();
                let theta = (2.0f64 * std::f64::consts::PI * u2 as f64) as f32;
                d[j] = radius * theta.cos();
                d[j + 8] = radius * theta.sin();
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

pub use crate::samplers::NoiseSource;

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
