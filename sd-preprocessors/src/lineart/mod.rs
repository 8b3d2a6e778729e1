//! Line-art annotators with networks (model-free `lineart_standard` is in [`crate::lines`]):
//!
//! - `lineart_realistic` / `lineart_coarse` ([`realistic`]): controlnet_aux 0.0.10
//!   `LineartDetector`'s Generator, weights `sk_model.pth` / `sk_model2.pth`;
//! - `lineart_anime` ([`anime`]): controlnet_aux 0.0.10 `LineartAnimeDetector`'s U-Net,
//!   `netG.pth`;
//! - `lineart_anime_denoise` ([`manga`]): sd-webui-controlnet's manga line network
//!   (`annotator/manga_line`, `res_skip`), `erika.pth`.
//!
//! Every one returns white lines on black, as sd-webui-controlnet's modules do (its
//! `lineart*` functions invert the detector's black-on-white drawing, the manga network's
//! wrapper inverts its own) and as the ControlNet 1.1 lineart models were trained.
//!
//! The layers shared by the three networks are here: reflection padding, instance norm (the
//! networks use `nn.InstanceNorm2d` without affine parameters), transposed convolution as one
//! matrix product and a col2im (PyTorch's own CPU algorithm; candle's CPU kernel is a direct
//! loop), and a tensor source that names the file and key in every error.

pub mod anime;
pub mod manga;
pub mod realistic;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{DType, Device, Tensor};
use sd_plugins_api::{hwc3, ImageBuf, ParamSpec};
use sd_weights::Store;

/// A network's tensors, by the names its PyTorch module gives them (a `module.` left by
/// `DataParallel` is dropped, as the reference loaders drop it). Errors name the file and key.
pub struct Tensors {
    store: Store,
    /// Name without `module.` -> stored name.
    names: HashMap<String, String>,
    origin: String,
    what: &'static str,
}

impl Tensors {
    /// The tensors of a `.pth` (read without running pickle code) or `.safetensors` file, for
    /// the network described by `what` (used in errors: "not the {what}?").
    pub fn open(path: &Path, what: &'static str) -> Result<Self, String> {
        let store = Store::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Self::new(store, path.display().to_string(), what))
    }

    /// Tensors given in memory (tests, converters).
    pub fn from_map(map: HashMap<String, Tensor>, what: &'static str) -> Self {
        Self::new(Store::Mem(map), "the given tensors".into(), what)
    }

    fn new(store: Store, origin: String, what: &'static str) -> Self {
        let names = store
            .names()
            .into_iter()
            .map(|n| (n.replace("module.", ""), n))
            .collect();
        Self {
            store,
            names,
            origin,
            what,
        }
    }

    /// Whether the file has `key`.
    pub fn has(&self, key: &str) -> bool {
        self.names.contains_key(key)
    }

    /// An error about this file.
    pub fn error(&self, message: impl std::fmt::Display) -> String {
        format!(
            "{}: {message} (not the {} weights?)",
            self.origin, self.what
        )
    }

    /// `key` as f32 on the CPU.
    pub fn get(&self, key: &str) -> Result<Tensor, String> {
        let stored = self
            .names
            .get(key)
            .ok_or_else(|| self.error(format!("no tensor `{key}`")))?;
        self.store
            .get(stored)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| format!("{}: `{key}`: {e}", self.origin))
    }

    /// `key`, which must have `shape`.
    pub fn get_shaped(&self, key: &str, shape: &[usize]) -> Result<Tensor, String> {
        let t = self.get(key)?;
        if t.dims() != shape {
            return Err(self.error(format!(
                "`{key}` has shape {:?}, expected {shape:?}",
                t.dims()
            )));
        }
        Ok(t)
    }

    /// A 4-d weight `key` whose input channels (dimension `in_dim`) are `inputs` and whose
    /// kernel is `k` x `k`; returns it and its other channel count.
    fn kernel(
        &self,
        key: &str,
        in_dim: usize,
        inputs: usize,
        k: usize,
    ) -> Result<(Tensor, usize), String> {
        let w = self.get(key)?;
        let d = w.dims().to_vec();
        if d.len() != 4 || d[in_dim] != inputs || d[2] != k || d[3] != k {
            let want = if in_dim == 1 {
                format!("[out, {inputs}, {k}, {k}]")
            } else {
                format!("[{inputs}, out, {k}, {k}]")
            };
            return Err(self.error(format!("`{key}` has shape {d:?}, expected {want}")));
        }
        Ok((w, d[1 - in_dim]))
    }

    /// `nn.Conv2d` `{prefix}.weight` / `{prefix}.bias` taking `inputs` channels with a `k` x
    /// `k` kernel; returns the layer and its output channels.
    pub fn conv2d(
        &self,
        prefix: &str,
        inputs: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<(Conv, usize), String> {
        let (w, out) = self.kernel(&format!("{prefix}.weight"), 1, inputs, k)?;
        let b = self.get_shaped(&format!("{prefix}.bias"), &[out])?;
        let conv = Conv::new(&w, &b, stride, padding)
            .map_err(|e| format!("{}: `{prefix}`: {e}", self.origin))?;
        Ok((conv, out))
    }

    /// `nn.ConvTranspose2d` `{prefix}.weight` (`[in, out, k, k]`) / `{prefix}.bias`.
    pub fn conv_transpose2d(
        &self,
        prefix: &str,
        inputs: usize,
        k: usize,
        stride: usize,
        padding: usize,
        output_padding: usize,
    ) -> Result<ConvTranspose, String> {
        let (w, out) = self.kernel(&format!("{prefix}.weight"), 0, inputs, k)?;
        let b = self.get_shaped(&format!("{prefix}.bias"), &[out])?;
        ConvTranspose::new(&w, &b, stride, padding, output_padding)
            .map_err(|e| format!("{}: `{prefix}`: {e}", self.origin))
    }
}

/// `nn.Conv2d` (square kernel, zero padding) as PyTorch's CPU kernel computes it: im2col
/// (row copies, a band of output rows at a time) and one matrix product with the weight
/// `[out, in * k * k]`; a 1x1 stride-1 conv is the product alone. Layers with at most
/// [`DIRECT_OUTPUTS`] output channels (the last layer of a network) sum shifted rows
/// directly instead: an im2col there would copy `in * k * k` floats per output value for one
/// dot product each. (candle's CPU conv builds its im2col value by value, which made the
/// realistic Generator's 64 -> 1 7x7 output layer alone take 9 s at 512x512.)
pub struct Conv {
    /// `[out, in * k * k]`.
    weight: Tensor,
    /// The same for the direct path (empty for wider layers).
    w: Vec<f32>,
    bias: Vec<f32>,
    inputs: usize,
    outputs: usize,
    k: usize,
    stride: usize,
    padding: usize,
}

/// Output channels up to which [`Conv`] sums directly.
const DIRECT_OUTPUTS: usize = 4;

impl Conv {
    /// From a weight `[out, in, k, k]` and bias `[out]`.
    pub fn new(w: &Tensor, b: &Tensor, stride: usize, padding: usize) -> candle_core::Result<Self> {
        let (outputs, inputs, k, _) = w.dims4()?;
        let weight = w
            .to_dtype(DType::F32)?
            .reshape((outputs, inputs * k * k))?
            .contiguous()?;
        let w = if outputs <= DIRECT_OUTPUTS {
            weight.flatten_all()?.to_vec1()?
        } else {
            Vec::new()
        };
        Ok(Self {
            w,
            weight,
            bias: b.to_dtype(DType::F32)?.to_vec1()?,
            inputs,
            outputs,
            k,
            stride: stride.max(1),
            padding,
        })
    }

    /// `[1, in, h, w]` -> `[1, out, (h + 2p - k) / s + 1, ...]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_with(x, MAX_COLUMNS)
    }

    /// [`Self::forward`] making at most `max_columns` floats of im2col at a time.
    fn forward_with(&self, x: &Tensor, max_columns: usize) -> candle_core::Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let (k, s, p) = (self.k, self.stride, self.padding);
        if n != 1 || c != self.inputs || h + 2 * p < k || w + 2 * p < k {
            candle_core::bail!(
                "conv: input {:?}, expected [1, {}, h, w] with sides of at least {}",
                x.dims(),
                self.inputs,
                k.saturating_sub(2 * p).max(1)
            );
        }
        let (oh, ow) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
        let dev = x.device();
        if k == 1 && s == 1 && p == 0 {
            let y = self.weight.matmul(&x.reshape((c, h * w))?.contiguous()?)?;
            let b = Tensor::from_slice(&self.bias, (self.outputs, 1), dev)?;
            return y.broadcast_add(&b)?.reshape((1, self.outputs, oh, ow));
        }
        let xv = x.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; self.outputs * oh * ow];
        if self.outputs <= DIRECT_OUTPUTS {
            self.direct(&xv, (h, w), (oh, ow), &mut out);
            return Tensor::from_vec(out, (1, self.outputs, oh, ow), dev);
        }
        let kk = c * k * k;
        let band = (max_columns / (kk * ow).max(1)).clamp(1, oh);
        let mut y0 = 0;
        while y0 < oh {
            let rows = band.min(oh - y0);
            let cols = self.im2col(&xv, (h, w), ow, y0, rows);
            let cols = Tensor::from_vec(cols, (kk, rows * ow), dev)?;
            let r = self.weight.matmul(&cols)?.flatten_all()?.to_vec1::<f32>()?;
            for (o, chunk) in r.chunks_exact(rows * ow).enumerate() {
                let dst = &mut out[o * oh * ow + y0 * ow..][..rows * ow];
                for (d, v) in dst.iter_mut().zip(chunk) {
                    *d = v + self.bias[o];
                }
            }
            y0 += rows;
        }
        Tensor::from_vec(out, (1, self.outputs, oh, ow), x.device())
    }

    /// The range of output columns whose input column `ox * s + kx - p` is inside `0..w`.
    fn valid(&self, kx: usize, w: usize, ow: usize) -> std::ops::Range<usize> {
        let (s, p) = (self.stride, self.padding);
        let lo = p.saturating_sub(kx).div_ceil(s).min(ow);
        // ox * s + kx < w + p
        let hi = if w + p > kx {
            ((w + p - kx - 1) / s + 1).min(ow)
        } else {
            0
        };
        lo..hi.max(lo)
    }

    /// Columns `[in * k * k, rows * ow]` for output rows `y0..y0 + rows`.
    fn im2col(
        &self,
        x: &[f32],
        (h, w): (usize, usize),
        ow: usize,
        y0: usize,
        rows: usize,
    ) -> Vec<f32> {
        let (k, s, p) = (self.k, self.stride, self.padding);
        let mut cols = vec![0f32; self.inputs * k * k * rows * ow];
        for (row, dst) in cols.chunks_exact_mut(rows * ow).enumerate() {
            let (c, ky, kx) = (row / (k * k), row / k % k, row % k);
            let plane = &x[c * h * w..(c + 1) * h * w];
            let valid = self.valid(kx, w, ow);
            if valid.is_empty() {
                continue;
            }
            for r in 0..rows {
                let Some(iy) = ((y0 + r) * s + ky).checked_sub(p).filter(|&v| v < h) else {
                    continue;
                };
                let src = &plane[iy * w..(iy + 1) * w];
                let d = &mut dst[r * ow..(r + 1) * ow];
                let start = valid.start * s + kx - p;
                if s == 1 {
                    d[valid.clone()].copy_from_slice(&src[start..start + valid.len()]);
                } else {
                    for (i, ox) in valid.clone().enumerate() {
                        d[ox] = src[start + i * s];
                    }
                }
            }
        }
        cols
    }

    /// Each output row summed from the shifted input rows it covers.
    fn direct(&self, x: &[f32], (h, w): (usize, usize), (oh, ow): (usize, usize), out: &mut [f32]) {
        let (k, s, p, c) = (self.k, self.stride, self.padding, self.inputs);
        for (o, plane_out) in out.chunks_exact_mut(oh * ow).enumerate() {
            for (oy, dst) in plane_out.chunks_exact_mut(ow).enumerate() {
                dst.fill(self.bias[o]);
                for ci in 0..c {
                    for ky in 0..k {
                        let Some(iy) = (oy * s + ky).checked_sub(p).filter(|&v| v < h) else {
                            continue;
                        };
                        let src = &x[(ci * h + iy) * w..][..w];
                        for kx in 0..k {
                            let wv = self.w[((o * c + ci) * k + ky) * k + kx];
                            let valid = self.valid(kx, w, ow);
                            if valid.is_empty() {
                                continue;
                            }
                            let start = valid.start * s + kx - p;
                            if s == 1 {
                                let src = &src[start..start + valid.len()];
                                for (d, v) in dst[valid].iter_mut().zip(src) {
                                    *d += wv * v;
                                }
                            } else {
                                for (i, ox) in valid.enumerate() {
                                    dst[ox] += wv * src[start + i * s];
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `nn.ConvTranspose2d` computed as PyTorch's CPU kernel computes it: one matrix product of
/// the transposed weight with the input (`[out * k * k, in] x [in, h * w]`), then col2im
/// (each column scattered onto the output and summed), plus the bias.
pub struct ConvTranspose {
    /// `[out * k * k, in]`, rows ordered (out channel, ky, kx).
    weight: Tensor,
    bias: Vec<f32>,
    inputs: usize,
    outputs: usize,
    k: usize,
    stride: usize,
    padding: usize,
    output_padding: usize,
}

/// Most floats one matrix product of [`ConvTranspose`] makes at a time (256 MiB): large
/// layers are done a group of output channels at a time.
const MAX_COLUMNS: usize = 64 << 20;

impl ConvTranspose {
    /// From a weight `[in, out, k, k]` and bias `[out]`.
    pub fn new(
        w: &Tensor,
        b: &Tensor,
        stride: usize,
        padding: usize,
        output_padding: usize,
    ) -> candle_core::Result<Self> {
        let (inputs, outputs, k, _) = w.dims4()?;
        let weight = w
            .to_dtype(DType::F32)?
            .reshape((inputs, outputs * k * k))?
            .t()?
            .contiguous()?;
        Ok(Self {
            weight,
            bias: b.to_dtype(DType::F32)?.to_vec1()?,
            inputs,
            outputs,
            k,
            stride,
            padding,
            output_padding,
        })
    }

    /// `[1, in, h, w]` -> `[1, out, (h - 1) s - 2p + k + op, ...]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_with(x, MAX_COLUMNS)
    }

    /// [`Self::forward`] making at most `max_columns` floats of columns at a time.
    fn forward_with(&self, x: &Tensor, max_columns: usize) -> candle_core::Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        if n != 1 || c != self.inputs {
            candle_core::bail!(
                "conv_transpose: input {:?}, expected [1, {}, h, w]",
                x.dims(),
                self.inputs
            );
        }
        if h == 0 || w == 0 {
            candle_core::bail!("conv_transpose: empty input {:?}", x.dims());
        }
        let (s, p, k) = (self.stride, self.padding, self.k);
        let oh = ((h - 1) * s + k + self.output_padding).saturating_sub(2 * p);
        let ow = ((w - 1) * s + k + self.output_padding).saturating_sub(2 * p);
        let xm = x.reshape((c, h * w))?.contiguous()?;
        let mut out = vec![0f32; self.outputs * oh * ow];
        for (o, plane) in out.chunks_mut(oh * ow).enumerate() {
            plane.fill(self.bias[o]);
        }
        let group = (max_columns / (k * k * h * w).max(1)).clamp(1, self.outputs);
        let mut o0 = 0;
        while o0 < self.outputs {
            let g = group.min(self.outputs - o0);
            let cols = self
                .weight
                .narrow(0, o0 * k * k, g * k * k)?
                .matmul(&xm)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for (r, col) in cols.chunks_exact(h * w).enumerate() {
                let (o, ky, kx) = (o0 + r / (k * k), r / k % k, r % k);
                let plane = &mut out[o * oh * ow..(o + 1) * oh * ow];
                for iy in 0..h {
                    let Some(oy) = (iy * s + ky).checked_sub(p).filter(|&v| v < oh) else {
                        continue;
                    };
                    let row = &mut plane[oy * ow..(oy + 1) * ow];
                    for (ix, v) in col[iy * w..(iy + 1) * w].iter().enumerate() {
                        if let Some(ox) = (ix * s + kx).checked_sub(p).filter(|&v| v < ow) {
                            row[ox] += v;
                        }
                    }
                }
            }
            o0 += g;
        }
        Tensor::from_vec(out, (1, self.outputs, oh, ow), x.device())
    }
}

/// `nn.ReflectionPad2d(p)` of `[n, c, h, w]` (needs `p < h` and `p < w`).
pub fn reflection_pad(x: &Tensor, p: usize) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if p >= h || p >= w {
        candle_core::bail!("reflection padding {p} of a {w}x{h} map (the image is too small)");
    }
    let ids = |n: usize| -> Vec<u32> {
        (0..n + 2 * p)
            .map(|i| {
                let j = i as isize - p as isize;
                let j = if j < 0 {
                    -j
                } else if j >= n as isize {
                    2 * (n as isize - 1) - j
                } else {
                    j
                };
                j as u32
            })
            .collect()
    };
    let dev = x.device();
    let rows = Tensor::new(ids(h), dev)?;
    let cols = Tensor::new(ids(w), dev)?;
    x.index_select(&cols, 3)?.index_select(&rows, 2)
}

/// `nn.InstanceNorm2d(c)` (no affine parameters, eps 1e-5), then ReLU when `relu`, of
/// `[1, c, h, w]`. The statistics in f64 and the output as `x * invstd - mean * invstd`, as
/// PyTorch's CPU batch-norm kernel (which instance norm runs) computes them.
pub fn instance_norm(x: &Tensor, relu: bool) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let mut v = x.flatten_all()?.to_vec1::<f32>()?;
    let hw = h * w;
    for plane in v.chunks_mut(hw) {
        let mean = plane.iter().map(|&a| a as f64).sum::<f64>() / hw as f64;
        let var = plane
            .iter()
            .map(|&a| (a as f64 - mean) * (a as f64 - mean))
            .sum::<f64>()
            / hw as f64;
        let invstd = 1.0 / (var + 1e-5).sqrt();
        let (alpha, beta) = (invstd as f32, (-mean * invstd) as f32);
        for a in plane.iter_mut() {
            let y = *a * alpha + beta;
            *a = if relu { y.max(0.0) } else { y };
        }
    }
    Tensor::from_vec(v, (n, c, h, w), x.device())
}

/// A conv layer followed by instance norm (+ ReLU): `Conv2d`, `InstanceNorm2d`, `ReLU`.
pub(crate) fn conv_in(conv: &Conv, x: &Tensor, relu: bool) -> candle_core::Result<Tensor> {
    instance_norm(&conv.forward(x)?, relu)
}

/// An RGB image as `[1, 3, h, w]` with `f(value)` per channel value.
pub(crate) fn rgb_tensor(rgb: &ImageBuf, f: impl Fn(u8) -> f32) -> candle_core::Result<Tensor> {
    let (w, h) = (rgb.width, rgb.height);
    let mut x = vec![0f32; 3 * w * h];
    for (i, px) in rgb.data.chunks_exact(3).enumerate() {
        for ch in 0..3 {
            x[ch * w * h + i] = f(px[ch]);
        }
    }
    Tensor::from_vec(x, (1, 3, h, w), &Device::Cpu)
}

/// The first `w` x `h` of a `[1, 1, H, W]` output as a flat f32 image (rows top to bottom).
pub(crate) fn top_left(y: &Tensor, w: usize, h: usize) -> candle_core::Result<Vec<f32>> {
    let (_, _, oh, ow) = y.dims4()?;
    if oh < h || ow < w {
        candle_core::bail!("network output {ow}x{oh} is smaller than the image {w}x{h}");
    }
    let v = y.flatten_all()?.to_vec1::<f32>()?;
    Ok((0..h)
        .flat_map(|r| v[r * ow..r * ow + w].iter().copied())
        .collect())
}

/// A grey map (one value per pixel) as a three-channel image.
pub(crate) fn grey_map(w: usize, h: usize, v: Vec<u8>) -> ImageBuf {
    hwc3(&ImageBuf {
        width: w,
        height: h,
        channels: 1,
        data: v,
    })
}

/// The `model` parameter of these preprocessors.
pub(crate) fn model_param(files: &[&str]) -> ParamSpec {
    ParamSpec::string(
        "model",
        "",
        &format!(
            "{} (or .safetensors); empty: looked for in the annotator folder",
            files[0]
        ),
    )
}

/// The memory a network run needs, checked before it starts: per network-input pixel a few
/// 64-channel f32 maps at full size (the realistic Generator's first and last layers; the
/// manga network keeps 24- and 48-channel maps, the anime U-Net 64- and 128-channel ones at
/// half size), plus the im2col columns and their product (at most [`MAX_COLUMNS`] floats
/// each, fewer for small images).
pub(crate) fn check_memory(name: &str, w: usize, h: usize) -> Result<(), String> {
    let columns = (2 * 4 * MAX_COLUMNS).min(8192 * w * h);
    let cost = sd_plugins_api::memory::Cost {
        per_pixel: 1024.0,
        fixed: columns as u64,
        peak: format!("the {name} network's full-size feature maps"),
    };
    sd_plugins_api::memory::check(name, w, h, 1, 64, &cost)
}

type Cache<T> = Mutex<HashMap<PathBuf, Arc<T>>>;

/// The network at `path`, loaded by `load` once per file per process.
pub(crate) fn cached<T: Send + Sync + 'static>(
    cache: &'static OnceLock<Cache<T>>,
    path: &Path,
    load: impl FnOnce(&Path) -> Result<T, String>,
) -> Result<Arc<T>, String> {
    let key = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let cache = cache.get_or_init(Default::default);
    if let Some(m) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(m.clone());
    }
    // loaded outside the lock; a concurrent first load of the same file loads it twice
    let model = Arc::new(load(path)?);
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, model.clone());
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: Vec<f32>, shape: &[usize]) -> Tensor {
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn reflection_pad_mirrors_without_the_edge() {
        let x = t((0..6).map(|v| v as f32).collect(), &[1, 1, 2, 3]);
        let y = reflection_pad(&x, 1).unwrap();
        assert_eq!(y.dims(), [1, 1, 4, 5]);
        let rows = y.squeeze(0).unwrap().squeeze(0).unwrap();
        let rows = rows.to_vec2::<f32>().unwrap();
        assert_eq!(rows[0], [4., 3., 4., 5., 4.]);
        assert_eq!(rows[1], [1., 0., 1., 2., 1.]);
        assert_eq!(rows[3], [1., 0., 1., 2., 1.]);
        assert!(reflection_pad(&x, 2).is_err());
    }

    #[test]
    fn instance_norm_normalises_each_plane() {
        let x = t(vec![1., 2., 3., 4., 10., 10., 10., 10.], &[1, 2, 2, 2]);
        let y = instance_norm(&x, false).unwrap().flatten_all().unwrap();
        let y = y.to_vec1::<f32>().unwrap();
        let s = (1.25f64 + 1e-5).sqrt();
        for (a, b) in y[..4].iter().zip([-1.5, -0.5, 0.5, 1.5]) {
            assert!((*a as f64 - b / s).abs() < 1e-6, "{a}");
        }
        assert_eq!(&y[4..], &[0.0; 4]);
        let r = instance_norm(&x, true).unwrap().flatten_all().unwrap();
        assert_eq!(r.to_vec1::<f32>().unwrap()[0], 0.0);
    }

    /// The im2col and direct convolutions against the definition: strides 1 and 2, padding,
    /// kernels 1, 3 and 4, few and many output channels, im2col in bands of one row.
    #[test]
    fn conv_is_the_definition() {
        let (ci, h, w) = (3, 7, 6);
        let xv: Vec<f32> = (0..ci * h * w)
            .map(|i| ((i * 13 % 19) as f32 - 9.0) / 4.0)
            .collect();
        let x = t(xv.clone(), &[1, ci, h, w]);
        for (co, k, s, p) in [
            (5, 3, 1, 1),
            (5, 3, 2, 1),
            (6, 4, 2, 1),
            (1, 3, 1, 0),
            (2, 4, 2, 2),
            (1, 1, 1, 0),
            (5, 1, 2, 0),
        ] {
            let wv: Vec<f32> = (0..co * ci * k * k)
                .map(|i| ((i * 29 % 31) as f32 - 15.0) / 16.0)
                .collect();
            let bv: Vec<f32> = (0..co).map(|i| i as f32 - 1.5).collect();
            let conv =
                Conv::new(&t(wv.clone(), &[co, ci, k, k]), &t(bv.clone(), &[co]), s, p).unwrap();
            let (oh, ow) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
            let mut want = vec![0f32; co * oh * ow];
            for o in 0..co {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = bv[o];
                        for c in 0..ci {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let (iy, ix) = (
                                        (oy * s + ky) as isize - p as isize,
                                        (ox * s + kx) as isize - p as isize,
                                    );
                                    if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w
                                    {
                                        acc += xv[(c * h + iy as usize) * w + ix as usize]
                                            * wv[((o * ci + c) * k + ky) * k + kx];
                                    }
                                }
                            }
                        }
                        want[(o * oh + oy) * ow + ox] = acc;
                    }
                }
            }
            for y in [conv.forward(&x).unwrap(), conv.forward_with(&x, 1).unwrap()] {
                assert_eq!(y.dims(), [1, co, oh, ow], "{co} {k} {s} {p}");
                let got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for (a, b) in got.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-4, "{co} {k} {s} {p}: {a} vs {b}");
                }
            }
        }
    }

    /// The GEMM + col2im transposed convolution against the definition, with stride, padding
    /// and output padding, and over a forced split into output-channel groups.
    #[test]
    fn conv_transpose_is_the_definition() {
        let (ci, co, k, h, w) = (3, 5, 3, 4, 3);
        let wv: Vec<f32> = (0..ci * co * k * k)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 8.0)
            .collect();
        let xv: Vec<f32> = (0..ci * h * w)
            .map(|i| ((i * 11 % 17) as f32 - 8.0) / 4.0)
            .collect();
        let bv: Vec<f32> = (0..co).map(|i| i as f32 / 2.0).collect();
        let (s, p, op) = (2, 1, 1);
        let ct = ConvTranspose::new(
            &t(wv.clone(), &[ci, co, k, k]),
            &t(bv.clone(), &[co]),
            s,
            p,
            op,
        )
        .unwrap();
        let x = t(xv.clone(), &[1, ci, h, w]);
        let y = ct.forward(&x).unwrap();
        // two output channels at a time: groups of 2, 2 and 1
        let grouped = ct.forward_with(&x, 2 * k * k * h * w).unwrap();
        let (oh, ow) = ((h - 1) * s + k + op - 2 * p, (w - 1) * s + k + op - 2 * p);
        assert_eq!(y.dims(), [1, co, oh, ow]);
        let mut want = vec![0f32; co * oh * ow];
        for o in 0..co {
            for v in &mut want[o * oh * ow..(o + 1) * oh * ow] {
                *v = bv[o];
            }
            for i in 0..ci {
                for iy in 0..h {
                    for ix in 0..w {
                        for ky in 0..k {
                            for kx in 0..k {
                                let (oy, ox) = (
                                    (iy * s + ky) as isize - p as isize,
                                    (ix * s + kx) as isize - p as isize,
                                );
                                if oy >= 0 && ox >= 0 && (oy as usize) < oh && (ox as usize) < ow {
                                    want[(o * oh + oy as usize) * ow + ox as usize] += xv
                                        [(i * h + iy) * w + ix]
                                        * wv[((i * co + o) * k + ky) * k + kx];
                                }
                            }
                        }
                    }
                }
            }
        }
        for y in [y, grouped] {
            assert_eq!(y.dims(), [1, co, oh, ow]);
            let got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
    }
}
