use crate::harness::*;
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_http_checks_rise_and_fall() {
    let dir = TempDir::new("active");
    let gw = Gateway::start(dir.path()).await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    gw.ok(
        "PUT",
        "/v1/upstreams/u",
        json!({"servers": [{"address": a.addr.to_string()}, {"address": b.addr.to_string()}],
               "health_check": {"type": "http", "path": "/health", "interval": "200ms", "timeout": "100ms",
                                "rise": 2, "fall": 2, "expected_statuses": [200]},
               "outlier": {"consecutive_failures": 0}, "max_fails": 0}),
    )
    .await;
    gw.put_route("r", &[], "/", "u").await;
    assert!(
        eventually(Duration::from_secs(3), || async {
            live(&gw, "u", b.addr).await["health"] == "healthy"
        })
        .await,
        "{}",
        live(&gw, "u", b.addr).await
    );
    let check = live(&gw, "u", b.addr).await["last_check"].clone();
    assert_eq!(check["ok"], true, "{check}");
    assert!(check["message"].as_str().unwrap().contains("200"));

    // b starts failing its checks: unhealthy after `fall` failures, no traffic.
    b.behaviour
        .status
        .store(503, std::sync::atomic::Ordering::Relaxed);
    let t = Instant::now();
    assert!(
        eventually(Duration::from_secs(3), || async {
            live(&gw, "u", b.addr).await["health"] == "unhealthy"
        })
        .await
    );
    assert!(t.elapsed() < Duration::from_secs(2));
    let hits = b.hits();
    for _ in 0..20 {
        assert_eq!(gw.get("x", "/").await.1, "a");
    }
    // Only health checks reached b meanwhile (a handful), never the 20 requests.
    assert!(b.hits() - hits < 10);

    // Back: healthy again after `rise` passes, and takes traffic.
    b.behaviour
        .status
        .store(0, std::sync::atomic::Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(3), || async {
            live(&gw, "u", b.addr).await["health"] == "healthy"
        })
        .await
    );
    let mut saw_b = false;
    for _ in 0..10 {
        saw_b |= gw.get("x", "/").await.1 == "b";
    }
    assert!(saw_b);

    // One record: drain b while healthy, let health flip twice: still drained.
    gw.ok(
        "PATCH",
        &format!("/v1/upstreams/u/servers/{}", b.addr),
        json!({"state": "drain"}),
    )
    .await;
    b.behaviour
        .status
        .store(500, std::sync::atomic::Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(3), || async {
            live(&gw, "u", b.addr).await["health"] == "unhealthy"
        })
        .await
    );
    b.behaviour
        .status
        .store(0, std::sync::atomic::Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(3), || async {
            live(&gw, "u", b.addr).await["health"] == "healthy"
        })
        .await
    );
    let rec = live(&gw, "u", b.addr).await;
    assert_eq!(rec["state"], "drain", "{rec}");
    // And health survives an unrelated change to the upstream.
    b.behaviour
        .status
        .store(500, std::sync::atomic::Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(3), || async {
            live(&gw, "u", b.addr).await["health"] == "unhealthy"
        })
        .await
    );
    gw.ok(
        "PATCH",
        &format!("/v1/upstreams/u/servers/{}", a.addr),
        json!({"weight": 3}),
    )
    .await;
    assert_eq!(live(&gw, "u", b.addr).await["health"], "unhealthy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_backend_goes_unhealthy_and_tcp_checks() {
    let dir = TempDir::new("hung");
    let gw = Gateway::start(dir.path()).await;
    let a = Backend::start("a").await;
    let (hung, _task) = hung_server().await;
    gw.ok(
        "PUT",
        "/v1/upstreams/u",
        json!({"servers": [{"address": a.addr.to_string()}, {"address": hung.to_string()}],
               "health_check": {"type": "http", "interval": "300ms", "timeout": "200ms", "fall": 2, "rise": 1}}),
    )
    .await;
    let started = Instant::now();
    // About fall × interval + timeout (plus the first check's random offset of up to one interval).
    assert!(
        eventually(Duration::from_secs(4), || async {
            live(&gw, "u", hung).await["health"] == "unhealthy"
        })
        .await
    );
    let took = started.elapsed();
    assert!(took < Duration::from_millis(2000), "took {took:?}");
    let rec = live(&gw, "u", hung).await;
    assert!(
        rec["last_check"]["message"]
            .as_str()
            .unwrap()
            .contains("no answer"),
        "{rec}"
    );

    // A TCP check passes for the hung server (it accepts connections) and fails for a
    // closed port.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    gw.ok(
        "PUT",
        "/v1/upstreams/t",
        json!({"servers": [{"address": hung.to_string()}, {"address": closed.to_string()}],
               "health_check": {"type": "tcp", "interval": "200ms", "timeout": "100ms", "fall": 1, "rise": 1}}),
    )
    .await;
    assert!(
        eventually(Duration::from_secs(3), || async {
            live(&gw, "t", hung).await["health"] == "healthy"
                && live(&gw, "t", closed).await["health"] == "unhealthy"
        })
        .await
    );
    // Turning checks off clears the verdict.
    gw.ok(
        "PUT",
        "/v1/upstreams/t",
        json!({"servers": [{"address": hung.to_string()}, {"address": closed.to_string()}]}),
    )
    .await;
    assert!(
        eventually(Duration::from_secs(3), || async {
            live(&gw, "t", closed).await["health"] == "unchecked"
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_ejection_and_protected_mode() {
    let dir = TempDir::new("outlier");
    let gw = Gateway::start(dir.path()).await;
    let good = Backend::start("good").await;
    let bad = Backend::start("bad").await;
    bad.behaviour
        .status
        .store(500, std::sync::atomic::Ordering::Relaxed);
    gw.ok(
        "PUT",
        "/v1/upstreams/u",
        json!({"servers": [{"address": good.addr.to_string()}, {"address": bad.addr.to_string()}],
               "outlier": {"consecutive_failures": 3, "base_ejection_time": "1s", "max_ejection_time": "5s"}}),
    )
    .await;
    gw.put_route("r", &[], "/", "u").await;
    let mut five_hundreds = 0;
    for _ in 0..20 {
        if gw.get("x", "/").await.0 == 500 {
            five_hundreds += 1;
        }
    }
    assert_eq!(five_hundreds, 3, "ejected after 3 consecutive 5xx");
    let rec = live(&gw, "u", bad.addr).await;
    assert_eq!(rec["ejected"], true, "{rec}");
    assert_eq!(rec["ejections"], 1);
    // Back after the ejection time, and ejected again for longer.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..10 {
        gw.get("x", "/").await;
    }
    let rec = live(&gw, "u", bad.addr).await;
    assert_eq!(rec["ejections"], 2, "{rec}");

    // Protected mode: the last available server is never ejected.
    gw.ok(
        "PUT",
        "/v1/upstreams/solo",
        json!({"servers": [{"address": bad.addr.to_string()}],
        "outlier": {"consecutive_failures": 2}}),
    )
    .await;
    gw.put_route("r2", &["solo.example"], "/", "solo").await;
    for _ in 0..10 {
        assert_eq!(
            gw.get("solo.example", "/").await.0,
            500,
            "still served, not 503"
        );
    }
    assert_eq!(live(&gw, "solo", bad.addr).await["ejected"], false);
}
