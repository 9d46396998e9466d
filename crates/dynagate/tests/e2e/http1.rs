//! The HTTP/1 path byte by byte: raw clients and a raw scripted backend, so framing,
//! pipelining, HTTP/1.0, interim responses and pooled connections the server closes are
//! seen exactly as they go over the wire.

use crate::harness::*;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A backend written with bare sockets. By path:
/// - `/chunked`: a chunked body "hello world"
/// - `/until-close`: an HTTP/1.0 answer delimited by closing the connection
/// - `/echo`: reads the request body (Content-Length or chunked, answering an
///   `Expect: 100-continue` first) and answers with its length
/// - `/idle-close`: answers keep-alive, then closes the connection 50 ms later (a
///   server with a short keep-alive timeout)
/// - anything else: the path, keep-alive
async fn raw_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(raw_connection(s));
        }
    });
    addr
}

async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            buf.drain(..end + 4);
            return Some(head);
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>, until: impl Fn(&[u8]) -> bool) -> bool {
    while !until(buf) {
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    true
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Decodes a complete chunked body at the start of `buf`; None until it is complete.
fn dechunk(buf: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        let line_end = i + buf[i..].windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&buf[i..line_end]).ok()?, 16).ok()?;
        i = line_end + 2;
        if size == 0 {
            return (buf.len() >= i + 2).then_some((out, i + 2));
        }
        if buf.len() < i + size + 2 {
            return None;
        }
        out.extend_from_slice(&buf[i..i + size]);
        i += size + 2;
    }
}

async fn raw_connection(mut s: TcpStream) {
    let mut buf = Vec::new();
    while let Some(head) = read_head(&mut s, &mut buf).await {
        let path = head.split(' ').nth(1).unwrap_or("/").to_string();
        match path.as_str() {
            "/chunked" => {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
                    .await;
            }
            "/until-close" => {
                let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\nuntil-close").await;
                return;
            }
            "/echo" => {
                if header(&head, "expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
                    let _ = s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
                }
                let len = if let Some(n) = header(&head, "content-length") {
                    let n: usize = n.parse().unwrap();
                    if !fill(&mut s, &mut buf, |b| b.len() >= n).await {
                        return;
                    }
                    buf.drain(..n);
                    n
                } else {
                    if !fill(&mut s, &mut buf, |b| dechunk(b).is_some()).await {
                        return;
                    }
                    let (body, used) = dechunk(&buf).unwrap();
                    buf.drain(..used);
                    body.len()
                };
                let body = len.to_string();
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            }
            "/idle-close" => {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                return;
            }
            _ => {
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{path}",
                            path.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            }
        }
    }
}

async fn gateway_to_raw_backend(dir: &TempDir, extra: &[&str]) -> Gateway {
    let gw = Gateway::start_with(dir.path(), extra).await;
    let backend = raw_backend().await;
    gw.ok(
        "PUT",
        "/v1/upstreams/raw",
        serde_json::json!({"servers": [{"address": backend.to_string()}], "retries": 0}),
    )
    .await;
    gw.put_route("r", &[], "/", "raw").await;
    gw
}

/// Reads one response (head + Content-Length or chunked body) from `s`, leaving what
/// follows in `buf`. Returns (head, decoded body).
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> (String, Vec<u8>) {
    let head = read_head(s, buf).await.expect("a response head");
    if let Some(n) = header(&head, "content-length") {
        let n: usize = n.parse().unwrap();
        assert!(fill(s, buf, |b| b.len() >= n).await, "body cut short");
        let body = buf.drain(..n).collect();
        (head, body)
    } else if header(&head, "transfer-encoding").is_some() {
        assert!(
            fill(s, buf, |b| dechunk(b).is_some()).await,
            "chunked body cut short"
        );
        let (body, used) = dechunk(buf).unwrap();
        buf.drain(..used);
        (head, body)
    } else {
        (head, Vec::new())
    }
}

async fn connect(gw: &Gateway) -> TcpStream {
    TcpStream::connect(gw.proxy).await.unwrap()
}

/// Everything the gateway sends until it closes the connection (within 5 s).
async fn read_until_closed(s: &mut TcpStream, what: &str) -> String {
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all))
        .await
        .unwrap_or_else(|_| panic!("{what}"))
        .unwrap();
    String::from_utf8_lossy(&all).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelining_and_http10() {
    let dir = TempDir::new("h1-pipeline");
    let gw = gateway_to_raw_backend(&dir, &[]).await;

    // Two requests in one write: two answers, in order, on one connection.
    let mut s = connect(&gw).await;
    s.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let (h1, b1) = read_response(&mut s, &mut buf).await;
    let (h2, b2) = read_response(&mut s, &mut buf).await;
    assert!(
        h1.starts_with("HTTP/1.1 200") && h2.starts_with("HTTP/1.1 200"),
        "{h1}{h2}"
    );
    assert_eq!((&b1[..], &b2[..]), (&b"/a"[..], &b"/b"[..]));

    // HTTP/1.0 without keep-alive: the answer, then the connection closes.
    let mut s = connect(&gw).await;
    s.write_all(b"GET /old HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let text = read_until_closed(&mut s, "connection closed after an HTTP/1.0 answer").await;
    assert!(
        text.starts_with("HTTP/1.1 200") && text.ends_with("/old"),
        "{text}"
    );

    // HTTP/1.0 asking for keep-alive gets it, and the connection carries a second request.
    let mut s = connect(&gw).await;
    let mut buf = Vec::new();
    for path in ["/k1", "/k2"] {
        s.write_all(format!("GET {path} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let (head, body) = read_response(&mut s, &mut buf).await;
        assert!(
            header(&head, "connection").is_some_and(|v| v.eq_ignore_ascii_case("keep-alive")),
            "{head}"
        );
        assert_eq!(body, path.as_bytes());
    }

    // HTTP/1.1 without Host: 400 naming it, connection closed (RFC 9112 §3.2) ...
    let mut s = connect(&gw).await;
    s.write_all(b"GET /nohost HTTP/1.1\r\n\r\n").await.unwrap();
    let text = read_until_closed(&mut s, "connection closed after the 400").await;
    assert!(
        text.starts_with("HTTP/1.1 400") && text.contains("without Host"),
        "{text}"
    );
    // ... even when its absolute-form target names the host (as nginx does) ...
    let mut s = connect(&gw).await;
    s.write_all(b"GET http://x/abs HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let text = read_until_closed(&mut s, "connection closed after the 400").await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    // ... and whose Host line names the same host.
    let mut s = connect(&gw).await;
    s.write_all(b"GET http://x/abs HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let (head, body) = read_response(&mut s, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"/abs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_framing_for_each_client() {
    let dir = TempDir::new("h1-framing");
    let gw = gateway_to_raw_backend(&dir, &[]).await;

    // Chunked from the upstream to an HTTP/1.1 client: passed through.
    let mut s = connect(&gw).await;
    let mut buf = Vec::new();
    s.write_all(b"GET /chunked HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_response(&mut s, &mut buf).await;
    assert!(header(&head, "transfer-encoding").is_some(), "{head}");
    assert_eq!(body, b"hello world");

    // Delimited by close upstream: chunked to the HTTP/1.1 client, whose connection
    // stays open for another request.
    s.write_all(b"GET /until-close HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_response(&mut s, &mut buf).await;
    assert!(header(&head, "transfer-encoding").is_some(), "{head}");
    assert_eq!(body, b"until-close");
    s.write_all(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (_, body) = read_response(&mut s, &mut buf).await;
    assert_eq!(body, b"/again");

    // Chunked upstream to an HTTP/1.0 client: decoded, and the connection closes.
    let mut s = connect(&gw).await;
    s.write_all(b"GET /chunked HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    let text = read_until_closed(&mut s, "closed after a decoded body").await;
    assert!(text.ends_with("\r\n\r\nhello world"), "{text}");
    assert!(
        !text.to_ascii_lowercase().contains("transfer-encoding"),
        "{text}"
    );

    // HEAD: the head only, even though the upstream's says how long the body is.
    let mut s = connect(&gw).await;
    s.write_all(b"HEAD /x HTTP/1.1\r\nHost: x\r\n\r\nGET /y HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let head = read_head(&mut s, &mut buf).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (_, body) = read_response(&mut s, &mut buf).await;
    assert_eq!(body, b"/y");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_stream_and_100_continue_passes() {
    let dir = TempDir::new("h1-bodies");
    let gw = gateway_to_raw_backend(&dir, &[]).await;

    // Expect: 100-continue: the upstream's interim answer reaches the client, which
    // sends its body only then.
    let mut s = connect(&gw).await;
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let interim = tokio::time::timeout(Duration::from_secs(5), read_head(&mut s, &mut buf))
        .await
        .expect("100 Continue forwarded")
        .unwrap();
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    s.write_all(b"hello").await.unwrap();
    let (head, body) = read_response(&mut s, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"5");

    // A chunked body trickling in: streamed upstream as it comes.
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    for piece in [&b"4\r\nabcd\r\n"[..], b"6\r\nefghij\r\n", b"0\r\n\r\n"] {
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.write_all(piece).await.unwrap();
    }
    let (_, body) = read_response(&mut s, &mut buf).await;
    assert_eq!(body, b"10");

    // A large Content-Length body arriving in pieces; then the connection goes on.
    let big = vec![b'z'; 300_000];
    s.write_all(
        format!(
            "PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            big.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    for part in big.chunks(70_000) {
        s.write_all(part).await.unwrap();
    }
    let (_, body) = read_response(&mut s, &mut buf).await;
    assert_eq!(body, b"300000");
    s.write_all(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (_, body) = read_response(&mut s, &mut buf).await;
    assert_eq!(body, b"/after");

    // A chunked body with broken framing: 400 naming it, then the connection closes
    // (what follows cannot be told apart from a next request).
    let mut s = connect(&gw).await;
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b"4\r\nabcd\r\nzz\r\n").await.unwrap();
    let text = read_until_closed(&mut s, "connection closed after the 400").await;
    assert!(
        text.starts_with("HTTP/1.1 400") && text.contains("invalid chunked body"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_the_server_closed_are_not_errors() {
    let dir = TempDir::new("h1-stale");
    let gw = gateway_to_raw_backend(&dir, &[]).await;
    let mut s = connect(&gw).await;
    let mut buf = Vec::new();
    // Every pooled connection is closed by the server 50 ms after its answer; requests
    // come 100 ms apart, GETs and POSTs (which are never sent twice).
    for i in 0..12 {
        let req = if i % 2 == 0 {
            "GET /idle-close HTTP/1.1\r\nHost: x\r\n\r\n".to_string()
        } else {
            "POST /idle-close HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".to_string()
        };
        s.write_all(req.as_bytes()).await.unwrap();
        let (head, body) = read_response(&mut s, &mut buf).await;
        assert!(head.starts_with("HTTP/1.1 200"), "request {i}: {head}");
        assert_eq!(body, b"ok");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_connections_close_after_the_timeout() {
    let dir = TempDir::new("h1-idle");
    let cfg = dir.path().join("dynagate.toml");
    std::fs::write(&cfg, "[limits]\nheader_read_timeout = \"1s\"\n").unwrap();
    let gw = gateway_to_raw_backend(&dir, &["--config", cfg.to_str().unwrap()]).await;
    let mut s = connect(&gw).await;
    let mut buf = Vec::new();
    s.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (_, body) = read_response(&mut s, &mut buf).await;
    assert_eq!(body, b"/a");
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("idle connection closed")
        .unwrap();
    assert_eq!(n, 0);
    let idle = started.elapsed();
    assert!(
        idle >= Duration::from_millis(900) && idle < Duration::from_secs(3),
        "{idle:?}"
    );
}
