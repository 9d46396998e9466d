//! Consul blocking queries: `?index=N&wait=D`, and the answers of reads.
//!
//! A read is a [`View`]: how to compute its resource's index and how to render it. Its
//! answer is rendered once per registry index and read (path and shaping parameters:
//! [`crate::api`]'s cache key) and kept as a [`Prepared`] answer, whose wire bytes (status
//! line, headers, body) are built once per HTTP variant: every client of the same read
//! gets the same bytes. Its gzip-coded body (for clients whose `Accept-Encoding` takes
//! gzip: [`crate::api::encoding`]) is made once too, on the first such request.
//!
//! A blocking query whose index has not passed parks its connection in the [`Fanout`]
//! under its read's key: no task wakes and no timer fires per change. After a change one
//! pass computes each parked read's resource index — one look per
//! distinct read, not per watcher — and for each read that moved renders it once and
//! writes the same bytes to every parked socket of it in one loop. Connection tasks are
//! told only after the loop, so the clients' next requests are read once every answer is
//! out, and the registry's own tasks (a write's acknowledgement, other requests) keep
//! running meanwhile. A large pass shares its writes with helper threads ([`Batch`]):
//! each send's kernel work is paid by the sending thread, ~10 µs per answer on loopback.

use crate::api::http1::{Conn, Variant};
use crate::api::Resp;
use crate::state::State;
use crate::{ApiError, Registry, RegistryOptions};
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::Duration;
use tokio::sync::{oneshot, Notify};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BlockingQuery {
    /// 0: answer at once.
    pub index: u64,
    /// Timeout before jitter.
    pub wait: Duration,
}

impl BlockingQuery {
    /// From the raw `index` and `wait` query values (`None` when absent).
    pub fn parse(
        index: Option<&str>,
        wait: Option<&str>,
        opts: &RegistryOptions,
    ) -> Result<BlockingQuery, ApiError> {
        let index = match index.map(str::trim) {
            None | Some("") => 0,
            Some(s) => s
                .parse::<u64>()
                .map_err(|_| ApiError::bad_request("Invalid index"))?,
        };
        let wait = match wait.map(str::trim) {
            None | Some("") => opts.default_wait,
            Some(s) => {
                let n = crate::duration::parse_go_duration(s)
                    .map_err(|_| ApiError::bad_request("Invalid wait time"))?;
                if n <= 0 {
                    opts.default_wait
                } else {
                    crate::duration::from_nanos(n)
                }
            }
        };
        Ok(BlockingQuery {
            index,
            wait: wait.min(opts.max_wait),
        })
    }
}

/// Random extra wait in `[0, wait/16]`, so that watchers do not all return together.
pub(crate) fn jitter(wait: Duration) -> Duration {
    let max = wait.as_nanos() / 16;
    if max == 0 {
        return Duration::ZERO;
    }
    let r = getrandom::u64().unwrap_or(0) as u128;
    Duration::from_nanos((r % (max + 1)) as u64)
}

/// Counts a parked blocking query as a watcher (for metrics).
pub(crate) struct WatcherGuard<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> WatcherGuard<'a> {
    pub(crate) fn new(count: &'a std::sync::atomic::AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        WatcherGuard(count)
    }
}

impl Drop for WatcherGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(crate) type IndexFn = dyn Fn(&State) -> u64 + Send + Sync;
pub(crate) type RenderFn = dyn Fn(&Registry, &State, u64) -> Resp + Send + Sync;

/// A read: its resource's index, and its answer at a given (resource) index.
pub(crate) struct View {
    pub index_of: Box<IndexFn>,
    pub render: Box<RenderFn>,
}

/// A blocking query that has to wait: answer when the read's resource index is above
/// `index`, or after `wait` (jitter included) with the current answer.
pub(crate) struct Watch {
    pub key: String,
    pub index: u64,
    pub wait: Duration,
    pub view: Arc<View>,
}

/// A read's answer at one registry index, with its wire bytes per HTTP variant.
pub(crate) struct Prepared {
    /// Its key in the render cache.
    key: String,
    /// The global index it was rendered at.
    pub global: u64,
    pub resp: Resp,
    /// The gzip-coded body, made on the first request that takes gzip (`None`: the body
    /// is sent as it is, see [`crate::api::http1::coded_body`]).
    gz: OnceLock<Option<Bytes>>,
    /// Whether the render cache counts `gz` in its bytes (changed under its lock only).
    gz_counted: AtomicBool,
    /// (variant, second of its Date header, status line + headers + body).
    wire: Mutex<Vec<(Variant, u64, Bytes)>>,
}

impl Prepared {
    pub(crate) fn new(key: &str, global: u64, resp: Resp) -> Prepared {
        Prepared {
            key: key.to_string(),
            global,
            resp,
            gz: OnceLock::new(),
            gz_counted: AtomicBool::new(false),
            wire: Mutex::new(Vec::new()),
        }
    }

    /// The whole response for `variant`, built once per variant and second; `coded` is
    /// the gzip body for a variant that takes gzip.
    fn wire(&self, variant: Variant, coded: Option<&Bytes>) -> Bytes {
        let now = crate::api::http1::date_second();
        let mut wire = self.wire.lock();
        if let Some((_, _, b)) = wire.iter().find(|(v, s, _)| *v == variant && *s == now) {
            return b.clone();
        }
        let b = crate::api::http1::wire(&self.resp, variant, coded.map(|c| &c[..]));
        wire.retain(|(v, _, _)| *v != variant);
        wire.push((variant, now, b.clone()));
        b
    }
}

/// Distinct answers kept for sharing; the cache starts over when full.
const RENDER_CACHE_ENTRIES: usize = 4096;
/// ... or when their bodies pass this: an identity body counted twice (the body and its
/// wire copy), and so is a gzip body from when it is made.
const RENDER_CACHE_BYTES: usize = 64 * 1024 * 1024;

/// Read answers by key, each valid at the global index it was rendered at.
#[derive(Default)]
pub(crate) struct RenderCache {
    answers: HashMap<String, Arc<Prepared>>,
    bytes: usize,
}

/// What `p` counts for in the cache's bytes (call under the cache's lock).
fn cost(p: &Prepared) -> usize {
    2 * p.resp.body().len() + 512 + gz_cost(p)
}

fn gz_cost(p: &Prepared) -> usize {
    if !p.gz_counted.load(Ordering::Relaxed) {
        return 0;
    }
    p.gz.get()
        .and_then(|g| g.as_ref())
        .map_or(0, |g| 2 * g.len())
}

impl Registry {
    /// The answer to `view` in state `st`, shared with every read of `key` at the same
    /// global index.
    pub(crate) fn prepared(&self, key: &str, view: &View, st: &State) -> Arc<Prepared> {
        if let Some(p) = self.rendered.lock().answers.get(key) {
            if p.global == st.index {
                return p.clone();
            }
        }
        let idx = (view.index_of)(st).max(1);
        let p = Arc::new(Prepared::new(key, st.index, (view.render)(self, st, idx)));
        let mut cache = self.rendered.lock();
        let added = cost(&p);
        if let Some(old) = cache.answers.remove(key) {
            cache.bytes -= cost(&old);
        }
        if cache.answers.len() >= RENDER_CACHE_ENTRIES || cache.bytes + added > RENDER_CACHE_BYTES {
            cache.answers.clear();
            cache.bytes = 0;
        }
        cache.bytes += added;
        cache.answers.insert(key.to_string(), p.clone());
        p
    }

    /// The whole response of a shared answer for `variant`. The gzip body is made once
    /// per answer, by the first request that takes gzip, and counted in the cache's
    /// bytes from then on while the answer is in the cache.
    pub(crate) fn wire(&self, p: &Prepared, variant: Variant) -> Bytes {
        if !variant.gzip() {
            return p.wire(variant, None);
        }
        let mut made = false;
        let gz = p.gz.get_or_init(|| {
            made = true;
            crate::api::http1::coded_body(&p.resp, variant)
        });
        if made {
            if let Some(g) = gz {
                let mut cache = self.rendered.lock();
                let cached = cache
                    .answers
                    .get(&p.key)
                    .is_some_and(|c| std::ptr::eq(&**c, p));
                if cached {
                    p.gz_counted.store(true, Ordering::Relaxed);
                    cache.bytes += 2 * g.len();
                    if cache.bytes > RENDER_CACHE_BYTES {
                        // Starts over, as when an answer is added (`p` lives on while used).
                        cache.answers.clear();
                        cache.bytes = 0;
                    }
                }
            }
        }
        p.wire(variant, gz.as_ref())
    }

    /// A read: its answer now, or a [`Watch`] when `q` asks to wait for a change that
    /// has not come yet (not during shutdown: then every read answers at once).
    pub(crate) fn read(&self, key: String, q: BlockingQuery, view: View) -> crate::api::Reply {
        let st = self.state.read();
        if q.index == 0 || (view.index_of)(&st) > q.index || *self.shutdown_tx.borrow() {
            return crate::api::Reply::Shared(self.prepared(&key, &view, &st));
        }
        drop(st);
        crate::api::Reply::Wait(Watch {
            key,
            index: q.index,
            wait: q.wait + jitter(q.wait),
            view: Arc::new(view),
        })
    }
}

/// What the fan-out did for a parked query.
pub(crate) struct Delivered {
    pub wire: Bytes,
    /// Bytes already written; the connection writes the rest.
    pub written: usize,
    /// The write failed: the connection is gone.
    pub failed: bool,
}

/// A parked blocking query.
pub(crate) struct Waiter {
    pub index: u64,
    pub conn: Arc<Conn>,
    pub variant: Variant,
    pub done: oneshot::Sender<Delivered>,
}

struct Group {
    view: Arc<View>,
    waiters: HashMap<u64, Waiter>,
}

/// Parked blocking queries by read key.
#[derive(Default)]
pub(crate) struct Fanout {
    groups: Mutex<HashMap<Arc<str>, Group>>,
    next_id: AtomicU64,
    /// The fan-out helper threads' queues, started on the first pass large enough to
    /// use them (empty when the registry has none: `fanout_threads = 0`).
    helpers: OnceLock<Vec<mpsc::Sender<Arc<Batch>>>>,
    /// Answers written by the helper threads since start (for metrics).
    pub(crate) helper_answers: AtomicU64,
}

impl Fanout {
    pub(crate) fn is_empty(&self) -> bool {
        self.groups.lock().is_empty()
    }

    /// Parks `w` under `key`; returns its ticket for [`Fanout::unpark`].
    pub(crate) fn park(&self, key: &Arc<str>, view: &Arc<View>, w: Waiter) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.groups
            .lock()
            .entry(key.clone())
            .or_insert_with(|| Group {
                view: view.clone(),
                waiters: HashMap::new(),
            })
            .waiters
            .insert(id, w);
        id
    }

    /// Takes a parked query back (timeout, shutdown, client gone). False when a pass
    /// took it first: its answer is on the way.
    pub(crate) fn unpark(&self, key: &str, id: u64) -> bool {
        let mut groups = self.groups.lock();
        let Some(g) = groups.get_mut(key) else {
            return false;
        };
        let removed = g.waiters.remove(&id).is_some();
        if g.waiters.is_empty() {
            groups.remove(key);
        }
        removed
    }

    /// The helper threads' queues, started on first use.
    fn helpers(&self, threads: usize) -> &[mpsc::Sender<Arc<Batch>>] {
        self.helpers.get_or_init(|| {
            let mut queues = Vec::with_capacity(threads);
            for i in 0..threads {
                let (tx, rx) = mpsc::channel::<Arc<Batch>>();
                let spawned = std::thread::Builder::new()
                    .name(format!("dynagate-fanout-{i}"))
                    .spawn(move || {
                        // Ends when the registry (and with it every sender) goes.
                        while let Ok(batch) = rx.recv() {
                            // A panic costs this batch's unwritten answers a trip through
                            // their connections' tasks, not the helper.
                            let work = std::panic::AssertUnwindSafe(|| batch.work(true));
                            if std::panic::catch_unwind(work).is_err() {
                                tracing::error!("registry fan-out helper panicked; going on");
                            }
                        }
                    });
                match spawned {
                    Ok(_) => queues.push(tx),
                    Err(e) => {
                        tracing::warn!(error = %e, "registry fan-out helper thread not started");
                        break;
                    }
                }
            }
            queues
        })
    }

    /// Answers every parked query whose read moved past its index. Runs on the
    /// registry's runtime and yields to its other tasks every [`FANOUT_CHUNK`] answers it
    /// writes itself; a pass of at least `fanout_parallel_min` answers shares the writes
    /// with the helper threads ([`Batch`]).
    pub(crate) async fn pass(&self, reg: &Registry) {
        let candidates: Vec<(Arc<str>, Arc<View>, u64)> = {
            let groups = self.groups.lock();
            groups
                .iter()
                .filter_map(|(k, g)| {
                    let min = g.waiters.values().map(|w| w.index).min()?;
                    Some((k.clone(), g.view.clone(), min))
                })
                .collect()
        };
        if candidates.is_empty() {
            return;
        }
        let mut ready = Vec::new();
        {
            let st = reg.state.read();
            for (key, view, min) in candidates {
                let idx = (view.index_of)(&st);
                if idx > min {
                    let p = reg.prepared(&key, &view, &st);
                    ready.push((key, idx, p));
                }
            }
        }
        let mut items = Vec::new();
        let mut dones = Vec::new();
        for (key, idx, prepared) in ready {
            let taken: Vec<Waiter> = {
                let mut groups = self.groups.lock();
                let Some(g) = groups.get_mut(&key) else {
                    continue;
                };
                let all = std::mem::take(&mut g.waiters);
                let mut taken = Vec::with_capacity(all.len());
                for (id, w) in all {
                    if w.index < idx {
                        taken.push(w);
                    } else {
                        g.waiters.insert(id, w);
                    }
                }
                if g.waiters.is_empty() {
                    groups.remove(&key);
                }
                taken
            };
            // The same bytes for every waiter of one variant (usually all of them).
            let mut wires: Vec<(Variant, Bytes)> = Vec::new();
            for w in taken {
                let wire = match wires.iter().find(|(v, _)| *v == w.variant) {
                    Some((_, b)) => b.clone(),
                    None => {
                        let b = reg.wire(&prepared, w.variant);
                        wires.push((w.variant, b.clone()));
                        b
                    }
                };
                items.push((w.conn, wire));
                dones.push(w.done);
            }
        }
        if items.is_empty() {
            return;
        }
        let batch = Arc::new(Batch::new(items));
        if batch.items.len() >= reg.opts.fanout_parallel_min.max(1) {
            for h in self.helpers(reg.opts.fanout_threads) {
                let _ = h.send(batch.clone());
            }
        }
        // This thread's share, yielding to the registry's other tasks as it goes.
        let mut written_since_yield = 0;
        while let Some(run) = batch.claim() {
            written_since_yield += run.len();
            batch.write(run, false);
            if written_since_yield >= FANOUT_CHUNK {
                written_since_yield = 0;
                tokio::task::yield_now().await;
            }
        }
        // The helpers' last runs.
        while batch.remaining.load(Ordering::Acquire) != 0 {
            batch.all_done.notified().await;
        }
        self.helper_answers.fetch_add(
            batch.by_helpers.load(Ordering::Relaxed) as u64,
            Ordering::Relaxed,
        );
        // Only now do the connections go on (and read their clients' next requests).
        for (i, tx) in dones.into_iter().enumerate() {
            let written = batch.written[i].load(Ordering::Relaxed);
            let failed = written == WRITE_FAILED;
            let _ = tx.send(Delivered {
                wire: batch.items[i].1.clone(),
                written: if failed { 0 } else { written },
                failed,
            });
        }
    }
}

/// The answers of one pass: each parked socket with the bytes it gets. The registry
/// thread and, for a large pass, the helper threads claim runs of [`CLAIM_RUN`] of them
/// until none is left, so whoever has a core writes; a helper that wakes late finds
/// less (or nothing) to do. Each write is one non-blocking `try_write` (a tokio
/// `TcpStream`'s, which only reads and updates its registration's readiness bits: it
/// is safe from a thread outside the runtime); whatever does not fit is written by the
/// connection's own task afterwards, as before.
pub(crate) struct Batch {
    items: Vec<(Arc<Conn>, Bytes)>,
    /// Bytes written per answer, or [`WRITE_FAILED`].
    written: Vec<AtomicUsize>,
    /// Start of the next unclaimed run.
    next: AtomicUsize,
    /// Answers not written yet (claimed or not).
    remaining: AtomicUsize,
    /// Told when a helper writes the last answer.
    all_done: Notify,
    /// Answers written by helpers.
    by_helpers: AtomicUsize,
}

/// A write that failed (the connection is gone).
const WRITE_FAILED: usize = usize::MAX;

/// Answers claimed at a time from a [`Batch`].
const CLAIM_RUN: usize = 32;

impl Batch {
    fn new(items: Vec<(Arc<Conn>, Bytes)>) -> Batch {
        let n = items.len();
        Batch {
            written: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            items,
            next: AtomicUsize::new(0),
            remaining: AtomicUsize::new(n),
            all_done: Notify::new(),
            by_helpers: AtomicUsize::new(0),
        }
    }

    /// The next run of answers to write, if any is left.
    fn claim(&self) -> Option<std::ops::Range<usize>> {
        let start = self.next.fetch_add(CLAIM_RUN, Ordering::Relaxed);
        (start < self.items.len()).then(|| start..(start + CLAIM_RUN).min(self.items.len()))
    }

    /// Writes a claimed run. Its answers are counted off even if a write panics, and
    /// the last run to finish tells the pass, so a pass never waits for a helper forever
    /// (an answer left unwritten is written by its connection's task, as a partial one).
    fn write(&self, run: std::ops::Range<usize>, helper: bool) {
        let _counted = CountOff {
            batch: self,
            n: run.len(),
        };
        if helper {
            self.by_helpers.fetch_add(run.len(), Ordering::Relaxed);
        }
        for i in run {
            let (conn, wire) = &self.items[i];
            conn.taken.store(true, Ordering::Release);
            let written = match conn.stream.try_write(wire) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                Err(_) => WRITE_FAILED,
            };
            self.written[i].store(written, Ordering::Relaxed);
        }
    }

    /// A helper's part: runs until none is left.
    fn work(&self, helper: bool) {
        while let Some(run) = self.claim() {
            self.write(run, helper);
        }
    }
}

/// Counts a claimed run off a [`Batch`] when dropped (also when a write panicked).
struct CountOff<'a> {
    batch: &'a Batch,
    n: usize,
}

impl Drop for CountOff<'_> {
    fn drop(&mut self) {
        if self.batch.remaining.fetch_sub(self.n, Ordering::AcqRel) == self.n {
            self.batch.all_done.notify_one();
        }
    }
}

/// Answers the registry thread writes between two yields of a fan-out pass: other
/// requests (a write's acknowledgement, a health check) wait at most this many answers
/// (~1 ms here), while the answered connections are told only at the end of the pass.
const FANOUT_CHUNK: usize = 128;

/// Runs a fan-out pass after every registry change while queries are parked. Inline on
/// the registry's runtime: on its own thread (dynagate's registry runtime is a
/// current-thread one) no other thread wakes for the clients' next requests while the
/// answers go out — they are read, all at once, at the pass's yields.
pub(crate) async fn run_fanout(reg: Arc<Registry>) {
    let mut changes = reg.subscribe();
    loop {
        if changes.changed().await.is_err() {
            return;
        }
        changes.borrow_and_update();
        if reg.fanout.is_empty() {
            continue;
        }
        reg.fanout.pass(&reg).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_index_and_wait() {
        let o = RegistryOptions::default();
        let q = BlockingQuery::parse(None, None, &o).unwrap();
        assert_eq!((q.index, q.wait), (0, Duration::from_secs(300)));
        let q = BlockingQuery::parse(Some("42"), Some("2s"), &o).unwrap();
        assert_eq!((q.index, q.wait), (42, Duration::from_secs(2)));
        let q = BlockingQuery::parse(Some("1"), Some("1h"), &o).unwrap();
        assert_eq!(q.wait, Duration::from_secs(600));
        let q = BlockingQuery::parse(Some("1"), Some("0s"), &o).unwrap();
        assert_eq!(q.wait, Duration::from_secs(300));
        assert_eq!(
            BlockingQuery::parse(Some("x"), None, &o).unwrap_err().msg,
            "Invalid index"
        );
        assert_eq!(
            BlockingQuery::parse(None, Some("10"), &o).unwrap_err().msg,
            "Invalid wait time"
        );
        assert_eq!(
            BlockingQuery::parse(Some("-1"), None, &o)
                .unwrap_err()
                .status,
            400
        );
    }

    #[test]
    fn jitter_is_bounded() {
        let w = Duration::from_secs(16);
        for _ in 0..1000 {
            assert!(jitter(w) <= Duration::from_secs(1));
        }
        assert_eq!(jitter(Duration::from_nanos(10)), Duration::ZERO);
    }

    #[tokio::test]
    async fn a_run_that_panics_is_still_counted_off_and_tells_the_pass() {
        let batch = Batch::new(Vec::new());
        batch.remaining.store(3 + 2, Ordering::Relaxed);
        // Another thread's run ends normally, then one panics mid-way.
        drop(CountOff {
            batch: &batch,
            n: 3,
        });
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _counted = CountOff {
                batch: &batch,
                n: 2,
            };
            panic!("a write panicked");
        }));
        assert!(panicked.is_err());
        assert_eq!(batch.remaining.load(Ordering::Acquire), 0);
        // The pass, waiting for the last run, is told.
        tokio::time::timeout(Duration::from_secs(1), batch.all_done.notified())
            .await
            .expect("the pass is told when the last run ends, even by a panic");
    }
}
