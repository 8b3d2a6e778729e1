//! Attention for the training path that keeps only its inputs and output: the forward runs in
//! query chunks without recording the score matrices, and the backward recomputes them chunk
//! by chunk (as memory-efficient / flash attention does). A full SD1.5 step at 64x64 latents
//! otherwise keeps several (heads x 4096 x 4096) score tensors per attention layer alive.

use candle_core::{CpuStorage, CustomOp3, Device, Layout, Result, Shape, Tensor, D};

/// Attention over `[B, H, S, D]` f32 tensors, `q` already scaled.
pub struct RecomputedAttention {
    /// Query rows per chunk (bounds the transient score memory).
    pub rows: usize,
}

fn tensor(s: &CpuStorage, l: &Layout) -> Result<Tensor> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("recomputed attention: f32 only");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("recomputed attention: contiguous inputs only");
    };
    Tensor::from_slice(&data[a..b], l.shape(), &Device::Cpu)
}

impl RecomputedAttention {
    fn chunks(&self, sq: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        let rows = self.rows.max(1);
        (0..sq).step_by(rows).map(move |s| (s, rows.min(sq - s)))
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
        let (q, k, v) = (tensor(s1, l1)?, tensor(s2, l2)?, tensor(s3, l3)?);
        let kt = k.t()?;
        let mut outs = Vec::new();
        for (start, len) in self.chunks(q.dim(2)?) {
            let p = candle_nn::ops::softmax_last_dim(&q.narrow(2, start, len)?.matmul(&kt)?)?;
            outs.push(p.matmul(&v)?);
        }
        let out = Tensor::cat(&outs, 2)?;
        let shape = out.shape().clone();
        let data = out.flatten_all()?.to_vec1::<f32>()?;
        Ok((CpuStorage::F32(data), shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // cross-attention's keys and values in a frozen UNet come from the text alone: no
        // gradient is taken for an input that depends on no variable
        let (need_q, need_k, need_v) = (q.track_op(), k.track_op(), v.track_op());
        let (q, k, v, g) = (q.detach(), k.detach(), v.detach(), grad.detach());
        let kt = k.t()?;
        let vt = v.t()?;
        let mut dq = Vec::new();
        let mut dk = need_k.then(|| k.zeros_like()).transpose()?;
        let mut dv = need_v.then(|| v.zeros_like()).transpose()?;
        for (start, len) in self.chunks(q.dim(2)?) {
            let qc = q.narrow(2, start, len)?;
            let gc = g.narrow(2, start, len)?.contiguous()?;
            let p = candle_nn::ops::softmax_last_dim(&qc.matmul(&kt)?)?;
            if let Some(d) = dv.as_mut() {
                *d = (&*d + p.t()?.matmul(&gc)?)?;
            }
            if !(need_q || need_k) {
                continue;
            }
            let dp = gc.matmul(&vt)?;
            let ds = (&p * dp.broadcast_sub(&(&dp * &p)?.sum_keepdim(D::Minus1)?)?)?;
            if need_q {
                dq.push(ds.matmul(&k)?);
            }
            if let Some(d) = dk.as_mut() {
                *d = (&*d + ds.t()?.matmul(&qc)?)?;
            }
        }
        let dq = need_q.then(|| Tensor::cat(&dq, 2)).transpose()?;
        Ok((dq, dk, dv))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn gradients_equal_the_materialised_attention() {
        let dev = Device::Cpu;
        let mk = |s: usize| {
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, s, 4), &dev).unwrap()).unwrap()
        };
        let (q, k, v) = (mk(10), mk(7), mk(7));
        let w = Tensor::randn(0f32, 1.0, (2, 3, 10, 4), &dev).unwrap();
        let plain = candle_nn::ops::softmax(
            &q.as_tensor().matmul(&k.as_tensor().t().unwrap()).unwrap(),
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
                RecomputedAttention { rows: 3 },
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
            .apply_op3(&kf, &vf, RecomputedAttention { rows: 3 })
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
                RecomputedAttention { rows: 3 },
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
