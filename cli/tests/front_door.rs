//! The library's front door and `sdctl generate` give the same file for the same settings:
//! the README's example program (examples/controlnet_lora.rs, compiled in here as it is) and
//! the CLI, on the tiny fixture models, write byte-identical PNGs (pixels and infotext).

#[allow(dead_code)]
#[path = "../../examples/controlnet_lora.rs"]
mod example;

use std::path::Path;

use crate::common::{scratch, sdctl_command};

#[test]
fn the_example_program_and_sdctl_make_the_same_png() {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let dir = scratch("front-door", "same-png");
    let cache = dir.join("cache");
    // both doors hash the models into the same cache folder
    std::env::set_var("SDCTL_CACHE_DIR", &cache);
    let (model, cn, image, lora) = (
        fx.join("models/sd1"),
        fx.join("models/controlnet-sd1"),
        fx.join("inputs/control_a.png"),
        fx.join("loras/lora_b_kohya.safetensors"),
    );
    let lib_png = dir.join("lib.png");
    let made = example::generate(&model, &cn, &image, &lora, &lib_png).unwrap();
    assert_eq!(made.seed, Some(42));
    assert!(made
        .parameters
        .contains("Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5"));

    let cli_png = dir.join("cli.png");
    let out = sdctl_command()
        .env("SDCTL_CACHE_DIR", &cache)
        .args(["generate", "--model"])
        .arg(&model)
        .args([
            "--prompt",
            "a dancer on a stage, best quality",
            "--negative-prompt",
            "lowres, blurry",
            "--seed",
            "42",
            "--control",
        ])
        .arg(format!(
            "model={},image={},weight=0.8",
            cn.display(),
            image.display()
        ))
        .arg("--lora")
        .arg(format!("{}:0.7", lora.display()))
        .arg("--output")
        .arg(&cli_png)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (a, b) = (
        std::fs::read(&lib_png).unwrap(),
        std::fs::read(&cli_png).unwrap(),
    );
    assert!(a == b, "the two doors wrote different files");
    std::fs::remove_dir_all(&dir).unwrap();
}
