//! The registry's HTTP/1.x server.
//!
//! Written for the registry instead of using hyper because of blocking queries: a query
//! that has to wait parks its connection (see [`crate::blocking`]), and the answers to
//! thousands of parked queries of the same read are written by one loop, as one shared
//! buffer of status line, headers and body per HTTP variant. hyper answers each request
//! from its own connection task and encodes every response head itself; measured on
//! 5,000 watchers of one service that cost about twice the CPU per answer of the loop,
//! which is at the kernel's cost of the writes (docs/benchmarks.md, figure 8).
//!
//! The protocol as hyper served it for this API (tests/wire.rs pins the bytes):
//! - HTTP/1.1 keep-alive and pipelining; HTTP/1.0 answered with HTTP/1.0 and closed unless
//!   the request says `Connection: keep-alive`; `Connection: close` honoured and echoed.
//! - Request bodies by `Content-Length` or chunked (HTTP/1.1 only); `Expect: 100-continue`
//!   answered. Bodies over [`BODY_CAP`] are not read: the handler answers from the
//!   declared length (413) and the connection closes.
//! - Responses always carry `Content-Length` (never chunked) and `Date`; header names in
//!   Title-Case, in the order the handler set them; `HEAD` gets the head only (with the
//!   `Content-Length` and `Content-Encoding` a `GET` would get).
//! - Bodies are gzip-coded for requests whose `Accept-Encoding` takes gzip, as Consul's
//!   agent does ([`super::encoding`]): `Content-Encoding: gzip`, `Content-Length` of the
//!   coded body; `Vary: Accept-Encoding` on every answer whose body is large enough to be
//!   coded, whichever coding it got.
//! - A request head must be complete within 30 s of waiting for it (an idle keep-alive
//!   connection therefore closes after 30 s), be at most 64 KiB and have at most 100
//!   headers (else 431); a malformed one gets 400; both close the connection.
//! - While a query is parked the connection is still watched, so a client that goes
//!   away is noticed and its query dropped.

use super::{encoding, handle, Reply, Resp};
use crate::blocking::{Delivered, Waiter, Watch, WatcherGuard};
use crate::Registry;
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch, Semaphore};
use tokio::time::Instant;

/// How long shutdown waits for in-flight requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// A request head must be complete this long after the server started waiting for it.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request head.
const HEAD_LIMIT: usize = 64 * 1024;
const MAX_HEADERS: usize = 100;
/// Request bodies up to this size are read before the handler runs (the largest body an
/// endpoint accepts is 1 MiB; up to 8 MiB more are read so that a 413 reaches the client
/// instead of a reset). Larger declared bodies are not read at all.
pub(crate) const BODY_CAP: usize = 9 * 1024 * 1024;

/// A client connection. Shared with the fan-out, which writes parked queries' answers.
pub(crate) struct Conn {
    pub(crate) stream: TcpStream,
    /// Set by the fan-out when it took this connection's parked query.
    pub(crate) taken: AtomicBool,
}

/// What a response's head depends on besides the response itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Variant {
    http10: bool,
    connection: ConnectionHeader,
    head_only: bool,
    /// The request's `Accept-Encoding` takes gzip.
    gzip: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum ConnectionHeader {
    None,
    Close,
    KeepAlive,
}

impl Variant {
    fn new(version: Version, keep_alive: bool, head_only: bool, gzip: bool) -> Variant {
        let http10 = version == Version::HTTP_10;
        let connection = match (http10, keep_alive) {
            (true, true) => ConnectionHeader::KeepAlive,
            (true, false) => ConnectionHeader::None,
            (false, true) => ConnectionHeader::None,
            (false, false) => ConnectionHeader::Close,
        };
        Variant {
            http10,
            connection,
            head_only,
            gzip,
        }
    }

    /// Whether the answer may be gzip-coded for this request.
    pub(crate) fn gzip(&self) -> bool {
        self.gzip
    }
}

// ---------------------------------------------------------------- response bytes

/// Seconds since the epoch (what the `Date` header shows).
pub(crate) fn date_second() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn push_date(out: &mut Vec<u8>) {
    let secs = date_second();
    out.extend_from_slice(
        httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(secs)).as_bytes(),
    );
}

/// `x-consul-index` -> `X-Consul-Index`.
fn push_title_case(out: &mut Vec<u8>, name: &HeaderName) {
    let mut upper = true;
    for &b in name.as_str().as_bytes() {
        out.push(if upper { b.to_ascii_uppercase() } else { b });
        upper = b == b'-';
    }
}

/// The head of `resp` for a body of `body_len` bytes, gzip-coded when `coded`.
fn push_head(out: &mut Vec<u8>, resp: &Resp, v: Variant, coded: bool, body_len: usize) {
    let status = resp.status();
    if !v.http10 && status == StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(if v.http10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in resp.headers() {
        push_title_case(out, name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if encoding::eligible(resp.body().len()) {
        out.extend_from_slice(b"Vary: Accept-Encoding\r\n");
    }
    if coded {
        out.extend_from_slice(b"Content-Encoding: gzip\r\n");
    }
    match v.connection {
        ConnectionHeader::None => {}
        ConnectionHeader::Close => out.extend_from_slice(b"Connection: close\r\n"),
        ConnectionHeader::KeepAlive => out.extend_from_slice(b"Connection: keep-alive\r\n"),
    }
    out.extend_from_slice(b"Content-Length: ");
    out.extend_from_slice(body_len.to_string().as_bytes());
    out.extend_from_slice(b"\r\nDate: ");
    push_date(out);
    out.extend_from_slice(b"\r\n\r\n");
}

/// The gzip-coded body of `resp` for variant `v`: `None` when the request does not take
/// gzip, the handler coded the body itself, or the body is not worth coding.
pub(crate) fn coded_body(resp: &Resp, v: Variant) -> Option<Bytes> {
    if !v.gzip || resp.headers().contains_key(http::header::CONTENT_ENCODING) {
        return None;
    }
    encoding::gzip(resp.body())
}

/// The whole response (head and, unless `HEAD`, body) as one buffer; `coded` is the
/// gzip-coded body to send instead of `resp`'s (see [`coded_body`]).
pub(crate) fn wire(resp: &Resp, v: Variant, coded: Option<&[u8]>) -> Bytes {
    let body = coded.unwrap_or(&resp.body()[..]);
    let sent = if v.head_only { &[][..] } else { body };
    let mut out = Vec::with_capacity(256 + sent.len());
    push_head(&mut out, resp, v, coded.is_some(), body.len());
    out.extend_from_slice(sent);
    Bytes::from(out)
}

/// hyper's answer to a request it cannot parse: the status, no body, closed.
fn error_head(status: StatusCode) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
    out.extend_from_slice(b"\r\nConnection: close\r\nContent-Length: 0\r\nDate: ");
    push_date(&mut out);
    out.extend_from_slice(b"\r\n\r\n");
    out
}

// ---------------------------------------------------------------- socket helpers

async fn write_all(conn: &Conn, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match conn.stream.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => conn.stream.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes `head` then `body`, as one `writev` when the socket takes it.
async fn write_all2(conn: &Conn, head: &[u8], body: &[u8]) -> io::Result<()> {
    let mut done = 0;
    let total = head.len() + body.len();
    while done < total {
        let r = if done < head.len() {
            let iov = [io::IoSlice::new(&head[done..]), io::IoSlice::new(body)];
            conn.stream.try_write_vectored(&iov)
        } else {
            conn.stream.try_write(&body[done - head.len()..])
        };
        match r {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => conn.stream.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

thread_local! {
    /// Reads land here first, then only their bytes are kept: a request of a few hundred
    /// bytes costs a small allocation, not a 4 KiB buffer per connection and request.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; 64 * 1024]);
}

/// One non-blocking read appended to `buf` (0: end of stream).
fn try_fill(conn: &Conn, buf: &mut Vec<u8>) -> io::Result<usize> {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let n = conn.stream.try_read(&mut s[..])?;
        buf.extend_from_slice(&s[..n]);
        Ok(n)
    })
}

/// Reads more into `buf`: the number of bytes, 0 at end of stream.
async fn fill(conn: &Conn, buf: &mut Vec<u8>) -> io::Result<usize> {
    loop {
        match try_fill(conn, buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => conn.stream.readable().await?,
            Err(e) => return Err(e),
        }
    }
}

/// Closes the sending side so the client sees the end of the last response.
fn finish(conn: &Conn) {
    let _ = socket2::SockRef::from(&conn.stream).shutdown(std::net::Shutdown::Write);
}

// ---------------------------------------------------------------- request parsing

enum BodyKind {
    Empty,
    Length(u64),
    Chunked,
}

struct Head {
    method: Method,
    uri: http::Uri,
    version: Version,
    headers: HeaderMap,
    body: BodyKind,
    keep_alive: bool,
    expect_continue: bool,
}

/// Comma-separated tokens of a header value, trimmed and lowercased.
fn has_token(value: &HeaderValue, token: &str) -> bool {
    value
        .as_bytes()
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Parses a complete head; `Ok(None)` when more bytes are needed.
fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, StatusCode> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        }
        Err(_) => return Err(StatusCode::BAD_REQUEST),
    };
    let bad = StatusCode::BAD_REQUEST;
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes()).map_err(|_| bad)?;
    let uri: http::Uri = req.path.unwrap_or("").parse().map_err(|_| bad)?;
    let http11 = req.version == Some(1);
    let version = if http11 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let mut map = HeaderMap::with_capacity(req.headers.len());
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut close = false;
    let mut keep_alive_token = false;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| bad)?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| bad)?;
        match name {
            http::header::CONTENT_LENGTH => {
                let s = std::str::from_utf8(h.value).map_err(|_| bad)?.trim();
                if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad);
                }
                let n: u64 = s.parse().map_err(|_| bad)?;
                if content_length.is_some_and(|c| c != n) {
                    return Err(bad);
                }
                content_length = Some(n);
            }
            http::header::TRANSFER_ENCODING => {
                if !http11 {
                    return Err(bad);
                }
                // The last coding must be chunked.
                let last = h
                    .value
                    .split(|b| *b == b',')
                    .next_back()
                    .map(|t| t.trim_ascii())
                    .unwrap_or(b"");
                chunked = last.eq_ignore_ascii_case(b"chunked");
                if !chunked {
                    return Err(bad);
                }
            }
            http::header::CONNECTION => {
                if has_token(&value, "close") {
                    close = true;
                }
                if has_token(&value, "keep-alive") {
                    keep_alive_token = true;
                }
            }
            http::header::EXPECT => {
                expect_continue = h.value.eq_ignore_ascii_case(b"100-continue");
            }
            _ => {}
        }
        map.append(name, value);
    }
    let mut keep_alive = !close && (http11 || keep_alive_token);
    let body = if chunked {
        if content_length.is_some() {
            // Both framings: the chunked one counts and the connection is not reused.
            map.remove(http::header::CONTENT_LENGTH);
            keep_alive = false;
        }
        BodyKind::Chunked
    } else {
        match content_length {
            Some(n) if n > 0 => BodyKind::Length(n),
            _ => BodyKind::Empty,
        }
    };
    Ok(Some((
        Head {
            method,
            uri,
            version,
            headers: map,
            body,
            keep_alive,
            expect_continue,
        },
        len,
    )))
}

/// What [`parse_head`] made of a request head, for the fuzz target `registry_http1`
/// (fuzz/, cargo-fuzz). Not an API: reached only through [`crate::fuzzing`].
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FuzzHead {
    /// Bytes of the head.
    pub len: usize,
    pub http11: bool,
    /// `None`: no body; `Some(None)`: chunked; `Some(Some(n))`: `n` bytes.
    pub body: Option<Option<u64>>,
    pub keep_alive: bool,
    pub expect_continue: bool,
    pub headers: usize,
}

/// [`parse_head`] for the fuzz target: `Ok(None)` when more bytes are needed, `Err`
/// with the status the connection is refused with.
#[doc(hidden)]
pub fn fuzz_parse_head(buf: &[u8]) -> Result<Option<FuzzHead>, u16> {
    let (head, len) = match parse_head(buf) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => return Ok(None),
        Err(status) => return Err(status.as_u16()),
    };
    Ok(Some(FuzzHead {
        len,
        http11: head.version == Version::HTTP_11,
        body: match head.body {
            BodyKind::Empty => None,
            BodyKind::Chunked => Some(None),
            BodyKind::Length(n) => Some(Some(n)),
        },
        keep_alive: head.keep_alive,
        expect_continue: head.expect_continue,
        headers: head.headers.len(),
    }))
}

enum HeadOutcome {
    Head(Box<Head>),
    /// Closed, timed out, or shutting down before a request began.
    Gone,
    Refuse(StatusCode),
}

async fn read_head(
    conn: &Conn,
    buf: &mut Vec<u8>,
    shutdown: &mut watch::Receiver<bool>,
) -> HeadOutcome {
    let deadline = tokio::time::sleep(HEADER_READ_TIMEOUT);
    tokio::pin!(deadline);
    loop {
        if !buf.is_empty() {
            match parse_head(buf) {
                Ok(Some((head, len))) => {
                    buf.drain(..len);
                    return HeadOutcome::Head(Box::new(head));
                }
                Ok(None) if buf.len() >= HEAD_LIMIT => {
                    return HeadOutcome::Refuse(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
                }
                Ok(None) => {}
                Err(status) => return HeadOutcome::Refuse(status),
            }
        }
        let idle = buf.is_empty();
        tokio::select! {
            r = fill(conn, buf) => match r {
                Ok(0) | Err(_) => return HeadOutcome::Gone,
                Ok(_) => {}
            },
            _ = &mut deadline => return HeadOutcome::Gone,
            _ = shutdown.wait_for(|s| *s), if idle => return HeadOutcome::Gone,
        }
    }
}

enum BodyError {
    TooLarge,
    Bad,
    Io,
}

/// Takes `n` body bytes (from `buf`, then the socket).
async fn read_length(conn: &Conn, buf: &mut Vec<u8>, n: usize) -> Result<Bytes, BodyError> {
    while buf.len() < n {
        if buf.capacity() < n {
            buf.reserve(n - buf.len());
        }
        match fill(conn, buf).await {
            Ok(0) | Err(_) => return Err(BodyError::Io),
            Ok(_) => {}
        }
    }
    Ok(Bytes::from(buf.drain(..n).collect::<Vec<u8>>()))
}

/// A line ending in LF (CR optional) at the start of `buf`, without its end.
async fn read_line(conn: &Conn, buf: &mut Vec<u8>) -> Result<Vec<u8>, BodyError> {
    loop {
        if let Some(p) = buf.iter().position(|b| *b == b'\n') {
            let mut line: Vec<u8> = buf.drain(..=p).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(line);
        }
        if buf.len() > 4096 {
            return Err(BodyError::Bad);
        }
        match fill(conn, buf).await {
            Ok(0) | Err(_) => return Err(BodyError::Io),
            Ok(_) => {}
        }
    }
}

async fn read_chunked(conn: &Conn, buf: &mut Vec<u8>, cap: usize) -> Result<Bytes, BodyError> {
    let mut body = Vec::new();
    loop {
        let line = read_line(conn, buf).await?;
        let size = line
            .split(|b| *b == b';')
            .next()
            .unwrap_or(b"")
            .trim_ascii();
        let size = std::str::from_utf8(size)
            .ok()
            .and_then(|s| usize::from_str_radix(s, 16).ok())
            .ok_or(BodyError::Bad)?;
        if size == 0 {
            // Trailers, up to the empty line.
            while !read_line(conn, buf).await?.is_empty() {}
            return Ok(Bytes::from(body));
        }
        // `body` never exceeds `cap`; `body.len() + size` could overflow (`ffffffffffffffff`).
        if size > cap - body.len() {
            return Err(BodyError::TooLarge);
        }
        let chunk = read_length(conn, buf, size).await?;
        body.extend_from_slice(&chunk);
        if !read_line(conn, buf).await?.is_empty() {
            return Err(BodyError::Bad);
        }
    }
}

// ---------------------------------------------------------------- server

pub(crate) async fn serve(
    reg: Arc<Registry>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    reg.shutdown_tx.send_replace(false);
    let fanout = tokio::spawn(crate::blocking::run_fanout(reg.clone()));
    let max = reg.opts.max_connections;
    let conns = Arc::new(Semaphore::new(max));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = conns.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "registry accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let conn = Arc::new(Conn {
            stream,
            taken: AtomicBool::new(false),
        });
        let reg = reg.clone();
        tokio::spawn(async move {
            connection(reg, conn).await;
            drop(permit);
        });
    }
    drop(listener);
    // Blocking queries answer now; idle connections close; the others after their answer.
    reg.shutdown_tx.send_replace(true);
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, conns.acquire_many(all)).await;
    fanout.abort();
    Ok(())
}

async fn connection(reg: Arc<Registry>, conn: Arc<Conn>) {
    let mut buf: Vec<u8> = Vec::new();
    let mut shutdown = reg.shutdown_tx.subscribe();
    loop {
        let head = match read_head(&conn, &mut buf, &mut shutdown).await {
            HeadOutcome::Head(h) => *h,
            HeadOutcome::Gone => return,
            HeadOutcome::Refuse(status) => {
                let _ = write_all(&conn, &error_head(status)).await;
                finish(&conn);
                return;
            }
        };
        let mut keep_alive = head.keep_alive;
        let continue_first = head.expect_continue && head.version == Version::HTTP_11;
        let body = match head.body {
            BodyKind::Empty => Ok(Bytes::new()),
            BodyKind::Length(n) if n > BODY_CAP as u64 => {
                // Not read: the handler refuses it from the declared length.
                keep_alive = false;
                Ok(Bytes::new())
            }
            BodyKind::Length(n) => {
                if continue_first && (buf.len() as u64) < n {
                    let _ = write_all(&conn, b"HTTP/1.1 100 Continue\r\n\r\n").await;
                }
                read_length(&conn, &mut buf, n as usize).await
            }
            BodyKind::Chunked => {
                if continue_first && buf.is_empty() {
                    let _ = write_all(&conn, b"HTTP/1.1 100 Continue\r\n\r\n").await;
                }
                read_chunked(&conn, &mut buf, BODY_CAP).await
            }
        };
        let body = match body {
            Ok(b) => b,
            Err(BodyError::Io) => return,
            Err(BodyError::Bad) => {
                let _ = write_all(&conn, &error_head(StatusCode::BAD_REQUEST)).await;
                finish(&conn);
                return;
            }
            Err(BodyError::TooLarge) => {
                let _ = write_all(&conn, &error_head(StatusCode::PAYLOAD_TOO_LARGE)).await;
                finish(&conn);
                return;
            }
        };
        let head_only = head.method == Method::HEAD;
        let version = head.version;
        let gzip = encoding::accepts_gzip(&head.headers);
        let mut req = http::Request::new(http_body_util::Full::new(body));
        *req.method_mut() = head.method;
        *req.uri_mut() = head.uri;
        *req.version_mut() = version;
        *req.headers_mut() = head.headers;
        let reply = handle(reg.clone(), req).await;
        if *shutdown.borrow() {
            keep_alive = false;
        }
        let variant = Variant::new(version, keep_alive, head_only, gzip);
        let ok = match reply {
            Reply::Now(resp) => {
                let coded = coded_body(&resp, variant);
                let body = coded.as_ref().unwrap_or(resp.body());
                let mut h = Vec::with_capacity(256);
                push_head(&mut h, &resp, variant, coded.is_some(), body.len());
                let body = if head_only { &[][..] } else { &body[..] };
                write_all2(&conn, &h, body).await.is_ok()
            }
            Reply::Shared(p) => write_all(&conn, &reg.wire(&p, variant)).await.is_ok(),
            Reply::Wait(w) => park(&reg, &conn, w, variant, &mut buf, &mut shutdown).await,
        };
        if !ok || !keep_alive {
            finish(&conn);
            return;
        }
        if buf.is_empty() {
            // Idle connections keep no buffer.
            buf = Vec::new();
        }
    }
}

/// How a parked query ended.
enum Parked {
    Delivered(Delivered),
    /// Timed out, shutting down, or the fan-out went away: answer with what is current.
    AnswerNow,
    /// The client closed its connection.
    Gone,
}

/// Waits for a blocking query's answer; false when the connection is to be closed.
async fn park(
    reg: &Arc<Registry>,
    conn: &Arc<Conn>,
    w: Watch,
    variant: Variant,
    buf: &mut Vec<u8>,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let _watching = WatcherGuard::new(&reg.watchers);
    let key: Arc<str> = Arc::from(w.key);
    let (tx, mut rx) = oneshot::channel();
    conn.taken.store(false, Ordering::Relaxed);
    let id = reg.fanout.park(
        &key,
        &w.view,
        Waiter {
            index: w.index,
            conn: conn.clone(),
            variant,
            done: tx,
        },
    );
    if buf.is_empty() {
        *buf = Vec::new();
    }
    // A change between the handler's look and parking has no pass to answer it.
    let passed = (w.view.index_of)(&reg.state.read()) > w.index;
    let sleep = tokio::time::sleep_until(Instant::now() + w.wait);
    tokio::pin!(sleep);
    let mut watch_socket = true;
    let outcome = if passed || *shutdown.borrow() {
        Parked::AnswerNow
    } else {
        loop {
            tokio::select! {
                d = &mut rx => break match d {
                    Ok(d) => Parked::Delivered(d),
                    Err(_) => Parked::AnswerNow,
                },
                _ = &mut sleep => break Parked::AnswerNow,
                _ = shutdown.wait_for(|s| *s) => break Parked::AnswerNow,
                r = conn.stream.readable(), if watch_socket => {
                    if r.is_err() {
                        break Parked::Gone;
                    }
                    if conn.taken.load(Ordering::Acquire) {
                        // The answer is being written: read the next request after it.
                        watch_socket = false;
                        continue;
                    }
                    match try_fill(conn, buf) {
                        Ok(0) => break Parked::Gone,
                        Ok(_) => {
                            // A pipelined request: kept for after the answer.
                            if buf.len() >= HEAD_LIMIT {
                                watch_socket = false;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => break Parked::Gone,
                    }
                }
            }
        }
    };
    let delivered = match outcome {
        Parked::Delivered(d) => d,
        other => {
            if reg.fanout.unpark(&key, id) {
                if matches!(other, Parked::Gone) {
                    return false;
                }
                let p = {
                    let st = reg.state.read();
                    reg.prepared(&key, &w.view, &st)
                };
                return write_all(conn, &reg.wire(&p, variant)).await.is_ok();
            }
            // A pass took it first: its answer is on the way.
            match rx.await {
                Ok(d) => d,
                Err(_) => return false,
            }
        }
    };
    if delivered.failed {
        return false;
    }
    write_all(conn, &delivered.wire[delivered.written..])
        .await
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &[u8]) -> Head {
        parse_head(raw).unwrap().unwrap().0
    }

    #[test]
    fn request_framing() {
        let h = head(b"GET /v1/status/leader HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(h.keep_alive && matches!(h.body, BodyKind::Empty));
        let h = head(b"GET / HTTP/1.0\r\n\r\n");
        assert!(!h.keep_alive);
        let h = head(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
        assert!(h.keep_alive);
        let h = head(b"GET / HTTP/1.1\r\nConnection: foo, close\r\n\r\n");
        assert!(!h.keep_alive);
        let h = head(b"PUT / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n");
        assert!(matches!(h.body, BodyKind::Length(5)));
        let h = head(b"PUT / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert!(matches!(h.body, BodyKind::Chunked));
        let h = head(b"PUT / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(matches!(h.body, BodyKind::Chunked) && !h.keep_alive);
        assert!(h.headers.get("content-length").is_none());
        let h = head(b"PUT / HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n");
        assert!(h.expect_continue);
        assert!(parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .unwrap()
            .is_none());
        for bad in [
            &b"GARBAGE\r\n\r\n"[..],
            b"PUT / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"PUT / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"PUT / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"PUT / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(
                parse_head(bad).err(),
                Some(StatusCode::BAD_REQUEST),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-H{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(
            parse_head(&many).err(),
            Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
    }

    #[test]
    fn response_heads() {
        let mut r = Resp::new(Bytes::from_static(b"[]"));
        r.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/json"));
        r.headers_mut()
            .insert("x-consul-index", HeaderValue::from(7u64));
        let text = |r: &Resp, v: Variant| String::from_utf8(wire(r, v, None).to_vec()).unwrap();
        let t = text(&r, Variant::new(Version::HTTP_11, true, false, false));
        assert!(
            t.starts_with(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Consul-Index: 7\r\nContent-Length: 2\r\nDate: "
            ),
            "{t}"
        );
        assert!(t.ends_with(" GMT\r\n\r\n[]"), "{t}");
        let t = text(&r, Variant::new(Version::HTTP_11, false, true, false));
        assert!(
            t.contains("\r\nConnection: close\r\nContent-Length: 2\r\n"),
            "{t}"
        );
        assert!(t.ends_with("\r\n\r\n"), "HEAD: no body: {t}");
        let t = text(&r, Variant::new(Version::HTTP_10, false, false, false));
        assert!(
            t.starts_with("HTTP/1.0 200 OK\r\n") && !t.contains("Connection"),
            "{t}"
        );
        let t = text(&r, Variant::new(Version::HTTP_10, true, false, false));
        assert!(t.contains("\r\nConnection: keep-alive\r\n"), "{t}");
        *r.status_mut() = StatusCode::NOT_FOUND;
        let t = text(&r, Variant::new(Version::HTTP_11, true, false, false));
        assert!(t.starts_with("HTTP/1.1 404 Not Found\r\n"), "{t}");
        // A body large enough to be coded: Vary on both codings; the coded one says so
        // and counts the coded bytes (HEAD too).
        let body = Bytes::from(br#"{"ServiceID":"web-1","Status":"passing"},"#.repeat(40));
        let mut r = Resp::new(body.clone());
        r.headers_mut()
            .insert("x-consul-index", HeaderValue::from(9u64));
        let id = Variant::new(Version::HTTP_11, true, false, false);
        assert_eq!(coded_body(&r, id), None, "identity request");
        let t = text(&r, id);
        assert!(
            t.contains(&format!(
                "X-Consul-Index: 9\r\nVary: Accept-Encoding\r\nContent-Length: {}\r\n",
                body.len()
            )),
            "{t}"
        );
        for head_only in [false, true] {
            let gz = Variant::new(Version::HTTP_11, true, head_only, true);
            let coded = coded_body(&r, gz).expect("coded");
            let w = wire(&r, gz, Some(&coded));
            let end = w.windows(4).position(|x| x == b"\r\n\r\n").unwrap() + 4;
            let h = String::from_utf8(w[..end].to_vec()).unwrap();
            assert!(
                h.contains(&format!(
                    "X-Consul-Index: 9\r\nVary: Accept-Encoding\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\n",
                    coded.len()
                )),
                "{h}"
            );
            assert_eq!(&w[end..], if head_only { &[][..] } else { &coded[..] });
        }
        // A body the handler coded itself is left alone.
        r.headers_mut()
            .insert("content-encoding", HeaderValue::from_static("br"));
        assert_eq!(
            coded_body(&r, Variant::new(Version::HTTP_11, true, false, true)),
            None
        );
        let e = String::from_utf8(error_head(StatusCode::BAD_REQUEST)).unwrap();
        assert!(
            e.starts_with(
                "HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\nDate: "
            ),
            "{e}"
        );
    }
}
