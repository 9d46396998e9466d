use crate::harness::*;
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_passthrough() {
    let dir = TempDir::new("ws");
    let gw = Gateway::start(dir.path()).await;
    let a = Backend::start("a").await;
    gw.put_upstream("u", &[&a]).await;
    gw.put_route("r", &[], "/", "u").await;
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.proxy))
        .await
        .expect("ws handshake");
    assert_eq!(resp.status(), 101);
    for i in 0..20 {
        let text = format!("hello {i}");
        ws.send(tokio_tungstenite::tungstenite::Message::text(text.clone()))
            .await
            .unwrap();
        let echo = ws.next().await.unwrap().unwrap();
        assert_eq!(echo.into_text().unwrap().as_str(), text);
    }
    ws.close(None).await.unwrap();

    // An upgrade the upstream refuses is not tunnelled: the client gets the plain answer.
    let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(
        b"GET /plain HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_downstream() {
    let dir = TempDir::new("h2");
    let gw = Gateway::start(dir.path()).await;
    let a = Backend::start("a").await;
    gw.put_upstream("u", &[&a]).await;
    gw.put_route("r", &["h2.example"], "/", "u").await;
    let mut client = h2_connect(gw.proxy).await;
    for _ in 0..5 {
        // The authority names the routed host (a Host header differing from it is
        // refused, RFC 9113 §8.3.1).
        let req = http::Request::get("http://h2.example/x")
            .body(full(""))
            .unwrap();
        let resp = client.send_request(req).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-backend"], "a");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_limits_and_slow_clients() {
    let dir = TempDir::new("limits");
    let cfg = dir.path().join("dynagate.toml");
    std::fs::write(
        &cfg,
        "[limits]\nheader_read_timeout = \"1s\"\nmax_headers = 20\nmax_header_bytes = 8192\n",
    )
    .unwrap();
    let gw = Gateway::start_with(dir.path(), &["--config", cfg.to_str().unwrap()]).await;
    let a = Backend::start("a").await;
    gw.put_upstream("u", &[&a]).await;
    gw.put_route("r", &[], "/", "u").await;

    // Too many headers: 431.
    let mut req = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
    for i in 0..40 {
        req.push_str(&format!("X-H{i}: v\r\n"));
    }
    req.push_str("\r\n");
    let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");

    // A head larger than the limit: 431.
    let req = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "y".repeat(20_000)
    );
    let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    let _ = s.write_all(req.as_bytes()).await;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");

    // A client trickling its head is cut off at the header deadline.
    let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    let started = std::time::Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let mut closed = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if s.write_all(b"X-Slow: 1\r\n").await.is_err() {
            closed = true;
            break;
        }
        let mut probe = [0u8; 512];
        match tokio::time::timeout(Duration::from_millis(1), s.read(&mut probe)).await {
            Ok(Ok(_)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Err(_) => {}
        }
    }
    assert!(closed, "slow client not cut off");
    assert!(started.elapsed() < Duration::from_secs(3));

    // Both Content-Length and Transfer-Encoding never reach the upstream together.
    let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await;
    assert!(
        out.starts_with("HTTP/1.1 400")
            || (out.starts_with("HTTP/1.1 200") && out.ends_with("\r\n0")),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let dir = TempDir::new("graceful");
    let mut gw = Gateway::start(dir.path()).await;
    let a = Backend::start("a").await;
    gw.put_upstream("u", &[&a]).await;
    gw.put_route("r", &[], "/", "u").await;
    let client = gw.client.clone();
    let url = format!("http://{}/slow?ms=1500", gw.proxy);
    let in_flight = tokio::spawn(async move {
        let resp = client
            .request(http::Request::get(url).body(full("")).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        (status, body)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.sigterm();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // No new connections once shutdown began.
    assert!(tokio::net::TcpStream::connect(gw.proxy).await.is_err());
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"a");
    let exit = gw.wait_exit(Duration::from_secs(10)).await;
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_names_the_field() {
    let dir = TempDir::new("checkcfg");
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "listen = \"127.0.0.1:8080\"\nworkers = 2\n[limits]\nmax_headers = 50\n",
    )
    .unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "listen = \"127.0.0.1:8080\"\n[limits]\nmax_headerz = 50\n",
    )
    .unwrap();
    let bad2 = dir.path().join("bad2.toml");
    std::fs::write(&bad2, "workers = 5000\n").unwrap();
    let run = |p: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_dynagate"))
            .arg("check-config")
            .arg(p)
            .output()
            .unwrap()
    };
    assert!(run(&good).status.success());
    let out = run(&bad);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_headerz"));
    let out = run(&bad2);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("workers"));
}
