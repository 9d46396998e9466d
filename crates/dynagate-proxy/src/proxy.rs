//! The life of one proxied request, phase by phase:
//!
//! 1. `screen`: refuse ambiguous or malformed requests (smuggling guards)
//! 2. `route`: host + path + method → route (404 if none)
//! 3. `select`: the balancer picks a server that takes new requests (503 if none)
//! 4. `upstream_request`: hop-by-hop headers out, X-Forwarded-* in, Host
//! 5. `send`: pooled or new connection; retries on another server only when safe
//!    (nothing sent, or idempotent and nothing received)
//! 6. `response`: hop-by-hop headers out, body streamed back; the connection returns
//!    to the pool and the in-flight count ends when the body is done
//!
//! WebSocket and other upgrades take `proxy_upgrade`: the tunnel opens only after the
//! upstream answered 101.

use crate::body::{ProxyBody, Release, UpBody, UpstreamBody};
use crate::pool::{self, Pool, Sender};
use crate::routing::normalize_host;
use crate::runtime::{InFlight, ServerRuntime, Snapshot, UpstreamRuntime};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// What every request handled by one worker thread shares.
pub struct Worker {
    pub snapshots: Arc<ArcSwap<Snapshot>>,
    pub pool: Arc<Pool>,
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Most attempts one request may make (first try + retries), whatever `retries` says.
const MAX_ATTEMPTS: usize = 21;
/// Pooled connections found closed when used are not the server's fault; bound them.
const MAX_STALE_CONNECTIONS: usize = 4;

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
    client: SocketAddr,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    // 1. screen
    if let Err(why) = screen(&req) {
        return error_response(StatusCode::BAD_REQUEST, why);
    }

    // 2. route
    let snapshot = worker.snapshots.load();
    let raw_host = request_host(&req);
    let host = normalize_host(raw_host.as_deref().unwrap_or(""));
    let Some(route) = snapshot
        .routes
        .find(&host, req.uri().path(), req.method().as_str())
    else {
        tracing::debug!(host = %host, path = req.uri().path(), "no route");
        return error_response(
            StatusCode::NOT_FOUND,
            format!(
                "dynagate: no route for host {:?} path {:?}",
                &*host,
                req.uri().path()
            ),
        );
    };
    let Some(upstream) = snapshot.upstreams.get(&route.upstream).cloned() else {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("dynagate: upstream {:?} does not exist", route.upstream),
        );
    };
    let upgrade = is_upgrade(&req);

    // 4. upstream_request (before selection: it does not depend on the server)
    let forwarded_host = raw_host.map(|h| h.into_owned());
    upstream_request(
        &mut req,
        client,
        forwarded_host.as_deref(),
        route.upstream_host.as_deref(),
        upgrade,
    );
    drop(snapshot);

    if upgrade {
        return proxy_upgrade(req, &upstream).await;
    }
    send(worker, req, &upstream).await
}

/// Refuses requests whose framing could be read two ways (request smuggling).
fn screen(req: &Request<Incoming>) -> Result<(), &'static str> {
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

fn request_host(req: &Request<Incoming>) -> Option<std::borrow::Cow<'_, str>> {
    if let Some(h) = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
    {
        return Some(std::borrow::Cow::Borrowed(h));
    }
    req.uri()
        .authority()
        .map(|a| std::borrow::Cow::Borrowed(a.as_str()))
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

/// Removes `Connection`, every header it names, and the fixed hop-by-hop headers.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    if let Some(conn) = headers.get(header::CONNECTION) {
        let named: Vec<HeaderName> = conn
            .to_str()
            .unwrap_or("")
            .split(',')
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in named {
            if !(keep_upgrade && name == header::UPGRADE) {
                headers.remove(&name);
            }
        }
        headers.remove(header::CONNECTION);
    }
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    headers.remove(header::TE);
    headers.remove(header::TRAILER);
    headers.remove(header::TRANSFER_ENCODING);
    if !keep_upgrade {
        headers.remove(header::UPGRADE);
    }
}

fn upstream_request(
    req: &mut Request<Incoming>,
    client: SocketAddr,
    client_host: Option<&str>,
    upstream_host: Option<&str>,
    upgrade: bool,
) {
    // Origin-form target; HTTP/2 requests arrive in absolute form.
    if req.uri().scheme().is_some() || req.uri().authority().is_some() {
        let pq = req
            .uri()
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/");
        if let Ok(uri) = pq.parse::<Uri>() {
            *req.uri_mut() = uri;
        }
    }
    *req.version_mut() = Version::HTTP_11;
    let headers = req.headers_mut();
    strip_hop_by_hop(headers, upgrade);
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let ip = client.ip().to_string();
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.is_empty() => format!("{prev}, {ip}"),
        _ => ip.clone(),
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    if let Ok(v) = HeaderValue::from_str(&ip) {
        headers.insert(X_REAL_IP.clone(), v);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    if let Some(h) = client_host.and_then(|h| HeaderValue::from_str(h).ok()) {
        headers.insert(X_FORWARDED_HOST.clone(), h.clone());
        if !headers.contains_key(header::HOST) {
            headers.insert(header::HOST, h);
        }
    }
    if let Some(h) = upstream_host.and_then(|h| HeaderValue::from_str(h).ok()) {
        headers.insert(header::HOST, h);
    }
}

fn is_idempotent(method: &Method) -> bool {
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
struct Tried {
    list: [usize; MAX_ATTEMPTS],
    len: usize,
}

impl Tried {
    fn as_slice(&self) -> &[usize] {
        &self.list[..self.len]
    }
    fn push(&mut self, i: usize) {
        if self.len < MAX_ATTEMPTS {
            self.list[self.len] = i;
            self.len += 1;
        }
    }
}

enum Failure {
    Connect(String),
    Timeout,
    Upstream(String),
}

fn failure_response(
    upstream: &UpstreamRuntime,
    server: &str,
    failure: Failure,
) -> Response<ProxyBody> {
    let name = &upstream.spec.name;
    match failure {
        Failure::Connect(e) => {
            tracing::warn!(upstream = %name, server, error = %e, "upstream connect failed");
            error_response(
                StatusCode::BAD_GATEWAY,
                format!("dynagate: cannot connect to upstream {name:?} server {server}: {e}"),
            )
        }
        Failure::Timeout => {
            tracing::warn!(upstream = %name, server, "upstream timed out");
            error_response(
                StatusCode::GATEWAY_TIMEOUT,
                format!("dynagate: upstream {name:?} server {server} timed out"),
            )
        }
        Failure::Upstream(e) => {
            tracing::warn!(upstream = %name, server, error = %e, "upstream failed");
            error_response(
                StatusCode::BAD_GATEWAY,
                format!("dynagate: upstream {name:?} server {server} failed: {e}"),
            )
        }
    }
}

fn no_server(upstream: &UpstreamRuntime) -> Response<ProxyBody> {
    tracing::warn!(upstream = %upstream.spec.name, "no available server");
    error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "dynagate: no available server in upstream {:?}",
            upstream.spec.name
        ),
    )
}

async fn send(
    worker: &Worker,
    req: Request<Incoming>,
    upstream: &Arc<UpstreamRuntime>,
) -> Response<ProxyBody> {
    let spec = &upstream.spec;
    let (parts, body) = req.into_parts();
    let replayable = is_idempotent(&parts.method) && body.is_end_stream();
    let replay = (replayable && spec.retries > 0).then(|| Replay {
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        headers: parts.headers.clone(),
    });
    let mut pending = Some(Request::from_parts(parts, UpBody::Client(body)));
    let mut tried = Tried {
        list: [0; MAX_ATTEMPTS],
        len: 0,
    };
    let mut stale = 0;
    let max_attempts = (spec.retries as usize + 1).min(MAX_ATTEMPTS);
    let mut last_failure: Option<(usize, Failure)> = None;

    while tried.len < max_attempts {
        // 3. select_server
        let Some(index) = upstream.select(tried.as_slice()) else {
            break;
        };
        let server = &upstream.servers[index];
        let Some(req) = pending.take() else { break };

        // 5. send
        let (mut sender, reused) = match worker.pool.checkout(&server.key).await {
            Some(s) => (s, true),
            None => match pool::connect(&server.target, spec.connect_timeout, false).await {
                Ok(s) => (s, false),
                Err(e) => {
                    // Nothing was sent: any method may go to the next server.
                    server
                        .stats
                        .record_failure(spec.max_fails, spec.fail_timeout.as_millis() as u64);
                    tried.push(index);
                    pending = Some(req);
                    last_failure = Some((index, Failure::Connect(e.to_string())));
                    continue;
                }
            },
        };
        let in_flight = InFlight::start(&server.stats);
        let result = tokio::time::timeout(spec.read_timeout, sender.try_send_request(req)).await;
        match result {
            Ok(Ok(resp)) => {
                server.stats.record_success();
                // 6. response
                return response(
                    worker,
                    resp,
                    server,
                    sender,
                    in_flight,
                    spec.keepalive as usize,
                    spec.read_timeout,
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
                    server
                        .stats
                        .record_failure(spec.max_fails, spec.fail_timeout.as_millis() as u64);
                    tried.push(index);
                    last_failure = Some((index, Failure::Upstream(err.error().to_string())));
                    continue;
                }
                server
                    .stats
                    .record_failure(spec.max_fails, spec.fail_timeout.as_millis() as u64);
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
                server
                    .stats
                    .record_failure(spec.max_fails, spec.fail_timeout.as_millis() as u64);
                last_failure = Some((index, Failure::Timeout));
                break;
            }
        }
    }
    match last_failure {
        Some((index, failure)) => {
            failure_response(upstream, &upstream.servers[index].spec.address, failure)
        }
        None => no_server(upstream),
    }
}

fn response(
    worker: &Worker,
    resp: Response<Incoming>,
    server: &ServerRuntime,
    sender: Sender,
    in_flight: InFlight,
    max_idle: usize,
    read_timeout: Duration,
) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    let release = Release {
        pool: worker.pool.clone(),
        key: server.key.clone(),
        sender,
        max_idle,
    };
    let body = UpstreamBody::new(
        body,
        Some(release),
        in_flight,
        server.stats.clone(),
        read_timeout,
    );
    Response::from_parts(parts, ProxyBody::Upstream(body))
}

/// WebSocket (or any HTTP/1.1 upgrade): a dedicated upstream connection; the client's
/// connection is switched only once the upstream answered 101.
async fn proxy_upgrade(
    mut req: Request<Incoming>,
    upstream: &Arc<UpstreamRuntime>,
) -> Response<ProxyBody> {
    let spec = &upstream.spec;
    let client_upgrade = hyper::upgrade::on(&mut req);
    let mut tried = Tried {
        list: [0; MAX_ATTEMPTS],
        len: 0,
    };
    let max_attempts = (spec.retries as usize + 1).min(MAX_ATTEMPTS);
    let mut last_failure = None;
    let (parts, body) = req.into_parts();
    let mut pending = Some(Request::from_parts(parts, UpBody::Client(body)));
    while tried.len < max_attempts {
        let Some(index) = upstream.select(tried.as_slice()) else {
            break;
        };
        let server = &upstream.servers[index];
        let Some(req) = pending.take() else { break };
        let mut sender = match pool::connect(&server.target, spec.connect_timeout, true).await {
            Ok(s) => s,
            Err(e) => {
                server
                    .stats
                    .record_failure(spec.max_fails, spec.fail_timeout.as_millis() as u64);
                tried.push(index);
                pending = Some(req);
                last_failure = Some((index, Failure::Connect(e.to_string())));
                continue;
            }
        };
        let in_flight = InFlight::start(&server.stats);
        let mut resp = match tokio::time::timeout(spec.read_timeout, sender.send_request(req)).await
        {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => {
                server
                    .stats
                    .record_failure(spec.max_fails, spec.fail_timeout.as_millis() as u64);
                last_failure = Some((index, Failure::Upstream(e.to_string())));
                break;
            }
            Err(_) => {
                server
                    .stats
                    .record_failure(spec.max_fails, spec.fail_timeout.as_millis() as u64);
                last_failure = Some((index, Failure::Timeout));
                break;
            }
        };
        server.stats.record_success();
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
            match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok((client_io, upstream_io)) => {
                    let mut client_io = TokioIo::new(client_io);
                    let mut upstream_io = TokioIo::new(upstream_io);
                    let _ = tokio::io::copy_bidirectional(&mut client_io, &mut upstream_io).await;
                }
                Err(e) => tracing::debug!(upstream = %name, error = %e, "upgrade failed"),
            }
        });
        return Response::from_parts(parts, ProxyBody::empty());
    }
    match last_failure {
        Some((index, failure)) => {
            failure_response(upstream, &upstream.servers[index].spec.address, failure)
        }
        None => no_server(upstream),
    }
}
