//! The few OpenCV drawing primitives pose rendering needs, with OpenCV's integer arithmetic
//! (imgproc/src/drawing.cpp): `ellipse2Poly`, `fillConvexPoly` (8-connected outline plus
//! 16.16 fixed-point scan conversion) and filled `circle` (midpoint algorithm).

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

    fn hline(&mut self, y: i64, x1: i64, x2: i64, c: [u8; 3]) {
        for x in x1..=x2 {
            self.put(x, y, c);
        }
    }
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
    let mut err = major - 2 * minor;
    let (mut x, mut y) = p1;
    for _ in 0..=major {
        c.put(x, y, col);
        let step_minor = err < 0;
        err += -2 * minor + if step_minor { 2 * major } else { 0 };
        if swap {
            y += sy;
            if step_minor {
                x += sx;
            }
        } else {
            x += sx;
            if step_minor {
                y += sy;
            }
        }
    }
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
    }
}

/// OpenCV's `Line2`: a line between 16.16 fixed-point points (the outline of shifted
/// polygons). The points are assumed inside the canvas (no clipping).
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
