//! A PNG's text chunks (tEXt, zTXt, iTXt), then each text read as A1111 infotext and the
//! file as `--from-png` settings. The input is cut into chunks (a type byte, a length byte,
//! the data) written with valid CRCs after a 1x1 IHDR, so inputs reach the text readers
//! rather than dying at the checksum.
#![no_main]

use libfuzzer_sys::fuzz_target;

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

fuzz_target!(|data: &[u8]| {
    let mut file = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut file, b"IHDR", &[0, 0, 0, 1, 0, 0, 0, 1, 8, 0, 0, 0, 0]);
    let mut rest = data;
    while let [kind, len, tail @ ..] = rest {
        let n = (*len as usize * 4).min(tail.len());
        let (body, next) = tail.split_at(n);
        let kind = match kind % 5 {
            0 => b"tEXt",
            1 => b"zTXt",
            2 => b"iTXt",
            3 => b"IDAT",
            _ => b"IEND",
        };
        chunk(&mut file, kind, body);
        rest = next;
    }
    let path = sd_fuzz::scratch("t.png", &file);
    if let Ok(chunks) = sd::png_text::text_chunks(&path) {
        for (_, text) in &chunks {
            let _ = sd::infotext::parse_parameters(text);
        }
    }
    let _ = sd::infotext::png_settings(&path);
});
