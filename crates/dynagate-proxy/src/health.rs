//! Active health checking. One supervisor on its own thread keeps one task per checked
//! server, reconciled with the published snapshot after every change. Checks are
//! jittered, run concurrently under a bound, each with its own timeout, so a hung
//! server never delays another check or the data plane; a task that dies is restarted.

use crate::runtime::{unix_ms, Health, ServerStats, Snapshot, Target, UpstreamRuntime};
use crate::stats::CheckResult;
use arc_swap::ArcSwap;
use dynagate_model::{CheckKind, HealthCheck};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

/// Checks in progress at once, across all servers.
pub const DEFAULT_CONCURRENCY: usize = 512;
/// Bytes of a response body read to look for `body_contains`.
const MAX_BODY: usize = 64 * 1024;

struct Task {
    stats: Arc<ServerStats>,
    check: HealthCheck,
    handle: JoinHandle<()>,
}

pub struct HealthHandle {
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HealthHandle {
    pub fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the checker thread.
pub fn start(
    snapshots: Arc<ArcSwap<Snapshot>>,
    revisions: watch::Receiver<u64>,
    concurrency: usize,
) -> std::io::Result<HealthHandle> {
    let (stop, stop_rx) = watch::channel(false);
    let thread = std::thread::Builder::new()
        .name("dynagate-health".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "health checker failed to start");
                    return;
                }
            };
            rt.block_on(supervise(
                snapshots,
                revisions,
                stop_rx,
                Arc::new(Semaphore::new(concurrency.max(1))),
            ));
        })?;
    Ok(HealthHandle {
        stop,
        thread: Some(thread),
    })
}

async fn supervise(
    snapshots: Arc<ArcSwap<Snapshot>>,
    mut revisions: watch::Receiver<u64>,
    mut stop: watch::Receiver<bool>,
    permits: Arc<Semaphore>,
) {
    let mut tasks: HashMap<(String, String), Task> = HashMap::new();
    // Upstreams as last reconciled: only those whose runtime changed are looked at again.
    let mut seen: HashMap<String, Arc<UpstreamRuntime>> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        reconcile(&snapshots.load(), &mut seen, &mut tasks, &permits);
        tokio::select! {
            _ = revisions.changed() => {}
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
    }
    for (_, task) in tasks {
        task.handle.abort();
    }
}

fn reconcile(
    snapshot: &Snapshot,
    seen: &mut HashMap<String, Arc<UpstreamRuntime>>,
    tasks: &mut HashMap<(String, String), Task>,
    permits: &Arc<Semaphore>,
) {
    // Supervision: a task that ended (it only ends by panicking) is restarted below.
    tasks.retain(|(up, addr), task| {
        let alive = !task.handle.is_finished();
        if !alive {
            tracing::error!(upstream = %up, server = %addr, "health check task died; restarting it");
            seen.remove(up);
        }
        alive
    });
    // Upstreams gone from the configuration.
    let gone: Vec<String> = seen
        .keys()
        .filter(|k| !snapshot.upstreams.contains_key(*k))
        .cloned()
        .collect();
    for name in gone {
        seen.remove(&name);
        tasks.retain(|(up, _), task| {
            if *up == name {
                task.handle.abort();
            }
            *up != name
        });
    }
    for (name, up) in snapshot.upstreams.iter() {
        if seen.get(name).is_some_and(|old| Arc::ptr_eq(old, up)) {
            continue;
        }
        seen.insert(name.clone(), up.clone());
        let wanted: HashMap<&str, usize> = match &up.spec.health_check {
            Some(_) => up
                .servers
                .iter()
                .enumerate()
                .map(|(i, s)| (s.spec.address.as_str(), i))
                .collect(),
            None => HashMap::new(),
        };
        // Stop tasks of servers that left, whose record was replaced, or whose check changed.
        tasks.retain(|(u, addr), task| {
            if u != name {
                return true;
            }
            let keep = match (wanted.get(addr.as_str()), &up.spec.health_check) {
                (Some(i), Some(check)) => {
                    Arc::ptr_eq(&task.stats, &up.servers[*i].stats) && task.check == *check
                }
                _ => false,
            };
            if !keep {
                task.handle.abort();
                if up.spec.health_check.is_none() {
                    // Checks turned off: the verdict no longer applies.
                    task.stats.set_health(Health::Unchecked);
                }
            }
            keep
        });
        let Some(check) = &up.spec.health_check else {
            continue;
        };
        for server in &up.servers {
            let key = (name.clone(), server.spec.address.clone());
            if tasks.contains_key(&key) {
                continue;
            }
            let handle = tokio::spawn(run(
                server.stats.clone(),
                check.clone(),
                server.target.clone(),
                server.spec.address.clone(),
                permits.clone(),
            ));
            tasks.insert(
                key,
                Task {
                    stats: server.stats.clone(),
                    check: check.clone(),
                    handle,
                },
            );
        }
    }
}

fn jitter(d: Duration, spread: f64) -> Duration {
    let r = (crate::balance::random_u64() % 10_000) as f64 / 10_000.0;
    d.mul_f64(1.0 - spread + 2.0 * spread * r)
}

async fn run(
    stats: Arc<ServerStats>,
    check: HealthCheck,
    target: Target,
    address: String,
    permits: Arc<Semaphore>,
) {
    // Spread the first checks over one interval so they never come in a burst.
    let first = crate::balance::random_u64() % (check.interval.as_millis() as u64).max(1);
    tokio::time::sleep(Duration::from_millis(first)).await;
    let mut prober = Prober::new(&check, &address);
    let mut passes = 0u32;
    let mut fails = 0u32;
    loop {
        let outcome = {
            let _permit = permits.acquire().await;
            match tokio::time::timeout(check.timeout, prober.probe(&check, &target)).await {
                Ok(r) => r,
                Err(_) => {
                    prober.conn = None; // a hung connection is not reused
                    Err(format!("no answer within {:?}", check.timeout))
                }
            }
        };
        let ok = outcome.is_ok();
        let message = match outcome {
            Ok(m) | Err(m) => m,
        };
        *stats.last_check.lock() = Some(CheckResult {
            time_ms: unix_ms(),
            ok,
            message: message.clone(),
        });
        let health = stats.health();
        if ok {
            passes += 1;
            fails = 0;
            if health == Health::Unchecked || (health == Health::Unhealthy && passes >= check.rise)
            {
                if health == Health::Unhealthy {
                    tracing::info!(server = %address, "health check: server is healthy again");
                }
                stats.set_health(Health::Healthy);
            }
        } else {
            fails += 1;
            passes = 0;
            if health != Health::Unhealthy && fails >= check.fall {
                tracing::warn!(server = %address, reason = %message, "health check: server is unhealthy");
                stats.set_health(Health::Unhealthy);
            }
        }
        tokio::time::sleep(jitter(check.interval, 0.1)).await;
    }
}

async fn connect(target: &Target) -> std::io::Result<TcpStream> {
    let stream = match target {
        Target::Addr(a) => TcpStream::connect(a).await?,
        Target::Name(n) => TcpStream::connect(&**n).await?,
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// A minimal HTTP/1.1 client for checks, run inside the check's own task: the request
/// is bytes prepared once, the response is parsed in a reused buffer, and the keep-alive
/// connection is kept while the server allows it. Ten thousand checked servers cost ten
/// thousand small tasks and nothing else (no connection task, no channel per check).
struct Prober {
    request: Vec<u8>,
    head_only: bool,
    conn: Option<TcpStream>,
    buf: Vec<u8>,
}

/// How a response body ends.
enum Framing {
    None,
    Length(usize),
    Chunked,
    UntilClose,
}

/// A body read to its end (`reusable`: the connection can carry the next check).
struct Body {
    bytes: Vec<u8>,
    reusable: bool,
}

impl Prober {
    fn new(check: &HealthCheck, address: &str) -> Prober {
        let mut request = format!(
            "{} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: dynagate-health-check\r\n",
            check.method,
            check.path,
            check.host.as_deref().unwrap_or(address)
        );
        for (k, v) in &check.headers {
            request.push_str(&format!("{k}: {v}\r\n"));
        }
        request.push_str("\r\n");
        Prober {
            request: request.into_bytes(),
            head_only: check.method == "HEAD",
            conn: None,
            buf: Vec::with_capacity(1024),
        }
    }

    async fn probe(&mut self, check: &HealthCheck, target: &Target) -> Result<String, String> {
        if check.kind == CheckKind::Tcp {
            connect(target).await.map_err(|e| format!("connect: {e}"))?;
            return Ok("TCP connect ok".into());
        }
        // A kept connection the server has closed meanwhile fails before any answer:
        // then once more on a fresh connection.
        let reused = self.conn.is_some();
        let mut result = self.exchange(check, target).await;
        if reused && matches!(&result, Err(e) if e.starts_with("stale")) {
            result = self.exchange(check, target).await;
        }
        if result.is_err() {
            self.conn = None;
        }
        result.map_err(|e| e.trim_start_matches("stale ").to_string())
    }

    async fn exchange(&mut self, check: &HealthCheck, target: &Target) -> Result<String, String> {
        let conn = match self.conn.take() {
            Some(c) => c,
            None => connect(target).await.map_err(|e| format!("connect: {e}"))?,
        };
        let conn = self.conn.insert(conn);
        if let Err(e) = conn.write_all(&self.request).await {
            return Err(format!("stale request: {e}"));
        }
        self.buf.clear();
        let (status, framing, close) = loop {
            if read_more(conn, &mut self.buf).await? == 0 {
                return Err("stale connection closed before a response".into());
            }
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&self.buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let status = resp.code.unwrap_or(0);
                    let mut framing = Framing::UntilClose;
                    let mut close = resp.version == Some(0);
                    for h in resp.headers.iter() {
                        if h.name.eq_ignore_ascii_case("content-length") {
                            let n = std::str::from_utf8(h.value)
                                .ok()
                                .and_then(|v| v.trim().parse().ok())
                                .ok_or("bad Content-Length")?;
                            framing = Framing::Length(n);
                        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                            framing = Framing::Chunked;
                        } else if h.name.eq_ignore_ascii_case("connection") {
                            close |= h.value.eq_ignore_ascii_case(b"close");
                        }
                    }
                    if self.head_only || status == 204 || status == 304 || status / 100 == 1 {
                        framing = Framing::None;
                    }
                    self.buf.drain(..len);
                    break (status, framing, close);
                }
                Ok(httparse::Status::Partial) if self.buf.len() < MAX_BODY => continue,
                Ok(httparse::Status::Partial) => return Err("response head too large".into()),
                Err(e) => return Err(format!("bad response: {e}")),
            }
        };
        let body = read_body(conn, &mut self.buf, framing).await?;
        if close || !body.reusable {
            self.conn = None;
        }
        let status_ok = if check.expected_statuses.is_empty() {
            (200..400).contains(&status)
        } else {
            check.expected_statuses.contains(&status)
        };
        if !status_ok {
            return Err(format!("HTTP {status} is not an expected status"));
        }
        if let Some(needle) = &check.body_contains {
            let found = body
                .bytes
                .windows(needle.len().max(1))
                .any(|w| w == needle.as_bytes());
            if !found {
                return Err(format!("HTTP {status}: body lacks {needle:?}"));
            }
        }
        Ok(format!("HTTP {status}"))
    }
}

/// Reads a response body; keeps at most `MAX_BODY` bytes of it.
async fn read_body(
    conn: &mut TcpStream,
    buf: &mut Vec<u8>,
    framing: Framing,
) -> Result<Body, String> {
    match framing {
        Framing::None => Ok(Body {
            bytes: Vec::new(),
            reusable: true,
        }),
        Framing::Length(n) => {
            while buf.len() < n {
                if n > MAX_BODY && buf.len() > MAX_BODY {
                    // Too large to keep: take what we have, drop the connection.
                    return Ok(Body {
                        bytes: std::mem::take(buf),
                        reusable: false,
                    });
                }
                if read_more(conn, buf).await? == 0 {
                    return Err("connection closed inside the body".into());
                }
            }
            Ok(Body {
                bytes: buf.drain(..n).collect(),
                reusable: true,
            })
        }
        Framing::UntilClose => {
            while buf.len() <= MAX_BODY && read_more(conn, buf).await? > 0 {}
            Ok(Body {
                bytes: std::mem::take(buf),
                reusable: false,
            })
        }
        Framing::Chunked => {
            let mut bytes = Vec::new();
            loop {
                let line_end = loop {
                    if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    if buf.len() > 1024 || read_more(conn, buf).await? == 0 {
                        return Err("bad chunked body".into());
                    }
                };
                let size = std::str::from_utf8(&buf[..line_end])
                    .ok()
                    .and_then(|t| usize::from_str_radix(t.split(';').next()?.trim(), 16).ok())
                    .ok_or("bad chunk size")?;
                if size == 0 {
                    // The last chunk; a health endpoint sends no trailers.
                    while buf.len() < line_end + 4 {
                        if read_more(conn, buf).await? == 0 {
                            return Ok(Body {
                                bytes,
                                reusable: false,
                            });
                        }
                    }
                    let reusable = &buf[line_end + 2..line_end + 4] == b"\r\n";
                    buf.drain(..line_end + 4);
                    return Ok(Body { bytes, reusable });
                }
                if bytes.len() + size > MAX_BODY {
                    return Ok(Body {
                        bytes,
                        reusable: false,
                    });
                }
                let need = line_end + 2 + size + 2;
                while buf.len() < need {
                    if read_more(conn, buf).await? == 0 {
                        return Err("connection closed inside the body".into());
                    }
                }
                bytes.extend_from_slice(&buf[line_end + 2..line_end + 2 + size]);
                buf.drain(..need);
            }
        }
    }
}

async fn read_more(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Result<usize, String> {
    let mut chunk = [0u8; 4096];
    let n = conn
        .read(&mut chunk)
        .await
        .map_err(|e| format!("read: {e}"))?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynagate_model::{Server, Upstream};

    fn snapshot_with(check: Option<HealthCheck>) -> Snapshot {
        let mut spec = Upstream::new(
            "u",
            vec![Server::new("127.0.0.1:9"), Server::new("127.0.0.1:10")],
        );
        spec.health_check = check;
        let mut snap = Snapshot::default();
        snap.upstreams.insert(
            "u".into(),
            Arc::new(UpstreamRuntime::build(Arc::new(spec), None)),
        );
        snap
    }

    fn tcp_check() -> HealthCheck {
        serde_json::from_str(r#"{"type":"tcp","interval":"1s","timeout":"100ms"}"#).unwrap()
    }

    /// A server that answers each request on a connection with the next canned response.
    async fn canned(responses: Vec<&'static [u8]>) -> Target {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            for r in responses {
                let mut buf = [0u8; 1024];
                if s.read(&mut buf).await.unwrap_or(0) == 0 {
                    return;
                }
                s.write_all(r).await.unwrap();
            }
        });
        Target::Addr(addr)
    }

    #[tokio::test]
    async fn prober_reads_each_framing_and_reuses_the_connection() {
        let mut check: HealthCheck =
            serde_json::from_str(r#"{"type":"http","body_contains":"ok"}"#).unwrap();
        let target = canned(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\no\r\n1\r\nk\r\n0\r\n\r\n",
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnope",
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nok then",
        ])
        .await;
        let mut p = Prober::new(&check, "x");
        assert_eq!(p.probe(&check, &target).await, Ok("HTTP 200".into()));
        assert!(p.conn.is_some(), "kept alive");
        assert_eq!(
            p.probe(&check, &target).await,
            Ok("HTTP 200".into()),
            "chunked"
        );
        let e = p.probe(&check, &target).await.unwrap_err();
        assert!(e.contains("503"), "{e}");
        assert!(p.conn.is_none(), "dropped after a failure");

        // Close-delimited body; and a body without the expected text.
        let target = canned(vec![b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall ok"]).await;
        assert_eq!(p.probe(&check, &target).await, Ok("HTTP 200".into()));
        assert!(p.conn.is_none());
        let target = canned(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnope"]).await;
        let e = p.probe(&check, &target).await.unwrap_err();
        assert!(e.contains("lacks"), "{e}");
        check.body_contains = None;
        let target = canned(vec![b"HTTP/1.1 204 No Content\r\n\r\n"]).await;
        assert_eq!(p.probe(&check, &target).await, Ok("HTTP 204".into()));
    }

    #[tokio::test]
    async fn reconcile_starts_restarts_and_stops_tasks() {
        let permits = Arc::new(Semaphore::new(4));
        let mut seen = HashMap::new();
        let mut tasks = HashMap::new();
        let snap = snapshot_with(Some(tcp_check()));
        reconcile(&snap, &mut seen, &mut tasks, &permits);
        assert_eq!(tasks.len(), 2);

        // A task that died (here: aborted) is restarted on the next pass.
        let key = ("u".to_string(), "127.0.0.1:9".to_string());
        tasks[&key].handle.abort();
        while !tasks[&key].handle.is_finished() {
            tokio::task::yield_now().await;
        }
        reconcile(&snap, &mut seen, &mut tasks, &permits);
        assert_eq!(tasks.len(), 2);
        assert!(!tasks[&key].handle.is_finished());

        // Checks turned off: tasks stop and verdicts are cleared.
        snap.upstreams["u"].servers[0]
            .stats
            .set_health(Health::Unhealthy);
        let off = snapshot_with(None);
        // Carry the same record over, as a real rebuild does.
        let rebuilt =
            UpstreamRuntime::build(off.upstreams["u"].spec.clone(), Some(&snap.upstreams["u"]));
        let mut off = off;
        off.upstreams.insert("u".into(), Arc::new(rebuilt));
        reconcile(&off, &mut seen, &mut tasks, &permits);
        assert!(tasks.is_empty());
        assert_eq!(
            off.upstreams["u"].servers[0].stats.health(),
            Health::Unchecked
        );

        // Upstream gone: nothing left.
        reconcile(&snap, &mut seen, &mut tasks, &permits);
        assert_eq!(tasks.len(), 2);
        reconcile(&Snapshot::default(), &mut seen, &mut tasks, &permits);
        assert!(tasks.is_empty());
    }
}
