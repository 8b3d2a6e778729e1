//! From merged values to typed, validated settings: the [`sd::Job`] and where its results
//! go. Every problem is collected, none stops the walk, so one run reports them all.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use figment::value::{Dict, Value};
use figment::Figment;
use sd_controlnet::UnitSpec;
use sd_pipeline::samplers::{SamplerKind, Schedule};
use sd_plugins_api::number::Range;
use sd_plugins_api::Registry;

/// After the range of a weight outside it.
const EXTREME: &str = " (allow more with --allow-extreme-weights)";

use crate::settings::plugins::check_plugins;
use crate::settings::table::{
    get, get_bool, get_float, get_int, get_path, get_str, list_entries, Shown, Table, Typed,
};
use sd::config::problem::{Origin, Problem, Problems};
use sd::config::values::describe;
use sd::schema::{
    self, CONTROL_FIELDS, CONTROL_WEIGHT_RANGE, FIELDS, LORA_FIELDS, LORA_WEIGHT_RANGE,
};

#[derive(Clone)]
pub struct Settings {
    pub job: sd::Job,
    pub save_latents: Option<PathBuf>,
    pub output: Option<PathBuf>,
    /// Built-in preprocessors and every loaded plugin.
    pub registry: Registry,
    /// Top-level values in schema order, for `config show`.
    pub shown: Vec<Shown>,
    /// Each `[[control]]`, `[[lora]]` and `[[plugins]]` entry's values, for `config show`.
    pub control_shown: Vec<Vec<Shown>>,
    pub lora_shown: Vec<Vec<Shown>>,
    pub plugin_shown: Vec<Vec<Shown>>,
}

impl Settings {
    /// What `generate` needs beyond valid values: a model and an output file.
    pub fn require_for_generate(&self) -> Result<(), Problems> {
        // no model: the embedded tiny-fill model, in builds that carry it (`embedded.rs`)
        let mut p = Vec::new();
        if self.job.model.is_none() && !sd::embedded::AVAILABLE {
            p.push(Problem::bare(
                "model",
                "missing: give --model, `model = ...` in a config file, or SDCTL_MODEL",
            ));
        }
        if self.output.is_none() {
            p.push(Problem::bare(
                "output",
                "missing: give --output, `output = ...` in a config file, or SDCTL_OUTPUT",
            ));
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(Problems(p))
        }
    }
}

/// The index of the earlier entry with this `id`, or `None` after noting that the entry about
/// to be pushed at `next` has it.
/// The hires fix's keys: on with `hires_scale` or `hires_size`; the others alone are a
/// problem (they would do nothing).
fn hires_settings(vals: &[(String, Typed)], top: &mut Table) -> Option<sd::hires::Hires> {
    let scale = get_float(vals, "hires_scale");
    let size = get_str(vals, "hires_size");
    let on = scale.is_some() || size.is_some();
    let problem = |top: &mut Table, key: &str, m: String| {
        let o = top.shown_origin(key).unwrap_or(Origin::Default);
        top.problem(&o, key, m);
    };
    if !on {
        for key in [
            "hires_upscaler",
            "hires_steps",
            "hires_denoise",
            "hires_prompt",
            "hires_negative_prompt",
            "hires_sampler",
            "hires_schedule",
        ] {
            if get(vals, key).is_some() {
                problem(
                    top,
                    key,
                    "needs hires_scale or hires_size (the hires fix is off)".into(),
                );
            }
        }
        return None;
    }
    let mut h = sd::hires::Hires::default();
    if let Some(s) = scale {
        h.scale = s;
    }
    if let Some(s) = size {
        let parse = |v: &str| {
            let (w, hh) = v.trim().split_once(['x', 'X'])?;
            Some((
                w.trim().parse::<usize>().ok()?,
                hh.trim().parse::<usize>().ok()?,
            ))
        };
        match parse(&s).filter(|&(w, hh)| (w > 0 || hh > 0) && w <= 16384 && hh <= 16384) {
            Some(wh) => h.resize = Some(wh),
            None => problem(
                top,
                "hires_size",
                format!("{s:?} is not a size WxH (0 for one side keeps the aspect ratio)"),
            ),
        }
    }
    if let Some(u) = get_str(vals, "hires_upscaler") {
        match u.parse() {
            Ok(u) => h.upscaler = u,
            Err(m) => problem(top, "hires_upscaler", m),
        }
    }
    if let Some(n) = get_int(vals, "hires_steps") {
        h.steps = n as usize;
    }
    if let Some(d) = get_float(vals, "hires_denoise") {
        if d <= 0.0 {
            problem(top, "hires_denoise", format!("{d}: use a value in (0, 1]"));
        }
        h.denoise = d;
    }
    h.prompt = get_str(vals, "hires_prompt");
    h.negative_prompt = get_str(vals, "hires_negative_prompt");
    if let Some(s) = get_str(vals, "hires_sampler") {
        match SamplerKind::parse_alias(&s) {
            Ok((k, implied)) => {
                h.sampler = Some(k);
                h.schedule = implied;
            }
            Err(e) => problem(top, "hires_sampler", e.to_string()),
        }
    }
    if let Some(s) = get_str(vals, "hires_schedule") {
        match s.parse::<Schedule>() {
            Ok(sc) => h.schedule = Some(sc),
            Err(e) => problem(top, "hires_schedule", e.to_string()),
        }
    }
    Some(h)
}

fn replace_at(ids: &mut HashMap<String, usize>, id: String, next: usize) -> Option<usize> {
    match ids.get(&id) {
        Some(&i) => Some(i),
        None => {
            ids.insert(id, next);
            None
        }
    }
}

/// Validate the merged figment into settings.
pub fn check(
    fig: &Figment,
    png: Option<&Path>,
    mut registry: Registry,
) -> Result<Settings, Problems> {
    let mut problems = Vec::new();
    let root: Dict = match figment::Provider::data(fig) {
        Ok(mut m) => m.remove(&figment::Profile::Default).unwrap_or_default(),
        Err(e) => {
            return Err(Problems(vec![Problem::bare("", e.to_string())]));
        }
    };
    let mut top = Table {
        fig,
        png,
        list: "",
        index: 0,
        file_index: 0,
        problems: &mut problems,
        shown: Vec::new(),
    };
    let mut extra: Vec<&str> = schema::LIST_KEYS.to_vec();
    extra.push(schema::INCLUDE_KEY);
    let vals = top.walk(&root, FIELDS, &extra);
    let allow_extreme = get_bool(&vals, "allow_extreme_weights").unwrap_or(false);

    // cross-field checks on the top level
    for key in ["width", "height"] {
        if let Some(v) = get_int(&vals, key).filter(|v| v % 8 != 0) {
            let o = top.shown_origin(key).unwrap_or(Origin::Default);
            top.problem(&o, key, format!("{v} is not a multiple of 8"));
        }
    }
    for key in ["prompt", "negative_prompt"] {
        let len = get_str(&vals, key).map_or(0, |v| v.len());
        if let Some(problem) = sd::schema::prompt_too_long(key, len) {
            let o = top.shown_origin(key).unwrap_or(Origin::Default);
            let detail = problem.trim_start_matches(&format!("{key}: ")).to_string();
            top.problem(&o, key, detail);
        }
    }
    let mut micro = sd_pipeline::MicroConditioning::default();
    for key in ["original_size", "target_size", "crop_top_left"] {
        let Some(v) = get_str(&vals, key) else {
            continue;
        };
        let parsed = match key {
            "original_size" => sd_pipeline::MicroConditioning::parse_size(&v)
                .map(|s| micro.original_size = Some(s)),
            "target_size" => {
                sd_pipeline::MicroConditioning::parse_size(&v).map(|s| micro.target_size = Some(s))
            }
            _ => sd_pipeline::MicroConditioning::parse_point(&v).map(|p| micro.crop_top_left = p),
        };
        if let Err(m) = parsed {
            let o = top.shown_origin(key).unwrap_or(Origin::Default);
            top.problem(&o, key, m);
        }
    }
    let hires = hires_settings(&vals, &mut top);
    // --preview KIND: where (the given path, else beside the output) and with what decoder
    let (preview_path, preview_taesd) = match get_str(&vals, "preview").as_deref() {
        Some("none") => (None, None),
        kind => {
            let path = get_path(&vals, "preview_path").or_else(|| {
                kind.and(get_path(&vals, "output"))
                    .map(|o| o.with_extension("preview.png"))
            });
            let taesd = get_path(&vals, "taesd");
            if kind == Some("taesd") && taesd.is_none() {
                let o = top.shown_origin("preview").unwrap_or(Origin::Default);
                top.problem(&o, "preview", "taesd needs --taesd PATH (a TAESD decoder)");
            }
            (path, if kind == Some("cheap") { None } else { taesd })
        }
    };
    let outpaint = match get_str(&vals, "outpaint") {
        Some(v) => match sd::outpaint::Outpaint::parse(&v) {
            Ok(mut o) => {
                if let Some(f) = get_str(&vals, "outpaint_fill") {
                    o.fill = f.parse().unwrap_or_default();
                }
                if let Some(f) = get_int(&vals, "outpaint_feather") {
                    o.feather = f as u32;
                }
                Some(o)
            }
            Err(m) => {
                let o = top.shown_origin("outpaint").unwrap_or(Origin::Default);
                top.problem(&o, "outpaint", m);
                None
            }
        },
        None => {
            for key in ["outpaint_fill", "outpaint_feather"] {
                if get(&vals, key).is_some() {
                    let o = top.shown_origin(key).unwrap_or(Origin::Default);
                    top.problem(&o, key, "needs outpaint (LEFT,RIGHT,TOP,BOTTOM)");
                }
            }
            None
        }
    };
    let strength = get_float(&vals, "strength");
    if let Some(s) = strength {
        let o = top.shown_origin("strength").unwrap_or(Origin::Default);
        if s <= 0.0 {
            top.problem(&o, "strength", "must be above 0 (0 would change nothing)");
        }
        if get(&vals, "init_image").is_none() {
            top.problem(
                &o,
                "strength",
                "needs init_image (strength is for img2img and inpainting)",
            );
        }
    }
    // the inpainting steps need a mask; their defaults (as `config show` writes them) do not
    for key in sd::inpaint::KEYS {
        let set = match get(&vals, key) {
            Some(Typed::Int(n)) => *n != 0,
            Some(Typed::Bool(b)) => *b,
            Some(Typed::Str(v)) => v != "whole" && v != "original",
            _ => false,
        };
        if set && get(&vals, "mask").is_none() {
            let o = top.shown_origin(key).unwrap_or(Origin::Default);
            top.problem(&o, key, "needs mask (it is a step of inpainting)");
        }
    }
    if get(&vals, "mask").is_some() && get(&vals, "init_image").is_none() {
        let o = top.shown_origin("mask").unwrap_or(Origin::Default);
        top.problem(&o, "mask", "needs init_image (the image to inpaint)");
    }
    let sampler_name = get_str(&vals, "sampler").unwrap_or_else(|| "dpmpp_2m".into());
    let (sampler, implied) = match SamplerKind::parse_alias(&sampler_name) {
        Ok(s) => s,
        Err(e) => {
            let o = top.shown_origin("sampler").unwrap_or(Origin::Default);
            top.problem(&o, "sampler", e.to_string());
            (SamplerKind::DpmPP2M, None)
        }
    };
    let schedule = match get_str(&vals, "schedule") {
        Some(s) => s.parse().unwrap_or(Schedule::Karras),
        None => implied.unwrap_or(sampler.default_schedule()),
    };
    let shown = std::mem::take(&mut top.shown);

    // plugins first: their preprocessors may be named by control units
    let plugins = check_plugins(
        fig,
        png,
        &root,
        get_path(&vals, "plugin_dir"),
        &mut registry,
        &mut problems,
    );

    // [[control]]: concatenated across files; an id replaces the earlier unit with that id
    let mut control: Vec<(sd::Control, Vec<Shown>)> = Vec::new();
    let mut control_ids: HashMap<String, usize> = HashMap::new();
    let no_base_model = fig.find_value("model").is_err();
    for (i, (v, file_index)) in list_entries(&root, "control").into_iter().enumerate() {
        let mut t = Table {
            fig,
            png,
            list: "control",
            index: i,
            file_index,
            problems: &mut problems,
            shown: Vec::new(),
        };
        let Value::Dict(_, d) = v else {
            let o = t.origin(v, "");
            t.problem(&o, "", format!("expected a table, found {}", describe(v)));
            continue;
        };
        let vals = t.walk(d, CONTROL_FIELDS, &[]);
        let unit_origin = t.origin(v, "");
        let mut spec = UnitSpec::new(PathBuf::new(), PathBuf::new());
        // reference units (sd-webui-controlnet's reference_only) need no model
        let reference = match get(&vals, "preprocessor") {
            Some(Typed::Preprocessor(p)) => p.name.starts_with("reference"),
            _ => false,
        };
        for (key, slot) in [("model", &mut spec.model), ("image", &mut spec.image)] {
            match get_path(&vals, key) {
                Some(p) => *slot = p,
                None if d.contains_key(key) => {}
                None if key == "model" && reference => {}
                // without a base model the embedded one is used, with its own ControlNet
                None if key == "model" && sd::embedded::AVAILABLE && no_base_model => {
                    match sd::embedded::controlnet_dir() {
                        Ok(p) => *slot = p,
                        Err(e) => t.problem(&unit_origin, key, e.to_string()),
                    }
                }
                None => t.problem(
                    &unit_origin,
                    key,
                    format!("missing: every control unit needs `{key}`"),
                ),
            }
        }
        spec.mask = get_path(&vals, "mask");
        spec.encoder = get_path(&vals, "encoder");
        spec.control_type = get_str(&vals, "type");
        let hr = get_str(&vals, "hr")
            .and_then(|h| h.parse::<sd::hires::HrOption>().ok())
            .unwrap_or_default();
        if let Some(r) = get_int(&vals, "resolution") {
            spec.resolution = r as usize;
        }
        spec.weight = get_float(&vals, "weight").unwrap_or(1.0);
        spec.start = get_float(&vals, "start").unwrap_or(0.0);
        spec.end = get_float(&vals, "end").unwrap_or(1.0);
        if let Some(m) = get_str(&vals, "mode") {
            spec.mode = m.parse().unwrap_or(spec.mode);
        }
        if let Some(r) = get_str(&vals, "resize") {
            spec.resize = r.parse().unwrap_or(spec.resize);
        }
        if spec.start > spec.end {
            let o = t.shown_origin("start").unwrap_or(unit_origin.clone());
            t.problem(
                &o,
                "start",
                format!("start {} is after end {}", spec.start, spec.end),
            );
        }
        let (lo, hi) = CONTROL_WEIGHT_RANGE;
        if !allow_extreme {
            if let Err(m) = Range::closed(lo, hi).check_noted(spec.weight, EXTREME) {
                let o = t.shown_origin("weight").unwrap_or(unit_origin.clone());
                t.problem(&o, "weight", m);
            }
        }
        if let Some(Typed::Preprocessor(p)) = get(&vals, "preprocessor") {
            if let Err(errs) = p.resolve(&registry) {
                let o = t
                    .shown_origin("preprocessor")
                    .unwrap_or(unit_origin.clone());
                for e in errs {
                    t.problem(&o, "preprocessor", e);
                }
            }
            spec.preprocessor = Some(p.clone());
        }
        let id = get_str(&vals, "id");
        let entry = (
            sd::Control {
                id: id.clone(),
                spec,
                hr,
            },
            std::mem::take(&mut t.shown),
        );
        match id.and_then(|id| replace_at(&mut control_ids, id, control.len())) {
            Some(earlier) => control[earlier] = entry,
            None => control.push(entry),
        }
    }

    // [[lora]]: the same rules
    let mut lora: Vec<(Option<String>, sd_lora::LoraSpec, Vec<Shown>)> = Vec::new();
    let mut lora_ids: HashMap<String, usize> = HashMap::new();
    for (i, (v, file_index)) in list_entries(&root, "lora").into_iter().enumerate() {
        let mut t = Table {
            fig,
            png,
            list: "lora",
            index: i,
            file_index,
            problems: &mut problems,
            shown: Vec::new(),
        };
        let Value::Dict(_, d) = v else {
            let o = t.origin(v, "");
            t.problem(&o, "", format!("expected a table, found {}", describe(v)));
            continue;
        };
        let vals = t.walk(d, LORA_FIELDS, &[]);
        let entry_origin = t.origin(v, "");
        let path = get_path(&vals, "path");
        if path.is_none() && !d.contains_key("path") {
            t.problem(
                &entry_origin,
                "path",
                "missing: every [[lora]] needs `path`",
            );
        }
        let w = get_float(&vals, "weight").unwrap_or(1.0);
        let spec = sd_lora::LoraSpec {
            path: path.unwrap_or_default(),
            unet_weight: get_float(&vals, "unet_weight").unwrap_or(w),
            te_weight: get_float(&vals, "te_weight").unwrap_or(w),
        };
        let (lo, hi) = LORA_WEIGHT_RANGE;
        for key in ["weight", "unet_weight", "te_weight"] {
            let Some(x) = get_float(&vals, key).filter(|_| !allow_extreme) else {
                continue;
            };
            if let Err(m) = Range::closed(lo, hi).check_noted(x, EXTREME) {
                let o = t.shown_origin(key).unwrap_or(entry_origin.clone());
                t.problem(&o, key, m);
            }
        }
        let id = get_str(&vals, "id");
        let entry = (id.clone(), spec, std::mem::take(&mut t.shown));
        match id.and_then(|id| replace_at(&mut lora_ids, id, lora.len())) {
            Some(earlier) => lora[earlier] = entry,
            None => lora.push(entry),
        }
    }

    // a batch writes OUT-0.png, OUT-1.png, ...: each of them only over a regular file
    if let (Some(out), Some(b)) = (get_path(&vals, "output"), get_int(&vals, "batch")) {
        if b > 1 {
            let o = shown
                .iter()
                .find(|s| s.key == "output")
                .map_or(Origin::Default, |s| s.origin.clone());
            for p in sd::output::output_paths(&out, b as usize) {
                if let Err(m) = sd::output::check_output_target(&p) {
                    problems.push(Problem::at(&o, "output", m));
                }
            }
        }
    }

    if !problems.is_empty() {
        return Err(Problems(problems));
    }
    let usize_of = |k: &str| get_int(&vals, k).map(|i| i as usize);
    let d = sd::Job::default();
    let (control, control_shown) = control.into_iter().unzip();
    let (lora, lora_shown) = lora.into_iter().map(|(_, l, s)| (l, s)).unzip();
    let (plugins, plugin_shown) = plugins
        .into_iter()
        .map(|p| {
            (
                sd::Plugin {
                    lib: p.lib,
                    params: p.params,
                },
                p.shown,
            )
        })
        .unzip();
    let job = sd::Job {
        model: get_path(&vals, "model"),
        vae: get_path(&vals, "vae"),
        refiner: get_path(&vals, "refiner"),
        refiner_switch: get_float(&vals, "refiner_switch").unwrap_or(d.refiner_switch),
        hires,
        prompt: get_str(&vals, "prompt").unwrap_or_default(),
        negative_prompt: get_str(&vals, "negative_prompt"),
        micro,
        width: usize_of("width"),
        height: usize_of("height"),
        steps: usize_of("steps").unwrap_or(d.steps),
        cfg_scale: get_float(&vals, "cfg_scale").unwrap_or(d.cfg_scale),
        sampler,
        schedule,
        seed: get_int(&vals, "seed").map(|s| s as u64),
        rng: get_str(&vals, "rng")
            .and_then(|r| r.parse().ok())
            .unwrap_or(d.rng),
        batch: usize_of("batch").unwrap_or(d.batch),
        clip_skip: usize_of("clip_skip").unwrap_or(d.clip_skip),
        init_image: get_path(&vals, "init_image"),
        strength,
        mask: get_path(&vals, "mask"),
        inpaint: sd::inpaint::Inpaint {
            mask_blur: get_int(&vals, "mask_blur").unwrap_or(0) as u32,
            invert_mask: get_bool(&vals, "invert_mask").unwrap_or(false),
            only_masked_padding: (get_str(&vals, "inpaint_area").as_deref() == Some("masked"))
                .then(|| get_int(&vals, "inpaint_padding").unwrap_or(0) as u32),
            overlay: get_bool(&vals, "mask_overlay").unwrap_or(false),
            fill: get_str(&vals, "inpaint_fill")
                .and_then(|f| f.parse().ok())
                .unwrap_or_default(),
        },
        noise: get_path(&vals, "noise"),
        device: get_str(&vals, "device").unwrap_or(d.device),
        dtype: get_str(&vals, "dtype").unwrap_or(d.dtype),
        lowvram: get_bool(&vals, "lowvram").unwrap_or(false),
        lora_dir: get_path(&vals, "lora_dir"),
        embeddings_dir: get_path(&vals, "embeddings_dir"),
        preview_path,
        upscaler_dir: get_path(&vals, "upscaler_dir"),
        depth_map: get_path(&vals, "depth_map"),
        depth_estimator: get_str(&vals, "depth_estimator"),
        vae_tiling: {
            let tiles =
                get_int(&vals, "vae_tile_size").map(|s| sd_pipeline::model::vae::VaeTiles {
                    sample: s as usize,
                    overlap: get_float(&vals, "vae_tile_overlap").unwrap_or(0.25),
                });
            let tiles = tiles.or_else(|| {
                // an overlap alone keeps the VAE's own tile size: filled in when it loads
                get_float(&vals, "vae_tile_overlap").map(|o| sd_pipeline::model::vae::VaeTiles {
                    sample: 0,
                    overlap: o,
                })
            });
            match get_str(&vals, "vae_tiling").as_deref() {
                Some("on") => sd_pipeline::VaeTiling::On(tiles),
                Some("off") => sd_pipeline::VaeTiling::Off,
                _ => sd_pipeline::VaeTiling::Auto {
                    tiles,
                    budget: sd_pipeline::VAE_TILING_BUDGET,
                },
            }
        },
        outpaint,
        taesd: preview_taesd,
        strict_lora: get_bool(&vals, "strict_lora").unwrap_or(d.strict_lora),
        allow_extreme_weights: allow_extreme,
        control,
        lora,
        plugins,
    };
    Ok(Settings {
        job,
        save_latents: get_path(&vals, "save_latents"),
        output: get_path(&vals, "output"),
        registry,
        shown,
        control_shown,
        lora_shown,
        plugin_shown,
    })
}
