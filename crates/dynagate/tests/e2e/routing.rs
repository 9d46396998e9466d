use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_path_precedence() {
    let dir = TempDir::new("routing");
    let gw = Gateway::start(dir.path()).await;
    let names = ["exact", "exact-api", "wild", "any"];
    let mut backends = Vec::new();
    for n in names {
        let b = Backend::start(n).await;
        gw.put_upstream(n, &[&b]).await;
        backends.push(b);
    }
    gw.put_route("r-exact", &["shop.example.com"], "/", "exact")
        .await;
    gw.put_route("r-exact-api", &["shop.example.com"], "/api/", "exact-api")
        .await;
    gw.put_route("r-wild", &["*.example.com"], "/", "wild")
        .await;
    gw.put_route("r-any", &[], "/", "any").await;

    for (host, path, want) in [
        ("shop.example.com", "/", "exact"),
        ("SHOP.example.com:8080", "/x", "exact"),
        ("shop.example.com", "/api/v1", "exact-api"),
        ("a.example.com", "/api/v1", "wild"),
        ("deep.a.example.com", "/", "wild"),
        ("example.com", "/", "any"),
        ("other.org", "/", "any"),
    ] {
        let (status, backend, _) = gw.get(host, path).await;
        assert_eq!((status, backend.as_str()), (200, want), "{host}{path}");
    }

    // Gray-release switch: one route update moves a host to another upstream.
    gw.put_route("r-exact", &["shop.example.com"], "/", "wild")
        .await;
    assert_eq!(gw.get("shop.example.com", "/").await.1, "wild");

    // No route at all: 404 naming the host.
    gw.ok("DELETE", "/v1/routes/r-any", serde_json::json!(null))
        .await;
    let (status, _, body) = gw.get("other.org", "/").await;
    assert_eq!(status, 404);
    assert!(
        body.contains("no route") && body.contains("other.org"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_and_hop_by_hop() {
    let dir = TempDir::new("headers");
    let gw = Gateway::start(dir.path()).await;
    // A backend that echoes the request headers it received.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let mut text = String::new();
                        for (k, v) in req.headers() {
                            text.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
                        }
                        Ok::<_, std::convert::Infallible>(http::Response::new(full(text)))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    gw.ok(
        "PUT",
        "/v1/upstreams/echo",
        serde_json::json!({"servers":[{"address": addr.to_string()}]}),
    )
    .await;
    gw.put_route("r", &[], "/", "echo").await;
    let req = http::Request::get(format!("http://{}/h", gw.proxy))
        .header("host", "site.example")
        .header("x-forwarded-for", "10.1.1.1")
        .header("connection", "x-secret")
        .header("x-secret", "must-not-pass")
        .header("te", "trailers")
        .body(full(""))
        .unwrap();
    let resp = gw.client.request(req).await.unwrap();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("x-forwarded-for: 10.1.1.1, 127.0.0.1"),
        "{text}"
    );
    assert!(text.contains("x-real-ip: 127.0.0.1"), "{text}");
    assert!(text.contains("x-forwarded-proto: http"), "{text}");
    assert!(text.contains("x-forwarded-host: site.example"), "{text}");
    assert!(text.contains("host: site.example"), "{text}");
    assert!(!text.contains("x-secret"), "{text}");
    assert!(!text.contains("te: trailers"), "{text}");

    // A route may set the Host sent upstream.
    gw.ok(
        "PUT",
        "/v1/routes/r",
        serde_json::json!({"path_prefix": "/", "upstream": "echo", "upstream_host": "internal.svc"}),
    )
    .await;
    let (_, _, text) = gw.get("site.example", "/h").await;
    assert!(text.contains("host: internal.svc"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_pools_survive_unrelated_changes() {
    let dir = TempDir::new("pools");
    let gw = Gateway::start_with(dir.path(), &["--workers", "1"]).await;
    let a = Backend::start("a").await;
    let other = Backend::start("other").await;
    gw.put_upstream("u", &[&a]).await;
    gw.put_upstream("v", &[&other]).await;
    gw.put_route("r", &[], "/", "u").await;
    for _ in 0..10 {
        assert_eq!(gw.get("x", "/").await.0, 200);
    }
    let conns = a.conns.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        conns <= 2,
        "sequential requests share a pooled connection: {conns}"
    );
    // Changes to another upstream, to routes, and to another server of this upstream.
    let b = Backend::start("b").await;
    for i in 0..10 {
        gw.ok(
            "PATCH",
            &format!("/v1/upstreams/v/servers/{}", other.addr),
            serde_json::json!({"weight": i + 1}),
        )
        .await;
        gw.put_route(&format!("extra{i}"), &[&format!("h{i}.example")], "/", "v")
            .await;
    }
    gw.ok(
        "POST",
        "/v1/upstreams/u/servers",
        serde_json::json!({"address": b.addr.to_string(), "state": "drain"}),
    )
    .await;
    for _ in 0..10 {
        assert_eq!(gw.get("x", "/").await.1, "a");
    }
    assert_eq!(
        a.conns.load(std::sync::atomic::Ordering::Relaxed),
        conns,
        "no new upstream connection after unrelated changes"
    );
}
