//! Request and response heads, parsed in place: a head is the bytes it arrived in plus
//! the offsets of its parts, so nothing is copied into header maps. The upstream
//! request and the client response are written by copying the header lines that pass
//! (nginx's way), with the proxy's own headers added.

use super::framing::BodyKind;
use std::mem::MaybeUninit;

/// Where one header line's name and value are in the head's buffer.
#[derive(Debug, Clone, Copy)]
pub struct HeaderAt {
    name: (u32, u32),
    value: (u32, u32),
}

/// Why a head could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum HeadError {
    /// More header lines than allowed (431).
    TooManyHeaders,
    /// Malformed (400 for requests, 502 for responses).
    Invalid(&'static str),
}

#[derive(Debug)]
pub enum Parsed<T> {
    Complete(T),
    Partial,
}

fn offset(buf: &[u8], part: &[u8]) -> u32 {
    (part.as_ptr() as usize - buf.as_ptr() as usize) as u32
}

fn range(buf: &[u8], part: &[u8]) -> (u32, u32) {
    let start = offset(buf, part);
    (start, start + part.len() as u32)
}

fn at(buf: &[u8], r: (u32, u32)) -> &[u8] {
    &buf[r.0 as usize..r.1 as usize]
}

/// Header names compared without allocation (they are ASCII tokens).
fn is(name: &[u8], lower: &str) -> bool {
    name.eq_ignore_ascii_case(lower.as_bytes())
}

/// Comma-separated tokens of a header value, trimmed.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|b| *b == b',').map(|t| t.trim_ascii())
}

fn is_hop_by_hop(name: &[u8]) -> bool {
    is(name, "connection")
        || is(name, "keep-alive")
        || is(name, "proxy-connection")
        || is(name, "te")
        || is(name, "trailer")
        || is(name, "transfer-encoding")
        || is(name, "upgrade")
}

fn parse_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// What the proxy needs to know about a header section, gathered in one pass.
#[derive(Debug, Default, Clone)]
struct Framing {
    content_length: Option<u64>,
    content_lengths: u32,
    transfer_encoding: bool,
    chunked_last: bool,
    conn_close: bool,
    conn_keep_alive: bool,
    conn_upgrade: bool,
    /// `Connection` names other headers to drop.
    conn_names_other: bool,
    upgrade: bool,
    bad_length: bool,
}

fn framing(buf: &[u8], headers: &[HeaderAt]) -> Framing {
    let mut f = Framing::default();
    for h in headers {
        let name = at(buf, h.name);
        let value = at(buf, h.value);
        if is(name, "content-length") {
            f.content_lengths += 1;
            match parse_length(value) {
                Some(n) if f.content_length.is_none_or(|m| m == n) => f.content_length = Some(n),
                _ => f.bad_length = true,
            }
        } else if is(name, "transfer-encoding") {
            f.transfer_encoding = true;
            f.chunked_last = tokens(value)
                .filter(|t| !t.is_empty())
                .last()
                .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
        } else if is(name, "connection") {
            for t in tokens(value) {
                if t.eq_ignore_ascii_case(b"close") {
                    f.conn_close = true;
                } else if t.eq_ignore_ascii_case(b"keep-alive") {
                    f.conn_keep_alive = true;
                } else if t.eq_ignore_ascii_case(b"upgrade") {
                    f.conn_upgrade = true;
                } else if !t.is_empty() {
                    f.conn_names_other = true;
                }
            }
        } else if is(name, "upgrade") {
            f.upgrade = true;
        }
    }
    f
}

/// True when `name` is listed in a `Connection` header (and so is hop-by-hop).
fn named_by_connection(buf: &[u8], headers: &[HeaderAt], name: &[u8]) -> bool {
    headers.iter().any(|h| {
        is(at(buf, h.name), "connection")
            && tokens(at(buf, h.value)).any(|t| t.eq_ignore_ascii_case(name))
    })
}

const STACK_HEADERS: usize = 128;

/// A parsed request head. The buffer it points into is the connection's read buffer.
#[derive(Debug)]
pub struct RequestHead {
    /// Length of the head in the buffer (from the buffer's start).
    pub len: usize,
    method: (u32, u32),
    target: (u32, u32),
    pub minor_version: u8,
    headers: Vec<HeaderAt>,
    framing: Framing,
    host: Option<(u32, u32)>,
    hosts: u32,
}

impl RequestHead {
    /// Parses `buf` (which starts at the head). `max_headers` bounds the header lines.
    pub fn parse(buf: &[u8], max_headers: usize) -> Result<Parsed<RequestHead>, HeadError> {
        // httparse fills uninitialised slots and reads only what it wrote; the usual
        // limit fits on the stack.
        let mut on_stack: [MaybeUninit<httparse::Header<'_>>; STACK_HEADERS] =
            [const { MaybeUninit::uninit() }; STACK_HEADERS];
        let mut on_heap: Vec<MaybeUninit<httparse::Header<'_>>> = Vec::new();
        let slots = if max_headers <= STACK_HEADERS {
            &mut on_stack[..max_headers]
        } else {
            on_heap.resize_with(max_headers, MaybeUninit::uninit);
            &mut on_heap[..]
        };
        let mut req = httparse::Request::new(&mut []);
        let len = match req.parse_with_uninit_headers(buf, slots) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
            Err(e) => return Err(HeadError::Invalid(parse_error(e))),
        };
        let method = req.method.ok_or(HeadError::Invalid("no method"))?;
        let target = req.path.ok_or(HeadError::Invalid("no request target"))?;
        let minor_version = req.version.ok_or(HeadError::Invalid("no version"))?;
        let mut headers = Vec::with_capacity(req.headers.len());
        let mut host = None;
        let mut hosts = 0;
        for h in req.headers.iter() {
            let at = HeaderAt {
                name: range(buf, h.name.as_bytes()),
                value: range(buf, h.value),
            };
            if h.name.eq_ignore_ascii_case("host") {
                hosts += 1;
                host.get_or_insert(at.value);
            }
            headers.push(at);
        }
        let framing = framing(buf, &headers);
        Ok(Parsed::Complete(RequestHead {
            len,
            method: range(buf, method.as_bytes()),
            target: range(buf, target.as_bytes()),
            minor_version,
            headers,
            framing,
            host,
            hosts,
        }))
    }

    pub fn method<'b>(&self, buf: &'b [u8]) -> &'b str {
        std::str::from_utf8(at(buf, self.method)).unwrap_or("")
    }

    pub fn target<'b>(&self, buf: &'b [u8]) -> &'b str {
        std::str::from_utf8(at(buf, self.target)).unwrap_or("/")
    }

    /// The target in origin form, and the authority when it came in absolute form.
    pub fn origin_form<'b>(&self, buf: &'b [u8]) -> (&'b str, Option<&'b str>) {
        let t = self.target(buf);
        for scheme in ["http://", "https://"] {
            if t.len() > scheme.len() && t[..scheme.len()].eq_ignore_ascii_case(scheme) {
                let rest = &t[scheme.len()..];
                let cut = rest.find(['/', '?']).unwrap_or(rest.len());
                let path = &rest[cut..];
                let path = if path.is_empty() { "/" } else { path };
                return (path, Some(&rest[..cut]));
            }
        }
        (t, None)
    }

    pub fn path<'b>(&self, buf: &'b [u8]) -> &'b str {
        let (t, _) = self.origin_form(buf);
        let p = t.split('?').next().unwrap_or("");
        if p.is_empty() {
            "/"
        } else {
            p
        }
    }

    pub fn query<'b>(&self, buf: &'b [u8]) -> Option<&'b str> {
        self.origin_form(buf).0.split_once('?').map(|(_, q)| q)
    }

    /// The Host header, else the authority of an absolute-form target.
    pub fn host<'b>(&self, buf: &'b [u8]) -> Option<&'b [u8]> {
        match self.host {
            Some(h) => Some(at(buf, h)),
            None => self.origin_form(buf).1.map(str::as_bytes),
        }
    }

    pub fn header<'b>(&self, buf: &'b [u8], name: &str) -> Option<&'b [u8]> {
        self.headers
            .iter()
            .find(|h| is(at(buf, h.name), name))
            .map(|h| at(buf, h.value))
    }

    pub fn headers_named<'a, 'b: 'a>(
        &'a self,
        buf: &'b [u8],
        name: &'a str,
    ) -> impl Iterator<Item = &'b [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |h| is(at(buf, h.name), name))
            .map(move |h| at(buf, h.value))
    }

    pub fn is_head(&self, buf: &[u8]) -> bool {
        at(buf, self.method) == b"HEAD"
    }

    /// Refuses requests whose framing could be read two ways (request smuggling).
    pub fn screen(&self) -> Result<(), &'static str> {
        let f = &self.framing;
        if f.transfer_encoding {
            if f.content_lengths > 0 {
                return Err("dynagate: bad request: both Content-Length and Transfer-Encoding");
            }
            if self.minor_version == 0 {
                return Err("dynagate: bad request: Transfer-Encoding on HTTP/1.0");
            }
            if !f.chunked_last {
                return Err("dynagate: bad request: Transfer-Encoding without final chunked");
            }
        }
        if f.content_lengths > 1 {
            return Err("dynagate: bad request: more than one Content-Length");
        }
        if f.bad_length {
            return Err("dynagate: bad request: invalid Content-Length");
        }
        if self.hosts > 1 {
            return Err("dynagate: bad request: more than one Host");
        }
        Ok(())
    }

    pub fn body(&self) -> BodyKind {
        if self.framing.transfer_encoding {
            BodyKind::Chunked
        } else {
            match self.framing.content_length {
                Some(0) | None => BodyKind::Empty,
                Some(n) => BodyKind::Length(n),
            }
        }
    }

    /// The client wants the connection kept after this exchange.
    pub fn keep_alive(&self) -> bool {
        if self.minor_version == 0 {
            self.framing.conn_keep_alive && !self.framing.conn_close
        } else {
            !self.framing.conn_close
        }
    }

    pub fn is_upgrade(&self) -> bool {
        self.minor_version == 1 && self.framing.upgrade && self.framing.conn_upgrade
    }

    /// Writes the head sent upstream: origin-form target, HTTP/1.1, hop-by-hop headers
    /// out, X-Forwarded-* and X-Real-IP set, Host kept unless `upstream_host` replaces it.
    pub fn write_upstream(&self, buf: &[u8], out: &mut Vec<u8>, ctx: &UpstreamHeadCtx<'_>) {
        let (target, authority) = self.origin_form(buf);
        out.extend_from_slice(at(buf, self.method));
        out.push(b' ');
        out.extend_from_slice(target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let f = &self.framing;
        let upgrade = ctx.upgrade;
        let mut prior_xff: Option<&[u8]> = None;
        for h in &self.headers {
            let name = at(buf, h.name);
            let value = at(buf, h.value);
            if is_hop_by_hop(name) {
                if !(upgrade && is(name, "upgrade")) {
                    continue;
                }
            } else if f.conn_names_other && named_by_connection(buf, &self.headers, name) {
                continue;
            }
            if is(name, "x-forwarded-for") {
                prior_xff.get_or_insert(value);
                continue;
            }
            if is(name, "x-real-ip")
                || is(name, "x-forwarded-proto")
                || is(name, "x-forwarded-host")
            {
                continue;
            }
            if is(name, "host") && ctx.upstream_host.is_some() {
                continue;
            }
            push_header(out, name, value);
        }
        if let Some(h) = ctx.upstream_host {
            push_header(out, b"host", h);
        } else if self.host.is_none() {
            if let Some(a) = authority {
                push_header(out, b"host", a.as_bytes());
            }
        }
        out.extend_from_slice(b"x-forwarded-for: ");
        if let Some(prev) = prior_xff.filter(|p| !p.is_empty()) {
            out.extend_from_slice(prev);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(ctx.client_ip.as_bytes());
        out.extend_from_slice(b"\r\nx-real-ip: ");
        out.extend_from_slice(ctx.client_ip.as_bytes());
        out.extend_from_slice(b"\r\nx-forwarded-proto: http\r\n");
        if let Some(h) = self.host(buf) {
            push_header(out, b"x-forwarded-host", h);
        }
        if upgrade {
            out.extend_from_slice(b"connection: upgrade\r\n");
        }
        if f.transfer_encoding {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
}

pub struct UpstreamHeadCtx<'a> {
    pub client_ip: &'a str,
    pub upstream_host: Option<&'a [u8]>,
    pub upgrade: bool,
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn parse_error(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid token",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Version => "invalid HTTP version",
    }
}

/// A parsed response head from an upstream.
#[derive(Debug)]
pub struct ResponseHead {
    pub len: usize,
    pub status: u16,
    pub minor_version: u8,
    reason: (u32, u32),
    headers: Vec<HeaderAt>,
    framing: Framing,
}

/// Most header lines accepted in an upstream response.
const MAX_RESPONSE_HEADERS: usize = 128;

impl ResponseHead {
    pub fn parse(buf: &[u8]) -> Result<Parsed<ResponseHead>, HeadError> {
        let mut slots = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
        let mut resp = httparse::Response::new(&mut slots);
        let len = match resp.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
            Err(e) => return Err(HeadError::Invalid(parse_error(e))),
        };
        let status = resp.code.ok_or(HeadError::Invalid("no status"))?;
        let reason = resp.reason.unwrap_or("");
        let reason = if reason.is_empty() {
            (0, 0)
        } else {
            range(buf, reason.as_bytes())
        };
        let headers: Vec<HeaderAt> = resp
            .headers
            .iter()
            .map(|h| HeaderAt {
                name: range(buf, h.name.as_bytes()),
                value: range(buf, h.value),
            })
            .collect();
        let framing = framing(buf, &headers);
        if framing.bad_length && !framing.transfer_encoding {
            return Err(HeadError::Invalid("invalid Content-Length"));
        }
        Ok(Parsed::Complete(ResponseHead {
            len,
            status,
            minor_version: resp.version.unwrap_or(1),
            reason,
            headers,
            framing,
        }))
    }

    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status) && self.status != 101
    }

    /// How the body is delimited (RFC 9112 §6.3).
    pub fn body(&self, request_was_head: bool) -> BodyKind {
        if request_was_head
            || (100..200).contains(&self.status)
            || self.status == 204
            || self.status == 304
        {
            BodyKind::Empty
        } else if self.framing.transfer_encoding {
            if self.framing.chunked_last {
                BodyKind::Chunked
            } else {
                BodyKind::UntilClose
            }
        } else {
            match self.framing.content_length {
                Some(0) => BodyKind::Empty,
                Some(n) => BodyKind::Length(n),
                None => BodyKind::UntilClose,
            }
        }
    }

    /// The upstream lets the connection be reused after this response.
    pub fn keep_alive(&self) -> bool {
        if self.minor_version == 0 {
            self.framing.conn_keep_alive && !self.framing.conn_close
        } else {
            !self.framing.conn_close
        }
    }

    /// Writes the head sent to the client. `out_body` is the framing the client gets.
    pub fn write_client(
        &self,
        buf: &[u8],
        out: &mut Vec<u8>,
        out_body: OutFraming,
        connection: ClientConnection,
    ) {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(itoa_buf(self.status as u64).as_bytes());
        out.push(b' ');
        let reason = at(buf, self.reason);
        if reason.is_empty() {
            let canonical = http::StatusCode::from_u16(self.status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("");
            out.extend_from_slice(canonical.as_bytes());
        } else {
            out.extend_from_slice(reason);
        }
        out.extend_from_slice(b"\r\n");
        let f = &self.framing;
        let switching = connection == ClientConnection::Upgrade;
        for h in &self.headers {
            let name = at(buf, h.name);
            if is_hop_by_hop(name) {
                if !(switching && is(name, "upgrade")) {
                    continue;
                }
            } else if f.conn_names_other && named_by_connection(buf, &self.headers, name) {
                continue;
            }
            if is(name, "content-length")
                && (f.transfer_encoding || out_body == OutFraming::Chunked)
            {
                continue;
            }
            push_header(out, name, at(buf, h.value));
        }
        // Chunked coding passed through keeps its header; chunked coding added gets one.
        let passed_chunked = out_body == OutFraming::Same && f.transfer_encoding && f.chunked_last;
        if out_body == OutFraming::Chunked || passed_chunked {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        match connection {
            ClientConnection::Default => {}
            ClientConnection::Close => out.extend_from_slice(b"connection: close\r\n"),
            ClientConnection::KeepAlive => out.extend_from_slice(b"connection: keep-alive\r\n"),
            ClientConnection::Upgrade => out.extend_from_slice(b"connection: upgrade\r\n"),
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// How the body goes out to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutFraming {
    /// As it came (length or chunked), or no body.
    Same,
    /// Chunked coding added (the upstream delimited by close; HTTP/1.1 client).
    Chunked,
    /// Chunked coding removed (HTTP/1.0 client); the connection closes after.
    Raw,
}

/// The `Connection` header the client response carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientConnection {
    Default,
    Close,
    KeepAlive,
    Upgrade,
}

/// A short response dynagate writes itself.
pub fn write_simple(out: &mut Vec<u8>, status: u16, body: &str, close: bool) {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa_buf(status as u64).as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: ");
    out.extend_from_slice(itoa_buf(body.len() as u64 + 1).as_bytes());
    if close {
        out.extend_from_slice(b"\r\nconnection: close");
    }
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body.as_bytes());
    out.push(b'\n');
}

fn itoa_buf(n: u64) -> String {
    n.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(s: &str) -> RequestHead {
        match RequestHead::parse(s.as_bytes(), 100).unwrap() {
            Parsed::Complete(h) => h,
            Parsed::Partial => panic!("partial"),
        }
    }

    #[test]
    fn upstream_head_strips_hop_by_hop_and_sets_forwarded() {
        let raw = "GET /a?b=1 HTTP/1.1\r\nHost: Example.com\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: 5\r\nX-Forwarded-For: 10.0.0.1\r\nX-Real-IP: spoof\r\nAccept: */*\r\n\r\n";
        let h = req(raw);
        let mut out = Vec::new();
        h.write_upstream(
            raw.as_bytes(),
            &mut out,
            &UpstreamHeadCtx {
                client_ip: "127.0.0.1",
                upstream_host: None,
                upgrade: false,
            },
        );
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.starts_with("GET /a?b=1 HTTP/1.1\r\nHost: Example.com\r\nAccept: */*\r\n"),
            "{s}"
        );
        assert!(
            s.contains("x-forwarded-for: 10.0.0.1, 127.0.0.1\r\n"),
            "{s}"
        );
        assert!(s.contains("x-real-ip: 127.0.0.1\r\n"), "{s}");
        assert!(s.contains("x-forwarded-host: Example.com\r\n"), "{s}");
        assert!(
            !s.contains("Secret") && !s.contains("spoof") && !s.contains("Keep-Alive"),
            "{s}"
        );
        assert!(s.ends_with("\r\n\r\n"));
    }

    #[test]
    fn absolute_form_and_http10() {
        let raw = "GET http://h.test:8080/p?q HTTP/1.0\r\n\r\n";
        let h = req(raw);
        assert_eq!(h.path(raw.as_bytes()), "/p");
        assert_eq!(h.query(raw.as_bytes()), Some("q"));
        assert_eq!(h.host(raw.as_bytes()), Some(&b"h.test:8080"[..]));
        assert!(!h.keep_alive());
        let mut out = Vec::new();
        h.write_upstream(
            raw.as_bytes(),
            &mut out,
            &UpstreamHeadCtx {
                client_ip: "::1",
                upstream_host: None,
                upgrade: false,
            },
        );
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.starts_with("GET /p?q HTTP/1.1\r\nhost: h.test:8080\r\n"),
            "{s}"
        );
    }

    #[test]
    fn screens_ambiguous_framing() {
        assert!(
            req("POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")
                .screen()
                .is_err()
        );
        assert!(
            req("POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n")
                .screen()
                .is_err()
        );
        assert!(req("POST / HTTP/1.1\r\nContent-Length: -3\r\n\r\n")
            .screen()
            .is_err());
        assert!(
            req("POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n")
                .screen()
                .is_err()
        );
        assert!(req("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
            .screen()
            .is_err());
        let ok = req("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert!(ok.screen().is_ok());
        assert_eq!(ok.body(), BodyKind::Chunked);
    }

    #[test]
    fn response_framing_and_client_head() {
        let raw =
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\nX-A: 1\r\n\r\nhello";
        let h = match ResponseHead::parse(raw.as_bytes()).unwrap() {
            Parsed::Complete(h) => h,
            Parsed::Partial => panic!(),
        };
        assert_eq!(h.body(false), BodyKind::Length(5));
        assert_eq!(h.body(true), BodyKind::Empty);
        let mut out = Vec::new();
        h.write_client(
            raw.as_bytes(),
            &mut out,
            OutFraming::Same,
            ClientConnection::Default,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\n"
        );
        let raw = "HTTP/1.0 200 OK\r\nX-A: 1\r\n\r\nstream";
        let h = match ResponseHead::parse(raw.as_bytes()).unwrap() {
            Parsed::Complete(h) => h,
            Parsed::Partial => panic!(),
        };
        assert_eq!(h.body(false), BodyKind::UntilClose);
        assert!(!h.keep_alive());
    }
}

/// Malformed and random input never panics the head code (a cheap fuzz: mutations of
/// valid heads plus random bytes, deterministic seed).
#[cfg(test)]
mod fuzz {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    const SEEDS: [&str; 4] = [
        "GET http://a.b:1/x?y=1 HTTP/1.1\r\nHost: h\r\nConnection: close, X-A\r\nX-A: 1\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
        "POST /u HTTP/1.0\r\nContent-Length: 10\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 5\r\nConnection: X-B\r\nX-B: 2\r\n\r\n",
        "HTTP/1.0 101 \r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    ];
    const NOISE: &[u8] = b" \r\n:,;\t\x00\xffHTTP/1.01chunkedcontent-length";

    fn exercise(buf: &[u8]) {
        if let Ok(Parsed::Complete(h)) = RequestHead::parse(buf, 100) {
            let _ = (
                h.method(buf),
                h.target(buf),
                h.path(buf),
                h.query(buf),
                h.host(buf),
            );
            let _ = (
                h.screen(),
                h.body(),
                h.keep_alive(),
                h.is_upgrade(),
                h.is_head(buf),
            );
            let _ = h.headers_named(buf, "cookie").count();
            let mut out = Vec::new();
            for upgrade in [false, true] {
                h.write_upstream(
                    buf,
                    &mut out,
                    &UpstreamHeadCtx {
                        client_ip: "10.0.0.1",
                        upstream_host: Some(b"up"),
                        upgrade,
                    },
                );
            }
        }
        if let Ok(Parsed::Complete(h)) = ResponseHead::parse(buf) {
            let _ = (h.body(false), h.body(true), h.keep_alive(), h.is_interim());
            let mut out = Vec::new();
            for f in [OutFraming::Same, OutFraming::Chunked, OutFraming::Raw] {
                for c in [
                    ClientConnection::Default,
                    ClientConnection::Close,
                    ClientConnection::KeepAlive,
                    ClientConnection::Upgrade,
                ] {
                    h.write_client(buf, &mut out, f, c);
                }
            }
        }
    }

    #[test]
    fn no_input_panics() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..20_000 {
            let mut buf = SEEDS[round % SEEDS.len()].as_bytes().to_vec();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(buf.len() + 1);
                match rng.below(3) {
                    0 if at < buf.len() => buf[at] = NOISE[rng.below(NOISE.len())],
                    1 => buf.insert(at, NOISE[rng.below(NOISE.len())]),
                    _ if at < buf.len() => {
                        buf.remove(at);
                    }
                    _ => {}
                }
            }
            exercise(&buf);
            let random: Vec<u8> = (0..rng.below(200)).map(|_| rng.next() as u8).collect();
            exercise(&random);
            let mut scanner = super::super::framing::ChunkedScanner::default();
            let _ = scanner.feed(&random, |_, _| {});
            let _ = scanner.feed(&buf, |_, _| {});
        }
    }
}
