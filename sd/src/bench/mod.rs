//! Measuring speed and memory (`sdctl bench`, criterion): random weights for the real
//! architectures (no files), a random LoRA merged through the loader's patch step, timing in
//! alternating rounds, and the process's peak memory; and the benchmarks themselves, each a
//! settings struct whose `run` returns a report (serializable, for JSON). Benchmarks report;
//! they never assert.

mod load;
mod measure;
mod random;
mod train;
mod unet;
mod vae;

pub use load::{LoadBench, LoadReport};
pub use measure::{once, peak_rss, peak_rss_bytes, rounds, rss_text, timed};
pub use random::{merged_unet, Arch, MergedUnet, RandomVars, RandomWeights};
pub use train::{TrainBench, TrainReport};
pub use unet::{ControlNetTiming, LoraTiming, UnetBench, UnetReport, UnetTiming};
pub use vae::{VaeBench, VaeReport};
