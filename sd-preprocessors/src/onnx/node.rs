//! A graph node as the interpreter keeps it: operator, names, attributes, and what was
//! prepared from its constant inputs.

use std::collections::HashMap;

use super::proto::{AttributeProto, NodeProto};
use crate::conv::{Conv2d, Depthwise};

/// What a node keeps from its constant inputs.
pub enum Prepared {
    Conv(Conv2d),
    Depthwise(Depthwise),
}

/// A node to run, with its attributes and anything prepared from constant inputs.
pub(crate) struct Node {
    pub op: String,
    pub name: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attrs: HashMap<String, AttributeProto>,
    pub opset: i64,
    pub prepared: Option<Prepared>,
}

impl Node {
    pub fn label(&self) -> String {
        if self.name.is_empty() {
            format!("{} -> {}", self.op, self.outputs.join(", "))
        } else {
            format!("{} ({})", self.name, self.op)
        }
    }
    /// The name a profile adds this node's time to: its operator, convolutions by kernel,
    /// groups and the kernel that runs them.
    pub fn profile_key(&self) -> String {
        if self.op != "Conv" {
            return self.op.clone();
        }
        let k = self.attr_ints("kernel_shape").unwrap_or_default();
        let g = self.attr_i("group", 1);
        let kind = match &self.prepared {
            Some(Prepared::Conv(_)) => "",
            Some(Prepared::Depthwise(_)) => " depthwise",
            None => " (candle)",
        };
        let groups = if g > 1 {
            format!(" groups {g}")
        } else {
            String::new()
        };
        format!("Conv {k:?}{groups}{kind}")
    }
    pub fn attr_i(&self, key: &str, default: i64) -> i64 {
        self.attrs.get(key).map_or(default, |a| a.i)
    }
    pub fn attr_f(&self, key: &str, default: f32) -> f32 {
        self.attrs.get(key).map_or(default, |a| a.f)
    }
    pub fn attr_ints(&self, key: &str) -> Option<Vec<i64>> {
        self.attrs.get(key).map(|a| a.ints.clone())
    }
    pub fn attr_s(&self, key: &str, default: &str) -> String {
        self.attrs.get(key).map_or(default.to_string(), |a| {
            String::from_utf8_lossy(&a.s).into_owned()
        })
    }
}

impl Node {
    pub(crate) fn from_proto(n: NodeProto, opset: i64) -> Result<Self, String> {
        if !(n.domain.is_empty() || n.domain == "ai.onnx") {
            return Err(format!(
                "node `{}`: operator {}::{} is not an ONNX operator",
                n.name, n.domain, n.op_type
            ));
        }
        Ok(Self {
            attrs: n
                .attribute
                .into_iter()
                .map(|a| (a.name.clone(), a))
                .collect(),
            op: n.op_type,
            name: n.name,
            inputs: n.input,
            outputs: n.output,
            opset,
            prepared: None,
        })
    }
}
