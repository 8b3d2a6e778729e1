//! `lineart_anime`: controlnet_aux 0.0.10 `LineartAnimeDetector` (a pix2pix U-Net,
//! `UnetGenerator(3, 1, 8, 64)` with instance norm, `netG.pth`), as sd-webui-controlnet's
//! `lineart_anime` module runs it: the image resized (INTER_CUBIC) to multiples of 256,
//! `x / 127.5 - 1` in, `tanh * 127.5 + 127.5` out, resized back (float INTER_CUBIC), clipped
//! to 8 bits and inverted to white lines on black.
//!
//! Keys: the outermost block `model.model.{0,3}` (down 4x4 stride 2; up transposed), each
//! inner block under `.1.model` then `.3.model`...: down `.1`, up `.5`, the innermost's up
//! `.3`. Inner blocks open with LeakyReLU(0.2) and concatenate their input with their
//! output; that ReLU is in place in the reference, so what is concatenated is the
//! LeakyReLU'd input. Widths and depth are read from the weights.

use std::sync::OnceLock;

use candle_core::Tensor;
use sd_plugins_api::{
    hwc3, register_preprocessor, ImageBuf, ParamSpec, Params, PluginError, Preprocessor,
};

use super::{
    cached, check_memory, grey_map, instance_norm, model_param, rgb_tensor, Cache, Tensors,
};
use crate::conv::{Conv2d, ConvTranspose2d};
use crate::cvresize::{self, Interp};
use crate::cvresize_f32::resize_f32;

const NAME: &str = "lineart_anime";
/// The weight files looked for in the annotator folder.
pub const WEIGHT_FILES: [&str; 2] = ["netG.pth", "netG.safetensors"];

/// Deepest U-Net read (the shipped one has 8 levels).
const MAX_DEPTH: usize = 12;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Outermost,
    Middle,
    Innermost,
}

struct Block {
    level: Level,
    down: Conv2d,
    sub: Option<Box<Block>>,
    up: ConvTranspose2d,
}

impl Block {
    /// The block at `prefix` (a `UnetSkipConnectionBlock`'s `model` Sequential) taking
    /// `inputs` channels; `depth` counts the levels above it.
    fn load(t: &Tensors, prefix: &str, inputs: usize, depth: usize) -> Result<Self, String> {
        if depth >= MAX_DEPTH {
            return Err(t.error(format!("more than {MAX_DEPTH} U-Net levels")));
        }
        let outermost = depth == 0;
        let (down_key, sub_key) = if outermost {
            (format!("{prefix}.0"), format!("{prefix}.1.model"))
        } else {
            (format!("{prefix}.1"), format!("{prefix}.3.model"))
        };
        let (down, inner) = t.conv2d(&down_key, inputs, 4, 2, 1)?;
        let innermost = !outermost && t.has(&format!("{prefix}.3.weight"));
        let (level, sub, up_key, up_inputs) = if innermost {
            (Level::Innermost, None, format!("{prefix}.3"), inner)
        } else {
            let sub = Block::load(t, &sub_key, inner, depth + 1)?;
            let up_key = if outermost {
                format!("{prefix}.3")
            } else {
                format!("{prefix}.5")
            };
            let level = if outermost {
                Level::Outermost
            } else {
                Level::Middle
            };
            (level, Some(Box::new(sub)), up_key, 2 * inner)
        };
        let up = t.conv_transpose2d(&up_key, up_inputs, 4, 2, 1, 0)?;
        let want = if outermost { 1 } else { inputs };
        if up.outputs() != want {
            return Err(t.error(format!(
                "`{up_key}` gives {} channels, expected {want}",
                up.outputs()
            )));
        }
        Ok(Self {
            level,
            down,
            sub,
            up,
        })
    }

    fn levels(&self) -> usize {
        1 + self.sub.as_ref().map_or(0, |s| s.levels())
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.level == Level::Outermost {
            let y = self.down.forward(x)?;
            let y = self
                .sub
                .as_ref()
                .expect("outermost has a sub-block")
                .forward(&y)?;
            return self.up.forward(&y.relu()?)?.tanh();
        }
        let x = candle_nn::ops::leaky_relu(x, 0.2)?;
        let mut y = self.down.forward(&x)?;
        if let Some(sub) = &self.sub {
            y = sub.forward(&instance_norm(&y, false)?)?;
        }
        let y = instance_norm(&self.up.forward(&y.relu()?)?, false)?;
        Tensor::cat(&[&x, &y], 1)
    }
}

/// The anime line U-Net.
pub struct UnetGenerator {
    root: Block,
}

impl UnetGenerator {
    /// Build from a file's tensors (keys with or without `module.`), checking every shape.
    pub fn new(t: &Tensors) -> Result<Self, String> {
        Ok(Self {
            root: Block::load(t, "model.model", 3, 0)?,
        })
    }

    /// Load `netG.pth` (read without running pickle code) or a safetensors file.
    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        Self::new(&Tensors::open(path, "lineart_anime (netG)")?)
    }

    /// What the input's sides must be multiples of: 2 to the number of levels (256).
    pub fn multiple(&self) -> usize {
        1 << self.root.levels()
    }

    /// `[1, 3, h, w]` (RGB / 127.5 - 1, sides multiples of [`Self::multiple`]) ->
    /// `[1, 1, h, w]` in (-1, 1): dark lines on white.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let m = self.multiple();
        if !h.is_multiple_of(m) || !w.is_multiple_of(m) {
            candle_core::bail!("network input {w}x{h}: sides must be multiples of {m}");
        }
        self.root.forward(x)
    }
}

/// What `lineart_anime` makes of an image with `net`, at the image's size.
pub fn line_map(net: &UnetGenerator, input: &ImageBuf) -> Result<ImageBuf, String> {
    let rgb = hwc3(input);
    let (w, h) = (rgb.width, rgb.height);
    let m = net.multiple();
    let (wn, hn) = (w.div_ceil(m) * m, h.div_ceil(m) * m);
    check_memory(NAME, wn, hn)?;
    let big = cvresize::resize(&rgb, wn, hn, Interp::Cubic);
    let run = || -> candle_core::Result<Vec<f32>> {
        let y = net.forward(&rgb_tensor(&big, |v| v as f32 / 127.5 - 1.0)?)?;
        y.flatten_all()?.to_vec1::<f32>()
    };
    let line: Vec<f32> = run()
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|v| v * 127.5 + 127.5)
        .collect();
    let line = resize_f32(&line, wn, hn, 1, w, h, Interp::Cubic);
    let data = line
        .into_iter()
        .map(|l| 255 - l.clamp(0.0, 255.0) as u8)
        .collect();
    Ok(grey_map(w, h, data))
}

static CACHE: OnceLock<Cache<UnetGenerator>> = OnceLock::new();

/// `lineart_anime`.
pub struct LineartAnime;

impl Preprocessor for LineartAnime {
    fn name(&self) -> &str {
        NAME
    }
    fn description(&self) -> &str {
        "anime line art, white on black (controlnet_aux LineartAnimeDetector, netG.pth)"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![model_param(&WEIGHT_FILES)]
    }
    fn cache_salt(&self, params: &Params) -> Result<String, PluginError> {
        crate::weights::weights_salt(NAME, params, &WEIGHT_FILES)
    }
    fn process(&self, input: &ImageBuf, params: &Params) -> Result<ImageBuf, PluginError> {
        let path = crate::weights::find_weights(NAME, params, &WEIGHT_FILES)?;
        let net =
            cached(&CACHE, &path, UnetGenerator::load).map_err(|e| PluginError::failed(NAME, e))?;
        line_map(&net, input).map_err(|e| PluginError::failed(NAME, e))
    }
}

register_preprocessor!(LineartAnime);
