//! `x W^T + b` for inference through [`super::matmul`], so that a linear layer computes in the
//! process's precision (candle's own matmul serves f32; this op is what `--dtype bf16` / `f16`
//! use, with the weight converted and packed once and kept by the layer: [`PackedWeight`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::conv_op::{cpu_f32, f32_slice};
use super::matmul::{all_threads, matmul_packed_rhs, Half, Mat, MatMut, PackedRhs};

/// A linear layer's weight `W [n, k]` as the packed half-precision right operand `W^T`, made at
/// the first call in that precision and kept (remade if the layer's weight tensor is replaced or
/// the precision changes).
#[derive(Default, Clone)]
pub struct PackedWeight(Arc<Mutex<Option<Packed>>>);

/// The weight tensor a packing was made from, and the packing.
type Packed = (candle_core::TensorId, Arc<PackedRhs>);

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PackedWeight")
    }
}

/// Whether linear layers drop their f32 weight once it is packed ([`set_release_packed`]).
static RELEASE: AtomicBool = AtomicBool::new(false);

/// Makes every linear layer drop its f32 weight once it has packed it in a half precision,
/// for processes that run one precision from start to end (the CLI's `generate` and `bench`):
/// the packed copy is then the only one (SDXL in f16: 4.6 GB instead of 9.2 + 4.6). A released
/// layer runs only in the precision it was packed in. Servers and trainers leave it off.
pub fn set_release_packed(on: bool) {
    RELEASE.store(on, Ordering::Relaxed);
}

/// Whether [`set_release_packed`] is on.
pub fn release_packed() -> bool {
    RELEASE.load(Ordering::Relaxed)
}

impl PackedWeight {
    /// The packing, if one in `half` exists.
    fn current(&self, half: Half) -> Option<Arc<PackedRhs>> {
        let slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        slot.as_ref()
            .filter(|(_, p)| p.half() == half)
            .map(|(_, p)| p.clone())
    }

    fn get(&self, w: &Tensor, half: Half) -> Result<Arc<PackedRhs>> {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((id, p)) = slot.as_ref() {
            if *id == w.id() && p.half() == half {
                return Ok(p.clone());
            }
        }
        let [n, k] = w.dims() else {
            candle_core::bail!("linear: weight {:?} is not 2-d", w.dims())
        };
        let (n, k) = (*n, *k);
        let w = w.contiguous()?;
        let (storage, layout) = w.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("linear: the packed weight is for the CPU")
        };
        let v = f32_slice(cpu, layout)?;
        // SAFETY: W^T [k, n] of the row-major W [n, k]: element (p, c) at c * k + p < n * k.
        let wt = Mat::new(v.as_ptr(), 1, k as isize);
        let packed = Arc::new(unsafe { PackedRhs::new(half, wt, k, n) });
        *slot = Some((w.id(), packed.clone()));
        Ok(packed)
    }
}

struct LinearInfer {
    bias: Option<Vec<f32>>,
    weight: Arc<PackedRhs>,
}

impl CustomOp2 for LinearInfer {
    fn name(&self) -> &'static str {
        "linear-infer"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        _ws: &CpuStorage,
        _wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _span = super::op_profile::span("linear fwd");
        let x = f32_slice(xs, xl)?;
        let dims = xl.dims();
        let (&k, lead) = dims.split_last().unwrap_or((&0, &[]));
        let (wk, n) = self.weight.dims();
        if wk != k || self.bias.as_ref().is_some_and(|b| b.len() != n) {
            candle_core::bail!("linear: input {dims:?}, weight [{n}, {wk}]");
        }
        let m: usize = lead.iter().product();
        let mut out = vec![0f32; m * n];
        if let Some(b) = &self.bias {
            out.par_chunks_mut(n.max(1))
                .for_each(|row| row.copy_from_slice(b));
        }
        // SAFETY: out [m, n] row-major = x [m, k] row-major x W^T (packed, [k, n]).
        unsafe {
            matmul_packed_rhs(
                m,
                MatMut::new(out.as_mut_ptr(), n as isize, 1),
                self.bias.is_some(),
                Mat::new(x.as_ptr(), k as isize, 1),
                &self.weight,
                1.0,
                all_threads(),
            );
        }
        let mut shape = lead.to_vec();
        shape.push(n);
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

/// `x W^T + b` in `half` for a CPU f32 `x` (any leading dims) without gradient, `W` packed once
/// into `packed`.
pub fn linear_half(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    packed: &PackedWeight,
    half: Half,
) -> Result<Tensor> {
    let bias = b.map(|b| b.flatten_all()?.to_vec1::<f32>()).transpose()?;
    let weight = packed.get(w, half)?;
    x.contiguous()?
        .apply_op2_no_bwd(w, &LinearInfer { bias, weight })
}

/// [`linear_half`] for a layer whose f32 weight was released after packing: only in the
/// precision it was packed in, on the CPU in f32.
pub fn linear_released(
    x: &Tensor,
    b: Option<&Tensor>,
    packed: &PackedWeight,
    half: Option<Half>,
) -> Result<Tensor> {
    let weight = half.and_then(|h| packed.current(h));
    let ok = x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && !x.track_op();
    let Some(weight) = weight.filter(|_| ok) else {
        candle_core::bail!(
            "linear: its f32 weight was released after packing in another precision \
             (released layers run only in the half precision they were packed in, on the CPU)"
        )
    };
    let bias = b.map(|b| b.flatten_all()?.to_vec1::<f32>()).transpose()?;
    // the op's second input only names the weight's shape in errors: a 1-element stand-in
    let stand_in = Tensor::zeros(1, candle_core::DType::F32, x.device())?;
    x.contiguous()?
        .apply_op2_no_bwd(&stand_in, &LinearInfer { bias, weight })
}

/// `x W^T` for training: the forward is one product through [`super::matmul::matmul`]; the
/// backward takes the input's gradient and, only when the weight is trained (a frozen UNet's is
/// not), the weight's. candle's own matmul backward always computes both, and keeps the frozen
/// weight's gradient until the step ends.
struct LinearTrain;

impl CustomOp2 for LinearTrain {
    fn name(&self) -> &'static str {
        "linear-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _span = super::op_profile::span("linear fwd");
        let (x, w) = (f32_slice(xs, xl)?, f32_slice(ws, wl)?);
        let dims = xl.dims();
        let (&k, lead) = dims.split_last().unwrap_or((&0, &[]));
        let &[n, wk] = wl.dims() else {
            candle_core::bail!("linear: weight {:?} is not 2-d", wl.dims())
        };
        if wk != k {
            candle_core::bail!("linear: input {dims:?}, weight {:?}", wl.dims());
        }
        let m: usize = lead.iter().product();
        let mut out = vec![0f32; m * n];
        // SAFETY: out [m, n] row-major = x [m, k] row-major x W^T (W [n, k] row-major).
        unsafe {
            super::matmul::matmul(
                m,
                n,
                k,
                MatMut::new(out.as_mut_ptr(), n as isize, 1),
                false,
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

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _span = super::op_profile::span("linear bwd");
        let (n, k) = w.dims2()?;
        let (need_x, need_w) = (x.track_op(), w.track_op());
        let (x, w, grad) = (x.contiguous()?, w.contiguous()?, grad.contiguous()?);
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (xv, wv, gv) = (cpu_f32(&xs, xl)?, cpu_f32(&ws, wl)?, cpu_f32(&gs, gl)?);
        let m = gv.len() / n.max(1);
        let dev = x.device();
        // through `matmul`, so that bf16 mixed precision takes the backward's products too
        let gx = if need_x {
            let mut gx = vec![0f32; m * k];
            // SAFETY: gx [m, k] = g [m, n] x W [n, k], all row-major and of these sizes
            unsafe {
                super::matmul::matmul(
                    m,
                    k,
                    n,
                    MatMut::new(gx.as_mut_ptr(), k as isize, 1),
                    false,
                    Mat::new(gv.as_ptr(), n as isize, 1),
                    Mat::new(wv.as_ptr(), k as isize, 1),
                    1.0,
                    all_threads(),
                );
            }
            Some(Tensor::from_vec(gx, x.dims(), dev)?)
        } else {
            None
        };
        let gw = if need_w {
            let mut gw = vec![0f32; n * k];
            // SAFETY: gw [n, k] = g^T ([m, n] read transposed) x x [m, k]
            unsafe {
                super::matmul::matmul(
                    n,
                    k,
                    m,
                    MatMut::new(gw.as_mut_ptr(), k as isize, 1),
                    false,
                    Mat::new(gv.as_ptr(), 1, n as isize),
                    Mat::new(xv.as_ptr(), k as isize, 1),
                    1.0,
                    all_threads(),
                );
            }
            Some(Tensor::from_vec(gw, (n, k), dev)?)
        } else {
            None
        };
        Ok((gx, gw))
    }
}

/// `x W^T + b` (any leading dims of `x`) on the CPU in f32 with gradients, as
/// [`LinearTrain`] takes them.
pub fn linear_train(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match b {
        // the bias inside the op: no pre-bias output is kept for the backward pass
        Some(b) => x.apply_op3(&w, &b.contiguous()?, LinearTrain),
        None => x.apply_op2(&w, LinearTrain),
    }
}

/// [`LinearTrain`] with the bias added in the forward pass; its gradient is the output
/// gradient's sum over rows.
impl CustomOp3 for LinearTrain {
    fn name(&self) -> &'static str {
        "linear-bias-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let b = f32_slice(bs, bl)?;
        let n = wl.dims().first().copied().unwrap_or(0);
        if b.len() != n {
            candle_core::bail!("linear: bias {:?} for weight {:?}", bl.dims(), wl.dims());
        }
        let (out, shape) = CustomOp2::cpu_fwd(self, xs, xl, ws, wl)?;
        let CpuStorage::F32(mut out) = out else {
            candle_core::bail!("linear: f32 only")
        };
        out.par_chunks_mut(n.max(1)).for_each(|row| {
            for (o, b) in row.iter_mut().zip(b) {
                *o += b;
            }
        });
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gx, gw) = CustomOp2::bwd(self, x, w, res, grad)?;
        let gb = if b.track_op() {
            Some(grad.reshape(((), b.elem_count()))?.sum(0)?)
        } else {
            None
        };
        Ok((gx, gw, gb))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{max_diff, weighted_grads};
    use candle_core::{Device, Var};

    /// Output and gradients equal candle's linear layer's (f32 sums of 24 products of values
    /// around 1, in another order: 1e-5); a frozen weight gets no gradient.
    #[test]
    fn matches_candles_linear_and_skips_a_frozen_weight() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 5, 24), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 1., (7, 24), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 1., 7, &dev).unwrap()).unwrap();
        let r = Tensor::randn(0f32, 1., (2, 5, 7), &dev).unwrap();
        let ours = linear_train(x.as_tensor(), w.as_tensor(), Some(b.as_tensor())).unwrap();
        let lin = candle_nn::Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()));
        let theirs = candle_core::Module::forward(&lin, x.as_tensor()).unwrap();
        assert!(max_diff(&ours, &theirs) < 1e-5);
        let (g1, g2) = weighted_grads(ours, theirs);
        for v in [&x, &w, &b] {
            let (a, e) = (g1.get(v.as_tensor()), g2.get(v.as_tensor()));
            assert!(max_diff(a.unwrap(), e.unwrap()) < 1e-5);
        }
        let frozen = w.as_tensor().detach();
        let y = linear_train(x.as_tensor(), &frozen, None).unwrap();
        let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(&frozen).is_none());
        let want = r.matmul(&frozen.broadcast_left(2).unwrap()).unwrap();
        assert!(max_diff(g.get(x.as_tensor()).unwrap(), &want) < 1e-5);
    }

    /// A layer whose f32 weight was released runs from its packing alone: the same output as
    /// before the release in that precision (near candle's f32 one), and a clear error in any
    /// other precision.
    #[test]
    fn a_released_weight_runs_from_its_packing_in_its_precision_only() {
        let halves: Vec<Half> = [Half::F16, Half::Bf16]
            .into_iter()
            .filter(|h| super::super::half_gemm::supported(*h))
            .collect();
        if halves.is_empty() {
            eprintln!("skipped: this CPU has neither AVX512-FP16 nor AVX512-BF16");
            return;
        }
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 5, 96), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., (70, 96), &dev).unwrap();
        let b = Tensor::randn(0f32, 1., 70, &dev).unwrap();
        let f32s =
            candle_core::Module::forward(&candle_nn::Linear::new(w.clone(), Some(b.clone())), &x)
                .unwrap();
        for half in halves {
            let packed = PackedWeight::default();
            let before = linear_half(&x, &w, Some(&b), &packed, half).unwrap();
            let after = linear_released(&x, Some(&b), &packed, Some(half)).unwrap();
            assert_eq!(max_diff(&before, &after), 0.0, "{half:?}");
            // 96 products of N(0, 1) values: sums ~10, operands rounded to 8 or 11 bits
            assert!(max_diff(&after, &f32s) < 0.5, "{half:?}");
            let other = if half == Half::F16 {
                Half::Bf16
            } else {
                Half::F16
            };
            for p in [None, Some(other)] {
                let e = linear_released(&x, Some(&b), &packed, p).unwrap_err();
                assert!(e.to_string().contains("released after packing"), "{e}");
            }
        }
    }
}
