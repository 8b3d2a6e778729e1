//! Loading plugins at run time (`libloading`) and checking everything that crosses the
//! boundary: ABI version and table size before any call, manifests, buffer sizes.
//!
//! Loading a plugin runs its code in this process: only load plugins you trust.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::Tensor;

use crate::dylib::abi::*;
use crate::error::HookError;
use crate::hooks::{Conditioning, Hook, NoiseLevels, NoisePrediction, ResidualInput, Residuals};
use crate::params::json::{params_to_json, spec_from_json};
use crate::params::{ParamSpec, Params};
use crate::patch::{ModelPart, WeightPatch};
use crate::preprocess::{ImageBuf, PluginError, Preprocessor};
use crate::step::StepInfo;

/// What a plugin provides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginKind {
    Preprocessor,
    Hook,
}

impl std::fmt::Display for PluginKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PluginKind::Preprocessor => "preprocessor",
            PluginKind::Hook => "hook",
        })
    }
}

/// A plugin's self-description.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub name: String,
    pub kind: PluginKind,
    pub version: String,
    pub description: String,
    pub params: Vec<ParamSpec>,
}

/// A loaded plugin library.
pub struct PluginLibrary {
    table: *const SdPluginV1,
    pub manifest: Manifest,
    pub path: PathBuf,
    // last: the table points into the library
    _lib: libloading::Library,
}

// The table is a static inside the library, which lives as long as this value; the plugin's
// functions are called from one thread at a time per instance.
unsafe impl Send for PluginLibrary {}
unsafe impl Sync for PluginLibrary {}

const ERR_CAP: usize = 4096;

fn err_buf(storage: &mut Vec<u8>) -> SdErrBuf {
    storage.resize(ERR_CAP, 0);
    SdErrBuf {
        ptr: storage.as_mut_ptr(),
        cap: ERR_CAP,
        len: 0,
    }
}

fn err_text(storage: &[u8], e: &SdErrBuf) -> String {
    let n = e.len.min(storage.len());
    let s = String::from_utf8_lossy(&storage[..n]).to_string();
    if s.is_empty() {
        "failed without a message".into()
    } else {
        s
    }
}

/// Load `path` as a plugin.
pub fn load_plugin(path: &Path) -> Result<Arc<PluginLibrary>, String> {
    let shown = path.display();
    if let Some(why) = crate::input_file::problem(path) {
        return Err(format!("plugin {shown}: {why}"));
    }
    let lib = unsafe { libloading::Library::new(path) }
        .map_err(|e| format!("plugin {shown}: not a loadable library ({e})"))?;
    // the symbol's address, before it is taken for a function
    let address: *const std::ffi::c_void = unsafe {
        *lib.get::<*const std::ffi::c_void>(ENTRY_SYMBOL.as_bytes())
            .map_err(|_| {
                format!("plugin {shown}: not an sdctl plugin (no `{ENTRY_SYMBOL}` symbol)")
            })?
    };
    if let Some(why) = not_code(address as usize) {
        return Err(format!(
            "plugin {shown}: `{ENTRY_SYMBOL}` is not a function ({why}); not an sdctl plugin"
        ));
    }
    // SAFETY: the symbol is in executable code (checked above where the platform allows);
    // its signature is the ABI's
    let entry: EntryFn =
        unsafe { std::mem::transmute::<*const std::ffi::c_void, EntryFn>(address) };
    let table = unsafe { entry() };
    if table.is_null() {
        return Err(format!("plugin {shown}: `{ENTRY_SYMBOL}` returned null"));
    }
    // Only the first two fields are read before the version is known (they never move).
    let (version, size) = unsafe {
        let head = table as *const u32;
        (head.read(), head.add(1).read())
    };
    if version != ABI_VERSION {
        return Err(format!(
            "plugin {shown}: built for plugin ABI version {version}, this sdctl speaks version {ABI_VERSION}; rebuild the plugin against a matching sd-plugins-api"
        ));
    }
    let want = std::mem::size_of::<SdPluginV1>();
    if (size as usize) < want {
        return Err(format!(
            "plugin {shown}: function table of {size} bytes, ABI version {ABI_VERSION} needs {want}"
        ));
    }
    let t = unsafe { &*table };
    if let Some(why) = not_code(t.manifest as usize) {
        return Err(format!(
            "plugin {shown}: the table's `manifest` is not a function ({why})"
        ));
    }
    let text = unsafe { (t.manifest)().as_str() }
        .map_err(|e| format!("plugin {shown}: manifest: {e}"))?
        .to_string();
    let manifest = parse_manifest(&text).map_err(|e| format!("plugin {shown}: manifest: {e}"))?;
    let complete = match manifest.kind {
        PluginKind::Preprocessor => t.process.is_some(),
        PluginKind::Hook => t.create.is_some() && t.destroy.is_some(),
    };
    if !complete {
        return Err(format!(
            "plugin {shown}: a {} plugin without its functions",
            manifest.kind
        ));
    }
    Ok(Arc::new(PluginLibrary {
        table,
        manifest,
        path: path.to_path_buf(),
        _lib: lib,
    }))
}

/// Why `address` cannot be the start of a function, where that can be checked: on Linux, the
/// mapping holding it (from `/proc/self/maps`) must be executable. `None` when it is, or when
/// the platform gives no way to tell.
fn not_code(address: usize) -> Option<String> {
    if address == 0 {
        return Some("a null address".into());
    }
    if !cfg!(target_os = "linux") {
        return None;
    }
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    executable_at(&maps, address).err()
}

/// In the text of a `/proc/PID/maps`, whether the mapping holding `address` is executable:
/// `Err` (in words) when it is not, or when no mapping holds it.
fn executable_at(maps: &str, address: usize) -> Result<(), String> {
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Some((lo, hi)) = range.split_once('-') else {
            continue;
        };
        let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
        else {
            continue;
        };
        if (lo..hi).contains(&address) {
            return if perms.as_bytes().get(2) == Some(&b'x') {
                Ok(())
            } else {
                Err(format!(
                    "its address {address:#x} is in data: a mapping without execute permission ({perms})"
                ))
            };
        }
    }
    Err(format!(
        "its address {address:#x} is in no mapping of the process"
    ))
}

fn parse_manifest(text: &str) -> Result<Manifest, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let s = |k: &str| v[k].as_str().map(String::from).ok_or(format!("no `{k}`"));
    let kind = match v["kind"].as_str() {
        Some("preprocessor") => PluginKind::Preprocessor,
        Some("hook") => PluginKind::Hook,
        other => return Err(format!("unknown kind {other:?}")),
    };
    let params = v["params"]
        .as_array()
        .map(|a| a.iter().map(spec_from_json).collect::<Result<Vec<_>, _>>())
        .transpose()?
        .unwrap_or_default();
    Ok(Manifest {
        name: s("name")?,
        kind,
        version: s("version")?,
        description: s("description").unwrap_or_default(),
        params,
    })
}

impl PluginLibrary {
    fn table(&self) -> &SdPluginV1 {
        unsafe { &*self.table }
    }

    fn fail(&self, msg: impl std::fmt::Display) -> HookError {
        HookError::failed(format!("plugin {}", self.manifest.name), msg.to_string())
    }

    /// This plugin as a preprocessor (for the registry), if it is one.
    pub fn preprocessor(self: &Arc<Self>) -> Option<Arc<dyn Preprocessor>> {
        (self.manifest.kind == PluginKind::Preprocessor)
            .then(|| Arc::new(DynPreprocessor(self.clone())) as Arc<dyn Preprocessor>)
    }

    /// An instance for one generation, from validated parameters: its hook points
    /// ([`PluginInstance::hook`]) and its weight patch ([`PluginInstance::patch`]) share it.
    pub fn instance(self: &Arc<Self>, params: &Params) -> Result<PluginInstance, HookError> {
        if self.manifest.kind != PluginKind::Hook {
            return Err(self.fail("is not a hook plugin"));
        }
        let json = params_to_json(params);
        let mut storage = Vec::new();
        let mut err = err_buf(&mut storage);
        let create = self.table().create.expect("checked at load");
        let ptr = create(SdStr::new(&json), &mut err);
        if ptr.is_null() {
            return Err(self.fail(err_text(&storage, &err)));
        }
        Ok(PluginInstance(Arc::new(Mutex::new(Instance {
            lib: self.clone(),
            ptr,
        }))))
    }

    /// A hook instance for one generation (see [`PluginLibrary::instance`]).
    pub fn hook(self: &Arc<Self>, params: &Params) -> Result<Box<dyn Hook>, HookError> {
        Ok(self.instance(params)?.hook())
    }
}

/// A plugin library's preprocessor. It takes images (the default [`Preprocessor::input_kinds`]):
/// only images cross the ABI.
struct DynPreprocessor(Arc<PluginLibrary>);

impl Preprocessor for DynPreprocessor {
    fn name(&self) -> &str {
        &self.0.manifest.name
    }
    fn description(&self) -> &str {
        &self.0.manifest.description
    }
    fn params(&self) -> Vec<ParamSpec> {
        self.0.manifest.params.clone()
    }
    fn version(&self) -> &str {
        &self.0.manifest.version
    }
    fn process(&self, input: &ImageBuf, params: &Params) -> Result<ImageBuf, PluginError> {
        let lib = &self.0;
        let t = lib.table();
        let json = params_to_json(params);
        let img = SdImage {
            width: input.width as u32,
            height: input.height as u32,
            channels: input.channels as u32,
            data: input.data.as_ptr(),
            len: input.data.len(),
        };
        let mut out = SdImageOut {
            width: 0,
            height: 0,
            channels: 0,
            data: std::ptr::null_mut(),
            len: 0,
            cap: 0,
        };
        let mut storage = Vec::new();
        let mut err = err_buf(&mut storage);
        let process = t.process.expect("checked at load");
        let code = process(SdStr::new(&json), &img, &mut out, &mut err);
        if code != SD_OK {
            if !out.data.is_null() {
                (t.free_image)(&mut out);
            }
            return Err(lib.fail(err_text(&storage, &err)));
        }
        if out.data.is_null() {
            return Err(lib.fail("returned no image"));
        }
        let (w, h, c) = (
            out.width as usize,
            out.height as usize,
            out.channels as usize,
        );
        // Sizes are checked before anything is read: a wrong one is an error, never a read
        // past the buffer the plugin declared.
        let result = match w.checked_mul(h).and_then(|n| n.checked_mul(c)) {
            _ if !matches!(c, 1 | 3 | 4) => Err(lib.fail(format!(
                "returned an image with {c} channels (expected 1, 3 or 4)"
            ))),
            Some(n) if n == out.len && n > 0 => {
                let data = unsafe { std::slice::from_raw_parts(out.data, out.len) }.to_vec();
                Ok(ImageBuf {
                    width: w,
                    height: h,
                    channels: c,
                    data,
                })
            }
            _ => Err(lib.fail(format!(
                "returned a buffer of {} bytes for a {w}x{h}x{c} image",
                out.len
            ))),
        };
        (t.free_image)(&mut out);
        result
    }
}

/// One plugin instance (destroyed when the last user drops it).
struct Instance {
    lib: Arc<PluginLibrary>,
    ptr: SdInstance,
}

// The plugin's instance is only used behind the mutex.
unsafe impl Send for Instance {}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(destroy) = self.lib.table().destroy {
            destroy(self.ptr);
        }
    }
}

/// A hook plugin's instance for one generation.
#[derive(Clone)]
pub struct PluginInstance(Arc<Mutex<Instance>>);

impl PluginInstance {
    /// Its hook points, for a [`crate::hooks::HookSet`].
    pub fn hook(&self) -> Box<dyn Hook> {
        let name = self
            .0
            .lock()
            .map(|i| i.lib.manifest.name.clone())
            .unwrap_or_default();
        Box::new(DynHook {
            inst: self.clone(),
            name,
        })
    }

    /// Its weight patch, for model loading (it answers only for parameters it patches).
    pub fn patch(&self) -> Arc<dyn WeightPatch> {
        let name = self
            .0
            .lock()
            .map(|i| i.lib.manifest.name.clone())
            .unwrap_or_default();
        Arc::new(DynPatch {
            inst: self.clone(),
            name,
        })
    }

    fn with<R>(&self, f: impl FnOnce(&Instance) -> Result<R, HookError>) -> Result<R, HookError> {
        let guard = self
            .0
            .lock()
            .map_err(|_| HookError::failed("plugin", "instance lock poisoned"))?;
        f(&guard)
    }
}

fn sd_step(s: &StepInfo) -> SdStep {
    SdStep {
        index: s.index as u64,
        first_index: s.first_index as u64,
        total: s.total as u64,
        timestep: s.timestep,
        batch: s.batch as u64,
        cfg: s.cfg as u32,
    }
}

/// A tensor's f32 values and shape, kept alive while the plugin reads them.
struct Flat {
    data: Vec<f32>,
    shape: Vec<usize>,
}

impl Flat {
    fn of(t: &Tensor) -> Result<Self, HookError> {
        Ok(Self {
            data: t
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?,
            shape: t.dims().to_vec(),
        })
    }
    fn view(&self) -> SdTensor {
        SdTensor {
            data: self.data.as_ptr(),
            len: self.data.len(),
            shape: self.shape.as_ptr(),
            ndim: self.shape.len(),
        }
    }
}

fn empty_out() -> SdTensorOut {
    SdTensorOut {
        data: std::ptr::null_mut(),
        len: 0,
        cap: 0,
    }
}

/// One call's error buffer.
struct Err {
    storage: Vec<u8>,
    buf: SdErrBuf,
}

impl Err {
    fn new() -> Self {
        let mut storage = vec![0u8; ERR_CAP];
        let buf = SdErrBuf {
            ptr: storage.as_mut_ptr(),
            cap: ERR_CAP,
            len: 0,
        };
        Self { storage, buf }
    }
    fn text(&self) -> String {
        err_text(&self.storage, &self.buf)
    }
}

impl Instance {
    fn t(&self) -> &SdPluginV1 {
        self.lib.table()
    }

    /// Read a plugin's tensor answer: checked against the expected element count, then freed.
    fn take(
        &self,
        code: i32,
        mut out: SdTensorOut,
        err: &Err,
        like: &Tensor,
        point: &str,
    ) -> Result<Option<Tensor>, HookError> {
        let result = match code {
            SD_PASS => Ok(None),
            SD_OK if out.data.is_null() => {
                Err(self.lib.fail(format!("{point}: returned no tensor")))
            }
            SD_OK if out.len != like.elem_count() => Err(self.lib.fail(format!(
                "{point}: returned {} values for a tensor of shape {:?} ({} values)",
                out.len,
                like.dims(),
                like.elem_count()
            ))),
            SD_OK => {
                let v = unsafe { std::slice::from_raw_parts(out.data, out.len) }.to_vec();
                Ok(Some(
                    Tensor::from_vec(v, like.dims(), like.device())?.to_dtype(like.dtype())?,
                ))
            }
            _ => Err(self.lib.fail(format!("{point}: {}", err.text()))),
        };
        if !out.data.is_null() {
            (self.t().free_tensor)(&mut out);
        }
        result
    }

    /// Call a latents-in, latents-out point.
    fn latents_point(
        &self,
        f: Option<
            extern "C" fn(
                SdInstance,
                *const SdStep,
                *const SdTensor,
                *mut SdTensorOut,
                *mut SdErrBuf,
            ) -> i32,
        >,
        step: &StepInfo,
        latents: &mut Tensor,
        point: &str,
    ) -> Result<(), HookError> {
        let Some(f) = f else { return Ok(()) };
        let flat = Flat::of(latents)?;
        let mut out = empty_out();
        let mut err = Err::new();
        let code = f(
            self.ptr,
            &sd_step(step),
            &flat.view(),
            &mut out,
            &mut err.buf,
        );
        if let Some(t) = self.take(code, out, &err, latents, point)? {
            *latents = t;
        }
        Ok(())
    }
}

/// The hook points of a plugin instance.
struct DynHook {
    inst: PluginInstance,
    name: String,
}

impl Hook for DynHook {
    fn name(&self) -> &str {
        &self.name
    }

    fn on_conditioning(&mut self, cond: &mut Conditioning) -> Result<(), HookError> {
        self.inst.with(|i| {
            let Some(f) = i.t().on_conditioning else {
                return Ok(());
            };
            let c = Flat::of(&cond.cond)?;
            let u = cond.uncond.as_ref().map(Flat::of).transpose()?;
            let uv = u.as_ref().map(Flat::view);
            let (mut oc, mut ou) = (empty_out(), empty_out());
            let mut err = Err::new();
            let code = f(
                i.ptr,
                &c.view(),
                uv.as_ref()
                    .map_or(std::ptr::null(), |v| v as *const SdTensor),
                &mut oc,
                &mut ou,
                &mut err.buf,
            );
            let new_u = match &cond.uncond {
                Some(like) if code == SD_OK => i.take(code, ou, &err, like, "on_conditioning")?,
                _ => {
                    if !ou.data.is_null() {
                        (i.t().free_tensor)(&mut ou);
                    }
                    None
                }
            };
            if let Some(t) = i.take(code, oc, &err, &cond.cond, "on_conditioning")? {
                cond.cond = t;
            }
            if let Some(t) = new_u {
                cond.uncond = Some(t);
            }
            Ok(())
        })
    }

    fn before_step(&mut self, step: &StepInfo, latents: &mut Tensor) -> Result<(), HookError> {
        self.inst
            .with(|i| i.latents_point(i.t().before_step, step, latents, "before_step"))
    }

    fn residuals(
        &mut self,
        step: &StepInfo,
        input: &ResidualInput<'_>,
    ) -> Result<Option<Residuals>, HookError> {
        self.inst.with(|i| {
            let Some(f) = i.t().residuals else {
                return Ok(None);
            };
            let (s, l, c) = (
                Flat::of(input.sample)?,
                Flat::of(input.latents)?,
                Flat::of(input.encoder_hidden_states)?,
            );
            let mut out = SdTensorsOut {
                data: std::ptr::null_mut(),
                len: 0,
                cap: 0,
                shapes: std::ptr::null_mut(),
                shapes_len: 0,
                shapes_cap: 0,
                count: 0,
            };
            let mut err = Err::new();
            let code = f(
                i.ptr,
                &sd_step(step),
                &s.view(),
                &l.view(),
                &c.view(),
                &mut out,
                &mut err.buf,
            );
            let result = (|| match code {
                SD_PASS => Ok(None),
                SD_OK => {
                    if out.data.is_null()
                        || out.shapes.is_null()
                        || out.count < 2
                        || !out.shapes_len.is_multiple_of(out.count)
                    {
                        return Err(i.lib.fail("residuals: malformed tensor list"));
                    }
                    let shapes = unsafe { std::slice::from_raw_parts(out.shapes, out.shapes_len) };
                    let ndim = out.shapes_len / out.count;
                    let sizes: Vec<Vec<usize>> = shapes
                        .chunks(ndim)
                        .map(|c| c.iter().map(|&d| d as usize).collect())
                        .collect();
                    let total: usize = sizes.iter().map(|s| s.iter().product::<usize>()).sum();
                    if total != out.len {
                        return Err(i.lib.fail(format!(
                            "residuals: {} values for shapes {sizes:?} ({total} values)",
                            out.len
                        )));
                    }
                    let data = unsafe { std::slice::from_raw_parts(out.data, out.len) };
                    let (dev, dt) = (input.sample.device(), input.sample.dtype());
                    let mut at = 0;
                    let mut tensors = Vec::with_capacity(sizes.len());
                    for sz in &sizes {
                        let n: usize = sz.iter().product();
                        tensors.push(
                            Tensor::from_slice(&data[at..at + n], sz.as_slice(), dev)?
                                .to_dtype(dt)?,
                        );
                        at += n;
                    }
                    let mid = tensors.pop().expect("count >= 2");
                    Ok(Some(Residuals { down: tensors, mid }))
                }
                _ => Err(i.lib.fail(format!("residuals: {}", err.text()))),
            })();
            if !out.data.is_null() || !out.shapes.is_null() {
                (i.t().free_tensors)(&mut out);
            }
            result
        })
    }

    fn on_noise_pred(
        &mut self,
        step: &StepInfo,
        pred: &NoisePrediction<'_>,
    ) -> Result<Option<Tensor>, HookError> {
        self.inst.with(|i| {
            let Some(f) = i.t().on_noise_pred else {
                return Ok(None);
            };
            let cond = Flat::of(pred.cond)?;
            let uncond = pred.uncond.map(Flat::of).transpose()?;
            let uv = uncond.as_ref().map(Flat::view);
            let mut out = empty_out();
            let mut err = Err::new();
            let code = f(
                i.ptr,
                &sd_step(step),
                uv.as_ref()
                    .map_or(std::ptr::null(), |v| v as *const SdTensor),
                &cond.view(),
                pred.guidance_scale,
                &mut out,
                &mut err.buf,
            );
            i.take(code, out, &err, pred.cond, "on_noise_pred")
        })
    }

    fn after_step(
        &mut self,
        step: &StepInfo,
        _levels: &dyn NoiseLevels,
        latents: &mut Tensor,
    ) -> Result<(), HookError> {
        self.inst
            .with(|i| i.latents_point(i.t().after_step, step, latents, "after_step"))
    }

    fn on_image(&mut self, images: &mut Tensor) -> Result<(), HookError> {
        self.inst.with(|i| {
            let Some(f) = i.t().on_image else {
                return Ok(());
            };
            let flat = Flat::of(images)?;
            let mut out = empty_out();
            let mut err = Err::new();
            let code = f(i.ptr, &flat.view(), &mut out, &mut err.buf);
            if let Some(t) = i.take(code, out, &err, images, "on_image")? {
                *images = t;
            }
            Ok(())
        })
    }
}

/// The weight patch of a plugin instance.
struct DynPatch {
    inst: PluginInstance,
    name: String,
}

impl WeightPatch for DynPatch {
    fn name(&self) -> &str {
        &self.name
    }

    fn delta(
        &self,
        part: ModelPart,
        name: &str,
        base: &Tensor,
    ) -> Result<Option<Tensor>, HookError> {
        self.inst.with(|i| {
            let (Some(wants), Some(f)) = (i.t().patches, i.t().weight_delta) else {
                return Ok(None);
            };
            let p: SdPart = match part {
                ModelPart::Unet => 0,
                ModelPart::TextEncoder => 1,
                ModelPart::Vae => 2,
                ModelPart::TextEncoder2 => 3,
            };
            if wants(i.ptr, p, SdStr::new(name)) != 1 {
                return Ok(None);
            }
            let flat = Flat::of(base)?;
            let mut out = empty_out();
            let mut err = Err::new();
            let code = f(
                i.ptr,
                p,
                SdStr::new(name),
                &flat.view(),
                &mut out,
                &mut err.buf,
            );
            i.take(code, out, &err, base, &format!("weight_delta {name}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::executable_at;

    #[test]
    fn code_addresses_from_the_maps_text() {
        let maps = "\
00400000-00452000 r-xp 00000000 08:02 173521      /usr/bin/dbus-daemon
00651000-00652000 rw-p 00051000 08:02 173521      /usr/bin/dbus-daemon
7fff0000-7fff1000 ---p 00000000 00:00 0
";
        assert!(executable_at(maps, 0x400000).is_ok());
        assert!(executable_at(maps, 0x451fff).is_ok());
        let e = executable_at(maps, 0x651010).unwrap_err();
        assert!(
            e.contains("0x651010") && e.contains("without execute"),
            "{e}"
        );
        let e = executable_at(maps, 0x452000).unwrap_err();
        assert!(e.contains("in no mapping"), "{e}");
        assert!(executable_at(maps, 0x7fff0000).is_err());
        // this very function is code, a static is not
        static DATA: [u8; 8] = [0; 8];
        if cfg!(target_os = "linux") {
            assert_eq!(
                super::not_code(code_addresses_from_the_maps_text as fn() as usize),
                None
            );
            assert!(super::not_code(DATA.as_ptr() as usize).is_some());
        }
    }
}
