//! Attention for the training path that keeps only its inputs and output (flash-style): per
//! head, blocks of query rows against every key, the scores in a small scratch buffer
//! (column-major `[keys][rows]`, as [`super::fused_attention`]), never a `(B*H, N, N)` tensor.
//! The backward recomputes each block's probabilities and takes the gradients with five gemms
//! (`dV += P^T dO`, `dP = dO V^T`, `dS = P (dP - rowsum(dO O))`, `dQ = dS K`, `dK += dS^T Q`),
//! skipping those of inputs that lead to no variable.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::conv_op::{cpu_f32, f32_slice};
use super::fused_attention::softmax_columns;
use super::matmul::{all_threads, matmul_in, precision, Mat, MatMut, Precision};

/// Query rows per block: 2 MiB of scores against the UNet's 4096 keys at 512x512.
pub const BLOCK_ROWS: usize = 128;

/// Attention `softmax(q k^T * scale) v` over `[B, H, S, D]` contiguous f32 tensors.
pub struct RecomputedAttention {
    /// Query rows per block.
    pub rows: usize,
    /// Applied to the scores by the product that makes them, as the inference kernel applies
    /// it (scaling `q` first rounds the scores differently).
    pub scale: f32,
}

/// The precision of a head's products: f16 runs them in f32. Each has the head dimension
/// (40 in SD1.5) as its depth or its width, where the f16 kernel's 6x64 tile is part empty or
/// flushed to f32 every few pairs: attention in a 512x512 ControlNet step took 2.0 s forward and
/// 3.0 s backward in f16 against 1.1 s and 2.4 s in f32.
fn head_precision() -> Precision {
    match precision() {
        Precision::F16 => Precision::F32,
        p => p,
    }
}

/// One head's operands: `[S, D]` row-major slices.
struct Head<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    sq: usize,
    sk: usize,
    d: usize,
    scale: f32,
}

impl Head<'_> {
    /// The probabilities of query rows `r0..r0 + rows` against every key into `p`
    /// (`[sk][rows]`), `stats` (2 * rows) as scratch.
    fn probabilities(
        &self,
        r0: usize,
        rows: usize,
        threads: usize,
        p: &mut [f32],
        stats: &mut [f32],
    ) {
        let (sk, d) = (self.sk, self.d);
        // SAFETY: p[j, r] = scale * k[j, :] . q[r0 + r, :] for j < sk, r < rows: inside both
        // slices.
        unsafe {
            matmul_in(
                head_precision(),
                sk,
                rows,
                d,
                MatMut::new(p.as_mut_ptr(), rows as isize, 1),
                false,
                Mat::new(self.k.as_ptr(), d as isize, 1),
                Mat::new(self.q[r0 * d..].as_ptr(), 1, d as isize),
                self.scale,
                threads,
            );
        }
        let (max, sum) = stats.split_at_mut(rows);
        softmax_columns(&mut p[..sk * rows], max, &mut sum[..rows]);
        for inv in sum[..rows].iter_mut() {
            *inv = 1.0 / *inv;
        }
        for col in p[..sk * rows].chunks_exact_mut(rows) {
            for (x, inv) in col.iter_mut().zip(sum.iter()) {
                *x *= inv;
            }
        }
    }

    fn blocks(&self, rows: usize) -> impl Iterator<Item = (usize, usize)> {
        let (sq, rows) = (self.sq, rows.max(1));
        (0..sq).step_by(rows).map(move |r0| (r0, rows.min(sq - r0)))
    }

    /// `out [sq, d] = softmax(q k^T) v`.
    fn forward(&self, block: usize, threads: usize, out: &mut [f32]) {
        let (sk, d) = (self.sk, self.d);
        let mut p = vec![0f32; sk * block];
        let mut stats = vec![0f32; 2 * block];
        for (r0, rows) in self.blocks(block) {
            self.probabilities(r0, rows, threads, &mut p, &mut stats);
            // SAFETY: out[r0 + r, i] = sum_j p[j, r] v[j, i]: rows < block, i < d, j < sk.
            unsafe {
                matmul_in(
                    head_precision(),
                    rows,
                    d,
                    sk,
                    MatMut::new(out[r0 * d..].as_mut_ptr(), d as isize, 1),
                    false,
                    Mat::new(p.as_ptr(), 1, rows as isize),
                    Mat::new(self.v.as_ptr(), d as isize, 1),
                    1.0,
                    threads,
                );
            }
        }
    }

    /// The gradients of q, k and v (those asked for: empty slices are skipped) from the output
    /// `o` and its gradient `go`.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        block: usize,
        threads: usize,
        o: &[f32],
        go: &[f32],
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
    ) {
        let (sk, d) = (self.sk, self.d);
        let (need_q, need_k, need_v) = (!dq.is_empty(), !dk.is_empty(), !dv.is_empty());
        let mut p = vec![0f32; sk * block];
        let mut dp = vec![0f32; sk * block];
        let mut stats = vec![0f32; 2 * block];
        let mut di = vec![0f32; block];
        for (bi, (r0, rows)) in self.blocks(block).enumerate() {
            self.probabilities(r0, rows, threads, &mut p, &mut stats);
            let gob = Mat::new(go[r0 * d..].as_ptr(), d as isize, 1);
            if need_v {
                // SAFETY: dv[j, i] += sum_r p[j, r] go[r0 + r, i]
                unsafe {
                    matmul_in(
                        head_precision(),
                        sk,
                        d,
                        rows,
                        MatMut::new(dv.as_mut_ptr(), d as isize, 1),
                        bi > 0,
                        Mat::new(p.as_ptr(), rows as isize, 1),
                        gob,
                        1.0,
                        threads,
                    );
                }
            }
            if !(need_q || need_k) {
                continue;
            }
            // SAFETY: dp[j, r] = v[j, :] . go[r0 + r, :]
            unsafe {
                matmul_in(
                    head_precision(),
                    sk,
                    rows,
                    d,
                    MatMut::new(dp.as_mut_ptr(), rows as isize, 1),
                    false,
                    Mat::new(self.v.as_ptr(), d as isize, 1),
                    Mat::new(go[r0 * d..].as_ptr(), 1, d as isize),
                    1.0,
                    threads,
                );
            }
            for (r, x) in di[..rows].iter_mut().enumerate() {
                let (a, b) = (&o[(r0 + r) * d..][..d], &go[(r0 + r) * d..][..d]);
                *x = a.iter().zip(b).map(|(a, b)| a * b).sum();
            }
            // dS = P * (dP - rowsum(dO * O)), in place of dP
            for (pc, dc) in p[..sk * rows]
                .chunks_exact(rows)
                .zip(dp[..sk * rows].chunks_exact_mut(rows))
            {
                for ((g, &pv), &dr) in dc.iter_mut().zip(pc).zip(&di[..rows]) {
                    *g = pv * (*g - dr);
                }
            }
            if need_q {
                // SAFETY: dq[r0 + r, i] = scale * sum_j ds[j, r] k[j, i]
                unsafe {
                    matmul_in(
                        head_precision(),
                        rows,
                        d,
                        sk,
                        MatMut::new(dq[r0 * d..].as_mut_ptr(), d as isize, 1),
                        false,
                        Mat::new(dp.as_ptr(), 1, rows as isize),
                        Mat::new(self.k.as_ptr(), d as isize, 1),
                        self.scale,
                        threads,
                    );
                }
            }
            if need_k {
                // SAFETY: dk[j, i] += scale * sum_r ds[j, r] q[r0 + r, i]
                unsafe {
                    matmul_in(
                        head_precision(),
                        sk,
                        d,
                        rows,
                        MatMut::new(dk.as_mut_ptr(), d as isize, 1),
                        bi > 0,
                        Mat::new(dp.as_ptr(), rows as isize, 1),
                        Mat::new(self.q[r0 * d..].as_ptr(), d as isize, 1),
                        self.scale,
                        threads,
                    );
                }
            }
        }
    }
}

/// `[B, H, S, D]` dims of q, k and v, checked.
fn dims(q: &[usize], k: &[usize], v: &[usize]) -> Result<(usize, usize, usize, usize)> {
    match (q, k) {
        ([b, h, sq, d], [kb, kh, sk, kd]) if (b, h, d) == (kb, kh, kd) && k == v => {
            Ok((b * h, *sq, *sk, *d))
        }
        _ => candle_core::bail!("recomputed attention: q {q:?}, k {k:?}, v {v:?}"),
    }
}

/// Runs `f(head index, threads)` for every head: in parallel with one thread each when there
/// are enough heads, else one after another on every thread.
fn per_head<T: Send>(
    heads: usize,
    out: &mut [T],
    each: usize,
    f: impl Fn(usize, usize, &mut [T]) + Sync,
) {
    if heads >= all_threads() {
        out.par_chunks_mut(each.max(1))
            .enumerate()
            .for_each(|(h, o)| f(h, 1, o));
    } else {
        for (h, o) in out.chunks_mut(each.max(1)).enumerate() {
            f(h, all_threads(), o)
        }
    }
}

impl CustomOp3 for RecomputedAttention {
    fn name(&self) -> &'static str {
        "recomputed-attention"
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
        let (bh, sq, sk, d) = dims(l1.dims(), l2.dims(), l3.dims())?;
        let mut out = vec![0f32; bh * sq * d];
        per_head(bh, &mut out, sq * d, |h, threads, o| {
            let head = Head {
                q: &q[h * sq * d..][..sq * d],
                k: &k[h * sk * d..][..sk * d],
                v: &v[h * sk * d..][..sk * d],
                sq,
                sk,
                d,
                scale: self.scale,
            };
            head.forward(self.rows, threads, o);
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _span = super::op_profile::span("attention bwd");
        // cross-attention's keys and values in a frozen UNet come from the text alone: no
        // gradient is taken for an input that leads to no variable
        let (need_q, need_k, need_v) = (q.track_op(), k.track_op(), v.track_op());
        let (bh, sq, sk, d) = dims(q.dims(), k.dims(), v.dims())?;
        let ts = [q, k, v, res, grad].map(|t| t.contiguous());
        let [q, k, v, res, grad] = ts;
        let (q, k, v, res, grad) = (q?, k?, v?, res?, grad?);
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (os, ol) = res.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (qv, kv, vv) = (cpu_f32(&qs, ql)?, cpu_f32(&ks, kl)?, cpu_f32(&vs, vl)?);
        let (ov, gv) = (cpu_f32(&os, ol)?, cpu_f32(&gs, gl)?);
        let alloc = |need: bool, n: usize| if need { vec![0f32; n] } else { Vec::new() };
        let mut dq = alloc(need_q, bh * sq * d);
        let mut dk = alloc(need_k, bh * sk * d);
        let mut dv = alloc(need_v, bh * sk * d);
        // one (dq, dk, dv) triple of slices per head (empty where not asked for)
        fn per_head_slices(v: &mut [f32], n: usize, heads: usize) -> Vec<&mut [f32]> {
            if v.is_empty() {
                (0..heads).map(|_| <&mut [f32]>::default()).collect()
            } else {
                v.chunks_mut(n).collect()
            }
        }
        let mut parts: Vec<_> = per_head_slices(&mut dq, sq * d, bh)
            .into_iter()
            .zip(per_head_slices(&mut dk, sk * d, bh))
            .zip(per_head_slices(&mut dv, sk * d, bh))
            .map(|((a, b), c)| (a, b, c))
            .collect();
        per_head(bh, &mut parts, 1, |h, threads, part| {
            let (dqh, dkh, dvh) = &mut part[0];
            let head = Head {
                q: &qv[h * sq * d..][..sq * d],
                k: &kv[h * sk * d..][..sk * d],
                v: &vv[h * sk * d..][..sk * d],
                sq,
                sk,
                d,
                scale: self.scale,
            };
            let (o, go) = (&ov[h * sq * d..][..sq * d], &gv[h * sq * d..][..sq * d]);
            head.backward(self.rows, threads, o, go, dqh, dkh, dvh);
        });
        drop(parts);
        let dev = q.device();
        let t = |need: bool, v: Vec<f32>, dims: &[usize]| {
            need.then(|| Tensor::from_vec(v, dims, dev)).transpose()
        };
        Ok((
            t(need_q, dq, q.dims())?,
            t(need_k, dk, k.dims())?,
            t(need_v, dv, v.dims())?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    #[test]
    fn gradients_equal_the_materialised_attention() {
        // 6 heads run in parallel, one head on every thread
        for (b, h) in [(2, 3), (1, 1)] {
            gradients_equal_for(b, h);
        }
    }

    fn gradients_equal_for(b: usize, h: usize) {
        let dev = Device::Cpu;
        let mk = |s: usize| {
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, s, 4), &dev).unwrap()).unwrap()
        };
        let (q, k, v) = (mk(10), mk(7), mk(7));
        let w = Tensor::randn(0f32, 1.0, (b, h, 10, 4), &dev).unwrap();
        let plain = candle_nn::ops::softmax(
            &(q.as_tensor().matmul(&k.as_tensor().t().unwrap()).unwrap() * 0.5).unwrap(),
            D::Minus1,
        )
        .unwrap()
        .matmul(v.as_tensor())
        .unwrap();
        let fused = q
            .as_tensor()
            .apply_op3(
                k.as_tensor(),
                v.as_tensor(),
                RecomputedAttention {
                    rows: 3,
                    scale: 0.5,
                },
            )
            .unwrap();
        let diff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(diff(&plain, &fused) < 1e-5);
        let ga = (plain * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for x in [&q, &k, &v] {
            let (a, b) = (
                ga.get(x.as_tensor()).unwrap(),
                gb.get(x.as_tensor()).unwrap(),
            );
            assert!(diff(a, b) < 1e-4, "{}", diff(a, b));
        }
        // frozen keys and values (cross-attention to the text in a frozen UNet): the query's
        // gradient alone, the same as before
        let (kf, vf) = (k.as_tensor().detach(), v.as_tensor().detach());
        let cross = q
            .as_tensor()
            .apply_op3(
                &kf,
                &vf,
                RecomputedAttention {
                    rows: 3,
                    scale: 0.5,
                },
            )
            .unwrap();
        let gc = (cross * &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(gc.get(&kf).is_none() && gc.get(&vf).is_none());
        let (a, b) = (
            ga.get(q.as_tensor()).unwrap(),
            gc.get(q.as_tensor()).unwrap(),
        );
        assert!(diff(a, b) < 1e-4, "{}", diff(a, b));
        // a frozen query (the keys' and values' gradients only)
        let qf = q.as_tensor().detach();
        let kv = qf
            .apply_op3(
                k.as_tensor(),
                v.as_tensor(),
                RecomputedAttention {
                    rows: 3,
                    scale: 0.5,
                },
            )
            .unwrap();
        let gk = (kv * &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(gk.get(&qf).is_none());
        for x in [&k, &v] {
            let (a, b) = (
                ga.get(x.as_tensor()).unwrap(),
                gk.get(x.as_tensor()).unwrap(),
            );
            assert!(diff(a, b) < 1e-4, "{}", diff(a, b));
        }
    }
}
