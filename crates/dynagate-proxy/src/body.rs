//! Body types of the proxy: what goes upstream (`UpBody`) and what goes back to the
//! client (`ProxyBody`). Both stream frame by frame; nothing buffers a whole body.

use crate::access_log::{AccessLog, Entry};
use crate::pool::{Pool, Sender};
use crate::runtime::{InFlight, ServerStats};
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Sleep;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body sent upstream: the client's, streamed, or nothing (for a replayed request).
pub enum UpBody {
    Client(Incoming),
    Empty,
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpBody::Client(b) => Pin::new(b).poll_frame(cx),
            UpBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Client(b) => b.is_end_stream(),
            UpBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Client(b) => b.size_hint(),
            UpBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// Hands the upstream connection back to the pool once the response was read to its end,
/// and ends the in-flight count of the server.
pub struct Release {
    pub pool: Arc<Pool>,
    pub key: Arc<str>,
    pub sender: Sender,
    pub max_idle: usize,
}

/// An access-log entry waiting for the end of its response body.
pub struct PendingLog {
    pub log: Arc<AccessLog>,
    pub entry: Entry,
    pub start: std::time::Instant,
}

impl PendingLog {
    /// The entry of a request an upstream server answered, waiting for the body's end
    /// (nothing when there is no access log).
    pub fn answered(
        log: Option<&Arc<AccessLog>>,
        entry: &mut Option<Entry>,
        start: std::time::Instant,
        server: &Arc<str>,
        status: u16,
        upstream_time: Duration,
    ) -> Option<Box<PendingLog>> {
        let log = log?.clone();
        let mut entry = entry.take()?;
        entry.status = status;
        entry.upstream_addr = Some(server.clone());
        entry.upstream_time = Some(upstream_time);
        Some(Box::new(PendingLog { log, entry, start }))
    }

    pub fn emit(mut self: Box<Self>, bytes_sent: u64) {
        self.entry.bytes_sent = bytes_sent;
        self.entry.total_time = self.start.elapsed();
        let PendingLog { log, entry, .. } = *self;
        log.log(entry);
    }
}

/// An upstream response body on its way to the client.
pub struct UpstreamBody {
    inner: Incoming,
    release: Option<Release>,
    in_flight: Option<InFlight>,
    stats: Arc<ServerStats>,
    read_timeout: Duration,
    /// Armed only when the upstream makes us wait: most small bodies never need it.
    timer: Option<Pin<Box<Sleep>>>,
    bytes: u64,
    log: Option<Box<PendingLog>>,
}

impl UpstreamBody {
    pub fn new(
        inner: Incoming,
        release: Option<Release>,
        in_flight: InFlight,
        stats: Arc<ServerStats>,
        read_timeout: Duration,
        log: Option<Box<PendingLog>>,
    ) -> Self {
        let mut body = UpstreamBody {
            inner,
            release,
            in_flight: Some(in_flight),
            stats,
            read_timeout,
            timer: None,
            bytes: 0,
            log,
        };
        if body.inner.is_end_stream() {
            body.finish(true);
        }
        body
    }

    fn finish(&mut self, complete: bool) {
        if let Some(r) = self.release.take() {
            if complete {
                r.pool.checkin(&r.key, r.sender, r.max_idle);
            }
        }
        self.in_flight = None;
        if let Some(log) = self.log.take() {
            log.emit(self.bytes);
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // The client went away mid-body: still log what was sent.
        if let Some(log) = self.log.take() {
            log.emit(self.bytes);
        }
    }
}

#[derive(Debug)]
pub struct UpstreamReadTimeout;

impl std::fmt::Display for UpstreamReadTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "upstream read timed out")
    }
}
impl std::error::Error for UpstreamReadTimeout {}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.in_flight.is_none() && this.inner.is_end_stream() {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                }
                if let Some(t) = this.timer.as_mut() {
                    t.as_mut()
                        .reset(tokio::time::Instant::now() + this.read_timeout);
                }
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.finish(true);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.stats
                    .failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                this.finish(false);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Pending => {
                let timeout = this.read_timeout;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if timer.as_mut().poll(cx).is_ready() {
                    this.stats
                        .failures
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    this.finish(false);
                    return Poll::Ready(Some(Err(Box::new(UpstreamReadTimeout))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

use std::future::Future;

/// What the client receives: a proxied body, or a short body dynagate wrote itself.
pub enum ProxyBody {
    Upstream(UpstreamBody),
    Full(Option<Bytes>),
}

impl ProxyBody {
    pub fn text(s: impl Into<Bytes>) -> Self {
        ProxyBody::Full(Some(s.into()))
    }

    pub fn empty() -> Self {
        ProxyBody::Full(None)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Upstream(b) => Pin::new(b).poll_frame(cx),
            ProxyBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream(b) => b.is_end_stream(),
            ProxyBody::Full(d) => d.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream(b) => b.size_hint(),
            ProxyBody::Full(Some(d)) => SizeHint::with_exact(d.len() as u64),
            ProxyBody::Full(None) => SizeHint::with_exact(0),
        }
    }
}
