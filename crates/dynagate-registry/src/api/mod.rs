//! The Consul HTTP API: server, routing, token check.
//!
//! HTTP/1.1 and HTTP/1.0 via hyper, with response header names written in Title-Case so
//! that `X-Consul-Index` goes out exactly so (nginx-upsync compares it byte for byte).
//! Every body has a known length: HTTP/1.0 clients get `Content-Length` and a closed
//! connection, never chunked encoding.

mod agent;
mod catalog;
mod decode;
mod kv;
mod render;
mod util;

use crate::blocking::BlockingQuery;
use crate::{ApiError, Registry};
use bytes::Bytes;
use http::{Method, Request};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
pub(crate) use util::Resp;
use util::{error, method_not_allowed, percent_decode, request_token, Query};

/// How long shutdown waits for in-flight requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn serve(
    reg: Arc<Registry>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    reg.shutdown_tx.send_replace(false);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let conns = Arc::new(Semaphore::new(reg.opts.max_connections));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .title_case_headers(true)
        .keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .max_buf_size(64 * 1024);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = conns.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "registry accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let reg2 = reg.clone();
        let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
            let reg = reg2.clone();
            async move { Ok::<_, Infallible>(handle(reg, req).await) }
        });
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), svc));
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    // Blocking queries answer now, so connections can finish.
    reg.shutdown_tx.send_replace(true);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => {}
    }
    Ok(())
}

/// Answers one request (never fails: errors become Consul's status and sentence).
pub(crate) async fn handle<B>(reg: Arc<Registry>, req: Request<B>) -> Resp
where
    B: hyper::body::Body<Data = Bytes> + Send,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    match route(reg, req).await {
        Ok(r) => r,
        Err(e) => error(&e),
    }
}

/// What a handler gets.
pub(crate) struct Ctx<B> {
    pub reg: Arc<Registry>,
    /// The path after `/v1/`.
    pub path: String,
    pub method: Method,
    pub query: Query,
    pub headers: http::HeaderMap,
    pub body: B,
}

impl<B> Ctx<B>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    /// What makes two reads the same answer: the path and every query parameter but
    /// the blocking, token and consistency ones.
    pub fn cache_key(&self) -> String {
        let mut pairs: Vec<&(String, String)> = self
            .query
            .pairs
            .iter()
            .filter(|(k, _)| {
                !matches!(
                    k.as_str(),
                    "index" | "wait" | "token" | "stale" | "consistent" | "cached" | "dc" | "ns"
                )
            })
            .collect();
        pairs.sort();
        let mut key = self.path.clone();
        for (k, v) in pairs {
            key.push('\u{0}');
            key.push_str(k);
            key.push('=');
            key.push_str(v);
        }
        key
    }

    pub fn blocking(&self) -> Result<BlockingQuery, ApiError> {
        BlockingQuery::parse(
            self.query.get("index"),
            self.query.get("wait"),
            &self.reg.opts,
        )
    }

    fn declared_len(&self) -> Option<u64> {
        self.headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    }

    /// A JSON request body (at most 1 MiB).
    pub async fn json_body(self) -> Result<(Arc<Registry>, Query, Bytes), ApiError> {
        let declared = self.declared_len();
        let body = util::read_body(
            self.body,
            1024 * 1024,
            |_| "Request body too large (limit 1 MiB)".to_string(),
            declared,
        )
        .await?;
        Ok((self.reg, self.query, body))
    }
}

fn check_token(
    reg: &Registry,
    headers: &http::HeaderMap,
    q: &Query,
    method: &Method,
    path: &str,
) -> bool {
    let Some(expected) = reg.opts.token.as_deref() else {
        return true;
    };
    let read = method == Method::GET || method == Method::HEAD;
    let needed = !read || (reg.opts.acl_reads && !path.starts_with("status/"));
    if !needed {
        return true;
    }
    match request_token(headers, q) {
        Some(t) => util::constant_time_eq(t.as_bytes(), expected.as_bytes()),
        None => false,
    }
}

async fn route<B>(reg: Arc<Registry>, req: Request<B>) -> Result<Resp, ApiError>
where
    B: hyper::body::Body<Data = Bytes> + Send,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let (parts, body) = req.into_parts();
    let query = Query::parse(parts.uri.query())?;
    let path = percent_decode(parts.uri.path(), false)
        .ok_or_else(|| ApiError::bad_request("Invalid URL path encoding"))?;
    let Some(rest) = path.strip_prefix("/v1/") else {
        return Err(ApiError::not_found("404 page not found"));
    };
    if !check_token(&reg, &parts.headers, &query, &parts.method, rest) {
        return Err(ApiError::new(
            403,
            "Permission denied: a valid registry token is required (X-Consul-Token header, \
             Authorization: Bearer, or ?token=)",
        ));
    }
    if let Some(f) = query.get("filter") {
        if !f.trim().is_empty() {
            return Err(ApiError::bad_request(
                "Filter expressions (?filter=) are not supported by this registry",
            ));
        }
    }
    let ctx = Ctx {
        reg,
        path: rest.to_string(),
        method: parts.method,
        query,
        headers: parts.headers,
        body,
    };
    let rest = rest.to_string();
    let put = |ctx: &Ctx<B>| ctx.method == Method::PUT;
    let get = |ctx: &Ctx<B>| ctx.method == Method::GET || ctx.method == Method::HEAD;

    macro_rules! only {
        ($ok:expr, $allow:literal) => {
            if !$ok(&ctx) {
                return Ok(method_not_allowed(&ctx.method, $allow));
            }
        };
    }

    if let Some(key) = rest.strip_prefix("kv/") {
        let key = key.to_string();
        return kv::endpoint(ctx, key).await;
    }
    if rest == "kv" {
        return kv::endpoint(ctx, String::new()).await;
    }
    if let Some(a) = rest.strip_prefix("agent/") {
        if a == "service/register" {
            only!(put, "PUT");
            return agent::register_service(ctx).await;
        }
        if let Some(id) = a.strip_prefix("service/deregister/") {
            only!(put, "PUT");
            return agent::deregister_service(ctx, id.to_string()).await;
        }
        if let Some(id) = a.strip_prefix("service/maintenance/") {
            only!(put, "PUT");
            return agent::service_maintenance(ctx, id.to_string()).await;
        }
        if let Some(id) = a.strip_prefix("service/") {
            only!(get, "GET");
            return agent::service(ctx, id.to_string()).await;
        }
        if a == "services" {
            only!(get, "GET");
            return agent::services(ctx).await;
        }
        if a == "checks" {
            only!(get, "GET");
            return agent::checks(ctx).await;
        }
        if a == "check/register" {
            only!(put, "PUT");
            return agent::register_check(ctx).await;
        }
        if let Some(id) = a.strip_prefix("check/deregister/") {
            only!(put, "PUT");
            return agent::deregister_check(ctx, id.to_string()).await;
        }
        for (prefix, status) in [
            ("check/pass/", crate::model::CheckStatus::Passing),
            ("check/warn/", crate::model::CheckStatus::Warning),
            ("check/fail/", crate::model::CheckStatus::Critical),
        ] {
            if let Some(id) = a.strip_prefix(prefix) {
                only!(put, "PUT");
                return agent::check_ttl(ctx, id.to_string(), status).await;
            }
        }
        if let Some(id) = a.strip_prefix("check/update/") {
            only!(put, "PUT");
            return agent::check_update(ctx, id.to_string()).await;
        }
        if a == "maintenance" {
            only!(put, "PUT");
            return agent::node_maintenance(ctx).await;
        }
        if a == "self" {
            only!(get, "GET");
            return agent::self_(ctx).await;
        }
        if a == "members" {
            only!(get, "GET");
            return agent::members(ctx).await;
        }
    }
    if let Some(c) = rest.strip_prefix("catalog/") {
        only!(get, "GET");
        if c == "services" {
            return catalog::services(ctx).await;
        }
        if let Some(name) = c.strip_prefix("service/") {
            return catalog::service(ctx, name.to_string()).await;
        }
        if c == "nodes" {
            return catalog::nodes(ctx).await;
        }
        if c == "datacenters" {
            return Ok(util::json(&[&ctx.reg.opts.datacenter]));
        }
    }
    if let Some(h) = rest.strip_prefix("health/") {
        only!(get, "GET");
        if let Some(name) = h.strip_prefix("service/") {
            return catalog::health_service(ctx, name.to_string()).await;
        }
        if let Some(state) = h.strip_prefix("state/") {
            return catalog::health_state(ctx, state.to_string()).await;
        }
        if let Some(name) = h.strip_prefix("checks/") {
            return catalog::health_checks(ctx, name.to_string()).await;
        }
    }
    if let Some(s) = rest.strip_prefix("status/") {
        only!(get, "GET");
        let leader = format!("{}:8300", ctx.reg.opts.node_address);
        if s == "leader" {
            return Ok(util::json(&leader));
        }
        if s == "peers" {
            return Ok(util::json(&[leader]));
        }
    }
    Err(ApiError::not_found("404 page not found"))
}
