//! `lineart_anime_denoise`: sd-webui-controlnet's manga line extraction
//! (`annotator/manga_line`, `MangaLineExtration`: the `res_skip` residual U-Net, `erika.pth`;
//! controlnet_aux 0.0.10 does not have it). The image as OpenCV grey (`COLOR_RGB2GRAY`), 0..255
//! unnormalised, in; `uint8(clip(255 - out))` out: the network draws dark lines on white, so
//! the map is white lines on black and sd-webui-controlnet's module does not invert it again.
//!
//! Every layer is `BatchNorm2d(eps 1e-3)` (running statistics), `LeakyReLU(0.2)`, conv
//! (`_bn_relu_conv`, keys `{..}.model.0` norm, `{..}.model.2` conv), in basic blocks of two
//! (`conv1`, `residual`) plus a shortcut (`shortcut.model.0`, a 1x1 conv where the width or
//! stride changes). Encoder `block0`..`block4` (2, 3, 5, 7, 12 blocks; the last of each but
//! block0 has stride 2), decoder `block5`..`block8` (7, 5, 3, 2 blocks; the first upsamples
//! x2, nearest, after its conv and shortcut) each added to the encoder map of its size,
//! `block9` (2 blocks) and `conv15` (1x1 to one channel). The sides must be multiples of 16:
//! sd-webui-controlnet pads the image to multiples of 64 (as [`crate::detect`] sizes it);
//! other sizes are padded here by repeating the edge, and the map cropped back.

use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use sd_plugins_api::{
    hwc3, register_preprocessor, ImageBuf, ParamSpec, Params, PluginError, Preprocessor,
};

use super::{cached, check_memory, grey_map, model_param, top_left, Cache, Tensors};
use crate::conv::Conv2d;

const NAME: &str = "lineart_anime_denoise";
/// The weight files looked for in the annotator folder.
pub const WEIGHT_FILES: [&str; 2] = ["erika.pth", "erika.safetensors"];

/// What the sides must be multiples of (four stride-2 stages).
pub const MULTIPLE: usize = 16;

/// (stage, blocks, output width, last block strided, first block upsamples) as `res_skip`
/// builds them.
const STAGES: [(&str, usize, usize, bool, bool); 10] = [
    ("block0", 2, 24, false, false),
    ("block1", 3, 48, true, false),
    ("block2", 5, 96, true, false),
    ("block3", 7, 192, true, false),
    ("block4", 12, 384, true, false),
    ("block5", 7, 192, false, true),
    ("block6", 5, 96, false, true),
    ("block7", 3, 48, false, true),
    ("block8", 2, 24, false, true),
    ("block9", 2, 16, false, false),
];

/// Every tensor of `res_skip` (BatchNorm's `num_batches_tracked` aside) with its shape.
pub fn parameter_shapes() -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    let mut layer = |p: String, i: usize, o: usize, k: usize| {
        for s in ["weight", "bias", "running_mean", "running_var"] {
            out.push((format!("{p}.model.0.{s}"), vec![i]));
        }
        out.push((format!("{p}.model.2.weight"), vec![o, i, k, k]));
        out.push((format!("{p}.model.2.bias"), vec![o]));
    };
    let mut shortcuts = Vec::new();
    let mut c = 1;
    for (stage, n, width, strided, _) in STAGES {
        for b in 0..n {
            let p = format!("{stage}.model.{b}");
            layer(format!("{p}.conv1"), c, width, 3);
            layer(format!("{p}.residual"), width, width, 3);
            let stride2 = strided && b + 1 == n;
            if c != width || stride2 {
                shortcuts.push((format!("{p}.shortcut.model.0"), c, width));
            }
            c = width;
        }
    }
    layer("conv15".into(), 16, 1, 1);
    for (p, i, o) in shortcuts {
        out.push((format!("{p}.weight"), vec![o, i, 1, 1]));
        out.push((format!("{p}.bias"), vec![o]));
    }
    out
}

/// `_bn_relu_conv` / `_u_bn_relu_conv`: batch norm folded to `x * alpha + beta` per channel
/// (PyTorch's CPU inference kernel computes it so), LeakyReLU(0.2), conv, and for the
/// upsampling kind a x2 nearest upsample.
struct BnReluConv {
    alpha: Vec<f32>,
    beta: Vec<f32>,
    conv: Conv2d,
    upsample: bool,
}

impl BnReluConv {
    fn load(
        t: &Tensors,
        prefix: &str,
        inputs: usize,
        k: usize,
        stride: usize,
        upsample: bool,
    ) -> Result<(Self, usize), String> {
        let bn = |s: &str| -> Result<Vec<f64>, String> {
            let key = format!("{prefix}.model.0.{s}");
            let v = t.get_shaped(&key, &[inputs])?;
            let v = v
                .to_vec1::<f32>()
                .map_err(|e| t.error(format!("`{key}`: {e}")))?;
            Ok(v.into_iter().map(f64::from).collect())
        };
        let (w, b, mean, var) = (
            bn("weight")?,
            bn("bias")?,
            bn("running_mean")?,
            bn("running_var")?,
        );
        let mut alpha = Vec::with_capacity(inputs);
        let mut beta = Vec::with_capacity(inputs);
        for c in 0..inputs {
            let a = w[c] / (var[c] + 1e-3).sqrt();
            alpha.push(a as f32);
            beta.push((b[c] - mean[c] * a) as f32);
        }
        let (conv, out) = t.conv2d(&format!("{prefix}.model.2"), inputs, k, stride, k / 2)?;
        Ok((
            Self {
                alpha,
                beta,
                conv,
                upsample,
            },
            out,
        ))
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let hw = h * w;
        let mut v = vec![0f32; n * c * hw];
        let work = v.len();
        // planes split over the cores, each value as in a serial loop
        super::with_values(x, |src| {
            crate::conv::for_each_unit(&mut v, hw, work, |i, plane| {
                let (a, b) = (self.alpha[i % c], self.beta[i % c]);
                for (o, &p) in plane.iter_mut().zip(&src[i * hw..(i + 1) * hw]) {
                    let y = p * a + b;
                    *o = if y > 0.0 { y } else { y * 0.2 };
                }
            })
        })?;
        let y = self
            .conv
            .forward(&Tensor::from_vec(v, (n, c, h, w), x.device())?)?;
        if self.upsample {
            let (_, _, h, w) = y.dims4()?;
            y.upsample_nearest2d(2 * h, 2 * w)
        } else {
            Ok(y)
        }
    }
}

/// `basic_block` / `_u_basic_block`.
struct BasicBlock {
    conv1: BnReluConv,
    residual: BnReluConv,
    /// A 1x1 conv (upsampled x2 in the upsampling kind), or the identity.
    shortcut: Option<(Conv2d, bool)>,
}

impl BasicBlock {
    fn load(
        t: &Tensors,
        prefix: &str,
        inputs: usize,
        stride: usize,
        upsample: bool,
    ) -> Result<(Self, usize), String> {
        let (conv1, width) =
            BnReluConv::load(t, &format!("{prefix}.conv1"), inputs, 3, stride, upsample)?;
        let (residual, w2) =
            BnReluConv::load(t, &format!("{prefix}.residual"), width, 3, 1, false)?;
        if w2 != width {
            return Err(t.error(format!(
                "`{prefix}.residual.model.2` gives {w2} channels, expected {width}"
            )));
        }
        let key = format!("{prefix}.shortcut.model.0");
        let shortcut = if t.has(&format!("{key}.weight")) {
            let (conv, o) = t.conv2d(&key, inputs, 1, stride, 0)?;
            if o != width {
                return Err(t.error(format!("`{key}` gives {o} channels, expected {width}")));
            }
            Some((conv, upsample))
        } else if inputs != width || stride != 1 || upsample {
            return Err(t.error(format!("no tensor `{key}.weight`")));
        } else {
            None
        };
        Ok((
            Self {
                conv1,
                residual,
                shortcut,
            },
            width,
        ))
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.residual.forward(&self.conv1.forward(x)?)?;
        match &self.shortcut {
            Some((conv, up)) => {
                let s = conv.forward(x)?;
                let s = if *up {
                    let (_, _, h, w) = s.dims4()?;
                    s.upsample_nearest2d(2 * h, 2 * w)?
                } else {
                    s
                };
                s + y
            }
            None => x + y,
        }
    }
}

/// The manga line network (`res_skip`).
pub struct ResSkip {
    stages: Vec<Vec<BasicBlock>>,
    last: BnReluConv,
}

impl ResSkip {
    /// Build from a file's tensors (keys with or without `module.`), checking every shape;
    /// the widths are read from the weights, the layout is `res_skip`'s.
    pub fn new(t: &Tensors) -> Result<Self, String> {
        let mut c = 1;
        let mut widths = Vec::new();
        let mut stages = Vec::new();
        for (i, (stage, n, _, strided, up)) in STAGES.into_iter().enumerate() {
            let mut blocks = Vec::new();
            for b in 0..n {
                let stride = if strided && b + 1 == n { 2 } else { 1 };
                let prefix = format!("{stage}.model.{b}");
                let (block, w) = BasicBlock::load(t, &prefix, c, stride, up && b == 0)?;
                blocks.push(block);
                c = w;
            }
            widths.push(c);
            // the decoder's output i (5..=8) is added to the encoder's 8 - i
            if (5..=8).contains(&i) && c != widths[8 - i] {
                return Err(t.error(format!(
                    "`{stage}` gives {c} channels but is added to `block{}`'s {}",
                    8 - i,
                    widths[8 - i]
                )));
            }
            stages.push(blocks);
        }
        let (last, out) = BnReluConv::load(t, "conv15", c, 1, 1, false)?;
        if out != 1 {
            return Err(t.error(format!("`conv15.model.2` gives {out} channels, expected 1")));
        }
        Ok(Self { stages, last })
    }

    /// Load `erika.pth` (read without running pickle code) or a safetensors file.
    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        Self::new(&Tensors::open(path, "manga line (erika)")?)
    }

    /// `[1, 1, h, w]` grey 0..255 (sides multiples of [`MULTIPLE`]) -> `[1, 1, h, w]`: the
    /// drawing, dark lines (about 0) on white (about 255).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        if !h.is_multiple_of(MULTIPLE) || !w.is_multiple_of(MULTIPLE) {
            candle_core::bail!("network input {w}x{h}: sides must be multiples of {MULTIPLE}");
        }
        let run = |stage: usize, x: &Tensor| -> candle_core::Result<Tensor> {
            let mut x = x.clone();
            for b in &self.stages[stage] {
                x = b.forward(&x)?;
            }
            Ok(x)
        };
        let mut enc = vec![run(0, x)?];
        for s in 1..5 {
            let next = run(s, &enc[s - 1])?;
            enc.push(next);
        }
        let mut x = enc[4].clone();
        for s in 5..9 {
            // res1..res4: the encoder map plus the decoder's (`_shortcut` without a conv)
            x = (&enc[8 - s] + run(s, &x)?)?;
        }
        let x = run(9, &x)?;
        self.last.forward(&x)
    }
}

/// What `lineart_anime_denoise` makes of an image with `net`, at the image's size.
pub fn line_map(net: &ResSkip, input: &ImageBuf) -> Result<ImageBuf, String> {
    let rgb = hwc3(input);
    let (w, h) = (rgb.width, rgb.height);
    let grey = crate::lines::grey(&rgb);
    let (pw, ph) = (
        w.div_ceil(MULTIPLE) * MULTIPLE,
        h.div_ceil(MULTIPLE) * MULTIPLE,
    );
    check_memory(NAME, pw, ph)?;
    let mut x = Vec::with_capacity(pw * ph);
    for y in 0..ph {
        let row = &grey[y.min(h - 1) * w..][..w];
        x.extend((0..pw).map(|xx| row[xx.min(w - 1)] as f32));
    }
    let run = || -> candle_core::Result<Vec<f32>> {
        let y = net.forward(&Tensor::from_vec(x, (1, 1, ph, pw), &Device::Cpu)?)?;
        top_left(&y, w, h)
    };
    let line = run().map_err(|e| e.to_string())?;
    let data = line
        .into_iter()
        .map(|l| (255.0 - l).clamp(0.0, 255.0) as u8)
        .collect();
    Ok(grey_map(w, h, data))
}

static CACHE: OnceLock<Cache<ResSkip>> = OnceLock::new();

/// `lineart_anime_denoise`.
pub struct LineartAnimeDenoise;

impl Preprocessor for LineartAnimeDenoise {
    fn name(&self) -> &str {
        NAME
    }
    fn description(&self) -> &str {
        "anime line art without screen tones, white on black (sd-webui-controlnet manga_line, \
         erika.pth)"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![model_param(&WEIGHT_FILES)]
    }
    fn cache_salt(&self, params: &Params) -> Result<String, PluginError> {
        crate::weights::weights_salt(NAME, params, &WEIGHT_FILES)
    }
    fn process(&self, input: &ImageBuf, params: &Params) -> Result<ImageBuf, PluginError> {
        let path = crate::weights::find_weights(NAME, params, &WEIGHT_FILES)?;
        let net = cached(&CACHE, &path, ResSkip::load).map_err(|e| PluginError::failed(NAME, e))?;
        line_map(&net, input).map_err(|e| PluginError::failed(NAME, e))
    }
}

register_preprocessor!(LineartAnimeDenoise);
