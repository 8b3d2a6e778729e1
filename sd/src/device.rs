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

/// Refuse combinations candle cannot run, before any model is loaded.
pub fn check_dtype(device: &Device, dtype: DType) -> Result<()> {
    if device.is_cpu() && dtype == DType::BF16 {
        return Err("--dtype bf16 is not supported on the CPU (candle's CPU matmul has no bf16 kernel); use f32 (default) or f16".into());
    }
    Ok(())
}
