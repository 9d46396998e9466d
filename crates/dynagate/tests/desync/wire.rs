//! The client side of one case: send the bytes, read what comes back as HTTP/1
//! responses, then send a probe request on the same connection. The probe's answer
//! (it is routed to a backend of its own and carries `x-probe: 1`) says the gateway
//! went on at the exact byte after the case's request; answers before it are the case's.

use super::recorder::find;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Most bytes read from one connection (a response loop fails within this).
pub const READ_CAP: usize = 1 << 20;
/// Nothing more arrives within this: the answer is over (or the gateway waits for us).
pub const IDLE: Duration = Duration::from_millis(800);

pub const PROBE: &[u8] = b"GET /probe HTTP/1.1\r\nHost: probe.test\r\n\r\n";

#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    /// Head and body as they came.
    pub raw: Vec<u8>,
    pub body: Vec<u8>,
    pub probe: bool,
    /// The body ended as its framing said (false: cut by the close).
    pub complete: bool,
}

impl Resp {
    pub fn interim(&self) -> bool {
        (100..200).contains(&self.status) && self.status != 101
    }
}

#[derive(Debug, Default)]
pub struct Exchange {
    /// Every response before the probe's (interim ones too), in order.
    pub responses: Vec<Resp>,
    pub probe_answered: bool,
    /// The gateway closed (or reset) the connection.
    pub closed: bool,
    /// READ_CAP was reached.
    pub capped: bool,
    /// Bytes that are not an HTTP/1 response.
    pub garbage: Option<String>,
    /// After a 101 the tunnel echoed our bytes.
    pub tunnel_ok: Option<bool>,
    /// Nothing came within IDLE while we waited for an answer.
    pub stalled: bool,
    /// A 101 came: the connection is no longer HTTP.
    pub switched: bool,
    /// Bytes of an answer that never completed.
    pub partial: Option<Vec<u8>>,
}

impl Exchange {
    pub fn finals(&self) -> Vec<&Resp> {
        self.responses.iter().filter(|r| !r.interim()).collect()
    }
    pub fn first_status(&self) -> Option<u16> {
        self.finals().first().map(|r| r.status)
    }
    pub fn statuses(&self) -> Vec<u16> {
        self.finals().iter().map(|r| r.status).collect()
    }
    /// All bytes of the case's responses (interim and final).
    pub fn raw(&self) -> Vec<u8> {
        self.responses.iter().flat_map(|r| r.raw.clone()).collect()
    }
}

pub struct Opts {
    /// Final answers expected before the probe is sent.
    pub answers: usize,
    /// The case's responses answer HEAD requests (no bodies).
    pub head: bool,
    pub probe: bool,
    pub tunnel: bool,
}

enum Got {
    Data,
    Eof,
    Idle,
}

async fn read_some(s: &mut TcpStream, buf: &mut Vec<u8>, idle: Duration) -> Got {
    let mut chunk = [0u8; 16 * 1024];
    match tokio::time::timeout(idle, s.read(&mut chunk)).await {
        Err(_) => Got::Idle,
        Ok(Ok(0)) | Ok(Err(_)) => Got::Eof,
        Ok(Ok(n)) => {
            buf.extend_from_slice(&chunk[..n]);
            Got::Data
        }
    }
}

/// One response at the start of `buf`: Ok(None) while incomplete.
fn parse_response(buf: &[u8], head_req: bool, eof: bool) -> Result<Option<(Resp, usize)>, String> {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        if buf.len() > 70_000 || (eof && !buf.is_empty()) {
            return Err(format!(
                "not a response head: {:?}",
                super::corpus::show_short(buf, 200)
            ));
        }
        return Ok(None);
    };
    let head = &buf[..end];
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|_| version == "HTTP/1.1" || version == "HTTP/1.0")
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut cl: Option<usize> = None;
    let mut chunked = false;
    let mut probe = false;
    for l in lines {
        let Some((n, v)) = l.split_once(':') else {
            return Err(format!("bad header line {l:?}"));
        };
        let v = v.trim();
        if n.eq_ignore_ascii_case("content-length") {
            cl = Some(v.parse().map_err(|_| format!("bad content-length {v:?}"))?);
        } else if n.eq_ignore_ascii_case("transfer-encoding") {
            chunked = v.eq_ignore_ascii_case("chunked");
        } else if n.eq_ignore_ascii_case("x-probe") {
            probe = true;
        }
    }
    let body_start = end + 4;
    let bodyless =
        (head_req && !probe) || (100..200).contains(&status) || status == 204 || status == 304;
    let (body, used, complete) = if bodyless {
        (Vec::new(), body_start, true)
    } else if chunked {
        match dechunk_lenient(&buf[body_start..]) {
            Some(Ok((b, n))) => (b, body_start + n, true),
            Some(Err(e)) => return Err(format!("bad chunked body from the gateway: {e}")),
            None if eof => (buf[body_start..].to_vec(), buf.len(), false),
            None => return Ok(None),
        }
    } else if let Some(n) = cl {
        if buf.len() >= body_start + n {
            (
                buf[body_start..body_start + n].to_vec(),
                body_start + n,
                true,
            )
        } else if eof {
            (buf[body_start..].to_vec(), buf.len(), false)
        } else {
            return Ok(None);
        }
    } else if eof {
        (buf[body_start..].to_vec(), buf.len(), true)
    } else {
        return Ok(None);
    };
    Ok(Some((
        Resp {
            status,
            raw: buf[..used].to_vec(),
            body,
            probe,
            complete,
        },
        used,
    )))
}

/// Decodes a chunked body (extensions and trailers allowed): None while incomplete.
fn dechunk_lenient(b: &[u8]) -> Option<Result<(Vec<u8>, usize), String>> {
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        let eol = find(&b[i..], b"\r\n")?;
        let line = &b[i..i + eol];
        let digits = line.iter().take_while(|c| c.is_ascii_hexdigit()).count();
        if digits == 0 {
            return Some(Err(format!(
                "bad chunk-size line {:?}",
                super::corpus::show_short(line, 40)
            )));
        }
        let size = match usize::from_str_radix(std::str::from_utf8(&line[..digits]).unwrap(), 16) {
            Ok(s) => s,
            Err(e) => return Some(Err(e.to_string())),
        };
        i += eol + 2;
        if size == 0 {
            loop {
                let eol = find(&b[i..], b"\r\n")?;
                i += eol + 2;
                if eol == 0 {
                    return Some(Ok((out, i)));
                }
            }
        }
        if b.len() < i + size + 2 {
            return None;
        }
        out.extend_from_slice(&b[i..i + size]);
        i += size + 2;
    }
}

/// Sends `request` on a new connection to `addr` and reads the answers; see the module.
pub async fn exchange(addr: SocketAddr, request: &[u8], opts: &Opts) -> Exchange {
    let mut ex = Exchange::default();
    let mut s = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => {
            ex.garbage = Some(format!("connect: {e}"));
            ex.closed = true;
            return ex;
        }
    };
    let _ = s.set_nodelay(true);
    if s.write_all(request).await.is_err() {
        ex.closed = true;
    }
    let mut buf = Vec::new();
    let mut total = 0usize;
    let mut probe_sent = false;
    let mut eof = false;
    loop {
        // Take every complete response.
        loop {
            if buf.is_empty() {
                break;
            }
            match parse_response(&buf, opts.head, eof) {
                Ok(None) => break,
                Err(e) => {
                    ex.garbage = Some(e);
                    return ex;
                }
                Ok(Some((r, used))) => {
                    buf.drain(..used);
                    if r.probe {
                        ex.probe_answered = true;
                        return ex;
                    }
                    let switched = r.status == 101;
                    ex.responses.push(r);
                    if switched {
                        ex.switched = true;
                        if opts.tunnel {
                            ex.tunnel_ok = Some(tunnel(&mut s, buf).await);
                        } else {
                            // Not HTTP any more: what follows is not ours to parse.
                            ex.garbage = (!buf.is_empty())
                                .then(|| "bytes after a 101 the case did not ask for".into());
                        }
                        return ex;
                    }
                }
            }
        }
        if eof {
            if !buf.is_empty() {
                ex.garbage = Some(format!(
                    "incomplete response at close: {:?}",
                    super::corpus::show_short(&buf, 200)
                ));
            }
            return ex;
        }
        if !buf.is_empty() {
            ex.partial = Some(buf.clone());
        }
        if total >= READ_CAP {
            ex.capped = true;
            return ex;
        }
        let finals = ex.responses.iter().filter(|r| !r.interim()).count();
        if !opts.probe && finals >= opts.answers && buf.is_empty() {
            return ex;
        }
        if opts.probe && !probe_sent && finals >= opts.answers && buf.is_empty() {
            probe_sent = true;
            if s.write_all(PROBE).await.is_err() {
                ex.closed = true;
            }
        }
        let before = buf.len();
        match read_some(&mut s, &mut buf, IDLE).await {
            Got::Data => {
                total += buf.len() - before;
                ex.partial = None;
            }
            Got::Eof => {
                ex.closed = true;
                eof = true;
            }
            Got::Idle if opts.probe && !probe_sent => {
                // Fewer answers than expected: go on with the probe anyway.
                probe_sent = true;
                if s.write_all(PROBE).await.is_err() {
                    ex.closed = true;
                }
            }
            Got::Idle => {
                ex.stalled = true;
                return ex;
            }
        }
    }
}

async fn tunnel(s: &mut TcpStream, mut buf: Vec<u8>) -> bool {
    if s.write_all(b"ping\r\n").await.is_err() {
        return false;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while find(&buf, b"ping\r\n").is_none() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match read_some(s, &mut buf, left).await {
            Got::Data => {}
            _ => return false,
        }
    }
    true
}

/// Reads until the gateway closes or, once it answered, is quiet for `quiet` (at most
/// READ_CAP bytes, 10 s), and counts the responses (interim ones apart).
pub async fn count_answers(
    addr: SocketAddr,
    request: &[u8],
    head: bool,
    quiet: Duration,
) -> (usize, bool, Vec<u16>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(request).await;
    let mut buf = Vec::new();
    let mut closed = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if buf.len() >= READ_CAP || tokio::time::Instant::now() > deadline {
            break;
        }
        // The first answer may take an upstream timeout; after it, a quiet spell ends it.
        let wait = if buf.is_empty() {
            Duration::from_secs(2)
        } else {
            quiet
        };
        match read_some(&mut s, &mut buf, wait).await {
            Got::Data => {}
            Got::Eof => {
                closed = true;
                break;
            }
            Got::Idle => break,
        }
    }
    let mut statuses = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        match parse_response(&buf[pos..], head, true) {
            Ok(Some((r, used))) => {
                if !r.interim() {
                    statuses.push(r.status);
                }
                pos += used;
            }
            _ => break,
        }
    }
    // A capped read holds at least this many answers: count their status lines.
    let lines = buf
        .windows(9)
        .filter(|w| w == b"HTTP/1.1 " || w == b"HTTP/1.0 ")
        .count();
    (statuses.len().max(lines), closed, statuses)
}
