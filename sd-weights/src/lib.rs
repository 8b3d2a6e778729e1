//! Reading weight files, with the file (and the tensor, where there is one) named in every
//! error:
//!
//! - [`tensor_shapes`]: names and shapes of a file's tensors from its header alone
//!   (safetensors through the `safetensors` crate's reader over a memory map; a pickle's
//!   tensor records without reading their data);
//! - [`Store`]: every tensor of a `.safetensors` (memory-mapped) or `.ckpt` / `.pth` / `.pt` /
//!   `.bin` (read into memory) file, by name;
//! - [`finite`]: NaN / infinity in tensors, cheaply ([`Store::first_non_finite`] scans a file);
//! - [`sniff`]: what a file that is not a weight file is, from its first bytes;
//! - [`pickle`]: PyTorch zip archives holding a pickle, read without executing code.
//!
//! Nothing here knows about models: which tensors a model wants, and under which names, is
//! the business of the crates that build models.

pub mod error;
pub mod finite;
pub mod pickle;
pub mod shapes;
pub mod sniff;
pub mod store;

pub use error::{Error, Result};
pub use shapes::{safetensors_metadata, tensor_shapes};
pub use store::{Shapes, Store};
