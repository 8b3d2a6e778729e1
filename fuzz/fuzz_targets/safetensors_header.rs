//! A safetensors file: the input is its JSON header (the 8-byte length is put in front, so
//! every input reaches the header parser) followed by the data. Read as weights (shapes,
//! every tensor) and as a LoRA; any error is fine, a panic, hang or huge allocation is not.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (header_len, rest) = match data.split_first() {
        // the first byte picks how much of the input is header (the rest is the data area)
        Some((&k, rest)) => ((rest.len() * k as usize / 255).min(rest.len()), rest),
        None => return,
    };
    let mut file = (header_len as u64).to_le_bytes().to_vec();
    file.extend_from_slice(rest);
    let path = sd_fuzz::scratch("w.safetensors", &file);
    let _ = sd_weights::tensor_shapes(&path);
    if let Ok(store) = sd_weights::Store::open(&path) {
        for (name, _) in store.shapes().iter() {
            let _ = store.get(name);
        }
    }
    let _ = sd_lora::LoraFile::load(&path);
});
