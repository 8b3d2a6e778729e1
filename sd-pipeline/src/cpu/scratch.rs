//! Reused buffers for the kernels' temporaries (im2col columns, Winograd tiles). A fresh large
//! allocation is mapped anew each call and costs a page fault and the kernel's zeroing per 4 KiB
//! (at 512x512 a training step spent 5% of its time in `clear_page`); the calling thread keeps
//! up to [`KEEP`] buffers of at most [`KEEP_BYTES`] for its next calls instead. A buffer comes
//! back with the values a previous call left: callers write every element they read.

use std::cell::RefCell;

/// Buffers kept per thread (a convolution's backward holds three at once).
const KEEP: usize = 3;
/// Larger buffers are freed after use (a VAE encode at 2048x2048 would otherwise keep GiBs).
const KEEP_BYTES: usize = 256 << 20;

thread_local! {
    static POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// `f` on a buffer of `len` f32 (contents unspecified).
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let taken = POOL.with(|p| {
        let mut p = p.borrow_mut();
        // the smallest kept buffer that is large enough, else none
        let best = (0..p.len())
            .filter(|&i| p[i].len() >= len)
            .min_by_key(|&i| p[i].len());
        best.map(|i| p.swap_remove(i))
    });
    let mut buf = taken.unwrap_or_else(|| vec![0f32; len]);
    let r = f(&mut buf[..len]);
    if buf.len() * 4 <= KEEP_BYTES {
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            p.push(buf);
            if p.len() > KEEP {
                // drop the smallest: the large ones are the costly ones to map again
                if let Some(i) = (0..p.len()).min_by_key(|&i| p[i].len()) {
                    p.swap_remove(i);
                }
            }
        });
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kept buffer is handed out again (same allocation) for a request it can hold, and one
    /// too small is not.
    #[test]
    fn buffers_are_reused_when_large_enough() {
        let a = with_scratch(1000, |b| {
            b.fill(7.0);
            b.as_ptr() as usize
        });
        let again = with_scratch(600, |b| (b.as_ptr() as usize, b.len(), b[0]));
        assert_eq!(again, (a, 600, 7.0));
        let bigger = with_scratch(5000, |b| b.as_ptr() as usize);
        assert_ne!(bigger, a);
        // nested requests get distinct buffers
        with_scratch(1000, |x| {
            with_scratch(1000, |y| assert_ne!(x.as_ptr(), y.as_ptr()))
        });
    }
}
