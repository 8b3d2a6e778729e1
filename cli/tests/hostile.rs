//! Hostile inputs at the trust boundaries (issue 30): a PNG carries generation parameters
//! only, outputs never replace anything but regular files, prompt LoRA tags stay in their
//! folder and their weights in range, a PNG's text cannot drive the terminal, and a closed
//! stdout ends a command quietly. Every payload is made here by the tests themselves.

use std::path::Path;
use std::process::Stdio;

use sd_tests::{fixtures, model_dir};

use crate::common::{
    clean_failure, fails, mkfifo, ok, ok_stderr, one_step, s, scratch, sdctl, sdctl_command,
};

/// A 1x1 PNG with these text chunks (iTXt, so any UTF-8 and control characters fit).
fn png_with_text(path: &Path, chunks: &[(&str, &str)]) {
    let f = std::fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(f, 1, 1);
    enc.set_color(png::ColorType::Rgb);
    for (k, v) in chunks {
        enc.add_itxt_chunk(k.to_string(), v.to_string()).unwrap();
    }
    let mut w = enc.write_header().unwrap();
    w.write_image_data(&[0, 0, 0]).unwrap();
    w.finish().unwrap();
}

fn is_fifo(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_fifo())
}

/// `generate` on the fixture model, 1 step at 64x64, with `extra` appended.
fn gen_args<'a>(model: &'a str, prompt: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "generate", "--model", model, "--prompt", prompt, "--width", "64", "--height", "64",
        "--steps", "1", "--seed", "1",
    ];
    v.extend_from_slice(extra);
    v
}

/// The settings chunk of a PNG names a plugin library, a plugin folder, a latents file and an
/// output: none of them is loaded or written; the run uses the user's own --output, and each
/// dropped key is named in a warning.
#[test]
fn png_settings_carry_parameters_only() {
    let d = scratch("hostile", "png");
    let model = model_dir("sd1");
    // a "library" that is not one: loading it would be reported as an error naming it
    let evil = d.join("evil.so");
    std::fs::write(&evil, b"not a library").unwrap();
    let plugdir = d.join("plugdir");
    std::fs::create_dir_all(&plugdir).unwrap();
    std::fs::write(plugdir.join("inside.so"), b"not a library").unwrap();
    let stolen_latents = d.join("stolen.safetensors");
    let stolen_png = d.join("stolen.png");
    let settings = serde_json::json!({
        "version": "sdctl 0",
        "settings": {
            "prompt": "a red circle",
            "width": 64,
            "height": 64,
            "steps": 1,
            "seed": 7,
            "plugins": [s(&evil)],
            "plugin_dir": s(&plugdir),
            "save_latents": s(&stolen_latents),
            "output": s(&stolen_png),
            "noise": s(&d.join("noise.safetensors")),
            "init_image": s(&d.join("init.png")),
        }
    });
    let png = d.join("evil.png");
    png_with_text(&png, &[("sdctl", &settings.to_string())]);

    let real = d.join("real.png");
    let o = sdctl(&[
        "generate",
        "--from-png",
        s(&png),
        "--model",
        s(&model),
        "--output",
        s(&real),
    ]);
    let err = ok_stderr(&o);
    assert!(real.is_file(), "no output: {err}");
    assert!(!stolen_latents.exists() && !stolen_png.exists(), "{err}");
    for key in [
        "plugins",
        "plugin_dir",
        "save_latents",
        "output",
        "noise",
        "init_image",
    ] {
        let want = format!(
            "warning: {}: ignoring `{key}` from the PNG's settings",
            png.display()
        );
        assert!(err.contains(&want), "no warning for {key}: {err}");
    }
    assert!(
        !err.contains("evil.so") && !err.contains("inside.so"),
        "a plugin named by the PNG was looked at: {err}"
    );
    // the PNG's parameters were used: its size
    let img = image::open(&real).unwrap();
    assert_eq!((img.width(), img.height()), (64, 64));

    // without --output the PNG's `output` is not used either
    let e = clean_failure(&sdctl(&[
        "generate",
        "--from-png",
        s(&png),
        "--model",
        s(&model),
    ]));
    assert!(e.contains("output: missing"), "{e}");
    assert!(!stolen_png.exists() && !stolen_latents.exists());

    // config show: the same settings, nothing of the dropped keys
    let show = ok(&sdctl(&["config", "show", "--from-png", s(&png)]));
    assert!(
        !show.contains("evil.so") && !show.contains("stolen") && !show.contains("plugdir"),
        "{show}"
    );
    assert!(show.contains("seed = 7 "), "{show}");
}

/// Outputs are renamed over their target, so a FIFO or device named as an output would be
/// replaced: every output flag refuses a path that exists and is not a regular file, before
/// any model loads, and the FIFO is still a FIFO.
#[test]
fn outputs_only_over_regular_files() {
    let d = scratch("hostile", "fifo");
    let model = model_dir("sd1");
    let m = s(&model);
    let out = d.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let fifo = d.join("fifo.png");
    mkfifo(&fifo);
    let link = d.join("link.png");
    std::os::unix::fs::symlink(&fifo, &link).unwrap();

    let e = fails(&gen_args(m, "x", &["--output", s(&fifo)]), &out);
    assert!(
        e.contains("--output") && e.contains(s(&fifo)) && e.contains("is a FIFO"),
        "{e}"
    );
    assert!(is_fifo(&fifo), "the FIFO was replaced");
    // a symlink is followed: its target is a FIFO
    let e = fails(&gen_args(m, "x", &["--output", s(&link)]), &out);
    assert!(e.contains("--output") && e.contains("is a FIFO"), "{e}");
    assert!(is_fifo(&fifo) && link.symlink_metadata().unwrap().is_symlink());
    // --save-latents
    let e = fails(
        &gen_args(
            m,
            "x",
            &[
                "--output",
                s(&out.join("o.png")),
                "--save-latents",
                s(&fifo),
            ],
        ),
        &out,
    );
    assert!(
        e.contains("--save-latents") && e.contains("is a FIFO"),
        "{e}"
    );
    // the second image of a batch
    let batch_fifo = d.join("b-1.png");
    mkfifo(&batch_fifo);
    let e = fails(
        &gen_args(m, "x", &["--batch", "2", "--output", s(&d.join("b.png"))]),
        &out,
    );
    assert!(e.contains(s(&batch_fifo)) && e.contains("is a FIFO"), "{e}");
    assert!(is_fifo(&batch_fifo) && !d.join("b-0.png").exists());
    // a folder is not replaced either
    let e = fails(&gen_args(m, "x", &["--output", s(&out)]), &out);
    assert!(e.contains("is a folder"), "{e}");
    // the tools' -o / --output
    let input = fixtures().join("inputs/control_a.png");
    let e = clean_failure(&sdctl(&["detect", "canny", s(&input), "-o", s(&fifo)]));
    assert!(e.contains("--output") && e.contains("is a FIFO"), "{e}");
    assert!(is_fifo(&fifo));
    // a character device: only checked through the settings (nothing here writes to /dev)
    let e = clean_failure(&sdctl(&["config", "show", "--output", "/dev/null"]));
    assert!(
        e.contains("--output") && e.contains("/dev/null") && e.contains("character device"),
        "{e}"
    );
}

/// `<lora:NAME:W>` names a file inside --lora-dir: no traversal, no absolute paths, no
/// symlinks out; no --lora-dir, no tags.
#[test]
fn prompt_lora_tags_stay_in_their_folder() {
    let d = scratch("hostile", "loratags");
    let model = model_dir("sd1");
    let m = s(&model);
    let out = d.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let loras = d.join("loras");
    std::fs::create_dir_all(&loras).unwrap();
    let lora = fixtures().join("loras/lora_a_peft.safetensors");
    let outside = d.join("outside.safetensors");
    std::fs::copy(&lora, &outside).unwrap();
    std::fs::copy(&lora, loras.join("good.safetensors")).unwrap();
    std::os::unix::fs::symlink(&outside, loras.join("link.safetensors")).unwrap();
    let o_path = out.join("o.png");
    let o = s(&o_path);
    let dir = s(&loras);
    let outside_stem = d.join("outside");
    let abs_tag = format!("x <lora:{}:0.5>", outside_stem.display());
    for (prompt, want) in [
        ("x <lora:../outside:0.5>", "not a path"),
        ("x <lora:/etc/passwd:1>", "not a path"),
        (abs_tag.as_str(), "not a path"),
        ("x <lora:sub/good:1>", "not a path"),
        ("x <lora:link:1>", "outside --lora-dir"),
    ] {
        let e = fails(
            &gen_args(m, prompt, &["--lora-dir", dir, "--output", o]),
            &out,
        );
        assert!(e.contains(want), "{prompt}: {e}");
    }
    // without --lora-dir a tag is an error saying so, even for a file in the working folder
    let o2 = sdctl_command()
        .current_dir(&loras)
        .args(gen_args(m, "x <lora:good.safetensors:1>", &["--output", o]))
        .output()
        .unwrap();
    let e = clean_failure(&o2);
    assert!(e.contains("<lora:good.safetensors>: set --lora-dir"), "{e}");
    assert!(!out.join("o.png").exists());
    // a name in the folder still works
    ok(&sdctl(&gen_args(
        m,
        "x <lora:good:0.5>",
        &["--lora-dir", dir, "--output", o],
    )));
    assert!(out.join("o.png").is_file());
}

/// Tag weights are finite and in --lora's range; `--lora F:notanumber` names the weight.
#[test]
fn lora_weights_are_checked_in_tags_and_flags() {
    let d = scratch("hostile", "loraweights");
    let model = model_dir("sd1");
    let m = s(&model);
    let out = d.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let loras = d.join("loras");
    std::fs::create_dir_all(&loras).unwrap();
    let lora = fixtures().join("loras/lora_a_peft.safetensors");
    std::fs::copy(&lora, loras.join("good.safetensors")).unwrap();
    let o_path = out.join("o.png");
    let o = s(&o_path);
    let dir = s(&loras);
    for (tag, got) in [
        ("<lora:good:inf>", "got inf"),
        ("<lora:good:NaN>", "got NaN"),
        ("<lora:good:100>", "got 100"),
        ("<lora:good:1:1e30>", "<lora:good:1:1e30>: weight must be a finite number in [-2, 2] (allow more with --allow-extreme-weights), got 1e30"),
    ] {
        let e = fails(
            &gen_args(m, &format!("x {tag}"), &["--lora-dir", dir, "--output", o]),
            &out,
        );
        assert!(
            e.contains("weight must be a finite number in [-2, 2] (allow more with --allow-extreme-weights)")
                && e.contains(got),
            "{tag}: {e}"
        );
    }
    // extreme weights may be allowed, but never non-finite ones
    let e = fails(
        &gen_args(
            m,
            "x <lora:good:inf>",
            &["--lora-dir", dir, "--allow-extreme-weights", "--output", o],
        ),
        &out,
    );
    assert!(
        e.contains("<lora:good:inf>: weight must be a finite number"),
        "{e}"
    );
    // --lora F:notanumber: a bad weight, not a missing file
    let arg = format!("{}:notanumber", lora.display());
    let e = fails(&gen_args(m, "x", &["--lora", &arg, "--output", o]), &out);
    assert!(
        e.contains("--lora") && e.contains("\"notanumber\" is not a number"),
        "{e}"
    );
    assert!(!e.contains("no such file"), "{e}");
    // --lora F:inf: refused as the tags are, with the value
    let arg = format!("{}:inf", lora.display());
    let e = fails(&gen_args(m, "x", &["--lora", &arg, "--output", o]), &out);
    assert!(
        e.contains("lora[0].weight: must be a finite number, got inf"),
        "{e}"
    );
}

/// `png-info` shows control characters from a PNG escaped, as `--json` does.
#[test]
fn png_info_escapes_terminal_controls() {
    let d = scratch("hostile", "pnginfo");
    let png = d.join("osc.png");
    let text = "a cat \x1b]0;pwned\x07 \u{9b}31m\nSteps: 1, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64";
    png_with_text(&png, &[("parameters", text)]);
    let shown = ok(&sdctl(&["png-info", s(&png)]));
    assert!(
        !shown.contains('\x1b') && !shown.contains('\x07') && !shown.contains('\u{9b}'),
        "raw control characters: {shown:?}"
    );
    assert!(
        shown.contains("a cat \\u{1b}]0;pwned\\u{7} \\u{9b}31m\nSteps: 1,"),
        "{shown:?}"
    );
    // ComfyUI node text too
    let comfy = d.join("comfy.png");
    png_with_text(
        &comfy,
        &[(
            "prompt",
            "{\"6\": {\"class_type\": \"CLIPTextEncode\", \"inputs\": {\"text\": \"x\\u001b[2J\"}}}",
        )],
    );
    let shown = ok(&sdctl(&["png-info", s(&comfy)]));
    assert!(
        !shown.contains('\x1b') && shown.contains("x\\u{1b}[2J"),
        "{shown:?}"
    );
}

/// A closed stdout ends a command quietly (exit 0 or by SIGPIPE), never with a panic.
#[test]
fn closed_stdout_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let d = scratch("hostile", "pipe");
    let png = d.join("p.png");
    png_with_text(
        &png,
        &[(
            "parameters",
            "x\nSteps: 1, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64",
        )],
    );
    for args in [
        vec!["preprocessors", "list"],
        vec!["png-info", s(&png)],
        vec!["config", "show"],
    ] {
        // the reading end is closed before sdctl starts: its first write meets a broken pipe
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let o = sdctl_command()
            .args(&args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(
            o.status.success() || o.status.signal() == Some(13),
            "{args:?}: {:?} {err}",
            o.status
        );
    }
}

/// A 1x1 PNG with `n` zTXt chunks (compressed Latin-1 text) holding `text`.
fn png_with_ztxt(path: &Path, keyword: &str, text: &str, n: usize) {
    let f = std::fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(f, 1, 1);
    enc.set_color(png::ColorType::Rgb);
    for _ in 0..n {
        enc.add_ztxt_chunk(keyword.to_string(), text.to_string())
            .unwrap();
    }
    let mut w = enc.write_header().unwrap();
    w.write_image_data(&[0, 0, 0]).unwrap();
    w.finish().unwrap();
}

/// A zTXt chunk that inflates to 16 MiB (from a few KiB), or chunks past 4 MiB of text in
/// all, are refused by `png-info` and `--from-png` readers, naming the PNG and the keyword.
#[test]
fn png_text_bombs_are_refused() {
    let d = scratch("hostile", "ztxt");
    let bomb = d.join("bomb.png");
    png_with_ztxt(&bomb, "parameters", &"0".repeat(16 << 20), 1);
    assert!(std::fs::metadata(&bomb).unwrap().len() < 200_000);
    let t = std::time::Instant::now();
    let err = clean_failure(&sdctl(&["png-info", s(&bomb)]));
    assert!(t.elapsed().as_secs() < 10, "took {:?}", t.elapsed());
    assert!(
        err.contains("bomb.png") && err.contains("`parameters` holds more than 1024 KiB"),
        "{err}"
    );
    // each chunk under the cap, together over it
    let many = d.join("many.png");
    png_with_ztxt(&many, "comment", &"0".repeat(1000 << 10), 5);
    let err = clean_failure(&sdctl(&["png-info", s(&many)]));
    assert!(
        err.contains("many.png") && err.contains("`comment` hold more than 4096 KiB"),
        "{err}"
    );
    // a small zTXt chunk still reads
    let small = d.join("small.png");
    let text = "a small cat\nSteps: 1, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64";
    png_with_ztxt(&small, "parameters", text, 1);
    assert!(ok(&sdctl(&["png-info", s(&small)])).contains("a small cat"));
}

/// A 5 MB prompt from a config file is refused before anything is loaded, naming the key.
#[test]
fn long_prompts_are_refused() {
    let d = scratch("hostile", "prompt");
    let model = model_dir("sd1");
    let cfg = d.join("long.toml");
    std::fs::write(
        &cfg,
        format!("prompt = \"{}\"\n", "a cat ".repeat((5 << 20) / 6)),
    )
    .unwrap();
    let out = d.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let out_png = out.join("x.png");
    let t = std::time::Instant::now();
    let err = fails(
        &[
            "generate",
            "--config",
            s(&cfg),
            "--model",
            s(&model),
            "--steps",
            "1",
            "--output",
            s(&out_png),
        ],
        &out_png,
    );
    assert!(t.elapsed().as_secs() < 10, "took {:?}", t.elapsed());
    assert!(
        err.contains("prompt") && err.contains("more than the 64 KiB a prompt may hold"),
        "{err}"
    );
}

/// A valid 1x1 PNG whose IHDR is patched to declare `w` x `h` (CRC fixed): a few bytes.
fn png_declaring(path: &Path, w: u32, h: u32) {
    let mut bytes = Vec::new();
    image::RgbImage::new(1, 1)
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
    // signature (8), IHDR length (4), "IHDR" (4), width, height, 5 more bytes, CRC
    bytes[16..20].copy_from_slice(&w.to_be_bytes());
    bytes[20..24].copy_from_slice(&h.to_be_bytes());
    let mut c = 0xffff_ffffu32;
    for &b in &bytes[12..29] {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    bytes[29..33].copy_from_slice(&(!c).to_be_bytes());
    std::fs::write(path, bytes).unwrap();
}

/// An image whose header declares 20000 x 20000 pixels is refused before decoding, by
/// `detect`, as an init image and as a ControlNet unit's mask, naming the file and its size.
#[test]
fn huge_images_are_refused_before_decoding() {
    let d = scratch("hostile", "huge");
    let huge = d.join("huge.png");
    png_declaring(&huge, 20000, 20000);
    let wide = d.join("wide.png");
    png_declaring(&wide, 20000, 2);
    let out = d.join("out");
    std::fs::create_dir_all(&out).unwrap();
    for img in [&huge, &wide] {
        let t = std::time::Instant::now();
        let map = out.join("map.png");
        let err = fails(&["detect", "canny", s(img), "-o", s(&map)], &map);
        assert!(t.elapsed().as_secs() < 10, "took {:?}", t.elapsed());
        let name = img.file_name().unwrap().to_str().unwrap();
        assert!(
            err.contains(name) && err.contains("pixels, more than"),
            "{err}"
        );
    }
    let model = model_dir("sd1");
    let out_png = out.join("x.png");
    let t = std::time::Instant::now();
    let err = fails(
        &gen_args(
            s(&model),
            "a cat",
            &["--init-image", s(&huge), "--output", s(&out_png)],
        ),
        &out_png,
    );
    assert!(t.elapsed().as_secs() < 10, "took {:?}", t.elapsed());
    assert!(
        err.contains("huge.png") && err.contains("20000x20000 pixels, more than"),
        "{err}"
    );
    // a unit mask is kept at its own size (each residual resizes it): the same limit
    let unit = format!(
        "model={},image={},mask={}",
        s(&fixtures().join("models/controlnet-sd1")),
        s(&fixtures().join("inputs/control_a.png")),
        s(&huge)
    );
    let err = fails(&one_step(&model, &out_png, &["--control", &unit]), &out_png);
    assert!(
        err.contains("huge.png") && err.contains("20000x20000 pixels, more than"),
        "{err}"
    );
}
