//! The ONNX operators the interpreter runs (semantics from the ONNX operator specification,
//! `docs/Operators.md`), each on candle tensors. Convolutions with constant weights are
//! prepared once at load on this crate's CPU kernels.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::node::{Node, Prepared};
use super::tensor::{element_limit, tensor_of};
use crate::conv::{Conv2d, Depthwise, Geometry};
use sd_pipeline::cpu::activation;

type R<T> = Result<T, String>;

fn e(x: candle_core::Error) -> String {
    x.to_string()
}

const SUPPORTED: &[&str] = &[
    "Abs",
    "Add",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "Clip",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "Div",
    "Dropout",
    "Equal",
    "Erf",
    "Exp",
    "Expand",
    "Flatten",
    "Gather",
    "Gemm",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Greater",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "LayerNormalization",
    "LeakyRelu",
    "Less",
    "Log",
    "MatMul",
    "Max",
    "MaxPool",
    "Min",
    "Mul",
    "Neg",
    "Not",
    "Pad",
    "Pow",
    "Range",
    "Reciprocal",
    "ReduceL2",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceSum",
    "Relu",
    "Reshape",
    "Resize",
    "Shape",
    "Sigmoid",
    "Slice",
    "Softmax",
    "Split",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Tanh",
    "Transpose",
    "Unsqueeze",
    "Upsample",
    "Where",
];

/// Refuse an operator the interpreter does not have, by name.
pub(crate) fn check_supported(node: &Node) -> R<()> {
    if SUPPORTED.contains(&node.op.as_str()) {
        Ok(())
    } else {
        Err(format!(
            "{}: the ONNX operator {} is not supported by this interpreter",
            node.label(),
            node.op
        ))
    }
}

/// Whether a node with only constant inputs is folded at load (all but the random ones).
pub(crate) fn foldable(node: &Node) -> bool {
    node.op != "Dropout" || node.outputs.len() == 1
}

/// A Conv's kernel geometry: (stride, (pad before, pad after), dilation, groups) when it is
/// square and the same on both axes.
fn conv_geometry(node: &Node, k: (usize, usize)) -> R<Option<Geometry>> {
    let strides = node.attr_ints("strides").unwrap_or(vec![1, 1]);
    let dil = node.attr_ints("dilations").unwrap_or(vec![1, 1]);
    let pads = conv_pads(node, k, None)?;
    if strides.len() != 2 || dil.len() != 2 || k.0 != k.1 {
        return Ok(None);
    }
    let same = strides[0] == strides[1]
        && dil[0] == dil[1]
        && pads[0] == pads[1]
        && pads[2] == pads[3]
        && strides[0] > 0
        && dil[0] > 0;
    Ok(same.then(|| Geometry {
        stride: strides[0] as usize,
        pad: (pads[0], pads[2]),
        dilation: dil[0] as usize,
    }))
}

/// `pads` as [top, left, bottom, right] (from `pads`, or `auto_pad` for an input of `hw`).
fn conv_pads(node: &Node, k: (usize, usize), hw: Option<(usize, usize)>) -> R<[usize; 4]> {
    let auto = node.attr_s("auto_pad", "NOTSET");
    match auto.as_str() {
        "NOTSET" | "" => {
            let p = node.attr_ints("pads").unwrap_or(vec![0, 0, 0, 0]);
            if p.len() != 4 || p.iter().any(|&x| x < 0) {
                return Err(format!("pads {p:?} (2-D, non-negative expected)"));
            }
            Ok([p[0] as usize, p[1] as usize, p[2] as usize, p[3] as usize])
        }
        "VALID" => Ok([0; 4]),
        "SAME_UPPER" | "SAME_LOWER" => {
            let Some((h, w)) = hw else {
                // decided at run time
                return Ok([usize::MAX; 4]);
            };
            let s = node.attr_ints("strides").unwrap_or(vec![1, 1]);
            let d = node.attr_ints("dilations").unwrap_or(vec![1, 1]);
            let total = |n: usize, k: usize, s: i64, d: i64| {
                let (s, d) = (s.max(1) as usize, d.max(1) as usize);
                let out = n.div_ceil(s);
                ((out - 1) * s + (k - 1) * d + 1).saturating_sub(n)
            };
            let th = total(h, k.0, s[0], d[0]);
            let tw = total(w, k.1, s[1], d[1]);
            let split = |t: usize| {
                if auto == "SAME_UPPER" {
                    (t / 2, t - t / 2)
                } else {
                    (t - t / 2, t / 2)
                }
            };
            let ((a, b), (c, dd)) = (split(th), split(tw));
            Ok([a, c, b, dd])
        }
        other => Err(format!("auto_pad {other}")),
    }
}

/// Prepare a node from its constant inputs (a Conv's kernel on the CPU kernels).
pub(crate) fn prepare(node: &Node, consts: &HashMap<String, Tensor>) -> R<Option<Prepared>> {
    if node.op != "Conv" {
        return Ok(None);
    }
    let Some(w) = node.inputs.get(1).and_then(|n| consts.get(n)) else {
        return Ok(None);
    };
    let b = match node.inputs.get(2).filter(|n| !n.is_empty()) {
        Some(n) => match consts.get(n) {
            Some(b) => Some(b),
            None => return Ok(None),
        },
        None => None,
    };
    if w.rank() != 4 || node.attr_s("auto_pad", "NOTSET").starts_with("SAME") {
        return Ok(None);
    }
    let (o, i, kh, kw) = w.dims4().map_err(e)?;
    let Some(geo) = conv_geometry(node, (kh, kw))? else {
        return Ok(None);
    };
    let groups = node.attr_i("group", 1);
    if groups == 1 {
        return Ok(Some(Prepared::Conv(Conv2d::new(w, b, geo).map_err(e)?)));
    }
    if i == 1 && groups as usize == o {
        let wv: Vec<f32> = w.flatten_all().and_then(|t| t.to_vec1()).map_err(e)?;
        let bv = b
            .map(|b| b.flatten_all().and_then(|t| t.to_vec1::<f32>()))
            .transpose()
            .map_err(e)?;
        return Ok(Some(Prepared::Depthwise(
            Depthwise::new(wv, bv, kh, geo).map_err(e)?,
        )));
    }
    Ok(None)
}

fn input<'a>(ins: &[Option<&'a Tensor>], i: usize, what: &str) -> R<&'a Tensor> {
    ins.get(i)
        .copied()
        .flatten()
        .ok_or_else(|| format!("input {i} ({what}) is missing"))
}

fn opt<'a>(ins: &[Option<&'a Tensor>], i: usize) -> Option<&'a Tensor> {
    ins.get(i).copied().flatten()
}

/// The values of an integer tensor (shapes, axes, indices).
fn ints(t: &Tensor) -> R<Vec<i64>> {
    t.to_dtype(DType::I64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<i64>())
        .map_err(e)
}

fn floats(t: &Tensor) -> R<Vec<f32>> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(e)
}

/// An axis, negative counted from the end.
fn axis(a: i64, rank: usize) -> R<usize> {
    let r = rank as i64;
    let x = if a < 0 { a + r } else { a };
    if (0..r).contains(&x) {
        Ok(x as usize)
    } else {
        Err(format!("axis {a} for rank {rank}"))
    }
}

/// numpy's broadcast shape of two shapes.
fn broadcast_shape(a: &[usize], b: &[usize]) -> R<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for (i, o) in out.iter_mut().enumerate() {
        let x = if i + a.len() >= n {
            a[i + a.len() - n]
        } else {
            1
        };
        let y = if i + b.len() >= n {
            b[i + b.len() - n]
        } else {
            1
        };
        *o = if x == y || y == 1 {
            x
        } else if x == 1 {
            y
        } else {
            return Err(format!("shapes {a:?} and {b:?} do not broadcast"));
        };
    }
    Ok(out)
}

fn same_type(a: &Tensor, b: &Tensor) -> R<()> {
    if a.dtype() == b.dtype() {
        Ok(())
    } else {
        Err(format!(
            "operands of types {:?} and {:?}",
            a.dtype(),
            b.dtype()
        ))
    }
}

fn binary(node: &Node, a: &Tensor, b: &Tensor) -> R<Tensor> {
    same_type(a, b)?;
    let shape = broadcast_shape(a.dims(), b.dims())?;
    let (a, b) = (
        a.broadcast_as(shape.as_slice()).map_err(e)?,
        b.broadcast_as(shape.as_slice()).map_err(e)?,
    );
    let int_op: Option<fn(i64, i64) -> i64> = match node.op.as_str() {
        "Add" => Some(i64::wrapping_add),
        "Sub" => Some(i64::wrapping_sub),
        "Mul" => Some(i64::wrapping_mul),
        // integer division truncates toward zero (C semantics)
        "Div" => Some(i64::wrapping_div),
        _ => None,
    };
    if let (DType::I64, Some(f)) = (a.dtype(), int_op) {
        // shape arithmetic, on the values themselves: wrapping, never a panic
        let (x, y) = (ints(&a)?, ints(&b)?);
        if node.op == "Div" && y.contains(&0) {
            return Err("integer division by zero".into());
        }
        let v: Vec<i64> = x.iter().zip(&y).map(|(p, q)| f(*p, *q)).collect();
        return Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).map_err(e);
    }
    let r = match node.op.as_str() {
        "Add" => a.add(&b),
        "Sub" => a.sub(&b),
        "Mul" => a.mul(&b),
        "Div" => a.div(&b),
        "Pow" => {
            if let Ok(p) = floats(&b) {
                if b.elem_count() > 0 && p.iter().all(|&x| x == p[0]) && p[0] == 2.0 {
                    return a.sqr().map_err(e);
                }
            }
            a.pow(&b)
        }
        "Max" => a.maximum(&b),
        "Min" => a.minimum(&b),
        "Equal" => a.eq(&b),
        "Less" => a.lt(&b),
        "Greater" => a.gt(&b),
        op => return Err(format!("{op} is not a binary operator")),
    };
    r.map_err(e)
}

fn unary_f32(t: &Tensor) -> R<&Tensor> {
    if t.dtype() == DType::F32 {
        Ok(t)
    } else {
        Err(format!("a float input expected, got {:?}", t.dtype()))
    }
}

/// Run one node on its inputs (`None` for an omitted optional input).
pub(crate) fn run(node: &Node, ins: &[Option<&Tensor>]) -> R<Vec<Tensor>> {
    let x = || input(ins, 0, "data");
    let one = |t: candle_core::Result<Tensor>| t.map(|t| vec![t]).map_err(e);
    match node.op.as_str() {
        "Identity" => Ok(vec![x()?.clone()]),
        "Dropout" => Ok(vec![x()?.clone()]),
        "Constant" => {
            let a = node
                .attrs
                .values()
                .next()
                .ok_or("a Constant without a value")?;
            let t = match a.name.as_str() {
                "value" => tensor_of(a.t.as_ref().ok_or("value is not a tensor")?)?,
                "value_float" => Tensor::new(a.f, &Device::Cpu).map_err(e)?,
                "value_floats" => Tensor::new(a.floats.as_slice(), &Device::Cpu).map_err(e)?,
                "value_int" => Tensor::new(a.i, &Device::Cpu).map_err(e)?,
                "value_ints" => Tensor::new(a.ints.as_slice(), &Device::Cpu).map_err(e)?,
                other => return Err(format!("Constant {other} is not supported")),
            };
            Ok(vec![t])
        }
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Equal" | "Less" | "Greater" => {
            Ok(vec![binary(node, x()?, input(ins, 1, "B")?)?])
        }
        "Max" | "Min" => {
            let mut acc = x()?.clone();
            for t in ins.iter().skip(1).flatten() {
                acc = binary(node, &acc, t)?;
            }
            Ok(vec![acc])
        }
        "Not" => {
            let t = x()?;
            one(t.ones_like().and_then(|o| o.sub(t)))
        }
        "Where" => {
            let (c, a, b) = (x()?, input(ins, 1, "X")?, input(ins, 2, "Y")?);
            same_type(a, b)?;
            let s = broadcast_shape(&broadcast_shape(c.dims(), a.dims())?, b.dims())?;
            let s = s.as_slice();
            one(c
                .broadcast_as(s)
                .and_then(|c| c.where_cond(&a.broadcast_as(s)?, &b.broadcast_as(s)?)))
        }
        "Relu" => one(unary_f32(x()?)?.relu()),
        "Sigmoid" => one(activation::sigmoid(unary_f32(x()?)?)),
        // Mul(x, Sigmoid(x)) fused at load
        "SiLU" => one(activation::silu(unary_f32(x()?)?)),
        "Tanh" => one(unary_f32(x()?)?.tanh()),
        "Exp" => one(unary_f32(x()?)?.exp()),
        "Log" => one(unary_f32(x()?)?.log()),
        "Sqrt" => one(unary_f32(x()?)?.sqrt()),
        "Erf" => one(unary_f32(x()?)?.erf()),
        "Reciprocal" => one(unary_f32(x()?)?.recip()),
        "Neg" => one(x()?.neg()),
        "Abs" => one(x()?.abs()),
        "LeakyRelu" => {
            let a = node.attr_f("alpha", 0.01) as f64;
            let t = unary_f32(x()?)?;
            one(t
                .relu()
                .and_then(|p| p.add(&t.neg()?.relu()?.affine(-a, 0.0)?)))
        }
        "HardSigmoid" => {
            let (a, b) = (
                node.attr_f("alpha", 0.2) as f64,
                node.attr_f("beta", 0.5) as f64,
            );
            one(unary_f32(x()?)?
                .affine(a, b)
                .and_then(|t| t.clamp(0f32, 1f32)))
        }
        "HardSwish" => {
            let t = unary_f32(x()?)?;
            one(t
                .affine(1.0 / 6.0, 0.5)
                .and_then(|h| h.clamp(0f32, 1f32))
                .and_then(|h| h.mul(t)))
        }
        "Clip" => {
            let t = x()?;
            let (lo, hi) = if node.opset < 11 {
                (node.attr_f("min", f32::MIN), node.attr_f("max", f32::MAX))
            } else {
                let v = |i| opt(ins, i).map(floats).transpose();
                (
                    v(1)?.and_then(|v| v.first().copied()).unwrap_or(f32::MIN),
                    v(2)?.and_then(|v| v.first().copied()).unwrap_or(f32::MAX),
                )
            };
            one(t.maximum(lo).and_then(|t| t.minimum(hi)))
        }
        "Softmax" => {
            let t = unary_f32(x()?)?;
            let default = if node.opset < 13 { 1 } else { -1 };
            let a = axis(node.attr_i("axis", default), t.rank())?;
            if node.opset < 13 {
                // coerced to 2-D at the axis
                let dims = t.dims().to_vec();
                let rows: usize = dims[..a].iter().product();
                let s = t
                    .reshape((rows, t.elem_count() / rows.max(1)))
                    .and_then(|t| candle_nn::ops::softmax_last_dim(&t))
                    .and_then(|t| t.reshape(dims));
                one(s)
            } else {
                one(candle_nn::ops::softmax(t, a))
            }
        }
        "Cast" => {
            let to = node.attr_i("to", 1) as i32;
            use super::proto::data_type as dt;
            let d = match to {
                dt::FLOAT | dt::FLOAT16 | dt::DOUBLE => DType::F32,
                dt::INT64 | dt::INT32 | dt::INT8 | dt::UINT8 => DType::I64,
                dt::BOOL => {
                    let t = x()?;
                    return one(t.zeros_like().and_then(|z| t.ne(&z)));
                }
                other => return Err(format!("Cast to type {other}")),
            };
            one(x()?.to_dtype(d))
        }
        "Shape" => {
            let d: Vec<i64> = x()?.dims().iter().map(|&v| v as i64).collect();
            let r = d.len() as i64;
            let clampi = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let (s, en) = (
                clampi(node.attr_i("start", 0)),
                clampi(node.attr_i("end", r)),
            );
            let part = if s < en { d[s..en].to_vec() } else { vec![] };
            one(Tensor::new(part.as_slice(), &Device::Cpu))
        }
        "ConstantOfShape" => {
            let shape: Vec<usize> = ints(x()?)?
                .iter()
                .map(|&v| usize::try_from(v).map_err(|_| format!("shape value {v}")))
                .collect::<R<_>>()?;
            check_count(&shape)?;
            let value = match node.attrs.get("value").and_then(|a| a.t.as_ref()) {
                Some(t) => tensor_of(t)?.flatten_all().map_err(e)?,
                None => Tensor::new(&[0f32], &Device::Cpu).map_err(e)?,
            };
            one(value
                .reshape(vec![1usize; shape.len().max(1)])
                .and_then(|v| v.reshape(vec![1usize; shape.len()]))
                .and_then(|v| v.broadcast_as(shape.as_slice()))
                .and_then(|v| v.contiguous()))
        }
        "Range" => {
            let (s, l, d) = (x()?, input(ins, 1, "limit")?, input(ins, 2, "delta")?);
            if s.dtype() == DType::I64 {
                let (s, l, d) = (ints(s)?[0], ints(l)?[0], ints(d)?[0]);
                if d == 0 {
                    return Err("Range with delta 0".into());
                }
                let n = ((l as f64 - s as f64) / d as f64).ceil().max(0.0) as usize;
                check_count(&[n])?;
                let v: Vec<i64> = (0..n as i64)
                    .map(|i| s.wrapping_add(i.wrapping_mul(d)))
                    .collect();
                one(Tensor::new(v.as_slice(), &Device::Cpu))
            } else {
                let (s, l, d) = (floats(s)?[0], floats(l)?[0], floats(d)?[0]);
                if d == 0.0 {
                    return Err("Range with delta 0".into());
                }
                let n = ((l - s) / d).ceil().max(0.0) as usize;
                check_count(&[n])?;
                let v: Vec<f32> = (0..n).map(|i| s + i as f32 * d).collect();
                one(Tensor::new(v.as_slice(), &Device::Cpu))
            }
        }
        "Reshape" => {
            let t = x()?;
            let spec = ints(input(ins, 1, "shape")?)?;
            let allowzero = node.attr_i("allowzero", 0) == 1;
            one(t.reshape(reshape_dims(t.dims(), &spec, allowzero)?))
        }
        "Flatten" => {
            let t = x()?;
            let a = if node.attr_i("axis", 1) == t.rank() as i64 {
                t.rank()
            } else {
                axis(node.attr_i("axis", 1), t.rank())?
            };
            let rows: usize = t.dims()[..a].iter().product();
            one(t.reshape((rows, t.elem_count() / rows.max(1))))
        }
        "Transpose" => {
            let t = x()?;
            let perm: Vec<usize> = match node.attr_ints("perm") {
                Some(p) => p.iter().map(|&a| axis(a, t.rank())).collect::<R<_>>()?,
                None => (0..t.rank()).rev().collect(),
            };
            one(t.permute(perm).and_then(|t| t.contiguous()))
        }
        "Squeeze" | "Unsqueeze" => {
            let t = x()?;
            let axes = if node.opset >= 13 {
                opt(ins, 1).map(ints).transpose()?
            } else {
                node.attr_ints("axes")
            };
            if node.op == "Squeeze" {
                let mut dims = t.dims().to_vec();
                let sq: Vec<usize> = match axes {
                    Some(a) => a.iter().map(|&a| axis(a, dims.len())).collect::<R<_>>()?,
                    None => (0..dims.len()).filter(|&i| dims[i] == 1).collect(),
                };
                for &a in sq.iter() {
                    if dims[a] != 1 {
                        return Err(format!("Squeeze of axis {a} of size {}", dims[a]));
                    }
                }
                let mut i = 0;
                dims.retain(|_| {
                    i += 1;
                    !sq.contains(&(i - 1))
                });
                one(t.reshape(dims))
            } else {
                let a = axes.ok_or("Unsqueeze without axes")?;
                let r = t.rank() + a.len();
                let mut us: Vec<usize> = a.iter().map(|&a| axis(a, r)).collect::<R<_>>()?;
                us.sort_unstable();
                let mut dims = t.dims().to_vec();
                for &a in &us {
                    dims.insert(a, 1);
                }
                one(t.reshape(dims))
            }
        }
        "Concat" => {
            let ts: Vec<&Tensor> = ins.iter().flatten().copied().collect();
            let first = *ts.first().ok_or("Concat of nothing")?;
            let a = axis(node.attr_i("axis", 0), first.rank())?;
            let ts: Vec<&Tensor> = ts
                .into_iter()
                .filter(|t| t.elem_count() > 0 || t.rank() != first.rank())
                .collect();
            if ts.is_empty() {
                return Ok(vec![first.clone()]);
            }
            one(Tensor::cat(&ts, a))
        }
        "Split" => {
            let t = x()?;
            let a = axis(node.attr_i("axis", 0), t.rank())?;
            let n = t.dims()[a];
            let parts: Vec<usize> = match opt(ins, 1)
                .map(ints)
                .transpose()?
                .or(node.attr_ints("split"))
            {
                Some(s) => s.iter().map(|&v| v.max(0) as usize).collect(),
                None => {
                    let k = node.outputs.len().max(1);
                    let each = n.div_ceil(k);
                    (0..k)
                        .map(|i| each.min(n.saturating_sub(i * each)))
                        .collect()
                }
            };
            if parts.iter().sum::<usize>() != n || parts.len() != node.outputs.len() {
                return Err(format!("Split of {n} into {parts:?}"));
            }
            let mut start = 0;
            let mut out = Vec::new();
            for p in parts {
                out.push(
                    t.narrow(a, start, p)
                        .and_then(|t| t.contiguous())
                        .map_err(e)?,
                );
                start += p;
            }
            Ok(out)
        }
        "Slice" => slice(node, ins),
        "Gather" => {
            let t = x()?;
            let idx = input(ins, 1, "indices")?;
            let a = axis(node.attr_i("axis", 0), t.rank())?;
            let n = t.dims()[a] as i64;
            let iv: Vec<u32> = ints(idx)?
                .iter()
                .map(|&i| {
                    let j = if i < 0 { i + n } else { i };
                    if (0..n).contains(&j) {
                        Ok(j as u32)
                    } else {
                        Err(format!("Gather index {i} for a dimension of {n}"))
                    }
                })
                .collect::<R<_>>()?;
            let ids = Tensor::new(iv.as_slice(), &Device::Cpu).map_err(e)?;
            let g = t.index_select(&ids, a).map_err(e)?;
            let mut dims: Vec<usize> = t.dims()[..a].to_vec();
            dims.extend_from_slice(idx.dims());
            dims.extend_from_slice(&t.dims()[a + 1..]);
            one(g.reshape(dims))
        }
        "Expand" => {
            let t = x()?;
            let spec: Vec<usize> = ints(input(ins, 1, "shape")?)?
                .iter()
                .map(|&v| usize::try_from(v).map_err(|_| format!("Expand to {v}")))
                .collect::<R<_>>()?;
            let s = broadcast_shape(t.dims(), &spec)?;
            check_count(&s)?;
            one(t.broadcast_as(s).and_then(|t| t.contiguous()))
        }
        "MatMul" => {
            let (a, b) = (x()?, input(ins, 1, "B")?);
            matmul(a, b).map(|t| vec![t])
        }
        "Gemm" => {
            let (mut a, mut b) = (x()?.clone(), input(ins, 1, "B")?.clone());
            if node.attr_i("transA", 0) == 1 {
                a = a.t().map_err(e)?;
            }
            if node.attr_i("transB", 0) == 1 {
                b = b.t().map_err(e)?;
            }
            let alpha = node.attr_f("alpha", 1.0) as f64;
            let mut y = matmul(&a, &b)?;
            if alpha != 1.0 {
                y = y.affine(alpha, 0.0).map_err(e)?;
            }
            if let Some(c) = opt(ins, 2) {
                let beta = node.attr_f("beta", 1.0) as f64;
                let c = if beta != 1.0 {
                    c.affine(beta, 0.0).map_err(e)?
                } else {
                    c.clone()
                };
                y = y.broadcast_add(&c).map_err(e)?;
            }
            Ok(vec![y])
        }
        "Conv" => conv(node, ins).map(|t| vec![t]),
        "BatchNormalization" => {
            let t = unary_f32(x()?)?;
            let eps = node.attr_f("epsilon", 1e-5) as f64;
            let c = t
                .dims()
                .get(1)
                .copied()
                .ok_or("BatchNormalization of a 1-D input")?;
            let mut shape = vec![1usize; t.rank()];
            shape[1] = c;
            let p =
                |i, what| input(ins, i, what).and_then(|v| v.reshape(shape.as_slice()).map_err(e));
            let (s, b, m, v) = (p(1, "scale")?, p(2, "B")?, p(3, "mean")?, p(4, "var")?);
            let k = s
                .div(&v.affine(1.0, eps).map_err(e)?.sqrt().map_err(e)?)
                .map_err(e)?;
            one(t
                .broadcast_sub(&m)
                .and_then(|y| y.broadcast_mul(&k))
                .and_then(|y| y.broadcast_add(&b)))
        }
        "LayerNormalization" => {
            let t = unary_f32(x()?)?;
            let a = axis(node.attr_i("axis", -1), t.rank())?;
            let eps = node.attr_f("epsilon", 1e-5) as f64;
            let dims = t.dims().to_vec();
            let rows: usize = dims[..a].iter().product();
            let flat = t.reshape((rows, t.elem_count() / rows.max(1))).map_err(e)?;
            let mean = flat.mean_keepdim(1).map_err(e)?;
            let xc = flat.broadcast_sub(&mean).map_err(e)?;
            let var = xc.sqr().and_then(|v| v.mean_keepdim(1)).map_err(e)?;
            let y = xc
                .broadcast_div(&var.affine(1.0, eps).and_then(|v| v.sqrt()).map_err(e)?)
                .and_then(|y| y.reshape(dims.as_slice()))
                .map_err(e)?;
            let mut y = y.broadcast_mul(input(ins, 1, "scale")?).map_err(e)?;
            if let Some(b) = opt(ins, 2) {
                y = y.broadcast_add(b).map_err(e)?;
            }
            Ok(vec![y])
        }
        "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin" | "ReduceL2" => reduce(node, ins),
        "GlobalAveragePool" => {
            let t = unary_f32(x()?)?;
            let d = t.dims().to_vec();
            one(t
                .flatten_from(2)
                .and_then(|f| f.mean_keepdim(2))
                .and_then(|m| m.reshape(pooled_dims(&d))))
        }
        "GlobalMaxPool" => {
            let t = unary_f32(x()?)?;
            let d = t.dims().to_vec();
            one(t
                .flatten_from(2)
                .and_then(|f| f.max_keepdim(2))
                .and_then(|m| m.reshape(pooled_dims(&d))))
        }
        "MaxPool" | "AveragePool" => pool(node, x()?).map(|t| vec![t]),
        "Pad" => pad(node, ins).map(|t| vec![t]),
        "Resize" | "Upsample" => resize(node, ins).map(|t| vec![t]),
        op => Err(format!("the ONNX operator {op} is not supported")),
    }
}

fn pooled_dims(d: &[usize]) -> Vec<usize> {
    let mut v = d[..2.min(d.len())].to_vec();
    v.extend(std::iter::repeat_n(1, d.len().saturating_sub(2)));
    v
}

fn check_count(shape: &[usize]) -> R<()> {
    let mut n: usize = 1;
    for &d in shape {
        n = n
            .checked_mul(d)
            .filter(|&n| n <= element_limit())
            .ok_or_else(|| {
                format!(
                    "a shape of {shape:?} is more than {} values",
                    element_limit()
                )
            })?;
    }
    Ok(())
}

/// ONNX Reshape's shape: 0 copies the input's dimension (unless `allowzero`), -1 is inferred.
fn reshape_dims(dims: &[usize], spec: &[i64], allowzero: bool) -> R<Vec<usize>> {
    let total: usize = dims.iter().product();
    let mut out = Vec::with_capacity(spec.len());
    let mut infer = None;
    for (i, &s) in spec.iter().enumerate() {
        match s {
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(1);
            }
            0 if !allowzero => out.push(*dims.get(i).ok_or("Reshape 0 past the input's rank")?),
            s if s >= 0 => out.push(s as usize),
            _ => return Err(format!("Reshape to {spec:?}")),
        }
    }
    let known = out
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("Reshape to {spec:?}"))?;
    if let Some(i) = infer {
        if known == 0 || !total.is_multiple_of(known) {
            return Err(format!("Reshape of {dims:?} to {spec:?}"));
        }
        out[i] = total / known;
    } else if known != total {
        return Err(format!("Reshape of {dims:?} to {spec:?}"));
    }
    Ok(out)
}

fn matmul(a: &Tensor, b: &Tensor) -> R<Tensor> {
    let (a1, b1) = (a.rank() == 1, b.rank() == 1);
    let a2 = if a1 {
        a.unsqueeze(0).map_err(e)?
    } else {
        a.clone()
    };
    let b2 = if b1 {
        b.unsqueeze(1).map_err(e)?
    } else {
        b.clone()
    };
    // the product's size before it is made (an outer product can be far larger than both)
    if a2.rank() >= 2 && b2.rank() >= 2 {
        let (ad, bd) = (a2.dims(), b2.dims());
        let mut out = broadcast_shape(&ad[..ad.len() - 2], &bd[..bd.len() - 2])?;
        out.extend([ad[ad.len() - 2], bd[bd.len() - 1]]);
        check_count(&out)?;
    }
    let mut y = if a2.rank() == 2 && b2.rank() == 2 {
        a2.contiguous()
            .and_then(|a| a.matmul(&b2.contiguous()?))
            .map_err(e)?
    } else {
        a2.broadcast_matmul(&b2).map_err(e)?
    };
    if a1 {
        y = y.squeeze(y.rank() - 2).map_err(e)?;
    }
    if b1 {
        y = y.squeeze(y.rank() - 1).map_err(e)?;
    }
    Ok(y)
}

fn slice(node: &Node, ins: &[Option<&Tensor>]) -> R<Vec<Tensor>> {
    let t = input(ins, 0, "data")?;
    let (starts, ends, axes, steps) = if node.opset < 10 {
        (
            node.attr_ints("starts").ok_or("Slice without starts")?,
            node.attr_ints("ends").ok_or("Slice without ends")?,
            node.attr_ints("axes"),
            None,
        )
    } else {
        (
            ints(input(ins, 1, "starts")?)?,
            ints(input(ins, 2, "ends")?)?,
            opt(ins, 3).map(ints).transpose()?,
            opt(ins, 4).map(ints).transpose()?,
        )
    };
    let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return Err("Slice: starts, ends, axes and steps differ in length".into());
    }
    let mut y = t.clone();
    for i in 0..starts.len() {
        let a = axis(axes[i], t.rank())?;
        let n = y.dims()[a] as i64;
        let step = steps[i];
        if step == 0 {
            return Err("Slice with step 0".into());
        }
        let fix = |v: i64| if v < 0 { v + n } else { v };
        let (s, en) = (fix(starts[i].max(-n - 1)), fix(ends[i].max(-n - 1)));
        let idx: Vec<u32> = if n == 0 {
            Vec::new()
        } else if step > 0 {
            let (s, en) = (s.clamp(0, n), en.clamp(0, n));
            (s..en).step_by(step as usize).map(|v| v as u32).collect()
        } else {
            let (s, en) = (s.clamp(0, n - 1), en.clamp(-1, n - 1));
            let mut v = Vec::new();
            let mut j = s;
            while j > en {
                v.push(j as u32);
                j = j.saturating_add(step);
            }
            v
        };
        if step == 1 {
            let start = idx.first().copied().unwrap_or(0) as usize;
            y = y.narrow(a, start, idx.len()).map_err(e)?;
        } else {
            let ids = Tensor::new(idx.as_slice(), &Device::Cpu).map_err(e)?;
            y = y
                .contiguous()
                .and_then(|y| y.index_select(&ids, a))
                .map_err(e)?;
        }
    }
    Ok(vec![y.contiguous().map_err(e)?])
}

fn reduce(node: &Node, ins: &[Option<&Tensor>]) -> R<Vec<Tensor>> {
    let t = input(ins, 0, "data")?;
    let from_input = (node.op == "ReduceSum" && node.opset >= 13) || node.opset >= 18;
    let axes = if from_input {
        opt(ins, 1).map(ints).transpose()?
    } else {
        node.attr_ints("axes")
    };
    let keep = node.attr_i("keepdims", 1) == 1;
    let mut axes: Vec<usize> = match axes {
        Some(a) if !a.is_empty() => a.iter().map(|&a| axis(a, t.rank())).collect::<R<_>>()?,
        _ if node.attr_i("noop_with_empty_axes", 0) == 1 => return Ok(vec![t.clone()]),
        _ => (0..t.rank()).collect(),
    };
    axes.sort_unstable();
    axes.dedup();
    // candle's square, square root and mean of integers panic: those reductions take floats
    let mut y = if node.op == "ReduceL2" {
        unary_f32(t)?.sqr().map_err(e)?
    } else if node.op == "ReduceMean" {
        unary_f32(t)?.clone()
    } else {
        t.clone()
    };
    for &a in axes.iter().rev() {
        y = match node.op.as_str() {
            "ReduceMean" => y.mean_keepdim(a),
            "ReduceMax" => y.max_keepdim(a),
            "ReduceMin" => y.min_keepdim(a),
            _ => y.sum_keepdim(a),
        }
        .map_err(e)?;
    }
    if node.op == "ReduceL2" {
        y = y.sqrt().map_err(e)?;
    }
    if !keep {
        for &a in axes.iter().rev() {
            y = y.squeeze(a).map_err(e)?;
        }
    }
    Ok(vec![y])
}

fn conv(node: &Node, ins: &[Option<&Tensor>]) -> R<Tensor> {
    let x = unary_f32(input(ins, 0, "X")?)?;
    conv_size_check(node, x, input(ins, 1, "W")?)?;
    match &node.prepared {
        Some(Prepared::Conv(c)) => return c.forward(x).map_err(e),
        Some(Prepared::Depthwise(d)) => return d.forward(x).map_err(e),
        None => {}
    }
    let w = input(ins, 1, "W")?;
    if x.rank() != 4 || w.rank() != 4 {
        return Err(format!("only 2-D convolutions run (input {:?})", x.dims()));
    }
    let (_, _, kh, kw) = w.dims4().map_err(e)?;
    let (_, _, h, wd) = x.dims4().map_err(e)?;
    let pads = conv_pads(node, (kh, kw), Some((h, wd)))?;
    let s = node.attr_ints("strides").unwrap_or(vec![1, 1]);
    let d = node.attr_ints("dilations").unwrap_or(vec![1, 1]);
    if s.len() != 2 || d.len() != 2 || s[0] != s[1] || d[0] != d[1] || s[0] < 1 || d[0] < 1 {
        return Err(format!(
            "strides {s:?} and dilations {d:?} (equal on both axes expected)"
        ));
    }
    let xp = x
        .pad_with_zeros(2, pads[0], pads[2])
        .and_then(|t| t.pad_with_zeros(3, pads[1], pads[3]))
        .map_err(e)?;
    let g = node.attr_i("group", 1).max(1) as usize;
    let (_, c, ph, pw) = xp.dims4().map_err(e)?;
    let (o, wc, _, _) = w.dims4().map_err(e)?;
    let span = |k: usize| {
        (d[0] as usize)
            .saturating_mul(k.saturating_sub(1))
            .saturating_add(1)
    };
    if wc.checked_mul(g) != Some(c) || o % g != 0 || ph < span(kh) || pw < span(kw) {
        return Err(format!(
            "a weight {:?} in {g} groups does not fit the (padded) input {:?}",
            w.dims(),
            xp.dims()
        ));
    }
    let mut y = xp
        .conv2d(w, 0, s[0] as usize, d[0] as usize, g)
        .map_err(e)?;
    if let Some(b) = opt(ins, 2) {
        y = y
            .broadcast_add(&b.reshape((1, b.elem_count(), 1, 1)).map_err(e)?)
            .map_err(e)?;
    }
    Ok(y)
}

/// A conv's padded input and output fit the element limit (pads come from the file).
fn conv_size_check(node: &Node, x: &Tensor, w: &Tensor) -> R<()> {
    if x.rank() != 4 || w.rank() != 4 {
        return Err(format!(
            "only 2-D convolutions run (input {:?}, weight {:?})",
            x.dims(),
            w.dims()
        ));
    }
    if x.elem_count() == 0 || w.elem_count() == 0 {
        return Err(format!(
            "a conv of an empty tensor ({:?}, {:?})",
            x.dims(),
            w.dims()
        ));
    }
    let (n, c, h, wd) = x.dims4().map_err(e)?;
    let (o, _, kh, kw) = w.dims4().map_err(e)?;
    let p = conv_pads(node, (kh, kw), Some((h, wd)))?;
    let (ph, pw) = (
        h.checked_add(p[0]).and_then(|v| v.checked_add(p[2])),
        wd.checked_add(p[1]).and_then(|v| v.checked_add(p[3])),
    );
    let (Some(ph), Some(pw)) = (ph, pw) else {
        return Err(format!("pads {p:?}"));
    };
    check_count(&[n, c, ph, pw])?;
    check_count(&[n, o, ph, pw])
}

fn pool(node: &Node, x: &Tensor) -> R<Tensor> {
    let x = unary_f32(x)?;
    let k = node
        .attr_ints("kernel_shape")
        .ok_or("a pool without kernel_shape")?;
    if x.rank() != 4 || k.len() != 2 || k.iter().any(|&v| v < 1) {
        return Err(format!(
            "only 2-D pools run (kernel {k:?}, input {:?})",
            x.dims()
        ));
    }
    let (kh, kw) = (k[0] as usize, k[1] as usize);
    let s = node.attr_ints("strides").unwrap_or(vec![1, 1]);
    if s.len() != 2 || s.iter().any(|&v| v < 1) {
        return Err(format!("strides {s:?}"));
    }
    if node
        .attr_ints("dilations")
        .is_some_and(|d| d.iter().any(|&v| v != 1))
    {
        return Err("dilated pools are not supported".into());
    }
    let (sh, sw) = (s[0] as usize, s[1] as usize);
    if x.elem_count() == 0 {
        return Err(format!("a pool of an empty tensor {:?}", x.dims()));
    }
    let (_, _, h, w) = x.dims4().map_err(e)?;
    let mut p = conv_pads(node, (kh, kw), Some((h, w)))?;
    if p.iter().any(|&v| v > h.max(w) + kh.max(kw)) {
        return Err(format!("pads {p:?} larger than the input and kernel"));
    }
    check_count(&[
        x.elem_count() / (h * w).max(1),
        h + p[0] + p[2],
        w + p[1] + p[3],
    ])?;
    let max = node.op == "MaxPool";
    if node.attr_i("ceil_mode", 0) == 1 {
        // extra room after the input so that flooring gives the ceiled size
        for (i, (n, k, st)) in [(h, kh, sh), (w, kw, sw)].into_iter().enumerate() {
            let span = n + p[i] + p[i + 2];
            if span >= k {
                let floor = (span - k) / st + 1;
                let ceil = (span - k).div_ceil(st) + 1;
                // the last window must start inside the input or its left padding
                let ceil = if (ceil - 1) * st >= n + p[i] {
                    ceil - 1
                } else {
                    ceil
                };
                p[i + 2] += (ceil - floor) * st;
            }
        }
    }
    if !max && node.attr_i("count_include_pad", 0) == 0 && p.iter().any(|&v| v > 0) {
        return Err("AveragePool over padding without count_include_pad".into());
    }
    if h + p[0] + p[2] < kh || w + p[1] + p[3] < kw {
        return Err(format!(
            "a {kh}x{kw} pool over a {h}x{w} input padded by {p:?}"
        ));
    }
    let fill = if max { f32::NEG_INFINITY } else { 0.0 };
    let padded = pad_value(x, &[(2, p[0], p[2]), (3, p[1], p[3])], fill)?;
    if max {
        padded.max_pool2d_with_stride((kh, kw), (sh, sw)).map_err(e)
    } else {
        padded.avg_pool2d_with_stride((kh, kw), (sh, sw)).map_err(e)
    }
}

/// `x` padded with `value` (per axis: (axis, before, after)).
fn pad_value(x: &Tensor, pads: &[(usize, usize, usize)], value: f32) -> R<Tensor> {
    let mut y = x.clone();
    for &(a, before, after) in pads {
        if before == 0 && after == 0 {
            continue;
        }
        let mut parts = Vec::new();
        let mut dims = y.dims().to_vec();
        if before > 0 {
            dims[a] = before;
            parts.push(Tensor::full(value, dims.as_slice(), &Device::Cpu).map_err(e)?);
        }
        parts.push(y.clone());
        if after > 0 {
            dims[a] = after;
            parts.push(Tensor::full(value, dims.as_slice(), &Device::Cpu).map_err(e)?);
        }
        y = Tensor::cat(&parts, a).map_err(e)?;
    }
    Ok(y)
}

fn pad(node: &Node, ins: &[Option<&Tensor>]) -> R<Tensor> {
    let x = unary_f32(input(ins, 0, "data")?)?;
    let mode = node.attr_s("mode", "constant");
    if mode != "constant" {
        return Err(format!("Pad mode {mode} is not supported"));
    }
    let (pads, value) = if node.opset < 11 {
        (
            node.attr_ints("pads").ok_or("Pad without pads")?,
            node.attr_f("value", 0.0),
        )
    } else {
        (
            ints(input(ins, 1, "pads")?)?,
            opt(ins, 2)
                .map(floats)
                .transpose()?
                .and_then(|v| v.first().copied())
                .unwrap_or(0.0),
        )
    };
    let r = x.rank();
    if pads.len() != 2 * r || pads.iter().any(|&p| p < 0) {
        return Err(format!(
            "pads {pads:?} for rank {r} (non-negative expected)"
        ));
    }
    let spec: Vec<(usize, usize, usize)> = (0..r)
        .map(|a| (a, pads[a] as usize, pads[a + r] as usize))
        .collect();
    let mut grown = x.dims().to_vec();
    for &(a, b, f) in &spec {
        grown[a] += b + f;
    }
    check_count(&grown)?;
    pad_value(x, &spec, value)
}

/// Resize / Upsample in `nearest` mode (the mode exported upsampling layers use).
fn resize(node: &Node, ins: &[Option<&Tensor>]) -> R<Tensor> {
    let x = input(ins, 0, "X")?;
    let r = x.rank();
    let mode = node.attr_s("mode", "nearest");
    if mode != "nearest" {
        return Err(format!(
            "{} mode {mode} is not supported (nearest is)",
            node.op
        ));
    }
    let (scales, sizes) = if node.op == "Upsample" {
        let s = match opt(ins, 1) {
            Some(t) => floats(t)?,
            None => node
                .attrs
                .get("scales")
                .map(|a| a.floats.clone())
                .ok_or("Upsample without scales")?,
        };
        (Some(s), None)
    } else {
        let (si, zi) = if node.opset < 11 { (1, 99) } else { (2, 3) };
        let s = opt(ins, si)
            .map(floats)
            .transpose()?
            .filter(|s| !s.is_empty());
        let z = opt(ins, zi)
            .map(ints)
            .transpose()?
            .filter(|s| !s.is_empty());
        (s, z)
    };
    let (ctm, nearest) = if node.op == "Upsample" || node.opset < 11 {
        ("asymmetric".to_string(), "floor".to_string())
    } else {
        (
            node.attr_s("coordinate_transformation_mode", "half_pixel"),
            node.attr_s("nearest_mode", "round_prefer_floor"),
        )
    };
    let dims = x.dims().to_vec();
    let (out, scale): (Vec<usize>, Vec<f64>) = match (sizes, scales) {
        (Some(z), _) => {
            if z.len() != r {
                return Err(format!("sizes {z:?} for rank {r}"));
            }
            let out: Vec<usize> = z.iter().map(|&v| v.max(0) as usize).collect();
            let sc = out
                .iter()
                .zip(&dims)
                .map(|(&o, &i)| o as f64 / i.max(1) as f64)
                .collect();
            (out, sc)
        }
        (None, Some(s)) => {
            if s.len() != r || s.iter().any(|&v| v.is_nan() || v <= 0.0 || !v.is_finite()) {
                return Err(format!("scales {s:?} for rank {r}"));
            }
            let out = dims
                .iter()
                .zip(&s)
                .map(|(&i, &sc)| (i as f64 * sc as f64).floor() as usize)
                .collect();
            (out, s.iter().map(|&v| v as f64).collect())
        }
        _ => return Err(format!("{} without scales or sizes", node.op)),
    };
    check_count(&out)?;
    let mut y = x.clone();
    for a in 0..r {
        if out[a] == dims[a] && scale[a] == 1.0 {
            continue;
        }
        let (n_in, n_out, sc) = (dims[a] as f64, out[a], scale[a]);
        let idx: Vec<u32> = (0..n_out)
            .map(|o| {
                let o = o as f64;
                let src = match ctm.as_str() {
                    "asymmetric" => o / sc,
                    "align_corners" if n_out > 1 => o * (n_in - 1.0) / (n_out as f64 - 1.0),
                    "align_corners" => 0.0,
                    "pytorch_half_pixel" if n_out > 1 => (o + 0.5) / sc - 0.5,
                    "pytorch_half_pixel" => 0.0,
                    "tf_half_pixel_for_nn" => (o + 0.5) / sc,
                    _ => (o + 0.5) / sc - 0.5,
                };
                let i = match nearest.as_str() {
                    "floor" => src.floor(),
                    "ceil" => src.ceil(),
                    "round_prefer_ceil" => (src + 0.5).floor(),
                    _ => {
                        if src.fract() == 0.5 {
                            src.floor()
                        } else {
                            src.round()
                        }
                    }
                };
                i.clamp(0.0, n_in - 1.0) as u32
            })
            .collect();
        let ids = Tensor::new(idx.as_slice(), &Device::Cpu).map_err(e)?;
        y = y
            .contiguous()
            .and_then(|y| y.index_select(&ids, a))
            .map_err(e)?;
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reshape_follows_the_onnx_rules() {
        assert_eq!(
            reshape_dims(&[2, 3, 4], &[0, -1], false).unwrap(),
            vec![2, 12]
        );
        assert_eq!(
            reshape_dims(&[2, 3, 4], &[4, 0, 2], false).unwrap(),
            vec![4, 3, 2]
        );
        assert!(reshape_dims(&[2, 3, 4], &[5, -1], false).is_err());
        assert!(reshape_dims(&[2, 3, 4], &[-1, -1], false).is_err());
    }

    #[test]
    fn broadcasting_is_numpy_s() {
        assert_eq!(broadcast_shape(&[2, 1, 4], &[3, 1]).unwrap(), vec![2, 3, 4]);
        assert!(broadcast_shape(&[2, 3], &[4]).is_err());
    }
}
