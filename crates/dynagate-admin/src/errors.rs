//! Refusals and how they are written: `{"error":"..."}` on the JSON API, plain text on
//! the dyups API. Every message names what is wrong (a field, a parameter, a path part).

use bytes::Bytes;
use dynagate_proxy::ControlError;
use http::header::{HeaderValue, ALLOW, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{Method, Response, StatusCode};
use http_body_util::Full;

pub type Body = Full<Bytes>;

/// Which API a response belongs to, and so how it is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Json,
    Text,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Set on 405: the methods the path supports.
    pub allow: Option<&'static [Method]>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            allow: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "missing or invalid bearer token (send Authorization: Bearer <token from admin.token>)",
        )
    }

    pub fn method_not_allowed(method: &Method, allow: &'static [Method]) -> Self {
        ApiError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            message: format!(
                "method {method} is not allowed here; allowed: {}",
                allow_list(allow)
            ),
            allow: Some(allow),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    pub fn into_response(self, flavor: Flavor) -> Response<Body> {
        let mut resp = match flavor {
            Flavor::Json => {
                let body = serde_json::json!({ "error": self.message });
                json_response(self.status, &body)
            }
            Flavor::Text => text_response(self.status, format!("{}\n", self.message)),
        };
        if let Some(allow) = self.allow {
            if let Ok(v) = HeaderValue::from_str(&allow_list(allow)) {
                resp.headers_mut().insert(ALLOW, v);
            }
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"dynagate-admin\""),
            );
        }
        resp
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        // A full disk is logged by the store (a WARN at the first refusal), not per request.
        if status.is_server_error() && !e.disk_full() {
            tracing::error!(error = %e, "admin: command failed");
        }
        ApiError::new(status, e.to_string())
    }
}

impl From<dynagate_model::ModelError> for ApiError {
    fn from(e: dynagate_model::ModelError) -> Self {
        ControlError::from(e).into()
    }
}

pub fn allow_list(allow: &[Method]) -> String {
    allow
        .iter()
        .map(Method::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn json_response<T: serde::Serialize + ?Sized>(
    status: StatusCode,
    value: &T,
) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(mut bytes) => {
            bytes.push(b'\n');
            with_type(status, Bytes::from(bytes), "application/json")
        }
        Err(e) => {
            tracing::error!(error = %e, "admin: cannot serialize a response");
            with_type(
                StatusCode::INTERNAL_SERVER_ERROR,
                Bytes::from_static(b"{\"error\":\"cannot serialize the response\"}\n"),
                "application/json",
            )
        }
    }
}

pub fn text_response(status: StatusCode, text: impl Into<String>) -> Response<Body> {
    with_type(
        status,
        Bytes::from(text.into()),
        "text/plain; charset=utf-8",
    )
}

fn with_type(status: StatusCode, body: Bytes, content_type: &'static str) -> Response<Body> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}
