//! CPU kernels the model layers call in f32 (candle's generic ops elsewhere): im2col + gemm
//! convolutions, fused and recomputed attention, GEGLU and group norm, each with the backward
//! pass training needs, vectorised through run-time SIMD dispatch.

pub mod activation;
pub mod attention_op;
pub mod conv_op;
pub mod fused_attention;
pub mod geglu;
pub mod group_norm_op;
mod half_gemm;
pub mod layer_norm_op;
pub mod linear_op;
mod mat;
pub mod matmul;
pub mod op_profile;
pub mod reduce;
mod scratch;
mod simd;
pub mod upsample_op;
pub mod winograd_phase;

/// Whether these kernels serve a tensor on `device`: on the CPU, unless the environment says
/// `SDCTL_KERNELS=generic` (read once). Then candle's generic ops run on the CPU too: the path
/// every other device (CUDA) takes, which is how the tests check that path without a GPU.
pub fn serve(device: &candle_core::Device) -> bool {
    static GENERIC: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    device.is_cpu()
        && !*GENERIC.get_or_init(|| {
            std::env::var("SDCTL_KERNELS").is_ok_and(|v| v.eq_ignore_ascii_case("generic"))
        })
}

/// Deterministic values in [-0.5, 0.5) (an LCG) for the kernels' tests.
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

/// max |a - b| over two tensors of one shape (the kernels' tests).
#[cfg(test)]
pub(crate) fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// The gradients of `sum(y * r)`, `r` one random tensor of `y`'s shape, for an op's output and
/// the reference's output (the kernels' gradient tests).
#[cfg(test)]
pub(crate) fn weighted_grads(
    ours: candle_core::Tensor,
    theirs: candle_core::Tensor,
) -> (
    candle_core::backprop::GradStore,
    candle_core::backprop::GradStore,
) {
    let r = candle_core::Tensor::randn(0f32, 1., ours.dims(), ours.device()).unwrap();
    let grads = |y: candle_core::Tensor| (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    (grads(ours), grads(theirs))
}
