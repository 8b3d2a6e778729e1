//! Reading figment's values: numbers of any width, and a value described for messages.

use figment::value::{Num, Value};

/// An integer-typed number (any width, signed or not) as i64.
pub fn num_int(n: Num) -> Option<i64> {
    n.to_i128()
        .or_else(|| n.to_u128().and_then(|u| i128::try_from(u).ok()))
        .and_then(|i| i64::try_from(i).ok())
}

/// Any number as f64.
pub fn num_f64(n: Num) -> f64 {
    n.to_f64()
        .or_else(|| n.to_i128().map(|i| i as f64))
        .or_else(|| n.to_u128().map(|u| u as f64))
        .unwrap_or(f64::NAN)
}

/// A short description of a value's type and value, for messages.
pub fn describe(v: &Value) -> String {
    match v {
        Value::String(_, s) => format!("string {s:?}"),
        Value::Char(_, c) => format!("string {c:?}"),
        Value::Bool(_, b) => format!("boolean {b}"),
        Value::Num(_, n) => match num_int(*n) {
            Some(i) => format!("number {i}"),
            None => format!("number {}", sd_plugins_api::number::show(num_f64(*n))),
        },
        Value::Empty(..) => "nothing".into(),
        Value::Dict(..) => "a table".into(),
        Value::Array(..) => "a list".into(),
    }
}
