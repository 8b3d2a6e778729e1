//! diffusers UNet parameter names -> the original LDM / A1111 names (`input_blocks`,
//! `middle_block`, `output_blocks`, `out`), as diffusers' `convert_ldm_unet_checkpoint` pairs
//! them. Used by ControlNet files in lllyasviel format and by kohya LoRAs with LDM names.

use super::config::{BlockKind, UNetConfig};

fn resnet(rest: &str) -> String {
    let (head, tail) = rest.split_once('.').unwrap_or((rest, ""));
    let mapped = match head {
        "norm1" => "in_layers.0",
        "conv1" => "in_layers.2",
        "time_emb_proj" => "emb_layers.1",
        "norm2" => "out_layers.0",
        "conv2" => "out_layers.3",
        "conv_shortcut" => "skip_connection",
        other => other,
    };
    if tail.is_empty() {
        mapped.to_string()
    } else {
        format!("{mapped}.{tail}")
    }
}

/// The LDM name of a diffusers UNet parameter or module path, or `None` when the name is not a
/// UNet name. Assumes the same number of resnets per block (true of every SD UNet).
pub fn unet_ldm_name(name: &str, cfg: &UNetConfig) -> Option<String> {
    let l = cfg.layers_per_block[0];
    let p: Vec<&str> = name.split('.').collect();
    let rest = |k: usize| p.get(k..).map(|r| r.join(".")).unwrap_or_default();
    let join = |a: String, b: String| if b.is_empty() { a } else { format!("{a}.{b}") };
    Some(match p.as_slice() {
        ["conv_in", ..] => join("input_blocks.0.0".into(), rest(1)),
        ["time_embedding", "linear_1", ..] => join("time_embed.0".into(), rest(2)),
        ["time_embedding", "linear_2", ..] => join("time_embed.2".into(), rest(2)),
        // SDXL's added embedding (sgm's `label_emb`)
        ["add_embedding", "linear_1", ..] => join("label_emb.0.0".into(), rest(2)),
        ["add_embedding", "linear_2", ..] => join("label_emb.0.2".into(), rest(2)),
        ["down_blocks", i, "resnets", j, ..] => {
            let n = 1 + i.parse::<usize>().ok()? * (l + 1) + j.parse::<usize>().ok()?;
            join(format!("input_blocks.{n}.0"), resnet(&rest(4)))
        }
        ["down_blocks", i, "attentions", j, ..] => {
            let n = 1 + i.parse::<usize>().ok()? * (l + 1) + j.parse::<usize>().ok()?;
            join(format!("input_blocks.{n}.1"), rest(4))
        }
        ["down_blocks", i, "downsamplers", "0", "conv", ..] => join(
            format!(
                "input_blocks.{}.0.op",
                (i.parse::<usize>().ok()? + 1) * (l + 1)
            ),
            rest(5),
        ),
        ["mid_block", "resnets", j, ..] => join(
            format!("middle_block.{}", if *j == "0" { 0 } else { 2 }),
            resnet(&rest(3)),
        ),
        ["mid_block", "attentions", _, ..] => join("middle_block.1".into(), rest(3)),
        ["up_blocks", i, "resnets", j, ..] => {
            let n = i.parse::<usize>().ok()? * (l + 1) + j.parse::<usize>().ok()?;
            join(format!("output_blocks.{n}.0"), resnet(&rest(4)))
        }
        ["up_blocks", i, "attentions", j, ..] => {
            let n = i.parse::<usize>().ok()? * (l + 1) + j.parse::<usize>().ok()?;
            join(format!("output_blocks.{n}.1"), rest(4))
        }
        ["up_blocks", i, "upsamplers", "0", "conv", ..] => {
            let i: usize = i.parse().ok()?;
            let slot = if cfg.up_blocks.get(i) == Some(&BlockKind::CrossAttn) {
                2
            } else {
                1
            };
            join(
                format!("output_blocks.{}.{slot}.conv", i * (l + 1) + l),
                rest(5),
            )
        }
        ["conv_norm_out", ..] => join("out.0".into(), rest(1)),
        ["conv_out", ..] => join("out.2".into(), rest(1)),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_names_follow_the_ldm_layout() {
        let cfg = UNetConfig::sd15();
        let n = |s: &str| unet_ldm_name(s, &cfg).unwrap();
        assert_eq!(n("conv_in.weight"), "input_blocks.0.0.weight");
        assert_eq!(
            n("down_blocks.0.resnets.1.conv1.weight"),
            "input_blocks.2.0.in_layers.2.weight"
        );
        assert_eq!(
            n("down_blocks.1.attentions.0.proj_in.weight"),
            "input_blocks.4.1.proj_in.weight"
        );
        assert_eq!(
            n("down_blocks.2.downsamplers.0.conv.bias"),
            "input_blocks.9.0.op.bias"
        );
        assert_eq!(
            n("mid_block.resnets.1.time_emb_proj.weight"),
            "middle_block.2.emb_layers.1.weight"
        );
        assert_eq!(
            n("mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"),
            "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
        );
        assert_eq!(
            n("up_blocks.0.resnets.2.conv_shortcut.weight"),
            "output_blocks.2.0.skip_connection.weight"
        );
        assert_eq!(
            n("up_blocks.0.upsamplers.0.conv.weight"),
            "output_blocks.2.1.conv.weight"
        );
        assert_eq!(
            n("up_blocks.1.upsamplers.0.conv.weight"),
            "output_blocks.5.2.conv.weight"
        );
        assert_eq!(
            n("up_blocks.3.attentions.2.proj_out.weight"),
            "output_blocks.11.1.proj_out.weight"
        );
        assert_eq!(n("conv_out.weight"), "out.2.weight");
        assert!(unet_ldm_name("text_model.x", &cfg).is_none());
    }
}
