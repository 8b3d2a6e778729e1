//! M-LSD large (controlnet_aux `MobileV2_MLSD_Large`): a MobileNetV2 backbone cut after its
//! 96-channel stage (features 0..=13; FPN taps after features 1, 3, 6, 10, 13), then the
//! decoder blocks 15..23 (`BlockTypeA`: two 1x1 conv-BN-ReLU, the deeper one upsampled x2
//! bilinear with align_corners=True, concatenated; `BlockTypeB`: 3x3 conv-BN-ReLU with a
//! residual, then 3x3 conv-BN-ReLU; `BlockTypeC`: dilated (5) 3x3, 3x3, 1x1). Output: the last
//! conv's channels 7..16, at half the input size (the TP map: centre logits, then start and
//! end displacements).
//!
//! Weights: `mlsd_large_512_fp32.pth` keys (`backbone.features.0.0.weight`,
//! `backbone.features.2.conv.1.1.running_var`, `block23.conv3.bias`, ...). BatchNorm (eval,
//! eps 1e-5) is folded into the conv before it. A stride-2 layer pads the right and bottom by
//! one and convolves without padding (the TFLite padding the reference copies).

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::conv::{fold_batch_norm, Conv2d, Depthwise, Geometry};

const BN_EPS: f64 = 1e-5;

#[derive(Clone, Copy)]
enum Act {
    None,
    Relu,
    Relu6,
}

fn act(x: Tensor, a: Act) -> candle_core::Result<Tensor> {
    match a {
        Act::None => Ok(x),
        Act::Relu => x.relu(),
        Act::Relu6 => x.clamp(0f32, 6f32),
    }
}

/// One convolution with its BatchNorm folded in (as its bias), and its activation.
struct Conv {
    op: Op,
    act: Act,
}

enum Op {
    /// Over all channels: 1x1, or 3x3 ([`tflite`] when strided, else as much padding as the
    /// dilation).
    Full(Conv2d),
    /// 3x3, one filter per channel.
    Depthwise(Depthwise),
}

/// The padding of a 3x3 layer: stride 1 with `dilation` and as much zero padding all round,
/// or stride 2 with one of zero padding on the right and bottom only (TFLite's).
fn tflite(stride: usize, dilation: usize) -> Geometry {
    if stride == 2 {
        Geometry {
            stride,
            pad: (0, 1),
            dilation,
        }
    } else {
        Geometry::same(3, dilation)
    }
}

impl Conv {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = match &self.op {
            Op::Full(c) => c.forward(x)?,
            Op::Depthwise(c) => c.forward(x)?,
        };
        act(y, self.act)
    }
}

/// A tensor getter: name to tensor, or an error naming what is missing.
type Getter<'a> = &'a dyn Fn(&str) -> Result<Tensor, String>;

/// Where the weights come from while the network is built: a getter (checked shapes), or a
/// recorder listing every name and shape (one description of the architecture for both).
struct Weights<'a> {
    get: Option<Getter<'a>>,
    seen: Vec<(String, Vec<usize>)>,
}

impl Weights<'_> {
    fn tensor(&mut self, name: String, shape: &[usize]) -> Result<Vec<f32>, String> {
        let Some(get) = self.get else {
            self.seen.push((name, shape.to_vec()));
            return Ok(vec![0.0; shape.iter().product()]);
        };
        let t = get(&name)?;
        if t.dims() != shape {
            return Err(format!(
                "{name}: shape {:?}, expected {shape:?} (not the M-LSD large model?)",
                t.dims()
            ));
        }
        t.to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| format!("{name}: {e}"))
    }

    /// The conv `conv` (`[cout, cin/groups, k, k]`, with a bias when `bias`) followed by the
    /// BatchNorm `bn` when given, folded: (weights, bias) in f32.
    #[allow(clippy::too_many_arguments)]
    fn conv_bn(
        &mut self,
        conv: &str,
        bn: Option<&str>,
        cin: usize,
        cout: usize,
        k: usize,
        groups: usize,
        bias: bool,
    ) -> Result<(Vec<f32>, Vec<f32>), String> {
        let mut w = self.tensor(format!("{conv}.weight"), &[cout, cin / groups, k, k])?;
        let mut b = if bias {
            self.tensor(format!("{conv}.bias"), &[cout])?
        } else {
            vec![0.0; cout]
        };
        if let Some(bn) = bn {
            let mut p = |s: &str| self.tensor(format!("{bn}.{s}"), &[cout]);
            let (g, beta, mean, var) = (
                p("weight")?,
                p("bias")?,
                p("running_mean")?,
                p("running_var")?,
            );
            fold_batch_norm(&mut w, &mut b, [&g, &beta, &mean, &var], BN_EPS);
        }
        Ok((w, b))
    }
}

/// Builds the layers on `device` (or only lists the weights when `w.get` is None).
struct Builder<'a> {
    w: Weights<'a>,
    device: Device,
}

impl Builder<'_> {
    /// A conv over all channels from its folded weights `[cout, cin, k, k]` and bias.
    fn dense(
        &self,
        (w, b): (Vec<f32>, Vec<f32>),
        cin: usize,
        k: usize,
        geo: Geometry,
        act: Act,
    ) -> Result<Conv, String> {
        let cout = b.len();
        let conv = Tensor::from_vec(w, (cout, cin, k, k), &self.device)
            .and_then(|w| Conv2d::new(&w, Some(&Tensor::new(b, &self.device)?), geo))
            .map_err(|e| e.to_string())?;
        Ok(Conv {
            op: Op::Full(conv),
            act,
        })
    }

    fn point(
        &mut self,
        conv: &str,
        bn: Option<&str>,
        cin: usize,
        cout: usize,
        bias: bool,
        act: Act,
    ) -> Result<Conv, String> {
        let wb = self.w.conv_bn(conv, bn, cin, cout, 1, 1, bias)?;
        self.dense(wb, cin, 1, Geometry::default(), act)
    }

    #[allow(clippy::too_many_arguments)]
    fn full(
        &mut self,
        conv: &str,
        bn: Option<&str>,
        cin: usize,
        cout: usize,
        stride: usize,
        dilation: usize,
        bias: bool,
        act: Act,
    ) -> Result<Conv, String> {
        let wb = self.w.conv_bn(conv, bn, cin, cout, 3, 1, bias)?;
        self.dense(wb, cin, 3, tflite(stride, dilation), act)
    }

    fn depthwise(&mut self, prefix: &str, c: usize, stride: usize) -> Result<Conv, String> {
        let (w, b) = self.w.conv_bn(
            &format!("{prefix}.0"),
            Some(&format!("{prefix}.1")),
            c,
            c,
            3,
            c,
            false,
        )?;
        Ok(Conv {
            op: Op::Depthwise(
                Depthwise::new(w, Some(b), 3, tflite(stride, 1)).map_err(|e| e.to_string())?,
            ),
            act: Act::Relu6,
        })
    }

    /// MobileNetV2's `InvertedResidual` at `backbone.features.{i}`.
    fn inverted_residual(
        &mut self,
        i: usize,
        inp: usize,
        oup: usize,
        stride: usize,
        t: usize,
    ) -> Result<Stage, String> {
        let p = format!("backbone.features.{i}.conv");
        let hidden = inp * t;
        let mut convs = Vec::new();
        let mut j = 0;
        if t != 1 {
            convs.push(self.point(
                &format!("{p}.0.0"),
                Some(&format!("{p}.0.1")),
                inp,
                hidden,
                false,
                Act::Relu6,
            )?);
            j = 1;
        }
        convs.push(self.depthwise(&format!("{p}.{j}"), hidden, stride)?);
        convs.push(self.point(
            &format!("{p}.{}", j + 1),
            Some(&format!("{p}.{}", j + 2)),
            hidden,
            oup,
            false,
            Act::None,
        )?);
        Ok(Stage {
            convs,
            residual: stride == 1 && inp == oup,
        })
    }

    fn block_a(
        &mut self,
        n: usize,
        in1: usize,
        in2: usize,
        upscale: bool,
    ) -> Result<BlockA, String> {
        let p = format!("block{n}");
        Ok(BlockA {
            deep: self.point(
                &format!("{p}.conv1.0"),
                Some(&format!("{p}.conv1.1")),
                in2,
                64,
                true,
                Act::Relu,
            )?,
            skip: self.point(
                &format!("{p}.conv2.0"),
                Some(&format!("{p}.conv2.1")),
                in1,
                64,
                true,
                Act::Relu,
            )?,
            upscale,
        })
    }

    fn block_b(&mut self, n: usize) -> Result<BlockB, String> {
        let p = format!("block{n}");
        let c = |b: &mut Self, i: usize, cout: usize| {
            b.full(
                &format!("{p}.conv{i}.0"),
                Some(&format!("{p}.conv{i}.1")),
                128,
                cout,
                1,
                1,
                true,
                Act::Relu,
            )
        };
        Ok(BlockB {
            conv1: c(self, 1, 128)?,
            conv2: c(self, 2, 64)?,
        })
    }
}

/// An inverted residual (or the first conv): its convs in order, plus the input when
/// `residual`.
struct Stage {
    convs: Vec<Conv>,
    residual: bool,
}

impl Stage {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut y = x.clone();
        for c in &self.convs {
            y = c.forward(&y)?;
        }
        if self.residual {
            y = (y + x)?;
        }
        Ok(y)
    }
}

struct BlockA {
    deep: Conv,
    skip: Conv,
    upscale: bool,
}

impl BlockA {
    fn forward(&self, skip: &Tensor, deep: &Tensor) -> candle_core::Result<Tensor> {
        let mut b = self.deep.forward(deep)?;
        let a = self.skip.forward(skip)?;
        if self.upscale {
            let (_, _, h, w) = b.dims4()?;
            b = b.upsample_bilinear2d(2 * h, 2 * w, true)?;
        }
        Tensor::cat(&[&a, &b], 1)
    }
}

struct BlockB {
    conv1: Conv,
    conv2: Conv,
}

impl BlockB {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = (self.conv1.forward(x)? + x)?;
        self.conv2.forward(&x)
    }
}

/// MobileNetV2's (t, c, n, s) rows the reference keeps.
const SETTINGS: [(usize, usize, usize, usize); 5] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
];
/// The backbone features whose outputs feed the decoder.
const TAPS: [usize; 5] = [1, 3, 6, 10, 13];

/// The M-LSD large network.
pub struct MlsdNet {
    features: Vec<Stage>,
    a: [BlockA; 4],
    b: [BlockB; 4],
    c: [Conv; 3],
}

/// Input sides the network takes: the backbone halves a side (rounding down) four times, and
/// each x2 upsampling must meet the next tap's size, so the halvings before the last must be
/// even; the map comes out at the first halving.
pub fn output_side(side: usize) -> Option<usize> {
    let s: Vec<usize> = (1..=4).map(|k| side >> k).collect();
    (s[3] >= 1 && s[..3].iter().all(|v| v.is_multiple_of(2))).then_some(s[0])
}

impl MlsdNet {
    fn build(b: &mut Builder) -> Result<Self, String> {
        let mut features = vec![Stage {
            convs: vec![b.full(
                "backbone.features.0.0",
                Some("backbone.features.0.1"),
                4,
                32,
                2,
                1,
                false,
                Act::Relu6,
            )?],
            residual: false,
        }];
        let mut inp = 32;
        for (t, c, n, s) in SETTINGS {
            for i in 0..n {
                let stride = if i == 0 { s } else { 1 };
                features.push(b.inverted_residual(features.len(), inp, c, stride, t)?);
                inp = c;
            }
        }
        let a = [
            b.block_a(15, 64, 96, false)?,
            b.block_a(17, 32, 64, true)?,
            b.block_a(19, 24, 64, true)?,
            b.block_a(21, 16, 64, true)?,
        ];
        let bb = [
            b.block_b(16)?,
            b.block_b(18)?,
            b.block_b(20)?,
            b.block_b(22)?,
        ];
        let c = [
            b.full(
                "block23.conv1.0",
                Some("block23.conv1.1"),
                64,
                64,
                1,
                5,
                true,
                Act::Relu,
            )?,
            b.full(
                "block23.conv2.0",
                Some("block23.conv2.1"),
                64,
                64,
                1,
                1,
                true,
                Act::Relu,
            )?,
            b.point("block23.conv3", None, 64, 16, true, Act::None)?,
        ];
        Ok(Self {
            features,
            a,
            b: bb,
            c,
        })
    }

    /// Build from a tensor getter (`name -> tensor`, any float dtype), checking every shape.
    pub fn new(
        get: &dyn Fn(&str) -> Result<Tensor, String>,
        device: &Device,
    ) -> Result<Self, String> {
        Self::build(&mut Builder {
            w: Weights {
                get: Some(get),
                seen: Vec::new(),
            },
            device: device.clone(),
        })
    }

    /// Load `mlsd_large_512_fp32.pth` (read without running pickle code) or a safetensors
    /// file with the same keys.
    pub fn load(path: &Path, device: &Device) -> Result<Self, String> {
        let store =
            sd_weights::Store::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::new(
            &|n| {
                store.get(n).map_err(|_| {
                    format!(
                        "{}: no tensor `{n}` (not the M-LSD large model mlsd_large_512_fp32?)",
                        path.display()
                    )
                })
            },
            device,
        )
    }

    /// `x`: `[1, 4, H, W]` (RGB and a constant channel, `/127.5 - 1`), with
    /// [`output_side`] defined for both sides. Returns the TP map `[1, 9, H/2, W/2]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        if n != 1 || c != 4 || output_side(h).is_none() || output_side(w).is_none() {
            candle_core::bail!(
                "M-LSD takes one 4-channel image with sides 16k or 16k+1, got {:?}",
                x.dims()
            );
        }
        let mut taps = Vec::new();
        let mut y = x.clone();
        for (i, f) in self.features.iter().enumerate() {
            y = f.forward(&y)?;
            if TAPS.contains(&i) {
                taps.push(y.clone());
            }
        }
        let [c1, c2, c3, c4, c5] = <[Tensor; 5]>::try_from(taps).expect("five taps");
        let mut y = self.a[0].forward(&c4, &c5)?;
        y = self.b[0].forward(&y)?;
        for (k, skip) in [c3, c2, c1].iter().enumerate() {
            y = self.a[k + 1].forward(skip, &y)?;
            y = self.b[k + 1].forward(&y)?;
        }
        for conv in &self.c {
            y = conv.forward(&y)?;
        }
        y.narrow(1, 7, 9)
    }
}

/// Every weight the network reads, with its shape (BatchNorm `num_batches_tracked` is not
/// read).
pub fn parameter_shapes() -> Vec<(String, Vec<usize>)> {
    let mut b = Builder {
        w: Weights {
            get: None,
            seen: Vec::new(),
        },
        device: Device::Cpu,
    };
    MlsdNet::build(&mut b).expect("recording cannot fail");
    b.w.seen
}
