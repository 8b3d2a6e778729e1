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
//! networks use `nn.InstanceNorm2d` without affine parameters) and a tensor source that names
//! the file and key in every error; the convolutions are [`crate::conv`]'s.

pub mod anime;
pub mod manga;
pub mod realistic;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{DType, Device, Tensor};
use sd_plugins_api::{hwc3, ImageBuf, ParamSpec};
use sd_weights::Store;

use crate::conv::{Conv2d, ConvTranspose2d, Geometry, MAX_COLUMNS};

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
    ) -> Result<(Conv2d, usize), String> {
        let (w, out) = self.kernel(&format!("{prefix}.weight"), 1, inputs, k)?;
        let b = self.get_shaped(&format!("{prefix}.bias"), &[out])?;
        let conv = Conv2d::new(&w, Some(&b), Geometry::new(stride, padding))
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
    ) -> Result<ConvTranspose2d, String> {
        let (w, out) = self.kernel(&format!("{prefix}.weight"), 0, inputs, k)?;
        let b = self.get_shaped(&format!("{prefix}.bias"), &[out])?;
        ConvTranspose2d::new(&w, Some(&b), stride, padding, output_padding)
            .map_err(|e| format!("{}: `{prefix}`: {e}", self.origin))
    }
}

/// `f` of `x`'s values in order, read in place when `x` is a contiguous f32 CPU tensor (a copy
/// otherwise).
pub(crate) fn with_values<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    use candle_core::{CpuStorage, Storage};
    if x.is_contiguous() {
        let (storage, layout) = x.storage_and_layout();
        if let Storage::Cpu(CpuStorage::F32(v)) = &*storage {
            let start = layout.start_offset();
            return Ok(f(&v[start..start + x.elem_count()]));
        }
    }
    let v = x
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(f(&v))
}

/// The source index of each position of an axis of `n` padded by `p` on both sides, as
/// `nn.ReflectionPad2d` mirrors it (without repeating the edge).
fn reflected(n: usize, p: usize) -> Vec<usize> {
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
            j as usize
        })
        .collect()
}

/// Writes `g` of a `h` x `w` plane into the middle of the `(h + 2p)` x `(w + 2p)` plane `dst`
/// and mirrors the border from it (`nn.ReflectionPad2d(p)` of `g(plane)`); `g` maps one source
/// row to one destination row.
fn pad_plane(dst: &mut [f32], (h, w, p): (usize, usize, usize), g: impl Fn(usize, &mut [f32])) {
    let pw = w + 2 * p;
    let cols = reflected(w, p);
    for r in 0..h {
        let row = &mut dst[(r + p) * pw..(r + p + 1) * pw];
        g(r, &mut row[p..p + w]);
        for k in (0..p).chain(p + w..pw) {
            row[k] = row[p + cols[k]];
        }
    }
    for (r, &src) in reflected(h, p).iter().enumerate() {
        if r < p || r >= p + h {
            dst.copy_within((src + p) * pw..(src + p + 1) * pw, r * pw);
        }
    }
}

/// `nn.ReflectionPad2d(p)` of `[n, c, h, w]` (needs `p < h` and `p < w`): one pass per plane,
/// planes split over the cores.
pub fn reflection_pad(x: &Tensor, p: usize) -> candle_core::Result<Tensor> {
    norm_pad(x, None, p)
}

/// `nn.InstanceNorm2d(c)` (no affine parameters, eps 1e-5), then ReLU when `relu`, of
/// `[1, c, h, w]`. The statistics in f64 and the output as `x * invstd - mean * invstd`, as
/// PyTorch's CPU batch-norm kernel (which instance norm runs) computes them. Planes split over
/// the cores (each computed as in a serial loop).
pub fn instance_norm(x: &Tensor, relu: bool) -> candle_core::Result<Tensor> {
    norm_pad(x, Some(relu), 0)
}

/// `reflection_pad(instance_norm(x, relu), p)` in one pass, the same values.
pub fn instance_norm_pad(x: &Tensor, relu: bool, p: usize) -> candle_core::Result<Tensor> {
    norm_pad(x, Some(relu), p)
}

/// Instance norm (`Some(relu)`) or not, then reflection padding by `p` (0: none).
fn norm_pad(x: &Tensor, norm: Option<bool>, p: usize) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if p > 0 && (p >= h || p >= w) {
        candle_core::bail!("reflection padding {p} of a {w}x{h} map (the image is too small)");
    }
    let (ph, pw, hw) = (h + 2 * p, w + 2 * p, h * w);
    let mut out = vec![0f32; n * c * ph * pw];
    let work = (if norm.is_some() { 4 } else { 1 }) * out.len();
    with_values(x, |src| {
        crate::conv::for_each_unit(&mut out, ph * pw, work, |plane, dst| {
            let src = &src[plane * hw..(plane + 1) * hw];
            let Some(relu) = norm else {
                return pad_plane(dst, (h, w, p), |r, row| {
                    row.copy_from_slice(&src[r * w..(r + 1) * w])
                });
            };
            let mean = sd_pipeline::cpu::reduce::sum_f64(src) / hw as f64;
            let var = sd_pipeline::cpu::reduce::sum_sq_dev_f64(src, mean) / hw as f64;
            let invstd = 1.0 / (var + 1e-5).sqrt();
            let (alpha, beta) = (invstd as f32, (-mean * invstd) as f32);
            pad_plane(dst, (h, w, p), |r, row| {
                for (o, &a) in row.iter_mut().zip(&src[r * w..(r + 1) * w]) {
                    let y = a * alpha + beta;
                    *o = if relu { y.max(0.0) } else { y };
                }
            });
        })
    })?;
    Tensor::from_vec(out, (n, c, ph, pw), x.device())
}

/// A conv layer followed by instance norm (+ ReLU): `Conv2d`, `InstanceNorm2d`, `ReLU`.
pub(crate) fn conv_in(conv: &Conv2d, x: &Tensor, relu: bool) -> candle_core::Result<Tensor> {
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
/// half size), plus a transposed convolution's columns and their product (at most
/// [`MAX_COLUMNS`] floats each, fewer for small images; a convolution's im2col bands are
/// smaller).
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

    /// Several planes and a wider pad, against torch's rule written out: index i of the padded
    /// axis reads |i - p| mirrored at the far edge.
    #[test]
    fn reflection_pad_pads_every_plane() {
        let (n, c, h, w, p) = (2, 3, 5, 4, 3);
        let x = t(
            (0..n * c * h * w).map(|v| v as f32).collect(),
            &[n, c, h, w],
        );
        let y = reflection_pad(&x, p).unwrap();
        let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let m = |i: usize, len: usize| -> usize {
            let j = (i as isize - p as isize).unsigned_abs();
            if j >= len {
                2 * (len - 1) - j
            } else {
                j
            }
        };
        let (ph, pw) = (h + 2 * p, w + 2 * p);
        for plane in 0..n * c {
            for r in 0..ph {
                for col in 0..pw {
                    let want = (plane * h * w + m(r, h) * w + m(col, w)) as f32;
                    assert_eq!(y[plane * ph * pw + r * pw + col], want, "{plane} {r} {col}");
                }
            }
        }
    }

    #[test]
    fn norm_then_pad_in_one_pass_is_norm_then_pad() {
        let (n, c, h, w) = (1, 5, 6, 7);
        let v: Vec<f32> = (0..n * c * h * w)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let x = t(v, &[n, c, h, w]);
        for (relu, p) in [(true, 1), (false, 3), (true, 0)] {
            let one = instance_norm_pad(&x, relu, p).unwrap();
            let two = reflection_pad(&instance_norm(&x, relu).unwrap(), p.max(1)).unwrap();
            let two = if p == 0 {
                instance_norm(&x, relu).unwrap()
            } else {
                two
            };
            let (a, b) = (
                one.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                two.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert_eq!(one.dims(), two.dims());
            assert_eq!(a, b, "relu {relu} pad {p}");
        }
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
}
