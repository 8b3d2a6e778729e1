//! A1111's `<lora:NAME:WEIGHT>` / `<lora:NAME:TE_WEIGHT:UNET_WEIGHT>` prompt tags.

/// A tag found in a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTag {
    pub name: String,
    pub te_weight: f64,
    pub unet_weight: f64,
}

/// Remove every `<lora:...>` tag from `prompt`, returning the cleaned text and the tags.
/// A tag with an unreadable weight is an error naming it.
pub fn extract_lora_tags(prompt: &str) -> Result<(String, Vec<LoraTag>), String> {
    let mut out = String::with_capacity(prompt.len());
    let mut tags = Vec::new();
    let mut rest = prompt;
    while let Some(start) = rest.find("<lora:") {
        let Some(end) = rest[start..].find('>') else {
            break;
        };
        out.push_str(&rest[..start]);
        let body = &rest[start + 6..start + end];
        let parts: Vec<&str> = body.split(':').collect();
        let num = |s: &str| {
            s.trim()
                .parse::<f64>()
                .map_err(|_| format!("<lora:{body}>: weight {s:?} is not a number"))
        };
        let tag = match parts.as_slice() {
            [name] => LoraTag {
                name: name.trim().into(),
                te_weight: 1.0,
                unet_weight: 1.0,
            },
            [name, w] => LoraTag {
                name: name.trim().into(),
                te_weight: num(w)?,
                unet_weight: num(w)?,
            },
            [name, te, unet, ..] => LoraTag {
                name: name.trim().into(),
                te_weight: num(te)?,
                unet_weight: num(unet)?,
            },
            [] => return Err("<lora:> without a name".into()),
        };
        if tag.name.is_empty() {
            return Err(format!("<lora:{body}>: empty name"));
        }
        tags.push(tag);
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    let cleaned = out.split_whitespace().collect::<Vec<_>>().join(" ");
    Ok((cleaned, tags))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_removed_and_parsed() {
        let (p, t) =
            extract_lora_tags("a cat <lora:watercolor:0.8>, sitting <lora:detail:0.5:1.2>")
                .unwrap();
        assert_eq!(p, "a cat , sitting");
        assert_eq!(
            t[0],
            LoraTag {
                name: "watercolor".into(),
                te_weight: 0.8,
                unet_weight: 0.8
            }
        );
        assert_eq!(
            t[1],
            LoraTag {
                name: "detail".into(),
                te_weight: 0.5,
                unet_weight: 1.2
            }
        );
        let (p, t) = extract_lora_tags("<lora:x>plain").unwrap();
        assert_eq!((p.as_str(), t[0].unet_weight), ("plain", 1.0));
        assert!(extract_lora_tags("<lora:x:abc>")
            .unwrap_err()
            .contains("abc"));
        assert_eq!(extract_lora_tags("no tags").unwrap().0, "no tags");
    }
}
