//! A real admin server on 127.0.0.1:0 over a `Controller` and a `SqliteStore` in a
//! temporary directory, called over real HTTP.

#![allow(dead_code)]

use dynagate_admin::client::{Client, Reply};
use dynagate_proxy::Controller;
use dynagate_store::SqliteStore;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const TOKEN: &str = "test-token-5f1c0e9a7b3d2c4e";

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "dynagate-admin-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn open_controller(dir: &Path) -> Arc<Controller> {
    let store = SqliteStore::open(&dir.join("dynagate.db"), 1000).unwrap();
    Arc::new(Controller::open(Arc::new(store)).unwrap())
}

pub struct Harness {
    pub addr: SocketAddr,
    pub controller: Arc<Controller>,
    pub client: Client,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
    pub dir: TempDir,
}

/// The state as the API shows it: upstreams (with live counters), routes, and the
/// revision in force.
#[derive(Debug, PartialEq)]
pub struct State {
    pub upstreams: String,
    pub routes: String,
    pub revision: u64,
}

impl Harness {
    pub async fn start() -> Harness {
        Self::start_in(TempDir::new()).await
    }

    pub async fn start_in(dir: TempDir) -> Harness {
        Self::start_with(dir, false).await
    }

    /// A server whose `/metrics` needs no token when `metrics_open`.
    pub async fn start_with(dir: TempDir, metrics_open: bool) -> Harness {
        let controller = open_controller(&dir.0);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(dynagate_admin::serve(
            listener,
            controller.clone(),
            dynagate_admin::AdminOptions {
                token: TOKEN.to_string(),
                metrics_open,
                registry: None,
            },
            async {
                let _ = rx.await;
            },
        ));
        let client = Client::new(&addr.to_string(), TOKEN).unwrap();
        Harness {
            addr,
            controller,
            client,
            stop: Some(tx),
            server: Some(server),
            dir,
        }
    }

    /// Signals shutdown and waits for `serve` to return; gives the directory back.
    pub async fn stop(mut self) -> TempDir {
        self.signal_stop();
        let server = self.server.take().unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), server)
            .await
            .expect("serve returns after shutdown")
            .unwrap();
        let dir = TempDir(std::mem::take(&mut self.dir.0));
        std::mem::forget(self);
        dir
    }

    pub fn signal_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    pub fn take_server(&mut self) -> JoinHandle<()> {
        self.server.take().unwrap()
    }

    pub async fn call(&self, method: &str, path: &str, body: Option<&str>) -> Reply {
        self.client
            .send(method, path, body.map(str::as_bytes))
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// Calls and returns (status, body as JSON).
    pub async fn json(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let reply = self.call(method, path, body).await;
        let value = reply
            .json()
            .unwrap_or_else(|e| panic!("{method} {path}: {e}: {}", reply.text()));
        (reply.status, value)
    }

    /// A write that must succeed; returns its revision.
    pub async fn ok(&self, method: &str, path: &str, body: Option<&str>) -> Value {
        let (status, value) = self.json(method, path, body).await;
        assert_eq!(status, 200, "{method} {path}: {value}");
        value
    }

    pub async fn state(&self) -> State {
        let upstreams = self.call("GET", "/v1/upstreams", None).await;
        assert_eq!(upstreams.status, 200);
        let routes = self.call("GET", "/v1/routes", None).await;
        assert_eq!(routes.status, 200);
        let (status, revs) = self.json("GET", "/v1/revisions?limit=1", None).await;
        assert_eq!(status, 200);
        let revision = revs[0]["number"].as_u64().unwrap_or(0);
        assert_eq!(
            revision,
            self.controller.revision(),
            "API and controller disagree"
        );
        State {
            upstreams: upstreams.text(),
            routes: routes.text(),
            revision,
        }
    }

    /// Sends raw bytes on a fresh connection and returns everything the server answers
    /// until it closes.
    pub async fn raw(&self, request: &[u8]) -> String {
        let mut stream = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut out = Vec::new();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            stream.read_to_end(&mut out),
        );
        let _ = read.await.expect("server answers and closes");
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.signal_stop();
    }
}

/// A typical upstream body.
pub fn upstream_body(addresses: &[&str]) -> String {
    let servers: Vec<Value> = addresses
        .iter()
        .map(|a| serde_json::json!({ "address": a, "weight": 1 }))
        .collect();
    serde_json::json!({ "servers": servers, "balance": "round_robin", "retries": 2 }).to_string()
}
