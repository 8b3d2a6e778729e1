//! The path a GPU takes, checked on the CPU. On any device but the CPU the model layers run
//! candle's generic ops (matmul, conv2d, softmax, group norm...) instead of sd-pipeline's CPU
//! kernels; `SDCTL_KERNELS=generic` makes the CPU take that path too. These tests run the tiny
//! fixtures through it (ControlNet, LoRA, SDXL) against diffusers, and through it in f16, the
//! dtype a GPU generates in: what `benches/gpu_check.sh` then checks on a real GPU.

use candle_core::{Device, Tensor};
use sd_tests::{assert_close, expected, fixtures, get, max_abs_diff, model_dir};

use crate::common::{base_args, one_step, rel_rms, s, scratch, sdctl_with, sdxl_micro_args};

const GENERIC: &[(&str, &str)] = &[("SDCTL_KERNELS", "generic")];

/// `sdctl generate` on the tiny SD1 model with one ControlNet unit (the fixture
/// `pipe_cn_sd1_one_unit`), in `dtype`, with the environment `env`: the final latents.
fn controlled(name: &str, dtype: &str, env: &[(&str, &str)]) -> Tensor {
    controlled_with(name, dtype, env, &[])
}

fn controlled_with(name: &str, dtype: &str, env: &[(&str, &str)], extra: &[&str]) -> Tensor {
    let dir = scratch("device", name);
    let (out, lat) = (dir.join("out.png"), dir.join("latents.safetensors"));
    let noise = fixtures().join("expected/pipe_cn_sd1_one_unit.safetensors");
    let control = format!(
        "model={},image={},weight=0.8",
        fixtures().join("models/controlnet-sd1").display(),
        fixtures().join("inputs/control_a.png").display()
    );
    let model = model_dir("sd1");
    let mut args = base_args(s(&model), s(&noise), s(&out));
    args.extend([
        "--control",
        &control,
        "--dtype",
        dtype,
        "--save-latents",
        s(&lat),
    ]);
    args.extend_from_slice(extra);
    let o = sdctl_with(&args, env);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.is_file());
    let got = candle_core::safetensors::load(&lat, &Device::Cpu).unwrap();
    get(&got, "latents")
        .to_dtype(candle_core::DType::F32)
        .unwrap()
}

fn want_controlled() -> Tensor {
    get(&expected("pipe_cn_sd1_one_unit.safetensors"), "latents").clone()
}

/// ControlNet on the generic ops: diffusers' latents within the tolerance the CPU kernels
/// meet (1e-3), and not bit-equal to the CPU kernels' (so the other path really ran: its
/// convolutions and attention sum in another order).
#[test]
fn controlnet_on_the_gpu_path_matches_diffusers() {
    let generic = controlled("cn-generic", "f32", GENERIC);
    assert_close("generic-path latents", &generic, &want_controlled(), 1e-3);
    let kernels = controlled("cn-kernels", "f32", &[]);
    assert!(
        max_abs_diff(&generic, &kernels) > 0.0,
        "SDCTL_KERNELS=generic gave the CPU kernels' latents bit for bit: it was not honoured"
    );
}

/// f16, as a GPU generates (weights and activations in f16, the VAE in f16 for SD 1.x): near
/// diffusers' f32 latents. f16 keeps 11 significant bits (2^-12 relative per rounding), 8 times
/// bf16's; the bf16 CPU path lands 0.47% RMS from diffusers through the same 4 steps at CFG 7.5
/// (cli.rs, bf16_on_the_cpu), so f16 should be well under that: measured 0.12%, bound 0.3%. The
/// lower bound (f32 is about 1e-7) shows f16 really ran.
#[test]
fn f16_on_the_gpu_path_stays_near_f32() {
    let half = controlled("cn-f16", "f16", GENERIC);
    let rel = rel_rms(&half, &want_controlled());
    assert!(
        rel > 1e-5 && rel < 3e-3,
        "f16 latents {rel} (relative RMS) from diffusers' f32"
    );
}

/// `--lowvram`: the text encoders and the VAE on the CPU in f32. In f32 on the CPU that is
/// where they were anyway: the latents are bit-equal to a plain run (the hand-overs change
/// nothing). In f16 (the UNet and ControlNet in f16 on the generic path, as on a GPU) the text
/// conditioning is now computed in f32 and rounded once: not the plain f16 run's latents, and
/// as near diffusers' f32 as f16 gets (the f16 bound above).
#[test]
fn lowvram_runs_the_text_encoders_and_the_vae_in_f32() {
    let plain = controlled("lv-plain", "f32", &[]);
    let low = controlled_with("lv-f32", "f32", &[], &["--lowvram"]);
    assert_eq!(max_abs_diff(&plain, &low), 0.0);
    let half = controlled("lv-f16-plain", "f16", GENERIC);
    let half_low = controlled_with("lv-f16", "f16", GENERIC, &["--lowvram"]);
    assert!(
        max_abs_diff(&half, &half_low) > 0.0,
        "--lowvram changed nothing in f16"
    );
    let rel = rel_rms(&half_low, &want_controlled());
    assert!(
        rel > 1e-5 && rel < 3e-3,
        "f16 --lowvram latents {rel} from diffusers' f32"
    );
}

/// LoRAs (a PEFT and a kohya file) and SDXL's UNet, text encoders and
/// micro-conditioning on the generic ops: diffusers' latents within 1e-3.
#[test]
fn lora_and_sdxl_on_the_gpu_path_match_diffusers() {
    let dir = scratch("device", "lora");
    let exp = expected("lora_sd1.safetensors");
    let noise = dir.join("noise.safetensors");
    candle_core::safetensors::save(
        &[("noise", get(&exp, "ab_noise").clone())]
            .into_iter()
            .collect(),
        &noise,
    )
    .unwrap();
    let loras = fixtures().join("loras");
    let peft = format!("{}:0.7", loras.join("lora_a_peft.safetensors").display());
    let kohya = format!("{}:0.5", loras.join("lora_b_kohya.safetensors").display());
    let lat = dir.join("lora.safetensors");
    let model = model_dir("sd1");
    let png = dir.join("lora.png");
    let mut args = base_args(s(&model), s(&noise), s(&png));
    args.extend(["--lora", &peft, "--lora", &kohya, "--save-latents", s(&lat)]);
    let o = sdctl_with(&args, GENERIC);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = candle_core::safetensors::load(&lat, &Device::Cpu).unwrap();
    assert_close(
        "generic-path LoRA latents",
        get(&got, "latents"),
        get(&exp, "ab_latents"),
        1e-3,
    );

    let name = "sdxl_txt2img_micro";
    let lat = dir.join("sdxl.safetensors");
    let (model, png) = (model_dir("sdxl"), dir.join("sdxl.png"));
    let noise = fixtures().join(format!("expected/{name}.safetensors"));
    let o = sdctl_with(
        &sdxl_micro_args(s(&model), s(&noise), s(&png), s(&lat)),
        GENERIC,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = candle_core::safetensors::load(&lat, &Device::Cpu).unwrap();
    assert_close(
        "generic-path SDXL latents",
        get(&got, "latents"),
        get(&expected(&format!("{name}.safetensors")), "latents"),
        1e-3,
    );
}

/// `--device` names: `cuda:N` is accepted by the flag and the config key; a bad name is refused
/// naming it; on a build without CUDA (or a machine without a GPU) `cuda:1` gets a clear error
/// before anything is written, never a panic.
#[test]
fn device_names_are_checked_and_a_missing_gpu_is_a_clear_error() {
    let dir = scratch("device", "names");
    let out = dir.join("o.png");
    let model = model_dir("sd1");
    let run = |device: &str| sdctl_with(&one_step(&model, &out, &["--device", device]), &[]);
    for bad in ["gpu", "cuda:", "cuda:x", "cuda1"] {
        let o = run(bad);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && !out.exists(), "{bad}: {e}");
        assert!(
            e.contains(&format!("{bad:?}")) && e.contains("cuda:N"),
            "{bad}: {e}"
        );
        assert!(!e.contains("panicked"), "{e}");
    }
    let o = run("cuda:1");
    let e = String::from_utf8_lossy(&o.stderr);
    if o.status.success() {
        // a CUDA build on a machine with two GPUs: nothing to check here
        return;
    }
    assert!(!out.exists(), "{e}");
    assert!(e.contains("--device cuda:1") && e.contains("CUDA"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    // the config key takes the same names
    let cfg = dir.join("c.toml");
    std::fs::write(&cfg, "device = \"cuda:x\"\n").unwrap();
    let o = sdctl_with(
        &[
            "generate",
            "--config",
            s(&cfg),
            "--model",
            s(&model_dir("sd1")),
            "--prompt",
            "x",
            "--output",
            s(&out),
        ],
        &[],
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && !out.exists(), "{e}");
    assert!(e.contains("device") && e.contains("\"cuda:x\""), "{e}");
}
