//! An example preprocessor plugin: posterize to `levels` values per channel.
//!
//! Build: `cargo build --release -p sdctl-plugin-posterize`, then
//! `sdctl preprocessors list --plugin target/release/libsdctl_plugin_posterize.so`.

use sd_plugins_api::{export_plugin, hwc3, ImageBuf, ParamSpec, Params, PluginError, Preprocessor};

#[derive(Default)]
pub struct Posterize;

/// Level of value `v` with `levels` levels: `floor(v * levels / 256)` spread back over 0..=255.
pub fn posterize(v: u8, levels: u32) -> u8 {
    let q = v as u32 * levels / 256;
    (q * 255 / (levels - 1)) as u8
}

impl Preprocessor for Posterize {
    fn name(&self) -> &str {
        "posterize"
    }
    fn description(&self) -> &str {
        "reduce every channel to a few levels (flat colour regions, for colour/tile ControlNets)"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::int("levels", 4, 2, 256, "values per channel")]
    }
    fn process(&self, input: &ImageBuf, params: &Params) -> Result<ImageBuf, PluginError> {
        let levels = params.int("levels").unwrap_or(4) as u32;
        let mut out = hwc3(input);
        out.data.iter_mut().for_each(|v| *v = posterize(*v, levels));
        Ok(out)
    }
}

export_plugin!(preprocessor: Posterize);
