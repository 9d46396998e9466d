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

/// Headers a `Connection` token never removes: they frame the message or name its
/// target, and dropping them on a peer's word is how `Connection: Content-Length`
/// smuggled a body past the proxy. Such tokens are ignored.
fn is_protected(name: &[u8]) -> bool {
    is(name, "host") || is(name, "content-length") || is(name, "transfer-encoding")
}

/// 1*DIGIT no larger than i64::MAX (nginx's off_t bound), nothing else.
fn parse_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(value).ok()?.parse().ok()?;
    (n <= i64::MAX as u64).then_some(n)
}

/// A field value without the optional whitespace (SP, HTAB) around it.
fn trim_ows(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| *b != b' ' && *b != b'\t')
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| *b != b' ' && *b != b'\t')
        .map_or(start, |i| i + 1);
    &v[start..end]
}

/// What the proxy needs to know about a header section, gathered in one pass.
#[derive(Debug, Default, Clone)]
struct Framing {
    content_length: Option<u64>,
    content_lengths: u32,
    transfer_encodings: u32,
    /// The one Transfer-Encoding line says exactly `chunked`: the only coding accepted.
    te_chunked: bool,
    conn_close: bool,
    conn_keep_alive: bool,
    conn_upgrade: bool,
    /// `Connection` names other headers to drop.
    conn_names_other: bool,
    upgrade: bool,
    /// An `Upgrade` token asks for h2c: never honoured through a proxy (h2c smuggling).
    upgrade_h2c: bool,
    bad_length: bool,
    /// An `Expect` other than `100-continue` (417).
    expect_unknown: bool,
    expect_continue: bool,
}

fn framing(buf: &[u8], headers: &[HeaderAt]) -> Framing {
    let mut f = Framing::default();
    for h in headers {
        let name = at(buf, h.name);
        let value = at(buf, h.value);
        if is(name, "content-length") {
            f.content_lengths += 1;
            match parse_length(trim_ows(value)) {
                Some(n) if f.content_length.is_none() => f.content_length = Some(n),
                _ => f.bad_length = true,
            }
        } else if is(name, "transfer-encoding") {
            f.transfer_encodings += 1;
            f.te_chunked = trim_ows(value).eq_ignore_ascii_case(b"chunked");
        } else if is(name, "connection") {
            for t in tokens(value) {
                if t.eq_ignore_ascii_case(b"close") {
                    f.conn_close = true;
                } else if t.eq_ignore_ascii_case(b"keep-alive") {
                    f.conn_keep_alive = true;
                } else if t.eq_ignore_ascii_case(b"upgrade") {
                    f.conn_upgrade = true;
                } else if !t.is_empty() && !is_protected(t) {
                    f.conn_names_other = true;
                }
            }
        } else if is(name, "upgrade") {
            f.upgrade = true;
            f.upgrade_h2c |=
                tokens(value).any(|t| t.len() >= 3 && t[..3].eq_ignore_ascii_case(b"h2c"));
        } else if is(name, "expect") {
            let continue_ = trim_ows(value).eq_ignore_ascii_case(b"100-continue");
            f.expect_continue |= continue_;
            f.expect_unknown |= !continue_;
        }
    }
    f
}

/// True when `name` is listed in a `Connection` header (and so is hop-by-hop), unless
/// it is one of the protected names.
fn named_by_connection(buf: &[u8], headers: &[HeaderAt], name: &[u8]) -> bool {
    !is_protected(name)
        && headers.iter().any(|h| {
            is(at(buf, h.name), "connection")
                && tokens(at(buf, h.value)).any(|t| t.eq_ignore_ascii_case(name))
        })
}

/// Why a request is answered by dynagate itself instead of being forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub why: &'static str,
}

const fn refuse(status: u16, why: &'static str) -> Result<(), Refusal> {
    Err(Refusal { status, why })
}

/// The request-target's form (RFC 9112 §3.2): only these two are proxied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TargetForm {
    Origin,
    Absolute,
    Other,
}

fn target_form(target: &[u8]) -> TargetForm {
    if target.first() == Some(&b'/') {
        return TargetForm::Origin;
    }
    for scheme in [&b"http://"[..], b"https://"] {
        if target.len() >= scheme.len() && target[..scheme.len()].eq_ignore_ascii_case(scheme) {
            return TargetForm::Absolute;
        }
    }
    TargetForm::Other
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
            // Compared as bytes: a target may hold UTF-8 (the scheme matched ends in an
            // ASCII '/', so slicing after it is on a character boundary).
            let b = t.as_bytes();
            if b.len() > scheme.len() && b[..scheme.len()].eq_ignore_ascii_case(scheme.as_bytes()) {
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

    /// The authority of an absolute-form target (which wins, RFC 9112 §3.2.2), else the
    /// Host header.
    pub fn host<'b>(&self, buf: &'b [u8]) -> Option<&'b [u8]> {
        match self.origin_form(buf).1 {
            Some(authority) => Some(authority.as_bytes()),
            None => self.host.map(|h| at(buf, h)),
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

    /// Refuses what must not be forwarded: framing that could be read two ways (request
    /// smuggling), codings other than chunked, targets that are not origin- or
    /// absolute-form, a missing, repeated or malformed Host, unknown expectations. The
    /// path is checked by the caller (`crate::uri::normalize_path`).
    pub fn screen(&self, buf: &[u8]) -> Result<(), Refusal> {
        let f = &self.framing;
        if f.transfer_encodings > 0 {
            if f.content_lengths > 0 {
                return refuse(400, "both Content-Length and Transfer-Encoding");
            }
            if self.minor_version == 0 {
                return refuse(400, "Transfer-Encoding on HTTP/1.0");
            }
            if f.transfer_encodings > 1 {
                return refuse(400, "more than one Transfer-Encoding");
            }
            if !f.te_chunked {
                return refuse(501, "Transfer-Encoding other than chunked");
            }
        }
        if f.content_lengths > 1 {
            return refuse(400, "more than one Content-Length");
        }
        if f.bad_length {
            return refuse(400, "invalid Content-Length");
        }
        if self.hosts > 1 {
            return refuse(400, "more than one Host");
        }
        if std::str::from_utf8(at(buf, self.target)).is_err() {
            return refuse(400, "request target is not valid UTF-8");
        }
        match target_form(at(buf, self.target)) {
            TargetForm::Origin | TargetForm::Absolute => {}
            TargetForm::Other => {
                return refuse(
                    400,
                    "request target is neither origin-form nor absolute-form",
                )
            }
        }
        if !at(buf, self.method)
            .iter()
            .all(|b| b.is_ascii_uppercase() || *b == b'-' || *b == b'_')
        {
            // Methods are case-sensitive tokens; like nginx, take upper-case ones only.
            return refuse(400, "invalid method");
        }
        // RFC 9112 §3.2: 400 for an HTTP/1.1 request without a Host line, even when its
        // target is absolute-form (whose authority then wins).
        if self.host.is_none() && self.minor_version >= 1 {
            return refuse(400, "HTTP/1.1 request without Host");
        }
        if let (Some(authority), Some(line)) = (self.origin_form(buf).1, self.host) {
            // The authority wins (RFC 9112 §3.2.2), but two hosts in one request are how
            // Host-of-Troubles ambiguities start: like HAProxy, refuse a mismatch.
            let t = at(buf, self.target);
            let default_port: &[u8] = if t[..5].eq_ignore_ascii_case(b"https") {
                b":443"
            } else {
                b":80"
            };
            let bare = |h: &[u8]| -> Vec<u8> {
                let h = h.strip_suffix(default_port).unwrap_or(h);
                h.to_ascii_lowercase()
            };
            if bare(authority.as_bytes()) != bare(at(buf, line)) {
                return refuse(400, "Host differs from the request target's authority");
            }
        }
        match self.host(buf) {
            None => {}
            Some(host) => {
                if let Err(why) = crate::uri::validate_host(host) {
                    return refuse(400, why);
                }
            }
        }
        if f.expect_unknown {
            return refuse(417, "unsupported Expect");
        }
        Ok(())
    }

    /// The client waits for `100 Continue` before it sends its body (HTTP/1.1 only: an
    /// HTTP/1.0 client's expectation is ignored, RFC 9110 §10.1.1).
    pub fn expects_continue(&self) -> bool {
        self.minor_version >= 1 && self.framing.expect_continue
    }

    /// The declared body length, if any (also 0).
    pub fn content_length(&self) -> Option<u64> {
        self.framing.content_length
    }

    pub fn body(&self) -> BodyKind {
        if self.framing.transfer_encodings > 0 {
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

    /// An HTTP/1.1 protocol switch (WebSocket) dynagate tunnels once the upstream agrees.
    /// Not h2c (a tunnel of HTTP/2 past the proxy's routing), and not with a body (whose
    /// bytes could not be told from the new protocol's): such requests are proxied as
    /// plain requests, their `Upgrade` dropped.
    pub fn is_upgrade(&self) -> bool {
        let f = &self.framing;
        self.minor_version == 1
            && f.upgrade
            && f.conn_upgrade
            && !f.upgrade_h2c
            && self.body() == BodyKind::Empty
    }

    /// Writes the head sent upstream: origin-form target (the normalised path when
    /// `ctx.path` is given), HTTP/1.1, hop-by-hop headers out, X-Forwarded-* and
    /// X-Real-IP set, Host kept unless the target's authority or `upstream_host` replaces
    /// it, and the body's framing written by dynagate itself.
    pub fn write_upstream(&self, buf: &[u8], out: &mut Vec<u8>, ctx: &UpstreamHeadCtx<'_>) {
        let (target, authority) = self.origin_form(buf);
        out.extend_from_slice(at(buf, self.method));
        out.push(b' ');
        match ctx.path {
            Some(path) => {
                out.extend_from_slice(path.as_bytes());
                if let Some((_, query)) = target.split_once('?') {
                    out.push(b'?');
                    out.extend_from_slice(query.as_bytes());
                }
            }
            None => {
                // `http://h?q` has an empty path: origin-form needs its `/` (RFC 9112 §3.2.1).
                if target.starts_with('?') {
                    out.push(b'/');
                }
                out.extend_from_slice(target.as_bytes());
            }
        }
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let f = &self.framing;
        let upgrade = ctx.upgrade;
        let replace_host = ctx.upstream_host.is_some() || authority.is_some();
        let mut prior_xff: Option<&[u8]> = None;
        for h in &self.headers {
            let name = at(buf, h.name);
            let value = at(buf, h.value);
            if !ctx.underscores && name.contains(&b'_') {
                continue;
            }
            if is_hop_by_hop(name) {
                if !(upgrade && is(name, "upgrade")) {
                    continue;
                }
            } else if is(name, "content-length")
                || (f.conn_names_other && named_by_connection(buf, &self.headers, name))
            {
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
            if replace_host && is(name, "host") {
                continue;
            }
            push_header(out, name, value);
        }
        if let Some(h) = ctx.upstream_host {
            push_header(out, b"host", h);
        } else if let Some(a) = authority {
            push_header(out, b"host", a.as_bytes());
        } else if self.host.is_none() {
            // An HTTP/1.0 request may come without Host; the HTTP/1.1 one sent upstream
            // must have one (nginx sends its $proxy_host, the upstream's name).
            let name = ctx.default_host;
            let name = if crate::uri::validate_host(name).is_ok() {
                name
            } else {
                b"localhost"
            };
            push_header(out, b"host", name);
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
        if f.transfer_encodings > 0 {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        } else if let Some(n) = f.content_length {
            push_length(out, n);
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// Turns an upstream head written for a chunked body into one for a body of `len` bytes
/// (a chunked request body read whole and decoded): `write_upstream` writes the
/// Transfer-Encoding line last, so it is that line that is replaced.
pub fn reframe_with_length(up_head: &mut Vec<u8>, len: u64) {
    const CHUNKED_END: &[u8] = b"transfer-encoding: chunked\r\n\r\n";
    debug_assert!(up_head.ends_with(CHUNKED_END));
    if up_head.ends_with(CHUNKED_END) {
        up_head.truncate(up_head.len() - CHUNKED_END.len());
        push_length(up_head, len);
        up_head.extend_from_slice(b"\r\n");
    }
}

pub struct UpstreamHeadCtx<'a> {
    pub client_ip: &'a str,
    pub upstream_host: Option<&'a [u8]>,
    pub upgrade: bool,
    /// The normalised path sent instead of the client's (query kept as received).
    pub path: Option<&'a str>,
    /// Host sent for a request that named none (HTTP/1.0): the upstream's name.
    pub default_host: &'a [u8],
    /// Header names with `_` are forwarded (nginx's `underscores_in_headers on`); by
    /// default they are dropped: CGI-style origins read `Content_Length` as
    /// `Content-Length`.
    pub underscores: bool,
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
        if !(100..=599).contains(&status) {
            return Err(HeadError::Invalid("status outside 100-599"));
        }
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
        // As strict as nginx with its upstreams: a response whose length could be read two
        // ways is refused (502), never guessed at.
        if framing.transfer_encodings > 0 && framing.content_lengths > 0 {
            return Err(HeadError::Invalid(
                "both Content-Length and Transfer-Encoding",
            ));
        }
        if framing.transfer_encodings > 1
            || (framing.transfer_encodings == 1 && !framing.te_chunked)
        {
            return Err(HeadError::Invalid("Transfer-Encoding other than chunked"));
        }
        if framing.content_lengths > 1 {
            return Err(HeadError::Invalid("more than one Content-Length"));
        }
        if framing.bad_length {
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
        } else if self.framing.transfer_encodings > 0 {
            BodyKind::Chunked
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

    /// Writes the head sent to the client. `out_body` is the framing the client gets;
    /// the framing header is dynagate's own, whatever the upstream wrote.
    pub fn write_client(
        &self,
        buf: &[u8],
        out: &mut Vec<u8>,
        request_was_head: bool,
        out_body: OutFraming,
        connection: ClientConnection,
    ) {
        out.extend_from_slice(b"HTTP/1.1 ");
        push_decimal(out, self.status as u64);
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
            } else if is(name, "content-length")
                || (f.conn_names_other && named_by_connection(buf, &self.headers, name))
            {
                continue;
            }
            push_header(out, name, at(buf, h.value));
        }
        // 1xx and 204 have no framing (RFC 9110 §8.6); a HEAD answer or a 304 keeps the
        // length it announces though no body follows.
        if !((100..200).contains(&self.status) || self.status == 204) {
            match (out_body, self.body(request_was_head)) {
                (OutFraming::Raw, _) => {}
                (OutFraming::Chunked, _) | (OutFraming::Same, BodyKind::Chunked) => {
                    out.extend_from_slice(b"transfer-encoding: chunked\r\n")
                }
                (OutFraming::Same, BodyKind::Length(n)) => push_length(out, n),
                (OutFraming::Same, BodyKind::Empty) => {
                    if let Some(n) = f.content_length {
                        push_length(out, n);
                    } else if f.transfer_encodings > 0 {
                        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                    }
                }
                (OutFraming::Same, BodyKind::UntilClose) => {}
            }
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

fn push_length(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(b"content-length: ");
    push_decimal(out, n);
    out.extend_from_slice(b"\r\n");
}

/// How the body goes out to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutFraming {
    /// As it came: a length, no body, or (HTTP/1.0 client) until close.
    Same,
    /// Chunked coding written by dynagate: a chunked body decoded and framed anew, or one
    /// delimited by close (HTTP/1.1 client).
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
    push_decimal(out, status as u64);
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: ");
    push_decimal(out, body.len() as u64 + 1);
    if close {
        out.extend_from_slice(b"\r\nconnection: close");
    }
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body.as_bytes());
    out.push(b'\n');
}

/// Appends `n` in decimal without allocating (every response head writes one or two).
fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

#[cfg(test)]
mod tests;
