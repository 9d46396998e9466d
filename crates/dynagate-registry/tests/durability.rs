//! Durability: everything acknowledged survives a restart and `kill -9`; the index never
//! goes backwards; check statuses restart at their initial state.

mod common;

use common::*;
use dynagate_registry::{Registry, RegistryOptions};
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

const CHILD_ENV: &str = "DYNAGATE_REGISTRY_CHILD_DIR";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_services_checks_kv_and_index() {
    let dir = TempDir::new("restart");
    let s = Server::start_in(dir.path(), RegistryOptions::default()).await;
    s.put(
        "/v1/agent/service/register",
        r#"{"Name":"web","ID":"web1","Port":80,"Tags":["a"],"Meta":{"k":"v"},
            "Weights":{"Passing":3,"Warning":1},
            "Checks":[{"TTL":"30s","CheckID":"ttl"},{"TCP":"127.0.0.1:1","Interval":"10s","CheckID":"tcp"}]}"#,
    )
    .await;
    s.put(
        "/v1/agent/service/maintenance/web1?enable=true&reason=r",
        "",
    )
    .await;
    s.put("/v1/kv/a/b?flags=7", "value").await;
    s.put("/v1/kv/gone", "x").await;
    s.delete("/v1/kv/gone").await;
    s.put("/v1/agent/check/pass/ttl", "").await;
    let services = s.get("/v1/agent/services").await.json();
    let kv = s.get("/v1/kv/a/b").await.json();
    let before = s.reg.index();
    let node_id = s.get("/v1/agent/self").await.json()["Config"]["NodeID"].clone();
    s.shutdown().await;

    let s = Server::start_in(dir.path(), RegistryOptions::default()).await;
    assert!(
        s.reg.index() >= before,
        "index went backwards: {} < {before}",
        s.reg.index()
    );
    assert_eq!(s.get("/v1/agent/services").await.json(), services);
    assert_eq!(s.get("/v1/kv/a/b").await.json(), kv);
    assert_eq!(s.get("/v1/kv/gone").await.status, 404);
    let checks = s.get("/v1/agent/checks").await.json();
    assert_eq!(
        checks["ttl"]["Status"], "critical",
        "status restarts at initial state"
    );
    assert_eq!(checks["_service_maintenance:web1"]["Notes"], "r");
    assert_eq!(
        s.get("/v1/agent/self").await.json()["Config"]["NodeID"],
        node_id
    );
    // New writes get higher indexes than anything seen before.
    s.put("/v1/kv/new", "1").await;
    let v = s.get("/v1/kv/new").await.json();
    assert!(v[0]["ModifyIndex"].as_u64().unwrap() > before);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_from_status_changes_survives_restart() {
    let dir = TempDir::new("volatile");
    let s = Server::start_in(dir.path(), RegistryOptions::default()).await;
    s.put(
        "/v1/agent/service/register",
        r#"{"Name":"h","Check":{"TTL":"30s"}}"#,
    )
    .await;
    // Status flips are not persisted as data, but the index they reach is protected.
    for i in 0..30 {
        let verb = if i % 2 == 0 { "pass" } else { "fail" };
        assert_eq!(
            s.put(&format!("/v1/agent/check/{verb}/service:h"), "")
                .await
                .status,
            200
        );
    }
    let seen = s.get("/v1/health/service/h").await.index();
    assert!(seen >= 30);
    s.shutdown().await;
    let s = Server::start_in(dir.path(), RegistryOptions::default()).await;
    assert!(s.get("/v1/health/service/h").await.index() >= seen);
    assert!(s.reg.index() >= seen);
    s.shutdown().await;
}

/// Runs as the child process of `kill_9_loses_no_acknowledged_write` (no-op otherwise).
#[test]
fn child_server() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let reg = Registry::open(std::path::Path::new(&dir), RegistryOptions::default()).unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("PORT {}", l.local_addr().unwrap().port());
        reg.serve(l, std::future::pending()).await.unwrap();
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_write() {
    let dir = TempDir::new("kill9");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_server", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let port = tokio::task::spawn_blocking(move || {
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            // libtest may print "test child_server ... " on the same line.
            if let Some(i) = line.find("PORT ") {
                return line[i + 5..].trim().parse::<u16>().unwrap();
            }
        }
        panic!("child exited without a port");
    })
    .await
    .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    let mut acked = Vec::new();
    for i in 0..40 {
        let r = request(
            addr,
            "PUT",
            &format!("/v1/kv/k/{i}"),
            &[],
            format!("v{i}").as_bytes(),
        )
        .await;
        assert_eq!(r.status, 200);
        acked.push(i);
        if i % 10 == 0 {
            let body = format!(r#"{{"Name":"svc","ID":"svc{i}","Port":{}}}"#, 1000 + i);
            let r = request(
                addr,
                "PUT",
                "/v1/agent/service/register",
                &[],
                body.as_bytes(),
            )
            .await;
            assert_eq!(r.status, 200);
        }
    }
    let last_index = request(addr, "GET", "/v1/kv/k/?recurse", &[], b"")
        .await
        .index();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let s = Server::start_in(dir.path(), RegistryOptions::default()).await;
    assert!(s.reg.index() >= last_index);
    let v = s.get("/v1/kv/k/?recurse").await.json();
    assert_eq!(v.as_array().unwrap().len(), acked.len());
    let services = s.get("/v1/agent/services").await.json();
    assert_eq!(services.as_object().unwrap().len(), 4);
    assert_eq!(services["svc30"]["Port"], json!(1030));
    s.shutdown().await;
}

#[test]
fn open_rejects_unwritable_dir() {
    let r = Registry::open(
        std::path::Path::new("/proc/definitely/not/here"),
        RegistryOptions::default(),
    );
    assert!(r.is_err());
}

/// A store whose commits can be made to fail, to check that a failed commit is neither
/// acknowledged nor applied.
struct FlakyStore {
    inner: dynagate_registry::sqlite::SqliteStore,
    fail: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl dynagate_registry::RegistryStore for FlakyStore {
    fn load(&self) -> Result<dynagate_registry::store::Stored, dynagate_registry::StoreError> {
        self.inner.load()
    }
    fn commit(
        &self,
        batch: &dynagate_registry::store::Batch,
    ) -> Result<(), dynagate_registry::StoreError> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(dynagate_registry::StoreError::Io("disk full (test)".into()));
        }
        self.inner.commit(batch)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_commit_is_not_acknowledged_nor_applied() {
    let dir = TempDir::new("flaky");
    let fail = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let store = FlakyStore {
        inner: dynagate_registry::sqlite::SqliteStore::open(&dir.path().join("registry.db"))
            .unwrap(),
        fail: fail.clone(),
    };
    let reg = Registry::with_store(Box::new(store), RegistryOptions::default()).unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let r2 = reg.clone();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        r2.serve(l, async move {
            let _ = rx.await;
        })
        .await
        .unwrap()
    });
    assert_eq!(
        request(addr, "PUT", "/v1/kv/a", &[], b"1").await.status,
        200
    );
    let before = reg.index();
    fail.store(true, std::sync::atomic::Ordering::SeqCst);
    let r = request(addr, "PUT", "/v1/kv/a", &[], b"2").await;
    assert_eq!(r.status, 500);
    assert!(r.text().contains("disk full"), "{}", r.text());
    let r = request(
        addr,
        "PUT",
        "/v1/agent/service/register",
        &[],
        br#"{"Name":"x"}"#,
    )
    .await;
    assert_eq!(r.status, 500);
    assert_eq!(reg.index(), before);
    fail.store(false, std::sync::atomic::Ordering::SeqCst);
    let v = request(addr, "GET", "/v1/kv/a", &[], b"").await.json();
    assert_eq!(v[0]["Value"], "MQ==");
    assert_eq!(
        request(addr, "GET", "/v1/agent/services", &[], b"")
            .await
            .json(),
        json!({})
    );
    let _ = tx.send(());
    task.await.unwrap();
    reg.stop();
}
