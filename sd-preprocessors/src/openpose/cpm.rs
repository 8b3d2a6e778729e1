//! The CMU OpenPose hand and face networks: controlnet_aux's `handpose_model` (22 heatmaps:
//! 21 hand points and the background) and `FaceNet` (71: 70 face points and the background)
//! are the same layers with another number of outputs. A VGG-19 stem to `conv5_3_CPM` (128
//! channels at stride 8), stage 1 (`conv6_1_CPM`, `conv6_2_CPM`) and five refinement stages
//! (`Mconv1_stageN` .. `Mconv7_stageN`) on the previous heatmaps concatenated with the stem's
//! features; the last layer of every stage is linear. Weights: the keys of
//! `hand_pose_model.pth` / `facenet.pth` (`conv1_1.weight`, `Mconv7_stage6.bias`, ...).

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::net::{Block, Op};
use crate::conv::{Conv2d, Geometry};

/// One conv layer: name, input/output channels, kernel, padding, ReLU after it.
type Layer = (String, usize, usize, usize, usize, bool);

/// The stem, `None` = 2x2 max pool.
fn stem() -> Vec<Option<Layer>> {
    let c = |n: &str, i, o| Some((n.to_string(), i, o, 3, 1, true));
    vec![
        c("conv1_1", 3, 64),
        c("conv1_2", 64, 64),
        None,
        c("conv2_1", 64, 128),
        c("conv2_2", 128, 128),
        None,
        c("conv3_1", 128, 256),
        c("conv3_2", 256, 256),
        c("conv3_3", 256, 256),
        c("conv3_4", 256, 256),
        None,
        c("conv4_1", 256, 512),
        c("conv4_2", 512, 512),
        c("conv4_3", 512, 512),
        c("conv4_4", 512, 512),
        c("conv5_1", 512, 512),
        c("conv5_2", 512, 512),
        c("conv5_3_CPM", 512, 128),
    ]
}

fn stage(s: usize, out: usize) -> Vec<Layer> {
    if s == 1 {
        return vec![
            ("conv6_1_CPM".into(), 128, 512, 1, 0, true),
            ("conv6_2_CPM".into(), 512, out, 1, 0, false),
        ];
    }
    let n = |i: usize| format!("Mconv{i}_stage{s}");
    let mut v = vec![(n(1), 128 + out, 128, 7, 3, true)];
    for i in 2..=5 {
        v.push((n(i), 128, 128, 7, 3, true));
    }
    v.push((n(6), 128, 128, 1, 0, true));
    v.push((n(7), 128, out, 1, 0, false));
    v
}

/// Every weight of the network with `out` heatmaps, with its shape.
pub fn parameter_shapes(out: usize) -> Vec<(String, Vec<usize>)> {
    let mut layers: Vec<Layer> = stem().into_iter().flatten().collect();
    for s in 1..=6 {
        layers.extend(stage(s, out));
    }
    let mut v = Vec::new();
    for (n, i, o, k, _, _) in layers {
        v.push((format!("{n}.weight"), vec![o, i, k, k]));
        v.push((format!("{n}.bias"), vec![o]));
    }
    v
}

/// The hand (22 outputs) or face (71) network.
pub struct CpmNet {
    stem: Block,
    stages: Vec<Block>,
    outputs: usize,
}

impl CpmNet {
    /// Build from a tensor getter, checking every shape; `what` names the model in errors.
    pub fn new(
        get: &dyn Fn(&str) -> Result<Tensor, String>,
        outputs: usize,
        what: &str,
        device: &Device,
    ) -> Result<Self, String> {
        let conv = |(n, i, o, k, p, relu): &Layer| -> Result<Op, String> {
            let w = get(&format!("{n}.weight"))?;
            let b = get(&format!("{n}.bias"))?;
            if w.dims() != [*o, *i, *k, *k] || b.dims() != [*o] {
                return Err(format!(
                    "{n}: weight {:?} / bias {:?}, expected [{o}, {i}, {k}, {k}] / [{o}] \
                     (not the {what}?)",
                    w.dims(),
                    b.dims()
                ));
            }
            let to = |t: Tensor| {
                t.to_dtype(DType::F32)
                    .and_then(|t| t.to_device(device))
                    .map_err(|e| format!("{n}: {e}"))
            };
            let conv = Conv2d::new(&to(w)?, Some(&to(b)?), Geometry::new(1, *p))
                .map_err(|e| format!("{n}: {e}"))?;
            Ok(Op::Conv { conv, relu: *relu })
        };
        let stem = Block(
            stem()
                .iter()
                .map(|l| l.as_ref().map_or(Ok(Op::Pool), conv))
                .collect::<Result<_, _>>()?,
        );
        let stages = (1..=6)
            .map(|s| {
                Ok(Block(stage(s, outputs).iter().map(conv).collect::<Result<
                    _,
                    String,
                >>(
                )?))
            })
            .collect::<Result<_, String>>()?;
        Ok(Self {
            stem,
            stages,
            outputs,
        })
    }

    /// Load a `.pth` (read without running pickle code) or `.safetensors` file.
    pub fn load(path: &Path, outputs: usize, what: &str, device: &Device) -> Result<Self, String> {
        let store =
            sd_weights::Store::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::new(
            &|n| {
                store
                    .get(n)
                    .map_err(|_| format!("{}: no tensor `{n}` (not the {what}?)", path.display()))
            },
            outputs,
            what,
            device,
        )
        .map_err(|e| {
            if e.starts_with(&path.display().to_string()) {
                e
            } else {
                format!("{}: {e}", path.display())
            }
        })
    }

    /// The number of heatmaps.
    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// `x`: `[1, 3, H, W]` (BGR, `/256 - 0.5`); the last stage's heatmaps `[1, out, H/8, W/8]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let features = self.stem.forward(x)?;
        let mut h = self.stages[0].forward(&features)?;
        for s in &self.stages[1..] {
            h = s.forward(&Tensor::cat(&[&h, &features], 1)?)?;
        }
        Ok(h)
    }
}
