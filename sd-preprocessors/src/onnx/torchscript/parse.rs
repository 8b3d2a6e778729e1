//! The code of a traced TorchScript archive (`code/__torch__/**.py`), parsed: per class its
//! methods, each a list of assignments ending in a `return`. Traced code is straight-line
//! (`torch.jit.trace` records no control flow), so that is the whole grammar: calls,
//! attributes, `getattr`, literals, lists and tuples, and tuple unpacking.

use std::collections::HashMap;

/// An expression of traced code.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Name(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    None,
    Str(String),
    List(Vec<Expr>),
    Tuple(Vec<Expr>),
    Attr(Box<Expr>, String),
    Index(Box<Expr>, Box<Expr>),
    Call {
        func: Box<Expr>,
        args: Vec<Expr>,
        kwargs: Vec<(String, Expr)>,
    },
}

/// A statement: `a = e`, `a, b, = e` or `return e`.
#[derive(Debug, Clone, PartialEq)]
pub enum Stmt {
    Assign(Vec<String>, Expr),
    Return(Expr),
}

/// A method: its parameters after `self`, and its body.
#[derive(Debug, Clone)]
pub struct Method {
    pub params: Vec<String>,
    pub body: Vec<(usize, Stmt)>,
    /// The return annotation as written (`Tensor`, `Tuple[Tensor, Tensor]`).
    pub returns: String,
}

/// The classes of an archive's code by qualified name (`__torch__.torch.nn.modules.conv.Conv2d`),
/// each with its methods by name.
#[derive(Debug, Default)]
pub struct Code {
    pub classes: HashMap<String, HashMap<String, Method>>,
    /// Where each class is defined (code file), for error messages.
    pub files: HashMap<String, String>,
}

impl Code {
    /// Parse every code file; `files` are (path inside `code/`, text).
    pub fn parse(files: &[(String, String)]) -> Result<Self, String> {
        let mut code = Code::default();
        for (path, text) in files {
            let module = path.strip_suffix(".py").unwrap_or(path).replace('/', ".");
            parse_file(&module, &format!("code/{path}"), text, &mut code)
                .map_err(|e| format!("code/{path}: {e}"))?;
        }
        Ok(code)
    }
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

/// The classes of one code file (`file`, for error messages) of module `module`.
fn parse_file(module: &str, file: &str, text: &str, code: &mut Code) -> Result<(), String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    let mut class: Option<String> = None;
    while i < lines.len() {
        let line = lines[i];
        let ind = indent(line);
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            i += 1;
            continue;
        }
        if ind == 0 {
            class = t
                .strip_prefix("class ")
                .and_then(|r| r.split(['(', ':']).next())
                .map(|name| format!("{module}.{}", name.trim()));
            if let Some(c) = &class {
                code.classes.entry(c.clone()).or_default();
                code.files
                    .entry(c.clone())
                    .or_insert_with(|| file.to_string());
            }
            i += 1;
            continue;
        }
        let (Some(c), true) = (&class, ind == 2 && t.starts_with("def ")) else {
            i += 1;
            continue;
        };
        // the signature runs to the line ending in `:`
        let mut sig = t.to_string();
        let first = i + 1;
        while !sig.ends_with(':') {
            i += 1;
            let more = lines
                .get(i)
                .ok_or_else(|| format!("line {first}: a signature without an end"))?;
            sig.push(' ');
            sig.push_str(more.trim());
        }
        i += 1;
        let (name, method) = signature(&sig).map_err(|e| format!("line {first}: {e}"))?;
        let mut body = Vec::new();
        while i < lines.len() && (lines[i].trim().is_empty() || indent(lines[i]) > 2) {
            let s = lines[i].trim();
            if !s.is_empty() {
                let stmt = statement(s).map_err(|e| format!("line {}: {e}: `{s}`", i + 1))?;
                body.push((i + 1, stmt));
            }
            i += 1;
        }
        code.classes
            .get_mut(c)
            .expect("entered above")
            .insert(name, Method { body, ..method });
    }
    Ok(())
}

/// `def forward(self: T, x: Tensor, y: Tensor) -> R:` -> name, parameters, return type.
fn signature(sig: &str) -> Result<(String, Method), String> {
    let rest = sig.strip_prefix("def ").ok_or("not a def")?;
    let open = rest.find('(').ok_or("a def without parameters")?;
    let name = rest[..open].trim().to_string();
    let close = rest
        .rfind(')')
        .filter(|&c| c > open)
        .ok_or("a def without `)` after its `(`")?;
    let returns = rest[close + 1..]
        .trim()
        .trim_end_matches(':')
        .trim()
        .trim_start_matches("->")
        .trim()
        .to_string();
    // parameters: split on commas outside brackets
    let mut params = Vec::new();
    let mut depth = 0i32;
    let mut cur = String::new();
    for ch in rest[open + 1..close].chars() {
        match ch {
            '[' | '(' => depth += 1,
            ']' | ')' => depth -= 1,
            ',' if depth == 0 => {
                params.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(ch);
    }
    params.push(cur);
    let params: Vec<String> = params
        .iter()
        .map(|p| {
            p.split(':')
                .next()
                .unwrap_or("")
                .split('=')
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .filter(|p| !p.is_empty())
        .collect();
    if params.first().map(String::as_str) != Some("self") {
        return Err(format!("method {name} without `self`"));
    }
    Ok((
        name,
        Method {
            params: params[1..].to_vec(),
            body: Vec::new(),
            returns,
        },
    ))
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Int(i64),
    Float(f64),
    Str(String),
    P(char),
}

fn tokens(s: &str) -> Result<Vec<Tok>, String> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i] as char;
        if c == ' ' {
            i += 1;
        } else if c.is_ascii_alphabetic() || c == '_' {
            let st = i;
            while i < b.len() && ((b[i] as char).is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push(Tok::Ident(s[st..i].to_string()));
        } else if c.is_ascii_digit() {
            let st = i;
            let mut float = false;
            while i < b.len() {
                let d = b[i] as char;
                if d.is_ascii_digit() {
                    i += 1;
                } else if d == '.' || d == 'e' || d == 'E' {
                    float = true;
                    i += 1;
                    if (d == 'e' || d == 'E') && i < b.len() && (b[i] == b'-' || b[i] == b'+') {
                        i += 1;
                    }
                } else {
                    break;
                }
            }
            let n = &s[st..i];
            out.push(if float {
                Tok::Float(n.parse().map_err(|_| format!("a number `{n}`"))?)
            } else {
                Tok::Int(n.parse().map_err(|_| format!("a number `{n}`"))?)
            });
        } else if c == '"' || c == '\'' {
            let st = i + 1;
            i += 1;
            while i < b.len() && b[i] as char != c {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            if i >= b.len() {
                return Err("a string without its end".into());
            }
            out.push(Tok::Str(s[st..i].to_string()));
            i += 1;
        } else if "()[],=.:-".contains(c) {
            out.push(Tok::P(c));
            i += 1;
        } else {
            return Err(format!("unexpected `{c}`"));
        }
    }
    Ok(out)
}

/// Items of a bracket: positional, keyword (`name=value`), and whether a comma ended them.
type Items = (Vec<Expr>, Vec<(String, Expr)>, bool);

/// Deepest nesting of brackets and signs in one expression (traced code nests a few levels).
const MAX_NESTING: usize = 200;

struct Parser {
    t: Vec<Tok>,
    at: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.t.get(self.at)
    }
    fn is(&self, c: char) -> bool {
        self.peek() == Some(&Tok::P(c))
    }
    fn eat(&mut self, c: char) -> bool {
        let yes = self.is(c);
        if yes {
            self.at += 1;
        }
        yes
    }
    fn want(&mut self, c: char) -> Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!("`{c}` expected"))
        }
    }
    /// Items up to `close`, comma separated, a trailing comma allowed; keyword arguments
    /// (`name=value`) go to the second list.
    fn items(&mut self, close: char) -> Result<Items, String> {
        let (mut pos, mut kw, mut comma) = (Vec::new(), Vec::new(), false);
        while !self.eat(close) {
            if let (Some(Tok::Ident(k)), Some(Tok::P('='))) =
                (self.t.get(self.at).cloned(), self.t.get(self.at + 1))
            {
                self.at += 2;
                kw.push((k, self.expr()?));
            } else {
                pos.push(self.expr()?);
            }
            comma = self.eat(',');
            if !comma && !self.is(close) {
                return Err(format!("`,` or `{close}` expected"));
            }
        }
        Ok((pos, kw, comma))
    }
    fn expr(&mut self) -> Result<Expr, String> {
        self.depth += 1;
        if self.depth > MAX_NESTING {
            return Err(format!("expressions nested more than {MAX_NESTING} deep"));
        }
        let e = self.expr_inner();
        self.depth -= 1;
        e
    }

    fn expr_inner(&mut self) -> Result<Expr, String> {
        let mut e = match self.peek().cloned() {
            Some(Tok::Int(v)) => {
                self.at += 1;
                Expr::Int(v)
            }
            Some(Tok::Float(v)) => {
                self.at += 1;
                Expr::Float(v)
            }
            Some(Tok::Str(v)) => {
                self.at += 1;
                Expr::Str(v)
            }
            Some(Tok::P('-')) => {
                self.at += 1;
                match self.expr()? {
                    Expr::Int(v) => Expr::Int(-v),
                    Expr::Float(v) => Expr::Float(-v),
                    e => return Err(format!("`-` before {e:?}")),
                }
            }
            Some(Tok::Ident(n)) => {
                self.at += 1;
                match n.as_str() {
                    "True" => Expr::Bool(true),
                    "False" => Expr::Bool(false),
                    "None" => Expr::None,
                    "inf" => Expr::Float(f64::INFINITY),
                    _ => Expr::Name(n),
                }
            }
            Some(Tok::P('[')) => {
                self.at += 1;
                Expr::List(self.items(']')?.0)
            }
            Some(Tok::P('(')) => {
                self.at += 1;
                let (items, _, comma) = self.items(')')?;
                if items.len() == 1 && !comma {
                    items.into_iter().next().expect("one")
                } else {
                    Expr::Tuple(items)
                }
            }
            other => return Err(format!("an expression expected, found {other:?}")),
        };
        loop {
            if self.eat('.') {
                match self.peek().cloned() {
                    Some(Tok::Ident(n)) => {
                        self.at += 1;
                        e = Expr::Attr(Box::new(e), n);
                    }
                    other => return Err(format!("a name after `.` expected, found {other:?}")),
                }
            } else if self.eat('(') {
                let (args, kwargs, _) = self.items(')')?;
                e = Expr::Call {
                    func: Box::new(e),
                    args,
                    kwargs,
                };
            } else if self.eat('[') {
                let i = self.expr()?;
                self.want(']')?;
                e = Expr::Index(Box::new(e), Box::new(i));
            } else {
                return Ok(e);
            }
        }
    }
}

fn statement(s: &str) -> Result<Stmt, String> {
    let t = tokens(s)?;
    let mut p = Parser { t, at: 0, depth: 0 };
    if p.peek() == Some(&Tok::Ident("return".into())) {
        p.at += 1;
        let (items, _, comma) = p.items_until_end()?;
        return Ok(Stmt::Return(if items.len() == 1 && !comma {
            items.into_iter().next().expect("one")
        } else {
            Expr::Tuple(items)
        }));
    }
    // targets: `a = ...`, `a, b, = ...`
    let mut targets = Vec::new();
    loop {
        match p.peek().cloned() {
            Some(Tok::Ident(n)) => {
                p.at += 1;
                targets.push(n);
            }
            other => return Err(format!("an assignment expected, found {other:?}")),
        }
        if p.eat('=') {
            break;
        }
        p.want(',')?;
        if p.eat('=') {
            break;
        }
    }
    let e = p.expr()?;
    if p.at != p.t.len() {
        return Err("more after the expression".into());
    }
    Ok(Stmt::Assign(targets, e))
}

impl Parser {
    /// `return a, b` without brackets.
    fn items_until_end(&mut self) -> Result<Items, String> {
        let mut items = Vec::new();
        let mut comma = false;
        while self.at < self.t.len() {
            items.push(self.expr()?);
            comma = self.eat(',');
            if !comma && self.at < self.t.len() {
                return Err("more after the expression".into());
            }
        }
        Ok((items, Vec::new(), comma))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_traced_statements() {
        let s = statement("input0 = torch._convolution(input, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, False, False, True, True)").unwrap();
        let Stmt::Assign(t, Expr::Call { func, args, .. }) = s else {
            panic!("{s:?}")
        };
        assert_eq!(t, vec!["input0"]);
        assert_eq!(
            *func,
            Expr::Attr(Box::new(Expr::Name("torch".into())), "_convolution".into())
        );
        assert_eq!(args.len(), 13);
        assert_eq!(args[2], Expr::None);
        assert_eq!(args[3], Expr::List(vec![Expr::Int(1), Expr::Int(1)]));
        let s = statement("u, v, base, = _1").unwrap();
        assert_eq!(
            s,
            Stmt::Assign(
                vec!["u".into(), "v".into(), "base".into()],
                Expr::Name("_1".into())
            )
        );
        let s = statement("_4 = torch.slice(_3, 2, 0, 9223372036854775807)").unwrap();
        let Stmt::Assign(_, Expr::Call { args, .. }) = s else {
            panic!()
        };
        assert_eq!(args[3], Expr::Int(i64::MAX));
        let s = statement("_0 = torch.clamp(norm0, 1.0000000000000001e-05)").unwrap();
        let Stmt::Assign(_, Expr::Call { args, .. }) = s else {
            panic!()
        };
        assert_eq!(args[1], Expr::Float(1e-5));
        let s = statement("return (head).forward(_0, _1, _2, )").unwrap();
        assert!(matches!(s, Stmt::Return(Expr::Call { .. })), "{s:?}");
        let s = statement("return (_0, _1)").unwrap();
        assert!(
            matches!(s, Stmt::Return(Expr::Tuple(ref v)) if v.len() == 2),
            "{s:?}"
        );
        let s = statement("_2 = getattr(obj_preds, \"2\")").unwrap();
        assert!(
            matches!(s, Stmt::Assign(_, Expr::Call { ref args, .. }) if args[1] == Expr::Str("2".into()))
        );
        assert!(statement("x = = y").is_err());
        assert!(statement("x = foo(").is_err());
        assert!(statement("if x:").is_err());
        // hostile nesting is refused, not recursed into
        let deep = format!("x = {}1{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(statement(&deep).unwrap_err().contains("nested"));
        let neg = format!("x = {}1", "-".repeat(100_000));
        assert!(statement(&neg).unwrap_err().contains("nested"));
        assert!(statement("x = \"é\\").is_err());
        assert!(statement("é = 1").is_err());
        assert!(signature("def f)(self:").is_err());
    }

    #[test]
    fn parses_classes_and_multiline_signatures() {
        let text = "class Conv2d(Module):\n  __parameters__ = [\"weight\", ]\n  weight : Tensor\n  def forward(self: __torch__.torch.nn.modules.conv.Conv2d,\n    input: Tensor) -> Tensor:\n    weight = self.weight\n    return torch._convolution(input, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, False, False, True, True)\n  def forward1(self: X,\n    a: Tensor,\n    b: Tensor) -> Tuple[Tensor, Tensor]:\n    return (a, b)\n";
        let code =
            Code::parse(&[("__torch__/torch/nn/modules/conv.py".into(), text.into())]).unwrap();
        let c = &code.classes["__torch__.torch.nn.modules.conv.Conv2d"];
        assert_eq!(c["forward"].params, vec!["input"]);
        assert_eq!(c["forward"].body.len(), 2);
        assert_eq!(c["forward1"].params, vec!["a", "b"]);
        assert_eq!(c["forward1"].returns, "Tuple[Tensor, Tensor]");
    }
}
