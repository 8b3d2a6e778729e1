//! Model-free pixel operations (preprocessors.md, section 4).

use sd_plugins_api::{
    hwc3, register_preprocessor, ImageBuf, ParamSpec, Params, PluginError, Preprocessor,
};

/// `invert`: `255 - HWC3(img)`.
pub struct Invert;

impl Preprocessor for Invert {
    fn name(&self) -> &str {
        "invert"
    }
    fn description(&self) -> &str {
        "255 - pixel (white lines on black from black lines on white)"
    }
    fn params(&self) -> Vec<ParamSpec> {
        Vec::new()
    }
    fn process(&self, input: &ImageBuf, _: &Params) -> Result<ImageBuf, PluginError> {
        let mut out = hwc3(input);
        out.data.iter_mut().for_each(|v| *v = 255 - *v);
        Ok(out)
    }
}

/// `threshold` (sd-webui-controlnet): 255 where min(R, G, B) > t, else 0.
pub struct Threshold;

impl Preprocessor for Threshold {
    fn name(&self) -> &str {
        "threshold"
    }
    fn description(&self) -> &str {
        "white where every channel is above the threshold, black elsewhere"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::int(
            "threshold",
            127,
            0,
            255,
            "a pixel is white when min(R, G, B) > threshold",
        )]
    }
    fn process(&self, input: &ImageBuf, params: &Params) -> Result<ImageBuf, PluginError> {
        let t = params.int("threshold").unwrap_or(127);
        let rgb = hwc3(input);
        let mut data = Vec::with_capacity(rgb.data.len());
        for px in rgb.data.chunks_exact(3) {
            let v = if (*px.iter().min().unwrap() as i64) > t {
                255
            } else {
                0
            };
            data.extend([v, v, v]);
        }
        Ok(ImageBuf { data, ..rgb })
    }
}

register_preprocessor!(Invert);
register_preprocessor!(Threshold);

#[cfg(test)]
mod tests {
    use super::*;
    use sd_plugins_api::{resolve_params, ParamValue};

    #[test]
    fn invert_and_threshold() {
        let img = ImageBuf::new(2, 1, 3, vec![0, 10, 255, 200, 130, 128]).unwrap();
        let none = Params::default();
        assert_eq!(
            Invert.process(&img, &none).unwrap().data,
            vec![255, 245, 0, 55, 125, 127]
        );
        let p = resolve_params(&Threshold.params(), &[]).unwrap();
        assert_eq!(
            Threshold.process(&img, &p).unwrap().data,
            vec![0, 0, 0, 255, 255, 255]
        );
        let p = resolve_params(
            &Threshold.params(),
            &[("threshold".into(), ParamValue::Int(128))],
        )
        .unwrap();
        assert_eq!(Threshold.process(&img, &p).unwrap().data, vec![0; 6]);
    }

    #[test]
    fn registered() {
        let reg = crate::registry();
        assert!(reg.preprocessor("invert").is_some());
        assert!(reg.preprocessor("threshold").is_some());
    }
}
