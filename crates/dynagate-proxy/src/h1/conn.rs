//! One client connection on the HTTP/1 path: wait for bytes (holding no buffer), read
//! a head, serve it, repeat; or hand the connection to hyper when it opens with the
//! HTTP/2 preface.

use super::head::{write_simple, HeadError, Parsed, RequestHead};
use super::io::{read_more, Replay};
use super::{exchange, Shared};
use crate::proxy::{handle, Client};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// First read of a head; grows (doubling) up to the configured limit.
const HEAD_BUF: usize = 2048;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How long a connection closed after an error keeps reading (and discarding) what the
/// client still sends, so the error response is not lost to a reset.
const LINGER: Duration = Duration::from_secs(2);

pub struct ClientConn {
    pub stream: TcpStream,
    /// The client's address (its port is of no use to the proxy; 15 bytes less per idle
    /// connection).
    pub peer: IpAddr,
    /// Bytes read and not yet used; empty (and unallocated) while the connection idles.
    pub buf: Vec<u8>,
    /// How much of `buf` is used.
    pub pos: usize,
}

/// What happens to the connection after one exchange.
pub enum Next {
    KeepAlive,
    Close,
    /// Close after an error, reading what the client still sends for a moment.
    Linger,
    Http2,
}

/// Serves one client connection until it closes (the task's whole state: a few
/// hundred bytes while idle).
pub fn serve(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) -> Connection {
    shared.drain.live_enter();
    Connection {
        conn: Some(ClientConn {
            stream,
            peer: peer.ip(),
            buf: Vec::new(),
            pos: 0,
        }),
        shared,
        state: State::Next,
        first: true,
    }
}

/// A client connection as a hand-written future, so that what an idle connection keeps
/// is exactly this struct: the request being served lives in a box that exists only
/// while it is served, and the idle wait holds neither a timer nor a waiter node (the
/// socket keeps its reader's waker, the worker's idle list the deadline; see `Drain`).
pub struct Connection {
    /// Here between requests; inside the serving future during one.
    conn: Option<ClientConn>,
    shared: Arc<Shared>,
    state: State,
    first: bool,
}

type Serving = Pin<Box<dyn Future<Output = Option<ClientConn>> + Send>>;

enum State {
    /// About to wait for, or to read, the next request.
    Next,
    Waiting {
        slot: u32,
        deadline: Instant,
    },
    Serving(Serving),
}

impl Connection {
    fn start_serving(&mut self, deadline: Instant) {
        if let Some(conn) = self.conn.take() {
            let first = std::mem::replace(&mut self.first, false);
            self.state = State::Serving(Box::pin(serve_one(
                conn,
                self.shared.clone(),
                deadline,
                first,
            )));
        }
    }
}

impl Future for Connection {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Next => {
                    let Some(conn) = this.conn.as_mut() else {
                        return Poll::Ready(());
                    };
                    let deadline = Instant::now() + this.shared.options.header_read_timeout;
                    if conn.pos < conn.buf.len() {
                        // A pipelined request is already here.
                        this.start_serving(deadline);
                        continue;
                    }
                    conn.buf = Vec::new();
                    conn.pos = 0;
                    match this.shared.drain.idle_enter(deadline) {
                        Some(slot) => this.state = State::Waiting { slot, deadline },
                        None => return Poll::Ready(()),
                    }
                }
                State::Waiting { slot, deadline } => {
                    let (slot, deadline) = (*slot, *deadline);
                    let Some(conn) = this.conn.as_ref() else {
                        return Poll::Ready(());
                    };
                    if conn.stream.poll_read_ready(cx).is_ready() {
                        this.shared.drain.idle_leave(slot);
                        this.state = State::Next;
                        this.start_serving(deadline);
                        continue;
                    }
                    match this.shared.drain.idle_poll(slot, cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(_) => {
                            // Idle timeout or shutdown: close.
                            this.shared.drain.idle_leave(slot);
                            this.state = State::Next;
                            this.conn = None;
                            return Poll::Ready(());
                        }
                    }
                }
                State::Serving(fut) => match fut.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(conn) => {
                        this.state = State::Next;
                        if this.shared.drain.closing() {
                            return Poll::Ready(());
                        }
                        this.conn = conn;
                    }
                },
            }
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let State::Waiting { slot, .. } = self.state {
            self.shared.drain.idle_leave(slot);
        }
        self.shared.drain.live_leave();
    }
}

/// One request (or the switch to HTTP/2, or a tunnel); gives the connection back when
/// it stays open.
async fn serve_one(
    mut conn: ClientConn,
    shared: Arc<Shared>,
    deadline: Instant,
    first: bool,
) -> Option<ClientConn> {
    match one(&mut conn, &shared, deadline, first).await {
        Next::KeepAlive => Some(conn),
        Next::Close => None,
        Next::Linger => {
            linger(conn.stream).await;
            None
        }
        Next::Http2 => {
            serve_h2(conn, &shared).await;
            None
        }
    }
}

/// Reads one head and serves it.
async fn one(conn: &mut ClientConn, shared: &Shared, deadline: Instant, first: bool) -> Next {
    if conn.pos > 0 {
        conn.buf.drain(..conn.pos);
        conn.pos = 0;
    }
    let limits = &shared.options;
    loop {
        if first && !conn.buf.is_empty() {
            let n = conn.buf.len().min(H2_PREFACE.len());
            if conn.buf[..n] == H2_PREFACE[..n] {
                if n == H2_PREFACE.len() {
                    return Next::Http2;
                }
            } else if let Some(next) = parse_and_serve(conn, shared).await {
                return next;
            }
        } else if !conn.buf.is_empty() {
            if let Some(next) = parse_and_serve(conn, shared).await {
                return next;
            }
        }
        if conn.buf.len() >= limits.max_header_bytes {
            shared
                .worker
                .counters
                .bad_request
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return error(conn, 431, "dynagate: request header too large").await;
        }
        let room = HEAD_BUF.max(conn.buf.len());
        let left = deadline.saturating_duration_since(Instant::now());
        match read_more(&mut conn.stream, &mut conn.buf, room, left).await {
            Ok(0) | Err(_) => return Next::Close,
            Ok(_) => {}
        }
    }
}

/// `None` when the head is not complete yet.
async fn parse_and_serve(conn: &mut ClientConn, shared: &Shared) -> Option<Next> {
    match RequestHead::parse(&conn.buf, shared.options.max_headers) {
        Ok(Parsed::Complete(head)) => {
            let next = exchange::proxy(conn, shared, head).await;
            // A kept connection goes on after the request it answered; anything else
            // would answer the same bytes again, forever. (A body read from the socket
            // leaves `buf` holding only what came after it, from `pos` on.)
            if matches!(next, Next::KeepAlive) && conn.pos == 0 && !conn.buf.is_empty() {
                debug_assert!(false, "request answered without being consumed");
                return Some(Next::Close);
            }
            Some(next)
        }
        Ok(Parsed::Partial) => None,
        Err(e) => {
            shared
                .worker
                .counters
                .bad_request
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Some(match e {
                HeadError::TooManyHeaders => {
                    error(conn, 431, "dynagate: too many request header fields").await
                }
                HeadError::Invalid(why) => {
                    error(conn, 400, &format!("dynagate: bad request: {why}")).await
                }
            })
        }
    }
}

/// Writes an error response and closes the connection.
async fn error(conn: &mut ClientConn, status: u16, message: &str) -> Next {
    let mut out = Vec::with_capacity(160 + message.len());
    write_simple(&mut out, status, message, true);
    let _ = conn.stream.write_all(&out).await;
    Next::Linger
}

/// Half-closes, then discards what the client still sends until it closes or `LINGER`.
async fn linger(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// An HTTP/2 (prior knowledge) connection, served by hyper with the bytes already read
/// replayed first. Shutdown asks it to finish gracefully (GOAWAY).
async fn serve_h2(conn: ClientConn, shared: &Shared) {
    let worker = shared.worker.clone();
    let client = Arc::new(Client::new(SocketAddr::new(conn.peer, 0)));
    let service = service_fn(move |req| {
        let worker = worker.clone();
        let client = client.clone();
        async move { Ok::<_, Infallible>(handle(&worker, &client, req).await) }
    });
    let io = Replay {
        read: conn.buf,
        pos: conn.pos,
        stream: conn.stream,
    };
    let served = shared.h2.serve_connection(TokioIo::new(io), service);
    tokio::pin!(served);
    let closing = shared.drain.notify.notified();
    tokio::pin!(closing);
    closing.as_mut().enable();
    if shared.drain.closing() {
        served.as_mut().graceful_shutdown();
    }
    tokio::select! {
        _ = served.as_mut() => return,
        _ = closing => served.as_mut().graceful_shutdown(),
    }
    let _ = served.await;
}

#[cfg(test)]
mod tests {
    /// What an idle connection costs is mostly this struct (inside tokio's task cell,
    /// which is 128-byte aligned): keep it small.
    #[test]
    fn idle_connection_state_stays_small() {
        let size = std::mem::size_of::<super::Connection>();
        assert!(size <= 160, "Connection is {size} bytes");
    }
}
