//! `depth_anything_v2`: Depth Anything V2 (a DINOv2 ViT backbone with a DPT head) in candle,
//! loading the official checkpoints (`depth_anything_v2_vit{s,b,l}.pth` from
//! github.com/DepthAnything/Depth-Anything-V2, or the same keys in `.safetensors`):
//! `pretrained.{cls_token, pos_embed, patch_embed.proj, blocks.N.{norm1, attn.qkv, attn.proj,
//! ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}, norm}` and `depth_head.{projects.N,
//! resize_layers.{0,1,3}, scratch.layerN_rn, scratch.refinenetN.{out_conv, resConfUnit1,
//! resConfUnit2}, scratch.output_conv1, scratch.output_conv2.{0,2}}` (names checked against
//! transformers' `convert_depth_anything_to_hf.py`).
//!
//! The architecture comes from the shapes: embed dim, depth, MLP width, patch size, the head's
//! features and out channels; heads = embed dim / 64. Blocks feeding the head: [2, 5, 8, 11] for
//! 12 blocks, [4, 11, 17, 23] for 24, [9, 19, 29, 39] for 40 (the official table), and for any
//! other depth `(k + 1) * depth / 4 - 1` for k = 0..3 (evenly spaced, ending at the last block;
//! it gives the official lists for 12 and 40).
//!
//! Position embeddings are interpolated as the DINOv2 vendored by Depth-Anything-V2 does it:
//! bicubic (A = -0.75, align_corners=False) with `scale_factor = (grid + 0.1) / sqrt(N)`, so
//! the source position of output index `d` is `(d + 0.5) * sqrt(N) / (grid + 0.1) - 0.5`, and
//! no interpolation at all when the token count matches and the input is square. transformers'
//! `Dinov2` instead interpolates to `size=grid` (`(d + 0.5) * sqrt(N) / grid - 0.5`), which
//! gives different depth maps for the same weights (fixtures: up to 2.1 on a range of 95).
//!
//! The preprocessor follows the official `infer_image` and `run.py --grayscale`: RGB / 255,
//! resize keeping the aspect ratio so both sides are at least `input_size`, rounded to
//! multiples of 14 (cv2 INTER_CUBIC on floats), ImageNet mean/std, the network (relu'd depth),
//! bilinear (align_corners=True) back to the input size, min-max to 0..255 (truncated), so near
//! is white. (sd-webui-controlnet feeds BGR and upsamples with align_corners=False; this is the
//! official behaviour.)

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{
    conv_transpose2d, layer_norm, linear, ConvTranspose2d, ConvTranspose2dConfig, LayerNorm,
    LayerNormConfig, Linear, VarBuilder,
};
use sd_pipeline::cpu::activation::gelu_erf as gelu;
use sd_plugins_api::{
    hwc3, register_preprocessor, ImageBuf, ParamSpec, Params, PluginError, Preprocessor,
};
use sd_weights::Store;

use crate::conv::{Conv2d as FastConv, Geometry};
use crate::cvresize::cubic_coeffs;
use crate::cvresize_f32::{resize_f32, Interp};

const NAME: &str = "depth_anything_v2";
/// Weight files looked for in the annotator folder, in this order.
pub const WEIGHT_FILES: &[&str] = &[
    "depth_anything_v2_vits.pth",
    "depth_anything_v2_vits.safetensors",
    "depth_anything_v2_vitb.pth",
    "depth_anything_v2_vitb.safetensors",
    "depth_anything_v2_vitl.pth",
    "depth_anything_v2_vitl.safetensors",
];
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The architecture read off a checkpoint's shapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    pub mlp_hidden: usize,
    pub patch_size: usize,
    /// Tokens of the stored position embedding, without the class token.
    pub num_positions: usize,
    pub layer_scale: bool,
    /// The head's fusion width (`depth_head.scratch.layer1_rn` outputs).
    pub features: usize,
    pub out_channels: [usize; 4],
    /// `output_conv2.0` outputs (32 in the official models).
    pub head_hidden: usize,
    /// Blocks whose outputs feed the head.
    pub layers: [usize; 4],
}

/// The blocks feeding the head for a backbone of `depth` blocks (see the module docs).
pub fn intermediate_layers(depth: usize) -> [usize; 4] {
    match depth {
        12 => [2, 5, 8, 11],
        24 => [4, 11, 17, 23],
        40 => [9, 19, 29, 39],
        d => [0, 1, 2, 3].map(|k| ((k + 1) * d / 4).max(1) - 1),
    }
}

impl Config {
    /// Read the architecture from the tensor shapes of an official checkpoint.
    pub fn from_shapes(shapes: &HashMap<String, Vec<usize>>) -> std::result::Result<Self, String> {
        let get = |name: &str| -> std::result::Result<&Vec<usize>, String> {
            shapes.get(name).ok_or_else(|| {
                format!("not a Depth Anything V2 checkpoint: no tensor {name} (official key names expected)")
            })
        };
        let pos = get("pretrained.pos_embed")?;
        let (num_positions, embed_dim) = match pos.as_slice() {
            [1, n, d] if *n > 1 => (n - 1, *d),
            s => return Err(format!("pretrained.pos_embed has shape {s:?}")),
        };
        let patch = get("pretrained.patch_embed.proj.weight")?;
        let patch_size = patch[2];
        let depth = (0..)
            .take_while(|i| shapes.contains_key(&format!("pretrained.blocks.{i}.norm1.weight")))
            .count();
        if depth == 0 {
            return Err("no pretrained.blocks.N (a chunked or unknown backbone layout)".into());
        }
        if shapes.contains_key("pretrained.blocks.0.mlp.w12.weight") {
            return Err("SwiGLU backbones (ViT-g) are not supported".into());
        }
        let mlp_hidden = get("pretrained.blocks.0.mlp.fc1.weight")?[0];
        if embed_dim % 64 != 0 {
            return Err(format!("embed dim {embed_dim} is not a multiple of 64"));
        }
        let mut out_channels = [0; 4];
        for (i, o) in out_channels.iter_mut().enumerate() {
            *o = get(&format!("depth_head.projects.{i}.weight"))?[0];
        }
        let features = get("depth_head.scratch.layer1_rn.weight")?[0];
        let head_hidden = get("depth_head.scratch.output_conv2.0.weight")?[0];
        Ok(Self {
            embed_dim,
            depth,
            num_heads: embed_dim / 64,
            mlp_hidden,
            patch_size,
            num_positions,
            layer_scale: shapes.contains_key("pretrained.blocks.0.ls1.gamma"),
            features,
            out_channels,
            head_hidden,
            layers: intermediate_layers(depth),
        })
    }
}

/// A pre-norm ViT block (timm / DINOv2 names: `norm1`, `attn.qkv`, `attn.proj`, `ls1.gamma`,
/// `norm2`, `mlp.fc1`, `mlp.fc2`, `ls2.gamma`; LayerNorm eps 1e-6, exact GELU); also MiDaS's.
pub(crate) struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    ls1: Option<Tensor>,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    ls2: Option<Tensor>,
    num_heads: usize,
}

impl Block {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        Self::build(
            cfg.embed_dim,
            cfg.num_heads,
            cfg.mlp_hidden,
            cfg.layer_scale,
            vb,
        )
    }

    /// A block of width `d` with `num_heads` heads, an MLP of `mlp_hidden`, and layer scale
    /// (`ls1.gamma`, `ls2.gamma`) when `layer_scale`.
    pub(crate) fn build(
        d: usize,
        num_heads: usize,
        mlp_hidden: usize,
        layer_scale: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let ln = LayerNormConfig {
            eps: 1e-6,
            ..Default::default()
        };
        let ls = |n: &str| -> Result<Option<Tensor>> {
            layer_scale
                .then(|| vb.get(d, &format!("{n}.gamma")))
                .transpose()
        };
        Ok(Self {
            norm1: layer_norm(d, ln, vb.pp("norm1"))?,
            qkv: linear(d, 3 * d, vb.pp("attn.qkv"))?,
            proj: linear(d, d, vb.pp("attn.proj"))?,
            ls1: ls("ls1")?,
            norm2: layer_norm(d, ln, vb.pp("norm2"))?,
            fc1: linear(d, mlp_hidden, vb.pp("mlp.fc1"))?,
            fc2: linear(mlp_hidden, d, vb.pp("mlp.fc2"))?,
            ls2: ls("ls2")?,
            num_heads,
        })
    }

    fn attention(&self, x: &Tensor) -> Result<Tensor> {
        let c = x.dim(2)?;
        let qkv = self.qkv.forward(x)?;
        // [B, N, heads * D] each, as the UNet's fused CPU attention takes them
        let (q, k, v) = (
            qkv.narrow(2, 0, c)?,
            qkv.narrow(2, c, c)?,
            qkv.narrow(2, 2 * c, c)?,
        );
        let out = sd_pipeline::cpu::fused_attention::fused_attention(&q, &k, &v, self.num_heads)?;
        self.proj.forward(&out)
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let scale = |t: Tensor, g: &Option<Tensor>| match g {
            Some(g) => t.broadcast_mul(g),
            None => Ok(t),
        };
        let a = scale(self.attention(&self.norm1.forward(x)?)?, &self.ls1)?;
        let x = (x + a)?;
        let h = gelu(&self.fc1.forward(&self.norm2.forward(&x)?)?)?;
        let m = scale(self.fc2.forward(&h)?, &self.ls2)?;
        x + m
    }
}

/// A `k` x `k` convolution `{vb}.weight` / `{vb}.bias` of `f` channels with padding `k / 2`,
/// computed by [`crate::conv::Conv2d`] (candle's CPU conv2d unrolls the whole image at once).
fn conv_same(f: usize, k: usize, vb: VarBuilder) -> Result<FastConv> {
    let w = vb.get((f, f, k, k), "weight")?;
    let b = vb.get(f, "bias")?;
    FastConv::new(&w, Some(&b), Geometry::new(1, k / 2))
}

/// DPT's `ResidualConvUnit` (no batch norm): `x + conv2(relu(conv1(relu(x))))`.
pub(crate) struct ResidualConvUnit {
    conv1: FastConv,
    conv2: FastConv,
}

impl ResidualConvUnit {
    fn new(f: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv1: conv_same(f, 3, vb.pp("conv1"))?,
            conv2: conv_same(f, 3, vb.pp("conv2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let out = self.conv1.forward(&x.relu()?)?;
        let out = self.conv2.forward(&out.relu()?)?;
        out + x
    }
}

/// DPT's `FeatureFusionBlock` (`bn=False, expand=False, align_corners=True`: the same in
/// Depth Anything V2 and MiDaS): `resConfUnit1`, `resConfUnit2`, `out_conv` (1x1).
pub(crate) struct FusionBlock {
    res1: ResidualConvUnit,
    res2: ResidualConvUnit,
    out_conv: FastConv,
}

impl FusionBlock {
    pub(crate) fn new(f: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            res1: ResidualConvUnit::new(f, vb.pp("resConfUnit1"))?,
            res2: ResidualConvUnit::new(f, vb.pp("resConfUnit2"))?,
            out_conv: conv_same(f, 1, vb.pp("out_conv"))?,
        })
    }

    /// `FeatureFusionBlock.forward(x, [skip], size)`; no size = twice the input size.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        skip: Option<&Tensor>,
        size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut out = x.clone();
        if let Some(s) = skip {
            out = (out + self.res1.forward(s)?)?;
        }
        let out = self.res2.forward(&out)?;
        let (_, _, h, w) = out.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        let out = out.upsample_bilinear2d(th, tw, true)?;
        self.out_conv.forward(&out)
    }
}

/// `nn.Conv2d` `{vb}.weight` (and `.bias` when `bias`) on [`crate::conv::Conv2d`] (candle's CPU
/// conv2d unrolls the whole image at once).
fn fast_conv(
    inputs: usize,
    outputs: usize,
    k: usize,
    (stride, padding): (usize, usize),
    bias: bool,
    vb: VarBuilder,
) -> Result<FastConv> {
    let w = vb.get((outputs, inputs, k, k), "weight")?;
    let b = if bias {
        Some(vb.get(outputs, "bias")?)
    } else {
        None
    };
    FastConv::new(&w, b.as_ref(), Geometry::new(stride, padding))
}

enum Resize {
    Up(ConvTranspose2d),
    Same,
    Down(FastConv),
}

/// The DPT head of Depth Anything V2 (`depth_head.*`).
struct DptHead {
    projects: Vec<FastConv>,
    resize: Vec<Resize>,
    layer_rn: Vec<FastConv>,
    refine: Vec<FusionBlock>,
    output_conv1: FastConv,
    output_conv2_0: FastConv,
    output_conv2_2: FastConv,
}

impl DptHead {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let oc = cfg.out_channels;
        let f = cfg.features;
        let up = |i: usize, k: usize| -> Result<Resize> {
            let c = ConvTranspose2dConfig {
                stride: k,
                ..Default::default()
            };
            Ok(Resize::Up(conv_transpose2d(
                oc[i],
                oc[i],
                k,
                c,
                vb.pp(format!("resize_layers.{i}")),
            )?))
        };
        let down = fast_conv(oc[3], oc[3], 3, (2, 1), true, vb.pp("resize_layers.3"))?;
        Ok(Self {
            projects: (0..4)
                .map(|i| {
                    fast_conv(
                        cfg.embed_dim,
                        oc[i],
                        1,
                        (1, 0),
                        true,
                        vb.pp(format!("projects.{i}")),
                    )
                })
                .collect::<Result<_>>()?,
            resize: vec![up(0, 4)?, up(1, 2)?, Resize::Same, Resize::Down(down)],
            layer_rn: (0..4)
                .map(|i| {
                    fast_conv(
                        oc[i],
                        f,
                        3,
                        (1, 1),
                        false,
                        vb.pp(format!("scratch.layer{}_rn", i + 1)),
                    )
                })
                .collect::<Result<_>>()?,
            refine: (1..=4)
                .map(|i| FusionBlock::new(f, vb.pp(format!("scratch.refinenet{i}"))))
                .collect::<Result<_>>()?,
            output_conv1: fast_conv(f, f / 2, 3, (1, 1), true, vb.pp("scratch.output_conv1"))?,
            output_conv2_0: fast_conv(
                f / 2,
                cfg.head_hidden,
                3,
                (1, 1),
                true,
                vb.pp("scratch.output_conv2.0"),
            )?,
            output_conv2_2: fast_conv(
                cfg.head_hidden,
                1,
                1,
                (1, 0),
                true,
                vb.pp("scratch.output_conv2.2"),
            )?,
        })
    }

    /// `features`: the four normalised patch-token maps `(B, N, C)`; returns `(B, 1, H, W)`.
    fn forward(&self, features: &[Tensor], gh: usize, gw: usize, patch: usize) -> Result<Tensor> {
        let mut rn = Vec::with_capacity(4);
        for (i, x) in features.iter().enumerate() {
            let (b, _, c) = x.dims3()?;
            let x = x.permute((0, 2, 1))?.reshape((b, c, gh, gw))?;
            let x = self.projects[i].forward(&x)?;
            let x = match &self.resize[i] {
                Resize::Up(t) => t.forward(&x)?,
                Resize::Same => x,
                Resize::Down(d) => d.forward(&x)?,
            };
            rn.push(self.layer_rn[i].forward(&x)?);
        }
        let hw = |t: &Tensor| -> Result<(usize, usize)> {
            let (_, _, h, w) = t.dims4()?;
            Ok((h, w))
        };
        let p4 = self.refine[3].forward(&rn[3], None, Some(hw(&rn[2])?))?;
        let p3 = self.refine[2].forward(&p4, Some(&rn[2]), Some(hw(&rn[1])?))?;
        let p2 = self.refine[1].forward(&p3, Some(&rn[1]), Some(hw(&rn[0])?))?;
        let p1 = self.refine[0].forward(&p2, Some(&rn[0]), None)?;
        let out = self.output_conv1.forward(&p1)?;
        let out = out.upsample_bilinear2d(gh * patch, gw * patch, true)?;
        let out = self.output_conv2_0.forward(&out)?.relu()?;
        self.output_conv2_2.forward(&out)?.relu()
    }
}

/// A Depth Anything V2 network.
pub struct DepthAnythingV2 {
    pub config: Config,
    patch_embed: FastConv,
    cls_token: Tensor,
    /// `(1 + N, D)`, as stored (f32).
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    head: DptHead,
}

impl DepthAnythingV2 {
    /// Load an official checkpoint (`.pth` or `.safetensors`), computing in f32 on the CPU.
    pub fn load(path: &Path) -> std::result::Result<Self, String> {
        let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
        let store = Store::open(path).map_err(|e| err(&e))?;
        let shapes: HashMap<String, Vec<usize>> = store.shapes().into_iter().collect();
        let config = Config::from_shapes(&shapes).map_err(|e| err(&e))?;
        let mut tensors = HashMap::new();
        for name in shapes.keys() {
            if name.starts_with("pretrained.") || name.starts_with("depth_head.") {
                let t = store.get(name).map_err(|e| err(&e))?;
                tensors.insert(name.clone(), t);
            }
        }
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        Self::new(config, vb).map_err(|e| err(&e))
    }

    /// Build from a var builder rooted at the checkpoint's top level.
    pub fn new(config: Config, vb: VarBuilder) -> Result<Self> {
        let d = config.embed_dim;
        let p = config.patch_size;
        let pre = vb.pp("pretrained");
        let patch_embed = fast_conv(3, d, p, (p, 0), true, pre.pp("patch_embed.proj"))?;
        let cls_token = pre.get((1, 1, d), "cls_token")?;
        let pos_embed = pre
            .get((1, config.num_positions + 1, d), "pos_embed")?
            .squeeze(0)?;
        let blocks = (0..config.depth)
            .map(|i| Block::new(&config, pre.pp(format!("blocks.{i}"))))
            .collect::<Result<_>>()?;
        let norm = layer_norm(
            d,
            LayerNormConfig {
                eps: 1e-6,
                ..Default::default()
            },
            pre.pp("norm"),
        )?;
        let head = DptHead::new(&config, vb.pp("depth_head"))?;
        Ok(Self {
            config,
            patch_embed,
            cls_token,
            pos_embed,
            blocks,
            norm,
            head,
        })
    }

    /// The position embeddings for an `h x w` pixel input (official DINOv2 interpolation).
    fn pos_embed_for(&self, h: usize, w: usize) -> Result<Tensor> {
        let p = self.config.patch_size;
        let (gh, gw) = (h / p, w / p);
        let n = self.config.num_positions;
        if gh * gw == n && h == w {
            return Ok(self.pos_embed.clone());
        }
        let d = self.config.embed_dim;
        let m = (n as f64).sqrt();
        let mi = m as usize;
        if mi * mi != n {
            candle_core::bail!("position embedding of {n} tokens is not a square grid");
        }
        let cls = self.pos_embed.narrow(0, 0, 1)?;
        let grid = self
            .pos_embed
            .narrow(0, 1, n)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        // torch: output size floor(M * scale), source scale 1 / scale_factor
        let (sy, sx) = ((gh as f64 + 0.1) / m, (gw as f64 + 0.1) / m);
        let (oh, ow) = ((m * sy).floor() as usize, (m * sx).floor() as usize);
        let out = bicubic_hwc(&grid, mi, mi, d, oh, ow, 1.0 / sy, 1.0 / sx);
        let patch = Tensor::from_vec(out, (oh * ow, d), &Device::Cpu)?;
        Tensor::cat(&[cls, patch], 0)
    }

    /// Relu'd relative depth `(B, H, W)` of normalised pixels `(B, 3, H, W)` (H, W multiples of
    /// the patch size; the official `DepthAnythingV2.forward`).
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = pixels.dims4()?;
        let p = self.config.patch_size;
        let (gh, gw) = (h / p, w / p);
        let x = self
            .patch_embed
            .forward(pixels)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let cls = self.cls_token.broadcast_as((b, 1, self.config.embed_dim))?;
        let x = Tensor::cat(&[&cls, &x], 1)?;
        let mut x = x.broadcast_add(&self.pos_embed_for(h, w)?.unsqueeze(0)?)?;
        let mut features = Vec::with_capacity(4);
        for (i, blk) in self.blocks.iter().enumerate() {
            x = blk.forward(&x)?;
            if self.config.layers.contains(&i) {
                let n = x.dim(1)?;
                features.push(self.norm.forward(&x)?.narrow(1, 1, n - 1)?);
            }
        }
        let depth = self.head.forward(&features, gh, gw, p)?.relu()?;
        depth.squeeze(1)
    }

    /// Depth at the photo's size: the official `infer_image` (see the module docs).
    pub fn infer(&self, rgb: &ImageBuf, input_size: usize) -> Result<Vec<f32>> {
        let rgb = hwc3(rgb);
        let (w, h) = (rgb.width, rgb.height);
        let (nw, nh) = network_size(w, h, input_size, self.config.patch_size);
        let src: Vec<f32> = rgb.data.iter().map(|&v| v as f32 / 255.0).collect();
        let img = resize_f32(&src, w, h, 3, nw, nh, Interp::Cubic);
        let mut chw = vec![0f32; 3 * nw * nh];
        for (i, px) in img.chunks_exact(3).enumerate() {
            for c in 0..3 {
                chw[c * nw * nh + i] = (px[c] - MEAN[c]) / STD[c];
            }
        }
        let x = Tensor::from_vec(chw, (1, 3, nh, nw), &Device::Cpu)?;
        let depth = self.forward(&x)?.unsqueeze(1)?;
        depth
            .upsample_bilinear2d(h, w, true)?
            .flatten_all()?
            .to_vec1::<f32>()
    }
}

/// The network input size `(width, height)` for a `w x h` photo: the official
/// `Resize(input_size, input_size, keep_aspect_ratio, ensure_multiple_of=patch,
/// resize_method='lower_bound')`.
pub fn network_size(w: usize, h: usize, input_size: usize, patch: usize) -> (usize, usize) {
    let mut sh = input_size as f64 / h as f64;
    let mut sw = input_size as f64 / w as f64;
    if sw > sh {
        sh = sw;
    } else {
        sw = sh;
    }
    let m = patch as f64;
    let constrain = |x: f64| -> usize {
        let y = (x / m).round_ties_even() * m;
        if y < input_size as f64 {
            ((x / m).ceil() * m) as usize
        } else {
            y as usize
        }
    };
    (constrain(sw * w as f64), constrain(sh * h as f64))
}

/// torch's `F.interpolate(mode="bicubic", align_corners=False)` of an `h x w x c` (HWC)
/// grid to `oh x ow`, with source steps `step_y`, `step_x` (`1 / scale_factor` when a scale
/// factor is given, `in / out` for a size): source position `(d + 0.5) * step - 0.5`, indices
/// clamped to the grid, A = -0.75 (the coefficients of [`crate::cvresize`]; torch's last
/// coefficient is computed directly rather than as 1 minus the others, a 1e-7 difference).
#[allow(clippy::too_many_arguments)]
pub fn bicubic_hwc(
    src: &[f32],
    h: usize,
    w: usize,
    c: usize,
    oh: usize,
    ow: usize,
    step_y: f64,
    step_x: f64,
) -> Vec<f32> {
    let taps = |n: usize, o: usize, step: f64| -> Vec<[(usize, f32); 4]> {
        let step = step as f32;
        (0..o)
            .map(|d| {
                let real = step * (d as f32 + 0.5) - 0.5;
                let i0 = (real.floor() as isize).min(n as isize - 1);
                let t = (real - i0 as f32).clamp(0.0, 1.0);
                let co = cubic_coeffs(t);
                std::array::from_fn(|k| {
                    (
                        (i0 - 1 + k as isize).clamp(0, n as isize - 1) as usize,
                        co[k],
                    )
                })
            })
            .collect()
    };
    let (ty, tx) = (taps(h, oh, step_y), taps(w, ow, step_x));
    let mut out = vec![0f32; oh * ow * c];
    for (oy, ys) in ty.iter().enumerate() {
        for (ox, xs) in tx.iter().enumerate() {
            let o = &mut out[(oy * ow + ox) * c..(oy * ow + ox + 1) * c];
            for &(sy, wy) in ys {
                for &(sx, wx) in xs {
                    let s = &src[(sy * w + sx) * c..(sy * w + sx + 1) * c];
                    let wgt = wy * wx;
                    for (a, b) in o.iter_mut().zip(s) {
                        *a += wgt * b;
                    }
                }
            }
        }
    }
    out
}

/// run.py's grey output: `(d - min) / (max - min) * 255` truncated to u8 (all 0 when flat).
pub fn depth_to_grey(depth: &[f32]) -> Vec<u8> {
    let min = depth.iter().copied().fold(f32::INFINITY, f32::min);
    let max = depth.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let range = max - min;
    depth
        .iter()
        .map(|&d| {
            if range > 0.0 {
                ((d - min) / range * 255.0) as u8
            } else {
                0
            }
        })
        .collect()
}

type Cache = Mutex<HashMap<PathBuf, Arc<DepthAnythingV2>>>;

/// The model of `path`, loaded once per file per process.
pub fn cached_model(path: &Path) -> std::result::Result<Arc<DepthAnythingV2>, String> {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let key = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let cache = CACHE.get_or_init(Default::default);
    if let Some(m) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(m.clone());
    }
    // loaded outside the lock; a concurrent first load of the same file loads it twice
    let model = Arc::new(DepthAnythingV2::load(path)?);
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, model.clone());
    Ok(model)
}

/// The `depth_anything_v2` preprocessor.
pub struct DepthAnythingV2Preprocessor;

impl Preprocessor for DepthAnythingV2Preprocessor {
    fn name(&self) -> &str {
        NAME
    }
    fn description(&self) -> &str {
        "Depth Anything V2 relative depth (near = white), official checkpoints"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::string(
                "model",
                "",
                "weights file (official .pth or .safetensors); empty = depth_anything_v2_vit{s,b,l} in the annotator folder",
            ),
            ParamSpec::int(
                "input_size",
                518,
                14,
                4088,
                "network input's shorter side (a multiple of 14; the official default is 518)",
            ),
        ]
    }
    fn cache_salt(&self, params: &Params) -> std::result::Result<String, PluginError> {
        crate::weights::weights_salt(NAME, params, WEIGHT_FILES)
    }
    fn process(
        &self,
        input: &ImageBuf,
        params: &Params,
    ) -> std::result::Result<ImageBuf, PluginError> {
        let input_size = params.int("input_size").unwrap_or(518);
        if input_size <= 0 || input_size % 14 != 0 {
            return Err(PluginError::failed(
                NAME,
                format!("input_size {input_size} is not a positive multiple of 14"),
            ));
        }
        let path = crate::weights::find_weights(NAME, params, WEIGHT_FILES)?;
        let model = cached_model(&path).map_err(|e| PluginError::failed(NAME, e))?;
        let depth = model
            .infer(input, input_size as usize)
            .map_err(|e| PluginError::failed(NAME, e.to_string()))?;
        let data = depth_to_grey(&depth)
            .into_iter()
            .flat_map(|v| [v, v, v])
            .collect();
        Ok(ImageBuf {
            width: input.width,
            height: input.height,
            channels: 3,
            data,
        })
    }
}

register_preprocessor!(DepthAnythingV2Preprocessor);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_and_sizes() {
        assert_eq!(intermediate_layers(12), [2, 5, 8, 11]);
        assert_eq!(intermediate_layers(24), [4, 11, 17, 23]);
        assert_eq!(intermediate_layers(40), [9, 19, 29, 39]);
        assert_eq!(intermediate_layers(4), [0, 1, 2, 3]);
        assert_eq!(intermediate_layers(8), [1, 3, 5, 7]);
        // official Resize: lower bound 518, multiples of 14 (np.round half to even)
        assert_eq!(network_size(640, 480, 518, 14), (686, 518));
        assert_eq!(network_size(126, 84, 70, 14), (112, 70));
        assert_eq!(network_size(126, 84, 56, 14), (84, 56));
        assert_eq!(network_size(300, 300, 518, 14), (518, 518));
    }

    #[test]
    fn bicubic_identity_and_constant() {
        let src: Vec<f32> = (0..4 * 3 * 2).map(|v| v as f32).collect();
        let same = bicubic_hwc(&src, 4, 3, 2, 4, 3, 1.0, 1.0);
        for (a, b) in same.iter().zip(&src) {
            assert!((a - b).abs() < 1e-5);
        }
        let flat = bicubic_hwc(&[2.0; 16], 4, 4, 1, 7, 5, 4.0 / 7.1, 4.0 / 5.1);
        assert!(flat.iter().all(|v| (v - 2.0).abs() < 1e-5));
    }

    #[test]
    fn grey_is_min_max_truncated() {
        assert_eq!(depth_to_grey(&[1.0, 2.0, 3.0]), vec![0, 127, 255]);
        assert_eq!(depth_to_grey(&[4.0, 4.0]), vec![0, 0]);
    }

    #[test]
    fn registered() {
        assert!(crate::registry().preprocessor(NAME).is_some());
    }
}
