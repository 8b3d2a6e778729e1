//! `.ckpt` / `.pth` / `.pt` files (PyTorch zip archives holding a pickle) read without ever
//! executing code: the pickle is decoded by candle's opcode reader (pure Rust, which builds
//! plain objects and calls nothing), and any class it names outside the allow-list of tensor
//! and container types is refused before a tensor is read, as A1111's safe unpickler does.
//!
//! Everything in such a file is untrusted, so what it can make the reader do is bounded
//! before it is done:
//!
//! - a pickle is read whole (at most [`MAX_PICKLE_BYTES`]) and first walked by a sizing pass
//!   that follows candle's reader opcode by opcode without building anything: objects nested
//!   more than [`MAX_DEPTH`] levels, objects (memo copies included) estimated at more than
//!   [`object_budget`] bytes, or a string running past the end of the pickle are refused
//!   before candle decodes it (so "billion laughs" memo references and opcode floods cost
//!   arithmetic, not memory, and no recursion over the objects can overflow the stack);
//! - a tensor's storage (an archive member) must declare, in the archive's directory, exactly
//!   the bytes its storage record in the pickle declares (elements x dtype size), and the
//!   tensor must fit in it: checked for every tensor when the archive is opened, before
//!   anything is inflated; a deflated member claiming more than deflate can produce from its
//!   compressed size is refused when read, and data is read through `Read::take`, so no
//!   header can make the reader inflate more than the tensor needs;
//! - dictionaries nested in the state dict (Real-ESRGAN's `params_ema`) are read under dotted
//!   names (`params_ema.conv_first.weight`), at most [`MAX_DICT_NESTING`] levels down;
//! - shapes (`tensor_shapes`, `Store::shapes`) come from the pickle alone: no storage is
//!   inflated for them.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Layout, Shape, Tensor};

use crate::error::{Error, Result};

/// Deepest nesting of objects a pickle may build (a state dict needs a handful of levels).
pub const MAX_DEPTH: usize = 1000;

/// Dictionaries inside the state dict whose tensors are read (as `outer.inner.name`); deeper
/// ones are skipped.
pub const MAX_DICT_NESTING: usize = 4;

/// Largest pickle (`data.pkl`, the tensor records, not their data) read.
pub const MAX_PICKLE_BYTES: u64 = 256 << 20;

/// Estimated bytes of one decoded object (candle's `Object` is 56 bytes, plus growth slack).
const OBJECT_BYTES: u64 = 128;

/// The most a deflated member can inflate per compressed byte (deflate's limit is 1032:1).
const MAX_DEFLATE_RATIO: u64 = 1032;

/// The estimated bytes of objects a pickle of `len` bytes may build, memo copies included:
/// 256 MiB, or 64 bytes per byte of pickle for larger ones (a real state dict builds about 30).
pub fn object_budget(len: u64) -> u64 {
    len.saturating_mul(64).max(256 << 20)
}

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
    crate::sniff::is_zip(path)
        || matches!(
            path.extension()
                .and_then(|e| e.to_str())
                .map(str::to_lowercase)
                .as_deref(),
            Some("ckpt" | "pth" | "pt" | "bin")
        )
}

/// Deepest module nesting read from a TorchScript archive (`backbone.stage4.1.blocks.0.conv`).
pub const MAX_MODULE_NESTING: usize = 64;

/// Largest total of TorchScript code (`code/**.py`) read from an archive.
pub const MAX_CODE_BYTES: u64 = 64 << 20;

/// Whether a class is an allowed type; in a TorchScript archive (`torchscript`) the module
/// classes its own code defines (`__torch__.*`) too: they are plain records here.
fn check(o: &Object, torchscript: bool) -> std::result::Result<(), String> {
    let check = |o: &Object| check(o, torchscript);
    match o {
        Object::Class {
            module_name,
            class_name,
        } => {
            if ALLOWED.contains(&(module_name.as_str(), class_name.as_str()))
                || (torchscript
                    && (is_torchscript_class(module_name) || module_name == "torch.jit._pickle"))
            {
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

// ---------------------------------------------------------------------------------------------
// The sizing pass: candle's reader (candle_core::pickle::Stack::read) followed opcode by opcode
// on sizes instead of objects.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Mark,
    List,
    Dict,
    /// `collections.OrderedDict` / `defaultdict`, which candle's REDUCE turns into a dict.
    DictClass,
    Other,
}

/// What an object on the stack or in the memo would be: its kind, estimated bytes (its own
/// and everything inside) and nesting depth (1 for a leaf).
#[derive(Clone, Copy)]
struct Size {
    kind: Kind,
    bytes: u64,
    depth: usize,
}

impl Size {
    fn leaf(kind: Kind, extra: u64) -> Self {
        Size {
            kind,
            bytes: OBJECT_BYTES.saturating_add(extra),
            depth: 1,
        }
    }

    fn holding(items: &[Size]) -> Self {
        Size {
            kind: Kind::Other,
            bytes: items
                .iter()
                .fold(OBJECT_BYTES, |a, s| a.saturating_add(s.bytes)),
            depth: 1 + items.iter().map(|s| s.depth).max().unwrap_or(0),
        }
    }

    fn add(&mut self, items: &[Size]) {
        for s in items {
            self.bytes = self.bytes.saturating_add(s.bytes);
            self.depth = self.depth.max(s.depth + 1);
        }
    }
}

/// How the sizing pass ended.
enum Sizing {
    /// The pickle stops, within the limits, at opcode number `ops` (counting from 1).
    Fits { ops: usize },
    /// Opcode number `op` (from 0) is one candle's reader refuses: it reads the opcodes before
    /// it and reports the error. Where candle's message would print a whole object ("expected
    /// a list, got ..."), `dump` is that object's index in the stack and what was expected.
    Malformed {
        op: usize,
        dump: Option<(usize, &'static str)>,
    },
}

enum Step {
    Next,
    Stop,
    Malformed(Option<(usize, &'static str)>),
}

struct Sizer<'a> {
    data: &'a [u8],
    pos: usize,
    budget: u64,
    spent: u64,
    stack: Vec<Size>,
    memo: HashMap<u32, Size>,
}

type Limit<T> = std::result::Result<T, String>;

impl<'a> Sizer<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.data.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A GLOBAL line, as candle's `read_to_newline` returns it.
    fn line(&mut self) -> &'a [u8] {
        let rest = &self.data[self.pos..];
        let mut s = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => {
                self.pos += i + 1;
                &rest[..i]
            }
            None => {
                self.pos = self.data.len();
                &rest[..rest.len().saturating_sub(1)]
            }
        };
        if s.last() == Some(&b'\r') {
            s = &s[..s.len() - 1];
        }
        s
    }

    /// Count `bytes` of new objects against the budget.
    fn spend(&mut self, bytes: u64) -> Limit<()> {
        self.spent = self.spent.saturating_add(bytes);
        if self.spent > self.budget {
            return Err(format!(
                "the pickle would build more than {} MiB of objects (memo copies included) from {} bytes: refused (a state dict of this size needs far less; this looks like a memory bomb)",
                self.budget >> 20,
                self.data.len()
            ));
        }
        Ok(())
    }

    fn deep(&self, s: &Size) -> Limit<()> {
        if s.depth > MAX_DEPTH {
            return Err(format!(
                "the pickle nests objects more than {MAX_DEPTH} levels deep: refused (a state dict needs a handful)"
            ));
        }
        Ok(())
    }

    /// Push an object of which `new` bytes were just built.
    fn push(&mut self, s: Size, new: u64) -> Limit<()> {
        self.spend(new)?;
        self.deep(&s)?;
        self.stack.push(s);
        Ok(())
    }

    fn leaf(&mut self, kind: Kind, extra: u64) -> Limit<()> {
        let s = Size::leaf(kind, extra);
        self.push(s, s.bytes)
    }

    fn holding(&mut self, items: &[Size]) -> Limit<()> {
        self.push(Size::holding(items), OBJECT_BYTES)
    }

    fn pop(&mut self, n: usize) -> Option<Vec<Size>> {
        if self.stack.len() < n {
            return None;
        }
        Some(self.stack.split_off(self.stack.len() - n))
    }

    fn mark(&self) -> Option<usize> {
        self.stack.iter().rposition(|s| s.kind == Kind::Mark)
    }

    fn memo_get(&mut self, id: u32) -> Limit<Step> {
        let Some(s) = self.memo.get(&id).copied() else {
            return Ok(Step::Malformed(None));
        };
        self.push(s, s.bytes)?;
        Ok(Step::Next)
    }

    fn memo_put(&mut self, id: u32) -> Limit<Step> {
        let Some(s) = self.stack.last().copied() else {
            return Ok(Step::Malformed(None));
        };
        self.spend(s.bytes)?;
        self.memo.insert(id, s);
        Ok(Step::Next)
    }

    /// Add `items` (already counted) to the container at stack index `at`.
    fn extend(&mut self, at: usize, items: &[Size]) -> Limit<()> {
        self.stack[at].add(items);
        let s = self.stack[at];
        self.deep(&s)
    }

    fn step(&mut self) -> Limit<Step> {
        use Step::{Malformed, Next, Stop};
        let Some(op) = self.take(1).map(|b| b[0]) else {
            return Ok(Malformed(None));
        };
        macro_rules! need {
            ($e:expr) => {
                match $e {
                    Some(v) => v,
                    None => return Ok(Malformed(None)),
                }
            };
        }
        match op {
            0x80 => {
                need!(self.take(1));
            }
            b'c' => {
                let module = self.line();
                let class = self.line();
                let kind = if module == b"collections"
                    && (class == b"OrderedDict" || class == b"defaultdict")
                {
                    Kind::DictClass
                } else {
                    Kind::Other
                };
                self.leaf(kind, (module.len() + class.len()) as u64)?;
            }
            b'q' => {
                let id = need!(self.take(1))[0] as u32;
                return self.memo_put(id);
            }
            b'r' => {
                let id = need!(self.u32());
                return self.memo_put(id);
            }
            b'h' => {
                let id = need!(self.take(1))[0] as u32;
                return self.memo_get(id);
            }
            b'j' => {
                let id = need!(self.u32());
                return self.memo_get(id);
            }
            b')' | 0x88 | 0x89 | b'N' => self.leaf(Kind::Other, 0)?,
            b'(' => self.leaf(Kind::Mark, 0)?,
            b']' => self.leaf(Kind::List, 0)?,
            b'}' | b'd' => self.leaf(Kind::Dict, 0)?,
            b'K' | b'M' | b'J' | b'G' => {
                let n = match op {
                    b'K' => 1,
                    b'M' => 2,
                    b'J' => 4,
                    _ => 8,
                };
                need!(self.take(n));
                self.leaf(Kind::Other, 0)?;
            }
            0x8a => {
                let n = need!(self.take(1))[0] as usize;
                if n > 8 {
                    return Err(format!(
                        "a LONG1 integer of {n} bytes (at most 8 are read): refused"
                    ));
                }
                need!(self.take(n));
                self.leaf(Kind::Other, 0)?;
            }
            b'X' => {
                let len = need!(self.u32()) as usize;
                if len > self.data.len() - self.pos {
                    return Err(format!(
                        "a string of {len} bytes runs past the end of the pickle: refused"
                    ));
                }
                need!(self.take(len));
                self.leaf(Kind::Other, len as u64)?;
            }
            b'Q' => {
                let v = need!(self.pop(1));
                self.holding(&v)?;
            }
            b't' => {
                let m = need!(self.mark());
                let items = self.stack.split_off(m + 1);
                self.stack.pop();
                self.holding(&items)?;
            }
            0x85..=0x87 => {
                let v = need!(self.pop((op - 0x84) as usize));
                self.holding(&v)?;
            }
            b'R' => {
                let v = need!(self.pop(2));
                if v[0].kind == Kind::DictClass {
                    self.leaf(Kind::Dict, 0)?;
                } else {
                    self.holding(&v)?;
                }
            }
            0x81 => {
                let v = need!(self.pop(2));
                self.holding(&v)?;
            }
            b'b' => {
                let v = need!(self.pop(2));
                if v[0].kind == Kind::Dict && v[1].kind == Kind::Dict {
                    let mut d = v[0];
                    d.bytes = d.bytes.saturating_add(v[1].bytes);
                    d.depth = v[0].depth.max(v[1].depth);
                    self.deep(&d)?;
                    self.stack.push(d);
                } else {
                    self.holding(&v)?;
                }
            }
            b'a' | b's' => {
                let (n, kind, what) = if op == b'a' {
                    (1, Kind::List, "list")
                } else {
                    (2, Kind::Dict, "dict")
                };
                if self.stack.len() < n + 1 {
                    return Ok(Malformed(None));
                }
                let at = self.stack.len() - n - 1;
                if self.stack[at].kind != kind {
                    return Ok(Malformed(Some((at, what))));
                }
                let v = need!(self.pop(n));
                self.extend(at, &v)?;
            }
            b'e' | b'u' => {
                let (kind, what) = if op == b'e' {
                    (Kind::List, "list")
                } else {
                    (Kind::Dict, "dict")
                };
                let m = need!(self.mark());
                if m == 0 {
                    return Ok(Malformed(None));
                }
                if self.stack[m - 1].kind != kind {
                    return Ok(Malformed(Some((m - 1, what))));
                }
                if kind == Kind::Dict && !(self.stack.len() - m - 1).is_multiple_of(2) {
                    return Ok(Malformed(None));
                }
                let items = self.stack.split_off(m + 1);
                self.stack.pop();
                self.extend(m - 1, &items)?;
            }
            b'.' => return Ok(Stop),
            _ => return Ok(Malformed(None)),
        }
        Ok(Next)
    }
}

/// Walk `data` as candle's reader would, on sizes only; `Err` is a limit the pickle breaks.
fn size_pickle(data: &[u8]) -> Limit<Sizing> {
    let mut s = Sizer {
        data,
        pos: 0,
        budget: object_budget(data.len() as u64),
        spent: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
    };
    let mut op = 0;
    loop {
        match s.step()? {
            Step::Next => op += 1,
            Step::Stop => return Ok(Sizing::Fits { ops: op + 1 }),
            Step::Malformed(dump) => return Ok(Sizing::Malformed { op, dump }),
        }
    }
}

/// At most 200 characters of an object's debug form.
fn short_debug(o: &Object) -> String {
    struct Capped(String);
    impl std::fmt::Write for Capped {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            let room = 200usize.saturating_sub(self.0.len());
            if s.len() <= room {
                self.0.push_str(s);
                return Ok(());
            }
            let mut cut = room;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            self.0.push_str(&s[..cut]);
            Err(std::fmt::Error)
        }
    }
    let mut c = Capped(String::new());
    if std::fmt::write(&mut c, format_args!("{o:?}")).is_err() {
        c.0.push_str("...");
    }
    c.0
}

/// Decode the pickle `data` (archive member `name`) once the sizing pass has bounded it.
fn decode(name: &str, data: &[u8]) -> Limit<Object> {
    let unreadable = |e: candle_core::Error| format!("{name}: unreadable pickle ({e})");
    let (ops, dump) = match size_pickle(data).map_err(|m| format!("{name}: {m}"))? {
        Sizing::Fits { ops } => (ops, None),
        Sizing::Malformed { op, dump: None } => (op + 1, None),
        Sizing::Malformed { op, dump } => (op, dump),
    };
    let mut stack = Stack::empty();
    let mut r: &[u8] = data;
    for _ in 0..ops {
        if stack.read(&mut r).map_err(unreadable)? {
            return stack.finalize().map_err(unreadable);
        }
    }
    match dump {
        Some((at, what)) => Err(format!(
            "{name}: unreadable pickle (expected a {what}, got {})",
            stack.stack().get(at).map(short_debug).unwrap_or_default()
        )),
        None => Err(format!(
            "{name}: unreadable pickle (malformed at opcode {ops})"
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// The archive.

type Zip = zip::ZipArchive<BufReader<File>>;

/// Where a tensor's data is: its dtype and layout (offset in bytes), the archive member
/// holding its storage, and the bytes that storage declares.
struct Record {
    dtype: DType,
    layout: Layout,
    member: String,
    storage_bytes: u64,
}

fn tuple(o: Object, what: &str) -> Limit<Vec<Object>> {
    match o {
        Object::Tuple(v) => Ok(v),
        o => Err(format!("{what}: expected a tuple, got {}", short_debug(&o))),
    }
}

fn int(o: Object, what: &str) -> Limit<u64> {
    match o {
        Object::Int(i) if i >= 0 => Ok(i as u64),
        Object::Long(i) if i >= 0 => Ok(i as u64),
        o => Err(format!(
            "{what}: expected a non-negative integer, got {}",
            short_debug(&o)
        )),
    }
}

fn dims(o: Object, what: &str) -> Limit<Vec<usize>> {
    tuple(o, what)?
        .into_iter()
        .map(|d| match d {
            Object::Int(i) if i >= 0 => Ok(i as usize),
            d => Err(format!(
                "{what}: expected a non-negative integer, got {}",
                short_debug(&d)
            )),
        })
        .collect()
}

fn is_class(o: &Object, module: &str, class: &str) -> bool {
    matches!(o, Object::Class { module_name, class_name } if module_name == module && class_name == class)
}

/// The tensor a state-dict entry rebuilds (as candle's `Object::into_tensor_info`, without
/// its panics on short tuples), or `None` where the entry is not a tensor.
fn record(name: Object, value: Object, dir: &str) -> Limit<Option<(String, Record)>> {
    let Object::Unicode(name) = name else {
        return Ok(None);
    };
    let Object::Reduce { callable, args } = value else {
        return Ok(None);
    };
    let (mut callable, mut args) = (*callable, *args);
    if is_class(&callable, "torch._tensor", "_rebuild_from_type_v2") {
        let mut a = tuple(args, &name)?;
        if a.len() < 3 {
            return Err(format!(
                "{name}: _rebuild_from_type_v2 with {} arguments",
                a.len()
            ));
        }
        callable = a.remove(0);
        args = a.remove(1);
    } else if is_class(&callable, "torch._utils", "_rebuild_parameter") {
        let mut a = tuple(args, &name)?;
        if a.is_empty() {
            return Err(format!("{name}: _rebuild_parameter without arguments"));
        }
        match a.remove(0) {
            Object::Reduce {
                callable: c,
                args: x,
            } => (callable, args) = (*c, *x),
            o => return Err(format!("{name}: _rebuild_parameter of {}", short_debug(&o))),
        }
    }
    if !is_class(&callable, "torch._utils", "_rebuild_tensor_v2") {
        return Ok(None);
    }
    // storage, storage_offset, size, stride, requires_grad, backward_hooks
    let mut a = tuple(args, &name)?;
    if a.len() < 4 {
        return Err(format!(
            "{name}: _rebuild_tensor_v2 with {} arguments",
            a.len()
        ));
    }
    let stride = dims(a.remove(3), &name)?;
    let size = dims(a.remove(2), &name)?;
    let offset = int(a.remove(1), &name)?;
    let storage = match a.remove(0) {
        Object::PersistentLoad(s) => *s,
        o => return Err(format!("{name}: a storage of {}", short_debug(&o))),
    };
    // ("storage", class, key, location, elements)
    let mut s = tuple(storage, &name)?;
    if s.len() < 5 {
        return Err(format!("{name}: a storage record of {} fields", s.len()));
    }
    let elements = int(s.remove(4), &name)?;
    let Object::Unicode(key) = s.remove(2) else {
        return Err(format!("{name}: a storage key that is not a string"));
    };
    let Object::Class { class_name, .. } = s.remove(1) else {
        return Err(format!("{name}: a storage type that is not a class"));
    };
    let dtype = match class_name.as_str() {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "ByteStorage" => DType::U8,
        "LongStorage" => DType::I64,
        other => return Err(format!("{name}: unsupported storage type {other}")),
    };
    let width = dtype.size_in_bytes() as u64;
    let too_big = || format!("{name}: sizes past the address space: refused");
    let start =
        usize::try_from(offset.checked_mul(width).ok_or_else(too_big)?).map_err(|_| too_big())?;
    let storage_bytes = elements.checked_mul(width).ok_or_else(too_big)?;
    size.iter()
        .try_fold(width, |n, &d| n.checked_mul(d as u64))
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(too_big)?;
    let layout = Layout::new(Shape::from(size), stride, start);
    Ok(Some((
        name,
        Record {
            dtype,
            layout,
            member: format!("{dir}/{key}"),
            storage_bytes,
        },
    )))
}

/// A TorchScript module tree: every module's (path, class) into `modules` and every tensor
/// attribute (parameters, buffers) into `records` under its dotted path.
fn read_modules(
    root: Object,
    dir: &str,
    modules: &mut Vec<(String, String)>,
    records: &mut HashMap<String, Record>,
) -> Limit<()> {
    let mut stack = vec![(String::new(), root, 0usize)];
    while let Some((path, obj, depth)) = stack.pop() {
        let (class, attrs) = match torchscript_module(obj) {
            Some(m) => m,
            None if path.is_empty() => {
                return Err("data.pkl does not hold a TorchScript module".into())
            }
            None => continue,
        };
        if depth > MAX_MODULE_NESTING {
            return Err(format!(
                "{path}: modules nested more than {MAX_MODULE_NESTING} deep: refused"
            ));
        }
        modules.push((path.clone(), class));
        let prefix = if path.is_empty() {
            String::new()
        } else {
            format!("{path}.")
        };
        for (k, v) in attrs {
            let Object::Unicode(k) = k else { continue };
            let name = format!("{prefix}{k}");
            match v {
                v @ Object::Build { .. } => stack.push((name, v, depth + 1)),
                v => {
                    if let Some((n, r)) = record(Object::Unicode(name), v, dir)? {
                        records.insert(n, r);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Bytes of tensor data (its elements times their size).
fn data_bytes(r: &Record) -> u64 {
    r.layout.shape().elem_count() as u64 * r.dtype.size_in_bytes() as u64
}

/// A `.ckpt` / `.pth` archive opened for reading: its pickles decoded and checked, its tensor
/// records read, and every record's storage size checked against the archive's directory.
/// Tensor data is read (inflated) only by [`Archive::get`].
pub struct Archive {
    path: PathBuf,
    records: HashMap<String, Record>,
    /// A TorchScript archive's modules: (dotted path, `__torch__.` qualified class), the root
    /// first at path "".
    modules: Vec<(String, String)>,
    /// The zip's member names.
    members: Vec<String>,
    zip: Mutex<Zip>,
}

/// A class of TorchScript's own (`__torch__.yolox.models.yolox YOLOX`).
fn is_torchscript_class(module_name: &str) -> bool {
    module_name == "__torch__" || module_name.starts_with("__torch__.")
}

/// A TorchScript module object (`NEWOBJ` of a `__torch__` class, then `BUILD` with its
/// attributes): its class (`module.Class`) and its attributes; `None` for anything else.
fn torchscript_module(o: Object) -> Option<(String, Vec<(Object, Object)>)> {
    let Object::Build { callable, args } = o else {
        return None;
    };
    let (Object::Reduce { callable: c, .. }, Object::Dict(kv)) = (*callable, *args) else {
        return None;
    };
    match *c {
        Object::Class {
            module_name,
            class_name,
        } if is_torchscript_class(&module_name) => {
            Some((format!("{module_name}.{class_name}"), kv))
        }
        _ => None,
    }
}

impl Archive {
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |m: String| Error::pickle(path, m);
        let file = File::open(path).map_err(|e| bad(e.to_string()))?;
        // torch.save archives start at byte 0: the zip crate's offset detection (the default)
        // misplaces the central directory of some (an archive name of 21 characters)
        let config = zip::read::Config {
            archive_offset: zip::read::ArchiveOffset::Known(0),
        };
        let mut zip = zip::ZipArchive::with_config(config, BufReader::new(file)).map_err(|e| {
            bad(format!(
                "not a PyTorch zip archive ({e}); legacy tar/raw pickles are not read"
            ))
        })?;
        let names: Vec<String> = zip
            .file_names()
            .map(|n| n.map(|n| n.into_owned()))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| bad(e.to_string()))?;
        let mut has_state_dict = false;
        let mut found = false;
        let mut pickles = Vec::new();
        // torch.jit.save: `<dir>/data.pkl` (the module tree), `<dir>/constants.pkl`, `<dir>/code/`
        let torchscript = names.iter().any(|n| n.contains("/code/__torch__/"));
        let mut modules = Vec::new();
        let mut records = HashMap::new();
        for name in names.iter().filter(|n| n.ends_with(".pkl")) {
            found = true;
            // TorchScript keeps its example inputs (`traced_inputs.pkl`) too: not read
            if torchscript && !(name.ends_with("/data.pkl") || name.ends_with("/constants.pkl")) {
                continue;
            }
            let data = read_pickle(&mut zip, name).map_err(bad)?;
            let obj = decode(name, &data).map_err(bad)?;
            drop(data);
            check(&obj, torchscript).map_err(bad)?;
            if torchscript {
                let dir = name.strip_suffix(".pkl").unwrap_or(name);
                if name.ends_with("/data.pkl") {
                    read_modules(obj, dir, &mut modules, &mut records).map_err(bad)?;
                } else if name.ends_with("/constants.pkl") {
                    // a tuple of tensors, `CONSTANTS.c0`, `CONSTANTS.c1`... in the code
                    let Object::Tuple(items) = obj else { continue };
                    for (i, t) in items.into_iter().enumerate() {
                        if let Some((n, r)) =
                            record(Object::Unicode(format!("CONSTANTS.c{i}")), t, dir)
                                .map_err(bad)?
                        {
                            records.insert(n, r);
                        }
                    }
                }
                continue;
            }
            if let Object::Dict(kv) = &obj {
                has_state_dict |= kv
                    .iter()
                    .any(|(k, _)| *k == Object::Unicode("state_dict".into()));
            }
            if name.ends_with("data.pkl") {
                pickles.push((name, obj));
            }
        }
        if !found {
            return Err(bad("no pickle (data.pkl) in the archive".into()));
        }
        let key = has_state_dict.then_some("state_dict");
        for (name, obj) in pickles {
            let dir = name.strip_suffix(".pkl").unwrap_or(name);
            // a TorchScript module: its state is the BUILD's argument
            let obj = match obj {
                Object::Build { callable, args } => match *callable {
                    Object::Reduce { callable: c, .. } if is_class(&c, "__torch__", "Module") => {
                        *args
                    }
                    _ => continue,
                },
                obj => obj,
            };
            let obj = match (key, obj) {
                (Some(key), Object::Dict(kv)) => kv
                    .into_iter()
                    .find(|(k, _)| *k == Object::Unicode(key.to_owned()))
                    .map(|(_, v)| v)
                    .ok_or_else(|| bad(format!("key {key} not found")))?,
                (_, obj) => obj,
            };
            // nested dictionaries of tensors under dotted names: Real-ESRGAN's releases hold
            // `{"params_ema": state_dict, "params": state_dict}`
            let mut dicts = vec![(String::new(), obj, 0)];
            while let Some((prefix, obj, depth)) = dicts.pop() {
                let Object::Dict(kv) = obj else { continue };
                for (k, v) in kv {
                    match (k, v) {
                        (Object::Unicode(k), v @ Object::Dict(_)) if depth < MAX_DICT_NESTING => {
                            dicts.push((format!("{prefix}{k}."), v, depth + 1));
                        }
                        (k, v) => match record(k, v, dir) {
                            Ok(Some((n, r))) => {
                                records.insert(format!("{prefix}{n}"), r);
                            }
                            Ok(None) => {}
                            Err(e) => tracing::warn!(path = %path.display(), "skipping: {e}"),
                        },
                    }
                }
            }
        }
        let mut sorted: Vec<&String> = records.keys().collect();
        sorted.sort();
        for name in sorted {
            check_member(&mut zip, name, &records[name]).map_err(bad)?;
        }
        Ok(Archive {
            path: path.to_path_buf(),
            records,
            modules,
            members: names,
            zip: Mutex::new(zip),
        })
    }

    /// A TorchScript archive's modules, (dotted path, class as its code names it: `__torch__.`
    /// module path and class), the root module first at path ""; empty for a state dict.
    pub fn torchscript_modules(&self) -> &[(String, String)] {
        &self.modules
    }

    /// A TorchScript archive's code: (path inside `code/`, e.g. `__torch__/yolox/models/yolox.py`,
    /// text) for every `.py` member, at most [`MAX_CODE_BYTES`] in all.
    pub fn torchscript_code(&self) -> Limit<Vec<(String, String)>> {
        let mut zip = self.zip.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        let mut left = MAX_CODE_BYTES;
        for name in &self.members {
            let Some(at) = name.find("/code/") else {
                continue;
            };
            if !name.ends_with(".py") {
                continue;
            }
            let f = zip.by_name(name).map_err(|e| format!("{name}: {e}"))?;
            let mut text = String::new();
            f.take(left + 1)
                .read_to_string(&mut text)
                .map_err(|e| format!("{name}: not UTF-8 text ({e})"))?;
            left = left.checked_sub(text.len() as u64).ok_or_else(|| {
                format!(
                    "more than {} MiB of TorchScript code: refused",
                    MAX_CODE_BYTES >> 20
                )
            })?;
            out.push((name[at + "/code/".len()..].to_string(), text));
        }
        Ok(out)
    }

    /// The file read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names and shapes of the tensors, sorted by name.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut out: Vec<(String, Vec<usize>)> = self
            .records
            .iter()
            .map(|(k, r)| (k.clone(), r.layout.dims().to_vec()))
            .collect();
        out.sort();
        out
    }

    pub fn dtypes(&self) -> Vec<(String, DType)> {
        self.records
            .iter()
            .map(|(k, r)| (k.clone(), r.dtype))
            .collect()
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.records.keys()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.records.contains_key(name)
    }

    /// A tensor on the CPU in its stored dtype (`None` if the file has no such tensor); the
    /// error names the tensor (not the file).
    pub fn get(&self, name: &str) -> Limit<Option<Tensor>> {
        let Some(r) = self.records.get(name) else {
            return Ok(None);
        };
        let mut zip = self.zip.lock().unwrap_or_else(|p| p.into_inner());
        read_tensor(&mut zip, name, r).map(Some)
    }
}

/// The bytes of the pickle `name`, at most [`MAX_PICKLE_BYTES`].
fn read_pickle(zip: &mut Zip, name: &str) -> Limit<Vec<u8>> {
    let too_big = |n: u64| {
        format!(
            "{name}: a pickle of {n} bytes, more than the {} MiB this reader accepts: refused",
            MAX_PICKLE_BYTES >> 20
        )
    };
    let entry = zip.by_name(name).map_err(|e| format!("{name}: {e}"))?;
    if entry.size() > MAX_PICKLE_BYTES {
        return Err(too_big(entry.size()));
    }
    let mut data = Vec::with_capacity(entry.size() as usize);
    entry
        .take(MAX_PICKLE_BYTES + 1)
        .read_to_end(&mut data)
        .map_err(|e| format!("{name}: unreadable pickle ({e})"))?;
    if data.len() as u64 > MAX_PICKLE_BYTES {
        return Err(too_big(data.len() as u64));
    }
    Ok(data)
}

/// The storage member of tensor `name` declares the bytes its record declares, and the tensor
/// fits in them (from the archive's directory: nothing is inflated).
fn check_member(zip: &mut Zip, name: &str, r: &Record) -> Limit<()> {
    let f = zip
        .by_name(&r.member)
        .map_err(|e| format!("{name}: its storage {}: {e}", r.member))?;
    if f.size() != r.storage_bytes {
        return Err(format!(
            "{name}: its storage {} holds {} bytes in the archive but the pickle declares {} ({} elements of {:?}): refused before inflating anything",
            r.member,
            f.size(),
            r.storage_bytes,
            r.storage_bytes / r.dtype.size_in_bytes() as u64,
            r.dtype
        ));
    }
    let contiguous = r.layout.is_contiguous() || r.layout.is_fortran_contiguous();
    let need = (r.layout.start_offset() as u64).saturating_add(data_bytes(r));
    if contiguous && need > r.storage_bytes {
        return Err(format!(
            "{name}: shape {:?} from byte {} does not fit in its storage of {} bytes: refused",
            r.layout.dims(),
            r.layout.start_offset(),
            r.storage_bytes
        ));
    }
    Ok(())
}

fn read_tensor(zip: &mut Zip, name: &str, r: &Record) -> Limit<Tensor> {
    let l = &r.layout;
    let fortran = l.is_fortran_contiguous();
    let rank = l.shape().rank();
    if !l.is_contiguous() && !fortran {
        return Err(format!(
            "{name}: cannot retrieve non-contiguous tensors {l:?}"
        ));
    }
    let f = zip.by_name(&r.member).map_err(|e| format!("{name}: {e}"))?;
    if f.size() != r.storage_bytes {
        return Err(format!(
            "{name}: its storage {} changed since the archive was opened",
            r.member
        ));
    }
    if f.compression() != zip::CompressionMethod::Stored
        && f.size() > f.compressed_size().saturating_mul(MAX_DEFLATE_RATIO) + 64
    {
        return Err(format!(
            "{name}: its storage {} claims {} bytes from {} compressed bytes, more than deflate can produce: refused",
            r.member,
            f.size(),
            f.compressed_size()
        ));
    }
    let e = |e: &dyn std::fmt::Display| format!("{name}: {e}");
    let mut reader = f.take(r.storage_bytes);
    let start = l.start_offset() as u64;
    if start > 0 {
        std::io::copy(&mut (&mut reader).take(start), &mut std::io::sink()).map_err(|x| e(&x))?;
    }
    let mut data = Vec::new();
    (&mut reader)
        .take(data_bytes(r))
        .read_to_end(&mut data)
        .map_err(|x| e(&x))?;
    if (data.len() as u64) < data_bytes(r) {
        return Err(format!(
            "{name}: its storage {} ends after {} of the {} bytes the tensor needs",
            r.member,
            data.len(),
            data_bytes(r)
        ));
    }
    let t = Tensor::from_raw_buffer(&data, r.dtype, l.dims(), &Device::Cpu).map_err(|x| e(&x))?;
    if rank > 1 && fortran {
        let reversed: Vec<usize> = l.dims().iter().rev().cloned().collect();
        let t = t.reshape(reversed).map_err(|x| e(&x))?;
        let order: Vec<usize> = (0..rank).rev().collect();
        return t.permute(order).map_err(|x| e(&x));
    }
    Ok(t)
}

/// Names and shapes of the tensors (after the safety scan), sorted by name; no tensor data is
/// read.
pub fn shapes(path: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    Ok(Archive::open(path)?.shapes())
}

/// Every tensor of the file (after the safety scan), on the CPU.
pub fn load(path: &Path) -> Result<HashMap<String, Tensor>> {
    let archive = Archive::open(path)?;
    let mut out = HashMap::new();
    for name in archive.names() {
        if let Some(t) = archive.get(name).map_err(|m| Error::pickle(path, m))? {
            out.insert(name.clone(), t);
        }
    }
    tracing::debug!(path = %path.display(), tensors = out.len(), "read a pickle");
    Ok(out)
}
