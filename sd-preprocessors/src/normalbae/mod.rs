//! `normal_bae`: controlnet_aux 0.0.10 `NormalBaeDetector` (Bae et al., "Estimating and
//! Exploiting the Aleatoric Uncertainty in Surface Normal Estimation", the ScanNet model
//! `scannet.pt`), the normal map ControlNet 1.1's `control_v11p_sd15_normalbae` was trained on.
//!
//! The network (`NNET`): an EfficientNet-B5 encoder ([`efficientnet`], geffnet's
//! `tf_efficientnet_b5_ap`) and the BN decoder ([`decoder`]). In eval mode the decoder's
//! uncertainty-guided point sampling (`sample_points`, training only) is not run: its three
//! refinement MLPs run on every pixel of the x2-upsampled maps, so the output is deterministic.
//!
//! Pre-processing: RGB / 255, ImageNet mean/std; post-processing: the full-resolution output's
//! first three channels (the unit normal x, y, z; the fourth is the uncertainty kappa) as
//! `uint8(clip((n + 1) * 0.5, 0, 1) * 255)` (truncated) into R, G, B. The input is brought to
//! the processor resolution by [`crate::detect`] (controlnet_aux's `resize_image`, or with
//! `pad` sd-webui-controlnet's `resize_image_with_pad` whose `normal_bae` module runs the same
//! detector body); the network needs sides that are multiples of 8, which every processor
//! size is: other sizes are edge-padded to the next multiple of 8 and the map cropped back.
//!
//! Weights: `scannet.pt` (`{"model": state_dict}` with `module.` prefixes, read without running
//! pickle code; keys then appear as `model.encoder....`) or a `.safetensors` with the bare
//! `encoder....` / `decoder....` keys.

pub mod decoder;
pub mod efficientnet;
pub mod layers;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{Device, Tensor};
use sd_plugins_api::{
    hwc3, register_preprocessor, ImageBuf, ParamSpec, Params, PluginError, Preprocessor,
};

use crate::lineart::{cached, model_param, Tensors};
pub use layers::{Map, Source};

/// The weight files looked for in the annotator folder.
pub const WEIGHT_FILES: [&str; 2] = ["scannet.pt", "scannet.safetensors"];

/// `transforms.Normalize` of the detector (ImageNet).
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The NNET network: the encoder and the decoder.
pub struct NormalNet {
    pub encoder: efficientnet::EfficientNet,
    pub decoder: decoder::Decoder,
}

impl NormalNet {
    pub fn new(t: &Tensors) -> Result<Self, String> {
        let src = Source::new(t)?;
        Ok(Self {
            encoder: efficientnet::EfficientNet::new(&src)?,
            decoder: decoder::Decoder::new(&src)?,
        })
    }

    /// Load `scannet.pt` or a safetensors file.
    pub fn load(path: &Path) -> Result<Self, String> {
        Self::new(&Tensors::open(path, "NormalBAE (scannet.pt)")?)
    }

    /// `[1, 3, h, w]` (normalised RGB; sides multiples of 8) -> the decoder's outputs
    /// `[out_res8, out_res4, out_res2, out_res1]`, each `[4, ...]` (normal x, y, z, kappa).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<[Map; 4]> {
        let (_, _, h, w) = x.dims4()?;
        if h % 8 != 0 || w % 8 != 0 || h == 0 || w == 0 {
            candle_core::bail!("NormalBAE input {w}x{h}: the sides must be multiples of 8");
        }
        let f = self.encoder.forward(x)?;
        self.decoder.forward(&f)
    }
}

/// Every tensor of the network's state dict (`num_batches_tracked` aside) with its shape.
pub fn parameter_shapes() -> Vec<(String, Vec<usize>)> {
    let mut out = efficientnet::parameter_shapes();
    out.extend(decoder::parameter_shapes());
    out
}

/// The detector's network input for an RGB image: `/ 255`, ImageNet-normalised, `[1, 3, h, w]`.
pub fn network_input(rgb: &ImageBuf) -> candle_core::Result<Tensor> {
    let (w, h) = (rgb.width, rgb.height);
    let n = w * h;
    let mut x = vec![0f32; 3 * n];
    for (i, px) in rgb.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            x[c * n + i] = (px[c] as f32 / 255.0 - MEAN[c]) / STD[c];
        }
    }
    Tensor::from_vec(x, (1, 3, h, w), &Device::Cpu)
}

/// The normal map of the network's last output (`[4, h, w]`): channels 0..3 as
/// `uint8(clip(clip((n + 1) * 0.5, 0, 1) * 255, 0, 255))`, RGB, the top-left `w` x `h`.
pub fn normal_colours(out: &Map, w: usize, h: usize) -> ImageBuf {
    let n = out.pixels();
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let i = y * out.w + x;
            for c in 0..3 {
                let v = ((out.data[c * n + i] + 1.0) * 0.5).clamp(0.0, 1.0);
                data.push((v * 255.0).clamp(0.0, 255.0) as u8);
            }
        }
    }
    ImageBuf {
        width: w,
        height: h,
        channels: 3,
        data,
    }
}

/// An image edge-padded (numpy `mode="edge"`) on the right and bottom to `w` x `h`.
pub(crate) fn pad_edge(img: &ImageBuf, w: usize, h: usize) -> ImageBuf {
    let c = img.channels;
    let mut data = Vec::with_capacity(w * h * c);
    for y in 0..h {
        let sy = y.min(img.height - 1);
        for x in 0..w {
            let sx = x.min(img.width - 1);
            let i = (sy * img.width + sx) * c;
            data.extend_from_slice(&img.data[i..i + c]);
        }
    }
    ImageBuf {
        width: w,
        height: h,
        channels: c,
        data,
    }
}

/// The memory a run needs, checked first: per input pixel the full-size refinement (132
/// input channels of the last MLP, two 128-channel hidden layers) and the half-size decoder
/// maps with their im2col, about 3 KB.
fn check_memory(w: usize, h: usize) -> Result<(), String> {
    let cost = sd_plugins_api::memory::Cost {
        per_pixel: 3072.0,
        fixed: 400 << 20,
        peak: "the NormalBAE decoder's full-size refinement maps".into(),
    };
    sd_plugins_api::memory::check("normal_bae", w, h, 1, 8, &cost)
}

/// What `normal_bae` makes of an image (already at the processor resolution) with `net`.
pub fn normal_map(net: &NormalNet, input: &ImageBuf) -> Result<ImageBuf, String> {
    let rgb = hwc3(input);
    let (w, h) = (rgb.width, rgb.height);
    if w == 0 || h == 0 {
        return Err("empty image".into());
    }
    let (pw, ph) = (w.div_ceil(8) * 8, h.div_ceil(8) * 8);
    check_memory(pw, ph)?;
    let padded = if (pw, ph) == (w, h) {
        rgb
    } else {
        pad_edge(&rgb, pw, ph)
    };
    let run = || -> candle_core::Result<Map> {
        let [_, _, _, out] = net.forward(&network_input(&padded)?)?;
        Ok(out)
    };
    let out = run().map_err(|e| e.to_string())?;
    Ok(normal_colours(&out, w, h))
}

type Cache = Mutex<HashMap<PathBuf, Arc<NormalNet>>>;
static CACHE: OnceLock<Cache> = OnceLock::new();

/// The `normal_bae` preprocessor.
pub struct NormalBae;

impl Preprocessor for NormalBae {
    fn name(&self) -> &str {
        "normal_bae"
    }
    fn description(&self) -> &str {
        "surface normals (ScanNet convention: R left, G up, B facing) from the NormalBAE network \
         (controlnet_aux NormalBaeDetector = sd-webui-controlnet normal_bae, scannet.pt)"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![model_param(&WEIGHT_FILES)]
    }
    fn cache_salt(&self, params: &Params) -> Result<String, PluginError> {
        crate::weights::weights_salt(self.name(), params, &WEIGHT_FILES)
    }
    fn process(&self, input: &ImageBuf, params: &Params) -> Result<ImageBuf, PluginError> {
        let name = self.name();
        let path = crate::weights::find_weights(name, params, &WEIGHT_FILES)?;
        let net =
            cached(&CACHE, &path, NormalNet::load).map_err(|e| PluginError::failed(name, e))?;
        normal_map(&net, input).map_err(|e| PluginError::failed(name, e))
    }
}

register_preprocessor!(NormalBae);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_follow_the_reference_formula() {
        // n = -1 -> 0, 0 -> 127 (127.5 truncated), 1 -> 255, beyond clipped
        let out = Map::new(4, 1, 2, vec![-1.0, 0.0, 1.0, 2.0, -3.0, 0.5, 9.0, 9.0]);
        let img = normal_colours(&out, 2, 1);
        assert_eq!(img.data, [0, 255, 0, 127, 255, 191]);
    }

    #[test]
    fn edge_padding_repeats_the_last_row_and_column() {
        let img = ImageBuf::new(2, 1, 1, vec![3, 7]).unwrap();
        let p = pad_edge(&img, 3, 2);
        assert_eq!(p.data, [3, 7, 7, 3, 7, 7]);
    }

    #[test]
    fn missing_weights_name_the_key() {
        let t = Tensors::from_map(HashMap::new(), "NormalBAE (scannet.pt)");
        let e = NormalNet::new(&t).err().unwrap();
        assert!(e.contains("decoder.conv2.bias"), "{e}");
    }
}
