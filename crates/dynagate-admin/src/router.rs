//! Maps a request path to an endpoint and its allowed methods. Path segments are split
//! on `/` before percent-decoding, so an encoded `%2F` stays inside its segment.

use crate::errors::{ApiError, Flavor};
use http::Method;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/upstreams`
    Upstreams,
    /// `/v1/upstreams/{name}`
    Upstream(String),
    /// `/v1/upstreams/{name}/servers`
    Servers(String),
    /// `/v1/upstreams/{name}/servers/{address}`
    Server(String, String),
    /// `/v1/routes`
    Routes,
    /// `/v1/routes/{id}`
    Route(String),
    /// `/v1/revisions`
    Revisions,
    /// `/v1/revisions/{n}/rollback`
    Rollback(String),
    /// `/v1/status`
    Status,
    /// `/metrics` (Prometheus text)
    Metrics,
    /// `/v1/registry/services`: services, instances and checks for the dashboard
    RegistryServices,
    /// dyups `/detail`
    DyupsDetail,
    /// dyups `/list`
    DyupsList,
    /// dyups `/upstream/{name}`
    DyupsUpstream(String),
}

const GET: &[Method] = &[Method::GET];
const POST: &[Method] = &[Method::POST];
const GET_POST: &[Method] = &[Method::GET, Method::POST];
const GET_PATCH_DELETE: &[Method] = &[Method::GET, Method::PATCH, Method::DELETE];
const GET_PUT_DELETE: &[Method] = &[Method::GET, Method::PUT, Method::DELETE];
const GET_POST_DELETE: &[Method] = &[Method::GET, Method::POST, Method::DELETE];

impl Endpoint {
    pub fn allowed(&self) -> &'static [Method] {
        match self {
            Endpoint::Upstreams
            | Endpoint::Routes
            | Endpoint::Revisions
            | Endpoint::Status
            | Endpoint::Metrics
            | Endpoint::RegistryServices => GET,
            Endpoint::Upstream(_) | Endpoint::Route(_) => GET_PUT_DELETE,
            Endpoint::Servers(_) => GET_POST,
            Endpoint::Server(..) => GET_PATCH_DELETE,
            Endpoint::Rollback(_) => POST,
            Endpoint::DyupsDetail | Endpoint::DyupsList => GET,
            Endpoint::DyupsUpstream(_) => GET_POST_DELETE,
        }
    }

    pub fn flavor(&self) -> Flavor {
        match self {
            Endpoint::DyupsDetail
            | Endpoint::DyupsList
            | Endpoint::DyupsUpstream(_)
            | Endpoint::Metrics => Flavor::Text,
            _ => Flavor::Json,
        }
    }
}

/// The flavor of errors for a path that may not resolve: plain text for dyups paths.
pub fn flavor_of_path(path: &str) -> Flavor {
    if path.starts_with("/v1/") || path == "/v1" {
        Flavor::Json
    } else if path == "/detail"
        || path == "/list"
        || path == "/metrics"
        || path.starts_with("/upstream/")
    {
        Flavor::Text
    } else {
        Flavor::Json
    }
}

/// Resolves a request path (without the query). Unknown paths are 404; a segment that
/// is not valid percent-encoded UTF-8 is 400.
pub fn resolve(path: &str) -> Result<Endpoint, ApiError> {
    let not_found = || ApiError::not_found(format!("no such endpoint: {path}"));
    let raw: Vec<&str> = match path.strip_prefix('/') {
        Some(rest) => rest.split('/').collect(),
        None => return Err(not_found()),
    };
    if raw.iter().any(|s| s.is_empty()) {
        return Err(not_found());
    }
    let seg = |i: usize, what: &str| -> Result<String, ApiError> {
        percent_decode(raw[i])
            .map_err(|why| ApiError::bad_request(format!("{what} in path: {why}")))
    };
    let endpoint = match raw.as_slice() {
        ["v1", "upstreams"] => Endpoint::Upstreams,
        ["v1", "upstreams", _] => Endpoint::Upstream(seg(2, "upstream name")?),
        ["v1", "upstreams", _, "servers"] => Endpoint::Servers(seg(2, "upstream name")?),
        ["v1", "upstreams", _, "servers", _] => {
            Endpoint::Server(seg(2, "upstream name")?, seg(4, "server address")?)
        }
        ["v1", "routes"] => Endpoint::Routes,
        ["v1", "routes", _] => Endpoint::Route(seg(2, "route id")?),
        ["v1", "revisions"] => Endpoint::Revisions,
        ["v1", "revisions", _, "rollback"] => Endpoint::Rollback(seg(2, "revision")?),
        ["v1", "status"] => Endpoint::Status,
        ["metrics"] => Endpoint::Metrics,
        ["v1", "registry", "services"] => Endpoint::RegistryServices,
        ["detail"] => Endpoint::DyupsDetail,
        ["list"] => Endpoint::DyupsList,
        ["upstream", _] => Endpoint::DyupsUpstream(seg(1, "upstream name")?),
        _ => return Err(not_found()),
    };
    Ok(endpoint)
}

/// Decodes `%XX` escapes (`+` stays `+`). The result must be UTF-8 without control
/// characters.
pub fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("{s:?} has a malformed %-escape"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    let text = String::from_utf8(out).map_err(|_| format!("{s:?} does not decode to UTF-8"))?;
    if text.chars().any(char::is_control) {
        return Err(format!("{s:?} decodes to control characters"));
    }
    Ok(text)
}

/// The query string as decoded `(name, value)` pairs, checked against the parameters
/// an endpoint accepts: unknown or repeated parameters are refused.
pub fn parse_query(
    query: Option<&str>,
    accepted: &[&str],
) -> Result<Vec<(String, String)>, ApiError> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    let Some(query) = query else {
        return Ok(pairs);
    };
    for part in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = part.split_once('=').unwrap_or((part, ""));
        let name =
            percent_decode(name).map_err(|why| ApiError::bad_request(format!("query: {why}")))?;
        let value =
            percent_decode(value).map_err(|why| ApiError::bad_request(format!("{name}: {why}")))?;
        if !accepted.contains(&name.as_str()) {
            let hint = if accepted.is_empty() {
                "this call takes no query parameters".to_string()
            } else {
                format!("accepted: {}", accepted.join(", "))
            };
            return Err(ApiError::bad_request(format!(
                "{name}: unknown query parameter ({hint})"
            )));
        }
        if pairs.iter().any(|(n, _)| *n == name) {
            return Err(ApiError::bad_request(format!(
                "{name}: given more than once"
            )));
        }
        pairs.push((name, value));
    }
    Ok(pairs)
}

pub fn query_bool(pairs: &[(String, String)], name: &str) -> Result<bool, ApiError> {
    match pairs
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
    {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(ApiError::bad_request(format!(
            "{name}: {other:?} is not true or false"
        ))),
    }
}

pub fn query_u64(
    pairs: &[(String, String)],
    name: &str,
    default: u64,
    range: std::ops::RangeInclusive<u64>,
) -> Result<u64, ApiError> {
    let Some(text) = pairs
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
    else {
        return Ok(default);
    };
    let bad = || {
        ApiError::bad_request(format!(
            "{name}: {text:?} is not a number in range {}-{}",
            range.start(),
            range.end()
        ))
    };
    let n: u64 = text.parse().map_err(|_| bad())?;
    if !range.contains(&n) {
        return Err(bad());
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_paths() {
        assert_eq!(resolve("/v1/upstreams").unwrap(), Endpoint::Upstreams);
        assert_eq!(
            resolve("/v1/upstreams/shop/servers/%5B%3A%3A1%5D%3A80").unwrap(),
            Endpoint::Server("shop".into(), "[::1]:80".into())
        );
        assert_eq!(
            resolve("/v1/upstreams/shop/servers/[::1]:80").unwrap(),
            Endpoint::Server("shop".into(), "[::1]:80".into())
        );
        assert_eq!(
            resolve("/v1/revisions/7/rollback").unwrap(),
            Endpoint::Rollback("7".into())
        );
        assert_eq!(resolve("/v1/status").unwrap(), Endpoint::Status);
        assert_eq!(resolve("/metrics").unwrap(), Endpoint::Metrics);
        assert_eq!(Endpoint::Metrics.flavor(), Flavor::Text);
        assert_eq!(
            resolve("/upstream/a%2Fb").unwrap(),
            Endpoint::DyupsUpstream("a/b".into())
        );
        for missing in [
            "/",
            "",
            "/v1",
            "/v1/",
            "/v1/upstreams/",
            "/v1//upstreams",
            "/v2/upstreams",
            "/upstream",
        ] {
            assert_eq!(resolve(missing).unwrap_err().status, 404, "{missing}");
        }
        for bad in [
            "/v1/upstreams/%",
            "/v1/upstreams/%zz",
            "/v1/upstreams/%ff",
            "/v1/routes/%0a",
        ] {
            assert_eq!(resolve(bad).unwrap_err().status, 400, "{bad}");
        }
    }

    #[test]
    fn parses_queries() {
        let q = parse_query(Some("force=true"), &["force"]).unwrap();
        assert!(query_bool(&q, "force").unwrap());
        assert!(!query_bool(&[], "force").unwrap());
        let q = parse_query(Some("force=maybe"), &["force"]).unwrap();
        assert!(query_bool(&q, "force")
            .unwrap_err()
            .message
            .contains("force"));
        assert!(parse_query(Some("forse=true"), &["force"])
            .unwrap_err()
            .message
            .contains("forse"));
        assert!(parse_query(Some("force=true&force=false"), &["force"]).is_err());
        let q = parse_query(Some("limit=x"), &["limit"]).unwrap();
        assert!(query_u64(&q, "limit", 100, 1..=10)
            .unwrap_err()
            .message
            .contains("limit"));
        let q = parse_query(Some("limit=5"), &["limit"]).unwrap();
        assert_eq!(query_u64(&q, "limit", 100, 1..=10).unwrap(), 5);
        assert_eq!(query_u64(&[], "limit", 100, 1..=1000).unwrap(), 100);
    }
}
