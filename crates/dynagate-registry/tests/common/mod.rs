//! Test helpers: a temporary data dir, the real registry server on 127.0.0.1:0, and a raw
//! HTTP client that shows the bytes as they went over the wire.
#![allow(dead_code)]

use dynagate_registry::{Registry, RegistryOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).unwrap();
        let name: String = b.iter().map(|x| format!("{x:02x}")).collect();
        let p = std::env::temp_dir().join(format!("dynagate-registry-{tag}-{name}"));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
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

pub struct Server {
    pub reg: Arc<Registry>,
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    pub dir: Option<TempDir>,
}

impl Server {
    pub async fn start(opts: RegistryOptions) -> Server {
        let dir = TempDir::new("srv");
        let mut s = Server::start_in(dir.path(), opts).await;
        s.dir = Some(dir);
        s
    }

    pub async fn start_in(path: &Path, opts: RegistryOptions) -> Server {
        let reg = Registry::open(path, opts).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let r = reg.clone();
        let task = tokio::spawn(async move {
            r.serve(listener, async move {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Server {
            reg,
            addr,
            stop: Some(tx),
            task: Some(task),
            dir: None,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving and background tasks; the registry can then be reopened.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        self.reg.stop();
    }

    pub async fn get(&self, path: &str) -> Resp {
        request(self.addr, "GET", path, &[], b"").await
    }
    pub async fn put(&self, path: &str, body: &str) -> Resp {
        request(self.addr, "PUT", path, &[], body.as_bytes()).await
    }
    pub async fn delete(&self, path: &str) -> Resp {
        request(self.addr, "DELETE", path, &[], b"").await
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status_line: String,
    pub status: u16,
    /// Header names as sent, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Everything before the body.
    pub head: String,
}

impl Resp {
    /// Header value by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn index(&self) -> u64 {
        self.header("X-Consul-Index")
            .expect("X-Consul-Index")
            .parse()
            .unwrap()
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?} {}", self.status_line, self.text()))
    }
}

/// One HTTP/1.1 request with `Connection: close`; reads the response to EOF.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    raw_exchange(addr, &bytes, Duration::from_secs(30)).await
}

/// Sends raw bytes, reads to EOF (the server must close), and parses the response.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> Resp {
    let raw = raw_bytes(addr, bytes, timeout).await;
    parse_response(&raw)
}

pub async fn raw_bytes(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(timeout, s.read_to_end(&mut raw))
        .await
        .expect("server did not close the connection in time")
        .unwrap();
    raw
}

pub fn parse_response(raw: &[u8]) -> Resp {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap().to_string();
    let status: u16 = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.to_string(), v.trim().to_string())
        })
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Resp {
        status_line,
        status,
        headers,
        body,
        head,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(nl) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(std::str::from_utf8(&b[..nl]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + size]);
        b = &b[nl + 2 + size + 2..];
    }
}

/// Polls `f` until it returns true or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A tiny HTTP server answering every request with `status` (changeable at runtime).
pub struct Backend {
    pub addr: SocketAddr,
    pub status: Arc<std::sync::atomic::AtomicU16>,
}

pub async fn backend(status: u16) -> Backend {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let st = Arc::new(std::sync::atomic::AtomicU16::new(status));
    let st2 = st.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let code = st2.load(std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                if code == 0 {
                    // hang
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    return;
                }
                let resp = format!(
                    "HTTP/1.1 {code} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    Backend { addr, status: st }
}
