//! A settings file as `--config` reads it: TOML, YAML or JSON (picked by the first byte),
//! includes expanded, layered, and extracted as values.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else { return };
    let name = ["c.toml", "c.yaml", "c.json"][kind as usize % 3];
    let path = sd_fuzz::scratch(name, body);
    let mut problems = Vec::new();
    let files = sd::config::sources::expand_includes(&[path], &mut problems);
    let fig = sd::config::sources::compose(&files, None, Default::default());
    let _ = fig.extract::<figment::value::Value>();
});
