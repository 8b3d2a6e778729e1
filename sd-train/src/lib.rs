//! Training for the Stable Diffusion + ControlNet framework, and the measures that say how a
//! trained model does.
//!
//! - [`control`]: training ControlNets and T2I-Adapters against a frozen base (diffusers'
//!   `train_controlnet.py`, `train_t2i_adapter_sdxl.py`): [`Trainer`], its [`TrainConfig`],
//!   the loss ([`training_loss`]), atomic checkpoints and exact resumption.
//! - [`network`]: what differs between the two: the [`Network`] (built, made new, run into
//!   the UNet, turned into a generation unit) and its [`NetworkKind`].
//! - [`base`]: a base model's own parts for people building small models: a fresh model from
//!   configs ([`new_model`]), the VAE ([`train_vae`]) and the UNet with optionally the text
//!   encoder ([`train_unet`]).
//! - [`train_loop`]: the optimizer loop all three trainers share (learning-rate schedule,
//!   gradient accumulation and clipping, AdamW, report and checkpoint cadence).
//! - [`optim`]: AdamW as PyTorch computes it, with its state saved and restored.
//! - [`dataset`]: training data folders (fill50k layout, diffusers image folder).
//! - [`config`]: training config files (TOML, YAML or JSON) layered under flags into
//!   [`TrainConfig`] and [`BaseTrainConfig`], paths taken against the file's folder and the
//!   files they name checked.
//! - [`fill`]: the synthetic fill dataset (circle outlines and filled circles).
//! - [`eval`]: the fill task's evaluation: generate from unseen examples and measure shape and
//!   colour fidelity; the report (JSON, grid image, summary table).
//! - [`error`]: the crate's error, [`TrainError`].
//!
//! Module dependencies run one way, and no module uses this root or its re-exports:
//! `config` uses `control`, `base` and `error`; `control` and `base` use `train_loop`,
//! `optim`, `dataset`, `files` and `error`, `control` also `network`; `network` uses `error`; `train_loop` uses `optim` and `error`; `eval` uses
//! `fill` and `error`; `dataset`, `fill` and `files` use `error`; `optim` and `error` use
//! none.

pub mod base;
pub mod config;
pub mod control;
pub mod dataset;
pub mod error;
pub mod eval;
mod files;
pub mod fill;
pub mod network;
pub mod optim;
pub mod train_loop;

pub use base::{new_model, train_unet, train_vae, BaseStep, BaseTrainConfig, Part};
pub use control::{training_loss, StepReport, TrainConfig, Trainer};
pub use error::{Result, TrainError};
pub use network::{Network, NetworkKind};
pub use train_loop::{LoopConfig, LrSchedule, StepDone, TrainTask};
