//! `depth_zoe`: ZoeDepth (`ZoeD_M12_N.pt` from lllyasviel/Annotators) as controlnet_aux 0.0.10's
//! `ZoeDetector` runs it, under sd-webui-controlnet's module name (its network and
//! post-processing followed from controlnet_aux).
//!
//! The network is controlnet_aux's `ZoeDepth.build_from_config(get_config("zoedepth",
//! "infer"))`:
//! - `core` (`MidasCore`): MiDaS v3.1 `DPT_BEiT_L_384` from the bundled midas_repo. Its input
//!   preparation (`PrepForMidas`): a bilinear resize with aligned corners to the size
//!   `Resize(512, 384, keep_aspect_ratio=True, ensure_multiple_of=32,
//!   resize_method="minimal")` picks (scale by whichever of 384 / h, 512 / w is nearer 1, sides
//!   rounded half-to-even to multiples of 32), then `(x - 0.5) / 0.5`. The backbone is timm's
//!   `beit_large_patch16_384` (patch 16, width 1024, 24 blocks of 16 heads, MLP 4096,
//!   LayerNorm eps 1e-6, exact GELU, no absolute position embedding; per block a qkv bias
//!   `cat(q_bias, 0, v_bias)`, layer scales `gamma_1` / `gamma_2` and a relative position bias
//!   table of the 24x24 window, which midas_repo's `_get_rel_pos_bias` resizes bilinearly
//!   (align_corners=False) from 47x47 to `(2 gh - 1) x (2 gw - 1)` for a `gh x gw` token grid,
//!   the three class-token entries kept). The outputs of blocks 5, 11, 17, 23 go through the
//!   DPT reassembly ("project" readout: `Linear(2048, 1024)` of each token joined with the
//!   class token, GELU; 1x1 convs to 256, 512, 1024, 1024; a 4x4 stride-4 and a 2x2 stride-2
//!   transposed conv, a 3x3 stride-2 conv), the `scratch` 3x3 convs to 256, the four fusion
//!   blocks of [`crate::depth_anything`] (with the sizes of the next level, as midas_repo's
//!   `DPT.forward` passes them) and MiDaS's head (3x3 conv to 128, x2 bilinear with aligned
//!   corners, 3x3 conv to 32, ReLU, 1x1 conv, ReLU): the relative depth. Forward hooks keep the
//!   head's 32-channel ReLU output (`out_conv`), `layer4_rn` and the four fusion outputs.
//! - the metric head (bin_centers_type "softplus", 64 bins, embedding 128, attractors
//!   [16, 8, 4, 1] of kind "mean" and type "inv" — the config's alpha 1000 never reaches
//!   `inv_attractor`, whose default 300 applies, gamma 2 — and `AttractorLayerUnnormed` is
//!   built without `memory_efficient`, so the plain mean):
//!   `conv2` (1x1) on `layer4_rn`; `SeedBinRegressorUnnormed` (1x1 conv 256, ReLU, 1x1 conv 64,
//!   Softplus) gives the seed bin centers and `seed_projector` the seed embedding; for each
//!   fusion output (coarse to fine) a projector embedding, to which the previous embedding is
//!   added (bilinear, aligned corners), 1x1 conv 128, ReLU, 1x1 conv to the attractors,
//!   Softplus, and the previous centers (bilinear, aligned corners) move by
//!   `mean_a (a - c) / (1 + 300 (a - c)^2)`; then `ConditionalLogBinomial` on `out_conv`, the
//!   relative depth and the last embedding (at full size): 1x1 conv 161 -> 80, GELU, 1x1 conv
//!   to 4, Softplus, `p`, `t` each `x0 / (x0 + x1)` after `+ 1e-4`, `t` scaled to
//!   [0.0212, 50], the log-binomial over 64 classes (Stirling `log C(63, k)`, `p` clamped to
//!   [1e-4, 1]) over `t`, softmax, and the depth is the probabilities times the last bin
//!   centers (bilinear, aligned corners), summed.
//!
//! `model.infer(x)` (`DepthModel.infer`, `pad_input=True, with_flip_aug=True`): the image
//! (`u8 / 255`, RGB) reflect-padded by `int(sqrt(h / 2) * 3)` rows and `int(sqrt(w / 2) * 3)`
//! columns each side, the network, bicubic (A = -0.75, align_corners=False) back to the padded
//! size, cropped; the same for the mirrored image, mirrored back, and the two averaged.
//!
//! The detector (`ZoeDetector.__call__`): the image at the processor resolution (done by
//! [`crate::detect`]), `infer`, then `vmin`, `vmax` = numpy's `percentile` 2 and 85 (linear
//! interpolation, in f32), `1 - (d - vmin) / (vmax - vmin)` (near = white),
//! `^2.2` when `gamma_corrected`, `u8(clip(x * 255))` (truncated).
//!
//! Weights: the checkpoint's own names (`model.core.core.pretrained.model.blocks.0.attn.qkv
//! .weight`, `model.conditional_log_binomial.mlp.0.weight`: `torch.save({"model": state_dict})`
//! read without running pickle code; the wrapper is optional) or a `.safetensors` with the same
//! keys. `relative_position_index`, the log-binomial's constant buffers, the classifier and
//! the final norm are not read.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{layer_norm, linear, LayerNorm, LayerNormConfig, Linear, VarBuilder};
use sd_pipeline::cpu::activation::gelu_erf as gelu;
use sd_plugins_api::{
    hwc3, register_preprocessor, ImageBuf, ParamSpec, Params, PluginError, Preprocessor,
};

use crate::conv::{for_each_unit, Conv2d, ConvTranspose2d, Geometry};
use crate::depth_anything::bicubic_hwc;
use crate::lineart::{cached, grey_map, model_param};
use crate::midas::{bilinear_hwc, conv, DptDecoder};

/// The weight files looked for in the annotator folder.
pub const WEIGHT_FILES: [&str; 2] = ["ZoeD_M12_N.pt", "ZoeD_M12_N.safetensors"];

const WIDTH: usize = 1024;
const HEADS: usize = 16;
const MLP: usize = 4096;
const DEPTH: usize = 24;
const PATCH: usize = 16;
/// The BEiT blocks whose outputs feed the DPT decoder.
const HOOKS: [usize; 4] = [5, 11, 17, 23];
/// The reassembly's channels per level.
const POST: [usize; 4] = [256, 512, 1024, 1024];
const FEATURES: usize = 256;
/// The window of the stored relative position tables (384 / 16).
const WINDOW: usize = 24;
const N_BINS: usize = 64;
const EMBED: usize = 128;
const ATTRACTORS: [usize; 4] = [16, 8, 4, 1];
/// The attractor strength actually used: the config's `attractor_alpha` 1000 is stored on the
/// layers but `inv_attractor(dx)` is called without it, so its default 300 applies (gamma 2,
/// its default too).
const ALPHA: f32 = 300.0;
const MIN_TEMP: f64 = 0.0212;
const MAX_TEMP: f64 = 50.0;
/// `img_size` [384, 512] of the config: `PrepForMidas`'s target height and width.
const NET_H: usize = 384;
const NET_W: usize = 512;
const MULTIPLE: usize = 32;

const ROOT: &str = "core.core.pretrained.model";
const PRE: &str = "core.core.pretrained";
const SCRATCH: &str = "core.core.scratch";

/// Every tensor the network reads, with its shape.
pub fn parameter_shapes() -> Vec<(String, Vec<usize>)> {
    let mut v: Vec<(String, Vec<usize>)> = Vec::new();
    let mut add = |n: String, s: &[usize]| v.push((n, s.to_vec()));
    let conv_b = |add: &mut dyn FnMut(String, &[usize]), n: &str, o, i, k| {
        add(format!("{n}.weight"), &[o, i, k, k]);
        add(format!("{n}.bias"), &[o]);
    };
    add(format!("{ROOT}.cls_token"), &[1, 1, WIDTH]);
    conv_b(
        &mut add,
        &format!("{ROOT}.patch_embed.proj"),
        WIDTH,
        3,
        PATCH,
    );
    let table = (2 * WINDOW - 1) * (2 * WINDOW - 1) + 3;
    for b in 0..DEPTH {
        let p = format!("{ROOT}.blocks.{b}");
        for n in ["gamma_1", "gamma_2", "attn.q_bias", "attn.v_bias"] {
            add(format!("{p}.{n}"), &[WIDTH]);
        }
        for n in ["norm1", "norm2"] {
            add(format!("{p}.{n}.weight"), &[WIDTH]);
            add(format!("{p}.{n}.bias"), &[WIDTH]);
        }
        add(
            format!("{p}.attn.relative_position_bias_table"),
            &[table, HEADS],
        );
        add(format!("{p}.attn.qkv.weight"), &[3 * WIDTH, WIDTH]);
        add(format!("{p}.attn.proj.weight"), &[WIDTH, WIDTH]);
        add(format!("{p}.attn.proj.bias"), &[WIDTH]);
        add(format!("{p}.mlp.fc1.weight"), &[MLP, WIDTH]);
        add(format!("{p}.mlp.fc1.bias"), &[MLP]);
        add(format!("{p}.mlp.fc2.weight"), &[WIDTH, MLP]);
        add(format!("{p}.mlp.fc2.bias"), &[WIDTH]);
    }
    for (i, &f) in POST.iter().enumerate() {
        let p = format!("{PRE}.act_postprocess{}", i + 1);
        add(format!("{p}.0.project.0.weight"), &[WIDTH, 2 * WIDTH]);
        add(format!("{p}.0.project.0.bias"), &[WIDTH]);
        conv_b(&mut add, &format!("{p}.3"), f, WIDTH, 1);
        match i {
            0 => conv_b(&mut add, &format!("{p}.4"), f, f, 4),
            1 => conv_b(&mut add, &format!("{p}.4"), f, f, 2),
            3 => conv_b(&mut add, &format!("{p}.4"), f, f, 3),
            _ => {}
        }
        add(
            format!("{SCRATCH}.layer{}_rn.weight", i + 1),
            &[FEATURES, f, 3, 3],
        );
    }
    for i in 1..=4 {
        let p = format!("{SCRATCH}.refinenet{i}");
        conv_b(&mut add, &format!("{p}.out_conv"), FEATURES, FEATURES, 1);
        for r in 1..=2 {
            for c in 1..=2 {
                let n = format!("{p}.resConfUnit{r}.conv{c}");
                conv_b(&mut add, &n, FEATURES, FEATURES, 3);
            }
        }
    }
    let out = format!("{SCRATCH}.output_conv");
    conv_b(&mut add, &format!("{out}.0"), FEATURES / 2, FEATURES, 3);
    conv_b(&mut add, &format!("{out}.2"), 32, FEATURES / 2, 3);
    conv_b(&mut add, &format!("{out}.4"), 1, 32, 1);
    conv_b(&mut add, "conv2", FEATURES, FEATURES, 1);
    conv_b(&mut add, "seed_bin_regressor._net.0", 256, FEATURES, 1);
    conv_b(&mut add, "seed_bin_regressor._net.2", N_BINS, 256, 1);
    conv_b(&mut add, "seed_projector._net.0", EMBED, FEATURES, 1);
    conv_b(&mut add, "seed_projector._net.2", EMBED, EMBED, 1);
    for (i, &n) in ATTRACTORS.iter().enumerate() {
        conv_b(
            &mut add,
            &format!("projectors.{i}._net.0"),
            EMBED,
            FEATURES,
            1,
        );
        conv_b(&mut add, &format!("projectors.{i}._net.2"), EMBED, EMBED, 1);
        conv_b(&mut add, &format!("attractors.{i}._net.0"), EMBED, EMBED, 1);
        conv_b(&mut add, &format!("attractors.{i}._net.2"), n, EMBED, 1);
    }
    let last = 32 + 1 + EMBED;
    conv_b(
        &mut add,
        "conditional_log_binomial.mlp.0",
        last / 2,
        last,
        1,
    );
    conv_b(&mut add, "conditional_log_binomial.mlp.2", 4, last / 2, 1);
    v
}

/// A BEiT block (timm `Block` as midas_repo's `block_forward` / `attention_forward` run it).
struct BeitBlock {
    norm1: LayerNorm,
    /// `qkv.weight` with the bias `cat(q_bias, 0, v_bias)`.
    qkv: Linear,
    proj: Linear,
    gamma1: Tensor,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    gamma2: Tensor,
    /// `relative_position_bias_table`, `((2W - 1)^2 + 3) x 16` as stored.
    table: Vec<f32>,
}

impl BeitBlock {
    fn new(vb: VarBuilder) -> Result<Self> {
        let ln = LayerNormConfig {
            eps: 1e-6,
            ..Default::default()
        };
        let a = vb.pp("attn");
        let bias = Tensor::cat(
            &[
                &a.get(WIDTH, "q_bias")?,
                &Tensor::zeros(WIDTH, DType::F32, &Device::Cpu)?,
                &a.get(WIDTH, "v_bias")?,
            ],
            0,
        )?;
        let qkv = Linear::new(a.get((3 * WIDTH, WIDTH), "qkv.weight")?, Some(bias));
        let rows = (2 * WINDOW - 1) * (2 * WINDOW - 1) + 3;
        let table = a
            .get((rows, HEADS), "relative_position_bias_table")?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Self {
            norm1: layer_norm(WIDTH, ln, vb.pp("norm1"))?,
            qkv,
            proj: linear(WIDTH, WIDTH, a.pp("proj"))?,
            gamma1: vb.get(WIDTH, "gamma_1")?,
            norm2: layer_norm(WIDTH, ln, vb.pp("norm2"))?,
            fc1: linear(WIDTH, MLP, vb.pp("mlp.fc1"))?,
            fc2: linear(MLP, WIDTH, vb.pp("mlp.fc2"))?,
            gamma2: vb.get(WIDTH, "gamma_2")?,
            table,
        })
    }

    /// `_get_rel_pos_bias` for a `gh x gw` grid: `(1, heads, 1 + N, 1 + N)`. `index` is
    /// [`rel_pos_index`] of the grid.
    fn rel_pos_bias(&self, gh: usize, gw: usize, index: &[u32]) -> Result<Tensor> {
        let old = 2 * WINDOW - 1;
        let (nh, nw) = (2 * gh - 1, 2 * gw - 1);
        let mut table = bilinear_hwc(&self.table[..old * old * HEADS], old, old, HEADS, nh, nw);
        table.extend_from_slice(&self.table[old * old * HEADS..]);
        let m = index.len();
        let mut out = vec![0f32; HEADS * m];
        for_each_unit(&mut out, m, m, |hd, plane| {
            for (o, &i) in plane.iter_mut().zip(index) {
                *o = table[i as usize * HEADS + hd];
            }
        });
        let n1 = gh * gw + 1;
        Tensor::from_vec(out, (1, HEADS, n1, n1), &Device::Cpu)
    }

    fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let hd = c / HEADS;
        let qkv = self
            .qkv
            .forward(&self.norm1.forward(x)?)?
            .reshape((b, n, 3, HEADS, hd))?
            .permute((2, 0, 3, 1, 4))?;
        let q = (qkv.get(0)?.contiguous()? * (hd as f64).powf(-0.5))?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let attn = q.matmul(&k.t()?)?.broadcast_add(bias)?;
        let attn = candle_nn::ops::softmax_last_dim(&attn)?;
        let a = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
        let a = self.proj.forward(&a)?.broadcast_mul(&self.gamma1)?;
        let x = (x + a)?;
        let h = gelu(&self.fc1.forward(&self.norm2.forward(&x)?)?)?;
        let m = self.fc2.forward(&h)?.broadcast_mul(&self.gamma2)?;
        x + m
    }
}

/// timm's `gen_relative_position_index` for a `gh x gw` window, flattened `(1 + N)^2`: token
/// pairs index the `(2 gh - 1) x (2 gw - 1)` table by their row and column offsets; the class
/// token row, column and corner the last three entries.
fn rel_pos_index(gh: usize, gw: usize) -> Vec<u32> {
    let n = gh * gw;
    let n1 = n + 1;
    let distances = (2 * gh - 1) * (2 * gw - 1);
    let mut idx = vec![0u32; n1 * n1];
    for i in 0..n1 {
        for j in 0..n1 {
            idx[i * n1 + j] = if i == 0 && j == 0 {
                distances + 2
            } else if j == 0 {
                distances + 1
            } else if i == 0 {
                distances
            } else {
                let (p, q) = (i - 1, j - 1);
                let dh = p / gw + gh - 1 - q / gw;
                let dw = p % gw + gw - 1 - q % gw;
                dh * (2 * gw - 1) + dw
            } as u32;
        }
    }
    idx
}

/// A 1x1 conv, ReLU (GELU for `ConditionalLogBinomial`), 1x1 conv (`Projector`, and the
/// first layers of the other heads).
struct Mlp2 {
    a: Conv2d,
    b: Conv2d,
    gelu: bool,
}

impl Mlp2 {
    fn new(vb: &VarBuilder, i: usize, hidden: usize, o: usize) -> Result<Self> {
        let g = Geometry::default();
        Ok(Self {
            a: conv(&vb.pp("0"), i, hidden, 1, g, true)?,
            b: conv(&vb.pp("2"), hidden, o, 1, g, true)?,
            gelu: false,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.a.forward(x)?;
        let h = if self.gelu { gelu(&h)? } else { h.relu()? };
        self.b.forward(&h)
    }
}

/// `nn.Softplus()` (beta 1, threshold 20), elementwise as torch computes it in f32.
fn softplus(x: &Tensor) -> Result<Tensor> {
    let v: Vec<f32> = x
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|v| if v > 20.0 { v } else { v.exp().ln_1p() })
        .collect();
    Tensor::from_vec(v, x.dims(), x.device())
}

/// Bilinear with aligned corners to `h x w` (as `F.interpolate`; nothing when the size is the
/// same, where it is the identity).
fn resize_to(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (_, _, xh, xw) = x.dims4()?;
    if (xh, xw) == (h, w) {
        Ok(x.clone())
    } else {
        x.upsample_bilinear2d(h, w, true)
    }
}

/// The ZoeDepth N network.
pub struct ZoeNet {
    patch_embed: Conv2d,
    cls_token: Tensor,
    blocks: Vec<BeitBlock>,
    readout: Vec<Linear>,
    post_1x1: Vec<Conv2d>,
    post_up: [ConvTranspose2d; 2],
    post_down: Conv2d,
    decoder: DptDecoder,
    conv2: Conv2d,
    seed_regressor: Mlp2,
    seed_projector: Mlp2,
    projectors: Vec<Mlp2>,
    attractors: Vec<Mlp2>,
    log_binomial: Mlp2,
}

impl ZoeNet {
    /// Load `ZoeD_M12_N.pt` (or a safetensors file with its keys).
    pub fn load(path: &Path) -> std::result::Result<Self, String> {
        let key = format!("{ROOT}.cls_token");
        let wanted: std::collections::HashSet<String> =
            parameter_shapes().into_iter().map(|(k, _)| k).collect();
        let tensors = crate::weights::read_state_dict(
            path,
            &key,
            &format!("ZoeDepth weights {}", WEIGHT_FILES[0]),
            |k| wanted.contains(k),
        )?;
        Self::from_tensors(tensors).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// From the state dict's tensors by name; a missing or misshapen tensor is an error naming
    /// it.
    pub fn from_tensors(tensors: HashMap<String, Tensor>) -> std::result::Result<Self, String> {
        if let Some((k, _)) = parameter_shapes()
            .into_iter()
            .find(|(k, _)| !tensors.contains_key(k))
        {
            return Err(format!(
                "no tensor `{k}` (not the ZoeDepth N weights {}?)",
                WEIGHT_FILES[0]
            ));
        }
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        Self::new(vb).map_err(|e| format!("{e} (not the ZoeDepth N weights?)"))
    }

    /// Build from a var builder rooted at the state dict's top level.
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let g1 = Geometry::default();
        let root = vb.pp(ROOT);
        let patch_embed = conv(
            &root.pp("patch_embed.proj"),
            3,
            WIDTH,
            PATCH,
            Geometry::new(PATCH, 0),
            true,
        )?;
        let cls_token = root.get((1, 1, WIDTH), "cls_token")?;
        let blocks = (0..DEPTH)
            .map(|i| BeitBlock::new(root.pp(format!("blocks.{i}"))))
            .collect::<Result<_>>()?;
        let pre = vb.pp(PRE);
        let mut readout = Vec::new();
        let mut post_1x1 = Vec::new();
        for (i, &f) in POST.iter().enumerate() {
            let p = pre.pp(format!("act_postprocess{}", i + 1));
            readout.push(linear(2 * WIDTH, WIDTH, p.pp("0.project.0"))?);
            post_1x1.push(conv(&p.pp("3"), WIDTH, f, 1, g1, true)?);
        }
        let up = |i: usize, k: usize| -> Result<ConvTranspose2d> {
            let p = pre.pp(format!("act_postprocess{}.4", i + 1));
            let f = POST[i];
            ConvTranspose2d::new(
                &p.get((f, f, k, k), "weight")?,
                Some(&p.get(f, "bias")?),
                k,
                0,
                0,
            )
        };
        let post_up = [up(0, 4)?, up(1, 2)?];
        let post_down = conv(
            &pre.pp("act_postprocess4.4"),
            POST[3],
            POST[3],
            3,
            Geometry::new(2, 1),
            true,
        )?;
        let decoder = DptDecoder::new(&vb.pp(SCRATCH), POST)?;
        let last = 32 + 1 + EMBED;
        Ok(Self {
            patch_embed,
            cls_token,
            blocks,
            readout,
            post_1x1,
            post_up,
            post_down,
            decoder,
            conv2: conv(&vb.pp("conv2"), FEATURES, FEATURES, 1, g1, true)?,
            seed_regressor: Mlp2::new(&vb.pp("seed_bin_regressor._net"), FEATURES, 256, N_BINS)?,
            seed_projector: Mlp2::new(&vb.pp("seed_projector._net"), FEATURES, EMBED, EMBED)?,
            projectors: (0..4)
                .map(|i| {
                    Mlp2::new(
                        &vb.pp(format!("projectors.{i}._net")),
                        FEATURES,
                        EMBED,
                        EMBED,
                    )
                })
                .collect::<Result<_>>()?,
            attractors: ATTRACTORS
                .iter()
                .enumerate()
                .map(|(i, &n)| Mlp2::new(&vb.pp(format!("attractors.{i}._net")), EMBED, EMBED, n))
                .collect::<Result<_>>()?,
            log_binomial: Mlp2 {
                gelu: true,
                ..Mlp2::new(&vb.pp("conditional_log_binomial.mlp"), last, last / 2, 4)?
            },
        })
    }

    /// `ProjectReadout`, `Transpose`, `Unflatten`: `(1, 1 + N, 1024)` -> `(1, 1024, gh, gw)`.
    fn reassemble(&self, i: usize, x: &Tensor, gh: usize, gw: usize) -> Result<Tensor> {
        let (b, n1, d) = x.dims3()?;
        let n = n1 - 1;
        let cls = x.narrow(1, 0, 1)?.broadcast_as((b, n, d))?;
        let feats = Tensor::cat(&[&x.narrow(1, 1, n)?, &cls.contiguous()?], 2)?;
        gelu(&self.readout[i].forward(&feats)?)?
            .transpose(1, 2)?
            .reshape((b, d, gh, gw))
    }

    /// MiDaS (`DPTDepthModel.forward` with `MidasCore`'s hooks) on a prepared `(1, 3, H, W)`
    /// input (sides multiples of 32): the relative depth `(1, 1, H, W)`, `out_conv`
    /// `(1, 32, H, W)`, `layer4_rn` and the fusion outputs `[r4, r3, r2, r1]`.
    #[allow(clippy::type_complexity)]
    fn midas(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor, Vec<Tensor>)> {
        let (b, _, h, w) = x.dims4()?;
        let (gh, gw) = (h / PATCH, w / PATCH);
        let tokens = self
            .patch_embed
            .forward(x)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let cls = self.cls_token.broadcast_as((b, 1, WIDTH))?;
        let mut t = Tensor::cat(&[&cls, &tokens], 1)?;
        let index = rel_pos_index(gh, gw);
        let mut hooked = Vec::with_capacity(4);
        for (i, blk) in self.blocks.iter().enumerate() {
            let bias = blk.rel_pos_bias(gh, gw, &index)?;
            t = blk.forward(&t, &bias)?;
            if HOOKS.contains(&i) {
                hooked.push(t.clone());
            }
        }
        let mut layers = Vec::with_capacity(4);
        for (i, t) in hooked.iter().enumerate() {
            let y = self.post_1x1[i].forward(&self.reassemble(i, t, gh, gw)?)?;
            layers.push(match i {
                0 | 1 => self.post_up[i].forward(&y)?,
                2 => y,
                _ => self.post_down.forward(&y)?,
            });
        }
        let o = self.decoder.forward(&layers, true)?;
        Ok((o.rel, o.out_conv, o.rn4, o.paths))
    }

    /// `ZoeDepth.forward(x)["metric_depth"]` on a prepared input `(1, 3, H, W)` (after
    /// `PrepForMidas`): `(1, 1, H, W)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if b != 1 || c != 3 || h == 0 || w == 0 || h % MULTIPLE != 0 || w % MULTIPLE != 0 {
            candle_core::bail!(
                "ZoeDepth input {:?}: one 3-channel image with sides that are multiples of \
                 {MULTIPLE} needed",
                x.dims()
            );
        }
        let (rel, out_conv, btlnck, blocks) = self.midas(&x.to_dtype(DType::F32)?)?;
        let x0 = self.conv2.forward(&btlnck)?;
        let mut b_prev = softplus(&self.seed_regressor.forward(&x0)?)?;
        let mut prev_emb = self.seed_projector.forward(&x0)?;
        for ((proj, attr), (xb, &na)) in self
            .projectors
            .iter()
            .zip(&self.attractors)
            .zip(blocks.iter().zip(&ATTRACTORS))
        {
            let emb = proj.forward(xb)?;
            let (_, _, bh, bw) = emb.dims4()?;
            let xa = (&emb + resize_to(&prev_emb, bh, bw)?)?;
            let a = softplus(&attr.forward(&xa)?)?;
            let centers = resize_to(&b_prev, bh, bw)?;
            b_prev = attract(&a, &centers, na)?;
            prev_emb = emb;
        }
        let last = Tensor::cat(&[&out_conv, &rel], 1)?;
        let emb = resize_to(&prev_emb, h, w)?;
        let pt = softplus(
            &self
                .log_binomial
                .forward(&Tensor::cat(&[&last, &emb], 1)?)?,
        )?;
        let centers = resize_to(&b_prev, h, w)?;
        log_binomial_depth(&pt, &centers)
    }

    /// `DepthModel.infer(x)` (padding and flip augmentation) of a planar RGB image `3 x h x w`
    /// in [0, 1]: the metric depth, `h * w`.
    pub fn infer(&self, x: &[f32], h: usize, w: usize) -> Result<Vec<f32>> {
        let a = self.infer_padded(x, h, w)?;
        let b = self.infer_padded(&flip_planes(x, w), h, w)?;
        let b = flip_planes(&b, w);
        Ok(a.iter().zip(&b).map(|(a, b)| (a + b) / 2.0).collect())
    }

    /// `_infer_with_pad_aug`: reflect padding, `PrepForMidas`, the network, bicubic back to the
    /// padded size, cropped.
    fn infer_padded(&self, x: &[f32], h: usize, w: usize) -> Result<Vec<f32>> {
        let (ph, pw) = pad_sizes(h, w);
        if ph >= h || pw >= w {
            candle_core::bail!(
                "{w}x{h} is too small for ZoeDepth's reflect padding ({pw} columns, {ph} rows)"
            );
        }
        let (hp, wp) = (h + 2 * ph, w + 2 * pw);
        let padded = pad_reflect(x, 3, h, w, ph, pw);
        let (nh, nw) = net_size(hp, wp);
        if nh == 0 || nw == 0 {
            candle_core::bail!("{w}x{h} is too small for ZoeDepth (network input {nw}x{nh})");
        }
        let t = Tensor::from_vec(padded, (1, 3, hp, wp), &Device::Cpu)?;
        let t = resize_to(&t, nh, nw)?;
        let t = ((t - 0.5)? / 0.5)?;
        let d = self.forward(&t)?.flatten_all()?.to_vec1::<f32>()?;
        let d = if (nh, nw) == (hp, wp) {
            d
        } else {
            let (sy, sx) = (nh as f64 / hp as f64, nw as f64 / wp as f64);
            bicubic_hwc(&d, nh, nw, 1, hp, wp, sy, sx)
        };
        Ok((ph..ph + h)
            .flat_map(|r| d[r * wp + pw..r * wp + pw + w].iter().copied())
            .collect())
    }
}

/// `AttractorLayerUnnormed` ("inv", "mean", not memory-efficient): each center `c` moves by
/// `mean_a dx / (1 + 300 dx^2)`, `dx = a - c`.
fn attract(a: &Tensor, centers: &Tensor, na: usize) -> Result<Tensor> {
    let (_, nb, h, w) = centers.dims4()?;
    let hw = h * w;
    let av = a.flatten_all()?.to_vec1::<f32>()?;
    let mut cv = centers.flatten_all()?.to_vec1::<f32>()?;
    for_each_unit(&mut cv, hw, hw * na * 4, |_, plane| {
        for (p, c) in plane.iter_mut().enumerate() {
            let mut sum = 0f32;
            for i in 0..na {
                let dx = av[i * hw + p] - *c;
                sum += dx / (1.0 + ALPHA * (dx * dx));
            }
            *c += sum / na as f32;
        }
    });
    Tensor::from_vec(cv, (1, nb, h, w), &Device::Cpu)
}

/// `ConditionalLogBinomial`'s distribution from the softplus'd `(1, 4, H, W)` and the expected
/// depth under it with the bin centers `(1, 64, H, W)`: `(1, 1, H, W)`.
fn log_binomial_depth(pt: &Tensor, centers: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = pt.dims4()?;
    let hw = h * w;
    let pv = pt.flatten_all()?.to_vec1::<f32>()?;
    let cv = centers.flatten_all()?.to_vec1::<f32>()?;
    let k_max = (N_BINS - 1) as f32;
    // log_binom(K - 1, k) with eps 1e-7 (Stirling), in f32 as torch computes it
    let lb: Vec<f32> = (0..N_BINS)
        .map(|k| {
            let n = k_max + 1e-7;
            let kk = k as f32 + 1e-7;
            n * n.ln() - kk * kk.ln() - (n - kk) * (n - kk + 1e-7).ln()
        })
        .collect();
    let span = (MAX_TEMP - MIN_TEMP) as f32;
    let (eps, min_temp) = (1e-4f32, MIN_TEMP as f32);
    let mut out = vec![0f32; hw];
    for_each_unit(&mut out, w, w * N_BINS * 8, |row, line| {
        let mut y = [0f32; N_BINS];
        for (x, o) in line.iter_mut().enumerate() {
            let i = row * w + x;
            let (p0, p1) = (pv[i] + eps, pv[hw + i] + eps);
            let p = p0 / (p0 + p1);
            let (t0, t1) = (pv[2 * hw + i] + eps, pv[3 * hw + i] + eps);
            let t = span * (t0 / (t0 + t1)) + min_temp;
            let one_minus = (1.0 - p).clamp(eps, 1.0);
            let (lx, l1x) = (p.clamp(eps, 1.0).ln(), one_minus.ln());
            let mut max = f32::NEG_INFINITY;
            for (k, yk) in y.iter_mut().enumerate() {
                let v = (lb[k] + k as f32 * lx + (k_max - k as f32) * l1x) / t;
                *yk = v;
                max = max.max(v);
            }
            let mut sum = 0f32;
            for yk in y.iter_mut() {
                *yk = (*yk - max).exp();
                sum += *yk;
            }
            let mut d = 0f32;
            for (k, yk) in y.iter().enumerate() {
                d += yk / sum * cv[k * hw + i];
            }
            *o = d;
        }
    });
    Tensor::from_vec(out, (1, 1, h, w), &Device::Cpu)
}

/// `int(sqrt(h / 2) * 3)`, `int(sqrt(w / 2) * 3)`: the reflect padding rows and columns.
pub fn pad_sizes(h: usize, w: usize) -> (usize, usize) {
    let p = |n: usize| ((n as f64 / 2.0).sqrt() * 3.0) as usize;
    (p(h), p(w))
}

/// `PrepForMidas`'s `Resize(512, 384, keep_aspect_ratio=True, ensure_multiple_of=32,
/// resize_method="minimal").get_size` for an `h x w` input: `(height, width)`.
pub fn net_size(h: usize, w: usize) -> (usize, usize) {
    let sh = NET_H as f64 / h as f64;
    let sw = NET_W as f64 / w as f64;
    let s = if (1.0 - sw).abs() < (1.0 - sh).abs() {
        sw
    } else {
        sh
    };
    let m = MULTIPLE as f64;
    let c = |x: f64| ((x / m).round_ties_even() * m) as usize;
    (c(s * h as f64), c(s * w as f64))
}

/// `F.pad(mode="reflect")` of `c` planes `h x w` by `ph` rows and `pw` columns each side
/// (`ph < h`, `pw < w`).
fn pad_reflect(x: &[f32], c: usize, h: usize, w: usize, ph: usize, pw: usize) -> Vec<f32> {
    let (hp, wp) = (h + 2 * ph, w + 2 * pw);
    let refl = |i: usize, pad: usize, n: usize| -> usize {
        let i = i as isize - pad as isize;
        let n = n as isize;
        let r = if i < 0 {
            -i
        } else if i >= n {
            2 * (n - 1) - i
        } else {
            i
        };
        r as usize
    };
    let mut out = vec![0f32; c * hp * wp];
    for ch in 0..c {
        for y in 0..hp {
            let src = &x[(ch * h + refl(y, ph, h)) * w..][..w];
            let row = &mut out[(ch * hp + y) * wp..][..wp];
            for (i, o) in row.iter_mut().enumerate() {
                *o = src[refl(i, pw, w)];
            }
        }
    }
    out
}

/// Each `h x w` plane mirrored left to right (`torch.flip(dims=[3])`).
fn flip_planes(x: &[f32], w: usize) -> Vec<f32> {
    x.chunks_exact(w)
        .flat_map(|r| r.iter().rev().copied())
        .collect()
}

/// `np.percentile(d, q)` (method "linear") as numpy computes it for a float32 array: the
/// virtual index `(n - 1) * (q / 100)` in f64, the neighbours of the sorted values, and
/// `_lerp` in f32 (`a + (b - a) t`, or `b - (b - a)(1 - t)` for `t >= 0.5`).
pub fn percentile(sorted: &[f32], q: f64) -> f32 {
    let n = sorted.len();
    let vi = (n as f64 - 1.0) * (q / 100.0);
    if vi >= (n - 1) as f64 {
        return sorted[n - 1];
    }
    let lo = vi.floor();
    let t = vi - lo;
    let (a, b) = (sorted[lo as usize], sorted[lo as usize + 1]);
    let diff = b - a;
    if t >= 0.5 {
        b - diff * (1.0 - t) as f32
    } else {
        a + diff * t as f32
    }
}

/// `ZoeDetector.__call__`'s post-processing of the metric depth: percentiles 2 and 85,
/// `1 - (d - vmin) / (vmax - vmin)`, `^2.2` when `gamma`, `u8(clip(x * 255))`.
pub fn depth_to_u8(depth: &[f32], gamma: bool) -> Vec<u8> {
    let mut sorted = depth.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    if sorted.is_empty() {
        return Vec::new();
    }
    let vmin = percentile(&sorted, 2.0);
    let vmax = percentile(&sorted, 85.0);
    let range = vmax - vmin;
    depth
        .iter()
        .map(|&d| {
            let mut v = 1.0 - (d - vmin) / range;
            if gamma {
                v = v.powf(2.2);
            }
            (v * 255.0).clamp(0.0, 255.0) as u8
        })
        .collect()
}

/// The memory a run on a `w x h` image needs, checked first, by the network input of its
/// padded size: per pixel the head's full-size maps (the 128- and 32-channel MiDaS maps, the
/// 161-channel concatenation, 64-bin centers and more, about 4 KB), plus per pass the
/// attention scores, their softmax and the relative position bias of 16 heads over `N` tokens
/// (`192 N^2` bytes, `0.75 N` per pixel).
fn check_memory(w: usize, h: usize) -> std::result::Result<(), String> {
    let (ph, pw) = pad_sizes(h, w);
    let (nh, nw) = net_size(h + 2 * ph, w + 2 * pw);
    let tokens = (nw * nh / 256) as f64;
    let cost = sd_plugins_api::memory::Cost {
        per_pixel: 4096.0 + 0.75 * tokens,
        fixed: 64 << 20,
        peak: "ZoeDepth's full-size head maps and BEiT attention".into(),
    };
    sd_plugins_api::memory::check("ZoeDepth network input", nw, nh, 1, 64, &cost)
}

/// The metric depth of an image at the processor resolution (any channel count): `u8 / 255`
/// RGB through `infer`, `w * h`.
pub fn raw_depth(net: &ZoeNet, input: &ImageBuf) -> std::result::Result<Vec<f32>, String> {
    let rgb = hwc3(input);
    let (w, h) = (rgb.width, rgb.height);
    if w == 0 || h == 0 {
        return Err("empty image".into());
    }
    check_memory(w, h)?;
    let mut x = vec![0f32; 3 * w * h];
    for (i, px) in rgb.data.chunks_exact(3).enumerate() {
        for ch in 0..3 {
            x[ch * w * h + i] = px[ch] as f32 / 255.0;
        }
    }
    net.infer(&x, h, w).map_err(|e| e.to_string())
}

/// What `depth_zoe` makes of an image at the processor resolution.
pub fn depth_map(
    net: &ZoeNet,
    input: &ImageBuf,
    gamma: bool,
) -> std::result::Result<ImageBuf, String> {
    let d = raw_depth(net, input)?;
    Ok(grey_map(input.width, input.height, depth_to_u8(&d, gamma)))
}

type Cache = std::sync::Mutex<HashMap<std::path::PathBuf, Arc<ZoeNet>>>;
static CACHE: OnceLock<Cache> = OnceLock::new();

/// The network of `path`, loaded once per file per process.
pub fn cached_model(path: &Path) -> std::result::Result<Arc<ZoeNet>, String> {
    cached(&CACHE, path, ZoeNet::load)
}

/// `depth_zoe`.
pub struct DepthZoe;

impl Preprocessor for DepthZoe {
    fn name(&self) -> &str {
        "depth_zoe"
    }
    fn description(&self) -> &str {
        "ZoeDepth N metric depth, percentiles 2-85 inverted (near = white; controlnet_aux \
         ZoeDetector, ZoeD_M12_N.pt)"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            model_param(&WEIGHT_FILES),
            ParamSpec::bool(
                "gamma_corrected",
                false,
                "raise the normalised map to the power 2.2",
            ),
        ]
    }
    fn cache_salt(&self, params: &Params) -> std::result::Result<String, PluginError> {
        crate::weights::weights_salt(self.name(), params, &WEIGHT_FILES)
    }
    fn process(
        &self,
        input: &ImageBuf,
        params: &Params,
    ) -> std::result::Result<ImageBuf, PluginError> {
        let name = self.name();
        let gamma = params.bool("gamma_corrected").unwrap_or(false);
        let path = crate::weights::find_weights(name, params, &WEIGHT_FILES)?;
        let net = cached_model(&path).map_err(|e| PluginError::failed(name, e))?;
        depth_map(&net, input, gamma).map_err(|e| PluginError::failed(name, e))
    }
}

register_preprocessor!(DepthZoe);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_and_network_sizes() {
        // the fixture: 128x64 -> padded 176x96 -> 512x288; 512x512 -> 608x608 -> 512x512
        assert_eq!(pad_sizes(64, 128), (16, 24));
        assert_eq!(net_size(96, 176), (288, 512));
        assert_eq!(pad_sizes(512, 512), (48, 48));
        assert_eq!(net_size(608, 608), (512, 512));
    }

    #[test]
    fn reflect_pad_and_flip() {
        let x = [0.0, 1.0, 2.0, 3.0];
        assert_eq!(
            pad_reflect(&x, 1, 1, 4, 0, 2),
            [2.0, 1.0, 0.0, 1.0, 2.0, 3.0, 2.0, 1.0]
        );
        let col = pad_reflect(&x, 1, 4, 1, 1, 0);
        assert_eq!(col, [1.0, 0.0, 1.0, 2.0, 3.0, 2.0]);
        assert_eq!(flip_planes(&x, 2), [1.0, 0.0, 3.0, 2.0]);
    }

    #[test]
    fn relative_position_index_is_timms() {
        // timm's gen_relative_position_index((2, 2))
        let want = [
            11, 9, 9, 9, 9, //
            10, 4, 3, 1, 0, //
            10, 5, 4, 2, 1, //
            10, 7, 6, 4, 3, //
            10, 8, 7, 5, 4,
        ];
        assert_eq!(rel_pos_index(2, 2), want);
    }

    #[test]
    fn registered() {
        assert!(crate::registry().preprocessor("depth_zoe").is_some());
    }
}
