//! Bytes on the wire, as nginx-upsync-module and other strict clients read them.

mod common;

use common::*;
use dynagate_registry::RegistryOptions;
use std::time::{Duration, Instant};

/// Exactly what nginx-upsync-module sends (ngx_sprintf format in its source).
fn upsync_request(path: &str, index: u64) -> Vec<u8> {
    format!("GET {path}?recurse&index={index} HTTP/1.0\r\nHost: consul\r\nAccept: */*\r\n\r\n")
        .into_bytes()
}

fn assert_upsync_shape(raw: &[u8], expect_index: Option<u64>) -> Resp {
    let text = String::from_utf8_lossy(raw).into_owned();
    let r = parse_response(raw);
    assert!(
        r.status_line == "HTTP/1.1 200 OK" || r.status_line == "HTTP/1.0 200 OK",
        "status line: {:?}",
        r.status_line
    );
    // Exact header name bytes.
    let idx_line = r
        .head
        .split("\r\n")
        .find(|l| l.starts_with("X-Consul-Index: "))
        .unwrap_or_else(|| panic!("no exact 'X-Consul-Index: ' line in:\n{text}"));
    let idx: u64 = idx_line["X-Consul-Index: ".len()..].parse().unwrap();
    assert!(idx >= 1);
    if let Some(want) = expect_index {
        assert_eq!(idx, want);
    }
    assert!(r.head.contains("\r\nX-Consul-Knownleader: true"), "{text}");
    assert!(r.head.contains("\r\nX-Consul-Lastcontact: 0"), "{text}");
    let cl: usize = r
        .head
        .split("\r\n")
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap_or_else(|| panic!("no Content-Length in:\n{text}"))
        .parse()
        .unwrap();
    assert_eq!(cl, r.body.len(), "Content-Length matches the body");
    assert!(
        !r.head.to_ascii_lowercase().contains("transfer-encoding"),
        "never chunked: {text}"
    );
    assert!(
        !r.head
            .to_ascii_lowercase()
            .contains("connection: keep-alive"),
        "{text}"
    );
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_upsync_kv_mode() {
    let s = Server::start(RegistryOptions::default()).await;
    s.put(
        "/v1/kv/upstreams/test/10.0.0.1:8080",
        r#"{"weight":1,"max_fails":2,"fail_timeout":10,"down":0,"backup":0}"#,
    )
    .await;
    // First pull: index=0 answers at once. raw_bytes reads to EOF, so this also proves
    // the connection is closed after the response.
    let raw = raw_bytes(
        s.addr,
        &upsync_request("/v1/kv/upstreams/test/", 0),
        Duration::from_secs(5),
    )
    .await;
    let r = assert_upsync_shape(&raw, None);
    let v = r.json();
    assert_eq!(v[0]["Key"], "upstreams/test/10.0.0.1:8080");
    let idx = r.index();

    // Blocking pull (no wait: default 5 min) returns on change with a Content-Length body.
    let addr = s.addr;
    let w = tokio::spawn(async move {
        raw_bytes(
            addr,
            &upsync_request("/v1/kv/upstreams/test/", idx),
            Duration::from_secs(20),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!w.is_finished());
    s.put("/v1/kv/upstreams/test/10.0.0.2:8080", "").await;
    let raw = w.await.unwrap();
    let r = assert_upsync_shape(&raw, None);
    assert!(r.index() > idx);
    assert_eq!(r.json().as_array().unwrap().len(), 2);

    // Empty upstream: 404 still carries X-Consul-Index exactly.
    let raw = raw_bytes(
        s.addr,
        &upsync_request("/v1/kv/upstreams/none/", 0),
        Duration::from_secs(5),
    )
    .await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    assert!(
        text.starts_with("HTTP/1.1 404 Not Found\r\n")
            || text.starts_with("HTTP/1.0 404 Not Found\r\n"),
        "{text}"
    );
    assert!(text.contains("\r\nX-Consul-Index: "), "{text}");
    assert!(text.contains("\r\nContent-Length: 0\r\n"), "{text}");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_upsync_catalog_and_health_modes() {
    let s = Server::start(RegistryOptions::default()).await;
    s.put(
        "/v1/agent/service/register",
        r#"{"Name":"x","ID":"x1","Address":"10.0.0.5","Port":80,"Tags":["weight=2","backup"],
            "Check":{"TTL":"30s","Status":"passing"}}"#,
    )
    .await;
    s.put(
        "/v1/agent/service/register",
        r#"{"Name":"x","ID":"x2","Port":81}"#,
    )
    .await;
    let raw = raw_bytes(
        s.addr,
        &upsync_request("/v1/catalog/service/x", 0),
        Duration::from_secs(5),
    )
    .await;
    let r = assert_upsync_shape(&raw, None);
    let v = r.json();
    assert_eq!(v[0]["ServiceAddress"], "10.0.0.5");
    assert_eq!(v[0]["ServicePort"], 80);
    assert_eq!(v[0]["ServiceTags"][0], "weight=2");
    assert_eq!(v[1]["ServiceAddress"], "");
    assert_eq!(v[1]["Address"], "127.0.0.1");

    let raw = raw_bytes(
        s.addr,
        &upsync_request("/v1/health/service/x", 0),
        Duration::from_secs(5),
    )
    .await;
    let r = assert_upsync_shape(&raw, None);
    let v = r.json();
    for e in v.as_array().unwrap() {
        assert!(e["Checks"].is_array(), "Checks always present");
    }
    let idx = r.index();
    // Health mode blocks and wakes on a check status change.
    let addr = s.addr;
    let w = tokio::spawn(async move {
        raw_bytes(
            addr,
            &upsync_request("/v1/health/service/x", idx),
            Duration::from_secs(20),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.put("/v1/agent/check/fail/service:x1", "").await;
    let raw = w.await.unwrap();
    let r = assert_upsync_shape(&raw, None);
    assert!(r.index() > idx);
    assert_eq!(r.json()[0]["Checks"][1]["Status"], "critical");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_case_on_http11_and_errors() {
    let s = Server::start(RegistryOptions::default()).await;
    let raw = raw_bytes(
        s.addr,
        b"GET /v1/kv/nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
    assert!(text.contains("\r\nX-Consul-Index: "), "{text}");
    assert!(
        text.contains("\r\nX-Consul-Knownleader: true\r\n"),
        "{text}"
    );
    assert!(text.contains("\r\nX-Consul-Lastcontact: 0\r\n"), "{text}");
    let raw = raw_bytes(
        s.addr,
        b"GET /v1/catalog/services HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let text = String::from_utf8_lossy(&raw);
    assert!(
        text.contains("\r\nContent-Type: application/json\r\n"),
        "{text}"
    );
    assert!(text.contains("\r\nX-Consul-Index: "), "{text}");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_sizes_past_the_cap_are_refused_not_overflowed() {
    // The running total plus a size near usize::MAX overflowed: the connection's task
    // panicked (a wrapped total in a release build, then a capacity-overflow panic).
    let s = Server::start(RegistryOptions::default()).await;
    let raw = raw_bytes(
        s.addr,
        b"PUT /v1/kv/k HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\nffffffffffffffff\r\n",
        Duration::from_secs(5),
    )
    .await;
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 413 "), "{text}");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http11_keep_alive_serves_several_requests() {
    let s = Server::start(RegistryOptions::default()).await;
    let t = Instant::now();
    let raw = raw_bytes(
        s.addr,
        b"GET /v1/status/leader HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/status/peers HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let text = String::from_utf8_lossy(&raw);
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
    assert!(t.elapsed() < Duration::from_secs(3));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "prints the raw bytes for a human to look at"]
async fn show_raw_http10_response() {
    let s = Server::start(RegistryOptions::default()).await;
    s.put("/v1/kv/upstreams/test/10.0.0.1:80", "").await;
    let raw = raw_bytes(
        s.addr,
        &upsync_request("/v1/kv/upstreams/test/", 0),
        Duration::from_secs(5),
    )
    .await;
    println!("{}", String::from_utf8_lossy(&raw));
    s.shutdown().await;
}

/// Reads one response (head + Content-Length body) from a keep-alive connection.
async fn read_one(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>, head_only: bool) -> Resp {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .split("\r\n")
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            let total = end + 4 + if head_only { 0 } else { len };
            if buf.len() >= total {
                let r = parse_response(&buf[..total]);
                buf.drain(..total);
                return r;
            }
        }
        let mut chunk = [0u8; 65536];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("no answer in time")
            .unwrap();
        assert!(n > 0, "connection closed early");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_watchers_share_one_answer() {
    use tokio::io::AsyncWriteExt;
    let s = Server::start(RegistryOptions::default()).await;
    s.put(
        "/v1/agent/service/register",
        r#"{"Name":"web","ID":"w1","Port":80}"#,
    )
    .await;
    let idx = s.get("/v1/health/service/web").await.index();
    let path = format!("/v1/health/service/web?index={idx}&wait=30s");
    // Keep-alive HTTP/1.1 watchers, one of them with its next request already sent
    // (pipelined behind the parked one).
    let mut conns = Vec::new();
    for i in 0..20 {
        let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        if i == 0 {
            req.push_str("GET /v1/status/leader HTTP/1.1\r\nHost: x\r\n\r\n");
        }
        c.write_all(req.as_bytes()).await.unwrap();
        conns.push(c);
    }
    // An HTTP/1.0 watcher (nginx-upsync) and a HEAD watcher of the same read.
    let addr = s.addr;
    let p10 = path.clone();
    let http10 = tokio::spawn(async move {
        raw_bytes(
            addr,
            format!("GET {p10} HTTP/1.0\r\n\r\n").as_bytes(),
            Duration::from_secs(10),
        )
        .await
    });
    let mut head_conn = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    head_conn
        .write_all(format!("HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    // A watcher that goes away while parked is not counted any more.
    let mut gone = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    gone.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.reg.stats().watchers < 23 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.reg.stats().watchers, 23);
    drop(gone);
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.reg.stats().watchers > 22 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.reg.stats().watchers, 22, "a closed watcher is dropped");

    s.put(
        "/v1/agent/check/register",
        r#"{"Name":"c","ServiceID":"w1","TTL":"30s"}"#,
    )
    .await;
    let mut bodies = Vec::new();
    for (i, c) in conns.iter_mut().enumerate() {
        let mut buf = Vec::new();
        let r = read_one(c, &mut buf, false).await;
        assert_eq!(r.status_line, "HTTP/1.1 200 OK");
        assert!(r.index() > idx);
        assert!(r.header("Connection").is_none(), "{}", r.head);
        bodies.push(r.body.clone());
        if i == 0 {
            // The pipelined request is answered after the parked one.
            let r2 = read_one(c, &mut buf, false).await;
            assert_eq!(r2.text(), "\"127.0.0.1:8300\"");
        }
    }
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "same bytes for all"
    );
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&bodies[0]).unwrap()[0]["Checks"][1]["Name"],
        "c"
    );
    let raw = http10.await.unwrap();
    let r = parse_response(&raw);
    assert_eq!(r.status_line, "HTTP/1.0 200 OK");
    assert_eq!(
        r.body, bodies[0],
        "HTTP/1.0 framing, same body, then closed"
    );
    let mut buf = Vec::new();
    let r = read_one(&mut head_conn, &mut buf, true).await;
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    assert_eq!(
        r.header("Content-Length").unwrap(),
        bodies[0].len().to_string()
    );
    // Watchers re-arm on the same connection at the new index.
    let idx2 = r.index();
    let c = &mut conns[1];
    c.write_all(
        format!("GET /v1/health/service/web?index={idx2}&wait=30s HTTP/1.1\r\nHost: x\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.put("/v1/agent/check/pass/c", "").await;
    let mut buf = Vec::new();
    let r = read_one(c, &mut buf, false).await;
    assert!(r.index() > idx2);
    s.shutdown().await;
}

// ---------------------------------------------------------------- gzip, as Consul does it

fn gunzip(b: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(b)
        .read_to_end(&mut out)
        .unwrap_or_else(|e| panic!("not gzip ({e}): {} bytes", b.len()));
    out
}

/// `n` instances of `name`, each with a TTL check: its health answer is several KB.
async fn register_many(s: &Server, name: &str, n: usize) {
    for i in 0..n {
        let r = s
            .put(
                "/v1/agent/service/register",
                &format!(
                    r#"{{"Name":"{name}","ID":"{name}-{i}","Address":"10.0.0.{i}","Port":{},
                        "Tags":["v1","weight=2"],"Check":{{"TTL":"1h","Status":"passing"}}}}"#,
                    8000 + i
                ),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
}

async fn get_with(s: &Server, path: &str, headers: &[(&str, &str)]) -> Resp {
    request(s.addr, "GET", path, headers, b"").await
}

/// A gzip answer: coded, its length is the coded length, and it decodes to `identity`.
fn assert_gzip_of(gz: &Resp, identity: &Resp) {
    assert_eq!(gz.status, identity.status);
    assert_eq!(gz.header("Content-Encoding"), Some("gzip"), "{}", gz.head);
    assert_eq!(gz.header("Vary"), Some("Accept-Encoding"), "{}", gz.head);
    assert_eq!(
        gz.header("Content-Length").unwrap(),
        gz.body.len().to_string(),
        "Content-Length is the coded length"
    );
    assert!(gz.body.len() < identity.body.len() / 2, "{}", gz.body.len());
    assert_eq!(
        gunzip(&gz.body),
        identity.body,
        "decodes to the identity body"
    );
    for h in [
        "Content-Type",
        "X-Consul-Index",
        "X-Consul-Knownleader",
        "X-Consul-Lastcontact",
    ] {
        assert_eq!(gz.header(h), identity.header(h), "{h}");
    }
}

fn assert_identity(r: &Resp, vary: bool) {
    assert_eq!(r.header("Content-Encoding"), None, "{}", r.head);
    assert_eq!(
        r.header("Vary"),
        vary.then_some("Accept-Encoding"),
        "{}",
        r.head
    );
    assert_eq!(
        r.header("Content-Length").unwrap(),
        r.body.len().to_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_when_accept_encoding_takes_it() {
    let s = Server::start(RegistryOptions::default()).await;
    register_many(&s, "big", 12).await;
    let config = format!(
        "{{\"upstreams\":[{}]}}",
        (0..100)
            .map(|i| format!("\"10.1.0.{i}:80\""))
            .collect::<Vec<_>>()
            .join(",")
    );
    assert_eq!(s.put("/v1/kv/cfg/big", &config).await.text(), "true");
    s.put("/v1/kv/cfg/small", "1").await;

    for path in [
        "/v1/health/service/big",
        "/v1/catalog/service/big",
        "/v1/agent/services",
        "/v1/agent/checks",
        "/v1/health/state/any",
        "/v1/kv/cfg/big",
        "/v1/kv/cfg/big?raw",
        "/v1/kv/?recurse",
    ] {
        let identity = s.get(path).await;
        assert_eq!(identity.status, 200, "{path}");
        assert!(
            identity.body.len() >= 1024,
            "{path}: {}",
            identity.body.len()
        );
        assert_identity(&identity, true);
        // What Go's net/http, Python requests and browsers send.
        for ae in ["gzip", "gzip, deflate", "deflate, GZip;q=0.5, br", "*"] {
            let gz = get_with(&s, path, &[("Accept-Encoding", ae)]).await;
            assert_gzip_of(&gz, &identity);
        }
        // Refused or not offered: identity.
        for ae in [
            "gzip;q=0",
            "identity",
            "",
            "deflate, br",
            "*;q=0",
            "gzip;q=0.5, identity",
        ] {
            let r = get_with(&s, path, &[("Accept-Encoding", ae)]).await;
            assert_identity(&r, true);
            assert_eq!(r.body, identity.body, "{path} {ae:?}");
        }
    }
    let raw = get_with(&s, "/v1/kv/cfg/big?raw", &[("Accept-Encoding", "gzip")]).await;
    assert_eq!(gunzip(&raw.body), config.as_bytes());

    // Small bodies, empty bodies and errors go out as they are, without Vary.
    for (path, status) in [
        ("/v1/status/leader", 200),
        ("/v1/kv/cfg/small", 200),
        ("/v1/kv/missing", 404),
        ("/v1/nope", 404),
    ] {
        let r = get_with(&s, path, &[("Accept-Encoding", "gzip")]).await;
        assert_eq!(r.status, status, "{path}");
        assert_identity(&r, false);
    }
    let r = request(
        s.addr,
        "PUT",
        "/v1/agent/service/register",
        &[("Accept-Encoding", "gzip")],
        br#"{"Name":"x"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_identity(&r, false);

    // HEAD: the head a GET gets, coded length included, and no body.
    use tokio::io::AsyncWriteExt;
    let gz = get_with(&s, "/v1/health/service/big", &[("Accept-Encoding", "gzip")]).await;
    let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    c.write_all(
        b"HEAD /v1/health/service/big HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n\
          GET /v1/status/leader HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let head = read_one(&mut c, &mut buf, true).await;
    assert_eq!(head.header("Content-Encoding"), Some("gzip"));
    assert_eq!(
        head.header("Content-Length").unwrap(),
        gz.body.len().to_string()
    );
    assert!(head.body.is_empty());
    let next = read_one(&mut c, &mut buf, false).await;
    assert_eq!(
        next.text(),
        "\"127.0.0.1:8300\"",
        "nothing after the HEAD's head"
    );

    // HTTP/1.0 as nginx-upsync-module sends it (no Accept-Encoding): identity, a
    // Content-Length, closed. With gzip accepted, HTTP/1.0 gets it coded all the same.
    let raw = raw_bytes(
        s.addr,
        &upsync_request("/v1/health/service/big", 0),
        Duration::from_secs(5),
    )
    .await;
    let r = assert_upsync_shape(&raw, None);
    assert_identity(&r, true);
    assert_eq!(r.json().as_array().unwrap().len(), 12);
    let raw = raw_bytes(
        s.addr,
        b"GET /v1/health/service/big HTTP/1.0\r\nAccept-Encoding: gzip\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let r = parse_response(&raw);
    assert_eq!(r.status_line, "HTTP/1.0 200 OK");
    assert_eq!(r.header("Content-Encoding"), Some("gzip"));
    assert_eq!(gunzip(&r.body), s.get("/v1/health/service/big").await.body);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_query_woken_by_a_write_gets_the_new_answer_gzipped() {
    use tokio::io::AsyncWriteExt;
    let s = Server::start(RegistryOptions::default()).await;
    register_many(&s, "big", 10).await;
    let before = s.get("/v1/health/service/big").await;
    let idx = before.index();
    let path = format!("/v1/health/service/big?index={idx}&wait=30s");
    // Parked watchers of one read: three that take gzip, one that does not, and an
    // nginx-upsync one (HTTP/1.0, closed after the answer).
    let mut conns = Vec::new();
    for ae in ["gzip", "gzip, deflate", "gzip", "identity"] {
        let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        c.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nAccept-Encoding: {ae}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        conns.push(c);
    }
    let addr = s.addr;
    let upsync = tokio::spawn(async move {
        raw_bytes(
            addr,
            &upsync_request("/v1/health/service/big", idx),
            Duration::from_secs(20),
        )
        .await
    });
    assert!(
        eventually(Duration::from_secs(5), || async {
            s.reg.stats().watchers == 5
        })
        .await,
        "watchers parked: {}",
        s.reg.stats().watchers
    );
    let r = s
        .put(
            "/v1/agent/service/register",
            r#"{"Name":"big","ID":"big-10","Port":9000,"Check":{"TTL":"1h","Status":"passing"}}"#,
        )
        .await;
    assert_eq!(r.status, 200);
    let mut answers = Vec::new();
    for c in conns.iter_mut() {
        let mut buf = Vec::new();
        answers.push(read_one(c, &mut buf, false).await);
    }
    let now = s.get("/v1/health/service/big").await;
    assert_eq!(now.json().as_array().unwrap().len(), 11);
    for gz in &answers[..3] {
        assert!(gz.index() > idx);
        assert_eq!(gz.index(), now.index());
        assert_gzip_of(gz, &now);
    }
    assert_eq!(answers[0].body, answers[1].body, "one coded body for all");
    assert_identity(&answers[3], true);
    assert_eq!(answers[3].body, now.body);
    let r = assert_upsync_shape(&upsync.await.unwrap(), Some(now.index()));
    assert_identity(&r, true);
    assert_eq!(r.body, now.body);
    s.shutdown().await;
}
