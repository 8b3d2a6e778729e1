//! `--device` and `--dtype` parsing.

use candle_core::{DType, Device};

use crate::error::Result;

/// Where a job runs: `cpu`, `cuda` (the first GPU) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceName {
    Cpu,
    Cuda(usize),
}

/// Reads a device name without opening anything: what config files and flags are checked with.
pub fn parse_name(name: &str) -> std::result::Result<DeviceName, String> {
    match name {
        "cpu" => Ok(DeviceName::Cpu),
        "cuda" => Ok(DeviceName::Cuda(0)),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(DeviceName::Cuda(n)),
            _ => Err(format!(
                "{other:?} is not a device: expected cpu, cuda or cuda:N (N the GPU's number, from 0)"
            )),
        },
    }
}

pub fn device(name: &str) -> Result<Device> {
    match parse_name(name).map_err(|e| format!("--device {e}"))? {
        DeviceName::Cpu => Ok(Device::Cpu),
        DeviceName::Cuda(n) => cuda(n).map_err(|e| format!("--device {name}: {e}").into()),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda(_ordinal: usize) -> std::result::Result<Device, String> {
    Err("this sdctl was built without CUDA: build it with `--features cuda` (README, GPU)".into())
}

/// Opens GPU `ordinal`. The CUDA libraries are loaded at run time (candle's cudarc with
/// `dynamic-loading`, vendor/README.md), so a CUDA build starts on any machine; they are looked
/// for first, so that a missing one is named here instead of a panic inside cudarc.
#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> std::result::Result<Device, String> {
    for lib in ["cuda", "cublas", "cublasLt", "curand", "nvrtc"] {
        let mut names = cudarc::get_lib_name_candidates(lib);
        names.sort();
        names.dedup();
        // SAFETY: CUDA's libraries run no initialisers that depend on the caller's state
        let found = names
            .iter()
            .any(|n| unsafe { libloading::Library::new(n) }.is_ok());
        if !found {
            return Err(format!(
                "no usable CUDA device: the CUDA library {lib:?} is not on the library path \
                 (looked for {}); the NVIDIA driver provides libcuda, the CUDA toolkit or \
                 NVIDIA's PyPI wheels the others (set LD_LIBRARY_PATH to their lib folders)",
                names.join(", ")
            ));
        }
    }
    Device::new_cuda(ordinal).map_err(|e| format!("no usable CUDA device {ordinal} ({e})"))
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
/// precision: on the CPU, `bf16` (on CPUs with AVX512-BF16) and `f16` (on CPUs with
/// AVX512-FP16, where the CPU kernels serve) keep f32 tensors (models load as f32) and compute
/// the convolutions', attention's and linear layers' products in that half precision with f32
/// sums. `f16` on a CPU without AVX512-FP16 keeps f16 tensors on candle's generic ops, as on a
/// GPU. Returns the dtype to load models in.
pub fn compute_dtype(device: &Device, dtype: DType) -> Result<DType> {
    use sd_pipeline::cpu::matmul::{f16_supported, set_precision, Precision};
    let kernels = sd_pipeline::cpu::serve(device);
    let precision = match dtype {
        DType::BF16 if device.is_cpu() => Precision::Bf16,
        DType::F16 if kernels && f16_supported() => Precision::F16,
        _ => Precision::F32,
    };
    set_precision(precision).map_err(|e| format!("--dtype {}: {e}", dtype.as_str()))?;
    Ok(if precision == Precision::F32 {
        dtype
    } else {
        DType::F32
    })
}
