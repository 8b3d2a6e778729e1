//! Hostile input files and interruptions (issue 30): FIFOs, folders and symlink loops named as
//! inputs are refused at once and named for what they are; a write error or a signal leaves no
//! temporary file or staging folder; a plugin whose entry symbol is data is refused before it
//! is called; errors about an input's size name the input; unreadable dataset images are
//! skipped rows. Every payload is made here by the tests themselves, every run is bounded.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sd_tests::{fixtures, model_dir};

use crate::common::{
    clean_failure, copy_tree, mkfifo, ok, ok_stderr, one_step, s, scratch, sdctl, sdctl_command,
};

/// The longest a refused input may take before the run counts as blocked.
const LIMIT: Duration = Duration::from_secs(10);

/// Waits for `child` at most `limit`; a child still running then is killed and the test fails.
fn wait_bounded(mut child: std::process::Child, what: &str, limit: Duration) -> Output {
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!(
                "{what}: still running after {limit:?} (blocked?): {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs sdctl with `args`, killing it (and failing the test) after [`LIMIT`]. Output goes to
/// files, so a chatty run cannot block on a full pipe.
fn sdctl_bounded(d: &Path, args: &[&str]) -> Output {
    let out = std::fs::File::create(d.join("stdout.txt")).unwrap();
    let err = std::fs::File::create(d.join("stderr.txt")).unwrap();
    let child = sdctl_command()
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap();
    let mut o = wait_bounded(child, &args.join(" "), LIMIT);
    o.stdout = std::fs::read(d.join("stdout.txt")).unwrap();
    o.stderr = std::fs::read(d.join("stderr.txt")).unwrap();
    o
}

/// A small valid PNG.
fn png(path: &Path, w: u32, h: u32) {
    image::RgbImage::from_pixel(w, h, image::Rgb([120, 60, 30]))
        .save(path)
        .unwrap();
}

/// Entries of a folder, names only, sorted.
fn entries(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

/// Every flag (and subcommand argument) that names an input file refuses a FIFO at once
/// (opening one would block forever), and a folder or a symlink loop is named as such rather
/// than "no such file".
#[test]
fn special_files_as_inputs_are_refused_at_once() {
    let d = scratch("hostile-files", "special");
    let model = model_dir("sd1");
    let m = s(&model);
    let cn = fixtures().join("models/controlnet-sd1");
    let good = d.join("good.png");
    png(&good, 64, 64);
    let fifo = d.join("pipe.png");
    mkfifo(&fifo);
    let folder = d.join("folder.png");
    std::fs::create_dir_all(&folder).unwrap();
    let (la, lb) = (d.join("loop-a.png"), d.join("loop-b.png"));
    std::os::unix::fs::symlink(&lb, &la).unwrap();
    std::os::unix::fs::symlink(&la, &lb).unwrap();
    let out = d.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let o_png = out.join("o.png");
    let o_dir = out.join("merged");

    let gen = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "generate", "--prompt", "x", "--width", "64", "--height", "64", "--steps", "1",
            "--seed", "1", "--output",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        v.push(s(&o_png).into());
        v.extend(extra.iter().map(|a| a.to_string()));
        v
    };
    // each case: the arguments, with BAD standing for the special file
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("--model", gen(&["--model", "BAD"])),
        ("--vae", gen(&["--model", m, "--vae", "BAD"])),
        ("--init-image", gen(&["--model", m, "--init-image", "BAD"])),
        (
            "--mask",
            gen(&["--model", m, "--init-image", s(&good), "--mask", "BAD"]),
        ),
        (
            "--control image",
            gen(&[
                "--model",
                m,
                "--control",
                &format!("model={},image=BAD", cn.display()),
            ]),
        ),
        ("--lora", gen(&["--model", m, "--lora", "BAD:0.5"])),
        ("--noise", gen(&["--model", m, "--noise", "BAD"])),
        ("--plugin", gen(&["--model", m, "--plugin", "BAD"])),
        ("--from-png", gen(&["--model", m, "--from-png", "BAD"])),
        ("png-info", vec!["png-info".into(), "BAD".into()]),
        (
            "pose render",
            vec![
                "pose".into(),
                "render".into(),
                "BAD".into(),
                "-o".into(),
                s(&o_png).into(),
            ],
        ),
        (
            "detect",
            vec![
                "detect".into(),
                "canny".into(),
                "BAD".into(),
                "-o".into(),
                s(&o_png).into(),
            ],
        ),
        (
            "lora inspect",
            vec!["lora".into(), "inspect".into(), "BAD".into()],
        ),
        (
            "lora merge",
            vec![
                "lora".into(),
                "merge".into(),
                "--model".into(),
                m.into(),
                "--lora".into(),
                "BAD".into(),
                "--output".into(),
                s(&o_dir).into(),
            ],
        ),
        (
            "model inspect",
            vec!["model".into(), "inspect".into(), "BAD".into()],
        ),
    ];
    let specials: [(&Path, &str); 3] = [
        (&fifo, "is a named pipe (FIFO), not a regular file"),
        (&folder, "is a folder, not a regular file"),
        (&la, "a loop of symbolic links"),
    ];
    for (flag, args) in &cases {
        for (bad, words) in specials {
            // a folder is a valid model (diffusers layout)
            if flag.starts_with("--model") && bad == folder.as_path()
                || *flag == "model inspect" && bad == folder.as_path()
                || *flag == "--vae" && bad == folder.as_path()
            {
                continue;
            }
            let args: Vec<String> = args.iter().map(|a| a.replace("BAD", s(bad))).collect();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let o = sdctl_bounded(&d, &args);
            let err = clean_failure(&o);
            let want = format!("{}: {words}", bad.display());
            assert!(
                err.contains(&want),
                "{flag} {}: want {want:?}: {err}",
                bad.display()
            );
            assert!(entries(&out).is_empty(), "{flag}: left {:?}", entries(&out));
        }
    }
}

/// A write error while the images are written (here: the file-size limit, with SIGXFSZ as it
/// comes) is an error naming the output, and leaves no `NAME.png.tmp`.
#[test]
fn write_errors_leave_no_temporary() {
    let d = scratch("hostile-files", "fsize");
    let out = d.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let model = model_dir("sd1");
    let o_png = out.join("img.png");
    let args = one_step(&model, &o_png, &[]);
    // ulimit -f in 512-byte blocks (POSIX sh); the PNG is larger than one block
    let c = sdctl_command();
    let program = c.get_program().to_owned();
    let envs: Vec<_> = c
        .get_envs()
        .map(|(k, v)| (k.to_owned(), v.map(|v| v.to_owned())))
        .collect();
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg("ulimit -f 1 && exec \"$0\" \"$@\"")
        .arg(program)
        .args(args);
    for (k, v) in envs {
        match v {
            Some(v) => sh.env(k, v),
            None => sh.env_remove(k),
        };
    }
    let child = sh
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let o = wait_bounded(child, "generate under ulimit -f", Duration::from_secs(120));
    let err = clean_failure(&o);
    assert!(err.contains(s(&o_png)), "{err}");
    assert!(entries(&out).is_empty(), "left behind: {:?}", entries(&out));
}

/// Sends `signal` to a running process (by pid, with kill(1)).
fn kill(pid: u32, signal: &str) {
    let st = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// SIGINT / SIGTERM while a command builds its output folder: the staging folder is removed
/// and sdctl exits 130 / 143.
#[test]
fn signals_leave_no_staging_folder() {
    let d = scratch("hostile-files", "signals");
    // a dataset big enough to be still writing when the signal comes; the signal is sent
    // once the staging folder exists, and some time after
    for (signal, code, delay_ms) in [("INT", 130, 0), ("TERM", 143, 50), ("TERM", 143, 400)] {
        let out = d.join(format!("{signal}-{delay_ms}"));
        std::fs::create_dir_all(&out).unwrap();
        let ds = out.join("ds");
        let mut child = sdctl_command()
            .args([
                "dataset",
                "fill",
                "--output",
                s(&ds),
                "--count",
                "100000",
                "--size",
                "128",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let staged = out.join(".ds.partial");
        let t0 = Instant::now();
        while !staged.is_dir() && t0.elapsed() < LIMIT {
            std::thread::sleep(Duration::from_millis(5));
        }
        if !staged.is_dir() {
            let _ = child.kill();
            panic!("not staging after {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        kill(child.id(), signal);
        let o = wait_bounded(child, "dataset fill after a signal", LIMIT);
        assert_eq!(
            o.status.code(),
            Some(code),
            "SIG{signal}: {:?} {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(entries(&out).is_empty(), "left behind: {:?}", entries(&out));
    }

    // `lora merge` on the fixture model, interrupted at a few points: whatever point the
    // signal meets, nothing but a complete merged model is left
    let model = model_dir("sd1");
    let lora = fixtures().join("loras/lora_a_peft.safetensors:0.7");
    for delay_ms in [0u64, 30, 100, 250] {
        let out = d.join(format!("merge-{delay_ms}"));
        std::fs::create_dir_all(&out).unwrap();
        let merged = out.join("merged");
        let child = sdctl_command()
            .args([
                "lora",
                "merge",
                "--model",
                s(&model),
                "--lora",
                s(&lora),
                "--output",
                s(&merged),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        kill(child.id(), "TERM");
        let o = wait_bounded(child, "lora merge after SIGTERM", LIMIT);
        let left = entries(&out);
        if o.status.success() {
            assert_eq!(left, ["merged"]);
        } else {
            use std::os::unix::process::ExitStatusExt;
            // before the handler is installed the signal's default action ends the process
            assert!(
                o.status.code() == Some(143) || o.status.signal() == Some(15),
                "{:?} {}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            );
            // the model is staged and renamed into place in one step: a signal that lands
            // after that rename (before the process exits) leaves the complete model
            assert!(
                left.is_empty() || left == ["merged"],
                "left behind after {delay_ms} ms: {left:?}"
            );
        }
    }
}

/// The misbehaving test plugin built with `feature` (once per run).
fn build_plugin(feature: &str) -> PathBuf {
    crate::common::build_plugin("sdctl-plugin-misbehaving", feature)
}

/// A library whose `sd_plugin_entry` is a static (data), not a function: calling it would
/// fault the process; it is refused before the call, naming the library and the symbol.
#[test]
fn plugin_entry_that_is_data_is_refused() {
    let d = scratch("hostile-files", "plugin");
    let lib = build_plugin("entry_is_data");
    let o = sdctl_bounded(&d, &["plugins", "list", "--plugin", s(&lib)]);
    let err = clean_failure(&o);
    assert!(
        err.contains(s(&lib)) && err.contains("`sd_plugin_entry`"),
        "{err}"
    );
    assert!(err.contains("not a function"), "{err}");
}

/// An init image whose size is not a multiple of 8, with no --width / --height given: the
/// error names the init image and its size, not a flag that was never given.
#[test]
fn odd_sized_init_image_is_named() {
    let d = scratch("hostile-files", "odd");
    let init = d.join("odd.png");
    png(&init, 67, 64);
    let out = d.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let model = model_dir("sd1");
    let o = sdctl_bounded(
        &d,
        &[
            "generate",
            "--model",
            s(&model),
            "--prompt",
            "x",
            "--steps",
            "1",
            "--seed",
            "1",
            "--init-image",
            s(&init),
            "--output",
            s(&out.join("o.png")),
        ],
    );
    let err = clean_failure(&o);
    assert!(
        !err.contains("--width 67"),
        "blames a flag never given: {err}"
    );
    assert!(
        err.contains(&format!("--init-image {}", init.display()))
            && err.contains("67x64")
            && err.contains("multiple of 8"),
        "{err}"
    );
    // a given --width that is wrong is still blamed as such
    let o = sdctl_bounded(
        &d,
        &[
            "generate",
            "--model",
            s(&model),
            "--prompt",
            "x",
            "--steps",
            "1",
            "--width",
            "60",
            "--init-image",
            s(&init),
            "--output",
            s(&out.join("o.png")),
        ],
    );
    let err = clean_failure(&o);
    assert!(
        err.contains("--width") && err.contains("60 is not a multiple of 8"),
        "{err}"
    );
    assert!(entries(&out).is_empty());
}

/// `--skip-bad-rows true` skips a row whose image cannot be read (with a warning naming it)
/// instead of failing the run when the image is first decoded; without it, the run fails
/// before training, naming the file.
#[test]
fn skip_bad_rows_skips_unreadable_images() {
    let d = scratch("hostile-files", "train");
    ok(&sdctl(&[
        "dataset",
        "fill",
        "--output",
        s(&d.join("data")),
        "--count",
        "4",
        "--size",
        "64",
    ]));
    let bad = d.join("data/source/1.png");
    std::fs::write(&bad, b"this is not an image").unwrap();
    let cfg = d.join("t.toml");
    std::fs::write(
        &cfg,
        format!(
            "base = \"{}\"\ndataset = \"data\"\noutput = \"out\"\nresolution = 64\nbatch_size = 4\nmax_steps = 2\ncheckpointing_steps = 100\nvalidation_steps = 1000\nseed = 7\n",
            model_dir("sd1").display()
        ),
    )
    .unwrap();
    let o = sdctl(&["train", "controlnet", "--config", s(&cfg)]);
    let err = clean_failure(&o);
    assert!(
        err.contains("1 unusable row") && err.contains("source/1.png"),
        "{err}"
    );
    let o = sdctl(&[
        "train",
        "controlnet",
        "--config",
        s(&cfg),
        "--skip-bad-rows",
        "true",
    ]);
    let err = ok_stderr(&o);
    assert!(
        err.contains("warning:") && err.contains("source/1.png") && err.contains("(skipped)"),
        "{err}"
    );
}

/// Files read from inside user-named folders are inputs too: a FIFO as a dataset's
/// `metadata.jsonl` or as a ControlNet's `config.json` is refused at once, by name.
#[test]
fn special_files_inside_input_folders_are_refused_at_once() {
    let d = scratch("hostile-files", "inside");
    let data = d.join("data");
    std::fs::create_dir_all(&data).unwrap();
    mkfifo(&data.join("metadata.jsonl"));
    let o = sdctl_bounded(
        &d,
        &[
            "train",
            "controlnet",
            "--base",
            s(&model_dir("sd1")),
            "--dataset",
            s(&data),
            "--output",
            s(&d.join("cn")),
            "--max-steps",
            "1",
        ],
    );
    let e = clean_failure(&o);
    assert!(
        e.contains("metadata.jsonl") && e.contains("named pipe (FIFO)"),
        "{e}"
    );

    let cn = d.join("cn-model");
    copy_tree(&fixtures().join("models/controlnet-sd1"), &cn);
    std::fs::remove_file(cn.join("config.json")).unwrap();
    mkfifo(&cn.join("config.json"));
    let control = format!(
        "model={},image={}",
        s(&cn),
        s(&fixtures().join("inputs/control_a.png"))
    );
    let out = d.join("out.png");
    let model = model_dir("sd1");
    let o = sdctl_bounded(&d, &one_step(&model, &out, &["--control", &control]));
    let e = clean_failure(&o);
    assert!(
        e.contains("config.json") && e.contains("named pipe (FIFO)"),
        "{e}"
    );
    assert!(!out.exists());
}
