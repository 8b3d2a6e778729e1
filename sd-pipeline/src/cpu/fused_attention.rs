//! Inference attention for the CPU in f32, one pass per block of query rows (flash-style
//! blocking, exact softmax): scores of a block of rows against every key with one gemm into a
//! small per-thread scratch buffer, column-major so that neither gemm packs or transposes it, a
//! softmax vectorised across the rows, one gemm with the values. The
//! heads are read from and written to `[B, S, H*D]` through strides, so no transposed copies are
//! made, and no `(B*H, N, N)` score tensor ever exists. Blocks run in parallel, each gemm on one
//! thread. The plain path in `nn::attention` is the reference it is tested against.

use super::matmul::{matmul, matmul_packed_lhs, precision, Mat, MatMut, PackedLhs};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::conv_op::f32_slice;

/// Query rows per block (2 MiB of scores for the UNet's 4096 keys at 512x512). Measured on the
/// SD1.5 self-attention at 512x512 (batch 2, 4096 tokens, 8 heads of 40): 64 rows 283 ms,
/// 128 rows 268-278 ms, 256 rows 270-300 ms, 512 rows 313 ms.
const ROWS: usize = 128;
/// The same in a half precision (bf16 / f16), where a task converts and packs a head's keys and
/// values once (bf16, SD1.5 at 512x512, whole UNet call, when every block packed them anew:
/// 128 rows 5.76 s, 256 rows 5.63 s, 512 rows 5.81 s, 1024 6.22 s).
const ROWS_HALF: usize = 256;

/// `softmax(q k^T * scale) v` per head, over `[B, Sq, H*D]`, `[B, Sk, H*D]`, `[B, Sk, H*D]`.
struct FusedAttention {
    heads: usize,
    scale: f32,
}

/// A raw output pointer shared by blocks that write disjoint regions.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every block writes its own rows x head columns of the output, nothing else.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The element `i` places on (a method, so that closures capture the whole wrapper).
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _span = super::op_profile::span("attention fwd");
        let (q, k, v) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let [b, sq, inner] = l1.dims() else {
            candle_core::bail!(
                "fused attention: q must be [B, S, H*D], got {:?}",
                l1.dims()
            )
        };
        let (b, sq, inner) = (*b, *sq, *inner);
        let sk = l2.dims().get(1).copied().unwrap_or(0);
        if l2.dims() != [b, sk, inner] || l3.dims() != l2.dims() || inner % self.heads != 0 {
            candle_core::bail!(
                "fused attention: q {:?}, k {:?}, v {:?} with {} heads",
                l1.dims(),
                l2.dims(),
                l3.dims(),
                self.heads
            )
        }
        let (heads, d) = (self.heads, inner / self.heads);
        let mut out = vec![0f32; b * sq * inner];
        let dst = OutPtr(out.as_mut_ptr());
        let half = precision().half();
        let block_rows = if half.is_some() { ROWS_HALF } else { ROWS };
        let blocks = sq.div_ceil(block_rows);
        // f32: a task per block of queries; half: a task per head, its keys and values converted
        // and packed once for all its blocks
        let per_task = if half.is_some() { blocks } else { 1 };
        (0..b * heads * blocks / per_task)
            .into_par_iter()
            .for_each(|task| {
                let (bh, first) = (task * per_task / blocks, task * per_task % blocks);
                let (bi, h) = (bh / heads, bh % heads);
                let k0 = &k[bi * sk * inner + h * d..];
                let v0 = &v[bi * sk * inner + h * d..];
                // SAFETY: k[j, :] and v^T[:, j] for j < sk within the head stay inside k / v.
                let packed = half.map(|h| unsafe {
                    (
                        PackedLhs::new(h, Mat::new(k0.as_ptr(), inner as isize, 1), sk, d),
                        PackedLhs::new(h, Mat::new(v0.as_ptr(), 1, inner as isize), d, sk),
                    )
                });
                for blk in first..first + per_task {
                    let r0 = blk * block_rows;
                    let rows = block_rows.min(sq - r0);
                    let q0 = &q[(bi * sq + r0) * inner + h * d..];
                    SCRATCH.with_borrow_mut(|scratch| {
                        // scores column-major [sk][rows] (the gemms' natural layout: neither packs or
                        // transposes it), then the block's output column-major [d][rows], row stats
                        let need = rows * sk + rows * d + 2 * rows;
                        if scratch.len() < need {
                            scratch.resize(need, 0.0);
                        }
                        let (scores, rest) = scratch.split_at_mut(rows * sk);
                        let (out_t, rest) = rest.split_at_mut(rows * d);
                        let (max, rest) = rest.split_at_mut(rows);
                        let sum = &mut rest[..rows];
                        // SAFETY: the strides below stay inside q/k/v (row r < rows of Sq, key j < Sk,
                        // column < d within the head) and inside `scores` / `out_t`.
                        unsafe {
                            // scores[r, j] = scale * q_blk[r, :] . k[j, :]
                            let s_t = MatMut::new(scores.as_mut_ptr(), rows as isize, 1);
                            let q_t = Mat::new(q0.as_ptr(), 1, inner as isize);
                            match &packed {
                                Some((pk, _)) => {
                                    matmul_packed_lhs(pk, rows, s_t, false, q_t, self.scale)
                                }
                                None => matmul(
                                    sk,
                                    rows,
                                    d,
                                    s_t,
                                    false,
                                    Mat::new(k0.as_ptr(), inner as isize, 1),
                                    q_t,
                                    self.scale,
                                    1,
                                ),
                            }
                        }
                        softmax_columns(scores, max, sum);
                        // SAFETY: as above; `out_t` is [d][rows].
                        unsafe {
                            // out_t[i, r] = sum_j v[j, i] p[r, j]
                            let o_t = MatMut::new(out_t.as_mut_ptr(), rows as isize, 1);
                            // softmax weights: at most 1 (no scan for the f16 scale)
                            let p_t = Mat::new(scores.as_ptr(), rows as isize, 1).bounded(1.0);
                            match &packed {
                                Some((_, pv)) => matmul_packed_lhs(pv, rows, o_t, false, p_t, 1.0),
                                None => matmul(
                                    d,
                                    rows,
                                    sk,
                                    o_t,
                                    false,
                                    Mat::new(v0.as_ptr(), 1, inner as isize),
                                    p_t,
                                    1.0,
                                    1,
                                ),
                            }
                        }
                        let o0 = (bi * sq + r0) * inner + h * d;
                        for (r, s) in sum.iter().enumerate() {
                            let inv = 1.0 / s;
                            // SAFETY: out[rows, d] at row stride `inner` is this block's own region.
                            let row = unsafe {
                                std::slice::from_raw_parts_mut(dst.at(o0 + r * inner), d)
                            };
                            for (i, x) in row.iter_mut().enumerate() {
                                *x = out_t[i * rows + r] * inv;
                            }
                        }
                    });
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b, sq, inner))))
    }
}

/// `softmax(q k^T / sqrt(D)) v` for contiguous-able f32 CPU tensors `[B, S, H*D]`, no mask.
pub fn fused_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let d = q.dim(2)? / heads.max(1);
    let op = FusedAttention {
        heads,
        scale: (d as f32).powf(-0.5),
    };
    q.contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)
}

thread_local! {
    /// Each worker's scores and block output, reused from block to block (never zeroed: the
    /// gemms write before anything reads).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

super::simd::simd_dispatch! {
    /// Softmax numerators of column-major scores `[keys][rows]`: each row's `exp(x - max)` in
    /// place, its sum in `sum` (`max` is scratch), vectorised across the rows.
    pub(super) fn softmax_columns(scores: &mut [f32], max: &mut [f32], sum: &mut [f32]) -> () = exp_columns
}

#[inline(always)]
fn exp_columns(scores: &mut [f32], max: &mut [f32], sum: &mut [f32]) {
    let rows = max.len();
    max.fill(f32::NEG_INFINITY);
    for col in scores.chunks_exact(rows) {
        for (m, &x) in max.iter_mut().zip(col) {
            *m = if x > *m { x } else { *m };
        }
    }
    sum.fill(0.0);
    for col in scores.chunks_exact_mut(rows) {
        for ((x, &m), s) in col.iter_mut().zip(max.iter()).zip(sum.iter_mut()) {
            *x = exp_approx(*x - m);
            *s += *x;
        }
    }
}

/// `e^x` for x <= 0 (softmax arguments) within 2 ulp: Cephes' `expf` (range reduction by
/// ln 2 in two parts, degree-5 polynomial), 0 below -87. Branch- and cast-free so that it
/// vectorises: n = round(x / ln 2) and 2^n both come from the bits of `x log2(e) + 1.5 * 2^23`.
#[inline(always)]
pub(crate) fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0;
    // not `x.max(-87.0)`: f32::max drops a NaN, which would turn a NaN score into a weight
    // of ~0 and hide it (torch's softmax propagates it; so must we, for the NaN check)
    let x = if x < -87.0 { -87.0 } else { x };
    let t = x.mul_add(LOG2E, MAGIC);
    let n = t - MAGIC;
    let r = n.mul_add(-C2, n.mul_add(-C1, x));
    let p = 1.987_569_1e-4_f32;
    let p = p.mul_add(r, 1.398_199_9e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 1.666_666_5e-1);
    let p = p.mul_add(r, 0.5);
    let y = (p * r).mul_add(r, r) + 1.0;
    // t's low mantissa bits hold n (in [-126, 0] here): the exponent field of 2^n is n + 127
    y * f32::from_bits(t.to_bits().wrapping_sub(0x4B40_0000 - 127) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    #[test]
    fn exp_matches_std_within_two_ulp() {
        let mut worst = 0f32;
        for i in 0..200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let (a, b) = (exp_approx(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert_eq!(exp_approx(0.0), 1.0);
        assert_eq!(exp_approx(-1000.0), exp_approx(-87.0));
        assert!(exp_approx(-1000.0) < 2e-38);
    }

    fn plain(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Tensor {
        let (b, sq, inner) = q.dims3().unwrap();
        let sk = k.dim(1).unwrap();
        let d = inner / heads;
        let split = |t: &Tensor, s: usize| {
            t.reshape((b, s, heads, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q, k, v) = (split(q, sq), split(k, sk), split(v, sk));
        let s = (q.matmul(&k.t().unwrap()).unwrap() * (d as f64).powf(-0.5)).unwrap();
        let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
        p.matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, sq, inner))
            .unwrap()
    }

    #[test]
    fn matches_plain_attention() {
        let dev = Device::Cpu;
        // self-attention over more rows than a block (and not a multiple of it), cross-attention
        // with 77 keys, one head, large logits
        for (b, sq, sk, heads, d, amp) in [
            (2, 150, 150, 4, 8, 1.0),
            (1, 600, 40, 2, 8, 1.0),
            (1, 64, 77, 8, 5, 1.0),
            (2, 7, 3, 1, 16, 1.0),
            (1, 70, 33, 2, 8, 30.0),
        ] {
            let q = (Tensor::randn(0f32, 1., (b, sq, heads * d), &dev).unwrap() * amp).unwrap();
            let k = Tensor::randn(0f32, 1., (b, sk, heads * d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1., (b, sk, heads * d), &dev).unwrap();
            let ours = fused_attention(&q, &k, &v, heads).unwrap();
            let theirs = plain(&q, &k, &v, heads);
            let diff = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap();
            // outputs are convex combinations of unit normals; f32 sums in another order
            assert!(
                diff.to_scalar::<f32>().unwrap() < 1e-5,
                "case {b} {sq} {sk} {heads}"
            );
        }
        let q = Tensor::zeros((1, 4, 6), candle_core::DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 3, 8), candle_core::DType::F32, &dev).unwrap();
        assert!(fused_attention(&q, &k, &k, 2).is_err());
    }

    /// An infinite query makes NaN scores (inf - inf): they must reach the output, as with
    /// torch's softmax, not be weighted ~0 and hidden (issue 30: NaN detection).
    #[test]
    fn non_finite_scores_propagate() {
        let dev = Device::Cpu;
        let k = Tensor::randn(0f32, 1., (1, 5, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (1, 5, 8), &dev).unwrap();
        for bad in [f32::INFINITY, f32::NAN] {
            let mut q = vec![0.5f32; 3 * 8];
            q[8] = bad; // row 1
            let q = Tensor::from_vec(q, (1, 3, 8), &dev).unwrap();
            let ours = fused_attention(&q, &k, &v, 1).unwrap();
            let theirs = plain(&q, &k, &v, 1);
            let finite = |t: &Tensor| -> Vec<bool> {
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.is_finite())
                    .collect()
            };
            assert!(
                finite(&theirs).contains(&false),
                "the reference propagates {bad}"
            );
            assert_eq!(finite(&ours), finite(&theirs), "query {bad}");
        }
    }
}
