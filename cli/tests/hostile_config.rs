//! Hostile settings and model configs (issue 30): nesting that made parsers quadratic, lists of
//! thousands of tables, numbers that are not finite or out of range (one message everywhere),
//! model config values that gave a black image, list variables in the environment, and text
//! files that are no config at all. Every payload is made here; every run is bounded in time.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sd_tests::model_dir;

use crate::common::{
    clean_failure, copy_tree, failed, ok, one_step, s, scratch, sdctl, sdctl_with,
};

/// How long a refusal may take (the parsers took minutes on these payloads).
const QUICK: Duration = Duration::from_secs(10);

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// 400 KB of nested lists in each format, given to `--config`: refused within seconds, the
/// file and line named.
#[test]
fn deep_nesting_is_refused_quickly() {
    let d = scratch("hostile-config", "deep");
    let deep = "[".repeat(400_000);
    for (name, text) in [
        ("deep.yaml", format!("steps: 3\nprompt: {deep}\n")),
        ("deep.toml", format!("steps = 3\nprompt = {deep}\n")),
        ("deep.json", format!("{{\"steps\": 3, \"prompt\": {deep}\n")),
        (
            "block.yaml",
            format!("steps: 3\nx:\n{}a\n", "- ".repeat(200_000)),
        ),
    ] {
        let f = write(&d, name, &text);
        let t = Instant::now();
        let e = failed(&sdctl(&["config", "show", "--config", s(&f)]));
        assert!(t.elapsed() < QUICK, "{name}: {:?}", t.elapsed());
        let line = match name {
            "block.yaml" => 3,
            "deep.json" => 1,
            _ => 2,
        };
        assert!(
            e.contains(&format!(
                "{}: line {line}: lists and tables nested more than 64 levels deep",
                f.display()
            )),
            "{name}: {e}"
        );
        assert!(e.len() < 2000, "{name}: a long message: {e}");
    }
    // nesting a config really has is fine
    let f = write(
        &d,
        "ok.yaml",
        "steps: 3\ncontrol:\n  - model: m\n    preprocessor: {name: canny, low: 1}\n",
    );
    let e = failed(&sdctl(&["config", "show", "--config", s(&f)]));
    assert!(!e.contains("nested"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}

/// 16000 `[[lora]]` and 16000 `[[control]]` tables: checked in time linear in their number
/// (each took about a minute).
#[test]
fn thousands_of_tables_are_checked_quickly() {
    let d = scratch("hostile-config", "tables");
    let lora = write(&d, "l.safetensors", "not read by config show");
    let n = 16_000;
    let mut text = String::from("steps = 3\n");
    for i in 0..n {
        text.push_str(&format!(
            "[[lora]]\npath = \"l.safetensors\"\nweight = 0.{}\n",
            i % 10
        ));
    }
    let f = write(&d, "loras.toml", &text);
    let t = Instant::now();
    let out = ok(&sdctl(&["config", "show", "--config", s(&f)]));
    assert!(t.elapsed() < QUICK, "{:?}", t.elapsed());
    assert_eq!(out.matches("[[lora]]").count(), n, "{}", &out[..500]);
    assert!(lora.is_file());

    // every table has a problem: each is reported with its line, still quickly
    let mut text = String::new();
    for i in 0..n {
        text.push_str(&format!(
            "[[control]]\nid = \"u{i}\"\nimage = \"missing.png\"\nweight = 9\n"
        ));
    }
    let f = write(&d, "controls.toml", &text);
    let t = Instant::now();
    let e = failed(&sdctl(&["config", "show", "--config", s(&f)]));
    assert!(t.elapsed() < QUICK, "{:?}", t.elapsed());
    let last = format!("{}:{}: control[{}].weight", f.display(), 4 * n, n - 1);
    assert!(e.contains(&last), "{}", &e[e.len().saturating_sub(2000)..]);
    let _ = std::fs::remove_dir_all(&d);
}

/// Non-finite and out-of-range numbers from flags, files, the environment and prompt tags:
/// one message, `KEY: must be a finite number in [MIN, MAX], got X`, never the 309 digits of
/// the largest float.
#[test]
fn numbers_have_one_message_from_every_source() {
    let d = scratch("hostile-config", "numbers");
    let lora = write(&d, "l.safetensors", "");
    let show = |args: &[&str], env: &[(&str, &str)]| {
        let mut a = vec!["config", "show"];
        a.extend_from_slice(args);
        let e = failed(&sdctl_with(&a, env));
        assert!(e.lines().all(|l| l.len() < 300), "a long line: {e}");
        e
    };
    let e = show(&["--cfg-scale", "inf"], &[]);
    assert!(
        e.contains("flag --cfg-scale: cfg_scale: must be a finite number in [0, 100], got inf"),
        "{e}"
    );
    let e = show(&[], &[("SDCTL_CFG_SCALE", "-1")]);
    assert!(
        e.contains("env SDCTL_CFG_SCALE: cfg_scale: must be a finite number in [0, 100], got -1"),
        "{e}"
    );
    let f = write(
        &d,
        "n.toml",
        &format!(
            "strength = nan\nallow_extreme_weights = true\n[[lora]]\npath = \"{}\"\nweight = inf\n[[control]]\nimage = \"x.png\"\nmodel = \"m\"\nweight = -inf\n",
            s(&lora)
        ),
    );
    let e = show(&["--config", s(&f)], &[]);
    for want in [
        ":1: strength: must be a finite number in [0, 1], got NaN",
        ":5: lora[0].weight: must be a finite number, got inf",
        ":9: control[0].weight: must be a finite number, got -inf",
    ] {
        assert!(e.contains(want), "{want}: {e}");
    }
    // out of range without allow_extreme_weights: the same words, and how to allow more
    let f = write(
        &d,
        "w.toml",
        &format!(
            "[[lora]]\npath = \"{}\"\nweight = 3\n[[control]]\nimage = \"x.png\"\nmodel = \"m\"\nweight = 1e300\n",
            s(&lora)
        ),
    );
    let e = show(&["--config", s(&f)], &[]);
    for want in [
        ":3: lora[0].weight: must be a finite number in [-2, 2] (allow more with --allow-extreme-weights), got 3",
        ":7: control[0].weight: must be a finite number in [0, 2] (allow more with --allow-extreme-weights), got 1e300",
    ] {
        assert!(e.contains(want), "{want}: {e}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// Optimiser settings of `sdctl train`: negative weight decay, NaN max-grad-norm, betas of 1
/// and more are refused before anything loads, in the same words.
#[test]
fn training_numbers_are_range_checked() {
    let d = scratch("hostile-config", "train");
    std::fs::create_dir_all(d.join("data")).unwrap();
    let base = format!(
        "base = \"{}\"\ndataset = \"data\"\noutput = \"out\"\nmax_steps = 1\n",
        model_dir("sd1").display()
    );
    for (extra, want) in [
        (
            "adam_weight_decay = -0.5",
            "adam_weight_decay: must be a finite number at least 0, got -0.5",
        ),
        (
            "max_grad_norm = nan",
            "max_grad_norm: must be a finite number at least 0, got NaN",
        ),
        (
            "adam_beta1 = 1.0",
            "adam_beta1: must be a finite number in [0, 1), got 1",
        ),
        (
            "adam_epsilon = 0.0",
            "adam_epsilon: must be a finite number above 0, got 0",
        ),
        (
            "learning_rate = inf",
            "learning_rate: must be a finite number above 0, got inf",
        ),
    ] {
        let f = write(&d, "t.toml", &format!("{base}{extra}\n"));
        let e = clean_failure(&sdctl(&["train", "controlnet", "--config", s(&f)]));
        assert!(e.contains(want), "{extra}: {e}");
        assert!(!d.join("out").exists(), "{extra}: an output was made");
    }
    // a training config is checked for nesting before it is parsed
    let deep = write(
        &d,
        "deep.yaml",
        &format!("max_steps: {}\n", "[".repeat(400_000)),
    );
    let t = Instant::now();
    let e = clean_failure(&sdctl(&["train", "controlnet", "--config", s(&deep)]));
    assert!(t.elapsed() < QUICK, "{:?}", t.elapsed());
    assert!(
        e.contains("line 1: lists and tables nested more than 64 levels deep"),
        "{e}"
    );
    // flags too
    let f = write(&d, "t.toml", &base);
    let e = clean_failure(&sdctl(&[
        "train",
        "controlnet",
        "--config",
        s(&f),
        "--adam-weight-decay=-1",
    ]));
    assert!(
        e.contains("adam_weight_decay: must be a finite number at least 0, got -1"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// A copy of the tiny model with one config file replaced.
fn model_with(d: &Path, name: &str, file: &str, edit: impl Fn(&str) -> String) -> PathBuf {
    let m = d.join(name);
    copy_tree(&model_dir("sd1"), &m);
    let p = m.join(file);
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, edit(&text)).unwrap();
    m
}

/// Set a top-level number in a JSON config.
fn set(text: &str, key: &str, value: serde_json::Value) -> String {
    let mut v: serde_json::Value = serde_json::from_str(text).unwrap();
    v[key] = value;
    v.to_string()
}

/// Model config values that gave a black image with exit 0, and a config that is a list:
/// refused at load, naming the file and key.
#[test]
fn model_config_values_are_checked_at_load() {
    let d = scratch("hostile-config", "model");
    let cases: Vec<(PathBuf, String)> = vec![
        (
            model_with(&d, "beta", "scheduler/scheduler_config.json", |t| {
                set(t, "beta_start", (-1).into())
            }),
            "scheduler/scheduler_config.json: beta_start: must be a finite number in (0, 1), got -1"
                .into(),
        ),
        (
            model_with(&d, "scale", "vae/config.json", |t| {
                set(t, "scaling_factor", 0.into())
            }),
            "vae/config.json: scaling_factor: must be a finite number above 0, got 0".into(),
        ),
        (
            model_with(&d, "list", "unet/config.json", |_| "[]".into()),
            "unet/config.json: expected a JSON object {\"key\": value, ...}, found a list [...]"
                .into(),
        ),
    ];
    for (model, want) in cases {
        let out = d.join("o.png");
        let e = failed(&sdctl(&one_step(&model, &out, &[])));
        assert!(e.contains(&want), "{want}: {e}");
        assert!(!out.exists());
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// `SDCTL_LORA` and `SDCTL_CONTROL` were ignored without a word: now each is a problem that
/// says how to give LoRAs and control units.
#[test]
fn list_variables_in_the_environment_are_refused() {
    let e = clean_failure(&sdctl_with(
        &["config", "show"],
        &[
            ("SDCTL_LORA", "x.safetensors:0.5"),
            ("SDCTL_CONTROL", "model=m"),
        ],
    ));
    assert!(
        e.contains("env SDCTL_LORA: lora: lists are not read from the environment: give LoRAs with --lora PATH[:WEIGHT] or [[lora]] tables in a --config file"),
        "{e}"
    );
    assert!(
        e.contains("env SDCTL_CONTROL: control: lists are not read from the environment: give control units with --control"),
        "{e}"
    );
}

/// A text file that is no config (a log, a password file) given as a YAML, TOML or JSON
/// config: the error quotes at most a short excerpt, not the file.
#[test]
fn a_file_that_is_no_config_is_not_echoed() {
    let d = scratch("hostile-config", "text");
    let log: String = (0..20_000)
        .map(|i| format!("root{i}:x:0:0:root:/root:/bin/bash and a long line of a log {i}\n"))
        .collect();
    for name in ["log.yaml", "log.toml", "log.json", "log.yml"] {
        let f = write(&d, name, &log);
        let e = failed(&sdctl(&["config", "show", "--config", s(&f)]));
        assert!(e.contains(&f.display().to_string()), "{name}: {e}");
        assert!(
            e.len() < 1500,
            "{name}: {} bytes of error: {}",
            e.len(),
            &e[..1500]
        );
    }
    let _ = std::fs::remove_dir_all(&d);
}
