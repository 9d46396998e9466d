//! HTTP plumbing: query strings, percent-decoding, responses with Consul's headers,
//! bodies with limits, and the token check.

use crate::ApiError;
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde::Serialize;

/// A response with its whole body: every registry answer has a known length.
pub(crate) type Resp = Response<Bytes>;

/// Decodes `%XX` escapes (and `+` as a space when `plus` is set). Fails on a bad escape
/// or a result that is not UTF-8.
pub(crate) fn percent_decode(s: &str, plus: bool) -> Option<String> {
    let b = s.as_bytes();
    if !(b.contains(&b'%') || (plus && b.contains(&b'+'))) {
        return Some(s.to_string());
    }
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b.get(i + 1..i + 3)?;
                let hi = (hex[0] as char).to_digit(16)?;
                let lo = (hex[1] as char).to_digit(16)?;
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            b'+' if plus => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// A parsed query string. Keys without `=` are present with an empty value (`?recurse`).
#[derive(Debug, Default)]
pub(crate) struct Query {
    pub(crate) pairs: Vec<(String, String)>,
}

impl Query {
    pub fn parse(raw: Option<&str>) -> Result<Query, ApiError> {
        let mut pairs = Vec::new();
        for part in raw.unwrap_or("").split('&') {
            if part.is_empty() {
                continue;
            }
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            let k = percent_decode(k, true)
                .ok_or_else(|| ApiError::bad_request("Invalid query string encoding"))?;
            let v = percent_decode(v, true)
                .ok_or_else(|| ApiError::bad_request("Invalid query string encoding"))?;
            pairs.push((k, v));
        }
        Ok(Query { pairs })
    }

    pub fn has(&self, key: &str) -> bool {
        self.pairs.iter().any(|(k, _)| k == key)
    }

    /// The first value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.pairs
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Consul's boolean flags: present with an empty value means true, otherwise a Go
    /// `strconv.ParseBool` value.
    pub fn flag(&self, key: &str) -> Result<bool, ApiError> {
        match self.get(key) {
            None => Ok(false),
            Some("") => Ok(true),
            Some(v) => parse_bool(v)
                .ok_or_else(|| ApiError::bad_request(format!("Invalid value for {key}: {v:?}"))),
        }
    }
}

/// Go's `strconv.ParseBool`.
pub(crate) fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

fn build(status: u16, content_type: Option<&'static str>, body: Bytes) -> Resp {
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Some(ct) = content_type {
        resp.headers_mut()
            .insert(http::header::CONTENT_TYPE, HeaderValue::from_static(ct));
    }
    resp
}

pub(crate) fn json<T: Serialize + ?Sized>(value: &T) -> Resp {
    match serde_json::to_vec(value) {
        Ok(v) => build(200, Some("application/json"), Bytes::from(v)),
        Err(e) => error(&ApiError::internal(format!(
            "encoding the response failed: {e}"
        ))),
    }
}

/// 200 with an empty body (successful agent writes).
pub(crate) fn empty_ok() -> Resp {
    build(200, None, Bytes::new())
}

pub(crate) fn raw(status: u16, content_type: Option<&'static str>, body: Bytes) -> Resp {
    build(status, content_type, body)
}

pub(crate) fn error(e: &ApiError) -> Resp {
    build(
        e.status,
        Some("text/plain; charset=utf-8"),
        Bytes::from(e.msg.clone()),
    )
}

pub(crate) fn method_not_allowed(method: &http::Method, allow: &'static str) -> Resp {
    let mut r = error(&ApiError::new(405, format!("method {method} not allowed")));
    r.headers_mut()
        .insert(http::header::ALLOW, HeaderValue::from_static(allow));
    r
}

/// Adds the blocking-query headers every read carries (404s too). hyper writes them in
/// Title-Case: `X-Consul-Index`, `X-Consul-Knownleader`, `X-Consul-Lastcontact`.
pub(crate) fn with_meta(mut r: Resp, index: u64) -> Resp {
    let h = r.headers_mut();
    h.insert("x-consul-index", HeaderValue::from(index.max(1)));
    h.insert("x-consul-knownleader", HeaderValue::from_static("true"));
    h.insert("x-consul-lastcontact", HeaderValue::from_static("0"));
    r
}

/// Reads a request body of at most `limit` bytes; over it, 413 with `too_large`.
/// Bytes of a too-large request body read and discarded so the 413 reaches the client.
const DRAIN_LIMIT: usize = 8 * 1024 * 1024;

pub(crate) async fn read_body<B>(
    body: B,
    limit: usize,
    too_large: impl FnOnce(Option<u64>) -> String,
    declared: Option<u64>,
) -> Result<Bytes, ApiError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    if declared.is_some_and(|n| n > limit as u64) {
        // Read a moderately oversized body to its end before answering: a server that
        // closes with unread data resets the connection, and the client may then lose
        // the 413 it was sent.
        if declared.is_some_and(|n| n <= (limit + DRAIN_LIMIT) as u64) {
            let _ = Limited::new(body, limit + DRAIN_LIMIT).collect().await;
        }
        return Err(ApiError::new(413, too_large(declared)));
    }
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(ApiError::new(413, too_large(declared)))
            } else {
                Err(ApiError::bad_request(format!(
                    "Failed to read the request body: {e}"
                )))
            }
        }
    }
}

/// Compares without an early exit, so the time taken does not reveal how much of a
/// guessed token was right.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0xff);
        diff |= x ^ y;
    }
    diff == 0
}

/// The token a request presents: `X-Consul-Token`, `Authorization: Bearer`, `?token=`.
pub(crate) fn request_token<'a>(headers: &'a http::HeaderMap, q: &'a Query) -> Option<&'a str> {
    if let Some(t) = headers
        .get("x-consul-token")
        .and_then(|v| v.to_str().ok())
        .filter(|t| !t.is_empty())
    {
        return Some(t);
    }
    if let Some(a) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let a = a.trim();
        if a.len() > 7 && a[..7].eq_ignore_ascii_case("bearer ") {
            return Some(a[7..].trim());
        }
    }
    q.get("token").filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing() {
        let q = Query::parse(Some("recurse&index=12&tag=a&tag=b%20c&x=1+2&passing")).unwrap();
        assert!(q.has("recurse"));
        assert_eq!(q.get("recurse"), Some(""));
        assert_eq!(q.get("index"), Some("12"));
        assert_eq!(q.all("tag").collect::<Vec<_>>(), ["a", "b c"]);
        assert_eq!(q.get("x"), Some("1 2"));
        assert!(q.flag("passing").unwrap());
        assert!(!q.flag("nope").unwrap());
        assert!(Query::parse(Some("a=%zz")).is_err());
        let q = Query::parse(Some("passing=false")).unwrap();
        assert!(!q.flag("passing").unwrap());
        let q = Query::parse(Some("passing=maybe")).unwrap();
        assert!(q.flag("passing").is_err());
    }

    #[test]
    fn path_decoding() {
        assert_eq!(percent_decode("a%2Fb%3A1", false).unwrap(), "a/b:1");
        assert_eq!(percent_decode("a+b", false).unwrap(), "a+b");
        assert!(percent_decode("%", false).is_none());
        assert!(percent_decode("%ff", false).is_none());
    }

    #[test]
    fn token_compare() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret1"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }
}
