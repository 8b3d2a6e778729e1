//! The C ABI between `sdctl` and plugins loaded at run time.
//!
//! A plugin is a `cdylib` exporting one symbol, [`ENTRY_SYMBOL`], an `extern "C"` function
//! returning a pointer to a static [`SdPluginV1`] table. Only `#[repr(C)]` structs, plain
//! buffers (bytes for images, `f32` for tensors, with their shapes) and UTF-8 strings cross
//! the boundary, never Rust trait objects or std types, so a plugin built by another rustc
//! works.
//!
//! Stability promise: the first two fields of the table, `abi_version` and `struct_size`,
//! keep their place and meaning in every version. The host reads them before anything else
//! and refuses a table whose version it does not speak or whose size is smaller than it
//! expects; within one version, fields are only ever appended (a larger `struct_size` is
//! fine). Plugin metadata (name, kind, version, parameters) travels as a JSON manifest and
//! parameter values as a JSON object, so they can grow without an ABI change.
//!
//! Plugin authors do not write any of this: [`export_plugin!`](crate::export_plugin) generates it.

use std::ffi::c_void;

/// The ABI version this crate speaks.
pub const ABI_VERSION: u32 = 1;
/// The one symbol a plugin exports.
pub const ENTRY_SYMBOL: &str = "sd_plugin_entry";

/// Return codes of the table's functions.
pub const SD_OK: i32 = 0;
/// The hook leaves this point alone (no output written).
pub const SD_PASS: i32 = 1;
/// Failure; a UTF-8 message is in the error buffer.
pub const SD_ERROR: i32 = -1;

/// A borrowed UTF-8 string.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SdStr {
    pub ptr: *const u8,
    pub len: usize,
}

impl SdStr {
    pub fn new(s: &str) -> Self {
        Self {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    }

    /// # Safety
    /// `ptr` must point at `len` readable bytes for the lifetime `'a`.
    pub unsafe fn as_str<'a>(&self) -> Result<&'a str, String> {
        if self.ptr.is_null() {
            return if self.len == 0 {
                Ok("")
            } else {
                Err("null string".into())
            };
        }
        let bytes = std::slice::from_raw_parts(self.ptr, self.len);
        std::str::from_utf8(bytes).map_err(|e| format!("string is not UTF-8: {e}"))
    }
}

/// A host-owned buffer the plugin writes an error message into (truncated to `cap`).
#[repr(C)]
pub struct SdErrBuf {
    pub ptr: *mut u8,
    pub cap: usize,
    pub len: usize,
}

impl SdErrBuf {
    /// Write `msg`, cut at a character boundary to fit.
    ///
    /// # Safety
    /// `self.ptr` must point at `self.cap` writable bytes.
    pub unsafe fn write(&mut self, msg: &str) {
        let mut n = msg.len().min(self.cap);
        while !msg.is_char_boundary(n) {
            n -= 1;
        }
        if !self.ptr.is_null() {
            std::ptr::copy_nonoverlapping(msg.as_ptr(), self.ptr, n);
            self.len = n;
        }
    }
}

/// An 8-bit image, rows top to bottom, channels interleaved.
#[repr(C)]
pub struct SdImage {
    pub width: u32,
    pub height: u32,
    pub channels: u32,
    pub data: *const u8,
    pub len: usize,
}

/// An image the plugin allocated; the host copies it out and hands it back to `free_image`.
#[repr(C)]
pub struct SdImageOut {
    pub width: u32,
    pub height: u32,
    pub channels: u32,
    pub data: *mut u8,
    pub len: usize,
    pub cap: usize,
}

/// An f32 tensor, row-major, with its shape.
#[repr(C)]
pub struct SdTensor {
    pub data: *const f32,
    pub len: usize,
    pub shape: *const usize,
    pub ndim: usize,
}

/// A tensor the plugin allocated, of the shape of the input it answers; freed by `free_tensor`.
#[repr(C)]
pub struct SdTensorOut {
    pub data: *mut f32,
    pub len: usize,
    pub cap: usize,
}

/// [`crate::step::StepInfo`] across the boundary.
#[repr(C)]
pub struct SdStep {
    pub index: u64,
    pub first_index: u64,
    pub total: u64,
    pub timestep: f64,
    pub batch: u64,
    pub cfg: u32,
}

/// Instance pointer of a hook plugin.
pub type SdInstance = *mut c_void;

/// Tensors a plugin allocated: all values in one buffer, and `ndim` dims per tensor in
/// `shapes`; freed by `free_tensors`.
#[repr(C)]
pub struct SdTensorsOut {
    pub data: *mut f32,
    pub len: usize,
    pub cap: usize,
    pub shapes: *mut u64,
    pub shapes_len: usize,
    pub shapes_cap: usize,
    /// Number of tensors; each has `ndim` = `shapes_len / count` dims.
    pub count: usize,
}

/// Which model a weight belongs to ([`crate::patch::ModelPart`]): 0 UNet, 1 text encoder, 2 VAE,
/// 3 SDXL's second text encoder.
pub type SdPart = u32;

type ErrP = *mut SdErrBuf;
type TP = *const SdTensor;
type OutP = *mut SdTensorOut;

/// The table a plugin's entry function returns (version 1).
#[repr(C)]
pub struct SdPluginV1 {
    /// Always first: [`ABI_VERSION`] the plugin was built for.
    pub abi_version: u32,
    /// Always second: `size_of::<SdPluginV1>()` as the plugin saw it.
    pub struct_size: u32,
    /// The JSON manifest: `{"name","kind":"preprocessor"|"hook","version","description","params":[...]}`.
    pub manifest: extern "C" fn() -> SdStr,
    /// Preprocessors: run on an image with parameters (a JSON object, validated by the host).
    pub process: Option<
        extern "C" fn(params: SdStr, input: *const SdImage, out: *mut SdImageOut, err: ErrP) -> i32,
    >,
    pub free_image: extern "C" fn(out: *mut SdImageOut),
    /// Hooks: make an instance for one generation from parameters (JSON object); null = error.
    pub create: Option<extern "C" fn(params: SdStr, err: ErrP) -> SdInstance>,
    pub destroy: Option<extern "C" fn(instance: SdInstance)>,
    /// Hook points. Each returns [`SD_PASS`] to leave its point alone, [`SD_OK`] with its
    /// output(s) written, or [`SD_ERROR`]. Outputs have exactly their input's number of values.
    ///
    /// Text conditioning once before sampling: `uncond` (and `out_uncond`) null without CFG.
    pub on_conditioning: Option<
        extern "C" fn(
            SdInstance,
            cond: TP,
            uncond: TP,
            out_cond: OutP,
            out_uncond: OutP,
            err: ErrP,
        ) -> i32,
    >,
    /// Latents before the UNet runs.
    pub before_step:
        Option<extern "C" fn(SdInstance, *const SdStep, latents: TP, out: OutP, err: ErrP) -> i32>,
    /// Additive UNet residuals (down..., mid): `sample` is the model input (CFG halves
    /// uncond first), `latents` its 4 latent channels, `context` the text conditioning.
    pub residuals: Option<
        extern "C" fn(
            SdInstance,
            *const SdStep,
            sample: TP,
            latents: TP,
            context: TP,
            out: *mut SdTensorsOut,
            err: ErrP,
        ) -> i32,
    >,
    /// Combine the predictions (`uncond` null without CFG).
    pub on_noise_pred: Option<
        extern "C" fn(
            SdInstance,
            *const SdStep,
            uncond: TP,
            cond: TP,
            guidance_scale: f64,
            out: OutP,
            err: ErrP,
        ) -> i32,
    >,
    /// Latents after the sampler stepped.
    pub after_step:
        Option<extern "C" fn(SdInstance, *const SdStep, latents: TP, out: OutP, err: ErrP) -> i32>,
    /// Decoded images `[batch, 3, H, W]` in [0, 1].
    pub on_image: Option<extern "C" fn(SdInstance, images: TP, out: OutP, err: ErrP) -> i32>,
    /// Weight patching, while weights load: does the plugin patch this parameter (1) or not (0)?
    pub patches: Option<extern "C" fn(SdInstance, part: SdPart, name: SdStr) -> i32>,
    /// The delta to add to parameter `name` (whose loaded value is `base`).
    pub weight_delta: Option<
        extern "C" fn(SdInstance, part: SdPart, name: SdStr, base: TP, out: OutP, err: ErrP) -> i32,
    >,
    pub free_tensor: extern "C" fn(out: *mut SdTensorOut),
    pub free_tensors: extern "C" fn(out: *mut SdTensorsOut),
}

/// The signature of [`ENTRY_SYMBOL`].
pub type EntryFn = unsafe extern "C" fn() -> *const SdPluginV1;
