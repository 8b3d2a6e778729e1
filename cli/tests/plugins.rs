//! Plugins loaded at run time: the example plugins built as cdylibs and used through the CLI,
//! and purpose-built bad plugins refused or contained at the boundary.

use std::path::Path;

use candle_core::{Device, Tensor};
use sd_plugins_api::{resolve_params, ImageBuf, NoisePrediction, ParamValue, Registry, StepInfo};
use sd_tests::{fixtures, max_abs_diff, model_dir};

use crate::common::{build_plugin, clean_failure, latents, ok, s, scratch, sdctl, sdctl_with};

/// A 4-step generation on the fixture model; extra arguments appended.
fn generate(dir: &Path, name: &str, extra: &[&str]) -> Tensor {
    let model = model_dir("sd1");
    let lat = dir.join(format!("{name}.safetensors"));
    let out = dir.join(format!("{name}.png"));
    let mut args = vec![
        "generate",
        "--model",
        s(&model),
        "--prompt",
        "a red circle",
        "--negative-prompt",
        "blue",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "4",
        "--cfg-scale",
        "9",
        "--seed",
        "5",
        "--output",
        s(&out),
        "--save-latents",
        s(&lat),
    ];
    args.extend(extra);
    ok(&sdctl(&args));
    latents(&lat)
}

#[test]
fn preprocessor_plugin_runs_through_the_abi_and_in_control_units() {
    let lib = build_plugin("sdctl-plugin-posterize", "");
    // in-process, through the ABI
    let mut reg = Registry::builtin();
    reg.load(&lib).unwrap();
    let p = reg
        .preprocessor("posterize")
        .expect("registered by name")
        .clone();
    let img = ImageBuf::new(4, 1, 3, (0..12).map(|i| (i * 21) as u8).collect()).unwrap();
    let params = resolve_params(&p.params(), &[("levels".into(), ParamValue::Int(3))]).unwrap();
    let out = p.process(&img, &params).unwrap();
    // 3 levels: [0, 86) -> 0, [86, 171) -> 127, [171, 256) -> 255
    let want: Vec<u8> = img
        .data
        .iter()
        .map(|&v| match v {
            0..=85 => 0,
            86..=170 => 127,
            _ => 255,
        })
        .collect();
    assert_eq!(out.data, want);
    assert_eq!((out.width, out.height, out.channels), (4, 1, 3));

    // through the CLI: a unit with the plugin's preprocessor equals a unit given the
    // posterized image directly (64x64, preprocessed at its own size at resolution 64)
    let d = scratch("plugins", "posterize");
    let src = fixtures().join("inputs/init.png");
    let mut rgb = image::open(&src).unwrap().to_rgb8();
    rgb.pixels_mut()
        .for_each(|px| px.0 = px.0.map(|v| (v as u32 * 4 / 256 * 255 / 3) as u8));
    let pre = d.join("posterized.png");
    rgb.save(&pre).unwrap();
    let cn = model_dir("controlnet-sd1");
    let cfg = d.join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "plugins = [\"{}\"]\n\n[[control]]\nmodel = \"{}\"\nimage = \"{}\"\npreprocessor = {{ name = \"posterize\", levels = 4 }}\nresolution = 64\n",
            lib.display(),
            cn.display(),
            src.display()
        ),
    )
    .unwrap();
    let a = generate(&d, "a", &["--config", s(&cfg)]);
    let unit = format!("model={},image={}", cn.display(), pre.display());
    let b = generate(&d, "b", &["--control", &unit]);
    let raw = format!("model={},image={}", cn.display(), src.display());
    let c = generate(&d, "c", &["--control", &raw]);
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    assert!(
        max_abs_diff(&a, &c) > 1e-4,
        "the preprocessor changed nothing"
    );

    // listed with its parameters; unknown parameters are caught before anything loads
    let list = ok(&sdctl(&["preprocessors", "list", "--plugin", s(&lib)]));
    assert!(
        list.contains("posterize 0.1.0") && list.contains("levels = 4  [int 2..=256]"),
        "{list}"
    );
    std::fs::write(
        &cfg,
        format!(
            "plugins = [\"{}\"]\n\n[[control]]\nmodel = \"{}\"\nimage = \"{}\"\npreprocessor = {{ name = \"posterize\", levls = 4 }}\n",
            lib.display(),
            cn.display(),
            src.display()
        ),
    )
    .unwrap();
    let err = clean_failure(&sdctl(&["config", "show", "--config", s(&cfg)]));
    assert!(err.contains("c.toml:6: control[0].preprocessor: preprocessor posterize parameter levls: unknown parameter (did you mean `levels`?)"), "{err}");
}

#[test]
fn hook_plugin_changes_generation_and_its_neutral_parameter_does_not() {
    let lib = build_plugin("sdctl-plugin-cfg-rescale", "");
    // the hook against the reference formula, through the ABI
    let mut reg = Registry::builtin();
    let loaded = reg.load(&lib).unwrap();
    let params = resolve_params(
        &loaded.manifest.params,
        &[("phi".into(), ParamValue::Float(0.7))],
    )
    .unwrap();
    let mut hook = loaded.hook(&params).unwrap();
    // diffusers' own `rescale_noise_cfg` after CFG 7.5, phi 0.7 (make_reference_fixtures.py)
    let exp = sd_tests::expected("cfg_rescale.safetensors");
    let (u, c) = (sd_tests::get(&exp, "uncond"), sd_tests::get(&exp, "cond"));
    let step = StepInfo {
        index: 0,
        first_index: 0,
        total: 4,
        timestep: 999.0,
        batch: 2,
        cfg: true,
    };
    let pred = NoisePrediction {
        uncond: Some(u),
        cond: c,
        guidance_scale: 7.5,
    };
    let got = hook
        .on_noise_pred(&step, &pred)
        .unwrap()
        .expect("the hook answers");
    let want = sd_tests::get(&exp, "out");
    assert!(
        max_abs_diff(&got, want) < 1e-5,
        "{}",
        max_abs_diff(&got, want)
    );
    drop(hook);

    let d = scratch("plugins", "cfg-rescale");
    let plain = generate(&d, "plain", &[]);
    let with = format!("{},phi=0.7", lib.display());
    let rescaled = generate(&d, "rescaled", &["--plugin", &with]);
    let neutral = format!("{},phi=0", lib.display());
    let same = generate(&d, "neutral", &["--plugin", &neutral]);
    assert!(
        max_abs_diff(&plain, &rescaled) > 1e-3,
        "{}",
        max_abs_diff(&plain, &rescaled)
    );
    assert_eq!(max_abs_diff(&plain, &same), 0.0);

    // from a config file, by name from the plugin folder, with parameters checked
    let pdir = d.join("plugin-dir");
    std::fs::create_dir_all(&pdir).unwrap();
    std::fs::copy(&lib, pdir.join(lib.file_name().unwrap())).unwrap();
    let cfg = d.join("p.toml");
    std::fs::write(&cfg, "[[plugins]]\nname = \"cfg_rescale\"\nphi = 0.7\n").unwrap();
    let lat = d.join("by-name.safetensors");
    ok(&sdctl_with(
        &[
            "generate",
            "--model",
            s(&model_dir("sd1")),
            "--prompt",
            "a red circle",
            "--negative-prompt",
            "blue",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "4",
            "--cfg-scale",
            "9",
            "--seed",
            "5",
            "--config",
            s(&cfg),
            "--output",
            s(&d.join("by-name.png")),
            "--save-latents",
            s(&lat),
        ],
        &[("SDCTL_PLUGIN_DIR", s(&pdir))],
    ));
    assert_eq!(max_abs_diff(&latents(&lat), &rescaled), 0.0);
    let show = ok(&sdctl_with(
        &["config", "show", "--config", s(&cfg)],
        &[("SDCTL_PLUGIN_DIR", s(&pdir))],
    ));
    assert!(
        show.contains("[[plugins]]\nname = \"cfg_rescale\""),
        "{show}"
    );
    let list = ok(&sdctl_with(
        &["plugins", "list"],
        &[("SDCTL_PLUGIN_DIR", s(&pdir))],
    ));
    assert!(
        list.contains("cfg_rescale    hook") && list.contains("phi = 0.7  [float 0..=1]"),
        "{list}"
    );
    std::fs::write(
        &cfg,
        "[[plugins]]\nname = \"cfg_rescale\"\nphi = 2.0\nphy = 1\n",
    )
    .unwrap();
    let err = clean_failure(&sdctl_with(
        &["config", "show", "--config", s(&cfg)],
        &[("SDCTL_PLUGIN_DIR", s(&pdir))],
    ));
    assert!(
        err.contains("p.toml:3: plugins[0].phi: plugin cfg_rescale: must be a finite number in [0, 1], got 2"),
        "{err}"
    );
    assert!(
        err.contains(
            "p.toml:4: plugins[0].phy: plugin cfg_rescale: unknown parameter (did you mean `phi`?)"
        ),
        "{err}"
    );
    std::fs::write(&cfg, "[[plugins]]\nname = \"cfg_rescal\"\n").unwrap();
    let err = clean_failure(&sdctl_with(
        &["config", "show", "--config", s(&cfg)],
        &[("SDCTL_PLUGIN_DIR", s(&pdir))],
    ));
    assert!(
        err.contains("no loaded plugin is named \"cfg_rescal\" (loaded: cfg_rescale"),
        "{err}"
    );
}

#[test]
fn bad_plugins_are_refused_or_contained() {
    let d = scratch("plugins", "bad");
    let mut reg = Registry::builtin();

    let wrong_abi = build_plugin("sdctl-plugin-misbehaving", "wrong_abi");
    let e = reg.load(&wrong_abi).err().unwrap();
    assert!(
        e.contains("built for plugin ABI version 999, this sdctl speaks version 1"),
        "{e}"
    );
    let err = clean_failure(&sdctl(&["plugins", "list", "--plugin", s(&wrong_abi)]));
    assert!(
        err.contains("--plugin #1: plugins[0].path: plugin") && err.contains("ABI version 999"),
        "{err}"
    );

    let no_entry = build_plugin("sdctl-plugin-misbehaving", "no_entry");
    let e = reg.load(&no_entry).err().unwrap();
    assert!(
        e.contains("not an sdctl plugin (no `sd_plugin_entry` symbol)"),
        "{e}"
    );

    let not_lib = d.join("notes.so");
    std::fs::write(&not_lib, "just text").unwrap();
    let e = reg.load(&not_lib).err().unwrap();
    assert!(e.contains("not a loadable library"), "{e}");
    let e = reg.load(&d.join("missing.so")).err().unwrap();
    assert!(e.contains("missing.so: no such file"), "{e}");

    let img = ImageBuf::new(64, 64, 3, vec![100; 64 * 64 * 3]).unwrap();
    let wrong_size = build_plugin("sdctl-plugin-misbehaving", "wrong_size");
    let mut r = Registry::builtin();
    r.load(&wrong_size).unwrap();
    let p = r.preprocessor("misbehaving").unwrap().clone();
    let e = p
        .process(&img, &Default::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("returned a buffer of 10 bytes for a 64x64x3 image"),
        "{e}"
    );

    let panics = build_plugin("sdctl-plugin-misbehaving", "panics");
    let mut r = Registry::builtin();
    r.load(&panics).unwrap();
    let p = r.preprocessor("misbehaving").unwrap().clone();
    for _ in 0..2 {
        // caught every time; this process goes on
        let e = p
            .process(&img, &Default::default())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("plugin panicked: deliberate panic inside process"),
            "{e}"
        );
    }
    // and through the CLI: a clean error, not a crash
    let cn = model_dir("controlnet-sd1");
    let cfg = d.join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "plugins = [\"{}\"]\n[[control]]\nmodel = \"{}\"\nimage = \"{}\"\npreprocessor = \"misbehaving\"\n",
            panics.display(),
            cn.display(),
            fixtures().join("inputs/control_a.png").display()
        ),
    )
    .unwrap();
    let out = d.join("o.png");
    let err = clean_failure(&sdctl(&[
        "generate",
        "--config",
        s(&cfg),
        "--model",
        s(&model_dir("sd1")),
        "--prompt",
        "x",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "--output",
        s(&out),
    ]));
    assert!(
        err.contains("plugin panicked: deliberate panic inside process"),
        "{err}"
    );
    assert!(!out.exists());

    // the well-behaved build of the same crate works
    let good = build_plugin("sdctl-plugin-misbehaving", "");
    let mut r = Registry::builtin();
    r.load(&good).unwrap();
    let out = r
        .preprocessor("misbehaving")
        .unwrap()
        .process(&img, &Default::default())
        .unwrap();
    assert!(out.data.iter().all(|&v| v == 155));
}

/// The in-process twin of plugins/every-point: the same arithmetic through candle.
struct Twin;

impl sd_plugins_api::Hook for Twin {
    fn name(&self) -> &str {
        "twin"
    }
    fn on_conditioning(
        &mut self,
        c: &mut sd_plugins_api::Conditioning,
    ) -> Result<(), sd_plugins_api::HookError> {
        c.cond = (&c.cond * 1.5)?;
        Ok(())
    }
    fn before_step(
        &mut self,
        _: &StepInfo,
        l: &mut Tensor,
    ) -> Result<(), sd_plugins_api::HookError> {
        *l = (&*l * 0.99)?;
        Ok(())
    }
    fn residuals(
        &mut self,
        _: &StepInfo,
        input: &sd_plugins_api::ResidualInput<'_>,
    ) -> Result<Option<sd_plugins_api::Residuals>, sd_plugins_api::HookError> {
        let (n, _, h, w) = input.sample.dims4()?;
        let layout = [
            (16, 1),
            (16, 1),
            (16, 1),
            (16, 2),
            (32, 2),
            (32, 2),
            (32, 4),
            (32, 4),
            (32, 4),
            (32, 4),
        ];
        let mut down: Vec<Tensor> = layout
            .iter()
            .map(|&(c, d): &(usize, usize)| {
                Tensor::full(
                    0.05f32,
                    (n, c, h.div_ceil(d), w.div_ceil(d)),
                    input.sample.device(),
                )
                .and_then(|t| t.to_dtype(input.sample.dtype()))
            })
            .collect::<candle_core::Result<_>>()?;
        let mid = down.pop().unwrap();
        Ok(Some(sd_plugins_api::Residuals { down, mid }))
    }
    fn on_noise_pred(
        &mut self,
        _: &StepInfo,
        p: &NoisePrediction<'_>,
    ) -> Result<Option<Tensor>, sd_plugins_api::HookError> {
        let Some(u) = p.uncond else { return Ok(None) };
        Ok(Some((u + ((p.cond - u)? * p.guidance_scale)?)?))
    }
    fn after_step(
        &mut self,
        _: &StepInfo,
        _: &dyn sd_plugins_api::NoiseLevels,
        l: &mut Tensor,
    ) -> Result<(), sd_plugins_api::HookError> {
        *l = (&*l * 1.01)?;
        Ok(())
    }
    fn on_image(&mut self, images: &mut Tensor) -> Result<(), sd_plugins_api::HookError> {
        *images = images.affine(-1.0, 1.0)?;
        Ok(())
    }
}

struct TwinPatch;

impl sd_plugins_api::WeightPatch for TwinPatch {
    fn name(&self) -> &str {
        "twin"
    }
    fn delta(
        &self,
        part: sd_plugins_api::ModelPart,
        name: &str,
        base: &Tensor,
    ) -> Result<Option<Tensor>, sd_plugins_api::HookError> {
        if part == sd_plugins_api::ModelPart::Unet && name == "conv_in.bias" {
            return Ok(Some(
                Tensor::full(0.01f32, base.dims(), base.device())?.to_dtype(base.dtype())?,
            ));
        }
        Ok(None)
    }
}

#[test]
fn every_hook_point_and_weight_patches_cross_the_abi() {
    use sd_pipeline::samplers::{SamplerKind, Schedule};
    use sd_pipeline::{GenerateRequest, StableDiffusion};
    use sd_plugins_api::{HookSet, WeightPatch};
    use std::sync::Arc;

    let lib = build_plugin("sdctl-plugin-every-point", "");
    let mut reg = Registry::builtin();
    let loaded = reg.load(&lib).unwrap();
    let params = resolve_params(&loaded.manifest.params, &[]).unwrap();
    let dev = Device::Cpu;
    let req = GenerateRequest {
        prompt: "a red circle".into(),
        negative_prompt: Some("blue".into()),
        width: 64,
        height: 48,
        steps: 3,
        cfg_scale: 7.0,
        sampler: SamplerKind::Euler,
        schedule: Schedule::Normal,
        batch: 1,
        clip_skip: 1,
        init_image: None,
        mask: None,
        strength: None,
        noise: None,
        latent_fill: Default::default(),
        micro: Default::default(),
        init_latents: None,
        run_steps: None,
        depth: None,
    };
    let run = |patch: Arc<dyn WeightPatch>, hook: Box<dyn sd_plugins_api::Hook>| {
        let sd = StableDiffusion::load(&model_dir("sd1"), &dev, candle_core::DType::F32, &[patch])
            .unwrap();
        let mut hooks = HookSet::new();
        hooks.push(hook);
        let mut rng = sd_pipeline::rng::TorchRng::new(11);
        let out = sd.generate(&req, &mut hooks, &mut rng).unwrap();
        (out.latents, out.images)
    };
    let inst = loaded.instance(&params).unwrap();
    let (lat_plugin, img_plugin) = run(inst.patch(), inst.hook());
    drop(inst);
    let (lat_twin, img_twin) = run(Arc::new(TwinPatch), Box::new(Twin));
    assert_eq!(max_abs_diff(&lat_plugin, &lat_twin), 0.0);
    assert_eq!(max_abs_diff(&img_plugin, &img_twin), 0.0);
    // and it did act: without it, the result differs
    struct Nothing;
    impl sd_plugins_api::Hook for Nothing {
        fn name(&self) -> &str {
            "nothing"
        }
    }
    let (lat_plain, _) = run(Arc::new(NoPatch), Box::new(Nothing));
    assert!(max_abs_diff(&lat_plain, &lat_twin) > 1e-3);
}

struct NoPatch;

impl sd_plugins_api::WeightPatch for NoPatch {
    fn name(&self) -> &str {
        "none"
    }
    fn delta(
        &self,
        _: sd_plugins_api::ModelPart,
        _: &str,
        _: &Tensor,
    ) -> Result<Option<Tensor>, sd_plugins_api::HookError> {
        Ok(None)
    }
}
