//! Settings of `dynagate run`: built-in defaults, then a TOML file, then `DYNAGATE_*`
//! environment variables, then command-line flags — each overriding the one before.

use dynagate_model::duration::serde_duration;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Data-plane listener.
    pub listen: SocketAddr,
    /// Admin API listener (loopback by default: the admin API is never public unless asked).
    pub admin_listen: SocketAddr,
    /// Service-registry listener (Consul HTTP API), loopback by default.
    pub registry_listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Data-plane threads; 0 = one per core.
    pub workers: usize,
    /// How long in-flight requests may run after SIGTERM/SIGINT.
    #[serde(with = "serde_duration")]
    pub grace_period: Duration,
    /// Revisions kept for listing and rollback.
    pub revisions_retained: u64,
    /// tracing filter, e.g. `info` or `dynagate=debug`.
    pub log: String,
    /// This gateway's zone: `local_first` upstreams prefer servers of the same zone.
    pub zone: Option<String>,
    /// Serve `/metrics` on the admin listener without the token.
    pub metrics_open: bool,
    /// Active health checks running at once, across all servers.
    pub health_check_concurrency: usize,
    pub limits: Limits,
    /// Off unless set.
    pub access_log: Option<AccessLogSettings>,
    pub registry: RegistrySettings,
}

/// The embedded service registry (Consul HTTP API) on `registry_listen`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrySettings {
    pub enabled: bool,
    /// When set, registry writes need it (`X-Consul-Token`, `Authorization: Bearer`,
    /// `?token=`); else 403.
    pub token: Option<String>,
    /// With a token: reads need it too.
    pub acl_reads: bool,
    /// Threads that help the registry's thread answer thousands of blocking queries at
    /// once (0: none). Unset: one fewer than the cores, at most 3.
    pub fanout_threads: Option<usize>,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        RegistrySettings {
            enabled: true,
            token: None,
            acl_reads: false,
            fanout_threads: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AccessLogSettings {
    /// `stdout` or a file path (appended to).
    pub path: String,
    /// `combined` (nginx's, plus upstream address and times) or `json`.
    #[serde(default)]
    pub format: dynagate_proxy::access_log::LogFormat,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// A client must send a whole request head within this time; an idle keep-alive
    /// connection is closed when its next request does not arrive within it either.
    #[serde(with = "serde_duration")]
    pub header_read_timeout: Duration,
    /// Largest request head, in bytes (431 above).
    pub max_header_bytes: usize,
    /// Most request header fields (431 above).
    pub max_headers: usize,
    /// HTTP/2 concurrent streams per client connection.
    pub h2_max_concurrent_streams: u32,
    /// Largest request body, in bytes (413 above); 0 = no limit.
    pub max_body_bytes: u64,
    /// Forward request header names containing `_` (dropped by default, as nginx's
    /// `underscores_in_headers off`: CGI-style origins read them as `-`).
    pub underscores_in_headers: bool,
    /// Request bodies up to this size are read whole before a server is chosen (so a
    /// slow client holds no upstream connection); larger ones stream. 0 = always stream.
    pub request_buffer_bytes: usize,
    /// Longest wait for the next piece of a request body (408 after it).
    #[serde(with = "serde_duration")]
    pub body_read_timeout: Duration,
    /// Longest wait for a client to take more of a response (the connection closes).
    #[serde(with = "serde_duration")]
    pub send_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: "0.0.0.0:8080".parse().expect("literal"),
            admin_listen: "127.0.0.1:9180".parse().expect("literal"),
            registry_listen: "127.0.0.1:8500".parse().expect("literal"),
            data_dir: PathBuf::from("./dynagate-data"),
            workers: 0,
            grace_period: Duration::from_secs(30),
            revisions_retained: 1000,
            log: "info".into(),
            zone: None,
            metrics_open: false,
            health_check_concurrency: dynagate_proxy::health::DEFAULT_CONCURRENCY,
            limits: Limits::default(),
            access_log: None,
            registry: RegistrySettings::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            h2_max_concurrent_streams: 128,
            max_body_bytes: dynagate_proxy::server::DEFAULT_MAX_BODY_BYTES,
            underscores_in_headers: false,
            request_buffer_bytes: dynagate_proxy::server::DEFAULT_REQUEST_BUFFER_BYTES,
            body_read_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
        }
    }
}

impl Settings {
    /// Reads and validates a TOML file; errors name the file, the line and the field.
    pub fn from_file(path: &std::path::Path) -> Result<Settings, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let settings: Settings =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        settings
            .validate()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(settings)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.workers > 1024 {
            return Err(format!("workers: {} is out of range 0-1024", self.workers));
        }
        if self.grace_period > Duration::from_secs(3600) {
            return Err("grace_period: must be at most 1h".into());
        }
        if self.revisions_retained == 0 {
            return Err("revisions_retained: must be at least 1".into());
        }
        let l = &self.limits;
        if !(1024..=1024 * 1024).contains(&l.max_header_bytes) {
            return Err(format!(
                "limits.max_header_bytes: {} is out of range 1024-1048576",
                l.max_header_bytes
            ));
        }
        if !(1..=1000).contains(&l.max_headers) {
            return Err(format!(
                "limits.max_headers: {} is out of range 1-1000",
                l.max_headers
            ));
        }
        if l.header_read_timeout.is_zero() {
            return Err("limits.header_read_timeout: must be greater than 0".into());
        }
        if l.body_read_timeout.is_zero() {
            return Err("limits.body_read_timeout: must be greater than 0".into());
        }
        if l.send_timeout.is_zero() {
            return Err("limits.send_timeout: must be greater than 0".into());
        }
        if l.request_buffer_bytes > 64 * 1024 * 1024 {
            return Err(format!(
                "limits.request_buffer_bytes: {} is out of range 0-67108864",
                l.request_buffer_bytes
            ));
        }
        if !(1..=10_000).contains(&l.h2_max_concurrent_streams) {
            return Err("limits.h2_max_concurrent_streams: out of range 1-10000".into());
        }
        tracing_subscriber::EnvFilter::try_new(&self.log).map_err(|e| format!("log: {e}"))?;
        if let Some(z) = &self.zone {
            dynagate_model::validate::validate_zone("zone", z).map_err(|e| e.to_string())?;
        }
        if !(1..=100_000).contains(&self.health_check_concurrency) {
            return Err("health_check_concurrency: out of range 1-100000".into());
        }
        if let Some(t) = &self.registry.token {
            if t.len() < 16 {
                return Err("registry.token: must be at least 16 characters".into());
            }
        }
        if let Some(n) = self.registry.fanout_threads {
            let max = dynagate_registry::MAX_FANOUT_THREADS;
            if n > max {
                return Err(format!(
                    "registry.fanout_threads: {n} is out of range 0-{max}"
                ));
            }
        }
        if let Some(a) = &self.access_log {
            if a.path.is_empty() {
                return Err("access_log.path: must be `stdout` or a file path".into());
            }
        }
        Ok(())
    }

    pub fn worker_count(&self) -> usize {
        if self.workers == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            self.workers
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_errors_name_the_field() {
        let err = toml::from_str::<Settings>("listen = \"0.0.0.0:1\"\nbogus = 1\n").unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
        let err = toml::from_str::<Settings>("[limits]\nmax_headers = \"x\"\n").unwrap_err();
        assert!(err.to_string().contains("max_headers"), "{err}");
        let s: Settings = toml::from_str("workers = 2\ngrace_period = \"5s\"\n").unwrap();
        assert_eq!(s.grace_period, Duration::from_secs(5));
        let s = Settings {
            workers: 5000,
            ..Settings::default()
        };
        assert!(s.validate().unwrap_err().contains("workers"));
        let s: Settings = toml::from_str("[registry]\nfanout_threads = 0\n").unwrap();
        assert_eq!(s.registry.fanout_threads, Some(0));
        assert!(s.validate().is_ok());
        let s: Settings = toml::from_str("[registry]\nfanout_threads = 65\n").unwrap();
        assert!(s
            .validate()
            .unwrap_err()
            .contains("registry.fanout_threads"));
    }
}
