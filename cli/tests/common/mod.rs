//! Helpers shared by the CLI's integration tests (the modules of tests/main.rs).
//!
//! Every sdctl run starts clean: the developer's own `SDCTL_*` variables are removed and
//! `XDG_CONFIG_HOME` points to an empty folder, so no personal config, cache or plugin folder
//! leaks into a test. A test's own variables are set after that and win.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

use candle_core::{Device, Tensor};

/// The sdctl binary as a `Command`, with the developer's environment cleaned (see above);
/// for runs that need more than [`sdctl_with`] (spawning, `OsStr` arguments).
pub fn sdctl_command() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sdctl"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("SDCTL_") {
            c.env_remove(k);
        }
    }
    // never created: an empty config folder, so no plugin folder of the developer's own
    c.env(
        "XDG_CONFIG_HOME",
        std::env::temp_dir().join(format!("sdctl-test-no-config-{}", std::process::id())),
    );
    c
}

/// A scratch folder (see [`scratch`]) with an empty `annotators/` folder in it: (the folder,
/// the annotator folder), for [`sdctl_annotators`].
pub fn annotator_scratch(prefix: &str, name: &str) -> (PathBuf, PathBuf) {
    let d = scratch(prefix, name);
    let ann = d.join("annotators");
    std::fs::create_dir_all(&ann).unwrap();
    (d, ann)
}

/// Runs sdctl with its result cache in `d/cache` and its annotator folder `ann`.
pub fn sdctl_annotators(args: &[&str], d: &Path, ann: &Path) -> Output {
    sdctl_command()
        .args(args)
        .env("SDCTL_CACHE_DIR", d.join("cache"))
        .env("SDCTL_ANNOTATOR_DIR", ann)
        .output()
        .unwrap()
}

/// Runs sdctl with these arguments and these environment variables.
pub fn sdctl_with(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = sdctl_command();
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("sdctl runs")
}

/// Runs sdctl with these arguments.
pub fn sdctl(args: &[&str]) -> Output {
    sdctl_with(args, &[])
}

/// Runs sdctl with these arguments and `SDCTL_CACHE_DIR` set to `cache`.
pub fn sdctl_cached(args: &[&str], cache: &Path) -> Output {
    sdctl_with(args, &[("SDCTL_CACHE_DIR", s(cache))])
}

/// A fresh, empty temporary folder `sdctl-PREFIX-PID-NAME` (PREFIX: the test file's).
pub fn scratch(prefix: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sdctl-{prefix}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The arguments of the tiny-model pipeline fixtures' generation (`pipe_*`: 64x64, 4 Euler
/// steps, CFG 7.5, the fixture's noise), writing `out`.
pub fn base_args<'a>(model: &'a str, noise: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "generate",
        "--model",
        model,
        "--prompt",
        "a red circle on a blue background",
        "--negative-prompt",
        "blurry, lowres",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "4",
        "--cfg-scale",
        "7.5",
        "--sampler",
        "euler",
        "--schedule",
        "normal",
        "--noise",
        noise,
        "--output",
        out,
    ]
}

/// The arguments of the SDXL fixture case `sdxl_txt2img_micro` (64x48, 4 steps DPM++ 2M
/// Karras, CFG 5, batch 2, micro-conditioning flags, the fixture's noise), writing `out` and
/// the final latents to `lat`.
pub fn sdxl_micro_args<'a>(
    model: &'a str,
    noise: &'a str,
    out: &'a str,
    lat: &'a str,
) -> Vec<&'a str> {
    vec![
        "generate",
        "--model",
        model,
        "--prompt",
        "a red circle on a blue background",
        "--negative-prompt",
        "blurry, lowres",
        "--cfg-scale",
        "5",
        "--noise",
        noise,
        "--width",
        "64",
        "--height",
        "48",
        "--steps",
        "4",
        "--sampler",
        "dpmpp_2m",
        "--schedule",
        "karras",
        "--batch",
        "2",
        "--original-size",
        "128x96",
        "--target-size",
        "56x40",
        "--crop-top-left",
        "16,8",
        "--output",
        out,
        "--save-latents",
        lat,
    ]
}

/// Relative RMS distance of `a` from `b`.
pub fn rel_rms(a: &Tensor, b: &Tensor) -> f32 {
    let rms = |t: &Tensor| -> f32 {
        t.sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    rms(&(a - b).unwrap()) / rms(b)
}

/// The arguments of a one-step 64x64 `sdctl generate` at seed 1 with `model`, writing `out`,
/// then `extra`: the smallest run that goes through every stage.
pub fn one_step<'a>(model: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "generate",
        "--model",
        s(model),
        "--prompt",
        "x",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "1",
        "--seed",
        "1",
        "--output",
        s(out),
    ];
    v.extend_from_slice(extra);
    v
}

/// Asserts success; returns stdout.
pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "sdctl failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Asserts success; returns stderr (where sdctl reports progress).
pub fn ok_stderr(o: &Output) -> String {
    ok(o);
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Asserts a failure that is not a panic; returns stderr.
pub fn failed(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "expected failure, got success: {err}");
    assert!(
        !err.contains("panicked"),
        "panic instead of an error: {err}"
    );
    err
}

/// A failure that is an error message and exit code 1, not a crash; returns stderr.
pub fn clean_failure(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected a clean error exit: {err}"
    );
    assert!(err.contains("error: "), "{err}");
    err
}

/// Runs sdctl expecting failure; returns stderr. Checks: non-zero exit, no panic, and no
/// output: `out` is the output file (it must not exist and its folder must be empty) or the
/// output folder (it must be empty).
pub fn fails(args: &[&str], out: &Path) -> String {
    let err = failed(&sdctl(args));
    let dir = if out.is_dir() {
        out
    } else {
        assert!(
            !out.exists(),
            "an output file was left behind: {}",
            out.display()
        );
        out.parent().unwrap()
    };
    let leftovers: Vec<_> = std::fs::read_dir(dir).unwrap().collect();
    assert!(leftovers.is_empty(), "files left behind: {leftovers:?}");
    err
}

/// The `latents` tensor of a `--save-latents` file.
pub fn latents(p: &Path) -> Tensor {
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()["latents"].clone()
}

/// The `latents` tensor of a `--save-latents` file, flattened.
pub fn latents_f32(p: &Path) -> Vec<f32> {
    latents(p).flatten_all().unwrap().to_vec1().unwrap()
}

/// Copies a folder tree (e.g. a fixture model).
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let t = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_tree(&p, &t);
        } else {
            std::fs::copy(&p, &t).unwrap();
        }
    }
}

/// Make a FIFO (named pipe) at `p`, for tests of inputs and outputs that must refuse one.
pub fn mkfifo(p: &Path) {
    let st = Command::new("mkfifo").arg(p).status().unwrap();
    assert!(st.success(), "mkfifo {}", p.display());
}

/// A plugin crate of this workspace built with `features` (into its own target folder, so the
/// outer cargo's lock is not needed), once per test run, and copied to a name unique to the
/// features; later calls return that copy.
pub fn build_plugin(package: &str, features: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<(String, String), PathBuf>>> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let key = (package.to_string(), features.to_string());
    if let Some(p) = built.get(&key) {
        return p.clone();
    }
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = ws.join("target/plugin-tests");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&ws)
        .args(["build", "--offline", "-p", package, "--target-dir"])
        .arg(&target);
    if !features.is_empty() {
        cmd.args(["--features", features]);
    }
    let o = cmd.output().expect("cargo runs");
    assert!(
        o.status.success(),
        "building {package} {features}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let file = format!(
        "{}{}{}",
        std::env::consts::DLL_PREFIX,
        package.replace('-', "_"),
        std::env::consts::DLL_SUFFIX
    );
    let name = if features.is_empty() {
        "default"
    } else {
        features
    };
    let copy = target.join(format!(
        "{package}-{name}-{}{}",
        std::process::id(),
        std::env::consts::DLL_SUFFIX
    ));
    std::fs::copy(target.join("debug").join(file), &copy).unwrap();
    built.insert(key, copy.clone());
    copy
}
