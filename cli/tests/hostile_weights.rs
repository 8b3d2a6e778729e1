//! Hostile weight files and non-finite numbers (issue 30): pickle bombs refused in bounded
//! time and memory, NaN / infinity in weights, LoRAs and results named as errors instead of
//! black images, LoRA alphas that are not numbers, files that are not what they claim, a
//! tokenizer larger than its text encoder, conversions that would write wrong shapes, and a
//! damaged embedded-model cache. Every payload is made here by the tests themselves.

use std::collections::HashMap;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use sd_tests::{fixtures, model_dir};

use crate::common::{copy_tree, failed, fails, ok, s, scratch, sdctl, sdctl_command};

// ---------------------------------------------------------------------------------------
// Pickles and zip archives, byte by byte

fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// One zip member as it is written: name, method (0 stored, 8 deflated), the bytes as
/// stored, the uncompressed size and CRC the directory declares.
struct Member<'a> {
    name: &'a str,
    method: u16,
    data: &'a [u8],
    size: u32,
    crc: u32,
}

impl<'a> Member<'a> {
    fn stored(name: &'a str, data: &'a [u8]) -> Self {
        Self {
            name,
            method: 0,
            data,
            size: data.len() as u32,
            crc: crc32(data),
        }
    }
}

/// A zip archive written by hand (so a member's data can be any deflate stream).
fn zip(path: &Path, members: &[Member]) {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for m in members {
        let offset = out.len() as u32;
        let n = m.name.len() as u16;
        let mut common = Vec::new();
        common.extend(20u16.to_le_bytes()); // version needed
        common.extend(0u16.to_le_bytes()); // flags
        common.extend(m.method.to_le_bytes());
        common.extend([0u8; 4]); // time, date
        common.extend(m.crc.to_le_bytes());
        common.extend((m.data.len() as u32).to_le_bytes());
        common.extend(m.size.to_le_bytes());
        common.extend(n.to_le_bytes());
        common.extend(0u16.to_le_bytes()); // extra
        out.extend(0x0403_4b50u32.to_le_bytes());
        out.extend(&common);
        out.extend(m.name.as_bytes());
        out.extend(m.data);
        central.extend(0x0201_4b50u32.to_le_bytes());
        central.extend(20u16.to_le_bytes()); // version made by
        central.extend(&common);
        central.extend([0u8; 6]); // comment length, disk, internal attributes
        central.extend(0u32.to_le_bytes()); // external attributes
        central.extend(offset.to_le_bytes());
        central.extend(m.name.as_bytes());
    }
    let cd_offset = out.len() as u32;
    out.extend(&central);
    out.extend(0x0605_4b50u32.to_le_bytes());
    out.extend([0u8; 4]);
    out.extend((members.len() as u16).to_le_bytes());
    out.extend((members.len() as u16).to_le_bytes());
    out.extend((central.len() as u32).to_le_bytes());
    out.extend(cd_offset.to_le_bytes());
    out.extend(0u16.to_le_bytes());
    std::fs::write(path, out).unwrap();
}

/// A PyTorch-style archive holding this pickle and no storages.
fn pickle_archive(path: &Path, pkl: &[u8]) {
    zip(path, &[Member::stored("archive/data.pkl", pkl)]);
}

fn unicode(s: &str) -> Vec<u8> {
    let mut v = vec![b'X'];
    v.extend((s.len() as u32).to_le_bytes());
    v.extend(s.as_bytes());
    v
}

fn int(i: i32) -> Vec<u8> {
    let mut v = vec![b'J'];
    v.extend(i.to_le_bytes());
    v
}

/// A pickle of the dict `{key: value}` (protocol 2).
fn dict_of(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut v = vec![0x80, 2, b'}'];
    for (k, value) in entries {
        v.extend(unicode(k));
        v.extend(value);
        v.push(b's');
    }
    v.push(b'.');
    v
}

/// The opcodes torch.save writes for a contiguous 1-d float32 tensor of `n` elements whose
/// storage `key` declares `n` elements.
fn tensor_1d(key: &str, n: i32) -> Vec<u8> {
    let mut v = b"ctorch._utils\n_rebuild_tensor_v2\n(".to_vec();
    v.push(b'(');
    v.extend(unicode("storage"));
    v.extend(b"ctorch\nFloatStorage\n");
    v.extend(unicode(key));
    v.extend(unicode("cpu"));
    v.extend(int(n));
    v.extend(b"tQ");
    v.extend(int(0));
    v.push(b'(');
    v.extend(int(n));
    v.extend(b"t(");
    v.extend(int(1));
    v.push(b't');
    v.push(0x89);
    v.extend(b"ccollections\nOrderedDict\n)R");
    v.extend(b"tR");
    v
}

/// LSB-first bit writer for a deflate stream.
#[derive(Default)]
struct Bits {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl Bits {
    fn put(&mut self, v: u64, n: u32) {
        self.acc |= v << self.n;
        self.n += n;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }
    /// A Huffman code: written most significant bit first.
    fn code(&mut self, code: u32, len: u32) {
        let rev = (0..len).fold(0u64, |r, i| {
            r | ((((code >> i) & 1) as u64) << (len - 1 - i))
        });
        self.put(rev, len);
    }
    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

/// A raw deflate stream inflating to `1 + 258 * reps` zero bytes at 2 bits per 258 bytes
/// (deflate's best ratio): one dynamic block whose codes are literal 0 (`10`), end of block
/// (`11`), length 258 (`0`) and distances 1 / 2 (`0` / `1`).
fn deflate_zeros(reps: usize) -> Vec<u8> {
    let mut b = Bits::default();
    b.put(1, 1); // final block
    b.put(2, 2); // dynamic Huffman
    b.put(29, 5); // 286 literal/length codes
    b.put(1, 5); // 2 distance codes
    b.put(14, 4); // 18 code-length codes
                  // code-length code lengths in their order; used: 18 (1 bit), 2 and 1 (2 bits)
    for sym in [16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1] {
        b.put(
            match sym {
                18 => 1,
                1 | 2 => 2,
                _ => 0,
            },
            3,
        );
    }
    // canonical code-length codes: 18 -> 0, 1 -> 10, 2 -> 11
    let (one, two) = ((2, 2), (3, 2));
    let zeros = |b: &mut Bits, n: u64| {
        b.code(0, 1);
        b.put(n - 11, 7);
    };
    b.code(two.0, two.1); // literal 0: length 2
    zeros(&mut b, 138);
    zeros(&mut b, 117); // literals 1..=255 unused
    b.code(two.0, two.1); // 256 (end of block): length 2
    zeros(&mut b, 28); // 257..=284 unused
    b.code(one.0, one.1); // 285 (length 258): length 1
    b.code(one.0, one.1); // distance 1: length 1
    b.code(one.0, one.1); // distance 2: length 1
    b.code(2, 2); // literal 0
    for _ in 0..reps / 4 {
        b.put(0, 8); // four times (length 258, distance 1)
    }
    for _ in 0..reps % 4 {
        b.put(0, 2);
    }
    b.code(3, 2); // end of block
    b.finish()
}

// ---------------------------------------------------------------------------------------
// Running sdctl within bounds

/// Runs sdctl under `/usr/bin/time` (where there is one); asserts it ends within 10 s and
/// 1 GB of memory; returns the output, the time and the max RSS in KB.
fn bounded(args: &[&str]) -> (Output, Duration, u64) {
    let time = Path::new("/usr/bin/time");
    let rss_file = std::env::temp_dir().join(format!(
        "sdctl-hostile-weights-rss-{}-{}",
        std::process::id(),
        args.len()
    ));
    let mut c = if time.is_file() {
        let mut c = std::process::Command::new(time);
        c.arg("-f").arg("%M").arg("-o").arg(&rss_file);
        c.arg(sdctl_command().get_program());
        c
    } else {
        sdctl_command()
    };
    for (k, v) in sdctl_command().get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c.args(args);
    let t = Instant::now();
    let o = c.output().unwrap();
    let took = t.elapsed();
    let rss = std::fs::read_to_string(&rss_file)
        .ok()
        .and_then(|t| t.lines().last()?.trim().parse().ok())
        .unwrap_or(0);
    let _ = std::fs::remove_file(&rss_file);
    eprintln!("sdctl {}: {took:?}, max RSS {rss} KB", args[..2].join(" "));
    assert!(took < Duration::from_secs(10), "{args:?} took {took:?}");
    assert!(rss < 1_000_000, "{args:?} used {rss} KB");
    (o, took, rss)
}

/// `model inspect`, `model convert` and a generation with the file as a ControlNet: each
/// refused, quickly, with an error naming the file and containing `want`.
fn refused_everywhere(file: &Path, want: &str) {
    let d = file.parent().unwrap();
    let out = d.join("converted");
    let control = format!(
        "model={},image={}",
        s(file),
        s(&fixtures().join("inputs/control_a.png"))
    );
    let png = d.join("out.png");
    for args in [
        vec!["model", "inspect", s(file)],
        vec![
            "model",
            "convert",
            s(file),
            "--output",
            s(&out),
            "--to",
            "diffusers",
        ],
        vec![
            "generate",
            "--model",
            s(&model_dir("sd1")),
            "--prompt",
            "x",
            "--steps",
            "1",
            "--width",
            "64",
            "--height",
            "64",
            "--control",
            &control,
            "--output",
            s(&png),
        ],
    ] {
        let (o, ..) = bounded(&args);
        let err = failed(&o);
        let name = file.file_name().unwrap().to_str().unwrap();
        assert!(err.contains(name) && err.contains(want), "{args:?}: {err}");
        assert!(!out.exists() && !png.exists());
    }
}

#[test]
fn a_pickle_nested_100k_levels_is_refused_not_a_stack_overflow() {
    let d = scratch("hostile-weights", "deep");
    let n = 100_000;
    let mut deep = vec![b']'; n];
    deep.extend(vec![b'a'; n - 1]);
    let p = d.join("deep.pth");
    pickle_archive(&p, &dict_of(&[("x", deep)]));
    assert!(std::fs::metadata(&p).unwrap().len() < 250_000);
    refused_everywhere(&p, "more than 1000 levels deep");
}

#[test]
fn pickle_memo_billion_laughs_is_refused() {
    let d = scratch("hostile-weights", "laughs");
    let mut v = vec![b'N', b'q', 0];
    for i in 0..20u8 {
        v.extend([b'h', i, b'h', i, 0x87, b'q', i + 1]);
    }
    let pkl = dict_of(&[("x", v)]);
    assert!(pkl.len() < 200);
    let p = d.join("laughs.pth");
    pickle_archive(&p, &pkl);
    refused_everywhere(&p, "MiB of objects");
}

#[test]
fn a_none_opcode_flood_is_refused() {
    let d = scratch("hostile-weights", "flood");
    let mut v = vec![b'('];
    v.extend(vec![b'N'; 145_000]);
    v.extend([b't', b'q', 0]);
    for _ in 0..48_000 {
        v.extend([b'h', 0, 0x86]);
    }
    let p = d.join("flood.pth");
    pickle_archive(&p, &dict_of(&[("x", v)]));
    refused_everywhere(&p, "MiB of objects");
}

#[test]
fn a_deflated_storage_inflating_to_gigabytes_is_never_inflated() {
    let d = scratch("hostile-weights", "inflate");
    // 16 bytes declared by the pickle; 3.8 GiB of zeros in 4 MB of deflate
    let reps = 16_000_000;
    let bomb = deflate_zeros(reps);
    assert!(bomb.len() < 5_000_000, "{}", bomb.len());
    let pkl = dict_of(&[("w", tensor_1d("0", 4))]);
    let p = d.join("bomb.pth");
    zip(
        &p,
        &[
            Member::stored("archive/data.pkl", &pkl),
            Member {
                name: "archive/data/0",
                method: 8,
                data: &bomb,
                size: (1 + 258 * reps) as u32,
                crc: 0,
            },
        ],
    );
    refused_everywhere(&p, "but the pickle declares 16");
}

// ---------------------------------------------------------------------------------------
// Non-finite numbers

/// Copy of a safetensors file with `edit` applied to its tensors.
fn edit_safetensors(from: &Path, to: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let mut m = candle_core::safetensors::load(from, &Device::Cpu).unwrap();
    edit(&mut m);
    candle_core::safetensors::save(&m, to).unwrap();
}

/// The tensor with one element replaced by `v`.
fn poisoned(t: &Tensor, v: f32) -> Tensor {
    let mut data = t
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    data[1] = v;
    Tensor::from_vec(data, t.dims(), &Device::Cpu)
        .unwrap()
        .to_dtype(t.dtype())
        .unwrap()
}

fn gen_args<'a>(model: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "generate",
        "--model",
        model,
        "--prompt",
        "a red circle",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "--seed",
        "1",
        "--output",
        out,
    ];
    v.extend_from_slice(extra);
    v
}

const KOHYA_UP: &str =
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight";
const KOHYA_ALPHA: &str =
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha";

#[test]
fn nan_or_infinity_in_a_lora_is_named_when_it_loads() {
    let d = scratch("hostile-weights", "nan-lora");
    let kohya = fixtures().join("loras/kohya_alpha.safetensors");
    let model = model_dir("sd1");
    let out = d.join("out").join("x.png");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    for (name, key, v) in [
        ("nan-up.safetensors", KOHYA_UP, f32::NAN),
        ("inf-alpha.safetensors", KOHYA_ALPHA, f32::INFINITY),
    ] {
        let lora = d.join(name);
        edit_safetensors(&kohya, &lora, |m| {
            let t = &m[key];
            let t = if t.elem_count() == 1 {
                Tensor::new(v, &Device::Cpu).unwrap()
            } else {
                poisoned(t, v)
            };
            m.insert(key.into(), t);
        });
        let err = fails(&gen_args(s(&model), s(&out), &["--lora", s(&lora)]), &out);
        assert!(
            err.contains(name) && err.contains(key) && err.contains("finite"),
            "{err}"
        );
        // lora merge refuses it too, and writes nothing
        let merged = d.join("merged");
        let err = failed(&sdctl(&[
            "lora",
            "merge",
            "--model",
            s(&model),
            "--lora",
            s(&lora),
            "--output",
            s(&merged),
        ]));
        assert!(err.contains(name) && err.contains(key), "{err}");
        assert!(!merged.exists());
    }
}

/// The fixture kohya LoRA with every factor set to 1e30: finite values whose products
/// overflow float32, so the patched weight is infinite.
fn overflowing_lora(to: &Path) {
    edit_safetensors(&fixtures().join("loras/kohya_alpha.safetensors"), to, |m| {
        for (k, t) in m.iter_mut() {
            if !k.ends_with(".alpha") {
                *t = (t.ones_like().unwrap() * 1e30).unwrap();
            }
        }
    });
}

#[test]
fn lora_merge_refuses_a_result_that_overflows() {
    let d = scratch("hostile-weights", "overflow");
    // finite values whose product overflows float32: the merged weight would be infinite
    let lora = d.join("huge.safetensors");
    overflowing_lora(&lora);
    let merged = d.join("merged");
    let err = failed(&sdctl(&[
        "lora",
        "merge",
        "--model",
        s(&model_dir("sd1")),
        "--lora",
        s(&lora),
        "--output",
        s(&merged),
    ]));
    assert!(
        err.contains("huge.safetensors") && err.contains("to_q.weight") && err.contains("finite"),
        "{err}"
    );
    assert!(!merged.exists());
}

#[test]
fn nan_in_a_model_weight_names_the_file_and_tensor() {
    let d = scratch("hostile-weights", "nan-model");
    let model = d.join("model");
    copy_tree(&model_dir("sd1"), &model);
    let unet = model.join("unet/diffusion_pytorch_model.safetensors");
    let key = "conv_in.weight";
    let tmp = d.join("unet.safetensors");
    edit_safetensors(&unet, &tmp, |m| {
        let t = poisoned(&m[key], f32::NAN);
        m.insert(key.into(), t);
    });
    std::fs::rename(&tmp, &unet).unwrap();
    let out = d.join("out").join("x.png");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let lat = d.join("out").join("x.safetensors");
    let err = fails(
        &gen_args(s(&model), s(&out), &["--save-latents", s(&lat)]),
        &out,
    );
    assert!(
        err.contains("after step 1 of 2")
            && err.contains(s(&unet))
            && err.contains(key)
            && err.contains("NaN at element 1"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------
// LoRA files that are not what they claim

#[test]
fn a_lora_alpha_must_be_one_number() {
    let d = scratch("hostile-weights", "alpha");
    let model = model_dir("sd1");
    let out = d.join("out").join("x.png");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    for (name, alpha, want) in [
        (
            "bytes.safetensors",
            Tensor::new(b"abc".as_slice(), &Device::Cpu).unwrap(),
            "shape [3]",
        ),
        (
            "byte.safetensors",
            Tensor::new(&[97u8], &Device::Cpu).unwrap(),
            "dtype U8",
        ),
    ] {
        let lora = d.join(name);
        edit_safetensors(
            &fixtures().join("loras/kohya_alpha.safetensors"),
            &lora,
            |m| {
                m.insert(KOHYA_ALPHA.into(), alpha);
            },
        );
        let err = fails(&gen_args(s(&model), s(&out), &["--lora", s(&lora)]), &out);
        assert!(
            err.contains(name) && err.contains(KOHYA_ALPHA) && err.contains(want),
            "{err}"
        );
    }
}

#[test]
fn a_lora_that_is_not_safetensors_says_what_it_is() {
    let d = scratch("hostile-weights", "sniff");
    let model = model_dir("sd1");
    let out = d.join("out").join("x.png");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let text = d.join("notes.safetensors");
    std::fs::write(&text, "these are my favourite prompts\n").unwrap();
    let raw = d.join("legacy.safetensors");
    std::fs::write(&raw, [0x80, 2, b'}', b'q', 0, b'.']).unwrap();
    // a PyTorch zip pickle given as a LoRA is read as one (here: a tensor that is no LoRA's)
    let zipped = d.join("zipped.safetensors");
    zip(
        &zipped,
        &[
            Member::stored("archive/data.pkl", &dict_of(&[("w", tensor_1d("0", 1))])),
            Member::stored("archive/data/0", &[0, 0, 128, 63]),
        ],
    );
    for (f, want) in [
        (&text, "starts with text (\"these are my favourite"),
        (&raw, "raw Python pickle"),
        (&zipped, "not a LoRA"),
    ] {
        let err = fails(&gen_args(s(&model), s(&out), &["--lora", s(f)]), &out);
        assert!(
            err.contains(s(f)) && err.contains(want) && !err.contains("header too large"),
            "{err}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Models whose parts do not fit together

#[test]
fn a_tokenizer_larger_than_the_text_encoder_is_named() {
    let d = scratch("hostile-weights", "vocab");
    let model = d.join("model");
    copy_tree(&model_dir("sd1"), &model);
    let te = model.join("text_encoder/model.safetensors");
    let rows = 1000;
    let tmp = d.join("te.safetensors");
    edit_safetensors(&te, &tmp, |m| {
        let key = m
            .keys()
            .find(|k| k.ends_with("token_embedding.weight"))
            .unwrap()
            .clone();
        let t = m[&key].narrow(0, 0, rows).unwrap();
        m.insert(key, t);
    });
    std::fs::rename(&tmp, &te).unwrap();
    let cfg = model.join("text_encoder/config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["vocab_size"] = rows.into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    let out = d.join("out").join("x.png");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let err = fails(&gen_args(s(&model), s(&out), &[]), &out);
    assert!(
        err.contains("tokenizer")
            && err.contains("has 1000 token embeddings")
            && err.contains("49407")
            && !err.contains("index-select"),
        "{err}"
    );
}

#[test]
fn convert_refuses_weights_whose_shapes_do_not_fit_the_model() {
    let d = scratch("hostile-weights", "convert");
    let model = d.join("model");
    copy_tree(&model_dir("sd1"), &model);
    let unet = model.join("unet/diffusion_pytorch_model.safetensors");
    let key = "conv_out.bias";
    let tmp = d.join("unet.safetensors");
    edit_safetensors(&unet, &tmp, |m| {
        let t = Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap();
        m.insert(key.into(), t);
    });
    std::fs::rename(&tmp, &unet).unwrap();
    let out = d.join("out").join("x.safetensors");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let err = fails(
        &[
            "model",
            "convert",
            s(&model),
            "--output",
            s(&out),
            "--to",
            "single-file",
        ],
        &out,
    );
    assert!(
        err.contains(key) && err.contains("[4]") && err.contains("[7]"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------
// The embedded model's cache

#[cfg(feature = "embedded-model")]
#[test]
fn a_damaged_embedded_model_cache_is_written_out_again() {
    let d = scratch("hostile-weights", "embedded");
    let cache = d.join("cache");
    let run = |name: &str| {
        let out = d.join(name);
        ok(&crate::common::sdctl_cached(
            &[
                "generate",
                "--prompt",
                "a red circle",
                "--steps",
                "2",
                "--seed",
                "1",
                "--output",
                s(&out),
            ],
            &cache,
        ));
        std::fs::read(out).unwrap()
    };
    let first = run("a.png");
    let root = std::fs::read_dir(cache.join("embedded"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let unet = root.join("unet/diffusion_pytorch_model.safetensors");
    let good = std::fs::read(&unet).unwrap();
    // same size, different bytes (a flipped bit deep in the weights), then truncated
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 5] ^= 0x40;
    std::fs::write(&unet, &bad).unwrap();
    assert_eq!(run("b.png"), first);
    assert_eq!(std::fs::read(&unet).unwrap(), good);
    std::fs::write(&unet, &good[..100]).unwrap();
    assert_eq!(run("c.png"), first);
    assert_eq!(std::fs::read(&unet).unwrap(), good);
}

/// Finite LoRA values whose products overflow float32 in the patched weights: no weight file
/// holds NaN, so the error names the settings that drove the numbers out of range (the
/// LoRA), and no image is written. (Before the fused attention propagated NaN scores, this
/// gave finite garbage and exit 0.)
#[test]
fn non_finite_latents_from_finite_files_name_the_settings() {
    let d = scratch("hostile-weights", "settings");
    let lora = d.join("huge.safetensors");
    overflowing_lora(&lora);
    let out = d.join("out.png");
    let lora_arg = format!("{}:1", s(&lora));
    let model = model_dir("sd1");
    let err = failed(&sdctl(&gen_args(
        s(&model),
        s(&out),
        &["--lora", &lora_arg],
    )));
    assert!(
        err.contains("NaN or infinity")
            && err.contains("the settings")
            && err.contains("huge.safetensors"),
        "{err}"
    );
    assert!(!out.exists());
}
