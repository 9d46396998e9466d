use crate::harness::*;
use serde_json::json;
use std::time::Duration;

async fn register(gw: &Gateway, id: &str, backend: &Backend, extra: serde_json::Value) {
    let mut body =
        json!({"Name": "web", "ID": id, "Address": "127.0.0.1", "Port": backend.addr.port()});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (status, v) = gw
        .consul("PUT", "/v1/agent/service/register", Some(body))
        .await;
    assert_eq!(status, 200, "{v}");
}

async fn backends_seen(gw: &Gateway, n: usize) -> std::collections::HashMap<String, usize> {
    let mut seen = std::collections::HashMap::new();
    for _ in 0..n {
        let (status, backend, body) = gw.get("web.example", "/").await;
        *seen
            .entry(if status == 200 {
                backend
            } else {
                format!("{status} {body}")
            })
            .or_insert(0) += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_services_become_upstreams() {
    let dir = TempDir::new("registry");
    let mut gw = Gateway::start_with(dir.path(), &["--workers", "1"]).await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    register(&gw, "web-a", &a, json!({})).await;
    register(&gw, "web-b", &b, json!({"Tags": ["weight=3"]})).await;
    // The registry-fed upstream appears by itself; routes use it like any other.
    assert!(
        eventually(Duration::from_secs(2), || async {
            gw.admin("GET", "/v1/upstreams/web", None).await.0 == 200
        })
        .await
    );
    gw.put_route("r", &["web.example"], "/", "web").await;
    let seen = backends_seen(&gw, 40).await;
    assert_eq!(seen.get("a"), Some(&10), "{seen:?}");
    assert_eq!(seen.get("b"), Some(&30), "{seen:?}");

    // The dashboard's view of the registry.
    let (status, services) = gw.admin("GET", "/v1/registry/services", None).await;
    assert_eq!(status, 200);
    let web = services
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "web")
        .unwrap();
    assert_eq!(web["instances"].as_array().unwrap().len(), 2, "{web}");
    assert_eq!(web["tags"], json!(["weight=3"]));
    assert_eq!(web["instances"][0]["health"], "passing");

    // Membership is read-only through the admin API; a drain override is allowed and kept.
    let (_, up) = gw.admin("GET", "/v1/upstreams/web", None).await;
    assert_eq!(up["registry_fed"], true, "{up}");
    let (status, v) = gw
        .admin(
            "POST",
            "/v1/upstreams/web/servers",
            Some(json!({"address": c.addr.to_string()})),
        )
        .await;
    assert_eq!(status, 409, "{v}");
    gw.ok(
        "PATCH",
        &format!("/v1/upstreams/web/servers/{}", b.addr),
        json!({"state": "drain"}),
    )
    .await;
    register(&gw, "web-c", &c, json!({})).await;
    assert!(
        eventually(Duration::from_secs(2), || async {
            live(&gw, "web", c.addr).await != serde_json::Value::Null
        })
        .await
    );
    assert_eq!(
        live(&gw, "web", b.addr).await["state"],
        "drain",
        "operator override kept across a sync"
    );
    let seen = backends_seen(&gw, 20).await;
    assert!(!seen.contains_key("b"), "{seen:?}");
    gw.ok(
        "PATCH",
        &format!("/v1/upstreams/web/servers/{}", b.addr),
        json!({"state": "up"}),
    )
    .await;

    // Deregistration drains: an in-flight request finishes, new ones go elsewhere.
    let client = gw.client.clone();
    let url = format!("http://{}/slow?ms=1000", gw.proxy);
    let mut in_flight = Vec::new();
    for _ in 0..6 {
        let client = client.clone();
        let url = url.clone();
        in_flight.push(tokio::spawn(async move {
            let req = http::Request::get(url)
                .header("host", "web.example")
                .body(full(""))
                .unwrap();
            let resp = client.request(req).await.unwrap();
            (
                resp.status().as_u16(),
                resp.headers()["x-backend"].to_str().unwrap().to_string(),
            )
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, _) = gw
        .consul("PUT", "/v1/agent/service/deregister/web-a", None)
        .await;
    assert_eq!(status, 200);
    assert!(
        eventually(Duration::from_secs(2), || async {
            live(&gw, "web", a.addr).await == serde_json::Value::Null
        })
        .await
    );
    let hits_a = a.hits();
    let seen = backends_seen(&gw, 20).await;
    assert!(!seen.contains_key("a"), "{seen:?}");
    assert_eq!(a.hits(), hits_a);
    let mut finished_on_a = 0;
    for t in in_flight {
        let (status, backend) = t.await.unwrap();
        assert_eq!(status, 200);
        finished_on_a += (backend == "a") as u32;
    }
    assert!(
        finished_on_a >= 1,
        "some in-flight request was on a and finished"
    );

    // A critical check drains the instance; passing again brings it back.
    register(
        &gw,
        "web-c",
        &c,
        json!({"Check": {"TTL": "30s", "Status": "passing"}}),
    )
    .await;
    assert!(
        eventually(Duration::from_secs(2), || async {
            live(&gw, "web", c.addr).await["registry"] == "passing"
        })
        .await
    );
    let (status, _) = gw
        .consul(
            "PUT",
            "/v1/agent/check/fail/service:web-c?note=broken",
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert!(
        eventually(Duration::from_secs(2), || async {
            live(&gw, "web", c.addr).await["registry"] == "critical"
        })
        .await
    );
    let seen = backends_seen(&gw, 10).await;
    assert_eq!(seen.get("b"), Some(&10), "{seen:?}");
    gw.consul("PUT", "/v1/agent/check/pass/service:web-c", None)
        .await;
    assert!(
        eventually(Duration::from_secs(2), || async {
            live(&gw, "web", c.addr).await["registry"] == "passing"
        })
        .await
    );

    // A rollback to a revision where web-a was still a member: the bridge restores the
    // registry's membership right after.
    let (_, revs) = gw.admin("GET", "/v1/revisions?limit=100", None).await;
    let with_a = revs
        .as_array()
        .unwrap()
        .iter()
        .find(|r| {
            r["summary"]
                .as_str()
                .unwrap()
                .contains("registry sync of web: 2")
        })
        .unwrap()["number"]
        .as_u64()
        .unwrap();
    gw.ok(
        "POST",
        &format!("/v1/revisions/{with_a}/rollback"),
        json!(null),
    )
    .await;
    assert!(
        eventually(Duration::from_secs(2), || async {
            live(&gw, "web", a.addr).await == serde_json::Value::Null
        })
        .await
    );

    // kill -9: registrations and the registry-fed upstream come back.
    gw.kill9();
    let gw = Gateway::start(dir.path()).await;
    let (status, services) = gw.consul("GET", "/v1/agent/services", None).await;
    assert_eq!(status, 200);
    assert!(
        services.get("web-b").is_some() && services.get("web-a").is_none(),
        "{services}"
    );
    // c's check was registered with Status passing: it restarts passing.
    let seen = backends_seen(&gw, 8).await;
    assert_eq!(
        seen.get("b").copied().unwrap_or(0) + seen.get("c").copied().unwrap_or(0),
        8,
        "{seen:?}"
    );

    // Every instance gone: 503, not a stale address.
    for id in ["web-b", "web-c"] {
        gw.consul("PUT", &format!("/v1/agent/service/deregister/{id}"), None)
            .await;
    }
    assert!(
        eventually(Duration::from_secs(2), || async {
            gw.get("web.example", "/").await.0 == 503
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_upsync_kv_layout_defines_upstreams() {
    let dir = TempDir::new("upsync");
    let gw = Gateway::start_with(dir.path(), &["--workers", "1"]).await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    for (backend, value) in [
        (
            &a,
            json!({"weight": 2, "max_fails": 2, "fail_timeout": 10, "down": 0}),
        ),
        (&b, json!({})),
    ] {
        let (status, v) = gw
            .consul(
                "PUT",
                &format!("/v1/kv/upstreams/legacy/{}", backend.addr),
                Some(value),
            )
            .await;
        assert_eq!((status, v), (200, json!(true)));
    }
    assert!(
        eventually(Duration::from_secs(2), || async {
            gw.admin("GET", "/v1/upstreams/legacy", None).await.0 == 200
        })
        .await
    );
    gw.put_route("r", &[], "/", "legacy").await;
    let mut counts = std::collections::HashMap::new();
    for _ in 0..30 {
        *counts.entry(gw.get("x", "/").await.1).or_insert(0) += 1;
    }
    assert_eq!(counts.get("a"), Some(&20), "{counts:?}");
    // down: 1 drains it.
    gw.consul(
        "PUT",
        &format!("/v1/kv/upstreams/legacy/{}", a.addr),
        Some(json!({"weight": 2, "down": 1})),
    )
    .await;
    assert!(
        eventually(Duration::from_secs(2), || async {
            live(&gw, "legacy", a.addr).await["registry"] == "down"
        })
        .await
    );
    for _ in 0..5 {
        assert_eq!(gw.get("x", "/").await.1, "b");
    }
    // A registry service never overrides an upstream made through the admin API.
    gw.put_upstream("admin-made", &[&a]).await;
    gw.consul(
        "PUT",
        "/v1/agent/service/register",
        Some(json!({"Name": "admin-made", "Port": b.addr.port()})),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, up) = gw.admin("GET", "/v1/upstreams/admin-made", None).await;
    assert_eq!(up["servers"].as_array().unwrap().len(), 1);
    assert!(up.get("registry_fed").is_none(), "{up}");
}
