//! The life of one HTTP/1 request, phase by phase (the same phases as `crate::proxy`,
//! on raw heads and sockets instead of hyper's types):
//!
//! 1. `screen`: refuse ambiguous or malformed framing, targets, hosts and paths
//!    (smuggling and bypass guards); normalise the path
//! 2. `route`: host + normalised path + method → route (404 if none)
//! 3. `upstream head`: written once — hop-by-hop out, X-Forwarded-* in, Host, framing
//! 4. `body`: a body up to `request_buffer_bytes` is read whole before any server is
//!    chosen (`read_body_first`); a stalled one gets 408
//! 5. `select`: the balancer picks a server that takes new requests (503 if none)
//! 6. `send`: pooled or new connection; the head (and a body already read) in one
//!    write; a streaming body is copied while the response head is awaited; retries on
//!    another server only when safe (nothing sent, or idempotent and nothing received)
//! 7. `respond`: the response head rewritten for the client, the body copied with its
//!    framing; the upstream connection goes back to the pool when it was read exactly to
//!    its end; the in-flight count and the access-log entry end with the body
//!
//! Upgrades (WebSocket) take `upgrade`: the tunnel opens only after the upstream
//! answered 101.

use super::conn::{ClientConn, Next};
use super::framing::{BodyKind, ChunkedDecoder};
use super::head::{
    reframe_with_length, write_simple, ClientConnection, HeadError, OutFraming, Parsed,
    RequestHead, ResponseHead, UpstreamHeadCtx,
};
use super::io::{pump, read_more, BodyCopy, PumpError, UpConn};
use super::Shared;
use crate::access_log::Entry;
use crate::body::PendingLog;
use crate::pool::connect_tcp;
use crate::proxy::{
    hash_key_with, is_idempotent, unanswered, Failure, Tried, MAX_STALE_CONNECTIONS,
};
use crate::routing::normalize_host;
use crate::runtime::{Candidate, InFlight, Pick, UpstreamRuntime};
use crate::stats::RouteNo;
use dynagate_model::Balance;
use std::io::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// "Until the body is sent": far enough never to fire, near enough not to overflow.
const NO_DEADLINE: Duration = Duration::from_secs(365 * 24 * 3600);
/// Most bytes asked for in one read of a request body read before it is sent.
const BODY_READ_CHUNK: usize = 64 * 1024;
/// Room for a response head's first read.
const RESPONSE_HEAD_BUF: usize = 2048;
/// Largest response head accepted from an upstream.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Interim (1xx) answers accepted before the final one: an upstream cannot keep a client
/// busy forever with 100s.
const MAX_INTERIM: usize = 16;
/// Upstream read buffers larger than this are released before the connection idles.
const KEEP_UPSTREAM_BUF: usize = 8 * 1024;

/// What the request says about itself, kept after its head bytes are gone.
#[derive(Clone, Copy)]
struct Info {
    keep_alive: bool,
    http10: bool,
    is_head: bool,
    body: BodyKind,
    idempotent: bool,
    expects_continue: bool,
}

/// What one request carries through its phases, for metrics and the log.
struct Ctx<'a> {
    shared: &'a Shared,
    start: Instant,
    /// The route's number (for its counters), once routed.
    route: RouteNo,
    /// The upstream's read timeout and idle connections kept per server, once routed:
    /// read with the rest of its first lines, not again when the response comes.
    read_timeout: Duration,
    keepalive: u32,
    log: Option<Entry>,
    info: Info,
    /// dynagate answered `100 Continue` itself (reading the body first): the upstream's
    /// is not forwarded again.
    continued: bool,
}

pub async fn proxy(conn: &mut ClientConn, shared: &Shared, head: RequestHead) -> Next {
    let worker = &*shared.worker;
    let buf = &conn.buf[..head.len];
    let method = head.method(buf);
    let info = Info {
        keep_alive: head.keep_alive(),
        http10: head.minor_version == 0,
        is_head: head.is_head(buf),
        body: head.body(),
        idempotent: is_idempotent_str(method),
        expects_continue: head.expects_continue(),
    };
    let mut ctx = Ctx {
        shared,
        start: Instant::now(),
        route: RouteNo::MAX,
        read_timeout: Duration::ZERO,
        keepalive: 0,
        log: worker
            .access_log
            .as_ref()
            .map(|_| log_entry(&head, buf, conn.peer)),
        info,
        continued: false,
    };

    // The request is consumed from here on: whatever is answered, the connection goes
    // on at the byte after it (its body is skipped or forwarded) or closes.
    conn.pos = head.len;

    // 1. screen
    if let Err(refusal) = head.screen(buf) {
        worker.counters.bad_request.fetch_add(1, Ordering::Relaxed);
        let why = refusal_message(refusal.status, refusal.why);
        return simple(conn, &mut ctx, refusal.status, &why, true).await;
    }
    let path = head.path(buf);
    let normal_path = match crate::uri::normalize_path(path) {
        Ok(p) => p,
        Err(why) => {
            worker.counters.bad_request.fetch_add(1, Ordering::Relaxed);
            let why = refusal_message(400, why);
            return simple(conn, &mut ctx, 400, &why, true).await;
        }
    };
    let max_body = shared.options.max_body_bytes;
    if max_body > 0 && head.content_length().is_some_and(|n| n > max_body) {
        worker.counters.bad_request.fetch_add(1, Ordering::Relaxed);
        let why = format!("dynagate: request body larger than {max_body} bytes");
        return simple(conn, &mut ctx, 413, &why, true).await;
    }

    // 2. route
    let snapshot = worker.snapshots.load();
    let host_raw = head
        .host(buf)
        .and_then(|h| std::str::from_utf8(h).ok())
        .unwrap_or("");
    let host = normalize_host(host_raw);
    let Some(route) = snapshot.routes.find_hit(&host, &normal_path, method) else {
        worker.counters.no_route.fetch_add(1, Ordering::Relaxed);
        let msg = format!(
            "dynagate: no route for host {:?} path {:?}",
            &*host, &*normal_path
        );
        let close = !skip_body(conn, info.body);
        return simple(conn, &mut ctx, 404, &msg, close).await;
    };
    ctx.route = route.no;
    let Some(upstream) = snapshot.upstream_at(route.upstream_slot).cloned() else {
        let msg = format!(
            "dynagate: upstream {:?} does not exist",
            route.entry.upstream
        );
        let close = !skip_body(conn, info.body);
        return simple(conn, &mut ctx, 503, &msg, close).await;
    };
    ctx.read_timeout = upstream.read_timeout;
    ctx.keepalive = upstream.keepalive;
    if let Some(entry) = ctx.log.as_mut() {
        entry.route = Some(route.entry.id.clone());
        entry.upstream = Some(route.entry.upstream.clone());
    }
    // `hashes` first: only consistent-hash upstreams read their spec here.
    let hash_key = upstream.hashes.then_some(&upstream.spec.hash_key);
    let hash = match hash_key {
        Some(Some(key)) => {
            let (target, _) = head.origin_form(buf);
            hash_key_with(
                key,
                conn.peer,
                |name| head.header(buf, name),
                head.headers_named(buf, "cookie"),
                head.query(buf),
                target,
            )
        }
        _ => None,
    };

    // 3. upstream head
    let upgrade = head.is_upgrade();
    let mut ip = [0u8; 48];
    let ip_len = {
        let mut w = &mut ip[..];
        let _ = write!(w, "{}", conn.peer);
        48 - w.len()
    };
    let mut up_head = Vec::with_capacity(head.len + 192);
    let forwarded_path = match &normal_path {
        std::borrow::Cow::Owned(p) if !route.forward_original_path() => Some(p.as_str()),
        _ => None,
    };
    head.write_upstream(
        buf,
        &mut up_head,
        &UpstreamHeadCtx {
            client_ip: std::str::from_utf8(&ip[..ip_len]).unwrap_or("unknown"),
            upstream_host: route.upstream_host().map(|v| v.as_bytes()),
            upgrade,
            path: forwarded_path,
            underscores: shared.options.underscores_in_headers,
            default_host: route.entry.upstream.as_bytes(),
        },
    );
    // Read only for a request with a body: most have none.
    let buffering =
        ctx.info.body != BodyKind::Empty && !upgrade && route.entry.route.request_buffering;
    drop(host);
    drop(snapshot);

    // 4. body: one that fits `request_buffer_bytes` is read whole before a server is
    // chosen (nginx's request buffering), so a slow client holds no upstream connection
    // and cannot be blamed on a server, and an idempotent request can be sent again.
    if buffering {
        if let Err(next) = read_body_first(conn, &mut ctx, &mut up_head).await {
            return next;
        }
    }

    if upgrade {
        return Box::pin(self::upgrade(conn, &mut ctx, &upstream, up_head)).await;
    }
    send(conn, &mut ctx, &upstream, hash, up_head).await
}

/// The text of an answer refusing a request.
fn refusal_message(status: u16, why: &str) -> String {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("refused")
        .to_ascii_lowercase();
    format!("dynagate: {reason}: {why}")
}

/// Skips a request body already read whole, so the connection can go on after an answer
/// that did not need it; false when (part of) the body is still to come and could not
/// be told from the next request: the connection must close.
fn skip_body(conn: &mut ClientConn, body: BodyKind) -> bool {
    match body {
        BodyKind::Empty => true,
        BodyKind::Length(n) if (conn.buf.len() - conn.pos) as u64 >= n => {
            conn.pos += n as usize;
            true
        }
        _ => false,
    }
}

fn is_idempotent_str(method: &str) -> bool {
    http::Method::from_bytes(method.as_bytes())
        .map(|m| is_idempotent(&m))
        .unwrap_or(false)
}

fn log_entry(head: &RequestHead, buf: &[u8], client: std::net::IpAddr) -> Entry {
    let value = |v: Option<&[u8]>| v.and_then(|v| http::HeaderValue::from_bytes(v).ok());
    Entry {
        time: std::time::SystemTime::now(),
        client,
        method: http::Method::from_bytes(head.method(buf).as_bytes()).unwrap_or_default(),
        uri: head.target(buf).parse().unwrap_or_default(),
        version: if head.minor_version == 0 {
            http::Version::HTTP_10
        } else {
            http::Version::HTTP_11
        },
        host: value(head.header(buf, "host")),
        status: 0,
        bytes_sent: 0,
        referer: value(head.header(buf, "referer")),
        user_agent: value(head.header(buf, "user-agent")),
        route: None,
        upstream: None,
        upstream_addr: None,
        upstream_time: None,
        total_time: Duration::ZERO,
    }
}

/// Answers with a short response of dynagate's own.
async fn simple(
    conn: &mut ClientConn,
    ctx: &mut Ctx<'_>,
    status: u16,
    message: &str,
    close: bool,
) -> Next {
    let close = close || !ctx.info.keep_alive || ctx.shared.drain.closing();
    let mut out = Vec::with_capacity(160 + message.len());
    write_simple(&mut out, status, message, close);
    if ctx.info.is_head {
        // The head says how long the body would be; none follows.
        let body_len = message.len() + 1;
        out.truncate(out.len() - body_len);
    }
    let written = conn.stream.write_all(&out).await;
    if let (Some(log), Some(mut entry)) = (&ctx.shared.worker.access_log, ctx.log.take()) {
        entry.status = status;
        entry.bytes_sent = message.len() as u64 + 1;
        entry.total_time = ctx.start.elapsed();
        log.log(entry);
    }
    match written {
        Err(_) => Next::Close,
        Ok(()) if close => Next::Linger,
        Ok(()) => Next::KeepAlive,
    }
}

/// Reads a request body of at most `request_buffer_bytes` into the connection's buffer
/// before it is sent. A chunked one is decoded in place and sent with a Content-Length
/// (`up_head` re-framed). A larger body is left to stream; a client that stalls gets
/// 408, one that closes gets nothing — neither is a server's failure.
async fn read_body_first(
    conn: &mut ClientConn,
    ctx: &mut Ctx<'_>,
    up_head: &mut Vec<u8>,
) -> Result<(), Next> {
    let limit = ctx.shared.options.request_buffer_bytes;
    let timeout = ctx.shared.options.body_read_timeout;
    let kind = ctx.info.body;
    if limit == 0 || matches!(kind, BodyKind::Length(n) if n > limit as u64) {
        return Ok(());
    }
    let mut scan = ChunkedDecoder::default();
    let mut scanned = 0;
    loop {
        let have = conn.buf.len() - conn.pos;
        let complete = match kind {
            BodyKind::Length(n) => have as u64 >= n,
            _ => {
                let raw = &conn.buf[conn.pos + scanned..];
                match scan.feed(raw, |_, _| {}) {
                    Ok(used) => scanned += used,
                    Err(e) => {
                        let worker = &ctx.shared.worker;
                        worker.counters.bad_request.fetch_add(1, Ordering::Relaxed);
                        let why = format!("dynagate: bad request: invalid chunked body: {e}");
                        return Err(simple(conn, ctx, 400, &why, true).await);
                    }
                }
                if !scan.is_done() && scanned > limit {
                    // Too large to hold: it streams from what is read so far.
                    return Ok(());
                }
                scan.is_done()
            }
        };
        if complete {
            break;
        }
        if ctx.info.expects_continue && !ctx.continued {
            // The client waits for this before it sends the body we wait for.
            ctx.continued = true;
            if conn
                .stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .is_err()
            {
                return Err(Next::Close);
            }
        }
        let room = (limit + 1).saturating_sub(have).clamp(1, BODY_READ_CHUNK);
        match read_more(&mut conn.stream, &mut conn.buf, room, timeout).await {
            Ok(0) => return Err(Next::Close),
            Ok(_) => {}
            Err(e) if e == "timed out" => {
                let why = "dynagate: request timeout: the request body did not arrive in time";
                return Err(simple(conn, ctx, 408, why, true).await);
            }
            Err(_) => return Err(Next::Close),
        }
    }
    if kind == BodyKind::Chunked {
        let raw = &conn.buf[conn.pos..conn.pos + scanned];
        let mut data = Vec::with_capacity(scanned);
        let mut decode = ChunkedDecoder::default();
        // Scanned whole above: it decodes the same way.
        let _ = decode.feed(raw, |a, b| data.extend_from_slice(&raw[a..b]));
        let max_body = ctx.shared.options.max_body_bytes;
        if max_body > 0 && data.len() as u64 > max_body {
            let why = format!("dynagate: request body larger than {max_body} bytes");
            return Err(simple(conn, ctx, 413, &why, true).await);
        }
        let len = data.len();
        conn.buf.splice(conn.pos..conn.pos + scanned, data);
        reframe_with_length(up_head, len as u64);
        ctx.info.body = if len == 0 {
            BodyKind::Empty
        } else {
            BodyKind::Length(len as u64)
        };
    }
    Ok(())
}

/// Why no response head came from an upstream.
enum HeadFail {
    /// Closed (or reset) before sending a byte: maybe a pooled connection the server
    /// was closing.
    Closed(String),
    Timeout,
    Bad(String),
}

/// Reads the final response head into `buf` (from its start), forwarding interim 1xx
/// answers (100 Continue) to the client when it speaks HTTP/1.1.
async fn response_head<R, W>(
    src: &mut R,
    buf: &mut Vec<u8>,
    client: &mut W,
    forward_interim: bool,
    continued: bool,
    timeout: Duration,
) -> Result<ResponseHead, HeadFail>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let deadline = Instant::now() + timeout;
    let mut got_any = false;
    let mut interim = 0;
    loop {
        if !buf.is_empty() {
            match ResponseHead::parse(buf) {
                Ok(Parsed::Complete(head)) if head.is_interim() => {
                    interim += 1;
                    if interim > MAX_INTERIM {
                        return Err(HeadFail::Bad("too many interim (1xx) responses".into()));
                    }
                    if forward_interim && !(continued && head.status == 100) {
                        // Rewritten as a final head is: nothing hop-by-hop passes.
                        let mut out = Vec::with_capacity(head.len);
                        let (same, default) = (OutFraming::Same, ClientConnection::Default);
                        head.write_client(buf, &mut out, false, same, default);
                        let _ = client.write_all(&out).await;
                    }
                    buf.drain(..head.len);
                    continue;
                }
                Ok(Parsed::Complete(head)) => return Ok(head),
                Ok(Parsed::Partial) => {}
                Err(HeadError::TooManyHeaders) => {
                    return Err(HeadFail::Bad("too many response header fields".into()))
                }
                Err(HeadError::Invalid(why)) => {
                    return Err(HeadFail::Bad(format!("invalid response head: {why}")))
                }
            }
            if buf.len() >= MAX_RESPONSE_HEAD {
                return Err(HeadFail::Bad("response head too large".into()));
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let room = RESPONSE_HEAD_BUF.max(buf.len());
        match read_more(src, buf, room, left).await {
            Ok(0) if !got_any => {
                return Err(HeadFail::Closed(
                    "connection closed before a response".into(),
                ))
            }
            Ok(0) => {
                return Err(HeadFail::Bad(
                    "connection closed inside the response head".into(),
                ))
            }
            Ok(_) => got_any = true,
            Err(e) if e == "timed out" => return Err(HeadFail::Timeout),
            Err(e) if !got_any => return Err(HeadFail::Closed(e)),
            Err(e) => return Err(HeadFail::Bad(e)),
        }
    }
}

/// How the request was sent, for the response phase.
struct Sent {
    up: UpConn,
    head: ResponseHead,
    /// The whole request body went upstream (else neither connection can be reused).
    body_complete: bool,
}

enum Attempt {
    Sent(Sent),
    /// Nothing of the response arrived and the connection was a pooled one the server
    /// may have closed: try another connection, not counted against the server.
    Stale,
    Failed(Failure, /* may go again */ bool),
    /// The client failed while sending its body: nobody to answer.
    ClientGone,
    /// The client's body stopped arriving for `body_read_timeout`: 408.
    ClientStalled,
    /// The client's chunked body is malformed: it gets a 400 naming it.
    BadBody(String),
    /// The client's chunked body passed `max_body_bytes`: 413.
    TooLarge(u64),
}

async fn send(
    conn: &mut ClientConn,
    ctx: &mut Ctx<'_>,
    upstream: &Arc<UpstreamRuntime>,
    hash: Option<u64>,
    up_head: Vec<u8>,
) -> Next {
    let worker = &*ctx.shared.worker;
    let spec = &upstream.spec;
    let info = ctx.info;
    let buffered = match info.body {
        BodyKind::Empty => true,
        BodyKind::Length(n) => (conn.buf.len() - conn.pos) as u64 >= n,
        _ => false,
    };
    // Sent again after a failure only where a retry can happen and it is safe.
    let replayable = info.idempotent && buffered;
    let may_resend = replayable && upstream.retries > 0 && upstream.servers.len() > 1;
    let mut tried = Tried::default();
    let mut stale = 0;
    let max_attempts = (upstream.retries as usize + 1).min(crate::proxy::MAX_ATTEMPTS);
    let mut last_failure: Option<(usize, Failure)> = None;
    // Read now, with the rest of the runtime's first lines: not again after the wait.
    let ewma = upstream.balance == Balance::P2cEwma;
    let read_timeout = ctx.read_timeout;

    while tried.len() < max_attempts {
        // 4. select
        let Some(index) = upstream.select(&Pick {
            tried: tried.as_slice(),
            hash,
        }) else {
            break;
        };
        let server = upstream.candidate(index);
        if tried.len() > 0 {
            worker.counters.retries.fetch_add(1, Ordering::Relaxed);
        }

        // 5. send
        let sent_at = Instant::now();
        // Counted from selection on, so concurrent selections (least_conn, local_first
        // saturation) see a request that is still connecting.
        let in_flight = InFlight::on(upstream.shard(index));
        let (up, reused) = match worker.h1_pool.take(&server.key) {
            Some(c) => (c, true),
            None => {
                match connect_tcp(&upstream.servers[index].target, spec.connect_timeout).await {
                    Ok(stream) => (
                        UpConn {
                            stream,
                            buf: Vec::new(),
                        },
                        false,
                    ),
                    Err(e) => {
                        // Nothing was sent: any method may go to the next server.
                        upstream.record_failure(index);
                        tried.push(index);
                        last_failure = Some((index, Failure::Connect(e.to_string())));
                        continue;
                    }
                }
            }
        };
        let attempt = if buffered {
            send_buffered(conn, ctx, up, &up_head, reused, read_timeout).await
        } else {
            // Boxed: the usual request does not carry this larger state.
            Box::pin(send_streaming(
                conn,
                ctx,
                up,
                &up_head,
                reused,
                read_timeout,
            ))
            .await
        };
        match attempt {
            Attempt::Sent(sent) if sent.head.status == 101 => {
                // A switch nobody asked for: the connection now speaks something else and
                // must never go back to the pool.
                drop(sent);
                upstream.record_failure(index);
                tried.push(index);
                let why = "answered 101 Switching Protocols to a request that asked for no upgrade";
                last_failure = Some((index, Failure::Upstream(why.into())));
                break;
            }
            Attempt::Sent(sent) => {
                let elapsed = sent_at.elapsed();
                answered(
                    upstream,
                    index,
                    &in_flight,
                    ctx.route,
                    sent.head.status,
                    elapsed,
                    ewma,
                );
                // 6. respond
                return respond(conn, ctx, upstream, server, sent, in_flight, elapsed).await;
            }
            Attempt::Stale if stale < MAX_STALE_CONNECTIONS => stale += 1,
            Attempt::Stale => {
                upstream.record_failure(index);
                tried.push(index);
                let why = "connection closed before a response".to_string();
                last_failure = Some((index, Failure::Upstream(why)));
                if !may_resend {
                    break;
                }
            }
            Attempt::Failed(failure, again) => {
                upstream.record_failure(index);
                tried.push(index);
                let timeout = matches!(failure, Failure::Timeout);
                last_failure = Some((index, failure));
                if timeout || !(again || may_resend) {
                    break;
                }
            }
            Attempt::ClientGone => return Next::Close,
            Attempt::ClientStalled => {
                let why = "dynagate: request timeout: the request body did not arrive in time";
                return simple(conn, ctx, 408, why, true).await;
            }
            // Not the server's fault: its connection (holding part of the body) is dropped.
            Attempt::BadBody(e) => {
                worker.counters.bad_request.fetch_add(1, Ordering::Relaxed);
                let why = format!("dynagate: bad request: invalid chunked body: {e}");
                return simple(conn, ctx, 400, &why, true).await;
            }
            Attempt::TooLarge(limit) => {
                worker.counters.bad_request.fetch_add(1, Ordering::Relaxed);
                let why = format!("dynagate: request body larger than {limit} bytes");
                return simple(conn, ctx, 413, &why, true).await;
            }
        }
    }
    let (status, message) = unanswered(&worker.counters, upstream, last_failure, ctx.log.as_mut());
    let close = !skip_body(conn, info.body);
    simple(conn, ctx, status.as_u16(), &message, close).await
}

/// Counts an answer from server `index`: on the worker's shard (the one `in_flight`
/// counts on), the EWMA only for `p2c_ewma`; a 5xx is an outlier signal, anything else
/// a success (which reads the server's record only if a failure was counted).
fn answered(
    upstream: &UpstreamRuntime,
    index: usize,
    in_flight: &InFlight,
    route: RouteNo,
    status: u16,
    elapsed: Duration,
    ewma: bool,
) {
    let elapsed_us = elapsed.as_micros() as u64;
    let shard = in_flight.shard();
    shard.record_response(route, status, elapsed_us);
    let stats = &upstream.candidate(index).stats;
    if ewma {
        stats.observe_ewma(elapsed_us);
    }
    if status >= 500 {
        upstream.record_outlier_failure(index);
    } else {
        shard.success(stats);
    }
}

/// The head and a body already read, in one write; then the response head.
async fn send_buffered(
    conn: &mut ClientConn,
    ctx: &Ctx<'_>,
    mut up: UpConn,
    up_head: &[u8],
    reused: bool,
    read_timeout: Duration,
) -> Attempt {
    let body_len = match ctx.info.body {
        BodyKind::Length(n) => n as usize,
        _ => 0,
    };
    let body = &conn.buf[conn.pos..conn.pos + body_len];
    let written = if body.is_empty() {
        up.stream.write_all(up_head).await
    } else {
        let mut out = Vec::with_capacity(up_head.len() + body.len());
        out.extend_from_slice(up_head);
        out.extend_from_slice(body);
        up.stream.write_all(&out).await
    };
    if let Err(e) = written {
        // The server did not take the request: not its answer, safe to send again.
        return if reused {
            Attempt::Stale
        } else {
            Attempt::Failed(Failure::Upstream(e.to_string()), true)
        };
    }
    let forward = !ctx.info.http10;
    match response_head(
        &mut up.stream,
        &mut up.buf,
        &mut conn.stream,
        forward,
        ctx.continued,
        read_timeout,
    )
    .await
    {
        Ok(head) => {
            conn.pos += body_len;
            Attempt::Sent(Sent {
                up,
                head,
                body_complete: true,
            })
        }
        Err(HeadFail::Closed(_)) if reused && ctx.info.idempotent => Attempt::Stale,
        Err(HeadFail::Closed(e)) | Err(HeadFail::Bad(e)) => {
            Attempt::Failed(Failure::Upstream(e), false)
        }
        Err(HeadFail::Timeout) => Attempt::Failed(Failure::Timeout, false),
    }
}

/// A body still arriving: copied upstream while the response head is awaited (an
/// upstream may answer early, e.g. 413, and stop reading).
async fn send_streaming(
    conn: &mut ClientConn,
    ctx: &Ctx<'_>,
    mut up: UpConn,
    up_head: &[u8],
    reused: bool,
    read_timeout: Duration,
) -> Attempt {
    if let Err(e) = up.stream.write_all(up_head).await {
        return if reused {
            Attempt::Stale
        } else {
            Attempt::Failed(Failure::Upstream(e.to_string()), true)
        };
    }
    let forward = !ctx.info.http10;
    let body_timeout = ctx.shared.options.body_read_timeout;
    let (head, body_complete) = {
        let (mut client_r, mut client_w) = conn.stream.split();
        let UpConn { stream, buf } = &mut up;
        let (mut up_r, mut up_w) = stream.split();
        let copy = BodyCopy {
            kind: ctx.info.body,
            framing: match ctx.info.body {
                BodyKind::Chunked => OutFraming::Chunked,
                _ => OutFraming::Same,
            },
            read_timeout: body_timeout,
            // An upstream that stops taking the body is as slow as one that stops answering.
            write_timeout: read_timeout,
            limit: ctx.shared.options.max_body_bytes,
        };
        let body = pump(
            &mut client_r,
            &mut conn.buf,
            &mut conn.pos,
            &mut up_w,
            Vec::new(),
            copy,
        );
        // The upstream's read timeout runs from the end of the body, as nginx's
        // proxy_read_timeout: a client sending slowly is not the server being slow.
        let head = response_head(&mut up_r, buf, &mut client_w, forward, false, NO_DEADLINE);
        let answer_due = tokio::time::sleep(NO_DEADLINE);
        tokio::pin!(body, head, answer_due);
        let mut body_done: Option<Result<u64, PumpError>> = None;
        let head = loop {
            tokio::select! {
                sent = &mut body, if body_done.is_none() => {
                    match &sent {
                        Err(PumpError::Read(e)) if e == "timed out" => {
                            return Attempt::ClientStalled;
                        }
                        Err(PumpError::Read(e)) => {
                            tracing::debug!(error = %e, "client request body failed");
                            return Attempt::ClientGone;
                        }
                        Err(PumpError::Framing(e)) => return Attempt::BadBody(e.clone()),
                        Err(PumpError::TooLarge(limit)) => return Attempt::TooLarge(*limit),
                        _ => {}
                    }
                    body_done = Some(sent);
                    answer_due.as_mut().reset(tokio::time::Instant::now() + read_timeout);
                }
                head = &mut head => break head,
                () = &mut answer_due => break Err(HeadFail::Timeout),
            }
        };
        (head, matches!(body_done, Some(Ok(_))))
    };
    match head {
        Ok(head) => Attempt::Sent(Sent {
            up,
            head,
            body_complete,
        }),
        Err(HeadFail::Closed(e)) | Err(HeadFail::Bad(e)) => {
            Attempt::Failed(Failure::Upstream(e), false)
        }
        Err(HeadFail::Timeout) => Attempt::Failed(Failure::Timeout, false),
    }
}

/// 6. The response: head rewritten for the client, body copied with its framing.
async fn respond(
    conn: &mut ClientConn,
    ctx: &mut Ctx<'_>,
    upstream: &UpstreamRuntime,
    server: &Candidate,
    sent: Sent,
    in_flight: InFlight,
    upstream_time: Duration,
) -> Next {
    let Sent {
        mut up,
        head,
        body_complete,
    } = sent;
    let info = ctx.info;
    let kind = head.body(info.is_head);
    let mut close = !info.keep_alive || !body_complete || ctx.shared.drain.closing();
    let framing = match (kind, info.http10) {
        (BodyKind::Chunked, true) => {
            close = true;
            OutFraming::Raw
        }
        (BodyKind::Chunked | BodyKind::UntilClose, false) => OutFraming::Chunked,
        (BodyKind::UntilClose, true) => {
            close = true;
            OutFraming::Same
        }
        _ => OutFraming::Same,
    };
    let connection = if close {
        ClientConnection::Close
    } else if info.http10 {
        ClientConnection::KeepAlive
    } else {
        ClientConnection::Default
    };
    let mut out = Vec::with_capacity(head.len + 64);
    head.write_client(&up.buf, &mut out, info.is_head, framing, connection);
    let log = pending_log(ctx, server, head.status, upstream_time);
    let mut pos = head.len;
    let copy = BodyCopy {
        kind,
        framing,
        read_timeout: ctx.read_timeout,
        write_timeout: ctx.shared.options.send_timeout,
        limit: 0,
    };
    let result = pump(
        &mut up.stream,
        &mut up.buf,
        &mut pos,
        &mut conn.stream,
        out,
        copy,
    )
    .await;
    let (sent_bytes, next) = match result {
        Ok(n) => {
            let reusable = body_complete
                && head.keep_alive()
                && kind != BodyKind::UntilClose
                && pos == up.buf.len();
            if reusable {
                if up.buf.capacity() > KEEP_UPSTREAM_BUF {
                    up.buf = Vec::new();
                } else {
                    up.buf.clear();
                }
                ctx.shared
                    .worker
                    .h1_pool
                    .checkin(&server.key, up, ctx.keepalive as usize);
            }
            (n, if close { Next::Close } else { Next::KeepAlive })
        }
        Err(PumpError::TooLarge(_)) => (0, Next::Close),
        Err(PumpError::Read(e) | PumpError::Framing(e)) => {
            server.stats.failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(upstream = %upstream.spec.name, server = %server.key, error = %e, "upstream body failed");
            (0, Next::Close)
        }
        Err(PumpError::Write(_)) => (0, Next::Close),
        Err(PumpError::Unsent(e)) => {
            // Nothing reached the client yet: it gets a 502 naming the fault.
            server.stats.failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(upstream = %upstream.spec.name, server = %server.key, error = %e, "upstream body failed");
            drop(in_flight);
            drop(log);
            let why = format!(
                "dynagate: upstream {:?} server {} sent a broken body: {e}",
                upstream.spec.name, server.key
            );
            return simple(conn, ctx, 502, &why, true).await;
        }
    };
    drop(in_flight);
    if let Some(log) = log {
        log.emit(sent_bytes);
    }
    next
}

fn pending_log(
    ctx: &mut Ctx<'_>,
    server: &Candidate,
    status: u16,
    upstream_time: Duration,
) -> Option<Box<PendingLog>> {
    let log = ctx.shared.worker.access_log.as_ref();
    PendingLog::answered(
        log,
        &mut ctx.log,
        ctx.start,
        &server.key,
        status,
        upstream_time,
    )
}

/// WebSocket (or any HTTP/1.1 upgrade): a dedicated upstream connection; the client's
/// connection is switched only once the upstream answered 101, then bytes flow both
/// ways until either side closes.
async fn upgrade(
    conn: &mut ClientConn,
    ctx: &mut Ctx<'_>,
    upstream: &Arc<UpstreamRuntime>,
    up_head: Vec<u8>,
) -> Next {
    let spec = &upstream.spec;
    let mut tried = Tried::default();
    let max_attempts = (spec.retries as usize + 1).min(crate::proxy::MAX_ATTEMPTS);
    let mut last_failure = None;
    while tried.len() < max_attempts {
        let Some(index) = upstream.select(&Pick {
            tried: tried.as_slice(),
            hash: None,
        }) else {
            break;
        };
        let server = upstream.candidate(index);
        let sent_at = Instant::now();
        let in_flight = InFlight::on(upstream.shard(index));
        let stream = match connect_tcp(&upstream.servers[index].target, spec.connect_timeout).await
        {
            Ok(s) => s,
            Err(e) => {
                upstream.record_failure(index);
                tried.push(index);
                last_failure = Some((index, Failure::Connect(e.to_string())));
                continue;
            }
        };
        let mut up = UpConn {
            stream,
            buf: Vec::new(),
        };
        if let Err(e) = up.stream.write_all(&up_head).await {
            upstream.record_failure(index);
            last_failure = Some((index, Failure::Upstream(e.to_string())));
            break;
        }
        let head = match response_head(
            &mut up.stream,
            &mut up.buf,
            &mut conn.stream,
            true,
            false,
            spec.read_timeout,
        )
        .await
        {
            Ok(h) => h,
            Err(fail) => {
                upstream.record_failure(index);
                last_failure = Some((
                    index,
                    match fail {
                        HeadFail::Timeout => Failure::Timeout,
                        HeadFail::Closed(e) | HeadFail::Bad(e) => Failure::Upstream(e),
                    },
                ));
                break;
            }
        };
        let elapsed = sent_at.elapsed();
        // Any answer to an upgrade counts as a success (no outlier signal).
        let shard = in_flight.shard();
        shard.record_response(ctx.route, head.status, elapsed.as_micros() as u64);
        if upstream.balance == Balance::P2cEwma {
            server.stats.observe_ewma(elapsed.as_micros() as u64);
        }
        shard.success(&server.stats);
        if head.status != 101 {
            // No switch: an ordinary response, and the client connection stays HTTP.
            let sent = Sent {
                up,
                head,
                body_complete: false,
            };
            return respond(conn, ctx, upstream, server, sent, in_flight, elapsed).await;
        }
        let log = pending_log(ctx, server, head.status, elapsed);
        let mut out = Vec::with_capacity(head.len + 32);
        head.write_client(
            &up.buf,
            &mut out,
            false,
            OutFraming::Same,
            ClientConnection::Upgrade,
        );
        // Bytes that came early from either side go first.
        out.extend_from_slice(&up.buf[head.len..]);
        let early = conn.buf.split_off(conn.pos);
        conn.buf = Vec::new();
        conn.pos = 0;
        up.buf = Vec::new();
        let mut down = 0;
        if conn.stream.write_all(&out).await.is_ok() && up.stream.write_all(&early).await.is_ok() {
            if let Ok((_, d)) =
                tokio::io::copy_bidirectional(&mut conn.stream, &mut up.stream).await
            {
                down = d;
            }
        }
        drop(in_flight);
        // The tunnel is logged when it closes.
        if let Some(log) = log {
            log.emit(down);
        }
        return Next::Close;
    }
    let (status, message) = unanswered(
        &ctx.shared.worker.counters,
        upstream,
        last_failure,
        ctx.log.as_mut(),
    );
    // What the client sends next may already be the new protocol's bytes, never a request.
    simple(conn, ctx, status.as_u16(), &message, true).await
}
