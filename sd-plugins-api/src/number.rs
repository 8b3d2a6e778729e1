//! The one check of a number against its range, and its one message:
//! `must be a finite number in [0, 100], got inf`. Every float a person gives (flags, config
//! files, `SDCTL_*` variables, a PNG's settings, prompt tags, plugin parameters, training
//! settings, model config files) is checked here; callers put the key (and file) in front.

use std::fmt;

/// An interval of finite numbers; an infinite end means no bound on that side.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Range {
    pub min: f64,
    pub max: f64,
    /// `min` itself is excluded (`(0, ...`).
    pub min_open: bool,
    /// `max` itself is excluded (`..., 1)`).
    pub max_open: bool,
}

impl Range {
    /// `[min, max]`.
    pub const fn closed(min: f64, max: f64) -> Self {
        Self {
            min,
            max,
            min_open: false,
            max_open: false,
        }
    }
    /// `[min, max)`.
    pub const fn half_open(min: f64, max: f64) -> Self {
        Self {
            min,
            max,
            min_open: false,
            max_open: true,
        }
    }
    /// `(min, max)`.
    pub const fn open(min: f64, max: f64) -> Self {
        Self {
            min,
            max,
            min_open: true,
            max_open: true,
        }
    }
    /// Above `min` (excluded).
    pub const fn above(min: f64) -> Self {
        Self {
            min,
            max: f64::INFINITY,
            min_open: true,
            max_open: false,
        }
    }
    /// At least `min`.
    pub const fn at_least(min: f64) -> Self {
        Self::closed(min, f64::INFINITY)
    }
    /// Any finite number.
    pub const ANY: Self = Self::closed(f64::NEG_INFINITY, f64::INFINITY);

    pub fn contains(&self, x: f64) -> bool {
        x.is_finite()
            && (if self.min_open {
                x > self.min
            } else {
                x >= self.min
            })
            && (if self.max_open {
                x < self.max
            } else {
                x <= self.max
            })
    }

    /// `Ok(x)`, or `must be a finite number in [0, 100], got inf`.
    pub fn check(&self, x: f64) -> Result<f64, String> {
        self.check_noted(x, "")
    }

    /// [`Range::check`] with a note after the range: `must be a finite number in [0, 2]
    /// (allow more with --allow-extreme-weights), got 5` (`note` starts with a space).
    pub fn check_noted(&self, x: f64, note: &str) -> Result<f64, String> {
        if self.contains(x) {
            Ok(x)
        } else {
            Err(format!(
                "must be a finite number{self}{note}, got {}",
                show(x)
            ))
        }
    }
}

/// A number for messages: as written for everyday sizes (`7.5`, `-1`, `inf`, `NaN`), in
/// exponent form when huge or tiny (`1e300`, not the 301 digits `{}` prints).
pub fn show(x: f64) -> String {
    let a = x.abs();
    if x.is_finite() && a != 0.0 && !(1e-6..1e16).contains(&a) {
        format!("{x:e}")
    } else {
        format!("{x}")
    }
}

/// ` in [0, 100]`, ` above 0`, ` at least 0`, or nothing for any finite number.
impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (lo, hi) = (self.min.is_finite(), self.max.is_finite());
        match (lo, hi) {
            (false, false) => Ok(()),
            (true, false) if self.min_open => write!(f, " above {}", show(self.min)),
            (true, false) => write!(f, " at least {}", show(self.min)),
            (false, true) if self.max_open => write!(f, " below {}", show(self.max)),
            (false, true) => write!(f, " at most {}", show(self.max)),
            (true, true) => write!(
                f,
                " in {}{}, {}{}",
                if self.min_open { '(' } else { '[' },
                show(self.min),
                show(self.max),
                if self.max_open { ')' } else { ']' }
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_message_for_every_range() {
        let r = Range::closed(0.0, 100.0);
        assert_eq!(r.check(7.5), Ok(7.5));
        assert_eq!(
            r.check(f64::INFINITY).unwrap_err(),
            "must be a finite number in [0, 100], got inf"
        );
        assert_eq!(
            r.check(-1.0).unwrap_err(),
            "must be a finite number in [0, 100], got -1"
        );
        assert_eq!(
            Range::ANY.check(f64::NAN).unwrap_err(),
            "must be a finite number, got NaN"
        );
        assert_eq!(Range::ANY.check(f64::MAX), Ok(f64::MAX));
        assert_eq!(
            Range::above(0.0).check(0.0).unwrap_err(),
            "must be a finite number above 0, got 0"
        );
        assert_eq!(
            Range::at_least(0.0).check(-0.5).unwrap_err(),
            "must be a finite number at least 0, got -0.5"
        );
        assert_eq!(
            Range::half_open(0.0, 1.0).check(1.0).unwrap_err(),
            "must be a finite number in [0, 1), got 1"
        );
        // never the 309 digits of f64::MAX
        assert!(Range::ANY.check(f64::NEG_INFINITY).unwrap_err().len() < 40);
        assert_eq!(
            Range::closed(0.0, 2.0).check(1e300).unwrap_err(),
            "must be a finite number in [0, 2], got 1e300"
        );
        assert_eq!(show(f64::MAX), "1.7976931348623157e308");
        assert_eq!(show(1e-9), "1e-9");
        assert_eq!(show(0.00085), "0.00085");
    }
}
