//! The generated side of the ABI: [`export_plugin!`](crate::export_plugin) and the
//! `extern "C"` functions it fills the table with, turning the table's calls into calls of a
//! [`Preprocessor`](crate::preprocess::Preprocessor) or
//! [`HookPlugin`](crate::dylib::plugin::HookPlugin). Not for direct use.

// FFI entry points: the ABI contract makes the host pass valid (or null) pointers.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::dylib::abi::*;
use crate::dylib::plugin::{HookPlugin, Part, TensorView};
use crate::params::json::{params_from_json, spec_to_json};
use crate::params::ParamSpec;
use crate::preprocess::{ImageBuf, Preprocessor};
use crate::step::StepInfo;

/// Make a `cdylib` a plugin: `export_plugin!(preprocessor: T)` for a type implementing
/// [`Preprocessor`](crate::preprocess::Preprocessor) + `Default`, `export_plugin!(hook: T)` for a
/// [`HookPlugin`]. Generates the `sd_plugin_entry` symbol and its function table.
#[macro_export]
macro_rules! export_plugin {
    (preprocessor: $t:ty) => {
        $crate::export_plugin!(@table $t,
            $crate::dylib::glue::preprocessor_manifest::<$t>,
            process: Some($crate::dylib::glue::process::<$t>),
            create: None, destroy: None, on_conditioning: None, before_step: None,
            residuals: None, on_noise_pred: None, after_step: None, on_image: None,
            patches: None, weight_delta: None);
    };
    (hook: $t:ty) => {
        $crate::export_plugin!(@table $t,
            $crate::dylib::glue::hook_manifest::<$t>,
            process: None,
            create: Some($crate::dylib::glue::create::<$t>),
            destroy: Some($crate::dylib::glue::destroy::<$t>),
            on_conditioning: Some($crate::dylib::glue::on_conditioning::<$t>),
            before_step: Some($crate::dylib::glue::before_step::<$t>),
            residuals: Some($crate::dylib::glue::residuals::<$t>),
            on_noise_pred: Some($crate::dylib::glue::on_noise_pred::<$t>),
            after_step: Some($crate::dylib::glue::after_step::<$t>),
            on_image: Some($crate::dylib::glue::on_image::<$t>),
            patches: Some($crate::dylib::glue::patches::<$t>),
            weight_delta: Some($crate::dylib::glue::weight_delta::<$t>));
    };
    (@table $t:ty, $manifest:path, process: $p:expr, create: $c:expr, destroy: $d:expr,
        on_conditioning: $oc:expr, before_step: $b:expr, residuals: $r:expr,
        on_noise_pred: $n:expr, after_step: $a:expr, on_image: $oi:expr,
        patches: $pa:expr, weight_delta: $wd:expr) => {
        #[no_mangle]
        pub extern "C" fn sd_plugin_entry() -> *const $crate::dylib::abi::SdPluginV1 {
            extern "C" fn manifest() -> $crate::dylib::abi::SdStr {
                static M: ::std::sync::OnceLock<String> = ::std::sync::OnceLock::new();
                $crate::dylib::abi::SdStr::new(M.get_or_init(|| $manifest(env!("CARGO_PKG_VERSION"))))
            }
            static TABLE: $crate::dylib::abi::SdPluginV1 = $crate::dylib::abi::SdPluginV1 {
                abi_version: $crate::dylib::abi::ABI_VERSION,
                struct_size: ::std::mem::size_of::<$crate::dylib::abi::SdPluginV1>() as u32,
                manifest,
                process: $p,
                free_image: $crate::dylib::glue::free_image,
                create: $c,
                destroy: $d,
                on_conditioning: $oc,
                before_step: $b,
                residuals: $r,
                on_noise_pred: $n,
                after_step: $a,
                on_image: $oi,
                patches: $pa,
                weight_delta: $wd,
                free_tensor: $crate::dylib::glue::free_tensor,
                free_tensors: $crate::dylib::glue::free_tensors,
            };
            &TABLE
        }
    };
}

fn manifest(
    kind: &str,
    name: &str,
    version: &str,
    description: &str,
    params: &[ParamSpec],
) -> String {
    serde_json::json!({
        "kind": kind,
        "name": name,
        "version": version,
        "description": description,
        "params": params.iter().map(spec_to_json).collect::<Vec<_>>(),
    })
    .to_string()
}

pub fn preprocessor_manifest<T: Preprocessor + Default>(version: &str) -> String {
    let p = T::default();
    manifest(
        "preprocessor",
        p.name(),
        version,
        p.description(),
        &p.params(),
    )
}

pub fn hook_manifest<T: HookPlugin>(version: &str) -> String {
    manifest("hook", T::name(), version, T::description(), &T::params())
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Run `f`, turning errors and panics into [`SD_ERROR`] with a message.
fn guard(err: *mut SdErrBuf, f: impl FnOnce() -> Result<i32, String>) -> i32 {
    let msg = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(code)) => return code,
        Ok(Err(m)) => m,
        Err(p) => format!("plugin panicked: {}", panic_message(&*p)),
    };
    if let Some(e) = unsafe { err.as_mut() } {
        unsafe { e.write(&msg) };
    }
    SD_ERROR
}

pub extern "C" fn process<T: Preprocessor + Default>(
    params: SdStr,
    input: *const SdImage,
    out: *mut SdImageOut,
    err: *mut SdErrBuf,
) -> i32 {
    guard(err, || {
        let p = T::default();
        let params = params_from_json(&p.params(), unsafe { params.as_str()? })?;
        let input = unsafe { input.as_ref() }.ok_or("null input")?;
        let data = unsafe { std::slice::from_raw_parts(input.data, input.len) }.to_vec();
        let img = ImageBuf::new(
            input.width as usize,
            input.height as usize,
            input.channels as usize,
            data,
        )?;
        let result = p.process(&img, &params).map_err(|e| e.to_string())?;
        let mut data = std::mem::ManuallyDrop::new(result.data);
        let out = unsafe { out.as_mut() }.ok_or("null output")?;
        *out = SdImageOut {
            width: result.width as u32,
            height: result.height as u32,
            channels: result.channels as u32,
            data: data.as_mut_ptr(),
            len: data.len(),
            cap: data.capacity(),
        };
        Ok(SD_OK)
    })
}

pub extern "C" fn free_image(out: *mut SdImageOut) {
    if let Some(o) = unsafe { out.as_mut() } {
        if !o.data.is_null() {
            drop(unsafe { Vec::from_raw_parts(o.data, o.len, o.cap) });
            o.data = std::ptr::null_mut();
        }
    }
}

pub extern "C" fn free_tensor(out: *mut SdTensorOut) {
    if let Some(o) = unsafe { out.as_mut() } {
        if !o.data.is_null() {
            drop(unsafe { Vec::from_raw_parts(o.data, o.len, o.cap) });
            o.data = std::ptr::null_mut();
        }
    }
}

pub extern "C" fn free_tensors(out: *mut SdTensorsOut) {
    if let Some(o) = unsafe { out.as_mut() } {
        if !o.data.is_null() {
            drop(unsafe { Vec::from_raw_parts(o.data, o.len, o.cap) });
            o.data = std::ptr::null_mut();
        }
        if !o.shapes.is_null() {
            drop(unsafe { Vec::from_raw_parts(o.shapes, o.shapes_len, o.shapes_cap) });
            o.shapes = std::ptr::null_mut();
        }
    }
}

fn instance<'a, T>(instance: SdInstance) -> Result<&'a mut T, String> {
    unsafe { (instance as *mut T).as_mut() }.ok_or_else(|| "null instance".into())
}

fn part(p: SdPart) -> Result<Part, String> {
    match p {
        0 => Ok(Part::Unet),
        1 => Ok(Part::TextEncoder),
        2 => Ok(Part::Vae),
        3 => Ok(Part::TextEncoder2),
        o => Err(format!("unknown model part {o}")),
    }
}

pub extern "C" fn on_conditioning<T: HookPlugin>(
    inst: SdInstance,
    cond: *const SdTensor,
    uncond: *const SdTensor,
    out_cond: *mut SdTensorOut,
    out_uncond: *mut SdTensorOut,
    err: *mut SdErrBuf,
) -> i32 {
    guard(err, || {
        let h = instance::<T>(inst)?;
        let c = unsafe { view(cond) }.ok_or("null cond")?;
        match h.on_conditioning(c, unsafe { view(uncond) })? {
            None => Ok(SD_PASS),
            Some((c, u)) => {
                answer(out_cond, Some(c))?;
                if let Some(u) = u {
                    answer(out_uncond, Some(u))?;
                }
                Ok(SD_OK)
            }
        }
    })
}

pub extern "C" fn residuals<T: HookPlugin>(
    inst: SdInstance,
    s: *const SdStep,
    sample: *const SdTensor,
    latents: *const SdTensor,
    context: *const SdTensor,
    out: *mut SdTensorsOut,
    err: *mut SdErrBuf,
) -> i32 {
    guard(err, || {
        let h = instance::<T>(inst)?;
        let v = |t| unsafe { view(t) }.ok_or("null tensor");
        let Some(list) = h.residuals(&step(s)?, v(sample)?, v(latents)?, v(context)?)? else {
            return Ok(SD_PASS);
        };
        let ndim = list.first().map_or(0, |t| t.shape.len());
        if list.iter().any(|t| t.shape.len() != ndim) {
            return Err("residual tensors of different ranks".into());
        }
        let mut data = Vec::new();
        let mut shapes = Vec::new();
        for t in &list {
            data.extend_from_slice(&t.data);
            shapes.extend(t.shape.iter().map(|&d| d as u64));
        }
        let mut data = std::mem::ManuallyDrop::new(data);
        let mut shapes = std::mem::ManuallyDrop::new(shapes);
        let out = unsafe { out.as_mut() }.ok_or("null output")?;
        *out = SdTensorsOut {
            data: data.as_mut_ptr(),
            len: data.len(),
            cap: data.capacity(),
            shapes: shapes.as_mut_ptr(),
            shapes_len: shapes.len(),
            shapes_cap: shapes.capacity(),
            count: list.len(),
        };
        Ok(SD_OK)
    })
}

pub extern "C" fn after_step<T: HookPlugin>(
    inst: SdInstance,
    s: *const SdStep,
    latents: *const SdTensor,
    out: *mut SdTensorOut,
    err: *mut SdErrBuf,
) -> i32 {
    guard(err, || {
        let h = instance::<T>(inst)?;
        let latents = unsafe { view(latents) }.ok_or("null latents")?;
        answer(out, h.after_step(&step(s)?, latents)?)
    })
}

pub extern "C" fn on_image<T: HookPlugin>(
    inst: SdInstance,
    images: *const SdTensor,
    out: *mut SdTensorOut,
    err: *mut SdErrBuf,
) -> i32 {
    guard(err, || {
        let h = instance::<T>(inst)?;
        let images = unsafe { view(images) }.ok_or("null images")?;
        answer(out, h.on_image(images)?)
    })
}

pub extern "C" fn patches<T: HookPlugin>(inst: SdInstance, p: SdPart, name: SdStr) -> i32 {
    let r = catch_unwind(AssertUnwindSafe(|| -> Result<bool, String> {
        let h = instance::<T>(inst)?;
        Ok(h.patches(part(p)?, unsafe { name.as_str()? }))
    }));
    matches!(r, Ok(Ok(true))) as i32
}

pub extern "C" fn weight_delta<T: HookPlugin>(
    inst: SdInstance,
    p: SdPart,
    name: SdStr,
    base: *const SdTensor,
    out: *mut SdTensorOut,
    err: *mut SdErrBuf,
) -> i32 {
    guard(err, || {
        let h = instance::<T>(inst)?;
        let base = unsafe { view(base) }.ok_or("null base")?;
        answer(
            out,
            h.weight_delta(part(p)?, unsafe { name.as_str()? }, base)?,
        )
    })
}

pub extern "C" fn create<T: HookPlugin>(params: SdStr, err: *mut SdErrBuf) -> SdInstance {
    let mut instance: SdInstance = std::ptr::null_mut();
    guard(err, || {
        let params = params_from_json(&T::params(), unsafe { params.as_str()? })?;
        instance = Box::into_raw(Box::new(T::create(&params)?)) as SdInstance;
        Ok(SD_OK)
    });
    instance
}

pub extern "C" fn destroy<T: HookPlugin>(instance: SdInstance) {
    if !instance.is_null() {
        let _ = catch_unwind(|| drop(unsafe { Box::from_raw(instance as *mut T) }));
    }
}

fn step(s: *const SdStep) -> Result<StepInfo, String> {
    let s = unsafe { s.as_ref() }.ok_or("null step")?;
    Ok(StepInfo {
        index: s.index as usize,
        first_index: s.first_index as usize,
        total: s.total as usize,
        timestep: s.timestep,
        batch: s.batch as usize,
        cfg: s.cfg != 0,
    })
}

unsafe fn view<'a>(t: *const SdTensor) -> Option<TensorView<'a>> {
    let t = t.as_ref()?;
    Some(TensorView {
        data: std::slice::from_raw_parts(t.data, t.len),
        shape: std::slice::from_raw_parts(t.shape, t.ndim),
    })
}

fn answer(out: *mut SdTensorOut, result: Option<Vec<f32>>) -> Result<i32, String> {
    let Some(v) = result else { return Ok(SD_PASS) };
    let mut v = std::mem::ManuallyDrop::new(v);
    let out = unsafe { out.as_mut() }.ok_or("null output")?;
    *out = SdTensorOut {
        data: v.as_mut_ptr(),
        len: v.len(),
        cap: v.capacity(),
    };
    Ok(SD_OK)
}

pub extern "C" fn before_step<T: HookPlugin>(
    instance: SdInstance,
    s: *const SdStep,
    latents: *const SdTensor,
    out: *mut SdTensorOut,
    err: *mut SdErrBuf,
) -> i32 {
    guard(err, || {
        let h = unsafe { (instance as *mut T).as_mut() }.ok_or("null instance")?;
        let latents = unsafe { view(latents) }.ok_or("null latents")?;
        answer(out, h.before_step(&step(s)?, latents)?)
    })
}

pub extern "C" fn on_noise_pred<T: HookPlugin>(
    instance: SdInstance,
    s: *const SdStep,
    uncond: *const SdTensor,
    cond: *const SdTensor,
    guidance_scale: f64,
    out: *mut SdTensorOut,
    err: *mut SdErrBuf,
) -> i32 {
    guard(err, || {
        let h = unsafe { (instance as *mut T).as_mut() }.ok_or("null instance")?;
        let cond = unsafe { view(cond) }.ok_or("null cond")?;
        let uncond = unsafe { view(uncond) };
        answer(
            out,
            h.on_noise_pred(&step(s)?, uncond, cond, guidance_scale)?,
        )
    })
}
