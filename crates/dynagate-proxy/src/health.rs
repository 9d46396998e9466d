//! Active health checking, on its own thread (`dynagate-health`).
//!
//! One event loop drives every check: a timing wheel of due times, not a sleeping task per
//! server, a deadline per check in flight, non-blocking sockets on the thread's own epoll
//! (mio). The loop does not wake up for each answer: it sleeps until the next due check
//! (or, while checks are in flight, one step of a 5 ms grid) and then takes every answer
//! that came meanwhile at once, so 10,000 checks a second cost about 200 wake-ups instead
//! of tens of thousands. HTTP checks keep their keep-alive connection and write request
//! bytes rendered once; answers are parsed with httparse from a shared buffer. TCP checks
//! make a real connection each time and end it with a reset (no TIME_WAIT); on Linux the
//! socket itself is kept for the next check (`connect(AF_UNSPEC)`). A result is written to
//! the server's record without allocating unless its outcome differs from the last one.
//!
//! Checks never wait for each other (a hung server holds only its own check until its
//! deadline), at most `concurrency` are in flight, the first check of a server comes at a
//! random offset and intervals are jittered ±10 %. A check that panics is logged and
//! started again after an interval; so is the whole loop if it ever fails.

use crate::runtime::{unix_ms, Health, ServerStats, Snapshot, Target, UpstreamRuntime};
use arc_swap::ArcSwap;
use dynagate_model::{CheckKind, HealthCheck, TcpHandshake};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use parking_lot::Mutex;
use socket2::{Domain, SockAddr, Socket, Type};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::future::Future;
use std::io::{self, Read};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Wake, Waker};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Checks in progress at once, across all servers.
pub const DEFAULT_CONCURRENCY: usize = 512;
/// Bytes of a response body read to look for `body_contains`.
const MAX_BODY: usize = 64 * 1024;
/// The loop's wake-ups fall on this grid: everything due within one step is handled in
/// one wake-up, answers are collected once per step, deadlines are kept to one step.
const TICK_NS: u64 = 5_000_000;
/// Disconnected TCP sockets kept for the next TCP checks, per address family.
const POOL_MAX: usize = 64;
/// The shared read buffer; an answer that does not fit is gathered per check.
const SCRATCH: usize = 16 * 1024;
const EVENTS: usize = 1024;

// Epoll tokens carry the slot in their high half and the connection in the low half.
const _: () = assert!(usize::BITS >= 64, "health checks need 64-bit tokens");

pub struct HealthHandle {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HealthHandle {
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// Starts the checker thread.
pub fn start(
    snapshots: Arc<ArcSwap<Snapshot>>,
    revisions: watch::Receiver<u64>,
    concurrency: usize,
) -> io::Result<HealthHandle> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::Builder::new()
        .name("dynagate-health".into())
        .spawn(move || supervise(&snapshots, revisions, &flag, concurrency.max(1)))?;
    Ok(HealthHandle {
        stop,
        thread: Some(thread),
    })
}

/// Runs the checker and starts it again if it ever fails or panics outside a check (the
/// verdicts are on the servers' records and survive that).
fn supervise(
    snapshots: &ArcSwap<Snapshot>,
    mut revisions: watch::Receiver<u64>,
    stop: &AtomicBool,
    limit: usize,
) {
    while !stop.load(Ordering::Acquire) {
        match catch_unwind(AssertUnwindSafe(|| {
            run(snapshots, &mut revisions, stop, limit)
        })) {
            Ok(Ok(())) => return,
            Ok(Err(e)) => tracing::error!(error = %e, "health checker failed; restarting it"),
            Err(_) => tracing::error!("health checker panicked; restarting it"),
        }
        std::thread::park_timeout(Duration::from_secs(1));
    }
}

/// Wakes the checker thread (a configuration change, a name resolved, stop).
struct Unpark(std::thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

fn run(
    snapshots: &ArcSwap<Snapshot>,
    revisions: &mut watch::Receiver<u64>,
    stop: &AtomicBool,
    limit: usize,
) -> io::Result<()> {
    let mut engine = Engine::new(limit)?;
    let mut seen = HashMap::new();
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut watching = true;
    loop {
        engine.set_now(Instant::now());
        reconcile(&snapshots.load(), &mut seen, &mut engine);
        let mut changed = std::pin::pin!(revisions.changed());
        loop {
            if stop.load(Ordering::Acquire) {
                return Ok(());
            }
            if watching {
                match changed.as_mut().poll(&mut cx) {
                    std::task::Poll::Ready(Ok(())) => break,
                    // The controller is gone (shutting down): keep what we have.
                    std::task::Poll::Ready(Err(_)) => watching = false,
                    std::task::Poll::Pending => {}
                }
            }
            // Sleeping here, not in epoll: answers wait for the next step and come together.
            match engine.turn(Instant::now()) {
                Some(at) => std::thread::park_timeout(at.saturating_duration_since(Instant::now())),
                None => std::thread::park(),
            }
        }
    }
}

fn reconcile(
    snapshot: &Snapshot,
    seen: &mut HashMap<String, Arc<UpstreamRuntime>>,
    engine: &mut Engine,
) {
    // Upstreams gone from the configuration.
    let gone: Vec<String> = seen
        .keys()
        .filter(|k| !snapshot.upstreams.contains_key(*k))
        .cloned()
        .collect();
    for name in gone {
        seen.remove(&name);
        engine.remove_upstream(&name, |_, _| true);
    }
    // Only upstreams whose runtime changed are looked at.
    for (name, up) in snapshot.upstreams.iter() {
        if seen.get(name).is_some_and(|old| Arc::ptr_eq(old, up)) {
            continue;
        }
        seen.insert(name.clone(), up.clone());
        let wanted: HashMap<&str, usize> = match &up.spec.health_check {
            Some(_) => up
                .servers
                .iter()
                .enumerate()
                .map(|(i, s)| (s.spec.address.as_str(), i))
                .collect(),
            None => HashMap::new(),
        };
        // Stop checks of servers that left, whose record was replaced, or whose check changed.
        engine.remove_upstream(name, |addr, slot| {
            let keep = match (wanted.get(addr), &up.spec.health_check) {
                (Some(i), Some(check)) => {
                    Arc::ptr_eq(&slot.stats, &up.servers[*i].stats) && slot.check == *check
                }
                _ => false,
            };
            if !keep && up.spec.health_check.is_none() {
                // Checks turned off: the verdict no longer applies.
                slot.stats.set_health(Health::Unchecked);
            }
            !keep
        });
        let Some(check) = &up.spec.health_check else {
            continue;
        };
        for server in &up.servers {
            if engine.has(name, &server.spec.address) {
                continue;
            }
            engine.add(
                name,
                &server.spec.address,
                server.stats.clone(),
                check.clone(),
                server.target.clone(),
            );
        }
    }
}

fn jitter(d: Duration, spread: f64) -> Duration {
    let r = (crate::balance::random_u64() % 10_000) as f64 / 10_000.0;
    d.mul_f64(1.0 - spread + 2.0 * spread * r)
}

// --------------------------------------------------------------------------- outcomes

type Errno = i32;

fn errno(e: &io::Error) -> Errno {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// What a check found, small and comparable: the message is rendered only when it changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Http(u16),
    Tcp,
    Timeout,
    Connect(Errno),
    /// The name did not resolve (its message is kept in the slot).
    Resolve,
    Request(Errno),
    Read(Errno),
    Closed,
    ClosedInBody,
    HeadTooLarge,
    BadResponse(httparse::Error),
    BadContentLength,
    BadChunked(&'static str),
    Status(u16),
    BodyLacks(u16),
}

impl Outcome {
    fn ok(self) -> bool {
        matches!(self, Outcome::Http(_) | Outcome::Tcp)
    }

    fn message(self, check: &HealthCheck, resolve_error: &str) -> String {
        let os = io::Error::from_raw_os_error;
        match self {
            Outcome::Http(s) => format!("HTTP {s}"),
            Outcome::Tcp => "TCP connect ok".into(),
            Outcome::Timeout => format!("no answer within {:?}", check.timeout),
            Outcome::Connect(e) => format!("connect: {}", os(e)),
            Outcome::Resolve => format!("connect: {resolve_error}"),
            Outcome::Request(e) => format!("request: {}", os(e)),
            Outcome::Read(e) => format!("read: {}", os(e)),
            Outcome::Closed => "connection closed before a response".into(),
            Outcome::ClosedInBody => "connection closed inside the body".into(),
            Outcome::HeadTooLarge => "response head too large".into(),
            Outcome::BadResponse(e) => format!("bad response: {e}"),
            Outcome::BadContentLength => "bad Content-Length".into(),
            Outcome::BadChunked(why) => format!("bad chunked body: {why}"),
            Outcome::Status(s) => format!("HTTP {s} is not an expected status"),
            Outcome::BodyLacks(s) => format!(
                "HTTP {s}: body lacks {:?}",
                check.body_contains.as_deref().unwrap_or_default()
            ),
        }
    }
}

// --------------------------------------------------------------------------- HTTP answers

/// A response read so far.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// More bytes are needed.
    More,
    /// The connection ended before a complete response head (a kept connection the server
    /// closed meanwhile: then once more on a fresh connection).
    ClosedEarly,
    Fail(Outcome),
    /// `found`: the body holds the wanted text; `keep`: the connection can carry the next check.
    Done {
        status: u16,
        found: bool,
        keep: bool,
    },
}

/// How a response body ends.
enum Framing {
    None,
    Length(usize),
    Chunked,
    UntilClose,
}

fn contains(hay: &[u8], needle: Option<&[u8]>) -> bool {
    needle.is_some_and(|n| hay.windows(n.len().max(1)).any(|w| w == n))
}

/// The part of a body that is looked at for the wanted text.
fn looked_at(body: &[u8]) -> &[u8] {
    &body[..body.len().min(MAX_BODY)]
}

/// A Content-Length value: 1*DIGIT (optional whitespace around it), nothing else.
fn content_length(value: &[u8]) -> Option<usize> {
    let v = value.trim_ascii();
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Parses a response from everything received (`eof`: the server closed the connection).
/// At most `MAX_BODY` bytes of the body are looked at; a response with more ends the
/// connection. The framing is read as RFC 9112 §6.3 says, and a connection is kept for
/// the next check only when it is unambiguous: Transfer-Encoding wins over
/// Content-Length (and then the connection is not kept), a coding other than chunked
/// is read until the close, differing Content-Length values fail the check.
fn parse(buf: &[u8], eof: bool, head_only: bool, needle: Option<&[u8]>) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if eof => return Parsed::ClosedEarly,
        Ok(httparse::Status::Partial) if buf.len() < MAX_BODY => return Parsed::More,
        Ok(httparse::Status::Partial) => return Parsed::Fail(Outcome::HeadTooLarge),
        Err(e) => return Parsed::Fail(Outcome::BadResponse(e)),
    };
    let status = resp.code.unwrap_or(0);
    let mut length: Option<usize> = None;
    let mut codings = 0;
    let mut chunked = false;
    let mut close = resp.version == Some(0);
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            match content_length(h.value) {
                Some(n) if length.is_none_or(|m| m == n) => length = Some(n),
                _ => return Parsed::Fail(Outcome::BadContentLength),
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            codings += 1;
            chunked = h.value.trim_ascii().eq_ignore_ascii_case(b"chunked");
        } else if h.name.eq_ignore_ascii_case("connection") {
            close |= h
                .value
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
    }
    let framing = if head_only || status == 204 || status == 304 || status / 100 == 1 {
        Framing::None
    } else if codings > 0 {
        // Both framings, or codings the checker cannot read: not trusted with another
        // check (RFC 9112 §6.3: such a connection is closed after the response).
        close |= length.is_some() || codings > 1;
        if chunked && codings == 1 {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else {
        length.map_or(Framing::UntilClose, Framing::Length)
    };
    let body = &buf[head..];
    let done = |found: bool, keep: bool| Parsed::Done {
        status,
        found,
        keep: keep && !close,
    };
    match framing {
        // Bytes after the response: the connection is not trusted with another check.
        Framing::None => done(contains(&[], needle), body.is_empty()),
        Framing::Length(n) if body.len() >= n => {
            done(contains(looked_at(&body[..n]), needle), body.len() == n)
        }
        // Too large to keep: look at what we have, drop the connection.
        Framing::Length(n) if n > MAX_BODY && body.len() > MAX_BODY => {
            done(contains(looked_at(body), needle), false)
        }
        Framing::Length(_) if eof => Parsed::Fail(Outcome::ClosedInBody),
        Framing::Length(_) => Parsed::More,
        Framing::UntilClose if eof || body.len() > MAX_BODY => {
            done(contains(looked_at(body), needle), false)
        }
        Framing::UntilClose => Parsed::More,
        Framing::Chunked => {
            // The proxy's own strict decoder; the data is gathered only to look for a
            // text, and only as much of it as is looked at.
            let mut decoder = crate::h1::framing::ChunkedDecoder::default();
            let mut data = Vec::new();
            let mut data_len = 0usize;
            let fed = decoder.feed(body, |a, b| {
                data_len = data_len.saturating_add(b - a);
                if needle.is_some() && data.len() <= MAX_BODY {
                    data.extend_from_slice(&body[a..b]);
                }
            });
            if data_len > MAX_BODY {
                return done(contains(looked_at(&data), needle), false);
            }
            match fed {
                Err(why) => Parsed::Fail(Outcome::BadChunked(why)),
                Ok(used) if decoder.is_done() => done(contains(&data, needle), used == body.len()),
                Ok(_) if eof => Parsed::Fail(Outcome::ClosedInBody),
                Ok(_) => Parsed::More,
            }
        }
    }
}

/// The response parser of HTTP checks, for the fuzz target `health_response` (fuzz/,
/// cargo-fuzz). Not an API.
#[doc(hidden)]
pub mod fuzzing {
    /// What [`parse_response`] decided.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Verdict {
        More,
        ClosedEarly,
        /// The failure as the check would record it (`Debug` of its outcome).
        Fail(String),
        Done {
            status: u16,
            found: bool,
            keep: bool,
        },
    }

    /// Parses a response from everything received so far (`eof`: the server closed).
    pub fn parse_response(
        buf: &[u8],
        eof: bool,
        head_only: bool,
        needle: Option<&[u8]>,
    ) -> Verdict {
        match super::parse(buf, eof, head_only, needle) {
            super::Parsed::More => Verdict::More,
            super::Parsed::ClosedEarly => Verdict::ClosedEarly,
            super::Parsed::Fail(o) => Verdict::Fail(format!("{o:?}")),
            super::Parsed::Done {
                status,
                found,
                keep,
            } => Verdict::Done {
                status,
                found,
                keep,
            },
        }
    }

    /// Bytes of a body the parser looks at.
    pub const MAX_BODY: usize = super::MAX_BODY;
}

fn render_request(check: &HealthCheck, address: &str) -> Box<[u8]> {
    let mut request = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: dynagate-health-check\r\n",
        check.method,
        check.path,
        check.host.as_deref().unwrap_or(address)
    );
    for (k, v) in &check.headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    request.into_bytes().into_boxed_slice()
}

// --------------------------------------------------------------------------- sockets

fn new_socket(addr: SocketAddr) -> io::Result<Socket> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), None)
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        s.set_nonblocking(true)?;
        Ok(s)
    }
}

/// Makes a connecting socket keep back the handshake's last ACK (Linux: `TCP_DEFER_ACCEPT`
/// on a client socket delays it until data is sent), so that a reset right after the
/// server's SYN-ACK ends a half-open check before the server's accept queue sees it.
/// The option stays set across `disconnect`.
fn defer_last_ack(sock: &Socket) -> io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let one: libc::c_int = 1;
        // SAFETY: a valid socket and an int option of its own size.
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        os_ok(r)
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let _ = sock;
        Ok(()) // elsewhere the handshake completes: a full check
    }
}

/// Binds a TCP check socket to a source port of its own, kept for good: connect(2) on a
/// bound socket skips the search for a free ephemeral port, and `disconnect` keeps the
/// port instead of giving it back. The port comes from the kernel (a throwaway socket bound
/// to port 0; both sockets allow address reuse). On failure the socket stays unbound and
/// connect(2) picks a port each time, as usual.
fn pin_source_port(sock: &Socket, addr: SocketAddr) {
    let any: SocketAddr = match addr {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let pinned = (|| -> io::Result<()> {
        let probe = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        probe.set_reuse_address(true)?;
        probe.bind(&any.into())?;
        let port = probe
            .local_addr()?
            .as_socket()
            .map(|a| a.port())
            .ok_or_else(|| io::Error::other("no port"))?;
        sock.set_reuse_address(true)?;
        let mut at = any;
        at.set_port(port);
        sock.bind(&at.into())
    })();
    if let Err(e) = pinned {
        tracing::debug!(error = %e, "health check socket keeps no source port");
    }
}

/// The pool index of a TCP check's sockets: 1 for half-open ones (their option set).
fn pool_half(check: &HealthCheck) -> usize {
    (check.tcp_handshake.unwrap_or_default() == TcpHandshake::HalfOpen) as usize
}

/// A libc call's return value as a result (`errno` on failure).
#[cfg(any(target_os = "linux", target_os = "android"))]
fn os_ok(r: libc::c_int) -> io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn in_progress(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINPROGRESS) | Some(libc::EALREADY)
    )
}

fn send(sock: &Socket, buf: &[u8]) -> io::Result<usize> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        sock.send_with_flags(buf, libc::MSG_NOSIGNAL)
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        sock.send(buf)
    }
}

/// Ends a TCP check's connection with a reset (no FIN exchange, no TIME_WAIT) and leaves
/// the socket ready for another connect (`connect(2)` with `AF_UNSPEC`, Linux).
fn disconnect(sock: &Socket) -> io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        // SAFETY: a zeroed sockaddr with family AF_UNSPEC, its own size, a valid socket.
        let mut unspec: libc::sockaddr = unsafe { std::mem::zeroed() };
        unspec.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
        let r = unsafe {
            libc::connect(
                sock.as_raw_fd(),
                &unspec,
                std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
            )
        };
        os_ok(r)
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let _ = sock;
        Err(io::ErrorKind::Unsupported.into())
    }
}

// --------------------------------------------------------------------------- the engine

/// Due checks by grid step: a timing wheel of `WHEEL` steps (5.12 s) from the first step not
/// yet taken, later ones in a heap until they come within reach. Taking and adding are
/// O(1) and touch memory in order (a heap of 10,000 entries missed the cache on each pop).
struct Wheel {
    buckets: Vec<Vec<(u32, u32)>>,
    /// The first step not taken yet.
    next: u64,
    /// Entries in `buckets`.
    len: usize,
    later: BinaryHeap<Reverse<(u64, u32, u32)>>,
}

const WHEEL: u64 = 1024;

/// The grid step at or after `ns`.
fn step_of(ns: u64) -> u64 {
    ns.div_ceil(TICK_NS)
}

impl Wheel {
    fn new(now_ns: u64) -> Wheel {
        Wheel {
            buckets: (0..WHEEL).map(|_| Vec::new()).collect(),
            next: step_of(now_ns),
            len: 0,
            later: BinaryHeap::new(),
        }
    }

    /// Slot `idx` (generation `gen`) is due at `at_ns`.
    fn insert(&mut self, at_ns: u64, idx: u32, gen: u32) {
        self.insert_step(step_of(at_ns), idx, gen);
    }

    fn insert_step(&mut self, step: u64, idx: u32, gen: u32) {
        let step = step.max(self.next);
        if step < self.next + WHEEL {
            self.buckets[(step % WHEEL) as usize].push((idx, gen));
            self.len += 1;
        } else {
            self.later.push(Reverse((step, idx, gen)));
        }
    }

    /// Moves later entries that came within reach into the wheel.
    fn pull(&mut self) {
        while let Some(&Reverse((step, idx, gen))) = self.later.peek() {
            if step >= self.next + WHEEL {
                break;
            }
            self.later.pop();
            self.insert_step(step, idx, gen);
        }
    }

    /// Everything due up to `now_ns`, as (step, slot, gen), into `out`.
    fn take(&mut self, now_ns: u64, out: &mut Vec<(u64, u32, u32)>) {
        let last = now_ns / TICK_NS; // the last step that has begun
        while self.next <= last {
            if self.len == 0 {
                // An empty wheel: skip to where the next later entry comes within reach.
                let reach = self
                    .later
                    .peek()
                    .map_or(u64::MAX, |r| r.0 .0.saturating_sub(WHEEL - 1));
                if reach > self.next {
                    self.next = reach.min(last + 1);
                    self.pull();
                    continue;
                }
            }
            let step = self.next;
            let bucket = &mut self.buckets[(step % WHEEL) as usize];
            self.len -= bucket.len();
            out.extend(bucket.drain(..).map(|(i, g)| (step, i, g)));
            self.next += 1;
            self.pull();
        }
    }

    /// The first step that has something, if any.
    fn first(&self) -> Option<u64> {
        let mut first = self.later.peek().map(|r| r.0 .0);
        if self.len > 0 {
            for step in self.next..self.next + WHEEL {
                if first.is_some_and(|f| f <= step) {
                    break;
                }
                if !self.buckets[(step % WHEEL) as usize].is_empty() {
                    first = Some(step);
                    break;
                }
            }
        }
        first
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Waiting for its due time.
    Idle,
    /// Due, waiting for one of the `concurrency` places.
    Queued,
    Resolving,
    /// HTTP: connecting and writing the request (bytes written so far).
    Sending(usize),
    /// HTTP: reading the answer.
    Reading,
    /// TCP: a connection that was not established at once.
    TcpConnecting,
}

impl State {
    fn in_flight(self) -> bool {
        !matches!(self, State::Idle | State::Queued)
    }
}

struct Conn {
    sock: Socket,
    /// Low half of its epoll token.
    id: u32,
    /// The connection carried a request (a later error is not a connect error).
    established: bool,
}

/// One checked server.
struct Slot {
    /// Tells this slot from earlier ones at the same index (heap and queue entries).
    gen: u32,
    upstream: String,
    address: String,
    stats: Arc<ServerStats>,
    check: HealthCheck,
    target: Target,
    request: Box<[u8]>,
    head_only: bool,
    state: State,
    /// When the next check is due (its entry in the wheel).
    due_at: u64,
    /// The check in flight: its deadline and its place in `Engine::inflight`.
    deadline: u64,
    pos: usize,
    seq: u32,
    /// The check in flight uses a kept connection (then it may be retried on a new one).
    reused: bool,
    conn: Option<Conn>,
    /// TCP: where the connection in progress goes.
    peer: Option<SocketAddr>,
    /// Bytes of an answer that did not come in one read.
    partial: Vec<u8>,
    /// A named server: its addresses for the check in flight and the one being tried.
    addrs: Vec<SocketAddr>,
    addr_at: usize,
    resolve_error: String,
    passes: u32,
    fails: u32,
    /// The outcome last written to the record.
    last: Option<Outcome>,
    #[cfg(test)]
    checks: u64,
    #[cfg(test)]
    panic_next: bool,
}

/// Name lookups, off the loop (the runtime's blocking threads).
struct Resolver {
    runtime: Option<tokio::runtime::Runtime>,
    #[allow(clippy::type_complexity)]
    done: Arc<Mutex<Vec<(u32, u32, io::Result<Vec<SocketAddr>>)>>>,
    thread: std::thread::Thread,
}

impl Resolver {
    fn lookup(&mut self, idx: u32, seq: u32, name: Arc<str>) {
        let done = self.done.clone();
        let thread = self.thread.clone();
        let job = move || {
            let r = (*name).to_socket_addrs().map(|a| a.collect());
            done.lock().push((idx, seq, r));
            thread.unpark();
        };
        if self.runtime.is_none() {
            self.runtime = tokio::runtime::Builder::new_current_thread()
                .thread_name("dynagate-health-dns")
                .max_blocking_threads(16)
                .build()
                .ok();
        }
        match &self.runtime {
            Some(rt) => {
                drop(rt.spawn_blocking(job)); // detached: the job reports by itself
            }
            None => self.done.lock().push((
                idx,
                seq,
                Err(io::Error::other("no thread for name lookups")),
            )),
        }
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

const READ: u8 = 1;
const WRITE: u8 = 2;
const HUP: u8 = 4;

struct Engine {
    poll: Poll,
    events: Events,
    ready: Vec<(usize, u8)>,
    base: Instant,
    now_ns: u64,
    now_unix_ms: u64,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    by_upstream: HashMap<String, HashMap<String, usize>>,
    next_gen: u32,
    next_seq: u32,
    next_conn: u32,
    /// (slot, gen) by due step; entries of removed or rescheduled slots are skipped.
    due: Wheel,
    taken: Vec<(u64, u32, u32)>,
    queued: VecDeque<(u32, u32)>,
    /// Slots with a check in flight.
    inflight: Vec<u32>,
    limit: usize,
    /// Idle TCP check sockets by [address family][half-open].
    pool: [[Vec<Socket>; 2]; 2],
    scratch: Box<[u8]>,
    dns: Resolver,
}

impl Engine {
    fn new(limit: usize) -> io::Result<Engine> {
        Ok(Engine {
            poll: Poll::new()?,
            events: Events::with_capacity(EVENTS),
            ready: Vec::with_capacity(EVENTS),
            base: Instant::now(),
            now_ns: 0,
            now_unix_ms: unix_ms(),
            slots: Vec::new(),
            free: Vec::new(),
            by_upstream: HashMap::new(),
            next_gen: 0,
            next_seq: 0,
            next_conn: 0,
            due: Wheel::new(0),
            taken: Vec::new(),
            queued: VecDeque::new(),
            inflight: Vec::new(),
            limit,
            pool: Default::default(),
            scratch: vec![0; SCRATCH].into_boxed_slice(),
            dns: Resolver {
                runtime: None,
                done: Arc::new(Mutex::new(Vec::new())),
                thread: std::thread::current(),
            },
        })
    }

    fn set_now(&mut self, now: Instant) {
        self.now_ns = now.saturating_duration_since(self.base).as_nanos() as u64;
        self.now_unix_ms = unix_ms();
    }

    fn slot(&mut self, idx: usize) -> &mut Slot {
        self.slots[idx].as_mut().expect("a live slot")
    }

    fn has(&self, upstream: &str, address: &str) -> bool {
        self.by_upstream
            .get(upstream)
            .is_some_and(|m| m.contains_key(address))
    }

    fn add(
        &mut self,
        upstream: &str,
        address: &str,
        stats: Arc<ServerStats>,
        check: HealthCheck,
        target: Target,
    ) {
        let idx = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        self.next_gen = self.next_gen.wrapping_add(1);
        let gen = self.next_gen;
        // Spread the first checks over one interval so they never come in a burst.
        let interval = (check.interval.as_nanos() as u64).max(1);
        let first = self.now_ns + crate::balance::random_u64() % interval;
        self.slots[idx] = Some(Slot {
            gen,
            upstream: upstream.to_string(),
            address: address.to_string(),
            stats,
            request: render_request(&check, address),
            head_only: check.method == "HEAD",
            check,
            target,
            state: State::Idle,
            due_at: first,
            deadline: 0,
            pos: 0,
            seq: 0,
            reused: false,
            conn: None,
            peer: None,
            partial: Vec::new(),
            addrs: Vec::new(),
            addr_at: 0,
            resolve_error: String::new(),
            passes: 0,
            fails: 0,
            last: None,
            #[cfg(test)]
            checks: 0,
            #[cfg(test)]
            panic_next: false,
        });
        self.due.insert(first, idx as u32, gen);
        self.by_upstream
            .entry(upstream.to_string())
            .or_default()
            .insert(address.to_string(), idx);
    }

    /// Removes the checks of `upstream` for which `remove(address, slot)` says so.
    fn remove_upstream(&mut self, upstream: &str, mut remove: impl FnMut(&str, &Slot) -> bool) {
        let Some(servers) = self.by_upstream.get_mut(upstream) else {
            return;
        };
        let mut gone = Vec::new();
        servers.retain(|addr, idx| {
            let drop = match &self.slots[*idx] {
                Some(s) => remove(addr, s),
                None => true,
            };
            if drop {
                gone.push(*idx);
            }
            !drop
        });
        if servers.is_empty() {
            self.by_upstream.remove(upstream);
        }
        for idx in gone {
            if let Some(slot) = self.slots[idx].take() {
                if slot.state.in_flight() {
                    self.unlink(slot.pos);
                }
                self.free.push(idx);
                // Its connection closes here; its heap and queue entries are skipped.
            }
        }
    }

    /// Takes a slot off the in-flight list.
    fn unlink(&mut self, pos: usize) {
        self.inflight.swap_remove(pos);
        if let Some(&moved) = self.inflight.get(pos) {
            if let Some(s) = self.slots[moved as usize].as_mut() {
                s.pos = pos;
            }
        }
    }

    /// One pass: answers, lookups, deadlines, due checks. Returns when to come back.
    fn turn(&mut self, now: Instant) -> Option<Instant> {
        self.set_now(now);
        self.harvest();
        self.resolved();
        self.expire();
        self.start_due();
        self.next_wake()
    }

    fn next_wake(&self) -> Option<Instant> {
        let mut next = u64::MAX;
        if let Some(step) = self.due.first() {
            next = step * TICK_NS;
        }
        if !self.inflight.is_empty() {
            // Answers and deadlines are looked at once per step.
            next = next.min(self.now_ns + TICK_NS);
        }
        if next == u64::MAX {
            return None;
        }
        let next = next.max(self.now_ns + 1).div_ceil(TICK_NS) * TICK_NS;
        Some(self.base + Duration::from_nanos(next))
    }

    /// Runs `f` for one slot; if it panics, that check is logged and started again.
    fn guard(&mut self, idx: usize, f: impl FnOnce(&mut Engine)) {
        if catch_unwind(AssertUnwindSafe(|| f(self))).is_err() {
            self.crashed(idx);
        }
    }

    fn crashed(&mut self, idx: usize) {
        if let Some(p) = self.inflight.iter().position(|&i| i as usize == idx) {
            self.unlink(p);
        }
        let now = self.now_ns;
        let Some(slot) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
            return;
        };
        tracing::error!(upstream = %slot.upstream, server = %slot.address,
            "health check crashed; starting it again");
        slot.conn = None;
        slot.partial = Vec::new();
        slot.state = State::Idle;
        slot.due_at = now + slot.check.interval.as_nanos() as u64;
        self.due.insert(slot.due_at, idx as u32, slot.gen);
    }

    fn harvest(&mut self) {
        loop {
            if let Err(e) = self.poll.poll(&mut self.events, Some(Duration::ZERO)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::warn!(error = %e, "health checker: epoll failed");
                }
                return;
            }
            let mut ready = std::mem::take(&mut self.ready);
            ready.clear();
            for ev in self.events.iter() {
                let mut flags = 0;
                if ev.is_readable() {
                    flags |= READ;
                }
                if ev.is_writable() {
                    flags |= WRITE;
                }
                if ev.is_read_closed() || ev.is_write_closed() || ev.is_error() {
                    flags |= HUP;
                }
                ready.push((ev.token().0, flags));
            }
            for &(token, flags) in &ready {
                let idx = token >> 32;
                self.guard(idx, |e| e.on_event(idx, token as u32, flags));
            }
            let full = ready.len() == EVENTS;
            self.ready = ready;
            if !full {
                return;
            }
        }
    }

    fn on_event(&mut self, idx: usize, id: u32, flags: u8) {
        let Some(Some(slot)) = self.slots.get_mut(idx) else {
            return;
        };
        let Some(conn) = slot.conn.as_ref() else {
            return;
        };
        if conn.id != id {
            return;
        }
        match slot.state {
            // A kept connection between checks: closed by the server, or sent something
            // unasked: not used again.
            State::Idle | State::Queued => {
                if flags & HUP != 0 {
                    slot.conn = None;
                } else if flags & READ != 0 {
                    let mut b = [0u8; 1];
                    let r = (&conn.sock).read(&mut b);
                    match r {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        _ => slot.conn = None,
                    }
                }
            }
            State::Sending(_) if flags & (WRITE | HUP) != 0 => self.send_request(idx),
            State::Reading if flags & (READ | HUP) != 0 => self.read_answer(idx, flags & HUP != 0),
            State::TcpConnecting if flags & (WRITE | HUP) != 0 => self.tcp_progress(idx),
            _ => {}
        }
    }

    fn resolved(&mut self) {
        let done = std::mem::take(&mut *self.dns.done.lock());
        for (idx, seq, result) in done {
            let idx = idx as usize;
            let live = matches!(self.slots.get(idx), Some(Some(s)) if s.seq == seq && s.state == State::Resolving);
            if !live {
                continue;
            }
            self.guard(idx, |e| {
                let slot = e.slot(idx);
                match result {
                    Ok(addrs) if !addrs.is_empty() => {
                        let first = addrs[0];
                        slot.addrs = addrs;
                        slot.addr_at = 0;
                        e.connect(idx, first);
                    }
                    Ok(_) => {
                        slot.resolve_error = "no addresses".into();
                        e.finish(idx, Outcome::Resolve);
                    }
                    Err(err) => {
                        slot.resolve_error = err.to_string();
                        e.finish(idx, Outcome::Resolve);
                    }
                }
            });
        }
    }

    fn expire(&mut self) {
        let now = self.now_ns;
        let late: Vec<usize> = self
            .inflight
            .iter()
            .map(|&i| i as usize)
            .filter(|&i| self.slots[i].as_ref().is_some_and(|s| s.deadline <= now))
            .collect();
        for idx in late {
            // A hung connection is not reused (`finish` drops it).
            self.guard(idx, |e| e.finish(idx, Outcome::Timeout));
        }
    }

    fn start_due(&mut self) {
        while self.inflight.len() < self.limit {
            let Some((idx, gen)) = self.queued.pop_front() else {
                break;
            };
            let idx = idx as usize;
            if matches!(self.slots.get(idx), Some(Some(s)) if s.gen == gen && s.state == State::Queued)
            {
                self.guard(idx, |e| e.start(idx));
            }
        }
        let mut taken = std::mem::take(&mut self.taken);
        self.due.take(self.now_ns, &mut taken);
        for (step, idx, gen) in taken.drain(..) {
            let idx = idx as usize;
            let full = self.inflight.len() >= self.limit;
            let Some(Some(slot)) = self.slots.get_mut(idx) else {
                continue;
            };
            // Not this slot any more, or rescheduled since.
            if slot.gen != gen || slot.state != State::Idle || step_of(slot.due_at) > step {
                continue;
            }
            if full {
                slot.state = State::Queued;
                self.queued.push_back((idx as u32, gen));
                continue;
            }
            self.guard(idx, |e| e.start(idx));
        }
        self.taken = taken;
    }

    fn start(&mut self, idx: usize) {
        self.next_seq = self.next_seq.wrapping_add(1);
        let (seq, now, pos) = (self.next_seq, self.now_ns, self.inflight.len());
        let slot = self.slot(idx);
        #[cfg(test)]
        if std::mem::take(&mut slot.panic_next) {
            panic!("a health check panics (test)");
        }
        slot.seq = seq;
        slot.deadline = now + slot.check.timeout.as_nanos() as u64;
        slot.pos = pos;
        slot.reused = false;
        slot.addrs.clear();
        slot.addr_at = 0;
        slot.state = State::Resolving; // in flight; set properly below
        let kept = slot.check.kind == CheckKind::Http && slot.conn.is_some();
        self.inflight.push(idx as u32);
        if kept {
            let slot = self.slot(idx);
            slot.reused = true;
            slot.state = State::Sending(0);
            self.send_request(idx);
        } else {
            self.slot(idx).conn = None;
            self.begin_connect(idx);
        }
    }

    fn begin_connect(&mut self, idx: usize) {
        let slot = self.slot(idx);
        match &slot.target {
            Target::Addr(a) => {
                let a = *a;
                self.connect(idx, a);
            }
            Target::Name(n) => {
                let n = n.clone();
                slot.state = State::Resolving;
                let seq = slot.seq;
                self.dns.lookup(idx as u32, seq, n);
            }
        }
    }

    /// The connection to this address failed: the next address of a name, or the verdict.
    fn connect_failed(&mut self, idx: usize, e: io::Error) {
        let slot = self.slot(idx);
        slot.conn = None;
        if slot.addr_at + 1 < slot.addrs.len() {
            slot.addr_at += 1;
            let next = slot.addrs[slot.addr_at];
            self.connect(idx, next);
        } else {
            self.finish(idx, Outcome::Connect(errno(&e)));
        }
    }

    fn connect(&mut self, idx: usize, addr: SocketAddr) {
        match self.slot(idx).check.kind {
            CheckKind::Http => self.connect_http(idx, addr),
            CheckKind::Tcp => self.connect_tcp(idx, addr),
        }
    }

    fn register(&mut self, idx: usize, sock: &Socket) -> io::Result<u32> {
        self.next_conn = self.next_conn.wrapping_add(1);
        let id = self.next_conn;
        self.poll.registry().register(
            &mut SourceFd(&sock.as_raw_fd()),
            Token((idx << 32) | id as usize),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        Ok(id)
    }

    /// Registers a connecting socket with epoll and makes it the slot's connection in
    /// `state`; false (the check failed) when epoll refuses it.
    fn attach(&mut self, idx: usize, sock: Socket, state: State) -> bool {
        let id = match self.register(idx, &sock) {
            Ok(id) => id,
            Err(e) => {
                self.connect_failed(idx, e);
                return false;
            }
        };
        let slot = self.slot(idx);
        slot.conn = Some(Conn {
            sock,
            id,
            established: false,
        });
        slot.state = state;
        true
    }

    fn connect_http(&mut self, idx: usize, addr: SocketAddr) {
        let sock = match new_socket(addr) {
            Ok(s) => s,
            Err(e) => return self.connect_failed(idx, e),
        };
        match sock.connect(&SockAddr::from(addr)) {
            Ok(()) => {}
            Err(e) if in_progress(&e) => {}
            Err(e) => return self.connect_failed(idx, e),
        }
        if !self.attach(idx, sock, State::Sending(0)) {
            return;
        }
        // On a near server the handshake is over by now: write at once.
        self.send_request(idx);
    }

    fn send_request(&mut self, idx: usize) {
        let slot = self.slot(idx);
        let State::Sending(mut written) = slot.state else {
            return;
        };
        let Some(conn) = slot.conn.as_mut() else {
            return;
        };
        let error = loop {
            match send(&conn.sock, &slot.request[written..]) {
                Ok(n) => {
                    conn.established = true;
                    written += n;
                    if written == slot.request.len() {
                        slot.state = State::Reading;
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    slot.state = State::Sending(written);
                    return;
                }
                Err(e) => break e,
            }
        };
        if !conn.established {
            // Never connected: the reason is the socket's error.
            let e = conn.sock.take_error().ok().flatten().unwrap_or(error);
            self.connect_failed(idx, e);
        } else if slot.reused {
            self.stale(idx);
        } else {
            self.finish(idx, Outcome::Request(errno(&error)));
        }
    }

    /// A kept connection the server had closed: once more on a new one.
    fn stale(&mut self, idx: usize) {
        let slot = self.slot(idx);
        slot.conn = None;
        slot.reused = false;
        slot.partial.clear();
        self.begin_connect(idx);
    }

    fn read_answer(&mut self, idx: usize, hup: bool) {
        loop {
            let Engine { slots, scratch, .. } = self;
            let slot = slots[idx].as_mut().expect("a live slot");
            let Some(conn) = slot.conn.as_ref() else {
                return;
            };
            let r = (&conn.sock).read(scratch);
            let (n, eof) = match r {
                Ok(0) => (0, true),
                Ok(n) => (n, false),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.finish(idx, Outcome::Read(errno(&e))),
            };
            let needle = slot.check.body_contains.as_deref().map(str::as_bytes);
            let parsed = if slot.partial.is_empty() {
                parse(&scratch[..n], eof, slot.head_only, needle)
            } else {
                slot.partial.extend_from_slice(&scratch[..n]);
                parse(&slot.partial, eof, slot.head_only, needle)
            };
            match parsed {
                Parsed::More => {
                    if slot.partial.is_empty() {
                        slot.partial.extend_from_slice(&scratch[..n]);
                    }
                    // A read that did not fill the buffer emptied the socket: the rest
                    // comes with another event.
                    if n < scratch.len() && !hup {
                        return;
                    }
                }
                Parsed::ClosedEarly if slot.reused => return self.stale(idx),
                Parsed::ClosedEarly => return self.finish(idx, Outcome::Closed),
                Parsed::Fail(o) => return self.finish(idx, o),
                Parsed::Done {
                    status,
                    found,
                    keep,
                } => {
                    let check = &slot.check;
                    let status_ok = if check.expected_statuses.is_empty() {
                        (200..400).contains(&status)
                    } else {
                        check.expected_statuses.contains(&status)
                    };
                    let outcome = if !status_ok {
                        Outcome::Status(status)
                    } else if check.body_contains.is_some() && !found {
                        Outcome::BodyLacks(status)
                    } else {
                        Outcome::Http(status)
                    };
                    if !keep || hup || eof {
                        slot.conn = None;
                    }
                    return self.finish(idx, outcome);
                }
            }
        }
    }

    fn connect_tcp(&mut self, idx: usize, addr: SocketAddr) {
        let family = addr.is_ipv6() as usize;
        let half = pool_half(&self.slot(idx).check);
        let sock = match self.pool[family][half].pop() {
            Some(s) => s,
            None => match new_socket(addr).and_then(|s| {
                if half == 1 {
                    defer_last_ack(&s)?;
                }
                #[cfg(any(target_os = "linux", target_os = "android"))]
                pin_source_port(&s, addr);
                Ok(s)
            }) {
                Ok(s) => s,
                Err(e) => return self.connect_failed(idx, e),
            },
        };
        let to = SockAddr::from(addr);
        let r = match sock.connect(&to) {
            // A near server has answered the SYN before connect(2) returned: asking again
            // says so (EISCONN) without waiting for an event.
            Err(e) if in_progress(&e) => match sock.connect(&to) {
                Err(e) if e.raw_os_error() == Some(libc::EISCONN) => Ok(()),
                r => r,
            },
            r => r,
        };
        match r {
            Ok(()) => self.tcp_ok(idx, sock, Some((family, half))),
            Err(e) if in_progress(&e) => {
                if self.attach(idx, sock, State::TcpConnecting) {
                    self.slot(idx).peer = Some(addr);
                }
            }
            Err(e) => self.connect_failed(idx, e),
        }
    }

    fn tcp_progress(&mut self, idx: usize) {
        let slot = self.slot(idx);
        let (Some(conn), Some(peer)) = (slot.conn.as_ref(), slot.peer) else {
            return;
        };
        match conn.sock.connect(&SockAddr::from(peer)) {
            Err(e) if in_progress(&e) => return,
            Err(e) if e.raw_os_error() != Some(libc::EISCONN) => {
                return self.connect_failed(idx, e)
            }
            _ => {} // established (Ok or EISCONN)
        }
        let half = pool_half(&slot.check);
        let conn = slot.conn.take().expect("a connection");
        // Out of epoll, the socket can go back to the pool (its old token's late events
        // no longer match a connection id).
        let fd = conn.sock.as_raw_fd();
        let pool = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&fd))
            .ok()
            .map(|()| (peer.is_ipv6() as usize, half));
        self.tcp_ok(idx, conn.sock, pool);
    }

    /// A TCP check passed: reset the connection; keep the socket for the next check when
    /// `pool` says so (it is not registered with epoll).
    fn tcp_ok(&mut self, idx: usize, sock: Socket, pool: Option<(usize, usize)>) {
        match disconnect(&sock) {
            Ok(()) => match pool {
                Some((f, h)) if self.pool[f][h].len() < POOL_MAX => self.pool[f][h].push(sock),
                _ => {} // closes quietly: nothing left to end
            },
            Err(_) => {
                let _ = sock.set_linger(Some(Duration::ZERO)); // close with a reset
            }
        }
        self.finish(idx, Outcome::Tcp);
    }

    /// Records a check's outcome, applies rise/fall, schedules the next check.
    fn finish(&mut self, idx: usize, outcome: Outcome) {
        let (now, now_ms) = (self.now_ns, self.now_unix_ms);
        let slot = self.slots[idx].as_mut().expect("a live slot");
        let pos = slot.pos;
        let was_in_flight = slot.state.in_flight();
        slot.state = State::Idle;
        let ok = outcome.ok();
        if !ok {
            slot.conn = None;
        }
        if slot.partial.capacity() > SCRATCH {
            slot.partial = Vec::new();
        } else {
            slot.partial.clear();
        }
        // The record's message is rewritten only when the outcome changes.
        let changed = (slot.last != Some(outcome) || outcome == Outcome::Resolve)
            .then(|| (ok, outcome.message(&slot.check, &slot.resolve_error)));
        slot.last = Some(outcome);
        slot.stats.record_check(now_ms, changed);
        #[cfg(test)]
        {
            slot.checks += 1;
        }

        let health = slot.stats.health();
        if ok {
            slot.passes += 1;
            slot.fails = 0;
            if health == Health::Unchecked
                || (health == Health::Unhealthy && slot.passes >= slot.check.rise)
            {
                if health == Health::Unhealthy {
                    tracing::info!(server = %slot.address, "health check: server is healthy again");
                }
                slot.stats.set_health(Health::Healthy);
            }
        } else {
            slot.fails += 1;
            slot.passes = 0;
            if health != Health::Unhealthy && slot.fails >= slot.check.fall {
                let reason = outcome.message(&slot.check, &slot.resolve_error);
                tracing::warn!(server = %slot.address, reason = %reason, "health check: server is unhealthy");
                slot.stats.set_health(Health::Unhealthy);
            }
        }

        // The next check is one (jittered) interval after this one was due, so late
        // wake-ups do not stretch the period; but at least half an interval after a check
        // that took long (a hung server is not checked back to back).
        let interval = slot.check.interval.as_nanos() as u64;
        slot.due_at = (slot.due_at + jitter(slot.check.interval, 0.1).as_nanos() as u64)
            .max(now + interval / 2)
            .max(now + 1);
        self.due.insert(slot.due_at, idx as u32, slot.gen);
        if was_in_flight {
            self.unlink(pos);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynagate_model::{Server, Upstream};
    use std::io::Write;
    use std::net::TcpListener;

    fn snapshot_with(check: Option<HealthCheck>) -> Snapshot {
        let mut spec = Upstream::new(
            "u",
            vec![Server::new("127.0.0.1:9"), Server::new("127.0.0.1:10")],
        );
        spec.health_check = check;
        let mut snap = Snapshot::default();
        snap.upstreams.insert(
            "u".into(),
            Arc::new(UpstreamRuntime::build(Arc::new(spec), None)),
        );
        snap
    }

    fn check(json: &str) -> HealthCheck {
        serde_json::from_str(json).unwrap()
    }

    fn tcp_check() -> HealthCheck {
        check(r#"{"type":"tcp","interval":"1s","timeout":"100ms"}"#)
    }

    /// A server answering the requests on each accepted connection with the next canned
    /// responses of that connection, then closing it (`None`: closing it after reading the
    /// next request).
    fn canned(conns: Vec<Vec<Option<&'static [u8]>>>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for responses in conns {
                let (mut s, _) = listener.accept().unwrap();
                for r in responses {
                    let mut buf = [0u8; 1024];
                    if s.read(&mut buf).unwrap_or(0) == 0 {
                        break;
                    }
                    match r {
                        Some(r) => s.write_all(r).unwrap(),
                        None => break,
                    }
                }
            }
        });
        addr
    }

    fn engine_with(check: HealthCheck, addr: SocketAddr) -> (Engine, usize, Arc<ServerStats>) {
        let mut e = Engine::new(8).unwrap();
        let stats = Arc::new(ServerStats::new_now());
        e.add(
            "u",
            &addr.to_string(),
            stats.clone(),
            check,
            Target::Addr(addr),
        );
        let idx = e.by_upstream["u"][&addr.to_string()];
        (e, idx, stats)
    }

    /// Turns the engine until `done` (checks start on the 5 ms grid).
    fn turn_until(e: &mut Engine, mut done: impl FnMut(&mut Engine) -> bool) {
        let until = Instant::now() + Duration::from_secs(10);
        while !done(e) {
            assert!(Instant::now() < until, "never happened");
            e.turn(Instant::now());
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Makes the slot's check due now and turns the engine until it has finished.
    /// Makes the checks of `idxs` due now (the next turn starts them).
    fn due_now(e: &mut Engine, idxs: impl IntoIterator<Item = usize>) {
        e.set_now(Instant::now());
        let now = e.now_ns;
        for idx in idxs {
            let slot = e.slot(idx);
            slot.due_at = now;
            let gen = slot.gen;
            e.due.insert(now, idx as u32, gen);
        }
    }

    fn check_now(e: &mut Engine, idx: usize) -> Outcome {
        let before = e.slot(idx).checks;
        due_now(e, [idx]);
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            e.turn(Instant::now());
            let slot = e.slot(idx);
            if slot.checks > before {
                return slot.last.unwrap();
            }
            assert!(Instant::now() < until, "the check never finished");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn wheel_hands_out_due_entries_in_time() {
        let ms = |n: u64| n * 1_000_000;
        let mut w = Wheel::new(0);
        assert_eq!(w.first(), None);
        w.insert(ms(12), 1, 0);
        w.insert(ms(3), 2, 0);
        w.insert(ms(60_000), 3, 0); // beyond the wheel
        w.insert(ms(5), 4, 0);
        assert_eq!(w.first(), Some(1), "3 ms falls on the 5 ms step");
        let mut out = Vec::new();
        w.take(ms(4), &mut out);
        assert!(out.is_empty());
        w.take(ms(5), &mut out);
        assert_eq!(out, vec![(1, 2, 0), (1, 4, 0)]);
        out.clear();
        w.take(ms(14), &mut out);
        assert!(out.is_empty());
        w.take(ms(15), &mut out);
        assert_eq!(out, vec![(3, 1, 0)]);
        out.clear();
        assert_eq!(w.first(), Some(12_000));
        // A long sleep: the far entry comes out, once.
        w.take(ms(3_600_000), &mut out);
        assert_eq!(out, vec![(12_000, 3, 0)]);
        out.clear();
        // Late entries go to the next step.
        w.insert(ms(1), 5, 0);
        assert_eq!(w.first(), Some(720_001));
        w.take(ms(3_600_005), &mut out);
        assert_eq!(out, vec![(720_001, 5, 0)]);
        assert_eq!(w.first(), None);
    }

    #[test]
    fn parse_reads_each_framing() {
        let ok = Some(&b"ok"[..]);
        let done = |status, found, keep| Parsed::Done {
            status,
            found,
            keep,
        };
        let p = |b: &[u8], eof| parse(b, eof, false, ok);
        assert_eq!(
            p(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false),
            done(200, true, true)
        );
        assert_eq!(
            p(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nok", false),
            Parsed::More
        );
        assert_eq!(
            p(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nok", true),
            Parsed::Fail(Outcome::ClosedInBody)
        );
        assert_eq!(
            p(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnope", false),
            done(200, false, true)
        );
        assert_eq!(p(b"HTTP/1.1 200 OK\r\nContent-", false), Parsed::More);
        assert_eq!(p(b"HTTP/1.1 200 OK\r\nContent-", true), Parsed::ClosedEarly);
        assert_eq!(p(b"", true), Parsed::ClosedEarly);
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\no\r\n1\r\nk\r\n0\r\n\r\n";
        assert_eq!(p(chunked, false), done(200, true, true));
        assert_eq!(p(&chunked[..chunked.len() - 3], false), Parsed::More);
        assert_eq!(
            p(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                false
            ),
            Parsed::Fail(Outcome::BadChunked("invalid chunk size line"))
        );
        assert_eq!(
            p(
                b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nok then",
                false
            ),
            Parsed::More
        );
        assert_eq!(
            p(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nok then", true),
            done(200, true, false)
        );
        assert_eq!(
            p(
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
                false
            ),
            done(200, true, false)
        );
        assert_eq!(
            parse(b"HTTP/1.1 204 No Content\r\n\r\n", false, false, None),
            done(204, false, true)
        );
        assert_eq!(
            parse(
                b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
                false,
                true,
                None
            ),
            done(200, false, true),
            "HEAD"
        );
        assert_eq!(
            p(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", false),
            Parsed::Fail(Outcome::BadContentLength)
        );
        assert!(matches!(
            p(b"HTTP/1.1 2000 OK\r\n\r\n", false),
            Parsed::Fail(Outcome::BadResponse(_))
        ));
        // Bytes after the response: not reused.
        assert_eq!(
            p(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP", false),
            done(200, true, false)
        );
        // A body larger than what is looked at.
        let mut big = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n".to_vec();
        big.resize(big.len() + MAX_BODY + 1, b'x');
        assert_eq!(p(&big, false), done(200, false, false));
    }

    // The cases below were found by the fuzz target `health_response` (fuzz/).

    /// Reads `raw` whole, looking for "ok".
    fn parse_ok(raw: &[u8]) -> Parsed {
        parse(raw, false, false, Some(b"ok"))
    }

    #[test]
    fn chunk_sizes_that_overflow_fail_the_check() {
        // `1 + ffffffffffffffff` overflowed the running total: a panic, and in a release
        // build a wrapped length that read past the chunk.
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\no\r\nffffffffffffffff\r\nk\r\n0\r\n\r\n";
        assert_eq!(
            parse_ok(raw),
            Parsed::Fail(Outcome::BadChunked("chunk size too large"))
        );
        assert_eq!(
            parse(raw, true, false, None),
            Parsed::Fail(Outcome::BadChunked("chunk size too large"))
        );
    }

    #[test]
    fn chunked_bodies_are_read_strictly() {
        let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        let with = |body: &[u8]| parse_ok(&[&head[..], body].concat());
        // Data not followed by CRLF was skipped over, whatever the two bytes were.
        assert_eq!(
            with(b"2\r\nokXX0\r\n\r\n"),
            Parsed::Fail(Outcome::BadChunked("chunk data longer than its size"))
        );
        for bad in [
            &b"+2\r\nok\r\n0\r\n\r\n"[..],
            b" 2\r\nok\r\n0\r\n\r\n",
            b"5 3\r\nhello\r\n0\r\n\r\n",
        ] {
            assert!(
                matches!(with(bad), Parsed::Fail(Outcome::BadChunked(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // Extensions and trailers are valid chunked coding: read, and the connection kept.
        assert_eq!(
            with(b"2;a=b\r\nok\r\n0\r\nX-T: 1\r\n\r\n"),
            Parsed::Done {
                status: 200,
                found: true,
                keep: true
            }
        );
    }

    #[test]
    fn content_length_is_read_strictly() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
        ] {
            assert_eq!(
                parse_ok(bad),
                Parsed::Fail(Outcome::BadContentLength),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            parse_ok(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok"),
            Parsed::Done {
                status: 200,
                found: true,
                keep: true
            }
        );
    }

    #[test]
    fn transfer_encoding_wins_over_content_length() {
        let done = |found, keep| Parsed::Done {
            status: 200,
            found,
            keep,
        };
        // Whichever header came last decided, and the connection was kept either way.
        for raw in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n2\r\nok\r\n0\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        ] {
            assert_eq!(parse_ok(raw), done(true, false));
        }
        // A coding other than chunked (or several) is read until the close, not as chunked.
        let gzip = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n2\r\nok\r\n0\r\n\r\n";
        assert_eq!(parse_ok(gzip), Parsed::More);
        assert_eq!(parse(gzip, true, false, Some(b"ok")), done(true, false));
        let twice = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(parse_ok(twice), Parsed::More);
    }

    #[test]
    fn connection_close_among_other_tokens() {
        assert_eq!(
            parse_ok(
                b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 2\r\n\r\nok"
            ),
            Parsed::Done {
                status: 200,
                found: true,
                keep: false
            }
        );
    }

    #[test]
    fn only_max_body_bytes_are_looked_at() {
        // Whether a text past MAX_BODY was found depended on how much had arrived.
        let mut raw = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        raw.resize(raw.len() + MAX_BODY, b'x');
        raw.extend_from_slice(b"ok");
        assert_eq!(
            parse_ok(&raw),
            Parsed::Done {
                status: 200,
                found: false,
                keep: false
            }
        );
    }

    #[test]
    fn http_checks_keep_their_connection_and_retry_a_stale_one() {
        let c = check(r#"{"type":"http","body_contains":"ok","timeout":"5s"}"#);
        let addr = canned(vec![vec![
            Some(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
            Some(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\no\r\n1\r\nk\r\n0\r\n\r\n"),
            Some(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\nok"),
        ]]);
        let (mut e, idx, stats) = engine_with(c.clone(), addr);
        assert_eq!(check_now(&mut e, idx), Outcome::Http(200));
        assert!(e.slot(idx).conn.is_some(), "kept alive");
        assert_eq!(stats.health(), Health::Healthy);
        let first = e.slot(idx).conn.as_ref().unwrap().id;
        assert_eq!(check_now(&mut e, idx), Outcome::Http(200), "chunked");
        assert_eq!(
            e.slot(idx).conn.as_ref().unwrap().id,
            first,
            "same connection"
        );
        assert_eq!(check_now(&mut e, idx), Outcome::Status(503));
        assert!(e.slot(idx).conn.is_none(), "dropped after a failure");
        let last = stats.last_check().unwrap();
        assert!(!last.ok);
        assert!(last.message.contains("503"), "{}", last.message);

        // Close-delimited body; a body without the text; no body.
        let addr = canned(vec![vec![Some(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall ok",
        )]]);
        let (mut e, idx, _) = engine_with(c.clone(), addr);
        assert_eq!(check_now(&mut e, idx), Outcome::Http(200));
        assert!(e.slot(idx).conn.is_none());
        let addr = canned(vec![vec![Some(
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnope",
        )]]);
        let (mut e, idx, stats) = engine_with(c.clone(), addr);
        assert_eq!(check_now(&mut e, idx), Outcome::BodyLacks(200));
        assert!(stats.last_check().unwrap().message.contains("lacks"));
        let mut c204 = c.clone();
        c204.body_contains = None;
        let addr = canned(vec![vec![Some(b"HTTP/1.1 204 No Content\r\n\r\n")]]);
        let (mut e, idx, _) = engine_with(c204.clone(), addr);
        assert_eq!(check_now(&mut e, idx), Outcome::Http(204));

        // The server closes the kept connection just as the next request comes: that
        // check is made again on a new connection.
        let addr = canned(vec![
            vec![Some(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), None],
            vec![Some(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")],
        ]);
        let (mut e, idx, _) = engine_with(c204, addr);
        assert_eq!(check_now(&mut e, idx), Outcome::Http(200));
        assert_eq!(check_now(&mut e, idx), Outcome::Http(200), "retried");
    }

    #[test]
    fn hung_server_fails_on_its_deadline_and_others_go_on() {
        // Accepts, never answers.
        let hung = TcpListener::bind("127.0.0.1:0").unwrap();
        let hung_addr = hung.local_addr().unwrap();
        let c = check(r#"{"type":"http","timeout":"100ms","interval":"1s"}"#);
        let (mut e, idx, stats) = engine_with(c.clone(), hung_addr);
        let good = canned(vec![vec![Some(
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        )]]);
        e.add(
            "u",
            &good.to_string(),
            Arc::new(ServerStats::new_now()),
            c,
            Target::Addr(good),
        );
        let good_idx = e.by_upstream["u"][&good.to_string()];
        // Not its first check at a random offset: the canned server answers one check.
        e.slot(good_idx).due_at = u64::MAX / 2;
        assert_eq!(check_now(&mut e, idx), Outcome::Timeout);
        assert!(
            e.slot(idx).conn.is_none(),
            "a hung connection is not reused"
        );
        assert!(stats.last_check().unwrap().message.contains("no answer"));
        // Another check meanwhile is not held up by a hung one.
        e.slot(idx).check.timeout = Duration::from_secs(60);
        let before = e.slot(idx).checks;
        due_now(&mut e, [idx, good_idx]);
        turn_until(&mut e, |e| !e.inflight.is_empty());
        assert_eq!(e.inflight.len(), 2);
        assert_eq!(check_now(&mut e, good_idx), Outcome::Http(200));
        assert_eq!(
            e.slot(idx).checks,
            before,
            "the hung check is still waiting"
        );
        drop(hung);
    }

    #[test]
    fn concurrency_is_bounded() {
        let hung = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = hung.local_addr().unwrap();
        let c = check(r#"{"type":"http","timeout":"10s","interval":"10s"}"#);
        let mut e = Engine::new(1).unwrap();
        for name in ["a", "b", "c"] {
            e.add(
                name,
                &addr.to_string(),
                Arc::new(ServerStats::new_now()),
                c.clone(),
                Target::Addr(addr),
            );
        }
        due_now(&mut e, 0..3);
        turn_until(&mut e, |e| !e.inflight.is_empty());
        assert_eq!(e.inflight.len(), 1);
        assert_eq!(e.queued.len(), 2);
        drop(hung);
    }

    #[test]
    fn tcp_checks_reset_their_connection_and_keep_the_socket() {
        // Full handshake: both connections reach the server's accept queue (then reset).
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let full =
            check(r#"{"type":"tcp","interval":"1s","timeout":"100ms","tcp_handshake":"full"}"#);
        let (mut e, idx, stats) = engine_with(full, addr);
        assert_eq!(check_now(&mut e, idx), Outcome::Tcp);
        assert_eq!(check_now(&mut e, idx), Outcome::Tcp);
        assert_eq!(stats.health(), Health::Healthy);
        assert_eq!(stats.last_check().unwrap().message, "TCP connect ok");
        #[cfg(target_os = "linux")]
        assert_eq!(e.pool[0][0].len(), 1, "one socket for both checks");
        listener.set_nonblocking(true).unwrap();
        let accepted = std::iter::from_fn(|| listener.accept().ok()).count();
        assert_eq!(accepted, 2);

        // Half-open (the default): the SYN-ACK passes, the server's application never
        // sees a connection, and the socket is kept with its option for the next check.
        let (mut e, idx, stats) = engine_with(tcp_check(), addr);
        for _ in 0..3 {
            assert_eq!(check_now(&mut e, idx), Outcome::Tcp);
        }
        assert_eq!(stats.health(), Health::Healthy);
        #[cfg(target_os = "linux")]
        {
            assert_eq!(e.pool[0][1].len(), 1, "one socket for the three checks");
            let kept = e.pool[0][1][0].local_addr().unwrap().as_socket().unwrap();
            assert_ne!(kept.port(), 0, "the socket keeps its source port");
            std::thread::sleep(Duration::from_millis(50));
            let accepted = std::iter::from_fn(|| listener.accept().ok()).count();
            assert_eq!(accepted, 0, "a half-open check never reaches accept()");
        }

        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let (mut e, idx, stats) = engine_with(tcp_check(), closed);
        assert!(matches!(check_now(&mut e, idx), Outcome::Connect(_)));
        let last = stats.last_check().unwrap();
        assert!(last.message.starts_with("connect: "), "{}", last.message);
    }

    #[test]
    fn results_are_recorded_and_rise_fall_apply() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let c = check(r#"{"type":"tcp","interval":"1s","timeout":"100ms","rise":2,"fall":2}"#);
        let (mut e, idx, stats) = engine_with(c, addr);
        check_now(&mut e, idx);
        assert_eq!(stats.health(), Health::Healthy, "the first pass decides");
        let t0 = stats.last_check().unwrap().time_ms;
        // Point the check at a closed port: unhealthy after two failures.
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        e.slot(idx).target = Target::Addr(closed);
        check_now(&mut e, idx);
        assert_eq!(stats.health(), Health::Healthy);
        check_now(&mut e, idx);
        assert_eq!(stats.health(), Health::Unhealthy);
        // Back: healthy after two passes.
        e.slot(idx).target = Target::Addr(addr);
        check_now(&mut e, idx);
        assert_eq!(stats.health(), Health::Unhealthy);
        check_now(&mut e, idx);
        assert_eq!(stats.health(), Health::Healthy);
        let last = stats.last_check().unwrap();
        assert!(last.ok && last.time_ms >= t0);
    }

    #[test]
    fn names_are_resolved_off_the_loop() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut e = Engine::new(8).unwrap();
        let stats = Arc::new(ServerStats::new_now());
        let name = format!("localhost:{port}");
        e.add(
            "u",
            &name,
            stats.clone(),
            tcp_check(),
            Target::Name(Arc::from(name.as_str())),
        );
        let idx = e.by_upstream["u"][&name];
        // localhost may resolve to ::1 first: the next address is tried.
        assert_eq!(check_now(&mut e, idx), Outcome::Tcp);
        // (A name that fails without asking a DNS server.)
        e.slot(idx).target = Target::Name(Arc::from("bad-port:x"));
        assert_eq!(check_now(&mut e, idx), Outcome::Resolve);
    }

    #[test]
    fn reconcile_starts_restarts_and_stops_checks() {
        let mut seen = HashMap::new();
        let mut e = Engine::new(4).unwrap();
        let snap = snapshot_with(Some(tcp_check()));
        reconcile(&snap, &mut seen, &mut e);
        assert_eq!(e.by_upstream["u"].len(), 2);

        // A check that panics is logged and started again.
        let idx = e.by_upstream["u"]["127.0.0.1:9"];
        e.slot(idx).panic_next = true;
        due_now(&mut e, [idx]);
        turn_until(&mut e, |e| !e.slot(idx).panic_next);
        assert_eq!(e.slot(idx).checks, 0, "crashed");
        assert!(e.inflight.is_empty());
        assert!(
            matches!(check_now(&mut e, idx), Outcome::Connect(_)),
            "checked again"
        );

        // Checks turned off: they stop and verdicts are cleared.
        snap.upstreams["u"].servers[0]
            .stats
            .set_health(Health::Unhealthy);
        let off = snapshot_with(None);
        // Carry the same record over, as a real rebuild does.
        let rebuilt =
            UpstreamRuntime::build(off.upstreams["u"].spec.clone(), Some(&snap.upstreams["u"]));
        let mut off = off;
        off.upstreams.insert("u".into(), Arc::new(rebuilt));
        reconcile(&off, &mut seen, &mut e);
        assert!(e.by_upstream.is_empty());
        assert!(e.slots.iter().all(Option::is_none));
        assert_eq!(
            off.upstreams["u"].servers[0].stats.health(),
            Health::Unchecked
        );

        // Upstream gone: nothing left.
        reconcile(&snap, &mut seen, &mut e);
        assert_eq!(e.by_upstream["u"].len(), 2);
        reconcile(&Snapshot::default(), &mut seen, &mut e);
        assert!(e.by_upstream.is_empty());
        assert!(e.slots.iter().all(Option::is_none));
    }
}
