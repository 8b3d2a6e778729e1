//! 3x3 stride-1 pad-1 convolutions (f32, CPU, inference) for networks that chain hundreds of
//! them, such as the ESRGAN family's dense blocks: Winograd F(2x2, 3x3) (Lavin & Gray 2015)
//! over feature maps kept in a *phase layout* between layers.
//!
//! A Winograd tile reads a 4x4 window at even offsets and writes a 2x2 block of outputs. In
//! the phase layout ([`Phased`]) each channel is stored as four planes, plane `2a + b` holding
//! the pixels `(2y + a, 2x + b)`: every window row the input transform reads, and every output
//! row it writes, is then a contiguous run over consecutive tiles (no strided gathers or
//! scatters), and nearest x2 upsampling is four copies of a plane. Each convolution runs in
//! chunks of tiles, one chunk per task: the chunk's input transforms for every input channel
//! (the inputs may be several maps, a concatenation that is never built), 16 matrix products
//! by an AVX-512 register-blocked kernel (a portable loop elsewhere), then the output transform
//! with the bias and the activation or residual fused in, so a chunk's transformed data stays
//! in the core's cache.

use rayon::prelude::*;

/// A feature map `[C, H, W]` in the phase layout: per channel four planes of `(TH + 2) x
/// (TW + 2)` (`TH = ceil(H / 2)`, `TW = ceil(W / 2)`), plane `2a + b` holding pixel
/// `(2y + a, 2x + b)` at `(y + 1, x + 1)`; the one-element border and the positions of pixels
/// outside the image (odd sides) hold zeros, the convolution's zero padding.
#[derive(Debug, Clone)]
pub struct Phased {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    th: usize,
    tw: usize,
    data: Vec<f32>,
}

impl Phased {
    pub fn zeros(c: usize, h: usize, w: usize) -> Self {
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        Self {
            c,
            h,
            w,
            th,
            tw,
            data: vec![0f32; c * 4 * (th + 2) * (tw + 2)],
        }
    }

    fn stride(&self) -> usize {
        self.tw + 2
    }

    fn plane(&self) -> usize {
        (self.th + 2) * (self.tw + 2)
    }

    fn chan(&self) -> usize {
        4 * self.plane()
    }

    /// The four phase planes of channel `c`.
    fn planes(&self, c: usize) -> [&[f32]; 4] {
        let (plane, chan) = (self.plane(), self.chan());
        let ch = &self.data[c * chan..(c + 1) * chan];
        std::array::from_fn(|p| &ch[p * plane..(p + 1) * plane])
    }

    /// From a planar `[C, H, W]` map.
    pub fn from_planar(x: &[f32], c: usize, h: usize, w: usize) -> Self {
        assert_eq!(x.len(), c * h * w, "from_planar: {c}x{h}x{w}");
        let mut out = Self::zeros(c, h, w);
        let (stride, plane, chan) = (out.stride(), out.plane(), out.chan());
        out.data
            .par_chunks_mut(chan)
            .zip(x.par_chunks(h * w))
            .for_each(|(dst, src)| {
                for y in 0..h {
                    let row = &src[y * w..(y + 1) * w];
                    for b in 0..2 {
                        let at = (2 * (y % 2) + b) * plane + (y / 2 + 1) * stride + 1;
                        for (d, s) in dst[at..].iter_mut().zip(row.iter().skip(b).step_by(2)) {
                            *d = *s;
                        }
                    }
                }
            });
        out
    }

    /// The planar `[C, H, W]` map.
    pub fn to_planar(&self) -> Vec<f32> {
        let (h, w) = (self.h, self.w);
        let (stride, plane) = (self.stride(), self.plane());
        let mut out = vec![0f32; self.c * h * w];
        out.par_chunks_mut(h * w)
            .zip(self.data.par_chunks(self.chan()))
            .for_each(|(dst, src)| {
                for y in 0..h {
                    let row = &mut dst[y * w..(y + 1) * w];
                    for b in 0..2 {
                        let at = (2 * (y % 2) + b) * plane + (y / 2 + 1) * stride + 1;
                        for (d, s) in row.iter_mut().skip(b).step_by(2).zip(&src[at..]) {
                            *d = *s;
                        }
                    }
                }
            });
        out
    }

    /// Nearest x2 upsampling, `[C, 2H, 2W]`: each of its four phase planes is this map padded.
    pub fn upsample_nearest2x(&self) -> Phased {
        let planar = self.to_planar();
        let (h, w) = (self.h, self.w);
        let mut out = Phased::zeros(self.c, 2 * h, 2 * w);
        let (stride, plane, chan) = (out.stride(), out.plane(), out.chan());
        out.data
            .par_chunks_mut(chan)
            .zip(planar.par_chunks(h * w))
            .for_each(|(dst, src)| {
                for p in 0..4 {
                    for y in 0..h {
                        let at = p * plane + (y + 1) * stride + 1;
                        dst[at..at + w].copy_from_slice(&src[y * w..(y + 1) * w]);
                    }
                }
            });
        out
    }

    /// `self = self * scale + other` (same geometry; the zeros stay zeros).
    pub fn scale_add(&mut self, scale: f32, other: &Phased) {
        assert_eq!(
            (self.c, self.h, self.w),
            (other.c, other.h, other.w),
            "scale_add"
        );
        self.data
            .par_chunks_mut(1 << 14)
            .zip(other.data.par_chunks(1 << 14))
            .for_each(|(a, b)| scale_add_slice(a, scale, b));
    }

    /// Zero the positions of pixels outside the image (the last phase row / column of an odd
    /// side), which the output transform fills.
    fn clear_outside(&mut self) {
        let (stride, plane, chan) = (self.stride(), self.plane(), self.chan());
        let (h_odd, w_odd) = (self.h % 2 == 1, self.w % 2 == 1);
        if !h_odd && !w_odd {
            return;
        }
        let (th, tw) = (self.th, self.tw);
        self.data.par_chunks_mut(chan).for_each(|ch| {
            for p in 0..4 {
                let (a, b) = (p / 2, p % 2);
                let pl = &mut ch[p * plane..(p + 1) * plane];
                if h_odd && a == 1 {
                    pl[th * stride..(th + 1) * stride].fill(0.0);
                }
                if w_odd && b == 1 {
                    for y in 1..=th {
                        pl[y * stride + tw] = 0.0;
                    }
                }
            }
        });
    }
}

super::simd::simd_dispatch! {
    fn scale_add_slice(a: &mut [f32], scale: f32, b: &[f32]) -> () = scale_add_body
}

#[inline(always)]
fn scale_add_body(a: &mut [f32], scale: f32, b: &[f32]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x = *x * scale + *y;
    }
}

/// Output rows per register block of the product kernel.
const ROWS: usize = 8;

/// A 3x3 convolution's weights in the Winograd domain: `U = G g G^T` as `[16][O'/8][C][8]`
/// (`O'`: the outputs rounded up to 8, the extra rows zero), and the bias.
#[derive(Debug, Clone)]
pub struct WinoWeights {
    o: usize,
    op: usize,
    c: usize,
    u: Vec<f32>,
    bias: Vec<f32>,
}

impl WinoWeights {
    /// From `weight` `[O, C, 3, 3]` and `bias` `[O]` (row-major f32).
    pub fn new(weight: &[f32], bias: Option<&[f32]>, o: usize, c: usize) -> Self {
        assert_eq!(
            weight.len(),
            o * c * 9,
            "WinoWeights: weight of {o}x{c}x3x3"
        );
        let op = o.div_ceil(ROWS) * ROWS;
        let mut u = vec![0f32; 16 * op * c];
        for oi in 0..o {
            for ci in 0..c {
                let k = &weight[(oi * c + ci) * 9..][..9];
                // G g: 4x3, G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]
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
                        let e = i * 4 + j;
                        u[((e * (op / ROWS) + oi / ROWS) * c + ci) * ROWS + oi % ROWS] = v;
                    }
                }
            }
        }
        let mut b = vec![0f32; op];
        if let Some(bias) = bias {
            assert_eq!(bias.len(), o, "WinoWeights: bias of {o}");
            b[..o].copy_from_slice(bias);
        }
        Self {
            o,
            op,
            c,
            u,
            bias: b,
        }
    }

    pub fn outputs(&self) -> usize {
        self.o
    }

    pub fn inputs(&self) -> usize {
        self.c
    }
}

/// What follows the convolution and its bias, fused into the output transform.
#[derive(Debug, Clone, Copy)]
pub enum Epilogue<'a> {
    /// Nothing.
    None,
    /// `max(y, slope * y)` (slope below 1).
    LeakyRelu(f32),
    /// Per output channel `max(0, y) + a[o] * min(0, y)`.
    PRelu(&'a [f32]),
    /// `scale * y + add` (`add` of the output's geometry).
    Residual { scale: f32, add: &'a Phased },
}

/// Tiles per lane group of the transforms.
const LANES: usize = 16;

/// The chunk of tiles one task transforms and multiplies: its transformed inputs and products
/// (`16 (C + O')` values per tile) about 512 KiB, a quarter of a core's L2 (measured on
/// RRDBNet x4plus, 224x224 input: 6.4 s per call against 7.8 s with 1.5 MiB chunks); whole tile
/// rows (`tw` tiles) where one fits, so each channel's windows are read in one run, else a
/// multiple of the product kernel's 48 columns.
fn chunk_tiles(c: usize, op: usize, tw: usize) -> usize {
    let per_tile = 16 * (c + op) * 4;
    let budget = (1 << 19) / per_tile;
    if tw <= budget * 4 / 3 {
        tw * (budget / tw).max(1)
    } else {
        (budget / 48 * 48).clamp(48, 1536)
    }
}

/// Raw output pointer shared by the tasks, each writing only its own tiles' positions.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: the tasks write disjoint positions (their own tiles) of one buffer that outlives them.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// `offset` elements further (a method, so closures capture the whole wrapper).
    fn offset(self, offset: usize) -> Self {
        SharedOut(self.0.wrapping_add(offset))
    }
}

/// `conv3x3(concat(inputs), w) + bias`, then `epilogue`, all maps of one geometry; the inputs'
/// channels together are the weight's.
pub fn conv3x3(inputs: &[&Phased], w: &WinoWeights, epilogue: Epilogue) -> Phased {
    conv3x3_with(inputs, w, epilogue, avx512())
}

fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn conv3x3_with(inputs: &[&Phased], w: &WinoWeights, epilogue: Epilogue, fast: bool) -> Phased {
    let first = inputs.first().expect("conv3x3: no input");
    let (h, wd) = (first.h, first.w);
    assert!(
        inputs.iter().all(|x| x.h == h && x.w == wd),
        "conv3x3: inputs of different sizes"
    );
    let c: usize = inputs.iter().map(|x| x.c).sum();
    assert_eq!(
        c, w.c,
        "conv3x3: {c} input channels for a weight of {}",
        w.c
    );
    if let Epilogue::Residual { add, .. } = epilogue {
        assert_eq!(
            (add.c, add.h, add.w),
            (w.o, h, wd),
            "conv3x3: residual shape"
        );
    }
    if let Epilogue::PRelu(a) = epilogue {
        assert_eq!(a.len(), w.o, "conv3x3: PReLU slopes");
    }
    let mut out = Phased::zeros(w.o, h, wd);
    let (th, tw) = (out.th, out.tw);
    let total = th * tw;
    let n = chunk_tiles(c, w.op, tw);
    let chunks: Vec<(usize, usize)> = (0..total)
        .step_by(n)
        .map(|t0| (t0, (t0 + n).min(total)))
        .collect();
    let dst = SharedOut(out.data.as_mut_ptr());
    let geo = (out.stride(), out.plane(), out.chan());
    // every input channel's four phase planes, in the weight's channel order
    let chans: Vec<([&[f32]; 4], usize)> = inputs
        .iter()
        .flat_map(|x| (0..x.c).map(move |xc| (x.planes(xc), x.stride())))
        .collect();
    chunks.par_iter().for_each_init(
        || (vec![0f32; 16 * c * n], vec![0f32; 16 * w.op * n]),
        |(v, m), &(t0, t1)| {
            let nn = t1 - t0;
            // V[ci][e][k]: each channel's transforms one block, rows of nn tiles
            for (ci, &(planes, stride)) in chans.iter().enumerate() {
                // the windows of a channel two ahead, so they come from memory while this one
                // is transformed (a chunk reads a short run of each of many planes, too short
                // for the hardware prefetcher)
                #[cfg(target_arch = "x86_64")]
                if let (true, Some(&(ahead, _))) = (fast, chans.get(ci + 2)) {
                    each_run(tw, t0, t1, |ty, tx, _, run| {
                        avx512::prefetch(ahead, stride, ty, tx, run)
                    });
                }
                each_run(tw, t0, t1, |ty, tx, k, run| {
                    let at = ci * 16 * nn + k;
                    #[cfg(target_arch = "x86_64")]
                    if fast {
                        // SAFETY: AVX-512F detected; `at + run` and the window rows are
                        // inside `v` and the planes (asserted there)
                        unsafe { avx512::input(planes, stride, ty, tx, run, v, at, nn) };
                        return;
                    }
                    input_transform(planes, stride, ty, tx, run, v, at, nn);
                });
            }
            for e in 0..16 {
                let u = &w.u[e * w.op * c..(e + 1) * w.op * c];
                let me = &mut m[e * w.op * nn..(e + 1) * w.op * nn];
                product(u, &v[e * nn..], c, nn, 16 * nn, me, w.op, fast);
            }
            let (stride, plane, chan) = geo;
            for o in 0..w.o {
                let bias = w.bias[o];
                let act = match epilogue {
                    Epilogue::None => Act::None,
                    Epilogue::LeakyRelu(s) => Act::Leaky(s),
                    Epilogue::PRelu(a) => Act::Leaky(a[o]),
                    Epilogue::Residual { scale, add } => {
                        Act::Residual(scale, &add.data[o * chan..])
                    }
                };
                // channel o of the output, of which this task writes only its tiles' positions
                let out = dst.offset(o * chan);
                each_run(tw, t0, t1, |ty, tx, k, run| {
                    let pos = (ty + 1) * stride + tx + 1;
                    let (at, es) = (o * nn + k, w.op * nn);
                    #[cfg(target_arch = "x86_64")]
                    if fast {
                        // SAFETY: AVX-512F detected; the products and the output positions of
                        // these tiles are inside their buffers (asserted there for `m`)
                        unsafe { avx512::output(m, at, es, bias, act, out, plane, pos, run) };
                        return;
                    }
                    output_transform(m, at, es, bias, act, out, plane, pos, run);
                });
            }
        },
    );
    out.clear_outside();
    out
}

/// The activation of one output channel.
#[derive(Clone, Copy)]
enum Act<'a> {
    None,
    /// `max(0, y) + s * min(0, y)`.
    Leaky(f32),
    /// `scale * y + add[..]` (the channel's four planes).
    Residual(f32, &'a [f32]),
}

/// Calls `f(ty, tx, k, run)` for each run of tiles of one tile row within `t0..t1`, `k` the
/// first one's index in the chunk.
#[inline(always)]
fn each_run(tw: usize, t0: usize, t1: usize, mut f: impl FnMut(usize, usize, usize, usize)) {
    let mut t = t0;
    while t < t1 {
        let (ty, tx) = (t / tw, t % tw);
        let run = (t1 - t).min(tw - tx);
        f(ty, tx, t - t0, run);
        t += run;
    }
}

#[inline(always)]
fn load(src: &[f32], len: usize) -> [f32; LANES] {
    let mut v = [0f32; LANES];
    if len == LANES {
        v.copy_from_slice(&src[..LANES]);
    } else {
        v[..len].copy_from_slice(&src[..len]);
    }
    v
}

#[inline(always)]
fn store(dst: &mut [f32], v: &[f32; LANES], len: usize) {
    if len == LANES {
        dst[..LANES].copy_from_slice(v);
    } else {
        dst[..len].copy_from_slice(&v[..len]);
    }
}

#[inline(always)]
fn map2(a: &[f32; LANES], b: &[f32; LANES], f: impl Fn(f32, f32) -> f32) -> [f32; LANES] {
    std::array::from_fn(|k| f(a[k], b[k]))
}

super::simd::simd_dispatch! {
    /// `V = B^T d B` for the tiles `(ty, tx .. tx + run)` of one channel (its four phase
    /// planes), `B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`: element
    /// `e` of tile `i` to `v[e * es + at + i]`.
    #[allow(clippy::too_many_arguments)]
    fn input_transform(planes: [&[f32]; 4], stride: usize, ty: usize, tx: usize, run: usize, v: &mut [f32], at: usize, es: usize) -> () = input_transform_body
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn input_transform_body(
    planes: [&[f32]; 4],
    stride: usize,
    ty: usize,
    tx: usize,
    run: usize,
    v: &mut [f32],
    at: usize,
    es: usize,
) {
    // window row i is image row 2ty + i - 1: phase row a = [1, 0, 1, 0][i] at padded row
    // ty + [0, 1, 1, 2][i]; likewise for columns
    const PHASE: [usize; 4] = [1, 0, 1, 0];
    const OFFSET: [usize; 4] = [0, 1, 1, 2];
    let mut g = 0;
    while g < run {
        let len = LANES.min(run - g);
        let d: [[[f32; LANES]; 4]; 4] = std::array::from_fn(|i| {
            std::array::from_fn(|j| {
                let p = planes[2 * PHASE[i] + PHASE[j]];
                load(&p[(ty + OFFSET[i]) * stride + tx + g + OFFSET[j]..], len)
            })
        });
        // B^T d, row by row
        let t: [[[f32; LANES]; 4]; 4] = [
            std::array::from_fn(|j| map2(&d[0][j], &d[2][j], |a, b| a - b)),
            std::array::from_fn(|j| map2(&d[1][j], &d[2][j], |a, b| a + b)),
            std::array::from_fn(|j| map2(&d[2][j], &d[1][j], |a, b| a - b)),
            std::array::from_fn(|j| map2(&d[1][j], &d[3][j], |a, b| a - b)),
        ];
        // (B^T d) B, column combinations
        for (i, r) in t.iter().enumerate() {
            let out = [
                map2(&r[0], &r[2], |a, b| a - b),
                map2(&r[1], &r[2], |a, b| a + b),
                map2(&r[2], &r[1], |a, b| a - b),
                map2(&r[1], &r[3], |a, b| a - b),
            ];
            for (j, vals) in out.iter().enumerate() {
                store(&mut v[(i * 4 + j) * es + at + g..], vals, len);
            }
        }
        g += LANES;
    }
}

super::simd::simd_dispatch! {
    /// `Y = A^T M A + bias`, `A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]`, then `act`, for `run`
    /// tiles from `m[e * es + at ..]` into the output channel's four phase planes at `pos`
    /// (`out`: the channel's first plane, which only this task writes at these positions).
    #[allow(clippy::too_many_arguments)]
    fn output_transform(m: &[f32], at: usize, es: usize, bias: f32, act: Act, out: SharedOut, plane: usize, pos: usize, run: usize) -> () = output_transform_body
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn output_transform_body(
    m: &[f32],
    at: usize,
    es: usize,
    bias: f32,
    act: Act,
    out: SharedOut,
    plane: usize,
    pos: usize,
    run: usize,
) {
    let mut g = 0;
    while g < run {
        let len = LANES.min(run - g);
        let e: [[f32; LANES]; 16] = std::array::from_fn(|n| load(&m[n * es + at + g..], len));
        let at = |i: usize, j: usize| &e[i * 4 + j];
        let s: [[[f32; LANES]; 4]; 2] = [
            std::array::from_fn(|j| {
                std::array::from_fn(|k| at(0, j)[k] + at(1, j)[k] + at(2, j)[k])
            }),
            std::array::from_fn(|j| {
                std::array::from_fn(|k| at(1, j)[k] - at(2, j)[k] - at(3, j)[k])
            }),
        ];
        for (a, r) in s.iter().enumerate() {
            let y: [[f32; LANES]; 2] = [
                std::array::from_fn(|k| r[0][k] + r[1][k] + r[2][k] + bias),
                std::array::from_fn(|k| r[1][k] - r[2][k] - r[3][k] + bias),
            ];
            for (b, yb) in y.iter().enumerate() {
                let idx = (2 * a + b) * plane + pos + g;
                let val: [f32; LANES] = match act {
                    Act::None => *yb,
                    Act::Leaky(slope) => {
                        std::array::from_fn(|k| yb[k].max(0.0) + slope * yb[k].min(0.0))
                    }
                    Act::Residual(scale, add) => {
                        let x = load(&add[idx..], len);
                        std::array::from_fn(|k| scale * yb[k] + x[k])
                    }
                };
                // SAFETY: position idx..idx + len of the channel's planes, inside the map and
                // written by this task alone (its own tiles)
                unsafe { std::ptr::copy_nonoverlapping(val.as_ptr(), out.0.add(idx), len) };
            }
        }
        g += LANES;
    }
}

/// `m[O', n] = u[O'/8][C][8] x v[C, n]` (one Winograd element), `v`'s rows `vs` apart, `m`
/// row-major with rows of `n`.
#[allow(clippy::too_many_arguments)]
fn product(
    u: &[f32],
    v: &[f32],
    c: usize,
    n: usize,
    vs: usize,
    m: &mut [f32],
    op: usize,
    fast: bool,
) {
    assert!(u.len() >= op * c && v.len() >= (c - 1) * vs + n && m.len() >= op * n && vs >= n);
    #[cfg(target_arch = "x86_64")]
    if fast {
        // SAFETY: AVX-512F was detected (`fast`); the sizes were checked above.
        unsafe { avx512::product(u, v, c, n, vs, m, op) };
        return;
    }
    let _ = fast;
    product_portable(u, v, c, n, vs, m, op);
}

super::simd::simd_dispatch! {
    fn product_portable(u: &[f32], v: &[f32], c: usize, n: usize, vs: usize, m: &mut [f32], op: usize) -> () = product_portable_body
}

#[inline(always)]
fn product_portable_body(
    u: &[f32],
    v: &[f32],
    c: usize,
    n: usize,
    vs: usize,
    m: &mut [f32],
    op: usize,
) {
    for ob in 0..op / ROWS {
        let ub = &u[ob * c * ROWS..(ob + 1) * c * ROWS];
        for r in 0..ROWS {
            let row = &mut m[(ob * ROWS + r) * n..(ob * ROWS + r + 1) * n];
            row.fill(0.0);
            for ci in 0..c {
                let a = ub[ci * ROWS + r];
                for (y, x) in row.iter_mut().zip(&v[ci * vs..ci * vs + n]) {
                    *y += a * x;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::ROWS;

    /// Columns per register block: three vectors of 16.
    const COLS: usize = 48;

    /// As [`super::product_portable`]: per block of 48 columns and 8 rows, 24 accumulators
    /// over the whole `C` loop (the block's `v` columns, `C * 192` bytes, stay in L1).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn product(
        u: &[f32],
        v: &[f32],
        c: usize,
        n: usize,
        vs: usize,
        m: &mut [f32],
        op: usize,
    ) {
        let (u, v, m) = (u.as_ptr(), v.as_ptr(), m.as_mut_ptr());
        let mut tb = 0;
        while tb < n {
            let len = COLS.min(n - tb);
            let tail = len % 16;
            let mask: __mmask16 = if tail == 0 {
                0xFFFF
            } else {
                (1u16 << tail) - 1
            };
            for ob in 0..op / ROWS {
                // SAFETY (all three): inside u [op/8][c][8], v [c][n], m [op][n]; the last
                // vector is masked to the block's columns.
                unsafe {
                    let ub = u.add(ob * c * ROWS);
                    let mb = m.add(ob * ROWS * n + tb);
                    match len.div_ceil(16) {
                        3 => block::<3>(ub, v.add(tb), c, vs, mb, n, mask),
                        2 => block::<2>(ub, v.add(tb), c, vs, mb, n, mask),
                        _ => block::<1>(ub, v.add(tb), c, vs, mb, n, mask),
                    }
                }
            }
            tb += COLS;
        }
    }

    /// The mask of the first `len` (1 to 16) lanes.
    #[inline(always)]
    fn lanes(len: usize) -> __mmask16 {
        if len >= 16 {
            0xFFFF
        } else {
            (1u16 << len) - 1
        }
    }

    /// Prefetch (into L2) what [`input`] reads for these tiles: two rows of each plane.
    pub(super) fn prefetch(planes: [&[f32]; 4], stride: usize, ty: usize, tx: usize, run: usize) {
        for (p, plane) in planes.iter().enumerate() {
            // phase row 1 is read at padded rows ty, ty + 1; phase row 0 at ty + 1, ty + 2
            let first = ty + 1 - p / 2;
            for row in first..first + 2 {
                let line = &plane[row * stride + tx..][..run + 2];
                for k in (0..line.len()).step_by(16) {
                    // SAFETY: a prefetch of an address inside the slice
                    unsafe { _mm_prefetch::<_MM_HINT_T1>(line[k..].as_ptr() as *const i8) };
                }
            }
        }
    }

    /// [`super::input_transform`] with masked loads and stores.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn input(
        planes: [&[f32]; 4],
        stride: usize,
        ty: usize,
        tx: usize,
        run: usize,
        v: &mut [f32],
        at: usize,
        es: usize,
    ) {
        const PHASE: [usize; 4] = [1, 0, 1, 0];
        const OFFSET: [usize; 4] = [0, 1, 1, 2];
        // the last window element read and the last value written are inside the slices
        assert!((ty + 2) * stride + tx + run + 1 < planes[0].len());
        assert!(15 * es + at + run <= v.len());
        let p = planes.map(|p| p.as_ptr());
        let dst = v.as_mut_ptr();
        let mut g = 0;
        while g < run {
            let mask = lanes(run - g);
            // SAFETY: within the bounds asserted above (masked lanes are not accessed)
            unsafe {
                let d: [[__m512; 4]; 4] = std::array::from_fn(|i| {
                    std::array::from_fn(|j| {
                        let base = p[2 * PHASE[i] + PHASE[j]];
                        _mm512_maskz_loadu_ps(
                            mask,
                            base.add((ty + OFFSET[i]) * stride + tx + g + OFFSET[j]),
                        )
                    })
                });
                let out = crate::cpu::conv_op::winograd_input_avx512(&d);
                for (i, row) in out.iter().enumerate() {
                    for (j, &val) in row.iter().enumerate() {
                        _mm512_mask_storeu_ps(dst.add((i * 4 + j) * es + at + g), mask, val);
                    }
                }
            }
            g += 16;
        }
    }

    /// [`super::output_transform`] with masked loads and stores.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn output(
        m: &[f32],
        at: usize,
        es: usize,
        bias: f32,
        act: super::Act,
        out: super::SharedOut,
        plane: usize,
        pos: usize,
        run: usize,
    ) {
        assert!(15 * es + at + run <= m.len());
        let src = m.as_ptr();
        let b = _mm512_set1_ps(bias);
        let mut g = 0;
        while g < run {
            let mask = lanes(run - g);
            // SAFETY: products within the bound asserted above; outputs at the caller's
            // positions (see `output_transform`)
            unsafe {
                let e: [__m512; 16] =
                    std::array::from_fn(|n| _mm512_maskz_loadu_ps(mask, src.add(n * es + at + g)));
                let s: [[__m512; 4]; 2] = [
                    std::array::from_fn(|j| _mm512_add_ps(_mm512_add_ps(e[j], e[4 + j]), e[8 + j])),
                    std::array::from_fn(|j| {
                        _mm512_sub_ps(_mm512_sub_ps(e[4 + j], e[8 + j]), e[12 + j])
                    }),
                ];
                for (a, r) in s.iter().enumerate() {
                    let y = [
                        _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(r[0], r[1]), r[2]), b),
                        _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(r[1], r[2]), r[3]), b),
                    ];
                    for (bb, yb) in y.into_iter().enumerate() {
                        let idx = (2 * a + bb) * plane + pos + g;
                        let val = match act {
                            super::Act::None => yb,
                            super::Act::Leaky(slope) => _mm512_fmadd_ps(
                                _mm512_set1_ps(slope),
                                _mm512_min_ps(yb, _mm512_setzero_ps()),
                                _mm512_max_ps(yb, _mm512_setzero_ps()),
                            ),
                            super::Act::Residual(scale, add) => {
                                assert!(idx + (run - g).min(16) <= add.len());
                                let x = _mm512_maskz_loadu_ps(mask, add.as_ptr().add(idx));
                                _mm512_fmadd_ps(_mm512_set1_ps(scale), yb, x)
                            }
                        };
                        _mm512_mask_storeu_ps(out.0.add(idx), mask, val);
                    }
                }
            }
            g += 16;
        }
    }

    #[inline(always)]
    unsafe fn block<const NV: usize>(
        ub: *const f32,
        v: *const f32,
        c: usize,
        vs: usize,
        m: *mut f32,
        ms: usize,
        mask: __mmask16,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; ROWS];
        for ci in 0..c {
            // SAFETY: see `product`
            unsafe {
                let row = v.add(ci * vs);
                let x: [__m512; NV] = std::array::from_fn(|q| {
                    if q + 1 == NV {
                        _mm512_maskz_loadu_ps(mask, row.add(16 * q))
                    } else {
                        _mm512_loadu_ps(row.add(16 * q))
                    }
                });
                let up = ub.add(ci * ROWS);
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let a = _mm512_set1_ps(*up.add(r));
                    for q in 0..NV {
                        acc_r[q] = _mm512_fmadd_ps(a, x[q], acc_r[q]);
                    }
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            for (q, a) in acc_r.iter().enumerate() {
                // SAFETY: see `product`
                unsafe {
                    let p = m.add(r * ms + 16 * q);
                    if q + 1 == NV {
                        _mm512_mask_storeu_ps(p, mask, *a);
                    } else {
                        _mm512_storeu_ps(p, *a);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_values as rand;
    use candle_core::{Device, Tensor};

    fn candle_conv(
        x: &[f32],
        wt: &[f32],
        b: &[f32],
        c: usize,
        o: usize,
        h: usize,
        w: usize,
    ) -> Vec<f32> {
        let d = Device::Cpu;
        let x = Tensor::from_vec(x.to_vec(), (1, c, h, w), &d).unwrap();
        let k = Tensor::from_vec(wt.to_vec(), (o, c, 3, 3), &d).unwrap();
        let b = Tensor::from_vec(b.to_vec(), (1, o, 1, 1), &d).unwrap();
        x.conv2d(&k, 1, 1, 1, 1)
            .unwrap()
            .broadcast_add(&b)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn phase_layout_round_trips_and_upsamples() {
        for (h, w) in [(1, 1), (5, 7), (6, 4), (3, 40)] {
            let x = rand(2 * h * w, 1);
            let p = Phased::from_planar(&x, 2, h, w);
            assert_eq!(p.to_planar(), x);
            let up = p.upsample_nearest2x().to_planar();
            for c in 0..2 {
                for y in 0..2 * h {
                    for xx in 0..2 * w {
                        assert_eq!(
                            up[(c * 2 * h + y) * 2 * w + xx],
                            x[(c * h + y / 2) * w + xx / 2]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn conv_matches_candle_on_both_kernels() {
        // odd and even sides, tails of the 16-lane groups and 48-column blocks, outputs not a
        // multiple of 8, a concatenation of two inputs, chunks of whole tile rows and chunks
        // that start mid-row
        for (c1, c2, o, h, w) in [
            (3, 0, 8, 9, 13),
            (8, 4, 4, 34, 66),
            (5, 3, 3, 1, 2),
            (16, 0, 24, 70, 50),
            // rows wider than a chunk: chunks of 48 tiles starting mid-row
            (40, 24, 64, 7, 203),
        ] {
            let c = c1 + c2;
            let x = rand(c * h * w, 2);
            let wt = rand(o * c * 9, 3);
            let b = rand(o, 4);
            let want = candle_conv(&x, &wt, &b, c, o, h, w);
            let ww = WinoWeights::new(&wt, Some(&b), o, c);
            let a = Phased::from_planar(&x[..c1 * h * w], c1, h, w);
            let bb = Phased::from_planar(&x[c1 * h * w..], c2, h, w);
            let inputs: Vec<&Phased> = if c2 > 0 { vec![&a, &bb] } else { vec![&a] };
            for fast in [false, avx512()] {
                let got = conv3x3_with(&inputs, &ww, Epilogue::None, fast).to_planar();
                let d = max_diff(&got, &want);
                assert!(d < 1e-5, "{c}->{o} at {h}x{w} (fast {fast}): {d}");
            }
            // epilogues
            let lrelu: Vec<f32> = want.iter().map(|v| v.max(0.2 * v)).collect();
            let got = conv3x3(&inputs, &ww, Epilogue::LeakyRelu(0.2)).to_planar();
            assert!(max_diff(&got, &lrelu) < 1e-5);
            let add = rand(o * h * w, 5);
            let addp = Phased::from_planar(&add, o, h, w);
            let res: Vec<f32> = want.iter().zip(&add).map(|(v, a)| 0.2 * v + a).collect();
            let got = conv3x3(
                &inputs,
                &ww,
                Epilogue::Residual {
                    scale: 0.2,
                    add: &addp,
                },
            );
            assert!(max_diff(&got.to_planar(), &res) < 1e-5);
            let slopes = rand(o, 6);
            let pre: Vec<f32> = want
                .iter()
                .enumerate()
                .map(|(i, v)| v.max(0.0) + slopes[i / (h * w)] * v.min(0.0))
                .collect();
            let got = conv3x3(&inputs, &ww, Epilogue::PRelu(&slopes)).to_planar();
            assert!(max_diff(&got, &pre) < 1e-5);
            // the zeros outside the image stay zeros: a second conv on the output is exact
            let once = conv3x3(&inputs, &ww, Epilogue::None);
            let w2 = rand(o * o * 9, 7);
            let twice = conv3x3(&[&once], &WinoWeights::new(&w2, None, o, o), Epilogue::None);
            let want2 = candle_conv(&want, &w2, &vec![0.0; o], o, o, h, w);
            assert!(max_diff(&twice.to_planar(), &want2) < 1e-4);
        }
    }
}
