//! sd-weights's integration tests, one binary: each module is one area (its own file).

mod limits;
mod read;
