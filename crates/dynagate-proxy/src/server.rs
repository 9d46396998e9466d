//! Listeners and worker threads. Each worker is an OS thread with its own single-threaded
//! tokio runtime, its own SO_REUSEPORT listener and its own upstream pool: no state is
//! shared between workers on the request path except the published snapshot.

use crate::access_log::AccessLog;
use crate::body::ProxyBody;
use crate::pool::Pool;
use crate::proxy::{handle, Client, GlobalCounters, Worker};
use crate::runtime::Snapshot;
use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use socket2::{Domain, Protocol, Socket, Type};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct ProxyOptions {
    pub listen: SocketAddr,
    pub workers: usize,
    /// Whole request head within this time; also how long an idle keep-alive
    /// connection waits for its next request.
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
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
            access_log: options.access_log.clone(),
            counters: options.counters.clone(),
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

fn builder(options: &ProxyOptions) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_buf_size(options.max_header_bytes.max(8192))
        .max_headers(options.max_headers);
    b.http2()
        .timer(TokioTimer::new())
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
    let builder = builder(&options);
    let graceful = GracefulShutdown::new();
    let mut sweep = tokio::time::interval(Duration::from_secs(10));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let grace = loop {
        tokio::select! {
            _ = sweep.tick() => worker.pool.sweep(),
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
                let worker = worker.clone();
                let client = Arc::new(Client::new(peer));
                let service = service_fn(move |req| {
                    let worker = worker.clone();
                    let client = client.clone();
                    async move { Ok::<_, Infallible>(handle(&worker, &client, req).await) }
                });
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                });
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
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("grace period over; closing remaining connections");
    }
}

/// For tests and embedding: the response body type the proxy produces.
pub type Body = ProxyBody;
