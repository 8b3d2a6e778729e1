//! What a PNG remembers of its generation: an A1111-style `parameters` text chunk (readable by
//! AUTOMATIC1111 and the tools that read its infotext), and the full settings as JSON in an
//! `sdctl` chunk; and reading either back for `--from-png`.

use std::path::Path;

use sd_pipeline::samplers::{SamplerKind, Schedule};
use sd_pipeline::GenerateRequest;
use sd_plugins_api::params::json::value_to_json;
use serde_json::{json, Map, Value};

use crate::hashes::HashCache;
use crate::job::{Job, Rng};
use crate::png_text::{find, text_chunks};

/// The PNG text chunk holding the JSON settings.
pub const JSON_CHUNK: &str = "sdctl";

/// A1111's sampler names (its "Sampler:" field).
pub fn a1111_sampler(kind: SamplerKind) -> &'static str {
    match kind {
        SamplerKind::Ddim => "DDIM",
        SamplerKind::Euler => "Euler",
        SamplerKind::EulerA => "Euler a",
        SamplerKind::DpmPP2M => "DPM++ 2M",
        SamplerKind::DpmPP2MSde => "DPM++ 2M SDE",
        SamplerKind::DpmPPSde => "DPM++ SDE",
        SamplerKind::Heun => "Heun",
        SamplerKind::Lms => "LMS",
        SamplerKind::UniPc => "UniPC",
        SamplerKind::Lcm => "LCM",
    }
}

/// A1111's schedule labels (its "Schedule type" field).
pub fn a1111_schedule(s: Schedule) -> &'static str {
    match s {
        Schedule::Normal => "Normal",
        Schedule::Karras => "Karras",
        Schedule::Exponential => "Exponential",
        Schedule::Beta => "Beta",
        Schedule::SgmUniform => "SGM Uniform",
        Schedule::Simple => "Simple",
    }
}

fn stem(p: &Path) -> String {
    let name = p.file_name().unwrap_or_default().to_string_lossy();
    name.strip_suffix(".safetensors")
        .or_else(|| name.strip_suffix(".ckpt"))
        .or_else(|| name.strip_suffix(".pth"))
        .unwrap_or(&name)
        .to_string()
}

/// A value for an infotext field, quoted as A1111 does when it holds separators.
fn quote(v: &str) -> String {
    if v.contains([',', ':', '"', '\n']) {
        serde_json::to_string(v).unwrap_or_default()
    } else {
        v.to_string()
    }
}

/// One generation, as the PNG records it.
pub struct Run<'a> {
    pub job: &'a Job,
    pub req: &'a GenerateRequest,
    /// `None` when the initial noise came from a file.
    pub seed: Option<u64>,
    pub model: &'a Path,
    pub loras: &'a [sd_lora::LoraSpec],
    /// The textual-inversion embeddings the prompts used: `(name, file)`.
    pub embeddings: &'a [(String, std::path::PathBuf)],
}

impl Run<'_> {
    /// The A1111-style `parameters` text.
    pub fn parameters(&self, hashes: &mut HashCache) -> String {
        let (st, req) = (self.job, self.req);
        let mut s = st.prompt.clone();
        // LoRAs given by flag or config appear as A1111 prompt tags, so A1111 applies them too
        // (`<lora:NAME:TE:UNET>` when the two weights differ)
        for l in &st.lora {
            let (te, unet) = (l.te_weight, l.unet_weight);
            let w = if te == unet {
                te.to_string()
            } else {
                format!("{te}:{unet}")
            };
            s.push_str(&format!(" <lora:{}:{w}>", stem(&l.path)));
        }
        if let Some(n) = req.negative_prompt.as_deref().filter(|n| !n.is_empty()) {
            s.push_str(&format!("\nNegative prompt: {n}"));
        }
        let mut f: Vec<(String, String)> = vec![
            ("Steps".into(), req.steps.to_string()),
            ("Sampler".into(), a1111_sampler(req.sampler).into()),
            ("Schedule type".into(), a1111_schedule(req.schedule).into()),
            ("CFG scale".into(), req.cfg_scale.to_string()),
            (
                "Seed".into(),
                self.seed.map_or("noise file".into(), |s| s.to_string()),
            ),
            ("Size".into(), format!("{}x{}", req.width, req.height)),
            ("Model hash".into(), hashes.short(self.model, 10)),
            ("Model".into(), stem(self.model)),
        ];
        if req.clip_skip > 1 {
            f.push(("Clip skip".into(), req.clip_skip.to_string()));
        }
        if let Some(r) = &st.refiner {
            // A1111: "Refiner: NAME [HASH], Refiner switch at: F"
            f.push((
                "Refiner".into(),
                format!("{} [{}]", stem(r), hashes.short(r, 10)),
            ));
            f.push(("Refiner switch at".into(), st.refiner_switch.to_string()));
        }
        if st.init_image.is_some() {
            f.push((
                "Denoising strength".into(),
                req.effective_strength().to_string(),
            ));
        }
        if let Some(h) = &st.hires {
            // processing.py's extra_generation_params for the hires fix
            f.push(("Denoising strength".into(), h.denoise.to_string()));
            match h.resize {
                Some((w, hh)) => f.push(("Hires resize".into(), format!("{w}x{hh}"))),
                None => f.push(("Hires upscale".into(), h.scale.to_string())),
            }
            if h.steps > 0 {
                f.push(("Hires steps".into(), h.steps.to_string()));
            }
            f.push(("Hires upscaler".into(), h.upscaler.a1111_name()));
            if let Some(s) = h.sampler {
                f.push(("Hires sampler".into(), a1111_sampler(s).into()));
            }
            if let Some(s) = h.schedule {
                f.push(("Hires schedule type".into(), a1111_schedule(s).into()));
            }
            if let Some(p) = &h.prompt {
                f.push(("Hires prompt".into(), p.clone()));
            }
            if let Some(n) = &h.negative_prompt {
                f.push(("Hires negative prompt".into(), n.clone()));
            }
        }
        if st.mask.is_some() {
            f.extend(st.inpaint.infotext());
        }
        if let Some(o) = &st.outpaint {
            f.push((
                "Outpaint".into(),
                format!(
                    "{},{},{},{} {} feather {}",
                    o.left, o.right, o.top, o.bottom, o.fill, o.feather
                ),
            ));
        }
        f.push((
            "RNG".into(),
            if st.rng == Rng::Philox { "NV" } else { "CPU" }.into(),
        ));
        for (i, c) in st.control.iter().enumerate() {
            let u = &c.spec;
            let module = u
                .preprocessor
                .as_ref()
                .map_or("none".to_string(), |p| p.name.clone());
            f.push((
                format!("ControlNet {i}"),
                format!(
                    "Module: {module}, Model: {}, Weight: {}, Resize Mode: {}, Guidance Start: {}, Guidance End: {}, Control Mode: {}",
                    // reference units have none, as the extension writes it
                    if u.model.as_os_str().is_empty() {
                        "None".to_string()
                    } else {
                        format!("{} [{}]", stem(&u.model), hashes.controlnet_short(&u.model))
                    },
                    u.weight,
                    u.resize.a1111_name(),
                    u.start,
                    u.end,
                    u.mode.a1111_name()
                ),
            ));
        }
        if !self.loras.is_empty() {
            let list: Vec<String> = self
                .loras
                .iter()
                .map(|l| format!("{}: {}", stem(&l.path), hashes.lora_short(&l.path)))
                .collect();
            f.push(("Lora hashes".into(), list.join(", ")));
        }
        if !self.embeddings.is_empty() {
            // A1111: sha256 of the embedding file, 12 digits
            let list: Vec<String> = self
                .embeddings
                .iter()
                .map(|(name, path)| format!("{name}: {}", hashes.short(path, 12)))
                .collect();
            f.push(("TI hashes".into(), list.join(", ")));
        }
        for p in &st.plugins {
            f.push((
                format!("Plugin {}", p.lib.manifest.name),
                p.params
                    .0
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" "),
            ));
        }
        f.push((
            "Version".into(),
            format!("sdctl {}", env!("CARGO_PKG_VERSION")),
        ));
        let fields: Vec<String> = f
            .iter()
            .map(|(k, v)| format!("{k}: {}", quote(v)))
            .collect();
        s.push('\n');
        s.push_str(&fields.join(", "));
        s
    }

    /// Every setting (config keys, absolute paths), with the seed actually used.
    pub fn settings_json(&self, hashes: &mut HashCache) -> Value {
        let (st, req) = (self.job, self.req);
        let path = |p: &Path| Value::from(p.display().to_string());
        let mut m = Map::new();
        m.insert("model".into(), path(self.model));
        m.insert("prompt".into(), st.prompt.clone().into());
        if let Some(n) = &st.negative_prompt {
            m.insert("negative_prompt".into(), n.clone().into());
        }
        m.insert("width".into(), req.width.into());
        m.insert("height".into(), req.height.into());
        m.insert("steps".into(), req.steps.into());
        m.insert("cfg_scale".into(), req.cfg_scale.into());
        m.insert("sampler".into(), req.sampler.name().into());
        m.insert("schedule".into(), req.schedule.to_string().into());
        if let Some(seed) = self.seed {
            m.insert("seed".into(), seed.into());
        }
        m.insert("rng".into(), st.rng.name().into());
        m.insert("batch".into(), req.batch.into());
        m.insert("clip_skip".into(), req.clip_skip.into());
        if st.refiner.is_some() {
            m.insert("refiner_switch".into(), st.refiner_switch.into());
        }
        if let Some(h) = &st.hires {
            match h.resize {
                Some((w, hh)) => m.insert("hires_size".into(), format!("{w}x{hh}").into()),
                None => m.insert("hires_scale".into(), h.scale.into()),
            };
            m.insert("hires_upscaler".into(), h.upscaler.to_string().into());
            m.insert("hires_steps".into(), h.steps.into());
            m.insert("hires_denoise".into(), h.denoise.into());
            for (k, v) in [
                ("hires_prompt", &h.prompt),
                ("hires_negative_prompt", &h.negative_prompt),
            ] {
                if let Some(v) = v {
                    m.insert(k.into(), v.clone().into());
                }
            }
            if let Some(s) = h.sampler {
                m.insert("hires_sampler".into(), s.name().into());
            }
            if let Some(s) = h.schedule {
                m.insert("hires_schedule".into(), s.name().into());
            }
        }
        // SDXL micro-conditioning, when not the defaults
        let micro = &req.micro;
        let size = |s: (usize, usize)| Value::from(format!("{}x{}", s.0, s.1));
        if let Some(s) = micro.original_size {
            m.insert("original_size".into(), size(s));
        }
        if let Some(s) = micro.target_size {
            m.insert("target_size".into(), size(s));
        }
        if micro.crop_top_left != (0, 0) {
            let (x, y) = micro.crop_top_left;
            m.insert("crop_top_left".into(), format!("{x},{y}").into());
        }
        for (k, v) in [
            ("vae", &st.vae),
            ("refiner", &st.refiner),
            ("init_image", &st.init_image),
            ("mask", &st.mask),
            ("noise", &st.noise),
            ("lora_dir", &st.lora_dir),
            ("embeddings_dir", &st.embeddings_dir),
        ] {
            if let Some(p) = v {
                m.insert(k.into(), path(p));
            }
        }
        if let Some(s) = st.strength {
            m.insert("strength".into(), s.into());
        }
        let ip = &st.inpaint;
        if ip.mask_blur > 0 {
            m.insert("mask_blur".into(), ip.mask_blur.into());
        }
        if ip.invert_mask {
            m.insert("invert_mask".into(), true.into());
        }
        if let Some(p) = ip.only_masked_padding {
            m.insert("inpaint_area".into(), "masked".into());
            m.insert("inpaint_padding".into(), p.into());
        }
        if ip.overlay {
            m.insert("mask_overlay".into(), true.into());
        }
        if ip.fill != crate::inpaint::Fill::Original {
            m.insert("inpaint_fill".into(), ip.fill.name().into());
        }
        m.insert("device".into(), st.device.clone().into());
        m.insert("dtype".into(), st.dtype.clone().into());
        let control: Vec<Value> = st
            .control
            .iter()
            .map(|c| {
                let u = &c.spec;
                let mut t = json!({
                    "model": path(&u.model),
                    "image": path(&u.image),
                    "weight": u.weight,
                    "start": u.start,
                    "end": u.end,
                    "mode": u.mode.name(),
                    "resize": u.resize.name(),
                });
                let o = t.as_object_mut().expect("object");
                // reference units have no model
                if u.model.as_os_str().is_empty() {
                    o.remove("model");
                }
                if let Some(e) = &u.encoder {
                    o.insert("encoder".into(), path(e));
                }
                if let Some(id) = &c.id {
                    o.insert("id".into(), id.clone().into());
                }
                if let Some(m) = &u.mask {
                    o.insert("mask".into(), path(m));
                }
                if let Some(ty) = &u.control_type {
                    o.insert("type".into(), ty.clone().into());
                }
                if u.resolution != sd_controlnet::UnitSpec::new("", "").resolution {
                    o.insert("resolution".into(), u.resolution.into());
                }
                if let Some(p) = &u.preprocessor {
                    let mut pre = Map::new();
                    pre.insert("name".into(), p.name.clone().into());
                    for (k, v) in &p.params {
                        pre.insert(k.clone(), value_to_json(v));
                    }
                    o.insert("preprocessor".into(), Value::Object(pre));
                }
                t
            })
            .collect();
        if !control.is_empty() {
            m.insert("control".into(), control.into());
        }
        // --lora flags, [[lora]] tables and <lora:...> prompt tags: the tags stay in the
        // prompt, so only the others are listed here
        let loras: Vec<Value> = st
            .lora
            .iter()
            .map(|l| {
                json!({ "path": path(&l.path), "unet_weight": l.unet_weight, "te_weight": l.te_weight })
            })
            .collect();
        if !loras.is_empty() {
            m.insert("lora".into(), loras.into());
        }
        let plugins: Vec<Value> = st
            .plugins
            .iter()
            .map(|p| {
                let mut t = Map::new();
                t.insert("path".into(), path(&p.lib.path));
                for (k, v) in &p.params.0 {
                    t.insert(k.clone(), value_to_json(v));
                }
                Value::Object(t)
            })
            .collect();
        if !plugins.is_empty() {
            m.insert("plugins".into(), plugins.into());
        }
        let mut files = Map::new();
        files.insert(
            self.model.display().to_string(),
            hashes.sha256(self.model).into(),
        );
        for c in &st.control {
            files.insert(
                c.spec.model.display().to_string(),
                hashes.sha256(&c.spec.model).into(),
            );
        }
        for l in self.loras {
            files.insert(l.path.display().to_string(), hashes.sha256(&l.path).into());
        }
        json!({
            "version": format!("sdctl {}", env!("CARGO_PKG_VERSION")),
            "settings": Value::Object(m),
            "sha256": Value::Object(files),
        })
    }
}

/// Split A1111's `Key: value, Key: "quoted, value"` list (a parameters text's last line).
pub fn fields(line: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        let Some(colon) = rest.find(':') else { break };
        let key = rest[..colon].trim().to_string();
        let mut v = rest[colon + 1..].trim_start();
        let value;
        if v.starts_with('"') {
            // a JSON string
            let mut end = 1;
            let bytes = v.as_bytes();
            while end < bytes.len() && (bytes[end] != b'"' || bytes[end - 1] == b'\\') {
                end += 1;
            }
            let q = &v[..(end + 1).min(v.len())];
            value =
                serde_json::from_str::<String>(q).unwrap_or_else(|_| q.trim_matches('"').into());
            v = &v[(end + 1).min(v.len())..];
        } else {
            let end = v.find(',').unwrap_or(v.len());
            value = v[..end].trim().to_string();
            v = &v[end..];
        }
        out.push((key, value));
        rest = v.trim_start().trim_start_matches(',').trim_start();
    }
    out
}

/// Settings from an A1111 `parameters` text (prompts, steps, sampler and schedule, CFG, seed,
/// size, clip skip, RNG). The model is not recoverable from its name: give `--model`.
pub fn parse_parameters(text: &str) -> Result<Map<String, Value>, String> {
    let lines: Vec<&str> = text.lines().collect();
    let last = lines
        .iter()
        .rposition(|l| l.starts_with("Steps: "))
        .ok_or("no \"Steps: ...\" line: not A1111 infotext")?;
    let mut prompt = Vec::new();
    let mut negative: Vec<String> = Vec::new();
    for l in &lines[..last] {
        if let Some(n) = l.strip_prefix("Negative prompt: ") {
            negative.push(n.to_string());
        } else if !negative.is_empty() {
            negative.push(l.to_string());
        } else {
            prompt.push(l.to_string());
        }
    }
    let mut m = Map::new();
    m.insert("prompt".into(), prompt.join("\n").into());
    // no "Negative prompt:" line: none given (an SDXL base model's zeros, as when it was made)
    if !negative.is_empty() {
        m.insert("negative_prompt".into(), negative.join("\n").into());
    }
    let num = |v: &str, k: &str| -> Result<Value, String> {
        if let Ok(i) = v.parse::<i64>() {
            return Ok(i.into());
        }
        v.parse::<f64>()
            .map(Value::from)
            .map_err(|_| format!("{k}: {v:?} is not a number"))
    };
    let mut sampler = None;
    let mut schedule = None;
    let mut denoise: Option<String> = None;
    let mut rng = "philox"; // A1111's default source is the GPU's: torch.randn on CUDA
    for (k, v) in fields(lines[last]) {
        match k.as_str() {
            "Steps" => {
                m.insert("steps".into(), num(&v, &k)?);
            }
            "CFG scale" => {
                m.insert("cfg_scale".into(), num(&v, &k)?);
            }
            "Seed" => {
                m.insert("seed".into(), num(&v, &k)?);
            }
            "Clip skip" => {
                m.insert("clip_skip".into(), num(&v, &k)?);
            }
            "Size" => {
                let (w, h) = v.split_once('x').ok_or(format!("Size: {v:?}"))?;
                m.insert("width".into(), num(w, "Size")?);
                m.insert("height".into(), num(h, "Size")?);
            }
            "Sampler" => sampler = Some(v),
            // the hires fix (A1111 writes "Denoising strength" for it too)
            "Hires upscale" => {
                m.insert("hires_scale".into(), num(&v, &k)?);
            }
            "Hires resize" => {
                m.insert("hires_size".into(), v.clone().into());
            }
            "Hires steps" => {
                m.insert("hires_steps".into(), num(&v, &k)?);
            }
            "Hires upscaler" => {
                let u: crate::hires::HiresUpscaler = v.parse().map_err(|e| format!("{k}: {e}"))?;
                m.insert("hires_upscaler".into(), u.to_string().into());
            }
            "Hires prompt" => {
                m.insert("hires_prompt".into(), v.clone().into());
            }
            "Hires negative prompt" => {
                m.insert("hires_negative_prompt".into(), v.clone().into());
            }
            "Hires sampler" => {
                let (kind, _) = SamplerKind::parse_alias(&v).map_err(|e| format!("{k}: {e}"))?;
                m.insert("hires_sampler".into(), kind.name().into());
            }
            "Hires schedule type" => {
                if let Ok(s) = v.parse::<Schedule>() {
                    m.insert("hires_schedule".into(), s.name().into());
                }
            }
            "Denoising strength" => denoise = Some(v),
            "Schedule type" => schedule = Some(v.to_lowercase()),
            "RNG" if v == "CPU" => rng = "torch-cpu",
            _ => {}
        }
    }
    if let Some(s) = sampler {
        let (kind, implied) = SamplerKind::parse_alias(&s).map_err(|e| format!("Sampler: {e}"))?;
        m.insert("sampler".into(), kind.name().into());
        // A1111's labels ("SGM Uniform"); ones sdctl lacks ("Automatic", "Align Your Steps")
        // leave the sampler's default
        let sched = schedule
            .and_then(|s| s.parse::<Schedule>().ok())
            .or(implied)
            .map(|s| s.to_string());
        if let Some(sc) = sched {
            m.insert("schedule".into(), sc.into());
        }
    }
    // with a hires fix, "Denoising strength" is its second pass's (img2img's strength is
    // not carried: a PNG names no init image)
    if m.contains_key("hires_scale") || m.contains_key("hires_size") {
        if let Some(d) = denoise {
            m.insert("hires_denoise".into(), num(&d, "Denoising strength")?);
        }
    }
    m.insert("rng".into(), rng.into());
    Ok(m)
}

/// The only settings a PNG may carry (`--from-png`, the server's png-info, any upload): the
/// generation parameters, and the model, VAE, control units and LoRAs they were made with
/// (files that are read as weights and images, never run). Anything else in a PNG, above all
/// paths that are loaded as code or written (`plugins`, `plugin_dir`, `output`,
/// `save_latents`) and other files to read (`noise`, `lora_dir`, `init_image`, `mask`), is
/// dropped: a PNG is data from anyone, those come only from the user's own flags and configs.
/// The inpainting steps' keys ([`crate::inpaint::KEYS`]) are carried too ([`png_may_carry`]).
pub const PNG_SETTINGS_KEYS: &[&str] = &[
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "steps",
    "cfg_scale",
    "sampler",
    "schedule",
    "seed",
    "rng",
    "batch",
    "clip_skip",
    "strength",
    "device",
    "dtype",
    "model",
    "vae",
    "refiner",
    "refiner_switch",
    "hires_scale",
    "hires_size",
    "hires_upscaler",
    "hires_steps",
    "hires_denoise",
    "hires_prompt",
    "hires_negative_prompt",
    "hires_sampler",
    "hires_schedule",
    "original_size",
    "target_size",
    "crop_top_left",
    "control",
    "lora",
];

/// Settings read from a PNG: the parameters it may carry, and the keys that were dropped.
#[derive(Debug, Clone, Default)]
pub struct PngSettings {
    pub settings: Map<String, Value>,
    /// Keys a PNG may not carry ([`png_may_carry`]), in the order the PNG has them.
    pub dropped: Vec<String>,
}

/// Whether a PNG may carry this settings key: [`PNG_SETTINGS_KEYS`] and the inpainting steps'
/// [`crate::inpaint::KEYS`].
pub fn png_may_carry(key: &str) -> bool {
    PNG_SETTINGS_KEYS.contains(&key) || crate::inpaint::KEYS.contains(&key)
}

/// Keep only the keys a PNG may carry ([`png_may_carry`]).
pub fn only_parameters(all: Map<String, Value>) -> PngSettings {
    let mut out = PngSettings::default();
    for (k, v) in all {
        if png_may_carry(&k) {
            out.settings.insert(k, v);
        } else {
            out.dropped.push(k);
        }
    }
    out
}

/// The settings a PNG was made with (sdctl's JSON chunk, else A1111's `parameters` text),
/// limited to the keys a PNG may carry; the others are listed in `dropped`.
pub fn png_settings(path: &Path) -> Result<PngSettings, String> {
    raw_settings(path).map(only_parameters)
}

/// The settings a PNG was made with, limited to the keys a PNG may carry (see
/// [`png_settings`], which also says what was dropped).
pub fn settings_from_png(path: &Path) -> Result<Map<String, Value>, String> {
    png_settings(path).map(|s| s.settings)
}

/// Everything in the PNG's settings, unfiltered: never layer this into a job.
fn raw_settings(path: &Path) -> Result<Map<String, Value>, String> {
    let chunks = text_chunks(path)?;
    let find = |k: &str| find(&chunks, k);
    let shown = path.display();
    if let Some(j) = find(JSON_CHUNK) {
        let v: Value =
            serde_json::from_str(j).map_err(|e| format!("{shown}: `{JSON_CHUNK}` chunk: {e}"))?;
        return v["settings"]
            .as_object()
            .cloned()
            .ok_or(format!("{shown}: `{JSON_CHUNK}` chunk without settings"));
    }
    if let Some(p) = find("parameters") {
        return parse_parameters(p).map_err(|e| format!("{shown}: parameters: {e}"));
    }
    if find("prompt").is_some() || find("workflow").is_some() {
        return Err(format!(
            "{shown}: a ComfyUI image stores its node graph, not settings (`sdctl png-info` shows its prompts)"
        ));
    }
    Err(format!("{shown}: no generation settings in this PNG"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a1111_infotext_is_read_back() {
        let text = "a cat, (masterpiece:1.2)\nsecond line\nNegative prompt: blurry, lowres\nSteps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3141592, Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, Lora hashes: \"a: 0123456789ab, b: ba9876543210\", Version: v1.10.1";
        let m = parse_parameters(text).unwrap();
        assert_eq!(m["prompt"], "a cat, (masterpiece:1.2)\nsecond line");
        assert_eq!(m["negative_prompt"], "blurry, lowres");
        assert_eq!(m["steps"], 25);
        assert_eq!(m["sampler"], "dpmpp_2m");
        assert_eq!(m["schedule"], "karras");
        assert_eq!(m["cfg_scale"], 7);
        assert_eq!(m["seed"], 3141592);
        assert_eq!(
            (m["width"].clone(), m["height"].clone()),
            (512.into(), 768.into())
        );
        assert_eq!(m["clip_skip"], 2);
        assert_eq!(m["rng"], "philox");
        let m = parse_parameters(
            "x\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 1, Size: 64x64, RNG: CPU",
        )
        .unwrap();
        assert_eq!(m["sampler"], "euler_a");
        assert_eq!(m["cfg_scale"], 7.5);
        assert_eq!(m["rng"], "torch-cpu");
        // A1111 1.9+ writes the schedule apart; older ones fold it into the sampler's name
        for (text, sampler, schedule) in [
            (
                "Sampler: DPM++ 2M SDE, Schedule type: Exponential",
                "dpmpp_2m_sde",
                Some("exponential"),
            ),
            (
                "Sampler: Heun, Schedule type: SGM Uniform",
                "heun",
                Some("sgm_uniform"),
            ),
            ("Sampler: DPM++ SDE Karras", "dpmpp_sde", Some("karras")),
            ("Sampler: LMS, Schedule type: Align Your Steps", "lms", None),
            ("Sampler: UniPC, Schedule type: Beta", "unipc", Some("beta")),
            ("Sampler: LCM", "lcm", None),
        ] {
            let m =
                parse_parameters(&format!("x\nSteps: 4, {text}, Seed: 1, Size: 64x64")).unwrap();
            assert_eq!(m["sampler"], sampler, "{text}");
            assert_eq!(
                m.get("schedule").and_then(|v| v.as_str()),
                schedule,
                "{text}"
            );
        }
        for kind in SamplerKind::ALL {
            let (k, _) = SamplerKind::parse_alias(a1111_sampler(kind)).unwrap();
            assert_eq!(k, kind);
        }
        for s in Schedule::ALL {
            assert_eq!(a1111_schedule(s).parse::<Schedule>().unwrap(), s);
        }
        assert!(parse_parameters("just text").is_err());
    }

    /// A PNG's settings never name plugins, outputs or other files to load or write.
    #[test]
    fn png_settings_keep_parameters_only() {
        let all: Map<String, Value> = serde_json::from_value(json!({
            "prompt": "p", "steps": 3, "model": "/m", "lora": [{"path": "/l"}],
            "plugins": ["/evil.so"], "plugin_dir": "/evil", "output": "/o.png",
            "save_latents": "/x", "noise": "/n", "lora_dir": "/d", "init_image": "/i",
            "mask": "/k", "include": ["x.toml"], "whatever": 1
        }))
        .unwrap();
        let s = only_parameters(all);
        let mut kept: Vec<&str> = s.settings.keys().map(|k| k.as_str()).collect();
        kept.sort();
        assert_eq!(kept, ["lora", "model", "prompt", "steps"]);
        let mut dropped = s.dropped.clone();
        dropped.sort();
        assert_eq!(
            dropped,
            [
                "include",
                "init_image",
                "lora_dir",
                "mask",
                "noise",
                "output",
                "plugin_dir",
                "plugins",
                "save_latents",
                "whatever"
            ]
        );
    }

    #[test]
    fn quoted_fields_split_correctly() {
        let f = fields("A: 1, B: \"x, y: z\", C: w");
        assert_eq!(
            f,
            vec![
                ("A".into(), "1".into()),
                ("B".into(), "x, y: z".into()),
                ("C".into(), "w".into())
            ]
        );
    }
}
