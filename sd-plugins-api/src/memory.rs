//! One memory estimate for every size a user can name (issue 30): generation width, height
//! and batch, the UNet's `sample_size` default, pose canvases, training resolution and batch.
//! Each caller describes how its peak memory grows with the image ([`Cost`]: bytes per pixel
//! per batch item at the peak, plus what the peak is); [`check`] compares the estimate with
//! the memory available *before* anything is allocated and refuses with a message that says
//! what would fit. Available memory: `SDCTL_MEMORY_LIMIT` (bytes, or with a K/M/G/T suffix,
//! binary) if set, else Linux's `MemAvailable`; where neither is known nothing is refused.

/// The variable that sets the memory a job may use (tests, containers, shared machines).
pub const LIMIT_VAR: &str = "SDCTL_MEMORY_LIMIT";

/// How a job's peak memory grows with its image size.
#[derive(Debug, Clone, PartialEq)]
pub struct Cost {
    /// Bytes per image pixel per batch item at the peak.
    pub per_pixel: f64,
    /// Bytes that do not grow with the image.
    pub fixed: u64,
    /// The stage at the peak, in words ("the VAE decoder's 256-channel maps at full size").
    pub peak: String,
}

impl Cost {
    /// The estimated peak bytes of `width` x `height` images, `batch` at a time.
    pub fn bytes(&self, width: usize, height: usize, batch: usize) -> f64 {
        self.fixed as f64 + self.per_pixel * width as f64 * height as f64 * batch as f64
    }
}

/// Memory available to a job, and where the number comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Available {
    pub bytes: u64,
    /// `"SDCTL_MEMORY_LIMIT"` or `"MemAvailable"`.
    pub source: &'static str,
}

/// The memory a job may use: [`LIMIT_VAR`] if set (a bad value is an error naming it), else
/// `MemAvailable` from `/proc/meminfo`; `None` where neither is known.
pub fn available() -> Result<Option<Available>, String> {
    if let Some(v) = std::env::var_os(LIMIT_VAR) {
        let text = v.to_string_lossy();
        return parse_bytes(&text)
            .map(|bytes| {
                Some(Available {
                    bytes,
                    source: LIMIT_VAR,
                })
            })
            .ok_or_else(|| {
                format!("{LIMIT_VAR}={text:?}: expected a number of bytes (e.g. 8000000000 or 8G)")
            });
    }
    let Ok(info) = std::fs::read_to_string("/proc/meminfo") else {
        return Ok(None);
    };
    Ok(mem_available(&info).map(|bytes| Available {
        bytes,
        source: "MemAvailable",
    }))
}

/// `MemAvailable:  123 kB` of a `/proc/meminfo` text, in bytes.
fn mem_available(info: &str) -> Option<u64> {
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// `123`, `8G`, `512M`, `1.5T`, `64KiB` (binary multiples) in bytes.
pub fn parse_bytes(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().ok()?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return None,
    };
    let b = n * (1u64 << shift) as f64;
    (b.is_finite() && b >= 0.0 && b < u64::MAX as f64).then_some(b as u64)
}

/// Bytes in words: `1.4 TiB`, `21.3 GiB`, `512 bytes`.
pub fn human(bytes: f64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024.0 {
        return format!("{} bytes", bytes.max(0.0) as u64);
    }
    let mut v = bytes / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// The largest `w` x `h` of the same aspect ratio (each a multiple of `step`) whose estimate
/// fits in `avail`; `None` where not even `step` x `step` fits.
pub fn largest_fit(
    cost: &Cost,
    width: usize,
    height: usize,
    batch: usize,
    step: usize,
    avail: u64,
) -> Option<(usize, usize)> {
    let step = step.max(1);
    let fits = |w: usize, h: usize| cost.bytes(w, h, batch) <= avail as f64;
    if !fits(step, step) {
        return None;
    }
    let room = avail as f64 - cost.fixed as f64;
    let scale = (room / cost.bytes_per_image(width, height, batch))
        .sqrt()
        .min(1.0);
    let down = |v: usize| ((v as f64 * scale) as usize / step * step).max(step);
    let (mut w, mut h) = (down(width), down(height));
    // float rounding: step down until it fits (a step or two at most)
    while !fits(w, h) && (w > step || h > step) {
        if w >= h && w > step {
            w -= step;
        } else {
            h -= step;
        }
    }
    Some((w, h))
}

impl Cost {
    fn bytes_per_image(&self, width: usize, height: usize, batch: usize) -> f64 {
        (self.per_pixel * width as f64 * height as f64 * batch as f64).max(1.0)
    }
}

/// [`check_with`] against [`available`]; nothing is refused where the memory is unknown.
/// `what` names the sizes' source ("width x height", "pose canvas", "training resolution").
pub fn check(
    what: &str,
    width: usize,
    height: usize,
    batch: usize,
    step: usize,
    cost: &Cost,
) -> Result<(), String> {
    match available()? {
        Some(avail) => check_with(what, width, height, batch, step, cost, avail),
        None => Ok(()),
    }
}

/// `Err` (what would be needed, what is available and what would fit) unless `batch` images
/// of `width` x `height` fit in `avail` by `cost`'s estimate.
pub fn check_with(
    what: &str,
    width: usize,
    height: usize,
    batch: usize,
    step: usize,
    cost: &Cost,
    avail: Available,
) -> Result<(), String> {
    let need = cost.bytes(width, height, batch);
    if need <= avail.bytes as f64 {
        return Ok(());
    }
    let mut msg = format!(
        "{what} {width}x{height} (batch {batch}) would need about {} ({}); about {} is available ({})",
        human(need),
        cost.peak,
        human(avail.bytes as f64),
        avail.source,
    );
    let per = cost.per_pixel * width as f64 * height as f64;
    let room = avail.bytes as f64 - cost.fixed as f64;
    let fit_batch = if per > 0.0 && room > 0.0 {
        (room / per).min(usize::MAX as f64) as usize
    } else {
        0
    };
    let mut fits = Vec::new();
    if let Some((w, h)) = largest_fit(cost, width, height, batch, step, avail.bytes) {
        fits.push(format!("at most {w}x{h} fits at batch {batch}"));
    }
    if batch > 1 && fit_batch >= 1 {
        fits.push(format!("batch {fit_batch} fits at {width}x{height}"));
    }
    if fits.is_empty() {
        msg += &format!("; not even {step}x{step} at batch 1 fits");
    } else {
        msg += &format!("; {}", fits.join(", or "));
    }
    Err(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost() -> Cost {
        Cost {
            per_pixel: 4096.0,
            fixed: 1 << 30,
            peak: "the VAE decoder".into(),
        }
    }

    fn avail(bytes: u64) -> Available {
        Available {
            bytes,
            source: LIMIT_VAR,
        }
    }

    #[test]
    fn sizes_that_fit_pass_and_others_say_what_fits() {
        let c = cost();
        // 512x512: 1 GiB + 1 GiB
        assert!(check_with("width x height", 512, 512, 1, 8, &c, avail(4 << 30)).is_ok());
        let e = check_with("width x height", 16384, 16384, 1, 8, &c, avail(21 << 30)).unwrap_err();
        assert!(
            e.contains("16384x16384 (batch 1) would need about 1.0 TiB"),
            "{e}"
        );
        assert!(
            e.contains("about 21.0 GiB is available (SDCTL_MEMORY_LIMIT)"),
            "{e}"
        );
        let fit = largest_fit(&c, 16384, 16384, 1, 8, 21 << 30).unwrap();
        assert!(
            e.contains(&format!("at most {}x{} fits", fit.0, fit.1)),
            "{e}"
        );
        assert!(c.bytes(fit.0, fit.1, 1) <= (21u64 << 30) as f64);
        assert!(c.bytes(fit.0 + 8, fit.1 + 8, 1) > (21u64 << 30) as f64);
        assert_eq!(fit.0, fit.1);
        // the aspect ratio is kept; batch alternatives are offered
        let e = check_with("width x height", 1024, 512, 64, 8, &c, avail(21 << 30)).unwrap_err();
        assert!(e.contains(", or batch 10 fits at 1024x512"), "{e}");
        let (w, h) = largest_fit(&c, 1024, 512, 64, 8, 21 << 30).unwrap();
        assert!((w as f64 / h as f64 - 2.0).abs() < 0.1, "{w}x{h}");
        // nothing fits
        let e = check_with("width x height", 64, 64, 1, 8, &c, avail(1 << 20)).unwrap_err();
        assert!(e.contains("not even 8x8 at batch 1 fits"), "{e}");
        // a batch too large for any size: the batch that fits is named
        let e = check_with("x", 64, 64, 100000, 8, &c, avail(2 << 30)).unwrap_err();
        assert!(e.contains("; batch 64 fits at 64x64"), "{e}");
        // absurd sizes do not overflow
        let e = check_with(
            "canvas",
            usize::MAX,
            usize::MAX,
            usize::MAX,
            1,
            &c,
            avail(1 << 30),
        )
        .unwrap_err();
        assert!(e.contains("would need about"), "{e}");
    }

    #[test]
    fn byte_counts_parse_and_print() {
        assert_eq!(parse_bytes("123"), Some(123));
        assert_eq!(parse_bytes("8G"), Some(8 << 30));
        assert_eq!(parse_bytes("1.5 KiB"), Some(1536));
        assert_eq!(parse_bytes("lots"), None);
        assert_eq!(parse_bytes("-1"), None);
        assert_eq!(parse_bytes("1e400"), None);
        assert_eq!(human(512.0), "512 bytes");
        assert_eq!(human(1.5 * (1u64 << 40) as f64), "1.5 TiB");
        let info = "MemTotal: 100 kB\nMemFree: 5 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(mem_available(info), Some(2 << 20));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
    }
}
