//! What the data plane reads per request: an immutable `Snapshot` of routes and
//! upstreams. Each `UpstreamRuntime` holds its servers with their live `ServerStats`
//! records, which outlive snapshots (see stats.rs).

use crate::balance::{self, Ketama, Maglev};
use crate::routing::{RouteEntry, RouteTable};
pub use crate::stats::{mono_ms, unix_ms, Alarm, Health, InFlight, ServerStats, Shard};
use dynagate_model::{Balance, HashMethod, RegistryStatus, Server, ServerState, Upstream};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// Where to connect: a literal socket address, or a DNS name resolved at connect time.
#[derive(Debug, Clone)]
pub enum Target {
    Addr(SocketAddr),
    Name(Arc<str>),
}

#[derive(Debug)]
#[repr(C)]
pub struct ServerRuntime {
    // What a request reads of the server it was given first.
    pub stats: Arc<ServerStats>,
    /// The pool key: the configured `host:port`.
    pub key: Arc<str>,
    pub target: Target,
    pub spec: Server,
    /// On this host or in this gateway's zone (for `local_first`).
    pub local: bool,
    /// The service registry lets it take traffic (always true for admin-managed servers).
    pub registry_ok: bool,
}

/// The pool key of `address`: one shared string per address however many upstreams
/// list it, so a request's pool lookup hashes bytes that are already in cache.
fn pool_key(address: &str) -> Arc<str> {
    /// The interned keys, and their number after the last pruning.
    type Keys = (HashMap<Box<str>, std::sync::Weak<str>>, usize);
    static KEYS: OnceLock<Mutex<Keys>> = OnceLock::new();
    let mut keys = KEYS.get_or_init(Default::default).lock();
    if let Some(key) = keys.0.get(address).and_then(|w| w.upgrade()) {
        return key;
    }
    let key: Arc<str> = Arc::from(address);
    keys.0.insert(Box::from(address), Arc::downgrade(&key));
    // Forget addresses no server uses any more, whenever the map doubled since.
    if keys.0.len() > 2 * keys.1 + 64 {
        keys.0.retain(|_, w| w.strong_count() > 0);
        keys.1 = keys.0.len();
    }
    key
}

/// This gateway's zone, set once at start (for `local_first`).
static ZONE: OnceLock<Option<String>> = OnceLock::new();

pub fn set_zone(zone: Option<String>) {
    let _ = ZONE.set(zone);
}

/// Whether `ip` belongs to this host: binding to it succeeds only if it does.
fn ip_is_local(ip: IpAddr) -> bool {
    static CACHE: OnceLock<Mutex<HashMap<IpAddr, bool>>> = OnceLock::new();
    if ip.is_loopback() {
        return true;
    }
    let cache = CACHE.get_or_init(Default::default);
    if let Some(v) = cache.lock().get(&ip) {
        return *v;
    }
    let local = std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok();
    cache.lock().insert(ip, local);
    local
}

/// Local: in this gateway's zone when both have one (an explicit zone decides), else an
/// address of this host.
fn is_local(server: &Server, target: &Target) -> bool {
    if let (Some(Some(mine)), Some(theirs)) = (ZONE.get(), &server.zone) {
        return mine == theirs;
    }
    match target {
        Target::Addr(a) => ip_is_local(a.ip()),
        Target::Name(n) => n.starts_with("localhost:"),
    }
}

#[derive(Debug)]
enum Ring {
    None,
    Ketama(Ketama),
    Maglev(Maglev),
}

/// What the balancer needs to know about the request being placed.
#[derive(Debug, Default, Clone, Copy)]
pub struct Pick<'a> {
    /// Servers already tried by this request.
    pub tried: &'a [usize],
    /// The request key's hash, for `consistent_hash`.
    pub hash: Option<u64>,
}

/// What the balancer reads of every server, and what a request then needs of the one
/// it got, 32 bytes each in one array: picking among two servers and sending to one
/// reads one line, not each server's `ServerRuntime` (which is 4 times larger).
#[derive(Debug)]
pub struct Candidate {
    pub stats: Arc<ServerStats>,
    /// The pool key (the same string as `ServerRuntime::key`).
    pub key: Arc<str>,
    /// The configured weight.
    weight: u32,
    /// Admin state `up` and the registry lets it take traffic.
    up: bool,
    backup: bool,
}

/// Servers whose state lives inline in a worker's line.
const INLINE_SERVERS: usize = 3;

/// One worker's record for one upstream, in one line of its own: the smooth-weighted-
/// round-robin current weights and, for each server, the worker's counters (`Shard`),
/// so a request reaches them without reading the server's `ServerStats`.
#[derive(Debug)]
#[repr(align(64))]
struct WorkerLine(Mutex<LineState>);

const _: () = assert!(std::mem::size_of::<WorkerLine>() == 64);

#[derive(Debug)]
enum LineState {
    Inline {
        current: [i64; INLINE_SERVERS],
        shards: [Option<Arc<Shard>>; INLINE_SERVERS],
    },
    Heap {
        current: Box<[i64]>,
        shards: Box<[Option<Arc<Shard>>]>,
    },
}

impl LineState {
    fn new(weights: Vec<i64>) -> LineState {
        if weights.len() <= INLINE_SERVERS {
            let mut current = [0; INLINE_SERVERS];
            current[..weights.len()].copy_from_slice(&weights);
            LineState::Inline {
                current,
                shards: Default::default(),
            }
        } else {
            let shards = weights.iter().map(|_| None).collect();
            LineState::Heap {
                current: weights.into(),
                shards,
            }
        }
    }

    fn current(&mut self) -> &mut [i64] {
        match self {
            LineState::Inline { current, .. } => current,
            LineState::Heap { current, .. } => current,
        }
    }

    fn shards(&mut self) -> &mut [Option<Arc<Shard>>] {
        match self {
            LineState::Inline { shards, .. } => shards,
            LineState::Heap { shards, .. } => shards,
        }
    }
}

/// An upstream as the data plane uses it. The fields a request reads come first (in
/// the line of the reference count), copied out of `spec` so a request does not read
/// the larger spec record.
#[derive(Debug)]
#[repr(C)]
pub struct UpstreamRuntime {
    candidates: Box<[Candidate]>,
    /// One line per worker (as nginx keeps its round-robin state per worker process),
    /// so workers never share it: smooth-WRR current weights, counter addresses.
    lines: Box<[WorkerLine]>,
    /// Raised by the servers' records when one may stop taking requests.
    alarm: Arc<Alarm>,
    pub balance: Balance,
    /// `spec.hash_key` is set and `balance` is `consistent_hash`.
    pub hashes: bool,
    pub retries: u32,
    pub keepalive: u32,
    /// `spec.slow_start` in milliseconds.
    slow_start_ms: u64,
    pub servers: Vec<ServerRuntime>,
    pub read_timeout: std::time::Duration,
    pub spec: Arc<Upstream>,
    /// Rotates tie-breaks of `least_conn`.
    rotation: AtomicUsize,
    ring: Ring,
}

impl UpstreamRuntime {
    /// Builds the runtime form of `spec`, taking over the live records and balancer
    /// positions of the servers `previous` already had.
    pub fn build(spec: Arc<Upstream>, previous: Option<&UpstreamRuntime>) -> UpstreamRuntime {
        let shards = crate::stats::shard_count();
        let prev_rr: Option<Vec<Vec<i64>>> = previous.map(|p| {
            p.lines
                .iter()
                .map(|m| {
                    let mut w = m.0.lock();
                    w.current().iter().take(p.servers.len()).copied().collect()
                })
                .collect()
        });
        let alarm = previous.map(|p| p.alarm.clone()).unwrap_or_default();
        // Index of each previous server by address: large upstreams stay O(n).
        let prev_index: HashMap<&str, usize> = previous
            .map(|p| {
                p.servers
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (s.spec.address.as_str(), i))
                    .collect()
            })
            .unwrap_or_default();
        let mut rr: Vec<Vec<i64>> = vec![Vec::with_capacity(spec.servers.len()); shards];
        let servers: Vec<ServerRuntime> = spec
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
                            if s.state == ServerState::Up {
                                prev.stats
                                    .available_since_ms
                                    .store(mono_ms(), Ordering::Relaxed);
                            }
                        }
                        prev.stats.clone()
                    }
                    None => Arc::new(ServerStats::with_alarm(alarm.clone())),
                };
                for (k, shard) in rr.iter_mut().enumerate() {
                    shard.push(match (old, &prev_rr) {
                        (Some(i), Some(prev)) => {
                            prev.get(k).and_then(|v| v.get(i)).copied().unwrap_or(0)
                        }
                        _ => 0,
                    });
                }
                let target = match s.address.parse::<SocketAddr>() {
                    Ok(addr) => Target::Addr(addr),
                    Err(_) => Target::Name(Arc::from(s.address.as_str())),
                };
                let local = spec.balance == Balance::LocalFirst && is_local(s, &target);
                let registry_ok = match s.registry {
                    None | Some(RegistryStatus::Passing) => true,
                    Some(RegistryStatus::Warning) => spec.registry_include_warning,
                    Some(_) => false,
                };
                ServerRuntime {
                    spec: s.clone(),
                    key: pool_key(&s.address),
                    target,
                    stats,
                    local,
                    registry_ok,
                }
            })
            .collect();
        let ring = if spec.balance == Balance::ConsistentHash {
            let members: Vec<(&str, u32)> = spec
                .servers
                .iter()
                .map(|s| (s.address.as_str(), s.weight))
                .collect();
            match spec.hash_method {
                HashMethod::Ketama => Ring::Ketama(Ketama::build(&members)),
                HashMethod::Maglev => Ring::Maglev(Maglev::build(&members)),
            }
        } else {
            Ring::None
        };
        let candidates = servers
            .iter()
            .map(|s| Candidate {
                stats: s.stats.clone(),
                key: s.key.clone(),
                weight: s.spec.weight,
                up: s.spec.state == ServerState::Up && s.registry_ok,
                backup: s.spec.backup,
            })
            .collect();
        UpstreamRuntime {
            candidates,
            lines: rr
                .into_iter()
                .map(|w| WorkerLine(Mutex::new(LineState::new(w))))
                .collect(),
            alarm,
            balance: spec.balance,
            hashes: spec.balance == Balance::ConsistentHash && spec.hash_key.is_some(),
            retries: spec.retries,
            keepalive: spec.keepalive,
            slow_start_ms: spec.slow_start.as_millis().min(u64::MAX as u128) as u64,
            read_timeout: spec.read_timeout,
            servers,
            spec,
            rotation: AtomicUsize::new(0),
            ring,
        }
    }

    /// What a request needs of server `i` (stats record, pool key).
    pub fn candidate(&self, i: usize) -> &Candidate {
        &self.candidates[i]
    }

    /// The calling worker's counters for server `i`, from the worker's line (the
    /// server's `ServerStats` is read only the first time).
    pub fn shard(&self, i: usize) -> Arc<Shard> {
        let k = crate::stats::current_shard();
        let stats = &self.candidates[i].stats;
        let Some(line) = self.lines.get(k % self.lines.len().max(1)) else {
            return stats.shard_at(k).clone();
        };
        let mut line = line.0.lock();
        match line.shards().get_mut(i) {
            Some(Some(shard)) => shard.clone(),
            Some(slot) => slot.insert(stats.shard_at(k).clone()).clone(),
            None => stats.shard_at(k).clone(),
        }
    }

    /// Takes new requests: admin state `up`, the registry's verdict (registry-fed), not
    /// unhealthy, not skipped, not ejected.
    pub fn available(&self, i: usize, now: u64) -> bool {
        self.candidates[i].up && self.servers[i].stats.healthy(now)
    }

    /// Whether every server's record says it takes requests, without reading them while
    /// the upstream's alarm is quiet. Otherwise looks at each, and quiets the alarm when
    /// all are fine again.
    fn all_healthy(&self, now: u64) -> bool {
        if self.alarm.quiet() {
            return true;
        }
        let mark = self.alarm.mark();
        if self.servers.iter().all(|s| s.stats.healthy(now)) {
            self.alarm.clear(mark);
            return true;
        }
        false
    }

    /// Weight after slow start, in hundredths so a ramp is smooth.
    fn effective_weight(&self, i: usize, now: u64) -> u64 {
        let full = self.candidates[i].weight as u64 * 100;
        let ramp = self.slow_start_ms;
        if ramp == 0 {
            return full;
        }
        let since = self.servers[i]
            .stats
            .available_since_ms
            .load(Ordering::Relaxed);
        let elapsed = now.saturating_sub(since);
        if elapsed >= ramp {
            full
        } else {
            (full * elapsed / ramp).max(1)
        }
    }

    /// The current effective weight (for status pages), in the configured unit.
    pub fn current_weight(&self, i: usize) -> f64 {
        self.effective_weight(i, mono_ms()) as f64 / 100.0
    }

    /// Picks a server for a request, or `None` when no server takes new requests.
    /// Backup servers are used only when no primary is available.
    pub fn select(&self, pick: &Pick) -> Option<usize> {
        let now = mono_ms();
        let healthy = self.all_healthy(now);
        let usable = |i: usize| {
            !pick.tried.contains(&i)
                && self.candidates[i].up
                && (healthy || self.servers[i].stats.healthy(now))
        };
        if self.balance == Balance::LocalFirst {
            let saturation = self.spec.local_saturation as u64;
            let local_ok = |i: usize| {
                let s = &self.servers[i];
                s.local && !s.spec.backup && s.stats.in_flight() < saturation && usable(i)
            };
            if let Some(i) = self.swrr(now, local_ok) {
                return Some(i);
            }
            return self
                .swrr(now, |i| !self.servers[i].spec.backup && usable(i))
                .or_else(|| self.swrr(now, |i| self.servers[i].spec.backup && usable(i)));
        }
        for backup in [false, true] {
            let ok = |i: usize| self.candidates[i].backup == backup && usable(i);
            let found = match self.balance {
                Balance::RoundRobin | Balance::LocalFirst => self.swrr(now, ok),
                Balance::LeastConn => self.least_conn(now, ok),
                Balance::Random => self.weighted_random(now, ok),
                Balance::P2cEwma => self.p2c_ewma(now, ok),
                Balance::ConsistentHash => match pick.hash {
                    Some(h) => self.by_hash(h, ok),
                    None => self.swrr(now, ok),
                },
            };
            if found.is_some() {
                return found;
            }
        }
        None
    }

    fn swrr(&self, now: u64, ok: impl Fn(usize) -> bool) -> Option<usize> {
        let shard = crate::stats::current_shard() % self.lines.len().max(1);
        let mut line = self.lines.get(shard)?.0.lock();
        let current = line.current();
        let mut total: i64 = 0;
        let mut best: Option<usize> = None;
        for i in 0..self.candidates.len().min(current.len()) {
            if !ok(i) {
                continue;
            }
            let weight = self.effective_weight(i, now) as i64;
            current[i] += weight;
            total += weight;
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        current[b] -= total;
        Some(b)
    }

    fn least_conn(&self, now: u64, ok: impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.servers.len();
        if n == 0 {
            return None;
        }
        let start = self.rotation.fetch_add(1, Ordering::Relaxed) % n;
        let mut best: Option<(usize, u64, u64)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            if !ok(i) {
                continue;
            }
            let load = self.servers[i].stats.in_flight() + 1;
            let weight = self.effective_weight(i, now);
            // load/weight < best_load/best_weight, without division.
            if best.is_none_or(|(_, bl, bw)| {
                (load as u128) * (bw as u128) < (bl as u128) * (weight as u128)
            }) {
                best = Some((i, load, weight));
            }
        }
        best.map(|(i, _, _)| i)
    }

    fn weighted_random(&self, now: u64, ok: impl Fn(usize) -> bool) -> Option<usize> {
        let total: u64 = (0..self.servers.len())
            .filter(|i| ok(*i))
            .map(|i| self.effective_weight(i, now))
            .sum();
        if total == 0 {
            return None;
        }
        let mut r = balance::random_u64() % total;
        for i in 0..self.servers.len() {
            if !ok(i) {
                continue;
            }
            let w = self.effective_weight(i, now);
            if r < w {
                return Some(i);
            }
            r -= w;
        }
        None
    }

    /// Two weighted-random candidates; the one with the lower peak-EWMA latency ×
    /// (in-flight + 1) per weight wins.
    fn p2c_ewma(&self, now: u64, ok: impl Fn(usize) -> bool + Copy) -> Option<usize> {
        let a = self.weighted_random(now, ok)?;
        let b = match self.weighted_random(now, |i| i != a && ok(i)) {
            Some(b) => b,
            None => return Some(a),
        };
        let cost = |i: usize| {
            let s = &self.servers[i].stats;
            s.ewma_us() * (s.in_flight() + 1) as f64 / self.effective_weight(i, now) as f64
        };
        Some(if cost(b) < cost(a) { b } else { a })
    }

    fn by_hash(&self, hash: u64, ok: impl Fn(usize) -> bool) -> Option<usize> {
        match &self.ring {
            Ring::Ketama(ring) => ring.walk(hash).find(|i| ok(*i)),
            Ring::Maglev(table) => {
                // The key's own slot, then deterministic re-hashes, then a scan: a key
                // whose server is unavailable always lands on the same other server.
                let mut h = hash;
                for _ in 0..16 {
                    let i = table.lookup(h)?;
                    if ok(i) {
                        return Some(i);
                    }
                    h = balance::mix(h.wrapping_add(0x9e3779b97f4a7c15));
                }
                let n = self.servers.len();
                (0..n).map(|k| (hash as usize + k) % n).find(|i| ok(*i))
            }
            Ring::None => None,
        }
    }

    /// A failed attempt on server `i` (connect error, timeout, 5xx): feeds nginx-style
    /// passive health and outlier detection. Passive health never skips the last
    /// available server (nginx never marks the only server of a group unavailable):
    /// its next requests probe it, so one failed exchange cannot answer 503 to everyone
    /// for `fail_timeout`. Protected mode never ejects the last available server, and
    /// at most `max_ejection_percent` are ejected at once.
    pub fn record_failure(&self, i: usize) {
        let spec = &self.spec;
        let stats = &self.servers[i].stats;
        let max_fails = if spec.max_fails > 0 && !self.others_available(i, mono_ms()) {
            0
        } else {
            spec.max_fails
        };
        stats.record_failure(max_fails, spec.fail_timeout.as_millis() as u64);
        self.record_outlier_failure(i);
    }

    /// Whether a server other than `i` takes new requests now.
    fn others_available(&self, i: usize, now: u64) -> bool {
        (0..self.servers.len()).any(|j| j != i && self.available(j, now))
    }

    /// A 5xx answer: not a broken attempt, but an outlier signal.
    pub fn record_outlier_failure(&self, i: usize) {
        let o = &self.spec.outlier;
        if o.consecutive_failures == 0 {
            return;
        }
        let stats = &self.servers[i].stats;
        if stats.outlier_failure() < o.consecutive_failures {
            return;
        }
        let now = mono_ms();
        if stats.ejected(now) {
            return;
        }
        let n = self.servers.len();
        let ejected = (0..n)
            .filter(|j| self.servers[*j].stats.ejected(now))
            .count();
        let cap = (n * o.max_ejection_percent as usize / 100).max(1);
        if ejected >= cap {
            return;
        }
        if o.protected && !self.others_available(i, now) {
            return;
        }
        stats.eject(
            o.base_ejection_time.as_millis() as u64,
            o.max_ejection_time.as_millis() as u64,
        );
        tracing::warn!(upstream = %self.spec.name, server = %self.servers[i].spec.address, "outlier ejected");
    }
}

/// Everything a request needs to be routed, published atomically as one value.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub revision: u64,
    pub routes: Arc<RouteTable>,
    pub upstreams: imbl::HashMap<String, Arc<UpstreamRuntime>>,
    /// The runtime of each upstream slot of `routes` (`None`: no such upstream), so a
    /// request goes from its route to its upstream by index. Kept in step with
    /// `upstreams` by `new` and `upstream_changed`.
    resolved: Vec<Option<Arc<UpstreamRuntime>>>,
}

impl Snapshot {
    pub fn new(
        revision: u64,
        routes: Arc<RouteTable>,
        upstreams: imbl::HashMap<String, Arc<UpstreamRuntime>>,
    ) -> Snapshot {
        let resolved = routes
            .upstream_names()
            .iter()
            .map(|name| upstreams.get(&**name).cloned())
            .collect();
        Snapshot {
            revision,
            routes,
            upstreams,
            resolved,
        }
    }

    /// The snapshot with upstream `name` replaced (`None`: removed).
    pub fn set_upstream(&mut self, name: &str, runtime: Option<Arc<UpstreamRuntime>>) {
        if let Some(slot) = self.routes.upstream_slot(name) {
            if let Some(r) = self.resolved.get_mut(slot as usize) {
                *r = runtime.clone();
            }
        }
        match runtime {
            Some(rt) => {
                self.upstreams.insert(name.to_string(), rt);
            }
            None => {
                self.upstreams.remove(name);
            }
        }
    }

    /// The snapshot with another route table, its upstreams resolved again.
    pub fn set_routes(&mut self, routes: Arc<RouteTable>) {
        *self = Snapshot::new(self.revision, routes, std::mem::take(&mut self.upstreams));
    }

    /// The upstream a route leads to, if it exists.
    pub fn upstream_for(&self, route: &RouteEntry) -> Option<&Arc<UpstreamRuntime>> {
        self.resolved.get(route.upstream_slot as usize)?.as_ref()
    }

    /// The upstream of upstream slot `slot` (`RouteEntry::upstream_slot`), if it exists.
    pub fn upstream_at(&self, slot: u32) -> Option<&Arc<UpstreamRuntime>> {
        self.resolved.get(slot as usize)?.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn upstream(balance: Balance, weights: &[u32]) -> UpstreamRuntime {
        let servers = weights
            .iter()
            .enumerate()
            .map(|(i, w)| Server {
                weight: *w,
                ..Server::new(format!("127.0.0.{}:80", i + 1))
            })
            .collect();
        let mut spec = Upstream::new("u", servers);
        spec.balance = balance;
        if balance == Balance::ConsistentHash {
            spec.hash_key = Some("uri".into());
        }
        UpstreamRuntime::build(Arc::new(spec), None)
    }

    fn spread(up: &UpstreamRuntime, n: usize) -> Vec<usize> {
        let mut counts = vec![0; up.servers.len()];
        for _ in 0..n {
            counts[up.select(&Pick::default()).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn smooth_weighted_round_robin_like_nginx() {
        let up = upstream(Balance::RoundRobin, &[5, 1, 1]);
        let picks: Vec<usize> = (0..7)
            .map(|_| up.select(&Pick::default()).unwrap())
            .collect();
        // nginx's documented sequence for weights 5,1,1: a a b a c a a
        assert_eq!(picks, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn unhealthy_server_is_skipped_at_once_and_back_after_recovery() {
        let up = upstream(Balance::RoundRobin, &[1, 1, 1]);
        assert_eq!(spread(&up, 30), vec![10, 10, 10]);
        up.servers[1].stats.set_health(Health::Unhealthy);
        assert_eq!(spread(&up, 30), vec![15, 0, 15]);
        up.servers[1].stats.set_health(Health::Healthy);
        let c = spread(&up, 30);
        assert!(c.iter().all(|n| (9..=11).contains(n)), "{c:?}");
        // Passive health (max_fails) and ejection too.
        up.servers[2].stats.record_failure(1, 60_000);
        assert_eq!(spread(&up, 30)[2], 0);
        up.servers[0].stats.eject(60_000, 60_000);
        assert_eq!(spread(&up, 10), vec![0, 10, 0]);
        // A rebuilt runtime keeps the records and their alarm.
        let again = UpstreamRuntime::build(up.spec.clone(), Some(&up));
        assert_eq!(spread(&again, 10), vec![0, 10, 0]);
    }

    #[test]
    fn passive_health_never_skips_the_last_available_server() {
        let mut spec = Upstream::new("u", vec![Server::new("127.0.0.1:1")]);
        spec.max_fails = 1;
        let single = UpstreamRuntime::build(Arc::new(spec), None);
        for _ in 0..5 {
            single.record_failure(0);
        }
        assert_eq!(single.select(&Pick::default()), Some(0));
        assert_eq!(single.servers[0].stats.failures.load(Ordering::Relaxed), 5);

        // Of two, the first to fail is skipped; the second, now the last, is not.
        let mut spec = Upstream::new(
            "u",
            vec![Server::new("127.0.0.1:1"), Server::new("127.0.0.1:2")],
        );
        spec.max_fails = 1;
        let pair = UpstreamRuntime::build(Arc::new(spec), None);
        pair.record_failure(0);
        assert_eq!(spread(&pair, 10), vec![0, 10]);
        pair.record_failure(1);
        assert_eq!(spread(&pair, 10), vec![0, 10]);
    }

    #[test]
    fn snapshot_resolves_routes_to_the_current_upstreams() {
        use crate::routing::RouteTable;
        use dynagate_model::Route;
        let routes: Vec<Arc<Route>> = vec![
            Arc::new(Route::new("r1", &["one.example"], "/", "u1")),
            Arc::new(Route::new("r2", &["two.example"], "/", "u2")),
            Arc::new(Route::new("r3", &["three.example"], "/", "u1")),
        ];
        let build = |name: &str, port: u16| {
            let spec = Upstream::new(name, vec![Server::new(format!("127.0.0.1:{port}"))]);
            Arc::new(UpstreamRuntime::build(Arc::new(spec), None))
        };
        let mut upstreams = imbl::HashMap::new();
        upstreams.insert("u1".to_string(), build("u1", 1));
        let table = Arc::new(RouteTable::build(routes.iter()));
        let mut snap = Snapshot::new(1, table, upstreams);
        let target = |snap: &Snapshot, host: &str| {
            let route = snap.routes.find(host, "/", "GET")?;
            snap.upstream_for(route)
                .map(|u| u.servers[0].spec.address.clone())
        };
        assert_eq!(target(&snap, "one.example").as_deref(), Some("127.0.0.1:1"));
        assert_eq!(
            target(&snap, "three.example").as_deref(),
            Some("127.0.0.1:1")
        );
        assert_eq!(target(&snap, "two.example"), None, "u2 does not exist yet");
        // An upstream appears, another changes: routes follow without a table rebuild.
        let old = snap.clone();
        snap.set_upstream("u2", Some(build("u2", 2)));
        snap.set_upstream("u1", Some(build("u1", 11)));
        assert_eq!(target(&snap, "two.example").as_deref(), Some("127.0.0.1:2"));
        assert_eq!(
            target(&snap, "one.example").as_deref(),
            Some("127.0.0.1:11")
        );
        assert_eq!(
            target(&snap, "three.example").as_deref(),
            Some("127.0.0.1:11")
        );
        // The earlier snapshot is untouched.
        assert_eq!(target(&old, "one.example").as_deref(), Some("127.0.0.1:1"));
        // An upstream no route uses only changes the map.
        snap.set_upstream("u9", Some(build("u9", 9)));
        assert!(snap.upstreams.contains_key("u9"));
        // Removed: its routes have no upstream.
        snap.set_upstream("u2", None);
        assert_eq!(target(&snap, "two.example"), None);
        // A new route table resolves against the current upstreams.
        let mut routes = routes;
        routes.push(Arc::new(Route::new("r9", &["nine.example"], "/", "u9")));
        snap.set_routes(Arc::new(RouteTable::build(routes.iter())));
        assert_eq!(
            target(&snap, "nine.example").as_deref(),
            Some("127.0.0.1:9")
        );
        assert_eq!(
            target(&snap, "one.example").as_deref(),
            Some("127.0.0.1:11")
        );
        assert_eq!(target(&snap, "two.example"), None);
    }

    #[test]
    fn weighted_random_follows_weights() {
        let c = spread(&upstream(Balance::Random, &[3, 1]), 20_000);
        let share = c[0] as f64 / 20_000.0;
        assert!((0.72..0.78).contains(&share), "{c:?}");
    }

    #[test]
    fn least_conn_prefers_the_idle_server() {
        let up = upstream(Balance::LeastConn, &[1, 1]);
        let _busy = (0..3)
            .map(|_| InFlight::start(&up.servers[0].stats))
            .collect::<Vec<_>>();
        assert_eq!(spread(&up, 10), vec![0, 10]);
    }

    #[test]
    fn p2c_ewma_avoids_the_slow_server() {
        let up = upstream(Balance::P2cEwma, &[1, 1]);
        let route = crate::stats::route_number("r");
        up.servers[0]
            .stats
            .record_response(route, 200, 200_000, true);
        up.servers[1].stats.record_response(route, 200, 1_000, true);
        let c = spread(&up, 1000);
        assert!(c[1] > 950, "{c:?}");
    }

    #[test]
    fn consistent_hash_is_sticky_and_fails_over() {
        for method in [HashMethod::Ketama, HashMethod::Maglev] {
            let mut spec = Upstream::new(
                "u",
                (1..=5)
                    .map(|i| Server::new(format!("127.0.0.{i}:80")))
                    .collect(),
            );
            spec.balance = Balance::ConsistentHash;
            spec.hash_key = Some("uri".into());
            spec.hash_method = method;
            let up = UpstreamRuntime::build(Arc::new(spec.clone()), None);
            let h = balance::hash64(b"/cart/42");
            let first = up
                .select(&Pick {
                    tried: &[],
                    hash: Some(h),
                })
                .unwrap();
            for _ in 0..10 {
                assert_eq!(
                    up.select(&Pick {
                        tried: &[],
                        hash: Some(h)
                    }),
                    Some(first)
                );
            }
            let other = up
                .select(&Pick {
                    tried: &[first],
                    hash: Some(h),
                })
                .unwrap();
            assert_ne!(other, first);
            spec.servers[first].state = ServerState::Drain;
            let drained = UpstreamRuntime::build(Arc::new(spec), Some(&up));
            assert_eq!(
                drained.select(&Pick {
                    tried: &[],
                    hash: Some(h)
                }),
                Some(other),
                "{method:?}"
            );
        }
    }

    #[test]
    fn backup_only_without_primaries_and_state_survives_rebuild() {
        let mut servers = vec![Server::new("127.0.0.1:1"), Server::new("127.0.0.1:2")];
        servers[1].backup = true;
        let up = UpstreamRuntime::build(Arc::new(Upstream::new("u", servers.clone())), None);
        assert_eq!(up.select(&Pick::default()), Some(0));
        assert_eq!(
            up.select(&Pick {
                tried: &[0],
                hash: None
            }),
            Some(1)
        );
        up.servers[0].stats.set_health(Health::Unhealthy);
        assert_eq!(up.select(&Pick::default()), Some(1));
        servers[0].state = ServerState::Drain;
        let up2 = UpstreamRuntime::build(Arc::new(Upstream::new("u", servers.clone())), Some(&up));
        assert!(Arc::ptr_eq(&up.servers[0].stats, &up2.servers[0].stats));
        // Health came back while drained: still drained, still not selected.
        up2.servers[0].stats.set_health(Health::Healthy);
        assert_eq!(up2.select(&Pick::default()), Some(1));
        assert_eq!(up2.servers[0].spec.state, ServerState::Drain);
    }

    #[test]
    fn outlier_ejection_protects_the_last_server_and_caps_the_share() {
        let up = upstream(Balance::RoundRobin, &[1, 1, 1, 1]);
        for i in 0..4 {
            for _ in 0..5 {
                up.record_outlier_failure(i);
            }
        }
        let now = mono_ms();
        let ejected = (0..4).filter(|i| up.servers[*i].stats.ejected(now)).count();
        assert_eq!(ejected, 2, "max_ejection_percent 50 of 4");

        let single = upstream(Balance::RoundRobin, &[1]);
        for _ in 0..10 {
            single.record_outlier_failure(0);
        }
        assert!(
            !single.servers[0].stats.ejected(mono_ms()),
            "protected mode"
        );
        assert_eq!(single.select(&Pick::default()), Some(0));
    }

    #[test]
    fn slow_start_ramps_weight() {
        let mut spec = Upstream::new(
            "u",
            vec![Server::new("127.0.0.1:1"), Server::new("127.0.0.1:2")],
        );
        spec.slow_start = Duration::from_secs(100);
        let up = UpstreamRuntime::build(Arc::new(spec.clone()), None);
        let now = mono_ms();
        up.servers[1]
            .stats
            .available_since_ms
            .store(now, Ordering::Relaxed);
        assert_eq!(up.effective_weight(1, now + 100_000), 100);
        assert_eq!(up.effective_weight(1, now + 50_000), 50);
        assert_eq!(up.effective_weight(1, now), 1);

        // A server long available against one that just came back.
        spec.slow_start = Duration::from_millis(5);
        let up = UpstreamRuntime::build(Arc::new(spec), None);
        std::thread::sleep(Duration::from_millis(10));
        up.servers[0]
            .stats
            .available_since_ms
            .store(0, Ordering::Relaxed);
        up.servers[1]
            .stats
            .available_since_ms
            .store(u64::MAX / 2, Ordering::Relaxed);
        let c = spread(&up, 1000);
        assert!(c[1] < 30, "{c:?}");
    }

    #[test]
    fn local_first_prefers_local_and_spills_over() {
        let mut spec = Upstream::new(
            "u",
            vec![Server::new("192.0.2.10:80"), Server::new("127.0.0.1:80")],
        );
        spec.balance = Balance::LocalFirst;
        spec.local_saturation = 2;
        let up = UpstreamRuntime::build(Arc::new(spec), None);
        assert!(!up.servers[0].local && up.servers[1].local);
        assert_eq!(spread(&up, 10), vec![0, 10]);
        let _busy = (0..2)
            .map(|_| InFlight::start(&up.servers[1].stats))
            .collect::<Vec<_>>();
        assert_eq!(
            up.select(&Pick::default()),
            Some(0),
            "saturated local spills over"
        );
    }
}
