//! A control unit as the user writes it: `model=PATH,image=PATH[,weight=F][,start=F][,end=F]
//! [,mode=...][,resize=...][,preprocessor=NAME][,mask=PATH]` on the command line, or the same
//! keys in a `[[control]]` table of a config file.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use candle_core::Device;
use sd_pipeline::StableDiffusion;

use crate::control_image::{load_control_image, load_unit_mask};
use crate::error::{ControlError, Result};
use crate::load::load_controlnet;
use crate::model::ControlNetModel;
use crate::units::{ControlMode, ControlUnit, ResizeMode};

#[derive(Debug, Clone, PartialEq)]
pub struct UnitSpec {
    pub model: PathBuf,
    pub image: PathBuf,
    pub weight: f64,
    pub start: f64,
    pub end: f64,
    pub mode: ControlMode,
    pub resize: ResizeMode,
    pub preprocessor: Option<String>,
    pub mask: Option<PathBuf>,
    pub layer_weights: Option<Vec<f64>>,
}

impl UnitSpec {
    pub fn new(model: impl Into<PathBuf>, image: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            image: image.into(),
            weight: 1.0,
            start: 0.0,
            end: 1.0,
            mode: ControlMode::Balanced,
            resize: ResizeMode::Crop,
            preprocessor: None,
            mask: None,
            layer_weights: None,
        }
    }

    /// Check values that need no files.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ControlError::Invalid(m));
        if !(0.0..=1.0).contains(&self.start)
            || !(0.0..=1.0).contains(&self.end)
            || self.start > self.end
        {
            return bad(format!(
                "control start={} end={}: need 0 <= start <= end <= 1",
                self.start, self.end
            ));
        }
        if !self.weight.is_finite() {
            return bad(format!("control weight={} is not a number", self.weight));
        }
        if let Some(p) = &self.preprocessor {
            if p != "none" {
                return bad(format!(
                    "control preprocessor={p}: no preprocessor is available in this build (use a ready control image, or preprocessor=none)"
                ));
            }
        }
        Ok(())
    }

    /// Load the ControlNet, the image (and mask) at the generation size, checking that the
    /// ControlNet fits the base model, before any denoising.
    pub fn build(
        &self,
        sd: &StableDiffusion,
        width: usize,
        height: usize,
        cache: &mut Vec<(PathBuf, Arc<ControlNetModel>)>,
    ) -> Result<ControlUnit> {
        self.validate()?;
        let device: &Device = &sd.device;
        let net = match cache.iter().find(|(p, _)| p == &self.model) {
            Some((_, n)) => n.clone(),
            None => {
                let n = Arc::new(load_controlnet(
                    &self.model,
                    sd.unet.config(),
                    device,
                    sd.dtype,
                )?);
                cache.push((self.model.clone(), n.clone()));
                n
            }
        };
        let image = load_control_image(&self.image, width, height, self.resize, device)?;
        let mask = self
            .mask
            .as_deref()
            .map(|m| load_unit_mask(m, width, height, device))
            .transpose()?;
        let unit = ControlUnit {
            net,
            image,
            weight: self.weight,
            start: self.start,
            end: self.end,
            mode: self.mode,
            layer_weights: self.layer_weights.clone(),
            mask,
        };
        let latent_channels = sd.vae.config().latent_channels;
        unit.validate_for(sd.unet.config(), sd.unet.num_skips(), latent_channels)
            .map_err(|e| match e {
                ControlError::Invalid(m) => ControlError::file(&self.model, m),
                e => e,
            })?;
        Ok(unit)
    }
}

fn num(key: &str, v: &str) -> Result<f64> {
    v.parse::<f64>()
        .map_err(|_| ControlError::Invalid(format!("control {key}={v:?} is not a number")))
}

impl FromStr for UnitSpec {
    type Err = ControlError;

    /// `model=PATH,image=PATH[,weight=F][,start=F][,end=F][,mode=M][,resize=R][,preprocessor=N][,mask=PATH]`
    fn from_str(s: &str) -> Result<Self> {
        let mut model = None;
        let mut image = None;
        let mut spec = UnitSpec::new("", "");
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| {
                ControlError::Invalid(format!("control {part:?}: expected key=value (keys: model, image, weight, start, end, mode, resize, preprocessor, mask)"))
            })?;
            let (k, v) = (k.trim(), v.trim());
            match k {
                "model" => model = Some(PathBuf::from(v)),
                "image" => image = Some(PathBuf::from(v)),
                "weight" => spec.weight = num(k, v)?,
                "start" => spec.start = num(k, v)?,
                "end" => spec.end = num(k, v)?,
                "mode" => spec.mode = v.parse()?,
                "resize" => spec.resize = v.parse()?,
                "preprocessor" => spec.preprocessor = Some(v.to_string()),
                "mask" => spec.mask = Some(PathBuf::from(v)),
                other => {
                    return Err(ControlError::Invalid(format!(
                        "unknown control key {other:?} (keys: model, image, weight, start, end, mode, resize, preprocessor, mask)"
                    )))
                }
            }
        }
        spec.model = model.ok_or_else(|| {
            ControlError::Invalid(format!("control {s:?}: model=PATH is required"))
        })?;
        spec.image = image.ok_or_else(|| {
            ControlError::Invalid(format!("control {s:?}: image=PATH is required"))
        })?;
        spec.validate()?;
        Ok(spec)
    }
}

/// Resolve a path written relative to `base` (the directory a spec came from).
pub fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key() {
        let s: UnitSpec = "model=cn,image=pose.png,weight=0.7,start=0.1,end=0.8,mode=control,resize=fill,mask=m.png,preprocessor=none"
            .parse()
            .unwrap();
        assert_eq!(s.model, PathBuf::from("cn"));
        assert_eq!(s.weight, 0.7);
        assert_eq!((s.start, s.end), (0.1, 0.8));
        assert_eq!(s.mode, ControlMode::Control);
        assert_eq!(s.resize, ResizeMode::Fill);
        assert_eq!(s.mask, Some(PathBuf::from("m.png")));
    }

    #[test]
    fn errors_name_the_key_and_value() {
        let e = |s: &str| s.parse::<UnitSpec>().unwrap_err().to_string();
        assert!(e("image=a.png").contains("model=PATH"));
        assert!(e("model=a,image=b,weight=x").contains("weight=\"x\""));
        assert!(e("model=a,image=b,mode=strong").contains("strong"));
        assert!(e("model=a,image=b,start=0.9,end=0.2").contains("start=0.9"));
        assert!(e("model=a,image=b,colour=red").contains("colour"));
        assert!(e("model=a,image=b,preprocessor=canny").contains("canny"));
    }
}
