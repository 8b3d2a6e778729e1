//! kohya's ControlNet-LLLite (sd-scripts `networks/control_net_lllite.py`, SDXL): small
//! modules on the attention projections of the UNet's transformer layers (`attn1.to_q/k/v`,
//! `attn2.to_q`; input and middle blocks in the released files). Each embeds the control
//! image once (`conditioning1`: strided convs to its layer's token grid) and at every step adds
//! `up(relu(mid(cat[cond, relu(down(x))]))) * weight` to the projection's input. Not
//! mergeable into the UNet (it depends on the input).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Result as CResult, Tensor};
use candle_nn::{Conv2d, Conv2dConfig};
use sd_pipeline::loading::diffusers::load_component;
use sd_pipeline::loading::files::tensor_shapes;
use sd_pipeline::model::config::UNetConfig;
use sd_pipeline::model::ldm_names::unet_ldm_name;
use sd_pipeline::model::nn::Linear;
use sd_plugins_api::{ModelPart, Projection, ProjectionInputs};

use crate::error::{ControlError, Result};

const PREFIX: &str = "lllite_unet_";

/// Whether `names` are a ControlNet-LLLite's.
pub fn is_lllite(names: &[(String, Vec<usize>)]) -> bool {
    names
        .iter()
        .any(|(n, _)| n.starts_with(PREFIX) && n.contains(".conditioning1.0."))
}

/// One module: the file's name, its layer's LDM prefix (`input_blocks.4.1.transformer_blocks.0`),
/// the projection, and its convs (kernel = stride) and linears.
#[derive(Debug, Clone)]
struct LlliteModule {
    layer_ldm: String,
    which: Projection,
    conditioning: Vec<Conv2d>,
    down: Linear,
    mid: Linear,
    up: Linear,
}

impl LlliteModule {
    /// The control image `[1, 3, H, W]` in [-1, 1] as tokens `[1, h*w, C]`.
    fn embed(&self, image: &Tensor) -> CResult<Tensor> {
        let mut x = image.clone();
        let n = self.conditioning.len();
        for (i, c) in self.conditioning.iter().enumerate() {
            x = c.forward(&x)?;
            if i + 1 < n {
                x = x.relu()?;
            }
        }
        let (b, c, h, w) = x.dims4()?;
        x.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()
    }

    fn delta(&self, cond: &Tensor, x: &Tensor, weight: f64) -> CResult<Tensor> {
        let b = x.dim(0)?;
        let cond = if cond.dim(0)? == b {
            cond.clone()
        } else {
            cond.repeat((b, 1, 1))?
        };
        let d = self.down.forward(x)?.relu()?;
        let m = self.mid.forward(&Tensor::cat(&[&cond, &d], 2)?)?.relu()?;
        self.up.forward(&m)? * weight
    }
}

/// The projection a module name ends with, and the rest (its layer).
fn parse_name(module: &str) -> Option<(String, Projection)> {
    let rest = module.strip_prefix(PREFIX)?;
    let (layer, which) = [
        ("_attn1_to_q", Projection::SelfQ),
        ("_attn1_to_k", Projection::SelfK),
        ("_attn1_to_v", Projection::SelfV),
        ("_attn2_to_q", Projection::CrossQ),
    ]
    .into_iter()
    .find_map(|(suffix, w)| rest.strip_suffix(suffix).map(|l| (l, w)))?;
    // input_blocks_4_1_transformer_blocks_0 -> input_blocks.4.1.transformer_blocks.0
    let parts: Vec<&str> = layer.split('_').collect();
    let ldm = match parts.as_slice() {
        ["input", "blocks", k, one, "transformer", "blocks", t] => {
            format!("input_blocks.{k}.{one}.transformer_blocks.{t}")
        }
        ["output", "blocks", k, one, "transformer", "blocks", t] => {
            format!("output_blocks.{k}.{one}.transformer_blocks.{t}")
        }
        ["middle", "block", one, "transformer", "blocks", t] => {
            format!("middle_block.{one}.transformer_blocks.{t}")
        }
        _ => return None,
    };
    Some((ldm, which))
}

/// A loaded ControlNet-LLLite.
#[derive(Debug, Clone)]
pub struct Lllite {
    modules: Vec<LlliteModule>,
    /// The largest total stride of a module's conditioning (the image must divide by it).
    pub stride: usize,
    /// The projection inputs' widths by LDM layer name (checked against the base).
    pub in_features: Vec<(String, usize)>,
}

/// Load a ControlNet-LLLite file (`.safetensors`, or a `.pth` through the safe loader).
pub fn load_lllite(path: &Path, device: &Device, dtype: DType) -> Result<Lllite> {
    let shapes = tensor_shapes(path)?;
    if !is_lllite(&shapes) {
        return Err(ControlError::file(
            path,
            "not a ControlNet-LLLite: no lllite_unet_* keys",
        ));
    }
    let shape = |k: &str| shapes.iter().find(|(n, _)| n == k).map(|(_, s)| s.clone());
    let mut names: Vec<String> = shapes
        .iter()
        .filter_map(|(n, _)| n.strip_suffix(".conditioning1.0.weight").map(String::from))
        .collect();
    names.sort();
    let mut specs = Vec::new();
    for m in &names {
        let Some((ldm, which)) = parse_name(m) else {
            return Err(ControlError::file(
                path,
                format!("ControlNet-LLLite module {m}: not an attention projection of a transformer layer"),
            ));
        };
        let need = |leaf: &str| {
            shape(&format!("{m}.{leaf}")).ok_or_else(|| {
                ControlError::file(path, format!("ControlNet-LLLite lacks {m}.{leaf}"))
            })
        };
        let convs: Vec<Vec<usize>> = [0, 2, 4]
            .iter()
            .filter_map(|i| shape(&format!("{m}.conditioning1.{i}.weight")))
            .collect();
        let down = need("down.0.weight")?;
        let mid = need("mid.0.weight")?;
        specs.push((m.clone(), ldm, which, convs, down, mid));
    }
    let stride = specs
        .iter()
        .map(|s| s.3.iter().map(|c| c[2]).product::<usize>())
        .max()
        .unwrap_or(1);
    let in_features = specs.iter().map(|s| (s.1.clone(), s.4[1])).collect();
    let modules = load_component(
        &[path.to_path_buf()],
        ModelPart::Unet,
        &[],
        dtype,
        device,
        |vb| {
            specs
                .iter()
                .map(|(m, ldm, which, convs, down, mid)| {
                    let vb = vb.pp(m);
                    let conditioning = convs
                        .iter()
                        .enumerate()
                        .map(|(i, s)| {
                            let cfg = Conv2dConfig {
                                stride: s[2],
                                ..Default::default()
                            };
                            candle_nn::conv2d(
                                s[1],
                                s[0],
                                s[2],
                                cfg,
                                vb.pp(format!("conditioning1.{}", 2 * i)),
                            )
                        })
                        .collect::<CResult<Vec<_>>>()?;
                    let (mlp, inf) = (down[0], down[1]);
                    Ok(LlliteModule {
                        layer_ldm: ldm.clone(),
                        which: *which,
                        conditioning,
                        down: sd_pipeline::model::nn::linear(inf, mlp, vb.pp("down.0"))?,
                        mid: sd_pipeline::model::nn::linear(mid[1], mlp, vb.pp("mid.0"))?,
                        up: sd_pipeline::model::nn::linear(mlp, inf, vb.pp("up.0"))?,
                    })
                })
                .collect::<CResult<Vec<_>>>()
        },
    )?;
    Ok(Lllite {
        modules,
        stride,
        in_features,
    })
}

impl Lllite {
    /// The run-order index of each module's layer in a base UNet (its transformer layers as
    /// `UNet2DConditionModel::transformer_layers` lists them); errors name a module whose layer
    /// the base lacks or whose width differs.
    pub fn layer_indices(
        &self,
        layers: &[(String, usize)],
        base: &UNetConfig,
    ) -> std::result::Result<Vec<usize>, String> {
        let ldm: HashMap<String, (usize, usize)> = layers
            .iter()
            .enumerate()
            .filter_map(|(i, (name, c))| {
                let probe = format!("{name}.attn1.to_q.weight");
                let l = unet_ldm_name(&probe, base)?;
                Some((l.strip_suffix(".attn1.to_q.weight")?.to_string(), (i, *c)))
            })
            .collect();
        self.modules
            .iter()
            .zip(&self.in_features)
            .map(|(m, (_, inf))| match ldm.get(&m.layer_ldm) {
                Some(&(i, c)) if c == *inf => Ok(i),
                Some(&(_, c)) => Err(format!(
                    "ControlNet-LLLite module on {} takes {inf} channels; the base UNet's layer has {c}",
                    m.layer_ldm
                )),
                None => Err(format!(
                    "ControlNet-LLLite module on {}: the base UNet has no such transformer layer (LLLite files are for SDXL)",
                    m.layer_ldm
                )),
            })
            .collect()
    }

    /// The patch for one generation: every module's control embedding made now.
    pub fn patch(&self, image: &Tensor, layers: &[usize], weight: f64) -> CResult<LllitePatch> {
        let image = ((image * 2.0)? - 1.0)?;
        let mut by_layer: HashMap<(usize, ProjKey), (usize, Tensor)> = HashMap::new();
        for (i, (m, &layer)) in self.modules.iter().zip(layers).enumerate() {
            by_layer.insert((layer, ProjKey::of(m.which)), (i, m.embed(&image)?));
        }
        Ok(LllitePatch {
            model: Arc::new(self.clone()),
            by_layer,
            weight,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ProjKey {
    SelfQ,
    SelfK,
    SelfV,
    CrossQ,
}

impl ProjKey {
    fn of(p: Projection) -> Self {
        match p {
            Projection::SelfQ => Self::SelfQ,
            Projection::SelfK => Self::SelfK,
            Projection::SelfV => Self::SelfV,
            Projection::CrossQ => Self::CrossQ,
        }
    }
}

/// A ControlNet-LLLite with its control image embedded, as the UNet calls it.
#[derive(Debug)]
pub struct LllitePatch {
    model: Arc<Lllite>,
    by_layer: HashMap<(usize, ProjKey), (usize, Tensor)>,
    weight: f64,
}

impl ProjectionInputs for LllitePatch {
    fn delta(&self, layer: usize, which: Projection, x: &Tensor) -> CResult<Option<Tensor>> {
        match self.by_layer.get(&(layer, ProjKey::of(which))) {
            Some((i, cond)) => {
                let m = &self.model.modules[*i];
                let cond = cond.to_dtype(x.dtype())?;
                m.delta(&cond, x, self.weight).map(Some)
            }
            None => Ok(None),
        }
    }
}
