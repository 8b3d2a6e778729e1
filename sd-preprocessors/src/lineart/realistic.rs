//! `lineart_realistic` and `lineart_coarse`: controlnet_aux 0.0.10 `LineartDetector` (the
//! "informative drawings" Generator with 3 residual blocks; `sk_model.pth`, and
//! `sk_model2.pth` for coarse lines), as sd-webui-controlnet's `lineart` / `lineart_coarse`
//! modules run it: RGB / 255 in, `uint8(clip(sigmoid * 255))` out, inverted to white lines on
//! black.
//!
//! Keys: `model0.1` (7x7, 3 -> 64, after a reflection pad of 3), `model1.0` / `model1.3`
//! (3x3 stride 2), `model2.{i}.conv_block.{1,5}` (residual blocks, reflection pad 1),
//! `model3.0` / `model3.3` (transposed 3x3 stride 2), `model4.1` (7x7 -> 1, sigmoid); each
//! conv but the last is followed by instance norm and ReLU.

use std::sync::OnceLock;

use candle_core::Tensor;
use sd_plugins_api::{
    hwc3, register_preprocessor, ImageBuf, ParamSpec, Params, PluginError, Preprocessor,
};

use super::{
    cached, check_memory, conv_in, grey_map, instance_norm_pad, model_param, reflection_pad,
    rgb_tensor, top_left, Cache, Tensors,
};
use crate::conv::{Conv2d, ConvTranspose2d};

/// The weight files of `lineart_realistic`, looked for in the annotator folder.
pub const WEIGHT_FILES: [&str; 2] = ["sk_model.pth", "sk_model.safetensors"];
/// The weight files of `lineart_coarse`.
pub const COARSE_WEIGHT_FILES: [&str; 2] = ["sk_model2.pth", "sk_model2.safetensors"];

/// Residual blocks of the shipped models (`Generator(3, 1, 3)`).
pub const BLOCKS: usize = 3;

/// Every tensor of `Generator(3, 1, n_blocks)` with its shape, in the state dict's order.
pub fn parameter_shapes(n_blocks: usize) -> Vec<(String, Vec<usize>)> {
    let mut layers: Vec<(String, Vec<usize>)> = vec![
        ("model0.1".into(), vec![64, 3, 7, 7]),
        ("model1.0".into(), vec![128, 64, 3, 3]),
        ("model1.3".into(), vec![256, 128, 3, 3]),
    ];
    for i in 0..n_blocks {
        for j in [1, 5] {
            layers.push((format!("model2.{i}.conv_block.{j}"), vec![256, 256, 3, 3]));
        }
    }
    layers.push(("model3.0".into(), vec![256, 128, 3, 3]));
    layers.push(("model3.3".into(), vec![128, 64, 3, 3]));
    layers.push(("model4.1".into(), vec![1, 64, 7, 7]));
    let mut out = Vec::new();
    for (name, shape) in layers {
        // a transposed conv's bias has its second dimension
        let bias = if name.starts_with("model3") {
            shape[1]
        } else {
            shape[0]
        };
        out.push((format!("{name}.weight"), shape));
        out.push((format!("{name}.bias"), vec![bias]));
    }
    out
}

/// The line-drawing Generator.
pub struct Generator {
    first: Conv2d,
    down: [Conv2d; 2],
    blocks: Vec<(Conv2d, Conv2d)>,
    up: [ConvTranspose2d; 2],
    last: Conv2d,
}

impl Generator {
    /// Build from a file's tensors, checking every shape (widths are read from the weights;
    /// the input is RGB and the output one channel).
    pub fn new(t: &Tensors) -> Result<Self, String> {
        let (first, c) = t.conv2d("model0.1", 3, 7, 1, 0)?;
        let (d1, c) = t.conv2d("model1.0", c, 3, 2, 1)?;
        let (d2, c) = t.conv2d("model1.3", c, 3, 2, 1)?;
        let mut blocks = Vec::new();
        while t.has(&format!("model2.{}.conv_block.1.weight", blocks.len())) {
            let p = format!("model2.{}.conv_block", blocks.len());
            let (a, ca) = t.conv2d(&format!("{p}.1"), c, 3, 1, 0)?;
            let (b, cb) = t.conv2d(&format!("{p}.5"), ca, 3, 1, 0)?;
            if cb != c {
                return Err(t.error(format!("`{p}.5` gives {cb} channels, expected {c}")));
            }
            blocks.push((a, b));
        }
        let u1 = t.conv_transpose2d("model3.0", c, 3, 2, 1, 1)?;
        let u2 = t.conv_transpose2d("model3.3", u1.outputs(), 3, 2, 1, 1)?;
        let (last, out) = t.conv2d("model4.1", u2.outputs(), 7, 1, 0)?;
        if out != 1 {
            return Err(t.error(format!("`model4.1` gives {out} channels, expected 1")));
        }
        Ok(Self {
            first,
            down: [d1, d2],
            blocks,
            up: [u1, u2],
            last,
        })
    }

    /// Load `sk_model.pth` / `sk_model2.pth` (read without running pickle code) or a
    /// safetensors file.
    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        Self::new(&Tensors::open(path, "lineart (sk_model)")?)
    }

    /// `[1, 3, h, w]` (RGB / 255) -> `[1, 1, 4 ceil(h / 4), 4 ceil(w / 4)]` in (0, 1): dark
    /// lines (0) on white (1).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = conv_in(&self.first, &reflection_pad(x, 3)?, true)?;
        for d in &self.down {
            x = conv_in(d, &x, true)?;
        }
        for (a, b) in &self.blocks {
            // the norm and the next conv's reflection padding in one pass
            let y = instance_norm_pad(&a.forward(&reflection_pad(&x, 1)?)?, true, 1)?;
            let y = conv_in(b, &y, false)?;
            x = (x + y)?;
        }
        // the last upsampling's norm pads for the last conv
        for (i, u) in self.up.iter().enumerate() {
            let pad = if i + 1 == self.up.len() { 3 } else { 0 };
            x = instance_norm_pad(&u.forward(&x)?, true, pad)?;
        }
        candle_nn::ops::sigmoid(&self.last.forward(&x)?)
    }
}

/// What `lineart_realistic` / `lineart_coarse` make of an image with `net`: the drawing,
/// `uint8(clip(out * 255))`, inverted (white lines on black), at the image's size.
pub fn line_map(net: &Generator, input: &ImageBuf) -> Result<ImageBuf, String> {
    let rgb = hwc3(input);
    let (w, h) = (rgb.width, rgb.height);
    check_memory("lineart", w, h)?;
    let run = || -> candle_core::Result<Vec<f32>> {
        let y = net.forward(&rgb_tensor(&rgb, |v| v as f32 / 255.0)?)?;
        top_left(&y, w, h)
    };
    let line = run().map_err(|e| e.to_string())?;
    let data = line
        .into_iter()
        .map(|l| 255 - (l * 255.0).clamp(0.0, 255.0) as u8)
        .collect();
    Ok(grey_map(w, h, data))
}

static CACHE: OnceLock<Cache<Generator>> = OnceLock::new();

/// `lineart_realistic` (`coarse: false`) or `lineart_coarse`.
pub struct Lineart {
    pub coarse: bool,
}

impl Lineart {
    fn files(&self) -> &'static [&'static str] {
        if self.coarse {
            &COARSE_WEIGHT_FILES
        } else {
            &WEIGHT_FILES
        }
    }
}

impl Preprocessor for Lineart {
    fn name(&self) -> &str {
        if self.coarse {
            "lineart_coarse"
        } else {
            "lineart_realistic"
        }
    }
    fn description(&self) -> &str {
        if self.coarse {
            "coarse line art, white on black (controlnet_aux LineartDetector coarse, sk_model2.pth)"
        } else {
            "realistic line art, white on black (controlnet_aux LineartDetector, sk_model.pth)"
        }
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![model_param(self.files())]
    }
    fn cache_salt(&self, params: &Params) -> Result<String, PluginError> {
        crate::weights::weights_salt(self.name(), params, self.files())
    }
    fn process(&self, input: &ImageBuf, params: &Params) -> Result<ImageBuf, PluginError> {
        let name = self.name();
        let path = crate::weights::find_weights(name, params, self.files())?;
        let net =
            cached(&CACHE, &path, Generator::load).map_err(|e| PluginError::failed(name, e))?;
        line_map(&net, input).map_err(|e| PluginError::failed(name, e))
    }
}

register_preprocessor!(Lineart { coarse: false });
register_preprocessor!(Lineart { coarse: true });
