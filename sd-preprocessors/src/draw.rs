//! The few OpenCV drawing primitives pose rendering needs, with OpenCV's integer arithmetic
//! (imgproc/src/drawing.cpp): `ellipse2Poly`, `fillConvexPoly` (8-connected outline plus
//! 16.16 fixed-point scan conversion) and filled `circle` (midpoint algorithm); and the 1-px
//! `line` (`clipLine` plus the left-to-right walk) M-LSD draws with.

/// An RGB canvas.
pub struct Canvas {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl Canvas {
    pub fn new(width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            data: vec![0; width * height * 3],
        }
    }

    fn put(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            let i = (y as usize * self.width + x as usize) * 3;
            self.data[i..i + 3].copy_from_slice(&c);
        }
    }

    /// A horizontal run, clipped to the canvas first (the pixels are those `put` would keep).
    fn hline(&mut self, y: i64, x1: i64, x2: i64, c: [u8; 3]) {
        if y < 0 || y >= self.height as i64 {
            return;
        }
        for x in x1.max(0)..=x2.min(self.width as i64 - 1) {
            self.put(x, y, c);
        }
    }
}

/// The first `k` in `lo..=hi` where the monotone `pred` (false, then true) holds; `hi + 1`
/// if none.
fn first_true(mut lo: i64, hi: i64, pred: impl Fn(i64) -> bool) -> i64 {
    let mut end = hi + 1;
    while lo < end {
        let mid = lo + (end - lo) / 2;
        if pred(mid) {
            end = mid;
        } else {
            lo = mid + 1;
        }
    }
    end
}

/// The steps `lo..=hi` of a line whose pixel `at(k)` is on the canvas, as a range. Both
/// coordinates of `at` are monotone in `k`, so those steps are one run, found by bisection:
/// drawing only them puts exactly the pixels the whole walk would, in time bounded by the
/// canvas however far off it the line's ends are.
fn visible_steps(
    c: &Canvas,
    lo: i64,
    hi: i64,
    at: impl Fn(i64) -> (i64, i64),
) -> std::ops::RangeInclusive<i64> {
    let (mut start, mut end) = (lo, hi);
    if lo > hi {
        return lo..=hi;
    }
    let xs = |k: i64| at(k).0;
    let ys = |k: i64| at(k).1;
    let axes: [(&dyn Fn(i64) -> i64, i64); 2] = [(&xs, c.width as i64), (&ys, c.height as i64)];
    for (coord, dim) in axes {
        let rising = coord(hi) >= coord(lo);
        let before = |k: i64| {
            let v = coord(k);
            if rising {
                v < 0
            } else {
                v >= dim
            }
        };
        let after = |k: i64| {
            let v = coord(k);
            if rising {
                v >= dim
            } else {
                v < 0
            }
        };
        start = start.max(first_true(lo, hi, |k| !before(k)));
        end = end.min(first_true(lo, hi, after) - 1);
    }
    start..=end
}

/// OpenCV's sine table: sin of each whole degree 0..=450, as 7-decimal float literals.
fn sin_table(deg: i32) -> f32 {
    let v = (deg as f64).to_radians().sin();
    ((v * 1e7).round() / 1e7) as f32
}

/// `cv2.ellipse2Poly(center, axes, angle, arc_start, arc_end, delta)`.
pub fn ellipse2poly(
    center: (i64, i64),
    axes: (i64, i64),
    angle: i32,
    arc_start: i32,
    arc_end: i32,
    delta: i32,
) -> Vec<(i64, i64)> {
    let mut angle = angle;
    while angle < 0 {
        angle += 360;
    }
    while angle > 360 {
        angle -= 360;
    }
    let (mut a0, mut a1) = (arc_start.min(arc_end), arc_start.max(arc_end));
    while a0 < 0 {
        a0 += 360;
        a1 += 360;
    }
    while a1 > 360 {
        a1 -= 360;
        a0 -= 360;
    }
    if a1 - a0 > 360 {
        a0 = 0;
        a1 = 360;
    }
    let alpha = sin_table(450 - angle); // cos
    let beta = sin_table(angle); // sin
    let mut pts: Vec<(i64, i64)> = Vec::new();
    let mut i = a0;
    while i < a1 + delta {
        let mut a = i.min(a1);
        if a < 0 {
            a += 360;
        }
        let x = axes.0 as f64 * sin_table(450 - a) as f64;
        let y = axes.1 as f64 * sin_table(a) as f64;
        let px = center.0 as f64 + x * alpha as f64 - y * beta as f64;
        let py = center.1 as f64 + x * beta as f64 + y * alpha as f64;
        // cvRound: round half to even
        let p = (px.round_ties_even() as i64, py.round_ties_even() as i64);
        if pts.last() != Some(&p) {
            pts.push(p);
        }
        i += delta;
    }
    if pts.len() == 1 {
        pts = vec![center, center];
    }
    pts
}

/// An 8-connected Bresenham line (OpenCV's LineIterator), clipped to the canvas.
fn line(c: &mut Canvas, p1: (i64, i64), p2: (i64, i64), col: [u8; 3]) {
    // drawing.cpp's Line iterates left to right (LineIterator with leftToRight = true)
    let (p1, p2) = if p1.0 > p2.0 { (p2, p1) } else { (p1, p2) };
    let (mut dx, mut dy) = (p2.0 - p1.0, p2.1 - p1.1);
    let (sx, sy) = (dx.signum().max(-1), dy.signum().max(-1));
    let (sx, sy) = (if sx == 0 { 1 } else { sx }, if sy == 0 { 1 } else { sy });
    dx = dx.abs();
    dy = dy.abs();
    // the major axis steps every time; the minor when the error says
    let swap = dy > dx;
    let (major, minor) = if swap { (dy, dx) } else { (dx, dy) };
    // The walk: `err` starts at `major - 2 minor`; each step moves along the major axis, and
    // along the minor one when `err < 0` (then `err += 2 major`); `err -= 2 minor` always.
    // After k >= 1 steps it has made ceil((2 minor (k - 1) - err0) / (2 major)) minor steps,
    // so the pixels on the canvas are computed directly (the walk itself could be 1e10 long).
    let err0 = (major - 2 * minor) as i128;
    let minor_steps = |k: i64| -> i64 {
        if k == 0 {
            return 0;
        }
        let num = 2 * minor as i128 * (k - 1) as i128 - err0;
        let den = 2 * major as i128;
        (-((-num).div_euclid(den))) as i64
    };
    let at = |k: i64| {
        let m = minor_steps(k);
        if swap {
            (p1.0 + sx * m, p1.1 + sy * k)
        } else {
            (p1.0 + sx * k, p1.1 + sy * m)
        }
    };
    for k in visible_steps(c, 0, major, at) {
        let (x, y) = at(k);
        c.put(x, y, col);
    }
}

/// OpenCV's `clipLine(Size2l, pt1, pt2)`: the segment cut to the canvas by its integer
/// arithmetic (int64 products wrap, divisions truncate; the ends are never level where it
/// divides); `None` when nothing of it is
/// on the canvas.
fn clip_line(
    w: i64,
    h: i64,
    (mut x1, mut y1): (i64, i64),
    (mut x2, mut y2): (i64, i64),
) -> Option<((i64, i64), (i64, i64))> {
    if w <= 0 || h <= 0 {
        return None;
    }
    let (right, bottom) = (w - 1, h - 1);
    let code = |x: i64, y: i64| {
        (x < 0) as u8 + (x > right) as u8 * 2 + (y < 0) as u8 * 4 + (y > bottom) as u8 * 8
    };
    let (mut c1, mut c2) = (code(x1, y1), code(x2, y2));
    if c1 & c2 == 0 && (c1 | c2) != 0 {
        if c1 & 12 != 0 {
            let a = if c1 < 8 { 0 } else { bottom };
            x1 = x1.wrapping_add((a - y1).wrapping_mul(x2 - x1).wrapping_div(y2 - y1));
            y1 = a;
            c1 = code(x1, 0);
        }
        if c2 & 12 != 0 {
            let a = if c2 < 8 { 0 } else { bottom };
            x2 = x2.wrapping_add((a - y2).wrapping_mul(x2 - x1).wrapping_div(y2 - y1));
            y2 = a;
            c2 = code(x2, 0);
        }
        if c1 & c2 == 0 && (c1 | c2) != 0 {
            if c1 != 0 {
                let a = if c1 == 1 { 0 } else { right };
                y1 = y1.wrapping_add((a - x1).wrapping_mul(y2 - y1).wrapping_div(x2 - x1));
                x1 = a;
                c1 = 0;
            }
            if c2 != 0 {
                let a = if c2 == 1 { 0 } else { right };
                y2 = y2.wrapping_add((a - x2).wrapping_mul(y2 - y1).wrapping_div(x2 - x1));
                x2 = a;
                c2 = 0;
            }
        }
    }
    ((c1 | c2) == 0).then_some(((x1, y1), (x2, y2)))
}

/// `cv2.line(img, p1, p2, color, 1)` (LINE_8, shift 0; points in int32 as cv2 takes them):
/// OpenCV's `Line`, whose `LineIterator` first cuts the segment to the canvas with `clipLine`
/// when an end is off it, then walks the cut segment left to right. (Walking the uncut segment
/// and dropping the off-canvas pixels puts different pixels.)
pub fn cv_line(c: &mut Canvas, p1: (i32, i32), p2: (i32, i32), col: [u8; 3]) {
    let (w, h) = (c.width as i64, c.height as i64);
    let (p1, p2) = ((p1.0 as i64, p1.1 as i64), (p2.0 as i64, p2.1 as i64));
    let inside = |p: (i64, i64)| (0..w).contains(&p.0) && (0..h).contains(&p.1);
    let (p1, p2) = if inside(p1) && inside(p2) {
        (p1, p2)
    } else {
        match clip_line(w, h, p1, p2) {
            Some(cut) => cut,
            None => return,
        }
    };
    line(c, p1, p2, col);
}

/// `cv2.fillConvexPoly(img, pts, color)` (LINE_8, shift 0).
pub fn fill_convex_poly(c: &mut Canvas, v: &[(i64, i64)], col: [u8; 3]) {
    fill_convex_poly_shift(c, v, col, 0)
}

/// OpenCV's `FillConvexPoly` for LINE_8 with `shift` fractional bits in the vertices.
fn fill_convex_poly_shift(c: &mut Canvas, v: &[(i64, i64)], col: [u8; 3], shift: i64) {
    const XY: i64 = 16;
    const ONE: i64 = 1 << XY;
    let n = v.len();
    if n == 0 {
        return;
    }
    let delta = (1i64 << shift) >> 1;
    let (delta1, delta2) = (ONE >> 1, ONE >> 1);
    let mut imin = 0;
    let (mut xmin, mut xmax, mut ymin, mut ymax) = (v[0].0, v[0].0, v[0].1, v[0].1);
    let up = |p: (i64, i64)| (p.0 << (XY - shift), p.1 << (XY - shift));
    let mut p0 = up(v[n - 1]);
    for (i, &p) in v.iter().enumerate() {
        if p.1 < ymin {
            ymin = p.1;
            imin = i;
        }
        ymax = ymax.max(p.1);
        xmax = xmax.max(p.0);
        xmin = xmin.min(p.0);
        let pf = up(p);
        if shift == 0 {
            line(c, (p0.0 >> XY, p0.1 >> XY), (pf.0 >> XY, pf.1 >> XY), col);
        } else {
            line2(c, p0, pf, col);
        }
        p0 = pf;
    }
    let (xmin, xmax) = ((xmin + delta) >> shift, (xmax + delta) >> shift);
    let (ymin, ymax) = ((ymin + delta) >> shift, (ymax + delta) >> shift);
    let (w, h) = (c.width as i64, c.height as i64);
    if n < 3 || xmax < 0 || ymax < 0 || xmin >= w || ymin >= h {
        return;
    }
    let ymax = ymax.min(h - 1);
    #[derive(Clone, Copy)]
    struct Edge {
        idx: usize,
        di: usize,
        x: i64,
        dx: i64,
        ye: i64,
    }
    let mut edge = [
        Edge {
            idx: imin,
            di: 1,
            x: -ONE,
            dx: 0,
            ye: ymin,
        },
        Edge {
            idx: imin,
            di: n - 1,
            x: -ONE,
            dx: 0,
            ye: ymin,
        },
    ];
    let mut edges = n as i64;
    let mut y = ymin;
    loop {
        for e in edge.iter_mut() {
            if y >= e.ye {
                let mut idx0 = e.idx;
                let mut idx = (idx0 + e.di) % n;
                loop {
                    if edges <= 0 {
                        edges -= 1;
                        break;
                    }
                    edges -= 1;
                    let ty = (v[idx].1 + delta) >> shift;
                    if ty > y {
                        let (xs, xe) = (v[idx0].0 << (XY - shift), v[idx].0 << (XY - shift));
                        e.ye = ty;
                        e.dx = ((xe - xs) * 2 + (ty - y)) / (2 * (ty - y));
                        e.x = xs;
                        e.idx = idx;
                        break;
                    }
                    idx0 = idx;
                    idx = (idx + e.di) % n;
                }
            }
        }
        if edges < 0 {
            break;
        }
        if y >= 0 {
            let (l, r) = if edge[0].x > edge[1].x {
                (1, 0)
            } else {
                (0, 1)
            };
            let x1 = (edge[l].x + delta1) >> XY;
            let x2 = (edge[r].x + delta2) >> XY;
            if x2 >= 0 && x1 < w {
                c.hline(y, x1.max(0), x2.min(w - 1), col);
            }
        }
        edge[0].x += edge[0].dx;
        edge[1].x += edge[1].dx;
        y += 1;
        if y > ymax {
            break;
        }
        // Rows above the canvas draw nothing: skip to the next edge event or row 0 at once
        // (the edges' x advance as they would row by row).
        if y < 0 {
            let target = edge[0].ye.min(edge[1].ye).min(0);
            if target > y {
                let k = (target - y) as i128;
                for e in edge.iter_mut() {
                    e.x = (e.x as i128 + e.dx as i128 * k) as i64;
                }
                y = target;
            }
        }
    }
}

/// OpenCV's `Line2`: a line between 16.16 fixed-point points (the outline of shifted
/// polygons); only the steps whose pixel is on the canvas are walked.
fn line2(c: &mut Canvas, mut p1: (i64, i64), mut p2: (i64, i64), col: [u8; 3]) {
    const XY: i64 = 16;
    const ONE: i64 = 1 << XY;
    let (mut dx, mut dy) = (p2.0 - p1.0, p2.1 - p1.1);
    let (ax, ay) = (dx.abs(), dy.abs());
    let (x_step, y_step, ecount);
    if ax > ay {
        if dx < 0 {
            std::mem::swap(&mut p1, &mut p2);
            dy = -dy;
        }
        x_step = ONE;
        y_step = (dy << XY) / (ax | 1);
        ecount = (p2.0 - p1.0) >> XY;
    } else {
        if dy < 0 {
            std::mem::swap(&mut p1, &mut p2);
            dx = -dx;
        }
        x_step = (dx << XY) / (ay | 1);
        y_step = ONE;
        ecount = (p2.1 - p1.1) >> XY;
    }
    p1.0 += ONE >> 1;
    p1.1 += ONE >> 1;
    c.put((p2.0 + (ONE >> 1)) >> XY, (p2.1 + (ONE >> 1)) >> XY, col);
    // step j of the walk (j = 0..=ecount) puts the pixel `at(j)`
    let at = |j: i64| {
        if ax > ay {
            ((p1.0 >> XY) + j, (p1.1 + j * y_step) >> XY)
        } else {
            ((p1.0 + j * x_step) >> XY, (p1.1 >> XY) + j)
        }
    };
    for j in visible_steps(c, 0, ecount, at) {
        let (x, y) = at(j);
        c.put(x, y, col);
    }
}

/// `cv2.line(img, p1, p2, color, thickness)` for thickness > 1 (LINE_8): OpenCV's
/// `ThickLine`, a fixed-point quadrilateral plus round caps.
pub fn thick_line(c: &mut Canvas, p0: (i64, i64), p1: (i64, i64), col: [u8; 3], thickness: i64) {
    const XY: i64 = 16;
    const ONE: i64 = 1 << XY;
    let (p0, p1) = ((p0.0 << XY, p0.1 << XY), (p1.0 << XY, p1.1 << XY));
    let dx = (p0.0 - p1.0) as f64 / ONE as f64;
    let dy = (p1.1 - p0.1) as f64 / ONE as f64;
    let r = dx * dx + dy * dy;
    let odd = thickness & 1;
    let t = thickness << (XY - 1);
    if r.abs() > f64::EPSILON {
        let r = (t as f64 + odd as f64 * ONE as f64 * 0.5) / r.sqrt();
        let dp = (
            (dy * r).round_ties_even() as i64,
            (dx * r).round_ties_even() as i64,
        );
        let pts = [
            (p0.0 + dp.0, p0.1 + dp.1),
            (p0.0 - dp.0, p0.1 - dp.1),
            (p1.0 - dp.0, p1.1 - dp.1),
            (p1.0 + dp.0, p1.1 + dp.1),
        ];
        fill_convex_poly_shift(c, &pts, col, XY);
    }
    for p in [p0, p1] {
        let center = ((p.0 + (ONE >> 1)) >> XY, (p.1 + (ONE >> 1)) >> XY);
        fill_circle(c, center, (t + (ONE >> 1)) >> XY, col);
    }
}

/// `cv2.circle(img, center, radius, color, thickness=-1)` (the midpoint `Circle` path).
pub fn fill_circle(c: &mut Canvas, center: (i64, i64), radius: i64, col: [u8; 3]) {
    let (mut err, mut dx, mut dy, mut plus, mut minus) =
        (0i64, radius, 0i64, 1i64, (radius << 1) - 1);
    while dx >= dy {
        let (y11, y12, y21, y22) = (center.1 - dy, center.1 + dy, center.1 - dx, center.1 + dx);
        let (x11, x12, x21, x22) = (center.0 - dx, center.0 + dx, center.0 - dy, center.0 + dy);
        c.hline(y11, x11, x12, col);
        c.hline(y12, x11, x12, col);
        c.hline(y21, x21, x22, col);
        c.hline(y22, x21, x22, col);
        dy += 1;
        err += plus;
        plus += 2;
        let mask = if err <= 0 { 0 } else { -1 };
        err -= minus & mask;
        dx += mask;
        minus -= mask & 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The walks as they were before clipping (every step, off-canvas pixels dropped by `put`).
    fn line_walk(c: &mut Canvas, p1: (i64, i64), p2: (i64, i64), col: [u8; 3]) {
        let (p1, p2) = if p1.0 > p2.0 { (p2, p1) } else { (p1, p2) };
        let (dx, dy) = (p2.0 - p1.0, p2.1 - p1.1);
        let sy = if dy < 0 { -1 } else { 1 };
        let (dx, dy) = (dx.abs(), dy.abs());
        let swap = dy > dx;
        let (major, minor) = if swap { (dy, dx) } else { (dx, dy) };
        let mut err = major - 2 * minor;
        let (mut x, mut y) = p1;
        for _ in 0..=major {
            c.put(x, y, col);
            let step_minor = err < 0;
            err += -2 * minor + if step_minor { 2 * major } else { 0 };
            if swap {
                y += sy;
                if step_minor {
                    x += 1;
                }
            } else {
                x += 1;
                if step_minor {
                    y += sy;
                }
            }
        }
    }

    fn line2_walk(c: &mut Canvas, mut p1: (i64, i64), mut p2: (i64, i64), col: [u8; 3]) {
        const XY: i64 = 16;
        const ONE: i64 = 1 << XY;
        let (mut dx, mut dy) = (p2.0 - p1.0, p2.1 - p1.1);
        let (ax, ay) = (dx.abs(), dy.abs());
        let (x_step, y_step, ecount);
        if ax > ay {
            if dx < 0 {
                std::mem::swap(&mut p1, &mut p2);
                dy = -dy;
            }
            x_step = ONE;
            y_step = (dy << XY) / (ax | 1);
            ecount = (p2.0 - p1.0) >> XY;
        } else {
            if dy < 0 {
                std::mem::swap(&mut p1, &mut p2);
                dx = -dx;
            }
            x_step = (dx << XY) / (ay | 1);
            y_step = ONE;
            ecount = (p2.1 - p1.1) >> XY;
        }
        p1.0 += ONE >> 1;
        p1.1 += ONE >> 1;
        c.put((p2.0 + (ONE >> 1)) >> XY, (p2.1 + (ONE >> 1)) >> XY, col);
        let mut n = ecount;
        if ax > ay {
            p1.0 >>= XY;
            while n >= 0 {
                c.put(p1.0, p1.1 >> XY, col);
                p1.0 += 1;
                p1.1 += y_step;
                n -= 1;
            }
        } else {
            p1.1 >>= XY;
            while n >= 0 {
                c.put(p1.0 >> XY, p1.1, col);
                p1.0 += x_step;
                p1.1 += 1;
                n -= 1;
            }
        }
    }

    /// A small deterministic generator (no dependency).
    fn lcg(state: &mut u64) -> i64 {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*state >> 33) as i64
    }

    #[test]
    fn clipped_walks_put_the_same_pixels() {
        let mut s = 7u64;
        for i in 0..4000 {
            let (w, h) = (1 + lcg(&mut s) % 40, 1 + lcg(&mut s) % 40);
            let span = if i % 2 == 0 { 60 } else { 400 };
            let mut pt = || (lcg(&mut s) % span - span / 3, lcg(&mut s) % span - span / 3);
            let (a, b) = (pt(), pt());
            let mut want = Canvas::new(w as usize, h as usize);
            let mut got = Canvas::new(w as usize, h as usize);
            line_walk(&mut want, a, b, [255, 1, 2]);
            line(&mut got, a, b, [255, 1, 2]);
            assert!(want.data == got.data, "line {a:?} {b:?} on {w}x{h}");
            let frac = |s: &mut u64| lcg(s) % 65536;
            let (a2, b2) = (
                ((a.0 << 16) + frac(&mut s), (a.1 << 16) + frac(&mut s)),
                ((b.0 << 16) + frac(&mut s), (b.1 << 16) + frac(&mut s)),
            );
            let mut want = Canvas::new(w as usize, h as usize);
            let mut got = Canvas::new(w as usize, h as usize);
            line2_walk(&mut want, a2, b2, [3, 4, 5]);
            line2(&mut got, a2, b2, [3, 4, 5]);
            assert!(want.data == got.data, "line2 {a2:?} {b2:?} on {w}x{h}");
        }
    }

    #[test]
    fn far_off_shapes_take_no_time() {
        let t = std::time::Instant::now();
        let mut c = Canvas::new(64, 64);
        let far = 1i64 << 26;
        line(&mut c, (-far, -far), (far, far / 3), [255, 0, 0]);
        fill_convex_poly(&mut c, &[(-far, -far), (far, 10), (20, far)], [0, 255, 0]);
        thick_line(&mut c, (-far, 5), (far, 40), [0, 0, 255], 2);
        fill_circle(&mut c, (far, far), 4, [9, 9, 9]);
        let poly = ellipse2poly((far / 2, 30), (far, 4), 17, 0, 360, 1);
        fill_convex_poly(&mut c, &poly, [1, 2, 3]);
        assert!(t.elapsed().as_secs_f64() < 2.0, "{:?}", t.elapsed());
        assert!(c.data.iter().any(|&v| v != 0));
    }
}
