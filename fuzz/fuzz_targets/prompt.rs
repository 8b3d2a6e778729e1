//! A prompt: LoRA tags taken out (and their names resolved against a folder), then the rest
//! parsed for A1111 attention weights.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(prompt) = std::str::from_utf8(data) else { return };
    if let Ok((rest, tags)) = sd_lora::extract_lora_tags(prompt) {
        let dir = std::env::temp_dir();
        for tag in &tags {
            let _ = tag.check_weights(false);
            let _ = sd_lora::resolve_tag(Some(&dir), &tag.name);
        }
        let _ = sd_pipeline::text::prompt::parse_prompt_attention(&rest);
    }
    let _ = sd_pipeline::text::prompt::parse_prompt_attention(prompt);
});
