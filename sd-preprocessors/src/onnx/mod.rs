//! A small ONNX interpreter for the annotator networks that users have as `.onnx` files (DWPose's
//! `yolox_l.onnx` and `dw-ll_ucoco_384.onnx`): the graph is read from the file (so no layer
//! names need mapping), constant subgraphs are folded once at load, and each node runs on
//! candle tensors, convolutions on this crate's CPU kernels ([`crate::conv`]). The operators
//! are those of the ONNX specification (opsets 7 to 18) that exported PyTorch CNNs and
//! transformers use; any other is refused by name when the file is loaded.
//!
//! Values are `F32` (`FLOAT`, `FLOAT16`, `DOUBLE` read as f32), `I64` (every integer type)
//! or `U8` (`BOOL`).

mod node;
mod ops;
pub mod proto;
mod tensor;
pub mod torchscript;

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use prost::Message;

use node::Node;
use tensor::tensor_of;
pub use tensor::{element_limit, with_element_limit, MAX_ELEMENTS};

/// An `.onnx` file's bytes decoded (not checked: [`Model::from_proto`] checks).
pub fn decode(bytes: &[u8]) -> Result<proto::ModelProto, String> {
    proto::ModelProto::decode(bytes).map_err(|e| format!("not an ONNX model (protobuf: {e})"))
}

/// An `.onnx` file read (at most [`MAX_FILE_BYTES`]) and decoded; errors name the file.
pub fn decode_file(path: &Path) -> Result<proto::ModelProto, String> {
    let bytes = sd_plugins_api::input_file::read_limited(path, MAX_FILE_BYTES)?;
    decode(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// A model as the bytes of an `.onnx` file.
pub fn encode(model: &proto::ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

/// Largest model file read (the DWPose files are 217 and 135 MB).
pub const MAX_FILE_BYTES: u64 = 2 << 30;

/// A loaded model: nodes in the file's (topological) order with their constants folded.
pub struct Model {
    nodes: Vec<Node>,
    /// Initializers and folded constants.
    consts: HashMap<String, Tensor>,
    inputs: Vec<String>,
    outputs: Vec<String>,
    /// For each value computed at run time, the index of the last node reading it.
    last_use: HashMap<String, usize>,
}

impl Model {
    /// Read an `.onnx` file (errors name the file, and the node or tensor at fault).
    pub fn load(path: &Path) -> Result<Self, String> {
        Self::from_proto(decode_file(path)?).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// [`Model::load`] of a file's bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        Self::from_proto(decode(bytes)?)
    }

    /// [`Model::load`] of a decoded model (one converted from TorchScript, say).
    pub fn from_proto(model: proto::ModelProto) -> Result<Self, String> {
        let graph = model.graph.ok_or("not an ONNX model: it has no graph")?;
        if graph.node.is_empty() {
            return Err("not an ONNX model: its graph has no nodes".into());
        }
        let opset = model
            .opset_import
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map_or(11, |o| o.version);
        if !(7..=21).contains(&opset) {
            return Err(format!("ONNX opset {opset} is not supported (7 to 21 are)"));
        }
        let mut consts = HashMap::new();
        for t in &graph.initializer {
            consts.insert(t.name.clone(), tensor_of(t)?);
        }
        let inputs: Vec<String> = graph
            .input
            .iter()
            .map(|v| v.name.clone())
            .filter(|n| !consts.contains_key(n))
            .collect();
        let outputs: Vec<String> = graph.output.iter().map(|v| v.name.clone()).collect();
        let mut nodes = Vec::new();
        for n in graph.node {
            let node = Node::from_proto(n, opset)?;
            ops::check_supported(&node)?;
            nodes.push(node);
        }
        let mut m = Self {
            nodes,
            consts,
            inputs,
            outputs,
            last_use: HashMap::new(),
        };
        m.fold()?;
        m.check_defined()?;
        m.fuse_silu();
        for node in &mut m.nodes {
            node.prepared =
                ops::prepare(node, &m.consts).map_err(|e| format!("{}: {e}", node.label()))?;
        }
        for (i, node) in m.nodes.iter().enumerate() {
            for x in &node.inputs {
                if !x.is_empty() && !m.consts.contains_key(x) {
                    m.last_use.insert(x.clone(), i);
                }
            }
        }
        Ok(m)
    }

    /// Evaluate every node whose inputs are all constant, once, and keep its outputs.
    fn fold(&mut self) -> Result<(), String> {
        let mut kept = Vec::with_capacity(self.nodes.len());
        for node in std::mem::take(&mut self.nodes) {
            let constant = node
                .inputs
                .iter()
                .all(|x| x.is_empty() || self.consts.contains_key(x));
            if constant && ops::foldable(&node) {
                let ins: Vec<Option<&Tensor>> = node
                    .inputs
                    .iter()
                    .map(|x| (!x.is_empty()).then(|| &self.consts[x]))
                    .collect();
                let outs = ops::run(&node, &ins).map_err(|e| format!("{}: {e}", node.label()))?;
                for (name, t) in node.outputs.iter().zip(outs) {
                    self.consts.insert(name.clone(), t);
                }
            } else {
                kept.push(node);
            }
        }
        self.nodes = kept;
        Ok(())
    }

    /// `Mul(x, Sigmoid(x))` (PyTorch's exported SiLU) as one `SiLU` node, when nothing else
    /// reads the sigmoid.
    fn fuse_silu(&mut self) {
        let mut uses: HashMap<&str, usize> = HashMap::new();
        for n in &self.nodes {
            for x in &n.inputs {
                *uses.entry(x.as_str()).or_default() += 1;
            }
        }
        for o in &self.outputs {
            *uses.entry(o.as_str()).or_default() += 1;
        }
        let sigmoid_of: HashMap<&str, (usize, &str)> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.op == "Sigmoid" && n.inputs.len() == 1 && n.outputs.len() == 1)
            .map(|(i, n)| (n.outputs[0].as_str(), (i, n.inputs[0].as_str())))
            .collect();
        let mut fused: Vec<(usize, usize, String)> = Vec::new();
        for (j, n) in self.nodes.iter().enumerate() {
            if n.op != "Mul" || n.inputs.len() != 2 {
                continue;
            }
            for (x, s) in [(0, 1), (1, 0)].map(|(a, b)| (&n.inputs[a], &n.inputs[b])) {
                if let Some(&(i, sx)) = sigmoid_of.get(s.as_str()) {
                    if sx == x && uses.get(s.as_str()) == Some(&1) {
                        fused.push((i, j, x.clone()));
                        break;
                    }
                }
            }
        }
        let mut drop = vec![false; self.nodes.len()];
        for (i, j, x) in fused {
            drop[i] = true;
            let n = &mut self.nodes[j];
            n.op = "SiLU".into();
            n.inputs = vec![x];
        }
        let mut k = 0;
        self.nodes.retain(|_| {
            k += 1;
            !drop[k - 1]
        });
    }

    /// Every input of every node is a graph input, a constant or an earlier node's output.
    fn check_defined(&self) -> Result<(), String> {
        let mut known: std::collections::HashSet<&str> =
            self.inputs.iter().map(String::as_str).collect();
        for node in &self.nodes {
            for x in &node.inputs {
                if !x.is_empty() && !known.contains(x.as_str()) && !self.consts.contains_key(x) {
                    return Err(format!(
                        "{}: its input `{x}` is made by no earlier node",
                        node.label()
                    ));
                }
            }
            known.extend(node.outputs.iter().map(String::as_str));
        }
        for o in &self.outputs {
            if !known.contains(o.as_str()) && !self.consts.contains_key(o) {
                return Err(format!("the graph output `{o}` is made by no node"));
            }
        }
        Ok(())
    }

    /// The graph's input names (initializers excluded).
    pub fn input_names(&self) -> &[String] {
        &self.inputs
    }

    /// The graph's output names.
    pub fn output_names(&self) -> &[String] {
        &self.outputs
    }

    /// The operator types the graph runs, sorted (folded constants excluded).
    pub fn op_types(&self) -> Vec<String> {
        let mut v: Vec<String> = self.nodes.iter().map(|n| n.op.clone()).collect();
        v.sort();
        v.dedup();
        v
    }

    /// Run the graph on its inputs (by name, f32 on the CPU); the graph's outputs in order.
    pub fn run(&self, inputs: &[(&str, Tensor)]) -> Result<Vec<Tensor>, String> {
        self.run_timed(inputs, None)
    }

    /// [`Model::run`], adding each node's seconds to `times` under [`Node::profile_key`].
    pub fn run_profiled(
        &self,
        inputs: &[(&str, Tensor)],
        times: &mut HashMap<String, f64>,
    ) -> Result<Vec<Tensor>, String> {
        self.run_timed(inputs, Some(times))
    }

    fn run_timed(
        &self,
        inputs: &[(&str, Tensor)],
        mut times: Option<&mut HashMap<String, f64>>,
    ) -> Result<Vec<Tensor>, String> {
        let mut values: HashMap<&str, Tensor> = HashMap::new();
        for name in &self.inputs {
            let t = inputs
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.clone())
                .ok_or_else(|| format!("the model's input `{name}` was not given"))?;
            values.insert(name, t);
        }
        for (i, node) in self.nodes.iter().enumerate() {
            let ins: Vec<Option<&Tensor>> = node
                .inputs
                .iter()
                .map(|x| {
                    if x.is_empty() {
                        Ok(None)
                    } else {
                        self.consts
                            .get(x)
                            .or_else(|| values.get(x.as_str()))
                            .map(Some)
                            .ok_or_else(|| format!("{}: input `{x}` has no value", node.label()))
                    }
                })
                .collect::<Result<_, String>>()?;
            let start = times.is_some().then(std::time::Instant::now);
            let outs = ops::run(node, &ins).map_err(|e| format!("{}: {e}", node.label()))?;
            if let (Some(times), Some(start)) = (times.as_deref_mut(), start) {
                *times.entry(node.profile_key()).or_default() += start.elapsed().as_secs_f64();
            }
            for (name, t) in node.outputs.iter().zip(outs) {
                if t.elem_count() > element_limit() {
                    return Err(format!(
                        "{}: makes more than {} values",
                        node.label(),
                        element_limit()
                    ));
                }
                values.insert(name, t);
            }
            for x in &node.inputs {
                if self.last_use.get(x) == Some(&i) && !self.outputs.contains(x) {
                    values.remove(x.as_str());
                }
            }
        }
        self.outputs
            .iter()
            .map(|o| {
                self.consts
                    .get(o)
                    .or_else(|| values.get(o.as_str()))
                    .cloned()
                    .ok_or_else(|| format!("the graph output `{o}` has no value"))
            })
            .collect()
    }
}

#[cfg(test)]
mod regressions {
    use super::*;

    /// Inputs the `onnx_model` fuzz target found (fuzz/regressions/onnx_model), run as it runs
    /// them: an error is fine, a panic is not. `reduce_l2_of_integers`: a ReduceL2 of an i64
    /// tensor (a folded Shape) reached candle's square, which panics on integers.
    #[test]
    fn fuzz_regressions_end_in_errors_not_panics() {
        let bytes = include_bytes!("../../../fuzz/regressions/onnx_model/reduce_l2_of_integers");
        with_element_limit(1 << 22, || {
            let m = Model::from_bytes(bytes);
            let ran = m.map(|m| {
                let x = Tensor::ones(
                    (1, 3, 8, 8),
                    candle_core::DType::F32,
                    &candle_core::Device::Cpu,
                )
                .unwrap();
                let inputs: Vec<(&str, Tensor)> = m
                    .input_names()
                    .iter()
                    .map(|n| (n.as_str(), x.clone()))
                    .collect();
                m.run(&inputs)
            });
            let err = match ran {
                Err(e) | Ok(Err(e)) => e,
                Ok(Ok(_)) => String::new(),
            };
            assert!(err.contains("float input expected"), "{err}");
        });
    }
}
