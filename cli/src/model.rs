//! `sdctl model inspect` and `sdctl model convert`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};
use sd_pipeline::loading::single_file::{self, Checkpoint, Kind};
use sd_plugins_api::ModelPart;
use sd_weights::Store;

use crate::CliResult;

#[derive(Subcommand)]
pub enum ModelCommand {
    /// What a model file or folder is: format, family, prediction type, parameters per
    /// component, dtypes, and the keys it did not understand.
    Inspect { path: PathBuf },
    /// Convert between a single-file checkpoint and a diffusers folder.
    Convert(ConvertArgs),
    /// A new diffusers folder with freshly initialised weights, from a folder of configs
    /// (unet/, vae/, text_encoder/ config.json and scheduler/scheduler_config.json), to train
    /// with `sdctl train vae|unet|controlnet`.
    New(NewArgs),
}

#[derive(Args)]
pub struct NewArgs {
    /// The folder holding the configs
    pub configs: PathBuf,
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Target {
    Diffusers,
    SingleFile,
}

#[derive(Args)]
pub struct ConvertArgs {
    /// A single-file checkpoint (.safetensors, .ckpt) or a diffusers folder
    pub input: PathBuf,
    /// The folder (diffusers) or .safetensors file (single-file, with NAME.yaml beside it) to write
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long, value_enum)]
    pub to: Target,
    /// Store the weights as float16
    #[arg(long)]
    pub half: bool,
}

fn millions(n: usize) -> String {
    format!("{:.2} M", n as f64 / 1e6)
}

fn dtypes(list: &[(String, candle_core::DType)]) -> String {
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    for (_, d) in list {
        *count.entry(format!("{d:?}").to_lowercase()).or_default() += 1;
    }
    count
        .iter()
        .map(|(d, n)| format!("{d} ({n} tensors)"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn inspect_folder(path: &Path) -> CliResult {
    let read = |p: &str| -> CliResult<serde_json::Value> {
        let f = path.join(p);
        let t = std::fs::read_to_string(&f).map_err(|e| format!("{}: {e}", f.display()))?;
        Ok(serde_json::from_str(&t).map_err(|e| format!("{}: {e}", f.display()))?)
    };
    let unet = read("unet/config.json")?;
    let te = read("text_encoder/config.json")?;
    let sched = read("scheduler/scheduler_config.json")?;
    println!("path: {}", path.display());
    println!("format: diffusers folder");
    let sd2 = te["hidden_act"].as_str() == Some("gelu");
    println!(
        "family: {}",
        if sd2 {
            "SD 2.x (OpenCLIP text encoder)"
        } else {
            "SD 1.x (CLIP text encoder)"
        }
    );
    println!(
        "prediction: {}",
        sched["prediction_type"].as_str().unwrap_or("epsilon")
    );
    let inc = unet["in_channels"].as_u64().unwrap_or(4);
    println!(
        "inpainting: {}",
        if inc == 9 {
            "yes (9-channel UNet)"
        } else {
            "no"
        }
    );
    let mut all = Vec::new();
    for part in ["unet", "vae", "text_encoder"] {
        let mut n = 0;
        for f in sd_pipeline::loading::files::weight_files(&path.join(part))? {
            let store = Store::open(&f)?;
            n += store
                .shapes()
                .values()
                .map(|s| s.iter().product::<usize>())
                .sum::<usize>();
            all.extend(store.dtypes());
        }
        println!("parameters {part}: {}", millions(n));
    }
    println!("dtype: {}", dtypes(&all));
    Ok(())
}

fn inspect_file(path: &Path) -> CliResult {
    let store = Store::open(path)?;
    let shapes = store.shapes();
    let format = if sd_weights::pickle::is_pickle(path) {
        "PyTorch pickle (read without running code)"
    } else {
        "safetensors"
    };
    println!("path: {}", path.display());
    println!("format: {format}, {} tensors", shapes.len());
    println!("dtype: {}", dtypes(&store.dtypes()));
    let total: usize = shapes.values().map(|s| s.iter().product::<usize>()).sum();
    match single_file::detect::kind(&shapes) {
        Kind::Checkpoint => {}
        k => {
            let what = match k {
                Kind::ControlNet => "ControlNet (use it in a control unit)",
                Kind::Lora => "LoRA (use it with --lora)",
                Kind::Vae => "VAE (use it with --vae)",
                _ => "unknown (no Stable Diffusion keys)",
            };
            println!("kind: {what}");
            println!("parameters: {}", millions(total));
            return Ok(());
        }
    }
    drop(store);
    let ck = Checkpoint::open(path)?;
    let d = &ck.detected;
    println!("kind: single-file checkpoint (LDM layout)");
    println!(
        "family: {} ({})",
        d.family.name(),
        match d.family {
            single_file::Family::Sd1 => "CLIP text encoder: cond_stage_model.transformer.*",
            single_file::Family::Sd2 => "OpenCLIP text encoder: cond_stage_model.model.*",
        }
    );
    println!(
        "prediction: {}",
        if d.v_prediction {
            "v_prediction"
        } else {
            "epsilon"
        }
    );
    println!(
        "inpainting: {}",
        if d.inpaint {
            "yes (9-channel UNet: model.diffusion_model.input_blocks.0.0.weight)"
        } else {
            "no"
        }
    );
    println!(
        "config: {}",
        match &ck.sidecar {
            Some(y) => format!("sidecar {}", y.display()),
            None => "detected from the tensors (no sidecar yaml)".into(),
        }
    );
    let inv = ck.inventory()?;
    let mut per: BTreeMap<&str, usize> = BTreeMap::new();
    for (part, _, _, shape) in &inv.params {
        let name = match part {
            ModelPart::Unet => "unet",
            ModelPart::Vae => "vae",
            ModelPart::TextEncoder => "text_encoder",
        };
        *per.entry(name).or_default() += shape.iter().product::<usize>();
    }
    for (k, n) in &per {
        println!("parameters {k}: {}", millions(*n));
    }
    let mut groups: BTreeMap<String, usize> = BTreeMap::new();
    for k in &inv.ignored {
        let g = if k.starts_with("model_ema.") {
            "model_ema.*".to_string()
        } else if k.contains(".resblocks.") {
            "OpenCLIP's last resblock (unused: SD2 stops at the penultimate)".into()
        } else {
            k.clone()
        };
        *groups.entry(g).or_default() += 1;
    }
    println!("ignored: {} tensors", inv.ignored.len());
    for (g, n) in groups {
        println!("  {g}: {n}");
    }
    println!("not understood: {} keys", inv.unknown.len());
    for k in inv.unknown.iter().take(20) {
        println!("  {k}");
    }
    if inv.unknown.len() > 20 {
        println!("  ... and {} more", inv.unknown.len() - 20);
    }
    Ok(())
}

pub fn run(cmd: ModelCommand) -> CliResult {
    match cmd {
        ModelCommand::Inspect { path } => {
            if path.is_dir() {
                inspect_folder(&path)
            } else if path.is_file() {
                inspect_file(&path)
            } else {
                Err(format!("{}: no such file or folder", path.display()).into())
            }
        }
        ModelCommand::New(a) => {
            sd_controlnet::train::base::new_model(&a.configs, &a.output, a.seed)?;
            eprintln!("new model in {}", a.output.display());
            Ok(())
        }
        ModelCommand::Convert(a) => {
            match a.to {
                Target::Diffusers => {
                    if a.input.is_dir() {
                        if !a.half {
                            return Err(format!(
                                "{}: already a diffusers folder (add --half to write a float16 copy)",
                                a.input.display()
                            )
                            .into());
                        }
                        if a.output.exists() {
                            return Err(
                                format!("--output {}: already exists", a.output.display()).into()
                            );
                        }
                        let stage = a.output.with_extension("partial");
                        let _ = std::fs::remove_dir_all(&stage);
                        half_copy(&a.input, &stage)?;
                        std::fs::rename(&stage, &a.output)
                            .map_err(|e| format!("{}: {e}", a.output.display()))?;
                        eprintln!("wrote {} (float16)", a.output.display());
                        return Ok(());
                    }
                    single_file::convert::to_diffusers(&a.input, &a.output, a.half)?;
                }
                Target::SingleFile => {
                    if !a.input.join("model_index.json").is_file() {
                        return Err(format!(
                            "{}: not a diffusers folder (model_index.json not found)",
                            a.input.display()
                        )
                        .into());
                    }
                    if a.output.extension().and_then(|e| e.to_str()) != Some("safetensors") {
                        return Err(format!(
                            "--output {}: name it NAME.safetensors",
                            a.output.display()
                        )
                        .into());
                    }
                    single_file::convert::to_single_file(&a.input, &a.output, a.half)?;
                }
            }
            eprintln!("wrote {}", a.output.display());
            Ok(())
        }
    }
}

/// Copy a folder tree, writing every `.safetensors` file's float tensors as float16.
fn half_copy(from: &Path, to: &Path) -> CliResult {
    std::fs::create_dir_all(to).map_err(|e| format!("{}: {e}", to.display()))?;
    for e in std::fs::read_dir(from).map_err(|e| format!("{}: {e}", from.display()))? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if e.file_type()?.is_dir() {
            half_copy(&src, &dst)?;
        } else if src.extension().is_some_and(|x| x == "safetensors") {
            let m = candle_core::safetensors::load(&src, &candle_core::Device::Cpu)
                .map_err(|e| format!("{}: {e}", src.display()))?;
            let m: std::collections::HashMap<String, candle_core::Tensor> = m
                .into_iter()
                .map(|(k, t)| {
                    let t = if t.dtype().is_float() {
                        t.to_dtype(candle_core::DType::F16)?
                    } else {
                        t
                    };
                    Ok((k, t))
                })
                .collect::<candle_core::Result<_>>()?;
            candle_core::safetensors::save(&m, &dst)
                .map_err(|e| format!("{}: {e}", dst.display()))?;
        } else {
            std::fs::copy(&src, &dst).map_err(|e| format!("{}: {e}", dst.display()))?;
        }
    }
    Ok(())
}
