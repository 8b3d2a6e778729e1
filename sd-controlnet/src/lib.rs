//! ControlNet: a trainable copy of the UNet encoder, a conditioning (hint) embedding and one
//! zero-initialised 1x1 convolution per skip connection and for the mid block. It reaches the
//! denoising loop only through the residual hook (`sd_plugins_api::Hook::residuals`).

pub mod config;
pub mod control_image;
pub mod error;
pub mod init;
pub mod ip_adapter;
pub mod lllite;
pub mod load;
pub mod model;
pub mod reference;
pub mod spec;
pub mod t2i_adapter;
pub mod union;
pub mod unit_model;
pub mod units;

pub use error::{ControlError, Result};
pub use load::load_controlnet;
pub use model::ControlNetModel;
pub use spec::UnitSpec;
pub use t2i_adapter::{load_t2i_adapter, T2IAdapter};
pub use units::{
    AdapterUnit, ControlMode, ControlNetHook, ControlUnit, IpAdapterUnit, ResizeMode, Unit,
};
