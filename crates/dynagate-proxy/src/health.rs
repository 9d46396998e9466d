//! Active health checking. One supervisor on its own thread keeps one task per checked
//! server, reconciled with the published snapshot after every change. Checks are
//! jittered, run concurrently under a bound, each with its own timeout, so a hung
//! server never delays another check or the data plane; a task that dies is restarted.

use crate::runtime::{unix_ms, Health, ServerStats, Snapshot, Target, UpstreamRuntime};
use crate::stats::CheckResult;
use arc_swap::ArcSwap;
use bytes::Bytes;
use dynagate_model::{CheckKind, HealthCheck};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
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
    let mut conn: Option<SendRequest<Empty<Bytes>>> = None;
    let mut passes = 0u32;
    let mut fails = 0u32;
    loop {
        let outcome = {
            let _permit = permits.acquire().await;
            match tokio::time::timeout(check.timeout, probe(&check, &target, &address, &mut conn))
                .await
            {
                Ok(r) => r,
                Err(_) => {
                    conn = None; // a hung connection is not reused
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

async fn connect(target: &Target) -> std::io::Result<tokio::net::TcpStream> {
    let stream = match target {
        Target::Addr(a) => tokio::net::TcpStream::connect(a).await?,
        Target::Name(n) => tokio::net::TcpStream::connect(&**n).await?,
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

async fn probe(
    check: &HealthCheck,
    target: &Target,
    address: &str,
    conn: &mut Option<SendRequest<Empty<Bytes>>>,
) -> Result<String, String> {
    if check.kind == CheckKind::Tcp {
        connect(target).await.map_err(|e| format!("connect: {e}"))?;
        return Ok("TCP connect ok".into());
    }
    // HTTP: reuse one keep-alive connection per server while it lasts.
    if conn.as_ref().is_none_or(|c| c.is_closed()) {
        let stream = connect(target).await.map_err(|e| format!("connect: {e}"))?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        *conn = Some(sender);
    }
    let sender = conn.as_mut().expect("set above");
    sender
        .ready()
        .await
        .map_err(|e| format!("connection: {e}"))?;
    let mut req = http::Request::builder()
        .method(check.method.as_str())
        .uri(check.path.as_str())
        .header(http::header::HOST, check.host.as_deref().unwrap_or(address))
        .header(http::header::USER_AGENT, "dynagate-health-check");
    for (k, v) in &check.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => {
            *conn = None;
            return Err(format!("request failed: {e}"));
        }
    };
    let status = resp.status().as_u16();
    let status_ok = if check.expected_statuses.is_empty() {
        (200..400).contains(&status)
    } else {
        check.expected_statuses.contains(&status)
    };
    if let Some(needle) = &check.body_contains {
        let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await;
        let body = match body {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                *conn = None;
                return Err(format!("HTTP {status}: body: {e}"));
            }
        };
        if !status_ok {
            return Err(format!("HTTP {status} is not an expected status"));
        }
        if !body
            .windows(needle.len().max(1))
            .any(|w| w == needle.as_bytes())
        {
            return Err(format!("HTTP {status}: body lacks {needle:?}"));
        }
        return Ok(format!("HTTP {status}"));
    }
    // Drain the body so the connection can be reused.
    let _ = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await;
    if status_ok {
        Ok(format!("HTTP {status}"))
    } else {
        Err(format!("HTTP {status} is not an expected status"))
    }
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
