//! Plugins that break the rules on purpose, one per cargo feature, for the host's boundary
//! tests (see `cli/tests/plugins.rs`).

#[cfg(not(any(
    feature = "wrong_abi",
    feature = "wrong_size",
    feature = "no_entry",
    feature = "entry_is_data"
)))]
mod via_macro {
    use sd_plugins_api::{
        export_plugin, hwc3, ImageBuf, ParamSpec, Params, PluginError, Preprocessor,
    };

    #[derive(Default)]
    pub struct Misbehaving;

    impl Preprocessor for Misbehaving {
        fn name(&self) -> &str {
            "misbehaving"
        }
        fn description(&self) -> &str {
            "test plugin"
        }
        fn params(&self) -> Vec<ParamSpec> {
            Vec::new()
        }
        fn process(&self, input: &ImageBuf, _: &Params) -> Result<ImageBuf, PluginError> {
            if cfg!(feature = "panics") {
                panic!("deliberate panic inside process");
            }
            let mut out = hwc3(input);
            out.data.iter_mut().for_each(|v| *v = 255 - *v);
            Ok(out)
        }
    }

    export_plugin!(preprocessor: Misbehaving);
}

/// Hand-written tables for the cases the macro would never produce.
#[cfg(any(feature = "wrong_abi", feature = "wrong_size"))]
mod by_hand {
    use sd_plugins_api::dylib::abi::*;

    extern "C" fn manifest() -> SdStr {
        SdStr::new(
            r#"{"kind":"preprocessor","name":"misbehaving","version":"0.0.0","description":"test","params":[]}"#,
        )
    }

    extern "C" fn process(
        _: SdStr,
        input: *const SdImage,
        out: *mut SdImageOut,
        _: *mut SdErrBuf,
    ) -> i32 {
        let input = unsafe { &*input };
        // claims the input's size but allocates 10 bytes
        let mut v = std::mem::ManuallyDrop::new(vec![0u8; 10]);
        unsafe {
            *out = SdImageOut {
                width: input.width,
                height: input.height,
                channels: 3,
                data: v.as_mut_ptr(),
                len: v.len(),
                cap: v.capacity(),
            };
        }
        SD_OK
    }

    extern "C" fn free_image(out: *mut SdImageOut) {
        let o = unsafe { &mut *out };
        drop(unsafe { Vec::from_raw_parts(o.data, o.len, o.cap) });
    }

    extern "C" fn free_tensor(_: *mut SdTensorOut) {}
    extern "C" fn free_tensors(_: *mut SdTensorsOut) {}

    static TABLE: SdPluginV1 = SdPluginV1 {
        abi_version: if cfg!(feature = "wrong_abi") {
            999
        } else {
            ABI_VERSION
        },
        struct_size: std::mem::size_of::<SdPluginV1>() as u32,
        manifest,
        process: Some(process),
        free_image,
        create: None,
        destroy: None,
        on_conditioning: None,
        before_step: None,
        residuals: None,
        on_noise_pred: None,
        after_step: None,
        on_image: None,
        patches: None,
        weight_delta: None,
        free_tensor,
        free_tensors,
    };

    #[no_mangle]
    pub extern "C" fn sd_plugin_entry() -> *const SdPluginV1 {
        &TABLE
    }
}

/// Something to export so the library is not empty.
#[cfg(feature = "no_entry")]
#[no_mangle]
pub extern "C" fn not_a_plugin() -> i32 {
    42
}

/// The entry symbol as data: calling it would jump into a non-executable page.
#[cfg(feature = "entry_is_data")]
#[no_mangle]
#[allow(non_upper_case_globals)]
pub static sd_plugin_entry: [u64; 4] = [0; 4];
