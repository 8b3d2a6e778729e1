//! TorchScript files of traced networks (`torch.jit.trace(...).save(...)`, as ComfyUI's
//! `yolox_l.torchscript.pt` and `dw-ll_ucoco_384_bs5.torchscript.pt` are made) turned into an
//! ONNX graph that [`super::Model`] runs: the archive is read as data (its pickle by
//! `sd_weights::pickle`, never executed), its code parsed ([`parse`]) and run symbolically from
//! the root module's `forward`, each `torch.*` operator written as the ONNX nodes PyTorch's
//! exporter writes for it, BatchNorm folded into the convolution before it, shapes inferred
//! from the input's. An operator outside the supported set is refused by name, with the code
//! file and line that calls it.

pub mod parse;

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::{DType, Tensor};

use super::proto::{
    data_type, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeDimension, TensorShapeProto, TypeProto, TypeProtoTensor, ValueInfoProto,
};

/// A float tensor's value info.
fn float_info(name: &str, shape: &[usize]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type: data_type::FLOAT,
                shape: Some(TensorShapeProto {
                    dim: shape
                        .iter()
                        .map(|&d| TensorShapeDimension {
                            dim_value: d as i64,
                        })
                        .collect(),
                }),
            }),
        }),
    }
}
use parse::{Code, Expr, Method, Stmt};

/// The opset the graph is written in (that of the ONNX files DWPose ships).
pub const OPSET: i64 = 11;

/// Deepest chain of method calls followed (a module tree's depth, with margin).
const MAX_CALL_DEPTH: usize = 128;

/// Most statements run in all (YOLOX-L's code runs about 2,000): a file whose methods call
/// each other over and over is refused, not followed.
const MAX_STATEMENTS: usize = 1_000_000;

/// Most bytes of constants the graph may hold (the DWPose files hold 217 and 135 MB).
const MAX_CONSTANT_BYTES: usize = 4 << 30;

/// Most pieces one split may make.
const MAX_SPLIT: usize = 1 << 16;

/// A traced TorchScript archive: its modules, tensors and code.
pub struct Program {
    archive: sd_weights::pickle::Archive,
    /// Module path -> qualified class.
    modules: HashMap<String, String>,
    code: Code,
    root_class: String,
}

impl Program {
    /// Read a TorchScript archive (errors name the file).
    pub fn open(path: &Path) -> Result<Self, String> {
        let at = |e: String| format!("{}: {e}", path.display());
        let archive = sd_weights::pickle::Archive::open(path).map_err(|e| e.to_string())?;
        let list = archive.torchscript_modules();
        let Some((_, root_class)) = list.first().cloned() else {
            return Err(at(
                "not a TorchScript archive (no code/ folder with a module): a state dict cannot be converted".into(),
            ));
        };
        let modules = list.iter().cloned().collect();
        let code = Code::parse(&archive.torchscript_code().map_err(at)?).map_err(at)?;
        let p = Self {
            archive,
            modules,
            code,
            root_class,
        };
        p.method(&p.root_class, "forward").map_err(at)?;
        Ok(p)
    }

    /// How many tensors the root `forward` returns (from its annotation: `Tensor` is one,
    /// `Tuple[Tensor, Tensor]` two).
    pub fn outputs(&self) -> usize {
        let r = self
            .method(&self.root_class, "forward")
            .map(|m| m.returns.clone())
            .unwrap_or_default();
        match r.strip_prefix("Tuple[") {
            Some(inner) => inner.split(',').filter(|s| !s.trim().is_empty()).count(),
            None => 1,
        }
    }

    fn method(&self, class: &str, name: &str) -> Result<&Method, String> {
        let c = self
            .code
            .classes
            .get(class)
            .ok_or_else(|| format!("the code defines no class {class}"))?;
        c.get(name).ok_or_else(|| {
            format!(
                "class {class} ({}) has no method {name}",
                self.code.files.get(class).map_or("?", String::as_str)
            )
        })
    }

    /// The graph of the root module's `forward` on one input of `shape`, named `input`, its
    /// results named `outputs`.
    pub fn to_onnx(
        &self,
        input: &str,
        shape: &[usize],
        outputs: &[&str],
    ) -> Result<ModelProto, String> {
        let mut e = Emit {
            prog: self,
            nodes: Vec::new(),
            inits: Vec::new(),
            consts: HashMap::new(),
            shapes: HashMap::new(),
            conv_of: HashMap::new(),
            fresh: 0,
            depth: 0,
            statements: 0,
            constant_bytes: 0,
            transposed: HashMap::new(),
        };
        e.shapes.insert(input.to_string(), shape.to_vec());
        let root = e.call(
            &V::M(String::new()),
            "forward",
            vec![V::T(input.to_string())],
        )?;
        let results = match root {
            V::L(v) => v,
            v => vec![v],
        };
        if results.len() != outputs.len() {
            return Err(format!(
                "the network gives {} results where {} ({}) are expected",
                results.len(),
                outputs.len(),
                outputs.join(", ")
            ));
        }
        let mut output = Vec::new();
        for (v, name) in results.iter().zip(outputs) {
            let x = e.tensor(v)?;
            output.push(float_info(name, &e.shape(&x)?));
            e.node("Identity", vec![x], &[name], vec![]);
        }
        // drop what no output needs (a convolution whose BatchNorm was folded)
        let mut need: HashSet<String> = outputs.iter().map(|s| s.to_string()).collect();
        let mut keep = vec![false; e.nodes.len()];
        for (i, n) in e.nodes.iter().enumerate().rev() {
            if n.output.iter().any(|o| need.contains(o)) {
                keep[i] = true;
                need.extend(n.input.iter().cloned());
            }
        }
        let nodes: Vec<NodeProto> = e
            .nodes
            .into_iter()
            .zip(keep)
            .filter_map(|(n, k)| k.then_some(n))
            .collect();
        let initializer = e
            .inits
            .into_iter()
            .filter(|t| need.contains(&t.name))
            .collect();
        Ok(ModelProto {
            ir_version: 6,
            producer_name: "sdctl (from TorchScript)".into(),
            graph: Some(GraphProto {
                node: nodes,
                name: "torchscript".into(),
                initializer,
                input: vec![float_info(input, shape)],
                output,
            }),
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: OPSET,
            }],
        })
    }
}

/// A value of the symbolic run.
#[derive(Debug, Clone)]
enum V {
    /// A tensor: the graph value's name.
    T(String),
    /// A module: its path.
    M(String),
    I(i64),
    F(f64),
    B(bool),
    N,
    S(String),
    L(Vec<V>),
}

struct Emit<'a> {
    prog: &'a Program,
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    /// Constant tensors (parameters, folded weights) by value name, as f32.
    consts: HashMap<String, Tensor>,
    shapes: HashMap<String, Vec<usize>>,
    /// Values made by a convolution with constant weights: the node's index.
    conv_of: HashMap<String, usize>,
    fresh: usize,
    depth: usize,
    /// Statements run so far ([`MAX_STATEMENTS`]).
    statements: usize,
    /// Bytes of constants made so far ([`MAX_CONSTANT_BYTES`]).
    constant_bytes: usize,
    /// Transposed linear weights already made, by weight.
    transposed: HashMap<String, String>,
}

fn ai(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        i,
        r#type: 2,
        ..Default::default()
    }
}
fn af(name: &str, f: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        f,
        r#type: 1,
        ..Default::default()
    }
}
fn aints(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        ints: ints.to_vec(),
        r#type: 7,
        ..Default::default()
    }
}
fn astr(name: &str, s: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        s: s.as_bytes().to_vec(),
        r#type: 3,
        ..Default::default()
    }
}

fn err(e: candle_core::Error) -> String {
    e.to_string()
}

/// NumPy broadcasting of two shapes.
fn broadcast(a: &[usize], b: &[usize]) -> Result<Vec<usize>, String> {
    let n = a.len().max(b.len());
    let get = |s: &[usize], i: usize| {
        if i + s.len() >= n {
            s[i + s.len() - n]
        } else {
            1
        }
    };
    (0..n)
        .map(|i| match (get(a, i), get(b, i)) {
            (x, y) if x == y => Ok(x),
            (1, y) => Ok(y),
            (x, 1) => Ok(x),
            (x, y) => Err(format!(
                "shapes {a:?} and {b:?} do not broadcast ({x} against {y})"
            )),
        })
        .collect()
}

/// A 2-D size given once (`[k]`) or per side (`[kh, kw]`).
fn pair(v: Vec<i64>) -> Vec<i64> {
    if v.len() == 1 {
        vec![v[0], v[0]]
    } else {
        v
    }
}

/// A dimension index (negative from the end) for rank `r`.
fn dim(d: i64, r: usize) -> Result<usize, String> {
    let v = if d < 0 { d + r as i64 } else { d };
    if (0..r as i64).contains(&v) {
        Ok(v as usize)
    } else {
        Err(format!("dimension {d} of a rank-{r} tensor"))
    }
}

impl V {
    fn int(&self) -> Result<i64, String> {
        match self {
            V::I(v) => Ok(*v),
            V::B(b) => Ok(*b as i64),
            o => Err(format!("an integer expected, found {o:?}")),
        }
    }
    fn float(&self) -> Result<f64, String> {
        match self {
            V::I(v) => Ok(*v as f64),
            V::F(v) => Ok(*v),
            o => Err(format!("a number expected, found {o:?}")),
        }
    }
    fn ints(&self) -> Result<Vec<i64>, String> {
        match self {
            V::L(v) => v.iter().map(V::int).collect(),
            V::I(v) => Ok(vec![*v]),
            o => Err(format!("a list of integers expected, found {o:?}")),
        }
    }
    /// A list of dimensions (negative from the end) of a rank-`r` tensor.
    fn dims(&self, r: usize) -> Result<Vec<usize>, String> {
        self.ints()?.iter().map(|&d| dim(d, r)).collect()
    }
    fn bool(&self) -> Result<bool, String> {
        match self {
            V::B(b) => Ok(*b),
            V::I(v) => Ok(*v != 0),
            o => Err(format!("a bool expected, found {o:?}")),
        }
    }
    fn is_none(&self) -> bool {
        matches!(self, V::N)
    }
}

impl Emit<'_> {
    fn name(&mut self, hint: &str) -> String {
        self.fresh += 1;
        format!("ts{}_{hint}", self.fresh)
    }

    /// Append a node; its outputs are `outs` (fresh names where a hint ends in `?`).
    fn node(
        &mut self,
        op: &str,
        inputs: Vec<String>,
        outs: &[&str],
        attribute: Vec<AttributeProto>,
    ) -> Vec<String> {
        let output: Vec<String> = outs
            .iter()
            .map(|o| match o.strip_suffix('?') {
                Some(h) => self.name(h),
                None => o.to_string(),
            })
            .collect();
        self.nodes.push(NodeProto {
            input: inputs,
            output: output.clone(),
            name: String::new(),
            op_type: op.into(),
            attribute,
            domain: String::new(),
        });
        output
    }

    /// One node with one output of `shape`: the output's name.
    fn op1_name(
        &mut self,
        op: &str,
        inputs: Vec<String>,
        attrs: Vec<AttributeProto>,
        shape: Vec<usize>,
    ) -> String {
        let hint = format!("{}?", op.to_lowercase());
        let o = self.node(op, inputs, &[&hint], attrs).remove(0);
        self.shapes.insert(o.clone(), shape);
        o
    }

    /// [`Emit::op1_name`] as a value.
    fn op1(
        &mut self,
        op: &str,
        inputs: Vec<String>,
        attrs: Vec<AttributeProto>,
        shape: Vec<usize>,
    ) -> V {
        V::T(self.op1_name(op, inputs, attrs, shape))
    }

    /// `Transpose` of `x` (shape `xs`) by `perm`.
    fn transpose(&mut self, x: String, xs: &[usize], perm: &[usize]) -> V {
        let shape = perm.iter().map(|&p| xs[p]).collect();
        let p: Vec<i64> = perm.iter().map(|&p| p as i64).collect();
        self.op1("Transpose", vec![x], vec![aints("perm", &p)], shape)
    }

    /// A reduction (`ReduceL2`, `ReduceMean`) of `x` (shape `xs`) over `dims`.
    fn reduce(&mut self, op: &str, x: String, xs: &[usize], dims: &[usize], keep: bool) -> V {
        let shape = (0..xs.len())
            .filter_map(|i| match (dims.contains(&i), keep) {
                (false, _) => Some(xs[i]),
                (true, true) => Some(1),
                (true, false) => None,
            })
            .collect();
        let axes: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
        let attrs = vec![aints("axes", &axes), ai("keepdims", keep as i64)];
        self.op1(op, vec![x], attrs, shape)
    }

    /// A shape's elements, refused past the interpreter's bound on any tensor.
    fn check_size(shape: &[usize]) -> Result<(), String> {
        let n = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .filter(|&n| n <= crate::onnx::MAX_ELEMENTS);
        match n {
            Some(_) => Ok(()),
            None => Err(format!(
                "a tensor of shape {shape:?}, more than {} values: refused",
                crate::onnx::MAX_ELEMENTS
            )),
        }
    }

    /// A constant f32 tensor as an initializer.
    fn constant(&mut self, hint: &str, t: Tensor) -> Result<String, String> {
        let name = self.name(hint);
        self.add_init(&name, &t)?;
        Ok(name)
    }

    fn add_init(&mut self, name: &str, t: &Tensor) -> Result<(), String> {
        self.constant_bytes = self.constant_bytes.saturating_add(t.elem_count() * 4);
        if self.constant_bytes > MAX_CONSTANT_BYTES {
            return Err(format!(
                "more than {} MiB of constants: refused",
                MAX_CONSTANT_BYTES >> 20
            ));
        }
        let t = t.to_dtype(DType::F32).map_err(err)?;
        let data: Vec<f32> = t.flatten_all().and_then(|t| t.to_vec1()).map_err(err)?;
        let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.inits.push(TensorProto {
            dims: t.dims().iter().map(|&d| d as i64).collect(),
            data_type: data_type::FLOAT,
            name: name.to_string(),
            raw_data: raw,
            ..Default::default()
        });
        self.shapes.insert(name.to_string(), t.dims().to_vec());
        self.consts.insert(name.to_string(), t);
        Ok(())
    }

    /// An INT64 initializer.
    fn ints_init(&mut self, hint: &str, v: &[i64]) -> String {
        let name = self.name(hint);
        self.inits.push(TensorProto {
            dims: vec![v.len() as i64],
            data_type: data_type::INT64,
            name: name.clone(),
            raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ..Default::default()
        });
        self.shapes.insert(name.clone(), vec![v.len()]);
        name
    }

    /// A module's tensor attribute (`self.weight`), loaded once as an initializer.
    fn param(&mut self, path: &str) -> Result<String, String> {
        if !self.consts.contains_key(path) {
            let t = self
                .prog
                .archive
                .get(path)?
                .ok_or_else(|| format!("the archive has no tensor {path}"))?;
            self.add_init(path, &t)?;
        }
        Ok(path.to_string())
    }

    fn shape(&self, x: &str) -> Result<Vec<usize>, String> {
        self.shapes
            .get(x)
            .cloned()
            .ok_or_else(|| format!("the shape of {x} is not known"))
    }

    /// A value as a graph tensor (numbers become scalar initializers).
    fn tensor(&mut self, v: &V) -> Result<String, String> {
        match v {
            V::T(x) => Ok(x.clone()),
            V::I(_) | V::F(_) => {
                let t = Tensor::new(v.float()? as f32, &candle_core::Device::Cpu).map_err(err)?;
                self.constant("scalar", t)
            }
            o => Err(format!("a tensor expected, found {o:?}")),
        }
    }

    fn call(&mut self, this: &V, method: &str, args: Vec<V>) -> Result<V, String> {
        let V::M(path) = this else {
            return Err(format!(".{method}() called on {this:?}, not a module"));
        };
        let class = self
            .prog
            .modules
            .get(path)
            .ok_or_else(|| format!("no module at `{path}`"))?
            .clone();
        let m = self.prog.method(&class, method)?;
        if m.params.len() != args.len() {
            return Err(format!(
                "{class}.{method} takes {} arguments, called with {}",
                m.params.len(),
                args.len()
            ));
        }
        if self.depth >= MAX_CALL_DEPTH {
            return Err(format!("calls nested more than {MAX_CALL_DEPTH} deep"));
        }
        self.depth += 1;
        let mut env: HashMap<String, V> = m.params.iter().cloned().zip(args).collect();
        env.insert("self".into(), this.clone());
        let file = self
            .prog
            .code
            .files
            .get(&class)
            .cloned()
            .unwrap_or_default();
        let mut out = None;
        for (line, stmt) in &m.body {
            self.statements += 1;
            if self.statements > MAX_STATEMENTS {
                return Err(format!(
                    "more than {MAX_STATEMENTS} statements run: refused (traced networks run a few thousand)"
                ));
            }
            match stmt {
                Stmt::Assign(targets, e) => {
                    let v = self
                        .eval(e, &env)
                        .map_err(|e| format!("{file}, line {line}: {e}"))?;
                    if let [one] = targets.as_slice() {
                        env.insert(one.clone(), v);
                    } else {
                        let V::L(items) = v else {
                            return Err(format!("{file}, line {line}: unpacking {v:?}"));
                        };
                        if items.len() != targets.len() {
                            return Err(format!(
                                "{file}, line {line}: {} values unpacked into {} names",
                                items.len(),
                                targets.len()
                            ));
                        }
                        for (t, v) in targets.iter().zip(items) {
                            env.insert(t.clone(), v);
                        }
                    }
                }
                Stmt::Return(e) => {
                    out = Some(
                        self.eval(e, &env)
                            .map_err(|e| format!("{file}, line {line}: {e}"))?,
                    );
                    break;
                }
            }
        }
        self.depth -= 1;
        Ok(out.unwrap_or(V::N))
    }

    /// `a.b.c` as a dotted name when it is one.
    fn dotted(e: &Expr) -> Option<String> {
        match e {
            Expr::Name(n) => Some(n.clone()),
            Expr::Attr(b, a) => Self::dotted(b).map(|s| format!("{s}.{a}")),
            _ => None,
        }
    }

    fn attr(&mut self, base: V, a: &str) -> Result<V, String> {
        let V::M(path) = base else {
            return Err(format!("attribute {a} of {base:?}"));
        };
        let p = if path.is_empty() {
            a.to_string()
        } else {
            format!("{path}.{a}")
        };
        if self.prog.modules.contains_key(&p) {
            return Ok(V::M(p));
        }
        if self.prog.archive.contains(&p) {
            return Ok(V::T(self.param(&p)?));
        }
        Err(format!(
            "module `{path}` has no tensor or module `{a}` (other attributes are not read)"
        ))
    }

    fn eval(&mut self, e: &Expr, env: &HashMap<String, V>) -> Result<V, String> {
        Ok(match e {
            Expr::Name(n) => env
                .get(n)
                .cloned()
                .ok_or_else(|| format!("`{n}` is not defined"))?,
            Expr::Int(v) => V::I(*v),
            Expr::Float(v) => V::F(*v),
            Expr::Bool(b) => V::B(*b),
            Expr::None => V::N,
            Expr::Str(s) => V::S(s.clone()),
            Expr::List(items) | Expr::Tuple(items) => V::L(
                items
                    .iter()
                    .map(|x| self.eval(x, env))
                    .collect::<Result<_, _>>()?,
            ),
            Expr::Attr(b, a) => {
                if let Expr::Name(n) = &**b {
                    if n == "CONSTANTS" {
                        return self.constant_attr(a);
                    }
                }
                let base = self.eval(b, env)?;
                self.attr(base, a)?
            }
            Expr::Index(b, i) => {
                let (b, i) = (self.eval(b, env)?, self.eval(i, env)?.int()?);
                match b {
                    V::L(v) => {
                        let k = if i < 0 { i + v.len() as i64 } else { i };
                        v.get(k as usize)
                            .cloned()
                            .ok_or_else(|| format!("index {i} of a list of {}", v.len()))?
                    }
                    o => return Err(format!("indexing {o:?}")),
                }
            }
            Expr::Call { func, args, kwargs } => {
                // a method of a module: `(conv).forward(x, )`
                if let Expr::Attr(obj, method) = &**func {
                    // `a.b.c(...)`: a method when `a` is a variable (`self`, a module), a
                    // function (`torch.cat`, `ops.prim.NumToTensor`) when it is not
                    let mut root = &**obj;
                    while let Expr::Attr(inner, _) = root {
                        root = inner;
                    }
                    let root_bound = match root {
                        Expr::Name(n) => env.contains_key(n),
                        _ => true,
                    };
                    if root_bound {
                        let this = self.eval(obj, env)?;
                        let args = args
                            .iter()
                            .map(|x| self.eval(x, env))
                            .collect::<Result<_, _>>()?;
                        return self.call(&this, method, args);
                    }
                }
                let f = Self::dotted(func).ok_or_else(|| format!("a call of {func:?}"))?;
                let mut vals: Vec<V> = args
                    .iter()
                    .map(|x| self.eval(x, env))
                    .collect::<Result<_, _>>()?;
                let mut kw = HashMap::new();
                for (k, x) in kwargs {
                    kw.insert(k.clone(), self.eval(x, env)?);
                }
                match f.as_str() {
                    "getattr" => {
                        let [base, V::S(a)] = <[V; 2]>::try_from(vals)
                            .map_err(|_| "getattr with other than two arguments".to_string())?
                        else {
                            return Err("getattr of a name that is not a string".into());
                        };
                        self.attr(base, &a)?
                    }
                    "int" | "ops.prim.NumToTensor" => V::I(
                        vals.first()
                            .ok_or("int() of nothing")?
                            .float()
                            .map(|v| v as i64)?,
                    ),
                    "float" => V::F(vals.first().ok_or("float() of nothing")?.float()?),
                    _ => {
                        let op = f
                            .strip_prefix("torch.")
                            .or_else(|| f.strip_prefix("ops.aten."))
                            .ok_or_else(|| format!("`{f}` is not a supported function"))?;
                        // keyword arguments in the positions PyTorch's schemas give them
                        if let Some(a) = kw.remove("alpha") {
                            vals.resize(2, V::N);
                            vals.push(a);
                        }
                        if !kw.is_empty() {
                            let mut k: Vec<&String> = kw.keys().collect();
                            k.sort();
                            return Err(format!("torch.{op} with keyword arguments {k:?}"));
                        }
                        let v = self
                            .aten(op, vals)
                            .map_err(|e| format!("torch.{op}: {e}"))?;
                        let made = match &v {
                            V::T(x) => vec![x.clone()],
                            V::L(items) => items
                                .iter()
                                .filter_map(|i| match i {
                                    V::T(x) => Some(x.clone()),
                                    _ => None,
                                })
                                .collect(),
                            _ => Vec::new(),
                        };
                        for x in made {
                            if let Some(sh) = self.shapes.get(&x) {
                                Self::check_size(sh).map_err(|e| format!("torch.{op}: {e}"))?;
                            }
                        }
                        v
                    }
                }
            }
        })
    }

    fn constant_attr(&mut self, c: &str) -> Result<V, String> {
        let name = format!("CONSTANTS.{c}");
        let t = self
            .prog
            .archive
            .get(&name)?
            .ok_or_else(|| format!("the archive has no constant {c}"))?;
        if t.rank() == 0 {
            let v = t
                .to_dtype(DType::F64)
                .and_then(|t| t.to_scalar::<f64>())
                .map_err(err)?;
            return Ok(if t.dtype() == DType::I64 {
                V::I(v as i64)
            } else {
                V::F(v)
            });
        }
        self.add_init(&name, &t)?;
        Ok(V::T(name))
    }

    /// One `torch.<op>` call.
    fn aten(&mut self, op: &str, a: Vec<V>) -> Result<V, String> {
        // in-place arithmetic as the activations: traced code uses the value it returns
        let op = match op {
            "add_" | "sub_" | "mul_" | "div_" => op.trim_end_matches('_'),
            o => o,
        };
        let arg = |i: usize| a.get(i).cloned().unwrap_or(V::N);
        let x_of = |s: &mut Self, i: usize| -> Result<(String, Vec<usize>), String> {
            let x = s.tensor(&arg(i))?;
            let sh = s.shape(&x)?;
            Ok((x, sh))
        };
        Ok(match op {
            "_convolution" | "conv2d" => {
                let (x, xs) = x_of(self, 0)?;
                let w = self.tensor(&arg(1))?;
                let ws = self.shape(&w)?;
                let (stride, pad, dil, groups) = if op == "conv2d" {
                    (
                        arg(3).ints()?,
                        arg(4).ints()?,
                        arg(5).ints()?,
                        arg(6).int()?,
                    )
                } else {
                    if arg(6).bool()? {
                        return Err("transposed convolutions are not supported".into());
                    }
                    (
                        arg(3).ints()?,
                        arg(4).ints()?,
                        arg(5).ints()?,
                        arg(8).int()?,
                    )
                };
                if xs.len() != 4 || ws.len() != 4 {
                    return Err(format!("a 2-D convolution of {xs:?} by {ws:?}"));
                }
                let (stride, pad, dil) = (pair(stride), pair(pad), pair(dil));
                let mut ins = vec![x, w.clone()];
                if !arg(2).is_none() {
                    ins.push(self.tensor(&arg(2))?);
                }
                let out = |i: usize| {
                    let k = dil[i] * (ws[2 + i] as i64 - 1) + 1;
                    ((xs[2 + i] as i64 + 2 * pad[i] - k) / stride[i] + 1).max(0) as usize
                };
                let shape = vec![xs[0], ws[0], out(0), out(1)];
                let attrs = vec![
                    aints("kernel_shape", &[ws[2] as i64, ws[3] as i64]),
                    aints("strides", &stride),
                    aints("pads", &[pad[0], pad[1], pad[0], pad[1]]),
                    aints("dilations", &dil),
                    ai("group", groups),
                ];
                let v = self.op1("Conv", ins, attrs, shape);
                if self.consts.contains_key(&w) {
                    if let V::T(o) = &v {
                        self.conv_of.insert(o.clone(), self.nodes.len() - 1);
                    }
                }
                v
            }
            "batch_norm" => {
                let (x, xs) = x_of(self, 0)?;
                if arg(5).bool()? {
                    return Err("batch norm in training mode".into());
                }
                let eps = arg(7).float()?;
                let mut p = Vec::new();
                for i in 1..5 {
                    let n = self.tensor(&arg(i))?;
                    let t = self
                        .consts
                        .get(&n)
                        .cloned()
                        .ok_or("batch norm with parameters that are not constants")?;
                    p.push(t.to_dtype(DType::F64).map_err(err)?);
                }
                let (w, b, mean, var) = (&p[0], &p[1], &p[2], &p[3]);
                // scale = w / sqrt(var + eps), shift = b - mean * scale
                let scale = var
                    .affine(1.0, eps)
                    .and_then(|v| v.sqrt())
                    .and_then(|s| w.div(&s))
                    .map_err(err)?;
                let shift = mean.mul(&scale).and_then(|m| b.sub(&m)).map_err(err)?;
                let c = scale.dims1().map_err(err)?;
                if let Some(&i) = self.conv_of.get(&x) {
                    // fold into the convolution: W * scale per output channel, (B - mean) * scale + b
                    let conv = self.nodes[i].clone();
                    let w0 = self.consts[&conv.input[1]]
                        .to_dtype(DType::F64)
                        .map_err(err)?;
                    let wf = w0
                        .broadcast_mul(&scale.reshape((c, 1, 1, 1)).map_err(err)?)
                        .map_err(err)?;
                    let b0 = match conv.input.get(2) {
                        Some(n) => self.consts[n].to_dtype(DType::F64).map_err(err)?,
                        None => {
                            Tensor::zeros(c, DType::F64, &candle_core::Device::Cpu).map_err(err)?
                        }
                    };
                    let bf = b0.mul(&scale).and_then(|t| t.add(&shift)).map_err(err)?;
                    let wn = self.constant("conv_w", wf)?;
                    let bn = self.constant("conv_b", bf)?;
                    return Ok(self.op1(
                        "Conv",
                        vec![conv.input[0].clone(), wn, bn],
                        conv.attribute,
                        xs,
                    ));
                }
                let r = xs.len();
                let per = |t: Tensor| t.reshape([vec![c], vec![1; r.saturating_sub(2)]].concat());
                let s = self.constant("bn_scale", per(scale).map_err(err)?)?;
                let h = self.constant("bn_shift", per(shift).map_err(err)?)?;
                let m = self.op1_name("Mul", vec![x, s], vec![], xs.clone());
                self.op1("Add", vec![m, h], vec![], xs)
            }
            "add" | "sub" | "mul" | "div" | "pow" | "maximum" | "minimum" => {
                if matches!(op, "add" | "sub") && !arg(2).is_none() && arg(2).float()? != 1.0 {
                    return Err("alpha other than 1".into());
                }
                if !matches!(arg(0), V::T(_)) && !matches!(arg(1), V::T(_)) {
                    // numbers: shape arithmetic
                    let (p, q) = (arg(0).float()?, arg(1).float()?);
                    let r = match op {
                        "add" => p + q,
                        "sub" => p - q,
                        "mul" => p * q,
                        "div" => p / q,
                        "pow" => p.powf(q),
                        "maximum" => p.max(q),
                        _ => p.min(q),
                    };
                    return Ok(match (arg(0), arg(1), op) {
                        (V::I(_), V::I(_), o) if o != "div" && o != "pow" => V::I(r as i64),
                        _ => V::F(r),
                    });
                }
                let (x, xs) = x_of(self, 0)?;
                let (y, ys) = x_of(self, 1)?;
                let shape = broadcast(&xs, &ys)?;
                let onnx = match op {
                    "add" => "Add",
                    "sub" => "Sub",
                    "mul" => "Mul",
                    "div" => "Div",
                    "pow" => "Pow",
                    "maximum" => "Max",
                    _ => "Min",
                };
                self.op1(onnx, vec![x, y], vec![], shape)
            }
            "rsub" => {
                // other - x
                let (x, xs) = x_of(self, 0)?;
                let (y, ys) = x_of(self, 1)?;
                let shape = broadcast(&xs, &ys)?;
                self.op1("Sub", vec![y, x], vec![], shape)
            }
            "sigmoid" | "sigmoid_" | "relu" | "relu_" | "tanh" | "tanh_" | "exp" | "sqrt"
            | "neg" | "abs" | "erf" | "hardswish" | "hardswish_" => {
                let (x, xs) = x_of(self, 0)?;
                let onnx = match op.trim_end_matches('_') {
                    "sigmoid" => "Sigmoid",
                    "relu" => "Relu",
                    "tanh" => "Tanh",
                    "exp" => "Exp",
                    "sqrt" => "Sqrt",
                    "neg" => "Neg",
                    "abs" => "Abs",
                    "erf" => "Erf",
                    _ => "HardSwish",
                };
                self.op1(onnx, vec![x], vec![], xs)
            }
            "silu" | "silu_" => {
                let (x, xs) = x_of(self, 0)?;
                let s = self.op1_name("Sigmoid", vec![x.clone()], vec![], xs.clone());
                self.op1("Mul", vec![x, s], vec![], xs)
            }
            "hardsigmoid" | "hardsigmoid_" => {
                let (x, xs) = x_of(self, 0)?;
                let attrs = vec![af("alpha", 1.0 / 6.0), af("beta", 0.5)];
                self.op1("HardSigmoid", vec![x], attrs, xs)
            }
            "leaky_relu" | "leaky_relu_" => {
                let (x, xs) = x_of(self, 0)?;
                let slope = if arg(1).is_none() {
                    0.01
                } else {
                    arg(1).float()?
                };
                self.op1("LeakyRelu", vec![x], vec![af("alpha", slope as f32)], xs)
            }
            "square" => {
                let (x, xs) = x_of(self, 0)?;
                self.op1("Mul", vec![x.clone(), x], vec![], xs)
            }
            "softmax" => {
                let (x, xs) = x_of(self, 0)?;
                let d = dim(arg(1).int()?, xs.len())?;
                if d + 1 != xs.len() {
                    return Err("softmax over other than the last dimension".into());
                }
                self.op1("Softmax", vec![x], vec![ai("axis", d as i64)], xs)
            }
            "clamp" | "clamp_" | "clamp_min" | "clamp_max" => {
                let (x, xs) = x_of(self, 0)?;
                let (lo, hi) = match op {
                    "clamp_min" => (arg(1), V::N),
                    "clamp_max" => (V::N, arg(1)),
                    _ => (arg(1), arg(2)),
                };
                let bound = |s: &mut Self, v: &V| -> Result<String, String> {
                    if v.is_none() {
                        Ok(String::new())
                    } else {
                        let t = Tensor::new(v.float()? as f32, &candle_core::Device::Cpu)
                            .map_err(err)?;
                        s.constant("clip", t)
                    }
                };
                let (l, h) = (bound(self, &lo)?, bound(self, &hi)?);
                let mut ins = vec![x, l, h];
                while ins.last().is_some_and(String::is_empty) {
                    ins.pop();
                }
                self.op1("Clip", ins, vec![], xs)
            }
            "cat" | "concat" => {
                let V::L(items) = arg(0) else {
                    return Err("cat of something that is not a list".into());
                };
                let mut ins = Vec::new();
                let mut shapes = Vec::new();
                for v in &items {
                    let x = self.tensor(v)?;
                    shapes.push(self.shape(&x)?);
                    ins.push(x);
                }
                let first = shapes.first().ok_or("cat of no tensors")?.clone();
                let d = dim(arg(1).int()?, first.len())?;
                let mut shape = first;
                shape[d] = shapes.iter().map(|s| s[d]).sum();
                self.op1("Concat", ins, vec![ai("axis", d as i64)], shape)
            }
            "flatten" => {
                let (x, xs) = x_of(self, 0)?;
                let r = xs.len();
                let s = dim(arg(1).int()?, r.max(1))?;
                let e = if arg(2).is_none() {
                    r - 1
                } else {
                    dim(arg(2).int()?, r)?
                };
                let mut shape = xs[..s].to_vec();
                shape.push(xs[s..=e].iter().product());
                shape.extend_from_slice(&xs[e + 1..]);
                self.reshape(x, shape)
            }
            "view" | "reshape" => {
                let (x, xs) = x_of(self, 0)?;
                let want = arg(1).ints()?;
                let total: usize = xs.iter().product();
                let known: i64 = want.iter().filter(|&&d| d >= 0).product();
                let shape: Vec<usize> = want
                    .iter()
                    .map(|&d| {
                        if d < 0 {
                            total / known.max(1) as usize
                        } else {
                            d as usize
                        }
                    })
                    .collect();
                if shape.iter().product::<usize>() != total {
                    return Err(format!("reshape of {xs:?} to {want:?}"));
                }
                self.reshape(x, shape)
            }
            "permute" => {
                let (x, xs) = x_of(self, 0)?;
                let perm = arg(1).dims(xs.len())?;
                self.transpose(x, &xs, &perm)
            }
            "transpose" => {
                let (x, xs) = x_of(self, 0)?;
                let (d0, d1) = (dim(arg(1).int()?, xs.len())?, dim(arg(2).int()?, xs.len())?);
                let mut perm: Vec<usize> = (0..xs.len()).collect();
                perm.swap(d0, d1);
                self.transpose(x, &xs, &perm)
            }
            "slice" => {
                let (x, xs) = x_of(self, 0)?;
                let d = dim(arg(1).int()?, xs.len())?;
                let n = xs[d] as i64;
                let clampi = |v: i64| if v < 0 { (v + n).max(0) } else { v.min(n) };
                let st = if arg(2).is_none() {
                    0
                } else {
                    clampi(arg(2).int()?)
                };
                let en = if arg(3).is_none() {
                    n
                } else {
                    clampi(arg(3).int()?)
                };
                let step = if arg(4).is_none() { 1 } else { arg(4).int()? };
                if step < 1 {
                    return Err(format!("a slice step of {step}"));
                }
                let mut shape = xs.clone();
                shape[d] = ((en - st).max(0) as usize).div_ceil(step as usize);
                let ins = vec![
                    x,
                    self.ints_init("starts", &[st]),
                    self.ints_init("ends", &[en]),
                    self.ints_init("axes", &[d as i64]),
                    self.ints_init("steps", &[step]),
                ];
                self.op1("Slice", ins, vec![], shape)
            }
            "unsqueeze" => {
                let (x, xs) = x_of(self, 0)?;
                let d = dim(arg(1).int()?, xs.len() + 1)?;
                let mut shape = xs;
                shape.insert(d, 1);
                self.op1(
                    "Unsqueeze",
                    vec![x],
                    vec![aints("axes", &[d as i64])],
                    shape,
                )
            }
            "squeeze" => {
                let (x, xs) = x_of(self, 0)?;
                let dims: Vec<usize> = if arg(1).is_none() {
                    (0..xs.len()).filter(|&i| xs[i] == 1).collect()
                } else {
                    let d = arg(1).dims(xs.len())?;
                    d.into_iter().filter(|&i| xs[i] == 1).collect()
                };
                let shape = (0..xs.len())
                    .filter(|i| !dims.contains(i))
                    .map(|i| xs[i])
                    .collect();
                let axes: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
                self.op1("Squeeze", vec![x], vec![aints("axes", &axes)], shape)
            }
            "split_with_sizes" | "split" | "unbind" | "chunk" => {
                let (x, xs) = x_of(self, 0)?;
                let d = dim(
                    if op == "unbind" {
                        arg(1).int()?
                    } else {
                        arg(2).int()?
                    },
                    xs.len(),
                )?;
                let n = xs[d];
                let sizes: Vec<usize> = match (op, arg(1)) {
                    ("unbind", _) => vec![1; n],
                    ("chunk", c) => {
                        let each = n.div_ceil(c.int()?.max(1) as usize);
                        (0..n.div_ceil(each))
                            .map(|i| each.min(n - i * each))
                            .collect()
                    }
                    ("split", V::I(each)) => {
                        let each = each.max(1) as usize;
                        (0..n.div_ceil(each))
                            .map(|i| each.min(n - i * each))
                            .collect()
                    }
                    (_, l) => l.ints()?.iter().map(|&v| v.max(0) as usize).collect(),
                };
                if sizes.len() > MAX_SPLIT {
                    return Err(format!("a split into {} pieces: refused", sizes.len()));
                }
                if sizes.iter().sum::<usize>() != n {
                    return Err(format!("split of {n} into {sizes:?}"));
                }
                let outs: Vec<String> = (0..sizes.len()).map(|_| "split?".to_string()).collect();
                let outs: Vec<&str> = outs.iter().map(String::as_str).collect();
                let sz: Vec<i64> = sizes.iter().map(|&s| s as i64).collect();
                let names = self.node(
                    "Split",
                    vec![x],
                    &outs,
                    vec![ai("axis", d as i64), aints("split", &sz)],
                );
                let mut vals = Vec::new();
                for (o, s) in names.into_iter().zip(sizes) {
                    let mut shape = xs.clone();
                    shape[d] = s;
                    self.shapes.insert(o.clone(), shape.clone());
                    if op == "unbind" {
                        shape.remove(d);
                        vals.push(self.op1(
                            "Squeeze",
                            vec![o],
                            vec![aints("axes", &[d as i64])],
                            shape,
                        ));
                    } else {
                        vals.push(V::T(o));
                    }
                }
                V::L(vals)
            }
            "linear" => {
                let (x, xs) = x_of(self, 0)?;
                let w = self.tensor(&arg(1))?;
                let wt = match self.transposed.get(&w) {
                    Some(t) => t.clone(),
                    None => {
                        let t = self
                            .consts
                            .get(&w)
                            .ok_or("linear with weights that are not constants")?
                            .t()
                            .and_then(|t| t.contiguous())
                            .map_err(err)?;
                        let name = self.constant("linear_wt", t)?;
                        self.transposed.insert(w, name.clone());
                        name
                    }
                };
                let (k, n) = <[usize; 2]>::try_from(self.shape(&wt)?)
                    .map(|[k, n]| (k, n))
                    .map_err(|_| "linear weights that are not a matrix".to_string())?;
                if xs.last() != Some(&k) {
                    return Err(format!("linear of {xs:?} by [{n}, {k}]"));
                }
                let mut shape = xs;
                *shape.last_mut().expect("checked") = n;
                let m = self.op1_name("MatMul", vec![x, wt], vec![], shape.clone());
                if arg(2).is_none() {
                    V::T(m)
                } else {
                    let b = self.tensor(&arg(2))?;
                    self.op1("Add", vec![m, b], vec![], shape)
                }
            }
            "bmm" | "matmul" => {
                let (x, xs) = x_of(self, 0)?;
                let (y, ys) = x_of(self, 1)?;
                if xs.len() < 2 || ys.len() < 2 || xs[xs.len() - 1] != ys[ys.len() - 2] {
                    return Err(format!("a product of {xs:?} by {ys:?}"));
                }
                let mut shape = broadcast(&xs[..xs.len() - 2], &ys[..ys.len() - 2])?;
                shape.extend([xs[xs.len() - 2], ys[ys.len() - 1]]);
                self.op1("MatMul", vec![x, y], vec![], shape)
            }
            "linalg_vector_norm" | "norm" | "frobenius_norm" => {
                let (x, xs) = x_of(self, 0)?;
                // (x, ord, dims, keepdim); frobenius_norm is (x, dims, keepdim), ord 2
                let (ord, at) = match op {
                    "frobenius_norm" => (2.0, 1),
                    _ => (arg(1).float()?, 2),
                };
                if ord != 2.0 {
                    return Err("a norm other than 2".into());
                }
                let dims = arg(at).dims(xs.len())?;
                let keep = arg(at + 1).bool()?;
                self.reduce("ReduceL2", x, &xs, &dims, keep)
            }
            "mean" => {
                let (x, xs) = x_of(self, 0)?;
                let dims = arg(1).dims(xs.len())?;
                let keep = !arg(2).is_none() && arg(2).bool()?;
                self.reduce("ReduceMean", x, &xs, &dims, keep)
            }
            "max_pool2d" => {
                let (x, xs) = x_of(self, 0)?;
                let k = pair(arg(1).ints()?);
                let s = match arg(2).ints() {
                    Ok(v) if !v.is_empty() => pair(v),
                    _ => k.clone(),
                };
                let p = pair(arg(3).ints()?);
                if !arg(4).is_none() && pair(arg(4).ints()?) != [1, 1] {
                    return Err("dilated max pooling".into());
                }
                let ceil = !arg(5).is_none() && arg(5).bool()?;
                let out = |i: usize| {
                    let num = xs[2 + i] as i64 + 2 * p[i] - k[i];
                    let o = if ceil {
                        (num + s[i] - 1) / s[i] + 1
                    } else {
                        num / s[i] + 1
                    };
                    o.max(0) as usize
                };
                let shape = vec![xs[0], xs[1], out(0), out(1)];
                let attrs = vec![
                    aints("kernel_shape", &k),
                    aints("strides", &s),
                    aints("pads", &[p[0], p[1], p[0], p[1]]),
                    ai("ceil_mode", ceil as i64),
                ];
                self.op1("MaxPool", vec![x], attrs, shape)
            }
            "adaptive_avg_pool2d" => {
                let (x, xs) = x_of(self, 0)?;
                if arg(1).ints()?.iter().any(|&v| v != 1) {
                    return Err("adaptive average pooling to other than 1x1".into());
                }
                self.op1(
                    "GlobalAveragePool",
                    vec![x],
                    vec![],
                    vec![xs[0], xs[1], 1, 1],
                )
            }
            "upsample_nearest2d" => {
                let (x, xs) = x_of(self, 0)?;
                // (input, output_size, scale_factors) or (input, output_size, scales_h, scales_w)
                let (oh, ow) = if !arg(1).is_none() {
                    let s = arg(1).ints()?;
                    (s[0] as usize, s[1] as usize)
                } else if let V::L(f) = arg(2) {
                    let f: Vec<f64> = f.iter().map(V::float).collect::<Result<_, _>>()?;
                    (
                        (xs[2] as f64 * f[0]).floor() as usize,
                        (xs[3] as f64 * f[1]).floor() as usize,
                    )
                } else {
                    return Err("nearest upsampling without a size or scales".into());
                };
                if oh == 0 || ow == 0 {
                    return Err(format!("nearest upsampling of {xs:?} to {oh}x{ow}"));
                }
                let cpu = &candle_core::Device::Cpu;
                let roi = Tensor::zeros(0, DType::F32, cpu).map_err(err)?;
                let roi = self.constant("roi", roi)?;
                // PyTorch's nearest: source floor(o * in / out), ONNX's asymmetric + floor
                let ins = if oh % xs[2] == 0 && ow % xs[3] == 0 {
                    // whole factors as scales, as the exporter writes them
                    let f = [1f32, 1.0, (oh / xs[2]) as f32, (ow / xs[3]) as f32];
                    let scales = Tensor::new(&f, cpu).map_err(err)?;
                    vec![x, roi, self.constant("scales", scales)?]
                } else {
                    let none = Tensor::zeros(0, DType::F32, cpu).map_err(err)?;
                    let sizes = [xs[0] as i64, xs[1] as i64, oh as i64, ow as i64];
                    vec![
                        x,
                        roi,
                        self.constant("scales", none)?,
                        self.ints_init("sizes", &sizes),
                    ]
                };
                let attrs = vec![
                    astr("mode", "nearest"),
                    astr("coordinate_transformation_mode", "asymmetric"),
                    astr("nearest_mode", "floor"),
                ];
                self.op1("Resize", ins, attrs, vec![xs[0], xs[1], oh, ow])
            }
            "floor" | "ceil" | "round" if !matches!(arg(0), V::T(_)) => {
                let v = arg(0).float()?;
                V::I(match op {
                    "floor" => v.floor(),
                    "ceil" => v.ceil(),
                    _ => v.round_ties_even(),
                } as i64)
            }
            "to" | "type_as" => {
                // `to(x, dtype, ...)`: floating types (half 5, float 6, double 7, bfloat16 15)
                // are all float32 here; a device or a tensor argument changes nothing either
                match arg(1) {
                    V::I(5 | 6 | 7 | 15) | V::N | V::T(_) | V::S(_) => arg(0),
                    other => return Err(format!("a conversion to {other:?}")),
                }
            }
            "contiguous" | "detach" | "clone" | "dropout" | "dropout_" | "feature_dropout" => {
                if (op.starts_with("dropout") || op == "feature_dropout") && arg(2).bool()? {
                    return Err("dropout in training mode".into());
                }
                arg(0)
            }
            "size" => {
                let (_, xs) = x_of(self, 0)?;
                if arg(1).is_none() {
                    V::L(xs.iter().map(|&d| V::I(d as i64)).collect())
                } else {
                    V::I(xs[dim(arg(1).int()?, xs.len())?] as i64)
                }
            }
            other => {
                return Err(format!(
                    "the operator `{other}` is not supported by the converter"
                ))
            }
        })
    }

    fn reshape(&mut self, x: String, shape: Vec<usize>) -> V {
        let s: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let si = self.ints_init("shape", &s);
        self.op1("Reshape", vec![x, si], vec![], shape)
    }
}

/// Convert a TorchScript file to an ONNX model (input named `input` of `shape`, outputs
/// `outputs`), errors naming the file.
pub fn convert(
    path: &Path,
    input: &str,
    shape: &[usize],
    outputs: &[&str],
) -> Result<ModelProto, String> {
    Program::open(path)?
        .to_onnx(input, shape, outputs)
        .map_err(|e| format!("{}: {e}", path.display()))
}
