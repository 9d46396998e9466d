//! dynagate's data plane and the control plane that feeds it.
//!
//! - `control`: the one door for state changes (validate → store → publish)
//! - `runtime`: the published snapshot and live per-server state
//! - `routing`: the route table
//! - `uri`:     request-target checks: path normalisation, Host validation
//! - `h1`:      the HTTP/1 path: own codec, request lifecycle, connection loop
//! - `proxy`:   the request lifecycle over hyper (HTTP/2 clients)
//! - `pool`, `body`: upstream connections and streaming bodies
//! - `server`:  listeners and worker threads

pub mod access_log;
pub mod balance;
pub mod body;
pub mod control;
pub mod h1;
pub mod health;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod routing;
pub mod runtime;
pub mod server;
pub mod stats;
pub mod uri;

pub use control::{ControlError, Controller, Outcome, ServerStatus, UpstreamStatus};
pub use server::{start, ProxyHandle, ProxyOptions};
