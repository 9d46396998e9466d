//! What the data plane reads per request: an immutable `Snapshot` of routes and upstreams,
//! plus live per-server counters (`ServerStats`) that outlive snapshots, so in-flight
//! counts, passive health and balancer positions survive unrelated changes.

use crate::routing::RouteTable;
use dynagate_model::{Server, ServerState, Upstream};
use parking_lot::Mutex;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds on a monotonic clock private to this process (never 0).
pub fn mono_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    start.elapsed().as_millis() as u64 + 1
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Live counters of one server of one upstream.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub in_flight: AtomicU64,
    pub requests: AtomicU64,
    pub failures: AtomicU64,
    /// Failures counted in the current passive-health window.
    window_fails: AtomicU32,
    window_start_ms: AtomicU64,
    /// Passive health skips the server until this monotonic time.
    skip_until_ms: AtomicU64,
    /// Wall-clock time of the last admin or passive-health state change.
    pub last_state_change_ms: AtomicU64,
}

impl ServerStats {
    pub fn new_now() -> Self {
        let s = ServerStats::default();
        s.last_state_change_ms.store(unix_ms(), Ordering::Relaxed);
        s
    }

    pub fn passive_skipped(&self, now_ms: u64) -> bool {
        self.skip_until_ms.load(Ordering::Relaxed) > now_ms
    }

    /// Counts a failed attempt; `max_fails` of them within `fail_timeout` skip the server
    /// for `fail_timeout`, as nginx does.
    pub fn record_failure(&self, max_fails: u32, fail_timeout_ms: u64) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        if max_fails == 0 {
            return;
        }
        let now = mono_ms();
        let start = self.window_start_ms.load(Ordering::Relaxed);
        if now.saturating_sub(start) > fail_timeout_ms {
            self.window_start_ms.store(now, Ordering::Relaxed);
            self.window_fails.store(0, Ordering::Relaxed);
        }
        let fails = self.window_fails.fetch_add(1, Ordering::Relaxed) + 1;
        if fails >= max_fails {
            self.window_fails.store(0, Ordering::Relaxed);
            self.skip_until_ms
                .store(now + fail_timeout_ms, Ordering::Relaxed);
            self.last_state_change_ms
                .store(unix_ms(), Ordering::Relaxed);
        }
    }

    pub fn record_success(&self) {
        if self.window_fails.load(Ordering::Relaxed) != 0 {
            self.window_fails.store(0, Ordering::Relaxed);
        }
    }
}

/// Counts a request as in flight on a server until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<ServerStats>);

impl InFlight {
    pub fn start(stats: &Arc<ServerStats>) -> Self {
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        stats.requests.fetch_add(1, Ordering::Relaxed);
        InFlight(stats.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where to connect: a literal socket address resolved once, or a DNS name resolved at
/// connect time.
#[derive(Debug, Clone)]
pub enum Target {
    Addr(SocketAddr),
    Name(Arc<str>),
}

#[derive(Debug)]
pub struct ServerRuntime {
    pub spec: Server,
    /// The pool key: the configured `host:port`.
    pub key: Arc<str>,
    pub target: Target,
    pub stats: Arc<ServerStats>,
}

impl ServerRuntime {
    fn takes_new_requests(&self, now_ms: u64) -> bool {
        self.spec.state == ServerState::Up && !self.stats.passive_skipped(now_ms)
    }
}

/// An upstream as the data plane uses it.
#[derive(Debug)]
pub struct UpstreamRuntime {
    pub spec: Arc<Upstream>,
    pub servers: Vec<ServerRuntime>,
    /// Smooth weighted round robin: the current weight of each server.
    rr_current: Mutex<Vec<i64>>,
}

impl UpstreamRuntime {
    /// Builds the runtime form of `spec`, reusing live stats and balancer positions of
    /// servers that `previous` already had.
    pub fn build(spec: Arc<Upstream>, previous: Option<&UpstreamRuntime>) -> UpstreamRuntime {
        let prev_rr = previous.map(|p| p.rr_current.lock().clone());
        // Index of each previous server by address: large upstreams stay O(n).
        let prev_index: std::collections::HashMap<&str, usize> = previous
            .map(|p| {
                p.servers
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (s.spec.address.as_str(), i))
                    .collect()
            })
            .unwrap_or_default();
        let mut rr = Vec::with_capacity(spec.servers.len());
        let servers = spec
            .servers
            .iter()
            .map(|s| {
                let old = prev_index.get(s.address.as_str()).copied();
                let stats = match old {
                    Some(i) => {
                        let prev = &previous.expect("index implies previous").servers[i];
                        if prev.spec.state != s.state {
                            prev.stats
                                .last_state_change_ms
                                .store(unix_ms(), Ordering::Relaxed);
                        }
                        prev.stats.clone()
                    }
                    None => Arc::new(ServerStats::new_now()),
                };
                rr.push(match (old, &prev_rr) {
                    (Some(i), Some(prev)) => prev.get(i).copied().unwrap_or(0),
                    _ => 0,
                });
                let target = match s.address.parse::<SocketAddr>() {
                    Ok(addr) => Target::Addr(addr),
                    Err(_) => Target::Name(Arc::from(s.address.as_str())),
                };
                ServerRuntime {
                    spec: s.clone(),
                    key: Arc::from(s.address.as_str()),
                    target,
                    stats,
                }
            })
            .collect();
        UpstreamRuntime {
            spec,
            servers,
            rr_current: Mutex::new(rr),
        }
    }

    /// Picks the next server by smooth weighted round robin among servers that take new
    /// requests, skipping `tried`. Backup servers are used only when no primary is.
    pub fn select(&self, tried: &[usize]) -> Option<usize> {
        let now = mono_ms();
        let mut current = self.rr_current.lock();
        for backup in [false, true] {
            let mut total: i64 = 0;
            let mut best: Option<usize> = None;
            for (i, server) in self.servers.iter().enumerate() {
                if server.spec.backup != backup
                    || tried.contains(&i)
                    || !server.takes_new_requests(now)
                {
                    continue;
                }
                let weight = server.spec.weight as i64;
                current[i] += weight;
                total += weight;
                if best.is_none_or(|b| current[i] > current[b]) {
                    best = Some(i);
                }
            }
            if let Some(b) = best {
                current[b] -= total;
                return Some(b);
            }
        }
        None
    }
}

/// Everything a request needs to be routed, published atomically as one value.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub revision: u64,
    pub routes: Arc<RouteTable>,
    pub upstreams: imbl::HashMap<String, Arc<UpstreamRuntime>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_weighted_round_robin_like_nginx() {
        let mut servers = vec![
            Server::new("127.0.0.1:1"),
            Server::new("127.0.0.1:2"),
            Server::new("127.0.0.1:3"),
        ];
        servers[0].weight = 5;
        let up = UpstreamRuntime::build(Arc::new(Upstream::new("u", servers)), None);
        let picks: Vec<usize> = (0..7).map(|_| up.select(&[]).unwrap()).collect();
        // nginx's documented sequence for weights 5,1,1: a a b a c a a
        assert_eq!(picks, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn drained_and_backup() {
        let mut servers = vec![Server::new("127.0.0.1:1"), Server::new("127.0.0.1:2")];
        servers[1].backup = true;
        let up = UpstreamRuntime::build(Arc::new(Upstream::new("u", servers.clone())), None);
        assert_eq!(up.select(&[]), Some(0));
        assert_eq!(up.select(&[0]), Some(1));
        servers[0].state = ServerState::Drain;
        let up2 = UpstreamRuntime::build(Arc::new(Upstream::new("u", servers)), Some(&up));
        assert_eq!(up2.select(&[]), Some(1));
        assert!(Arc::ptr_eq(&up.servers[0].stats, &up2.servers[0].stats));
    }

    #[test]
    fn passive_health_skips_after_max_fails() {
        let s = ServerStats::default();
        s.record_failure(2, 10_000);
        assert!(!s.passive_skipped(mono_ms()));
        s.record_failure(2, 10_000);
        assert!(s.passive_skipped(mono_ms()));
    }
}
