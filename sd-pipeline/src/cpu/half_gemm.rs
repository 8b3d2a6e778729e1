//! `dst (f32) = (accumulate ? dst : 0) + alpha * lhs x rhs` with both operands rounded to a
//! 16-bit float ([`Half`]) and the products summed in f32:
//! - bf16 (round to nearest even, as `torch.Tensor.to(torch.bfloat16)`), summed in f32 by
//!   AVX512-BF16's `vdpbf16ps` (two bf16 multiply-adds per f32 lane);
//! - f16 (IEEE half, round to nearest even), multiplied and added in f16 by AVX512-FP16's
//!   `vfmadd231ph` (32 lanes: twice the f32 FMA rate on the Xeons that have it), each lane's f16
//!   sum taken into f32 every [`F16_CHUNK`] products. Each sliver of an operand is scaled by a
//!   power of two (exact, undone in `alpha`) so that its largest finite magnitude lies in
//!   (8, 16]: products are at most 2^8 and a lane's f16 sum of [`F16_CHUNK`] of them at most
//!   2^14, so nothing finite overflows f16's 65504, and small values keep f16's precision.
//!
//! Packed as BLIS does (operands are converted while they are packed, so f32 weights serve
//! every precision); the microkernel holds a 6x64 tile in 24 registers and per step of two `k`
//! loads four vectors of the right panel (16 columns x a pair of `k` each) and broadcasts six
//! pairs of the left one.

use super::mat::{Mat, MatMut};
use rayon::prelude::*;
use std::cell::RefCell;

/// Rows of a microkernel tile.
const MR: usize = 6;
/// Columns of a microkernel tile (four vectors of 16 lanes).
const NR: usize = 64;
/// Depth of one packed block, in pairs of `k` (768 values of `k`).
const KC2: usize = 384;
/// Rows of one packed left block.
const MC: usize = 96;
/// Columns of one packed right block (`KC2 x NC` pairs: 6 MiB, in L3): wide, so that the left
/// operand (often the weights) is packed once per call (measured: 1024 repacked it ~4x in a
/// 512x512 UNet call, and packing took a third of the time).
const NC: usize = 4096;
/// Pairs of `k` an f16 lane sums before its sum goes into f32: 64 products per lane (a lane
/// holds one of the pair's two `k`). Measured on one core of a Xeon (family 6 model 207), hot
/// operands: 16 pairs 251, 32 pairs 308, 64 pairs 340, 128 pairs 359 GFLOP/s; f32 FMAs 170.
pub(super) const F16_CHUNK: usize = 64;
/// Length of a thread's conversion buffer: 16 converted runs of a depth block.
const RUN: usize = 16 * KC2 + 16;
/// The largest scaled magnitude of an f16 operand (see the module docs).
const F16_MAX_SCALED: f32 = 16.0;

/// The 16-bit float a product rounds its operands to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    Bf16,
    F16,
}

/// Whether this CPU runs [`gemm`] in `half` (AVX-512F and BW, and AVX512-BF16 or AVX512-FP16).
pub fn supported(half: Half) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && match half {
                Half::Bf16 => std::is_x86_feature_detected!("avx512bf16"),
                Half::F16 => std::is_x86_feature_detected!("avx512fp16"),
            }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = half;
        false
    }
}

/// bf16 bits of `x`, rounded to nearest even (NaN stays a quiet NaN).
pub fn to_bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if x.is_nan() {
        return ((u >> 16) | 0x40) as u16;
    }
    ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// IEEE half bits of `x`, rounded to nearest even (overflow to infinity, subnormals kept, NaN
/// stays a quiet NaN), as `vcvtps2ph` with round-to-nearest.
pub fn to_f16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    let sign = ((u >> 16) & 0x8000) as u16;
    let a = u & 0x7fff_ffff;
    if a > 0x7f80_0000 {
        return sign | 0x7e00 | ((a >> 13) & 0x3ff) as u16;
    }
    if a >= 0x4780_0000 {
        // |x| >= 65536 (or infinite): past the largest half even after rounding
        return sign | 0x7c00;
    }
    if a < 0x3880_0000 {
        // below 2^-14: a subnormal half (or zero); its unit is 2^-24
        let v = f32::from_bits(a) * (1u32 << 24) as f32;
        // exact in f32 below 2^10, rounded to nearest even by the conversion
        let r = v.round_ties_even() as u16;
        return sign | r;
    }
    // normal: rebias the exponent (127 -> 15), round the 13 dropped bits to nearest even; a
    // carry into the exponent is right (and reaches infinity past 65504)
    let m = a - (112 << 23);
    let r = (m + 0xfff + ((m >> 13) & 1)) >> 13;
    sign | r as u16
}

/// `x` as a half of kind `half`, to its bits.
fn half_bits(half: Half, x: f32) -> u16 {
    match half {
        Half::Bf16 => to_bf16_bits(x),
        Half::F16 => to_f16_bits(x),
    }
}

/// The power of two an operand sliver whose largest finite magnitude is `max` is multiplied by
/// before it is rounded to `half` (1 for bf16, whose range is f32's).
fn scale_for(half: Half, max: f32) -> f32 {
    if half == Half::Bf16 || max == 0.0 || !max.is_finite() {
        return 1.0;
    }
    // the largest e with max * 2^e <= F16_MAX_SCALED, within f32's normal powers of two
    let e = (F16_MAX_SCALED / max).log2().floor() as i32;
    let mut s = 2f32.powi(e.clamp(-126, 126));
    while max * s > F16_MAX_SCALED {
        s *= 0.5; // log2 rounded up at a boundary
    }
    s
}

/// [`scale_for`] the `rows x cols` sliver of `mat` from (`r0`, `c0`): scanned in f16 only.
///
/// # Safety
/// As [`finite_max`].
unsafe fn sliver_scale(
    half: Half,
    mat: Mat,
    r0: usize,
    rows: usize,
    c0: usize,
    cols: usize,
) -> f32 {
    match half {
        Half::Bf16 => 1.0,
        Half::F16 => scale_for(half, finite_max(mat, r0, rows, c0, cols)),
    }
}

/// The largest finite |x| over `rows x cols` of `mat` from (`r0`, `c0`) (0 if none), or the
/// bound the caller gave ([`Mat::bounded`]).
///
/// # Safety
/// Every element addressed must be readable.
unsafe fn finite_max(mat: Mat, r0: usize, rows: usize, c0: usize, cols: usize) -> f32 {
    if let Some(b) = mat.bound() {
        return b;
    }
    let p = mat.at(r0, c0);
    #[cfg(target_arch = "x86_64")]
    {
        if mat.cs == 1 {
            return block_max_avx512(p, mat.rs, rows, cols);
        }
        if mat.rs == 1 {
            return block_max_avx512(p, mat.cs, cols, rows);
        }
    }
    let mut m = 0f32;
    for r in 0..rows {
        for c in 0..cols {
            let a = (*p.offset(r as isize * mat.rs + c as isize * mat.cs)).abs();
            if a < f32::INFINITY && a > m {
                m = a;
            }
        }
    }
    m
}

/// [`finite_max`] over `runs` contiguous runs of `len` values, `stride` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block_max_avx512(p: *const f32, stride: isize, runs: usize, len: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 4];
    let step = |m, x| finite_abs_max(m, x);
    for r in 0..runs {
        let p = p.offset(r as isize * stride);
        let mut i = 0;
        while i + 64 <= len {
            for (j, m) in acc.iter_mut().enumerate() {
                *m = step(*m, _mm512_loadu_ps(p.add(i + 16 * j)));
            }
            i += 64;
        }
        let mut j = 0;
        while i < len {
            let mask = if len - i >= 16 {
                0xffff
            } else {
                (1u16 << (len - i)) - 1
            };
            acc[j] = step(acc[j], _mm512_maskz_loadu_ps(mask, p.add(i)));
            (i, j) = (i + 16, (j + 1) % 4);
        }
    }
    let m = _mm512_max_ps(_mm512_max_ps(acc[0], acc[1]), _mm512_max_ps(acc[2], acc[3]));
    _mm512_reduce_max_ps(m)
}

/// `max(m, |x|)` per lane where `x` is finite (NaN compares false): a running maximum that
/// skips infinities and NaNs, as [`finite_max`] does.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn finite_abs_max(
    m: std::arch::x86_64::__m512,
    x: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let a = _mm512_castsi512_ps(_mm512_and_si512(
        _mm512_castps_si512(x),
        _mm512_set1_epi32(0x7fff_ffff),
    ));
    let finite = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(a, _mm512_set1_ps(f32::INFINITY));
    _mm512_mask_max_ps(m, finite, m, a)
}

/// The 16-bit lane order that turns `[h(a) x16, h(b) x16]` into 16 pairs `h(a[c]) | h(b[c]) << 16`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn pair_interleave() -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    )
}

/// `x` rounded to bf16 and back.
#[cfg(test)]
fn round_bf16(x: f32) -> f32 {
    f32::from_bits((to_bf16_bits(x) as u32) << 16)
}

/// The product as described in the module docs, on up to `threads` of rayon's threads.
///
/// # Safety
/// As [`super::matmul::matmul`]; additionally `dst.cs == 1` and [`supported`] is true.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm(
    half: Half,
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
    let (l, r) = (Lhs::Strided(lhs), Rhs::Strided(rhs));
    parallel(half, m, n, k, dst, accumulate, l, r, alpha, threads)
}

/// [`serial`] on up to `threads` of rayon's threads: one part of `dst` per thread, split in whole
/// tiles along the longer side (along the rows for a packed right operand, along the columns for
/// a packed left one).
#[allow(clippy::too_many_arguments)]
unsafe fn parallel(
    half: Half,
    m: usize,
    n: usize,
    k: usize,
    dst: MatMut,
    accumulate: bool,
    lhs: Lhs,
    rhs: Rhs,
    alpha: f32,
    threads: usize,
) {
    debug_assert!(dst.cs == 1 && supported(half));
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let threads = if m * n * k < 1 << 18 {
        1
    } else {
        threads.max(1)
    };
    let by_rows = match (lhs, rhs) {
        (Lhs::Packed(_), _) => false,
        (_, Rhs::Packed(_)) => true,
        _ => m >= n,
    };
    match (lhs, rhs) {
        _ if threads == 1 => serial(half, m, n, k, dst, accumulate, lhs, rhs, alpha),
        (Lhs::Strided(l), _) if by_rows => {
            let step = m.div_ceil(threads).div_ceil(MR) * MR;
            (0..m.div_ceil(step)).into_par_iter().for_each(|t| {
                let (r0, d) = (t * step, dst.offset(t * step, 0));
                let l = Lhs::Strided(l.offset(r0, 0));
                serial(half, step.min(m - r0), n, k, d, accumulate, l, rhs, alpha);
            });
        }
        (_, Rhs::Strided(r)) => {
            let step = n.div_ceil(threads).div_ceil(NR) * NR;
            (0..n.div_ceil(step)).into_par_iter().for_each(|t| {
                let (c0, d) = (t * step, dst.offset(0, t * step));
                let r = Rhs::Strided(r.offset(0, c0));
                serial(half, m, step.min(n - c0), k, d, accumulate, lhs, r, alpha);
            });
        }
        _ => unreachable!("both operands packed"),
    }
}

thread_local! {
    /// Packing buffers of this thread (left block, right block, one converted run), grown on
    /// demand, kept between calls.
    static PACK: RefCell<[AlignedBuf; 3]> = RefCell::new(Default::default());
}

/// u32 storage (a pair of halves each) whose usable part starts on a 64-byte boundary.
#[derive(Default)]
struct AlignedBuf {
    raw: Vec<u32>,
}

impl AlignedBuf {
    fn get(&mut self, len: usize) -> &mut [u32] {
        if self.raw.len() < len + 16 {
            self.raw = vec![0; len + 16];
        }
        let off = self.raw.as_ptr().align_offset(64).min(15);
        &mut self.raw[off..off + len]
    }

    /// The first `len` values [`AlignedBuf::get`] gave.
    fn slice(&self, len: usize) -> &[u32] {
        let off = self.raw.as_ptr().align_offset(64).min(15);
        &self.raw[off..off + len]
    }
}

/// A left operand converted and packed once, for products that reuse it (attention's keys and
/// values across its blocks of queries): the blocks in the order [`serial`] reads them, and
/// each sliver's inverse scale.
pub struct PackedLhs {
    half: Half,
    m: usize,
    k: usize,
    data: Vec<u32>,
    /// Per depth block, per sliver of `MR` rows.
    inv: Vec<f32>,
}

impl PackedLhs {
    /// Packs `lhs[m, k]` in `half`.
    ///
    /// # Safety
    /// Every element the strides address must be readable; [`supported`] must be true.
    pub unsafe fn new(half: Half, lhs: Mat, m: usize, k: usize) -> Self {
        let (k2, m_pad) = (k.div_ceil(2), m.div_ceil(MR) * MR);
        let slivers = m_pad / MR;
        let mut data = vec![0u32; k2 * m_pad];
        let mut inv = vec![1f32; k2.div_ceil(KC2) * slivers];
        PACK.with_borrow_mut(|[_, _, run]| {
            let run = run.get(RUN);
            for q0 in (0..k2).step_by(KC2) {
                let kc2 = KC2.min(k2 - q0);
                let (p0, kc) = (2 * q0, (2 * kc2).min(k - 2 * q0));
                for i0 in (0..m).step_by(MC) {
                    let mc = MC.min(m - i0);
                    let at = q0 * m_pad + kc2 * i0;
                    let len = kc2 * mc.div_ceil(MR) * MR;
                    let s = (q0 / KC2) * slivers + i0 / MR;
                    let inv = &mut inv[s..s + mc.div_ceil(MR)];
                    pack_lhs(half, lhs, i0, mc, p0, kc, &mut data[at..at + len], inv, run);
                }
            }
        });
        Self {
            half,
            m,
            k,
            data,
            inv,
        }
    }

    fn block(&self, q0: usize, kc2: usize, i0: usize) -> (&[u32], &[f32]) {
        let slivers = self.m.div_ceil(MR);
        let at = q0 * slivers * MR + kc2 * i0;
        let s = (q0 / KC2) * slivers + i0 / MR;
        (&self.data[at..], &self.inv[s..])
    }
}

/// A right operand converted and packed once (a linear layer's weights, kept by the layer): the
/// blocks in the order [`serial`] reads them, 64-byte aligned, and each sliver's inverse scale.
pub struct PackedRhs {
    half: Half,
    k: usize,
    n: usize,
    data: AlignedBuf,
    /// Per depth block, per sliver of `NR` columns.
    inv: Vec<f32>,
}

impl PackedRhs {
    /// Packs `rhs[k, n]` in `half`.
    ///
    /// # Safety
    /// Every element the strides address must be readable; [`supported`] must be true.
    pub unsafe fn new(half: Half, rhs: Mat, k: usize, n: usize) -> Self {
        let (k2, n_pad) = (k.div_ceil(2), n.div_ceil(NR) * NR);
        let slivers = n_pad / NR;
        let mut data = AlignedBuf::default();
        let mut inv = vec![1f32; k2.div_ceil(KC2) * slivers];
        let buf = data.get(k2 * n_pad);
        PACK.with_borrow_mut(|[_, _, run]| {
            let run = run.get(RUN);
            for j0 in (0..n).step_by(NC) {
                let nc = NC.min(n - j0);
                for q0 in (0..k2).step_by(KC2) {
                    let kc2 = KC2.min(k2 - q0);
                    let (p0, kc) = (2 * q0, (2 * kc2).min(k - 2 * q0));
                    let at = j0 * k2 + q0 * nc.div_ceil(NR) * NR;
                    let len = kc2 * nc.div_ceil(NR) * NR;
                    let s = (q0 / KC2) * slivers + j0 / NR;
                    let inv = &mut inv[s..s + nc.div_ceil(NR)];
                    pack_rhs(half, rhs, p0, kc, j0, nc, &mut buf[at..at + len], inv, run);
                }
            }
        });
        Self {
            half,
            k,
            n,
            data,
            inv,
        }
    }

    /// Depth and width (`k`, `n`).
    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// The 16-bit float it was packed in.
    pub fn half(&self) -> Half {
        self.half
    }

    fn block(&self, j0: usize, q0: usize) -> (&[u32], &[f32]) {
        let (k2, nc) = (self.k.div_ceil(2), NC.min(self.n - j0));
        let slivers = self.n.div_ceil(NR);
        let at = j0 * k2 + q0 * nc.div_ceil(NR) * NR;
        let s = (q0 / KC2) * slivers + j0 / NR;
        let data = self.data.slice(k2 * slivers * NR);
        (&data[at..], &self.inv[s..])
    }
}

/// [`gemm`] with a packed right operand: `dst[m, b.n] (+)= alpha * lhs[m, b.k] x b`, rows split
/// over up to `threads` of rayon's threads, in the precision `b` was packed in.
///
/// # Safety
/// As [`gemm`].
pub(super) unsafe fn gemm_packed_rhs(
    m: usize,
    dst: MatMut,
    accumulate: bool,
    lhs: Mat,
    b: &PackedRhs,
    alpha: f32,
    threads: usize,
) {
    let (l, r) = (Lhs::Strided(lhs), Rhs::Packed(b));
    parallel(b.half, m, b.n, b.k, dst, accumulate, l, r, alpha, threads)
}

/// A right operand as given, or packed beforehand.
#[derive(Clone, Copy)]
enum Rhs<'a> {
    Strided(Mat),
    Packed(&'a PackedRhs),
}

/// A left operand as given, or packed beforehand.
#[derive(Clone, Copy)]
enum Lhs<'a> {
    Strided(Mat),
    Packed(&'a PackedLhs),
}

/// [`gemm`] with a packed left operand, on the calling thread, in the precision `a` was packed
/// in.
///
/// # Safety
/// As [`gemm`], for `dst[a.m, n]` and `rhs[a.k, n]`.
pub(super) unsafe fn gemm_packed_lhs(
    a: &PackedLhs,
    n: usize,
    dst: MatMut,
    accumulate: bool,
    rhs: Mat,
    alpha: f32,
) {
    let (l, r) = (Lhs::Packed(a), Rhs::Strided(rhs));
    parallel(a.half, a.m, n, a.k, dst, accumulate, l, r, alpha, 1)
}

#[allow(clippy::too_many_arguments)]
unsafe fn serial(
    half: Half,
    m: usize,
    n: usize,
    k: usize,
    dst: MatMut,
    accumulate: bool,
    lhs: Lhs,
    rhs: Rhs,
    alpha: f32,
) {
    let k2 = k.div_ceil(2);
    // inverse scales of the slivers packed here
    let (mut binv, mut ainv) = ([1f32; NC / NR], [1f32; MC / MR]);
    PACK.with_borrow_mut(|[abuf, bbuf, run]| {
        let kc2_max = KC2.min(k2);
        let bp_buf = bbuf.get(kc2_max * NC.min(n.div_ceil(NR) * NR));
        let ap_buf = abuf.get(kc2_max * MC.min(m.div_ceil(MR) * MR));
        let run = run.get(RUN);
        for j0 in (0..n).step_by(NC) {
            let nc = NC.min(n - j0);
            for q0 in (0..k2).step_by(KC2) {
                let kc2 = KC2.min(k2 - q0);
                let (p0, kc) = (2 * q0, (2 * kc2).min(k - 2 * q0));
                let load = accumulate || q0 > 0;
                let (bp, bi): (&[u32], &[f32]) = match rhs {
                    Rhs::Strided(r) => {
                        pack_rhs(half, r, p0, kc, j0, nc, bp_buf, &mut binv, run);
                        (bp_buf, &binv)
                    }
                    Rhs::Packed(b) => b.block(j0, q0),
                };
                for i0 in (0..m).step_by(MC) {
                    let mc = MC.min(m - i0);
                    let (ap, ai): (&[u32], &[f32]) = match lhs {
                        Lhs::Strided(l) => {
                            pack_lhs(half, l, i0, mc, p0, kc, ap_buf, &mut ainv, run);
                            (ap_buf, &ainv)
                        }
                        Lhs::Packed(a) => a.block(q0, kc2, i0),
                    };
                    for (js, b_inv) in bi[..nc.div_ceil(NR)].iter().enumerate() {
                        let bsl = bp.as_ptr().add(js * kc2 * NR);
                        let cols = NR.min(nc - js * NR);
                        for (is, a_inv) in ai[..mc.div_ceil(MR)].iter().enumerate() {
                            let asl = ap.as_ptr().add(is * kc2 * MR);
                            let rows = MR.min(mc - is * MR);
                            let c = dst.at(i0 + is * MR, j0 + js * NR);
                            let al = alpha * a_inv * b_inv;
                            if rows == MR && cols == NR {
                                kernel(half, kc2, asl, bsl, c, dst.rs, al, load);
                            } else {
                                let mut tile = [0f32; MR * NR];
                                let t = tile.as_mut_ptr();
                                kernel(half, kc2, asl, bsl, t, NR as isize, al, false);
                                for r in 0..rows {
                                    let cr = c.offset(r as isize * dst.rs);
                                    for (q, v) in tile[r * NR..r * NR + cols].iter().enumerate() {
                                        let d = cr.add(q);
                                        *d = if load { *d + v } else { *v };
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    });
}

/// `len` values at `src` (stride `step`), times `scale`, as pairs of halves into
/// `out[..len.div_ceil(2)]`, the last pair's high half zero when `len` is odd.
unsafe fn convert_run(
    half: Half,
    src: *const f32,
    step: isize,
    len: usize,
    scale: f32,
    out: &mut [u32],
) {
    if step == 1 {
        return convert_contiguous(half, src, len, scale, out);
    }
    convert_scalar(half, src, step, len, scale, out)
}

unsafe fn convert_scalar(
    half: Half,
    src: *const f32,
    step: isize,
    len: usize,
    scale: f32,
    out: &mut [u32],
) {
    for (q, o) in out[..len.div_ceil(2)].iter_mut().enumerate() {
        let lo = half_bits(half, *src.offset(2 * q as isize * step) * scale) as u32;
        let hi = if 2 * q + 1 < len {
            half_bits(half, *src.offset((2 * q + 1) as isize * step) * scale) as u32
        } else {
            0
        };
        *o = lo | hi << 16;
    }
}

/// 32 halves of `a` (low 16) then `b` (high 16), each times `scale`, in order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
unsafe fn convert_bf16x32(
    a: std::arch::x86_64::__m512,
    b: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    // cvtne2ps puts its second operand low
    std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(b, a))
}

/// As [`convert_bf16x32`], to f16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn convert_f16x32(
    a: std::arch::x86_64::__m512,
    b: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    const RNE: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    let lo = _mm512_cvtps_ph::<RNE>(a);
    let hi = _mm512_cvtps_ph::<RNE>(b);
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
}

/// `a` and `b` (times `scale` for f16) as 32 halves of kind `half`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn convert_x32(
    half: Half,
    a: std::arch::x86_64::__m512,
    b: std::arch::x86_64::__m512,
    scale: f32,
) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    match half {
        Half::Bf16 => convert_bf16x32(a, b),
        Half::F16 => {
            let s = _mm512_set1_ps(scale);
            convert_f16x32(_mm512_mul_ps(a, s), _mm512_mul_ps(b, s))
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn convert_contiguous(half: Half, src: *const f32, len: usize, scale: f32, out: &mut [u32]) {
    use std::arch::x86_64::*;
    let mut i = 0;
    while i + 32 <= len {
        let a = _mm512_loadu_ps(src.add(i));
        let b = _mm512_loadu_ps(src.add(i + 16));
        _mm512_storeu_si512(
            out.as_mut_ptr().add(i / 2).cast(),
            convert_x32(half, a, b, scale),
        );
        i += 32;
    }
    if i < len {
        convert_scalar(half, src.add(i), 1, len - i, scale, &mut out[i / 2..]);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn convert_contiguous(half: Half, src: *const f32, len: usize, scale: f32, out: &mut [u32]) {
    convert_scalar(half, src, 1, len, scale, out)
}

/// `bp` = slivers of `NR` columns: per pair of `k`, `NR` lanes of (low: even k, high: odd k),
/// zero past `nc` and past `kc`; `inv[js]` = the inverse of sliver `js`'s scale.
#[allow(clippy::too_many_arguments)]
unsafe fn pack_rhs(
    half: Half,
    rhs: Mat,
    p0: usize,
    kc: usize,
    j0: usize,
    nc: usize,
    bp: &mut [u32],
    inv: &mut [f32],
    run: &mut [u32],
) {
    let kc2 = kc.div_ceil(2);
    for js in 0..nc.div_ceil(NR) {
        let cols = NR.min(nc - js * NR);
        let out = &mut bp[js * kc2 * NR..(js + 1) * kc2 * NR];
        let c0 = j0 + js * NR;
        let scale = sliver_scale(half, rhs, p0, kc, c0, cols);
        inv[js] = 1.0 / scale;
        if cols < NR {
            out.fill(0);
        }
        if rhs.cs == 1 {
            // two rows of k at a time, interleaved lane by lane
            for q in 0..kc2 {
                let r0 = rhs.at(p0 + 2 * q, c0);
                let r1 = (2 * q + 1 < kc).then(|| rhs.at(p0 + 2 * q + 1, c0));
                pack_row_pair(
                    half,
                    r0,
                    r1,
                    cols,
                    scale,
                    &mut out[q * NR..(q + 1) * NR],
                    run,
                );
            }
        } else {
            // 16 columns of k at a time (each contiguous when rhs is a transposed row-major
            // matrix: a linear layer's weight), then written a pair of k (16 lanes) at a time
            for g in (0..cols).step_by(16) {
                let gc = 16.min(cols - g);
                for (c, t) in run.chunks_exact_mut(kc2).take(gc).enumerate() {
                    convert_run(half, rhs.at(p0, c0 + g + c), rhs.rs, kc, scale, t);
                }
                for q in 0..kc2 {
                    let o = &mut out[q * NR + g..q * NR + g + gc];
                    for (c, v) in o.iter_mut().enumerate() {
                        *v = run[c * kc2 + q];
                    }
                }
            }
        }
    }
}

/// `o[c] = h(r0[c]) | h(r1[c]) << 16` for `c < cols` (`r1` absent: zero), `h` the scaled half.
unsafe fn pack_row_pair(
    half: Half,
    r0: *const f32,
    r1: Option<*const f32>,
    cols: usize,
    scale: f32,
    o: &mut [u32],
    run: &mut [u32],
) {
    #[cfg(target_arch = "x86_64")]
    if cols.is_multiple_of(16) {
        return pack_row_pair_avx512(half, r0, r1, cols, scale, o);
    }
    let (even, odd) = run.split_at_mut(NR / 2 + 8);
    convert_contiguous(half, r0, cols, scale, even);
    match r1 {
        Some(r1) => convert_contiguous(half, r1, cols, scale, odd),
        None => odd[..cols.div_ceil(2)].fill(0),
    }
    for (c, v) in o[..cols].iter_mut().enumerate() {
        let e = (even[c / 2] >> (16 * (c % 2))) & 0xffff;
        let d = (odd[c / 2] >> (16 * (c % 2))) & 0xffff;
        *v = e | d << 16;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_row_pair_avx512(
    half: Half,
    r0: *const f32,
    r1: Option<*const f32>,
    cols: usize,
    scale: f32,
    o: &mut [u32],
) {
    use std::arch::x86_64::*;
    let idx = pair_interleave();
    for c in (0..cols).step_by(16) {
        let a = _mm512_loadu_ps(r0.add(c));
        let b = r1.map_or(_mm512_setzero_ps(), |r1| _mm512_loadu_ps(r1.add(c)));
        let v = convert_x32(half, a, b, scale);
        _mm512_storeu_si512(
            o.as_mut_ptr().add(c).cast(),
            _mm512_permutexvar_epi16(idx, v),
        );
    }
}

/// `ap` = slivers of `MR` rows: per pair of `k`, `MR` pairs, zero past `mc` and past `kc`;
/// `inv[is]` = the inverse of sliver `is`'s scale.
#[allow(clippy::too_many_arguments)]
unsafe fn pack_lhs(
    half: Half,
    lhs: Mat,
    i0: usize,
    mc: usize,
    p0: usize,
    kc: usize,
    ap: &mut [u32],
    inv: &mut [f32],
    run: &mut [u32],
) {
    #[cfg(target_arch = "x86_64")]
    if lhs.rs == 1 && lhs.cs != 1 {
        // a column-major (transposed) operand: each `k` is a contiguous run of rows
        return pack_lhs_columns_avx512(half, lhs, i0, mc, p0, kc, ap, inv);
    }
    let kc2 = kc.div_ceil(2);
    for is in 0..mc.div_ceil(MR) {
        let rows = MR.min(mc - is * MR);
        let out = &mut ap[is * kc2 * MR..(is + 1) * kc2 * MR];
        let r0 = i0 + is * MR;
        let scale = sliver_scale(half, lhs, r0, rows, p0, kc);
        inv[is] = 1.0 / scale;
        if rows < MR {
            out.fill(0);
        }
        for r in 0..rows {
            convert_run(half, lhs.at(r0 + r, p0), lhs.cs, kc, scale, run);
            for (q, v) in run[..kc2].iter().enumerate() {
                *out.get_unchecked_mut(q * MR + r) = *v;
            }
        }
    }
}

/// [`pack_lhs`] of a column-major `lhs` (`rs == 1`: a transposed row-major matrix, as the
/// gradients' products read weights and activations): 16 rows of a pair of `k` are loaded,
/// scaled per row by their sliver's scale, converted and interleaved at once (the strided
/// path converts one value at a time). The same values as [`pack_lhs`]'s other path.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[allow(clippy::too_many_arguments)]
unsafe fn pack_lhs_columns_avx512(
    half: Half,
    lhs: Mat,
    i0: usize,
    mc: usize,
    p0: usize,
    kc: usize,
    ap: &mut [u32],
    inv: &mut [f32],
) {
    use std::arch::x86_64::*;
    debug_assert!(lhs.rs == 1 && mc <= MC);
    let (kc2, slivers, vecs) = (kc.div_ceil(2), mc.div_ceil(MR), mc.div_ceil(16));
    let mask = |v: usize| -> __mmask16 {
        match mc - 16 * v {
            left if left >= 16 => 0xffff,
            left => (1u16 << left) - 1,
        }
    };
    // each row's lane holds its sliver's scale
    let mut scale = [1f32; MC];
    inv[..slivers].fill(1.0);
    if half == Half::F16 {
        let mut rowmax = [0f32; MC];
        match lhs.bound() {
            Some(b) => rowmax.fill(b),
            None => {
                let mut acc = [_mm512_setzero_ps(); MC / 16];
                for p in 0..kc {
                    let col = lhs.at(i0, p0 + p);
                    for (v, m) in acc[..vecs].iter_mut().enumerate() {
                        let x = _mm512_maskz_loadu_ps(mask(v), col.add(16 * v));
                        *m = finite_abs_max(*m, x);
                    }
                }
                for (v, m) in acc[..vecs].iter().enumerate() {
                    _mm512_storeu_ps(rowmax.as_mut_ptr().add(16 * v), *m);
                }
            }
        }
        for (is, inv) in inv[..slivers].iter_mut().enumerate() {
            let rows = is * MR..(is * MR + MR).min(mc);
            let max = rowmax[rows.clone()].iter().fold(0f32, |a, &b| a.max(b));
            let s = scale_for(half, max);
            *inv = 1.0 / s;
            scale[rows].fill(s);
        }
    }
    if !mc.is_multiple_of(MR) {
        ap[(slivers - 1) * kc2 * MR..slivers * kc2 * MR].fill(0);
    }
    let idx = pair_interleave();
    let mut pairs = [0u32; 16];
    for q in 0..kc2 {
        let c0 = lhs.at(i0, p0 + 2 * q);
        let c1 = (2 * q + 1 < kc).then(|| lhs.at(i0, p0 + 2 * q + 1));
        for v in 0..vecs {
            let s = _mm512_loadu_ps(scale.as_ptr().add(16 * v));
            let a = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask(v), c0.add(16 * v)), s);
            let b = c1.map_or(_mm512_setzero_ps(), |c1| {
                _mm512_mul_ps(_mm512_maskz_loadu_ps(mask(v), c1.add(16 * v)), s)
            });
            let h = match half {
                Half::Bf16 => convert_bf16x32(a, b),
                Half::F16 => convert_f16x32(a, b),
            };
            _mm512_storeu_si512(pairs.as_mut_ptr().cast(), _mm512_permutexvar_epi16(idx, h));
            for (j, pair) in pairs[..16.min(mc - 16 * v)].iter().enumerate() {
                let r = 16 * v + j;
                *ap.get_unchecked_mut((r / MR) * kc2 * MR + q * MR + r % MR) = *pair;
            }
        }
    }
}

/// `c[MR, NR] (row stride rsc) = (load ? c : 0) + alpha * a_sliver x b_sliver` over `kc2`
/// pairs of `k`, in `half`.
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
    half: Half,
    kc2: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    rsc: isize,
    alpha: f32,
    load: bool,
) {
    match half {
        Half::Bf16 => kernel_bf16(kc2, a, b, c, rsc, alpha, load),
        Half::F16 => kernel_f16(kc2, a, b, c, rsc, alpha, load),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel_bf16(
    kc2: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    rsc: isize,
    alpha: f32,
    load: bool,
) {
    use std::arch::x86_64::*;
    const NV: usize = NR / 16;
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    let (mut a, mut b) = (a, b);
    for _ in 0..kc2 {
        let bv: [__m512bh; NV] = std::array::from_fn(|h| {
            std::mem::transmute::<__m512i, __m512bh>(_mm512_load_si512(b.add(16 * h).cast()))
        });
        for (r, row) in acc.iter_mut().enumerate() {
            let av = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(*a.add(r) as i32));
            for (h, v) in row.iter_mut().enumerate() {
                *v = _mm512_dpbf16_ps(*v, av, bv[h]);
            }
        }
        a = a.add(MR);
        b = b.add(NR);
    }
    let al = _mm512_set1_ps(alpha);
    for (r, row) in acc.iter().enumerate() {
        let cr = c.offset(r as isize * rsc);
        for (h, v) in row.iter().enumerate() {
            let p = cr.add(16 * h);
            let mut y = _mm512_mul_ps(*v, al);
            if load {
                y = _mm512_add_ps(_mm512_loadu_ps(p), y);
            }
            _mm512_storeu_ps(p, y);
        }
    }
}

/// The f16 kernel: per chunk of [`F16_CHUNK`] pairs, 24 registers of 32 f16 sums (16 columns x
/// the pair's even and odd `k`) in `vfmadd231ph`, then taken into an f32 tile kept as pairs;
/// at the end each column's two sums are added.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512fp16")]
unsafe fn kernel_f16(
    kc2: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    rsc: isize,
    alpha: f32,
    load: bool,
) {
    use std::arch::asm;
    use std::arch::x86_64::*;
    // pairs[r][2h + half]: row r, vector h of the tile, its low / high 8 columns as (even, odd)
    let mut pairs = [[_mm512_setzero_ps(); 2 * NR / 16]; MR];
    let (mut a, mut b) = (a, b);
    let mut left = kc2;
    while left > 0 {
        let n = left.min(F16_CHUNK);
        let mut acc = [_mm512_setzero_si512(); MR * NR / 16];
        // SAFETY: reads n pairs of the slivers (n * MR u32 of a, n * NR of b, 64-byte aligned:
        // packed buffers start aligned and every sliver is a multiple of 64 bytes long).
        asm!(
            "vpxord zmm0, zmm0, zmm0", "vpxord zmm1, zmm1, zmm1", "vpxord zmm2, zmm2, zmm2",
            "vpxord zmm3, zmm3, zmm3", "vpxord zmm4, zmm4, zmm4", "vpxord zmm5, zmm5, zmm5",
            "vpxord zmm6, zmm6, zmm6", "vpxord zmm7, zmm7, zmm7", "vpxord zmm8, zmm8, zmm8",
            "vpxord zmm9, zmm9, zmm9", "vpxord zmm10, zmm10, zmm10", "vpxord zmm11, zmm11, zmm11",
            "vpxord zmm12, zmm12, zmm12", "vpxord zmm13, zmm13, zmm13", "vpxord zmm14, zmm14, zmm14",
            "vpxord zmm15, zmm15, zmm15", "vpxord zmm16, zmm16, zmm16", "vpxord zmm17, zmm17, zmm17",
            "vpxord zmm18, zmm18, zmm18", "vpxord zmm19, zmm19, zmm19", "vpxord zmm20, zmm20, zmm20",
            "vpxord zmm21, zmm21, zmm21", "vpxord zmm22, zmm22, zmm22", "vpxord zmm23, zmm23, zmm23",
            "2:",
            "prefetcht0 [{b} + 2048]", "prefetcht0 [{b} + 2112]",
            "prefetcht0 [{b} + 2176]", "prefetcht0 [{b} + 2240]",
            "prefetcht0 [{a} + 192]",
            "vmovdqu64 zmm24, [{b}]", "vmovdqu64 zmm25, [{b} + 64]",
            "vmovdqu64 zmm26, [{b} + 128]", "vmovdqu64 zmm27, [{b} + 192]",
            "vpbroadcastd zmm28, [{a}]", "vpbroadcastd zmm29, [{a} + 4]",
            "vfmadd231ph zmm0, zmm28, zmm24", "vfmadd231ph zmm1, zmm28, zmm25",
            "vfmadd231ph zmm2, zmm28, zmm26", "vfmadd231ph zmm3, zmm28, zmm27",
            "vfmadd231ph zmm4, zmm29, zmm24", "vfmadd231ph zmm5, zmm29, zmm25",
            "vfmadd231ph zmm6, zmm29, zmm26", "vfmadd231ph zmm7, zmm29, zmm27",
            "vpbroadcastd zmm30, [{a} + 8]", "vpbroadcastd zmm31, [{a} + 12]",
            "vfmadd231ph zmm8, zmm30, zmm24", "vfmadd231ph zmm9, zmm30, zmm25",
            "vfmadd231ph zmm10, zmm30, zmm26", "vfmadd231ph zmm11, zmm30, zmm27",
            "vfmadd231ph zmm12, zmm31, zmm24", "vfmadd231ph zmm13, zmm31, zmm25",
            "vfmadd231ph zmm14, zmm31, zmm26", "vfmadd231ph zmm15, zmm31, zmm27",
            "vpbroadcastd zmm28, [{a} + 16]", "vpbroadcastd zmm29, [{a} + 20]",
            "vfmadd231ph zmm16, zmm28, zmm24", "vfmadd231ph zmm17, zmm28, zmm25",
            "vfmadd231ph zmm18, zmm28, zmm26", "vfmadd231ph zmm19, zmm28, zmm27",
            "vfmadd231ph zmm20, zmm29, zmm24", "vfmadd231ph zmm21, zmm29, zmm25",
            "vfmadd231ph zmm22, zmm29, zmm26", "vfmadd231ph zmm23, zmm29, zmm27",
            "add {a}, 24", "add {b}, 256", "dec {n}", "jnz 2b",
            a = inout(reg) a, b = inout(reg) b, n = inout(reg) n => _,
            out("zmm0") acc[0], out("zmm1") acc[1], out("zmm2") acc[2], out("zmm3") acc[3],
            out("zmm4") acc[4], out("zmm5") acc[5], out("zmm6") acc[6], out("zmm7") acc[7],
            out("zmm8") acc[8], out("zmm9") acc[9], out("zmm10") acc[10], out("zmm11") acc[11],
            out("zmm12") acc[12], out("zmm13") acc[13], out("zmm14") acc[14], out("zmm15") acc[15],
            out("zmm16") acc[16], out("zmm17") acc[17], out("zmm18") acc[18], out("zmm19") acc[19],
            out("zmm20") acc[20], out("zmm21") acc[21], out("zmm22") acc[22], out("zmm23") acc[23],
            out("zmm24") _, out("zmm25") _, out("zmm26") _, out("zmm27") _,
            out("zmm28") _, out("zmm29") _, out("zmm30") _, out("zmm31") _,
            options(nostack, readonly),
        );
        for (i, v) in acc.iter().enumerate() {
            let p = &mut pairs[i / 4][2 * (i % 4)..];
            p[0] = _mm512_add_ps(p[0], _mm512_cvtph_ps(_mm512_castsi512_si256(*v)));
            p[1] = _mm512_add_ps(p[1], _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(*v)));
        }
        left -= n;
    }
    // lanes (even, odd) of 8 columns in each of lo / hi: the evens and the odds of both
    let even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    let odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    let al = _mm512_set1_ps(alpha);
    for (r, row) in pairs.iter().enumerate() {
        let cr = c.offset(r as isize * rsc);
        for h in 0..NR / 16 {
            let (lo, hi) = (row[2 * h], row[2 * h + 1]);
            let s = _mm512_add_ps(
                _mm512_permutex2var_ps(lo, even, hi),
                _mm512_permutex2var_ps(lo, odd, hi),
            );
            let p = cr.add(16 * h);
            let mut y = _mm512_mul_ps(s, al);
            if load {
                y = _mm512_add_ps(_mm512_loadu_ps(p), y);
            }
            _mm512_storeu_ps(p, y);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel_bf16(
    _: usize,
    _: *const u32,
    _: *const u32,
    _: *mut f32,
    _: isize,
    _: f32,
    _: bool,
) {
    unreachable!("bf16 gemm without AVX512-BF16")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel_f16(
    _: usize,
    _: *const u32,
    _: *const u32,
    _: *mut f32,
    _: isize,
    _: f32,
    _: bool,
) {
    unreachable!("f16 gemm without AVX512-FP16")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_values as values;

    /// The halves this CPU runs (the tests of one that it lacks are skipped, saying so).
    fn halves() -> Vec<Half> {
        let all = [Half::Bf16, Half::F16];
        for h in all.iter().filter(|h| !supported(**h)) {
            eprintln!("skipped {h:?}: this CPU lacks its AVX-512 extension");
        }
        all.into_iter().filter(|h| supported(*h)).collect()
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        // 1 + 2^-8 lies halfway between bf16 1 and 1 + 2^-7: the even one (1) wins
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(round_bf16(-2.5), -2.5);
        assert!(round_bf16(f32::NAN).is_nan());
        assert_eq!(round_bf16(f32::INFINITY), f32::INFINITY);
    }

    /// IEEE half bits from the standard's encoding (sign, 5-bit exponent biased by 15, 10-bit
    /// fraction): ties to even, the largest half, overflow, subnormals, NaN.
    #[test]
    fn f16_bits_are_ieee_half_rounded_to_nearest_even() {
        assert_eq!(to_f16_bits(1.0), 0x3c00);
        assert_eq!(to_f16_bits(-2.0), 0xc000);
        // 1 + 2^-11 is halfway between 1 and 1 + 2^-10: even (1) wins; 1 + 3 * 2^-11 rounds up
        assert_eq!(to_f16_bits(1.0 + 2f32.powi(-11)), 0x3c00);
        assert_eq!(to_f16_bits(1.0 + 3.0 * 2f32.powi(-11)), 0x3c02);
        assert_eq!(to_f16_bits(65504.0), 0x7bff);
        // 65520 is halfway between 65504 and 2^16: rounds to even, past the largest: infinity
        assert_eq!(to_f16_bits(65519.0), 0x7bff);
        assert_eq!(to_f16_bits(65520.0), 0x7c00);
        assert_eq!(to_f16_bits(-1e9), 0xfc00);
        assert_eq!(to_f16_bits(f32::INFINITY), 0x7c00);
        assert_eq!(to_f16_bits(2f32.powi(-14)), 0x0400); // smallest normal
        assert_eq!(to_f16_bits(2f32.powi(-24)), 0x0001); // smallest subnormal
        assert_eq!(to_f16_bits(2f32.powi(-25)), 0x0000); // a tie: to even (zero)
        assert_eq!(to_f16_bits(3.0 * 2f32.powi(-25)), 0x0002);
        assert_eq!(to_f16_bits(-0.0), 0x8000);
        assert_eq!(to_f16_bits(f32::NAN) & 0x7e00, 0x7e00);
        // the vector conversion the packing uses agrees with the scalar one everywhere tested
        #[cfg(target_arch = "x86_64")]
        if supported(Half::F16) {
            let xs: Vec<f32> = values(4096, 9)
                .iter()
                .enumerate()
                .map(|(i, v)| v * 2f32.powi(i as i32 % 48 - 30))
                .collect();
            let mut out = vec![0u32; 2048];
            unsafe { convert_contiguous(Half::F16, xs.as_ptr(), xs.len(), 1.0, &mut out) };
            for (i, x) in xs.iter().enumerate() {
                let got = (out[i / 2] >> (16 * (i % 2))) as u16;
                assert_eq!(got, to_f16_bits(*x), "{x}");
            }
        }
    }

    /// The power-of-two scale puts a sliver's largest finite magnitude in (8, 16].
    #[test]
    fn f16_scales_put_the_largest_magnitude_in_8_to_16() {
        for max in [
            1e-30f32, 3e-5, 0.49, 1.0, 16.0, 16.5, 32.0, 33.0, 1000.0, 6e4, 3e38,
        ] {
            let s = scale_for(Half::F16, max);
            assert_eq!(s.log2().fract(), 0.0, "{s} is a power of two");
            if max > 1e-30 {
                assert!(max * s > 8.0 && max * s <= 16.0, "{max} x {s}");
            }
        }
        assert_eq!(scale_for(Half::F16, 0.0), 1.0);
        assert_eq!(scale_for(Half::F16, f32::INFINITY), 1.0);
        assert_eq!(scale_for(Half::Bf16, 1000.0), 1.0);
    }

    /// A packed left operand gives what the strided one gives, across several depth blocks and
    /// row blocks (k over 2 * KC2, m over MC), transposed as attention's values are.
    #[test]
    fn packed_left_operand_equals_strided() {
        for half in halves() {
            let (m, n, k) = (203, 77, 1601);
            let a = values(m * k, 4);
            let b = values(k * n, 5);
            for transposed in [false, true] {
                let lhs = if transposed {
                    Mat::new(a.as_ptr(), 1, m as isize)
                } else {
                    Mat::new(a.as_ptr(), k as isize, 1)
                };
                let rhs = Mat::new(b.as_ptr(), n as isize, 1);
                let (mut d1, mut d2) = (vec![0f32; m * n], vec![0f32; m * n]);
                unsafe {
                    let d = MatMut::new(d1.as_mut_ptr(), n as isize, 1);
                    gemm(half, m, n, k, d, false, lhs, rhs, 1.0, 1);
                    let p = PackedLhs::new(half, lhs, m, k);
                    let d = MatMut::new(d2.as_mut_ptr(), n as isize, 1);
                    gemm_packed_lhs(&p, n, d, false, rhs, 1.0);
                }
                assert_eq!(d1, d2, "{half:?} transposed {transposed}");
            }
            // and a packed right operand (a transposed weight over two column blocks), two
            // threads
            let (m, n, k) = (50, NC + 70, 900);
            let (a, w) = (values(m * k, 6), values(n * k, 7));
            let lhs = Mat::new(a.as_ptr(), k as isize, 1);
            let rhs = Mat::new(w.as_ptr(), 1, k as isize);
            let (mut d1, mut d2) = (vec![0.5f32; m * n], vec![0.5f32; m * n]);
            unsafe {
                let d = MatMut::new(d1.as_mut_ptr(), n as isize, 1);
                gemm(half, m, n, k, d, true, lhs, rhs, 0.5, 2);
                let p = PackedRhs::new(half, rhs, k, n);
                let d = MatMut::new(d2.as_mut_ptr(), n as isize, 1);
                gemm_packed_rhs(m, d, true, lhs, &p, 0.5, 2);
            }
            assert_eq!(d1, d2, "{half:?} packed right operand");
        }
    }

    /// A column-major left operand (the gradients' transposed weights) is packed by its own
    /// vector path: bit for bit what its row-major copy gives, over row counts that leave
    /// partial slivers and vectors, an odd depth, slivers of very different magnitudes (their
    /// own scales), an infinity (which must not set a scale) and a declared bound.
    #[test]
    fn column_major_left_operand_packs_as_its_row_major_copy() {
        for half in halves() {
            for (m, n, k) in [(203, 77, 1601), (5, 64, 3), (96, 130, 800), (17, 9, 2)] {
                let mut a = values(m * k, 8);
                for (i, x) in a.iter_mut().enumerate() {
                    // rows 6..12 a thousand times larger, rows 12..18 a thousand times smaller
                    match (i / k) / MR {
                        1 => *x *= 1e3,
                        2 => *x *= 1e-3,
                        _ => {}
                    }
                }
                if m > 3 {
                    a[3 * k + k / 2] = f32::INFINITY;
                }
                let b = values(k * n, 9);
                // `at` [k, m] row-major: `a` transposed
                let mut at = vec![0f32; m * k];
                for r in 0..m {
                    for c in 0..k {
                        at[c * m + r] = a[r * k + c];
                    }
                }
                let rhs = Mat::new(b.as_ptr(), n as isize, 1);
                for bound in [None, Some(2e3f32)] {
                    let with = |l: Mat| bound.map_or(l, |b| l.bounded(b));
                    let rows = with(Mat::new(a.as_ptr(), k as isize, 1));
                    let cols = with(Mat::new(at.as_ptr(), 1, m as isize));
                    let (mut d1, mut d2) = (vec![0f32; m * n], vec![0f32; m * n]);
                    unsafe {
                        let d = MatMut::new(d1.as_mut_ptr(), n as isize, 1);
                        gemm(half, m, n, k, d, false, rows, rhs, 1.0, 1);
                        let d = MatMut::new(d2.as_mut_ptr(), n as isize, 1);
                        gemm(half, m, n, k, d, false, cols, rhs, 1.0, 1);
                    }
                    let bits = |d: &[f32]| d.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&d1), bits(&d2), "{half:?} {m}x{n}x{k} bound {bound:?}");
                }
            }
        }
    }

    /// Every layout the callers use (row-major, transposed, column-major destination), odd and
    /// edge sizes, accumulation and alpha, against f64 sums of the exact operands.
    /// - bf16: only the f32 summation differs from the sums of the bf16-rounded operands:
    ///   bounded by k * 2^-24 * sum |a b| (with margin).
    /// - f16: the operands round by at most 2^-11 relative (their scaled values are normal), a
    ///   lane's f16 sum of up to 64 products by at most 64 roundings of 2^-11 of at most their
    ///   magnitude, then the f32 sums: (2^-10 + 2^-5 + k 2^-24) sum |a b|. A wrong tile, sliver
    ///   scale or chunk is off by the size of the terms; and the f16 results are checked to be
    ///   nearer (RMS) than bf16's would be.
    #[test]
    fn matches_rounded_operands_in_every_layout() {
        for half in halves() {
            let (mut err2, mut bf_err2) = (0f64, 0f64);
            for &(m, n, k) in &[
                (1, 1, 1),
                (7, 65, 3),
                (13, 130, 801),
                (200, 70, 96),
                (97, 1100, 33),
            ] {
                for transposed_rhs in [false, true] {
                    for (accumulate, alpha) in [(false, 1.0), (true, 0.5)] {
                        let a = values(m * k, 1);
                        let b = values(k * n, 2);
                        let init = values(m * n, 3);
                        let mut d = init.clone();
                        let lhs = Mat::new(a.as_ptr(), k as isize, 1);
                        let rhs = if transposed_rhs {
                            Mat::new(b.as_ptr(), 1, k as isize)
                        } else {
                            Mat::new(b.as_ptr(), n as isize, 1)
                        };
                        let dst = MatMut::new(d.as_mut_ptr(), n as isize, 1);
                        unsafe { gemm(half, m, n, k, dst, accumulate, lhs, rhs, alpha, 2) };
                        for r in 0..m {
                            for c in 0..n {
                                let (mut s, mut sb, mut mag) = (0f64, 0f64, 0f64);
                                for p in 0..k {
                                    let bv = if transposed_rhs {
                                        b[c * k + p]
                                    } else {
                                        b[p * n + c]
                                    };
                                    let av = a[r * k + p];
                                    let t = round_bf16(av) as f64 * round_bf16(bv) as f64;
                                    sb += t;
                                    s += av as f64 * bv as f64;
                                    mag += t.abs();
                                }
                                let base = if accumulate {
                                    init[r * n + c] as f64
                                } else {
                                    0.0
                                };
                                let got = d[r * n + c] as f64;
                                let (want, bound) = match half {
                                    Half::Bf16 => (
                                        alpha as f64 * sb + base,
                                        1e-6 + 4.0 * (k as f64 + 2.0) * mag * 2f64.powi(-24),
                                    ),
                                    Half::F16 => (
                                        alpha as f64 * s + base,
                                        1e-6 + (2f64.powi(-10)
                                            + 2f64.powi(-5)
                                            + 4.0 * (k as f64 + 2.0) * 2f64.powi(-24))
                                            * mag,
                                    ),
                                };
                                assert!(
                                    (got - want).abs() <= bound,
                                    "{half:?} {m}x{n}x{k} t={transposed_rhs} acc={accumulate} [{r},{c}]: {got} vs {want}"
                                );
                                let exact = alpha as f64 * s + base;
                                err2 += (got - exact).powi(2);
                                bf_err2 += (alpha as f64 * (sb - s)).powi(2);
                            }
                        }
                    }
                }
            }
            if half == Half::F16 {
                assert!(
                    err2 < bf_err2 / 4.0,
                    "f16 error {err2} not well under bf16 rounding's {bf_err2}"
                );
            }
        }
    }

    /// f16's range is 65504, yet a product of large finite operands does not overflow: the
    /// slivers are scaled (here activations of 3e4 against weights of 50, sums of 8e8 in f32),
    /// and a tiny operand (1e-6, f16-subnormal unscaled) keeps its precision. Non-finite
    /// inputs still reach their rows and columns as in f32.
    #[test]
    fn f16_products_neither_overflow_nor_underflow() {
        if !supported(Half::F16) {
            eprintln!("skipped: no AVX512-FP16 on this CPU");
            return;
        }
        let (m, n, k) = (20, 70, 1000);
        for (sa, sb) in [(6e4f32, 100f32), (1e-6, 1e-6)] {
            let a: Vec<f32> = values(m * k, 11).iter().map(|v| v * sa).collect();
            let b: Vec<f32> = values(k * n, 12).iter().map(|v| v * sb).collect();
            let mut d = vec![0f32; m * n];
            let lhs = Mat::new(a.as_ptr(), k as isize, 1);
            let rhs = Mat::new(b.as_ptr(), n as isize, 1);
            unsafe {
                let dst = MatMut::new(d.as_mut_ptr(), n as isize, 1);
                gemm(Half::F16, m, n, k, dst, false, lhs, rhs, 1.0, 1);
            }
            for r in 0..m {
                for c in 0..n {
                    let (mut s, mut mag) = (0f64, 0f64);
                    for p in 0..k {
                        let t = a[r * k + p] as f64 * b[p * n + c] as f64;
                        s += t;
                        mag += t.abs();
                    }
                    let got = d[r * n + c] as f64;
                    assert!(got.is_finite(), "{sa}: overflow at [{r},{c}]");
                    assert!(
                        (got - s).abs() <= 0.02 * mag,
                        "{sa} [{r},{c}]: {got} vs {s}"
                    );
                }
            }
        }
        let mut a = values(m * k, 13);
        a[3 * k + 5] = f32::INFINITY;
        let b = values(k * n, 14);
        let mut d = vec![0f32; m * n];
        unsafe {
            let dst = MatMut::new(d.as_mut_ptr(), n as isize, 1);
            let (l, r) = (
                Mat::new(a.as_ptr(), k as isize, 1),
                Mat::new(b.as_ptr(), n as isize, 1),
            );
            gemm(Half::F16, m, n, k, dst, false, l, r, 1.0, 1);
        }
        for r in 0..m {
            let bad = d[r * n..(r + 1) * n]
                .iter()
                .filter(|v| !v.is_finite())
                .count();
            assert_eq!(bad, if r == 3 { n } else { 0 }, "row {r}");
        }
    }
}
