//! Real servers for end-to-end tests: the `dynagate` binary as a child process, backend
//! HTTP servers on ephemeral loopback ports, and a plain HTTP client.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

pub type BoxBody =
    http_body_util::combinators::BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

pub fn full(b: impl Into<Bytes>) -> BoxBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

/// A fresh data directory, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "dynagate-e2e-{tag}-{}-{}",
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

/// How [`Gateway::launch`] starts the gateway; the default is [`Gateway::start`]'s.
#[derive(Default)]
pub struct Launch<'a> {
    /// More arguments for `dynagate run`.
    pub extra: &'a [&'a str],
    /// Where its log goes [default: `<data-dir>/gateway.log`].
    pub log: Option<PathBuf>,
    /// Fixed listeners (proxy, admin, registry) instead of ephemeral ports; readiness is
    /// then told by the listeners, not by run.json (which a full disk may not get).
    pub ports: Option<(SocketAddr, SocketAddr, SocketAddr)>,
    /// The process's umask.
    pub umask: Option<u32>,
}

pub struct Gateway {
    child: Option<Child>,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    /// The service registry (Consul HTTP API), when enabled.
    pub registry: Option<SocketAddr>,
    pub token: String,
    pub client: Client<hyper_util::client::legacy::connect::HttpConnector, BoxBody>,
}

impl Gateway {
    pub async fn start(data_dir: &Path) -> Gateway {
        Self::start_with(data_dir, &[]).await
    }

    pub async fn start_with(data_dir: &Path, extra: &[&str]) -> Gateway {
        Self::launch(
            data_dir,
            Launch {
                extra,
                ..Launch::default()
            },
        )
        .await
    }

    /// Starts the gateway as `launch` says.
    pub async fn launch(data_dir: &Path, launch: Launch<'_>) -> Gateway {
        let extra = launch.extra;
        let run_file = data_dir.join("run.json");
        if launch.ports.is_none() {
            let _ = std::fs::remove_file(&run_file);
        }
        let log_path = launch
            .log
            .clone()
            .unwrap_or_else(|| data_dir.join("gateway.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let listen = |addr: Option<SocketAddr>| {
            addr.map_or_else(|| "127.0.0.1:0".to_string(), |a| a.to_string())
        };
        let (proxy, admin, registry) = match launch.ports {
            Some((p, a, r)) => (Some(p), Some(a), Some(r)),
            None => (None, None, None),
        };
        let mut command = match launch.umask {
            // The shell sets the umask and becomes the gateway (same pid).
            Some(mask) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("umask {mask:03o}; exec \"$0\" \"$@\""))
                    .arg(env!("CARGO_BIN_EXE_dynagate"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_dynagate")),
        };
        let child = command
            .arg("run")
            .arg("--listen")
            .arg(listen(proxy))
            .arg("--admin-listen")
            .arg(listen(admin))
            .arg("--registry-listen")
            .arg(listen(registry))
            .args(if extra.contains(&"--workers") {
                &[][..]
            } else {
                &["--workers", "2"][..]
            })
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env_remove("DYNAGATE_ADMIN_TOKEN")
            .env("DYNAGATE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start dynagate");
        let pid = child.id();
        let mut child = Some(child);
        let mut gw = None;
        for _ in 0..500 {
            match launch.ports {
                // Ready when every listener accepts (run.json may not be written).
                Some((p, a, r)) => {
                    let mut all = true;
                    for addr in [p, a, r] {
                        all &= tokio::net::TcpStream::connect(addr).await.is_ok();
                    }
                    if all {
                        gw = Some((p, a, Some(r)));
                        break;
                    }
                    if let Some(status) = child.as_mut().unwrap().try_wait().unwrap() {
                        panic!(
                            "dynagate exited ({status}); log:\n{}",
                            std::fs::read_to_string(&log_path).unwrap_or_default()
                        );
                    }
                }
                None => {
                    if let Ok(text) = std::fs::read_to_string(&run_file) {
                        if let Ok(v) = serde_json::from_str::<Value>(&text) {
                            if v["pid"].as_u64() == Some(pid as u64) {
                                gw = Some((
                                    v["proxy"].as_str().unwrap().parse().unwrap(),
                                    v["admin"].as_str().unwrap().parse().unwrap(),
                                    v["registry"].as_str().map(|r| r.parse().unwrap()),
                                ));
                                break;
                            }
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (proxy, admin, registry) = gw.unwrap_or_else(|| {
            panic!(
                "dynagate did not start; log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            )
        });
        let token = std::fs::read_to_string(data_dir.join("admin.token"))
            .unwrap()
            .trim()
            .to_string();
        Gateway {
            child,
            data_dir: data_dir.to_path_buf(),
            log_path,
            proxy,
            admin,
            registry,
            token,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// An admin call; returns the status and the body (JSON if it parses, else a string).
    pub async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.admin_raw(method, path, body.map(|b| b.to_string()), Some(&self.token))
            .await
    }

    pub async fn admin_raw(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
        token: Option<&str>,
    ) -> (u16, Value) {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{}", self.admin, path));
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req.body(full(body.unwrap_or_default())).unwrap();
        let resp = self.client.request(req).await.expect("admin call");
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, value)
    }

    /// Asserts an admin call succeeded.
    pub async fn ok(&self, method: &str, path: &str, body: Value) -> Value {
        let (status, v) = self.admin(method, path, Some(body)).await;
        assert!(
            (200..300).contains(&status),
            "{method} {path} -> {status} {v}"
        );
        v
    }

    pub async fn put_upstream(&self, name: &str, servers: &[&Backend]) {
        let servers: Vec<Value> = servers
            .iter()
            .map(|b| serde_json::json!({"address": b.addr.to_string()}))
            .collect();
        self.ok(
            "PUT",
            &format!("/v1/upstreams/{name}"),
            serde_json::json!({"servers": servers}),
        )
        .await;
    }

    pub async fn put_route(&self, id: &str, hosts: &[&str], prefix: &str, upstream: &str) {
        self.ok(
            "PUT",
            &format!("/v1/routes/{id}"),
            serde_json::json!({"hosts": hosts, "path_prefix": prefix, "upstream": upstream}),
        )
        .await;
    }

    /// A Consul HTTP API call to the embedded registry.
    pub async fn consul(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let req = Request::builder()
            .method(method)
            .uri(format!(
                "http://{}{}",
                self.registry.expect("registry enabled"),
                path
            ))
            .body(full(body.map(|b| b.to_string()).unwrap_or_default()))
            .unwrap();
        let resp = self.client.request(req).await.expect("registry call");
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, value)
    }

    /// GET through the proxy; returns status, the answering backend's name, and the body.
    pub async fn get(&self, host: &str, path: &str) -> (u16, String, String) {
        let req = Request::get(format!("http://{}{}", self.proxy, path))
            .header("host", host)
            .body(full(""))
            .unwrap();
        let resp = self.client.request(req).await.expect("proxy request");
        let status = resp.status().as_u16();
        let backend = resp
            .headers()
            .get("x-backend")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, backend, String::from_utf8_lossy(&body).into_owned())
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn sigterm(&self) {
        let pid = self.pid().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(status.success());
    }

    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("dynagate did not exit within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Peak resident memory of the gateway process, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- gateway log ({}) ---\n{}",
                self.data_dir.display(),
                self.log()
            );
        }
        self.kill9();
    }
}

/// A backend HTTP server. Every response carries `x-backend: <name>`.
/// - `/slow?ms=N` answers after N ms
/// - `/upload` reads the body, answers its length, and tells how it was framed
///   (`x-content-length`, `x-transfer-encoding`: the value, or `none`)
/// - `/download?bytes=N` streams N bytes
/// - `/ws` accepts a WebSocket and echoes messages
/// - anything else answers with the name
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    /// TCP connections accepted.
    pub conns: Arc<AtomicU64>,
    /// Behaviour of the default path: answer with this status (0 = 200) after this delay.
    pub behaviour: Arc<Behaviour>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
pub struct Behaviour {
    pub status: std::sync::atomic::AtomicU16,
    pub delay_ms: AtomicU64,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(name, listener)
    }

    /// Restarts a killed backend on the same address.
    pub async fn restart(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        let mut again = Self::serve(&self.name, listener);
        again.behaviour = self.behaviour.clone();
        self.task.abort();
        *self = again;
    }

    fn serve(name: &str, listener: TcpListener) -> Backend {
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let conns = Arc::new(AtomicU64::new(0));
        let conns2 = conns.clone();
        let behaviour = Arc::new(Behaviour::default());
        let behaviour2 = behaviour.clone();
        let name_owned = name.to_string();
        let hits2 = hits.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                conns2.fetch_add(1, Ordering::Relaxed);
                let name = name_owned.clone();
                let hits = hits2.clone();
                let behaviour = behaviour2.clone();
                conns.spawn(async move {
                    let service = service_fn(move |req| {
                        let name = name.clone();
                        let behaviour = behaviour.clone();
                        hits.fetch_add(1, Ordering::Relaxed);
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                backend_answer(&name, &behaviour, req).await,
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Backend {
            name: name.to_string(),
            addr,
            hits,
            conns,
            behaviour,
            task,
        }
    }

    /// Stops listening and cuts every open connection, like a crashed process.
    pub async fn kill(&self) {
        self.task.abort();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn query_u64(req: &Request<Incoming>, key: &str) -> u64 {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn backend_answer(
    name: &str,
    behaviour: &Behaviour,
    mut req: Request<Incoming>,
) -> Response<BoxBody> {
    let path = req.uri().path().to_string();
    let mut resp = match path.as_str() {
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(query_u64(&req, "ms"))).await;
            Response::new(full(name.to_string()))
        }
        "/upload" => {
            let framing = |name: &str| {
                req.headers()
                    .get(name)
                    .map(|v| v.to_str().unwrap_or("?").to_string())
                    .unwrap_or_else(|| "none".into())
            };
            let (length, coding) = (framing("content-length"), framing("transfer-encoding"));
            let mut body = req.into_body();
            let mut total: u64 = 0;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            total += d.len() as u64;
                        }
                    }
                    Err(_) => break,
                }
            }
            let mut r = Response::new(full(total.to_string()));
            r.headers_mut()
                .insert("x-content-length", length.parse().unwrap());
            r.headers_mut()
                .insert("x-transfer-encoding", coding.parse().unwrap());
            r
        }
        "/download" => {
            let n = query_u64(&req, "bytes");
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let stream = futures_util::stream::unfold(n, move |left| {
                let chunk = chunk.clone();
                async move {
                    if left == 0 {
                        return None;
                    }
                    let take = left.min(chunk.len() as u64);
                    Some((
                        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(
                            chunk.slice(..take as usize),
                        )),
                        left - take,
                    ))
                }
            });
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            r.headers_mut().insert("content-length", n.into());
            r
        }
        "/ws" => {
            let key = req.headers().get("sec-websocket-key").cloned();
            let Some(key) = key else {
                return Response::builder()
                    .status(400)
                    .body(full("not a websocket"))
                    .unwrap();
            };
            let accept =
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(upgraded) = on_upgrade.await {
                    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                        TokioIo::new(upgraded),
                        tokio_tungstenite::tungstenite::protocol::Role::Server,
                        None,
                    )
                    .await;
                    while let Some(Ok(msg)) = ws.next().await {
                        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                            break;
                        }
                    }
                }
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-accept", accept)
                .body(full(""))
                .unwrap()
        }
        _ => {
            let delay = behaviour.delay_ms.load(Ordering::Relaxed);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            let mut r = Response::new(full(name.to_string()));
            let status = behaviour.status.load(Ordering::Relaxed);
            if status != 0 {
                *r.status_mut() = StatusCode::from_u16(status).unwrap();
            }
            r
        }
    };
    resp.headers_mut()
        .insert("x-backend", name.parse().unwrap());
    resp
}

/// An HTTP/2 prior-knowledge connection to `addr`. Its requests carry their URI's
/// authority as `:authority` (and their path as `:path`, byte for byte), whatever address
/// the connection went to: `http://h2.example/x` reaches the gateway under test.
pub async fn h2_connect(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<BoxBody> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

/// A server that accepts connections and never answers: a hung process.
pub async fn hung_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    (addr, task)
}

/// Polls `f` every 50 ms until it is true or `within` passes; returns whether it became true.
pub async fn eventually<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The live record of one server from `GET /v1/upstreams/{name}`.
pub async fn live(gw: &Gateway, upstream: &str, addr: SocketAddr) -> Value {
    let (_, up) = gw
        .admin("GET", &format!("/v1/upstreams/{upstream}"), None)
        .await;
    up["live"]
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .find(|s| s["address"] == addr.to_string())
        .cloned()
        .unwrap_or(Value::Null)
}
