//! An ONNX model file (the DWPose networks' format): decoded, checked, its constant subgraphs
//! folded (which runs their operators), then run on a small input for each graph input. Any
//! error is fine, a panic, hang or huge allocation is not (the element limit is lowered to
//! 4M values, 16 MiB a tensor, under libFuzzer's 1 GiB).
#![no_main]

use candle_core::{DType, Device, Tensor};
use libfuzzer_sys::fuzz_target;
use sd_preprocessors::onnx::{with_element_limit, Model};

fuzz_target!(|data: &[u8]| {
    with_element_limit(1 << 22, || {
        let Ok(m) = Model::from_bytes(data) else {
            return;
        };
        let Ok(x) = Tensor::ones((1, 3, 8, 8), DType::F32, &Device::Cpu) else {
            return;
        };
        let inputs: Vec<(&str, Tensor)> = m
            .input_names()
            .iter()
            .map(|n| (n.as_str(), x.clone()))
            .collect();
        let _ = m.run(&inputs);
    });
});
