//! `--device` and `--dtype` parsing.

use candle_core::{DType, Device};

use crate::error::Result;

pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0).map_err(|e| {
            format!("--device cuda: no usable CUDA device ({e}); sdctl must be built with `--features cuda`").into()
        }),
        other => Err(format!("--device {other:?}: expected cpu or cuda").into()),
    }
}

pub fn dtype(name: &str) -> Result<DType> {
    match name {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => Err(format!("--dtype {other:?}: expected f32, f16 or bf16").into()),
    }
}

/// Refuse combinations that cannot run, before any model is loaded, and set the CPU kernels'
/// precision: `bf16` on the CPU keeps f32 tensors (models load as f32) and computes the
/// convolutions', attention's and linear layers' products in bf16 with f32 sums, on CPUs with
/// AVX512-BF16. Returns the dtype to load models in.
pub fn compute_dtype(device: &Device, dtype: DType) -> Result<DType> {
    use sd_pipeline::cpu::matmul::{set_precision, Precision};
    let cpu_bf16 = device.is_cpu() && dtype == DType::BF16;
    set_precision(if cpu_bf16 {
        Precision::Bf16
    } else {
        Precision::F32
    })
    .map_err(|e| format!("--dtype bf16: {e}"))?;
    Ok(if cpu_bf16 { DType::F32 } else { dtype })
}
