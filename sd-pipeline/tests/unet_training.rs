//! The UNet is differentiable end to end and takes per-sample timesteps (ControlNet training
//! depends on both). Tiny random model, no fixtures needed.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use sd_pipeline::model::config::{UNetConfig, UNetConfigFile};
use sd_pipeline::model::unet::UNet2DConditionModel;

fn tiny(linear: bool) -> UNetConfig {
    tiny_with(["CrossAttnDownBlock2D", "DownBlock2D"], linear)
}

/// Two levels with these down blocks (the up blocks mirror them).
fn tiny_with(down: [&str; 2], linear: bool) -> UNetConfig {
    let up: Vec<String> = down.iter().rev().map(|d| d.replace("Down", "Up")).collect();
    let raw: UNetConfigFile = serde_json::from_value(serde_json::json!({
        "block_out_channels": [16, 32],
        "down_block_types": down,
        "up_block_types": up,
        "layers_per_block": 1,
        "attention_head_dim": 2,
        "cross_attention_dim": 8,
        "norm_num_groups": 8,
        "use_linear_projection": linear,
    }))
    .unwrap();
    UNetConfig::from_raw(&raw, Path::new("tiny")).unwrap()
}

fn build(cfg: &UNetConfig) -> (VarMap, UNet2DConditionModel) {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let unet = UNet2DConditionModel::new(cfg, vb).unwrap();
    // Norm weights start at 1 and biases at 0 in a VarMap; perturb every variable so that no
    // parameter's gradient can vanish by symmetry.
    for var in vm.all_vars() {
        let noise = Tensor::randn(0f32, 0.2, var.shape(), &dev).unwrap();
        var.set(&(var.as_tensor() + noise).unwrap()).unwrap();
    }
    (vm, unet)
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

#[test]
fn every_parameter_receives_a_gradient() {
    for linear in [false, true] {
        let (vm, unet) = build(&tiny(linear));
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &dev).unwrap();
        let ctx = Tensor::randn(0f32, 1.0, (2, 5, 8), &dev).unwrap();
        let t = Tensor::new(&[10f32, 700.0], &dev).unwrap();
        let out = unet.forward(&x, &t, &ctx, None).unwrap();
        let loss = out.sqr().unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        let vars: Vec<(String, Var)> = vm
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert!(vars.len() > 50);
        let missing: Vec<&String> = vars
            .iter()
            .filter(|(_, v)| match grads.get(v.as_tensor()) {
                None => true,
                Some(g) => {
                    g.abs()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                        == 0.0
                }
            })
            .map(|(k, _)| k)
            .collect();
        assert!(
            missing.is_empty(),
            "no gradient for (linear={linear}): {missing:?}"
        );
    }
}

#[test]
fn per_sample_timesteps_equal_separate_calls() {
    let (_vm, unet) = build(&tiny(false));
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &dev).unwrap();
    let ctx = Tensor::randn(0f32, 1.0, (2, 5, 8), &dev).unwrap();
    let both = unet
        .forward(&x, &Tensor::new(&[10f32, 700.0], &dev).unwrap(), &ctx, None)
        .unwrap();
    for (i, t) in [10f32, 700.0].into_iter().enumerate() {
        let one = unet
            .forward(
                &x.narrow(0, i, 1).unwrap(),
                &Tensor::new(&[t], &dev).unwrap(),
                &ctx.narrow(0, i, 1).unwrap(),
                None,
            )
            .unwrap();
        let d = max_diff(&both.narrow(0, i, 1).unwrap(), &one);
        assert!(d < 1e-5, "sample {i}: {d}");
    }
    // And the two timesteps really give different outputs.
    let other = unet
        .forward(
            &x.narrow(0, 0, 1).unwrap(),
            &Tensor::new(&[700f32], &dev).unwrap(),
            &ctx.narrow(0, 0, 1).unwrap(),
            None,
        )
        .unwrap();
    let d = max_diff(&both.narrow(0, 0, 1).unwrap(), &other);
    assert!(d > 1e-3);
}

#[test]
fn residuals_are_added_to_skips_and_mid() {
    let (_vm, unet) = build(&tiny(false));
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &dev).unwrap();
    let ctx = Tensor::randn(0f32, 1.0, (1, 5, 8), &dev).unwrap();
    let t = Tensor::new(&[300f32], &dev).unwrap();
    // Zero residuals change nothing; the count must match the skip connections.
    assert_eq!(unet.num_skips(), 4); // conv_in + 1 resnet + downsample + 1 resnet
    let shapes = [(16, 8, 8), (16, 8, 8), (16, 4, 4), (32, 4, 4)];
    let down: Vec<Tensor> = shapes
        .iter()
        .map(|&(c, h, w)| Tensor::zeros((1, c, h, w), DType::F32, &dev).unwrap())
        .collect();
    let mid = Tensor::zeros((1, 32, 4, 4), DType::F32, &dev).unwrap();
    let r = sd_plugins_api::Residuals {
        down: down.clone(),
        mid: mid.clone(),
    };
    let plain = unet.forward(&x, &t, &ctx, None).unwrap();
    let zero = unet.forward(&x, &t, &ctx, Some(&r)).unwrap();
    let d = max_diff(&plain, &zero);
    assert_eq!(d, 0.0);
    let r2 = sd_plugins_api::Residuals {
        down,
        mid: (mid + 1.0).unwrap(),
    };
    let moved = unet.forward(&x, &t, &ctx, Some(&r2)).unwrap();
    let d = max_diff(&plain, &moved);
    assert!(d > 1e-3);
    let bad = sd_plugins_api::Residuals {
        down: vec![],
        mid: r2.mid.clone(),
    };
    assert!(unet.forward(&x, &t, &ctx, Some(&bad)).is_err());
}

#[test]
fn copies_of_one_latent_give_what_separate_calls_give() {
    // Classifier-free guidance runs one latent per prompt: items that are copies share the
    // work up to the first cross-attention. Each item must still get what a batch-1 call gives,
    // wherever that first cross-attention is (first level, second level, only the mid block).
    let dev = Device::Cpu;
    for down in [
        ["CrossAttnDownBlock2D", "DownBlock2D"],
        ["DownBlock2D", "CrossAttnDownBlock2D"],
        ["DownBlock2D", "DownBlock2D"],
    ] {
        for linear in [false, true] {
            let (_vm, unet) = build(&tiny_with(down, linear));
            let (x1, x2) = (
                Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &dev).unwrap(),
                Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &dev).unwrap(),
            );
            // [x1, x2, x1]: the third item is a copy of the first
            let x = Tensor::cat(&[&x1, &x2, &x1], 0).unwrap();
            let ctx = Tensor::randn(0f32, 1.0, (3, 5, 8), &dev).unwrap();
            let t = Tensor::new(&[400f32, 400.0, 400.0], &dev).unwrap();
            let all = unet.forward(&x, &t, &ctx, None).unwrap();
            for i in 0..3 {
                let one = unet
                    .forward(
                        &x.narrow(0, i, 1).unwrap(),
                        &t.narrow(0, i, 1).unwrap(),
                        &ctx.narrow(0, i, 1).unwrap(),
                        None,
                    )
                    .unwrap();
                let d = max_diff(&all.narrow(0, i, 1).unwrap(), &one);
                assert!(d < 1e-5, "{down:?} linear={linear} item {i}: {d}");
            }
            // the copies' different prompts still give different outputs
            let d = max_diff(&all.narrow(0, 0, 1).unwrap(), &all.narrow(0, 2, 1).unwrap());
            assert!(d > 1e-3, "{down:?}: {d}");
        }
    }
}

#[test]
fn gradients_flow_through_shared_items() {
    // Training on a batch whose items are copies (computed once up to the first
    // cross-attention) gives the gradients of the items run one by one: the mean squared
    // output over the batch is the mean of the two batch-1 losses.
    let (vm, unet) = build(&tiny(false));
    let dev = Device::Cpu;
    let x1 = Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &dev).unwrap();
    let ctx = Tensor::randn(0f32, 1.0, (2, 5, 8), &dev).unwrap();
    let loss = |x: &Tensor, ctx: &Tensor| {
        let t = Tensor::full(300f32, x.dim(0).unwrap(), &dev).unwrap();
        let out = unet.forward(x, &t, ctx, None).unwrap();
        out.sqr().unwrap().mean_all().unwrap()
    };
    let shared = loss(&Tensor::cat(&[&x1, &x1], 0).unwrap(), &ctx)
        .backward()
        .unwrap();
    let halves = ((loss(&x1, &ctx.narrow(0, 0, 1).unwrap())
        + loss(&x1, &ctx.narrow(0, 1, 1).unwrap()))
    .unwrap()
        * 0.5)
        .unwrap()
        .backward()
        .unwrap();
    let mut checked = 0;
    for var in vm.all_vars() {
        let (a, b) = (
            shared.get(var.as_tensor()).unwrap(),
            halves.get(var.as_tensor()).unwrap(),
        );
        let scale = max_abs(b);
        let d = max_diff(a, b);
        // f32 sums in another order: a few ulps of the largest gradient
        assert!(
            d <= 1e-5 * scale.max(1e-3),
            "{:?}: {d} (scale {scale})",
            var.shape()
        );
        checked += 1;
    }
    assert!(checked > 50);
}
