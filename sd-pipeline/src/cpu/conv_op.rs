//! 2-D convolution for the CPU in f32: an `im2col` + gemm forward (inference, and the training
//! forward) and a trainable op. candle 0.11's own conv2d backward runs a naive
//! `conv_transpose2d` for the input gradient and a conv2d with the whole gradient map as its
//! kernel for the weight gradient, which makes training crawl; here the backward recomputes
//! `im2col` columns and takes both gradients as matmuls (the input's through `col2im`).

use super::matmul::{all_threads, matmul, precision, Mat, MatMut, Precision};
use super::scratch::with_scratch;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Geometry of one convolution.
#[derive(Debug, Clone, Copy)]
struct Geo {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
    oh: usize,
    ow: usize,
}

impl Geo {
    fn new(dims: &[usize], k: usize, stride: usize, pad: usize) -> Result<Self> {
        let [b, c, h, w] = dims else {
            candle_core::bail!("im2col: expected a 4-d input, got {dims:?}")
        };
        let (b, c, h, w) = (*b, *c, *h, *w);
        if h + 2 * pad < k || w + 2 * pad < k {
            candle_core::bail!("im2col: kernel {k} larger than the padded input {h}x{w}");
        }
        Ok(Self {
            b,
            c,
            h,
            w,
            k,
            stride,
            pad,
            oh: (h + 2 * pad - k) / stride + 1,
            ow: (w + 2 * pad - k) / stride + 1,
        })
    }
    /// Columns per output position: `c * k * k`, ordered (c, ky, kx) like the weight.
    fn cols(&self) -> usize {
        self.c * self.k * self.k
    }
    fn positions(&self) -> usize {
        self.oh * self.ow
    }
}

/// The f32 values of a contiguous CPU tensor's storage (a backward pass's inputs).
pub(super) fn cpu_f32<'a>(s: &'a candle_core::Storage, l: &Layout) -> Result<&'a [f32]> {
    match s {
        candle_core::Storage::Cpu(c) => f32_slice(c, l),
        _ => candle_core::bail!("custom CPU op: CPU tensors only"),
    }
}

/// The f32 values of a contiguous CPU tensor (the custom ops' inputs).
pub(super) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("custom CPU op: f32 only")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("custom CPU op: input is not contiguous"),
    }
}

/// The columns of one batch item, `[C*K*K, OH*OW]`, into `dst` (every element written): one
/// row of positions per (c, ky, kx), in parallel; at stride 1 each output row is one copy.
fn im2col(x: &[f32], g: &Geo, dst: &mut [f32]) {
    im2col_items(x, g, 1, dst)
}

/// The columns of `items` batch items side by side, `[C*K*K, items*OH*OW]` (item i's
/// positions at `i * OH*OW` in every row), from their `items` consecutive input images.
fn im2col_items(x: &[f32], g: &Geo, items: usize, dst: &mut [f32]) {
    let p = g.positions();
    let image = g.c * g.h * g.w;
    dst.par_chunks_mut(items * p)
        .enumerate()
        .for_each(|(r, row)| {
            let (c, ky, kx) = (r / (g.k * g.k), r / g.k % g.k, r % g.k);
            for (i, dst) in row.chunks_exact_mut(p).enumerate() {
                let src = &x[i * image + c * g.h * g.w..][..g.h * g.w];
                for oy in 0..g.oh {
                    let d = &mut dst[oy * g.ow..(oy + 1) * g.ow];
                    let Some(y) = (oy * g.stride + ky).checked_sub(g.pad).filter(|&y| y < g.h)
                    else {
                        d.fill(0.0);
                        continue;
                    };
                    let line = &src[y * g.w..(y + 1) * g.w];
                    if g.stride == 1 {
                        // ox + kx - pad in [0, w): ox in [pad - kx, w + pad - kx)
                        let lo = g.pad.saturating_sub(kx).min(g.ow);
                        let hi = (g.w + g.pad).saturating_sub(kx).min(g.ow).max(lo);
                        d[..lo].fill(0.0);
                        d[hi..].fill(0.0);
                        if lo < hi {
                            d[lo..hi].copy_from_slice(&line[lo + kx - g.pad..hi + kx - g.pad]);
                        }
                    } else {
                        for (ox, v) in d.iter_mut().enumerate() {
                            *v = (ox * g.stride + kx)
                                .checked_sub(g.pad)
                                .filter(|&xx| xx < g.w)
                                .map_or(0.0, |xx| line[xx]);
                        }
                    }
                }
            }
        });
}

/// Tiles per Winograd pass: bounds the transformed input and products (`16 * (C + O) * TILES`
/// f32, 21 MiB for the VAE's 128 channels) however large the image.
const WINOGRAD_TILES: usize = 1024;

/// Whether Winograd beats im2col + gemm for a 3x3 stride-1 convolution of this size. Its
/// weight transform (`16 * O * C` values, per call) must be paid back by the tiles (all batch
/// items), and with few input channels the 16 gemms are too thin. Measured per convolution
/// (2 cores, ms Winograd / im2col): 1280 ch at 8x8, 32 tiles 61 / 21; at 16x16, 128 tiles
/// 93 / 79; 640 ch at 16x16 14 / 20; 320 ch at 64x64 73 / 109; VAE 128 ch at 256x256 139 / 238;
/// 3 -> 16 ch at 256x256 12.5 / 1.3.
fn winograd_pays(tiles: usize, c: usize, o: usize) -> bool {
    c >= 8 && tiles >= 128 && tiles * 4096 >= o * c
}

/// Winograd F(2x2, 3x3) (Lavin & Gray 2015) for 3x3 stride-1 pad-1 kernels: each 2x2 block
/// of outputs from a 4x4 input tile with 16 multiplications instead of 36, as 16 gemms
/// `[O, C] x [C, tiles]` per pass of at most [`WINOGRAD_TILES`] tiles. Layouts (leading index
/// first): weights `[O][16][C]`, input tiles `[C][16][T]`, products `[O][16][T]`; the gemms read
/// them through strides.
fn conv3x3_winograd(x: &[f32], w: &[f32], bias: Option<&[f32]>, g: &Geo, o: usize) -> Vec<f32> {
    let c = g.c;
    let (th, tw) = (g.oh.div_ceil(2), g.ow.div_ceil(2));
    // U = G g G^T, G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]
    let mut u = vec![0f32; o * 16 * c];
    u.par_chunks_mut(16 * c).enumerate().for_each(|(oi, uo)| {
        for ci in 0..c {
            let k = &w[(oi * c + ci) * 9..][..9];
            let gg: [[f32; 3]; 4] = [
                std::array::from_fn(|j| k[j]),
                std::array::from_fn(|j| 0.5 * (k[j] + k[3 + j] + k[6 + j])),
                std::array::from_fn(|j| 0.5 * (k[j] - k[3 + j] + k[6 + j])),
                std::array::from_fn(|j| k[6 + j]),
            ];
            for (i, r) in gg.iter().enumerate() {
                let (a, b, d) = (r[0], r[1], r[2]);
                let row = [a, 0.5 * (a + b + d), 0.5 * (a - b + d), d];
                for (j, v) in row.into_iter().enumerate() {
                    uo[(i * 4 + j) * c + ci] = v;
                }
            }
        }
    });
    let cap = WINOGRAD_TILES.min(g.b * th * tw);
    let mut out = vec![0f32; g.b * o * g.oh * g.ow];
    // each pass writes the first `t` tiles of V and M and reads no others
    with_scratch(c * 16 * cap, |v| {
        with_scratch(o * 16 * cap, |m| {
            winograd_passes(x, &u, bias, g, o, v, m, &mut out)
        })
    });
    out
}

/// The passes of [`conv3x3_winograd`] over `V` and `M` scratch, into `out`. A pass takes up to
/// `cap` tiles of the whole batch, across images: a CFG batch of two 16x16 maps (64 tiles each)
/// is one pass of 128, so each of the 16 products packs the weights once, not once per image.
#[allow(clippy::too_many_arguments)]
fn winograd_passes(
    x: &[f32],
    u: &[f32],
    bias: Option<&[f32]>,
    g: &Geo,
    o: usize,
    v: &mut [f32],
    m: &mut [f32],
    out: &mut [f32],
) {
    let c = g.c;
    let per = g.oh.div_ceil(2) * g.ow.div_ceil(2);
    let threads = all_threads();
    let total = g.b * per;
    let cap = WINOGRAD_TILES.min(total);
    let (hw, image) = (g.oh * g.ow, c * g.h * g.w);
    for p0 in (0..total).step_by(cap) {
        let t = cap.min(total - p0);
        // per image in this pass: (image, its first tile, tiles, their offset in the pass)
        let parts: Vec<(usize, usize, usize, usize)> = (p0 / per..(p0 + t).div_ceil(per))
            .map(|bi| {
                let (lo, hi) = (p0.max(bi * per), (p0 + t).min((bi + 1) * per));
                (bi, lo - bi * per, hi - lo, lo - p0)
            })
            .collect();
        // V = B^T d B per tile, B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
        v.par_chunks_mut(16 * cap).enumerate().for_each(|(ci, vc)| {
            for &(bi, t0, n, off) in &parts {
                let plane = &x[bi * image + ci * g.h * g.w..][..g.h * g.w];
                winograd_input(plane, g, t0, n, cap, &mut vc[off..]);
            }
        });
        for e in 0..16 {
            // SAFETY: M_e [o, t] (row stride 16 cap) = U_e [o, c] (row stride 16c) x
            // V_e [c, t] (row stride 16 cap), t <= cap, all inside the buffers above.
            unsafe {
                matmul(
                    o,
                    t,
                    c,
                    MatMut::new(m.as_mut_ptr().add(e * cap), (16 * cap) as isize, 1),
                    false,
                    Mat::new(u.as_ptr().add(e * c), (16 * c) as isize, 1),
                    Mat::new(v.as_ptr().add(e * cap), (16 * cap) as isize, 1),
                    1.0,
                    threads,
                );
            }
        }
        for &(bi, t0, n, off) in &parts {
            let dst = &mut out[bi * o * hw..][..o * hw];
            dst.par_chunks_mut(hw).enumerate().for_each(|(oi, yo)| {
                let mo = &m[oi * 16 * cap + off..];
                winograd_output(mo, bias.map_or(0.0, |b| b[oi]), g, t0, n, cap, yo);
            });
        }
    }
}

/// Tiles handled together by the Winograd transforms: one vector register of f32 lanes.
const LANES: usize = 16;

/// A run of up to [`LANES`] tiles from tile `ti` of the pass starting at tile `t0`: consecutive
/// tiles of one tile row, the first and last tile of a row alone (they read the padding).
fn tile_run(g: &Geo, t0: usize, ti: usize, t: usize) -> (usize, usize, usize) {
    let tw = g.ow.div_ceil(2);
    let (ty, tx) = ((t0 + ti) / tw, (t0 + ti) % tw);
    let run = if tx == 0 || tx + 1 == tw {
        1
    } else {
        LANES.min(t - ti).min(tw - 1 - tx)
    };
    (ty, tx, run)
}

/// One value per lane. A plain loop, not `std::array::from_fn`: that is not inlined, so its
/// body was compiled for the baseline target outside the AVX-512 / AVX2 builds of the
/// transforms (perf showed `core::array::try_from_fn` beside them).
#[inline(always)]
fn lanes(f: impl Fn(usize) -> f32) -> [f32; LANES] {
    let mut out = [0f32; LANES];
    for (k, o) in out.iter_mut().enumerate() {
        *o = f(k);
    }
    out
}

/// `dst[..run] = vals[..run]`, a fixed-size (inlined, vector) copy for a full run.
#[inline(always)]
fn copy_lanes(dst: &mut [f32], vals: &[f32; LANES], run: usize) {
    if run == LANES {
        dst[..LANES].copy_from_slice(vals);
    } else {
        dst[..run].copy_from_slice(&vals[..run]);
    }
}

super::simd::simd_dispatch! {
    /// Winograd input transform of one channel `plane` `[H][W]` for tiles `t0..t0 + t`:
    /// `V = B^T d B`, `B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`,
    /// into `vc` `[16][cap]`.
    fn winograd_input(plane: &[f32], g: &Geo, t0: usize, t: usize, cap: usize, vc: &mut [f32]) -> () = winograd_input_body::<true>
}

/// `REGISTERS`: runs inside the image through [`winograd_input_run_avx512`] where the CPU has
/// AVX-512 (false: the portable loop only, which the tests compare it with).
#[inline(always)]
fn winograd_input_body<const REGISTERS: bool>(
    plane: &[f32],
    g: &Geo,
    t0: usize,
    t: usize,
    cap: usize,
    vc: &mut [f32],
) {
    let mut ti = 0;
    while ti < t {
        let (ty, tx, run) = tile_run(g, t0, ti, t);
        // d[i][j][k]: row i, column j of tile k's 4x4 input (zero outside the image)
        let mut d = [[[0f32; LANES]; 4]; 4];
        let last = tx + run - 1;
        #[cfg(target_arch = "x86_64")]
        if REGISTERS
            && ty > 0
            && tx > 0
            && 2 * ty + 2 < g.h
            && 2 * last + 2 < g.w
            && std::is_x86_feature_detected!("avx512f")
        {
            // SAFETY: AVX-512 was detected; the run's four input rows (2 run + 2 values each
            // from column 2 tx - 1) lie inside the plane (checked just above), and vc holds 16
            // rows of cap >= ti + run values.
            unsafe { winograd_input_run_avx512(plane, g.w, (ty, tx, run), &mut vc[ti..], cap) };
            ti += run;
            continue;
        }
        if ty > 0 && tx > 0 && 2 * ty + 2 < g.h && 2 * last + 2 < g.w {
            for (i, di) in d.iter_mut().enumerate() {
                let row = &plane[(2 * ty + i - 1) * g.w + 2 * tx - 1..][..2 * run + 2];
                for (j, dij) in di.iter_mut().enumerate() {
                    for (k, v) in dij[..run].iter_mut().enumerate() {
                        *v = row[2 * k + j];
                    }
                }
            }
        } else {
            for (i, di) in d.iter_mut().enumerate() {
                let Some(y) = (2 * ty + i).checked_sub(1).filter(|&y| y < g.h) else {
                    continue;
                };
                for (j, dij) in di.iter_mut().enumerate() {
                    for (k, v) in dij[..run].iter_mut().enumerate() {
                        if let Some(x) = (2 * (tx + k) + j).checked_sub(1).filter(|&x| x < g.w) {
                            *v = plane[y * g.w + x];
                        }
                    }
                }
            }
        }
        // B^T d: rows
        let mut bd = [[[0f32; LANES]; 4]; 4];
        for (j, b) in bd.iter_mut().enumerate() {
            for k in 0..LANES {
                b[0][k] = d[0][j][k] - d[2][j][k];
                b[1][k] = d[1][j][k] + d[2][j][k];
                b[2][k] = d[2][j][k] - d[1][j][k];
                b[3][k] = d[1][j][k] - d[3][j][k];
            }
        }
        // (B^T d) B: columns; bd[j][i] is row i, column j
        for i in 0..4 {
            let r = |j: usize| &bd[j][i];
            let out: [[f32; LANES]; 4] = [
                lanes(|k| r(0)[k] - r(2)[k]),
                lanes(|k| r(1)[k] + r(2)[k]),
                lanes(|k| r(2)[k] - r(1)[k]),
                lanes(|k| r(1)[k] - r(3)[k]),
            ];
            for (j, vals) in out.iter().enumerate() {
                copy_lanes(&mut vc[(i * 4 + j) * cap + ti..], vals, run);
            }
        }
        ti += run;
    }
}

/// [`winograd_input_body`] for a run of up to [`LANES`] tiles inside the image, in registers:
/// each input row's `2 run + 2` values are loaded (masked) as four vectors and split into its
/// four strided columns by two-source permutes; the same additions in the same order (equal
/// values); `run` lanes stored. `vc` starts at the run's first tile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn winograd_input_run_avx512(
    plane: &[f32],
    w: usize,
    (ty, tx, run): (usize, usize, usize),
    vc: &mut [f32],
    cap: usize,
) {
    use std::arch::x86_64::*;
    // lanes `from..` of a load that are inside the row's n values
    let n = 2 * run + 2;
    let mask = |from: usize| -> __mmask16 {
        let valid = n.saturating_sub(from).min(16);
        ((1u32 << valid) - 1) as __mmask16
    };
    let store = ((1u32 << run) - 1) as __mmask16;
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    // d[i][j]: row i, column j of the run's 4x4 tiles, one tile per lane
    let mut d = [[_mm512_setzero_ps(); 4]; 4];
    for (i, di) in d.iter_mut().enumerate() {
        let row = &plane[(2 * ty + i - 1) * w + 2 * tx - 1..][..n];
        let p = row.as_ptr();
        let a = _mm512_maskz_loadu_ps(mask(0), p);
        let b = _mm512_maskz_loadu_ps(mask(16), p.wrapping_add(16));
        let a2 = _mm512_maskz_loadu_ps(mask(2), p.wrapping_add(2));
        let b2 = _mm512_maskz_loadu_ps(mask(18), p.wrapping_add(18));
        di[0] = _mm512_permutex2var_ps(a, even, b);
        di[1] = _mm512_permutex2var_ps(a, odd, b);
        di[2] = _mm512_permutex2var_ps(a2, even, b2);
        di[3] = _mm512_permutex2var_ps(a2, odd, b2);
    }
    // V[i][j] into vc[(i * 4 + j) * cap ..]
    for (i, row) in winograd_input_avx512(&d).iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            let dst = &mut vc[(i * 4 + j) * cap..][..run];
            _mm512_mask_storeu_ps(dst.as_mut_ptr(), store, v);
        }
    }
}

/// `V = B^T d B` of 16 tiles at once (`d[i][j]`: row i, column j, a tile per lane), the
/// additions in the portable loop's order; for callers built with AVX-512 (inlined into them).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn winograd_input_avx512(
    d: &[[std::arch::x86_64::__m512; 4]; 4],
) -> [[std::arch::x86_64::__m512; 4]; 4] {
    use std::arch::x86_64::*;
    // B^T d: bd[i][j] is row i, column j
    let mut bd = [[_mm512_setzero_ps(); 4]; 4];
    for j in 0..4 {
        bd[0][j] = _mm512_sub_ps(d[0][j], d[2][j]);
        bd[1][j] = _mm512_add_ps(d[1][j], d[2][j]);
        bd[2][j] = _mm512_sub_ps(d[2][j], d[1][j]);
        bd[3][j] = _mm512_sub_ps(d[1][j], d[3][j]);
    }
    // (B^T d) B, row by row (a plain loop: `array::map` is not inlined, nor then its intrinsics)
    let mut v = [[_mm512_setzero_ps(); 4]; 4];
    for (o, r) in v.iter_mut().zip(&bd) {
        *o = [
            _mm512_sub_ps(r[0], r[2]),
            _mm512_add_ps(r[1], r[2]),
            _mm512_sub_ps(r[2], r[1]),
            _mm512_sub_ps(r[1], r[3]),
        ];
    }
    v
}

super::simd::simd_dispatch! {
    /// Winograd output transform of one output channel: `Y = A^T M A`,
    /// `A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]`, plus `bias`, from `mo` `[16][cap]` into the
    /// tiles `t0..t0 + t` of the plane `yo` `[OH][OW]`.
    fn winograd_output(mo: &[f32], bias: f32, g: &Geo, t0: usize, t: usize, cap: usize, yo: &mut [f32]) -> () = winograd_output_body::<true>
}

/// `REGISTERS`: as in [`winograd_input_body`], through [`winograd_output_run_avx512`].
#[inline(always)]
fn winograd_output_body<const REGISTERS: bool>(
    mo: &[f32],
    bias: f32,
    g: &Geo,
    t0: usize,
    t: usize,
    cap: usize,
    yo: &mut [f32],
) {
    let mut ti = 0;
    while ti < t {
        let (ty, tx, run) = tile_run(g, t0, ti, t);
        #[cfg(target_arch = "x86_64")]
        if REGISTERS && 2 * (tx + run) <= g.ow && std::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512 was detected; mo holds 16 rows of cap >= ti + run values, and
            // the run's two output rows (those below oh) have 2 (tx + run) <= ow columns.
            unsafe {
                winograd_output_run_avx512(&mo[ti..], cap, bias, (ty, tx, run), (g.oh, g.ow), yo)
            };
            ti += run;
            continue;
        }
        let mut e = [[0f32; LANES]; 16];
        for (n, en) in e.iter_mut().enumerate() {
            let src = &mo[n * cap + ti..];
            if run == LANES {
                en.copy_from_slice(&src[..LANES]);
            } else {
                en[..run].copy_from_slice(&src[..run]);
            }
        }
        let at = |i: usize, j: usize| &e[i * 4 + j];
        // A^T M: two rows of four
        let (mut top, mut bottom) = ([[0f32; LANES]; 4], [[0f32; LANES]; 4]);
        for (j, (t, b)) in top.iter_mut().zip(bottom.iter_mut()).enumerate() {
            *t = lanes(|k| at(0, j)[k] + at(1, j)[k] + at(2, j)[k]);
            *b = lanes(|k| at(1, j)[k] - at(2, j)[k] - at(3, j)[k]);
        }
        let am = [top, bottom];
        for (a, r) in am.iter().enumerate() {
            let y = 2 * ty + a;
            if y >= g.oh {
                continue;
            }
            let left = lanes(|k| r[0][k] + r[1][k] + r[2][k] + bias);
            let right = lanes(|k| r[1][k] - r[2][k] - r[3][k] + bias);
            let row = &mut yo[y * g.ow..][..g.ow];
            if 2 * (tx + run) <= g.ow {
                for (k, pair) in row[2 * tx..2 * (tx + run)].chunks_exact_mut(2).enumerate() {
                    pair[0] = left[k];
                    pair[1] = right[k];
                }
            } else {
                for k in 0..run {
                    let x = 2 * (tx + k);
                    row[x] = left[k];
                    if x + 1 < g.ow {
                        row[x + 1] = right[k];
                    }
                }
            }
        }
        ti += run;
    }
}

/// [`winograd_output_body`] for a run of up to [`LANES`] tiles whose outputs fit the row, in
/// registers: the same additions in the same order (equal values), the two columns of each
/// output row interleaved by permutes and stored masked. `mo` starts at the run's first tile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn winograd_output_run_avx512(
    mo: &[f32],
    cap: usize,
    bias: f32,
    (ty, tx, run): (usize, usize, usize),
    (oh, ow): (usize, usize),
    yo: &mut [f32],
) {
    use std::arch::x86_64::*;
    let lanes = ((1u32 << run) - 1) as __mmask16;
    let mut e = [_mm512_setzero_ps(); 16];
    for (n, en) in e.iter_mut().enumerate() {
        *en = _mm512_maskz_loadu_ps(lanes, mo[n * cap..][..run].as_ptr());
    }
    let b = _mm512_set1_ps(bias);
    let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    let (mask_lo, mask_hi) = {
        let n = 2 * run;
        let m = |v: usize| ((1u32 << v.min(16)) - 1) as __mmask16;
        (m(n), m(n.saturating_sub(16)))
    };
    for a in 0..2 {
        let y = 2 * ty + a;
        if y >= oh {
            continue;
        }
        // A^T M, row a: e[4 i + j] is M's row i, column j
        let mut r = [_mm512_setzero_ps(); 4];
        for (j, rj) in r.iter_mut().enumerate() {
            *rj = if a == 0 {
                _mm512_add_ps(_mm512_add_ps(e[j], e[4 + j]), e[8 + j])
            } else {
                _mm512_sub_ps(_mm512_sub_ps(e[4 + j], e[8 + j]), e[12 + j])
            };
        }
        let left = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(r[0], r[1]), r[2]), b);
        let right = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(r[1], r[2]), r[3]), b);
        let dst = yo[y * ow + 2 * tx..][..2 * run].as_mut_ptr();
        _mm512_mask_storeu_ps(dst, mask_lo, _mm512_permutex2var_ps(left, lo, right));
        _mm512_mask_storeu_ps(
            dst.wrapping_add(16),
            mask_hi,
            _mm512_permutex2var_ps(left, hi, right),
        );
    }
}

/// `conv2d(x, w) + bias` for contiguous f32 `[B, C, H, W]` and `[O, C, K, K]`: Winograd for
/// 3x3 stride-1 pad-1 kernels (SD1.5 UNet at 512x512: 10.2 -> 8.9 s per call); otherwise per
/// batch item the columns (none for 1x1 stride-1 kernels) times the weight as one gemm written
/// straight into the NCHW output, the bias preloaded. candle 0.11's CPU conv2d transposes the whole
/// input to NHWC and reorders the weight on one thread on every call, then scatters its output.
fn conv2d_f32(x: &[f32], w: &[f32], bias: Option<&[f32]>, g: &Geo, o: usize) -> Vec<f32> {
    let tiles = g.b * g.oh.div_ceil(2) * g.ow.div_ceil(2);
    if g.k == 3 && g.stride == 1 && g.pad == 1 && winograd_pays(tiles, g.c, o) {
        conv3x3_winograd(x, w, bias, g, o)
    } else {
        conv2d_im2col(x, w, bias, g, o)
    }
}

/// [`conv2d_f32`] by columns: per batch item `[O, C*K*K] x [C*K*K, OH*OW]`.
fn conv2d_im2col(x: &[f32], w: &[f32], bias: Option<&[f32]>, g: &Geo, o: usize) -> Vec<f32> {
    let (n, p) = (g.cols(), g.positions());
    if g.b > 1 && p <= BATCHED_POSITIONS {
        return conv2d_im2col_batched(x, w, bias, g, o);
    }
    let direct = g.k == 1 && g.stride == 1 && g.pad == 0;
    let mut out = vec![0f32; g.b * o * p];
    // im2col writes every column value
    with_scratch(if direct { 0 } else { n * p }, |cols| {
        for (bi, dst) in out.chunks_mut(o * p).enumerate() {
            let xb = &x[bi * g.c * g.h * g.w..][..g.c * g.h * g.w];
            let rhs = if direct {
                xb
            } else {
                im2col(xb, g, cols);
                &cols[..]
            };
            gemm_with_bias(dst, w, rhs, bias, o, p, n);
        }
    });
    out
}

/// Positions per image up to which the whole batch goes through one gemm: small maps (the
/// UNet's 16x16 and deeper levels) are bound by reading the weight, which the per-item
/// gemms would pack once per batch item.
const BATCHED_POSITIONS: usize = 1024;

/// [`conv2d_im2col`] as one `[O, C*K*K] x [C*K*K, B*OH*OW]` gemm, then the `[O, B, P]` result
/// reordered to `[B, O, P]`.
fn conv2d_im2col_batched(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &Geo,
    o: usize,
) -> Vec<f32> {
    let (n, p, b) = (g.cols(), g.positions(), g.b);
    let mut out = vec![0f32; b * o * p];
    // im2col and the gemm (bias fill, or no accumulation) write every value they leave
    with_scratch(n * b * p, |cols| {
        im2col_items(x, g, b, cols);
        with_scratch(o * b * p, |all| {
            gemm_with_bias(all, w, cols, bias, o, b * p, n);
            out.par_chunks_mut(o * p).enumerate().for_each(|(bi, dst)| {
                for (oi, row) in dst.chunks_exact_mut(p).enumerate() {
                    row.copy_from_slice(&all[(oi * b + bi) * p..][..p]);
                }
            });
        })
    });
    out
}

/// `dst[m, n] = bias + lhs[m, k] x rhs[k, n]`, row-major, on all threads.
fn gemm_with_bias(
    dst: &mut [f32],
    lhs: &[f32],
    rhs: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    n: usize,
    k: usize,
) {
    assert!(dst.len() >= m * n && lhs.len() >= m * k && rhs.len() >= k * n);
    if let Some(bias) = bias {
        dst.par_chunks_mut(n)
            .zip(bias.par_iter())
            .for_each(|(row, &v)| row.fill(v));
    }
    // SAFETY: row-major [m, n] = [m, k] x [k, n], the slices' sizes checked above.
    unsafe {
        matmul(
            m,
            n,
            k,
            MatMut::new(dst.as_mut_ptr(), n as isize, 1),
            bias.is_some(),
            Mat::new(lhs.as_ptr(), k as isize, 1),
            Mat::new(rhs.as_ptr(), n as isize, 1),
            1.0,
            all_threads(),
        );
    }
}

/// The inference convolution as a CPU op (no gradient): [`conv2d_f32`] with the bias inside.
struct ConvInfer {
    stride: usize,
    pad: usize,
    bias: Option<Vec<f32>>,
}

impl CustomOp2 for ConvInfer {
    fn name(&self) -> &'static str {
        "conv2d-infer"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _span = super::op_profile::span("conv fwd");
        let [o, c, k, _] = l2.dims() else {
            candle_core::bail!("conv2d: expected a 4-d weight, got {:?}", l2.dims())
        };
        let g = Geo::new(l1.dims(), *k, self.stride, self.pad)?;
        if g.c != *c {
            candle_core::bail!("conv2d: weight {:?} for input {:?}", l2.dims(), l1.dims());
        }
        let y = conv2d_f32(
            f32_slice(s1, l1)?,
            f32_slice(s2, l2)?,
            self.bias.as_deref(),
            &g,
            *o,
        );
        Ok((CpuStorage::F32(y), Shape::from((g.b, *o, g.oh, g.ow))))
    }
}

/// The output channels of `weight` `[O, C, K, K]` for input `x` `[B, C, H, W]`, or an error
/// naming `op` when the kernel is not square or the channels do not match.
fn output_channels(x: &Tensor, weight: &Tensor, op: &str) -> Result<usize> {
    let (o, c, k, k2) = weight.dims4()?;
    if k != k2 || x.dim(1)? != c {
        candle_core::bail!("{op}: weight {:?} for input {:?}", weight.dims(), x.dims());
    }
    Ok(o)
}

/// `conv2d(x, weight) + bias` for inference on the CPU in f32 (square kernel, no dilation or
/// groups); see `conv2d_f32`.
pub fn conv2d_infer(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let o = output_channels(x, weight, "conv2d")?;
    let bias = bias
        .map(|b| b.flatten_all()?.to_vec1::<f32>())
        .transpose()?;
    if bias.as_ref().is_some_and(|b| b.len() != o) {
        candle_core::bail!("conv2d: bias of the wrong size for {o} output channels");
    }
    x.contiguous()?.apply_op2_no_bwd(
        &weight.contiguous()?,
        &ConvInfer {
            stride,
            pad: padding,
            bias,
        },
    )
}

/// im2col's adjoint for one batch item: `dst [C, H, W]` = the sums of `cols [C*K*K, OH*OW]`
/// over the patches that read each pixel (`dst` is overwritten), one channel plane per task.
fn col2im(cols: &[f32], g: &Geo, dst: &mut [f32]) {
    let p = g.positions();
    dst.par_chunks_mut(g.h * g.w)
        .enumerate()
        .for_each(|(c, dst)| {
            dst.fill(0.0);
            for ky in 0..g.k {
                for kx in 0..g.k {
                    let r = (c * g.k + ky) * g.k + kx;
                    let row = &cols[r * p..][..p];
                    for oy in 0..g.oh {
                        let Some(y) = (oy * g.stride + ky).checked_sub(g.pad).filter(|&y| y < g.h)
                        else {
                            continue;
                        };
                        let line = &mut dst[y * g.w..(y + 1) * g.w];
                        let src = &row[oy * g.ow..(oy + 1) * g.ow];
                        if g.stride == 1 {
                            let lo = g.pad.saturating_sub(kx).min(g.ow);
                            let hi = (g.w + g.pad).saturating_sub(kx).min(g.ow).max(lo);
                            if lo == hi {
                                continue;
                            }
                            let line = &mut line[lo + kx - g.pad..hi + kx - g.pad];
                            for (d, s) in line.iter_mut().zip(&src[lo..hi]) {
                                *d += s;
                            }
                        } else {
                            for (ox, s) in src.iter().enumerate() {
                                if let Some(xx) = (ox * g.stride + kx)
                                    .checked_sub(g.pad)
                                    .filter(|&xx| xx < g.w)
                                {
                                    line[xx] += s;
                                }
                            }
                        }
                    }
                }
            }
        });
}

/// `W [O, C, 3, 3]` -> `W' [C, O, 3, 3]` with `W'[c, o, y, x] = W[o, c, 2 - y, 2 - x]`: the kernel
/// whose convolution is the 3x3 stride-1 pad-1 convolution's transpose.
fn flipped_transposed(w: &[f32], o: usize, c: usize) -> Vec<f32> {
    let mut out = vec![0f32; o * c * 9];
    out.par_chunks_mut(o * 9).enumerate().for_each(|(ci, dst)| {
        for (oi, d) in dst.chunks_exact_mut(9).enumerate() {
            let src = &w[(oi * c + ci) * 9..][..9];
            for (t, v) in d.iter_mut().enumerate() {
                *v = src[8 - t];
            }
        }
    });
    out
}

/// The convolution as one op: forward is [`conv2d_f32`] (the inference path's numbers),
/// backward recomputes the columns from the input and takes both gradients as matmuls. Only
/// the input and the weight are kept for backward, as candle's own op does.
struct ConvTrain {
    stride: usize,
    pad: usize,
}

impl CustomOp2 for ConvTrain {
    fn name(&self) -> &'static str {
        "conv2d-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        ConvInfer {
            stride: self.stride,
            pad: self.pad,
            bias: None,
        }
        .cpu_fwd(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _span = super::op_profile::span("conv bwd");
        let (o, c, k, _) = w.dims4()?;
        let geo = Geo::new(x.dims(), k, self.stride, self.pad)?;
        let (n, p) = (geo.cols(), geo.positions());
        let image = c * geo.h * geo.w;
        // a frozen weight (the UNet's) or an input that depends on no variable (a control
        // image) needs no gradient: its product is skipped
        let (need_w, need_x) = (w.track_op(), x.track_op());
        let direct = k == 1 && self.stride == 1 && self.pad == 0;
        // a 3x3 stride-1 pad-1 convolution's input gradient is the convolution of the output
        // gradient with the flipped, transposed kernel: Winograd where it pays, as forward
        let tiles = geo.b * geo.h.div_ceil(2) * geo.w.div_ceil(2);
        let winograd_x =
            need_x && k == 3 && self.stride == 1 && self.pad == 1 && winograd_pays(tiles, o, c);
        let (x, w, grad) = (x.contiguous()?, w.contiguous()?, grad.contiguous()?);
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (xv, wv, gv) = (cpu_f32(&xs, xl)?, cpu_f32(&ws, wl)?, cpu_f32(&gs, gl)?);
        // columns: the weight gradient's input, or the input gradient before col2im
        let cols_len = if !direct && (need_w || (need_x && !winograd_x)) {
            n * p
        } else {
            0
        };
        // f32 with many positions: the weight gradient is made transposed ([n, o], a
        // column-major [o, n]), which the gemm crate computes without repacking the columns
        // (58 -> 43 ms at 320 channels 64x64), then transposed once (its cost grows with o * n
        // only, the gain with o * n * p); bf16 packs either layout alike
        let transposed_gw = precision() == Precision::F32 && p >= 2048;
        let mut gw = if need_w {
            vec![0f32; o * n]
        } else {
            Vec::new()
        };
        let mut gx = if winograd_x {
            let gg = Geo::new(&[geo.b, o, geo.h, geo.w], 3, 1, 1)?;
            conv3x3_winograd(gv, &flipped_transposed(wv, o, c), None, &gg, c)
        } else if need_x {
            vec![0f32; geo.b * image]
        } else {
            Vec::new()
        };
        // im2col and the product (no accumulation) write every column value
        with_scratch(cols_len, |cols| {
            for bi in 0..geo.b {
                let gb = &gv[bi * o * p..][..o * p];
                if need_w {
                    let xb = &xv[bi * image..][..image];
                    let cb = if direct {
                        xb
                    } else {
                        im2col(xb, &geo, cols);
                        &cols[..]
                    };
                    let dst = if transposed_gw {
                        MatMut::new(gw.as_mut_ptr(), 1, o as isize)
                    } else {
                        MatMut::new(gw.as_mut_ptr(), n as isize, 1)
                    };
                    // SAFETY: gw [o, n] += g_b [o, p] x cols_b^T ([n, p] row-major read as [p, n]);
                    // `gw` holds o * n values in either layout
                    unsafe {
                        matmul(
                            o,
                            n,
                            p,
                            dst,
                            bi > 0,
                            Mat::new(gb.as_ptr(), p as isize, 1),
                            Mat::new(cb.as_ptr(), 1, p as isize),
                            1.0,
                            all_threads(),
                        );
                    }
                }
                if need_x && !winograd_x {
                    let gxb = &mut gx[bi * image..][..image];
                    let dst = if direct {
                        gxb.as_mut_ptr()
                    } else {
                        cols.as_mut_ptr()
                    };
                    // SAFETY: [n, p] = W^T ([o, n] row-major read as [n, o]) x g_b [o, p]; `dst`
                    // holds n * p values (the columns, or the input gradient itself when 1x1)
                    unsafe {
                        matmul(
                            n,
                            p,
                            o,
                            MatMut::new(dst, p as isize, 1),
                            false,
                            Mat::new(wv.as_ptr(), 1, n as isize),
                            Mat::new(gb.as_ptr(), p as isize, 1),
                            1.0,
                            all_threads(),
                        );
                    }
                    if !direct {
                        col2im(cols, &geo, gxb);
                    }
                }
            }
        });
        if need_w && transposed_gw {
            gw = transposed(&gw, n, o);
        }
        let dev = x.device();
        let gw = need_w
            .then(|| Tensor::from_vec(gw, (o, c, k, k), dev))
            .transpose()?;
        let gx = need_x
            .then(|| Tensor::from_vec(gx, x.dims(), dev))
            .transpose()?;
        Ok((gx, gw))
    }
}

/// `src [rows, cols]` row-major as `[cols, rows]` row-major, in 32x32 tiles (parallel over
/// bands of 32 output rows).
fn transposed(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const T: usize = 32;
    let mut out = vec![0f32; rows * cols];
    out.par_chunks_mut(T * rows.max(1))
        .enumerate()
        .for_each(|(band, dst)| {
            let c0 = band * T;
            let cn = dst.len() / rows.max(1);
            for r0 in (0..rows).step_by(T) {
                for r in r0..(r0 + T).min(rows) {
                    let s = &src[r * cols + c0..][..cn];
                    for (j, v) in s.iter().enumerate() {
                        dst[j * rows + r] = *v;
                    }
                }
            }
        });
    out
}

/// `conv2d(x, weight) + bias` (square kernel, no dilation or groups) with matmul gradients.
pub fn conv2d_train(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let o = output_channels(x, weight, "conv2d_train")?;
    let op = ConvTrain {
        stride,
        pad: padding,
    };
    let (x, w) = (x.contiguous()?, weight.contiguous()?);
    match bias {
        // the bias inside the op: no pre-bias output is kept for the backward pass
        Some(b) if b.elem_count() == o => x.apply_op3(&w, &b.flatten_all()?, op),
        Some(_) => candle_core::bail!("conv2d: bias of the wrong size for {o} output channels"),
        None => x.apply_op2(&w, op),
    }
}

/// [`ConvTrain`] with the bias added in the forward pass; its gradient is the output
/// gradient's sum per channel.
impl CustomOp3 for ConvTrain {
    fn name(&self) -> &'static str {
        "conv2d-bias-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        ConvInfer {
            stride: self.stride,
            pad: self.pad,
            bias: Some(f32_slice(s3, l3)?.to_vec()),
        }
        .cpu_fwd(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gx, gw) = CustomOp2::bwd(self, x, w, res, grad)?;
        let gb = if b.track_op() {
            Some(
                grad.sum_keepdim(0)?
                    .sum_keepdim(2)?
                    .sum_keepdim(3)?
                    .flatten_all()?,
            )
        } else {
            None
        };
        Ok((gx, gw, gb))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// max |ours - theirs| <= 4e-6 * max(1, max |theirs|).
    fn assert_close(ours: &Tensor, theirs: &Tensor, what: &str) {
        let max = |t: &Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let d = max(&(ours - theirs).unwrap());
        assert!(d <= 4e-6 * max(theirs).max(1.0), "{what}: {d}");
    }

    #[test]
    fn inference_conv_matches_candles() {
        let dev = Device::Cpu;
        // 3x3 same, stride 2 (odd and even sizes), 1x1 (direct gemm), pad 0, a 1-pixel input
        // (small maps: the whole batch in one gemm)
        for (stride, pad, k, h, w, bias) in [
            (1, 1, 3, 7, 6, true),
            (2, 1, 3, 9, 10, true),
            (2, 0, 3, 8, 7, false),
            (1, 0, 1, 5, 4, true),
            (1, 0, 1, 5, 4, false),
            (2, 0, 1, 6, 5, true),
            (1, 1, 3, 1, 1, true),
            (1, 2, 5, 6, 3, false),
            // more than BATCHED_POSITIONS: one gemm per batch item
            (1, 1, 3, 40, 33, true),
            (2, 1, 3, 80, 70, false),
        ] {
            let x = Tensor::randn(0f32, 1., (2, 5, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1., (6, 5, k, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1., 6, &dev).unwrap();
            let b = bias.then_some(&b);
            let ours = conv2d_infer(&x, &wt, b, stride, pad).unwrap();
            let mut theirs = x.conv2d(&wt, pad, stride, 1, 1).unwrap();
            if let Some(b) = b {
                theirs = theirs
                    .broadcast_add(&b.reshape((1, 6, 1, 1)).unwrap())
                    .unwrap();
            }
            assert_eq!(ours.dims(), theirs.dims());
            // both sum 5*k*k products of unit normals in f32, in different orders: a few f32
            // epsilons (sqrt of the up to 125 terms) of the largest output
            assert_close(&ours, &theirs, &format!("stride {stride} pad {pad} k {k}"));
        }
        // a strided (transposed) input goes through contiguous() first
        let x = Tensor::randn(0f32, 1., (2, 5, 6, 7), &dev)
            .unwrap()
            .transpose(2, 3)
            .unwrap();
        let wt = Tensor::randn(0f32, 1., (3, 5, 3, 3), &dev).unwrap();
        let d = (conv2d_infer(&x, &wt, None, 1, 1).unwrap() - x.conv2d(&wt, 1, 1, 1, 1).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 4e-5); // 45 unit-normal products: outputs up to ~25, a few f32 epsilons of those
        assert!(conv2d_infer(
            &x,
            &Tensor::zeros((3, 4, 3, 3), DType::F32, &dev).unwrap(),
            None,
            1,
            1
        )
        .is_err());
    }

    /// The AVX-512 register kernels give the portable transforms' values bit for bit, on
    /// planes whose tile rows hold full runs, partial runs and lone edge tiles (odd and even
    /// sizes), over passes that start mid-row.
    #[test]
    fn winograd_register_kernels_equal_the_loops() {
        for (h, w) in [(7, 6), (9, 40), (70, 65), (33, 67), (2, 2)] {
            let g = Geo::new(&[1, 1, h, w], 3, 1, 1).unwrap();
            let total = g.oh.div_ceil(2) * g.ow.div_ceil(2);
            let plane = crate::cpu::test_values(h * w, (h * w) as u64);
            for cap in [total, 37, 16] {
                for t0 in (0..total).step_by(cap) {
                    let t = cap.min(total - t0);
                    let (mut a, mut b) = (vec![0f32; 16 * cap], vec![0f32; 16 * cap]);
                    winograd_input(&plane, &g, t0, t, cap, &mut a);
                    winograd_input_body::<false>(&plane, &g, t0, t, cap, &mut b);
                    assert_eq!(a, b, "input {h}x{w} cap {cap} from {t0}");
                    let m = crate::cpu::test_values(16 * cap, t0 as u64 + 7);
                    let (mut ya, mut yb) = (vec![0f32; g.oh * g.ow], vec![0f32; g.oh * g.ow]);
                    winograd_output(&m, 0.25, &g, t0, t, cap, &mut ya);
                    winograd_output_body::<false>(&m, 0.25, &g, t0, t, cap, &mut yb);
                    assert_eq!(ya, yb, "output {h}x{w} cap {cap} from {t0}");
                }
            }
        }
    }

    #[test]
    fn winograd_matches_candles_conv2d() {
        let dev = Device::Cpu;
        // odd and even sizes, one pixel, 35x33 = 1155 tiles: two passes, the second partial;
        // three images of 20x30 = 600 tiles: passes of 1024 that start and end inside images
        for (b, c, o, h, w) in [
            (2, 5, 6, 7, 6),
            (1, 3, 4, 1, 1),
            (1, 4, 3, 70, 65),
            (2, 2, 2, 3, 5),
            (3, 3, 2, 40, 59),
        ] {
            let x = Tensor::randn(0f32, 1., (b, c, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1., (o, c, 3, 3), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1., o, &dev).unwrap();
            let g = Geo::new(&[b, c, h, w], 3, 1, 1).unwrap();
            let ours = conv3x3_winograd(
                &x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                &wt.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                Some(&bias.to_vec1::<f32>().unwrap()),
                &g,
                o,
            );
            let ours = Tensor::from_vec(ours, (b, o, h, w), &dev).unwrap();
            let theirs = x
                .conv2d(&wt, 1, 1, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, o, 1, 1)).unwrap())
                .unwrap();
            // the transforms add and halve a few unit normals before and after the products:
            // a few f32 epsilons of the largest output
            assert_close(&ours, &theirs, &format!("{b} {c} {o} {h} {w}"));
        }
    }

    #[test]
    fn matches_candles_conv2d_and_its_gradients() {
        let dev = Device::Cpu;
        // 48x48: 2304 positions, where the f32 weight gradient is made transposed
        for (stride, pad, k, h, w) in [
            (1, 1, 3, 7, 6),
            (2, 1, 3, 8, 10),
            (1, 0, 1, 5, 4),
            (1, 1, 3, 48, 48),
        ] {
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, h, w), &dev).unwrap()).unwrap();
            let wt =
                Var::from_tensor(&Tensor::randn(0f32, 1., (4, 3, k, k), &dev).unwrap()).unwrap();
            let bias = Var::from_tensor(&Tensor::randn(0f32, 1., 4, &dev).unwrap()).unwrap();
            let ours = conv2d_train(
                x.as_tensor(),
                wt.as_tensor(),
                Some(bias.as_tensor()),
                stride,
                pad,
            )
            .unwrap();
            let theirs = x
                .as_tensor()
                .conv2d(wt.as_tensor(), pad, stride, 1, 1)
                .unwrap()
                .broadcast_add(&bias.as_tensor().reshape((1, 4, 1, 1)).unwrap())
                .unwrap();
            let d = (&ours - &theirs).unwrap().abs().unwrap().max_all().unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 4e-5); // 27 products + bias: outputs up to ~20, a few f32 epsilons of those
                                                           // gradients of sum(y * r) for a random r (candle's own backward fails on odd sizes
                                                           // at stride 2, so the cases compared have even ones)
            let (g1, g2) = crate::cpu::weighted_grads(ours, theirs);
            for v in [&x, &wt, &bias] {
                let a = g1.get(v.as_tensor()).unwrap();
                let b = g2.get(v.as_tensor()).unwrap();
                let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
                let d = d.to_scalar::<f32>().unwrap();
                // f32 sums over up to 2 * 48 * 48 products: their rounding grows with the
                // gradient's size (measured 1.3e-6 of it at most; the small cases' 1e-4 is the
                // floor)
                let scale: f32 = b.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                assert!(
                    d < 1e-4f32.max(4e-6 * scale),
                    "stride {stride} pad {pad} k {k} {h}x{w}: {d} of {scale}"
                );
            }
        }
    }

    /// Only what depends on a variable gets a gradient: with a frozen weight the input's
    /// gradient is the same as with a trained one and the weight has none; with a plain input
    /// (a control image) only the weight has one.
    #[test]
    fn frozen_operands_get_no_gradient() {
        let dev = Device::Cpu;
        for (stride, pad, k) in [(1, 1, 3), (2, 1, 3), (1, 0, 1)] {
            let x = Tensor::randn(0f32, 1., (2, 3, 8, 6), &dev).unwrap();
            let w = Tensor::randn(0f32, 1., (4, 3, k, k), &dev).unwrap();
            let (xv, wv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
            let run = |x: &Tensor, w: &Tensor| {
                let y = conv2d_train(x, w, None, stride, pad).unwrap();
                let r = Tensor::ones(y.dims(), DType::F32, &dev).unwrap();
                (y * r).unwrap().sum_all().unwrap().backward().unwrap()
            };
            let both = run(xv.as_tensor(), wv.as_tensor());
            let frozen_w = run(xv.as_tensor(), &w);
            assert!(frozen_w.get(&w).is_none());
            assert_close(
                frozen_w.get(xv.as_tensor()).unwrap(),
                both.get(xv.as_tensor()).unwrap(),
                "input gradient",
            );
            let plain_x = run(&x, wv.as_tensor());
            assert!(plain_x.get(&x).is_none());
            assert_close(
                plain_x.get(wv.as_tensor()).unwrap(),
                both.get(wv.as_tensor()).unwrap(),
                "weight gradient",
            );
        }
    }

    /// The input gradient by Winograd (3x3, stride 1, enough tiles and channels) equals
    /// candle's conv2d gradient.
    #[test]
    fn winograd_input_gradient_matches_candles() {
        let dev = Device::Cpu;
        let (c, o) = (8, 12);
        assert!(
            winograd_pays(2 * 8 * 8, o, c),
            "the case must take the Winograd path"
        );
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, c, 16, 15), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1., (o, c, 3, 3), &dev).unwrap();
        let ours = conv2d_train(x.as_tensor(), &w, None, 1, 1).unwrap();
        let theirs = x.as_tensor().conv2d(&w, 1, 1, 1, 1).unwrap();
        let (g1, g2) = crate::cpu::weighted_grads(ours, theirs);
        assert_close(
            g1.get(x.as_tensor()).unwrap(),
            g2.get(x.as_tensor()).unwrap(),
            "input gradient",
        );
    }
}
