//! PNG metadata: the A1111-style infotext (golden string, hashes), the JSON settings chunk,
//! `--from-png` round trips (ours and A1111's PNGs), and `--rng`.

use std::path::{Path, PathBuf};

use candle_core::Device;
use sd_tests::{fixtures, max_abs_diff, model_dir};
use sha2::{Digest, Sha256};

use crate::common::{copy_tree, latents_f32, ok, s, scratch, sdctl_cached, sdctl_command};

fn sha256_hex(files: &[PathBuf]) -> String {
    let mut h = Sha256::new();
    for f in files {
        h.update(std::fs::read(f).unwrap());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A model folder's hash: its .safetensors files in path order.
fn folder_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p)
            } else if p.extension().is_some_and(|x| x == "safetensors") {
                out.push(p)
            }
        }
    }
    out.sort();
    out
}

#[test]
fn infotext_golden_and_from_png_round_trip() {
    let d = scratch("infotext", "round");
    let cache = d.join("cache");
    let fx = fixtures();
    let model = model_dir("sd1");
    let cn = fx.join("models/controlnet-sd1-ldm.safetensors");
    let lora = fx.join("loras/lora_a_peft.safetensors");
    let unit = format!(
        "model={},image={},weight=0.6,end=0.8,mode=prompt",
        cn.display(),
        fx.join("inputs/control_a.png").display()
    );
    let lora_arg = format!("{}:0.7", lora.display());
    let a = d.join("a.png");
    let lat_a = d.join("a.safetensors");
    ok(&sdctl_cached(
        &[
            "generate",
            "--model",
            s(&model),
            "--prompt",
            "a red (circle:1.2), test",
            "--negative-prompt",
            "blue",
            "--width",
            "64",
            "--height",
            "48",
            "--steps",
            "3",
            "--sampler",
            "Euler a",
            "--schedule",
            "normal",
            "--seed",
            "99",
            "--rng",
            "philox",
            "--clip-skip",
            "2",
            "--control",
            &unit,
            "--lora",
            &lora_arg,
            "--output",
            s(&a),
            "--save-latents",
            s(&lat_a),
        ],
        &cache,
    ));
    let text = ok(&sdctl_cached(&["png-info", s(&a)], &cache));
    let model_hash = &sha256_hex(&folder_files(&model))[..10];
    // A1111's conventions, computed with hashlib after A1111's code (make_hash_fixtures.py):
    // sd-webui-controlnet's legacy hash, the LoRA's hash of its tensor data
    let a1111: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fx.join("expected/a1111_hashes.json")).unwrap(),
    )
    .unwrap();
    let cn_hash = a1111["models/controlnet-sd1-ldm.safetensors"]["legacy"]
        .as_str()
        .unwrap();
    let lora_hash = a1111["loras/lora_a_peft.safetensors"]["lora"]
        .as_str()
        .unwrap();
    assert_ne!(lora_hash, &sha256_hex(std::slice::from_ref(&lora))[..12]);
    let want = format!(
        "a red (circle:1.2), test <lora:lora_a_peft:0.7>\nNegative prompt: blue\nSteps: 3, Sampler: Euler a, Schedule type: Normal, CFG scale: 7.5, Seed: 99, Size: 64x48, Model hash: {model_hash}, Model: sd1, Clip skip: 2, RNG: NV, ControlNet 0: \"Module: none, Model: controlnet-sd1-ldm [{cn_hash}], Weight: 0.6, Resize Mode: Crop and Resize, Guidance Start: 0, Guidance End: 0.8, Control Mode: My prompt is more important\", Lora hashes: \"lora_a_peft: {lora_hash}\", Version: sdctl {}\n",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(text, want);
    // the JSON chunk: every setting, and full hashes
    let json: serde_json::Value =
        serde_json::from_str(&ok(&sdctl_cached(&["png-info", "--json", s(&a)], &cache))).unwrap();
    assert_eq!(json["settings"]["rng"], "philox");
    assert_eq!(json["settings"]["control"][0]["mode"], "prompt");
    assert_eq!(
        json["sha256"][lora.display().to_string()],
        sha256_hex(std::slice::from_ref(&lora))
    );
    // hashes were cached
    assert!(cache.join("hashes.json").is_file());

    // --from-png re-runs with the same settings: identical latents
    let lat_b = d.join("b.safetensors");
    ok(&sdctl_cached(
        &[
            "generate",
            "--from-png",
            s(&a),
            "--output",
            s(&d.join("b.png")),
            "--save-latents",
            s(&lat_b),
        ],
        &cache,
    ));
    assert_eq!(latents_f32(&lat_a), latents_f32(&lat_b));
    // flags still override: --seed 100 from the PNG equals a direct run with seed 100
    let lat_c = d.join("c.safetensors");
    ok(&sdctl_cached(
        &[
            "generate",
            "--from-png",
            s(&a),
            "--seed",
            "100",
            "--output",
            s(&d.join("c.png")),
            "--save-latents",
            s(&lat_c),
        ],
        &cache,
    ));
    let lat_e = d.join("e.safetensors");
    ok(&sdctl_cached(
        &[
            "generate",
            "--model",
            s(&model),
            "--prompt",
            "a red (circle:1.2), test",
            "--negative-prompt",
            "blue",
            "--width",
            "64",
            "--height",
            "48",
            "--steps",
            "3",
            "--sampler",
            "Euler a",
            "--schedule",
            "normal",
            "--seed",
            "100",
            "--rng",
            "philox",
            "--clip-skip",
            "2",
            "--control",
            &unit,
            "--lora",
            &lora_arg,
            "--output",
            s(&d.join("e.png")),
            "--save-latents",
            s(&lat_e),
        ],
        &cache,
    ));
    assert_eq!(latents_f32(&lat_c), latents_f32(&lat_e));
    assert_ne!(latents_f32(&lat_a), latents_f32(&lat_c));
    let show = ok(&sdctl_cached(
        &["config", "show", "--from-png", s(&a)],
        &cache,
    ));
    assert!(
        show.contains("seed = 99 ") && show.contains(&format!("# png {}", a.display())),
        "{show}"
    );
}

fn png_with_text(path: &Path, chunks: &[(&str, &str)]) {
    let f = std::fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(f, 1, 1);
    enc.set_color(png::ColorType::Rgb);
    for (k, v) in chunks {
        enc.add_text_chunk(k.to_string(), v.to_string()).unwrap();
    }
    let mut w = enc.write_header().unwrap();
    w.write_image_data(&[0, 0, 0]).unwrap();
    w.finish().unwrap();
}

#[test]
fn a1111_pngs_give_their_settings_and_comfyui_ones_a_clear_error() {
    let d = scratch("infotext", "a1111");
    let cache = d.join("cache");
    let a1111 = d.join("a1111.png");
    png_with_text(
        &a1111,
        &[(
            "parameters",
            "a lighthouse, (storm:1.3)\nNegative prompt: people\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6, Seed: 1234, Size: 64x48, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, Version: v1.10.1",
        )],
    );
    let model = model_dir("sd1");
    let show = ok(&sdctl_cached(
        &[
            "config",
            "show",
            "--from-png",
            s(&a1111),
            "--model",
            s(&model),
        ],
        &cache,
    ));
    for want in [
        "prompt = \"a lighthouse, (storm:1.3)\"",
        "negative_prompt = \"people\"",
        "steps = 3 ",
        "sampler = \"dpmpp_2m\"",
        "schedule = \"karras\"",
        "cfg_scale = 6",
        "seed = 1234 ",
        "rng = \"philox\"",
        "width = 64 ",
        "height = 48 ",
        "clip_skip = 2 ",
    ] {
        assert!(show.contains(want), "missing {want:?}:\n{show}");
    }
    // and generates with the model given: the same as the equivalent flags
    let lat_a = d.join("a.safetensors");
    ok(&sdctl_cached(
        &[
            "generate",
            "--from-png",
            s(&a1111),
            "--model",
            s(&model),
            "--output",
            s(&d.join("a.png")),
            "--save-latents",
            s(&lat_a),
        ],
        &cache,
    ));
    let lat_b = d.join("b.safetensors");
    ok(&sdctl_cached(
        &[
            "generate",
            "--model",
            s(&model),
            "--prompt",
            "a lighthouse, (storm:1.3)",
            "--negative-prompt",
            "people",
            "--steps",
            "3",
            "--sampler",
            "DPM++ 2M Karras",
            "--cfg-scale",
            "6",
            "--seed",
            "1234",
            "--rng",
            "philox",
            "--width",
            "64",
            "--height",
            "48",
            "--clip-skip",
            "2",
            "--output",
            s(&d.join("b.png")),
            "--save-latents",
            s(&lat_b),
        ],
        &cache,
    ));
    assert_eq!(latents_f32(&lat_a), latents_f32(&lat_b));

    let comfy = d.join("comfy.png");
    png_with_text(
        &comfy,
        &[(
            "prompt",
            "{\"6\": {\"class_type\": \"CLIPTextEncode\", \"inputs\": {\"text\": \"x\"}}}",
        )],
    );
    let o = sdctl_cached(&["config", "show", "--from-png", s(&comfy)], &cache);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("a ComfyUI image stores its node graph, not settings"),
        "{err}"
    );
}

/// A PNG written by A1111 itself (make_a1111_png_fixtures.py: its create_infotext with the
/// ControlNet extension's unit serialisation and the Lora extension's hashes, saved by its
/// save_image_with_geninfo): png-info prints the text as it is, and the image generated
/// `--from-png` carries every field A1111 wrote with the same value, in the same order, but
/// the ControlNet unit (its control image is not in the PNG), the version, and the RNG it adds.
#[test]
fn a_png_written_by_a1111_round_trips() {
    let d = scratch("infotext", "a1111-written");
    let cache = d.join("cache");
    let png = fixtures().join("a1111/txt2img.png");
    let want = std::fs::read_to_string(fixtures().join("a1111/txt2img.txt")).unwrap();
    let text = ok(&sdctl_cached(&["png-info", s(&png)], &cache));
    assert_eq!(text.trim_end(), want);

    let out = d.join("ours.png");
    ok(&sdctl_cached(
        &[
            "generate",
            "--from-png",
            s(&png),
            "--model",
            s(&fixtures().join("models/single/sd1.safetensors")),
            "--lora-dir",
            s(&fixtures().join("loras")),
            "--output",
            s(&out),
        ],
        &cache,
    ));
    let ours = ok(&sdctl_cached(&["png-info", s(&out)], &cache));
    let split = |t: &str| {
        let (head, last) = t.trim_end().rsplit_once('\n').unwrap();
        (head.to_string(), sd::infotext::fields(last))
    };
    let ((a_head, a), (o_head, o)) = (split(&want), split(&ours));
    assert_eq!(o_head, a_head, "prompt and negative prompt");
    let kept: Vec<&(String, String)> = a
        .iter()
        .filter(|(k, _)| k != "Version" && k != "ControlNet 0")
        .collect();
    assert!(kept.len() >= 10, "{a:?}");
    let mut at = 0;
    for (k, v) in kept {
        let i = o[at..]
            .iter()
            .position(|(ok, _)| ok == k)
            .unwrap_or_else(|| panic!("{k} missing or out of A1111's order in {ours}"));
        assert_eq!(&o[at + i].1, v, "{k}");
        at += i + 1;
    }
    let extra: Vec<&str> = o
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| !a.iter().any(|(ak, _)| ak == k))
        .collect();
    assert_eq!(extra, ["RNG"], "fields A1111 did not write");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn rng_choice_changes_the_noise_and_is_validated() {
    let d = scratch("infotext", "rng");
    let cache = d.join("cache");
    let model = model_dir("sd1");
    let run = |rng: &str, name: &str| {
        let lat = d.join(format!("{name}.safetensors"));
        ok(&sdctl_cached(
            &[
                "generate",
                "--model",
                s(&model),
                "--prompt",
                "x",
                "--width",
                "64",
                "--height",
                "64",
                "--steps",
                "2",
                "--seed",
                "3",
                "--rng",
                rng,
                "--output",
                s(&d.join(format!("{name}.png"))),
                "--save-latents",
                s(&lat),
            ],
            &cache,
        ));
        latents_f32(&lat)
    };
    let cpu = run("torch-cpu", "cpu");
    let philox = run("philox", "philox");
    let dev = Device::Cpu;
    let t = |v: &Vec<f32>| candle_core::Tensor::new(v.as_slice(), &dev).unwrap();
    assert!(max_abs_diff(&t(&cpu), &t(&philox)) > 1e-3);
    let o = sdctl_cached(&["config", "show", "--rng", "curand"], &cache);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("flag --rng: rng: \"curand\" is not one of torch-cpu, philox"),
        "{err}"
    );
}

#[test]
fn models_by_repo_id_come_from_the_hugging_face_cache() {
    let d = scratch("infotext", "hf");
    let cache = d.join("cache");
    let home = d.join("hf-home");
    // the real layout: hub/models--OWNER--NAME/refs/main -> snapshots/<commit>/...
    let repo = home.join("hub/models--tiny-org--tiny-sd");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    copy_tree(&model_dir("sd1"), &repo.join("snapshots/0123abcd"));
    let run = |model: &str, name: &str, env: &[(&str, &str)]| {
        let lat = d.join(format!("{name}.safetensors"));
        let mut c = sdctl_command();
        c.args([
            "generate",
            "--model",
            model,
            "--prompt",
            "x",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "2",
            "--seed",
            "1",
            "--output",
            s(&d.join(format!("{name}.png"))),
            "--save-latents",
            s(&lat),
        ])
        .env("SDCTL_CACHE_DIR", &cache)
        .env_remove("HF_HUB_CACHE")
        .env("HF_HUB_OFFLINE", "1");
        for (k, v) in env {
            c.env(k, v);
        }
        (c.output().unwrap(), lat)
    };
    let (o, lat) = run("tiny-org/tiny-sd", "hub", &[("HF_HOME", s(&home))]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (o2, direct) = run(s(&model_dir("sd1")), "direct", &[]);
    assert!(o2.status.success());
    assert_eq!(latents_f32(&lat), latents_f32(&direct));
    // HF_HUB_CACHE points at the hub folder itself
    let (o, _) = run(
        "tiny-org/tiny-sd",
        "hub2",
        &[("HF_HUB_CACHE", s(&home.join("hub")))],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // missing, offline: where it looked
    let (o, _) = run("tiny-org/absent", "absent", &[("HF_HOME", s(&home))]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "tiny-org/absent: not a file or folder here, and not in the Hugging Face cache"
        ) && err.contains(&format!(
            "{}/refs/main",
            home.join("hub/models--tiny-org--absent").display()
        )) && err.contains("HF_HUB_OFFLINE is set"),
        "{err}"
    );
}
