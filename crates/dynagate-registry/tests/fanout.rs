//! The fan-out of a large pass: many parked blocking queries answered after one write,
//! with and without helper threads sharing the writes.

mod common;

use common::*;
use dynagate_registry::RegistryOptions;
use std::io::Read;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Watchers: above the pass's threshold for the helpers (set to 64 below).
const WATCHERS: usize = 400;

/// How watcher `i` asks: (HTTP/1.0 keep-alive, Accept-Encoding: gzip, small receive
/// buffer: its answer does not fit in one write, so its connection task writes the rest).
fn kind(i: usize) -> (bool, bool, bool) {
    (i % 3 == 2, i % 3 == 1, i.is_multiple_of(4))
}

fn watch_request(i: usize, index: u64) -> Vec<u8> {
    let (http10, gzip, _) = kind(i);
    let mut r = format!(
        "GET /v1/health/service/web?index={index}&wait=30s {}\r\nHost: x\r\n",
        if http10 { "HTTP/1.0" } else { "HTTP/1.1" }
    );
    if http10 {
        r.push_str("Connection: keep-alive\r\n");
    }
    if gzip {
        r.push_str("Accept-Encoding: gzip\r\n");
    }
    r.push_str("\r\n");
    r.into_bytes()
}

async fn connect(addr: SocketAddr, small_buffer: bool) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    if small_buffer {
        sock.set_recv_buffer_size(4096).unwrap();
    }
    sock.connect(addr).await.unwrap()
}

/// One response (head, body) by its Content-Length; `buf` keeps what follows it.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> (String, Vec<u8>) {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8(buf[..end].to_vec()).unwrap();
            let len: usize = head
                .split("\r\n")
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .expect("Content-Length")
                .parse()
                .unwrap();
            if buf.len() >= end + 4 + len {
                let body = buf[end + 4..end + 4 + len].to_vec();
                buf.drain(..end + 4 + len);
                return (head, body);
            }
        }
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut chunk))
            .await
            .expect("answer in time")
            .unwrap();
        assert!(n > 0, "connection closed before a whole answer");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n")
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
}

async fn register(s: &Server, id: &str) {
    // Meta of 60 × 500 random hex characters: a ~35 KB answer, more than a 4 KiB
    // receive buffer takes in one write.
    let mut meta = serde_json::Map::new();
    for k in 0..60 {
        let mut b = [0u8; 250];
        getrandom::fill(&mut b).unwrap();
        let v: String = b.iter().map(|x| format!("{x:02x}")).collect();
        meta.insert(format!("k{k}"), serde_json::Value::String(v));
    }
    let body = serde_json::json!({"Name": "web", "ID": id, "Port": 80, "Meta": meta});
    let r = s.put("/v1/agent/service/register", &body.to_string()).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Every watcher gets exactly one answer at the new index, with the same body as a
/// plain read of its kind, the connection goes on, and the next pass answers it again.
async fn many_watchers_answered_once(helpers: usize) {
    let s = Server::start(RegistryOptions {
        fanout_threads: helpers,
        fanout_parallel_min: 64,
        ..RegistryOptions::default()
    })
    .await;
    register(&s, "web-0").await;
    let mut index = s.get("/v1/health/service/web").await.index();
    let mut conns = Vec::new();
    for i in 0..WATCHERS {
        let mut c = connect(s.addr, kind(i).2).await;
        c.write_all(&watch_request(i, index)).await.unwrap();
        conns.push((c, Vec::new()));
    }
    for round in 1..=2 {
        let parked = eventually(Duration::from_secs(20), || async {
            s.reg.stats().watchers == WATCHERS
        })
        .await;
        assert!(parked, "round {round}: {} parked", s.reg.stats().watchers);
        register(&s, &format!("web-{round}")).await;
        let plain = s.get("/v1/health/service/web").await;
        let new_index = plain.index();
        assert!(new_index > index);
        let mut gz_body: Option<Vec<u8>> = None;
        for (i, (c, buf)) in conns.iter_mut().enumerate() {
            let (http10, gzip, _) = kind(i);
            let (head, body) = read_response(c, buf).await;
            let status = if http10 {
                "HTTP/1.0 200 OK"
            } else {
                "HTTP/1.1 200 OK"
            };
            assert!(head.starts_with(status), "watcher {i}: {head}");
            assert_eq!(
                header(&head, "X-Consul-Index"),
                Some(new_index.to_string().as_str()),
                "watcher {i}"
            );
            let decoded = if gzip {
                assert_eq!(header(&head, "Content-Encoding"), Some("gzip"), "{i}");
                // Every coded answer is the same bytes (coded once per change).
                match &gz_body {
                    Some(b) => assert_eq!(b, &body, "watcher {i}: coded body"),
                    None => gz_body = Some(body.clone()),
                }
                let mut out = Vec::new();
                flate2::read::GzDecoder::new(&body[..])
                    .read_to_end(&mut out)
                    .unwrap();
                out
            } else {
                assert_eq!(header(&head, "Content-Encoding"), None, "{i}");
                body
            };
            assert_eq!(decoded, plain.body, "watcher {i}: body");
            assert!(buf.is_empty(), "watcher {i}: bytes after the answer");
        }
        // Exactly once: nothing more comes.
        tokio::time::sleep(Duration::from_millis(300)).await;
        for (i, (c, _)) in conns.iter_mut().enumerate() {
            let mut b = [0u8; 1];
            match c.try_read(&mut b) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                other => panic!("watcher {i}: more after its answer: {other:?}"),
            }
        }
        index = new_index;
        // Re-armed with the new index, as clients do.
        for (i, (c, _)) in conns.iter_mut().enumerate() {
            c.write_all(&watch_request(i, index)).await.unwrap();
        }
    }
    let by_helpers = s.reg.stats().fanout_helper_answers;
    if helpers == 0 {
        assert_eq!(by_helpers, 0);
    } else {
        // Two passes of 400 answers, each several ms of writes: the helpers, woken at
        // the start of each, write part of them.
        assert!(by_helpers > 0, "helpers wrote none of {}", 2 * WATCHERS);
        assert!(by_helpers <= 2 * WATCHERS as u64);
    }
    drop(conns);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_pass_without_helpers() {
    many_watchers_answered_once(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_pass_with_helpers() {
    many_watchers_answered_once(2).await;
}

/// The registry's own runtime is a current-thread one (crates/dynagate/src/run.rs).
#[tokio::test(flavor = "current_thread")]
async fn large_pass_with_helpers_current_thread() {
    many_watchers_answered_once(1).await;
}

/// Answers larger than a socket takes at once (here 5 MB of KV for clients with a small
/// receive buffer): the pass writes what fits and each connection's task writes the rest.
/// (The helpers are on, but a pass this small is one claimed run: whoever claims it
/// first writes it, usually the registry's thread; the write code is the same.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_writes_are_finished_by_the_connection() {
    let s = Server::start(RegistryOptions {
        fanout_threads: 2,
        fanout_parallel_min: 1,
        ..RegistryOptions::default()
    })
    .await;
    let value = |k: usize| -> String {
        let mut b = [0u8; 250 * 1024];
        getrandom::fill(&mut b).unwrap();
        format!(
            "{k}{}",
            b.iter().map(|x| format!("{x:02x}")).collect::<String>()
        )
    };
    for k in 0..8 {
        let v = value(k);
        assert_eq!(
            s.put(&format!("/v1/kv/big/k{k}"), &v[..500 * 1024])
                .await
                .status,
            200
        );
    }
    let index = s.get("/v1/kv/big/?recurse").await.index();
    let mut conns = Vec::new();
    for _ in 0..4 {
        let mut c = connect(s.addr, true).await;
        let req =
            format!("GET /v1/kv/big/?recurse&index={index}&wait=30s HTTP/1.1\r\nHost: x\r\n\r\n");
        c.write_all(req.as_bytes()).await.unwrap();
        conns.push(c);
    }
    let parked = eventually(Duration::from_secs(20), || async {
        s.reg.stats().watchers == 4
    })
    .await;
    assert!(parked);
    assert_eq!(s.put("/v1/kv/big/k0", "changed").await.status, 200);
    let plain = s.get("/v1/kv/big/?recurse").await;
    assert!(plain.body.len() > 4_000_000, "{}", plain.body.len());
    for (i, c) in conns.iter_mut().enumerate() {
        let mut buf = Vec::new();
        let (head, body) = read_response(c, &mut buf).await;
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        assert_eq!(
            header(&head, "X-Consul-Index"),
            Some(plain.index().to_string().as_str())
        );
        assert!(body == plain.body, "watcher {i}: body differs");
        assert!(buf.is_empty());
    }
    drop(conns);
    s.shutdown().await;
}
