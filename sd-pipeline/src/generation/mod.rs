//! Generating images: the denoising loop and its request / output types ([`pipeline`]),
//! reading and writing the images it takes and gives ([`image_io`]), and resizing latents as
//! the hires fix's latent upscalers do ([`latent_resize`]).

pub mod image_io;
pub mod latent_resize;
pub mod pil_resize;
pub mod pipeline;
pub mod preview;
