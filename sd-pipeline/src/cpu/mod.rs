//! CPU kernels the model layers call in f32 (candle's generic ops elsewhere): im2col + gemm
//! convolutions, fused and recomputed attention, GEGLU and group norm, each with the backward
//! pass training needs, vectorised through run-time SIMD dispatch.

pub mod attention_op;
pub mod conv_op;
pub mod fused_attention;
pub mod geglu;
pub mod group_norm_op;
mod simd;
pub mod winograd_phase;
