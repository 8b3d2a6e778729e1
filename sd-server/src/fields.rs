//! Reading a request's JSON fields by name, as A1111's pydantic models do (numbers given as
//! strings are taken, `null` is the default), with errors that name the field and the value.

use serde_json::{Map, Value};

use crate::error::{ApiError, ApiResult};

/// The JSON body as an object; anything else is a 422 naming what came.
pub fn object(body: &[u8]) -> ApiResult<Map<String, Value>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(format!(
            "the request body is not JSON: {}",
            sd_plugins_api::config_text::short_message(&e.to_string(), 2)
        ))
    })?;
    match v {
        Value::Object(m) => Ok(m),
        other => Err(ApiError::invalid(format!(
            "the request body must be a JSON object, got {}",
            kind(&other)
        ))),
    }
}

pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A short rendering of a value for messages.
pub fn shown(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!("{}...", &s[..s.floor_char_boundary(57)])
    } else {
        s
    }
}

/// Fields of one JSON object, read with the object's name (`controlnet unit 1: weight`) in
/// every message.
pub struct Fields<'a> {
    pub map: &'a Map<String, Value>,
    pub prefix: String,
}

impl<'a> Fields<'a> {
    pub fn new(map: &'a Map<String, Value>) -> Self {
        Self {
            map,
            prefix: String::new(),
        }
    }

    pub fn named(map: &'a Map<String, Value>, prefix: impl Into<String>) -> Self {
        Self {
            map,
            prefix: prefix.into(),
        }
    }

    fn err(&self, key: &str, what: &str, v: &Value) -> ApiError {
        ApiError::invalid(format!(
            "{}{key}: expected {what}, got {}",
            self.prefix,
            shown(v)
        ))
    }

    pub fn name(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// The value, `None` when absent or null.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub fn float(&self, key: &str, default: f64) -> ApiResult<f64> {
        let Some(v) = self.get(key) else {
            return Ok(default);
        };
        let n = match v {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse::<f64>().ok(),
            Value::Bool(b) => Some(f64::from(u8::from(*b))),
            _ => None,
        };
        match n {
            Some(n) if n.is_finite() => Ok(n),
            _ => Err(self.err(key, "a finite number", v)),
        }
    }

    pub fn int(&self, key: &str, default: i64) -> ApiResult<i64> {
        let Some(v) = self.get(key) else {
            return Ok(default);
        };
        let n = match v {
            Value::Number(n) => n.as_i64().or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                    .map(|f| f as i64)
            }),
            Value::String(s) => s.trim().parse::<i64>().ok(),
            Value::Bool(b) => Some(i64::from(*b)),
            _ => None,
        };
        n.ok_or_else(|| self.err(key, "an integer", v))
    }

    /// An integer within `lo..=hi`, the message naming the field and the range.
    pub fn int_in(&self, key: &str, default: i64, lo: i64, hi: i64) -> ApiResult<i64> {
        let n = self.int(key, default)?;
        if (lo..=hi).contains(&n) {
            Ok(n)
        } else {
            Err(ApiError::bad(format!(
                "{}: must be an integer in [{lo}, {hi}], got {n}",
                self.name(key)
            )))
        }
    }

    pub fn float_in(&self, key: &str, default: f64, lo: f64, hi: f64) -> ApiResult<f64> {
        let n = self.float(key, default)?;
        sd_plugins_api::number::Range::closed(lo, hi)
            .check(n)
            .map_err(|m| ApiError::bad(format!("{}: {m}", self.name(key))))?;
        Ok(n)
    }

    pub fn string(&self, key: &str, default: &str) -> ApiResult<String> {
        match self.get(key) {
            None => Ok(default.to_string()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v @ Value::Number(_)) => Ok(v.to_string()),
            Some(v) => Err(self.err(key, "a string", v)),
        }
    }

    pub fn opt_string(&self, key: &str) -> ApiResult<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.string(key, "").map(Some),
        }
    }

    pub fn bool(&self, key: &str, default: bool) -> ApiResult<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(Value::Number(n)) if n.as_i64() == Some(0) => Ok(false),
            Some(Value::Number(n)) if n.as_i64() == Some(1) => Ok(true),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(true),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(false),
            Some(v) => Err(self.err(key, "true or false", v)),
        }
    }

    pub fn object(&self, key: &str) -> ApiResult<Option<&'a Map<String, Value>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(v) => Err(self.err(key, "an object", v)),
        }
    }

    pub fn list(&self, key: &str) -> ApiResult<&'a [Value]> {
        match self.get(key) {
            None => Ok(&[]),
            Some(Value::Array(a)) => Ok(a),
            Some(v) => Err(self.err(key, "a list", v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fields_take_what_pydantic_takes_and_name_what_they_refuse() {
        let v = json!({"steps": "20", "cfg": 7, "w": 64.0, "b": 1, "s": null, "bad": "x",
                       "inf": "inf", "big": 1e300});
        let m = v.as_object().unwrap();
        let f = Fields::named(m, "unit 0: ");
        assert_eq!(f.int("steps", 1).unwrap(), 20);
        assert_eq!(f.float("cfg", 1.0).unwrap(), 7.0);
        assert_eq!(f.int("w", 1).unwrap(), 64);
        assert!(f.bool("b", false).unwrap());
        assert_eq!(f.string("s", "dflt").unwrap(), "dflt");
        let e = f.int("bad", 1).unwrap_err();
        assert_eq!(e.detail, "unit 0: bad: expected an integer, got \"x\"");
        assert!(f.float("inf", 1.0).is_err());
        let e = f.int_in("big", 1, 1, 150).unwrap_err();
        assert!(
            e.detail.starts_with("unit 0: big: expected an integer"),
            "{}",
            e.detail
        );
        let e = f.int_in("steps", 1, 1, 10).unwrap_err();
        assert_eq!(
            e.detail,
            "unit 0: steps: must be an integer in [1, 10], got 20"
        );
        assert!(object(b"[1]").unwrap_err().detail.contains("a list"));
        assert!(object(b"{")
            .unwrap_err()
            .detail
            .starts_with("the request body is not JSON"));
        assert!(object(b"  ").unwrap().is_empty());
    }
}
