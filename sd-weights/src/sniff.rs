//! What a weight file is, from its first bytes: refusals say "a PyTorch pickle" or "it starts
//! with text" instead of a safetensors parser's "header too large".

use std::io::Read;
use std::path::Path;

/// The first bytes of a file (fewer for a short file; none when it cannot be read).
pub(crate) fn head(path: &Path, n: usize) -> Vec<u8> {
    let mut buf = Vec::with_capacity(n);
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(n as u64).read_to_end(&mut buf);
    }
    buf
}

/// True when the file starts like a zip archive (what `torch.save` writes).
pub fn is_zip(path: &Path) -> bool {
    head(path, 4) == b"PK\x03\x04"
}

/// Why a file whose first bytes are `start` is not a safetensors file, when they say so
/// clearly; `None` when they look like a safetensors header (an 8-byte length, then `{`).
pub fn not_safetensors(start: &[u8]) -> Option<String> {
    if start.is_empty() {
        return Some("the file is empty".into());
    }
    if start.len() >= 9 && start[8] == b'{' {
        return None;
    }
    if start.starts_with(b"PK\x03\x04") {
        return Some(
            "it is a zip archive (a PyTorch .ckpt / .pth checkpoint?), not a safetensors file"
                .into(),
        );
    }
    if start[0] == 0x80 && start.len() > 1 && (2..=5).contains(&start[1]) {
        return Some(
            "it is a raw Python pickle (a legacy torch.save file), not a safetensors file; \
             save it as .safetensors or with torch.save's zip format (.pt / .pth / .ckpt)"
                .into(),
        );
    }
    let text = String::from_utf8_lossy(start);
    let printable = text
        .chars()
        .filter(|c| !c.is_control() || c.is_whitespace())
        .count();
    if printable * 10 >= text.chars().count() * 9 {
        let shown: String = text.chars().take(32).flat_map(char::escape_debug).collect();
        return Some(format!(
            "not a safetensors file: it starts with text (\"{shown}\")"
        ));
    }
    let hex: Vec<String> = start.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Some(format!(
        "not a safetensors file: it starts with bytes {} where an 8-byte header length and `{{` belong",
        hex.join(" ")
    ))
}

/// [`not_safetensors`] for a file.
pub fn describe(path: &Path) -> Option<String> {
    not_safetensors(&head(path, 64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_what_a_file_is() {
        let st = [8u8, 0, 0, 0, 0, 0, 0, 0, b'{', b'}'];
        assert_eq!(not_safetensors(&st), None);
        assert!(not_safetensors(b"PK\x03\x04rest")
            .unwrap()
            .contains("zip archive"));
        assert!(not_safetensors(&[0x80, 2, b'}'])
            .unwrap()
            .contains("raw Python pickle"));
        assert!(not_safetensors(b"hello world, not weights")
            .unwrap()
            .contains("starts with text (\"hello world"));
        assert!(not_safetensors(&[0xff, 0xfe, 0, 1, 2, 3, 4, 5, 6])
            .unwrap()
            .contains("starts with bytes ff fe 00"));
        assert_eq!(not_safetensors(b"").unwrap(), "the file is empty");
    }
}
