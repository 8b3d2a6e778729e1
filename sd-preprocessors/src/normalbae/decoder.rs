//! The NormalBAE decoder (`Decoder`, architecture "BN"), in eval mode.
//!
//! `conv2` (1x1, 2048) on the encoder's head, then four `UpSampleBN` (bilinear,
//! align_corners=True, to the skip's size; concatenated with the skip; twice 3x3 conv + BN +
//! LeakyReLU(0.01)) down to 1/2 size. `out_conv_res8` (3x3 -> 4) on the 1/8 map gives the first
//! prediction; then three refinements, each: the decoder map of that scale and the previous
//! prediction upsampled x2 (bilinear, align_corners=True), concatenated, and a per-pixel MLP
//! (`Conv1d` 1x1: in -> 128, ReLU, 128, ReLU, 128, ReLU, 4). The training path samples points
//! by uncertainty (`sample_points`); eval ("try all pixels") runs the MLP on every pixel,
//! which is what this does. Every prediction goes through `norm_normalize`: x, y, z divided by
//! their norm (+ 1e-10), kappa = elu(kappa) + 1 + 0.01.

use candle_core::{Device, Tensor};

use super::efficientnet::Features;
use super::layers::{par_planes, Map, Pointwise, Source};
use crate::conv::{Conv2d, Geometry};

/// PyTorch's BatchNorm2d default eps.
const BN_EPS: f64 = 1e-5;

/// `UpSampleBN` widths: (input = upsampled + skip, output).
const UPS: [(usize, usize); 4] = [
    (2048 + 176, 1024),
    (1024 + 64, 512),
    (512 + 40, 256),
    (256 + 24, 128),
];
/// The refinement MLPs' inputs (decoder map channels + 4) at 1/4, 1/2 and full size.
const HEADS: [(&str, usize); 3] = [
    ("out_conv_res4", 512),
    ("out_conv_res2", 256),
    ("out_conv_res1", 128),
];
const HIDDEN: usize = 128;

/// Every decoder tensor of the state dict with its shape.
pub fn parameter_shapes() -> Vec<(String, Vec<usize>)> {
    let mut out = vec![
        ("decoder.conv2.weight".to_string(), vec![2048, 2048, 1, 1]),
        ("decoder.conv2.bias".to_string(), vec![2048]),
    ];
    for (i, &(cin, cout)) in UPS.iter().enumerate() {
        let p = format!("decoder.up{}._net", i + 1);
        for (conv, bn, ci) in [(0, 1, cin), (3, 4, cout)] {
            out.push((format!("{p}.{conv}.weight"), vec![cout, ci, 3, 3]));
            out.push((format!("{p}.{conv}.bias"), vec![cout]));
            for s in ["weight", "bias", "running_mean", "running_var"] {
                out.push((format!("{p}.{bn}.{s}"), vec![cout]));
            }
        }
    }
    out.push(("decoder.out_conv_res8.weight".into(), vec![4, 512, 3, 3]));
    out.push(("decoder.out_conv_res8.bias".into(), vec![4]));
    for (name, c) in HEADS {
        for (j, (ci, co)) in [
            (c + 4, HIDDEN),
            (HIDDEN, HIDDEN),
            (HIDDEN, HIDDEN),
            (HIDDEN, 4),
        ]
        .into_iter()
        .enumerate()
        {
            out.push((format!("decoder.{name}.{}.weight", 2 * j), vec![co, ci, 1]));
            out.push((format!("decoder.{name}.{}.bias", 2 * j), vec![co]));
        }
    }
    out
}

fn conv_err(e: candle_core::Error) -> String {
    e.to_string()
}

/// A 3x3 conv (zero padding 1), from the file's `{name}.weight` / `{name}.bias`, with the
/// BatchNorm `bn` folded in when given.
fn conv3x3(
    src: &Source,
    name: &str,
    bn: Option<&str>,
    cin: usize,
    cout: usize,
) -> Result<Conv2d, String> {
    let mut w = src.get(&format!("{name}.weight"), &[cout, cin, 3, 3])?;
    let mut b = src.get(&format!("{name}.bias"), &[cout])?;
    if let Some(bn) = bn {
        src.fold_bn(bn, BN_EPS, &mut w, &mut b)?;
    }
    let dev = &Device::Cpu;
    Conv2d::new(
        &Tensor::from_vec(w, (cout, cin, 3, 3), dev).map_err(conv_err)?,
        Some(&Tensor::from_vec(b, cout, dev).map_err(conv_err)?),
        Geometry::new(1, 1),
    )
    .map_err(conv_err)
}

fn leaky_relu(v: f32) -> f32 {
    if v > 0.0 {
        v
    } else {
        v * 0.01
    }
}

/// `UpSampleBN`.
struct UpSample {
    a: Conv2d,
    b: Conv2d,
}

impl UpSample {
    fn forward(&self, x: &Map, skip: &Map) -> candle_core::Result<Map> {
        let up = x.resized(skip.h, skip.w);
        let mut cat = up.data;
        cat.extend_from_slice(&skip.data);
        let f = Tensor::from_vec(cat, (1, x.c + skip.c, skip.h, skip.w), &Device::Cpu)?;
        let leaky = |t: Tensor| -> candle_core::Result<Map> {
            let mut m = Map::from_tensor(&t)?;
            let n = m.pixels();
            par_planes(&mut m.data, n, |_, p| {
                p.iter_mut().for_each(|v| *v = leaky_relu(*v))
            });
            Ok(m)
        };
        let y = leaky(self.a.forward(&f)?)?;
        drop(f);
        leaky(self.b.forward(&y.tensor()?)?)
    }
}

/// A refinement MLP; its first layer split into the decoder-map and prediction columns (the
/// concatenation is never built).
struct Refine {
    first_map: Pointwise,
    first_pred: Pointwise,
    hidden: [Pointwise; 2],
    last: Pointwise,
}

impl Refine {
    fn new(src: &Source, name: &str, c: usize) -> Result<Self, String> {
        let get = |j: usize, ci: usize, co: usize| -> Result<(Vec<f32>, Vec<f32>), String> {
            Ok((
                src.get(&format!("decoder.{name}.{j}.weight"), &[co, ci, 1])?,
                src.get(&format!("decoder.{name}.{j}.bias"), &[co])?,
            ))
        };
        let (w0, b0) = get(0, c + 4, HIDDEN)?;
        let (mut wm, mut wp) = (Vec::new(), Vec::new());
        for row in w0.chunks_exact(c + 4) {
            wm.extend_from_slice(&row[..c]);
            wp.extend_from_slice(&row[c..]);
        }
        let pw = |(w, b): (Vec<f32>, Vec<f32>)| Pointwise::new(w, b).map_err(conv_err);
        Ok(Self {
            first_map: pw((wm, b0))?,
            first_pred: pw((wp, vec![0.0; HIDDEN]))?,
            hidden: [pw(get(2, HIDDEN, HIDDEN)?)?, pw(get(4, HIDDEN, HIDDEN)?)?],
            last: pw(get(6, HIDDEN, 4)?)?,
        })
    }

    /// The refined prediction at twice the size of `map` / `pred` (both upsampled first).
    fn forward(&self, map: &Map, pred: &Map) -> candle_core::Result<Map> {
        let (h, w) = (2 * map.h, 2 * map.w);
        let m = map.resized(h, w);
        let p = pred.resized(h, w);
        let mut y = self.first_map.forward(&m, None, |v| v)?;
        drop(m);
        let yp = self.first_pred.product(&p, None)?;
        for (a, b) in y.data.iter_mut().zip(&yp) {
            *a = (*a + b).max(0.0);
        }
        for layer in &self.hidden {
            y = layer.forward(&y, None, |v| v.max(0.0))?;
        }
        let mut out = self.last.forward(&y, None, |v| v)?;
        norm_normalize(&mut out);
        Ok(out)
    }
}

/// `norm_normalize` of a `[4, h, w]` prediction, in place.
pub fn norm_normalize(m: &mut Map) {
    let n = m.pixels();
    let (xyz, kappa) = m.data.split_at_mut(3 * n);
    let (x, yz) = xyz.split_at_mut(n);
    let (y, z) = yz.split_at_mut(n);
    for i in 0..n {
        let norm = (x[i].powi(2) + y[i].powi(2) + z[i].powi(2)).sqrt() + 1e-10;
        x[i] /= norm;
        y[i] /= norm;
        z[i] /= norm;
    }
    for k in kappa.iter_mut() {
        let elu = if *k > 0.0 { *k } else { k.exp_m1() };
        *k = elu + 1.0 + 0.01;
    }
}

/// The decoder.
pub struct Decoder {
    conv2: Pointwise,
    ups: Vec<UpSample>,
    res8: Conv2d,
    refine: Vec<Refine>,
}

impl Decoder {
    pub fn new(src: &Source) -> Result<Self, String> {
        let conv2 = Pointwise::new(
            src.get("decoder.conv2.weight", &[2048, 2048, 1, 1])?,
            src.get("decoder.conv2.bias", &[2048])?,
        )
        .map_err(conv_err)?;
        let mut ups = Vec::new();
        for (i, &(cin, cout)) in UPS.iter().enumerate() {
            let p = format!("decoder.up{}._net", i + 1);
            ups.push(UpSample {
                a: conv3x3(src, &format!("{p}.0"), Some(&format!("{p}.1")), cin, cout)?,
                b: conv3x3(src, &format!("{p}.3"), Some(&format!("{p}.4")), cout, cout)?,
            });
        }
        let res8 = conv3x3(src, "decoder.out_conv_res8", None, 512, 4)?;
        let refine = HEADS
            .iter()
            .map(|&(name, c)| Refine::new(src, name, c))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            conv2,
            ups,
            res8,
            refine,
        })
    }

    /// The four predictions `[out_res8, out_res4, out_res2, out_res1]`.
    pub fn forward(&self, f: &Features) -> candle_core::Result<[Map; 4]> {
        let d0 = self.conv2.forward(&f.head, None, |v| v)?;
        let d1 = self.ups[0].forward(&d0, &f.block3)?;
        drop(d0);
        let d2 = self.ups[1].forward(&d1, &f.block2)?;
        drop(d1);
        let d3 = self.ups[2].forward(&d2, &f.block1)?;
        let d4 = self.ups[3].forward(&d3, &f.block0)?;
        let mut res8 = Map::from_tensor(&self.res8.forward(&d2.tensor()?)?)?;
        norm_normalize(&mut res8);
        let res4 = self.refine[0].forward(&d2, &res8)?;
        drop(d2);
        let res2 = self.refine[1].forward(&d3, &res4)?;
        drop(d3);
        let res1 = self.refine[2].forward(&d4, &res2)?;
        Ok([res8, res4, res2, res1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norm_normalize_makes_unit_normals_and_positive_kappa() {
        let mut m = Map::new(4, 1, 2, vec![3.0, 0.0, 0.0, 0.0, 4.0, -2.0, 0.5, -1.0]);
        norm_normalize(&mut m);
        let d = &m.data;
        assert!((d[0] - 0.6).abs() < 1e-6 && (d[4] - 0.8).abs() < 1e-6);
        assert!((d[5] + 1.0).abs() < 1e-6, "{}", d[5]);
        assert!((d[6] - 1.51).abs() < 1e-6);
        assert!((d[7] - ((-1f32).exp() + 0.01)).abs() < 1e-6);
    }
}
