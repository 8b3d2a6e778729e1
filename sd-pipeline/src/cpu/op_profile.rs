//! Wall time per kernel, for `sdctl bench train --op-profile`: off unless switched on (one
//! atomic load per op then). A span's time excludes the spans opened inside it on the same
//! thread (a checkpointed block's recompute holds convolutions), so the times add up to the
//! time spent in kernels; the rest of a step is candle's generic ops and the graph.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ON: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<Option<HashMap<&'static str, (f64, u64)>>> = Mutex::new(None);

thread_local! {
    /// Time taken by the spans inside each open span, innermost last.
    static INNER: RefCell<Vec<f64>> = const { RefCell::new(Vec::new()) };
}

/// Switch recording on or off (and clear what was recorded).
pub fn set_enabled(on: bool) {
    if let Ok(mut t) = TOTALS.lock() {
        *t = None;
    }
    ON.store(on, Ordering::Relaxed);
}

/// Seconds and calls per kernel since the last call (or since recording began), most time
/// first; clears them.
pub fn take() -> Vec<(&'static str, f64, u64)> {
    let map = TOTALS
        .lock()
        .ok()
        .and_then(|mut t| t.take())
        .unwrap_or_default();
    let mut v: Vec<_> = map.into_iter().map(|(k, (s, n))| (k, s, n)).collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

/// Times `name` from now until the guard is dropped.
pub fn span(name: &'static str) -> Span {
    if !ON.load(Ordering::Relaxed) {
        return Span(None);
    }
    INNER.with(|s| s.borrow_mut().push(0.0));
    Span(Some((name, Instant::now())))
}

pub struct Span(Option<(&'static str, Instant)>);

impl Drop for Span {
    fn drop(&mut self) {
        let Some((name, t0)) = self.0 else { return };
        let total = t0.elapsed().as_secs_f64();
        let inner = INNER.with(|s| {
            let mut s = s.borrow_mut();
            let inner = s.pop().unwrap_or(0.0);
            if let Some(parent) = s.last_mut() {
                *parent += total;
            }
            inner
        });
        if let Ok(mut t) = TOTALS.lock() {
            let e = t
                .get_or_insert_with(HashMap::new)
                .entry(name)
                .or_insert((0.0, 0));
            e.0 += total - inner;
            e.1 += 1;
        }
    }
}
