//! ONNX tensors (initializers, constants, attribute values) as candle tensors.

use candle_core::{DType, Device, Tensor};

use super::proto::{data_type, TensorProto};

/// Largest tensor a file may hold or a node may make, in elements (512 MiB of f32; the
/// DWPose networks' largest is 6.6M).
pub const MAX_ELEMENTS: usize = 1 << 27;

thread_local! {
    static LIMIT: std::cell::Cell<usize> = const { std::cell::Cell::new(MAX_ELEMENTS) };
}

/// The element limit in force on this thread ([`MAX_ELEMENTS`] unless lowered).
pub fn element_limit() -> usize {
    LIMIT.with(|l| l.get())
}

/// Run `f` with a lower element limit on this thread (the fuzz target's memory budget).
pub fn with_element_limit<T>(limit: usize, f: impl FnOnce() -> T) -> T {
    let old = LIMIT.with(|l| l.replace(limit.min(MAX_ELEMENTS)));
    let r = f();
    LIMIT.with(|l| l.set(old));
    r
}

/// A tensor of the file as a candle tensor (errors name it).
pub(crate) fn tensor_of(t: &TensorProto) -> Result<Tensor, String> {
    let what = || format!("tensor `{}`", t.name);
    if !t.external_data.is_empty() || t.data_location == 1 {
        return Err(format!(
            "{}: its data is in an external file, which is not read (save the model as one file)",
            what()
        ));
    }
    let mut n: usize = 1;
    let mut dims = Vec::with_capacity(t.dims.len());
    for &d in &t.dims {
        let d = usize::try_from(d).map_err(|_| format!("{}: dimension {d}", what()))?;
        n = n
            .checked_mul(d)
            .filter(|&n| n <= element_limit())
            .ok_or_else(|| format!("{}: more than {} elements", what(), element_limit()))?;
        dims.push(d);
    }
    let raw = &t.raw_data;
    let size_err = |have: usize, each: usize| {
        format!(
            "{}: {} values for shape {dims:?}",
            what(),
            have.checked_div(each).unwrap_or(have)
        )
    };
    let dev = &Device::Cpu;
    let make = |r: candle_core::Result<Tensor>| r.map_err(|e| format!("{}: {e}", what()));
    match t.data_type {
        data_type::FLOAT => {
            let v: Vec<f32> = if !raw.is_empty() {
                if raw.len() != n * 4 {
                    return Err(size_err(raw.len(), 4));
                }
                raw.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect()
            } else {
                if t.float_data.len() != n {
                    return Err(size_err(t.float_data.len(), 1));
                }
                t.float_data.clone()
            };
            make(Tensor::from_vec(v, dims, dev))
        }
        data_type::FLOAT16 => {
            let v: Vec<f32> = if !raw.is_empty() {
                if raw.len() != n * 2 {
                    return Err(size_err(raw.len(), 2));
                }
                raw.chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect()
            } else {
                // stored as the bits in int32_data
                if t.int32_data.len() != n {
                    return Err(size_err(t.int32_data.len(), 1));
                }
                t.int32_data
                    .iter()
                    .map(|&b| half::f16::from_bits(b as u16).to_f32())
                    .collect()
            };
            make(Tensor::from_vec(v, dims, dev))
        }
        data_type::DOUBLE => {
            let v: Vec<f32> = if !raw.is_empty() {
                if raw.len() != n * 8 {
                    return Err(size_err(raw.len(), 8));
                }
                raw.chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32)
                    .collect()
            } else {
                if t.double_data.len() != n {
                    return Err(size_err(t.double_data.len(), 1));
                }
                t.double_data.iter().map(|&x| x as f32).collect()
            };
            make(Tensor::from_vec(v, dims, dev))
        }
        data_type::INT64 => {
            let v: Vec<i64> = if !raw.is_empty() {
                if raw.len() != n * 8 {
                    return Err(size_err(raw.len(), 8));
                }
                raw.chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                    .collect()
            } else {
                if t.int64_data.len() != n {
                    return Err(size_err(t.int64_data.len(), 1));
                }
                t.int64_data.clone()
            };
            make(Tensor::from_vec(v, dims, dev))
        }
        data_type::INT32 | data_type::INT8 | data_type::UINT8 | data_type::BOOL => {
            let each = if t.data_type == data_type::INT32 {
                4
            } else {
                1
            };
            let v: Vec<i64> = if !raw.is_empty() {
                if raw.len() != n * each {
                    return Err(size_err(raw.len(), each));
                }
                match t.data_type {
                    data_type::INT32 => raw
                        .chunks_exact(4)
                        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64)
                        .collect(),
                    data_type::INT8 => raw.iter().map(|&b| b as i8 as i64).collect(),
                    _ => raw.iter().map(|&b| b as i64).collect(),
                }
            } else {
                if t.int32_data.len() != n {
                    return Err(size_err(t.int32_data.len(), 1));
                }
                t.int32_data.iter().map(|&x| x as i64).collect()
            };
            let t64 = make(Tensor::from_vec(v, dims, dev))?;
            if t.data_type == data_type::BOOL {
                make(t64.to_dtype(DType::U8))
            } else {
                Ok(t64)
            }
        }
        other => Err(format!("{}: data type {other} is not supported", what())),
    }
}
