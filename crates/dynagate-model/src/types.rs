//! The configuration entities: upstreams, their servers, and routes.

use crate::duration::serde_duration;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Administrative state of a server, set by an operator (or the registry bridge).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ServerState {
    /// Takes new requests.
    #[default]
    Up,
    /// Takes no new requests; in-flight requests finish.
    Drain,
    /// Out of service.
    Down,
}

impl ServerState {
    pub fn as_str(self) -> &'static str {
        match self {
            ServerState::Up => "up",
            ServerState::Drain => "drain",
            ServerState::Down => "down",
        }
    }
}

/// How an upstream spreads requests over its servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Smooth weighted round robin, as nginx does it.
    #[default]
    RoundRobin,
}

impl Balance {
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
        }
    }
}

/// One backend server of an upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// `host:port`; the host is an IP address or a DNS name.
    pub address: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub state: ServerState,
    /// A backup server takes traffic only when no primary server is available.
    #[serde(default)]
    pub backup: bool,
}

pub fn default_weight() -> u32 {
    1
}

impl Server {
    pub fn new(address: impl Into<String>) -> Self {
        Server {
            address: address.into(),
            weight: 1,
            state: ServerState::Up,
            backup: false,
        }
    }
}

/// A named group of servers that routes send traffic to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// Taken from the URL path on writes; may be repeated in the body if it matches.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub servers: Vec<Server>,
    #[serde(default)]
    pub balance: Balance,
    /// How many other servers to try after a failed attempt.
    #[serde(default = "default_retries")]
    pub retries: u32,
    #[serde(default = "default_connect_timeout", with = "serde_duration")]
    pub connect_timeout: Duration,
    /// Longest wait for the response head, and between two reads of the response body.
    #[serde(default = "default_read_timeout", with = "serde_duration")]
    pub read_timeout: Duration,
    /// Failed attempts within `fail_timeout` that make passive health skip a server
    /// for `fail_timeout` (nginx semantics). 0 turns passive health off.
    #[serde(default = "default_max_fails")]
    pub max_fails: u32,
    #[serde(default = "default_fail_timeout", with = "serde_duration")]
    pub fail_timeout: Duration,
    /// Idle keep-alive connections kept per server and worker thread.
    #[serde(default = "default_keepalive")]
    pub keepalive: u32,
}

pub fn default_retries() -> u32 {
    1
}
pub fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
pub fn default_read_timeout() -> Duration {
    Duration::from_secs(60)
}
pub fn default_max_fails() -> u32 {
    1
}
pub fn default_fail_timeout() -> Duration {
    Duration::from_secs(10)
}
pub fn default_keepalive() -> u32 {
    128
}

impl Upstream {
    /// An upstream with the given servers and every other field at its default.
    pub fn new(name: impl Into<String>, servers: Vec<Server>) -> Self {
        Upstream {
            name: name.into(),
            servers,
            balance: Balance::default(),
            retries: default_retries(),
            connect_timeout: default_connect_timeout(),
            read_timeout: default_read_timeout(),
            max_fails: default_max_fails(),
            fail_timeout: default_fail_timeout(),
            keepalive: default_keepalive(),
        }
    }

    pub fn server(&self, address: &str) -> Option<&Server> {
        self.servers.iter().find(|s| s.address == address)
    }
}

/// Sends requests matching hosts, a path prefix and optionally methods to an upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Taken from the URL path on writes; may be repeated in the body if it matches.
    #[serde(default)]
    pub id: String,
    /// Exact names or `*.example.com` wildcards; empty matches any host.
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default = "default_path_prefix")]
    pub path_prefix: String,
    /// Empty matches any method.
    #[serde(default)]
    pub methods: Vec<String>,
    pub upstream: String,
    /// Host header sent upstream instead of the client's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_host: Option<String>,
}

pub fn default_path_prefix() -> String {
    "/".into()
}

impl Route {
    pub fn new(id: impl Into<String>, hosts: &[&str], path_prefix: &str, upstream: &str) -> Self {
        Route {
            id: id.into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            path_prefix: path_prefix.into(),
            methods: Vec::new(),
            upstream: upstream.into(),
            upstream_host: None,
        }
    }
}

/// A partial update of one server (`PATCH .../servers/{address}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerPatch {
    pub weight: Option<u32>,
    pub state: Option<ServerState>,
    pub backup: Option<bool>,
}

impl ServerPatch {
    pub fn is_empty(&self) -> bool {
        self.weight.is_none() && self.state.is_none() && self.backup.is_none()
    }
}
