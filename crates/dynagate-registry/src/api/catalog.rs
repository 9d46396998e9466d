//! `/v1/catalog/*` and `/v1/health/*`.

use super::{Ctx, Reply};
use crate::model::{CheckStatus, ServiceDef};
use crate::ApiError;
use bytes::Bytes;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};

type R = Result<Reply, ApiError>;

fn has_tags(s: &ServiceDef, tags: &[String]) -> bool {
    tags.iter().all(|t| s.tags.iter().any(|x| x == t))
}

pub(super) async fn services<B>(ctx: Ctx<B>) -> R
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    ctx.read_json(
        |st| st.services_index(),
        |_, st| {
            let mut m: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
            for s in st.services.values() {
                m.entry(s.name.as_str())
                    .or_default()
                    .extend(s.tags.iter().map(String::as_str));
            }
            serde_json::to_value(m).unwrap_or(Value::Object(Map::new()))
        },
    )
}

pub(super) async fn service<B>(ctx: Ctx<B>, name: String) -> R
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let tags: Vec<String> = ctx.query.all("tag").map(str::to_string).collect();
    let of = name.clone();
    ctx.read_json(
        move |st| st.catalog_service_index(&of),
        move |reg, st| {
            st.instances(&name)
                .filter(|s| has_tags(s, &tags))
                .map(|s| reg.render_catalog_service(s))
                .collect::<Vec<_>>()
        },
    )
}

pub(super) async fn nodes<B>(ctx: Ctx<B>) -> R
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    ctx.read_json(|st| st.base, |reg, _| vec![reg.render_node()])
}

pub(super) async fn health_service<B>(ctx: Ctx<B>, name: String) -> R
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let passing_only = ctx.query.flag("passing")?;
    let tags: Vec<String> = ctx.query.all("tag").map(str::to_string).collect();
    let of = name.clone();
    ctx.read_json(
        move |st| st.health_service_index(&of),
        move |reg, st| {
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
                let mut checks: Vec<Value> = node_checks.iter().map(|(v, _)| v.clone()).collect();
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
    ctx.read_json(
        |st| st.agent_index(),
        move |reg, st| {
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
}

pub(super) async fn health_checks<B>(ctx: Ctx<B>, name: String) -> R
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let of = name.clone();
    ctx.read_json(
        move |st| st.health_service_index(&of),
        move |reg, st| {
            st.instances(&name)
                .flat_map(|s| st.checks_of(&s.id))
                .map(|c| reg.render_check(st, c))
                .collect::<Vec<_>>()
        },
    )
}
