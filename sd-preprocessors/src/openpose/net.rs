//! The CMU OpenPose body network (COCO-18) as controlnet_aux's `bodypose_model`:
//! a VGG-19 stem and six two-branch stages, PAFs (38 channels) and heatmaps (19).
//! Weights: `body_pose_model.pth` keys (`conv1_1.weight`, `Mconv7_stage6_L2.bias`, ...).
//! Convolutions: [`crate::conv::Conv2d`] (banded im2col; candle's CPU conv2d unrolls the whole
//! image at once and was 1.5x slower here).

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::conv::{Conv2d, Geometry};

/// One conv layer: name, input/output channels, kernel, padding.
type Layer = (String, usize, usize, usize, usize);

/// A layer: a convolution (with or without a ReLU after it) or a 2x2 max pool.
pub(super) enum Op {
    Conv { conv: Conv2d, relu: bool },
    Pool,
}

/// Layers run in order (also the hand and face networks', `cpm.rs`).
pub(super) struct Block(pub(super) Vec<Op>);

impl Block {
    pub(super) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for op in &self.0 {
            x = match op {
                Op::Conv { conv, relu } => {
                    let y = conv.forward(&x)?;
                    if *relu {
                        y.relu()?
                    } else {
                        y
                    }
                }
                Op::Pool => x.max_pool2d(2)?,
            };
        }
        Ok(x)
    }
}

/// The layer names of the network in order: the stem (`None` = max pool), then per stage
/// the L1 and L2 branches.
fn stem() -> Vec<Option<Layer>> {
    let c = |n: &str, i, o| Some((n.to_string(), i, o, 3, 1));
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
        c("conv4_3_CPM", 512, 256),
        c("conv4_4_CPM", 256, 128),
    ]
}

fn branch(stage: usize, l: usize) -> Vec<Layer> {
    let out = if l == 1 { 38 } else { 19 };
    if stage == 1 {
        let n = |i: usize| format!("conv5_{i}_CPM_L{l}");
        vec![
            (n(1), 128, 128, 3, 1),
            (n(2), 128, 128, 3, 1),
            (n(3), 128, 128, 3, 1),
            (n(4), 128, 512, 1, 0),
            (n(5), 512, out, 1, 0),
        ]
    } else {
        let n = |i: usize| format!("Mconv{i}_stage{stage}_L{l}");
        let mut v = vec![(n(1), 185, 128, 7, 3)];
        for i in 2..=5 {
            v.push((n(i), 128, 128, 7, 3));
        }
        v.push((n(6), 128, 128, 1, 0));
        v.push((n(7), 128, out, 1, 0));
        v
    }
}

/// Every weight the network needs, with its shape (`[out, in, k, k]` and `[out]`).
pub fn parameter_shapes() -> Vec<(String, Vec<usize>)> {
    let mut layers: Vec<Layer> = stem().into_iter().flatten().collect();
    for stage in 1..=6 {
        for l in [1, 2] {
            layers.extend(branch(stage, l));
        }
    }
    let mut out = Vec::new();
    for (n, i, o, k, _) in layers {
        out.push((format!("{n}.weight"), vec![o, i, k, k]));
        out.push((format!("{n}.bias"), vec![o]));
    }
    out
}

/// Whether a layer is followed by a ReLU. The last layer of each branch is linear, except
/// `Mconv7_stage6_L2`: the reference's `no_relu_layers` lists `Mconv7_stage6_L1` twice.
fn has_relu(name: &str) -> bool {
    !(name.starts_with("conv5_5_CPM")
        || (name.starts_with("Mconv7_") && name != "Mconv7_stage6_L2"))
}

/// The body network.
pub struct BodyNet {
    stem: Block,
    stages: Vec<(Block, Block)>,
}

impl BodyNet {
    /// Build from a tensor getter (`name -> tensor`), checking every shape.
    pub fn new(
        get: &dyn Fn(&str) -> Result<Tensor, String>,
        device: &Device,
    ) -> Result<Self, String> {
        let conv = |(n, i, o, k, p): &Layer| -> Result<Op, String> {
            let w = get(&format!("{n}.weight"))?;
            let b = get(&format!("{n}.bias"))?;
            if w.dims() != [*o, *i, *k, *k] || b.dims() != [*o] {
                return Err(format!(
                    "{n}: weight {:?} / bias {:?}, expected [{o}, {i}, {k}, {k}] / [{o}] \
                     (not the OpenPose body model?)",
                    w.dims(),
                    b.dims()
                ));
            }
            let to = |t: Tensor| {
                t.to_dtype(candle_core::DType::F32)
                    .and_then(|t| t.to_device(device))
                    .map_err(|e| format!("{n}: {e}"))
            };
            let conv = Conv2d::new(&to(w)?, Some(&to(b)?), Geometry::new(1, *p))
                .map_err(|e| format!("{n}: {e}"))?;
            Ok(Op::Conv {
                conv,
                relu: has_relu(n),
            })
        };
        let stem = Block(
            stem()
                .iter()
                .map(|l| match l {
                    Some(l) => conv(l),
                    None => Ok(Op::Pool),
                })
                .collect::<Result<_, _>>()?,
        );
        let mut stages = Vec::new();
        for s in 1..=6 {
            let b = |l| -> Result<Block, String> {
                Ok(Block(
                    branch(s, l).iter().map(conv).collect::<Result<_, _>>()?,
                ))
            };
            stages.push((b(1)?, b(2)?));
        }
        Ok(Self { stem, stages })
    }

    /// Load `body_pose_model.pth` (read without running pickle code) or a safetensors file.
    pub fn load(path: &Path, device: &Device) -> Result<Self, String> {
        let store =
            sd_weights::Store::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::new(
            &|n| {
                store.get(n).map_err(|_| {
                    format!(
                        "{}: no tensor `{n}` (not the OpenPose body model?)",
                        path.display()
                    )
                })
            },
            device,
        )
    }

    /// `x`: `[1, 3, H, W]` (BGR, `/256 - 0.5`, sides multiples of 8). Returns (PAFs
    /// `[1, 38, H/8, W/8]`, heatmaps `[1, 19, H/8, W/8]`).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let out1 = self.stem.forward(x)?;
        let mut input = out1.clone();
        let mut last = None;
        for (i, (l1, l2)) in self.stages.iter().enumerate() {
            let a = l1.forward(&input)?;
            let b = l2.forward(&input)?;
            if i + 1 < self.stages.len() {
                input = Tensor::cat(&[&a, &b, &out1], 1)?;
            } else {
                last = Some((a, b));
            }
        }
        Ok(last.expect("six stages"))
    }
}
