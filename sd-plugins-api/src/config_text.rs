//! Limits on user-named config text (TOML, YAML, JSON) before a parser sees it, and short
//! excerpts of such text for messages.
//!
//! Parsers of nested text can take time or stack out of proportion to the text: libyaml
//! checks every open flow level on every token (400 KB of `[` took over a minute), and
//! deeply nested values are dropped and converted recursively. [`check_nesting`] is one cheap
//! pass over the text that refuses nesting deeper than [`MAX_NESTING`] levels, naming the
//! line. It reads lists and tables in flow form (`[`, `{`, in all three formats) and YAML's
//! block form (indentation and `- - -`), outside strings and comments: an approximation that
//! never counts less than the parser sees for the forms that nest cheaply in bytes.
//! [`read_config`] is the one way config files are read: a regular file (see
//! [`crate::input_file`]), UTF-8, at most [`crate::input_file::MAX_TEXT_BYTES`], nesting
//! checked.

use std::path::Path;

/// The deepest nesting of lists and tables a config file may have. Real configs (sdctl
/// settings, LDM sidecars, diffusers folders) stay under 16.
pub const MAX_NESTING: usize = 64;

/// At most this many characters of a line are quoted in messages.
pub const EXCERPT_CHARS: usize = 80;

/// A config file's text: a regular file, UTF-8, bounded in size and nesting. Errors name the
/// path.
pub fn read_config(path: &Path) -> Result<String, String> {
    let text = crate::input_file::read_to_string(path)?;
    check_nesting(&text, MAX_NESTING).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text)
}

/// `message` without the `PATH: ` that [`read_config`] puts in front, for callers whose
/// errors name the path themselves.
pub fn without_path<'a>(path: &Path, message: &'a str) -> &'a str {
    let shown = path.display().to_string();
    message
        .strip_prefix(shown.as_str())
        .and_then(|m| m.strip_prefix(": "))
        .unwrap_or(message)
}

/// `Err` naming the line where lists and tables nest deeper than `max` levels.
pub fn check_nesting(text: &str, max: usize) -> Result<(), String> {
    let mut flow = 0usize; // open `[` / `{`
    let mut quote: Option<(u8, bool)> = None; // inside a string: its quote, tripled
    let mut escaped = false;
    let mut just_closed_single = false; // YAML `'it''s'`: '' inside a single-quoted string
    let mut block: Vec<usize> = Vec::new(); // YAML block levels: their columns
    let mut block_scalar: Option<usize> = None; // inside a `|` / `>` scalar indented past this
    for (line_no, line) in text.split('\n').enumerate() {
        let bytes = line.as_bytes();
        let indent = bytes.iter().take_while(|&&b| b == b' ').count();
        let blank = bytes[indent..]
            .iter()
            .all(|&b| b == b'\r' || b == b' ' || b == b'\t');
        if let Some(at) = block_scalar {
            if blank || indent > at {
                continue;
            }
            block_scalar = None;
        }
        let too_deep = || {
            Err(format!(
                "line {}: lists and tables nested more than {max} levels deep",
                line_no + 1
            ))
        };
        // YAML block structure: indentation, and `- ` / `? ` indicators on the same line
        if quote.is_none() && flow == 0 && !blank && bytes[indent] != b'#' {
            while block.last().is_some_and(|&c| c >= indent) {
                block.pop();
            }
            let mut col = indent;
            block.push(col);
            while col + 1 < bytes.len()
                && matches!(bytes[col], b'-' | b'?')
                && matches!(bytes[col + 1], b' ' | b'\t')
            {
                col += 2;
                while col < bytes.len() && bytes[col] == b' ' {
                    col += 1;
                }
                block.push(col);
            }
            if block.len() > max {
                return too_deep();
            }
        }
        // flow structure and strings, byte by byte
        let mut prev: Option<u8> = None; // last byte outside strings that is not a space
        let mut prev_spaced = true; // `prev` was at the line start or after a space
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            if let Some((q, triple)) = quote {
                if escaped {
                    escaped = false;
                } else if q == b'"' && b == b'\\' {
                    escaped = true;
                } else if b == q && (!triple || bytes[i..].starts_with(&[q, q, q])) {
                    quote = None;
                    just_closed_single = q == b'\'' && !triple;
                    prev = Some(b);
                    prev_spaced = false;
                    i += if triple { 3 } else { 1 };
                    continue;
                }
                i += 1;
                continue;
            }
            // where a value starts: brackets and quotes there are structure, elsewhere text
            let at_value = match prev {
                None | Some(b':' | b'=') => true,
                Some(b',' | b'[' | b'{') => flow > 0,
                Some(b'-' | b'?') => prev_spaced,
                _ => false,
            };
            let spaced_before = i == 0 || matches!(bytes[i - 1], b' ' | b'\t');
            match b {
                b' ' | b'\t' | b'\r' => {
                    i += 1;
                    continue;
                }
                b'#' if spaced_before => break,
                b'"' | b'\'' if at_value && bytes[i..].starts_with(&[b, b, b]) => {
                    // TOML's multi-line strings
                    quote = Some((b, true));
                    i += 3;
                    continue;
                }
                b'"' if at_value => quote = Some((b'"', false)),
                b'\'' if at_value || (just_closed_single && bytes[i - 1] == b'\'') => {
                    quote = Some((b'\'', false))
                }
                b'[' | b'{' if at_value || flow > 0 => {
                    flow += 1;
                    if flow + block.len() > max {
                        return too_deep();
                    }
                }
                b']' | b'}' if flow > 0 => flow -= 1,
                b'|' | b'>' if flow == 0 && at_value => {
                    // a block scalar if only its indicators follow
                    let rest = &line[i + 1..];
                    let rest = rest.split(" #").next().unwrap_or("").trim();
                    if rest.bytes().all(|c| matches!(c, b'-' | b'+' | b'1'..=b'9')) {
                        block_scalar = Some(indent);
                        break;
                    }
                }
                _ => {}
            }
            just_closed_single = false;
            prev_spaced = spaced_before;
            prev = Some(b);
            i += 1;
        }
    }
    Ok(())
}

/// One line of text for a message: control characters shown as `?`, cut at
/// [`EXCERPT_CHARS`] characters (with `...`).
pub fn excerpt(line: &str) -> String {
    let mut out: String = line
        .trim_end()
        .chars()
        .take(EXCERPT_CHARS)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if line.trim_end().chars().count() > EXCERPT_CHARS {
        out.push_str("...");
    }
    out
}

/// A parser's error message made short: any line of it longer than [`EXCERPT_CHARS`]
/// characters is cut, and at most `max_lines` of its lines are kept. Parsers quote the text
/// they failed on, and a file that is not a config at all (a log, `/etc/passwd`) can be
/// quoted whole.
pub fn short_message(message: &str, max_lines: usize) -> String {
    let lines: Vec<&str> = message.lines().collect();
    let mut out: Vec<String> = lines
        .iter()
        .take(max_lines)
        .map(|l| {
            if l.chars().count() > 2 * EXCERPT_CHARS {
                excerpt(l)
            } else {
                l.to_string()
            }
        })
        .collect();
    if lines.len() > max_lines {
        out.push(format!("... ({} more lines)", lines.len() - max_lines));
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth_ok(text: &str) -> bool {
        check_nesting(text, 8).is_ok()
    }

    #[test]
    fn flow_and_block_nesting_are_counted() {
        assert!(depth_ok("a = [[1, 2], [3]]\n[[lora]]\npath = \"x\"\n"));
        assert!(!depth_ok(&format!("prompt: {}\n", "[".repeat(20))));
        assert!(!depth_ok(&format!("prompt = {}\n", "{a=".repeat(20))));
        assert!(!depth_ok(&format!("{{\"a\": {}\n", "[".repeat(20))));
        assert!(!depth_ok(&format!("x:\n{}a\n", "- ".repeat(20))));
        let stairs: String = (0..20)
            .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
            .collect();
        assert!(!depth_ok(&stairs));
        // the error names the line
        let e = check_nesting(&format!("a: 1\nb: {}\n", "[".repeat(20)), 8).unwrap_err();
        assert!(e.starts_with("line 2: "), "{e}");
    }

    #[test]
    fn brackets_in_strings_comments_and_scalars_are_text() {
        let s = "[".repeat(20);
        assert!(depth_ok(&format!("prompt = \"{s}\"\n")));
        assert!(depth_ok(&format!("prompt = '{s}'\n")));
        assert!(depth_ok(&format!("prompt: \"a \\\" {s}\"\n")));
        assert!(depth_ok(&format!("prompt: 'it''s {s}'\n")));
        assert!(depth_ok(&format!("# {s}\nsteps: 3 # {s}\n")));
        assert!(depth_ok(&format!("prompt: a cat {s}\n")));
        assert!(depth_ok(&format!("prompt: a, b {s} c\n")));
        assert!(depth_ok(&format!("prompt: don't {s}\n")));
        assert!(depth_ok(&format!("prompt: |\n  {s}\n    {s}\nsteps: 3\n")));
        // a block scalar's stair-stepped text is not nesting
        let stairs: String = (0..20)
            .map(|i| format!("{}t\n", " ".repeat(i + 2)))
            .collect();
        assert!(depth_ok(&format!("prompt: >-\n{stairs}steps: 3\n")));
        // strings spanning lines
        assert!(depth_ok(&format!("prompt = \"\"\"\n{s}\n\"\"\"\n")));
    }

    #[test]
    fn a_deep_megabyte_is_refused_quickly() {
        let text = format!("prompt: {}\n", "[".repeat(1 << 20));
        let t = std::time::Instant::now();
        assert!(check_nesting(&text, MAX_NESTING).is_err());
        assert!(t.elapsed().as_secs() < 2);
    }

    #[test]
    fn excerpts_are_short() {
        let long = "x".repeat(1000);
        assert_eq!(excerpt(&long).chars().count(), EXCERPT_CHARS + 3);
        assert_eq!(excerpt("a\u{1b}[2Jb"), "a?[2Jb");
        let msg = format!("bad at line 1\n{long}\nmore\nmore\n");
        let m = short_message(&msg, 2);
        assert!(m.len() < 200, "{m}");
        assert!(m.ends_with("(2 more lines)"), "{m}");
    }
}
