//! Live state of one server of one upstream — the one record where admin state (in the
//! spec), active health, passive health, outlier ejection and counters meet. It outlives
//! snapshots: a new `UpstreamRuntime` takes the record of every server it keeps, so no
//! change ever loses another (a drained server stays drained when its health flips;
//! health survives unrelated configuration changes).

use parking_lot::Mutex;
use std::cell::Cell;
use std::sync::atomic::{
    AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
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

/// One worker's share of a server's per-request counters, in one record of its own
/// (no other worker writes these lines). Reached from a request through its worker's
/// balancer line (`UpstreamRuntime::shard`), so the server's `ServerStats` is not read on
/// the way. Laid out so that what a request writes when its answer is a 2xx in under a
/// millisecond (the usual case) is in the first line together with the reference
/// count: in-flight, requests, the first route's 2xx count, the latency sum and the
/// first latency bucket. Other classes and buckets follow; further routes sit in a
/// table behind a lock.
#[derive(Debug)]
#[repr(C)]
pub struct Shard {
    in_flight: AtomicI64,
    requests: AtomicU64,
    /// The first route counted here (`NO_ROUTE` until one is): its counts are inline.
    first: AtomicU32,
    /// A failure may have left the server's passive-health or outlier counters above 0:
    /// the next success on this worker resets them (see `success`). Set by every
    /// failure on every shard of the server, and on a new shard.
    fails_pending: AtomicBool,
    first_2xx: AtomicU64,
    latency_sum_us: AtomicU64,
    /// Responses within `LATENCY_BOUNDS_MS[0]`.
    latency_first: AtomicU64,
    // The first 64 bytes of the `Arc` allocation end here.
    /// The first route's 1xx, 3xx, 4xx, 5xx counts.
    first_other: [AtomicU64; 4],
    /// The other latency buckets (bound 1 on, then +Inf).
    latency_rest: [AtomicU64; LATENCY_BOUNDS_MS.len()],
    /// Responses of routes after the first, by route and status class.
    by_route: Mutex<RouteCounters>,
    /// Rounds the `Arc` allocation up to 256 bytes (its size class), so the allocator
    /// (jemalloc) places it on a 256-byte boundary and the first line is the one above.
    _pad: [u64; 1],
}

// The reference count (16 bytes) and the record fill one 256-byte size class exactly.
#[cfg(target_pointer_width = "64")]
const _: () = assert!(std::mem::size_of::<Shard>() + 16 == 256);

impl Default for Shard {
    fn default() -> Self {
        Shard {
            in_flight: AtomicI64::new(0),
            requests: AtomicU64::new(0),
            first: AtomicU32::new(NO_ROUTE),
            // Failures may have been counted before this worker's record existed.
            fails_pending: AtomicBool::new(true),
            first_2xx: AtomicU64::new(0),
            latency_sum_us: AtomicU64::new(0),
            latency_first: AtomicU64::new(0),
            first_other: Default::default(),
            latency_rest: Default::default(),
            by_route: Mutex::new(RouteCounters::default()),
            _pad: [0],
        }
    }
}

impl Shard {
    /// Records one response: status class by route and latency (the EWMA is the
    /// server's, see `ServerStats::observe_ewma`).
    pub fn record_response(&self, route: RouteNo, status: u16, elapsed_us: u64) {
        let class = ((status / 100).clamp(1, 5) - 1) as usize;
        let mut first = self.first.load(Ordering::Relaxed);
        if first == NO_ROUTE {
            first = match self.first.compare_exchange(
                NO_ROUTE,
                route,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => route,
                Err(now) => now,
            };
        }
        if first == route {
            let counter = match class {
                1 => &self.first_2xx,
                0 => &self.first_other[0],
                c => &self.first_other[c - 1],
            };
            counter.fetch_add(1, Ordering::Relaxed);
        } else {
            self.by_route.lock().row(route)[class] += 1;
        }
        let ms = elapsed_us as f64 / 1000.0;
        let bucket = LATENCY_BOUNDS_MS
            .iter()
            .position(|b| ms <= *b)
            .unwrap_or(LATENCY_BOUNDS_MS.len());
        match bucket {
            0 => &self.latency_first,
            b => &self.latency_rest[b - 1],
        }
        .fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(elapsed_us, Ordering::Relaxed);
    }

    /// A success (a non-5xx answer): resets the server's passive-health and outlier
    /// counters if a failure may have left them above 0, reading `stats` only then.
    pub fn success(&self, stats: &ServerStats) {
        if self.fails_pending.load(Ordering::Acquire) {
            self.fails_pending.store(false, Ordering::Relaxed);
            stats.record_success();
        }
    }

    fn latency_bucket(&self, i: usize) -> u64 {
        match i {
            0 => &self.latency_first,
            b => &self.latency_rest[b - 1],
        }
        .load(Ordering::Relaxed)
    }

    /// The first route's counts by class (1xx..5xx).
    fn first_counts(&self) -> Option<(RouteNo, ClassCounts)> {
        let no = self.first.load(Ordering::Relaxed);
        if no == NO_ROUTE {
            return None;
        }
        let o = |i: usize| self.first_other[i].load(Ordering::Relaxed);
        let two = self.first_2xx.load(Ordering::Relaxed);
        Some((no, [o(0), two, o(1), o(2), o(3)]))
    }
}

/// A route's number: stable for its id for the life of the process (see `route_number`).
pub type RouteNo = u32;

const NO_ROUTE: RouteNo = RouteNo::MAX;

/// Route ids by number. A route table gives each entry the number of its id when it is
/// built, so counters keyed by number follow a route across rebuilds without a string
/// compare on the request path. Ids are never forgotten (a few dozen bytes each).
struct RouteNames {
    by_name: std::collections::HashMap<Arc<str>, RouteNo>,
    names: Vec<Arc<str>>,
}

static ROUTE_NAMES: parking_lot::RwLock<Option<RouteNames>> = parking_lot::RwLock::new(None);

/// The number of route id `id` (the same number every time).
pub fn route_number(id: &str) -> RouteNo {
    if let Some(no) = ROUTE_NAMES
        .read()
        .as_ref()
        .and_then(|n| n.by_name.get(id).copied())
    {
        return no;
    }
    let mut guard = ROUTE_NAMES.write();
    let names = guard.get_or_insert_with(|| RouteNames {
        by_name: Default::default(),
        names: Vec::new(),
    });
    if let Some(no) = names.by_name.get(id) {
        return *no;
    }
    // NO_ROUTE stays free: 4 billion distinct ids are not reached.
    let no = names.names.len().min(NO_ROUTE as usize - 1) as RouteNo;
    let name: Arc<str> = Arc::from(id);
    names.names.push(name.clone());
    names.by_name.insert(name, no);
    no
}

/// The id of route number `no` ("" if no route has it).
pub fn route_name(no: RouteNo) -> Arc<str> {
    ROUTE_NAMES
        .read()
        .as_ref()
        .and_then(|n| n.names.get(no as usize).cloned())
        .unwrap_or_else(|| Arc::from(""))
}

/// Status-class counters by route number for the routes after a shard's first (which
/// is counted inline in the `Shard`): an open-addressing table with the counts in the
/// slot, so a response costs one probe of one line, however many routes share the server.
#[derive(Debug, Default)]
struct RouteCounters {
    /// Power-of-two slots (or none), at most half full; `NO_ROUTE` marks a free slot.
    table: Vec<(RouteNo, ClassCounts)>,
    len: usize,
}

fn route_slot(no: RouteNo, mask: usize) -> usize {
    ((no as u64).wrapping_mul(0x9e3779b97f4a7c15) >> 32) as usize & mask
}

impl RouteCounters {
    fn row(&mut self, no: RouteNo) -> &mut ClassCounts {
        if (self.len + 1) * 2 > self.table.len() {
            self.grow();
        }
        let mask = self.table.len() - 1;
        let mut i = route_slot(no, mask);
        loop {
            if self.table[i].0 == no {
                break;
            }
            if self.table[i].0 == NO_ROUTE {
                self.table[i].0 = no;
                self.len += 1;
                break;
            }
            i = (i + 1) & mask;
        }
        &mut self.table[i].1
    }

    fn grow(&mut self) {
        let size = (self.table.len() * 2).max(8);
        let old = std::mem::replace(&mut self.table, vec![(NO_ROUTE, [0; 5]); size]);
        let mask = size - 1;
        for (no, counts) in old.into_iter().filter(|(no, _)| *no != NO_ROUTE) {
            let mut i = route_slot(no, mask);
            while self.table[i].0 != NO_ROUTE {
                i = (i + 1) & mask;
            }
            self.table[i] = (no, counts);
        }
    }

    fn rows(&self) -> impl Iterator<Item = (RouteNo, &ClassCounts)> {
        self.table
            .iter()
            .filter(|(no, _)| *no != NO_ROUTE)
            .map(|(no, c)| (*no, c))
    }
}

/// Raised whenever a server of an upstream may have stopped taking requests (active
/// health turned unhealthy, passive health skips it, outlier ejection), and cleared by
/// a balancer that then looked at every server and found them all taking requests.
/// While it is quiet, the balancer does not read each server's record to learn that
/// they are all available: one shared line per upstream instead of one per server.
#[derive(Debug, Default)]
pub struct Alarm {
    raised: AtomicU64,
    cleared: AtomicU64,
}

impl Alarm {
    pub fn raise(&self) {
        self.raised.fetch_add(1, Ordering::AcqRel);
    }

    /// Nothing raised since the last all-clear.
    pub fn quiet(&self) -> bool {
        self.cleared.load(Ordering::Acquire) == self.raised.load(Ordering::Acquire)
    }

    /// Read before looking at the servers; pass to `clear` if they were all fine.
    pub fn mark(&self) -> u64 {
        self.raised.load(Ordering::Acquire)
    }

    /// Every server looked fine after `mark` was read: anything raised since keeps the
    /// alarm on.
    pub fn clear(&self, mark: u64) {
        self.cleared.fetch_max(mark, Ordering::AcqRel);
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

/// Per-worker shards kept inline in the record (shard 0 and two workers); more workers
/// use `more_shards`.
const INLINE_SHARDS: usize = 3;

#[derive(Debug)]
#[repr(C)]
pub struct ServerStats {
    // What every response reads or writes comes first, then the shard slots.
    /// Peak-EWMA of response-head latency in microseconds (f64 bits), and its time.
    ewma_us: AtomicU64,
    ewma_at_ms: AtomicU64,
    // Passive health, nginx style: max_fails within fail_timeout skip the server.
    window_fails: AtomicU32,
    // Outlier detection.
    consecutive_failures: AtomicU32,
    /// Per-worker counters, each allocated when its worker first serves this server.
    shards: [OnceLock<Arc<Shard>>; INLINE_SHARDS],
    more_shards: Box<[OnceLock<Arc<Shard>>]>,
    /// Shared by the servers of one upstream (see `Alarm`).
    alarm: Arc<Alarm>,

    /// Failed attempts: connect errors, timeouts, broken responses.
    pub failures: AtomicU64,
    /// Wall-clock time of the last change of admin state, health or ejection.
    pub last_state_change_ms: AtomicU64,

    window_start_ms: AtomicU64,
    skip_until_ms: AtomicU64,

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
}

impl Default for ServerStats {
    fn default() -> Self {
        ServerStats::with_alarm(Arc::default())
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

    /// A record whose blocking events raise `alarm` (one per upstream).
    pub fn with_alarm(alarm: Arc<Alarm>) -> Self {
        let more = shard_count().saturating_sub(INLINE_SHARDS);
        ServerStats {
            ewma_us: AtomicU64::new(DEFAULT_EWMA_US.to_bits()),
            ewma_at_ms: AtomicU64::new(0),
            window_fails: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            shards: Default::default(),
            more_shards: (0..more).map(|_| OnceLock::new()).collect(),
            alarm,
            failures: AtomicU64::new(0),
            last_state_change_ms: AtomicU64::new(unix_ms()),
            window_start_ms: AtomicU64::new(0),
            skip_until_ms: AtomicU64::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            last_ejection_ms: AtomicU64::new(0),
            health: AtomicU8::new(Health::Unchecked as u8),
            last_check: Mutex::new(None),
            last_check_ms: AtomicU64::new(0),
            available_since_ms: AtomicU64::new(mono_ms()),
        }
    }

    /// The alarm this record raises.
    pub fn alarm(&self) -> &Arc<Alarm> {
        &self.alarm
    }

    /// Worker `i`'s counters (shard `i`), made when first asked for.
    pub fn shard_at(&self, i: usize) -> &Arc<Shard> {
        let slot = match self.shards.get(i) {
            Some(slot) => slot,
            None if self.more_shards.is_empty() => &self.shards[i % INLINE_SHARDS],
            None => &self.more_shards[(i - INLINE_SHARDS) % self.more_shards.len()],
        };
        slot.get_or_init(Arc::default)
    }

    fn shards(&self) -> impl Iterator<Item = &Shard> {
        self.shards
            .iter()
            .chain(self.more_shards.iter())
            .filter_map(|s| s.get().map(|a| &**a))
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
            for (i, c) in counts.iter_mut().enumerate() {
                *c += s.latency_bucket(i);
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
        let mut totals: std::collections::BTreeMap<RouteNo, ClassCounts> = Default::default();
        for s in self.shards() {
            let mut add = |route: RouteNo, counts: &ClassCounts| {
                let total = totals.entry(route).or_default();
                for (t, c) in total.iter_mut().zip(counts) {
                    *t += c;
                }
            };
            if let Some((route, counts)) = s.first_counts() {
                add(route, &counts);
            }
            for (route, counts) in s.by_route.lock().rows() {
                add(route, counts);
            }
        }
        totals
            .into_iter()
            .map(|(no, counts)| (route_name(no), counts))
            .collect()
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
        if h == Health::Unhealthy && old != h as u8 {
            self.alarm.raise();
        }
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
        self.fails_pending();
        if fails >= max_fails {
            self.window_fails.store(0, Ordering::Relaxed);
            self.skip_until_ms
                .store(now + fail_timeout_ms, Ordering::Relaxed);
            self.available_since_ms
                .store(now + fail_timeout_ms, Ordering::Relaxed);
            self.alarm.raise();
            self.mark_changed();
        }
    }

    /// Tells every worker's shard that the next success must reset the failure counters
    /// (after they were raised: a success that sees the flag sees the counts).
    fn fails_pending(&self) {
        for s in self.shards() {
            s.fails_pending.store(true, Ordering::Release);
        }
    }

    /// Resets the passive-health window and the outlier streak. The data plane calls it
    /// through `Shard::success`, which skips it while no failure was counted.
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
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        self.fails_pending();
        n
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
        self.alarm.raise();
        self.mark_changed();
    }

    /// Records one response: latency, status class by route, and the EWMA when `ewma`
    /// (only `p2c_ewma` reads it: other upstreams skip its clock read and shared write;
    /// an upstream switched to it starts from the first response's latency).
    pub fn record_response(&self, route: RouteNo, status: u16, elapsed_us: u64, ewma: bool) {
        self.shard_at(current_shard())
            .record_response(route, status, elapsed_us);
        if ewma {
            self.observe_ewma(elapsed_us);
        }
    }

    /// Feeds the peak-EWMA of response-head latency (`p2c_ewma` upstreams only).
    pub fn observe_ewma(&self, elapsed_us: u64) {
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

/// Counts a request as in flight on a server until dropped (on the shard it started
/// on), and gives its response the same shard to count in.
#[derive(Debug)]
pub struct InFlight {
    shard: Arc<Shard>,
}

impl InFlight {
    /// On the calling worker's shard of `stats`.
    pub fn start(stats: &ServerStats) -> Self {
        InFlight::on(stats.shard_at(current_shard()).clone())
    }

    /// On `shard` (the calling worker's, as `UpstreamRuntime::shard` gives it).
    pub fn on(shard: Arc<Shard>) -> Self {
        shard.in_flight.fetch_add(1, Ordering::Relaxed);
        shard.requests.fetch_add(1, Ordering::Relaxed);
        InFlight { shard }
    }

    pub fn shard(&self) -> &Shard {
        &self.shard
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.shard.in_flight.fetch_sub(1, Ordering::Relaxed);
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
    fn route_numbers_are_stable_per_id() {
        let a = route_number("stats-test-a");
        let b = route_number("stats-test-b");
        assert_ne!(a, b);
        assert_eq!(route_number("stats-test-a"), a);
        assert_eq!(&*route_name(a), "stats-test-a");
        assert_eq!(&*route_name(NO_ROUTE), "");
    }

    #[test]
    fn route_counters_inline_row_and_table() {
        let s = ServerStats::default();
        let first = route_number("stats-rc-first");
        let other = route_number("stats-rc-other");
        s.record_response(first, 200, 10, true);
        s.record_response(other, 503, 10, true);
        s.record_response(first, 404, 10, true);
        let rows = s.by_route();
        assert_eq!(rows.len(), 2);
        let row = |name: &str| rows.iter().find(|(r, _)| &**r == name).unwrap().1;
        assert_eq!(row("stats-rc-first"), [0, 1, 0, 1, 0]);
        assert_eq!(row("stats-rc-other"), [0, 0, 0, 0, 1]);
        assert_eq!(s.class_totals(), [0, 1, 0, 1, 1]);
        // Many routes on one server: the table grows and keeps every row.
        let many: Vec<RouteNo> = (0..1000)
            .map(|i| route_number(&format!("stats-rc-many-{i}")))
            .collect();
        for (k, no) in many.iter().enumerate() {
            for _ in 0..=(k % 3) {
                s.record_response(*no, 200, 10, true);
            }
        }
        let rows = s.by_route();
        assert_eq!(rows.len(), 1002);
        for (k, no) in many.iter().enumerate() {
            let name = route_name(*no);
            let counts = rows.iter().find(|(r, _)| *r == name).unwrap().1;
            assert_eq!(counts, [0, (k % 3) as u64 + 1, 0, 0, 0], "{name}");
        }
        assert_eq!(
            s.class_totals()[1],
            1 + many
                .iter()
                .enumerate()
                .map(|(k, _)| (k % 3) as u64 + 1)
                .sum::<u64>()
        );
    }

    #[test]
    fn shards_add_up_across_workers() {
        let s = Arc::new(ServerStats::default());
        let route = route_number("stats-shards");
        // More threads than inline shard slots: every shard index lands somewhere.
        let threads: Vec<_> = (0..6)
            .map(|w| {
                let s = s.clone();
                std::thread::spawn(move || {
                    set_worker_shard(w);
                    for i in 0..1000u64 {
                        let _f = InFlight::start(&s);
                        s.record_response(route, if i % 10 == 0 { 500 } else { 200 }, 500, true);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(s.requests(), 6000);
        assert_eq!(s.in_flight(), 0);
        assert_eq!(s.latency_counts()[0], 6000);
        assert_eq!(s.latency_sum_us(), 6000 * 500);
        let rows = s.by_route();
        assert_eq!(rows, vec![(route_name(route), [0, 5400, 0, 0, 600])]);
    }

    #[test]
    fn a_success_resets_failure_counts_through_any_shard() {
        let s = ServerStats::default();
        let (one, two) = (s.shard_at(1).clone(), s.shard_at(2).clone());
        // New shards reset once: failures may have been counted before they existed.
        one.success(&s);
        two.success(&s);
        assert!(!one.fails_pending.load(Ordering::Relaxed));
        // Two of three allowed failures, then a success on another worker's shard.
        s.record_failure(3, 60_000);
        s.record_failure(3, 60_000);
        two.success(&s);
        s.record_failure(3, 60_000);
        s.record_failure(3, 60_000);
        assert!(
            !s.passive_skipped(mono_ms()),
            "the success reset the window"
        );
        // No success in between: the third failure skips the server.
        s.record_failure(3, 60_000);
        assert!(s.passive_skipped(mono_ms()));
        // Outlier streaks too; a shard made after the failures resets them as well.
        assert_eq!(s.outlier_failure(), 1);
        assert_eq!(s.outlier_failure(), 2);
        one.success(&s);
        assert_eq!(s.outlier_failure(), 1);
        s.shard_at(0).success(&s);
        assert_eq!(s.outlier_failure(), 1);
        // Without a failure since, a success does not touch the record.
        one.success(&s);
        assert!(!one.fails_pending.load(Ordering::Relaxed));
    }

    #[test]
    fn alarm_is_raised_by_blocking_events_and_cleared_by_a_full_look() {
        let alarm: Arc<Alarm> = Arc::default();
        let s = ServerStats::with_alarm(alarm.clone());
        assert!(alarm.quiet());
        s.set_health(Health::Healthy);
        assert!(alarm.quiet(), "turning healthy raises nothing");
        s.set_health(Health::Unhealthy);
        assert!(!alarm.quiet());
        let mark = alarm.mark();
        s.set_health(Health::Healthy);
        alarm.clear(mark);
        assert!(alarm.quiet());
        // An event after the mark keeps the alarm on.
        let mark = alarm.mark();
        s.record_failure(1, 10_000);
        alarm.clear(mark);
        assert!(!alarm.quiet());
        let mark = alarm.mark();
        alarm.clear(mark);
        s.eject(1000, 2000);
        assert!(!alarm.quiet());
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
