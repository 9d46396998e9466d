//! The Consul HTTP API: routing, token check, and the answers — served by [`http1`], the
//! registry's own HTTP/1.x server (see there why it is not hyper).
//!
//! Header names go out in Title-Case so that `X-Consul-Index` is written exactly so
//! (nginx-upsync compares it byte for byte). Every body has a known length: HTTP/1.0
//! clients get `Content-Length` and a closed connection, never chunked encoding.

mod agent;
mod catalog;
mod decode;
pub(crate) mod encoding;
pub(crate) mod http1;
mod kv;
mod render;
mod util;

use crate::blocking::{BlockingQuery, Prepared, View, Watch};
use crate::state::State;
use crate::{ApiError, Registry};
use bytes::Bytes;
use http::{Method, Request};
use std::sync::Arc;
pub(crate) use util::Resp;
use util::{method_not_allowed, percent_decode, request_token, Query};

pub(crate) use http1::serve;

/// What a request gets.
pub(crate) enum Reply {
    /// An answer made for this request.
    Now(Resp),
    /// A read's answer, shared with every request for the same read at the same index.
    Shared(Arc<Prepared>),
    /// A blocking query whose index has not passed yet: wait for a change.
    Wait(Watch),
}

impl From<Resp> for Reply {
    fn from(r: Resp) -> Reply {
        Reply::Now(r)
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

    /// A read (every read is a blocking query): `index_of` gives its resource's index,
    /// `render` its answer (with the blocking-query headers for that index). Answered now
    /// unless `?index=` asks to wait for a change; either way rendered once per registry
    /// index for all requests of the same read.
    pub fn read(
        &self,
        index_of: impl Fn(&State) -> u64 + Send + Sync + 'static,
        render: impl Fn(&Registry, &State, u64) -> Resp + Send + Sync + 'static,
    ) -> Result<Reply, ApiError> {
        let q = self.blocking()?;
        let view = View {
            index_of: Box::new(index_of),
            render: Box::new(render),
        };
        Ok(self.reg.read(self.cache_key(), q, view))
    }

    /// [`Ctx::read`] of a JSON value: 200, `application/json`, the blocking-query headers.
    pub fn read_json<T: serde::Serialize>(
        &self,
        index_of: impl Fn(&State) -> u64 + Send + Sync + 'static,
        render: impl Fn(&Registry, &State) -> T + Send + Sync + 'static,
    ) -> Result<Reply, ApiError> {
        self.read(index_of, move |reg, st, idx| {
            // Serializing our own values cannot fail; an empty list is the safe answer if
            // it did.
            let body = serde_json::to_vec(&render(reg, st)).unwrap_or_else(|_| b"[]".to_vec());
            util::with_meta(
                util::raw(200, Some("application/json"), Bytes::from(body)),
                idx,
            )
        })
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

/// Answers one request (errors become Consul's status and sentence).
pub(crate) async fn handle<B>(reg: Arc<Registry>, req: Request<B>) -> Reply
where
    B: hyper::body::Body<Data = Bytes> + Send,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    match route(reg, req).await {
        Ok(r) => r,
        Err(e) => Reply::Now(util::error(&e)),
    }
}

async fn route<B>(reg: Arc<Registry>, req: Request<B>) -> Result<Reply, ApiError>
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
                return Ok(method_not_allowed(&ctx.method, $allow).into());
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
            return Ok(util::json(&[&ctx.reg.opts.datacenter]).into());
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
            return Ok(util::json(&leader).into());
        }
        if s == "peers" {
            return Ok(util::json(&[leader]).into());
        }
    }
    Err(ApiError::not_found("404 page not found"))
}
