//! `dst (f32) = (accumulate ? dst : 0) + alpha * lhs x rhs` with both operands rounded to bf16
//! (round to nearest even, as `torch.Tensor.to(torch.bfloat16)`) and the products summed in f32
//! by AVX512-BF16's `vdpbf16ps` (two bf16 multiply-adds per f32 lane: twice the f32 FMA rate).
//! Packed as BLIS does (operands are converted while they are packed, so f32 weights serve
//! both precisions); the microkernel holds a 6x64 tile in 24 registers and per step of two `k`
//! loads four vectors of the right panel and broadcasts six pairs of the left one.

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

/// Whether this CPU runs [`gemm`] (AVX-512F, BW and BF16).
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
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
    parallel(m, n, k, dst, accumulate, l, r, alpha, threads)
}

/// [`serial`] on up to `threads` of rayon's threads: one part of `dst` per thread, split in whole
/// tiles along the longer side (along the rows for a packed right operand, along the columns for
/// a packed left one).
#[allow(clippy::too_many_arguments)]
unsafe fn parallel(
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
    debug_assert!(dst.cs == 1 && supported());
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
        _ if threads == 1 => serial(m, n, k, dst, accumulate, lhs, rhs, alpha),
        (Lhs::Strided(l), _) if by_rows => {
            let step = m.div_ceil(threads).div_ceil(MR) * MR;
            (0..m.div_ceil(step)).into_par_iter().for_each(|t| {
                let (r0, d) = (t * step, dst.offset(t * step, 0));
                let l = Lhs::Strided(l.offset(r0, 0));
                serial(step.min(m - r0), n, k, d, accumulate, l, rhs, alpha);
            });
        }
        (_, Rhs::Strided(r)) => {
            let step = n.div_ceil(threads).div_ceil(NR) * NR;
            (0..n.div_ceil(step)).into_par_iter().for_each(|t| {
                let (c0, d) = (t * step, dst.offset(0, t * step));
                let r = Rhs::Strided(r.offset(0, c0));
                serial(m, step.min(n - c0), k, d, accumulate, lhs, r, alpha);
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

/// u32 storage (a pair of bf16 each) whose usable part starts on a 64-byte boundary.
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
/// values across its blocks of queries): the blocks in the order [`serial`] reads them.
pub struct PackedLhs {
    m: usize,
    k: usize,
    data: Vec<u32>,
}

impl PackedLhs {
    /// Packs `lhs[m, k]`.
    ///
    /// # Safety
    /// Every element the strides address must be readable; [`supported`] must be true.
    pub unsafe fn new(lhs: Mat, m: usize, k: usize) -> Self {
        let (k2, m_pad) = (k.div_ceil(2), m.div_ceil(MR) * MR);
        let mut data = vec![0u32; k2 * m_pad];
        PACK.with_borrow_mut(|[_, _, run]| {
            let run = run.get(KC2.max(NR) + 16);
            for q0 in (0..k2).step_by(KC2) {
                let kc2 = KC2.min(k2 - q0);
                let (p0, kc) = (2 * q0, (2 * kc2).min(k - 2 * q0));
                for i0 in (0..m).step_by(MC) {
                    let mc = MC.min(m - i0);
                    let at = q0 * m_pad + kc2 * i0;
                    let len = kc2 * mc.div_ceil(MR) * MR;
                    pack_lhs(lhs, i0, mc, p0, kc, &mut data[at..at + len], run);
                }
            }
        });
        Self { m, k, data }
    }

    fn block(&self, q0: usize, kc2: usize, i0: usize) -> &[u32] {
        let at = q0 * self.m.div_ceil(MR) * MR + kc2 * i0;
        &self.data[at..]
    }
}

/// A right operand converted and packed once (a linear layer's weights, kept by the layer): the
/// blocks in the order [`serial`] reads them, 64-byte aligned.
pub struct PackedRhs {
    k: usize,
    n: usize,
    data: AlignedBuf,
}

impl PackedRhs {
    /// Packs `rhs[k, n]`.
    ///
    /// # Safety
    /// Every element the strides address must be readable; [`supported`] must be true.
    pub unsafe fn new(rhs: Mat, k: usize, n: usize) -> Self {
        let (k2, n_pad) = (k.div_ceil(2), n.div_ceil(NR) * NR);
        let mut data = AlignedBuf::default();
        let buf = data.get(k2 * n_pad);
        PACK.with_borrow_mut(|[_, _, run]| {
            let run = run.get(KC2.max(NR) + 16);
            for j0 in (0..n).step_by(NC) {
                let nc = NC.min(n - j0);
                for q0 in (0..k2).step_by(KC2) {
                    let kc2 = KC2.min(k2 - q0);
                    let (p0, kc) = (2 * q0, (2 * kc2).min(k - 2 * q0));
                    let at = j0 * k2 + q0 * nc.div_ceil(NR) * NR;
                    let len = kc2 * nc.div_ceil(NR) * NR;
                    pack_rhs(rhs, p0, kc, j0, nc, &mut buf[at..at + len], run);
                }
            }
        });
        Self { k, n, data }
    }

    /// Depth and width (`k`, `n`).
    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    fn block(&self, j0: usize, q0: usize) -> &[u32] {
        let (k2, nc) = (self.k.div_ceil(2), NC.min(self.n - j0));
        let at = j0 * k2 + q0 * nc.div_ceil(NR) * NR;
        &self
            .data
            .slice(self.k.div_ceil(2) * self.n.div_ceil(NR) * NR)[at..]
    }
}

/// [`gemm`] with a packed right operand: `dst[m, b.n] (+)= alpha * lhs[m, b.k] x b`, rows split
/// over up to `threads` of rayon's threads.
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
    parallel(m, b.n, b.k, dst, accumulate, l, r, alpha, threads)
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

/// [`gemm`] with a packed left operand, on the calling thread.
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
    parallel(a.m, n, a.k, dst, accumulate, l, r, alpha, 1)
}

#[allow(clippy::too_many_arguments)]
unsafe fn serial(
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
    PACK.with_borrow_mut(|[abuf, bbuf, run]| {
        let kc2_max = KC2.min(k2);
        let bp_buf = bbuf.get(kc2_max * NC.min(n.div_ceil(NR) * NR));
        let ap_buf = abuf.get(kc2_max * MC.min(m.div_ceil(MR) * MR));
        let run = run.get(KC2.max(NR) + 16);
        for j0 in (0..n).step_by(NC) {
            let nc = NC.min(n - j0);
            for q0 in (0..k2).step_by(KC2) {
                let kc2 = KC2.min(k2 - q0);
                let (p0, kc) = (2 * q0, (2 * kc2).min(k - 2 * q0));
                let load = accumulate || q0 > 0;
                let bp: &[u32] = match rhs {
                    Rhs::Strided(r) => {
                        pack_rhs(r, p0, kc, j0, nc, bp_buf, run);
                        bp_buf
                    }
                    Rhs::Packed(b) => b.block(j0, q0),
                };
                for i0 in (0..m).step_by(MC) {
                    let mc = MC.min(m - i0);
                    let ap: &[u32] = match lhs {
                        Lhs::Strided(l) => {
                            pack_lhs(l, i0, mc, p0, kc, ap_buf, run);
                            ap_buf
                        }
                        Lhs::Packed(a) => a.block(q0, kc2, i0),
                    };
                    for js in 0..nc.div_ceil(NR) {
                        let bsl = bp.as_ptr().add(js * kc2 * NR);
                        let cols = NR.min(nc - js * NR);
                        for is in 0..mc.div_ceil(MR) {
                            let asl = ap.as_ptr().add(is * kc2 * MR);
                            let rows = MR.min(mc - is * MR);
                            let c = dst.at(i0 + is * MR, j0 + js * NR);
                            if rows == MR && cols == NR {
                                kernel(kc2, asl, bsl, c, dst.rs, alpha, load);
                            } else {
                                let mut tile = [0f32; MR * NR];
                                let t = tile.as_mut_ptr();
                                kernel(kc2, asl, bsl, t, NR as isize, alpha, false);
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

/// `len` values at `src` (stride `step`) as bf16 pairs into `out[..len.div_ceil(2)]`, the last
/// pair's high half zero when `len` is odd.
unsafe fn convert_run(src: *const f32, step: isize, len: usize, out: &mut [u32]) {
    if step == 1 {
        return convert_contiguous(src, len, out);
    }
    convert_scalar(src, step, len, out)
}

unsafe fn convert_scalar(src: *const f32, step: isize, len: usize, out: &mut [u32]) {
    for (q, o) in out[..len.div_ceil(2)].iter_mut().enumerate() {
        let lo = to_bf16_bits(*src.offset(2 * q as isize * step)) as u32;
        let hi = if 2 * q + 1 < len {
            to_bf16_bits(*src.offset((2 * q + 1) as isize * step)) as u32
        } else {
            0
        };
        *o = lo | hi << 16;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
unsafe fn convert_contiguous(src: *const f32, len: usize, out: &mut [u32]) {
    use std::arch::x86_64::*;
    let mut i = 0;
    while i + 32 <= len {
        // two runs of 16 values -> 32 bf16 in order (cvtne2ps puts its second operand low)
        let a = _mm512_loadu_ps(src.add(i));
        let b = _mm512_loadu_ps(src.add(i + 16));
        let v = _mm512_cvtne2ps_pbh(b, a);
        _mm512_storeu_si512(
            out.as_mut_ptr().add(i / 2) as *mut _,
            std::mem::transmute::<__m512bh, __m512i>(v),
        );
        i += 32;
    }
    while i < len {
        let lo = to_bf16_bits(*src.add(i)) as u32;
        let hi = if i + 1 < len {
            to_bf16_bits(*src.add(i + 1)) as u32
        } else {
            0
        };
        out[i / 2] = lo | hi << 16;
        i += 2;
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn convert_contiguous(src: *const f32, len: usize, out: &mut [u32]) {
    convert_scalar(src, 1, len, out)
}

/// `bp` = slivers of `NR` columns: per pair of `k`, `NR` lanes of (low: even k, high: odd k),
/// zero past `nc` and past `kc`.
unsafe fn pack_rhs(
    rhs: Mat,
    p0: usize,
    kc: usize,
    j0: usize,
    nc: usize,
    bp: &mut [u32],
    run: &mut [u32],
) {
    let kc2 = kc.div_ceil(2);
    for js in 0..nc.div_ceil(NR) {
        let cols = NR.min(nc - js * NR);
        let out = &mut bp[js * kc2 * NR..(js + 1) * kc2 * NR];
        let c0 = j0 + js * NR;
        if cols < NR {
            out.fill(0);
        }
        if rhs.cs == 1 {
            // two rows of k at a time, interleaved lane by lane
            for q in 0..kc2 {
                let r0 = rhs.at(p0 + 2 * q, c0);
                let r1 = (2 * q + 1 < kc).then(|| rhs.at(p0 + 2 * q + 1, c0));
                pack_row_pair(r0, r1, cols, &mut out[q * NR..(q + 1) * NR], run);
            }
        } else {
            // one column of k at a time (contiguous when rhs is a transposed row-major matrix)
            for c in 0..cols {
                convert_run(rhs.at(p0, c0 + c), rhs.rs, kc, run);
                for (q, v) in run[..kc2].iter().enumerate() {
                    *out.get_unchecked_mut(q * NR + c) = *v;
                }
            }
        }
    }
}

/// `o[c] = bf16(r0[c]) | bf16(r1[c]) << 16` for `c < cols` (`r1` absent: zero).
unsafe fn pack_row_pair(
    r0: *const f32,
    r1: Option<*const f32>,
    cols: usize,
    o: &mut [u32],
    run: &mut [u32],
) {
    #[cfg(target_arch = "x86_64")]
    if cols.is_multiple_of(16) {
        return pack_row_pair_avx512(r0, r1, cols, o);
    }
    let (even, odd) = run.split_at_mut(NR / 2 + 8);
    convert_contiguous(r0, cols, even);
    match r1 {
        Some(r1) => convert_contiguous(r1, cols, odd),
        None => odd[..cols.div_ceil(2)].fill(0),
    }
    for (c, v) in o[..cols].iter_mut().enumerate() {
        let e = (even[c / 2] >> (16 * (c % 2))) & 0xffff;
        let d = (odd[c / 2] >> (16 * (c % 2))) & 0xffff;
        *v = e | d << 16;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
unsafe fn pack_row_pair_avx512(r0: *const f32, r1: Option<*const f32>, cols: usize, o: &mut [u32]) {
    use std::arch::x86_64::*;
    // cvtne2ps(b, a) = [bf16(a) x16, bf16(b) x16] as 16-bit lanes; the permute interleaves them
    let idx = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    for c in (0..cols).step_by(16) {
        let a = _mm512_loadu_ps(r0.add(c));
        let b = r1.map_or(_mm512_setzero_ps(), |r1| _mm512_loadu_ps(r1.add(c)));
        let v = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(b, a));
        _mm512_storeu_si512(
            o.as_mut_ptr().add(c).cast(),
            _mm512_permutexvar_epi16(idx, v),
        );
    }
}

/// `ap` = slivers of `MR` rows: per pair of `k`, `MR` pairs, zero past `mc` and past `kc`.
unsafe fn pack_lhs(
    lhs: Mat,
    i0: usize,
    mc: usize,
    p0: usize,
    kc: usize,
    ap: &mut [u32],
    run: &mut [u32],
) {
    let kc2 = kc.div_ceil(2);
    for is in 0..mc.div_ceil(MR) {
        let rows = MR.min(mc - is * MR);
        let out = &mut ap[is * kc2 * MR..(is + 1) * kc2 * MR];
        if rows < MR {
            out.fill(0);
        }
        for r in 0..rows {
            convert_run(lhs.at(i0 + is * MR + r, p0), lhs.cs, kc, run);
            for (q, v) in run[..kc2].iter().enumerate() {
                *out.get_unchecked_mut(q * MR + r) = *v;
            }
        }
    }
}

/// `c[MR, NR] (row stride rsc) = (load ? c : 0) + alpha * a_sliver x b_sliver` over `kc2`
/// pairs of `k`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel(
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

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel(_: usize, _: *const u32, _: *const u32, _: *mut f32, _: isize, _: f32, _: bool) {
    unreachable!("bf16 gemm without AVX512-BF16")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_values as values;

    #[test]
    fn rounding_is_to_nearest_even() {
        // 1 + 2^-8 lies halfway between bf16 1 and 1 + 2^-7: the even one (1) wins
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(round_bf16(-2.5), -2.5);
        assert!(round_bf16(f32::NAN).is_nan());
        assert_eq!(round_bf16(f32::INFINITY), f32::INFINITY);
    }

    /// A packed left operand gives what the strided one gives, across several depth blocks and
    /// row blocks (k over 2 * KC2, m over MC), transposed as attention's values are.
    #[test]
    fn packed_left_operand_equals_strided() {
        if !supported() {
            eprintln!("skipped: no AVX512-BF16 on this CPU");
            return;
        }
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
                gemm(
                    m,
                    n,
                    k,
                    MatMut::new(d1.as_mut_ptr(), n as isize, 1),
                    false,
                    lhs,
                    rhs,
                    1.0,
                    1,
                );
                let p = PackedLhs::new(lhs, m, k);
                gemm_packed_lhs(
                    &p,
                    n,
                    MatMut::new(d2.as_mut_ptr(), n as isize, 1),
                    false,
                    rhs,
                    1.0,
                );
            }
            assert_eq!(d1, d2, "transposed {transposed}");
        }
        // and a packed right operand (a transposed weight over two column blocks), two threads
        let (m, n, k) = (50, NC + 70, 900);
        let (a, w) = (values(m * k, 6), values(n * k, 7));
        let lhs = Mat::new(a.as_ptr(), k as isize, 1);
        let rhs = Mat::new(w.as_ptr(), 1, k as isize);
        let (mut d1, mut d2) = (vec![0.5f32; m * n], vec![0.5f32; m * n]);
        unsafe {
            gemm(
                m,
                n,
                k,
                MatMut::new(d1.as_mut_ptr(), n as isize, 1),
                true,
                lhs,
                rhs,
                0.5,
                2,
            );
            let p = PackedRhs::new(rhs, k, n);
            let d = MatMut::new(d2.as_mut_ptr(), n as isize, 1);
            gemm_packed_rhs(m, d, true, lhs, &p, 0.5, 2);
        }
        assert_eq!(d1, d2, "packed right operand");
    }

    /// Every layout the callers use (row-major, transposed, column-major destination), odd and
    /// edge sizes, accumulation and alpha, against f64 sums of the bf16-rounded operands. Only
    /// the f32 summation differs: bounded by k * 2^-24 * sum |a b| (with margin).
    #[test]
    fn matches_rounded_operands_in_every_layout() {
        if !supported() {
            eprintln!("skipped: no AVX512-BF16 on this CPU");
            return;
        }
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
                    unsafe { gemm(m, n, k, dst, accumulate, lhs, rhs, alpha, 2) };
                    for r in 0..m {
                        for c in 0..n {
                            let (mut s, mut mag) = (0f64, 0f64);
                            for p in 0..k {
                                let bv = if transposed_rhs {
                                    b[c * k + p]
                                } else {
                                    b[p * n + c]
                                };
                                let t = round_bf16(a[r * k + p]) as f64 * round_bf16(bv) as f64;
                                s += t;
                                mag += t.abs();
                            }
                            let want = alpha as f64 * s
                                + if accumulate {
                                    init[r * n + c] as f64
                                } else {
                                    0.0
                                };
                            let got = d[r * n + c] as f64;
                            let bound = 1e-6 + 4.0 * (k as f64 + 2.0) * mag * 2f64.powi(-24);
                            assert!(
                                (got - want).abs() <= bound,
                                "{m}x{n}x{k} t={transposed_rhs} acc={accumulate} [{r},{c}]: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
