//! The recording backend: a raw TCP server that keeps every byte it receives (per case,
//! per connection) and answers each request its own strict little parser finds, so a
//! request smuggled past the gateway shows up as one more request recorded.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What the backend does after writing a canned response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// Keep reading requests on the connection.
    Keep,
    /// Close the connection.
    Close,
    /// The connection switched protocols: echo every byte from now on.
    Echo,
    /// Record, never answer again.
    Hold,
}

#[derive(Debug, Clone)]
pub struct Canned {
    pub bytes: Vec<u8>,
    pub then: Then,
}

/// What one backend received during one case.
#[derive(Debug, Default, Clone)]
pub struct Record {
    /// Everything received, connection after connection (in accept order).
    pub bytes: Vec<u8>,
    /// Requests the strict parser found complete.
    pub complete: usize,
    /// Request targets in order.
    pub targets: Vec<String>,
    /// Connections that received at least one byte.
    pub conns: usize,
    /// Why the parser refused a connection's bytes, if it did.
    pub unparsable: Option<&'static str>,
}

#[derive(Default)]
struct State {
    conns: Vec<Vec<u8>>,
    complete: usize,
    targets: Vec<String>,
    unparsable: Option<&'static str>,
    canned: HashMap<String, Canned>,
    tasks: Vec<JoinHandle<()>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Answers `200 ok`, canned responses under `/resp/<name>`, 101 for `/ws` upgrades.
    Plain,
    /// Answers with a body `probe` and the header `x-probe: 1`.
    Probe,
}

pub struct Recorder {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    accept: JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.accept.abort();
        for t in self.state.lock().unwrap().tasks.drain(..) {
            t.abort();
        }
    }
}

impl Recorder {
    pub async fn start(kind: Kind) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let mut s = st.lock().unwrap();
                let id = s.conns.len();
                s.conns.push(Vec::new());
                let task = tokio::spawn(connection(stream, st.clone(), id, kind));
                s.tasks.retain(|t| !t.is_finished());
                s.tasks.push(task);
            }
        });
        Recorder {
            addr,
            state,
            accept,
        }
    }

    pub fn can(&self, name: &str, canned: Canned) {
        self.state
            .lock()
            .unwrap()
            .canned
            .insert(name.to_string(), canned);
    }

    /// Cuts every open connection and forgets what was recorded: the next case starts
    /// from a clean backend (the gateway's pooled connections to it are now closed).
    pub async fn reset(&self) {
        let tasks: Vec<JoinHandle<()>> = {
            let mut s = self.state.lock().unwrap();
            s.conns.iter_mut().for_each(Vec::clear);
            s.complete = 0;
            s.targets.clear();
            s.unparsable = None;
            s.tasks.drain(..).collect()
        };
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
        let mut s = self.state.lock().unwrap();
        s.conns.iter_mut().for_each(Vec::clear);
        s.complete = 0;
        s.targets.clear();
        s.unparsable = None;
    }

    /// What was received since the last reset.
    pub fn record(&self) -> Record {
        let s = self.state.lock().unwrap();
        let mut r = Record {
            complete: s.complete,
            targets: s.targets.clone(),
            unparsable: s.unparsable,
            ..Record::default()
        };
        for c in &s.conns {
            if !c.is_empty() {
                r.conns += 1;
                r.bytes.extend_from_slice(c);
            }
        }
        r
    }
}

async fn connection(mut s: TcpStream, st: Arc<Mutex<State>>, id: usize, kind: Kind) {
    let mut buf: Vec<u8> = Vec::new();
    let mut mode = Then::Keep;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        st.lock().unwrap().conns[id].extend_from_slice(&chunk[..n]);
        match mode {
            Then::Echo => {
                if s.write_all(&chunk[..n]).await.is_err() {
                    return;
                }
                continue;
            }
            Then::Hold | Then::Close => continue,
            Then::Keep => {}
        }
        buf.extend_from_slice(&chunk[..n]);
        loop {
            match parse_request(&buf) {
                Parse::Partial => break,
                Parse::Bad(why) => {
                    st.lock().unwrap().unparsable = Some(why);
                    mode = Then::Hold;
                    break;
                }
                Parse::Complete {
                    len,
                    target,
                    upgrade,
                } => {
                    buf.drain(..len);
                    let (answer, then) = {
                        let mut g = st.lock().unwrap();
                        g.complete += 1;
                        g.targets.push(target.clone());
                        answer_for(&g, kind, &target, upgrade)
                    };
                    if s.write_all(&answer).await.is_err() {
                        return;
                    }
                    mode = then;
                    match then {
                        Then::Keep => continue,
                        Then::Close => {
                            let _ = s.shutdown().await;
                            return;
                        }
                        Then::Echo => {
                            if !buf.is_empty() {
                                let rest = std::mem::take(&mut buf);
                                if s.write_all(&rest).await.is_err() {
                                    return;
                                }
                            }
                            break;
                        }
                        Then::Hold => break,
                    }
                }
            }
        }
    }
}

fn answer_for(st: &State, kind: Kind, target: &str, upgrade: bool) -> (Vec<u8>, Then) {
    if kind == Kind::Probe {
        return (
            b"HTTP/1.1 200 OK\r\nx-probe: 1\r\ncontent-length: 5\r\n\r\nprobe".to_vec(),
            Then::Keep,
        );
    }
    let path = target.split('?').next().unwrap_or("");
    if let Some(name) = path.strip_prefix("/resp/") {
        return match st.canned.get(name) {
            Some(c) => (c.bytes.clone(), c.then),
            None => (
                b"HTTP/1.1 404 Not Found\r\ncontent-length: 14\r\n\r\nno such canned".to_vec(),
                Then::Keep,
            ),
        };
    }
    if upgrade && path.starts_with("/ws") {
        // The accept is the one of RFC 6455's sample key (section 1.3), the key of the
        // corpus's whole handshake: HAProxy answers 502 to a 101 without one.
        return (
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
                .to_vec(),
            Then::Echo,
        );
    }
    (
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
        Then::Keep,
    )
}

#[derive(Debug)]
pub enum Parse {
    Partial,
    Bad(&'static str),
    Complete {
        len: usize,
        target: String,
        upgrade: bool,
    },
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A strict origin-server parser: CRLF only, token names, one framing header, chunked
/// as RFC 9112 writes it. Anything else stops the connection's parsing (recorded).
pub fn parse_request(buf: &[u8]) -> Parse {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        if has_bare_lf_or_cr(buf) {
            return Parse::Bad("bare LF or CR in head");
        }
        if buf.len() > 1 << 20 {
            return Parse::Bad("head too large");
        }
        return Parse::Partial;
    };
    let head = &buf[..head_end + 2];
    if has_bare_lf_or_cr(head) {
        return Parse::Bad("bare LF or CR in head");
    }
    let mut lines = head
        .split(|b| *b == b'\n')
        .map(|l| &l[..l.len().saturating_sub(1)]);
    let request_line = lines.next().unwrap_or(b"");
    let parts: Vec<&[u8]> = request_line.split(|b| *b == b' ').collect();
    if parts.len() != 3
        || parts[0].is_empty()
        || !parts[0].iter().all(|b| is_tchar(*b))
        || parts[1].is_empty()
        || !(parts[2] == b"HTTP/1.1" || parts[2] == b"HTTP/1.0")
    {
        return Parse::Bad("bad request line");
    }
    let target = String::from_utf8_lossy(parts[1]).into_owned();
    let mut cl: Option<u64> = None;
    let mut te: Option<Vec<u8>> = None;
    let mut upgrade = false;
    let mut conn_upgrade = false;
    for line in lines {
        if line.is_empty() {
            continue;
        }
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            return Parse::Bad("header line without colon");
        };
        let name = &line[..colon];
        if name.is_empty() || !name.iter().all(|b| is_tchar(*b)) {
            return Parse::Bad("bad header name");
        }
        let value = line[colon + 1..].trim_ascii();
        if value.iter().any(|b| *b < 0x20 && *b != b'\t' || *b == 0x7f) {
            return Parse::Bad("control byte in header value");
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            if cl.is_some() || value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
                return Parse::Bad("bad or repeated Content-Length");
            }
            match std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()) {
                Some(n) => cl = Some(n),
                None => return Parse::Bad("Content-Length overflows"),
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if te.is_some() {
                return Parse::Bad("repeated Transfer-Encoding");
            }
            te = Some(value.to_vec());
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade = true;
        } else if name.eq_ignore_ascii_case(b"connection") {
            conn_upgrade |= value
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"));
        }
    }
    let body_start = head_end + 4;
    let len = match (te, cl) {
        (Some(_), Some(_)) => return Parse::Bad("both Content-Length and Transfer-Encoding"),
        (Some(te), None) => {
            if !te.eq_ignore_ascii_case(b"chunked") {
                return Parse::Bad("Transfer-Encoding other than chunked");
            }
            match chunked_len(&buf[body_start..]) {
                Ok(Some(n)) => body_start + n,
                Ok(None) => return Parse::Partial,
                Err(e) => return Parse::Bad(e),
            }
        }
        (None, Some(n)) => {
            let Some(end) = usize::try_from(n)
                .ok()
                .and_then(|n| body_start.checked_add(n))
            else {
                return Parse::Bad("Content-Length too large");
            };
            if buf.len() < end {
                return Parse::Partial;
            }
            end
        }
        (None, None) => body_start,
    };
    Parse::Complete {
        len,
        target,
        upgrade: upgrade && conn_upgrade,
    }
}

/// Length of a complete chunked body at the start of `buf` (None: not complete yet).
/// Accepts extensions and trailers as RFC 9112 allows them; nothing else.
fn chunked_len(buf: &[u8]) -> Result<Option<usize>, &'static str> {
    let mut i = 0;
    loop {
        let Some(eol) = find(&buf[i..], b"\r\n") else {
            return if has_bare_lf_or_cr(&buf[i..]) {
                Err("bare LF or CR in chunk line")
            } else {
                Ok(None)
            };
        };
        let line = &buf[i..i + eol];
        if has_bare_lf_or_cr(line) {
            return Err("bare LF or CR in chunk line");
        }
        let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        if digits == 0 || digits > 16 {
            return Err("bad chunk size");
        }
        let rest = line[digits..].trim_ascii_start();
        if !rest.is_empty() && rest[0] != b';' {
            return Err("bad chunk size line");
        }
        if rest
            .iter()
            .any(|b| (*b < 0x20 && *b != b'\t') || *b == 0x7f)
        {
            return Err("control byte in chunk extension");
        }
        let size = u64::from_str_radix(std::str::from_utf8(&line[..digits]).unwrap(), 16)
            .map_err(|_| "chunk size overflows")?;
        i += eol + 2;
        if size == 0 {
            // Trailer section: header lines until an empty line.
            loop {
                let Some(eol) = find(&buf[i..], b"\r\n") else {
                    return if has_bare_lf_or_cr(&buf[i..]) {
                        Err("bare LF or CR in trailer")
                    } else {
                        Ok(None)
                    };
                };
                let line = &buf[i..i + eol];
                i += eol + 2;
                if line.is_empty() {
                    return Ok(Some(i));
                }
                let ok = line
                    .iter()
                    .position(|b| *b == b':')
                    .is_some_and(|c| c > 0 && line[..c].iter().all(|b| is_tchar(*b)));
                if !ok || has_bare_lf_or_cr(line) {
                    return Err("bad trailer line");
                }
            }
        }
        let size = usize::try_from(size).map_err(|_| "chunk too large")?;
        if buf.len() < i + size + 2 {
            return Ok(None);
        }
        if &buf[i + size..i + size + 2] != b"\r\n" {
            return Err("chunk data not followed by CRLF");
        }
        i += size + 2;
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn has_bare_lf_or_cr(b: &[u8]) -> bool {
    b.iter().enumerate().any(|(i, c)| {
        (*c == b'\n' && (i == 0 || b[i - 1] != b'\r'))
            || (*c == b'\r' && i + 1 < b.len() && b[i + 1] != b'\n')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(b: &[u8]) -> usize {
        match parse_request(b) {
            Parse::Complete { len, .. } => len,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_backend_parser_finds_smuggled_requests() {
        let two = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /x HTTP/1.1\r\nHost: a\r\n\r\n";
        let first = complete(two);
        assert_eq!(&two[first..first + 6], b"GET /x");
        assert_eq!(complete(&two[first..]), two.len() - first);
        assert!(matches!(
            parse_request(b"GET / HTTP/1.1\nHost: a\r\n\r\n"),
            Parse::Bad(_)
        ));
        assert!(matches!(
            parse_request(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab"),
            Parse::Partial
        ));
    }
}
