//! Acts at every hook point with simple, exactly reproducible arithmetic (see
//! `cli/tests/plugins.rs`, which runs an in-process twin and compares):
//! conditioning x `cond_scale`; latents x 0.99 before and x 1.01 after each step; constant
//! residuals of value `residual` in the shapes `layout` lists ("C:DOWN" per tensor, relative
//! to the latent size, mid last); the noise prediction is plain CFG; images become 1 - image;
//! the UNet's `conv_in.bias` gets `bias_delta` added while weights load.

use sd_plugins_api::{
    export_plugin, HookPlugin, OwnedTensor, ParamSpec, Params, Part, StepInfo, TensorView,
};

pub struct EveryPoint {
    cond_scale: f32,
    residual: f32,
    bias_delta: f32,
    layout: Vec<(usize, usize)>,
}

fn scale(t: TensorView<'_>, s: f32) -> Vec<f32> {
    t.data.iter().map(|v| v * s).collect()
}

impl HookPlugin for EveryPoint {
    fn name() -> &'static str {
        "every_point"
    }
    fn description() -> &'static str {
        "test plugin: acts at every hook point"
    }
    fn params() -> Vec<ParamSpec> {
        vec![
            ParamSpec::float("cond_scale", 1.5, 0.0, 10.0, "text conditioning multiplier"),
            ParamSpec::float("residual", 0.05, -1.0, 1.0, "value of every residual"),
            ParamSpec::float(
                "bias_delta",
                0.01,
                -1.0,
                1.0,
                "added to the UNet's conv_in.bias",
            ),
            ParamSpec::string(
                "layout",
                "16:1 16:1 16:1 16:2 32:2 32:2 32:4 32:4 32:4 32:4",
                "residual channels:downscale, down blocks then mid",
            ),
        ]
    }
    fn create(params: &Params) -> Result<Self, String> {
        let layout = params
            .str("layout")
            .unwrap_or_default()
            .split_whitespace()
            .map(|e| {
                let (c, d) = e.split_once(':').ok_or(format!("layout entry {e:?}"))?;
                Ok((
                    c.parse().map_err(|_| format!("layout {e:?}"))?,
                    d.parse().map_err(|_| format!("layout {e:?}"))?,
                ))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self {
            cond_scale: params.float("cond_scale").unwrap_or(1.5) as f32,
            residual: params.float("residual").unwrap_or(0.05) as f32,
            bias_delta: params.float("bias_delta").unwrap_or(0.01) as f32,
            layout,
        })
    }

    #[allow(clippy::type_complexity)]
    fn on_conditioning(
        &mut self,
        cond: TensorView<'_>,
        uncond: Option<TensorView<'_>>,
    ) -> Result<Option<(Vec<f32>, Option<Vec<f32>>)>, String> {
        Ok(Some((
            scale(cond, self.cond_scale),
            uncond.map(|u| u.data.to_vec()),
        )))
    }

    fn before_step(&mut self, _: &StepInfo, l: TensorView<'_>) -> Result<Option<Vec<f32>>, String> {
        Ok(Some(scale(l, 0.99)))
    }

    fn residuals(
        &mut self,
        _: &StepInfo,
        sample: TensorView<'_>,
        _latents: TensorView<'_>,
        _context: TensorView<'_>,
    ) -> Result<Option<Vec<OwnedTensor>>, String> {
        let (n, h, w) = (sample.shape[0], sample.shape[2], sample.shape[3]);
        Ok(Some(
            self.layout
                .iter()
                .map(|&(c, d)| {
                    let shape = vec![n, c, h.div_ceil(d), w.div_ceil(d)];
                    OwnedTensor {
                        data: vec![self.residual; shape.iter().product()],
                        shape,
                    }
                })
                .collect(),
        ))
    }

    fn on_noise_pred(
        &mut self,
        _: &StepInfo,
        uncond: Option<TensorView<'_>>,
        cond: TensorView<'_>,
        g: f64,
    ) -> Result<Option<Vec<f32>>, String> {
        let Some(u) = uncond else { return Ok(None) };
        let g = g as f32;
        Ok(Some(
            u.data
                .iter()
                .zip(cond.data)
                .map(|(&u, &c)| u + (c - u) * g)
                .collect(),
        ))
    }

    fn after_step(&mut self, _: &StepInfo, l: TensorView<'_>) -> Result<Option<Vec<f32>>, String> {
        Ok(Some(scale(l, 1.01)))
    }

    fn on_image(&mut self, images: TensorView<'_>) -> Result<Option<Vec<f32>>, String> {
        Ok(Some(images.data.iter().map(|v| 1.0 - v).collect()))
    }

    fn patches(&self, part: Part, name: &str) -> bool {
        part == Part::Unet && name == "conv_in.bias"
    }

    fn weight_delta(
        &self,
        _: Part,
        _: &str,
        base: TensorView<'_>,
    ) -> Result<Option<Vec<f32>>, String> {
        Ok(Some(vec![self.bias_delta; base.data.len()]))
    }
}

export_plugin!(hook: EveryPoint);
