//! Layered settings with origins: built-in defaults (from [`crate::schema`]), config files
//! (TOML, YAML, JSON, with `include`s), a PNG's settings, `SDCTL_*` environment variables
//! and flags, merged lowest first; every value keeps where it came from (file and line,
//! variable, flag), so a problem names its source. `sdctl` turns the merge into a
//! [`crate::Job`]; any other program taking config files can do the same.

pub mod problem;
pub mod sources;
pub mod values;
