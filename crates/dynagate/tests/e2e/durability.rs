use crate::harness::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_restart_and_kill_9() {
    let dir = TempDir::new("durable");
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let mut gw = Gateway::start(dir.path()).await;
    let token = gw.token.clone();
    assert_eq!(token.len(), 64);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("admin.token"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    gw.put_upstream("u", &[&a]).await;
    gw.put_route("r", &[], "/", "u").await;
    assert_eq!(gw.get("x", "/").await.1, "a");

    // Graceful restart.
    gw.sigterm();
    assert!(gw
        .wait_exit(std::time::Duration::from_secs(10))
        .await
        .success());
    let mut gw = Gateway::start(dir.path()).await;
    assert_eq!(gw.token, token, "the token is generated once");
    // The very first request after start is served from the stored state.
    assert_eq!(gw.get("x", "/").await.1, "a");

    // kill -9 right after acknowledged changes: each acknowledged change is there.
    let mut last = 0;
    for i in 0..30 {
        let v = if i % 2 == 0 {
            gw.ok(
                "POST",
                "/v1/upstreams/u/servers",
                json!({"address": b.addr.to_string()}),
            )
            .await
        } else {
            gw.ok(
                "DELETE",
                &format!("/v1/upstreams/u/servers/{}", b.addr),
                json!(null),
            )
            .await
        };
        last = v["revision"].as_u64().unwrap();
    }
    gw.ok(
        "PATCH",
        &format!("/v1/upstreams/u/servers/{}", a.addr),
        json!({"weight": 7}),
    )
    .await;
    gw.kill9();
    let gw = Gateway::start(dir.path()).await;
    let (_, up) = gw.admin("GET", "/v1/upstreams/u", None).await;
    let servers = up["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 1, "{up}");
    assert_eq!(servers[0]["weight"], 7);
    let (_, revs) = gw.admin("GET", "/v1/revisions?limit=1", None).await;
    assert_eq!(revs[0]["number"].as_u64().unwrap(), last + 1, "{revs}");
    assert_eq!(gw.get("x", "/").await.1, "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_stream_of_changes_keeps_every_acknowledged_one() {
    let dir = TempDir::new("kill9-stream");
    let a = Backend::start("a").await;
    let mut gw = Gateway::start(dir.path()).await;
    gw.put_upstream("u", &[&a]).await;
    // Writers add servers as fast as they can; the gateway is killed mid-stream.
    let acknowledged = std::sync::Arc::new(parking_lot_free::Acked::default());
    let mut writers = Vec::new();
    for w in 0..2 {
        let client = gw.client.clone();
        let admin = gw.admin;
        let token = gw.token.clone();
        let acked = acknowledged.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..10_000u32 {
                let port = 20000 + w * 10000 + i;
                let body = json!({"address": format!("127.0.0.1:{port}")}).to_string();
                let req = http::Request::post(format!("http://{admin}/v1/upstreams/u/servers"))
                    .header("authorization", format!("Bearer {token}"))
                    .body(full(body))
                    .unwrap();
                match client.request(req).await {
                    Ok(resp) if resp.status() == 200 || resp.status() == 201 => acked.push(port),
                    _ => break,
                }
            }
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    gw.kill9();
    for w in writers {
        let _ = w.await;
    }
    let acked = acknowledged.take();
    assert!(
        acked.len() > 5,
        "too few writes acknowledged: {}",
        acked.len()
    );
    let gw = Gateway::start(dir.path()).await;
    let (_, up) = gw.admin("GET", "/v1/upstreams/u", None).await;
    let present: std::collections::HashSet<String> = up["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["address"].as_str().unwrap().to_string())
        .collect();
    for port in &acked {
        assert!(
            present.contains(&format!("127.0.0.1:{port}")),
            "acknowledged server {port} lost"
        );
    }
    // At most the one in flight at the kill may have landed without its answer.
    assert!(present.len() <= acked.len() + 1 + 2);
}

mod parking_lot_free {
    #[derive(Default)]
    pub struct Acked(std::sync::Mutex<Vec<u32>>);
    impl Acked {
        pub fn push(&self, v: u32) {
            self.0.lock().unwrap().push(v);
        }
        pub fn take(&self) -> Vec<u32> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_restores_a_whole_revision() {
    let dir = TempDir::new("rollback");
    let gw = Gateway::start(dir.path()).await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    gw.put_upstream("ua", &[&a]).await;
    gw.put_route("r", &[], "/", "ua").await;
    let (_, revs) = gw.admin("GET", "/v1/revisions", None).await;
    let good = revs[0]["number"].as_u64().unwrap();
    assert_eq!(gw.get("x", "/").await.1, "a");

    gw.put_upstream("ub", &[&b]).await;
    gw.put_route("r", &[], "/", "ub").await;
    gw.ok("DELETE", "/v1/upstreams/ua", json!(null)).await;
    assert_eq!(gw.get("x", "/").await.1, "b");

    let v = gw
        .ok(
            "POST",
            &format!("/v1/revisions/{good}/rollback"),
            json!(null),
        )
        .await;
    let new_rev = v["revision"].as_u64().unwrap();
    assert_eq!(new_rev, good + 4);
    assert_eq!(gw.get("x", "/").await.1, "a");
    let (status, _) = gw.admin("GET", "/v1/upstreams/ub", None).await;
    assert_eq!(status, 404, "ub did not exist at revision {good}");
    let (_, revs) = gw.admin("GET", "/v1/revisions", None).await;
    assert!(
        revs[0]["summary"].as_str().unwrap().contains("rollback"),
        "{revs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dyups_compatible_calls() {
    let dir = TempDir::new("dyups");
    let gw = Gateway::start_with(dir.path(), &["--workers", "1"]).await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let body = format!("server {} weight=2;server {};", a.addr, b.addr);
    let (status, _) = gw
        .admin_raw("POST", "/upstream/legacy", Some(body), Some(&gw.token))
        .await;
    assert_eq!(status, 200);
    gw.put_route("r", &[], "/", "legacy").await;
    let mut counts = std::collections::HashMap::new();
    for _ in 0..30 {
        *counts.entry(gw.get("x", "/").await.1).or_insert(0) += 1;
    }
    assert_eq!(counts.get("a"), Some(&20), "{counts:?}");
    let (status, list) = gw.admin("GET", "/list", None).await;
    assert_eq!(status, 200);
    assert!(list.as_str().unwrap().contains("legacy"));
    let (_, detail) = gw.admin("GET", "/detail", None).await;
    assert!(
        detail
            .as_str()
            .unwrap()
            .contains(&format!("server {} weight=2", a.addr)),
        "{detail}"
    );
    let (status, one) = gw.admin("GET", "/upstream/legacy", None).await;
    assert_eq!(status, 200);
    assert!(one.as_str().unwrap().contains(&b.addr.to_string()));
    let (status, _) = gw
        .admin_raw(
            "POST",
            "/upstream/legacy",
            Some("server nonsense;".into()),
            Some(&gw.token),
        )
        .await;
    assert_eq!(status, 400);
    let (status, _) = gw.admin_raw("GET", "/list", None, None).await;
    assert_eq!(status, 401);
    let (status, _) = gw.admin("DELETE", "/upstream/legacy", None).await;
    assert_eq!(status, 409, "a route uses it");
    gw.ok("DELETE", "/v1/routes/r", json!(null)).await;
    let (status, _) = gw.admin("DELETE", "/upstream/legacy", None).await;
    assert_eq!(status, 200);
    let (status, _) = gw.admin("GET", "/upstream/legacy", None).await;
    assert_eq!(status, 404);
}
