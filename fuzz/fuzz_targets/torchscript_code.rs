//! The code of a TorchScript archive (`code/__torch__/**.py`), parsed as the DWPose converter
//! parses it: any error is fine, a panic, hang or stack overflow is not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sd_preprocessors::onnx::torchscript::parse::Code;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data).into_owned();
    let _ = Code::parse(&[("__torch__/fuzz.py".to_string(), text)]);
});
