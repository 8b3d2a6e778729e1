//! AdamW as PyTorch computes it (`torch.optim.AdamW`, single-tensor path), with its state
//! readable and writable so that a resumed run continues exactly (candle's AdamW keeps its
//! moments private).

use std::collections::HashMap;

use candle_core::{Result, Tensor, Var};

#[derive(Debug, Clone, Copy)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    /// diffusers' train_controlnet.py defaults.
    fn default() -> Self {
        Self {
            lr: 5e-6,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

pub struct AdamW {
    pub params: AdamWParams,
    /// Steps taken.
    pub t: u64,
    vars: Vec<(String, Var)>,
    m: HashMap<String, Tensor>,
    v: HashMap<String, Tensor>,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Self {
        Self {
            params,
            t: 0,
            vars,
            m: HashMap::new(),
            v: HashMap::new(),
        }
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// One update with learning rate `lr` from gradients by name.
    pub fn step(&mut self, grads: &HashMap<String, Tensor>, lr: f64) -> Result<()> {
        self.t += 1;
        let p = self.params;
        let bc1 = 1.0 - p.beta1.powi(self.t as i32);
        let bc2_sqrt = (1.0 - p.beta2.powi(self.t as i32)).sqrt();
        for (name, var) in &self.vars {
            let Some(g) = grads.get(name) else { continue };
            let theta = var.as_tensor();
            // decoupled weight decay first: p *= 1 - lr * wd
            let theta = (theta * (1.0 - lr * p.weight_decay))?;
            let m = match self.m.get(name) {
                Some(m) => ((m * p.beta1)? + (g * (1.0 - p.beta1))?)?,
                None => (g * (1.0 - p.beta1))?,
            };
            let v = match self.v.get(name) {
                Some(v) => ((v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?,
                None => (g.sqr()? * (1.0 - p.beta2))?,
            };
            let denom = ((v.sqrt()? / bc2_sqrt)? + p.eps)?;
            let update = ((&m / &denom)? * (lr / bc1))?;
            var.set(&(theta - update)?)?;
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
        }
        Ok(())
    }

    /// The moments as named tensors (`m.NAME`, `v.NAME`) for a checkpoint.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (k, t) in &self.m {
            out.insert(format!("m.{k}"), t.clone());
        }
        for (k, t) in &self.v {
            out.insert(format!("v.{k}"), t.clone());
        }
        out
    }

    /// Restore moments saved by [`AdamW::state`] after `t` steps.
    pub fn load_state(&mut self, state: HashMap<String, Tensor>, t: u64) {
        self.t = t;
        for (k, v) in state {
            if let Some(n) = k.strip_prefix("m.") {
                self.m.insert(n.to_string(), v);
            } else if let Some(n) = k.strip_prefix("v.") {
                self.v.insert(n.to_string(), v);
            }
        }
    }
}
