//! Gradient checkpointing, as PyTorch's reentrant `torch.utils.checkpoint` does it: a block run
//! through [`checkpointed`] keeps only its inputs for the backward pass (its activations are
//! freed as soon as its output is made); its backward runs the block again on tracked copies of
//! the inputs and backpropagates through that copy alone. The weight gradients found there are
//! collected while [`backward`] runs and merged into the store it returns.
//!
//! candle's graph keeps every activation a loss depends on until the loss is dropped, so this is
//! the one way to give memory back during a step. It is switched on per thread
//! ([`set_enabled`]); the trainers do so for `gradient_checkpointing = true`.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, TensorId,
    Var,
};

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(false) };
    /// Weight gradients of recomputed blocks, while [`backward`] runs on this thread.
    static SINK: RefCell<Option<HashMap<TensorId, Tensor>>> = const { RefCell::new(None) };
}

/// Switch checkpointing on or off for the blocks built on this thread from now on.
pub fn set_enabled(on: bool) {
    ENABLED.with(|e| e.set(on));
}

pub fn enabled() -> bool {
    ENABLED.with(|e| e.get())
}

/// Whether a block with these inputs should run through [`checkpointed`]: checkpointing is on
/// on the CPU, and some input is tracked (a block on untracked inputs keeps nothing anyway, and its
/// weights' gradients need a tracked input to reach them through the op).
pub fn wanted(inputs: &[&Tensor]) -> bool {
    enabled() && inputs.iter().all(|t| t.device().is_cpu()) && inputs.iter().any(|t| t.track_op())
}

type Block = dyn Fn(&[Tensor]) -> Result<Tensor> + Send + Sync;

/// `block(inputs)`, keeping only the inputs for backward. `block` must compute the same
/// function every time it is called (it runs again in the backward pass) and must not
/// checkpoint inside (it runs with checkpointing off). Untracked inputs are passed as they are
/// and get no gradient; at most three inputs may be tracked.
pub fn checkpointed(
    inputs: &[&Tensor],
    block: impl Fn(&[Tensor]) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    let inputs: Vec<Tensor> = inputs.iter().map(|&t| t.clone()).collect();
    let tracked: Vec<usize> = (0..inputs.len())
        .filter(|&i| inputs[i].track_op())
        .collect();
    let out = without_checkpointing(|| block(&inputs))?;
    if tracked.is_empty() {
        return Ok(out);
    }
    // the output's values, without the graph that made them (dropped with `out`)
    let values = out.detach();
    drop(out);
    let args: Vec<Tensor> = tracked.iter().map(|&i| inputs[i].clone()).collect();
    let op = Checkpoint {
        block: Box::new(block),
        inputs: inputs
            .iter()
            .enumerate()
            .map(|(i, t)| (!tracked.contains(&i)).then(|| t.clone()))
            .collect(),
        out: Mutex::new(Some(values)),
    };
    match args.as_slice() {
        [a] => a.apply_op1(op),
        [a, b] => a.apply_op2(b, op),
        [a, b, c] => a.apply_op3(b, c, op),
        _ => candle_core::bail!(
            "gradient checkpointing: {} tracked inputs (at most 3)",
            args.len()
        ),
    }
}

/// `loss.backward()` that also collects the weight gradients of checkpointed blocks: use it
/// for any loss that may run through [`checkpointed`] blocks.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    let previous = SINK.with(|s| s.borrow_mut().replace(HashMap::new()));
    let res = loss.backward();
    let sink = SINK.with(|s| std::mem::replace(&mut *s.borrow_mut(), previous));
    let mut grads = res?;
    for (id, g) in sink.unwrap_or_default() {
        let sum = match grads.get_id(id) {
            Some(e) => (e + g)?,
            None => g,
        };
        grads.insert_id(id, sum);
    }
    Ok(grads)
}

fn without_checkpointing<R>(f: impl FnOnce() -> R) -> R {
    let was = enabled();
    set_enabled(false);
    let r = f();
    set_enabled(was);
    r
}

struct Checkpoint {
    block: Box<Block>,
    /// The untracked inputs (the tracked ones are the op's arguments), in the block's order.
    inputs: Vec<Option<Tensor>>,
    /// The forward output, taken by the op's forward.
    out: Mutex<Option<Tensor>>,
}

impl Checkpoint {
    fn forward(&self) -> Result<(CpuStorage, Shape)> {
        let _span = crate::cpu::op_profile::span("checkpoint output copy");
        let out = self
            .out
            .lock()
            .ok()
            .and_then(|mut o| o.take())
            .ok_or_else(|| candle_core::Error::Msg("checkpoint: forward run twice".into()))?;
        let shape = out.shape().clone();
        let flat = out.flatten_all()?;
        let storage = match out.dtype() {
            DType::F32 => CpuStorage::F32(flat.to_vec1()?),
            DType::BF16 => CpuStorage::BF16(flat.to_vec1()?),
            DType::F16 => CpuStorage::F16(flat.to_vec1()?),
            DType::F64 => CpuStorage::F64(flat.to_vec1()?),
            d => candle_core::bail!("gradient checkpointing: a {d:?} block output"),
        };
        Ok((storage, shape))
    }

    /// Run the block again on tracked copies of `args` (the tracked inputs, in order) and
    /// backpropagate `grad`: the inputs' gradients; the weights' go to [`backward`]'s sink.
    fn backward(&self, args: &[&Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let vars = args
            .iter()
            .map(|a| Var::from_tensor(a))
            .collect::<Result<Vec<_>>>()?;
        let mut next = vars.iter();
        let inputs = self
            .inputs
            .iter()
            .map(|i| match i {
                Some(t) => Ok(t.clone()),
                None => next
                    .next()
                    .map(|v| v.as_tensor().clone())
                    .ok_or_else(|| candle_core::Error::Msg("checkpoint: inputs".into())),
            })
            .collect::<Result<Vec<_>>>()?;
        let out = without_checkpointing(|| (self.block)(&inputs))?;
        let mut grads = out.backward_from(grad.clone())?;
        drop(out);
        let input_grads: Vec<Option<Tensor>> =
            vars.iter().map(|v| grads.remove(v.as_tensor())).collect();
        let ids: Vec<TensorId> = grads.get_ids().copied().collect();
        SINK.with(|s| -> Result<()> {
            let mut s = s.borrow_mut();
            let Some(sink) = s.as_mut() else {
                candle_core::bail!(
                    "a checkpointed block's backward ran outside sd_pipeline::model::checkpoint::backward"
                )
            };
            for id in ids {
                if let Some(g) = grads.get_id(id) {
                    let sum = match sink.remove(&id) {
                        Some(e) => (e + g)?,
                        None => g.clone(),
                    };
                    sink.insert(id, sum);
                }
            }
            Ok(())
        })?;
        Ok(input_grads)
    }
}

impl CustomOp1 for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.forward()
    }

    fn bwd(&self, a: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let mut g = self.backward(&[a], grad)?;
        Ok(g.remove(0))
    }
}

impl CustomOp2 for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mut g = self.backward(&[a, b], grad)?.into_iter();
        Ok((g.next().flatten(), g.next().flatten()))
    }
}

impl CustomOp3 for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut g = self.backward(&[a, b, c], grad)?.into_iter();
        Ok((g.next().flatten(), g.next().flatten(), g.next().flatten()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// A block of two tracked inputs and a weight, checkpointed: the same output and the same
    /// gradients (inputs and weight) as run plainly, and a plain `backward` refuses it.
    #[test]
    fn checkpointed_block_gives_the_plain_gradients() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (3, 5), &dev).unwrap()).unwrap();
        let t = Var::from_tensor(&Tensor::randn(0f32, 1., (3, 1), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 1., (5, 4), &dev).unwrap()).unwrap();
        let c = Tensor::randn(0f32, 1., (3, 4), &dev).unwrap();
        let wt = w.as_tensor().clone();
        // untracked third input `c`, passed through as it is
        let block = move |i: &[Tensor]| -> Result<Tensor> {
            (i[0].broadcast_add(&i[1])?.matmul(&wt)?.tanh()? * &i[2])?.exp()
        };
        let loss = |y: Tensor| (y * 0.5).unwrap().sum_all().unwrap();
        let inputs = [x.as_tensor(), t.as_tensor(), &c];
        let plain = block(&inputs.map(|t| t.clone())).unwrap();
        let g_plain = loss(plain.clone()).backward().unwrap();
        set_enabled(true);
        assert!(wanted(&inputs));
        let ck = checkpointed(&inputs, block).unwrap();
        set_enabled(false);
        let diff = crate::cpu::max_diff;
        assert_eq!(diff(&plain, &ck), 0.0);
        let l = loss(ck);
        let e = l.backward().unwrap_err().to_string();
        assert!(e.contains("checkpoint"), "{e}");
        let g_ck = backward(&l).unwrap();
        for v in [&x, &t, &w] {
            let (a, b) = (g_plain.get(v).unwrap(), g_ck.get(v).unwrap());
            // the same f32 operations in the same order
            assert!(diff(a, b) <= 1e-6, "{}", diff(a, b));
        }
        assert!(g_ck.get(&c).is_none());
    }
}
