//! The Consul HTTP API against the real server on 127.0.0.1:0.

mod common;

use common::*;
use dynagate_registry::{Health, RegistryOptions};
use serde_json::json;
use std::time::{Duration, Instant};

fn opts() -> RegistryOptions {
    RegistryOptions::default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_list_and_shapes() {
    let s = Server::start(opts()).await;
    // py-consul style: lowercase keys; Registrator style nulls.
    let r = s
        .put(
            "/v1/agent/service/register",
            r#"{"name":"web","id":"web1","address":"10.0.0.1","port":8080,"tags":["weight=2"],
                "meta":{"v":"1"},"enabletagoverride":false,"check":null}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.body.is_empty());
    let r = s
        .put(
            "/v1/agent/service/register",
            r#"{"Name":"web","ID":"web2","Port":8081,"Tags":null,"Meta":null,"Check":null}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());

    let r = s.get("/v1/agent/services").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    let v = r.json();
    assert_eq!(v["web1"]["Service"], "web");
    assert_eq!(v["web1"]["Address"], "10.0.0.1");
    assert_eq!(v["web2"]["Tags"], json!([]));
    assert_eq!(v["web2"]["Meta"], json!({}));
    assert_eq!(v["web2"]["Weights"], json!({"Passing":1,"Warning":1}));
    assert_eq!(v["web2"]["Datacenter"], "dc1");

    let r = s.get("/v1/catalog/services").await;
    assert_eq!(r.json(), json!({"web": ["weight=2"]}));
    assert!(r.index() >= 1);

    let r = s.get("/v1/catalog/service/web").await;
    let v = r.json();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(v[0]["ServiceID"], "web1");
    assert_eq!(v[0]["ServiceAddress"], "10.0.0.1");
    assert_eq!(v[0]["ServicePort"], 8080);
    assert_eq!(v[0]["Address"], "127.0.0.1");
    assert_eq!(v[1]["ServiceAddress"], "");
    assert_eq!(v[1]["ServiceTags"], json!([]));
    assert_eq!(s.get("/v1/catalog/service/nope").await.json(), json!([]));

    let r = s.get("/v1/health/service/web").await;
    let v = r.json();
    assert_eq!(v[0]["Service"]["ID"], "web1");
    assert_eq!(v[0]["Node"]["Address"], "127.0.0.1");
    assert_eq!(v[1]["Checks"][0]["CheckID"], "serfHealth");
    assert_eq!(v[1]["Checks"].as_array().unwrap().len(), 1);

    let r = s.get("/v1/status/leader").await;
    assert_eq!(r.json(), json!("127.0.0.1:8300"));
    assert_eq!(
        s.get("/v1/status/peers").await.json(),
        json!(["127.0.0.1:8300"])
    );
    let v = s.get("/v1/agent/self").await.json();
    assert_eq!(v["Config"]["Datacenter"], "dc1");
    assert!(v["Config"]["NodeID"].as_str().unwrap().len() == 36);

    // Deregister.
    let r = s.put("/v1/agent/service/deregister/web2", "").await;
    assert_eq!(r.status, 200);
    let r = s.put("/v1/agent/service/deregister/web2", "").await;
    assert_eq!(r.status, 404);
    assert_eq!(
        r.text(),
        r#"Unknown service ID "web2". Ensure that the service ID is passed, not the service name."#
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_consul_status_and_sentence() {
    let s = Server::start(opts()).await;
    let r = s.put("/v1/agent/service/register", "{not json").await;
    assert_eq!(r.status, 400);
    assert!(
        r.text().starts_with("Request decode failed: "),
        "{}",
        r.text()
    );
    let r = s.put("/v1/agent/service/register", "").await;
    assert_eq!(r.status, 400);
    let r = s.put("/v1/agent/service/register", r#"{"Port":80}"#).await;
    assert_eq!((r.status, r.text().as_str()), (400, "Missing service name"));
    let r = s
        .put(
            "/v1/agent/service/register",
            r#"{"Name":"x","Check":{"Args":["/bin/sh","-c","id"],"Interval":"10s"}}"#,
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("remote code execution"), "{}", r.text());
    let r = s
        .put(
            "/v1/agent/service/register",
            r#"{"Name":"x","Check":{"HTTP":"https://127.0.0.1/","Interval":"10s"}}"#,
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("HTTPS"), "{}", r.text());
    // Nothing was registered by refused requests.
    assert_eq!(s.get("/v1/agent/services").await.json(), json!({}));

    let r = s.get("/v1/agent/service/register").await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("Allow"), Some("PUT"));
    let r = s.put("/v1/agent/services", "").await;
    assert_eq!(r.status, 405);
    let r = s.get("/v1/nope").await;
    assert_eq!(r.status, 404);
    let r = s.get("/v1/kv/a?index=abc").await;
    assert_eq!((r.status, r.text().as_str()), (400, "Invalid index"));
    let r = s.get("/v1/kv/a?index=1&wait=forever").await;
    assert_eq!((r.status, r.text().as_str()), (400, "Invalid wait time"));
    let r = s.put("/v1/agent/check/pass/nope", "").await;
    assert_eq!(r.status, 404);
    assert_eq!(
        r.text(),
        r#"Unknown check ID "nope". Ensure that the check ID is passed, not the check name."#
    );
    let r = s.get("/v1/health/state/bogus").await;
    assert_eq!(r.status, 400);
    // Unknown query parameters clients send are accepted.
    let r = s
        .get("/v1/catalog/services?dc=dc1&stale&consistent&cached&ns=default")
        .await;
    assert_eq!(r.status, 200);
    // Garbage paths and bytes never crash the server.
    for p in ["/v1/kv/%zz", "/v1/agent/service/%ff", "/", "/v1/", "/v1/kv"] {
        let r = s.get(p).await;
        assert!(r.status >= 400, "{p}: {}", r.status);
    }
    let r = raw_exchange(s.addr, b"\x00\x01garbage\r\n\r\n", Duration::from_secs(5)).await;
    assert_eq!(r.status, 400);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_check_lifecycle() {
    let s = Server::start(opts()).await;
    let r = s
        .put(
            "/v1/agent/service/register",
            r#"{"Name":"api","Port":9000,"Check":{"TTL":"2s","Notes":"hb"}}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let checks = s.get("/v1/agent/checks").await.json();
    let c = &checks["service:api"];
    assert_eq!(c["Status"], "critical", "initial status is critical");
    assert_eq!(c["Name"], "Service 'api' check");
    assert_eq!(c["ServiceName"], "api");
    assert_eq!(c["Type"], "ttl");

    let r = s
        .put("/v1/agent/check/pass/service:api?note=alive", "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let c = &s.get("/v1/agent/checks").await.json()["service:api"];
    assert_eq!(
        (c["Status"].clone(), c["Output"].clone()),
        (json!("passing"), json!("alive"))
    );
    assert_eq!(s.reg.upstreams()["api"][0].status, Health::Passing);

    let r = s
        .put(
            "/v1/agent/check/update/service:api",
            r#"{"Status":"warning","Output":"slow"}"#,
        )
        .await;
    assert_eq!(r.status, 200);
    let c = &s.get("/v1/agent/checks").await.json()["service:api"];
    assert_eq!(c["Status"], "warning");
    let r = s
        .put(
            "/v1/agent/check/update/service:api",
            r#"{"Status":"bogus"}"#,
        )
        .await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (400, "Invalid check status: 'bogus'")
    );

    // Heartbeats keep it alive; silence expires it.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            s.put("/v1/agent/check/pass/service:api", "").await.status,
            200
        );
    }
    let c = &s.get("/v1/agent/checks").await.json()["service:api"];
    assert_eq!(c["Status"], "passing");
    let ok = eventually(Duration::from_secs(6), || async {
        let c = s.get("/v1/agent/checks").await.json();
        c["service:api"]["Status"] == "critical" && c["service:api"]["Output"] == "TTL expired"
    })
    .await;
    assert!(ok, "TTL did not expire");
    // And comes back with a heartbeat after expiry, then expires again.
    assert_eq!(
        s.put("/v1/agent/check/pass/service:api", "").await.status,
        200
    );
    assert_eq!(
        s.get("/v1/agent/checks").await.json()["service:api"]["Status"],
        "passing"
    );
    let ok = eventually(Duration::from_secs(6), || async {
        s.get("/v1/agent/checks").await.json()["service:api"]["Status"] == "critical"
    })
    .await;
    assert!(ok, "TTL did not expire a second time");
    // pass/warn/fail on a check without a TTL is refused, as Consul does.
    s.put(
        "/v1/agent/check/register",
        r#"{"Name":"tcp","TCP":"127.0.0.1:1","Interval":"10s"}"#,
    )
    .await;
    let r = s.put("/v1/agent/check/pass/tcp", "").await;
    assert_eq!(r.status, 500);
    assert_eq!(r.text(), r#"CheckID "tcp" does not have associated TTL"#);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_and_tcp_checks_run() {
    let s = Server::start(opts()).await;
    let b = backend(200).await;
    let hung = backend(0).await;
    let body = json!({
        "Name": "svc", "ID": "svc1", "Port": b.addr.port(), "Address": "127.0.0.1",
        "Checks": [
            {"HTTP": format!("http://{}/health", b.addr), "Interval": "1s", "Timeout": "500ms",
             "Header": {"X-Test": ["1"]}},
            {"TCP": b.addr.to_string(), "Interval": "1s"},
            {"HTTP": format!("http://{}/hang", hung.addr), "Interval": "1s", "Timeout": "300ms",
             "CheckID": "hung"}
        ]
    });
    let r = s.put("/v1/agent/service/register", &body.to_string()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let ok = eventually(Duration::from_secs(5), || async {
        let c = s.get("/v1/agent/checks").await.json();
        c["service:svc1:1"]["Status"] == "passing" && c["service:svc1:2"]["Status"] == "passing"
    })
    .await;
    assert!(
        ok,
        "checks did not pass: {}",
        s.get("/v1/agent/checks").await.text()
    );
    let c = s.get("/v1/agent/checks").await.json();
    assert_eq!(c["hung"]["Status"], "critical");
    assert!(c["service:svc1:1"]["Output"]
        .as_str()
        .unwrap()
        .contains("200"));
    assert_eq!(c["service:svc1:1"]["Interval"], "1s");

    // 429 -> warning, 500 -> critical.
    b.status.store(429, std::sync::atomic::Ordering::SeqCst);
    let ok = eventually(Duration::from_secs(4), || async {
        s.get("/v1/agent/checks").await.json()["service:svc1:1"]["Status"] == "warning"
    })
    .await;
    assert!(ok);
    b.status.store(500, std::sync::atomic::Ordering::SeqCst);
    let ok = eventually(Duration::from_secs(4), || async {
        s.get("/v1/agent/checks").await.json()["service:svc1:1"]["Status"] == "critical"
    })
    .await;
    assert!(ok);
    // ?passing drops it; passing=false does not filter.
    assert_eq!(
        s.get("/v1/health/service/svc?passing").await.json(),
        json!([])
    );
    assert_eq!(
        s.get("/v1/health/service/svc?passing=false")
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let crit = s.get("/v1/health/state/critical").await.json();
    assert!(crit
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["CheckID"] == "hung"));
    let any = s.get("/v1/health/state/any").await.json();
    assert!(any
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["CheckID"] == "serfHealth"));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_weights_and_passing_filter() {
    let s = Server::start(opts()).await;
    for (id, tags, status) in [
        ("a", r#"["blue","v1"]"#, "passing"),
        ("b", r#"["blue"]"#, "warning"),
    ] {
        let body = format!(
            r#"{{"Name":"t","ID":"{id}","Port":1,"Tags":{tags},"Weights":{{"Passing":5,"Warning":2}},
                "Check":{{"TTL":"30s","Status":"{status}"}}}}"#
        );
        assert_eq!(s.put("/v1/agent/service/register", &body).await.status, 200);
    }
    let v = s.get("/v1/health/service/t?tag=blue&tag=v1").await.json();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["Service"]["ID"], "a");
    assert_eq!(v[0]["Service"]["Weights"], json!({"Passing":5,"Warning":2}));
    let v = s.get("/v1/health/service/t?passing=1").await.json();
    assert_eq!(v.as_array().unwrap().len(), 1);
    // Shared answers are keyed by path and the parameters that shape them: the same
    // path without filters, at the same index, is a different answer.
    let v = s.get("/v1/health/service/t?index=0&stale").await.json();
    assert_eq!(v.as_array().unwrap().len(), 2);
    let v = s.get("/v1/health/service/t?tag=blue&tag=v1").await.json();
    assert_eq!(v.as_array().unwrap().len(), 1);
    let v = s.get("/v1/catalog/service/t?tag=blue").await.json();
    assert_eq!(v.as_array().unwrap().len(), 2);
    let ups = s.reg.upstreams();
    let t = &ups["t"];
    assert_eq!((t[0].weight, t[0].status), (5, Health::Passing));
    assert_eq!((t[1].weight, t[1].status), (2, Health::Warning));
    assert_eq!(t[0].address, "127.0.0.1:1");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_mode() {
    let s = Server::start(opts()).await;
    s.put("/v1/agent/service/register", r#"{"Name":"m","Port":1}"#)
        .await;
    let r = s
        .put(
            "/v1/agent/service/maintenance/m?enable=true&reason=deploy",
            "",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = s.get("/v1/health/service/m").await.json();
    let checks = v[0]["Checks"].as_array().unwrap();
    let m = checks
        .iter()
        .find(|c| c["CheckID"] == "_service_maintenance:m")
        .expect("maintenance check");
    assert_eq!(m["Status"], "critical");
    assert_eq!(m["Notes"], "deploy");
    assert_eq!(m["Name"], "Service Maintenance Mode");
    assert_eq!(s.reg.upstreams()["m"][0].status, Health::Maintenance);
    assert!(s.reg.upstreams()["m"][0].down);
    let r = s
        .put("/v1/agent/service/maintenance/m?enable=false", "")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(s.reg.upstreams()["m"][0].status, Health::Passing);
    let r = s.put("/v1/agent/service/maintenance/m", "").await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (400, "Missing value for enable")
    );
    let r = s
        .put("/v1/agent/service/maintenance/zz?enable=true", "")
        .await;
    assert_eq!(r.status, 404);
    // Node maintenance affects every instance.
    assert_eq!(
        s.put("/v1/agent/maintenance?enable=true", "").await.status,
        200
    );
    assert_eq!(s.reg.upstreams()["m"][0].status, Health::Maintenance);
    assert_eq!(
        s.put("/v1/agent/maintenance?enable=false", "").await.status,
        200
    );
    assert_eq!(s.reg.upstreams()["m"][0].status, Health::Passing);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_register_and_deregister() {
    let s = Server::start(opts()).await;
    s.put("/v1/agent/service/register", r#"{"Name":"c","Port":1}"#)
        .await;
    let r = s
        .put(
            "/v1/agent/check/register",
            r#"{"Name":"extra","ServiceID":"c","TTL":"10s","Status":"passing"}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = s.get("/v1/agent/checks").await.json();
    assert_eq!(v["extra"]["ServiceID"], "c");
    assert_eq!(v["extra"]["Status"], "passing");
    let r = s
        .put(
            "/v1/agent/check/register",
            r#"{"Name":"x","ServiceID":"nope","TTL":"10s"}"#,
        )
        .await;
    assert_eq!(r.status, 400);
    let r = s.put("/v1/agent/check/register", r#"{"TTL":"10s"}"#).await;
    assert_eq!((r.status, r.text().as_str()), (400, "Missing check name"));
    // Node-level check: shows in every health entry.
    let r = s
        .put(
            "/v1/agent/check/register",
            r#"{"Name":"disk","TTL":"10s","Status":"warning"}"#,
        )
        .await;
    assert_eq!(r.status, 200);
    let v = s.get("/v1/health/service/c").await.json();
    assert_eq!(v[0]["Checks"].as_array().unwrap().len(), 3);
    assert_eq!(
        s.get("/v1/health/service/c?passing").await.json(),
        json!([])
    );
    assert_eq!(
        s.put("/v1/agent/check/deregister/disk", "").await.status,
        200
    );
    assert_eq!(
        s.put("/v1/agent/check/deregister/disk", "").await.status,
        404
    );
    // Service deregistration removes its checks.
    s.put("/v1/agent/service/deregister/c", "").await;
    assert_eq!(s.get("/v1/agent/checks").await.json(), json!({}));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_existing_checks() {
    let s = Server::start(opts()).await;
    s.put(
        "/v1/agent/service/register",
        r#"{"Name":"r","Checks":[{"CheckID":"a","TTL":"10s"},{"CheckID":"b","TTL":"10s"}]}"#,
    )
    .await;
    s.put(
        "/v1/agent/service/register",
        r#"{"Name":"r","Checks":[{"CheckID":"a","TTL":"10s"}]}"#,
    )
    .await;
    assert_eq!(
        s.get("/v1/agent/checks")
            .await
            .json()
            .as_object()
            .unwrap()
            .len(),
        2
    );
    s.put(
        "/v1/agent/service/register?replace-existing-checks",
        r#"{"Name":"r","Checks":[{"CheckID":"a","TTL":"10s"}]}"#,
    )
    .await;
    let v = s.get("/v1/agent/checks").await.json();
    assert_eq!(v.as_object().unwrap().len(), 1);
    assert!(v.get("a").is_some());
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_operations() {
    let s = Server::start(opts()).await;
    let r = s.get("/v1/kv/missing").await;
    assert_eq!(r.status, 404);
    assert!(r.body.is_empty());
    assert!(r.index() >= 1, "404 carries X-Consul-Index");
    assert_eq!(r.header("X-Consul-Knownleader"), Some("true"));

    assert_eq!(
        s.put("/v1/kv/app/config?flags=42", "hello").await.json(),
        json!(true)
    );
    let r = s.get("/v1/kv/app/config").await;
    let v = r.json();
    assert_eq!(v[0]["Key"], "app/config");
    assert_eq!(v[0]["Flags"], 42);
    assert_eq!(v[0]["Value"], "aGVsbG8=");
    assert_eq!(v[0]["LockIndex"], 0);
    let mi = v[0]["ModifyIndex"].as_u64().unwrap();
    assert_eq!(r.index(), mi);

    let r = s.get("/v1/kv/app/config?raw").await;
    assert_eq!(r.body, b"hello");
    assert!(r.index() >= 1);

    // CAS.
    assert_eq!(
        s.put("/v1/kv/app/config?cas=0", "x").await.json(),
        json!(false)
    );
    assert_eq!(
        s.put("/v1/kv/app/config?cas=1", "x").await.json(),
        json!(false)
    );
    assert_eq!(
        s.put(&format!("/v1/kv/app/config?cas={mi}"), "v2")
            .await
            .json(),
        json!(true)
    );
    assert_eq!(s.put("/v1/kv/app/new?cas=0", "n").await.json(), json!(true));
    let v = s.get("/v1/kv/app/config").await.json();
    assert_eq!(v[0]["Value"], "djI=");
    assert_eq!(
        v[0]["Flags"], 0,
        "flags reset when not given, as Consul does"
    );
    assert!(v[0]["ModifyIndex"].as_u64().unwrap() > mi);
    assert_eq!(v[0]["CreateIndex"].as_u64().unwrap(), mi);

    // Empty value -> null; keys with ':' accepted.
    assert_eq!(
        s.put("/v1/kv/upstreams/test/10.0.0.1:80", "").await.json(),
        json!(true)
    );
    let v = s.get("/v1/kv/upstreams/test/10.0.0.1:80").await.json();
    assert_eq!(v[0]["Value"], serde_json::Value::Null);

    // recurse / keys / separator.
    s.put("/v1/kv/app/sub/a", "1").await;
    s.put("/v1/kv/app/sub/b", "2").await;
    let v = s.get("/v1/kv/app/?recurse").await.json();
    assert_eq!(v.as_array().unwrap().len(), 4);
    let v = s.get("/v1/kv/app/?keys&separator=/").await.json();
    assert_eq!(v, json!(["app/config", "app/new", "app/sub/"]));
    let v = s.get("/v1/kv/?keys").await.json();
    assert_eq!(v.as_array().unwrap().len(), 5);
    let r = s.get("/v1/kv/zzz/?keys").await;
    assert_eq!(r.status, 404);
    assert_eq!(
        s.get("/v1/kv/?recurse")
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        5
    );

    // Delete with cas, recurse.
    assert_eq!(s.delete("/v1/kv/app/new?cas=1").await.json(), json!(false));
    assert_eq!(s.delete("/v1/kv/app/new").await.json(), json!(true));
    assert_eq!(s.get("/v1/kv/app/new").await.status, 404);
    assert_eq!(
        s.delete("/v1/kv/app/sub/?recurse").await.json(),
        json!(true)
    );
    assert_eq!(s.get("/v1/kv/app/sub/?recurse").await.status, 404);
    assert_eq!(s.delete("/v1/kv/app/x?recurse&cas=1").await.status, 400);
    assert_eq!(s.put("/v1/kv/", "x").await.status, 400);
    assert_eq!(s.put("/v1/kv/a?flags=x", "x").await.status, 400);
    assert_eq!(s.put("/v1/kv/a?acquire=sess", "x").await.status, 400);

    // Too large.
    let big = "x".repeat(512 * 1024 + 1);
    let r = s.put("/v1/kv/big", &big).await;
    assert_eq!(r.status, 413);
    assert!(
        r.text().starts_with("Request body(524289 bytes) too large"),
        "{}",
        r.text()
    );
    let ok = "y".repeat(512 * 1024);
    assert_eq!(s.put("/v1/kv/big", &ok).await.status, 200);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_queries() {
    let s = Server::start(opts()).await;
    s.put("/v1/kv/w/a", "1").await;
    let idx = s.get("/v1/kv/w/?recurse").await.index();

    // A write elsewhere does not wake a watcher on w/; a write under w/ does.
    let addr = s.addr;
    let watcher = tokio::spawn(async move {
        let t = Instant::now();
        let r = request(
            addr,
            "GET",
            &format!("/v1/kv/w/?recurse&index={idx}&wait=10s"),
            &[],
            b"",
        )
        .await;
        (r, t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.put("/v1/kv/other", "x").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!watcher.is_finished(), "unrelated write woke the watcher");
    s.put("/v1/kv/w/b", "2").await;
    let (r, took) = watcher.await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r.index() > idx);
    assert_eq!(r.json().as_array().unwrap().len(), 2);
    assert!(took < Duration::from_secs(5));

    // Deletes wake watchers too.
    let idx = r.index();
    let watcher = tokio::spawn(async move {
        request(
            addr,
            "GET",
            &format!("/v1/kv/w/?recurse&index={idx}&wait=10s"),
            &[],
            b"",
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.delete("/v1/kv/w/b").await;
    let r = watcher.await.unwrap();
    assert!(r.index() > idx);
    assert_eq!(r.json().as_array().unwrap().len(), 1);

    // Timeout: 200 with current data after ~wait (+ jitter <= wait/16).
    let idx = r.index();
    let t = Instant::now();
    let r = s
        .get(&format!("/v1/kv/w/?recurse&index={idx}&wait=1s"))
        .await;
    let took = t.elapsed();
    assert_eq!(r.status, 200);
    assert_eq!(r.index(), idx);
    assert!(took >= Duration::from_millis(950), "{took:?}");
    assert!(took < Duration::from_millis(2500), "{took:?}");

    // Index above ours (we were reset): wait the timeout, then answer with our index.
    let t = Instant::now();
    let r = s.get("/v1/catalog/services?index=999999&wait=500ms").await;
    assert!(t.elapsed() >= Duration::from_millis(450));
    assert!(r.index() < 999999);

    // Service watchers: catalog and health.
    let idx = s.get("/v1/health/service/web").await.index();
    let watcher = tokio::spawn(async move {
        request(
            addr,
            "GET",
            &format!("/v1/health/service/web?index={idx}&wait=10s"),
            &[],
            b"",
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.put(
        "/v1/agent/service/register",
        r#"{"Name":"web","Port":80,"Check":{"TTL":"10s"}}"#,
    )
    .await;
    let r = watcher.await.unwrap();
    assert!(r.index() > idx);
    assert_eq!(r.json().as_array().unwrap().len(), 1);
    // A check status change wakes health watchers.
    let idx = r.index();
    let watcher = tokio::spawn(async move {
        request(
            addr,
            "GET",
            &format!("/v1/health/service/web?index={idx}&wait=10s"),
            &[],
            b"",
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.put("/v1/agent/check/pass/service:web", "").await;
    let r = watcher.await.unwrap();
    assert!(r.index() > idx);
    assert_eq!(r.json()[0]["Checks"][1]["Status"], "passing");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_watchers_are_cheap() {
    let s = Server::start(opts()).await;
    let idx = s.get("/v1/kv/hot?index=0").await.index();
    let n = 500;
    let mut tasks = Vec::new();
    for _ in 0..n {
        let addr = s.addr;
        tasks.push(tokio::spawn(async move {
            request(
                addr,
                "GET",
                &format!("/v1/kv/hot?index={idx}&wait=30s"),
                &[],
                b"",
            )
            .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(tasks.iter().all(|t| !t.is_finished()));
    let t = Instant::now();
    s.put("/v1/kv/hot", "1").await;
    for task in tasks {
        let r = task.await.unwrap();
        assert_eq!(r.status, 200);
        assert!(r.index() > idx);
    }
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_blocking_queries() {
    let s = Server::start(opts()).await;
    let addr = s.addr;
    let w = tokio::spawn(async move {
        request(
            addr,
            "GET",
            "/v1/catalog/services?index=1&wait=5m",
            &[],
            b"",
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    s.shutdown().await;
    let r = w.await.unwrap();
    assert_eq!(r.status, 200);
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens() {
    let mut o = opts();
    o.token = Some("s3cret".into());
    let s = Server::start(o).await;
    let body = r#"{"Name":"a","Port":1}"#;
    let r = s.put("/v1/agent/service/register", body).await;
    assert_eq!(r.status, 403);
    let r = request(
        s.addr,
        "PUT",
        "/v1/agent/service/register",
        &[("X-Consul-Token", "wrong")],
        body.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 403);
    let r = request(
        s.addr,
        "PUT",
        "/v1/agent/service/register",
        &[("X-Consul-Token", "s3cret")],
        body.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = request(
        s.addr,
        "PUT",
        "/v1/kv/k",
        &[("Authorization", "Bearer s3cret")],
        b"v",
    )
    .await;
    assert_eq!(r.status, 200);
    let r = s.put("/v1/kv/k?token=s3cret", "v").await;
    assert_eq!(r.status, 200);
    let r = s.delete("/v1/kv/k").await;
    assert_eq!(r.status, 403);
    // Reads are open unless acl_reads.
    assert_eq!(s.get("/v1/kv/k").await.status, 200);
    s.shutdown().await;

    let mut o = opts();
    o.token = Some("s3cret".into());
    o.acl_reads = true;
    let s = Server::start(o).await;
    assert_eq!(s.get("/v1/agent/services").await.status, 403);
    assert_eq!(s.get("/v1/agent/services?token=s3cret").await.status, 200);
    assert_eq!(
        s.get("/v1/status/leader").await.status,
        200,
        "liveness ping stays open"
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaper_deregisters_critical_services() {
    let mut o = opts();
    o.min_deregister_after = Duration::from_secs(1);
    o.reap_interval = Duration::from_millis(100);
    let s = Server::start(o).await;
    let r = s
        .put(
            "/v1/agent/service/register",
            r#"{"Name":"dying","Port":1,"Check":{"TTL":"30s","DeregisterCriticalServiceAfter":"1ms"}}"#,
        )
        .await;
    assert_eq!(r.status, 200);
    s.put(
        "/v1/agent/service/register",
        r#"{"Name":"healthy","Port":1,"Check":{"TTL":"30s","Status":"passing","DeregisterCriticalServiceAfter":"1ms"}}"#,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        s.get("/v1/agent/services")
            .await
            .json()
            .get("dying")
            .is_some(),
        "floor respected"
    );
    let ok = eventually(Duration::from_secs(6), || async {
        s.get("/v1/agent/services")
            .await
            .json()
            .get("dying")
            .is_none()
    })
    .await;
    assert!(ok, "reaper did not deregister");
    assert!(s
        .get("/v1/agent/services")
        .await
        .json()
        .get("healthy")
        .is_some());
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_and_upstreams() {
    let s = Server::start(opts()).await;
    let mut rx = s.reg.subscribe();
    let before = *rx.borrow_and_update();
    s.put(
        "/v1/kv/upstreams/test/10.0.0.1:80",
        r#"{"weight":3,"backup":1}"#,
    )
    .await;
    tokio::time::timeout(Duration::from_secs(2), rx.changed())
        .await
        .unwrap()
        .unwrap();
    assert!(*rx.borrow() > before);
    let ups = s.reg.upstreams();
    let t = &ups["test"][0];
    assert_eq!(
        (t.address.as_str(), t.weight, t.backup),
        ("10.0.0.1:80", 3, true)
    );
    s.put(
        "/v1/agent/service/register",
        r#"{"Name":"api","Port":7000,"Tags":["weight=4"]}"#,
    )
    .await;
    tokio::time::timeout(Duration::from_secs(2), rx.changed())
        .await
        .unwrap()
        .unwrap();
    let a = &s.reg.upstreams()["api"][0];
    assert_eq!((a.address.as_str(), a.weight), ("127.0.0.1:7000", 4));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bodies_and_paths_never_panic() {
    let s = Server::start(opts()).await;
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let bodies: Vec<String> = vec![
        "[]".into(),
        "null".into(),
        "\"x\"".into(),
        "123".into(),
        deep,
        r#"{"Name":1}"#.into(),
        r#"{"Name":"a","Port":-1}"#.into(),
        r#"{"Name":"a","Port":1.5}"#.into(),
        r#"{"Name":"a","Checks":[null,{},1]}"#.into(),
        r#"{"Name":"a","Check":{"TTL":"-1s"}}"#.into(),
        r#"{"Name":"a","Check":{"TTL":1e300}}"#.into(),
        r#"{"Name":"a","Check":{"TTL":"1e400s"}}"#.into(),
        r#"{"Name":"a","Check":{"TTL":"99999999999h"}}"#.into(),
        r#"{"Name":"a","Weights":{"Passing":1e20}}"#.into(),
        r#"{"Name":"a","Weights":{"Passing":1,"Warning":-1}}"#.into(),
        r#"{"Name":"a","TaggedAddresses":{"lan":"str"}}"#.into(),
        r#"{"Name":"a","Check":{"HTTP":"http://[::1","Interval":"1s"}}"#.into(),
        r#"{"Name":"a","Check":{"HTTP":"ftp://x/","Interval":"1s"}}"#.into(),
        r#"{"Name":"a","Check":{"HTTP":"http://a/","Interval":"1s","Header":{"bad name":["x"]}}}"#
            .into(),
        r#"{"Name":"a","Check":{"HTTP":"http://a/","Interval":"1s","Method":"GE T"}}"#.into(),
        r#"{"Name":"a","Check":{"TCP":"nohostport","Interval":"1s"}}"#.into(),
        r#"{"Name":"a","Check":{"GRPC":"x:1","Interval":"1s"}}"#.into(),
        r#"{"Name":"a","Check":{"ScriptArgs":["x"],"Interval":"1s"}}"#.into(),
        r#"{"Name":"a","Check":{"TTL":"1s","Status":"maybe"}}"#.into(),
        r#"{"Name":"a","Meta":{"k":1}}"#.into(),
        r#"{"Name":"a","Tags":"notalist"}"#.into(),
        format!(r#"{{"Name":"{}"}}"#, "n".repeat(5000)),
        "{\"Name\":\"\u{0}\u{ffff}\"}".into(),
    ];
    for b in &bodies {
        let r = s.put("/v1/agent/service/register", b).await;
        assert_eq!(r.status, 400, "body {:.80}: {} {}", b, r.status, r.text());
        let r = s.put("/v1/agent/check/register", b).await;
        assert_eq!(r.status, 400, "check body {:.80}: {}", b, r.text());
        let r = s.put("/v1/agent/check/update/x", b).await;
        assert!(r.status == 400 || r.status == 404, "{}", r.status);
    }
    // Random bytes in paths, queries and bodies.
    for i in 0..200 {
        let mut b = [0u8; 24];
        getrandom::fill(&mut b).unwrap();
        let junk: String = b
            .iter()
            .map(|x| match x % 8 {
                0 => '%',
                1 => '/',
                2 => '?',
                3 => '&',
                4 => '=',
                _ => (b'a' + x % 26) as char,
            })
            .collect();
        for prefix in [
            "/v1/kv/",
            "/v1/agent/service/",
            "/v1/health/service/",
            "/v1/catalog/",
        ] {
            let r = request(
                s.addr,
                if i % 2 == 0 { "GET" } else { "PUT" },
                &format!("{prefix}{junk}"),
                &[],
                &b,
            )
            .await;
            assert!(
                r.status < 500 || r.status == 500 && r.text().contains("TTL"),
                "{prefix}{junk}: {}",
                r.status
            );
        }
    }
    // Still healthy, nothing registered by the garbage.
    assert_eq!(s.get("/v1/status/leader").await.status, 200);
    assert_eq!(s.get("/v1/agent/services").await.json(), json!({}));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_update_names_only_what_changed() {
    let s = Server::start(opts()).await;
    for (name, id, port) in [("a", "a1", 1), ("b", "b1", 2), ("b", "b2", 3)] {
        let body = format!(
            r#"{{"Name":"{name}","ID":"{id}","Port":{port},"Check":{{"TTL":"30s","Status":"passing"}}}}"#
        );
        assert_eq!(s.put("/v1/agent/service/register", &body).await.status, 200);
    }
    // The first view (no `since`) is everything.
    let first = s.reg.upstream_update(None);
    assert_eq!(first.changed, None);
    assert_eq!(first.upstreams, s.reg.upstreams());
    assert_eq!(first.upstreams.len(), 2);
    // Nothing since: nothing to look at.
    let same = s.reg.upstream_update(Some(first.index));
    assert_eq!(same.changed, Some(Default::default()));
    assert!(same.upstreams.is_empty());
    // One service changes: only its name, derived exactly as the full view derives it.
    assert_eq!(
        s.put("/v1/agent/check/fail/service:b2", "").await.status,
        200
    );
    let upd = s.reg.upstream_update(Some(first.index));
    assert_eq!(upd.changed, Some(["b".to_string()].into()));
    assert_eq!(upd.upstreams.len(), 1);
    assert_eq!(upd.upstreams["b"], s.reg.upstreams()["b"]);
    assert!(upd.upstreams["b"][1].down);
    // KV upstreams (nginx-upsync layout) by their name; other keys name nothing.
    assert_eq!(
        s.put("/v1/kv/upstreams/legacy/10.0.0.1:80", "")
            .await
            .status,
        200
    );
    assert_eq!(s.put("/v1/kv/config/x", "1").await.status, 200);
    let upd2 = s.reg.upstream_update(Some(upd.index));
    assert_eq!(upd2.changed, Some(["legacy".to_string()].into()));
    assert_eq!(upd2.upstreams["legacy"][0].address, "10.0.0.1:80");
    // Deregistering the last instance names the service, with nothing left for it.
    assert_eq!(
        s.put("/v1/agent/service/deregister/a1", "").await.status,
        200
    );
    let upd3 = s.reg.upstream_update(Some(upd2.index));
    assert_eq!(upd3.changed, Some(["a".to_string()].into()));
    assert!(upd3.upstreams.is_empty());
    // Node maintenance touches every instance: a full view again.
    assert_eq!(
        s.put("/v1/agent/maintenance?enable=true", "").await.status,
        200
    );
    let upd4 = s.reg.upstream_update(Some(upd3.index));
    assert_eq!(upd4.changed, None);
    assert_eq!(upd4.upstreams, s.reg.upstreams());
    s.shutdown().await;
}
