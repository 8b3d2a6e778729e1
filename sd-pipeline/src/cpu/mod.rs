//! CPU kernels the model layers call in f32 (candle's generic ops elsewhere): im2col + gemm
//! convolutions, fused and recomputed attention, GEGLU and group norm, each with the backward
//! pass training needs, vectorised through run-time SIMD dispatch.

pub mod attention_op;
mod bf16_gemm;
pub mod conv_op;
pub mod fused_attention;
pub mod geglu;
pub mod group_norm_op;
pub mod linear_op;
mod mat;
pub mod matmul;
mod simd;
pub mod winograd_phase;
