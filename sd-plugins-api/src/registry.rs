//! Preprocessors by name: the built-in ones (collected at link time) and those of plugin
//! libraries loaded at run time, side by side, with the optional result cache.

use std::sync::Arc;

use crate::preprocess::{BuiltinPreprocessor, InputKind, Preprocessor};
#[cfg(feature = "host")]
use crate::preprocess::{ImageBuf, PluginError};

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
    libraries: Vec<Arc<crate::dylib::host::PluginLibrary>>,
}

impl Registry {
    /// Everything registered with [`register_preprocessor!`](crate::register_preprocessor) in the linked crates, by name.
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
        params: &crate::params::Params,
    ) -> Result<(ImageBuf, bool), PluginError> {
        match &self.cache {
            Some(c) => c.run(p, input, params),
            None => Ok((p.process(input, params)?, false)),
        }
    }

    /// Load a plugin library (see [`crate::dylib::host`]); a preprocessor becomes available by
    /// name, a hook plugin by [`Registry::hook_plugin`]. A file already loaded is not loaded
    /// twice; a name already taken is refused.
    #[cfg(feature = "host")]
    pub fn load(
        &mut self,
        path: &std::path::Path,
    ) -> Result<Arc<crate::dylib::host::PluginLibrary>, String> {
        let canon = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        if let Some(l) = self
            .libraries
            .iter()
            .find(|l| l.path.canonicalize().ok().as_deref() == Some(canon.as_path()))
        {
            return Ok(l.clone());
        }
        let lib = crate::dylib::host::load_plugin(path)?;
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
    pub fn libraries(&self) -> &[Arc<crate::dylib::host::PluginLibrary>] {
        &self.libraries
    }

    /// A loaded hook plugin by name.
    #[cfg(feature = "host")]
    pub fn hook_plugin(&self, name: &str) -> Option<&Arc<crate::dylib::host::PluginLibrary>> {
        self.libraries.iter().find(|l| {
            l.manifest.name == name && l.manifest.kind == crate::dylib::host::PluginKind::Hook
        })
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

    /// The preprocessors that take inputs of `kind` (see [`Preprocessor::input_kinds`]), in
    /// the registry's order (built-in ones by name, then loaded ones).
    pub fn taking(&self, kind: InputKind) -> impl Iterator<Item = &Arc<dyn Preprocessor>> {
        self.preprocessors
            .iter()
            .map(|(p, _)| p)
            .filter(move |p| p.takes(kind))
    }

    pub fn preprocessor_names(&self) -> Vec<&str> {
        self.preprocessors.iter().map(|(p, _)| p.name()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::{ParamSpec, Params};
    use crate::preprocess::{ImageBuf, PluginError};

    struct Reader(&'static str, &'static [InputKind]);
    impl Preprocessor for Reader {
        fn name(&self) -> &str {
            self.0
        }
        fn description(&self) -> &str {
            ""
        }
        fn params(&self) -> Vec<ParamSpec> {
            Vec::new()
        }
        fn process(&self, input: &ImageBuf, _: &Params) -> Result<ImageBuf, PluginError> {
            Ok(input.clone())
        }
        fn input_kinds(&self) -> &[InputKind] {
            self.1
        }
    }

    #[test]
    fn taking_finds_preprocessors_by_input_kind() {
        let mut reg = Registry::builtin();
        let both = &[InputKind::Image, InputKind::PoseFile];
        reg.add(Arc::new(Reader("a", both)), PluginSource::Builtin)
            .unwrap();
        reg.add(
            Arc::new(Reader("b", &[InputKind::Image])),
            PluginSource::Builtin,
        )
        .unwrap();
        let names = |k| reg.taking(k).map(|p| p.name()).collect::<Vec<_>>();
        assert_eq!(names(InputKind::PoseFile), vec!["a"]);
        assert_eq!(names(InputKind::Image), vec!["a", "b"]);
        assert!(names(InputKind::MaskedImage).is_empty());
    }
}
