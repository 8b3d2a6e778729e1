//! Batch items that are exact copies of one another. Classifier-free guidance runs the same
//! latent at the same timestep once per prompt (diffusers `torch.cat([latents] * 2)`), so
//! everything a UNet or ControlNet computes before its first cross-attention (`conv_in`, the
//! first resnet, the first transformer's self-attention at the highest resolution) is the same
//! for every copy: it is computed once per distinct item and the rows are copied out where the
//! text first enters.

use candle_core::{DType, Result, Tensor};

/// Which items of a batch are distinct, and which distinct item each batch item is.
#[derive(Debug, Clone)]
pub struct SharedBatch {
    /// Indices of the first occurrence of each distinct item, `[U]`.
    unique: Tensor,
    /// For each batch item, the position of its distinct item in `unique`, `[B]`.
    expand: Tensor,
}

impl SharedBatch {
    /// Compares the items of `parts` (each `[B, ...]`, or batch 1: the same for every item)
    /// bit for bit. `None` when all `B` items differ (or `B` is 1): nothing to share.
    pub fn detect(parts: &[&Tensor]) -> Result<Option<Self>> {
        let Some(b) = parts.iter().map(|t| t.dim(0)).find(|d| !matches!(d, Ok(1))) else {
            return Ok(None);
        };
        let b = b?;
        let mut rows: Vec<Vec<Vec<f32>>> = Vec::new();
        for t in parts {
            match t.dim(0)? {
                1 => {}
                n if n == b => {
                    // f16/bf16 -> f32 is exact, so equal f32 bits mean equal items
                    rows.push(
                        t.to_dtype(DType::F32)?
                            .reshape((b, t.elem_count() / b))?
                            .to_vec2::<f32>()?,
                    );
                }
                n => candle_core::bail!("shared batch: a part of batch {n} beside batch {b}"),
            }
        }
        // bit equality (-0.0 is not 0.0; a NaN equals its own bits)
        let same = |i: usize, j: usize| {
            rows.iter().all(|p| {
                p[i].iter()
                    .zip(&p[j])
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            })
        };
        let (mut unique, mut expand) = (Vec::<u32>::new(), Vec::<u32>::with_capacity(b));
        for i in 0..b {
            match unique.iter().position(|&u| same(u as usize, i)) {
                Some(p) => expand.push(p as u32),
                None => {
                    expand.push(unique.len() as u32);
                    unique.push(i as u32);
                }
            }
        }
        if unique.len() == b {
            return Ok(None);
        }
        let dev = parts[0].device();
        Ok(Some(Self {
            unique: Tensor::new(unique, dev)?,
            expand: Tensor::new(expand, dev)?,
        }))
    }

    /// The distinct items of a full batch `[B, ...]` -> `[U, ...]`.
    pub fn shrink(&self, t: &Tensor) -> Result<Tensor> {
        t.index_select(&self.unique, 0)
    }

    /// One row per batch item again: `[U, ...]` -> `[B, ...]`.
    pub fn expand(&self, t: &Tensor) -> Result<Tensor> {
        t.index_select(&self.expand, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn finds_repeated_items_across_all_parts() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[1f32, 2.], [3., 4.], [1., 2.]], &dev).unwrap();
        let t = Tensor::new(&[5f32, 6., 5.], &dev).unwrap();
        let one = Tensor::new(&[[9f32]], &dev).unwrap();
        let s = SharedBatch::detect(&[&a, &t, &one]).unwrap().unwrap();
        assert_eq!(s.unique.to_vec1::<u32>().unwrap(), [0, 1]);
        assert_eq!(s.expand.to_vec1::<u32>().unwrap(), [0, 1, 0]);
        let back = s.expand(&s.shrink(&a).unwrap()).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
        // a different timestep for the third item makes all three distinct
        let t = Tensor::new(&[5f32, 6., 7.], &dev).unwrap();
        assert!(SharedBatch::detect(&[&a, &t]).unwrap().is_none());
        // batch 1, or nothing but batch-1 parts: nothing to share
        assert!(SharedBatch::detect(&[&one]).unwrap().is_none());
        let b2 = Tensor::new(&[[1f32], [2.]], &dev).unwrap();
        assert!(SharedBatch::detect(&[&a, &b2]).is_err());
    }

    #[test]
    fn negative_zero_is_not_zero() {
        // bit equality: -0.0 and 0.0 may give different results through sign-sensitive ops
        let dev = Device::Cpu;
        let a = Tensor::new(&[[0f32], [-0.0]], &dev).unwrap();
        assert!(SharedBatch::detect(&[&a]).unwrap().is_none());
    }
}
