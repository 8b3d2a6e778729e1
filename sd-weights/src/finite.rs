//! NaN and infinity in tensors: one cheap reduction for the common (finite) case, the first
//! bad element found only when there is one.

use candle_core::{DType, Tensor};

/// True when every element of a floating-point tensor is finite (integer tensors always are).
/// One sum on the tensor's device: a sum is finite unless an element is not, or it overflows;
/// a sum that is not finite is confirmed element by element.
pub fn all_finite(t: &Tensor) -> candle_core::Result<bool> {
    if !t.dtype().is_float() || t.elem_count() == 0 {
        return Ok(true);
    }
    let sum = t.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    if sum.is_finite() {
        return Ok(true);
    }
    Ok(first_non_finite(t)?.is_none())
}

/// The first element that is NaN or infinite: its flat index and value.
pub fn first_non_finite(t: &Tensor) -> candle_core::Result<Option<(usize, f64)>> {
    if !t.dtype().is_float() {
        return Ok(None);
    }
    let v = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    Ok(v.into_iter().enumerate().find(|(_, x)| !x.is_finite()))
}

/// "NaN at element 3" / "inf at element 0" for [`first_non_finite`]'s finding.
pub fn describe(found: (usize, f64)) -> String {
    format!("{} at element {}", found.1, found.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn finds_nan_and_infinity() {
        let d = Device::Cpu;
        let ok = Tensor::new(&[1f32, -2., 3e38, 3e38], &d).unwrap();
        // the sum overflows, the elements are finite
        assert!(all_finite(&ok).unwrap());
        let nan = Tensor::new(&[1f32, f32::NAN], &d).unwrap();
        assert!(!all_finite(&nan).unwrap());
        assert_eq!(
            describe(first_non_finite(&nan).unwrap().unwrap()),
            "NaN at element 1"
        );
        let inf = Tensor::new(&[f32::NEG_INFINITY], &d).unwrap();
        assert_eq!(
            describe(first_non_finite(&inf).unwrap().unwrap()),
            "-inf at element 0"
        );
        let half = Tensor::new(&[1f32, f32::INFINITY], &d)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        assert!(!all_finite(&half).unwrap());
        assert!(all_finite(&Tensor::new(&[7u8], &d).unwrap()).unwrap());
    }
}
