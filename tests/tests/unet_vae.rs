//! One UNet forward and VAE encode/decode against diffusers. Tolerance 1e-4 max abs in f32:
//! the same weights and inputs, only the order of floating-point sums differs.

use candle_core::{DType, Device};
use sd_pipeline::StableDiffusion;
use sd_tests::{assert_close, expected, get, model_dir};

fn unet_case(model: &str) {
    let sd = StableDiffusion::load(&model_dir(model), &Device::Cpu, DType::F32, &[]).unwrap();
    let exp = expected(&format!("unet_{model}.safetensors"));
    let out = sd
        .unet
        .forward(
            get(&exp, "sample"),
            get(&exp, "timestep"),
            get(&exp, "encoder_hidden_states"),
            None,
        )
        .unwrap();
    assert_close(&format!("unet {model}"), &out, get(&exp, "out"), 1e-4);
}

#[test]
fn unet_sd1_fp16_file_conv_projection() {
    unet_case("sd1");
}

#[test]
fn unet_sd2_linear_projection_per_block_heads() {
    unet_case("sd2");
}

#[test]
fn unet_sd1_inpaint_nine_channels() {
    unet_case("sd1-inpaint");
}

#[test]
fn vae_encode_mean_and_decode() {
    let sd = StableDiffusion::load(&model_dir("sd1"), &Device::Cpu, DType::F32, &[]).unwrap();
    let exp = expected("vae_sd1.safetensors");
    let mean = sd.vae.encode_mean(get(&exp, "image")).unwrap();
    assert_close("vae encode mean", &mean, get(&exp, "mean"), 1e-4);
    let dec = sd.vae.decode(get(&exp, "latents")).unwrap();
    assert_close("vae decode", &dec, get(&exp, "decoded"), 1e-4);
}
