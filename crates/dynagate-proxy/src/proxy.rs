//! The life of one proxied request, phase by phase:
//!
//! 1. `screen`: refuse ambiguous or malformed requests (smuggling guards), targets
//!    other than origin-form or absolute http(s), invalid or conflicting hosts, paths
//!    that do not normalise; drop header names with `_`
//! 2. `route`: host + normalised path + method → route (404 if none)
//! 3. `select`: the balancer picks a server that takes new requests (503 if none)
//! 4. `upstream_request`: origin-form target (the normalised path unless the route
//!    forwards the original), hop-by-hop headers out, X-Forwarded-* in, Host
//! 5. `send`: pooled or new connection; retries on another server only when safe
//!    (nothing sent, or idempotent and nothing received)
//! 6. `response`: hop-by-hop headers out, body streamed back; the connection returns
//!    to the pool and the in-flight count ends when the body is done
//!
//! WebSocket and other upgrades take `proxy_upgrade`: the tunnel opens only after the
//! upstream answered 101.

use crate::access_log::{AccessLog, Entry};
use crate::body::{PendingLog, ProxyBody, Release, UpBody, UpstreamBody};
use crate::h1::io::UpConn;
use crate::pool::{self, Pool, Sender};
use crate::routing::normalize_host;
use crate::runtime::{InFlight, Pick, ServerRuntime, Snapshot, UpstreamRuntime};
use crate::uri::{normalize_path, validate_host};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;
use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

/// What every request handled by one worker thread shares.
pub struct Worker {
    pub snapshots: Arc<ArcSwap<Snapshot>>,
    /// hyper connections, for requests that arrive over HTTP/2.
    pub pool: Arc<Pool>,
    /// Raw connections of the HTTP/1 path (`crate::h1`).
    pub h1_pool: Pool<UpConn>,
    pub access_log: Option<Arc<AccessLog>>,
    pub counters: Arc<GlobalCounters>,
    /// Forward header names containing `_` (dropped otherwise: proxies that map `_` and
    /// `-` to the same CGI-style name would let a client forge a header behind them).
    pub underscores_in_headers: bool,
}

/// Requests that never reached an upstream, by cause (for metrics).
#[derive(Debug, Default)]
pub struct GlobalCounters {
    pub no_route: std::sync::atomic::AtomicU64,
    pub bad_request: std::sync::atomic::AtomicU64,
    pub no_server: std::sync::atomic::AtomicU64,
    pub retries: std::sync::atomic::AtomicU64,
}

/// What one request carries through its phases, for retries, metrics and the log.
struct Ctx<'a> {
    worker: &'a Worker,
    start: Instant,
    /// The route's number (for its counters), once routed.
    route: crate::stats::RouteNo,
    log: Option<Entry>,
}

impl Ctx<'_> {
    /// Logs a response dynagate wrote itself.
    fn finish(&mut self, resp: Response<ProxyBody>) -> Response<ProxyBody> {
        if let (Some(log), Some(mut entry)) = (&self.worker.access_log, self.log.take()) {
            entry.status = resp.status().as_u16();
            entry.bytes_sent = match resp.body() {
                ProxyBody::Full(Some(b)) => b.len() as u64,
                _ => 0,
            };
            entry.total_time = self.start.elapsed();
            log.log(entry);
        }
        resp
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Most attempts one request may make (first try + retries), whatever `retries` says.
pub(crate) const MAX_ATTEMPTS: usize = 21;
/// Pooled connections found closed when used are not the server's fault; bound them.
pub(crate) const MAX_STALE_CONNECTIONS: usize = 4;

pub fn error_response(status: StatusCode, message: impl Into<String>) -> Response<ProxyBody> {
    let mut text = message.into();
    text.push('\n');
    let mut resp = Response::new(ProxyBody::text(Bytes::from(text)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

pub async fn handle(
    worker: &Worker,
    client: &Client,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    let mut ctx = Ctx {
        worker,
        start: Instant::now(),
        route: crate::stats::RouteNo::MAX,
        log: worker
            .access_log
            .as_ref()
            .map(|_| log_entry(&req, client.addr)),
    };

    // 1. screen
    let (normalized_path, host_value) = match screen_request(&req) {
        Ok(screened) => screened,
        Err(why) => {
            worker.counters.bad_request.fetch_add(1, Ordering::Relaxed);
            return ctx.finish(error_response(StatusCode::BAD_REQUEST, why));
        }
    };
    if !worker.underscores_in_headers {
        drop_underscore_headers(req.headers_mut());
    }

    // 2. route
    let snapshot = worker.snapshots.load();
    let host = normalize_host(host_value.to_str().unwrap_or(""));
    let path = normalized_path.as_deref().unwrap_or(req.uri().path());
    let Some(route) = snapshot.routes.find(&host, path, req.method().as_str()) else {
        tracing::debug!(host = %host, path, "no route");
        worker.counters.no_route.fetch_add(1, Ordering::Relaxed);
        let resp = error_response(
            StatusCode::NOT_FOUND,
            format!("dynagate: no route for host {:?} path {:?}", &*host, path),
        );
        return ctx.finish(resp);
    };
    ctx.route = route.no;
    let Some(upstream) = snapshot.upstream_for(route).cloned() else {
        let resp = error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("dynagate: upstream {:?} does not exist", route.upstream),
        );
        return ctx.finish(resp);
    };
    if let Some(entry) = ctx.log.as_mut() {
        entry.route = Some(route.id.clone());
        entry.upstream = Some(route.upstream.clone());
    }
    let upgrade = is_upgrade(&req);
    let hash = match &upstream.spec.hash_key {
        Some(key) if upstream.hashes => hash_key(&req, client.addr, key),
        _ => None,
    };

    // 4. upstream_request (before selection: it does not depend on the server)
    let upstream_host = route.upstream_host_value.as_deref().cloned();
    let forward_path = normalized_path.filter(|_| !route.forward_original_path);
    drop(host);
    drop(snapshot);
    if let Err(why) = origin_form(req.uri_mut(), forward_path) {
        worker.counters.bad_request.fetch_add(1, Ordering::Relaxed);
        return ctx.finish(error_response(StatusCode::BAD_REQUEST, why));
    }
    upstream_request(&mut req, client, host_value, upstream_host, upgrade);

    if upgrade {
        return proxy_upgrade(&mut ctx, req, &upstream).await;
    }
    send(&mut ctx, req, &upstream, hash).await
}

fn log_entry(req: &Request<Incoming>, client: SocketAddr) -> Entry {
    Entry {
        time: std::time::SystemTime::now(),
        client: client.ip(),
        method: req.method().clone(),
        uri: req.uri().clone(),
        version: req.version(),
        host: req.headers().get(header::HOST).cloned(),
        status: 0,
        bytes_sent: 0,
        referer: req.headers().get(header::REFERER).cloned(),
        user_agent: req.headers().get(header::USER_AGENT).cloned(),
        route: None,
        upstream: None,
        upstream_addr: None,
        upstream_time: None,
        total_time: Duration::ZERO,
    }
}

/// The hash of the request key of `consistent_hash`; `None` when the request lacks it.
fn hash_key(req: &Request<Incoming>, client: SocketAddr, key: &str) -> Option<u64> {
    hash_key_with(
        key,
        client.ip(),
        |name| req.headers().get(name).map(HeaderValue::as_bytes),
        req.headers()
            .get_all(header::COOKIE)
            .iter()
            .map(HeaderValue::as_bytes),
        req.uri().query(),
        req.uri()
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/"),
    )
}

/// The hash of a `hash_key` (`header:NAME`, `cookie:NAME`, `arg:NAME`, `client_ip`,
/// `uri`), from views of the request both HTTP paths provide.
pub(crate) fn hash_key_with<'a>(
    key: &str,
    client: std::net::IpAddr,
    header: impl Fn(&str) -> Option<&'a [u8]>,
    mut cookies: impl Iterator<Item = &'a [u8]>,
    query: Option<&str>,
    uri: &str,
) -> Option<u64> {
    let value: std::borrow::Cow<'_, [u8]> = match key.split_once(':') {
        Some(("header", name)) => header(name)?.into(),
        Some(("cookie", name)) => cookies.find_map(|v| {
            std::str::from_utf8(v).ok()?.split(';').find_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                (k == name).then(|| v.as_bytes().to_vec().into())
            })
        })?,
        Some(("arg", name)) => query.and_then(|q| {
            q.split('&').find_map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k == name).then(|| v.as_bytes().to_vec().into())
            })
        })?,
        None if key == "client_ip" => client.to_string().into_bytes().into(),
        None if key == "uri" => uri.as_bytes().into(),
        _ => return None,
    };
    Some(crate::balance::hash64(&value))
}

/// Every refusal of phase 1. Returns the normalised path (`None` when the client's is
/// already normal) and the effective host.
fn screen_request<B>(req: &Request<B>) -> Result<(Option<String>, HeaderValue), Cow<'static, str>> {
    screen(req)?;
    screen_target(req)?;
    let normalized = match normalize_path(req.uri().path()) {
        Ok(Cow::Borrowed(_)) => None,
        Ok(Cow::Owned(path)) => Some(path),
        Err(why) => return Err(format!("dynagate: bad request: {why}").into()),
    };
    Ok((normalized, effective_host(req)?))
}

/// Refuses requests whose framing could be read two ways (request smuggling).
fn screen<B>(req: &Request<B>) -> Result<(), &'static str> {
    let headers = req.headers();
    if headers.contains_key(header::TRANSFER_ENCODING) {
        if headers.contains_key(header::CONTENT_LENGTH) {
            return Err("dynagate: bad request: both Content-Length and Transfer-Encoding");
        }
        if req.version() == Version::HTTP_10 {
            return Err("dynagate: bad request: Transfer-Encoding on HTTP/1.0");
        }
    }
    if headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .nth(1)
        .is_some()
    {
        return Err("dynagate: bad request: more than one Content-Length");
    }
    if headers.get_all(header::HOST).iter().nth(1).is_some() {
        return Err("dynagate: bad request: more than one Host");
    }
    Ok(())
}

/// Refuses request-targets other than origin-form (`/…`) or absolute `http(s)://…`:
/// `*`, a bare name, CONNECT's authority-form, other schemes.
fn screen_target<B>(req: &Request<B>) -> Result<(), &'static str> {
    if req.method() == Method::CONNECT {
        return Err("dynagate: bad request: CONNECT is not supported");
    }
    let uri = req.uri();
    if let Some(scheme) = uri.scheme_str() {
        if !(scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https")) {
            return Err("dynagate: bad request: scheme is not http or https");
        }
    }
    // The raw target, not `Uri::path()`, which reads `?q` as `/?q`.
    let target = uri.path_and_query().map_or("", PathAndQuery::as_str);
    if !target.starts_with('/') {
        return Err("dynagate: bad request: request-target is not origin-form or absolute-form");
    }
    Ok(())
}

/// The host the request is for: the authority (HTTP/2 `:authority`, or an absolute
/// target) if there is one, else the Host header; it must be a valid `host[:port]`. A
/// Host header differing from the authority is refused (RFC 9113 §8.3.1): routing on
/// one while the backend trusts the other is how a request reaches the wrong site.
fn effective_host<B>(req: &Request<B>) -> Result<HeaderValue, Cow<'static, str>> {
    let bad = |why: &str| Cow::Owned(format!("dynagate: bad request: {why}"));
    let host_header = req.headers().get(header::HOST);
    let Some(authority) = req.uri().authority() else {
        let host = host_header.ok_or(Cow::Borrowed(
            "dynagate: bad request: no :authority and no Host",
        ))?;
        validate_host(host.as_bytes()).map_err(bad)?;
        return Ok(host.clone());
    };
    validate_host(authority.as_str().as_bytes()).map_err(bad)?;
    if let Some(host) = host_header {
        let https = req
            .uri()
            .scheme_str()
            .is_some_and(|s| s.eq_ignore_ascii_case("https"));
        if !same_authority(authority.as_str().as_bytes(), host.as_bytes(), https) {
            return Err(Cow::Borrowed(
                "dynagate: bad request: Host differs from :authority",
            ));
        }
    }
    HeaderValue::from_str(authority.as_str()).map_err(|_| bad("invalid :authority"))
}

/// Whether two `host[:port]` values name the same authority: case-insensitively, with
/// the scheme's default port the same as none (RFC 3986 §6.2.3, scheme-based
/// normalisation, as RFC 9113 §8.3.1 asks of intermediaries).
fn same_authority(a: &[u8], b: &[u8], https: bool) -> bool {
    let default_port: &[u8] = if https { b":443" } else { b":80" };
    let a = a.strip_suffix(default_port).unwrap_or(a);
    let b = b.strip_suffix(default_port).unwrap_or(b);
    a.eq_ignore_ascii_case(b)
}

/// Removes header names containing `_` (see `Worker::underscores_in_headers`).
fn drop_underscore_headers(headers: &mut HeaderMap) {
    let has_underscore = |name: &HeaderName| name.as_str().as_bytes().contains(&b'_');
    // Nearly every request has none: one scan, no allocation.
    if !headers.keys().any(has_underscore) {
        return;
    }
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|n| has_underscore(n))
        .cloned()
        .collect();
    for name in names {
        headers.remove(&name);
    }
}

/// Makes `uri` origin-form (HTTP/2 requests arrive absolute) and, when given, puts the
/// normalised path in place of the client's, keeping the query as it came.
fn origin_form(uri: &mut Uri, normalized_path: Option<String>) -> Result<(), &'static str> {
    if uri.scheme().is_none() && uri.authority().is_none() && normalized_path.is_none() {
        return Ok(());
    }
    let mut parts = std::mem::take(uri).into_parts();
    parts.scheme = None;
    parts.authority = None;
    if let Some(path) = normalized_path {
        let target = match parts.path_and_query.as_ref().and_then(PathAndQuery::query) {
            Some(query) => format!("{path}?{query}"),
            None => path,
        };
        let target = PathAndQuery::try_from(target)
            .map_err(|_| "dynagate: bad request: normalised path is not a valid target")?;
        parts.path_and_query = Some(target);
    }
    *uri = Uri::from_parts(parts).map_err(|_| "dynagate: bad request: invalid request-target")?;
    Ok(())
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_has(req.headers(), "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

/// Headers a `Connection` token never removes: the message's Host and framing are not
/// the sender's to take away hop by hop (a `Connection: content-length` would otherwise
/// leave the next hop to guess where the body ends).
fn connection_may_not_name(name: &HeaderName) -> bool {
    name == header::HOST || name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING
}

/// Removes `Connection`, every header it names (except Host and the framing headers),
/// and the fixed hop-by-hop headers.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none: one pass of cheap comparisons instead of a hashed
    // removal per name.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Every Connection line counts, not only the first.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|name| !connection_may_not_name(name))
        .collect();
    for name in named {
        if !(keep_upgrade && name == header::UPGRADE) {
            headers.remove(&name);
        }
    }
    headers.remove(header::CONNECTION);
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    headers.remove(header::TE);
    headers.remove(header::TRAILER);
    headers.remove(header::TRANSFER_ENCODING);
    if !keep_upgrade {
        headers.remove(header::UPGRADE);
    }
}

/// The client end of a connection, with its address ready as a header value (made once
/// per connection, not per request).
#[derive(Debug, Clone)]
pub struct Client {
    pub addr: SocketAddr,
    pub ip_value: HeaderValue,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Client {
        let ip_value = HeaderValue::from_str(&addr.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Client { addr, ip_value }
    }
}

/// The upstream request's headers; `client_host` is the effective host (the authority
/// wins over a Host header, which `effective_host` made sure does not differ).
fn upstream_request(
    req: &mut Request<Incoming>,
    client: &Client,
    client_host: HeaderValue,
    upstream_host: Option<HeaderValue>,
    upgrade: bool,
) {
    *req.version_mut() = Version::HTTP_11;
    let headers = req.headers_mut();
    strip_hop_by_hop(headers, upgrade);
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.is_empty() => {
            HeaderValue::from_str(&format!("{prev}, {}", client.addr.ip())).ok()
        }
        _ => Some(client.ip_value.clone()),
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    headers.insert(X_REAL_IP.clone(), client.ip_value.clone());
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    headers.insert(header::HOST, client_host.clone());
    headers.insert(X_FORWARDED_HOST.clone(), client_host);
    if let Some(h) = upstream_host {
        headers.insert(header::HOST, h);
    }
}

pub(crate) fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS | Method::TRACE
    )
}

/// The parts needed to send a bodiless request again.
struct Replay {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

impl Replay {
    fn request(&self) -> Request<UpBody> {
        let mut req = Request::new(UpBody::Empty);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// Attempts on distinct servers, without allocating for the usual one or two.
pub(crate) struct Tried {
    list: [usize; MAX_ATTEMPTS],
    len: usize,
}

impl Default for Tried {
    fn default() -> Self {
        Tried {
            list: [0; MAX_ATTEMPTS],
            len: 0,
        }
    }
}

impl Tried {
    pub(crate) fn len(&self) -> usize {
        self.len
    }
    pub(crate) fn as_slice(&self) -> &[usize] {
        &self.list[..self.len]
    }
    pub(crate) fn push(&mut self, i: usize) {
        if self.len < MAX_ATTEMPTS {
            self.list[self.len] = i;
            self.len += 1;
        }
    }
}

pub(crate) enum Failure {
    Connect(String),
    Timeout,
    Upstream(String),
}

/// The answer when no attempt produced a response: the last failure, or no server
/// to try. The log entry names the server that failed.
pub(crate) fn unanswered(
    counters: &GlobalCounters,
    upstream: &UpstreamRuntime,
    last_failure: Option<(usize, Failure)>,
    log: Option<&mut Entry>,
) -> (StatusCode, String) {
    match last_failure {
        Some((index, failure)) => {
            let server = &upstream.servers[index];
            if let Some(e) = log {
                e.upstream_addr = Some(server.key.clone());
            }
            failure_message(upstream, &server.spec.address, failure)
        }
        None => {
            counters.no_server.fetch_add(1, Ordering::Relaxed);
            no_server_message(upstream)
        }
    }
}

/// The answer to a request no server could serve, logged.
fn failure_message(
    upstream: &UpstreamRuntime,
    server: &str,
    failure: Failure,
) -> (StatusCode, String) {
    let name = &upstream.spec.name;
    match failure {
        Failure::Connect(e) => {
            tracing::warn!(upstream = %name, server, error = %e, "upstream connect failed");
            (
                StatusCode::BAD_GATEWAY,
                format!("dynagate: cannot connect to upstream {name:?} server {server}: {e}"),
            )
        }
        Failure::Timeout => {
            tracing::warn!(upstream = %name, server, "upstream timed out");
            (
                StatusCode::GATEWAY_TIMEOUT,
                format!("dynagate: upstream {name:?} server {server} timed out"),
            )
        }
        Failure::Upstream(e) => {
            tracing::warn!(upstream = %name, server, error = %e, "upstream failed");
            (
                StatusCode::BAD_GATEWAY,
                format!("dynagate: upstream {name:?} server {server} failed: {e}"),
            )
        }
    }
}

fn no_server_message(upstream: &UpstreamRuntime) -> (StatusCode, String) {
    tracing::warn!(upstream = %upstream.spec.name, "no available server");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "dynagate: no available server in upstream {:?}",
            upstream.spec.name
        ),
    )
}

async fn send(
    ctx: &mut Ctx<'_>,
    req: Request<Incoming>,
    upstream: &Arc<UpstreamRuntime>,
    hash: Option<u64>,
) -> Response<ProxyBody> {
    let worker = ctx.worker;
    let spec = &upstream.spec;
    let (parts, body) = req.into_parts();
    let replayable = is_idempotent(&parts.method) && body.is_end_stream();
    // A copy to send again only where a retry can happen: another server to go to.
    let replay = (replayable && spec.retries > 0 && upstream.servers.len() > 1).then(|| Replay {
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        headers: parts.headers.clone(),
    });
    let mut pending = Some(Request::from_parts(parts, UpBody::Client(body)));
    let mut tried = Tried::default();
    let mut stale = 0;
    let max_attempts = (spec.retries as usize + 1).min(MAX_ATTEMPTS);
    let mut last_failure: Option<(usize, Failure)> = None;

    while tried.len < max_attempts {
        // 3. select
        let Some(index) = upstream.select(&Pick {
            tried: tried.as_slice(),
            hash,
        }) else {
            break;
        };
        let server = &upstream.servers[index];
        let Some(req) = pending.take() else { break };
        if tried.len > 0 {
            worker.counters.retries.fetch_add(1, Ordering::Relaxed);
        }

        // 5. send
        let sent_at = Instant::now();
        // Counted from selection on, so concurrent selections (least_conn, local_first
        // saturation) see a request that is still connecting.
        let in_flight = InFlight::start(&server.stats);
        let (mut sender, reused) = match worker.pool.checkout(&server.key).await {
            Some(s) => (s, true),
            None => match pool::connect(&server.target, spec.connect_timeout, false).await {
                Ok(s) => (s, false),
                Err(e) => {
                    // Nothing was sent: any method may go to the next server.
                    upstream.record_failure(index);
                    tried.push(index);
                    pending = Some(req);
                    last_failure = Some((index, Failure::Connect(e.to_string())));
                    continue;
                }
            },
        };
        let result = tokio::time::timeout(spec.read_timeout, sender.try_send_request(req)).await;
        match result {
            Ok(Ok(resp)) => {
                let status = resp.status().as_u16();
                let elapsed = sent_at.elapsed();
                server.stats.record_response(
                    ctx.route,
                    status,
                    elapsed.as_micros() as u64,
                    upstream.balance == dynagate_model::Balance::P2cEwma,
                );
                if status >= 500 {
                    upstream.record_outlier_failure(index);
                } else {
                    server.stats.record_success();
                }
                // 6. response
                let max_idle = spec.keepalive as usize;
                return response(
                    ctx,
                    resp,
                    server,
                    sender,
                    in_flight,
                    max_idle,
                    spec.read_timeout,
                    elapsed,
                );
            }
            Ok(Err(mut err)) => {
                if let Some(req) = err.take_message() {
                    // The connection died before the request was written: not the
                    // server's fault, and safe to send again.
                    pending = Some(req);
                    if reused && stale < MAX_STALE_CONNECTIONS {
                        stale += 1;
                        continue;
                    }
                    upstream.record_failure(index);
                    tried.push(index);
                    last_failure = Some((index, Failure::Upstream(err.error().to_string())));
                    continue;
                }
                upstream.record_failure(index);
                tried.push(index);
                last_failure = Some((index, Failure::Upstream(err.error().to_string())));
                // Sent: only an idempotent request with no body may go again, since
                // nothing of the response arrived.
                match &replay {
                    Some(r) => pending = Some(r.request()),
                    None => break,
                }
            }
            Err(_) => {
                upstream.record_failure(index);
                last_failure = Some((index, Failure::Timeout));
                break;
            }
        }
    }
    let (status, message) = unanswered(&worker.counters, upstream, last_failure, ctx.log.as_mut());
    let resp = error_response(status, message);
    ctx.finish(resp)
}

#[allow(clippy::too_many_arguments)]
fn response(
    ctx: &mut Ctx<'_>,
    resp: Response<Incoming>,
    server: &ServerRuntime,
    sender: Sender,
    in_flight: InFlight,
    max_idle: usize,
    read_timeout: Duration,
    upstream_time: Duration,
) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    let release = Release {
        pool: ctx.worker.pool.clone(),
        key: server.key.clone(),
        sender,
        max_idle,
    };
    let log = pending_log(ctx, server, parts.status.as_u16(), upstream_time);
    let body = UpstreamBody::new(
        body,
        Some(release),
        in_flight,
        server.stats.clone(),
        read_timeout,
        log,
    );
    Response::from_parts(parts, ProxyBody::Upstream(body))
}

fn pending_log(
    ctx: &mut Ctx<'_>,
    server: &ServerRuntime,
    status: u16,
    upstream_time: Duration,
) -> Option<Box<PendingLog>> {
    let log = ctx.worker.access_log.as_ref();
    PendingLog::answered(
        log,
        &mut ctx.log,
        ctx.start,
        &server.key,
        status,
        upstream_time,
    )
}

/// WebSocket (or any HTTP/1.1 upgrade): a dedicated upstream connection; the client's
/// connection is switched only once the upstream answered 101.
async fn proxy_upgrade(
    ctx: &mut Ctx<'_>,
    mut req: Request<Incoming>,
    upstream: &Arc<UpstreamRuntime>,
) -> Response<ProxyBody> {
    let spec = &upstream.spec;
    let client_upgrade = hyper::upgrade::on(&mut req);
    let mut tried = Tried::default();
    let max_attempts = (spec.retries as usize + 1).min(MAX_ATTEMPTS);
    let mut last_failure = None;
    let (parts, body) = req.into_parts();
    let mut pending = Some(Request::from_parts(parts, UpBody::Client(body)));
    while tried.len < max_attempts {
        let Some(index) = upstream.select(&Pick {
            tried: tried.as_slice(),
            hash: None,
        }) else {
            break;
        };
        let server = &upstream.servers[index];
        let Some(req) = pending.take() else { break };
        let sent_at = Instant::now();
        // Counted from selection on, so concurrent selections (least_conn, local_first
        // saturation) see a request that is still connecting.
        let in_flight = InFlight::start(&server.stats);
        let mut sender = match pool::connect(&server.target, spec.connect_timeout, true).await {
            Ok(s) => s,
            Err(e) => {
                upstream.record_failure(index);
                tried.push(index);
                pending = Some(req);
                last_failure = Some((index, Failure::Connect(e.to_string())));
                continue;
            }
        };
        let mut resp = match tokio::time::timeout(spec.read_timeout, sender.send_request(req)).await
        {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => {
                upstream.record_failure(index);
                last_failure = Some((index, Failure::Upstream(e.to_string())));
                break;
            }
            Err(_) => {
                upstream.record_failure(index);
                last_failure = Some((index, Failure::Timeout));
                break;
            }
        };
        let elapsed = sent_at.elapsed();
        server.stats.record_response(
            ctx.route,
            resp.status().as_u16(),
            elapsed.as_micros() as u64,
            upstream.balance == dynagate_model::Balance::P2cEwma,
        );
        server.stats.record_success();
        let log = pending_log(ctx, server, resp.status().as_u16(), elapsed);
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            // No switch: an ordinary response, and the client connection stays HTTP.
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers, false);
            let body = UpstreamBody::new(
                body,
                None,
                in_flight,
                server.stats.clone(),
                spec.read_timeout,
                log,
            );
            return Response::from_parts(parts, ProxyBody::Upstream(body));
        }
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let (mut parts, _body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, true);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        let name = spec.name.clone();
        tokio::spawn(async move {
            let _in_flight = in_flight;
            let mut sent = 0;
            match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok((client_io, upstream_io)) => {
                    let mut client_io = TokioIo::new(client_io);
                    let mut upstream_io = TokioIo::new(upstream_io);
                    if let Ok((_, down)) =
                        tokio::io::copy_bidirectional(&mut client_io, &mut upstream_io).await
                    {
                        sent = down;
                    }
                }
                Err(e) => tracing::debug!(upstream = %name, error = %e, "upgrade failed"),
            }
            // The tunnel is logged when it closes.
            if let Some(log) = log {
                log.emit(sent);
            }
        });
        return Response::from_parts(parts, ProxyBody::empty());
    }
    let (status, message) = unanswered(
        &ctx.worker.counters,
        upstream,
        last_failure,
        ctx.log.as_mut(),
    );
    let resp = error_response(status, message);
    ctx.finish(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str, host: Option<&str>) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header(header::HOST, h);
        }
        b.body(()).unwrap()
    }

    fn refusal(req: &Request<()>) -> String {
        screen_request(req).unwrap_err().into_owned()
    }

    #[test]
    fn targets_other_than_origin_or_absolute_http_are_refused() {
        for target in ["*", "ftp://a.example/x"] {
            let why = refusal(&request(target, Some("a.example")));
            assert!(why.starts_with("dynagate: bad request:"), "{target}: {why}");
        }
        // hyper's h2 server hands over any `:path` `http` parses: `*` and a bare `?q`.
        let bare = |target: &'static str| {
            let mut parts = http::uri::Parts::default();
            parts.path_and_query = Some(PathAndQuery::from_static(target));
            Request::builder()
                .uri(Uri::from_parts(parts).unwrap())
                .header(header::HOST, "a.example")
                .body(())
                .unwrap()
        };
        assert!(refusal(&bare("*")).contains("not origin-form"));
        assert!(refusal(&bare("?q")).contains("not origin-form"));
        let connect = Request::builder()
            .method(Method::CONNECT)
            .uri("a.example:443")
            .body(())
            .unwrap();
        assert!(refusal(&connect).contains("CONNECT"));
        assert!(screen_request(&request("/x", Some("a.example"))).is_ok());
        assert!(screen_request(&request("https://a.example/x", None)).is_ok());
    }

    #[test]
    fn paths_that_do_not_normalise_are_refused_naming_why() {
        let why = refusal(&request("http://a.example/a/../../x", None));
        assert_eq!(why, "dynagate: bad request: path climbs above the root");
        let why = refusal(&request("/%zz", Some("a.example")));
        assert_eq!(
            why,
            "dynagate: bad request: invalid percent-encoding in path"
        );
    }

    #[test]
    fn the_normalised_path_is_returned_only_when_it_differs() {
        let (path, _) = screen_request(&request("http://a.example/p/./x?q=./", None)).unwrap();
        assert_eq!(path.as_deref(), Some("/p/x"));
        let (path, _) = screen_request(&request("http://a.example/p/x?q=./", None)).unwrap();
        assert_eq!(path, None);
    }

    #[test]
    fn the_authority_is_the_host_and_a_differing_host_header_is_refused() {
        let host = |uri: &str, h: Option<&str>| screen_request(&request(uri, h)).map(|s| s.1);
        assert_eq!(host("http://a.example/", None).unwrap(), "a.example");
        assert_eq!(host("/", Some("b.example")).unwrap(), "b.example");
        // Same authority: case and the scheme's default port do not matter.
        assert_eq!(
            host("http://a.example/", Some("A.Example:80")).unwrap(),
            "a.example"
        );
        assert_eq!(
            host("https://a.example:443/", Some("a.example")).unwrap(),
            "a.example:443"
        );
        for (uri, h) in [
            ("http://a.example/", "b.example"),
            ("http://a.example/", "a.example:8080"),
            ("https://a.example/", "a.example:80"),
        ] {
            let why = host(uri, Some(h)).unwrap_err();
            assert_eq!(
                why, "dynagate: bad request: Host differs from :authority",
                "{uri} {h}"
            );
        }
    }

    #[test]
    fn invalid_or_missing_hosts_are_refused() {
        let why = |uri: &str, h: Option<&str>| refusal(&request(uri, h));
        assert_eq!(
            why("http://a..b/", None),
            "dynagate: bad request: .. in host"
        );
        assert_eq!(
            why("http://u@a.example/", None),
            "dynagate: bad request: invalid character in host"
        );
        assert_eq!(
            why("http://a.example:99999/", None),
            "dynagate: bad request: port above 65535 in host"
        );
        assert_eq!(
            why("/", Some("a b")),
            "dynagate: bad request: invalid character in host"
        );
        assert_eq!(why("/", Some("")), "dynagate: bad request: empty host");
        assert_eq!(
            why("/", None),
            "dynagate: bad request: no :authority and no Host"
        );
    }

    #[test]
    fn connection_tokens_never_remove_host_or_framing_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a.example"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-other", HeaderValue::from_static("1"));
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("Host, content-length, x-secret"),
        );
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("transfer-encoding, x-other"),
        );
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h[header::HOST], "a.example");
        assert_eq!(h[header::CONTENT_LENGTH], "5");
        // Every Connection line is read, not only the first.
        assert!(!h.contains_key("x-secret") && !h.contains_key("x-other"));
        assert!(!h.contains_key(header::CONNECTION));
    }

    #[test]
    fn header_names_with_underscores_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert("x_user", HeaderValue::from_static("admin"));
        h.append("x_user", HeaderValue::from_static("root"));
        h.insert("x-user", HeaderValue::from_static("guest"));
        drop_underscore_headers(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-user"], "guest");
    }

    #[test]
    fn origin_form_puts_the_normalised_path_before_the_query_as_it_came() {
        let mut uri: Uri = "http://a.example/p/./x?q=%2e%2E/../&r".parse().unwrap();
        origin_form(&mut uri, Some("/p/x".into())).unwrap();
        assert_eq!(uri, "/p/x?q=%2e%2E/../&r");
        let mut uri: Uri = "http://a.example/p/./x?q".parse().unwrap();
        origin_form(&mut uri, None).unwrap();
        assert_eq!(uri, "/p/./x?q");
        let mut uri: Uri = "/p/x".parse().unwrap();
        origin_form(&mut uri, Some("/p/y".into())).unwrap();
        assert_eq!(uri, "/p/y");
    }
}
