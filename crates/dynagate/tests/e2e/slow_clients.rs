//! Slow and stalling clients (issue 12): a client's slowness is never a server's
//! failure, and a small body is read whole before any upstream connection is taken.

use crate::harness::*;
use serde_json::json;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn gateway(dir: &TempDir, limits: &str) -> Gateway {
    let cfg = dir.path().join("dynagate.toml");
    std::fs::write(&cfg, format!("[limits]\n{limits}")).unwrap();
    Gateway::start_with(dir.path(), &["--config", cfg.to_str().unwrap()]).await
}

async fn first_line(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut piece = [0u8; 1024];
    while !buf.windows(2).any(|w| w == b"\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut piece)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&piece[..n]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&buf).to_string();
    text.lines().next().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_bodies_hold_no_upstream_connection_and_are_not_the_servers_fault() {
    let dir = TempDir::new("slow-body");
    let gw = gateway(&dir, "body_read_timeout = \"1s\"\n").await;
    let a = Backend::start("a").await;
    gw.ok(
        "PUT",
        "/v1/upstreams/u",
        json!({"servers": [{"address": a.addr.to_string()}], "read_timeout": "300ms",
               "retries": 0, "max_fails": 1, "fail_timeout": "10s"}),
    )
    .await;
    gw.put_route("r", &[], "/", "u").await;

    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut s = TcpStream::connect(gw.proxy).await.unwrap();
        s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
            .await
            .unwrap();
        s.write_all(&[b'b'; 100]).await.unwrap();
        slow.push(s);
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        a.conns.load(Ordering::Relaxed),
        0,
        "a half-sent body took a connection"
    );
    for i in 0..10 {
        assert_eq!(gw.get("x", "/").await.0, 200, "normal request {i}");
    }
    for (i, s) in slow.iter_mut().enumerate() {
        let line = first_line(s).await;
        assert!(
            line.starts_with("HTTP/1.1 408"),
            "slow client {i}: {line:?}"
        );
    }
    assert_eq!(gw.get("x", "/").await.0, 200);
    let live = live(&gw, "u", a.addr).await;
    assert_eq!(live["failures"], 0, "{live}");
    assert!(a.conns.load(Ordering::Relaxed) <= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_body_slower_than_the_read_timeout_is_answered_and_not_counted() {
    let dir = TempDir::new("slow-stream");
    let gw = gateway(&dir, "").await;
    let a = Backend::start("a").await;
    gw.ok(
        "PUT",
        "/v1/upstreams/u",
        json!({"servers": [{"address": a.addr.to_string()}], "read_timeout": "300ms",
               "retries": 0, "max_fails": 1}),
    )
    .await;
    gw.ok(
        "PUT",
        "/v1/routes/r",
        json!({"path_prefix": "/", "upstream": "u", "request_buffering": false}),
    )
    .await;
    let mut s = TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        s.write_all(b"4\r\nabcd\r\n").await.unwrap();
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    let line = first_line(&mut s).await;
    assert!(line.starts_with("HTTP/1.1 200"), "{line:?}");
    assert_eq!(live(&gw, "u", a.addr).await["failures"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_chunked_body_is_read_whole_and_sent_with_its_length() {
    let dir = TempDir::new("buffered-chunked");
    let gw = gateway(&dir, "").await;
    let a = Backend::start("a").await;
    gw.put_upstream("u", &[&a]).await;
    gw.put_route("r", &[], "/", "u").await;
    let mut s = TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(
        b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    assert!(first_line(&mut s).await.starts_with("HTTP/1.1 100"));
    s.write_all(b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !got.ends_with(b"\r\n\r\n11") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("answer")
            .unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(text.contains("x-content-length: 11\r\n"), "{text}");
    assert!(text.contains("x-transfer-encoding: none\r\n"), "{text}");
    assert_eq!(
        text.matches("http/1.1 100").count(),
        0,
        "one 100 Continue only: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_after_the_send_timeout() {
    let dir = TempDir::new("send-timeout");
    let gw = gateway(&dir, "send_timeout = \"1s\"\n").await;
    let a = Backend::start("a").await;
    gw.put_upstream("u", &[&a]).await;
    gw.put_route("r", &[], "/", "u").await;
    let total: u64 = 256 * 1024 * 1024;
    let mut s = TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(format!("GET /download?bytes={total} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut got = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    let read_all = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n as u64,
            }
        }
    })
    .await;
    assert!(read_all.is_ok(), "the stalled connection was closed");
    assert!(got < total, "got {got} of {total}: not cut");
    assert_eq!(gw.get("x", "/").await.0, 200);
    assert_eq!(live(&gw, "u", a.addr).await["failures"], 0);
}
