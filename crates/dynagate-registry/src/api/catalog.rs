//! `/v1/catalog/*` and `/v1/health/*`.

use super::util::{raw, with_meta};
use super::{Ctx, Resp};
use crate::model::{CheckStatus, ServiceDef};
use crate::ApiError;
use bytes::Bytes;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};

type R = Result<Resp, ApiError>;

fn has_tags(s: &ServiceDef, tags: &[String]) -> bool {
    tags.iter().all(|t| s.tags.iter().any(|x| x == t))
}

pub(super) async fn services<B>(ctx: Ctx<B>) -> R
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let bq = ctx.blocking()?;
    let (idx, body) = ctx
        .reg
        .blocking_json(
            ctx.cache_key(),
            bq,
            |st| st.services_index(),
            |st| {
                let mut m: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
                for s in st.services.values() {
                    m.entry(s.name.as_str())
                        .or_default()
                        .extend(s.tags.iter().map(String::as_str));
                }
                serde_json::to_value(m).unwrap_or(Value::Object(Map::new()))
            },
        )
        .await;
    Ok(with_meta(raw(200, Some("application/json"), body), idx))
}

pub(super) async fn service<B>(ctx: Ctx<B>, name: String) -> R
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let bq = ctx.blocking()?;
    let tags: Vec<String> = ctx.query.all("tag").map(str::to_string).collect();
    let reg = &ctx.reg;
    let (idx, body) = reg
        .blocking_json(
            ctx.cache_key(),
            bq,
            |st| st.catalog_service_index(&name),
            |st| {
                st.instances(&name)
                    .filter(|s| has_tags(s, &tags))
                    .map(|s| reg.render_catalog_service(s))
                    .collect::<Vec<_>>()
            },
        )
        .await;
    Ok(with_meta(raw(200, Some("application/json"), body), idx))
}

pub(super) async fn nodes<B>(ctx: Ctx<B>) -> R
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let bq = ctx.blocking()?;
    let reg = &ctx.reg;
    let (idx, body) = reg
        .blocking_json(
            ctx.cache_key(),
            bq,
            |st| st.base,
            |_| vec![reg.render_node()],
        )
        .await;
    Ok(with_meta(raw(200, Some("application/json"), body), idx))
}

pub(super) async fn health_service<B>(ctx: Ctx<B>, name: String) -> R
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let bq = ctx.blocking()?;
    let passing_only = ctx.query.flag("passing")?;
    let tags: Vec<String> = ctx.query.all("tag").map(str::to_string).collect();
    let reg = &ctx.reg;
    let (idx, body) = reg
        .blocking_json(
            ctx.cache_key(),
            bq,
            |st| st.health_service_index(&name),
            |st| {
                let node = reg.render_node();
                let node_checks = reg.node_checks(st);
                let node_ok = node_checks.iter().all(|(_, ok)| *ok);
                let mut out = Vec::new();
                for s in st.instances(&name).filter(|s| has_tags(s, &tags)) {
                    let own: Vec<_> = st.checks_of(&s.id).collect();
                    let ok = node_ok && own.iter().all(|c| c.rt.status == CheckStatus::Passing);
                    if passing_only && !ok {
                        continue;
                    }
                    let mut checks: Vec<Value> =
                        node_checks.iter().map(|(v, _)| v.clone()).collect();
                    checks.extend(own.iter().map(|c| reg.render_check(st, c)));
                    out.push(serde_json::json!({
                        "Node": node,
                        "Service": reg.render_health_service(s),
                        "Checks": checks,
                    }));
                }
                out
            },
        )
        .await;
    Ok(with_meta(raw(200, Some("application/json"), body), idx))
}

pub(super) async fn health_state<B>(ctx: Ctx<B>, state: String) -> R
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let want: Option<CheckStatus> = match state.as_str() {
        "any" => None,
        s => Some(CheckStatus::parse(s).ok_or_else(|| ApiError::bad_request("Bad check state"))?),
    };
    let bq = ctx.blocking()?;
    let reg = &ctx.reg;
    let (idx, body) = reg
        .blocking_json(
            ctx.cache_key(),
            bq,
            |st| st.agent_index(),
            |st| {
                let mut out = Vec::new();
                if want.is_none() || want == Some(CheckStatus::Passing) {
                    out.push(reg.render_serf_check());
                }
                for c in st.checks.values() {
                    if want.is_none_or(|w| w == c.rt.status) {
                        out.push(reg.render_check(st, c));
                    }
                }
                out
            },
        )
        .await;
    Ok(with_meta(raw(200, Some("application/json"), body), idx))
}

pub(super) async fn health_checks<B>(ctx: Ctx<B>, name: String) -> R
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let bq = ctx.blocking()?;
    let reg = &ctx.reg;
    let (idx, body) = reg
        .blocking_json(
            ctx.cache_key(),
            bq,
            |st| st.health_service_index(&name),
            |st| {
                st.instances(&name)
                    .flat_map(|s| st.checks_of(&s.id))
                    .map(|c| reg.render_check(st, c))
                    .collect::<Vec<_>>()
            },
        )
        .await;
    Ok(with_meta(raw(200, Some("application/json"), body), idx))
}
