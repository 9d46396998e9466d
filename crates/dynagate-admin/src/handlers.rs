//! The JSON API under `/v1`. Every write is one `Command` through the `Controller`, which
//! validates it, makes it durable and only then publishes it; the answer carries the
//! revision now in force.

use crate::errors::{json_response, ApiError, Body};
use crate::request::{decode_json, read_body};
use crate::router::{parse_query, query_bool, query_u64, Endpoint};
use dynagate_model::{Command, Route, Server, ServerPatch, Upstream};
use dynagate_proxy::{Controller, Outcome};
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, Method, Response, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;
use std::sync::Arc;

/// The `Content-Type` of `GET /metrics`: Prometheus text exposition format 0.0.4.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Default and largest `limit` of `GET /v1/revisions`.
pub const DEFAULT_REVISIONS: u64 = 100;
pub const MAX_REVISIONS: u64 = 100_000;

/// A request as the handlers see it, after authentication and routing.
pub struct Call<'a> {
    pub controller: &'a Arc<Controller>,
    pub registry: Option<&'a Arc<dyn crate::RegistryView>>,
    pub method: Method,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    pub body: Incoming,
}

/// Runs controller work off the async threads: commits wait for the disk (fsync), and
/// even reads may wait for the controller's lock while a commit is under way. The work
/// also completes if the client goes away mid-call.
pub async fn blocking<T, F>(controller: &Arc<Controller>, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&Controller) -> Result<T, ApiError> + Send + 'static,
{
    let controller = controller.clone();
    tokio::task::spawn_blocking(move || f(&controller))
        .await
        .map_err(|e| ApiError::internal(format!("admin task failed: {e}")))?
}

/// Runs one command and answers `{"revision":N,"summary":"...","changed":bool}`.
pub async fn execute(controller: &Arc<Controller>, command: Command) -> Result<Outcome, ApiError> {
    let outcome = blocking(controller, move |c| {
        c.execute(command).map_err(ApiError::from)
    })
    .await?;
    log_outcome(&outcome);
    Ok(outcome)
}

pub fn log_outcome(outcome: &Outcome) {
    if outcome.changed {
        tracing::info!(revision = outcome.revision, summary = %outcome.summary, "admin: change committed");
    } else {
        tracing::debug!(revision = outcome.revision, summary = %outcome.summary, "admin: no change");
    }
}

fn written(outcome: &Outcome) -> Response<Body> {
    let mut resp = json_response(StatusCode::OK, outcome);
    if let Ok(v) = http::HeaderValue::from_str(&outcome.timing.header_value()) {
        resp.headers_mut().insert("server-timing", v);
    }
    resp
}

/// `name`/`id` may be left out of a body, or repeated if it equals the path.
fn adopt_key(field: &str, in_body: &mut String, in_path: &str) -> Result<(), ApiError> {
    if in_body.is_empty() {
        *in_body = in_path.to_string();
        Ok(())
    } else if in_body != in_path {
        Err(ApiError::bad_request(format!(
            "{field}: {in_body:?} in the body does not match {in_path:?} in the path"
        )))
    } else {
        Ok(())
    }
}

#[derive(Serialize)]
struct StatusView {
    revision: u64,
    version: &'static str,
    uptime_s: u64,
}

#[derive(Serialize)]
struct RevisionView {
    number: u64,
    time_ms: u64,
    summary: String,
}

fn upstream_missing(name: &str) -> ApiError {
    ApiError::not_found(format!("upstream {name:?} does not exist"))
}

pub async fn handle(call: Call<'_>, endpoint: Endpoint) -> Result<Response<Body>, ApiError> {
    let Call {
        controller,
        registry,
        method,
        query,
        headers,
        body,
    } = call;
    let accepted: &[&str] = match (&endpoint, &method) {
        (Endpoint::Upstream(_), &Method::PUT) | (Endpoint::Server(..), &Method::DELETE) => {
            &["force"]
        }
        (Endpoint::Revisions, &Method::GET) => &["limit"],
        _ => &[],
    };
    let query = parse_query(query, accepted)?;
    match (endpoint, method) {
        (Endpoint::Upstreams, Method::GET) => {
            let all = blocking(controller, |c| {
                let config = c.config();
                Ok(config
                    .upstreams
                    .keys()
                    .filter_map(|name| c.upstream_status(name))
                    .collect::<Vec<_>>())
            })
            .await?;
            Ok(json_response(StatusCode::OK, &all))
        }
        (Endpoint::Upstream(name), Method::GET) => {
            let status = controller
                .upstream_status(&name)
                .ok_or_else(|| upstream_missing(&name))?;
            Ok(json_response(StatusCode::OK, &status))
        }
        (Endpoint::Upstream(name), Method::PUT) => {
            let force = query_bool(&query, "force")?;
            let bytes = read_body(headers, body).await?;
            let mut upstream: Upstream = decode_json(&bytes)?;
            adopt_key("name", &mut upstream.name, &name)?;
            let outcome = execute(
                controller,
                Command::PutUpstream {
                    upstream: Box::new(upstream),
                    force,
                },
            )
            .await?;
            Ok(written(&outcome))
        }
        (Endpoint::Upstream(name), Method::DELETE) => {
            let outcome = execute(controller, Command::DeleteUpstream { name }).await?;
            Ok(written(&outcome))
        }
        (Endpoint::Servers(name), Method::GET) => {
            let status = controller
                .upstream_status(&name)
                .ok_or_else(|| upstream_missing(&name))?;
            Ok(json_response(StatusCode::OK, &status.live))
        }
        (Endpoint::Servers(upstream), Method::POST) => {
            let bytes = read_body(headers, body).await?;
            let server: Server = decode_json(&bytes)?;
            let outcome = execute(controller, Command::AddServer { upstream, server }).await?;
            Ok(written(&outcome))
        }
        (Endpoint::Server(name, address), Method::GET) => {
            let status = controller
                .upstream_status(&name)
                .ok_or_else(|| upstream_missing(&name))?;
            let server = status
                .live
                .into_iter()
                .find(|s| s.address == address)
                .ok_or_else(|| {
                    ApiError::not_found(format!("upstream {name:?} has no server {address:?}"))
                })?;
            Ok(json_response(StatusCode::OK, &server))
        }
        (Endpoint::Server(upstream, address), Method::PATCH) => {
            let bytes = read_body(headers, body).await?;
            let patch: ServerPatch = decode_json(&bytes)?;
            let command = Command::UpdateServer {
                upstream,
                address,
                patch,
            };
            let outcome = execute(controller, command).await?;
            Ok(written(&outcome))
        }
        (Endpoint::Server(upstream, address), Method::DELETE) => {
            let force = query_bool(&query, "force")?;
            let command = Command::RemoveServer {
                upstream,
                address,
                force,
            };
            let outcome = execute(controller, command).await?;
            Ok(written(&outcome))
        }
        (Endpoint::Routes, Method::GET) => {
            let routes = blocking(controller, |c| {
                Ok(c.config().routes.values().cloned().collect::<Vec<_>>())
            })
            .await?;
            Ok(json_response(StatusCode::OK, &routes))
        }
        (Endpoint::Route(id), Method::GET) => {
            let lookup = id.clone();
            let route = blocking(controller, move |c| {
                Ok(c.config().routes.get(&lookup).cloned())
            })
            .await?;
            let route =
                route.ok_or_else(|| ApiError::not_found(format!("route {id:?} does not exist")))?;
            Ok(json_response(StatusCode::OK, &route))
        }
        (Endpoint::Route(id), Method::PUT) => {
            let bytes = read_body(headers, body).await?;
            let mut route: Route = decode_json(&bytes)?;
            adopt_key("id", &mut route.id, &id)?;
            let outcome = execute(controller, Command::PutRoute { route }).await?;
            Ok(written(&outcome))
        }
        (Endpoint::Route(id), Method::DELETE) => {
            let outcome = execute(controller, Command::DeleteRoute { id }).await?;
            Ok(written(&outcome))
        }
        (Endpoint::Revisions, Method::GET) => {
            let limit = query_u64(&query, "limit", DEFAULT_REVISIONS, 1..=MAX_REVISIONS)? as usize;
            let list = blocking(controller, move |c| {
                c.revisions(limit).map_err(ApiError::from)
            })
            .await?;
            let list: Vec<RevisionView> = list
                .into_iter()
                .map(|r| RevisionView {
                    number: r.number,
                    time_ms: r.time_ms,
                    summary: r.summary,
                })
                .collect();
            Ok(json_response(StatusCode::OK, &list))
        }
        (Endpoint::Rollback(n), Method::POST) => {
            let number: u64 = n.parse().map_err(|_| {
                ApiError::bad_request(format!("revision: {n:?} is not a revision number"))
            })?;
            let outcome = blocking(controller, move |c| {
                c.rollback(number).map_err(ApiError::from)
            })
            .await?;
            log_outcome(&outcome);
            Ok(written(&outcome))
        }
        (Endpoint::Status, Method::GET) => {
            let status = blocking(controller, |c| {
                Ok(StatusView {
                    revision: c.revision(),
                    version: env!("CARGO_PKG_VERSION"),
                    uptime_s: c.uptime().as_secs(),
                })
            })
            .await?;
            Ok(json_response(StatusCode::OK, &status))
        }
        (Endpoint::RegistryServices, Method::GET) => {
            let registry = registry
                .ok_or_else(|| ApiError::not_found("the service registry is not enabled"))?
                .clone();
            let services = tokio::task::spawn_blocking(move || registry.services())
                .await
                .map_err(|e| ApiError::internal(e.to_string()))?;
            Ok(json_response(StatusCode::OK, &services))
        }
        (Endpoint::Metrics, Method::GET) => {
            let text = blocking(controller, |c| Ok(dynagate_proxy::metrics::render(c))).await?;
            let mut resp = Response::new(Body::from(text));
            let h = resp.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static(METRICS_CONTENT_TYPE));
            h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            Ok(resp)
        }
        (endpoint, method) => Err(ApiError::method_not_allowed(&method, endpoint.allowed())),
    }
}
