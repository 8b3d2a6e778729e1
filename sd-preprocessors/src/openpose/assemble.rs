//! From heatmaps and part affinity fields to people: controlnet_aux `Body.__call__` after
//! the network (peak finding on Gaussian-smoothed heatmaps, PAF scoring of limb candidates,
//! greedy matching and person assembly), ported operation for operation in f64.

/// A detected part: pixel position, heatmap value, and its global id (index in the list of
/// all candidates).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub x: i64,
    pub y: i64,
    pub score: f64,
    pub id: usize,
}

/// A person: the candidate id of each of the 18 parts (-1 = missing), total score, part count
/// (the reference's `subset` row of 20).
pub type PersonRow = [f64; 20];

const THRE1: f64 = 0.1;
const THRE2: f64 = 0.05;
const MID_NUM: usize = 10;

/// 1-based part pairs of the 19 limbs.
pub const LIMB_SEQ: [[usize; 2]; 19] = [
    [2, 3],
    [2, 6],
    [3, 4],
    [4, 5],
    [6, 7],
    [7, 8],
    [2, 9],
    [9, 10],
    [10, 11],
    [2, 12],
    [12, 13],
    [13, 14],
    [2, 1],
    [1, 15],
    [15, 17],
    [1, 16],
    [16, 18],
    [3, 17],
    [6, 18],
];

/// The PAF channel pair of each limb (`mapIdx`, minus the 19 heatmap channels).
pub const MAP_IDX: [[usize; 2]; 19] = [
    [31, 32],
    [39, 40],
    [33, 34],
    [35, 36],
    [41, 42],
    [43, 44],
    [19, 20],
    [21, 22],
    [23, 24],
    [25, 26],
    [27, 28],
    [29, 30],
    [47, 48],
    [49, 50],
    [53, 54],
    [51, 52],
    [55, 56],
    [37, 38],
    [45, 46],
];

/// numpy's pairwise sum (8 accumulators for blocks of up to 128 values).
fn np_sum(a: &[f64]) -> f64 {
    if a.len() < 8 {
        return a.iter().fold(0.0, |s, v| s + v);
    }
    assert!(a.len() <= 128);
    let mut r = [0f64; 8];
    r.copy_from_slice(&a[..8]);
    let full = a.len() - a.len() % 8;
    let mut i = 8;
    while i < full {
        for j in 0..8 {
            r[j] += a[i + j];
        }
        i += 8;
    }
    let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for v in &a[full..] {
        res += v;
    }
    res
}

/// scipy's `_gaussian_kernel1d(sigma, 0, radius)` with radius `int(4 sigma + 0.5)`.
fn gaussian_kernel(sigma: f64) -> Vec<f64> {
    let radius = (4.0 * sigma + 0.5) as i64;
    let s2 = sigma * sigma;
    let phi: Vec<f64> = (-radius..=radius)
        .map(|x| (-0.5 / s2 * (x * x) as f64).exp())
        .collect();
    let total = np_sum(&phi);
    phi.iter().map(|v| v / total).collect()
}

/// `scipy.ndimage.gaussian_filter(map, sigma)` (mode `reflect`, truncate 4): axis 0 then 1,
/// each line filtered as `NI_Correlate1D` does for symmetric weights.
pub fn gaussian_filter(map: &[f64], w: usize, h: usize, sigma: f64) -> Vec<f64> {
    let k = gaussian_kernel(sigma);
    let r = k.len() / 2;
    let reflect = |i: isize, n: usize| -> usize {
        let p = 2 * n as isize;
        let m = i.rem_euclid(p) as usize;
        if m >= n {
            p as usize - 1 - m
        } else {
            m
        }
    };
    // axis 0: whole rows at a time (each column summed in the same order as a lone line:
    // the centre, then the pairs from the outermost in)
    let mut tmp = vec![0f64; w * h];
    for (y, dst) in tmp.chunks_exact_mut(w.max(1)).enumerate() {
        let row = |yy: usize| &map[yy * w..(yy + 1) * w];
        for (d, &c) in dst.iter_mut().zip(row(y)) {
            *d = c * k[r];
        }
        for jj in (1..=r).rev() {
            let a = row(reflect(y as isize - jj as isize, h));
            let b = row(reflect(y as isize + jj as isize, h));
            let kk = k[r - jj];
            for ((d, &a), &b) in dst.iter_mut().zip(a).zip(b) {
                *d += (a + b) * kk;
            }
        }
    }
    // axis 1: each row through a reflect-padded copy
    let mut out = vec![0f64; w * h];
    let mut padded = vec![0f64; w + 2 * r];
    for (src, dst) in tmp
        .chunks_exact(w.max(1))
        .zip(out.chunks_exact_mut(w.max(1)))
    {
        for (i, p) in padded.iter_mut().enumerate() {
            *p = src[reflect(i as isize - r as isize, w)];
        }
        for (i, o) in dst.iter_mut().enumerate() {
            let mut s = padded[i + r] * k[r];
            for jj in (1..=r).rev() {
                s += (padded[i + r - jj] + padded[i + r + jj]) * k[r - jj];
            }
            *o = s;
        }
    }
    out
}

/// Peaks of each of the 18 part heatmaps (`heat`: H x W x 19, channel last): local maxima of
/// the smoothed map (>= the 4 axis neighbours, zero outside) above 0.1, scored by the raw map.
pub fn find_peaks(heat: &[f64], w: usize, h: usize) -> Vec<Vec<Candidate>> {
    let mut all = Vec::with_capacity(18);
    let mut counter = 0;
    // the 18 smoothings in parallel; peaks numbered in part order afterwards
    let maps: Vec<Vec<f64>> = (0..18)
        .map(|part| (0..w * h).map(|i| heat[i * 19 + part]).collect())
        .collect();
    let mut smoothed: Vec<Vec<f64>> = vec![Vec::new(); 18];
    let threads = crate::conv::threads().clamp(1, 18);
    std::thread::scope(|sc| {
        for (t, chunk) in smoothed.chunks_mut(18usize.div_ceil(threads)).enumerate() {
            let maps = &maps;
            sc.spawn(move || {
                for (i, out) in chunk.iter_mut().enumerate() {
                    *out = gaussian_filter(&maps[t * 18usize.div_ceil(threads) + i], w, h, 3.0);
                }
            });
        }
    });
    for (map, s) in maps.iter().zip(&smoothed) {
        let at = |x: isize, y: isize| -> f64 {
            if x < 0 || y < 0 || x >= w as isize || y >= h as isize {
                0.0
            } else {
                s[y as usize * w + x as usize]
            }
        };
        let mut peaks = Vec::new();
        for y in 0..h as isize {
            for x in 0..w as isize {
                let v = at(x, y);
                if v >= at(x, y - 1)
                    && v >= at(x, y + 1)
                    && v >= at(x - 1, y)
                    && v >= at(x + 1, y)
                    && v > THRE1
                {
                    peaks.push(Candidate {
                        x: x as i64,
                        y: y as i64,
                        score: map[y as usize * w + x as usize],
                        id: counter,
                    });
                    counter += 1;
                }
            }
        }
        all.push(peaks);
    }
    all
}

/// numpy's `linspace(a, b, 10)`.
fn linspace(a: f64, b: f64) -> [f64; MID_NUM] {
    let step = (b - a) / (MID_NUM - 1) as f64;
    let mut out = [0f64; MID_NUM];
    for (i, o) in out.iter_mut().enumerate() {
        *o = if step == 0.0 {
            (i as f64 / (MID_NUM - 1) as f64) * (b - a) + a
        } else {
            i as f64 * step + a
        };
    }
    out[MID_NUM - 1] = b;
    out
}

/// A limb connection: candidate ids of both ends, score, and indices in the part lists.
type Connection = (usize, usize, f64, usize, usize);

/// Score the limb candidates of every limb and match them greedily.
fn connections(
    peaks: &[Vec<Candidate>],
    paf: &[f64],
    w: usize,
    h: usize,
) -> Vec<Option<Vec<Connection>>> {
    let mut all = Vec::new();
    for (k, idx) in MAP_IDX.iter().enumerate() {
        let (ca, cb) = (idx[0] - 19, idx[1] - 19);
        let cand_a = &peaks[LIMB_SEQ[k][0] - 1];
        let cand_b = &peaks[LIMB_SEQ[k][1] - 1];
        let (na, nb) = (cand_a.len(), cand_b.len());
        if na == 0 || nb == 0 {
            all.push(None);
            continue;
        }
        let mut cands: Vec<(usize, usize, f64)> = Vec::new();
        for (i, a) in cand_a.iter().enumerate() {
            for (j, b) in cand_b.iter().enumerate() {
                let (vx, vy) = (b.x - a.x, b.y - a.y);
                let norm = ((vx * vx + vy * vy) as f64).sqrt().max(0.001);
                let (ux, uy) = (vx as f64 / norm, vy as f64 / norm);
                let xs = linspace(a.x as f64, b.x as f64);
                let ys = linspace(a.y as f64, b.y as f64);
                let mut score = [0f64; MID_NUM];
                for s in 0..MID_NUM {
                    // int(round(.)) rounds half to even, as numpy does
                    let px = xs[s].round_ties_even() as usize;
                    let py = ys[s].round_ties_even() as usize;
                    let base = (py * w + px) * 38;
                    score[s] = paf[base + ca] * ux + paf[base + cb] * uy;
                }
                let mean = score.iter().fold(0.0, |s, v| s + v) / MID_NUM as f64;
                let with_prior = mean + (0.5 * h as f64 / norm - 1.0).min(0.0);
                let above = score.iter().filter(|&&v| v > THRE2).count();
                if above as f64 > 0.8 * MID_NUM as f64 && with_prior > 0.0 {
                    cands.push((i, j, with_prior));
                }
            }
        }
        // sorted(..., key=score, reverse=True) keeps equal scores in their order
        cands.sort_by(|x, y| y.2.partial_cmp(&x.2).unwrap_or(std::cmp::Ordering::Equal));
        let mut conn: Vec<Connection> = Vec::new();
        for (i, j, s) in cands {
            if !conn.iter().any(|c| c.3 == i) && !conn.iter().any(|c| c.4 == j) {
                conn.push((cand_a[i].id, cand_b[j].id, s, i, j));
                if conn.len() >= na.min(nb) {
                    break;
                }
            }
        }
        all.push(Some(conn));
    }
    all
}

/// People from peaks and PAFs (`paf`: H x W x 38): the reference's `subset` rows, after
/// dropping people with fewer than 4 parts or a mean score under 0.4.
pub fn assemble(
    peaks: &[Vec<Candidate>],
    paf: &[f64],
    w: usize,
    h: usize,
) -> (Vec<Candidate>, Vec<PersonRow>) {
    let candidates: Vec<Candidate> = peaks.iter().flatten().copied().collect();
    let conns = connections(peaks, paf, w, h);
    let mut subset: Vec<PersonRow> = Vec::new();
    for (k, conn) in conns.iter().enumerate() {
        let Some(conn) = conn else { continue };
        let (ia, ib) = (LIMB_SEQ[k][0] - 1, LIMB_SEQ[k][1] - 1);
        for c in conn {
            let (pa, pb) = (c.0 as f64, c.1 as f64);
            let mut found = 0;
            let mut idx = [0usize; 2];
            for (j, row) in subset.iter().enumerate() {
                if row[ia] == pa || row[ib] == pb {
                    // The reference indexes a 2-slot list here and fails on a third match;
                    // we keep the first two.
                    if found < 2 {
                        idx[found] = j;
                    }
                    found += 1;
                }
            }
            if found == 1 {
                let row = &mut subset[idx[0]];
                if row[ib] != pb {
                    row[ib] = pb;
                    row[19] += 1.0;
                    row[18] += candidates[c.1].score + c.2;
                }
            } else if found >= 2 {
                let (j1, j2) = (idx[0], idx[1]);
                let overlap = (0..18).any(|p| subset[j1][p] >= 0.0 && subset[j2][p] >= 0.0);
                if !overlap {
                    let r2 = subset[j2];
                    let r1 = &mut subset[j1];
                    for p in 0..18 {
                        r1[p] += r2[p] + 1.0;
                    }
                    r1[18] += r2[18];
                    r1[19] += r2[19];
                    r1[18] += c.2;
                    subset.remove(j2);
                } else {
                    let r1 = &mut subset[j1];
                    r1[ib] = pb;
                    r1[19] += 1.0;
                    r1[18] += candidates[c.1].score + c.2;
                }
            } else if k < 17 {
                let mut row = [-1f64; 20];
                row[ia] = pa;
                row[ib] = pb;
                row[19] = 2.0;
                row[18] = (candidates[c.0].score + candidates[c.1].score) + c.2;
                subset.push(row);
            }
        }
    }
    subset.retain(|r| !(r[19] < 4.0 || r[18] / r[19] < 0.4));
    (candidates, subset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_is_normalised_and_symmetric() {
        let k = gaussian_kernel(3.0);
        assert_eq!(k.len(), 25);
        assert!((k.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert_eq!(k[0], k[24]);
    }

    #[test]
    fn linspace_matches_numpy() {
        // numpy.linspace(3, 10, 10)[4] == 6.111111111111111
        let l = linspace(3.0, 10.0);
        assert_eq!(l[4], 6.111111111111111);
        assert_eq!(l[9], 10.0);
    }
}
