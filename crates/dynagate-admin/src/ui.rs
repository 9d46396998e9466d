//! The dashboard: plain HTML, CSS and JavaScript from `ui/`, embedded in the binary and
//! served at `/ui/` without a token. The files hold no data: every API call the page
//! makes carries `Authorization: Bearer <token>`, which the operator pastes into its
//! login form. `GET /` redirects to `/ui/`. See docs/dashboard.md.

use crate::errors::{ApiError, Body, Flavor};
use bytes::Bytes;
use http::header::{
    HeaderValue, CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH,
    LOCATION, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use http::{HeaderMap, Method, Response, StatusCode};
use http_body_util::Full;

/// Same origin only: no inline script or style, no other host, no framing, and no form
/// may submit anywhere (the login form is handled in script, so the token never lands
/// in a URL).
pub const CONTENT_SECURITY_POLICY_VALUE: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// Where the dashboard lives.
pub const PREFIX: &str = "/ui/";

struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
    etag: &'static str,
}

macro_rules! asset {
    ($name:literal, $type:literal) => {
        Asset {
            name: $name,
            content_type: $type,
            body: include_bytes!(concat!("../ui/", $name)),
            etag: {
                const HASH: u64 = fnv1a(include_bytes!(concat!("../ui/", $name)));
                const TEXT: [u8; 18] = etag_text(HASH);
                match std::str::from_utf8(&TEXT) {
                    Ok(s) => s,
                    Err(_) => panic!("etag is ASCII"),
                }
            },
        }
    };
}

const ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("app.js", "text/javascript; charset=utf-8"),
    asset!("style.css", "text/css; charset=utf-8"),
    asset!("favicon.svg", "image/svg+xml"),
];

const GET_HEAD: &[Method] = &[Method::GET, Method::HEAD];

/// 64-bit FNV-1a, computed at compile time for the `ETag` of each file.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// `"` + 16 hex digits + `"`.
const fn etag_text(hash: u64) -> [u8; 18] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [b'"'; 18];
    let mut i = 0;
    while i < 16 {
        out[1 + i] = HEX[((hash >> (60 - 4 * i)) & 0xf) as usize];
        i += 1;
    }
    out
}

/// The answer for a path that needs no token (`/`, `/ui`, `/ui/...`), or `None` when the
/// path belongs to the API and must be authenticated.
pub fn public(method: &Method, path: &str, headers: &HeaderMap) -> Option<Response<Body>> {
    let is_read = method == Method::GET || method == Method::HEAD;
    match path {
        // Other methods on `/` stay with the API (401 without a token, then 404).
        "/" if is_read => return Some(redirect(PREFIX)),
        "/" => return None,
        "/ui" if is_read => return Some(redirect(PREFIX)),
        _ => {}
    }
    let name = if path == "/ui" {
        ""
    } else {
        path.strip_prefix(PREFIX)?
    };
    if !is_read {
        return Some(ApiError::method_not_allowed(method, GET_HEAD).into_response(Flavor::Text));
    }
    let name = if name.is_empty() { "index.html" } else { name };
    let Some(asset) = ASSETS.iter().find(|a| a.name == name) else {
        return Some(
            ApiError::not_found(format!("no such dashboard file: {path}"))
                .into_response(Flavor::Text),
        );
    };
    Some(serve_asset(asset, headers))
}

fn serve_asset(asset: &Asset, headers: &HeaderMap) -> Response<Body> {
    let fresh = headers
        .get_all(IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| {
            let tag = tag.trim();
            tag == "*" || tag.trim_start_matches("W/") == asset.etag
        });
    let mut resp = if fresh {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        let mut r = Response::new(Full::new(Bytes::from_static(asset.body)));
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
        r
    };
    let h = resp.headers_mut();
    h.insert(ETAG, HeaderValue::from_static(asset.etag));
    secure_headers(h);
    resp
}

fn redirect(to: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::FOUND;
    let h = r.headers_mut();
    h.insert(LOCATION, HeaderValue::from_static(to));
    secure_headers(h);
    r
}

fn secure_headers(h: &mut HeaderMap) {
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY_VALUE),
    );
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::ALLOW;

    fn get(path: &str) -> Option<Response<Body>> {
        public(&Method::GET, path, &HeaderMap::new())
    }

    #[test]
    fn serves_the_files_with_their_headers() {
        for (path, ty) in [
            ("/ui/", "text/html; charset=utf-8"),
            ("/ui/index.html", "text/html; charset=utf-8"),
            ("/ui/app.js", "text/javascript; charset=utf-8"),
            ("/ui/style.css", "text/css; charset=utf-8"),
            ("/ui/favicon.svg", "image/svg+xml"),
        ] {
            let r = get(path).unwrap();
            assert_eq!(r.status(), 200, "{path}");
            assert_eq!(r.headers()[CONTENT_TYPE], ty, "{path}");
            assert_eq!(r.headers()[CACHE_CONTROL], "no-cache");
            assert_eq!(
                r.headers()[CONTENT_SECURITY_POLICY],
                CONTENT_SECURITY_POLICY_VALUE
            );
            assert_eq!(r.headers()[ETAG].len(), 18);
        }
    }

    #[test]
    fn redirects_and_refusals() {
        for path in ["/", "/ui"] {
            let r = get(path).unwrap();
            assert_eq!(r.status(), 302);
            assert_eq!(r.headers()[LOCATION], "/ui/");
        }
        assert!(public(&Method::POST, "/", &HeaderMap::new()).is_none());
        assert!(get("/v1/upstreams").is_none());
        assert!(get("/uix").is_none());
        assert_eq!(get("/ui/nope.js").unwrap().status(), 404);
        assert_eq!(get("/ui/../Cargo.toml").unwrap().status(), 404);
        let r = public(&Method::POST, "/ui/", &HeaderMap::new()).unwrap();
        assert_eq!(r.status(), 405);
        assert_eq!(r.headers()[ALLOW], "GET, HEAD");
    }

    #[test]
    fn answers_304_to_a_matching_etag() {
        let tag = get("/ui/app.js").unwrap().headers()[ETAG].clone();
        let mut h = HeaderMap::new();
        h.insert(IF_NONE_MATCH, tag);
        let r = public(&Method::GET, "/ui/app.js", &h).unwrap();
        assert_eq!(r.status(), 304);
        h.insert(IF_NONE_MATCH, HeaderValue::from_static("\"other\""));
        assert_eq!(
            public(&Method::GET, "/ui/app.js", &h).unwrap().status(),
            200
        );
    }

    #[test]
    fn etags_are_hex() {
        assert_eq!(&etag_text(0x0123_4567_89ab_cdef), b"\"0123456789abcdef\"");
        assert_ne!(fnv1a(b"a"), fnv1a(b"b"));
    }
}
