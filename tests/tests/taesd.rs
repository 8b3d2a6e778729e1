//! TAESD (diffusers `AutoencoderTiny`) against diffusers 0.42.1 (fixtures/make_taesd_fixtures.py):
//! the diffusers folder, madebyollin's single files under taesd.py's numbering, the latent
//! scaling convention, and the errors for files that are not TAESD.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sd_pipeline::model::taesd::{AutoencoderTiny, TinyConfig};
use sd_tests::{assert_close, expected, get, max_abs_diff, model_dir};

const TOL: f32 = 1e-4;

fn folder() -> PathBuf {
    model_dir("taesd-tiny")
}

fn single(name: &str) -> PathBuf {
    model_dir("taesd-tiny-single").join(name)
}

fn load(path: &Path) -> AutoencoderTiny {
    AutoencoderTiny::load(path, &Device::Cpu, DType::F32)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn load_err(path: &Path) -> String {
    match AutoencoderTiny::load(path, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

/// The fixture's image: `image_u8 / 128 - 1`, the same exact arithmetic as the script.
fn image(exp: &HashMap<String, Tensor>) -> Tensor {
    let u8s = get(exp, "image_u8");
    assert_eq!(u8s.dtype(), DType::U8);
    ((u8s.to_dtype(DType::F32).unwrap() / 128.0).unwrap() - 1.0).unwrap()
}

/// A fresh scratch folder for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("taesd-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn folder_decodes_like_diffusers() {
    let exp = expected("taesd.safetensors");
    let vae = load(&folder());
    let got = vae.decode(get(&exp, "latents")).unwrap();
    assert_eq!(got.dims(), &[1, 3, 64, 64]);
    assert_close("taesd decode", &got, get(&exp, "decoded"), TOL);
}

#[test]
fn folder_encodes_like_diffusers() {
    let exp = expected("taesd.safetensors");
    let vae = load(&folder());
    let got = vae.encode(&image(&exp)).unwrap();
    assert_eq!(got.dims(), &[1, 4, 8, 8]);
    assert_close("taesd encode", &got, get(&exp, "encoded"), TOL);
}

#[test]
fn config_is_read_from_the_folder() {
    let c = load(&folder()).config().clone();
    assert_eq!(c.encoder_block_out_channels, vec![6; 4]);
    assert_eq!(c.num_encoder_blocks, vec![1, 2, 1, 1]);
    assert_eq!(c.num_decoder_blocks, vec![1, 2, 1, 1]);
    assert_eq!((c.latent_channels, c.upsampling_scaling_factor), (4, 2));
    assert_eq!((c.scaling_factor, c.shift_factor), (1.0, 0.0));
    assert_eq!((c.latent_magnitude, c.latent_shift), (3.0, 0.5));
    // diffusers' defaults are madebyollin's TAESD
    let d = TinyConfig::default();
    assert_eq!(d.num_encoder_blocks, vec![1, 3, 3, 3]);
    assert_eq!(d.num_decoder_blocks, vec![3, 3, 3, 1]);
    assert_eq!(d.decoder_block_out_channels, vec![64; 4]);
}

#[test]
fn single_decoder_file_decodes_the_same_and_cannot_encode() {
    let exp = expected("taesd.safetensors");
    let path = single("taesd_decoder.safetensors");
    let vae = load(&path);
    assert!(vae.decoder().is_some() && vae.encoder().is_none());
    // the structure was read from the shapes: the uneven block counts of the fixture
    assert_eq!(vae.config().num_decoder_blocks, vec![1, 2, 1, 1]);
    assert_eq!(vae.config().decoder_block_out_channels, vec![6; 4]);
    let got = vae.decode(get(&exp, "latents")).unwrap();
    assert_close("taesd_decoder decode", &got, get(&exp, "decoded"), TOL);
    let folder_out = load(&folder()).decode(get(&exp, "latents")).unwrap();
    assert_eq!(
        max_abs_diff(&got, &folder_out),
        0.0,
        "same weights, same numbers"
    );

    let err = vae.encode(&image(&exp)).unwrap_err().to_string();
    println!("{err}");
    assert!(
        err.contains("decoder-only") && err.contains("taesd_decoder.safetensors"),
        "{err}"
    );
}

#[test]
fn single_encoder_file_encodes_the_same() {
    let exp = expected("taesd.safetensors");
    let vae = load(&single("taesd_encoder.safetensors"));
    assert!(vae.encoder().is_some() && vae.decoder().is_none());
    assert_eq!(vae.config().num_encoder_blocks, vec![1, 2, 1, 1]);
    let got = vae.encode(&image(&exp)).unwrap();
    assert_close("taesd_encoder encode", &got, get(&exp, "encoded"), TOL);
    let err = vae.decode(get(&exp, "latents")).unwrap_err().to_string();
    assert!(
        err.contains("without a decoder") && err.contains("taesd_encoder.safetensors"),
        "{err}"
    );
}

#[test]
fn both_single_files_make_a_whole_model() {
    let exp = expected("taesd.safetensors");
    let (enc, dec) = (
        single("taesd_encoder.safetensors"),
        single("taesd_decoder.safetensors"),
    );
    let vae =
        AutoencoderTiny::load_files(Some(&enc), Some(&dec), &Device::Cpu, DType::F32).unwrap();
    let got = vae.decode(get(&exp, "latents")).unwrap();
    assert_close("load_files decode", &got, get(&exp, "decoded"), TOL);
    let got = vae.encode(&image(&exp)).unwrap();
    assert_close("load_files encode", &got, get(&exp, "encoded"), TOL);
    // swapped files are refused, naming the file
    let err = AutoencoderTiny::load_files(Some(&dec), None, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("taesd_decoder.safetensors") && err.contains("given as the TAESD encoder"),
        "{err}"
    );
}

/// `decode` takes the UNet's latents: with a `scaling_factor` / `shift_factor` it unscales
/// them as the diffusers pipelines do (`latents / scaling_factor + shift_factor`) before the
/// decoder; `scale_latents(encode(x))` is the pipelines' `(z - shift) * scaling`.
#[test]
fn decode_takes_scaled_latents() {
    let exp = expected("taesd.safetensors");
    let dir = scratch("scaled");
    let cfg = std::fs::read_to_string(folder().join("config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    cfg["scaling_factor"] = 2.0.into();
    cfg["shift_factor"] = 0.25.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let weights = "diffusion_pytorch_model.safetensors";
    std::fs::copy(folder().join(weights), dir.join(weights)).unwrap();
    let vae = load(&dir);
    let raw = get(&exp, "latents");
    let scaled = ((raw - 0.25).unwrap() * 2.0).unwrap();
    assert_eq!(max_abs_diff(&vae.scale_latents(raw).unwrap(), &scaled), 0.0);
    let got = vae.decode(&scaled).unwrap();
    // (x - 0.25) * 2 / 2 + 0.25 is x within an ulp or two
    assert_close("scaled decode", &got, get(&exp, "decoded"), TOL);
    // encode stays diffusers' raw latents
    let got = vae.encode(&image(&exp)).unwrap();
    assert_close("scaled config encode", &got, get(&exp, "encoded"), TOL);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn wrong_latent_channels_are_an_error() {
    let vae = load(&folder());
    let z = Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let err = vae.decode(&z).unwrap_err().to_string();
    assert!(err.contains("[1, 3, 8, 8]") && err.contains("4"), "{err}");
}

#[test]
fn folder_without_weights_is_an_error() {
    let dir = scratch("no-weights");
    std::fs::copy(folder().join("config.json"), dir.join("config.json")).unwrap();
    let err = load_err(&dir);
    println!("{err}");
    assert!(
        err.contains(&dir.display().to_string()) && err.contains("no weights"),
        "{err}"
    );
    // and without config.json
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let err = load_err(&dir);
    println!("{err}");
    assert!(err.contains("config.json not found"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_file_that_is_no_taesd_is_an_error_naming_it() {
    let path = model_dir("sd1").join("vae/diffusion_pytorch_model.safetensors");
    let err = load_err(&path);
    println!("{err}");
    assert!(
        err.contains(&path.display().to_string()) && err.contains("not a TAESD file"),
        "{err}"
    );
    // the AutoencoderKL folder itself: its config names another class
    let dir = model_dir("sd1").join("vae");
    let err = load_err(&dir);
    println!("{err}");
    assert!(
        err.contains("config.json") && err.contains("_class_name") && err.contains("AutoencoderKL"),
        "{err}"
    );
}

#[test]
fn missing_and_misshapen_tensors_name_file_and_key() {
    let dir = scratch("broken");
    let src = single("taesd_decoder.safetensors");
    let tensors = candle_core::safetensors::load(&src, &Device::Cpu).unwrap();

    // the single file's structure is read from its keys, so a tensor missing inside a block
    let mut missing = tensors.clone();
    missing.remove("6.conv.2.weight").unwrap();
    let path = dir.join("taesd_decoder_missing.safetensors");
    candle_core::safetensors::save(&missing, &path).unwrap();
    let err = load_err(&path);
    println!("{err}");
    assert!(
        err.contains(&path.display().to_string()) && err.contains("6.conv.2.weight"),
        "{err}"
    );

    let mut bad = tensors.clone();
    bad.insert(
        "6.conv.2.bias".into(),
        Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap(),
    );
    let path = dir.join("taesd_decoder_bad.safetensors");
    candle_core::safetensors::save(&bad, &path).unwrap();
    let err = load_err(&path);
    println!("{err}");
    assert!(
        err.contains(&path.display().to_string())
            && err.contains("6.conv.2.bias")
            && err.contains("[5]"),
        "{err}"
    );

    // a layer after the output conv (taesd.py's decoder ends at 14 here)
    let mut extra = tensors.clone();
    extra.insert(
        "16.weight".into(),
        Tensor::zeros((6, 6, 3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    let path = dir.join("taesd_decoder_extra.safetensors");
    candle_core::safetensors::save(&extra, &path).unwrap();
    let err = load_err(&path);
    println!("{err}");
    assert!(
        err.contains(&path.display().to_string())
            && err.contains("layer `16` follows the output conv `14`"),
        "{err}"
    );

    // a folder whose config promises more blocks than its weights hold
    let f = dir.join("folder");
    std::fs::create_dir_all(&f).unwrap();
    let cfg = std::fs::read_to_string(folder().join("config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    cfg["num_decoder_blocks"] = serde_json::json!([1, 3, 1, 1]);
    std::fs::write(f.join("config.json"), cfg.to_string()).unwrap();
    let weights = f.join("diffusion_pytorch_model.safetensors");
    std::fs::copy(
        folder().join("diffusion_pytorch_model.safetensors"),
        &weights,
    )
    .unwrap();
    let err = load_err(&f);
    println!("{err}");
    assert!(
        err.contains(&weights.display().to_string()) && err.contains("decoder.layers."),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unsupported_config_values_are_named() {
    let dir = scratch("config");
    let weights = "diffusion_pytorch_model.safetensors";
    std::fs::copy(folder().join(weights), dir.join(weights)).unwrap();
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(folder().join("config.json")).unwrap())
            .unwrap();
    for (key, value, says) in [
        ("act_fn", serde_json::json!("silu"), "\"silu\""),
        ("upsample_fn", serde_json::json!("bilinear"), "\"bilinear\""),
        ("num_decoder_blocks", serde_json::json!([1, 1]), "entries"),
        (
            "encoder_block_out_channels",
            serde_json::json!([6, 8, 8, 8]),
            "widths",
        ),
        ("scaling_factor", serde_json::json!(0.0), "0"),
    ] {
        let mut cfg = base.clone();
        cfg[key] = value;
        let path = dir.join("config.json");
        std::fs::write(&path, cfg.to_string()).unwrap();
        let err = load_err(&dir);
        println!("{err}");
        assert!(
            err.contains(&path.display().to_string())
                && err.contains(&format!("`{key}`"))
                && err.contains(says),
            "{key}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
