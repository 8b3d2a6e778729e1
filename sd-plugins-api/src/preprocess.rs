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

use std::path::Path;

use crate::error::HookError;
use crate::params::{ParamSpec, Params};

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

/// What a preprocessor takes as input. Callers ask ([`Preprocessor::input_kinds`]) instead
/// of knowing preprocessors by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InputKind {
    /// An RGB image (transparency composited over white), given to
    /// [`Preprocessor::process`]. What every preprocessor takes unless it says otherwise.
    Image,
    /// An image whose transparency is a mask (alpha 0 = masked), given to
    /// [`Preprocessor::process`] as RGBA when the file has an alpha channel, RGB otherwise.
    /// The result may be RGBA too: a marked image, whose pixels with alpha below 128 a
    /// ControlNet receives as -1 ([`marked_control_values`]); callers resizing the input or
    /// the result resize its alpha along. The `inpaint` preprocessor takes this.
    MaskedImage,
    /// An OpenPose keypoint JSON file (`.json`), read and drawn by
    /// [`Preprocessor::process_file`]. The `openpose` preprocessor takes this besides images.
    PoseFile,
}

impl InputKind {
    /// The kind of file `path` is when it is not a picture: a `.json` file is an OpenPose
    /// keypoint file. `None` for anything else (read as an image).
    pub fn of_file(path: &Path) -> Option<InputKind> {
        path.extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"))
            .then_some(InputKind::PoseFile)
    }

    /// Whether inputs of this kind are files read by [`Preprocessor::process_file`] rather
    /// than decoded images given to [`Preprocessor::process`].
    pub fn is_file(self) -> bool {
        matches!(self, InputKind::PoseFile)
    }

    /// What it is, for messages ("a .json input is an OpenPose keypoint file").
    pub fn describe(self) -> &'static str {
        match self {
            InputKind::Image => "an image",
            InputKind::MaskedImage => "an image with a mask (its transparency)",
            InputKind::PoseFile => "an OpenPose keypoint file",
        }
    }
}

/// The control values of a marked image (see [`InputKind::MaskedImage`]): RGB / 255, and -1
/// in every channel of a pixel whose alpha is below 128 (diffusers'
/// `make_inpaint_condition`: `image[mask > 0.5] = -1.0`). HWC, f32.
pub fn marked_control_values(marked: &ImageBuf) -> Vec<f32> {
    let mut out = Vec::with_capacity(marked.width * marked.height * 3);
    for px in marked.data.chunks_exact(marked.channels) {
        let masked = marked.channels == 4 && px[3] < 128;
        for &c in &px[..3] {
            out.push(if masked { -1.0 } else { c as f32 / 255.0 });
        }
    }
    out
}

/// A preprocessor: turns an input image into a control image.
pub trait Preprocessor: Send + Sync {
    /// The name used in configs and on the command line (`canny`, `openpose`, ...).
    fn name(&self) -> &str;
    /// One line for `sdctl preprocessors list`.
    fn description(&self) -> &str;
    /// The parameters it accepts.
    fn params(&self) -> Vec<ParamSpec>;
    /// Run on an image with validated parameters (every declared one present): RGB, or RGBA
    /// for [`InputKind::MaskedImage`] when the image has transparency.
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
    /// The kinds of input it takes; an image unless it says otherwise. Plugin libraries
    /// loaded at run time take images.
    fn input_kinds(&self) -> &[InputKind] {
        &[InputKind::Image]
    }
    /// Whether its input is brought to the processor resolution first (sd-webui-controlnet's
    /// `processor_res`); the inpaint preprocessors work at the image's own size (they have no
    /// resolution slider in sd-webui-controlnet), so the mark lands where the mask says.
    fn uses_resolution(&self) -> bool {
        true
    }
    /// Whether it takes inputs of `kind`.
    fn takes(&self, kind: InputKind) -> bool {
        self.input_kinds().contains(&kind)
    }
    /// Read a file input (a kind with [`InputKind::is_file`]) into a control image.
    /// `size` (width, height) is the size to draw at when the file does not say (the
    /// generation size). Only preprocessors declaring such a kind implement it. Errors name
    /// the problem, not the file (callers add its path).
    fn process_file(
        &self,
        path: &Path,
        size: (usize, usize),
        params: &Params,
    ) -> Result<ImageBuf, PluginError> {
        let _ = (path, size, params);
        Err(PluginError::failed(
            self.name(),
            "takes images only, not files",
        ))
    }
}

/// A built-in preprocessor, collected at link time (see [`register_preprocessor!`](crate::register_preprocessor)).
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

#[cfg(test)]
mod tests {
    use super::*;

    struct Plain;
    impl Preprocessor for Plain {
        fn name(&self) -> &str {
            "plain"
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
    }

    #[test]
    fn preprocessors_take_images_unless_they_say_otherwise() {
        assert_eq!(Plain.input_kinds(), &[InputKind::Image]);
        assert!(Plain.takes(InputKind::Image) && !Plain.takes(InputKind::PoseFile));
        let e = Plain
            .process_file(Path::new("p.json"), (8, 8), &Params::default())
            .unwrap_err();
        assert_eq!(e.to_string(), "plain: takes images only, not files");
    }

    #[test]
    fn json_files_are_pose_files() {
        assert_eq!(
            InputKind::of_file(Path::new("a/p.JSON")),
            Some(InputKind::PoseFile)
        );
        assert_eq!(InputKind::of_file(Path::new("a/p.png")), None);
        assert_eq!(InputKind::of_file(Path::new("json")), None);
        assert!(InputKind::PoseFile.is_file() && !InputKind::MaskedImage.is_file());
    }

    #[test]
    fn marked_pixels_are_minus_one() {
        let m = ImageBuf::new(2, 1, 4, vec![255, 0, 51, 255, 9, 9, 9, 0]).unwrap();
        assert_eq!(
            marked_control_values(&m),
            vec![1.0, 0.0, 0.2, -1.0, -1.0, -1.0]
        );
    }
}
