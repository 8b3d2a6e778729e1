//! Textual-inversion embeddings against diffusers' `load_textual_inversion`
//! (make_embedding_fixtures.py): the A1111 `.pt`, `emb_params` safetensors and diffusers `.bin`
//! formats, one and several vectors, in the prompt and the negative prompt, SD1 and SDXL (CLIP-L
//! and bigG vectors). Tolerances: 1e-5 on text-encoder outputs (one f32 CLIP pass, values ~3),
//! 1e-3 on 4-step latents (as the pipeline fixtures).

use candle_core::{DType, Device};
use sd_pipeline::text::embeddings::scan_dir;
use sd_pipeline::text::{encode_prompts_dual_with, encode_prompts_with, prompt_chunks_with};
use sd_pipeline::{GenerateRequest, StableDiffusion};
use sd_plugins_api::HookSet;
use sd_tests::{assert_close, expected, fixtures, get, model_dir, Replay};
use serde_json::Value;

fn meta() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("expected/embeddings.json")).unwrap(),
    )
    .unwrap()
}

fn sd(name: &str) -> StableDiffusion {
    StableDiffusion::load(&model_dir(name), &Device::Cpu, DType::F32, &[]).unwrap()
}

#[test]
fn a_folder_scan_reads_every_format_and_names_what_it_skips() {
    let scan = scan_dir(&fixtures().join("embeddings")).unwrap();
    let names: Vec<(&str, usize)> = scan
        .loaded
        .iter()
        .map(|t| (t.name.as_str(), t.vectors))
        .collect();
    assert_eq!(
        names,
        [
            ("badhands", 3),
            ("learned", 1),
            ("tinystyle", 1),
            ("wide", 2),
            ("xlstyle", 2)
        ]
    );
    assert_eq!(scan.skipped.len(), 1, "{:?}", scan.skipped);
    let (path, why) = &scan.skipped[0];
    assert!(path.ends_with("broken.safetensors"), "{path:?}");
    assert!(why.contains("emb_params") && why.contains("a, b"), "{why}");

    let mut m = sd("sd1");
    let mut skipped = m.set_embeddings(&scan.loaded);
    skipped.sort();
    let skipped_names: Vec<&str> = skipped.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(skipped_names, ["wide", "xlstyle"]);
    assert!(
        skipped[0].1.contains("[16]") && skipped[0].1.contains("[8]"),
        "{skipped:?}"
    );
    let used = m
        .embeddings_used(meta()["prompt"].as_str().unwrap())
        .unwrap();
    assert_eq!(used, ["badhands", "learned", "tinystyle"]);
    assert!(m.embeddings_used("a plain prompt").unwrap().is_empty());
}

#[test]
fn sd1_embeddings_match_diffusers_in_prompt_and_negative() {
    let meta = meta();
    let exp = expected("embeddings.safetensors");
    let mut m = sd("sd1");
    m.set_embeddings(&scan_dir(&fixtures().join("embeddings")).unwrap().loaded);
    let (prompt, negative) = (
        meta["prompt"].as_str().unwrap(),
        meta["negative"].as_str().unwrap(),
    );
    let (cond, uncond) = encode_prompts_with(
        &m.tokenizer,
        &m.text_encoder,
        prompt,
        Some(negative),
        1,
        &m.embeddings,
        &Device::Cpu,
    )
    .unwrap();
    assert_close("sd1 cond", &cond, get(&exp, "sd1.cond"), 1e-5);
    assert_close(
        "sd1 uncond",
        &uncond.unwrap(),
        get(&exp, "sd1.uncond"),
        1e-5,
    );

    // the whole generation (diffusers' StableDiffusionPipeline with the prompt strings)
    let mut req = GenerateRequest::new(prompt);
    req.negative_prompt = Some(negative.into());
    req.width = 64;
    req.height = 64;
    req.steps = 4;
    req.cfg_scale = 7.5;
    req.sampler = "euler".parse().unwrap();
    req.schedule = "normal".parse().unwrap();
    req.noise = Some(get(&exp, "sd1.noise").clone());
    let latents = m
        .denoise(&req, &mut HookSet::new(), &mut Replay::new(None))
        .unwrap();
    assert_close("sd1 latents", &latents, get(&exp, "sd1.latents"), 1e-3);

    // without the embeddings the names are plain words: far from the reference
    let plain = sd("sd1");
    let (c0, _) = encode_prompts_with(
        &plain.tokenizer,
        &plain.text_encoder,
        prompt,
        None,
        1,
        &plain.embeddings,
        &Device::Cpu,
    )
    .unwrap();
    assert!(sd_tests::max_abs_diff(&c0, get(&exp, "sd1.cond")) > 0.1);
}

#[test]
fn sdxl_embeddings_give_each_encoder_its_vectors() {
    let meta = meta();
    let exp = expected("embeddings.safetensors");
    let mut m = sd("sdxl");
    let skipped = m.set_embeddings(&scan_dir(&fixtures().join("embeddings")).unwrap().loaded);
    assert_eq!(skipped.len(), 4, "{skipped:?}"); // all but xlstyle
    let (te2, tok2) = m.text_encoder_2.as_ref().unwrap();
    let encoders = [(&m.tokenizer, &m.text_encoder), (tok2, te2)];
    let d = encode_prompts_dual_with(
        &encoders,
        meta["xl_prompt"].as_str().unwrap(),
        Some(Some(meta["xl_negative"].as_str().unwrap())),
        1,
        &m.embeddings,
        &Device::Cpu,
    )
    .unwrap();
    let (uncond, uncond_pooled) = d.uncond.unwrap();
    assert_close("sdxl cond", &d.cond, get(&exp, "sdxl.cond"), 1e-5);
    assert_close("sdxl uncond", &uncond, get(&exp, "sdxl.uncond"), 1e-5);
    assert_close("sdxl pooled", &d.pooled, get(&exp, "sdxl.pooled"), 1e-5);
    assert_close(
        "sdxl uncond pooled",
        &uncond_pooled,
        get(&exp, "sdxl.uncond_pooled"),
        1e-5,
    );
}

/// torch.save archives of any name load (a 21-character archive name once made the zip
/// reader's offset detection misplace the central directory).
#[test]
fn a_pt_of_any_archive_name_loads() {
    let t = sd_pipeline::text::embeddings::TextualInversion::load(
        &fixtures().join("embeddings-names/negative_hands_v21_xx.pt"),
    )
    .unwrap();
    assert_eq!((t.name.as_str(), t.vectors), ("negative_hands_v21_xx", 1));
}

/// A1111's `tokenize_line`: an embedding takes one slot per vector at its fragment's emphasis,
/// and moves to a new chunk whole when it does not fit in the current one.
#[test]
fn embedding_slots_take_emphasis_and_never_straddle_chunks() {
    let mut m = sd("sd1");
    m.set_embeddings(&scan_dir(&fixtures().join("embeddings")).unwrap().loaded);
    let chunks = prompt_chunks_with(&m.tokenizer, "(badhands:1.5) x", &m.embeddings).unwrap();
    assert_eq!(chunks.len(), 1);
    let c = &chunks[0];
    assert_eq!(c.fixes.len(), 1);
    assert_eq!(c.fixes[0].offset, 1);
    assert_eq!(&c.ids[1..4], &[0, 0, 0]);
    assert_eq!(&c.weights[1..5], &[1.5, 1.5, 1.5, 1.0]);
    // 73 words, then the 3-vector embedding: 2 slots are left, so it starts chunk 2
    let long = format!("{} badhands", vec!["cat"; 73].join(" "));
    let chunks = prompt_chunks_with(&m.tokenizer, &long, &m.embeddings).unwrap();
    assert_eq!(chunks.len(), 2);
    assert!(chunks[0].fixes.is_empty());
    assert_eq!(chunks[1].fixes[0].offset, 1);
}

/// A folder of more files than `MAX_FILES` reads that many and names the rest as skipped.
#[test]
fn a_folder_of_too_many_files_is_bounded() {
    use sd_pipeline::text::embeddings::MAX_FILES;
    let dir = std::env::temp_dir().join(format!("sd-emb-many-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..MAX_FILES + 3 {
        std::fs::write(dir.join(format!("e{i:05}.pt")), b"").unwrap();
    }
    let scan = scan_dir(&dir).unwrap();
    assert!(scan.loaded.is_empty());
    assert_eq!(scan.skipped.len(), MAX_FILES + 3);
    let over = scan
        .skipped
        .iter()
        .filter(|(_, why)| why.contains("more than"))
        .count();
    assert_eq!(over, 3);
    let _ = std::fs::remove_dir_all(&dir);
}
