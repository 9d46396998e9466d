//! Upstream keep-alive connections, one pool per worker thread, keyed by server address.
//! The pool is independent of configuration snapshots, so connections survive every
//! change that does not remove their server.

use crate::body::UpBody;
use crate::runtime::Target;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Idle connections older than this are closed rather than reused: most servers close
/// idle keep-alive connections after 60–75 s, and reusing one they are closing fails.
const IDLE_TIMEOUT: Duration = Duration::from_secs(50);

pub type Sender = SendRequest<UpBody>;

/// A pooled connection: the pool asks whether the other end closed it while idle.
pub trait Reusable {
    fn is_closed(&self) -> bool;
}

impl Reusable for Sender {
    fn is_closed(&self) -> bool {
        SendRequest::is_closed(self)
    }
}

struct Idle<T> {
    conn: T,
    since: Instant,
}

pub struct Pool<T = Sender> {
    // Only this worker's thread uses it; the lock is never contended.
    idle: Mutex<HashMap<Arc<str>, Vec<Idle<T>>>>,
}

impl<T> Default for Pool<T> {
    fn default() -> Self {
        Pool {
            idle: Mutex::new(HashMap::new()),
        }
    }
}

#[derive(Debug)]
pub enum ConnectError {
    Timeout,
    Io(std::io::Error),
    Handshake(hyper::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Timeout => write!(f, "connect timed out"),
            ConnectError::Io(e) => write!(f, "{e}"),
            ConnectError::Handshake(e) => write!(f, "handshake: {e}"),
        }
    }
}

impl<T: Reusable> Pool<T> {
    /// An idle connection to `key` that is still open, most recently used first.
    pub fn take(&self, key: &str) -> Option<T> {
        loop {
            let conn = {
                let mut idle = self.idle.lock();
                idle.get_mut(key)?.pop()?
            };
            if conn.conn.is_closed() || conn.since.elapsed() >= IDLE_TIMEOUT {
                continue;
            }
            return Some(conn.conn);
        }
    }

    /// Returns a connection after its response was read to the end.
    pub fn checkin(&self, key: &Arc<str>, conn: T, max_idle: usize) {
        if max_idle == 0 || conn.is_closed() {
            return;
        }
        let mut idle = self.idle.lock();
        let list = match idle.get_mut(key) {
            Some(list) => list,
            None => idle.entry(key.clone()).or_default(),
        };
        if list.len() >= max_idle {
            // Drop the oldest: it is the likeliest to be closed by the server.
            list.remove(0);
        }
        list.push(Idle {
            conn,
            since: Instant::now(),
        });
    }

    /// Closes connections idle for too long, including every connection to a server
    /// that was removed (nothing checks those out any more).
    pub fn sweep(&self) {
        let mut idle = self.idle.lock();
        idle.retain(|_, list| {
            list.retain(|c| !c.conn.is_closed() && c.since.elapsed() < IDLE_TIMEOUT);
            !list.is_empty()
        });
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().values().map(Vec::len).sum()
    }
}

impl Pool<Sender> {
    /// A ready idle hyper connection to `key`.
    pub async fn checkout(&self, key: &str) -> Option<Sender> {
        loop {
            let mut sender = self.take(key)?;
            if sender.is_ready() {
                return Some(sender);
            }
            // Returned a moment ago: its connection task has not marked it idle yet.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }
}

/// Opens a new HTTP/1.1 connection. `upgrades` keeps the connection usable for a
/// protocol switch (WebSocket) after a 101 answer.
pub async fn connect(
    target: &Target,
    timeout: Duration,
    upgrades: bool,
) -> Result<Sender, ConnectError> {
    let stream = connect_tcp(target, timeout).await?;
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(ConnectError::Handshake)?;
    if upgrades {
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
    } else {
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    Ok(sender)
}

/// A new TCP connection to `target` with Nagle off.
pub async fn connect_tcp(target: &Target, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let stream = tokio::time::timeout(timeout, async {
        match target {
            Target::Addr(addr) => TcpStream::connect(addr).await,
            Target::Name(name) => TcpStream::connect(&**name).await,
        }
    })
    .await
    .map_err(|_| ConnectError::Timeout)?
    .map_err(ConnectError::Io)?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}
