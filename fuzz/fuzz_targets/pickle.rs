//! A PyTorch checkpoint: a zip whose `archive/data.pkl` is the input (so every input
//! reaches the pickle reader), or, when the first byte is odd, the input as the whole file
//! (the zip reader). Shapes are read, then the tensors.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else { return };
    let file = if mode & 1 == 1 {
        body.to_vec()
    } else {
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        zip.start_file("archive/data.pkl", opts).unwrap();
        zip.write_all(body).unwrap();
        // a small storage member, so tensor records that name it can be read
        zip.start_file("archive/data/0", opts).unwrap();
        zip.write_all(&[0u8; 64]).unwrap();
        zip.finish().unwrap().into_inner()
    };
    let path = sd_fuzz::scratch("w.pth", &file);
    let _ = sd_weights::pickle::shapes(&path);
    let _ = sd_weights::pickle::load(&path);
});
