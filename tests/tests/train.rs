//! ControlNet and T2I-Adapter training: one step's loss and every trained gradient against
//! PyTorch (diffusers models, fixtures/make_training_fixtures.py), for epsilon and v targets.

use std::collections::HashMap;

use candle_core::{DType, Device, Var};
use candle_nn::VarBuilder;
use sd_controlnet::config::ControlNetConfig;
use sd_controlnet::{ControlNetModel, T2IAdapter};
use sd_pipeline::samplers::{alphas_cumprod, SchedulerConfig};
use sd_pipeline::StableDiffusion;
use sd_tests::{expected, fixtures, get, max_abs, max_abs_diff, model_dir};
use sd_train::{training_loss, Network};

/// The weights of a diffusers folder as variables, and the same tensors by name.
fn vars_of(dir: &std::path::Path) -> (HashMap<String, Var>, HashMap<String, candle_core::Tensor>) {
    let weights = candle_core::safetensors::load(
        dir.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut vars: HashMap<String, Var> = HashMap::new();
    let mut tensors = HashMap::new();
    for (k, t) in weights {
        let v = Var::from_tensor(&t.to_dtype(DType::F32).unwrap()).unwrap();
        tensors.insert(k.clone(), v.as_tensor().clone());
        vars.insert(k, v);
    }
    (vars, tensors)
}

/// [`check_grads_with`] without and with gradient checkpointing; the two runs' gradients must
/// also agree with each other (the same blocks, run again in the backward pass).
fn check_grads(file: &str, net: &Network, vars: &HashMap<String, Var>) {
    let plain = check_grads_with(file, net, vars, false);
    let ckpt = check_grads_with(file, net, vars, true);
    let mut worst = 0f32;
    for (k, g) in &plain {
        let rel = max_abs_diff(g, &ckpt[k]) / max_abs(g).max(1e-12);
        worst = worst.max(rel);
        // the same f32 operations but the weight gradients summed in another order
        assert!(
            rel < 1e-5,
            "checkpointing changes {k}: relative difference {rel}"
        );
    }
    eprintln!("{file}: checkpointed gradients within {worst:e} of the plain ones");
}

/// One step's loss and every gradient of `net` (over `vars`, named as PyTorch's parameters)
/// against `file`'s, for epsilon and v targets; returns the gradients (case.name).
fn check_grads_with(
    file: &str,
    net: &Network,
    vars: &HashMap<String, Var>,
    checkpointing: bool,
) -> HashMap<String, candle_core::Tensor> {
    sd_pipeline::model::checkpoint::set_enabled(checkpointing);
    let mut all = HashMap::new();
    let dev = Device::Cpu;
    let exp = expected(file);
    let sd = StableDiffusion::load(&model_dir("sd1"), &dev, DType::F32, &[]).unwrap();
    let sched = SchedulerConfig::from_json_str(
        r#"{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}"#,
    )
    .unwrap();
    let alphas = alphas_cumprod(&sched);
    for (case, v) in [("eps", false), ("v", true)] {
        let loss = training_loss(
            net,
            &sd.unet,
            get(&exp, "latents"),
            get(&exp, "noise"),
            &[17, 803],
            get(&exp, "ehs"),
            get(&exp, "cond"),
            &alphas,
            v,
        )
        .unwrap();
        let want = get(&exp, &format!("{case}.loss")).to_vec1::<f32>().unwrap()[0];
        let got = loss.to_scalar::<f32>().unwrap();
        assert!(
            ((got - want) / want).abs() < 1e-4,
            "{case} loss {got} vs {want}"
        );
        if checkpointing {
            // the blocks were checkpointed: a plain backward has nowhere to put their weights'
            // gradients and says so
            let e = loss.backward().unwrap_err().to_string();
            assert!(e.contains("checkpoint"), "{e}");
        }
        let grads = sd_pipeline::model::checkpoint::backward(&loss).unwrap();
        let mut checked = 0;
        let mut worst = 0f32;
        for (n, var) in vars {
            let want = get(&exp, &format!("{case}.grad.{n}"));
            let got = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {n}"));
            let scale = max_abs(want).max(1e-12);
            let rel = max_abs_diff(got, want) / scale;
            worst = worst.max(rel);
            assert!(rel < 1e-4, "{case} {n}: relative difference {rel}");
            checked += 1;
            all.insert(format!("{case}.{n}"), got.clone());
        }
        assert_eq!(checked, vars.len());
        eprintln!("{file} {case}: {checked} gradients, worst relative difference {worst:e}");
        // the gradients are not all zero (the check can fail)
        assert!(vars
            .values()
            .any(|v| max_abs(grads.get(v.as_tensor()).unwrap()) > 1e-6));
    }
    sd_pipeline::model::checkpoint::set_enabled(false);
    all
}

#[test]
fn loss_and_controlnet_gradients_match_pytorch() {
    let dir = fixtures().join("models/controlnet-sd1");
    let cfg = ControlNetConfig::from_file(&dir.join("config.json")).unwrap();
    let (vars, tensors) = vars_of(&dir);
    let cn = Network::ControlNet {
        model: ControlNetModel::new(
            &cfg,
            VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
        )
        .unwrap(),
        config: cfg,
        only_mid: false,
    };
    check_grads("train_grads.safetensors", &cn, &vars);
}

#[test]
fn loss_and_t2i_adapter_gradients_match_pytorch() {
    // relative tolerance 1e-4 as the ControlNet's: f32 sums in another order, over a UNet
    // backward pass (the measured worst is printed)
    let dir = fixtures().join("models/t2i-adapter-sd1");
    let cfg = sd_controlnet::t2i_adapter::inspect(&dir).unwrap().unwrap();
    let (vars, tensors) = vars_of(&dir);
    let net = Network::Adapter(
        T2IAdapter::new(
            &cfg,
            VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
        )
        .unwrap(),
    );
    check_grads("train_adapter_grads.safetensors", &net, &vars);
}

#[test]
fn a_few_dozen_steps_lower_the_loss_on_a_fill_dataset() {
    use sd_train::{fill::write_fill_dataset, TrainConfig, Trainer};
    let dir = std::env::temp_dir().join(format!("train-falls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    write_fill_dataset(&dir.join("data"), 2, 64, 5).unwrap();
    let cfg: TrainConfig = serde_json::from_value(serde_json::json!({
        "base": model_dir("sd1"),
        "dataset": dir.join("data"),
        "output": dir.join("out"),
        "resolution": 64,
        "batch_size": 2,
        "learning_rate": 2e-3,
        "max_grad_norm": 0.0,
        "max_steps": 24,
        "checkpointing_steps": 1000,
        "validation_steps": 1000,
        "seed": 1,
    }))
    .unwrap();
    let mut t = Trainer::new(cfg, false, &mut |w| panic!("{w}")).unwrap();
    let before = t.eval_loss(4).unwrap();
    let mut losses = Vec::new();
    t.run(&mut |r| losses.push(r.loss)).unwrap();
    let after = t.eval_loss(4).unwrap();
    eprintln!("held-out loss {before} -> {after}; training losses {losses:?}");
    assert_eq!(losses.len(), 24);
    // only the ControlNet learns (the random base UNet stays as it is, and the zero
    // convolutions start at zero), so the drop is small but real: 1.6% measured; the bound
    // leaves room for platform rounding while still failing when nothing is learnt
    assert!(after < before * 0.995, "held-out loss {before} -> {after}");
    assert!(dir
        .join("out/controlnet/diffusion_pytorch_model.safetensors")
        .is_file());
    let _ = std::fs::remove_dir_all(dir);
}

/// `gradient_checkpointing = true` reaches the trainer's loss: its blocks are checkpointed (a
/// plain `backward` has nowhere to put their weights' gradients and fails), and the
/// checkpointing backward gives every trained weight a gradient.
#[test]
fn the_trainer_checkpoints_its_blocks_when_asked() {
    use sd_train::{fill::write_fill_dataset, TrainConfig, TrainTask, Trainer};
    let dir = std::env::temp_dir().join(format!("train-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    write_fill_dataset(&dir.join("data"), 2, 64, 5).unwrap();
    let cfg = |on: bool| -> TrainConfig {
        serde_json::from_value(serde_json::json!({
            "base": model_dir("sd1"),
            "dataset": dir.join("data"),
            "output": dir.join(format!("out-{on}")),
            "resolution": 64,
            "max_steps": 1,
            "gradient_checkpointing": on,
        }))
        .unwrap()
    };
    for on in [false, true] {
        let mut t = Trainer::new(cfg(on), false, &mut |w| panic!("{w}")).unwrap();
        let (loss, ()) = t.micro_loss(0, 0).unwrap();
        assert_eq!(loss.backward().is_err(), on, "checkpointing {on}");
        let grads = sd_pipeline::model::checkpoint::backward(&loss).unwrap();
        let vars: Vec<_> = t.optimizer().vars().to_vec();
        assert!(!vars.is_empty());
        for (name, v) in &vars {
            assert!(grads.get(v.as_tensor()).is_some(), "{name}: no gradient");
        }
    }
    sd_pipeline::model::checkpoint::set_enabled(false);
    let _ = std::fs::remove_dir_all(dir);
}
