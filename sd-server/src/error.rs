//! Errors as A1111 answers them: a status and a JSON body `{"error", "detail", "body", "errors"}`
//! (FastAPI's `HTTPException` handler), `detail` naming the field or value at fault.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub error: &'static str,
    pub detail: String,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, error: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            error,
            detail: detail.into(),
        }
    }

    /// A request the server cannot take as it is (a value out of range, an unknown name).
    pub fn bad(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "HTTPException", detail)
    }

    /// A body that is not what the route reads (A1111/FastAPI: 422).
    pub fn invalid(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "RequestValidationError",
            detail,
        )
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "HTTPException", detail)
    }

    pub fn not_implemented(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_IMPLEMENTED, "NotImplemented", detail)
    }

    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "RuntimeError", detail)
    }

    /// An error from the engine: the request's settings or inputs were refused (4xx), or the
    /// engine failed (500).
    pub fn engine(e: &sd::Error) -> Self {
        let text = e.to_string();
        match e {
            sd::Error::Tensor(_) | sd::Error::Hook(_) => Self::internal(text),
            _ => Self::bad(text),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": self.error,
            "detail": self.detail,
            "body": "",
            "errors": "",
        });
        (self.status, Json(body)).into_response()
    }
}
