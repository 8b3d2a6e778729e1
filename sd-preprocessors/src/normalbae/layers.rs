//! The pieces the NormalBAE encoder and decoder share: feature maps, the weight source (with
//! BatchNorm folding), 1x1 convolutions as matrix products, per-plane loops over the cores.

use candle_core::{Device, Tensor};

use crate::lineart::Tensors;

/// A feature map of one image: `c` planes of `h` x `w` f32, channel-major.
#[derive(Clone, Debug)]
pub struct Map {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub data: Vec<f32>,
}

impl Map {
    pub fn new(c: usize, h: usize, w: usize, data: Vec<f32>) -> Self {
        debug_assert_eq!(data.len(), c * h * w);
        Self { c, h, w, data }
    }

    /// From a `[1, c, h, w]` tensor.
    pub fn from_tensor(t: &Tensor) -> candle_core::Result<Self> {
        let (n, c, h, w) = t.dims4()?;
        if n != 1 {
            candle_core::bail!("expected one image, got a batch of {n}");
        }
        let data = t.flatten_all()?.to_vec1::<f32>()?;
        Ok(Self { c, h, w, data })
    }

    /// As a `[1, c, h, w]` tensor.
    pub fn tensor(&self) -> candle_core::Result<Tensor> {
        Tensor::from_slice(&self.data, (1, self.c, self.h, self.w), &Device::Cpu)
    }

    pub fn pixels(&self) -> usize {
        self.h * self.w
    }

    /// `F.interpolate(self, (h, w), mode="bilinear", align_corners=True)` (PyTorch's CPU
    /// kernels, [`crate::openpose::face::interpolate_bilinear`]).
    pub fn resized(&self, h: usize, w: usize) -> Map {
        if (h, w) == (self.h, self.w) {
            return self.clone();
        }
        let data = crate::openpose::face::interpolate_bilinear(
            &self.data,
            (self.c, self.h, self.w),
            (h, w),
        );
        Map::new(self.c, h, w, data)
    }
}

/// The weights of one file, under the prefix the file uses.
pub struct Source<'a> {
    t: &'a Tensors,
    prefix: &'static str,
}

impl<'a> Source<'a> {
    /// The file's tensors: bare state-dict keys, or scannet.pt's under `model.` (its
    /// `module.` is dropped by [`Tensors`]).
    pub fn new(t: &'a Tensors) -> Result<Self, String> {
        const PROBE: &str = "decoder.conv2.bias";
        let prefix = if t.has(PROBE) {
            ""
        } else if t.has(&format!("model.{PROBE}")) {
            "model."
        } else {
            return Err(t.error(format!("no tensor `{PROBE}` (or `model.module.{PROBE}`)")));
        };
        Ok(Self { t, prefix })
    }

    /// `key` (a state-dict key of `NNET`), which must have `shape`, as f32 values.
    pub fn get(&self, key: &str, shape: &[usize]) -> Result<Vec<f32>, String> {
        let full = format!("{}{key}", self.prefix);
        self.t
            .get_shaped(&full, shape)?
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| self.t.error(format!("`{full}`: {e}")))
    }

    /// A BatchNorm `bn` (`weight`, `bias`, `running_mean`, `running_var`, eval with `eps`)
    /// folded into the conv before it: `w` (`[cout, ...]`) and `b` scaled and shifted in f64.
    pub fn fold_bn(&self, bn: &str, eps: f64, w: &mut [f32], b: &mut [f32]) -> Result<(), String> {
        let c = b.len();
        let p = |s: &str| self.get(&format!("{bn}.{s}"), &[c]);
        let (g, beta, mean, var) = (
            p("weight")?,
            p("bias")?,
            p("running_mean")?,
            p("running_var")?,
        );
        let per = w.len() / c;
        for o in 0..c {
            let s = g[o] as f64 / (var[o] as f64 + eps).sqrt();
            for v in &mut w[o * per..(o + 1) * per] {
                *v = (*v as f64 * s) as f32;
            }
            b[o] = ((b[o] as f64 - mean[o] as f64) * s + beta[o] as f64) as f32;
        }
        Ok(())
    }
}

/// A 1x1 convolution (or `Conv1d(k=1)`): `[out, in]` times the pixels, plus the bias.
pub struct Pointwise {
    w: Tensor,
    b: Vec<f32>,
}

impl Pointwise {
    /// From `[out * in]` weights and `[out]` biases.
    pub fn new(w: Vec<f32>, b: Vec<f32>) -> candle_core::Result<Self> {
        let o = b.len();
        let i = w.len() / o.max(1);
        Ok(Self {
            w: Tensor::from_vec(w, (o, i), &Device::Cpu)?,
            b,
        })
    }

    pub fn outputs(&self) -> usize {
        self.b.len()
    }

    /// `[out, h * w]` raw products of `x` (the weight's columns scaled by `gate` first when
    /// given: a squeeze-excite gate folded into the projection).
    pub fn product(&self, x: &Map, gate: Option<&[f32]>) -> candle_core::Result<Vec<f32>> {
        let w = match gate {
            Some(g) => self
                .w
                .broadcast_mul(&Tensor::from_slice(g, (1, g.len()), &Device::Cpu)?)?,
            None => self.w.clone(),
        };
        let xs = Tensor::from_slice(&x.data, (x.c, x.pixels()), &Device::Cpu)?;
        w.matmul(&xs)?.flatten_all()?.to_vec1::<f32>()
    }

    /// The layer on `x`, then `act` per value.
    pub fn forward(
        &self,
        x: &Map,
        gate: Option<&[f32]>,
        act: impl Fn(f32) -> f32 + Sync,
    ) -> candle_core::Result<Map> {
        let mut y = self.product(x, gate)?;
        let n = x.pixels();
        par_planes(&mut y, n, |o, plane| {
            let b = self.b[o];
            plane.iter_mut().for_each(|v| *v = act(*v + b));
        });
        Ok(Map::new(self.outputs(), x.h, x.w, y))
    }
}

/// `f(channel, plane)` on each `plane`-long piece of `data`, pieces split over the cores;
/// the results in order.
pub fn par_planes<R: Send>(
    data: &mut [f32],
    plane: usize,
    f: impl Fn(usize, &mut [f32]) -> R + Sync,
) -> Vec<R> {
    if plane == 0 {
        return Vec::new();
    }
    let planes = data.len() / plane;
    let threads = crate::conv::threads()
        .min(data.len() / (1 << 15))
        .clamp(1, planes.max(1));
    let per = planes.div_ceil(threads).max(1);
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = data
            .chunks_mut(per * plane)
            .enumerate()
            .map(|(t, part)| {
                s.spawn(move || {
                    part.chunks_exact_mut(plane)
                        .enumerate()
                        .map(|(i, p)| f(t * per + i, p))
                        .collect::<Vec<R>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a feature-map worker panicked"))
            .collect()
    })
}

/// `x * sigmoid(x)` (geffnet's swish).
#[inline]
pub fn swish(x: f32) -> f32 {
    x * (1.0 / (1.0 + (-x).exp()))
}
