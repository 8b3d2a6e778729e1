//! The settings schema: every generation option with its one name (config key `cfg_scale`,
//! flag `--cfg-scale`, environment variable `SDCTL_CFG_SCALE`, HTTP field), type, default and
//! range. Every door that takes settings from people checks them against this table.

/// What a path names, which decides how it is checked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PathRole {
    /// An existing file.
    File,
    /// An existing folder.
    Dir,
    /// An existing file or folder (models).
    FileOrDir,
    /// A file to write: its folder must exist.
    Output,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Ty {
    Str,
    Int {
        min: i64,
        max: i64,
    },
    Float {
        min: f64,
        max: f64,
    },
    Bool,
    Choice(&'static [&'static str]),
    /// `cpu`, `cuda` or `cuda:N` ([`crate::device::parse_name`]).
    Device,
    Path(PathRole),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Default {
    None,
    Str(&'static str),
    Int(i64),
    Float(f64),
    Bool(bool),
}

#[derive(Debug, Clone, Copy)]
pub struct Field {
    pub key: &'static str,
    pub ty: Ty,
    pub default: Default,
}

const fn f(key: &'static str, ty: Ty, default: Default) -> Field {
    Field { key, ty, default }
}

const SIZE: Ty = Ty::Int { min: 8, max: 16384 };
/// Any finite number (infinite ends: no bound; see `sd_plugins_api::number::Range`).
const ANY_NUMBER: Ty = Ty::Float {
    min: f64::NEG_INFINITY,
    max: f64::INFINITY,
};

/// Top-level scalar settings, in the order `config show` prints them.
pub const FIELDS: &[Field] = &[
    f("model", Ty::Path(PathRole::FileOrDir), Default::None),
    // a VAE file, or a TAESD (folder or file) that then decodes
    f("vae", Ty::Path(PathRole::FileOrDir), Default::None),
    // an SDXL refiner and A1111's "Switch at" (0.8 when absent)
    f("refiner", Ty::Path(PathRole::FileOrDir), Default::None),
    f(
        "refiner_switch",
        Ty::Float { min: 0.0, max: 1.0 },
        Default::None,
    ),
    f("prompt", Ty::Str, Default::Str("")),
    f("negative_prompt", Ty::Str, Default::None),
    // A1111's hires fix: on with hires_scale or hires_size ("WxH", 0 = from the other side)
    f(
        "hires_scale",
        Ty::Float { min: 1.0, max: 8.0 },
        Default::None,
    ),
    f("hires_size", Ty::Str, Default::None),
    f("hires_upscaler", Ty::Str, Default::None),
    f("hires_steps", Ty::Int { min: 0, max: 1000 }, Default::None),
    f(
        "hires_denoise",
        Ty::Float { min: 0.0, max: 1.0 },
        Default::None,
    ),
    f("hires_prompt", Ty::Str, Default::None),
    f("hires_negative_prompt", Ty::Str, Default::None),
    f("upscaler_dir", Ty::Path(PathRole::Dir), Default::None),
    f("hires_sampler", Ty::Str, Default::None),
    f("hires_schedule", Ty::Str, Default::None),
    // SDXL micro-conditioning: "WxH", "WxH", "X,Y"; absent: the generation size, 0,0
    f("original_size", Ty::Str, Default::None),
    f("target_size", Ty::Str, Default::None),
    f("crop_top_left", Ty::Str, Default::None),
    f("width", SIZE, Default::None),
    f("height", SIZE, Default::None),
    f("steps", Ty::Int { min: 1, max: 10000 }, Default::Int(20)),
    f(
        "cfg_scale",
        Ty::Float {
            min: 0.0,
            max: 100.0,
        },
        Default::Float(7.5),
    ),
    f("sampler", Ty::Str, Default::Str("dpmpp_2m")),
    f(
        "schedule",
        Ty::Choice(&[
            "normal",
            "karras",
            "exponential",
            "beta",
            "sgm_uniform",
            "simple",
        ]),
        Default::None,
    ),
    f(
        "seed",
        Ty::Int {
            min: 0,
            max: i64::MAX,
        },
        Default::None,
    ),
    f(
        "rng",
        Ty::Choice(&["torch-cpu", "philox"]),
        Default::Str("torch-cpu"),
    ),
    f("batch", Ty::Int { min: 1, max: 256 }, Default::Int(1)),
    f("clip_skip", Ty::Int { min: 1, max: 24 }, Default::Int(1)),
    f("init_image", Ty::Path(PathRole::File), Default::None),
    f("strength", Ty::Float { min: 0.0, max: 1.0 }, Default::None),
    f("mask", Ty::Path(PathRole::File), Default::None),
    // A1111's image steps around inpainting (sd::inpaint); absent: not taken (0, false,
    // "whole", "original")
    f("mask_blur", Ty::Int { min: 0, max: 64 }, Default::None),
    f("invert_mask", Ty::Bool, Default::None),
    f(
        "inpaint_area",
        Ty::Choice(&["whole", "masked"]),
        Default::None,
    ),
    f(
        "inpaint_padding",
        Ty::Int { min: 0, max: 4096 },
        Default::None,
    ),
    f("mask_overlay", Ty::Bool, Default::None),
    f(
        "inpaint_fill",
        Ty::Choice(&crate::inpaint::Fill::NAMES),
        Default::None,
    ),
    f("noise", Ty::Path(PathRole::File), Default::None),
    f("save_latents", Ty::Path(PathRole::Output), Default::None),
    f("output", Ty::Path(PathRole::Output), Default::None),
    f("device", Ty::Device, Default::Str("cpu")),
    f(
        "dtype",
        Ty::Choice(&["f32", "f16", "bf16"]),
        Default::Str("f32"),
    ),
    f("lowvram", Ty::Bool, Default::Bool(false)),
    f("lora_dir", Ty::Path(PathRole::Dir), Default::None),
    f("embeddings_dir", Ty::Path(PathRole::Dir), Default::None),
    // tiled VAE: auto (above a memory budget), on, off; tile size (image pixels) and overlap
    f(
        "vae_tiling",
        Ty::Choice(&["auto", "on", "off"]),
        Default::None,
    ),
    f(
        "vae_tile_size",
        Ty::Int { min: 64, max: 4096 },
        Default::None,
    ),
    f(
        "vae_tile_overlap",
        Ty::Float { min: 0.0, max: 0.5 },
        Default::None,
    ),
    // depth2img (depth models): a depth map file, or a preprocessor estimating one
    f("depth_map", Ty::Path(PathRole::File), Default::None),
    f("depth_estimator", Ty::Str, Default::None),
    // outpainting: "LEFT,RIGHT,TOP,BOTTOM" pixels added to the init image, how they start, the
    // mask feather (A1111's mask blur)
    f("outpaint", Ty::Str, Default::None),
    f(
        "outpaint_fill",
        Ty::Choice(&crate::outpaint::PadFill::NAMES),
        Default::None,
    ),
    f(
        "outpaint_feather",
        Ty::Int { min: 0, max: 64 },
        Default::None,
    ),
    // a live preview written after every step, decoded with a TAESD or A1111's cheap map
    f(
        "preview",
        Ty::Choice(&["none", "cheap", "taesd"]),
        Default::None,
    ),
    f("preview_path", Ty::Path(PathRole::Output), Default::None),
    f("taesd", Ty::Path(PathRole::FileOrDir), Default::None),
    f("strict_lora", Ty::Bool, Default::Bool(false)),
    f("plugin_dir", Ty::Path(PathRole::Dir), Default::None),
    f("allow_extreme_weights", Ty::Bool, Default::Bool(false)),
];

/// Keys of a `[[control]]` table.
pub const CONTROL_FIELDS: &[Field] = &[
    f("id", Ty::Str, Default::None),
    f("model", Ty::Path(PathRole::FileOrDir), Default::None),
    // a file; for an IP-Adapter also a folder of reference images (averaged)
    f("image", Ty::Path(PathRole::FileOrDir), Default::None),
    f("weight", ANY_NUMBER, Default::Float(1.0)),
    f(
        "start",
        Ty::Float { min: 0.0, max: 1.0 },
        Default::Float(0.0),
    ),
    f("end", Ty::Float { min: 0.0, max: 1.0 }, Default::Float(1.0)),
    f(
        "mode",
        Ty::Choice(&["balanced", "prompt", "control"]),
        Default::Str("balanced"),
    ),
    f(
        "resize",
        Ty::Choice(&["just", "crop", "fill"]),
        Default::Str("crop"),
    ),
    // a name, or a table { name = "...", PARAM = VALUE, ... }; checked against the registry
    f("preprocessor", Ty::Str, Default::Str("none")),
    f("mask", Ty::Path(PathRole::File), Default::None),
    // a union ControlNet's control type (ComfyUI's names and numbering)
    f(
        "type",
        Ty::Choice(&sd_controlnet::union::TYPE_NAMES),
        Default::None,
    ),
    // the hires fix's passes the unit acts on (sd-webui-controlnet's hr_option)
    f(
        "hr",
        Ty::Choice(&crate::hires::HrOption::NAMES),
        Default::None,
    ),
    // the processor resolution a preprocessor runs at (sdctl detect --resolution)
    f(
        "resolution",
        Ty::Int { min: 64, max: 8192 },
        Default::Int(512),
    ),
    // an IP-Adapter's CLIP image encoder (default: image_encoder/ beside the adapter file)
    f("encoder", Ty::Path(PathRole::FileOrDir), Default::None),
];

/// Keys of a `[[lora]]` table. `weight` sets both parts; `unet_weight` / `te_weight` one each.
pub const LORA_FIELDS: &[Field] = &[
    f("id", Ty::Str, Default::None),
    f("path", Ty::Path(PathRole::File), Default::None),
    f("weight", ANY_NUMBER, Default::Float(1.0)),
    f("unet_weight", ANY_NUMBER, Default::None),
    f("te_weight", ANY_NUMBER, Default::None),
];

/// Keys that hold lists of tables (concatenated across files) or file structure.
pub const LIST_KEYS: &[&str] = &["control", "lora", "plugins"];
pub const INCLUDE_KEY: &str = "include";

/// Control weights outside this range need `allow_extreme_weights`.
pub const CONTROL_WEIGHT_RANGE: (f64, f64) = (0.0, 2.0);
/// LoRA weights outside this range need `allow_extreme_weights` (negative LoRA weights are a
/// common way to subtract a concept, so the range is symmetric).
pub const LORA_WEIGHT_RANGE: (f64, f64) = sd_lora::WEIGHT_RANGE;

/// The longest prompt and negative prompt, in bytes (a prompt is tokenized and parsed for
/// tags before anything else is checked; a few megabytes took gigabytes).
pub const MAX_PROMPT_BYTES: usize = 64 << 10;

/// The problem with a `key` (prompt, negative_prompt) of `len` bytes, if it is too long.
pub fn prompt_too_long(key: &str, len: usize) -> Option<String> {
    (len > MAX_PROMPT_BYTES).then(|| {
        format!(
            "{key}: {len} bytes, more than the {} KiB a prompt may hold",
            MAX_PROMPT_BYTES >> 10
        )
    })
}

pub fn env_var(key: &str) -> String {
    format!("SDCTL_{}", key.to_uppercase())
}

pub fn flag(key: &str) -> String {
    format!("--{}", key.replace('_', "-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_of(key: &str) -> Default {
        FIELDS.iter().find(|f| f.key == key).unwrap().default
    }

    /// The schema's defaults (what `config show` prints) are the `Job`'s.
    #[test]
    fn schema_defaults_are_the_jobs() {
        let j = crate::Job::default();
        assert_eq!(default_of("steps"), Default::Int(j.steps as i64));
        assert_eq!(default_of("cfg_scale"), Default::Float(j.cfg_scale));
        assert_eq!(default_of("sampler"), Default::Str(j.sampler.name()));
        assert_eq!(default_of("rng"), Default::Str(j.rng.name()));
        assert_eq!(default_of("batch"), Default::Int(j.batch as i64));
        assert_eq!(default_of("clip_skip"), Default::Int(j.clip_skip as i64));
        assert_eq!(default_of("device"), Default::Str("cpu"));
        assert_eq!(j.device, "cpu");
        assert_eq!(default_of("dtype"), Default::Str("f32"));
        assert_eq!(j.dtype, "f32");
        assert_eq!(default_of("strict_lora"), Default::Bool(j.strict_lora));
    }
}
