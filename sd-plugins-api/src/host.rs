//! Loading plugins at run time (`libloading`) and checking everything that crosses the
//! boundary: ABI version and table size before any call, manifests, buffer sizes.
//!
//! Loading a plugin runs its code in this process: only load plugins you trust.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Tensor;

use crate::abi::*;
use crate::params::json::{params_to_json, spec_from_json};
use crate::{
    Hook, HookError, ImageBuf, NoisePrediction, ParamSpec, Params, PluginError, Preprocessor,
    StepInfo,
};

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
    if !path.is_file() {
        return Err(format!("plugin {shown}: no such file"));
    }
    let lib = unsafe { libloading::Library::new(path) }
        .map_err(|e| format!("plugin {shown}: not a loadable library ({e})"))?;
    let entry: EntryFn = unsafe {
        *lib.get::<EntryFn>(ENTRY_SYMBOL.as_bytes()).map_err(|_| {
            format!("plugin {shown}: not an sdctl plugin (no `{ENTRY_SYMBOL}` symbol)")
        })?
    };
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

    /// A hook instance for one generation, from validated parameters.
    pub fn hook(self: &Arc<Self>, params: &Params) -> Result<Box<dyn Hook>, HookError> {
        if self.manifest.kind != PluginKind::Hook {
            return Err(self.fail("is not a hook plugin"));
        }
        let json = params_to_json(params);
        let mut storage = Vec::new();
        let mut err = err_buf(&mut storage);
        let create = self.table().create.expect("checked at load");
        let instance = create(SdStr::new(&json), &mut err);
        if instance.is_null() {
            return Err(self.fail(err_text(&storage, &err)));
        }
        Ok(Box::new(DynHook {
            lib: self.clone(),
            instance,
        }))
    }
}

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

/// A hook instance living in a plugin.
struct DynHook {
    lib: Arc<PluginLibrary>,
    instance: SdInstance,
}

unsafe impl Send for DynHook {}

impl Drop for DynHook {
    fn drop(&mut self) {
        if let Some(destroy) = self.lib.table().destroy {
            destroy(self.instance);
        }
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

impl DynHook {
    /// Read a plugin's answer: checked against the expected element count, then freed.
    fn take(
        &self,
        code: i32,
        mut out: SdTensorOut,
        storage: &[u8],
        err: &SdErrBuf,
        like: &Tensor,
    ) -> Result<Option<Tensor>, HookError> {
        let t = self.lib.table();
        let result = match code {
            SD_PASS => Ok(None),
            SD_OK if out.data.is_null() => Err(self.lib.fail("returned no tensor")),
            SD_OK if out.len != like.elem_count() => Err(self.lib.fail(format!(
                "returned {} values for a tensor of shape {:?} ({} values)",
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
            _ => Err(self.lib.fail(err_text(storage, err))),
        };
        if !out.data.is_null() {
            (t.free_tensor)(&mut out);
        }
        result
    }
}

fn empty_out() -> SdTensorOut {
    SdTensorOut {
        data: std::ptr::null_mut(),
        len: 0,
        cap: 0,
    }
}

impl Hook for DynHook {
    fn name(&self) -> &str {
        &self.lib.manifest.name
    }

    fn before_step(&mut self, step: &StepInfo, latents: &mut Tensor) -> Result<(), HookError> {
        let Some(f) = self.lib.table().before_step else {
            return Ok(());
        };
        let flat = Flat::of(latents)?;
        let mut out = empty_out();
        let mut storage = Vec::new();
        let mut err = err_buf(&mut storage);
        let code = f(
            self.instance,
            &sd_step(step),
            &flat.view(),
            &mut out,
            &mut err,
        );
        if let Some(t) = self.take(code, out, &storage, &err, latents)? {
            *latents = t;
        }
        Ok(())
    }

    fn on_noise_pred(
        &mut self,
        step: &StepInfo,
        pred: &NoisePrediction<'_>,
    ) -> Result<Option<Tensor>, HookError> {
        let Some(f) = self.lib.table().on_noise_pred else {
            return Ok(None);
        };
        let cond = Flat::of(pred.cond)?;
        let uncond = pred.uncond.map(Flat::of).transpose()?;
        let uncond_view = uncond.as_ref().map(Flat::view);
        let mut out = empty_out();
        let mut storage = Vec::new();
        let mut err = err_buf(&mut storage);
        let code = f(
            self.instance,
            &sd_step(step),
            uncond_view
                .as_ref()
                .map_or(std::ptr::null(), |v| v as *const SdTensor),
            &cond.view(),
            pred.guidance_scale,
            &mut out,
            &mut err,
        );
        self.take(code, out, &storage, &err, pred.cond)
    }
}
