//! `.ckpt` / `.pth` / `.pt` files (PyTorch zip archives holding a pickle) read without ever
//! executing code: the pickle is decoded by candle's opcode reader (pure Rust, which builds
//! plain objects and calls nothing), and any class it names outside the allow-list of tensor
//! and container types is refused before a tensor is read, as A1111's safe unpickler does.

use std::collections::HashMap;
use std::io::BufReader;
use std::path::Path;

use candle_core::pickle::{Object, PthTensors, Stack};
use candle_core::Tensor;

use crate::error::{Error, Result};

/// Classes a state-dict pickle may name (A1111 `modules/safe.py` allows the same kinds).
const ALLOWED: &[(&str, &str)] = &[
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch.nn.parameter", "Parameter"),
    ("torch", "Tensor"),
    ("torch", "Size"),
    ("torch", "FloatStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "DoubleStorage"),
    ("torch", "LongStorage"),
    ("torch", "IntStorage"),
    ("torch", "ShortStorage"),
    ("torch", "CharStorage"),
    ("torch", "ByteStorage"),
    ("torch", "BoolStorage"),
    ("torch", "float16"),
    ("torch", "float32"),
    ("torch", "bfloat16"),
    ("builtins", "set"),
    ("__builtin__", "set"),
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy", "dtype"),
    (
        "pytorch_lightning.callbacks.model_checkpoint",
        "ModelCheckpoint",
    ),
];

/// Whether `path` is read as a pickle (by its extension: `.ckpt`, `.pth`, `.pt`, `.bin`).
pub fn is_pickle(path: &Path) -> bool {
    matches!(
        path.extension()
            .and_then(|e| e.to_str())
            .map(str::to_lowercase)
            .as_deref(),
        Some("ckpt" | "pth" | "pt" | "bin")
    )
}

fn check(o: &Object) -> std::result::Result<(), String> {
    match o {
        Object::Class {
            module_name,
            class_name,
        } => {
            if ALLOWED.contains(&(module_name.as_str(), class_name.as_str())) {
                Ok(())
            } else {
                Err(format!(
                    "the pickle refers to `{module_name}.{class_name}`, which is not a tensor or container type: refused (a pickle can run code when Python loads it; sdctl never runs it, and reads only known types)"
                ))
            }
        }
        Object::Tuple(v) | Object::List(v) => v.iter().try_for_each(check),
        Object::Dict(kv) => kv.iter().try_for_each(|(k, v)| {
            check(k)?;
            check(v)
        }),
        Object::Reduce { callable, args } | Object::Build { callable, args } => {
            check(callable)?;
            check(args)
        }
        Object::PersistentLoad(x) => check(x),
        _ => Ok(()),
    }
}

/// Decode every pickle in the archive and check the classes it names; returns whether the
/// top level is a dict with a `state_dict` entry.
fn scan(path: &Path) -> std::result::Result<bool, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| {
        format!("not a PyTorch zip archive ({e}); legacy tar/raw pickles are not read")
    })?;
    let names: Vec<String> = zip
        .file_names()
        .map(|n| n.map(|n| n.into_owned()))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let mut has_state_dict = false;
    let mut found = false;
    for name in names.iter().filter(|n| n.ends_with(".pkl")) {
        found = true;
        let entry = zip.by_name(name).map_err(|e| e.to_string())?;
        let mut reader = BufReader::new(entry);
        let mut stack = Stack::empty();
        stack
            .read_loop(&mut reader)
            .map_err(|e| format!("{name}: unreadable pickle ({e})"))?;
        let obj = stack
            .finalize()
            .map_err(|e| format!("{name}: unreadable pickle ({e})"))?;
        check(&obj)?;
        if let Object::Dict(kv) = &obj {
            has_state_dict |= kv
                .iter()
                .any(|(k, _)| *k == Object::Unicode("state_dict".into()));
        }
    }
    if !found {
        return Err("no pickle (data.pkl) in the archive".into());
    }
    Ok(has_state_dict)
}

/// Names and shapes of the tensors (after the safety scan), sorted by name.
pub fn shapes(path: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    let bad = |m: String| Error::pickle(path, m);
    let key = scan(path).map_err(bad)?.then_some("state_dict");
    let pth = PthTensors::new(path, key).map_err(|e| bad(e.to_string()))?;
    let mut out: Vec<(String, Vec<usize>)> = pth
        .tensor_infos()
        .iter()
        .map(|(k, i)| (k.clone(), i.layout.dims().to_vec()))
        .collect();
    out.sort();
    Ok(out)
}

/// Every tensor of the file (after the safety scan), on the CPU.
pub fn load(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bad = |m: String| Error::pickle(path, m);
    let key = scan(path).map_err(bad)?.then_some("state_dict");
    let pth = PthTensors::new(path, key).map_err(|e| bad(e.to_string()))?;
    let mut out = HashMap::new();
    for name in pth.tensor_infos().keys() {
        if let Some(t) = pth.get(name).map_err(|e| bad(format!("{name}: {e}")))? {
            out.insert(name.clone(), t);
        }
    }
    tracing::debug!(path = %path.display(), tensors = out.len(), "read a pickle");
    Ok(out)
}
