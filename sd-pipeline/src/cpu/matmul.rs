//! The one f32 matrix product the CPU kernels call (convolutions, attention, linear layers), in
//! the process's compute precision: f32 through the `gemm` crate (the parity-tested path), bf16
//! products with f32 sums when `--dtype bf16` runs on a CPU with AVX512-BF16, or f16 products
//! with f32 sums every 64 products when `--dtype f16` runs on one with AVX512-FP16
//! ([`super::half_gemm`]). Tensors stay f32 either way: weights are rounded as they are packed.

use std::sync::atomic::{AtomicU8, Ordering};

pub use super::half_gemm::{Half, PackedLhs, PackedRhs};
pub use super::mat::{Mat, MatMut};

/// `dst[m, n] = (accumulate ? dst : 0) + alpha * lhs[m, k] x b` with `b` a right operand packed
/// in a half precision ([`PackedRhs::new`]), `dst` row-major.
///
/// # Safety
/// As [`matmul`]; `dst.cs == 1`.
pub unsafe fn matmul_packed_rhs(
    m: usize,
    dst: MatMut,
    accumulate: bool,
    lhs: Mat,
    b: &PackedRhs,
    alpha: f32,
    threads: usize,
) {
    assert_eq!(dst.cs, 1, "matmul_packed_rhs: a row-major destination");
    super::half_gemm::gemm_packed_rhs(m, dst, accumulate, lhs, b, alpha, threads)
}

/// `dst[m, n] = (accumulate ? dst : 0) + alpha * a x rhs[k, n]` on the calling thread, `a` a left
/// operand packed in a half precision ([`PackedLhs::new`]), `dst` row-major.
///
/// # Safety
/// As [`matmul`]; `dst.cs == 1`.
pub unsafe fn matmul_packed_lhs(
    a: &PackedLhs,
    n: usize,
    dst: MatMut,
    accumulate: bool,
    rhs: Mat,
    alpha: f32,
) {
    assert_eq!(dst.cs, 1, "matmul_packed_lhs: a row-major destination");
    super::half_gemm::gemm_packed_lhs(a, n, dst, accumulate, rhs, alpha)
}

/// The process's [`Precision`] (0 f32, 1 bf16, 2 f16).
static PRECISION: AtomicU8 = AtomicU8::new(0);

/// The precision of the CPU kernels' products for this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    /// bf16 products, f32 sums (AVX512-BF16 only).
    Bf16,
    /// f16 products and sums of 64 products, taken into f32 sums (AVX512-FP16 only).
    F16,
}

impl Precision {
    /// The 16-bit float of a half precision (`None` for f32).
    pub fn half(self) -> Option<Half> {
        match self {
            Precision::F32 => None,
            Precision::Bf16 => Some(Half::Bf16),
            Precision::F16 => Some(Half::F16),
        }
    }
}

/// Whether this CPU can compute in [`Precision::Bf16`].
pub fn bf16_supported() -> bool {
    super::half_gemm::supported(Half::Bf16)
}

/// Whether this CPU can compute in [`Precision::F16`].
pub fn f16_supported() -> bool {
    super::half_gemm::supported(Half::F16)
}

/// Sets the precision of every later product (a generation sets it as it starts; generations
/// run one at a time). `Bf16` on a CPU without AVX512-BF16, or `F16` without AVX512-FP16, is an
/// error.
pub fn set_precision(p: Precision) -> Result<(), String> {
    if p == Precision::Bf16 && !bf16_supported() {
        return Err(
            "bf16 on the CPU needs AVX512-BF16 (vdpbf16ps), which this CPU lacks; use --dtype f32"
                .into(),
        );
    }
    if p == Precision::F16 && !f16_supported() {
        return Err(
            "f16 on the CPU needs AVX512-FP16 (vfmadd231ph), which this CPU lacks; use --dtype f32"
                .into(),
        );
    }
    if p == Precision::Bf16 && bf16_at_f32_rate() {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                "bf16 on this Intel CPU is slower than f32: its vdpbf16ps does no more \
                 multiply-adds per cycle than f32 FMAs (measured 1.5x f32's time for an SD1.5 \
                 UNet call on a Xeon, family 6 model 207), and sdctl has no AMX path; \
                 --dtype f32 is faster here{}",
                if f16_supported() {
                    ", and --dtype f16 (AVX512-FP16) faster still"
                } else {
                    ""
                }
            )
        });
    }
    PRECISION.store(p as u8, Ordering::Relaxed);
    Ok(())
}

/// Whether bf16 products are expected to be no faster than f32 ones on this CPU: on Intel's
/// AVX512-BF16 Xeons `vdpbf16ps` issues on one port where f32 FMAs have two, so its two
/// multiply-adds per lane only match them (measured on a family 6 model 207 Xeon: bf16 1.5x
/// slower than f32, its conversions and packing on top); on AMD's Zen 4 it ran twice as fast.
pub fn bf16_at_f32_rate() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: CPUID leaf 0 exists on every x86-64 CPU.
        #[allow(unused_unsafe)]
        let id = unsafe { std::arch::x86_64::__cpuid(0) };
        // the vendor string is EBX, EDX, ECX: "Genu" "ineI" "ntel"
        [id.ebx, id.edx, id.ecx] == [0x756e_6547, 0x4965_6e69, 0x6c65_746e]
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

pub fn precision() -> Precision {
    match PRECISION.load(Ordering::Relaxed) {
        1 => Precision::Bf16,
        2 => Precision::F16,
        _ => Precision::F32,
    }
}

/// rayon's thread count (what a product that may use every thread asks for).
pub fn all_threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// `dst[m, n] = (accumulate ? dst : 0) + alpha * lhs[m, k] x rhs[k, n]` on up to `threads` of
/// rayon's threads (1: the calling thread only), in the process's [`precision`].
///
/// # Safety
/// Every element the strides address (`r < m`, `c < n`, `p < k`) must be valid: readable for
/// `lhs` / `rhs`, writable and aliased by neither for `dst`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: MatMut,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    alpha: f32,
    threads: usize,
) {
    matmul_in(
        precision(),
        m,
        n,
        k,
        dst,
        accumulate,
        lhs,
        rhs,
        alpha,
        threads,
    )
}

/// Whether a product gains from a half precision: its operands are scanned, scaled and
/// converted as they are packed, which only products that reuse each packed value often
/// repay. With 2 threads, f16 against f32: `16 x 262144 x 144` (the ControlNet hint block's
/// first convolution at 512x512) 13-19 against 14.5 ms, `144 x 262144 x 16` (its input
/// gradient) 20 against 16-24 ms; `96 x 16384 x 864` 11 against 20 ms.
fn half_pays(m: usize, n: usize, k: usize) -> bool {
    m.min(n).min(k) >= 32
}

/// [`matmul`] in the given precision (`Bf16` needs [`bf16_supported`], `F16`
/// [`f16_supported`]); a product with a side under 32 runs in f32 whatever the precision
/// (`half_pays`).
///
/// # Safety
/// As [`matmul`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_in(
    precision: Precision,
    m: usize,
    n: usize,
    k: usize,
    dst: MatMut,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    alpha: f32,
    threads: usize,
) {
    if let Some(half) = precision.half().filter(|_| half_pays(m, n, k)) {
        if dst.cs == 1 {
            return super::half_gemm::gemm(
                half, m, n, k, dst, accumulate, lhs, rhs, alpha, threads,
            );
        }
        if dst.rs == 1 {
            // dst^T = rhs^T x lhs^T into a row-major dst^T
            let dt = MatMut::new(dst.ptr(), dst.cs, 1);
            return super::half_gemm::gemm(
                half,
                n,
                m,
                k,
                dt,
                accumulate,
                rhs.t(),
                lhs.t(),
                alpha,
                threads,
            );
        }
    }
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm(
        m,
        n,
        k,
        dst.ptr(),
        dst.cs,
        dst.rs,
        accumulate,
        lhs.ptr(),
        lhs.cs,
        lhs.rs,
        rhs.ptr(),
        rhs.cs,
        rhs.rs,
        1.0,
        alpha,
        false,
        false,
        false,
        par,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A column-major destination goes through the transposed product in each half precision
    /// and gives what the row-major one gives.
    #[test]
    fn column_major_destination_in_half_precision() {
        for (p, ok) in [
            (Precision::Bf16, bf16_supported()),
            (Precision::F16, f16_supported()),
        ] {
            if !ok {
                eprintln!("skipped {p:?}: this CPU lacks its AVX-512 extension");
                continue;
            }
            let (m, n, k) = (37, 90, 41);
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.1)
                .collect();
            let (mut row, mut col) = (vec![0f32; m * n], vec![0f32; m * n]);
            let (l, r) = (
                Mat::new(a.as_ptr(), k as isize, 1),
                Mat::new(b.as_ptr(), n as isize, 1),
            );
            unsafe {
                let d = MatMut::new(row.as_mut_ptr(), n as isize, 1);
                matmul_in(p, m, n, k, d, false, l, r, 1.0, 1);
                let d = MatMut::new(col.as_mut_ptr(), 1, m as isize);
                matmul_in(p, m, n, k, d, false, l, r, 1.0, 1);
            }
            let mut f32s = vec![0f32; m * n];
            unsafe {
                let d = MatMut::new(f32s.as_mut_ptr(), n as isize, 1);
                matmul_in(Precision::F32, m, n, k, d, false, l, r, 1.0, 1);
            }
            // the half path ran: its rounded operands give other sums than f32's
            assert_ne!(row, f32s, "{p:?}");
            for i in 0..m {
                for j in 0..n {
                    assert!((row[i * n + j] - col[j * m + i]).abs() < 1e-5, "{p:?}");
                    // the operands (multiples of 0.1 up to 0.6) lose at most 2^-9 relative to
                    // bf16, 2^-12 to f16
                    assert!(
                        (row[i * n + j] - f32s[i * n + j]).abs() < 0.02,
                        "{p:?} far from f32"
                    );
                }
            }
        }
    }
    /// A product with a side under 32 runs in f32 whatever the precision (see `half_pays`):
    /// bit for bit f32's sums.
    #[test]
    fn small_products_stay_in_f32() {
        for (p, ok) in [
            (Precision::Bf16, bf16_supported()),
            (Precision::F16, f16_supported()),
        ] {
            if !ok {
                continue;
            }
            for (m, n, k) in [(16, 300, 144), (300, 300, 16), (300, 20, 64)] {
                let a: Vec<f32> = (0..m * k).map(|i| (i % 17) as f32 * 0.013 - 0.1).collect();
                let b: Vec<f32> = (0..k * n).map(|i| (i % 23) as f32 * 0.011 - 0.12).collect();
                let (l, r) = (
                    Mat::new(a.as_ptr(), k as isize, 1),
                    Mat::new(b.as_ptr(), n as isize, 1),
                );
                let (mut half, mut f32s) = (vec![0f32; m * n], vec![0f32; m * n]);
                unsafe {
                    let d = MatMut::new(half.as_mut_ptr(), n as isize, 1);
                    matmul_in(p, m, n, k, d, false, l, r, 1.0, 1);
                    let d = MatMut::new(f32s.as_mut_ptr(), n as isize, 1);
                    matmul_in(Precision::F32, m, n, k, d, false, l, r, 1.0, 1);
                }
                assert_eq!(half, f32s, "{p:?} {m}x{n}x{k}");
            }
        }
    }
}
