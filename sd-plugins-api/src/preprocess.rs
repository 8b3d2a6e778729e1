//! Preprocessors (annotators): an image in, a control image out, with declared parameters.
//!
//! Built-in ones register themselves with [`inventory`]:
//!
//! ```
//! use sd_plugins_api::{register_preprocessor, ImageBuf, ParamSpec, Params, PluginError, Preprocessor};
//!
//! struct Invert;
//! impl Preprocessor for Invert {
//!     fn name(&self) -> &str { "my_invert" }
//!     fn description(&self) -> &str { "255 - pixel" }
//!     fn params(&self) -> Vec<ParamSpec> { Vec::new() }
//!     fn process(&self, input: &ImageBuf, _: &Params) -> Result<ImageBuf, PluginError> {
//!         let mut out = input.clone();
//!         out.data.iter_mut().for_each(|v| *v = 255 - *v);
//!         Ok(out)
//!     }
//! }
//! register_preprocessor!(Invert);
//!
//! let reg = sd_plugins_api::Registry::builtin();
//! assert!(reg.preprocessor("my_invert").is_some());
//! ```

use std::sync::Arc;

use crate::params::ParamSpec;
use crate::{HookError, Params};

/// The error a plugin returns.
pub type PluginError = HookError;

/// An 8-bit image, rows top to bottom, channels interleaved (1 = gray, 3 = RGB, 4 = RGBA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageBuf {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<u8>,
}

impl ImageBuf {
    /// An image after checking that `data` holds exactly `width * height * channels` bytes.
    pub fn new(
        width: usize,
        height: usize,
        channels: usize,
        data: Vec<u8>,
    ) -> Result<Self, String> {
        if !matches!(channels, 1 | 3 | 4) {
            return Err(format!(
                "image with {channels} channels (expected 1, 3 or 4)"
            ));
        }
        let want = width
            .checked_mul(height)
            .and_then(|n| n.checked_mul(channels));
        if want != Some(data.len()) {
            return Err(format!(
                "image buffer of {} bytes for {width}x{height}x{channels}",
                data.len()
            ));
        }
        Ok(Self {
            width,
            height,
            channels,
            data,
        })
    }

    pub fn filled(width: usize, height: usize, channels: usize, value: u8) -> Self {
        Self {
            width,
            height,
            channels,
            data: vec![value; width * height * channels],
        }
    }

    /// Pixel `(x, y)`'s channels.
    pub fn pixel(&self, x: usize, y: usize) -> &[u8] {
        let i = (y * self.width + x) * self.channels;
        &self.data[i..i + self.channels]
    }
}

/// A preprocessor: turns an input image into a control image.
pub trait Preprocessor: Send + Sync {
    /// The name used in configs and on the command line (`canny`, `openpose`, ...).
    fn name(&self) -> &str;
    /// One line for `sdctl preprocessors list`.
    fn description(&self) -> &str;
    /// The parameters it accepts.
    fn params(&self) -> Vec<ParamSpec>;
    /// Run on an RGB image with validated parameters (every declared one present).
    fn process(&self, input: &ImageBuf, params: &Params) -> Result<ImageBuf, PluginError>;
    /// What the result depends on besides the image, name, version and parameters (e.g. the
    /// weight file a network found: its path, size and modification time), for the result
    /// cache. An error here (weights missing) is reported instead of a cached result.
    fn cache_salt(&self, _params: &Params) -> Result<String, PluginError> {
        Ok(String::new())
    }
    /// Version string shown in listings.
    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }
}

/// A built-in preprocessor, collected at link time (see [`register_preprocessor!`]).
pub struct BuiltinPreprocessor {
    pub create: fn() -> Box<dyn Preprocessor>,
}

inventory::collect!(BuiltinPreprocessor);

/// Register a unit struct (or any `const`-constructible value) as a built-in preprocessor.
#[macro_export]
macro_rules! register_preprocessor {
    ($value:expr) => {
        $crate::inventory::submit! {
            $crate::BuiltinPreprocessor { create: || Box::new($value) }
        }
    };
}

/// Where a registered plugin came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginSource {
    Builtin,
    Loaded(std::path::PathBuf),
}

impl std::fmt::Display for PluginSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PluginSource::Builtin => write!(f, "built-in"),
            PluginSource::Loaded(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Preprocessors by name: the built-in ones and any loaded at run time, side by side.
#[derive(Clone)]
pub struct Registry {
    preprocessors: Vec<(Arc<dyn Preprocessor>, PluginSource)>,
    #[cfg(feature = "host")]
    cache: Option<crate::cache::PreprocessCache>,
    #[cfg(feature = "host")]
    libraries: Vec<Arc<crate::host::PluginLibrary>>,
}

impl Registry {
    /// Everything registered with [`register_preprocessor!`] in the linked crates, by name.
    pub fn builtin() -> Self {
        let mut preprocessors: Vec<(Arc<dyn Preprocessor>, PluginSource)> =
            inventory::iter::<BuiltinPreprocessor>
                .into_iter()
                .map(|b| (Arc::from((b.create)()), PluginSource::Builtin))
                .collect();
        preprocessors.sort_by(|a, b| a.0.name().cmp(b.0.name()));
        Self {
            preprocessors,
            #[cfg(feature = "host")]
            cache: None,
            #[cfg(feature = "host")]
            libraries: Vec::new(),
        }
    }

    /// Cache preprocessor results in `cache` (see [`crate::cache`]).
    #[cfg(feature = "host")]
    pub fn with_cache(mut self, cache: crate::cache::PreprocessCache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Run `p`, through the cache when one is set. The flag says whether it was a cache hit.
    #[cfg(feature = "host")]
    pub fn run(
        &self,
        p: &dyn Preprocessor,
        input: &ImageBuf,
        params: &crate::Params,
    ) -> Result<(ImageBuf, bool), crate::PluginError> {
        match &self.cache {
            Some(c) => c.run(p, input, params),
            None => Ok((p.process(input, params)?, false)),
        }
    }

    /// Load a plugin library (see [`crate::host`]); a preprocessor becomes available by
    /// name, a hook plugin by [`Registry::hook_plugin`]. A file already loaded is not loaded
    /// twice; a name already taken is refused.
    #[cfg(feature = "host")]
    pub fn load(
        &mut self,
        path: &std::path::Path,
    ) -> Result<Arc<crate::host::PluginLibrary>, String> {
        let canon = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        if let Some(l) = self
            .libraries
            .iter()
            .find(|l| l.path.canonicalize().ok().as_deref() == Some(canon.as_path()))
        {
            return Ok(l.clone());
        }
        let lib = crate::host::load_plugin(path)?;
        let name = &lib.manifest.name;
        if self.libraries.iter().any(|l| &l.manifest.name == name) {
            return Err(format!(
                "plugin {}: the name {name:?} is already taken by another loaded plugin",
                path.display()
            ));
        }
        if let Some(p) = lib.preprocessor() {
            self.add(p, PluginSource::Loaded(path.to_path_buf()))?;
        }
        self.libraries.push(lib.clone());
        Ok(lib)
    }

    /// Every loaded plugin library.
    #[cfg(feature = "host")]
    pub fn libraries(&self) -> &[Arc<crate::host::PluginLibrary>] {
        &self.libraries
    }

    /// A loaded hook plugin by name.
    #[cfg(feature = "host")]
    pub fn hook_plugin(&self, name: &str) -> Option<&Arc<crate::host::PluginLibrary>> {
        self.libraries
            .iter()
            .find(|l| l.manifest.name == name && l.manifest.kind == crate::host::PluginKind::Hook)
    }

    /// Add a preprocessor loaded from `source`; a name already taken is refused.
    pub fn add(&mut self, p: Arc<dyn Preprocessor>, source: PluginSource) -> Result<(), String> {
        if let Some((_, s)) = self
            .preprocessors
            .iter()
            .find(|(q, _)| q.name() == p.name())
        {
            return Err(format!(
                "preprocessor {:?} from {source} is already registered (by {s})",
                p.name()
            ));
        }
        self.preprocessors.push((p, source));
        Ok(())
    }

    pub fn preprocessor(&self, name: &str) -> Option<&Arc<dyn Preprocessor>> {
        self.preprocessors
            .iter()
            .find(|(p, _)| p.name() == name)
            .map(|(p, _)| p)
    }

    pub fn preprocessors(&self) -> impl Iterator<Item = (&Arc<dyn Preprocessor>, &PluginSource)> {
        self.preprocessors.iter().map(|(p, s)| (p, s))
    }

    pub fn preprocessor_names(&self) -> Vec<&str> {
        self.preprocessors.iter().map(|(p, _)| p.name()).collect()
    }
}
