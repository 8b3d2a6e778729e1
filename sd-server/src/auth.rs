//! `--api-auth user:pass[,user2:pass2]`: HTTP Basic on every route (A1111's `--api-auth`),
//! 401 with a `WWW-Authenticate` challenge otherwise, so browsers ask for the password.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;

use crate::error::ApiError;
use crate::state::AppState;

/// `user:pass[,user2:pass2]` as pairs; an entry without `:` or with an empty user is an error.
pub fn parse(spec: &str) -> Result<Vec<(String, String)>, String> {
    spec.split(',')
        .map(|pair| match pair.split_once(':') {
            Some((u, p)) if !u.is_empty() => Ok((u.to_string(), p.to_string())),
            _ => Err(format!(
                "--api-auth: {:?} is not user:password (pairs separated by commas)",
                pair
            )),
        })
        .collect()
}

fn allowed(st: &AppState, header: Option<&str>) -> bool {
    let Some(encoded) = header.and_then(|h| h.strip_prefix("Basic ")) else {
        return false;
    };
    let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
        return false;
    };
    let Ok(text) = String::from_utf8(bytes) else {
        return false;
    };
    let Some((user, pass)) = text.split_once(':') else {
        return false;
    };
    st.config
        .auth
        .iter()
        .any(|(u, p)| constant_time_eq(u, user) & constant_time_eq(p, pass))
}

/// Equal strings, in a time that does not depend on where they differ.
fn constant_time_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

pub async fn require(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if allowed(&st, given) {
        return next.run(req).await;
    }
    let mut res = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "HTTPException",
        "Incorrect username or password",
    )
    .into_response();
    res.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Basic realm=\"sdctl\""),
    );
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_pairs() {
        assert_eq!(
            parse("a:b,c:d:e").unwrap(),
            vec![("a".into(), "b".into()), ("c".into(), "d:e".into())]
        );
        assert!(parse("nopass").unwrap_err().contains("\"nopass\""));
        assert!(parse(":x").is_err());
        assert!(constant_time_eq("abc", "abc"));
        assert!(!constant_time_eq("abc", "abd"));
        assert!(!constant_time_eq("abc", "abcd"));
    }
}
