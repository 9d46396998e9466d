//! Live state of one server of one upstream — the one record where admin state (in the
//! spec), active health, passive health, outlier ejection and counters meet. It outlives
//! snapshots: a new `UpstreamRuntime` takes the record of every server it keeps, so no
//! change ever loses another (a drained server stays drained when its health flips;
//! health survives unrelated configuration changes).

use parking_lot::Mutex;
use std::cell::Cell;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

// Counters written on every request are kept per worker thread ("shard"), so two workers
// serving the same server never write the same cache line; readers add the shards up.
// Shard 0 is for threads that are not data-plane workers.
static SHARDS: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// Sets how many shards records have: one per worker plus one. Call before building
/// records (at start).
pub fn set_shard_count(n: usize) {
    SHARDS.store(n.max(1), Ordering::Relaxed);
}

pub fn shard_count() -> usize {
    SHARDS.load(Ordering::Relaxed)
}

/// Marks the calling thread as worker `i` (shard `i + 1`).
pub fn set_worker_shard(i: usize) {
    SHARD.with(|s| s.set(i + 1));
}

pub fn current_shard() -> usize {
    SHARD.with(|s| s.get())
}

/// One worker's share of a server's per-request counters, on its own cache lines.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Shard {
    in_flight: AtomicI64,
    requests: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BOUNDS_MS.len() + 1],
    latency_sum_us: AtomicU64,
    /// Responses by route and status class.
    by_route: Mutex<RouteCounters>,
}

/// Status-class counters by route. Found by the address of the route table's shared id
/// string (one hash of a pointer per response, however many routes point here); a
/// route table rebuilt later hands out new ids, which find their row by name once.
#[derive(Debug, Default)]
struct RouteCounters {
    rows: Vec<(Arc<str>, ClassCounts)>,
    /// Holds the id it is keyed by, so the address cannot be reused by another string.
    by_ptr: std::collections::HashMap<usize, (Arc<str>, usize), PtrHash>,
}

/// Pointers are already well spread: a multiply-shift hash is enough.
#[derive(Debug, Default, Clone, Copy)]
struct PtrHash;

impl std::hash::BuildHasher for PtrHash {
    type Hasher = PtrHasher;
    fn build_hasher(&self) -> PtrHasher {
        PtrHasher(0)
    }
}

#[derive(Debug, Default)]
struct PtrHasher(u64);

impl std::hash::Hasher for PtrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ *b as u64).wrapping_mul(0x100000001b3);
        }
    }
    fn write_usize(&mut self, n: usize) {
        self.0 = (n as u64).wrapping_mul(0x9e3779b97f4a7c15);
    }
}

impl RouteCounters {
    fn row(&mut self, route: &Arc<str>) -> &mut ClassCounts {
        let key = Arc::as_ptr(route) as *const u8 as usize;
        let index = match self.by_ptr.get(&key) {
            Some((_, i)) => *i,
            None => {
                // Ids of route tables long replaced: forget them (they re-resolve by name).
                if self.by_ptr.len() > 4 * self.rows.len() + 16 {
                    self.by_ptr.clear();
                }
                let i = match self.rows.iter().position(|(r, _)| **r == **route) {
                    Some(i) => i,
                    None => {
                        self.rows.push((route.clone(), [0; 5]));
                        self.rows.len() - 1
                    }
                };
                self.by_ptr.insert(key, (route.clone(), i));
                i
            }
        };
        &mut self.rows[index].1
    }
}

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

/// Upper bounds of the latency histogram buckets, in milliseconds (+Inf follows).
pub const LATENCY_BOUNDS_MS: [f64; 14] = [
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    /// No active check configured, or none finished yet: treated as healthy.
    Unchecked = 0,
    Healthy = 1,
    Unhealthy = 2,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unchecked => "unchecked",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

/// The outcome of the last active check.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckResult {
    pub time_ms: u64,
    pub ok: bool,
    pub message: String,
}

/// Responses by status class (1xx..5xx), for one route.
pub type ClassCounts = [u64; 5];

#[derive(Debug)]
pub struct ServerStats {
    /// Per-worker counters, each allocated when its worker first serves this server.
    shards: Box<[OnceLock<Box<Shard>>]>,
    /// Failed attempts: connect errors, timeouts, broken responses.
    pub failures: AtomicU64,
    /// Wall-clock time of the last change of admin state, health or ejection.
    pub last_state_change_ms: AtomicU64,

    // Passive health, nginx style: max_fails within fail_timeout skip the server.
    window_fails: AtomicU32,
    window_start_ms: AtomicU64,
    skip_until_ms: AtomicU64,

    // Outlier detection.
    consecutive_failures: AtomicU32,
    ejected_until_ms: AtomicU64,
    pub ejections: AtomicU64,
    last_ejection_ms: AtomicU64,

    // Active health.
    health: AtomicU8,
    /// The outcome of the last active check, rewritten only when it changes ...
    last_check: Mutex<Option<CheckResult>>,
    /// ... and the time of the last check, written by every check.
    last_check_ms: AtomicU64,

    /// Monotonic time since which the server is available (slow start ramps from it).
    pub available_since_ms: AtomicU64,

    /// Peak-EWMA of response-head latency in microseconds (f64 bits), and its time.
    ewma_us: AtomicU64,
    ewma_at_ms: AtomicU64,
}

impl Default for ServerStats {
    fn default() -> Self {
        ServerStats {
            shards: (0..shard_count()).map(|_| OnceLock::new()).collect(),
            failures: AtomicU64::new(0),
            last_state_change_ms: AtomicU64::new(unix_ms()),
            window_fails: AtomicU32::new(0),
            window_start_ms: AtomicU64::new(0),
            skip_until_ms: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            last_ejection_ms: AtomicU64::new(0),
            health: AtomicU8::new(Health::Unchecked as u8),
            last_check: Mutex::new(None),
            last_check_ms: AtomicU64::new(0),
            available_since_ms: AtomicU64::new(mono_ms()),
            ewma_us: AtomicU64::new(DEFAULT_EWMA_US.to_bits()),
            ewma_at_ms: AtomicU64::new(0),
        }
    }
}

/// A server never measured is assumed this slow, so one fresh server is not flooded.
const DEFAULT_EWMA_US: f64 = 10_000.0;
/// Decay time of the latency EWMA.
const EWMA_TAU_MS: f64 = 10_000.0;

impl ServerStats {
    pub fn new_now() -> Self {
        ServerStats::default()
    }

    fn shard_at(&self, i: usize) -> &Shard {
        self.shards[i % self.shards.len()].get_or_init(Box::default)
    }

    fn shards(&self) -> impl Iterator<Item = &Shard> {
        self.shards.iter().filter_map(|s| s.get().map(|b| &**b))
    }

    /// Requests being served now.
    pub fn in_flight(&self) -> u64 {
        self.shards()
            .map(|s| s.in_flight.load(Ordering::Relaxed))
            .sum::<i64>()
            .max(0) as u64
    }

    /// Requests sent to this server.
    pub fn requests(&self) -> u64 {
        self.shards()
            .map(|s| s.requests.load(Ordering::Relaxed))
            .sum()
    }

    /// Latency histogram counts (not cumulative), one per bound plus one above.
    pub fn latency_counts(&self) -> Vec<u64> {
        let mut counts = vec![0; LATENCY_BOUNDS_MS.len() + 1];
        for s in self.shards() {
            for (c, b) in counts.iter_mut().zip(&s.latency_buckets) {
                *c += b.load(Ordering::Relaxed);
            }
        }
        counts
    }

    pub fn latency_sum_us(&self) -> u64 {
        self.shards()
            .map(|s| s.latency_sum_us.load(Ordering::Relaxed))
            .sum()
    }

    /// Responses by route and status class, added up over the workers.
    pub fn by_route(&self) -> Vec<(Arc<str>, ClassCounts)> {
        let mut out: Vec<(Arc<str>, ClassCounts)> = Vec::new();
        for s in self.shards() {
            for (route, counts) in s.by_route.lock().rows.iter() {
                match out.iter_mut().find(|(r, _)| r == route) {
                    Some((_, total)) => {
                        for (t, c) in total.iter_mut().zip(counts) {
                            *t += c;
                        }
                    }
                    None => out.push((route.clone(), *counts)),
                }
            }
        }
        out
    }

    fn mark_changed(&self) {
        self.last_state_change_ms
            .store(unix_ms(), Ordering::Relaxed);
    }

    pub fn health(&self) -> Health {
        match self.health.load(Ordering::Relaxed) {
            1 => Health::Healthy,
            2 => Health::Unhealthy,
            _ => Health::Unchecked,
        }
    }

    /// Sets the active-health verdict; a server coming back starts its slow start.
    pub fn set_health(&self, h: Health) {
        let old = self.health.swap(h as u8, Ordering::Relaxed);
        if old != h as u8 {
            if old == Health::Unhealthy as u8 {
                self.available_since_ms.store(mono_ms(), Ordering::Relaxed);
            }
            self.mark_changed();
        }
    }

    /// The last active check: its outcome and when it was made.
    pub fn last_check(&self) -> Option<CheckResult> {
        let mut last = self.last_check.lock().clone()?;
        last.time_ms = last.time_ms.max(self.last_check_ms.load(Ordering::Relaxed));
        Some(last)
    }

    /// Records an active check made at `time_ms`. `changed` is its outcome (passed, message)
    /// when that differs from the previous check's; an unchanged outcome costs one store.
    pub fn record_check(&self, time_ms: u64, changed: Option<(bool, String)>) {
        if let Some((ok, message)) = changed {
            *self.last_check.lock() = Some(CheckResult {
                time_ms,
                ok,
                message,
            });
        }
        self.last_check_ms.store(time_ms, Ordering::Relaxed);
    }

    pub fn passive_skipped(&self, now_ms: u64) -> bool {
        self.skip_until_ms.load(Ordering::Relaxed) > now_ms
    }

    pub fn ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }

    /// Takes new requests as far as health goes (admin state is checked by the caller).
    pub fn healthy(&self, now_ms: u64) -> bool {
        self.health.load(Ordering::Relaxed) != Health::Unhealthy as u8
            && !self.passive_skipped(now_ms)
            && !self.ejected(now_ms)
    }

    /// nginx semantics: `max_fails` failed attempts within `fail_timeout` skip the server
    /// for `fail_timeout`.
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
            self.available_since_ms
                .store(now + fail_timeout_ms, Ordering::Relaxed);
            self.mark_changed();
        }
    }

    pub fn record_success(&self) {
        if self.window_fails.load(Ordering::Relaxed) != 0 {
            self.window_fails.store(0, Ordering::Relaxed);
        }
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// Counts one more consecutive failure for outlier detection and returns the count.
    pub fn outlier_failure(&self) -> u32 {
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Ejects the server; the time grows with each ejection since it last stayed in
    /// for `max_ms`, up to `max_ms`.
    pub fn eject(&self, base_ms: u64, max_ms: u64) {
        let now = mono_ms();
        let last = self.last_ejection_ms.load(Ordering::Relaxed);
        let streak = if last != 0 && now.saturating_sub(last) < max_ms.saturating_mul(2) {
            self.ejections.load(Ordering::Relaxed) + 1
        } else {
            1
        };
        let time = base_ms.saturating_mul(streak).min(max_ms);
        self.ejections.fetch_add(1, Ordering::Relaxed);
        self.last_ejection_ms.store(now, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.ejected_until_ms.store(now + time, Ordering::Relaxed);
        self.available_since_ms.store(now + time, Ordering::Relaxed);
        self.mark_changed();
    }

    /// Records one response: latency, status class by route, EWMA.
    pub fn record_response(&self, route: &Arc<str>, status: u16, elapsed_us: u64) {
        let class = ((status / 100).clamp(1, 5) - 1) as usize;
        let shard = self.shard_at(current_shard());
        shard.by_route.lock().row(route)[class] += 1;
        let ms = elapsed_us as f64 / 1000.0;
        let bucket = LATENCY_BOUNDS_MS
            .iter()
            .position(|b| ms <= *b)
            .unwrap_or(LATENCY_BOUNDS_MS.len());
        shard.latency_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        shard
            .latency_sum_us
            .fetch_add(elapsed_us, Ordering::Relaxed);
        self.observe_latency(elapsed_us as f64);
    }

    /// Responses by status class over all routes.
    pub fn class_totals(&self) -> ClassCounts {
        let mut total = [0; 5];
        for (_, counts) in self.by_route() {
            for (t, c) in total.iter_mut().zip(counts) {
                *t += c;
            }
        }
        total
    }

    fn decay(&self, now: u64) -> f64 {
        let at = self.ewma_at_ms.load(Ordering::Relaxed);
        (-((now.saturating_sub(at)) as f64) / EWMA_TAU_MS).exp()
    }

    fn observe_latency(&self, rtt_us: f64) {
        let now = mono_ms();
        let prev = f64::from_bits(self.ewma_us.load(Ordering::Relaxed));
        let next = if rtt_us > prev || self.ewma_at_ms.load(Ordering::Relaxed) == 0 {
            rtt_us // peak: jump up at once
        } else {
            let w = self.decay(now);
            prev * w + rtt_us * (1.0 - w)
        };
        self.ewma_us.store(next.to_bits(), Ordering::Relaxed);
        self.ewma_at_ms.store(now, Ordering::Relaxed);
    }

    /// Peak-EWMA latency in microseconds, decayed toward zero since the last
    /// observation, so a server that was slow once is tried again in time.
    pub fn ewma_us(&self) -> f64 {
        let v = f64::from_bits(self.ewma_us.load(Ordering::Relaxed));
        if self.ewma_at_ms.load(Ordering::Relaxed) == 0 {
            return v;
        }
        v * self.decay(mono_ms())
    }
}

/// Counts a request as in flight on a server until dropped (on the shard it started on).
#[derive(Debug)]
pub struct InFlight {
    stats: Arc<ServerStats>,
    shard: usize,
}

impl InFlight {
    pub fn start(stats: &Arc<ServerStats>) -> Self {
        let shard = current_shard();
        let s = stats.shard_at(shard);
        s.in_flight.fetch_add(1, Ordering::Relaxed);
        s.requests.fetch_add(1, Ordering::Relaxed);
        InFlight {
            stats: stats.clone(),
            shard,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.stats
            .shard_at(self.shard)
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passive_health_skips_after_max_fails() {
        let s = ServerStats::default();
        s.record_failure(2, 10_000);
        assert!(!s.passive_skipped(mono_ms()));
        s.record_failure(2, 10_000);
        assert!(s.passive_skipped(mono_ms()));
    }

    #[test]
    fn ejection_time_grows_and_is_capped() {
        let s = ServerStats::default();
        s.eject(1000, 2500);
        let first = s.ejected_until_ms.load(Ordering::Relaxed) - mono_ms();
        s.eject(1000, 2500);
        let second = s.ejected_until_ms.load(Ordering::Relaxed) - mono_ms();
        s.eject(1000, 2500);
        let third = s.ejected_until_ms.load(Ordering::Relaxed) - mono_ms();
        assert!(
            first <= 1000 && second > 1000 && second <= 2000,
            "{first} {second}"
        );
        assert!(third <= 2500 && third > 2000, "{third}");
    }

    #[test]
    fn route_counters_follow_ids_across_route_table_rebuilds() {
        let s = ServerStats::default();
        let first: Arc<str> = Arc::from("r1");
        let other: Arc<str> = Arc::from("r2");
        s.record_response(&first, 200, 10);
        s.record_response(&other, 503, 10);
        // A rebuilt route table hands out a new id string for the same route.
        let again: Arc<str> = Arc::from("r1");
        s.record_response(&again, 404, 10);
        let rows = s.by_route();
        assert_eq!(rows.len(), 2);
        let r1 = rows.iter().find(|(r, _)| &**r == "r1").unwrap().1;
        assert_eq!(r1, [0, 1, 0, 1, 0]);
        assert_eq!(s.class_totals(), [0, 1, 0, 1, 1]);
        // Many rebuilds never grow the pointer index without bound.
        for _ in 0..1000 {
            let id: Arc<str> = Arc::from("r1");
            s.record_response(&id, 200, 10);
        }
        assert_eq!(
            s.by_route().iter().find(|(r, _)| &**r == "r1").unwrap().1[1],
            1001
        );
    }

    #[test]
    fn peak_ewma_jumps_up_and_decays() {
        let s = ServerStats::default();
        s.observe_latency(1000.0);
        assert_eq!(s.ewma_us(), 1000.0);
        s.observe_latency(50_000.0);
        assert_eq!(s.ewma_us(), 50_000.0);
        s.observe_latency(1000.0);
        assert!(s.ewma_us() <= 50_000.0);
    }
}
