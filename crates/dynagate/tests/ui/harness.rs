//! What the dashboard test needs from tests/e2e/harness.rs: the `dynagate` binary as a
//! child process, backends on ephemeral loopback ports, and a plain HTTP client.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;

pub type BoxBody =
    http_body_util::combinators::BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

pub fn full(b: impl Into<Bytes>) -> BoxBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

/// A fresh directory, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "dynagate-ui-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Gateway {
    child: Option<Child>,
    pub data_dir: PathBuf,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    /// The service registry (Consul HTTP API).
    pub registry: SocketAddr,
    pub token: String,
    pub client: Client<hyper_util::client::legacy::connect::HttpConnector, BoxBody>,
}

impl Gateway {
    pub async fn start(data_dir: &Path) -> Gateway {
        let run_file = data_dir.join("run.json");
        let log = std::fs::File::create(data_dir.join("gateway.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_dynagate"))
            .arg("run")
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--registry-listen", "127.0.0.1:0"])
            .args(["--workers", "2"])
            .arg("--data-dir")
            .arg(data_dir)
            .env_remove("DYNAGATE_ADMIN_TOKEN")
            .env("DYNAGATE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start dynagate");
        let mut child = child;
        let pid = child.id();
        let mut addrs = None;
        // Generous: a debug build on a busy 2-core machine.
        for _ in 0..1000 {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "dynagate exited at start ({status}); log:\n{}",
                    std::fs::read_to_string(data_dir.join("gateway.log")).unwrap_or_default()
                );
            }
            if let Ok(text) = std::fs::read_to_string(&run_file) {
                if let Ok(v) = serde_json::from_str::<Value>(&text) {
                    if v["pid"].as_u64() == Some(pid as u64) {
                        addrs = Some((
                            v["proxy"].as_str().unwrap().parse().unwrap(),
                            v["admin"].as_str().unwrap().parse().unwrap(),
                            v["registry"].as_str().unwrap().parse().unwrap(),
                        ));
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut gw = Gateway {
            child: Some(child),
            data_dir: data_dir.to_path_buf(),
            proxy: "0.0.0.0:0".parse().unwrap(),
            admin: "0.0.0.0:0".parse().unwrap(),
            registry: "0.0.0.0:0".parse().unwrap(),
            token: String::new(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        };
        // On a panic here, dropping `gw` prints the log and kills the process.
        let (proxy, admin, registry) =
            addrs.unwrap_or_else(|| panic!("dynagate did not start within 20 s"));
        gw.proxy = proxy;
        gw.admin = admin;
        gw.registry = registry;
        gw.token = std::fs::read_to_string(data_dir.join("admin.token"))
            .unwrap()
            .trim()
            .to_string();
        gw
    }

    /// An admin call with the token; returns the status and the body as JSON (or a
    /// string when it is not JSON).
    pub async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let req = Request::builder()
            .method(method)
            .uri(format!("http://{}{}", self.admin, path))
            .header("authorization", format!("Bearer {}", self.token))
            .body(full(body.map(|b| b.to_string()).unwrap_or_default()))
            .unwrap();
        let resp = self.client.request(req).await.expect("admin call");
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, value)
    }

    /// An admin call that must succeed.
    pub async fn ok(&self, method: &str, path: &str, body: Value) -> Value {
        let (status, v) = self.admin(method, path, Some(body)).await;
        assert!(
            (200..300).contains(&status),
            "{method} {path} -> {status} {v}"
        );
        v
    }

    /// GET through the proxy; returns the status and the answering backend's name.
    pub async fn get(&self, path: &str) -> (u16, String) {
        let req = Request::get(format!("http://{}{}", self.proxy, path))
            .header("host", "dashboard.test")
            .body(full(""))
            .unwrap();
        let resp = self.client.request(req).await.expect("proxy request");
        let status = resp.status().as_u16();
        let backend = resp
            .headers()
            .get("x-backend")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let _ = resp.into_body().collect().await;
        (status, backend)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("gateway.log")).unwrap_or_default()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- gateway log ---\n{}", self.log());
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A backend HTTP server answering every request with its name (and `x-backend`).
pub struct Backend {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let name_owned = name.to_string();
        let task = tokio::spawn(async move {
            // Connections live in this set: aborting the task cuts them all.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let name = name_owned.clone();
                conns.spawn(async move {
                    let service = service_fn(move |req| {
                        let name = name.clone();
                        async move { Ok::<_, std::convert::Infallible>(answer(&name, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Backend { addr, task }
    }

    /// Stops listening and cuts every open connection, like a crashed process.
    pub async fn kill(&self) {
        self.task.abort();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Answers with the backend's name, after `?ms=N` milliseconds if asked (so latencies
/// differ between requests).
async fn answer(name: &str, req: Request<Incoming>) -> Response<BoxBody> {
    let ms: u64 = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("ms="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let mut resp = Response::new(full(name.to_string()));
    resp.headers_mut()
        .insert("x-backend", name.parse().unwrap());
    resp
}
