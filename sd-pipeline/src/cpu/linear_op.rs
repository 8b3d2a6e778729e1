//! `x W^T + b` for inference through [`super::matmul`], so that a linear layer computes in the
//! process's precision (candle's own matmul serves f32; this op is what `--dtype bf16` uses).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::conv_op::f32_slice;
use super::matmul::{all_threads, matmul, Mat, MatMut};

struct LinearInfer {
    bias: Option<Vec<f32>>,
}

impl CustomOp2 for LinearInfer {
    fn name(&self) -> &'static str {
        "linear-infer"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (f32_slice(xs, xl)?, f32_slice(ws, wl)?);
        let dims = xl.dims();
        let (&k, lead) = dims.split_last().unwrap_or((&0, &[]));
        let [n, wk] = wl.dims() else {
            candle_core::bail!("linear: weight {:?} is not 2-d", wl.dims())
        };
        let n = *n;
        if *wk != k || self.bias.as_ref().is_some_and(|b| b.len() != n) {
            candle_core::bail!("linear: input {dims:?}, weight {:?}", wl.dims());
        }
        let m: usize = lead.iter().product();
        let mut out = vec![0f32; m * n];
        if let Some(b) = &self.bias {
            out.par_chunks_mut(n.max(1))
                .for_each(|row| row.copy_from_slice(b));
        }
        // SAFETY: out [m, n] row-major = x [m, k] row-major x W^T (W [n, k] row-major).
        unsafe {
            matmul(
                m,
                n,
                k,
                MatMut::new(out.as_mut_ptr(), n as isize, 1),
                self.bias.is_some(),
                Mat::new(x.as_ptr(), k as isize, 1),
                Mat::new(w.as_ptr(), 1, k as isize),
                1.0,
                all_threads(),
            );
        }
        let mut shape = lead.to_vec();
        shape.push(n);
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

/// `x W^T + b` for a CPU f32 `x` (any leading dims) without gradient.
pub fn linear_infer(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let bias = b.map(|b| b.flatten_all()?.to_vec1::<f32>()).transpose()?;
    x.contiguous()?
        .apply_op2_no_bwd(&w.contiguous()?, &LinearInfer { bias })
}
