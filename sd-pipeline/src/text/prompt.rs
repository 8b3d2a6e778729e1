//! AUTOMATIC1111's prompt emphasis: `(text)` x1.1, `((text))`, `(text:1.3)`, `[text]` /1.1,
//! escapes `\(` `\)` `\[` `\]` `\\`, and `BREAK` (start a new 75-token chunk). Unbalanced
//! brackets degrade as A1111's parser does (an unclosed bracket applies to the rest), never fail.

use std::sync::OnceLock;

use regex::Regex;

/// A fragment of prompt text and its weight; `BREAK` is the fragment `("BREAK", -1.0)`.
pub type Fragment = (String, f32);

fn attention_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(
            r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:",
        )
        .expect("valid regex")
    })
}

fn break_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"\s*\bBREAK\b\s*").expect("valid regex"))
}

/// Split `text` into weighted fragments with A1111's rules (`prompt_parser.parse_prompt_attention`
/// semantics): round brackets multiply by 1.1 (or the given weight), square ones divide by 1.1.
pub fn parse_prompt_attention(text: &str) -> Vec<Fragment> {
    let mut res: Vec<Fragment> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let (round_mult, square_mult) = (1.1f32, 1.0f32 / 1.1);
    let multiply = |res: &mut Vec<Fragment>, start: usize, m: f32| {
        for f in res.iter_mut().skip(start) {
            f.1 *= m;
        }
    };
    for cap in attention_re().captures_iter(text) {
        let tok = cap.get(0).expect("match").as_str();
        let weight = cap.get(1).map(|m| m.as_str());
        // an escape keeps the character after it; a lone `\` keeps nothing (A1111 drops it)
        if let Some(stripped) = tok.strip_prefix('\\') {
            res.push((stripped.to_string(), 1.0));
        } else if tok == "(" {
            round.push(res.len());
        } else if tok == "[" {
            square.push(res.len());
        } else if let (Some(w), false) = (weight, round.is_empty()) {
            let start = round.pop().expect("non-empty");
            multiply(&mut res, start, w.parse().unwrap_or(1.0));
        } else if tok == ")" && !round.is_empty() {
            let start = round.pop().expect("non-empty");
            multiply(&mut res, start, round_mult);
        } else if tok == "]" && !square.is_empty() {
            let start = square.pop().expect("non-empty");
            multiply(&mut res, start, square_mult);
        } else {
            for (i, part) in break_re().split(tok).enumerate() {
                if i > 0 {
                    res.push(("BREAK".into(), -1.0));
                }
                res.push((part.to_string(), 1.0));
            }
        }
    }
    for start in round {
        multiply(&mut res, start, round_mult);
    }
    for start in square {
        multiply(&mut res, start, square_mult);
    }
    if res.is_empty() {
        res.push((String::new(), 1.0));
    }
    // merge runs of equal weight
    let mut merged: Vec<Fragment> = Vec::with_capacity(res.len());
    for (t, w) in res {
        match merged.last_mut() {
            Some((pt, pw)) if *pw == w && w != -1.0 => pt.push_str(&t),
            _ => merged.push((t, w)),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Vec<(String, f32)> {
        parse_prompt_attention(s)
            .into_iter()
            .map(|(t, w)| (t, (w * 10000.0).round() / 10000.0))
            .collect()
    }

    fn f(t: &str, w: f32) -> (String, f32) {
        (t.to_string(), w)
    }

    /// Every case of tests/fixtures/make_prompt_fixtures.py, which runs A1111's own
    /// `parse_prompt_attention` (taken from its `prompt_parser.py`) on them: the texts exactly,
    /// the weights to f32 precision (A1111 multiplies in f64).
    #[test]
    fn a1111s_parser_on_the_fixture_prompts() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/expected/prompt_attention.json"
        );
        let cases: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert!(cases.len() >= 30, "{}", cases.len());
        for c in &cases {
            let prompt = c["prompt"].as_str().unwrap();
            let want: Vec<(String, f64)> = c["fragments"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| (f[0].as_str().unwrap().to_string(), f[1].as_f64().unwrap()))
                .collect();
            let got = parse_prompt_attention(prompt);
            assert_eq!(got.len(), want.len(), "{prompt:?}: {got:?} vs {want:?}");
            for ((gt, gw), (wt, ww)) in got.iter().zip(&want) {
                assert_eq!(gt, wt, "{prompt:?}: {got:?} vs {want:?}");
                assert!(
                    (*gw as f64 - ww).abs() <= 1e-6 * ww.abs().max(1.0),
                    "{prompt:?}: weight {gw} vs {ww}"
                );
            }
        }
    }

    #[test]
    fn a1111_examples() {
        // the examples of A1111's parse_prompt_attention docstring
        assert_eq!(p("normal text"), vec![f("normal text", 1.0)]);
        assert_eq!(
            p("an (important) word"),
            vec![f("an ", 1.0), f("important", 1.1), f(" word", 1.0)]
        );
        assert_eq!(p("(unbalanced"), vec![f("unbalanced", 1.1)]);
        assert_eq!(p("\\(literal\\]"), vec![f("(literal]", 1.0)]);
        assert_eq!(
            p("(unnecessary)(parens)"),
            vec![f("unnecessaryparens", 1.1)]
        );
        assert_eq!(
            p("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
                .into_iter()
                .map(|(t, w)| (t, (w * 1000.0).round() / 1000.0))
                .collect::<Vec<_>>(),
            vec![
                f("a ", 1.0),
                f("house", 1.573),
                f(" ", 1.1),
                f("on", 1.0),
                f(" a ", 1.1),
                f("hill", 0.55),
                f(", sun, ", 1.1),
                f("sky", 1.464),
                f(".", 1.1)
            ]
        );
    }

    #[test]
    fn break_and_degenerate_input() {
        assert_eq!(
            p("a cat BREAK a dog"),
            vec![f("a cat", 1.0), f("BREAK", -1.0), f("a dog", 1.0)]
        );
        assert_eq!(p(""), vec![f("", 1.0)]);
        assert_eq!(p("))]]:"), vec![f("))]]:", 1.0)]);
        assert_eq!(p("[a [b"), vec![f("a ", 0.9091), f("b", 0.8264)]);
    }
}
