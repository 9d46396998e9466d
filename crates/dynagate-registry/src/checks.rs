//! Health checks run by the registry: HTTP and TCP on an interval, TTL timers, and the
//! reaper that deregisters services critical for longer than their
//! `DeregisterCriticalServiceAfter`.
//!
//! One lightweight task per check; at most `check_concurrency` probes run at once (a
//! semaphore) and every probe is bounded by its timeout, so a hung target only ever costs
//! its own check. Tasks hold a weak reference to the registry and end with it.

use crate::model::{CheckKind, CheckStatus};
use crate::Registry;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::sync::Weak;
use std::time::Duration;
use tokio::net::TcpStream;

/// How much of an HTTP check's response body goes into its Output (Consul: 4 KiB).
const OUTPUT_MAX: usize = 4096;

/// Runs an HTTP or TCP check every interval until aborted or the registry is gone. The
/// first probe runs at once.
pub(crate) async fn run_interval_check(reg: Weak<Registry>, id: String, kind: CheckKind) {
    let interval = kind
        .interval()
        .unwrap_or(Duration::from_secs(10))
        .max(Duration::from_secs(1));
    loop {
        let Some(permits) = reg.upgrade().map(|r| r.check_permits.clone()) else {
            return;
        };
        let (status, output) = {
            let Ok(_permit) = permits.acquire_owned().await else {
                return;
            };
            probe(&kind).await
        };
        let Some(r) = reg.upgrade() else {
            return;
        };
        let expected = kind.clone();
        let res = r
            .update_check(id.clone(), move |e, _now| {
                if e.def.kind != expected {
                    // Replaced while we probed: the new runner owns it.
                    return Ok(None);
                }
                if e.rt.status != status {
                    Ok(Some((status, output)))
                } else {
                    // Same status: refresh the output without waking watchers.
                    e.rt.output = output;
                    Ok(None)
                }
            })
            .await;
        drop(r);
        if res.is_err() {
            return; // the check is gone
        }
        tokio::time::sleep(interval).await;
    }
}

/// Probes once: `(status, output)`.
pub(crate) async fn probe(kind: &CheckKind) -> (CheckStatus, String) {
    match kind {
        CheckKind::Http {
            url,
            method,
            header,
            body,
            timeout,
            ..
        } => http_probe(url, method, header, body, *timeout).await,
        CheckKind::Tcp {
            address, timeout, ..
        } => tcp_probe(address, *timeout).await,
        CheckKind::Ttl { .. } | CheckKind::Maintenance => (CheckStatus::Critical, String::new()),
    }
}

async fn tcp_probe(address: &str, timeout: Duration) -> (CheckStatus, String) {
    match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
        Ok(Ok(_)) => (
            CheckStatus::Passing,
            format!("TCP connect {address}: Success"),
        ),
        Ok(Err(e)) => (CheckStatus::Critical, format!("dial tcp {address}: {e}")),
        Err(_) => (
            CheckStatus::Critical,
            format!(
                "dial tcp {address}: i/o timeout after {}",
                crate::duration::format_go_duration(timeout)
            ),
        ),
    }
}

/// Aborts a spawned task when dropped (the HTTP check's connection driver).
struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn http_probe(
    url: &str,
    method: &str,
    header: &BTreeMap<String, Vec<String>>,
    body: &str,
    timeout: Duration,
) -> (CheckStatus, String) {
    let fut = http_follow(url, method, header, body);
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok((code, reason, text))) => {
            let status = match code {
                200..=299 => CheckStatus::Passing,
                429 => CheckStatus::Warning,
                _ => CheckStatus::Critical,
            };
            (
                status,
                format!("HTTP {method} {url}: {code} {reason} Output: {text}"),
            )
        }
        Ok(Err(e)) => (CheckStatus::Critical, format!("{method} {url:?}: {e}")),
        Err(_) => (
            CheckStatus::Critical,
            format!(
                "{method} {url:?}: timeout after {} (Client.Timeout exceeded while awaiting headers)",
                crate::duration::format_go_duration(timeout)
            ),
        ),
    }
}

/// Follows up to 10 redirects like Go's HTTP client (Consul's checker): 301/302/303
/// turn the method into GET; 307/308 keep it.
async fn http_follow(
    url: &str,
    method: &str,
    header: &BTreeMap<String, Vec<String>>,
    body: &str,
) -> Result<(u16, String, String), String> {
    let mut url = url.to_string();
    let mut method = method.to_string();
    let mut body = body.to_string();
    for _ in 0..=10 {
        let (code, reason, text, location) = http_request(&url, &method, header, &body).await?;
        match (code, location) {
            (301 | 302 | 303 | 307 | 308, Some(loc)) => {
                url = resolve_location(&url, &loc);
                if matches!(code, 301..=303) && method != "GET" && method != "HEAD" {
                    method = "GET".into();
                    body.clear();
                }
            }
            _ => return Ok((code, reason, text)),
        }
    }
    Err("stopped after 10 redirects".into())
}

/// A redirect `Location` resolved against the URL that answered it.
fn resolve_location(base: &str, loc: &str) -> String {
    if loc.starts_with("http://") || loc.starts_with("https://") {
        return loc.to_string();
    }
    let Ok(uri) = base.parse::<http::Uri>() else {
        return loc.to_string();
    };
    let origin = format!(
        "{}://{}",
        uri.scheme_str().unwrap_or("http"),
        uri.authority().map(|a| a.as_str()).unwrap_or("")
    );
    if let Some(rest) = loc.strip_prefix("//") {
        return format!("{}://{rest}", uri.scheme_str().unwrap_or("http"));
    }
    if loc.starts_with('/') {
        return format!("{origin}{loc}");
    }
    let dir = uri.path().rsplit_once('/').map_or("", |(d, _)| d);
    format!("{origin}{dir}/{loc}")
}

async fn http_request(
    url: &str,
    method: &str,
    header: &BTreeMap<String, Vec<String>>,
    body: &str,
) -> Result<(u16, String, String, Option<String>), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("invalid URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err("only http:// URLs are supported".into());
    }
    let authority = uri.authority().ok_or("URL has no host")?.clone();
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(80);
    let stream = TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("dial tcp {host}:{port}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let _driver = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let method = http::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
    let mut req = http::Request::builder().method(method).uri(path);
    let mut has_host = false;
    let mut has_ua = false;
    let mut has_accept = false;
    for (name, values) in header {
        let lower = name.to_ascii_lowercase();
        has_host |= lower == "host";
        has_ua |= lower == "user-agent";
        has_accept |= lower == "accept";
        for v in values {
            req = req.header(name.as_str(), v.as_str());
        }
    }
    if !has_host {
        req = req.header("host", authority.as_str());
    }
    if !has_ua {
        req = req.header("user-agent", "Consul Health Check");
    }
    if !has_accept {
        req = req.header("accept", "text/plain, text/*, */*");
    }
    let req = req
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let reason = status.canonical_reason().unwrap_or("").to_string();
    let location = resp
        .headers()
        .get(http::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut body = resp.into_body();
    let mut text: Vec<u8> = Vec::new();
    while text.len() < OUTPUT_MAX {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let room = OUTPUT_MAX - text.len();
                    text.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            Some(Err(_)) | None => break,
        }
    }
    Ok((
        status.as_u16(),
        reason,
        String::from_utf8_lossy(&text).into_owned(),
        location,
    ))
}

/// TTL check timer: marks the check critical with `TTL expired` when its deadline
/// passes. Heartbeats move the deadline in the state; this task just sleeps until it.
pub(crate) async fn run_ttl_timer(reg: Weak<Registry>, id: String, _ttl: Duration) {
    loop {
        let (deadline, wake) = {
            let Some(r) = reg.upgrade() else {
                return;
            };
            let st = r.state.read();
            let Some(e) = st.checks.get(&id) else {
                return;
            };
            (e.rt.ttl_deadline, e.rt.ttl_wake.clone())
        };
        match deadline {
            None => wake.notified().await,
            Some(d) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(d.into()) => {}
                    _ = wake.notified() => continue,
                }
                let Some(r) = reg.upgrade() else {
                    return;
                };
                let res = r
                    .update_check(id.clone(), |e, now| {
                        match e.rt.ttl_deadline {
                            Some(d) if d <= now => {
                                e.rt.ttl_deadline = None;
                                let output = "TTL expired".to_string();
                                if e.rt.status == CheckStatus::Critical && e.rt.output == output {
                                    Ok(None)
                                } else {
                                    Ok(Some((CheckStatus::Critical, output)))
                                }
                            }
                            _ => Ok(None), // heartbeat moved it: sleep again
                        }
                    })
                    .await;
                if res.is_err() {
                    return;
                }
            }
        }
    }
}

/// Every `reap_interval`, deregisters services that have a check with
/// `DeregisterCriticalServiceAfter` critical for at least that long.
pub(crate) async fn reaper(reg: Weak<Registry>) {
    let interval = match reg.upgrade() {
        Some(r) => r.opts.reap_interval.max(Duration::from_millis(10)),
        None => return,
    };
    loop {
        tokio::time::sleep(interval).await;
        let Some(r) = reg.upgrade() else {
            return;
        };
        let victims: Vec<String> = {
            let st = r.state.read();
            let now = std::time::Instant::now();
            let mut v: Vec<String> = st
                .checks
                .values()
                .filter(|c| !c.def.service_id.is_empty())
                .filter_map(|c| {
                    let after = c.def.deregister_after?;
                    let since = c.rt.critical_since?;
                    (c.rt.status == CheckStatus::Critical && now.duration_since(since) >= after)
                        .then(|| c.def.service_id.clone())
                })
                .collect();
            v.dedup();
            v
        };
        for sid in victims {
            match r.deregister_service(sid.clone()).await {
                Ok(()) => tracing::info!(
                    service = %sid,
                    "deregistered service critical for longer than DeregisterCriticalServiceAfter"
                ),
                Err(e) => {
                    tracing::warn!(service = %sid, error = %e.msg, "reaper could not deregister")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn one_shot_server(response: &'static [u8], delay: Duration) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 2048];
                    let _ = s.read(&mut buf).await;
                    tokio::time::sleep(delay).await;
                    let _ = s.write_all(response).await;
                });
            }
        });
        addr.to_string()
    }

    fn http(url: String, timeout: Duration) -> CheckKind {
        CheckKind::Http {
            url,
            method: "GET".into(),
            header: BTreeMap::new(),
            body: String::new(),
            tls_skip_verify: false,
            interval: Duration::from_secs(1),
            timeout,
        }
    }

    #[tokio::test]
    async fn http_status_mapping() {
        let ok = one_shot_server(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
            Duration::ZERO,
        )
        .await;
        let (s, out) = probe(&http(format!("http://{ok}/health"), Duration::from_secs(2))).await;
        assert_eq!(s, CheckStatus::Passing, "{out}");
        assert!(out.contains("200 OK Output: hi"), "{out}");
        let busy = one_shot_server(
            b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 0\r\n\r\n",
            Duration::ZERO,
        )
        .await;
        let (s, _) = probe(&http(format!("http://{busy}/"), Duration::from_secs(2))).await;
        assert_eq!(s, CheckStatus::Warning);
        let bad = one_shot_server(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
            Duration::ZERO,
        )
        .await;
        let (s, _) = probe(&http(format!("http://{bad}/"), Duration::from_secs(2))).await;
        assert_eq!(s, CheckStatus::Critical);
    }

    #[tokio::test]
    async fn http_redirects_are_followed() {
        let target = one_shot_server(
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nhere",
            Duration::ZERO,
        )
        .await;
        let resp: &'static [u8] = Box::leak(
            format!(
                "HTTP/1.1 302 Found\r\nLocation: http://{target}/ok\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .into_bytes()
            .into_boxed_slice(),
        );
        let redirect = one_shot_server(resp, Duration::ZERO).await;
        let (s, out) = probe(&http(format!("http://{redirect}/"), Duration::from_secs(2))).await;
        assert_eq!(s, CheckStatus::Passing, "{out}");
        assert!(out.ends_with("Output: here"), "{out}");
        assert_eq!(resolve_location("http://a:1/x/y?q", "z"), "http://a:1/x/z");
        assert_eq!(resolve_location("http://a:1/x/y", "/r"), "http://a:1/r");
        assert_eq!(resolve_location("http://a:1/", "//b/c"), "http://b/c");
    }

    #[tokio::test]
    async fn hung_http_check_times_out() {
        let hung = one_shot_server(b"", Duration::from_secs(30)).await;
        let t = std::time::Instant::now();
        let (s, out) = probe(&http(format!("http://{hung}/"), Duration::from_millis(300))).await;
        assert_eq!(s, CheckStatus::Critical);
        assert!(out.contains("timeout"), "{out}");
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn tcp_probe_states() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let (s, out) = tcp_probe(&addr, Duration::from_secs(1)).await;
        assert_eq!(s, CheckStatus::Passing, "{out}");
        drop(l);
        let (s, _) = tcp_probe(&addr, Duration::from_secs(1)).await;
        assert_eq!(s, CheckStatus::Critical);
    }
}
