//! Where each diffusers parameter lives in an LDM / A1111 single file, the inverse of what
//! diffusers' `scripts/convert_diffusers_to_original_stable_diffusion.py` writes.

use crate::model::config::UNetConfig;
use crate::model::ldm_names::unet_ldm_name;

pub const UNET: &str = "model.diffusion_model.";
pub const VAE: &str = "first_stage_model.";
pub const CLIP: &str = "cond_stage_model.transformer.";
pub const OPENCLIP: &str = "cond_stage_model.model.";
/// sgm's conditioner (SDXL): CLIP-L, bigG, and the refiner's bigG.
pub const SDXL_CLIP: &str = "conditioner.embedders.0.transformer.";
pub const SDXL_BIGG: &str = "conditioner.embedders.1.model.";
pub const SDXL_REFINER_BIGG: &str = "conditioner.embedders.0.model.";

/// How a stored tensor becomes the diffusers parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transform {
    None,
    /// A 1x1 conv weight `[o, i, 1, 1]` read as a linear weight `[o, i]`.
    Squeeze1x1,
    /// Rows `[k * n / 3, (k + 1) * n / 3)` of a fused q/k/v projection.
    Third(usize),
    /// A matrix stored for `x @ P` read as a linear weight `P^T` (OpenCLIP's
    /// `text_projection`).
    Transpose,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    pub name: String,
    pub transform: Transform,
}

fn src(name: String) -> Option<Source> {
    Some(Source {
        name,
        transform: Transform::None,
    })
}

/// UNet parameter -> LDM name (with the `model.diffusion_model.` prefix).
pub fn unet(name: &str, cfg: &UNetConfig) -> Option<Source> {
    src(format!("{UNET}{}", unet_ldm_name(name, cfg)?))
}

fn vae_resnet(rest: &str) -> String {
    rest.replacen("conv_shortcut", "nin_shortcut", 1)
}

/// VAE parameter -> LDM name. `levels` is the number of resolution levels.
pub fn vae(name: &str, levels: usize) -> Option<Source> {
    let p: Vec<&str> = name.split('.').collect();
    let rest = |k: usize| p[k..].join(".");
    let s = |n: String| src(format!("{VAE}{n}"));
    match p.as_slice() {
        [side @ ("encoder" | "decoder"), "conv_in" | "conv_out", ..] => {
            s(format!("{side}.{}", rest(1)))
        }
        [side @ ("encoder" | "decoder"), "conv_norm_out", ..] => {
            s(format!("{side}.norm_out.{}", rest(2)))
        }
        ["encoder", "down_blocks", i, "resnets", j, ..] => s(format!(
            "encoder.down.{i}.block.{j}.{}",
            vae_resnet(&rest(5))
        )),
        ["encoder", "down_blocks", i, "downsamplers", "0", "conv", ..] => {
            s(format!("encoder.down.{i}.downsample.conv.{}", rest(6)))
        }
        ["decoder", "up_blocks", i, "resnets", j, ..] => {
            let i = levels.checked_sub(1 + i.parse::<usize>().ok()?)?;
            s(format!("decoder.up.{i}.block.{j}.{}", vae_resnet(&rest(5))))
        }
        ["decoder", "up_blocks", i, "upsamplers", "0", "conv", ..] => {
            let i = levels.checked_sub(1 + i.parse::<usize>().ok()?)?;
            s(format!("decoder.up.{i}.upsample.conv.{}", rest(6)))
        }
        [side, "mid_block", "resnets", k, ..] => {
            let k: usize = k.parse().ok()?;
            s(format!(
                "{side}.mid.block_{}.{}",
                k + 1,
                vae_resnet(&rest(4))
            ))
        }
        [side, "mid_block", "attentions", "0", module, ..] => {
            let (ldm, tail) = match *module {
                "group_norm" => ("norm", rest(5)),
                "to_q" => ("q", rest(5)),
                "to_k" => ("k", rest(5)),
                "to_v" => ("v", rest(5)),
                "to_out" => ("proj_out", rest(6)),
                _ => return None,
            };
            let transform = if ldm != "norm" && tail == "weight" {
                Transform::Squeeze1x1
            } else {
                Transform::None
            };
            Some(Source {
                name: format!("{VAE}{side}.mid.attn_1.{ldm}.{tail}"),
                transform,
            })
        }
        ["quant_conv" | "post_quant_conv", ..] => s(name.to_string()),
        _ => None,
    }
}

/// CLIP parameter (with or without `text_model.`) -> its name under `prefix` (SD1's
/// `cond_stage_model.transformer.`, SDXL's `conditioner.embedders.0.transformer.`).
/// `text_model` tells whether the file keeps transformers' `text_model.` level (most do).
pub fn clip(name: &str, prefix: &str, text_model: bool) -> Option<Source> {
    let bare = name.strip_prefix("text_model.").unwrap_or(name);
    if text_model {
        src(format!("{prefix}text_model.{bare}"))
    } else {
        src(format!("{prefix}{bare}"))
    }
}

/// CLIP text-encoder parameter -> OpenCLIP name under `prefix` (the fused `in_proj` split into
/// q, k, v; `text_projection` transposed).
pub fn openclip(name: &str, prefix: &str) -> Option<Source> {
    if name == "text_projection.weight" {
        return Some(Source {
            name: format!("{prefix}text_projection"),
            transform: Transform::Transpose,
        });
    }
    let bare = name.strip_prefix("text_model.").unwrap_or(name);
    let p: Vec<&str> = bare.split('.').collect();
    let s = |n: String| src(format!("{prefix}{n}"));
    match p.as_slice() {
        ["embeddings", "token_embedding", "weight"] => s("token_embedding.weight".into()),
        ["embeddings", "position_embedding", "weight"] => s("positional_embedding".into()),
        ["final_layer_norm", t] => s(format!("ln_final.{t}")),
        ["encoder", "layers", i, "self_attn", proj, t] => {
            let k = match *proj {
                "q_proj" => 0,
                "k_proj" => 1,
                "v_proj" => 2,
                "out_proj" => return s(format!("transformer.resblocks.{i}.attn.out_proj.{t}")),
                _ => return None,
            };
            Some(Source {
                name: format!("{prefix}transformer.resblocks.{i}.attn.in_proj_{t}"),
                transform: Transform::Third(k),
            })
        }
        ["encoder", "layers", i, ln @ ("layer_norm1" | "layer_norm2"), t] => {
            let l = if *ln == "layer_norm1" { "ln_1" } else { "ln_2" };
            s(format!("transformer.resblocks.{i}.{l}.{t}"))
        }
        ["encoder", "layers", i, "mlp", fc, t] => {
            let c = if *fc == "fc1" { "c_fc" } else { "c_proj" };
            s(format!("transformer.resblocks.{i}.mlp.{c}.{t}"))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vae_names_follow_the_conversion_script() {
        let v = |n: &str| vae(n, 4).unwrap();
        assert_eq!(
            v("encoder.down_blocks.1.resnets.0.conv_shortcut.weight").name,
            "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight"
        );
        assert_eq!(
            v("decoder.up_blocks.0.resnets.2.conv1.bias").name,
            "first_stage_model.decoder.up.3.block.2.conv1.bias"
        );
        assert_eq!(
            v("decoder.up_blocks.2.upsamplers.0.conv.weight").name,
            "first_stage_model.decoder.up.1.upsample.conv.weight"
        );
        assert_eq!(
            v("encoder.mid_block.resnets.1.norm2.weight").name,
            "first_stage_model.encoder.mid.block_2.norm2.weight"
        );
        let q = v("decoder.mid_block.attentions.0.to_out.0.weight");
        assert_eq!(
            (q.name.as_str(), q.transform),
            (
                "first_stage_model.decoder.mid.attn_1.proj_out.weight",
                Transform::Squeeze1x1
            )
        );
        assert_eq!(
            v("decoder.mid_block.attentions.0.to_q.bias").transform,
            Transform::None
        );
        assert_eq!(
            v("encoder.conv_norm_out.weight").name,
            "first_stage_model.encoder.norm_out.weight"
        );
    }

    #[test]
    fn openclip_names_split_the_fused_projection() {
        let o = |n: &str| openclip(n, OPENCLIP).unwrap();
        let k = o("text_model.encoder.layers.3.self_attn.k_proj.weight");
        assert_eq!(
            (k.name.as_str(), k.transform),
            (
                "cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight",
                Transform::Third(1)
            )
        );
        assert_eq!(
            o("encoder.layers.0.mlp.fc2.bias").name,
            "cond_stage_model.model.transformer.resblocks.0.mlp.c_proj.bias"
        );
        assert_eq!(
            o("embeddings.position_embedding.weight").name,
            "cond_stage_model.model.positional_embedding"
        );
        assert_eq!(
            o("final_layer_norm.weight").name,
            "cond_stage_model.model.ln_final.weight"
        );
    }
}

fn resnet_leaf_inverse(rest: &str) -> String {
    let (head, tail) = rest.split_once('.').unwrap_or((rest, ""));
    let mapped = match head {
        "in_layers" | "emb_layers" | "out_layers" => {
            let (idx, t) = tail.split_once('.').unwrap_or((tail, ""));
            let m = match (head, idx) {
                ("in_layers", "0") => "norm1",
                ("in_layers", "2") => "conv1",
                ("emb_layers", "1") => "time_emb_proj",
                ("out_layers", "0") => "norm2",
                ("out_layers", "3") => "conv2",
                _ => return String::new(),
            };
            return format!("{m}.{t}");
        }
        "skip_connection" => "conv_shortcut",
        _ => return String::new(),
    };
    format!("{mapped}.{tail}")
}

/// The diffusers UNet name of an LDM key (without `model.diffusion_model.`), checked by
/// mapping it back.
pub fn unet_inverse(ldm: &str, cfg: &UNetConfig) -> Option<String> {
    let l = cfg.layers_per_block[0] + 1;
    let p: Vec<&str> = ldm.split('.').collect();
    let rest = |k: usize| p.get(k..).map(|r| r.join(".")).unwrap_or_default();
    let num = |s: &str| s.parse::<usize>().ok();
    let name = match p.as_slice() {
        ["input_blocks", "0", "0", ..] => format!("conv_in.{}", rest(3)),
        ["time_embed", "0", ..] => format!("time_embedding.linear_1.{}", rest(2)),
        ["time_embed", "2", ..] => format!("time_embedding.linear_2.{}", rest(2)),
        ["label_emb", "0", "0", ..] => format!("add_embedding.linear_1.{}", rest(3)),
        ["label_emb", "0", "2", ..] => format!("add_embedding.linear_2.{}", rest(3)),
        ["input_blocks", n, "0", "op", ..] => {
            format!(
                "down_blocks.{}.downsamplers.0.conv.{}",
                num(n)? / l - 1,
                rest(4)
            )
        }
        ["input_blocks", n, "0", ..] => {
            let n = num(n)? - 1;
            format!(
                "down_blocks.{}.resnets.{}.{}",
                n / l,
                n % l,
                resnet_leaf_inverse(&rest(3))
            )
        }
        ["input_blocks", n, "1", ..] => {
            let n = num(n)? - 1;
            format!("down_blocks.{}.attentions.{}.{}", n / l, n % l, rest(3))
        }
        ["middle_block", "1", ..] => format!("mid_block.attentions.0.{}", rest(2)),
        ["middle_block", k @ ("0" | "2"), ..] => format!(
            "mid_block.resnets.{}.{}",
            if *k == "0" { 0 } else { 1 },
            resnet_leaf_inverse(&rest(2))
        ),
        ["output_blocks", n, "0", ..] => {
            let n = num(n)?;
            format!(
                "up_blocks.{}.resnets.{}.{}",
                n / l,
                n % l,
                resnet_leaf_inverse(&rest(3))
            )
        }
        ["output_blocks", n, _, "conv", ..] => {
            format!("up_blocks.{}.upsamplers.0.conv.{}", num(n)? / l, rest(4))
        }
        ["output_blocks", n, "1", ..] => {
            let n = num(n)?;
            format!("up_blocks.{}.attentions.{}.{}", n / l, n % l, rest(3))
        }
        ["out", "0", ..] => format!("conv_norm_out.{}", rest(2)),
        ["out", "2", ..] => format!("conv_out.{}", rest(2)),
        _ => return None,
    };
    (unet_ldm_name(&name, cfg).as_deref() == Some(ldm)).then_some(name)
}

/// The diffusers VAE name of an LDM key (without `first_stage_model.`), checked by mapping
/// it back.
pub fn vae_inverse(ldm: &str, levels: usize) -> Option<String> {
    let p: Vec<&str> = ldm.split('.').collect();
    let rest = |k: usize| p.get(k..).map(|r| r.join(".")).unwrap_or_default();
    let res = |r: String| r.replacen("nin_shortcut", "conv_shortcut", 1);
    let name = match p.as_slice() {
        [_, "conv_in" | "conv_out", ..] => ldm.to_string(),
        [side, "norm_out", ..] => format!("{side}.conv_norm_out.{}", rest(2)),
        ["encoder", "down", i, "block", j, ..] => {
            format!("encoder.down_blocks.{i}.resnets.{j}.{}", res(rest(5)))
        }
        ["encoder", "down", i, "downsample", "conv", ..] => {
            format!("encoder.down_blocks.{i}.downsamplers.0.conv.{}", rest(5))
        }
        ["decoder", "up", i, "block", j, ..] => {
            let i = levels.checked_sub(1 + i.parse::<usize>().ok()?)?;
            format!("decoder.up_blocks.{i}.resnets.{j}.{}", res(rest(5)))
        }
        ["decoder", "up", i, "upsample", "conv", ..] => {
            let i = levels.checked_sub(1 + i.parse::<usize>().ok()?)?;
            format!("decoder.up_blocks.{i}.upsamplers.0.conv.{}", rest(5))
        }
        [side, "mid", b, ..] if b.starts_with("block_") => {
            let k: usize = b.strip_prefix("block_")?.parse().ok()?;
            format!(
                "{side}.mid_block.resnets.{}.{}",
                k.checked_sub(1)?,
                res(rest(3))
            )
        }
        [side, "mid", "attn_1", m, ..] => {
            let d = match *m {
                "norm" => "group_norm",
                "q" => "to_q",
                "k" => "to_k",
                "v" => "to_v",
                "proj_out" => "to_out.0",
                _ => return None,
            };
            format!("{side}.mid_block.attentions.0.{d}.{}", rest(4))
        }
        ["quant_conv" | "post_quant_conv", ..] => ldm.to_string(),
        _ => return None,
    };
    (vae(&name, levels).map(|s| s.name) == Some(format!("{VAE}{ldm}"))).then_some(name)
}

/// The diffusers text-encoder names an OpenCLIP key (without `cond_stage_model.model.`) holds:
/// three for a fused in_proj (q, k, v), one otherwise.
pub fn openclip_inverse(key: &str) -> Vec<String> {
    let p: Vec<&str> = key.split('.').collect();
    let one = |s: String| vec![s];
    match p.as_slice() {
        ["token_embedding", "weight"] => one("text_model.embeddings.token_embedding.weight".into()),
        ["positional_embedding"] => one("text_model.embeddings.position_embedding.weight".into()),
        ["ln_final", t] => one(format!("text_model.final_layer_norm.{t}")),
        ["transformer", "resblocks", i, "attn", inp, ..] if inp.starts_with("in_proj_") => {
            let t = inp.strip_prefix("in_proj_").unwrap_or("weight");
            ["q_proj", "k_proj", "v_proj"]
                .iter()
                .map(|q| format!("text_model.encoder.layers.{i}.self_attn.{q}.{t}"))
                .collect()
        }
        ["transformer", "resblocks", i, "attn", "out_proj", t] => one(format!(
            "text_model.encoder.layers.{i}.self_attn.out_proj.{t}"
        )),
        ["transformer", "resblocks", i, ln @ ("ln_1" | "ln_2"), t] => one(format!(
            "text_model.encoder.layers.{i}.{}.{t}",
            if *ln == "ln_1" {
                "layer_norm1"
            } else {
                "layer_norm2"
            }
        )),
        ["transformer", "resblocks", i, "mlp", c, t] => one(format!(
            "text_model.encoder.layers.{i}.mlp.{}.{t}",
            if *c == "c_fc" { "fc1" } else { "fc2" }
        )),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod inverse_tests {
    use super::*;

    #[test]
    fn inverses_round_trip() {
        let cfg = UNetConfig::sd15();
        for n in [
            "conv_in.weight",
            "down_blocks.0.resnets.1.conv1.weight",
            "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            "down_blocks.2.downsamplers.0.conv.bias",
            "mid_block.resnets.1.time_emb_proj.weight",
            "mid_block.attentions.0.proj_out.bias",
            "up_blocks.0.resnets.2.conv_shortcut.weight",
            "up_blocks.0.upsamplers.0.conv.weight",
            "up_blocks.1.upsamplers.0.conv.weight",
            "up_blocks.3.attentions.2.norm.weight",
            "conv_norm_out.bias",
            "time_embedding.linear_2.weight",
        ] {
            let ldm = unet_ldm_name(n, &cfg).unwrap();
            assert_eq!(unet_inverse(&ldm, &cfg).as_deref(), Some(n), "{ldm}");
        }
        assert_eq!(unet_inverse("input_blocks.1.0.bogus.weight", &cfg), None);
        for n in [
            "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
            "decoder.up_blocks.0.resnets.2.norm1.bias",
            "decoder.up_blocks.2.upsamplers.0.conv.weight",
            "encoder.mid_block.attentions.0.to_out.0.weight",
            "decoder.mid_block.resnets.1.conv2.weight",
            "encoder.conv_norm_out.weight",
            "decoder.conv_in.bias",
            "post_quant_conv.weight",
        ] {
            let ldm = vae(n, 4).unwrap().name;
            let bare = ldm.strip_prefix(VAE).unwrap();
            assert_eq!(vae_inverse(bare, 4).as_deref(), Some(n), "{ldm}");
        }
        assert_eq!(
            openclip_inverse("transformer.resblocks.2.attn.in_proj_bias").len(),
            3
        );
    }
}
