//! Layered config files: layering rules, list concatenation and ids, relative paths,
//! includes, validation errors, `config show`, and the examples/ library run on the fixture
//! models.

use std::path::{Path, PathBuf};

use candle_core::Device;
use sd_tests::{fixtures, model_dir};

use crate::common::{failed, ok, s, scratch, sdctl, sdctl_with};

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, text).unwrap();
    p
}

/// The line of `config show` output for `key` (first occurrence after `after`).
fn show_line<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(&format!("{key} = ")))
        .unwrap_or_else(|| panic!("no {key} in:\n{out}"))
}

#[test]
fn layering_defaults_files_env_flags() {
    let d = scratch("config", "layers");
    let a = write(
        &d,
        "a.toml",
        "steps = 30\ncfg_scale = 5.0\nprompt = \"from a\"\nseed = 1\n",
    );
    let b = write(&d, "b.toml", "# b overrides a\ncfg_scale = 6.0\nseed = 2\n");
    let o = sdctl_with(
        &[
            "config",
            "show",
            "--config",
            s(&a),
            "--config",
            s(&b),
            "--seed",
            "4",
        ],
        &[
            ("SDCTL_SEED", "3"),
            ("SDCTL_CLIP_SKIP", "2"),
            ("SDCTL_LOG", "warn"),
        ],
    );
    let out = ok(&o);
    // default
    assert!(show_line(&out, "batch").ends_with("# default"), "{out}");
    assert!(show_line(&out, "batch").starts_with("batch = 1 "), "{out}");
    // first file, with its line
    let steps = show_line(&out, "steps");
    assert!(steps.starts_with("steps = 30 "), "{out}");
    assert!(steps.ends_with(&format!("# {}:1", a.display())), "{steps}");
    // the later file wins over the earlier one
    let cfg = show_line(&out, "cfg_scale");
    assert!(cfg.starts_with("cfg_scale = 6.0 "), "{cfg}");
    assert!(cfg.ends_with(&format!("# {}:2", b.display())), "{cfg}");
    // env over files, flags over env
    assert!(
        show_line(&out, "clip_skip").ends_with("# env SDCTL_CLIP_SKIP"),
        "{out}"
    );
    let seed = show_line(&out, "seed");
    assert!(
        seed.starts_with("seed = 4 ") && seed.ends_with("# flag --seed"),
        "{seed}"
    );
    // SDCTL_LOG is the log filter, not a setting: not an unknown-key error
    assert!(!out.contains("log ="), "{out}");
}

#[test]
fn lists_concatenate_ids_replace_flags_append_and_paths_are_relative_to_their_file() {
    let d = scratch("config", "lists");
    let cn = model_dir("controlnet-sd1");
    let img = fixtures().join("inputs/control_a.png");
    // files in their own folders, naming files relative to themselves
    std::fs::create_dir_all(d.join("scene/in")).unwrap();
    std::fs::create_dir_all(d.join("pose")).unwrap();
    std::fs::copy(&img, d.join("scene/in/edges.png")).unwrap();
    std::fs::copy(&img, d.join("pose/pose.png")).unwrap();
    let scene = write(
        &d,
        "scene/scene.toml",
        &format!(
            "prompt = \"x\"\n\n[[control]]\nid = \"edges\"\nmodel = \"{}\"\nimage = \"in/edges.png\"\nweight = 0.5\n\n[[control]]\nid = \"depth\"\nmodel = \"{}\"\nimage = \"in/edges.png\"\n",
            cn.display(),
            cn.display()
        ),
    );
    let pose = write(
        &d,
        "pose/pose.yaml",
        &format!(
            "control:\n  - model: {}\n    image: pose.png\n  - id: edges\n    model: {}\n    image: pose.png\n    weight: 1.5\n",
            cn.display(),
            cn.display()
        ),
    );
    let flag_unit = format!("model={},image={},weight=0.25", cn.display(), img.display());
    let out = ok(&sdctl(&[
        "config",
        "show",
        "--config",
        s(&scene),
        "--config",
        s(&pose),
        "--control",
        &flag_unit,
    ]));
    let units: Vec<&str> = out.split("[[control]]").skip(1).collect();
    assert_eq!(units.len(), 4, "{out}");
    // "edges" from scene.toml was replaced in place by pose.yaml's unit with that id
    assert!(units[0].contains("id = \"edges\""), "{out}");
    assert!(units[0].contains("weight = 1.5"), "{out}");
    assert!(
        units[0].contains(&format!(
            "image = \"{}\"",
            d.join("pose/pose.png").display()
        )),
        "{out}"
    );
    assert!(units[1].contains("id = \"depth\""), "{out}");
    assert!(
        units[1].contains(&format!(
            "image = \"{}\"",
            d.join("scene/in/edges.png").display()
        )),
        "paths resolve against the file naming them: {out}"
    );
    assert!(
        units[1].contains(&format!("# {}:", scene.display())),
        "{out}"
    );
    assert!(!units[2].contains("id ="), "{out}");
    assert!(
        units[3].contains("weight = 0.25") && units[3].contains("# flag --control #1"),
        "{out}"
    );
}

#[test]
fn includes_are_relative_and_cycles_are_caught() {
    let d = scratch("config", "include");
    write(
        &d,
        "common/base.toml",
        "steps = 12\nsampler = \"Euler a\"\n",
    );
    let top = write(
        &d,
        "top.toml",
        "include = [\"common/base.toml\"]\nsteps = 13\n",
    );
    let out = ok(&sdctl(&["config", "show", "--config", s(&top)]));
    // the including file wins over what it includes
    assert!(show_line(&out, "steps").starts_with("steps = 13 "), "{out}");
    assert!(
        show_line(&out, "sampler").contains("common/base.toml:2"),
        "{out}"
    );

    let a = write(&d, "a.toml", "include = [\"b.toml\"]\n");
    write(&d, "b.toml", "steps = 3\ninclude = [\"sub/c.toml\"]\n");
    write(&d, "sub/c.toml", "include = [\"../a.toml\"]\n");
    let err = failed(&sdctl(&["config", "show", "--config", s(&a)]));
    assert!(err.contains("include cycle"), "{err}");
    assert!(
        err.contains("a.toml -> ") && err.contains("b.toml -> "),
        "{err}"
    );
    assert!(
        err.contains("sub/c.toml:1: include:"),
        "names the file, line and key: {err}"
    );
}

#[test]
fn every_problem_is_reported_at_once_with_file_line_and_key() {
    let d = scratch("config", "errors");
    let cn = model_dir("controlnet-sd1");
    let cfg = write(
        &d,
        "bad.toml",
        &format!(
            r#"prompt = "x"
stpes = 20
steps = 0
cfg_scale = -1.0
width = 100
height = "tall"
sampler = "Euler z"
init_image = "missing.png"

[[control]]
model = "{cn}"
image = "nope.png"
start = 0.8
end = 0.2
weight = 2.5
wieght = 1.0

[[control]]
model = "{cn}"
image = "nope.png"
preprocessor = {{ name = "threshold", threshold = 300, treshold = 1 }}

[[control]]
model = "{cn}"
image = "nope.png"
preprocessor = "invret"
"#,
            cn = cn.display()
        ),
    );
    let err = failed(&sdctl(&[
        "generate",
        "--config",
        s(&cfg),
        "--output",
        s(&d.join("o.png")),
    ]));
    let f = cfg.display().to_string();
    for want in [
        format!("{f}:2: stpes: unknown key (did you mean `steps`?)"),
        format!("{f}:3: steps: 0 is out of range 1..=10000"),
        format!("{f}:4: cfg_scale: must be a finite number in [0, 100], got -1"),
        format!("{f}:5: width: 100 is not a multiple of 8"),
        format!("{f}:6: height: expected an integer, found string \"tall\""),
        format!("{f}:7: sampler: "),
        format!("{f}:8: init_image: no such file: {}", d.join("missing.png").display()),
        format!("{f}:12: control[0].image: not found"),
        format!("{f}:13: control[0].start: start 0.8 is after end 0.2"),
        format!("{f}:15: control[0].weight: must be a finite number in [0, 2] (allow more with --allow-extreme-weights), got 2.5"),
        format!("{f}:16: control[0].wieght: unknown key (did you mean `weight`?)"),
        format!("{f}:21: control[1].preprocessor: preprocessor threshold parameter threshold: 300 is out of range 0..=255"),
        format!("{f}:21: control[1].preprocessor: preprocessor threshold parameter treshold: unknown parameter (did you mean `threshold`?)"),
        format!("{f}:26: control[2].preprocessor: unknown preprocessor \"invret\" (did you mean `invert`?)"),
    ] {
        assert!(err.contains(&want), "missing {want:?} in:\n{err}");
    }
    assert!(err.contains("problems in the settings"), "{err}");
    assert!(!d.join("o.png").exists());

    // the same weight is fine with --allow-extreme-weights; bad env values name the variable
    let cfg2 = write(
        &d,
        "extreme.toml",
        &format!(
            "[[control]]\nmodel = \"{}\"\nimage = \"{}\"\nweight = 2.5\n",
            cn.display(),
            fixtures().join("inputs/control_a.png").display()
        ),
    );
    ok(&sdctl(&[
        "config",
        "show",
        "--config",
        s(&cfg2),
        "--allow-extreme-weights",
    ]));
    let err = failed(&sdctl_with(&["config", "show"], &[("SDCTL_STEPS", "many")]));
    assert!(
        err.contains("env SDCTL_STEPS: steps: expected an integer"),
        "{err}"
    );
    let err = failed(&sdctl(&[
        "config",
        "show",
        "--config",
        s(&d.join("none.toml")),
    ]));
    assert!(err.contains("none.toml: config file not found"), "{err}");
    let bad = write(&d, "syntax.toml", "steps = = 3\n");
    let err = failed(&sdctl(&["config", "show", "--config", s(&bad)]));
    assert!(err.contains("syntax.toml"), "{err}");
    let txt = write(&d, "cfg.txt", "steps = 3\n");
    let err = failed(&sdctl(&["config", "show", "--config", s(&txt)]));
    assert!(err.contains("cfg.txt: unknown config format"), "{err}");
}

#[test]
fn config_show_golden() {
    let d = scratch("config", "golden");
    let cn = d.join("cn");
    std::fs::create_dir_all(&cn).unwrap();
    std::fs::write(d.join("pose.png"), b"").unwrap();
    let cfg = write(
        &d,
        "scene.toml",
        "prompt = \"a dancer\"\nsteps = 25\n\n[[control]]\nid = \"pose\"\nmodel = \"cn\"\nimage = \"pose.png\"\npreprocessor = { name = \"threshold\", threshold = 100 }\nend = 0.9\n",
    );
    let out = ok(&sdctl_with(
        &["config", "show", "--config", s(&cfg), "--cfg-scale", "6"],
        &[("SDCTL_SEED", "7")],
    ));
    // what it prints is a config file that gives the same settings back
    let again = write(&d, "again.toml", &out);
    let out2 = ok(&sdctl(&["config", "show", "--config", s(&again)]));
    let values = |t: &str| -> Vec<String> {
        t.lines()
            .map(|l| l.split("  #").next().unwrap().trim_end().to_string())
            .collect()
    };
    assert_eq!(values(&out), values(&out2));
    // comment alignment depends on the temporary folder's name: compare without it
    let norm = |t: &str| -> String {
        t.lines()
            .map(|l| match l.split_once("  # ") {
                Some((v, c)) => format!("{} # {c}\n", v.trim_end()),
                None => format!("{l}\n"),
            })
            .collect()
    };
    let out = norm(&out.replace(s(&d), "$DIR"));
    let golden = norm(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/config_show.toml"),
        )
        .unwrap(),
    );
    assert_eq!(out, golden, "got:\n{out}");
}

/// The example library, with the fixture models and images linked in where the examples
/// expect real ones.
fn example_sandbox() -> PathBuf {
    let d = scratch("config", "examples");
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    for e in std::fs::read_dir(&ex).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, d.join(p.file_name().unwrap())).unwrap();
        }
    }
    let fx = fixtures();
    let links = [
        ("models/sd15", fx.join("models/sd1")),
        ("models/sdxl-base", fx.join("models/sdxl")),
        (
            "models/controlnet-union-sdxl",
            fx.join("models/controlnet-sdxl-union"),
        ),
        ("models/sd15-inpainting", fx.join("models/sd1-inpaint")),
        (
            "models/control_v11p_sd15_openpose",
            fx.join("models/controlnet-sd1"),
        ),
        (
            "models/control_v11p_sd15_canny",
            fx.join("models/controlnet-sd1-b"),
        ),
        (
            "models/control_v11f1p_sd15_depth",
            fx.join("models/controlnet-sd1"),
        ),
        (
            "models/control_v11p_sd15_scribble",
            fx.join("models/controlnet-sd1-b"),
        ),
        (
            "loras/watercolor.safetensors",
            fx.join("loras/lora_a_peft.safetensors"),
        ),
        ("inputs/pose.png", fx.join("inputs/control_a.png")),
        ("inputs/edges.png", fx.join("inputs/control_b.png")),
        ("inputs/depth.png", fx.join("inputs/control_a.png")),
        ("inputs/sketch.png", fx.join("inputs/init.png")),
        ("inputs/photo.png", fx.join("inputs/init.png")),
        ("inputs/mask.png", fx.join("inputs/mask.png")),
        ("embeddings", fx.join("embeddings")),
        (
            "models/ip-adapter/ip-adapter_sd15.bin",
            fx.join("models/ip-adapter/ip-adapter_sd1.bin"),
        ),
        (
            "models/ip-adapter/image_encoder",
            fx.join("models/ip-adapter/image_encoder"),
        ),
        (
            "models/t2iadapter_depth_sd15v2.pth",
            fx.join("models/t2i-adapter-sd1-light.pth"),
        ),
        ("inputs/style.png", fx.join("ip/ref.png")),
    ];
    for (name, target) in links {
        let p = d.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(target.canonicalize().unwrap(), &p).unwrap();
    }
    d
}

#[test]
fn every_example_runs_on_the_fixture_models() {
    let d = example_sandbox();
    let runs: [&[&str]; 8] = [
        &["pose-portrait.toml"],
        &["canny-depth.toml"],
        &["pose-portrait.toml", "style-watercolor.toml"],
        &["img2img-control.yaml"],
        &["inpaint-control.json"],
        &["sdxl-union-pose-depth.toml"],
        &["pose-hires-embedding.toml"],
        &["pose-style-ip-adapter.toml"],
    ];
    for (i, files) in runs.iter().enumerate() {
        let out = d.join(format!("out{i}.png"));
        let mut args = vec!["generate".to_string()];
        for f in *files {
            args.push("--config".into());
            args.push(d.join(f).display().to_string());
        }
        // tiny models: a small image and few steps
        for a in [
            "--width", "64", "--height", "64", "--steps", "2", "--output",
        ] {
            args.push(a.into());
        }
        args.push(out.display().to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = sdctl(&args);
        assert!(
            o.status.success(),
            "{files:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let img = image::open(&out).unwrap();
        // the hires example's second pass is 1.5x the size
        let side = if files[0].contains("hires") { 96 } else { 64 };
        assert_eq!((img.width(), img.height()), (side, side), "{files:?}");
    }
    // the style layer really adds its LoRA to the pose scene
    let show = ok(&sdctl(&[
        "config",
        "show",
        "--config",
        s(&d.join("pose-portrait.toml")),
        "--config",
        s(&d.join("style-watercolor.toml")),
    ]));
    assert!(
        show.contains("[[lora]]") && show.contains("[[control]]"),
        "{show}"
    );
    assert!(
        show_line(&show, "cfg_scale").starts_with("cfg_scale = 6.0"),
        "{show}"
    );
}

#[test]
fn a_config_file_and_the_same_flags_give_identical_latents() {
    let d = scratch("config", "equiv");
    let model = model_dir("sd1");
    let cn = model_dir("controlnet-sd1");
    let img = fixtures().join("inputs/control_a.png");
    let cfg = write(
        &d,
        "c.toml",
        &format!(
            "model = \"{}\"\nprompt = \"a red circle\"\nnegative_prompt = \"blurry\"\nwidth = 64\nheight = 48\nsteps = 3\ncfg_scale = 6.5\nsampler = \"Euler a\"\nschedule = \"normal\"\nseed = 77\nclip_skip = 2\n\n[[control]]\nmodel = \"{}\"\nimage = \"{}\"\nweight = 0.7\nend = 0.6\nmode = \"prompt\"\n",
            model.display(),
            cn.display(),
            img.display()
        ),
    );
    let lat_a = d.join("a.safetensors");
    ok(&sdctl(&[
        "generate",
        "--config",
        s(&cfg),
        "--output",
        s(&d.join("a.png")),
        "--save-latents",
        s(&lat_a),
    ]));
    let control = format!(
        "model={},image={},weight=0.7,end=0.6,mode=prompt",
        cn.display(),
        img.display()
    );
    let lat_b = d.join("b.safetensors");
    ok(&sdctl(&[
        "generate",
        "--model",
        s(&model),
        "--prompt",
        "a red circle",
        "--negative-prompt",
        "blurry",
        "--width",
        "64",
        "--height",
        "48",
        "--steps",
        "3",
        "--cfg-scale",
        "6.5",
        "--sampler",
        "Euler a",
        "--schedule",
        "normal",
        "--seed",
        "77",
        "--clip-skip",
        "2",
        "--control",
        &control,
        "--output",
        s(&d.join("b.png")),
        "--save-latents",
        s(&lat_b),
    ]));
    let a = candle_core::safetensors::load(&lat_a, &Device::Cpu).unwrap();
    let b = candle_core::safetensors::load(&lat_b, &Device::Cpu).unwrap();
    let (a, b) = (
        a["latents"].flatten_all().unwrap(),
        b["latents"].flatten_all().unwrap(),
    );
    assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
    // and a different setting changes them (the comparison can fail)
    let lat_c = d.join("c.safetensors");
    ok(&sdctl(&[
        "generate",
        "--config",
        s(&cfg),
        "--seed",
        "78",
        "--output",
        s(&d.join("c.png")),
        "--save-latents",
        s(&lat_c),
    ]));
    let c = candle_core::safetensors::load(&lat_c, &Device::Cpu).unwrap();
    assert_ne!(
        a.to_vec1::<f32>().unwrap(),
        c["latents"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    );
}

/// A `[[control]]` table takes only the keys a unit uses: a `vae` there (once accepted and
/// silently ignored) is an unknown key, named with its file and line.
#[test]
fn control_tables_refuse_keys_no_unit_reads() {
    let d = scratch("config", "control-vae");
    let f = d.join("c.toml");
    std::fs::write(
        &f,
        "[[control]]\nimage = \"a.png\"\nvae = \"v.safetensors\"\n",
    )
    .unwrap();
    let err = failed(&sdctl(&["config", "show", "--config", s(&f)]));
    assert!(
        err.contains(&format!("{}:3: control[0].vae: unknown key", f.display())),
        "{err}"
    );
}
