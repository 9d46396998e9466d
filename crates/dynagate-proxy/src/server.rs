//! Listeners and worker threads. Each worker is an OS thread with its own single-threaded
//! tokio runtime, its own SO_REUSEPORT listener and its own upstream pool: no state is
//! shared between workers on the request path except the published snapshot.

use crate::access_log::AccessLog;
use crate::body::ProxyBody;
use crate::h1::{ConnOptions, Drain, Shared};
use crate::pool::Pool;
use crate::proxy::{GlobalCounters, Worker};
use crate::runtime::Snapshot;
use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use socket2::{Domain, Protocol, Socket, Type};
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::watch;

/// Default request body limit: none, as APISIX and Kong (`client_max_body_size 0`) —
/// a gateway carries uploads of any size; `[limits] max_body_bytes` sets one.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 0;

/// Request bodies read whole before they are sent: 64 KiB (nginx keeps 16 KiB in memory
/// and the rest in a temporary file; past this dynagate streams instead).
pub const DEFAULT_REQUEST_BUFFER_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct ProxyOptions {
    pub listen: SocketAddr,
    pub workers: usize,
    /// Whole request head within this time; also how long an idle keep-alive
    /// connection waits for its next request.
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// Largest request body accepted (413 above); 0 = no limit.
    pub max_body_bytes: u64,
    /// Forward request header names containing `_` (dropped by default, as nginx does).
    pub underscores_in_headers: bool,
    /// Request bodies up to this size are read whole before a server is chosen; 0 = off.
    pub request_buffer_bytes: usize,
    /// Longest wait for the next piece of a request body (408 after it).
    pub body_read_timeout: Duration,
    /// Longest wait for a client to take more of a response (the connection closes).
    pub send_timeout: Duration,
    pub h2_max_concurrent_streams: u32,
    pub access_log: Option<Arc<AccessLog>>,
    /// Shared with the metrics endpoint.
    pub counters: Arc<GlobalCounters>,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            listen: "127.0.0.1:0".parse().expect("literal"),
            workers: 1,
            header_read_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            underscores_in_headers: false,
            request_buffer_bytes: DEFAULT_REQUEST_BUFFER_BYTES,
            // nginx's client_body_timeout and send_timeout.
            body_read_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
            h2_max_concurrent_streams: 128,
            access_log: None,
            counters: Arc::default(),
        }
    }
}

pub struct ProxyHandle {
    pub local_addr: SocketAddr,
    stop: watch::Sender<Option<Duration>>,
    threads: Vec<JoinHandle<()>>,
}

fn bind(addr: SocketAddr, reuse_port: bool) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Binds the listeners (so an address in use fails here, before anything runs) and
/// starts the worker threads.
pub fn start(
    options: ProxyOptions,
    snapshots: Arc<ArcSwap<Snapshot>>,
) -> std::io::Result<ProxyHandle> {
    let workers = options.workers.max(1);
    let reuse_port = workers > 1;
    let first = bind(options.listen, reuse_port)?;
    let local_addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..workers {
        listeners.push(bind(local_addr, true)?);
    }
    crate::stats::set_shard_count(workers + 1);
    let (stop, stop_rx) = watch::channel(None);
    let mut threads = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let worker = Arc::new(Worker {
            snapshots: snapshots.clone(),
            pool: Arc::new(Pool::default()),
            h1_pool: Pool::default(),
            access_log: options.access_log.clone(),
            counters: options.counters.clone(),
            underscores_in_headers: options.underscores_in_headers,
        });
        let options = options.clone();
        let stop_rx = stop_rx.clone();
        let thread = std::thread::Builder::new()
            .name(format!("dynagate-worker-{i}"))
            .spawn(move || {
                crate::stats::set_worker_shard(i);
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "worker runtime failed to start");
                        return;
                    }
                };
                runtime.block_on(serve(listener, worker, options, stop_rx));
            })?;
        threads.push(thread);
    }
    Ok(ProxyHandle {
        local_addr,
        stop,
        threads,
    })
}

impl ProxyHandle {
    /// Stops accepting, lets in-flight requests finish within `grace`, then returns.
    pub fn shutdown(self, grace: Duration) {
        let _ = self.stop.send(Some(grace));
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn http2_builder(options: &ProxyOptions) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_concurrent_streams(options.h2_max_concurrent_streams)
        .max_header_list_size(options.max_header_bytes as u32)
        // Close connections whose clients reset streams rapidly (CVE-2023-44487).
        .max_pending_accept_reset_streams(Some(64))
        .max_local_error_reset_streams(Some(256));
    b
}

async fn serve(
    listener: std::net::TcpListener,
    worker: Arc<Worker>,
    options: ProxyOptions,
    mut stop: watch::Receiver<Option<Duration>>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "listener setup failed");
            return;
        }
    };
    let shared = Arc::new(Shared {
        worker: worker.clone(),
        options: ConnOptions {
            header_read_timeout: options.header_read_timeout,
            max_header_bytes: options.max_header_bytes,
            max_headers: options.max_headers,
            body_read_timeout: options.body_read_timeout,
            max_body_bytes: options.max_body_bytes,
            underscores_in_headers: options.underscores_in_headers,
            request_buffer_bytes: options.request_buffer_bytes,
            send_timeout: options.send_timeout,
        },
        drain: Arc::new(Drain::default()),
        h2: http2_builder(&options),
    });
    let mut sweep = tokio::time::interval(Duration::from_secs(10));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut idle_tick = tokio::time::interval(IDLE_TICK);
    idle_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let grace = loop {
        tokio::select! {
            _ = sweep.tick() => {
                worker.pool.sweep();
                worker.h1_pool.sweep();
            }
            now = idle_tick.tick() => shared.drain.expire_idle(now),
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(crate::h1::serve(stream, peer, shared.clone()));
            }
            changed = stop.changed() => {
                if changed.is_err() {
                    break Duration::ZERO;
                }
                if let Some(grace) = *stop.borrow() {
                    break grace;
                }
            }
        }
    };
    drop(listener);
    shared.drain.start();
    if tokio::time::timeout(grace, shared.drain.wait())
        .await
        .is_err()
    {
        tracing::warn!("grace period over; closing remaining connections");
    }
}

/// How often idle keep-alive connections past their deadline are closed: the idle
/// timeout is kept to within this.
const IDLE_TICK: Duration = Duration::from_millis(250);

/// For tests and embedding: the response body type the proxy produces.
pub type Body = ProxyBody;
