//! The hand-written CPU convolutions of the annotator networks (f32, `[N, C, H, W]`): one
//! implementation of each for M-LSD, the line-art networks, HED, PiDiNet and the others.
//!
//! - [`Conv2d`]: a `k` x `k` convolution with stride, zero padding (possibly more after the
//!   input than before it, as TFLite pads) and dilation. A 1x1 stride-1 unpadded conv is one
//!   matrix product; layers with at most [`DIRECT_OUTPUTS`] outputs sum shifted input rows
//!   directly; the others unroll the input (im2col, by row copies, split over the cores) a
//!   band of output rows at a time, each band one matrix product with the weight
//!   `[out, in * k * k]`. candle's CPU conv2d builds its im2col value by value and for the
//!   whole image at once (hundreds of MB for a 128-channel 256x256 layer) and multiplies
//!   tiles of 512 pixels; it made the realistic line-art Generator's 64 -> 1 7x7 output layer
//!   alone take 9 s at 512x512.
//! - [`Depthwise`]: one kernel per channel, summed directly, channels split over the cores
//!   (candle splits grouped convolutions into one conv call per channel).
//! - [`ConvTranspose2d`]: as PyTorch's CPU kernel computes it: one matrix product of the
//!   transposed weight with the input, then col2im (candle's CPU kernel is a direct loop).
//!
//! Each output value is the bias (when there is one) plus the taps in the order (input
//! channel, ky, kx) for the direct sums; the matrix products sum in the matrix library's order.

use std::ops::Range;
use std::sync::OnceLock;

use candle_core::{DType, Result, Tensor};

/// The number of threads for the hand-written loops.
pub(crate) fn threads() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    })
}

/// Multiply-adds (or copies) below which a loop is not worth a thread.
const MIN_WORK_PER_THREAD: usize = 1 << 16;

/// `f(i, unit)` for each `unit`-long piece of `data` (`i` counts the pieces), runs of pieces
/// split over the cores when `work` (about the operations of the whole) is large enough.
pub(crate) fn for_each_unit<F>(data: &mut [f32], unit: usize, work: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    if unit == 0 || data.is_empty() {
        return;
    }
    let units = data.len() / unit;
    let n = threads()
        .min(work / MIN_WORK_PER_THREAD)
        .clamp(1, units.max(1));
    let per = units.div_ceil(n);
    let run = |first: usize, part: &mut [f32]| {
        for (i, piece) in part.chunks_exact_mut(unit).enumerate() {
            f(first + i, piece);
        }
    };
    if n == 1 {
        return run(0, data);
    }
    std::thread::scope(|s| {
        let mut parts = data.chunks_mut(per * unit).enumerate();
        let first = parts.next();
        for (t, part) in parts {
            let run = &run;
            s.spawn(move || run(t * per, part));
        }
        if let Some((_, part)) = first {
            run(0, part);
        }
    });
}

/// Where a kernel sits on the input: output position `o`, tap `t` reads input position
/// `o * stride + t * dilation - pad.0`; outside `0..n` (the padding) is zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub stride: usize,
    /// Zero padding before (top, left) and after (bottom, right) the input, the same on both
    /// axes.
    pub pad: (usize, usize),
    pub dilation: usize,
}

impl Default for Geometry {
    fn default() -> Self {
        Self {
            stride: 1,
            pad: (0, 0),
            dilation: 1,
        }
    }
}

impl Geometry {
    /// `stride` and `padding` on every side (`nn.Conv2d(stride=, padding=)`).
    pub fn new(stride: usize, padding: usize) -> Self {
        Self {
            stride,
            pad: (padding, padding),
            dilation: 1,
        }
    }

    /// Stride 1, `dilation` and as much padding as keeps the size for an odd `k`.
    pub fn same(k: usize, dilation: usize) -> Self {
        let p = dilation * (k / 2);
        Self {
            stride: 1,
            pad: (p, p),
            dilation,
        }
    }

    /// The output length for an input of `n` and a kernel of `k` (None when the kernel does
    /// not fit the padded input, or for a zero size or stride).
    pub fn out_len(&self, n: usize, k: usize) -> Option<usize> {
        if n == 0 || k == 0 || self.stride == 0 {
            return None;
        }
        let span = self.dilation * (k - 1) + 1;
        let padded = n + self.pad.0 + self.pad.1;
        (padded >= span).then(|| (padded - span) / self.stride + 1)
    }

    /// The outputs (of `on`) whose tap `t` reads inside an input of `n`.
    fn valid(&self, t: usize, n: usize, on: usize) -> Range<usize> {
        let (s, p, off) = (self.stride, self.pad.0, t * self.dilation);
        // o * s + off >= p and o * s + off < n + p
        let lo = p.saturating_sub(off).div_ceil(s).min(on);
        let hi = if n + p > off {
            ((n + p - off - 1) / s + 1).min(on)
        } else {
            0
        };
        lo..hi.max(lo)
    }

    /// The input position tap `t` of output `o` reads (None in the padding).
    fn input(&self, o: usize, t: usize, n: usize) -> Option<usize> {
        (o * self.stride + t * self.dilation)
            .checked_sub(self.pad.0)
            .filter(|&i| i < n)
    }

    /// `dst[o] += wv * src[o * s + t * d - p]` over the outputs `valid` for tap `t`.
    fn axpy(&self, dst: &mut [f32], src: &[f32], wv: f32, t: usize, valid: Range<usize>) {
        let start = valid.start * self.stride + t * self.dilation - self.pad.0;
        if self.stride == 1 {
            let src = &src[start..start + valid.len()];
            for (d, v) in dst[valid].iter_mut().zip(src) {
                *d += wv * v;
            }
        } else {
            for (i, o) in valid.enumerate() {
                dst[o] += wv * src[start + i * self.stride];
            }
        }
    }
}

/// An input's `(N, C, H, W)` and the output's `(OH, OW)`.
type Sizes = ((usize, usize, usize, usize), (usize, usize));

/// One image's input `(H, W)` and output `(OH, OW)`.
type Sides = ((usize, usize), (usize, usize));

/// The `[N, C, H, W]` input's sizes, checked to have `channels` and to fit a `k` kernel;
/// returns them and the output size.
fn sizes(what: &str, x: &Tensor, channels: usize, k: usize, geo: &Geometry) -> Result<Sizes> {
    let (n, c, h, w) = x.dims4()?;
    match (geo.out_len(h, k), geo.out_len(w, k)) {
        (Some(oh), Some(ow)) if c == channels => Ok(((n, c, h, w), (oh, ow))),
        _ => candle_core::bail!(
            "{what}: input {:?}, expected [n, {channels}, h, w] fitting a {k}x{k} kernel ({geo:?})",
            x.dims()
        ),
    }
}

/// An optional bias `[len]` as f32 values.
fn bias_values(b: Option<&Tensor>, len: usize) -> Result<Option<Vec<f32>>> {
    let Some(b) = b else { return Ok(None) };
    if b.dims() != [len] {
        candle_core::bail!("bias {:?}, expected [{len}]", b.dims());
    }
    Ok(Some(b.to_dtype(DType::F32)?.to_vec1()?))
}

/// An eval-mode BatchNorm (`[gamma, beta, running_mean, running_var]`, `eps`) folded into the
/// conv before it: the weights `w` (`[out, ...]`) scaled and the bias `b` (`[out]`) shifted,
/// in f64.
pub fn fold_batch_norm(w: &mut [f32], b: &mut [f32], bn: [&[f32]; 4], eps: f64) {
    let [g, beta, mean, var] = bn;
    let per = (w.len() / b.len().max(1)).max(1);
    for (o, (ws, bo)) in w.chunks_exact_mut(per).zip(b.iter_mut()).enumerate() {
        let s = g[o] as f64 / (var[o] as f64 + eps).sqrt();
        for v in ws {
            *v = (*v as f64 * s) as f32;
        }
        *bo = ((*bo as f64 - mean[o] as f64) * s + beta[o] as f64) as f32;
    }
}

/// Output channels up to which [`Conv2d`] sums directly: an im2col there would copy
/// `in * k * k` floats per output value for a handful of products each (line art's 64 -> 1
/// 7x7 layer at 518x518 took 0.10 to 0.15 s direct, 0.63 s by im2col).
pub const DIRECT_OUTPUTS: usize = 4;

/// Most floats of im2col [`Conv2d`] makes at a time (8 MB): large products, allocations the
/// heap reuses (on HED's, M-LSD's and PiDiNet's 3x3 layers at 512x512, bands of 4 to 8 MB
/// timed fastest; 16 MB and more up to twice as slow).
const BAND_COLUMNS: usize = 1 << 21;

/// `nn.Conv2d` (square kernel, zero padding, no groups): see the module documentation.
pub struct Conv2d {
    /// `[out, in * k * k]`, rows ordered (in channel, ky, kx).
    weight: Tensor,
    /// The same values for the direct sums (empty for wider layers).
    w: Vec<f32>,
    bias: Option<Vec<f32>>,
    inputs: usize,
    outputs: usize,
    k: usize,
    geo: Geometry,
    /// Most floats of im2col made at a time ([`BAND_COLUMNS`]; fewer in tests).
    max_columns: usize,
}

impl Conv2d {
    /// From a weight `[out, in, k, k]` and an optional bias `[out]`.
    pub fn new(w: &Tensor, b: Option<&Tensor>, geo: Geometry) -> Result<Self> {
        let (outputs, inputs, k, k2) = w.dims4()?;
        if k != k2 || k == 0 || geo.stride == 0 || geo.dilation == 0 {
            candle_core::bail!("conv: kernel {:?} with {geo:?}", w.dims());
        }
        let weight = w
            .to_dtype(DType::F32)?
            .reshape((outputs, inputs * k * k))?
            .contiguous()?;
        let w = if outputs <= DIRECT_OUTPUTS && k > 1 {
            weight.flatten_all()?.to_vec1()?
        } else {
            Vec::new()
        };
        Ok(Self {
            w,
            weight,
            bias: bias_values(b, outputs)?,
            inputs,
            outputs,
            k,
            geo,
            max_columns: BAND_COLUMNS,
        })
    }

    /// Output channels.
    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// `[n, in, h, w]` -> `[n, out, oh, ow]` ([`Geometry::out_len`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let ((n, c, h, w), (oh, ow)) = sizes("conv", x, self.inputs, self.k, &self.geo)?;
        let o = self.outputs;
        if self.k == 1 && self.geo == Geometry::default() {
            let y = self
                .weight
                .broadcast_matmul(&x.to_dtype(DType::F32)?.reshape((n, c, h * w))?)?;
            let y = match &self.bias {
                Some(b) => y.broadcast_add(&Tensor::from_slice(b, (o, 1), y.device())?)?,
                None => y,
            };
            return y.reshape((n, o, oh, ow));
        }
        if self.w.is_empty() && self.geo.pad.0 == self.geo.pad.1 && self.geo.dilation == 1 {
            // the UNet's CPU convolution (Winograd for 3x3 stride 1, packed im2col products)
            let w4 = self.weight.reshape((o, c, self.k, self.k))?;
            let b = match &self.bias {
                Some(b) => Some(Tensor::from_slice(b, o, x.device())?),
                None => None,
            };
            return sd_pipeline::cpu::conv_op::conv2d_infer(
                &x.to_dtype(DType::F32)?,
                &w4,
                b.as_ref(),
                self.geo.stride,
                self.geo.pad.0,
            );
        }
        let src = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; n * o * oh * ow];
        for (img, dst) in src
            .chunks_exact(c * h * w)
            .zip(out.chunks_exact_mut(o * oh * ow))
        {
            if self.w.is_empty() {
                self.banded(img, ((h, w), (oh, ow)), dst)?;
            } else {
                self.direct(img, ((h, w), (oh, ow)), dst);
            }
        }
        Tensor::from_vec(out, (n, o, oh, ow), x.device())
    }

    /// One image by im2col and matrix products, a band of output rows at a time.
    fn banded(&self, img: &[f32], ((h, w), (oh, ow)): Sides, out: &mut [f32]) -> Result<()> {
        let kk = self.inputs * self.k * self.k;
        let band = (self.max_columns / (kk * ow)).clamp(1, oh);
        let mut y0 = 0;
        while y0 < oh {
            let rows = band.min(oh - y0);
            let px = rows * ow;
            let cols = self.im2col(img, (h, w), ow, y0..y0 + rows);
            let cols = Tensor::from_vec(cols, (kk, px), self.weight.device())?;
            let r = self.weight.matmul(&cols)?.flatten_all()?.to_vec1::<f32>()?;
            for (o, chunk) in r.chunks_exact(px).enumerate() {
                let dst = &mut out[o * oh * ow + y0 * ow..][..px];
                match &self.bias {
                    Some(b) => {
                        for (d, v) in dst.iter_mut().zip(chunk) {
                            *d = v + b[o];
                        }
                    }
                    None => dst.copy_from_slice(chunk),
                }
            }
            y0 += rows;
        }
        Ok(())
    }

    /// Columns `[in * k * k, rows * ow]` for the output rows `rows`, by row copies.
    fn im2col(
        &self,
        img: &[f32],
        (h, w): (usize, usize),
        ow: usize,
        rows: Range<usize>,
    ) -> Vec<f32> {
        let (k, geo) = (self.k, &self.geo);
        let px = rows.len() * ow;
        let mut cols = vec![0f32; self.inputs * k * k * px];
        let work = cols.len();
        for_each_unit(&mut cols, px, work, |row, dst| {
            let (c, ky, kx) = (row / (k * k), row / k % k, row % k);
            let plane = &img[c * h * w..(c + 1) * h * w];
            let valid = geo.valid(kx, w, ow);
            if valid.is_empty() {
                return;
            }
            let start = valid.start * geo.stride + kx * geo.dilation - geo.pad.0;
            for (d, oy) in dst.chunks_exact_mut(ow).zip(rows.clone()) {
                let Some(iy) = geo.input(oy, ky, h) else {
                    continue;
                };
                let src = &plane[iy * w..(iy + 1) * w];
                if geo.stride == 1 {
                    d[valid.clone()].copy_from_slice(&src[start..start + valid.len()]);
                } else {
                    for (i, ox) in valid.clone().enumerate() {
                        d[ox] = src[start + i * geo.stride];
                    }
                }
            }
        });
        cols
    }

    /// One image by direct sums: each output row the bias plus the shifted input rows its
    /// taps cover, rows split over the cores.
    fn direct(&self, img: &[f32], ((h, w), (oh, ow)): Sides, out: &mut [f32]) {
        let (k, c, geo) = (self.k, self.inputs, &self.geo);
        let valid: Vec<_> = (0..k).map(|kx| geo.valid(kx, w, ow)).collect();
        let work = out.len() * c * k * k;
        for_each_unit(out, ow, work, |row, dst| {
            let (o, oy) = (row / oh, row % oh);
            dst.fill(self.bias.as_ref().map_or(0.0, |b| b[o]));
            for ci in 0..c {
                for ky in 0..k {
                    let Some(iy) = geo.input(oy, ky, h) else {
                        continue;
                    };
                    let src = &img[(ci * h + iy) * w..][..w];
                    for (kx, valid) in valid.iter().enumerate() {
                        if !valid.is_empty() {
                            let wv = self.w[((o * c + ci) * k + ky) * k + kx];
                            geo.axpy(dst, src, wv, kx, valid.clone());
                        }
                    }
                }
            }
        });
    }
}

/// A depthwise convolution (`groups` = channels, one `k` x `k` kernel per channel), summed
/// directly: each output the bias (or 0) plus its taps in (ky, kx) order (zero taps skipped),
/// channels split over the cores.
pub struct Depthwise {
    /// `[C, k, k]` flattened.
    w: Vec<f32>,
    bias: Option<Vec<f32>>,
    channels: usize,
    k: usize,
    geo: Geometry,
}

impl Depthwise {
    /// From the kernels `[C, k, k]` (flattened) and an optional bias `[C]`.
    pub fn new(w: Vec<f32>, bias: Option<Vec<f32>>, k: usize, geo: Geometry) -> Result<Self> {
        let channels = w.len() / (k * k).max(1);
        if k == 0 || w.len() != channels * k * k || geo.stride == 0 || geo.dilation == 0 {
            candle_core::bail!("depthwise: {} kernel values of size {k}, {geo:?}", w.len());
        }
        if bias.as_ref().is_some_and(|b| b.len() != channels) {
            candle_core::bail!("depthwise: a bias for {channels} channels expected");
        }
        Ok(Self {
            w,
            bias,
            channels,
            k,
            geo,
        })
    }

    /// `[n, C, h, w]` -> `[n, C, oh, ow]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let ((n, c, h, w), (oh, ow)) = sizes("depthwise", x, self.channels, self.k, &self.geo)?;
        let (k, geo) = (self.k, &self.geo);
        let src = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; n * c * oh * ow];
        let valid: Vec<_> = (0..k).map(|kx| geo.valid(kx, w, ow)).collect();
        let work = out.len() * k * k;
        for_each_unit(&mut out, oh * ow, work, |plane, dst| {
            let ch = plane % c;
            let img = &src[plane * h * w..(plane + 1) * h * w];
            let ker = &self.w[ch * k * k..(ch + 1) * k * k];
            dst.fill(self.bias.as_ref().map_or(0.0, |b| b[ch]));
            for (oy, row) in dst.chunks_exact_mut(ow).enumerate() {
                for ky in 0..k {
                    let Some(iy) = geo.input(oy, ky, h) else {
                        continue;
                    };
                    let src = &img[iy * w..(iy + 1) * w];
                    for (kx, valid) in valid.iter().enumerate() {
                        let v = ker[ky * k + kx];
                        if v != 0.0 && !valid.is_empty() {
                            geo.axpy(row, src, v, kx, valid.clone());
                        }
                    }
                }
            }
        });
        Tensor::from_vec(out, (n, c, oh, ow), x.device())
    }
}

/// Most floats one matrix product of [`ConvTranspose2d`] makes at a time (256 MiB): large
/// layers are done a group of output channels at a time.
pub const MAX_COLUMNS: usize = 64 << 20;

/// `nn.ConvTranspose2d` (square kernel, no groups or dilation) as PyTorch's CPU kernel
/// computes it: one matrix product of the transposed weight with the input
/// (`[out * k * k, in] x [in, h * w]`), then col2im (each column scattered onto the output and
/// summed), plus the bias.
pub struct ConvTranspose2d {
    /// `[out * k * k, in]`, rows ordered (out channel, ky, kx).
    weight: Tensor,
    bias: Option<Vec<f32>>,
    inputs: usize,
    outputs: usize,
    k: usize,
    stride: usize,
    padding: usize,
    output_padding: usize,
    /// Most floats of columns one product makes ([`MAX_COLUMNS`]; fewer in tests).
    max_columns: usize,
}

impl ConvTranspose2d {
    /// From a weight `[in, out, k, k]` and an optional bias `[out]`.
    pub fn new(
        w: &Tensor,
        b: Option<&Tensor>,
        stride: usize,
        padding: usize,
        output_padding: usize,
    ) -> Result<Self> {
        let (inputs, outputs, k, k2) = w.dims4()?;
        if k != k2 || k == 0 || stride == 0 {
            candle_core::bail!("conv_transpose: kernel {:?}, stride {stride}", w.dims());
        }
        let weight = w
            .to_dtype(DType::F32)?
            .reshape((inputs, outputs * k * k))?
            .t()?
            .contiguous()?;
        Ok(Self {
            weight,
            bias: bias_values(b, outputs)?,
            inputs,
            outputs,
            k,
            stride,
            padding,
            output_padding,
            max_columns: MAX_COLUMNS,
        })
    }

    /// Output channels.
    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// `[n, in, h, w]` -> `[n, out, (h - 1) s - 2p + k + op, ...]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let (s, p, k) = (self.stride, self.padding, self.k);
        let oh = ((h.max(1) - 1) * s + k + self.output_padding).saturating_sub(2 * p);
        let ow = ((w.max(1) - 1) * s + k + self.output_padding).saturating_sub(2 * p);
        if c != self.inputs || h == 0 || w == 0 || oh == 0 || ow == 0 {
            candle_core::bail!(
                "conv_transpose: input {:?}, expected [n, {}, h, w] (not empty)",
                x.dims(),
                self.inputs
            );
        }
        let x = x.to_dtype(DType::F32)?;
        let mut out = vec![0f32; n * self.outputs * oh * ow];
        for (i, dst) in out.chunks_exact_mut(self.outputs * oh * ow).enumerate() {
            let xm = x.get(i)?.reshape((c, h * w))?.contiguous()?;
            self.image(&xm, ((h, w), (oh, ow)), dst)?;
        }
        Tensor::from_vec(out, (n, self.outputs, oh, ow), x.device())
    }

    /// One image `xm` (`[in, h * w]`) into `out` (`[out, oh, ow]`).
    fn image(&self, xm: &Tensor, ((h, w), (oh, ow)): Sides, out: &mut [f32]) -> Result<()> {
        let (s, p, k) = (self.stride, self.padding, self.k);
        for (o, plane) in out.chunks_mut(oh * ow).enumerate() {
            plane.fill(self.bias.as_ref().map_or(0.0, |b| b[o]));
        }
        let group = (self.max_columns / (k * k * h * w)).clamp(1, self.outputs);
        let mut o0 = 0;
        while o0 < self.outputs {
            let g = group.min(self.outputs - o0);
            let cols = self
                .weight
                .narrow(0, o0 * k * k, g * k * k)?
                .matmul(xm)?
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
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Every kernel against candle's reference convolution on pseudo-random inputs and weights
    //! in -0.5..0.5. Tolerance: `max |got - want| <= 1e-5 * max(1, max |want|)` (f32 sums of
    //! up to a few hundred products in another order differ by a few 1e-7 relative).

    use super::*;
    use candle_core::Device;

    fn random(shape: &[usize], seed: u64) -> Tensor {
        let mut s = seed;
        let v: Vec<f32> = (0..shape.iter().product::<usize>())
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
        assert_eq!(got.dims(), want.dims(), "{what}");
        let (got, want) = (values(got), values(want));
        let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff <= 1e-5 * scale,
            "{what}: max |diff| {diff} (scale {scale})"
        );
    }

    /// `want` plus a bias `[c]` per channel.
    fn plus(want: Tensor, b: Option<&Tensor>) -> Tensor {
        match b {
            Some(b) => want
                .broadcast_add(&b.reshape((1, b.dim(0).unwrap(), 1, 1)).unwrap())
                .unwrap(),
            None => want,
        }
    }

    /// Candle's conv of `x` zero-padded by `geo.pad` (before, after) on both axes.
    fn reference(x: &Tensor, w: &Tensor, geo: Geometry, groups: usize) -> Tensor {
        let (a, b) = geo.pad;
        x.pad_with_zeros(2, a, b)
            .unwrap()
            .pad_with_zeros(3, a, b)
            .unwrap()
            .conv2d(w, 0, geo.stride, geo.dilation, groups)
            .unwrap()
    }

    /// Direct sums (1..=4 outputs), im2col (5 and 7 outputs; whole, and in bands of one row)
    /// and the 1x1 product; strides 1 and 2, symmetric and TFLite padding, padding wider than
    /// the image, dilations, even kernels, two images, with and without bias.
    #[test]
    fn conv2d_matches_candle() {
        let mut seed = 1;
        for (n, c, h, w) in [(1, 3, 7, 6), (2, 6, 9, 13), (1, 5, 1, 1), (1, 4, 16, 5)] {
            let x = random(&[n, c, h, w], seed);
            for (k, stride, pad, dilation) in [
                (1, 1, (0, 0), 1),
                (1, 2, (0, 0), 1),
                (3, 1, (1, 1), 1),
                (3, 2, (1, 1), 1),
                (3, 2, (0, 1), 1),
                (3, 1, (5, 5), 5),
                (3, 1, (11, 11), 11),
                (4, 2, (1, 1), 1),
                (5, 1, (2, 2), 1),
                (7, 1, (3, 3), 1),
                (3, 1, (0, 0), 1),
            ] {
                let geo = Geometry {
                    stride,
                    pad,
                    dilation,
                };
                for o in [1, 4, 5, 7] {
                    seed += 1;
                    let wt = random(&[o, c, k, k], seed);
                    let b = random(&[o], seed + 1000);
                    let Some(_) = geo.out_len(h, k).zip(geo.out_len(w, k)) else {
                        let conv = Conv2d::new(&wt, Some(&b), geo).unwrap();
                        assert!(conv.forward(&x).is_err(), "{k} {geo:?} on {h}x{w}");
                        continue;
                    };
                    for bias in [Some(&b), None] {
                        let want = plus(reference(&x, &wt, geo, 1), bias);
                        let mut conv = Conv2d::new(&wt, bias, geo).unwrap();
                        let what = format!(
                            "{n}x{c}x{h}x{w} -> {o}, k{k} {geo:?} bias {}",
                            bias.is_some()
                        );
                        assert_close(&what, &conv.forward(&x).unwrap(), &want);
                        // bands of one row
                        conv.max_columns = 1;
                        assert_close(&what, &conv.forward(&x).unwrap(), &want);
                    }
                }
            }
        }
    }

    /// Large enough for several bands and for the im2col and direct loops to run on threads.
    #[test]
    fn conv2d_matches_candle_on_a_large_layer() {
        let x = random(&[1, 64, 40, 300], 1);
        for (o, geo) in [
            (6, Geometry::same(3, 1)),
            (2, Geometry::same(3, 5)),
            (9, Geometry::new(2, 1)),
        ] {
            let wt = random(&[o, 64, 3, 3], 2);
            let b = random(&[o], 3);
            let conv = Conv2d::new(&wt, Some(&b), geo).unwrap();
            let want = plus(reference(&x, &wt, geo, 1), Some(&b));
            assert_close(&format!("{o} {geo:?}"), &conv.forward(&x).unwrap(), &want);
        }
    }

    #[test]
    fn depthwise_matches_candle_grouped_conv() {
        for (n, c, h, w) in [(1, 3, 4, 8), (1, 384, 4, 8), (2, 5, 7, 9), (1, 2, 64, 64)] {
            let x = random(&[n, c, h, w], 1);
            for (k, geo) in [
                (3, Geometry::same(3, 1)),
                (5, Geometry::same(5, 1)),
                (
                    3,
                    Geometry {
                        stride: 2,
                        pad: (0, 1),
                        dilation: 1,
                    },
                ),
            ] {
                let mut kernels = values(&random(&[c, 1, k, k], 2));
                // zero taps (a converted radial kernel has 16 of 25) are skipped
                kernels.iter_mut().step_by(3).for_each(|v| *v = 0.0);
                let kt = Tensor::from_vec(kernels.clone(), (c, 1, k, k), &Device::Cpu).unwrap();
                let b = random(&[c], 3);
                for bias in [Some(&b), None] {
                    let want = plus(reference(&x, &kt, geo, c), bias);
                    let bias_values = bias.map(values);
                    let dw = Depthwise::new(kernels.clone(), bias_values, k, geo).unwrap();
                    let what = format!("{n}x{c}x{h}x{w} k{k} {geo:?} bias {}", bias.is_some());
                    assert_close(&what, &dw.forward(&x).unwrap(), &want);
                }
            }
        }
    }

    /// Strides, padding, output padding, even and odd kernels, two images, and a forced split
    /// into groups of output channels.
    #[test]
    fn conv_transpose_matches_candle() {
        for (n, ci, co, h, w) in [(1, 3, 5, 4, 3), (2, 6, 2, 5, 7), (1, 4, 1, 1, 1)] {
            let x = random(&[n, ci, h, w], 1);
            for (k, s, p, op) in [
                (3, 2, 1, 1),
                (4, 2, 1, 0),
                (3, 1, 0, 0),
                (3, 1, 1, 0),
                (1, 1, 0, 0),
            ] {
                let wt = random(&[ci, co, k, k], 2);
                let b = random(&[co], 3);
                for bias in [Some(&b), None] {
                    let want = plus(x.conv_transpose2d(&wt, p, op, s, 1).unwrap(), bias);
                    let mut ct = ConvTranspose2d::new(&wt, bias, s, p, op).unwrap();
                    let what = format!("{n}x{ci}x{h}x{w} -> {co} k{k} s{s} p{p} op{op}");
                    assert_close(&what, &ct.forward(&x).unwrap(), &want);
                    // two output channels a product
                    ct.max_columns = 2 * k * k * h * w;
                    let grouped = ct.forward(&x).unwrap();
                    assert_close(&what, &grouped, &want);
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let x = random(&[1, 3, 4, 4], 1);
        let conv = Conv2d::new(&random(&[2, 4, 3, 3], 2), None, Geometry::same(3, 1)).unwrap();
        assert!(conv.forward(&x).is_err(), "channel count");
        let conv = Conv2d::new(&random(&[2, 3, 7, 7], 2), None, Geometry::default()).unwrap();
        assert!(conv.forward(&x).is_err(), "kernel larger than the input");
        assert!(Conv2d::new(&random(&[2, 3, 3, 2], 2), None, Geometry::default()).is_err());
        let b = random(&[3], 3);
        assert!(Conv2d::new(&random(&[2, 3, 3, 3], 2), Some(&b), Geometry::default()).is_err());
        assert!(Depthwise::new(vec![0.0; 10], None, 3, Geometry::same(3, 1)).is_err());
        let dw = Depthwise::new(vec![1.0; 18], None, 3, Geometry::same(3, 1)).unwrap();
        assert!(dw.forward(&x).is_err(), "depthwise channel count");
        let ct = ConvTranspose2d::new(&random(&[4, 2, 3, 3], 2), None, 2, 1, 1).unwrap();
        assert!(ct.forward(&x).is_err(), "transposed channel count");
    }
}
