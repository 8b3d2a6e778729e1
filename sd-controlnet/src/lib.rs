//! ControlNet: the trainable copy of the UNet encoder with zero convolutions, composed as a
//! residual provider (`sd_plugins_api::Hook::residuals`). Not built yet: see the ControlNet
//! issue. The UNet in `sd-pipeline` already takes additive residuals.
