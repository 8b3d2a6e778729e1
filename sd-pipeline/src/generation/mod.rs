//! Generating images: the denoising loop and its request / output types ([`pipeline`]), and
//! reading and writing the images it takes and gives ([`image_io`]).

pub mod image_io;
pub mod pipeline;
