//! CLIP tokenizer and text encoder against transformers (fixtures from make_fixtures.py).
//! Tolerance 1e-4 max abs (f32 forward; the references are f32 computations on fp16-exact
//! weights, so only summation order differs).

use candle_core::{DType, Device, Tensor};
use sd_pipeline::loading::diffusers::load_component;
use sd_pipeline::loading::files::weight_files;
use sd_pipeline::model::clip::ClipTextModel;
use sd_pipeline::model::config::ClipConfig;
use sd_pipeline::text::tokenizer::ClipTokenizer;
use sd_pipeline::text::{encode_chunks, encode_prompts};
use sd_plugins_api::ModelPart;
use sd_tests::{assert_close, expected, fixtures, get, model_dir};

fn prompts() -> Vec<String> {
    let path = fixtures().join("expected/clip_prompts.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn load(model: &str) -> (ClipTokenizer, ClipTextModel) {
    let dir = model_dir(model);
    let tok = ClipTokenizer::from_dir(&dir.join("tokenizer")).unwrap();
    let cfg = ClipConfig::from_file(&dir.join("text_encoder/config.json")).unwrap();
    let files = weight_files(&dir.join("text_encoder")).unwrap();
    let clip = load_component(
        &files,
        ModelPart::TextEncoder,
        &[],
        DType::F32,
        &Device::Cpu,
        |vb| ClipTextModel::new(&cfg, vb),
    )
    .unwrap();
    (tok, clip)
}

fn check(model: &str) {
    let (tok, clip) = load(model);
    let exp = expected(&format!("clip_{model}.safetensors"));
    for (i, prompt) in prompts().iter().enumerate() {
        let chunks = tok.chunks(prompt).unwrap();
        let ids: Vec<Vec<i64>> = get(&exp, &format!("ids_{i}"))
            .to_dtype(DType::I64)
            .unwrap()
            .to_vec2()
            .unwrap();
        let ours: Vec<Vec<i64>> = chunks
            .iter()
            .map(|c| c.iter().map(|&t| t as i64).collect())
            .collect();
        assert_eq!(ours, ids, "{model}: token ids of prompt {i} {prompt:?}");
        for skip in [1, 2] {
            // raw text (no emphasis parsing): what transformers computes
            let h = encode_chunks(&clip, &chunks, skip, &Device::Cpu).unwrap();
            let want = get(&exp, &format!("hidden_skip{skip}_{i}"));
            assert_close(
                &format!("{model} prompt {i} clip_skip {skip}"),
                &h,
                want,
                1e-4,
            );
        }
    }
}

#[test]
fn sd1_tokens_and_hidden_states_match_transformers() {
    check("sd1");
}

#[test]
fn sd2_tokens_and_hidden_states_match_transformers() {
    check("sd2");
}

#[test]
fn sd2_pads_with_its_own_pad_token() {
    let (sd1, _) = load("sd1");
    let (sd2, _) = load("sd2");
    assert_eq!(sd1.pad, sd1.eos, "SD1 pads with <|endoftext|>");
    assert_eq!(sd2.pad, 0, "SD2 pads with '!' (id 0)");
}

#[test]
fn negative_prompt_is_padded_to_the_positive_chunk_count() {
    let (tok, clip) = load("sd1");
    let long = prompts().into_iter().max_by_key(|p| p.len()).unwrap();
    let (c, u) = encode_prompts(&tok, &clip, &long, Some("blurry"), 1, &Device::Cpu).unwrap();
    let u = u.unwrap();
    assert_eq!(c.dims(), u.dims());
    let n = tok.chunks(&long).unwrap().len();
    assert!(n >= 2);
    // The padding chunks are the encoding of the empty prompt.
    let (empty, _) = encode_prompts(&tok, &clip, "", None, 1, &Device::Cpu).unwrap();
    let tail = u.narrow(1, 77, 77).unwrap();
    assert_close("uncond padding chunk", &tail, &empty, 1e-6);
    let _ = Tensor::zeros(1, DType::F32, &Device::Cpu);
}

#[test]
fn clip_skip_out_of_range_is_a_clear_error() {
    let (tok, clip) = load("sd1");
    let e = encode_prompts(&tok, &clip, "a cat", None, 9, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("clip_skip 9"), "{e}");
}

#[test]
fn a1111_emphasis_matches_the_reference_algorithm() {
    // expected: make_fixtures.py's port of A1111's parser, chunking with weights and
    // process_tokens (scale per token, restore the chunk's mean) on the sd1 text encoder
    let (tok, clip) = load("sd1");
    let exp = expected("emphasis_sd1.safetensors");
    let path = fixtures().join("expected/emphasis_prompts.json");
    let prompts: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let chunks = sd_pipeline::text::prompt_chunks(&tok, p).unwrap();
        let want: Vec<Vec<f32>> = get(&exp, &format!("weights_{i}")).to_vec2().unwrap();
        let got: Vec<Vec<f32>> = chunks.iter().map(|c| c.weights.clone()).collect();
        assert_eq!(got.len(), want.len(), "{p}: chunk count");
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!((g - w).abs() < 1e-6, "{p}: weights {got:?} vs {want:?}");
        }
        let (h, _) = encode_prompts(&tok, &clip, p, None, 1, &Device::Cpu).unwrap();
        assert_close(
            &format!("emphasis {p:?}"),
            &h,
            get(&exp, &format!("hidden_{i}")),
            1e-4,
        );
    }
}
