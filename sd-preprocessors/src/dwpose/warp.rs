//! `cv2.getAffineTransform` and `cv2.warpAffine(img, M, size, flags=INTER_LINEAR)` (constant
//! border 0) on 8-bit RGB images, as OpenCV 5 computes them (`warp_kernels.simd.hpp`, the
//! float kernels that replaced the 1/32-pixel fixed-point tables): the matrix is inverted in
//! double, each destination pixel's source position is rounded to float32, and the four taps
//! are blended in float32 with fused multiply-adds, then rounded half to even. Measured against
//! cv2 5.1 on the DWPose fixture's two crops: 6 of 221,184 pixels one level apart (source
//! positions one float32 step apart at the image's last column).

/// `cv2.getAffineTransform(src, dst)`: the 2x3 matrix mapping the three `src` points onto
/// `dst` (solved in double from the float32 points), row-major; all zeros when the points are
/// collinear (OpenCV's `solve` leaves zeros when LU finds the system singular).
pub fn affine_transform(src: [[f32; 2]; 3], dst: [[f32; 2]; 3]) -> [f64; 6] {
    // [x y 1 0 0 0; 0 0 0 x y 1] * m = [u; v] for each point: two 3x3 systems
    let a = [
        [src[0][0] as f64, src[0][1] as f64, 1.0],
        [src[1][0] as f64, src[1][1] as f64, 1.0],
        [src[2][0] as f64, src[2][1] as f64, 1.0],
    ];
    let solve = |b: [f64; 3]| solve3(a, b);
    let r0 = solve([dst[0][0] as f64, dst[1][0] as f64, dst[2][0] as f64]);
    let r1 = solve([dst[0][1] as f64, dst[1][1] as f64, dst[2][1] as f64]);
    match (r0, r1) {
        (Some(r0), Some(r1)) => [r0[0], r0[1], r0[2], r1[0], r1[1], r1[2]],
        _ => [0.0; 6],
    }
}

/// Gaussian elimination with partial pivoting (OpenCV's `solve` with `DECOMP_LU`).
fn solve3(mut a: [[f64; 3]; 3], mut b: [f64; 3]) -> Option<[f64; 3]> {
    for col in 0..3 {
        let p = (col..3).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[p][col] == 0.0 {
            return None;
        }
        a.swap(col, p);
        b.swap(col, p);
        let pivot = a[col];
        for r in col + 1..3 {
            let f = a[r][col] / pivot[col];
            for (x, p) in a[r].iter_mut().zip(pivot).skip(col) {
                *x -= f * p;
            }
            b[r] -= f * b[col];
        }
    }
    let mut x = [0.0; 3];
    for r in (0..3).rev() {
        let s: f64 = (r + 1..3).map(|c| a[r][c] * x[c]).sum();
        x[r] = (b[r] - s) / a[r][r];
    }
    Some(x)
}

/// `cv2.warpAffine(rgb, m, (width, height), flags=cv2.INTER_LINEAR)` of an interleaved 8-bit
/// image with `channels` channels: the destination, interleaved.
pub fn warp_affine(
    src: &[u8],
    (sw, sh): (usize, usize),
    channels: usize,
    m: [f64; 6],
    (dw, dh): (usize, usize),
) -> Vec<u8> {
    // dst -> src: the inverse of m (warpAffine without WARP_INVERSE_MAP)
    let d = m[0] * m[4] - m[1] * m[3];
    let d = if d != 0.0 { 1.0 / d } else { 0.0 };
    let (a11, a22) = (m[4] * d, m[0] * d);
    let (a12, a21) = (m[1] * -d, m[3] * -d);
    let b1 = -a11 * m[2] - a12 * m[5];
    let b2 = -a21 * m[2] - a22 * m[5];
    let mut out = vec![0u8; dw * dh * channels];
    let (cols, rows) = (sw as i64, sh as i64);
    let px = |x: i64, y: i64, c: usize| -> f32 {
        if x >= 0 && y >= 0 && x < cols && y < rows {
            src[(y as usize * sw + x as usize) * channels + c] as f32
        } else {
            0.0
        }
    };
    for y in 0..dh {
        for x in 0..dw {
            let (xf, yf) = (x as f64, y as f64);
            let sx = (xf * a11 + yf * a12 + b1) as f32;
            let sy = (xf * a21 + yf * a22 + b2) as f32;
            let (fx, fy) = (sx.floor(), sy.floor());
            let (ix, iy) = (fx as i64, fy as i64);
            // wholly outside: the border value
            if ix < -1 || iy < -1 || ix >= cols || iy >= rows || !sx.is_finite() || !sy.is_finite()
            {
                continue;
            }
            let (a, b) = (sx - fx, sy - fy);
            let o = (y * dw + x) * channels;
            for c in 0..channels {
                let (p00, p01) = (px(ix, iy, c), px(ix + 1, iy, c));
                let (p10, p11) = (px(ix, iy + 1, c), px(ix + 1, iy + 1, c));
                let v0 = a.mul_add(p01 - p00, p00);
                let v1 = a.mul_add(p11 - p10, p10);
                let v = b.mul_add(v1 - v0, v0);
                out[o + c] = v.round_ties_even().clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_affine_transform_maps_the_points() {
        let src = [[10.0, 20.0], [10.0, 5.0], [25.0, 20.0]];
        let dst = [[144.0, 192.0], [144.0, 0.0], [336.0, 192.0]];
        let m = affine_transform(src, dst);
        for (s, d) in src.iter().zip(&dst) {
            let u = m[0] * s[0] as f64 + m[1] * s[1] as f64 + m[2];
            let v = m[3] * s[0] as f64 + m[4] * s[1] as f64 + m[5];
            assert!((u - d[0] as f64).abs() < 1e-9 && (v - d[1] as f64).abs() < 1e-9);
        }
    }

    #[test]
    fn collinear_points_give_opencv_s_zero_matrix_and_a_warp_of_the_first_pixel() {
        let p = [[5.0, 5.0]; 3];
        let m = affine_transform(p, [[1.0, 2.0], [3.0, 4.0], [5.0, 7.0]]);
        assert_eq!(m, [0.0; 6]);
        let src: Vec<u8> = (7..7 + 4 * 3 * 3).collect();
        let out = warp_affine(&src, (4, 3), 3, m, (2, 2));
        assert_eq!(out, [7, 8, 9].repeat(4));
    }

    #[test]
    fn an_identity_warp_copies_and_a_shift_leaves_black() {
        let (w, h) = (7, 5);
        let src: Vec<u8> = (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect();
        let id = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0];
        assert_eq!(warp_affine(&src, (w, h), 3, id, (w, h)), src);
        // dst(x, y) = src(x - 2, y): the first two columns come from outside (0)
        let shift = [1.0, 0.0, 2.0, 0.0, 1.0, 0.0];
        let out = warp_affine(&src, (w, h), 3, shift, (w, h));
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    let want = if x < 2 {
                        0
                    } else {
                        src[(y * w + x - 2) * 3 + c]
                    };
                    assert_eq!(out[(y * w + x) * 3 + c], want, "{x},{y},{c}");
                }
            }
        }
    }
}
