//! The admin API: a JSON API under `/v1`, the ngx_http_dyups_module interface
//! (`/detail`, `/list`, `/upstream/{name}`) and Prometheus `/metrics`, all behind one
//! bearer token; the dashboard at `/ui/`; and the client `dynagate ctl` uses. See
//! docs/admin-api.md and docs/dashboard.md.
//!
//! The dashboard's static files (and the redirect of `/` to `/ui/`) need no token: they
//! hold no data. `/metrics` needs none either when `AdminOptions::metrics_open` is set.
//! Every other call is authenticated first (401 otherwise, whatever the path), then
//! routed (404 unknown path, 405 with `Allow` for a wrong method), then handled. Writes
//! go through `Controller::execute`: acknowledged only once durable.

mod auth;
pub mod client;
mod dyups;
mod errors;
mod handlers;
mod request;
mod router;
mod ui;

pub use request::MAX_BODY;

use crate::auth::Token;
use crate::errors::{ApiError, Body, Flavor};
use crate::handlers::Call;
use crate::router::Endpoint;
use dynagate_proxy::Controller;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Admin connections served at once; more are closed on accept.
pub const MAX_CONNECTIONS: usize = 256;
/// A client must send a whole request head within this time.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// After shutdown, how long in-flight calls may still take.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// What the dashboard shows of the service registry (implemented by the binary, so
/// this crate does not depend on the registry).
pub trait RegistryView: Send + Sync {
    /// `[{"name","tags","instances":[{"id","address","port","health",
    /// "checks":[{"id","name","type","status","output"}]}]}]`
    fn services(&self) -> serde_json::Value;
}

/// How the admin listener is set up.
#[derive(Clone)]
pub struct AdminOptions {
    /// The bearer token every call needs (an empty token admits nobody).
    pub token: String,
    /// Serve `GET /metrics` without a token (for a scraper that cannot send one).
    pub metrics_open: bool,
    /// `GET /v1/registry/services` answers 404 without one.
    pub registry: Option<Arc<dyn RegistryView>>,
}

impl std::fmt::Debug for AdminOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminOptions")
            .field("token", &"<redacted>")
            .field("metrics_open", &self.metrics_open)
            .field("registry", &self.registry.is_some())
            .finish()
    }
}

struct Admin {
    controller: Arc<Controller>,
    token: Token,
    metrics_open: bool,
    registry: Option<Arc<dyn RegistryView>>,
}

/// Serves the admin API and the dashboard on `listener` until `shutdown` resolves, then
/// stops accepting, lets in-flight calls finish (up to `SHUTDOWN_GRACE`) and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    controller: Arc<Controller>,
    options: AdminOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let admin = Arc::new(Admin {
        controller,
        token: Token::new(options.token),
        metrics_open: options.metrics_open,
        registry: options.registry,
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "admin: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "admin: too many connections; closing this one");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let admin = admin.clone();
        let service = service_fn(move |req| {
            let admin = admin.clone();
            async move { Ok::<_, Infallible>(handle(&admin, peer, req).await) }
        });
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "admin: connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("admin: in-flight calls still running after the grace period; leaving them");
    }
}

async fn handle(admin: &Admin, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    if let Some(resp) = ui::public(&parts.method, parts.uri.path(), &parts.headers) {
        return resp;
    }
    let open = admin.metrics_open && parts.uri.path() == "/metrics";
    if !open && !admin.token.admits(&parts.headers) {
        tracing::debug!(%peer, method = %parts.method, path = parts.uri.path(), "admin: refused: bad token");
        return ApiError::unauthorized().into_response(Flavor::Json);
    }
    let path = parts.uri.path();
    let endpoint = match router::resolve(path) {
        Ok(e) => e,
        Err(e) => return e.into_response(router::flavor_of_path(path)),
    };
    let flavor = endpoint.flavor();
    if !endpoint.allowed().contains(&parts.method) {
        return ApiError::method_not_allowed(&parts.method, endpoint.allowed())
            .into_response(flavor);
    }
    let call = Call {
        controller: &admin.controller,
        registry: admin.registry.as_ref(),
        method: parts.method.clone(),
        query: parts.uri.query(),
        headers: &parts.headers,
        body,
    };
    let result = match endpoint {
        Endpoint::DyupsDetail | Endpoint::DyupsList | Endpoint::DyupsUpstream(_) => {
            dyups::handle(call, endpoint).await
        }
        _ => handlers::handle(call, endpoint).await,
    };
    match result {
        Ok(resp) => resp,
        Err(e) => {
            if parts.method != http::Method::GET {
                tracing::info!(%peer, method = %parts.method, path, status = e.status.as_u16(), error = %e.message, "admin: refused");
            }
            e.into_response(flavor)
        }
    }
}
