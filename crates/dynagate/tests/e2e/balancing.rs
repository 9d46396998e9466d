use crate::harness::*;
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_spreads_by_weight() {
    let dir = TempDir::new("wrr");
    let gw = Gateway::start_with(dir.path(), &["--workers", "1"]).await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    gw.ok(
        "PUT",
        "/v1/upstreams/u",
        json!({"servers": [
            {"address": a.addr.to_string(), "weight": 5},
            {"address": b.addr.to_string(), "weight": 3},
            {"address": c.addr.to_string(), "weight": 2},
        ]}),
    )
    .await;
    gw.put_route("r", &[], "/", "u").await;
    let mut counts = std::collections::HashMap::new();
    for _ in 0..1000 {
        let (status, backend, _) = gw.get("x", "/").await;
        assert_eq!(status, 200);
        *counts.entry(backend).or_insert(0) += 1;
    }
    // Smooth WRR is exact over every full cycle of 10 with one worker.
    assert_eq!(counts["a"], 500, "{counts:?}");
    assert_eq!(counts["b"], 300, "{counts:?}");
    assert_eq!(counts["c"], 200, "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_takes_traffic_only_without_primaries() {
    let dir = TempDir::new("backup");
    let gw = Gateway::start(dir.path()).await;
    let a = Backend::start("a").await;
    let bk = Backend::start("backup").await;
    gw.ok(
        "PUT",
        "/v1/upstreams/u",
        json!({"servers": [{"address": a.addr.to_string()}, {"address": bk.addr.to_string(), "backup": true}]}),
    )
    .await;
    gw.put_route("r", &[], "/", "u").await;
    for _ in 0..20 {
        assert_eq!(gw.get("x", "/").await.1, "a");
    }
    gw.ok(
        "PATCH",
        &format!("/v1/upstreams/u/servers/{}", a.addr),
        json!({"state": "down"}),
    )
    .await;
    for _ in 0..5 {
        assert_eq!(gw.get("x", "/").await.1, "backup");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_stops_new_requests_and_lets_in_flight_finish() {
    let dir = TempDir::new("drain");
    let gw = Gateway::start(dir.path()).await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    gw.put_upstream("u", &[&a, &b]).await;
    gw.put_route("r", &[], "/", "u").await;

    // Start slow requests until one is in flight on `a`.
    let mut slow = Vec::new();
    for _ in 0..4 {
        let client = gw.client.clone();
        let url = format!("http://{}/slow?ms=1500", gw.proxy);
        slow.push(tokio::spawn(async move {
            let resp = client
                .request(http::Request::get(url).body(full("")).unwrap())
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let backend = resp.headers()["x-backend"].to_str().unwrap().to_string();
            (status, backend)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, up) = gw.admin("GET", "/v1/upstreams/u", None).await;
    let live_a = up["live"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["address"] == a.addr.to_string())
        .unwrap()
        .clone();
    assert!(live_a["in_flight"].as_u64().unwrap() >= 1, "{up}");

    gw.ok(
        "PATCH",
        &format!("/v1/upstreams/u/servers/{}", a.addr),
        json!({"state": "drain"}),
    )
    .await;
    let hits_a = a.hits();
    for _ in 0..30 {
        let (status, backend, _) = gw.get("x", "/").await;
        assert_eq!((status, backend.as_str()), (200, "b"));
    }
    assert_eq!(a.hits(), hits_a, "a drained server got a new request");
    let (_, up) = gw.admin("GET", "/v1/upstreams/u", None).await;
    let live_a = up["live"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["address"] == a.addr.to_string())
        .unwrap()
        .clone();
    assert_eq!(live_a["state"], "drain");
    assert!(live_a["last_state_change_ms"].as_u64().unwrap() > 0);

    let mut served_by_a = 0;
    for t in slow {
        let (status, backend) = t.await.unwrap();
        assert_eq!(status, 200);
        if backend == "a" {
            served_by_a += 1;
        }
    }
    assert!(served_by_a >= 1);
    // Once the in-flight requests are done the count is back to zero.
    let (_, up) = gw.admin("GET", "/v1/upstreams/u", None).await;
    let live_a = up["live"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["address"] == a.addr.to_string())
        .unwrap()
        .clone();
    assert_eq!(live_a["in_flight"], 0, "{up}");
    gw.ok(
        "DELETE",
        &format!("/v1/upstreams/u/servers/{}", a.addr),
        json!(null),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_health_and_retries_with_a_killed_backend() {
    let dir = TempDir::new("passive");
    let gw = Gateway::start(dir.path()).await;
    let a = Backend::start("a").await;
    let mut dead = Backend::start("dead").await;
    gw.ok(
        "PUT",
        "/v1/upstreams/u",
        json!({"servers": [{"address": a.addr.to_string()}, {"address": dead.addr.to_string()}],
               "retries": 1, "max_fails": 1, "fail_timeout": "2s"}),
    )
    .await;
    gw.put_route("r", &[], "/", "u").await;
    for _ in 0..4 {
        assert_eq!(gw.get("x", "/").await.0, 200);
    }
    dead.kill().await;
    // Every request still succeeds: connect failures are retried on the other server,
    // for any method (nothing was sent).
    for i in 0..40 {
        let req = http::Request::post(format!("http://{}/", gw.proxy))
            .body(full("x"))
            .unwrap();
        let resp = gw.client.request(req).await.unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        assert_eq!(resp.headers()["x-backend"], "a");
    }
    let (_, up) = gw.admin("GET", "/v1/upstreams/u", None).await;
    let live = up["live"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["address"] == dead.addr.to_string())
        .unwrap()
        .clone();
    assert_eq!(live["passive_unhealthy"], true, "{up}");
    assert!(live["failures"].as_u64().unwrap() >= 1);
    // Passive health skips the dead server: it is not even tried for fail_timeout.
    let before = live["failures"].as_u64().unwrap();
    for _ in 0..10 {
        assert_eq!(gw.get("x", "/").await.0, 200);
    }
    let (_, up) = gw.admin("GET", "/v1/upstreams/u", None).await;
    let live = up["live"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["address"] == dead.addr.to_string())
        .unwrap()
        .clone();
    assert_eq!(live["failures"].as_u64().unwrap(), before);

    // Back after fail_timeout once it is alive again.
    dead.restart().await;
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let mut saw_dead = false;
    for _ in 0..10 {
        saw_dead |= gw.get("x", "/").await.1 == "dead";
    }
    assert!(saw_dead);

    // With no retries and every server down: 502 naming the upstream.
    gw.ok(
        "PUT",
        "/v1/upstreams/u",
        json!({"servers": [{"address": dead.addr.to_string()}], "retries": 0, "max_fails": 0}),
    )
    .await;
    dead.kill().await;
    let (status, _, body) = gw.get("x", "/").await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("\"u\""), "{body}");
    // No server that takes requests: 503.
    gw.ok(
        "PATCH",
        &format!("/v1/upstreams/u/servers/{}", dead.addr),
        json!({"state": "down"}),
    )
    .await;
    let (status, _, body) = gw.get("x", "/").await;
    assert_eq!(status, 503, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_timeout_is_504() {
    let dir = TempDir::new("timeout");
    let gw = Gateway::start(dir.path()).await;
    let a = Backend::start("a").await;
    gw.ok(
        "PUT",
        "/v1/upstreams/u",
        json!({"servers": [{"address": a.addr.to_string()}], "read_timeout": "300ms", "retries": 0}),
    )
    .await;
    gw.put_route("r", &[], "/", "u").await;
    let (status, _, body) = gw.get("x", "/slow?ms=2000").await;
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("timed out"));
}

/// Passive health never takes an upstream's last available server out (nginx never
/// marks the only server of a group unavailable): one timed-out exchange, and a backend
/// restart, cost only the requests that met them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_server_keeps_serving_after_a_failed_exchange_and_a_restart() {
    let dir = TempDir::new("single-passive");
    let gw = Gateway::start(dir.path()).await;
    let mut a = Backend::start("a").await;
    gw.ok(
        "PUT",
        "/v1/upstreams/u",
        json!({"servers": [{"address": a.addr.to_string()}], "read_timeout": "300ms",
               "retries": 0, "max_fails": 1, "fail_timeout": "10s"}),
    )
    .await;
    gw.put_route("r", &[], "/", "u").await;
    assert_eq!(gw.get("x", "/").await.0, 200);

    a.behaviour
        .delay_ms
        .store(1000, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(gw.get("x", "/").await.0, 504);
    a.behaviour
        .delay_ms
        .store(0, std::sync::atomic::Ordering::Relaxed);
    for i in 0..5 {
        assert_eq!(
            gw.get("x", "/").await.0,
            200,
            "request {i} after the timeout"
        );
    }

    a.kill().await;
    assert_eq!(gw.get("x", "/").await.0, 502);
    assert_eq!(gw.get("x", "/").await.0, 502);
    a.restart().await;
    let back = std::time::Instant::now();
    assert_eq!(
        gw.get("x", "/").await.0,
        200,
        "served as soon as it is back"
    );
    assert!(back.elapsed() < Duration::from_secs(2));
    let (_, up) = gw.admin("GET", "/v1/upstreams/u", None).await;
    assert_eq!(up["live"][0]["passive_unhealthy"], false, "{up}");
    assert!(up["live"][0]["failures"].as_u64().unwrap() >= 3, "{up}");
}
