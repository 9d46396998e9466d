//! Reading request bodies: a 16 MiB cap (413 above, refused before reading when the
//! length is announced), a deadline for slow senders, and JSON decoding whose errors
//! name the field at fault.

use crate::errors::ApiError;
use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::StatusCode;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use std::time::Duration;

/// Largest accepted request body.
pub const MAX_BODY: usize = 16 * 1024 * 1024;
/// A client must send its whole body within this time.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("body: larger than the limit of {MAX_BODY} bytes"),
    )
}

/// Reads the whole body of a request.
pub async fn read_body(headers: &http::HeaderMap, body: Incoming) -> Result<Bytes, ApiError> {
    if let Some(len) = headers.get(CONTENT_LENGTH) {
        // hyper has already refused malformed lengths; this only short-cuts large ones.
        if len
            .to_str()
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .is_some_and(|n| n > MAX_BODY as u64)
        {
            return Err(too_large());
        }
    }
    let collect = Limited::new(body, MAX_BODY).collect();
    match tokio::time::timeout(BODY_TIMEOUT, collect).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!("body: not received within {}s", BODY_TIMEOUT.as_secs()),
        )),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(ApiError::bad_request(format!("body: {e}"))),
    }
}

/// Decodes a JSON body. Errors read `<path>: <serde message at line L column C>`, where
/// `<path>` is the field at fault (`servers[0].weight`) or `body` for the document itself.
/// The document must be a JSON object (serde would also take a struct from an array).
pub fn decode_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') | None => {}
        Some(_) => {
            let e = serde_json::from_slice::<serde::de::IgnoredAny>(body)
                .err()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default();
            return Err(ApiError::bad_request(format!(
                "body: expected a JSON object{e}"
            )));
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            ApiError::bad_request(format!("body: {inner}"))
        } else {
            ApiError::bad_request(format!("{path}: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::bad_request(format!("body: {e}")))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynagate_model::Upstream;

    #[test]
    fn json_errors_name_the_field() {
        let e = decode_json::<Upstream>(br#"{"servers":[{"address":"a:1","weight":"x"}]}"#)
            .unwrap_err();
        assert!(
            e.message.starts_with("servers[0].weight: invalid type"),
            "{}",
            e.message
        );
        let e = decode_json::<Upstream>(br#"{"servers":[],"bogus":1}"#).unwrap_err();
        assert!(e.message.contains("unknown field `bogus`"), "{}", e.message);
        let e = decode_json::<Upstream>(br#"{"servers":["#).unwrap_err();
        assert!(e.message.contains("line 1 column"), "{}", e.message);
        let e = decode_json::<Upstream>(b"").unwrap_err();
        assert!(e.message.starts_with("body: EOF"), "{}", e.message);
        let e = decode_json::<Upstream>(b" []").unwrap_err();
        assert_eq!(e.message, "body: expected a JSON object");
        let e = decode_json::<Upstream>(b"nul").unwrap_err();
        assert!(
            e.message
                .starts_with("body: expected a JSON object (EOF while parsing"),
            "{}",
            e.message
        );
        let e = decode_json::<Upstream>(br#"{} {}"#).unwrap_err();
        assert!(
            e.message.starts_with("body: trailing characters"),
            "{}",
            e.message
        );
        let e = decode_json::<Upstream>(br#"{"connect_timeout":"5 parsecs"}"#).unwrap_err();
        assert!(e.message.starts_with("connect_timeout: "), "{}", e.message);
    }
}
