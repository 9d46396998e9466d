//! Consul blocking queries: `?index=N&wait=D`.
//!
//! A watcher costs one future: it sleeps on the global index's `watch` channel and, when
//! the index moves, recomputes its resource's index (cheap) and goes back to sleep unless
//! that index passed N. No thread, timer wheel entry per change, or poll loop.

use crate::state::State;
use crate::{ApiError, Registry, RegistryOptions};
use std::time::Duration;
use tokio::time::Instant;

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
fn jitter(wait: Duration) -> Duration {
    let max = wait.as_nanos() / 16;
    if max == 0 {
        return Duration::ZERO;
    }
    let r = getrandom::u64().unwrap_or(0) as u128;
    Duration::from_nanos((r % (max + 1)) as u64)
}

/// Counts a blocking query as a watcher while it waits (for metrics).
struct WatcherGuard<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> WatcherGuard<'a> {
    fn new(count: &'a std::sync::atomic::AtomicUsize) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        WatcherGuard(count)
    }
}

impl Drop for WatcherGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Registry {
    /// Waits until `index_of(state) > q.index` (or the timeout, or shutdown), then returns
    /// the resource's index (at least 1) and `render(state)` from one consistent view.
    pub(crate) async fn blocking<T>(
        &self,
        q: BlockingQuery,
        index_of: impl Fn(&State) -> u64,
        render: impl FnOnce(&State) -> T,
    ) -> (u64, T) {
        self.wait_past(q, &index_of).await;
        let st = self.state.read();
        (index_of(&st).max(1), render(&st))
    }

    /// `blocking` for JSON answers, shared: the first watcher to wake renders and
    /// serializes the answer, every other request with the same `key` (path and the
    /// query parameters that shape the answer) at the same global index gets the same
    /// bytes. Thousands of watchers of one service cost one rendering per change.
    pub(crate) async fn blocking_json<T: serde::Serialize>(
        &self,
        key: String,
        q: BlockingQuery,
        index_of: impl Fn(&State) -> u64,
        render: impl FnOnce(&State) -> T,
    ) -> (u64, bytes::Bytes) {
        self.wait_past(q, &index_of).await;
        let st = self.state.read();
        let global = st.index;
        if let Some((at, idx, body)) = self.rendered.lock().get(&key) {
            if *at == global {
                return (*idx, body.clone());
            }
        }
        let idx = index_of(&st).max(1);
        // Serializing our own values cannot fail; an empty list is the safe answer if it did.
        let body =
            bytes::Bytes::from(serde_json::to_vec(&render(&st)).unwrap_or_else(|_| b"[]".to_vec()));
        let mut cache = self.rendered.lock();
        if cache.len() >= RENDER_CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(key, (global, idx, body.clone()));
        (idx, body)
    }

    async fn wait_past(&self, q: BlockingQuery, index_of: &impl Fn(&State) -> u64) {
        if q.index == 0 {
            return;
        }
        let _watching = WatcherGuard::new(&self.watchers);
        let mut rx = self.subscribe();
        let mut stop = self.shutdown_tx.subscribe();
        let deadline = Instant::now() + q.wait + jitter(q.wait);
        loop {
            rx.borrow_and_update();
            if *stop.borrow_and_update() || index_of(&self.state.read()) > q.index {
                break;
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { break },
                _ = tokio::time::sleep_until(deadline) => break,
                _ = stop.changed() => break,
            }
        }
    }
}

/// Distinct answers kept for sharing; the cache starts over when full.
const RENDER_CACHE_ENTRIES: usize = 4096;

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
}
