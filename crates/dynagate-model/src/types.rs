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

/// Health of a registry-fed server, as the service registry reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegistryStatus {
    Passing,
    Warning,
    Critical,
    Maintenance,
    /// Tagged `down` (nginx-upsync semantics) or weighted 0.
    Down,
}

impl RegistryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RegistryStatus::Passing => "passing",
            RegistryStatus::Warning => "warning",
            RegistryStatus::Critical => "critical",
            RegistryStatus::Maintenance => "maintenance",
            RegistryStatus::Down => "down",
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// How an upstream spreads requests over its servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Smooth weighted round robin, as nginx does it.
    #[default]
    RoundRobin,
    /// Fewest in-flight requests relative to weight.
    LeastConn,
    /// A request key (`hash_key`) picks the server; adding or removing one of N
    /// servers moves about 1/N of the keys.
    ConsistentHash,
    /// Power of two random choices on peak-EWMA latency × in-flight.
    P2cEwma,
    /// Weighted random.
    Random,
    /// Servers on this host or in this gateway's zone first; the rest when those are
    /// unavailable or saturated.
    LocalFirst,
}

impl Balance {
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::LeastConn => "least_conn",
            Balance::ConsistentHash => "consistent_hash",
            Balance::P2cEwma => "p2c_ewma",
            Balance::Random => "random",
            Balance::LocalFirst => "local_first",
        }
    }
}

/// The ring construction of `consistent_hash`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum HashMethod {
    #[default]
    Ketama,
    Maglev,
}

/// What an active health check sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    Http,
    Tcp,
}

/// How a TCP check ends the handshake it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TcpHandshake {
    /// The server's SYN-ACK passes the check and is answered with a reset instead of the
    /// last ACK (a "half-open" check): the server's listener has answered, and neither its
    /// application nor its accept queue ever sees the connection.
    #[default]
    HalfOpen,
    /// The handshake completes (the connection reaches the server's accept queue) and is
    /// then ended with a reset.
    Full,
}

/// Active health checking of every server of an upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(rename = "type")]
    pub kind: CheckKind,
    #[serde(default = "default_check_path")]
    pub path: String,
    #[serde(default = "default_check_method")]
    pub method: String,
    /// Host header of HTTP checks; the server's address when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub headers: std::collections::BTreeMap<String, String>,
    /// Statuses that pass; empty means 200–399.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expected_statuses: Vec<u16>,
    /// The response body must contain this text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_contains: Option<String>,
    #[serde(default = "default_check_interval", with = "serde_duration")]
    pub interval: Duration,
    #[serde(default = "default_check_timeout", with = "serde_duration")]
    pub timeout: Duration,
    /// Consecutive passes that make an unhealthy server healthy.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures that make a server unhealthy.
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// TCP checks only: `half_open` (the default) or `full`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_handshake: Option<TcpHandshake>,
}

pub fn default_check_path() -> String {
    "/".into()
}
pub fn default_check_method() -> String {
    "GET".into()
}
pub fn default_check_interval() -> Duration {
    Duration::from_secs(2)
}
pub fn default_check_timeout() -> Duration {
    Duration::from_secs(1)
}
pub fn default_rise() -> u32 {
    2
}
pub fn default_fall() -> u32 {
    3
}

/// Passive outlier detection: consecutive failures (connect errors, timeouts, 5xx)
/// eject a server for a time that grows with repeated ejections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Outlier {
    /// 0 turns outlier detection off.
    pub consecutive_failures: u32,
    #[serde(with = "serde_duration")]
    pub base_ejection_time: Duration,
    #[serde(with = "serde_duration")]
    pub max_ejection_time: Duration,
    /// At most this share of an upstream's servers is ejected at once.
    pub max_ejection_percent: u32,
    /// Never eject the last available server.
    pub protected: bool,
}

impl Default for Outlier {
    fn default() -> Self {
        Outlier {
            consecutive_failures: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 50,
            protected: true,
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
    /// Zone of the server, for `local_first`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Set by the service registry on registry-fed upstreams only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<RegistryStatus>,
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
            zone: None,
            registry: None,
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
    /// The request key of `consistent_hash`: `header:NAME`, `cookie:NAME`, `client_ip`,
    /// `uri` or `arg:NAME`. Requests without the key are balanced round robin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_key: Option<String>,
    #[serde(default)]
    pub hash_method: HashMethod,
    /// `local_first`: a local server with this many requests in flight is saturated.
    #[serde(default = "default_local_saturation")]
    pub local_saturation: u32,
    /// A server's weight ramps up over this time after it is added or becomes
    /// available again. 0 turns slow start off.
    #[serde(default, with = "serde_duration")]
    pub slow_start: Duration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    #[serde(default)]
    pub outlier: Outlier,
    /// Membership comes from the service registry: servers are the instances of the
    /// service of this name (read-only here; operator `state` overrides are kept).
    #[serde(default, skip_serializing_if = "is_false")]
    pub registry_fed: bool,
    /// Registry-fed: instances whose checks warn take traffic too (only passing ones
    /// otherwise).
    #[serde(default, skip_serializing_if = "is_false")]
    pub registry_include_warning: bool,
}

pub fn default_local_saturation() -> u32 {
    64
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
            hash_key: None,
            hash_method: HashMethod::default(),
            local_saturation: default_local_saturation(),
            slow_start: Duration::ZERO,
            health_check: None,
            outlier: Outlier::default(),
            registry_fed: false,
            registry_include_warning: false,
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
    /// Forward the client's original path bytes instead of the normalised path (for
    /// backends that need the exact encoding). Routing always uses the normalised path.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forward_original_path: bool,
    /// Read a request body up to `[limits] request_buffer_bytes` whole before a server is
    /// chosen (default); `false` streams every body as it arrives (large uploads).
    #[serde(default = "yes", skip_serializing_if = "is_yes")]
    pub request_buffering: bool,
}

pub fn default_path_prefix() -> String {
    "/".into()
}

fn yes() -> bool {
    true
}

fn is_yes(b: &bool) -> bool {
    *b
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
            forward_original_path: false,
            request_buffering: true,
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
    pub zone: Option<String>,
}

impl ServerPatch {
    pub fn is_empty(&self) -> bool {
        self.weight.is_none()
            && self.state.is_none()
            && self.backup.is_none()
            && self.zone.is_none()
    }
}
