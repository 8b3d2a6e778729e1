//! `sdctl`: Stable Diffusion with ControlNet, from the command line.

mod bench;
mod config;
mod controlnet;
mod dataset;
mod detect;
mod embeddings;
mod eval;
mod generate;
mod lora;
mod model;
mod plugins;
mod png_info;
mod pose;
mod preprocessors;
mod progress;
mod serve;
mod settings;
mod train;
mod upscale;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "sdctl",
    version,
    about = "Stable Diffusion generation, tools and benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images: txt2img, img2img (--init-image) or inpainting (--init-image --mask).
    #[command(
        after_help = "Every option is also a config key (--cfg-scale = cfg_scale) and an \
environment variable (SDCTL_CFG_SCALE). Layers, lowest first: defaults, --config files in \
order, SDCTL_* variables, flags. See `sdctl config show`."
    )]
    Generate(Box<generate::GenerateArgs>),
    /// Measure speed and memory.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// ControlNet tools.
    #[command(subcommand)]
    Controlnet(controlnet::ControlNetCommand),
    /// LoRA tools.
    #[command(subcommand)]
    Lora(lora::LoraCommand),
    /// Textual-inversion embeddings: sdctl embeddings list DIR
    #[command(subcommand)]
    Embeddings(embeddings::EmbeddingsCommand),
    /// Layered settings: `config show` prints what generate would use.
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Run a preprocessor: sdctl detect canny photo.jpg -o edges.png --param low=50
    Detect(Box<detect::DetectArgs>),
    /// Pose files: render OpenPose keypoint JSON as a control image.
    #[command(subcommand)]
    Pose(pose::PoseCommand),
    /// Preprocessors (annotators) for control images.
    #[command(subcommand)]
    Preprocessors(preprocessors::PreprocessorsCommand),
    /// Train ControlNets, T2I-Adapters, and a base model's VAE or UNet.
    #[command(subcommand)]
    Train(train::TrainCommand),
    /// Training datasets.
    #[command(subcommand)]
    Dataset(dataset::DatasetCommand),
    /// Model files: inspect, convert between single file and diffusers folder.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Plugins: what is built in and what is loaded.
    #[command(subcommand)]
    Plugins(plugins::PluginsCommand),
    /// Print the generation settings stored in a PNG (sdctl, AUTOMATIC1111, ComfyUI).
    PngInfo(png_info::PngInfoArgs),
    /// Serve the AUTOMATIC1111-compatible HTTP API (with sd-webui-controlnet's routes) and the
    /// web UI: sdctl serve --models-dir models --controlnet-dir controlnet
    Serve(Box<serve::ServeArgs>),
    /// Measure control fidelity: sdctl eval fill --model M --controlnet CN --json report.json
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Upscale an image with an ESRGAN / Real-ESRGAN model, in tiles:
    /// sdctl upscale photo.png -o big.png --model RealESRGAN_x4plus.pth
    Upscale(Box<upscale::UpscaleArgs>),
}

fn main() -> ExitCode {
    // a closed stdout (`sdctl model inspect M | head`) ends the process quietly, as Unix tools
    // do (exit by SIGPIPE, 141 in a shell), instead of a panic from println!. A long-running
    // server subcommand must set SIGPIPE back to SIG_IGN, so a client hanging up is an error
    // on that connection rather than the end of the process.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: called first thing in main, before any thread is started
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // a file-size limit (`ulimit -f`) makes a write fail with an error, cleaned up like any
    // other, instead of ending the process with temporaries left behind
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: as above
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    sd::process::prepare();
    let cli = Cli::parse();
    // after prepare (which sets variables, before any thread starts); the server handles
    // its own signals (it finishes or interrupts the running job, then exits cleanly)
    if !matches!(cli.command, Command::Serve(_)) {
        clean_up_on_signals();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SDCTL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    // one generation or benchmark per process, in one precision: a linear layer packed in a
    // half precision may drop its f32 weight (the server and the trainers keep theirs)
    if matches!(cli.command, Command::Generate(_))
        || matches!(
            cli.command,
            Command::Bench(bench::BenchCommand::Unet(_) | bench::BenchCommand::Vae(_))
        )
    {
        sd_pipeline::cpu::linear_op::set_release_packed(true);
    }
    let result = match cli.command {
        Command::Generate(args) => generate::run(*args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Controlnet(cmd) => controlnet::run(cmd),
        Command::Lora(cmd) => lora::run(cmd),
        Command::Embeddings(cmd) => embeddings::run(cmd),
        Command::PngInfo(a) => png_info::run(a),
        Command::Config(cmd) => config::run(cmd),
        Command::Preprocessors(cmd) => preprocessors::run(cmd),
        Command::Detect(a) => detect::run(*a),
        Command::Pose(cmd) => pose::run(cmd),
        Command::Eval(cmd) => eval::run(cmd),
        Command::Serve(a) => serve::run(*a),
        Command::Plugins(cmd) => plugins::run(cmd),
        Command::Model(cmd) => model::run(cmd),
        Command::Train(cmd) => train::run(cmd),
        Command::Dataset(cmd) => dataset::run(cmd),
        Command::Upscale(a) => upscale::run(*a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            let mut source = std::error::Error::source(&*e);
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::FAILURE
        }
    }
}

/// SIGINT, SIGTERM and SIGHUP end sdctl after removing the temporaries and staging folders
/// it has open (`sd_pipeline::output` keeps the list), with the shell's exit code for the
/// signal (130 for SIGINT, 143 for SIGTERM). A thread waits for them; nothing else changes.
fn clean_up_on_signals() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("warning: no cleanup on signals: {e}");
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                let removed = sd_pipeline::output::remove_temporaries();
                let name = signal_hook::low_level::signal_name(signal).unwrap_or("a signal");
                eprintln!(
                    "\ninterrupted by {name}{}",
                    if removed.is_empty() {
                        String::new()
                    } else {
                        format!(
                            "; removed {} unfinished output{}",
                            removed.len(),
                            if removed.len() == 1 { "" } else { "s" }
                        )
                    }
                );
                std::process::exit(128 + signal);
            }
        });
    if let Err(e) = spawned {
        eprintln!("warning: no cleanup on signals: {e}");
    }
}

/// The CLI's error: a message for people, with the library error as its cause.
pub type CliResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A tool's output flag: refused, before any work, when the path exists and is not a regular
/// file (or, with `dir_ok`, a folder): a FIFO or device would be replaced by the output.
pub fn check_output(flag: &str, path: &std::path::Path, dir_ok: bool) -> CliResult {
    let r = if dir_ok {
        sd::output::check_output_target_or_dir(path)
    } else {
        sd::output::check_output_target(path)
    };
    r.map_err(|m| format!("{flag} {m}").into())
}
