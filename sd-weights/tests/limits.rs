//! Hostile pickles and archives (issue 30), made here byte by byte: each is refused with an
//! error naming the file, in well under a second and a few MB of memory, where the reader
//! used to overflow its stack, exhaust memory or inflate storages for shapes.

use std::io::Write;
use std::path::{Path, PathBuf};

use sd_weights::{tensor_shapes, Store};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd-weights-limits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A PyTorch-style archive: `archive/data.pkl` (stored) and the storages (deflated).
fn archive(path: &Path, pkl: &[u8], storages: &[(&str, &[u8])]) {
    use zip::write::SimpleFileOptions;
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let stored = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", stored).unwrap();
    z.write_all(pkl).unwrap();
    let deflated =
        SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for (key, data) in storages {
        z.start_file(format!("archive/data/{key}"), deflated)
            .unwrap();
        z.write_all(data).unwrap();
    }
    z.finish().unwrap();
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

/// The opcodes torch.save writes for a contiguous float32 tensor of `shape` whose storage
/// `key` declares `elements` elements.
fn tensor(key: &str, elements: i32, shape: &[i32]) -> Vec<u8> {
    let mut v = b"ctorch._utils\n_rebuild_tensor_v2\n(".to_vec();
    v.push(b'(');
    v.extend(unicode("storage"));
    v.extend(b"ctorch\nFloatStorage\n");
    v.extend(unicode(key));
    v.extend(unicode("cpu"));
    v.extend(int(elements));
    v.extend(b"tQ");
    v.extend(int(0));
    v.push(b'(');
    for &d in shape {
        v.extend(int(d));
    }
    v.push(b't');
    v.push(b'(');
    let mut stride = 1;
    let mut strides = Vec::new();
    for &d in shape.iter().rev() {
        strides.push(stride);
        stride *= d;
    }
    for s in strides.iter().rev() {
        v.extend(int(*s));
    }
    v.push(b't');
    v.push(0x89);
    v.extend(b"ccollections\nOrderedDict\n)R");
    v.extend(b"tR");
    v
}

fn refused(p: &Path, want: &str) {
    let name = p.file_name().unwrap().to_str().unwrap();
    for e in [
        tensor_shapes(p).unwrap_err().to_string(),
        Store::open(p).err().expect("refused").to_string(),
    ] {
        assert!(e.contains(name) && e.contains(want), "{e}");
    }
}

#[test]
fn a_pickle_nested_100k_levels_deep_is_refused_not_a_stack_overflow() {
    // 100k empty lists, each appended into the one below it: one list nested 100k deep
    let n = 100_000;
    let mut deep = vec![b']'; n];
    deep.extend(vec![b'a'; n - 1]);
    let p = scratch("deep.pth");
    archive(&p, &dict_of(&[("x", deep)]), &[]);
    refused(&p, "more than 1000 levels deep");

    // nesting within the limit is read as before
    let n = 990;
    let mut nested = vec![b']'; n];
    nested.extend(vec![b'a'; n - 1]);
    let p = scratch("nested.pth");
    let pkl = dict_of(&[("meta", nested), ("w", tensor("0", 2, &[2]))]);
    archive(&p, &pkl, &[("0", &[0u8; 8])]);
    assert_eq!(tensor_shapes(&p).unwrap(), vec![("w".to_string(), vec![2])]);
}

#[test]
fn memo_billion_laughs_is_refused_before_it_is_built() {
    // None, then 20 times: a 3-tuple of the previous object fetched twice from the memo and
    // itself: 3^20 objects from about 150 bytes
    let mut v = vec![b'N', b'q', 0];
    for i in 0..20u8 {
        v.extend([b'h', i, b'h', i, 0x87, b'q', i + 1]);
    }
    let p = scratch("laughs.pth");
    let pkl = dict_of(&[("x", v)]);
    assert!(pkl.len() < 200);
    archive(&p, &pkl, &[]);
    refused(&p, "MiB of objects");
}

#[test]
fn a_flood_of_none_copied_through_the_memo_is_refused() {
    // a tuple of 145k NONE opcodes, memoized, then fetched 48k times into nested pairs:
    // 290 KB that would build 7 billion objects
    let mut v = vec![b'('];
    v.extend(vec![b'N'; 145_000]);
    v.extend([b't', b'q', 0]);
    for _ in 0..48_000 {
        v.extend([b'h', 0, 0x86]);
    }
    let p = scratch("flood.pth");
    archive(&p, &dict_of(&[("x", v)]), &[]);
    refused(&p, "MiB of objects");
}

/// Set the uncompressed size the archive declares for member `name` (local header and central
/// directory), leaving its data as it is.
fn declare_size(p: &Path, name: &str, size: u32) {
    let mut b = std::fs::read(p).unwrap();
    let n = name.as_bytes();
    for i in 0..b.len().saturating_sub(46 + n.len()) {
        if b[i..i + 4] == *b"PK\x03\x04" && &b[i + 30..i + 30 + n.len()] == n {
            b[i + 22..i + 26].copy_from_slice(&size.to_le_bytes());
        }
        if b[i..i + 4] == *b"PK\x01\x02" && &b[i + 46..i + 46 + n.len()] == n {
            b[i + 24..i + 28].copy_from_slice(&size.to_le_bytes());
        }
    }
    std::fs::write(p, b).unwrap();
}

#[test]
fn a_storage_larger_than_its_tensor_is_refused_before_inflating() {
    // four floats declared; 1 MiB of zeros in the archive
    let p = scratch("big-storage.pth");
    let zeros = vec![0u8; 1 << 20];
    archive(
        &p,
        &dict_of(&[("w", tensor("0", 4, &[4]))]),
        &[("0", &zeros)],
    );
    refused(
        &p,
        "holds 1048576 bytes in the archive but the pickle declares 16",
    );

    // the right size is read as before
    let p = scratch("right-storage.pth");
    let data: Vec<u8> = [1f32, 2., 3., 4.]
        .iter()
        .flat_map(|f| f.to_le_bytes())
        .collect();
    archive(
        &p,
        &dict_of(&[("w", tensor("0", 4, &[4]))]),
        &[("0", &data)],
    );
    let s = Store::open(&p).unwrap();
    assert_eq!(
        s.get("w").unwrap().to_vec1::<f32>().unwrap(),
        vec![1., 2., 3., 4.]
    );
}

#[test]
fn shapes_never_inflate_storages_and_a_lying_header_is_refused() {
    // a 1 GiB tensor, its storage declared as 1 GiB in the archive, its data 64 KiB of
    // zeros deflated to a few hundred bytes
    let p = scratch("lying.pth");
    let elements = 1 << 28;
    archive(
        &p,
        &dict_of(&[("w", tensor("0", elements, &[elements]))]),
        &[("0", &vec![0u8; 1 << 16])],
    );
    declare_size(&p, "archive/data/0", 1 << 30);
    let want = vec![("w".to_string(), vec![1 << 28])];
    assert_eq!(tensor_shapes(&p).unwrap(), want);
    // Store::open and its shapes read no tensor data (it used to inflate every storage)
    let s = Store::open(&p).unwrap();
    assert_eq!(s.shapes().into_iter().collect::<Vec<_>>(), want);
    // reading it is refused from the sizes alone: deflate cannot make 1 GiB of a few bytes
    let e = s.get("w").unwrap_err().to_string();
    assert!(
        e.contains("lying.pth") && e.contains("more than deflate can produce"),
        "{e}"
    );
}

#[test]
fn nested_state_dicts_are_read_under_dotted_names() {
    // Real-ESRGAN's releases: {"params_ema": {...}, "params": {...}}
    let inner = |entries: &[(&str, Vec<u8>)]| {
        let mut v = vec![b'}'];
        for (k, value) in entries {
            v.extend(unicode(k));
            v.extend(value);
            v.push(b's');
        }
        v
    };
    let p = scratch("nested-dicts.pth");
    let f = |x: &[f32]| x.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
    let (a, b, c) = (f(&[1., 2.]), f(&[3., 4.]), f(&[5.]));
    archive(
        &p,
        &dict_of(&[
            (
                "params_ema",
                inner(&[("conv.weight", tensor("0", 2, &[2]))]),
            ),
            ("params", inner(&[("conv.weight", tensor("1", 2, &[2]))])),
            ("top", tensor("2", 1, &[1])),
        ]),
        &[("0", &a), ("1", &b), ("2", &c)],
    );
    let s = Store::open(&p).unwrap();
    assert_eq!(
        s.names(),
        vec!["params.conv.weight", "params_ema.conv.weight", "top"]
    );
    let get = |n: &str| s.get(n).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(get("params_ema.conv.weight"), vec![1., 2.]);
    assert_eq!(get("params.conv.weight"), vec![3., 4.]);
    assert_eq!(get("top"), vec![5.]);
}

/// A TorchScript-style archive: `m/data.pkl` and one code file, `m/code/__torch__/m.py`.
fn torchscript_archive(path: &Path, pkl: &[u8]) {
    use zip::write::SimpleFileOptions;
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let stored = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("m/data.pkl", stored).unwrap();
    z.write_all(pkl).unwrap();
    z.start_file("m/code/__torch__/m.py", stored).unwrap();
    z.write_all(b"class M(Module):\n  def forward(self: __torch__.m.M,\n    x: Tensor) -> Tensor:\n    return x\n")
        .unwrap();
    z.finish().unwrap();
}

/// `GLOBAL module class`, `EMPTY_TUPLE`, `NEWOBJ`, `EMPTY_DICT`, `BUILD`, `STOP`: an object of
/// that class, as TorchScript writes its modules.
fn object_of(module: &str, class: &str) -> Vec<u8> {
    let mut v = vec![0x80, 2, b'c'];
    v.extend(format!("{module}\n{class}\n").as_bytes());
    v.extend([b')', 0x81, b'}', b'b', b'.']);
    v
}

#[test]
fn a_torchscript_archive_takes_its_own_module_classes_and_nothing_else() {
    use sd_weights::pickle::Archive;
    // TorchScript's own record class: a module tree of one module, its code readable
    let ok = scratch("module.pt");
    torchscript_archive(&ok, &object_of("__torch__.m", "M"));
    let a = Archive::open(&ok).unwrap();
    assert_eq!(
        a.torchscript_modules(),
        [(String::new(), "__torch__.m.M".to_string())]
    );
    let code = a.torchscript_code().unwrap();
    assert_eq!(code.len(), 1);
    assert_eq!(code[0].0, "__torch__/m.py");
    // any other class, in the same place of the same kind of archive, is refused by name
    for (module, class) in [("os", "system"), ("builtins", "eval"), ("torch", "load")] {
        let bad = scratch(&format!("{module}_{class}.pt"));
        torchscript_archive(&bad, &object_of(module, class));
        let e = Archive::open(&bad).err().expect("refused").to_string();
        assert!(
            e.contains(&format!("`{module}.{class}`")) && e.contains("refused"),
            "{e}"
        );
    }
    // the `__torch__` classes are allowed only where the archive has TorchScript code
    let plain = scratch("plain_module.pt");
    archive(&plain, &object_of("__torch__.m", "M"), &[]);
    let e = Archive::open(&plain).err().expect("refused").to_string();
    assert!(
        e.contains("`__torch__.m.M`") && e.contains("refused"),
        "{e}"
    );
}
