//! Timing (one call, alternating rounds) and the process's peak memory.

use std::time::Instant;

use candle_core::{DType, Device};

use crate::error::Result;

/// Peak resident memory of this process (VmHWM), in bytes, where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// This process's peak resident memory for messages ("unknown" where the OS does not say).
pub fn peak_rss() -> String {
    rss_text(peak_rss_bytes())
}

/// Bytes of memory for messages: GiB with two decimals, "unknown" for `None`.
pub fn rss_text(bytes: Option<u64>) -> String {
    bytes
        .map(|b| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64))
        .unwrap_or_else(|| "unknown".into())
}

/// A dtype by its name (`f32`, `f16`, `bf16`: what `--dtype` takes), for the reports' JSON.
pub(crate) fn dtype_name<S: serde::Serializer>(d: &DType, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(d.as_str())
}

/// Run `f` once as a warm-up and `iters` more times: (mean, min) of the later runs and
/// the first run's seconds.
pub fn timed(iters: usize, device: &Device, f: &dyn Fn() -> Result<()>) -> Result<(f64, f64, f64)> {
    let first = once(device, f)?;
    let (mean, min) = rounds(iters, device, &[f])?[0];
    Ok((mean, min, first))
}

/// Seconds of one call of `f`.
pub fn once(device: &Device, f: &dyn Fn() -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    f()?;
    device.synchronize()?;
    Ok(t.elapsed().as_secs_f64())
}

/// `iters` rounds, each calling every one of `fs` in turn, every other round in reverse order
/// (A B, B A, A B, ...): (mean, min) seconds per function. A drift in the machine's speed (other
/// load, clocks) then falls on all of them alike, and each follows each as often, so their
/// ratios hold even when the absolute times move.
pub fn rounds(
    iters: usize,
    device: &Device,
    fs: &[&dyn Fn() -> Result<()>],
) -> Result<Vec<(f64, f64)>> {
    let mut times = vec![Vec::with_capacity(iters); fs.len()];
    for round in 0..iters {
        for i in 0..fs.len() {
            let i = if round % 2 == 0 { i } else { fs.len() - 1 - i };
            times[i].push(once(device, fs[i])?);
        }
    }
    Ok(times
        .iter()
        .map(|t| {
            let mean = t.iter().sum::<f64>() / t.len() as f64;
            (mean, t.iter().cloned().fold(f64::INFINITY, f64::min))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[test]
    fn rounds_alternate_and_reverse() {
        let calls = RefCell::new(String::new());
        let a = || -> Result<()> {
            calls.borrow_mut().push('A');
            Ok(())
        };
        let b = || -> Result<()> {
            calls.borrow_mut().push('B');
            std::thread::sleep(std::time::Duration::from_millis(5));
            Ok(())
        };
        let c = || -> Result<()> {
            calls.borrow_mut().push('C');
            Ok(())
        };
        let stats = rounds(4, &Device::Cpu, &[&a, &b]).unwrap();
        assert_eq!(*calls.borrow(), "ABBAABBA");
        assert_eq!(stats.len(), 2);
        // each function's own times: B sleeps, A does not
        assert!(stats[1].1 >= 0.005 && stats[1].0 >= stats[1].1);
        assert!(stats[0].0 < 0.005);
        calls.borrow_mut().clear();
        rounds(3, &Device::Cpu, &[&a, &b, &c]).unwrap();
        assert_eq!(*calls.borrow(), "ABCCBAABC");
    }

    #[test]
    fn rounds_stop_at_the_first_error() {
        let calls = RefCell::new(0);
        let fail = || -> Result<()> {
            *calls.borrow_mut() += 1;
            Err("broken".into())
        };
        assert!(rounds(3, &Device::Cpu, &[&fail]).is_err());
        assert_eq!(*calls.borrow(), 1);
    }
}
