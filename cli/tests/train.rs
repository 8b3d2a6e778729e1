//! `sdctl dataset fill` and `sdctl train controlnet` end to end on the tiny models: a config
//! file with relative paths, checkpoints that load into `generate --control`, a run killed at
//! a random moment resuming to the same weights as an uninterrupted run, bad dataset rows.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::Device;
use sd_tests::{fixtures, model_dir};

use crate::common::{ok, ok_stderr, s, scratch, sdctl_cached, sdctl_command};

/// sdctl with this file's cache folder (shared by its tests).
fn sdctl(args: &[&str]) -> Output {
    sdctl_cached(
        args,
        &std::env::temp_dir().join(format!("sdctl-train-test-cache-{}", std::process::id())),
    )
}

fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let m = candle_core::safetensors::load(
        dir.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut v: Vec<(String, Vec<f32>)> = m
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// `sdctl dataset fill`: 6 examples of 64x64 drawn with `seed` into `d/data`.
fn fill_data(d: &Path, seed: u64) {
    let seed = seed.to_string();
    ok(&sdctl(&[
        "dataset",
        "fill",
        "--output",
        s(&d.join("data")),
        "--count",
        "6",
        "--size",
        "64",
        "--seed",
        &seed,
    ]));
}

/// A training config next to the dataset; paths relative to it.
fn config(dir: &Path, out: &str, steps: usize, extra: &str) -> PathBuf {
    let p = dir.join(format!("{out}.toml"));
    std::fs::write(
        &p,
        format!(
            "base = \"{}\"\ndataset = \"data\"\noutput = \"{out}\"\nresolution = 64\nbatch_size = 2\ngradient_accumulation = 2\nlearning_rate = 1e-3\nlr_scheduler = \"constant_with_warmup\"\nlr_warmup_steps = 2\nmax_steps = {steps}\ncheckpointing_steps = 1\nvalidation_steps = 1000\nseed = 7\nproportion_empty_prompts = 0.5\n{extra}",
            model_dir("sd1").display()
        ),
    )
    .unwrap();
    p
}

#[test]
fn fill_dataset_train_checkpoint_generate_and_resume_after_a_kill() {
    let d = scratch("train", "run");
    fill_data(&d, 2);
    let index = std::fs::read_to_string(d.join("data/prompt.json")).unwrap();
    assert_eq!(index.lines().count(), 6);
    for l in index.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let p = v["prompt"].as_str().unwrap();
        assert!(
            p.contains(" circle with ") && p.ends_with(" background"),
            "{p}"
        );
        assert!(d.join("data").join(v["source"].as_str().unwrap()).is_file());
    }
    let e = sdctl(&[
        "dataset",
        "fill",
        "--output",
        s(&d.join("data")),
        "--count",
        "6",
    ]);
    assert!(String::from_utf8_lossy(&e.stderr).contains("already exists"));

    // uninterrupted: 6 steps
    let full = config(&d, "full", 6, "");
    ok(&sdctl(&["train", "controlnet", "--config", s(&full)]));
    let log = std::fs::read_to_string(d.join("full/log.csv")).unwrap();
    assert_eq!(log.lines().count(), 7, "{log}");
    assert!(log.starts_with("step,loss,lr\n1,"));
    // the warm-up: lr 0, then half, then full
    let lrs: Vec<f64> = log
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(2).unwrap().parse().unwrap())
        .collect();
    assert_eq!(&lrs[..3], &[0.0, 5e-4, 1e-3]);
    let final_w = weights(&d.join("full/controlnet"));
    let start = sd_controlnet_weights_from_init(&d);
    assert_ne!(final_w, start, "training changed nothing");

    // killed at a random moment, then resumed: the same weights as the uninterrupted run
    let part = config(&d, "part", 6, "");
    kill_then_resume(&d, "controlnet", "part", &part, &log);
    assert_eq!(
        weights(&d.join("part/controlnet")),
        final_w,
        "resumed run differs"
    );
    // a fresh run into a used folder is refused
    let e = sdctl(&["train", "controlnet", "--config", s(&part)]);
    assert!(String::from_utf8_lossy(&e.stderr).contains("use --resume"));

    // the trained ControlNet (and a checkpoint) load into generate --control
    for cn in [
        d.join("full/controlnet"),
        d.join("full/checkpoint-3/controlnet"),
    ] {
        generate_with(&d, &cn);
    }
}

/// `sdctl train SUB --config CONFIG` (output `d/out`) killed at a random moment after its
/// second step, its latest checkpoint checked complete, then resumed to the end: the log must
/// equal `full_log` (the uninterrupted run's).
fn kill_then_resume(d: &Path, sub: &str, out: &str, config: &Path, full_log: &str) {
    let folder = if sub == "controlnet" {
        "controlnet"
    } else {
        "t2iadapter"
    };
    let log_path = d.join(out).join("log.csv");
    let mut child = sdctl_command()
        .args(["train", sub, "--config", s(config)])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        let rows = std::fs::read_to_string(&log_path)
            .map(|l| l.lines().count())
            .unwrap_or(0);
        if rows >= 3 || t0.elapsed() > Duration::from_secs(120) {
            break;
        }
        std::thread::sleep(Duration::from_millis(37));
    }
    // a few more milliseconds, then kill -9 mid-step (or mid-checkpoint)
    std::thread::sleep(Duration::from_millis(
        (t0.elapsed().as_millis() % 50) as u64,
    ));
    // the kill must land on a running, unfinished run, or the resume below proves nothing
    assert!(
        child.try_wait().unwrap().is_none(),
        "the run ended before it was killed"
    );
    let _ = child.kill();
    let _ = child.wait();
    let rows_at_kill = std::fs::read_to_string(&log_path).unwrap().lines().count();
    assert!(
        !d.join(out).join(folder).exists() && rows_at_kill < full_log.lines().count(),
        "killed after the run finished ({rows_at_kill} log rows)"
    );
    let latest = std::fs::read_to_string(d.join(out).join("latest")).unwrap();
    let ck = d.join(out).join(latest.trim());
    for f in [
        &format!("{folder}/config.json"),
        &format!("{folder}/diffusion_pytorch_model.safetensors"),
        "optimizer.safetensors",
        "state.json",
    ] {
        assert!(
            ck.join(f).is_file(),
            "latest checkpoint incomplete: {f} missing in {}",
            ck.display()
        );
    }
    ok(&sdctl(&["train", sub, "--config", s(config), "--resume"]));
    let log2 = std::fs::read_to_string(&log_path).unwrap();
    assert_eq!(
        log2, full_log,
        "the resumed log differs from the uninterrupted one"
    );
}

/// generate --control with `unit_model` on the tiny SD1 base and a fill outline.
fn generate_with(d: &Path, unit_model: &Path) {
    let unit = format!(
        "model={},image={}",
        unit_model.display(),
        d.join("data/source/0.png").display()
    );
    let out = d.join("gen.png");
    let _ = std::fs::remove_file(&out);
    ok(&sdctl(&[
        "generate",
        "--model",
        s(&model_dir("sd1")),
        "--prompt",
        "red circle with blue background",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "--seed",
        "1",
        "--control",
        &unit,
        "--output",
        s(&out),
    ]));
    assert!(out.is_file());
}

#[test]
fn t2i_adapter_trains_checkpoints_resumes_and_generates() {
    let d = scratch("train", "t2i");
    fill_data(&d, 3);
    let full = config(&d, "full", 6, "adapter_type = \"light_adapter\"\n");
    ok(&sdctl(&["train", "t2i-adapter", "--config", s(&full)]));
    let log = std::fs::read_to_string(d.join("full/log.csv")).unwrap();
    assert_eq!(log.lines().count(), 7, "{log}");
    let final_w = weights(&d.join("full/t2iadapter"));
    let start = weights(&d.join("full/checkpoint-1/t2iadapter"));
    assert_ne!(final_w, start, "training changed nothing");
    // a light adapter, named as diffusers names it
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("full/t2iadapter/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["_class_name"], "T2IAdapter");
    assert_eq!(cfg["adapter_type"], "light_adapter");
    assert!(final_w.iter().all(|(k, _)| k.starts_with("adapter.body.")));

    let part = config(&d, "part", 6, "adapter_type = \"light_adapter\"\n");
    kill_then_resume(&d, "t2i-adapter", "part", &part, &log);
    assert_eq!(
        weights(&d.join("part/t2iadapter")),
        final_w,
        "resumed run differs"
    );
    // resuming with the other trainer is refused, naming the checkpoint
    let as_cn = d.join("part-cn.toml");
    let text = std::fs::read_to_string(&part).unwrap();
    std::fs::write(
        &as_cn,
        text.replace("adapter_type = \"light_adapter\"\n", ""),
    )
    .unwrap();
    let e = sdctl(&["train", "controlnet", "--config", s(&as_cn), "--resume"]);
    let msg = String::from_utf8_lossy(&e.stderr);
    assert!(
        !e.status.success() && msg.contains("checkpoint of a T2I-Adapter run"),
        "{msg}"
    );
    // a ControlNet-only setting is refused by name
    let bad = config(&d, "bad", 2, "sd_locked = false\n");
    let e = sdctl(&["train", "t2i-adapter", "--config", s(&bad)]);
    let msg = String::from_utf8_lossy(&e.stderr);
    assert!(
        msg.contains("sd_locked = false: not a setting for training a T2I-Adapter"),
        "{msg}"
    );
    assert!(!d.join("bad").exists(), "a refused run wrote its output");

    // an adapter folder whose config is no adapter's is refused by name
    let odd = d.join("odd");
    std::fs::create_dir_all(&odd).unwrap();
    std::fs::copy(
        d.join("full/t2iadapter/diffusion_pytorch_model.safetensors"),
        odd.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    std::fs::write(
        odd.join("config.json"),
        r#"{"adapter_type": "full_adapter", "channels": [4000000000], "in_channels": 3, "num_res_blocks": 2, "downscale_factor": 8}"#,
    )
    .unwrap();
    let cont = config(&d, "cont", 1, "adapter = \"odd\"\n");
    let e = sdctl(&["train", "t2i-adapter", "--config", s(&cont)]);
    let msg = String::from_utf8_lossy(&e.stderr);
    assert!(
        !e.status.success()
            && msg.contains("config.json")
            && msg.contains("not a T2I-Adapter's architecture"),
        "{msg}"
    );
    assert!(!d.join("cont").exists(), "a refused run wrote its output");

    // continued from the trained adapter (the `adapter` key), and the results load into
    // generate --control
    let more = config(&d, "more", 1, "adapter = \"full/t2iadapter\"\n");
    ok(&sdctl(&["train", "t2i-adapter", "--config", s(&more)]));
    // eval fill takes a T2I-Adapter as it takes a ControlNet
    let out = sdctl(&[
        "eval",
        "fill",
        "--model",
        s(&model_dir("sd1")),
        "--controlnet",
        s(&d.join("full/t2iadapter")),
        "--count",
        "2",
        "--steps",
        "2",
        "--json",
        s(&d.join("eval.json")),
    ]);
    ok(&out);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("eval.json")).unwrap()).unwrap();
    assert_eq!(report["examples"].as_array().map(|e| e.len()), Some(2));
    for a in [
        d.join("full/t2iadapter"),
        d.join("full/checkpoint-3/t2iadapter"),
        d.join("more/t2iadapter"),
    ] {
        generate_with(&d, &a);
    }
}

/// The weights a fresh run starts from (controlnet init with the same seed).
fn sd_controlnet_weights_from_init(d: &Path) -> Vec<(String, Vec<f32>)> {
    let out = d.join("init-cn");
    let _ = std::fs::remove_dir_all(&out);
    sd_controlnet::init::write_initial_controlnet(&model_dir("sd1"), &out, 7).unwrap();
    weights(&out)
}

#[test]
fn bad_rows_and_bad_settings_are_clear() {
    let d = scratch("train", "bad");
    ok(&sdctl(&[
        "dataset",
        "fill",
        "--output",
        s(&d.join("data")),
        "--count",
        "3",
        "--size",
        "64",
    ]));
    let idx = d.join("data/prompt.json");
    let mut text = std::fs::read_to_string(&idx).unwrap();
    text.push_str("{\"source\": \"source/0.png\", \"prompt\": \"x\"}\nnot json\n{\"source\": \"source/9.png\", \"target\": \"target/0.png\", \"prompt\": \"y\"}\n");
    std::fs::write(&idx, text).unwrap();
    let cfg = config(&d, "out", 1, "");
    let o = sdctl(&["train", "controlnet", "--config", s(&cfg)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    for want in [
        "3 unusable rows",
        "line 4: missing string `target`",
        "line 5: not JSON",
        "line 6: no such file",
        "set skip_bad_rows",
    ] {
        assert!(err.contains(want), "missing {want:?}: {err}");
    }
    // skipped on request: trains with a warning
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
        err.contains("warning:") && err.contains("(skipped)"),
        "{err}"
    );
    // unknown keys and bad values
    let bad = d.join("bad.toml");
    std::fs::write(
        &bad,
        format!(
            "base = \"{}\"\ndataset = \"data\"\noutput = \"o2\"\nmax_steps = 1\nlearning_rte = 1\n",
            model_dir("sd1").display()
        ),
    )
    .unwrap();
    let e = String::from_utf8_lossy(&sdctl(&["train", "controlnet", "--config", s(&bad)]).stderr)
        .to_string();
    assert!(e.contains("learning_rte"), "{e}");
    let e = String::from_utf8_lossy(
        &sdctl(&[
            "train",
            "controlnet",
            "--config",
            s(&cfg),
            "--resolution",
            "60",
        ])
        .stderr,
    )
    .to_string();
    assert!(e.contains("resolution 60"), "{e}");
    let e = String::from_utf8_lossy(
        &sdctl(&[
            "train",
            "controlnet",
            "--config",
            s(&cfg),
            "--output",
            s(&d.join("o3")),
            "--base",
            s(&fixtures().join("models/single/sd1.safetensors")),
        ])
        .stderr,
    )
    .to_string();
    assert!(e.contains("needs a diffusers model folder"), "{e}");
}

#[test]
fn unlocked_training_changes_the_unet_decoder_and_mid_only_control_works() {
    let d = scratch("train", "unlocked");
    ok(&sdctl(&[
        "dataset",
        "fill",
        "--output",
        s(&d.join("data")),
        "--count",
        "2",
        "--size",
        "64",
    ]));
    let cfg = config(&d, "out", 2, "sd_locked = false\nonly_mid_control = true\n");
    let img = d.join("data/source/1.png");
    ok(&sdctl(&[
        "train",
        "controlnet",
        "--config",
        s(&cfg),
        "--validation-prompt",
        "red circle",
        "--validation-image",
        s(&img),
        "--validation-steps",
        "1",
    ]));
    for step in [1, 2] {
        let v = d.join(format!("out/validation/step-{step}.png"));
        assert_eq!(image::open(&v).unwrap().width(), 64, "{}", v.display());
    }
    let dec = candle_core::safetensors::load(
        d.join("out/checkpoint-2/unet_decoder.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert!(dec.keys().all(|k| k.starts_with("up_blocks.")
        || k.starts_with("conv_norm_out.")
        || k.starts_with("conv_out.")));
    let base = candle_core::safetensors::load(
        model_dir("sd1").join("unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let k = "conv_out.weight";
    let a = dec[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = base[k]
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_ne!(a, b, "the decoder did not train");
    assert!(!dec.keys().any(|k| k.starts_with("down_blocks.")));
    // only_mid_control: the UNet took the mid residual alone, so the down blocks' zero
    // convolutions got no gradient and are still zero, while the mid block's trained
    let cn = candle_core::safetensors::load(
        d.join("out/checkpoint-2/controlnet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let largest = |prefix: &str| -> f32 {
        let mut found = false;
        let m = cn
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, t)| {
                found = true;
                t.to_dtype(candle_core::DType::F32)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            })
            .fold(0f32, f32::max);
        assert!(found, "no {prefix} tensors");
        m
    };
    assert_eq!(
        largest("controlnet_down_blocks."),
        0.0,
        "down residuals trained"
    );
    assert!(
        largest("controlnet_mid_block.") > 0.0,
        "the mid residual did not train"
    );
}

fn component(dir: &Path, file: &str) -> Vec<(String, Vec<f32>)> {
    let m = candle_core::safetensors::load(dir.join(file), &Device::Cpu).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = m
        .into_iter()
        .map(|(k, t)| {
            let t = t.to_dtype(candle_core::DType::F32).unwrap();
            (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn a_model_from_configs_trains_its_vae_unet_and_a_controlnet() {
    // model new (tiny-fill configs: factor-4 VAE) -> train vae -> train unet (+ text encoder)
    // -> controlnet init -> generate with the ControlNet; every stage's output loads.
    let d = scratch("train", "base");
    let configs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-fill/configs");
    let (fresh, data) = (d.join("fresh"), d.join("data"));
    ok(&sdctl(&[
        "model",
        "new",
        s(&configs),
        "--output",
        s(&fresh),
        "--seed",
        "3",
    ]));
    let again = sdctl(&["model", "new", s(&configs), "--output", s(&fresh)]);
    assert!(!again.status.success(), "an existing folder is refused");
    ok(&sdctl(&[
        "dataset",
        "fill",
        "--output",
        s(&data),
        "--count",
        "6",
        "--size",
        "64",
    ]));
    let vae = d.join("vae");
    let e = ok_stderr(&sdctl(&[
        "train",
        "vae",
        "--model",
        s(&fresh),
        "--dataset",
        s(&data),
        "--output",
        s(&vae),
        "--max-train-steps",
        "3",
        "--batch-size",
        "2",
        "--seed",
        "1",
    ]));
    assert!(e.contains("latent scaling factor"), "{e}");
    let log = std::fs::read_to_string(vae.join("train_log.csv")).unwrap();
    assert_eq!(
        log.lines()
            .filter(|l| l.starts_with(char::is_numeric))
            .count(),
        3,
        "{log}"
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(vae.join("vae/config.json")).unwrap())
            .unwrap();
    let scaling = cfg["scaling_factor"].as_f64().unwrap();
    assert!(
        scaling > 0.0 && scaling != 0.18215,
        "measured, not the default: {scaling}"
    );
    let vw = "vae/diffusion_pytorch_model.safetensors";
    assert_ne!(
        component(&fresh, vw),
        component(&vae, vw),
        "the VAE trained"
    );
    let uw = "unet/diffusion_pytorch_model.safetensors";
    assert_eq!(
        component(&fresh, uw),
        component(&vae, uw),
        "the UNet did not"
    );

    let base = d.join("base");
    ok(&sdctl(&[
        "train",
        "unet",
        "--model",
        s(&vae),
        "--dataset",
        s(&data),
        "--output",
        s(&base),
        "--max-train-steps",
        "2",
        "--batch-size",
        "2",
        "--train-text-encoder",
        "true",
    ]));
    let tw = "text_encoder/model.safetensors";
    assert_ne!(
        component(&vae, uw),
        component(&base, uw),
        "the UNet trained"
    );
    assert_ne!(
        component(&vae, tw),
        component(&base, tw),
        "the text encoder trained"
    );
    assert_eq!(
        component(&vae, vw),
        component(&base, vw),
        "the VAE is frozen"
    );
    let used = sdctl(&[
        "train",
        "unet",
        "--model",
        s(&vae),
        "--dataset",
        s(&data),
        "--output",
        s(&base),
        "--max-train-steps",
        "1",
    ]);
    assert!(!used.status.success(), "an existing output is refused");

    // a ControlNet for a factor-4 base downsamples the hint by 4, and generates
    let cn = d.join("cn");
    ok(&sdctl(&[
        "controlnet",
        "init",
        "--base",
        s(&base),
        "--output",
        s(&cn),
    ]));
    let out = d.join("out.png");
    ok(&sdctl(&[
        "generate",
        "--model",
        s(&base),
        "--prompt",
        "red circle with blue background",
        "--control",
        &format!(
            "model={},image={}",
            cn.display(),
            data.join("source/0.png").display()
        ),
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "--output",
        s(&out),
    ]));
    assert_eq!(image::open(&out).unwrap().to_rgb8().dimensions(), (64, 64));
    // and a float16 copy of the folder loads the same way
    let half = d.join("half");
    ok(&sdctl(&[
        "model",
        "convert",
        s(&base),
        "--to",
        "diffusers",
        "--half",
        "--output",
        s(&half),
    ]));
    let m = candle_core::safetensors::load(half.join(uw), &Device::Cpu).unwrap();
    assert!(m.values().all(|t| t.dtype() == candle_core::DType::F16));
    std::fs::remove_dir_all(&d).unwrap();
}

/// `mixed_precision = "bf16"` / `"fp16"` (diffusers' names): on a CPU with AVX512-BF16 /
/// AVX512-FP16 the run's losses stay near the f32 run's and its weights differ from them (the
/// half products ran); elsewhere it is refused naming the instructions. A value other than no /
/// bf16 / fp16 is refused. bf16 keeps 8 bits of each product's operands, f16 11 (its sums of 64
/// products in f16): the tiny model's losses move by well under 5% and 1% from that.
#[test]
fn half_mixed_precision_trains_near_f32_or_is_refused() {
    let d = scratch("train", "half");
    fill_data(&d, 5);
    let run = |out: &str, extra: &str| {
        sdctl(&[
            "train",
            "controlnet",
            "--config",
            s(&config(&d, out, 4, extra)),
        ])
    };
    let bad = run("bad", "mixed_precision = \"fp8\"\n");
    let e = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && e.contains("mixed_precision") && e.contains("fp16"),
        "{e}"
    );
    ok(&run("f32", ""));
    let losses = |out: &str| -> Vec<f64> {
        std::fs::read_to_string(d.join(out).join("log.csv"))
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
            .collect()
    };
    let l32 = losses("f32");
    for (name, feature, bound) in [("bf16", "AVX512-BF16", 0.05), ("fp16", "AVX512-FP16", 0.01)] {
        #[cfg(target_arch = "x86_64")]
        let supported = std::is_x86_feature_detected!("avx512f")
            && match name {
                "bf16" => std::is_x86_feature_detected!("avx512bf16"),
                _ => std::is_x86_feature_detected!("avx512fp16"),
            };
        #[cfg(not(target_arch = "x86_64"))]
        let supported = false;
        let o = run(name, &format!("mixed_precision = \"{name}\"\n"));
        if !supported {
            let e = String::from_utf8_lossy(&o.stderr);
            assert!(!o.status.success() && e.contains(feature), "{e}");
            continue;
        }
        ok(&o);
        let l16 = losses(name);
        eprintln!("{name} losses {l16:?}, f32 {l32:?}");
        assert_eq!(l16.len(), 4);
        for (a, b) in l16.iter().zip(&l32) {
            assert!(
                (a - b).abs() <= bound * b.abs(),
                "{name} {l16:?} vs f32 {l32:?}"
            );
        }
        assert_ne!(
            weights(&d.join(name).join("controlnet")),
            weights(&d.join("f32/controlnet")),
            "{name} gave f32's weights: the half products did not run"
        );
    }
}

/// `--gradient-checkpointing true` (the config key `gradient_checkpointing`): the blocks run
/// again in the backward pass and the run trains as one without: the same losses, step by step.
#[test]
fn gradient_checkpointing_trains_as_without() {
    let d = scratch("train", "ckpt");
    fill_data(&d, 5);
    let run = |out: &str, flags: &[&str]| {
        let cfg = config(&d, out, 3, "");
        let mut args = vec!["train", "controlnet", "--config", s(&cfg)];
        args.extend_from_slice(flags);
        ok(&sdctl(&args));
        std::fs::read_to_string(d.join(out).join("log.csv"))
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| l.split(',').nth(1).unwrap().parse::<f64>().unwrap())
            .collect::<Vec<_>>()
    };
    let with = run("with", &["--gradient-checkpointing", "true"]);
    let without = run("without", &[]);
    assert_eq!(with.len(), 3);
    for (a, b) in with.iter().zip(&without) {
        // the gradients differ only in the order their f32 sums are made (1e-6 relative in
        // the parity test); after three AdamW steps the losses stay within 1e-4
        assert!(
            (a - b).abs() <= 1e-4 * b.abs(),
            "with {with:?} vs without {without:?}"
        );
    }
    let bad = sdctl(&[
        "train",
        "controlnet",
        "--config",
        s(&config(&d, "bad", 1, "gradient_checkpointing = \"yes\"\n")),
    ]);
    let e = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && e.contains("gradient_checkpointing"),
        "{e}"
    );
}
