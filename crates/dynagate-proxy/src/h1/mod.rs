//! dynagate's own HTTP/1.1 path, client side and upstream side, nginx-style: heads are
//! parsed in place and copied line by line, bodies are copied socket to socket with
//! their framing, and an idle keep-alive connection holds no buffer at all (a few
//! hundred bytes of task state). HTTP/2 connections are recognised by their preface and
//! handed to hyper (`crate::proxy`).
//!
//! - `conn`:     one client connection: wait, read a head, serve it, repeat
//! - `exchange`: the life of one request on this path, phase by phase
//! - `head`, `framing`, `io`: parsing, body framing, copying

mod conn;
mod exchange;
pub mod framing;
pub mod head;
pub mod io;

pub use conn::serve;

use crate::proxy::Worker;
use hyper_util::rt::TokioExecutor;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Limits and timeouts of client connections.
#[derive(Debug, Clone)]
pub struct ConnOptions {
    /// Whole request head within this time; also how long an idle keep-alive connection
    /// waits for its next request.
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// Longest wait for the next piece of a request body.
    pub body_read_timeout: Duration,
    /// Largest request body (413 above); 0 = no limit.
    pub max_body_bytes: u64,
    /// Forward header names containing `_` instead of dropping them.
    pub underscores_in_headers: bool,
    /// Request bodies up to this size are read whole before a server is chosen; 0 = off.
    pub request_buffer_bytes: usize,
    /// Longest wait for the client to take more of a response.
    pub send_timeout: Duration,
}

/// What every connection of one worker shares.
pub struct Shared {
    pub worker: Arc<Worker>,
    pub options: ConnOptions,
    pub drain: Arc<Drain>,
    pub h2: hyper::server::conn::http2::Builder<TokioExecutor>,
}

/// The connections of one worker: how many are live, which idle ones wait until when,
/// and graceful shutdown (idle connections close at once, busy ones after their current
/// response; `wait` returns when none is left).
///
/// Idle deadlines live here, in one list swept by the worker a few times a second,
/// rather than as a timer in every connection: an idle connection then costs a few
/// hundred bytes, as in nginx.
#[derive(Default)]
pub struct Drain {
    closing: AtomicBool,
    notify: Notify,
    live: AtomicUsize,
    all_done: Notify,
    idle: Mutex<IdleSlots>,
}

#[derive(Default)]
struct IdleSlots {
    slots: Vec<IdleSlot>,
    free: Vec<u32>,
    epoch: Option<Instant>,
}

/// 24 bytes: one per idle connection.
struct IdleSlot {
    waker: Option<Waker>,
    /// Milliseconds since `IdleSlots::epoch`.
    deadline_ms: u32,
    expired: bool,
}

impl IdleSlots {
    fn millis(&self, t: Instant) -> u32 {
        let Some(epoch) = self.epoch else { return 0 };
        u32::try_from(t.saturating_duration_since(epoch).as_millis()).unwrap_or(u32::MAX)
    }
}

impl Drain {
    pub fn closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    pub fn start(&self) {
        self.closing.store(true, Ordering::Release);
        self.notify.notify_waiters();
        let mut idle = self.idle.lock();
        for slot in idle.slots.iter_mut() {
            slot.expired = true;
            if let Some(w) = slot.waker.take() {
                w.wake();
            }
        }
    }

    /// Wakes idle connections whose deadline passed (they close).
    pub fn expire_idle(&self, now: Instant) {
        let mut idle = self.idle.lock();
        let now = idle.millis(now);
        if idle.epoch.is_none() {
            return;
        }
        for slot in idle.slots.iter_mut() {
            if !slot.expired && slot.deadline_ms <= now {
                slot.expired = true;
                if let Some(w) = slot.waker.take() {
                    w.wake();
                }
            }
        }
    }

    /// A slot for a connection about to idle until `deadline`; `None` when shutting down.
    fn idle_enter(&self, deadline: Instant) -> Option<u32> {
        let mut idle = self.idle.lock();
        if self.closing() {
            return None;
        }
        // The epoch is never later than a deadline (nor than the sweeps after it).
        idle.epoch.get_or_insert_with(Instant::now);
        let slot = IdleSlot {
            deadline_ms: idle.millis(deadline),
            waker: None,
            expired: false,
        };
        Some(match idle.free.pop() {
            Some(i) => {
                idle.slots[i as usize] = slot;
                i
            }
            None => {
                idle.slots.push(slot);
                (idle.slots.len() - 1) as u32
            }
        })
    }

    /// Ready(false) once the slot expired (deadline or shutdown), else keeps the waker.
    fn idle_poll(&self, i: u32, cx: &mut Context<'_>) -> Poll<bool> {
        let mut idle = self.idle.lock();
        let slot = &mut idle.slots[i as usize];
        if slot.expired {
            return Poll::Ready(false);
        }
        match &slot.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => slot.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    fn idle_leave(&self, i: u32) {
        let mut idle = self.idle.lock();
        let slot = &mut idle.slots[i as usize];
        slot.waker = None;
        slot.expired = true;
        idle.free.push(i);
    }

    pub async fn wait(&self) {
        loop {
            let done = self.all_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self.live.load(Ordering::Acquire) == 0 {
                return;
            }
            done.await;
        }
    }

    fn live_enter(&self) {
        self.live.fetch_add(1, Ordering::AcqRel);
    }

    fn live_leave(&self) {
        if self.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.all_done.notify_waiters();
        }
    }
}
