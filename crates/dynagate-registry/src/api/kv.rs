//! `/v1/kv/<key>`: GET (recurse, keys, separator, raw), PUT (flags, cas), DELETE
//! (recurse, cas).

use super::render::render_kv;
use super::util::{json, raw, read_body, with_meta};
use super::{Ctx, Reply};
use crate::kv::{self, MAX_VALUE_SIZE};
use crate::ApiError;
use bytes::Bytes;
use http::Method;

type R = Result<Reply, ApiError>;

pub(super) async fn endpoint<B>(ctx: Ctx<B>, key: String) -> R
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    match ctx.method {
        Method::GET | Method::HEAD => get(ctx, key).await,
        Method::PUT => put(ctx, key).await,
        Method::DELETE => delete(ctx, key).await,
        _ => Ok(super::util::method_not_allowed(&ctx.method, "GET, PUT, DELETE").into()),
    }
}

fn parse_u64(q: &super::Query, name: &str) -> Result<Option<u64>, ApiError> {
    match q.get(name) {
        None => Ok(None),
        Some(v) => v.parse::<u64>().map(Some).map_err(|_| {
            ApiError::bad_request(format!(
                "Invalid {name} value {v:?}: must be an unsigned integer"
            ))
        }),
    }
}

fn conflicting(q: &super::Query, flags: &[&str]) -> Result<(), ApiError> {
    let present: Vec<&str> = flags.iter().copied().filter(|f| q.has(f)).collect();
    if present.len() > 1 {
        return Err(ApiError::bad_request(format!(
            "Conflicting flags: {}",
            present.join(", ")
        )));
    }
    Ok(())
}

async fn get<B>(ctx: Ctx<B>, key: String) -> R
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    ctx.blocking()?;
    let q = &ctx.query;
    if q.has("keys") {
        let sep = q
            .get("separator")
            .or_else(|| q.get("seperator"))
            .unwrap_or("")
            .to_string();
        let of = key.clone();
        return ctx.read(
            move |st| kv::index(st, &of, true),
            move |_, st, idx| {
                let keys = kv::keys(st, &key, &sep);
                if keys.is_empty() && !key.is_empty() {
                    with_meta(raw(404, None, Bytes::new()), idx)
                } else {
                    with_meta(json(&keys), idx)
                }
            },
        );
    }
    let recurse = q.has("recurse");
    if !recurse && key.is_empty() {
        return Err(ApiError::bad_request("Missing key name"));
    }
    let want_raw = q.has("raw") && !recurse;
    let of = key.clone();
    ctx.read(
        move |st| kv::index(st, &of, recurse),
        move |_, st, idx| {
            let entries = kv::get(st, &key, recurse);
            let resp = if want_raw {
                match entries.first() {
                    None => raw(404, None, Bytes::new()),
                    Some(e) => {
                        let mut r = raw(200, Some("text/plain"), Bytes::from(e.value.clone()));
                        let h = r.headers_mut();
                        h.insert(
                            "x-content-type-options",
                            http::HeaderValue::from_static("nosniff"),
                        );
                        h.insert(
                            "content-security-policy",
                            http::HeaderValue::from_static("sandbox"),
                        );
                        r
                    }
                }
            } else if entries.is_empty() {
                raw(404, None, Bytes::new())
            } else {
                json(&entries.into_iter().map(render_kv).collect::<Vec<_>>())
            };
            with_meta(resp, idx)
        },
    )
}

async fn put<B>(ctx: Ctx<B>, key: String) -> R
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    if key.is_empty() {
        return Err(ApiError::bad_request("Missing key name"));
    }
    let q = &ctx.query;
    if q.has("acquire") || q.has("release") {
        return Err(ApiError::bad_request(
            "Sessions (?acquire / ?release) are not supported by this registry",
        ));
    }
    let flags = parse_u64(q, "flags")?.unwrap_or(0);
    let cas = parse_u64(q, "cas")?;
    let declared = ctx
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let value = read_body(
        ctx.body,
        MAX_VALUE_SIZE,
        |n| {
            let size = n.map_or_else(
                || "more than the limit".to_string(),
                |n| format!("{n} bytes"),
            );
            format!(
                "Request body({size}) too large, max size: {MAX_VALUE_SIZE} bytes. See \
                 https://developer.hashicorp.com/docs/agent/config/config-files#kv_max_value_size."
            )
        },
        declared,
    )
    .await?;
    let ok = ctx.reg.kv_put(key, value.to_vec(), flags, cas).await?;
    Ok(json(&ok).into())
}

async fn delete<B>(ctx: Ctx<B>, key: String) -> R {
    let q = &ctx.query;
    conflicting(q, &["recurse", "cas"])?;
    let recurse = q.has("recurse");
    if !recurse && key.is_empty() {
        return Err(ApiError::bad_request("Missing key name"));
    }
    let cas = parse_u64(q, "cas")?;
    let ok = ctx.reg.kv_delete(key, recurse, cas).await?;
    Ok(json(&ok).into())
}
