//! Dynamic plugins: third-party `cdylib`s loaded at run time, behind a C ABI.
//!
//! - [`abi`]: the `#[repr(C)]` function table and the types crossing the boundary;
//! - [`plugin`]: the plugin author's side, [`HookPlugin`](plugin::HookPlugin) and
//!   [`export_plugin!`](crate::export_plugin), which generates the table from
//!   [`glue`];
//! - [`host`] (feature `host`): loading a library, checking its table and manifest, and
//!   wrapping it as a [`Preprocessor`](crate::preprocess::Preprocessor), a
//!   [`Hook`](crate::hooks::Hook) or a [`WeightPatch`](crate::patch::WeightPatch).
//!
//! Nothing here is needed to extend the pipeline in-process: the contracts in the crate's
//! other modules are.

pub mod abi;
#[doc(hidden)]
pub mod glue;
#[cfg(feature = "host")]
pub mod host;
pub mod plugin;
