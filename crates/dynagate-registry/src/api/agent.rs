//! `/v1/agent/*`: services, checks, maintenance, self.

use super::decode;
use super::render::CONSUL_VERSION;
use super::util::{empty_ok, error, json, parse_bool, with_meta};
use super::{Ctx, Reply};
use crate::model::CheckStatus;
use crate::ApiError;
use bytes::Bytes;
use serde_json::{json, Map, Value};

type R = Result<Reply, ApiError>;

pub(super) async fn register_service<B>(ctx: Ctx<B>) -> R
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let (reg, q, body) = ctx.json_body().await?;
    let replace = q.flag("replace-existing-checks")?;
    let registration = decode::parse_service(&body, replace)?;
    reg.register_service(registration).await?;
    Ok(empty_ok().into())
}

pub(super) async fn deregister_service<B>(ctx: Ctx<B>, id: String) -> R {
    ctx.reg.deregister_service(id).await?;
    Ok(empty_ok().into())
}

fn enable_flag(q: &super::Query) -> Result<bool, ApiError> {
    match q.get("enable") {
        None | Some("") => Err(ApiError::bad_request("Missing value for enable")),
        Some(v) => parse_bool(v)
            .ok_or_else(|| ApiError::bad_request(format!("Invalid value for enable: {v:?}"))),
    }
}

pub(super) async fn service_maintenance<B>(ctx: Ctx<B>, id: String) -> R {
    let enable = enable_flag(&ctx.query)?;
    let reason = ctx.query.get("reason").unwrap_or("").to_string();
    ctx.reg.service_maintenance(id, enable, reason).await?;
    Ok(empty_ok().into())
}

pub(super) async fn node_maintenance<B>(ctx: Ctx<B>) -> R {
    let enable = enable_flag(&ctx.query)?;
    let reason = ctx.query.get("reason").unwrap_or("").to_string();
    ctx.reg.node_maintenance(enable, reason).await?;
    Ok(empty_ok().into())
}

pub(super) async fn services<B>(ctx: Ctx<B>) -> R
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    ctx.read_json(
        |st| st.services_index(),
        |reg, st| {
            let m: Map<String, Value> = st
                .services
                .values()
                .map(|s| (s.id.clone(), reg.render_agent_service(s)))
                .collect();
            Value::Object(m)
        },
    )
}

pub(super) async fn service<B>(ctx: Ctx<B>, id: String) -> R
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    ctx.read(
        |st| st.services_index(),
        move |reg, st, idx| match st.services.get(&id) {
            Some(s) => with_meta(json(&reg.render_agent_service(s)), idx),
            None => error(&ApiError::not_found(format!("unknown service ID: {id}"))),
        },
    )
}

pub(super) async fn checks<B>(ctx: Ctx<B>) -> R
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    ctx.read_json(
        |st| st.checks_index(),
        |reg, st| {
            let m: Map<String, Value> = st
                .checks
                .values()
                .map(|c| (c.def.id.clone(), reg.render_check(st, c)))
                .collect();
            Value::Object(m)
        },
    )
}

pub(super) async fn register_check<B>(ctx: Ctx<B>) -> R
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let (reg, _q, body) = ctx.json_body().await?;
    let spec = decode::parse_check_registration(&body)?;
    reg.register_check(spec).await?;
    Ok(empty_ok().into())
}

pub(super) async fn deregister_check<B>(ctx: Ctx<B>, id: String) -> R {
    ctx.reg.deregister_check(id).await?;
    Ok(empty_ok().into())
}

pub(super) async fn check_ttl<B>(ctx: Ctx<B>, id: String, status: CheckStatus) -> R {
    let note = ctx.query.get("note").unwrap_or("").to_string();
    ctx.reg.ttl_update(id, status, note).await?;
    Ok(empty_ok().into())
}

pub(super) async fn check_update<B>(ctx: Ctx<B>, id: String) -> R
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let (reg, _q, body) = ctx.json_body().await?;
    let (status, output) = decode::parse_check_update(&body)?;
    reg.ttl_update(id, status, output).await?;
    Ok(empty_ok().into())
}

pub(super) async fn self_<B>(ctx: Ctx<B>) -> R {
    let reg = &ctx.reg;
    let o = &reg.opts;
    let body = json!({
        "Config": {
            "Datacenter": o.datacenter,
            "PrimaryDatacenter": o.datacenter,
            "NodeName": o.node_name,
            "NodeID": reg.node_id,
            "Server": true,
            "Revision": "dynagate",
            "Version": CONSUL_VERSION,
        },
        "DebugConfig": {},
        "Member": reg.render_member(),
        "Meta": {"consul-network-segment": ""},
        "Stats": {},
    });
    Ok(json(&body).into())
}

pub(super) async fn members<B>(ctx: Ctx<B>) -> R {
    Ok(json(&[ctx.reg.render_member()]).into())
}
