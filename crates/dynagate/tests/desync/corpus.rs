//! The corpus files (`requests.toml`, `responses.toml`): their cases, the byte escapes
//! they are written in, and the placeholders of the expected bytes.
//!
//! Bytes are TOML literal strings with these escapes of our own: `\r` `\n` `\t` `\0`
//! `\\` and `\xNN`. Expected bytes may hold placeholders:
//! - `{fwd}` / `{fwd:HOST}` / `{fwd:HOST|PRIOR}`: the forwarded-header block dynagate
//!   appends (spec "Upstream request head"): `x-forwarded-for: {PRIOR, }127.0.0.1`,
//!   `x-real-ip`, `x-forwarded-proto: http`, `x-forwarded-host: HOST` (default
//!   `corpus.test`), each line ending in CRLF;
//! - `{ip}`: the client address, 127.0.0.1;
//! - `{chunked}`: a chunked body in canonical form (lowercase hex sizes without leading
//!   zeros, no extensions, no trailers, ending `0\r\n\r\n`) whose decoded bytes are the
//!   case's next `bodies` entry (or `body`); its chunk boundaries are not compared;
//! - `{partial}` (the whole value): the backend may have received nothing or an
//!   incomplete request, but no complete one.

use serde::Deserialize;
use std::collections::BTreeMap;

pub const CLIENT_IP: &str = "127.0.0.1";
pub const DEFAULT_HOST: &str = "corpus.test";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestFile {
    /// Key → where the cases marked with it come from.
    pub sources: BTreeMap<String, String>,
    pub case: Vec<RequestCase>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RequestCase {
    pub name: String,
    /// Which finding or spec table the case belongs to (for counts and the report).
    pub class: String,
    pub source: String,
    /// The bytes the client sends, in one write.
    pub request: String,
    /// Status of the first final answer.
    pub status: u16,
    /// Statuses of every answer, when there are several.
    #[serde(default)]
    pub statuses: Option<Vec<u16>>,
    /// What the backend the route leads to must receive (template, see above).
    pub backend: String,
    /// Number of final answers on the connection (default 1).
    #[serde(default)]
    pub answers: Option<usize>,
    /// The connection must be closed after (true), must stay open (false), either (absent).
    #[serde(default)]
    pub closed: Option<bool>,
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub bodies: Option<Vec<String>>,
    /// `main` (default) or `public`: which recording backend `backend` is compared to;
    /// the other must receive nothing.
    #[serde(default)]
    pub route: Option<String>,
    /// After a 101: bytes go through the tunnel and come back echoed.
    #[serde(default)]
    pub tunnel: Option<bool>,
    /// Also run by `every_early_answer_is_sent_once` (read until close or quiet).
    #[serde(default)]
    pub early: Option<bool>,
    /// Outside the spec: the outcome is what we think right, reported, not asserted.
    #[serde(default)]
    pub gap: Option<String>,
    #[serde(default)]
    pub note: Option<String>,
    /// Reserved: the same case over HTTP/2 (not run yet).
    #[serde(default)]
    pub h2: Option<bool>,
    /// nginx refuses this case and the spec accepts it, knowingly: why (the nginx
    /// comparison lists it apart instead of failing).
    #[serde(default)]
    pub nginx: Option<String>,
    /// The same for HAProxy (`haproxy = "why"`): HAProxy refuses, by design, a case the
    /// spec accepts knowingly.
    #[serde(default)]
    pub haproxy: Option<String>,
}

impl RequestCase {
    pub fn answers(&self) -> usize {
        self.answers.unwrap_or(1)
    }
    pub fn route(&self) -> &str {
        self.route.as_deref().unwrap_or("main")
    }
    pub fn bodies(&self) -> Result<Vec<Vec<u8>>, String> {
        bodies(&self.body, &self.bodies)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseFile {
    pub sources: BTreeMap<String, String>,
    pub case: Vec<ResponseCase>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ResponseCase {
    pub name: String,
    pub class: String,
    pub source: String,
    /// The raw bytes the backend answers with.
    pub response: String,
    /// `keep` (default), `close`, `echo` (switched: echo bytes), `hold` (never answer).
    #[serde(default)]
    pub then: Option<String>,
    /// The client's request; `{path}` is `/resp/<name>`. Default: a GET to resp.test.
    #[serde(default)]
    pub request: Option<String>,
    /// Final status the client gets.
    pub status: u16,
    /// The exact bytes the client gets (every answer: interim and final; template).
    #[serde(default)]
    pub client: Option<String>,
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub bodies: Option<Vec<String>>,
    #[serde(default)]
    pub closed: Option<bool>,
    /// The body cannot be delivered whole: the client gets a 502, or a head followed by
    /// an incomplete body and the connection closed.
    #[serde(default)]
    pub broken_body: Option<bool>,
    #[serde(default)]
    pub gap: Option<String>,
    #[serde(default)]
    pub note: Option<String>,
    #[serde(default)]
    pub h2: Option<bool>,
}

impl ResponseCase {
    pub fn path(&self) -> String {
        format!("/resp/{}", self.name)
    }
    pub fn request_bytes(&self) -> Result<Vec<u8>, String> {
        let raw = self
            .request
            .clone()
            .unwrap_or_else(|| r"GET {path} HTTP/1.1\r\nHost: resp.test\r\n\r\n".to_string());
        unescape(&raw.replace("{path}", &self.path()))
    }
    pub fn bodies(&self) -> Result<Vec<Vec<u8>>, String> {
        bodies(&self.body, &self.bodies)
    }
}

fn bodies(one: &Option<String>, many: &Option<Vec<String>>) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    if let Some(b) = one {
        out.push(unescape(b)?);
    }
    for b in many.iter().flatten() {
        out.push(unescape(b)?);
    }
    Ok(out)
}

pub fn load_requests() -> RequestFile {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/desync/requests.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let file: RequestFile = toml::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut problems = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for c in &file.case {
        if !seen.insert(c.name.clone()) {
            problems.push(format!("{}: duplicate name", c.name));
        }
        if !file.sources.contains_key(&c.source) {
            problems.push(format!("{}: unknown source {:?}", c.name, c.source));
        }
        if let Err(e) = unescape(&c.request) {
            problems.push(format!("{}: request: {e}", c.name));
        }
        if let Err(e) = Template::parse(&c.backend) {
            problems.push(format!("{}: backend: {e}", c.name));
        }
        if let Err(e) = c.bodies() {
            problems.push(format!("{}: body: {e}", c.name));
        }
        if !["main", "public"].contains(&c.route()) {
            problems.push(format!("{}: unknown route {:?}", c.name, c.route()));
        }
    }
    assert!(
        problems.is_empty(),
        "requests.toml:\n{}",
        problems.join("\n")
    );
    file
}

pub fn load_responses() -> ResponseFile {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/desync/responses.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let file: ResponseFile = toml::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut problems = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for c in &file.case {
        if !seen.insert(c.name.clone()) {
            problems.push(format!("{}: duplicate name", c.name));
        }
        if !file.sources.contains_key(&c.source) {
            problems.push(format!("{}: unknown source {:?}", c.name, c.source));
        }
        if let Err(e) = unescape(&c.response) {
            problems.push(format!("{}: response: {e}", c.name));
        }
        if let Err(e) = c.request_bytes() {
            problems.push(format!("{}: request: {e}", c.name));
        }
        if let Some(t) = &c.client {
            if let Err(e) = Template::parse(t) {
                problems.push(format!("{}: client: {e}", c.name));
            }
        }
        if let Err(e) = c.bodies() {
            problems.push(format!("{}: body: {e}", c.name));
        }
        if let Err(e) = then(&c.then) {
            problems.push(format!("{}: {e}", c.name));
        }
    }
    assert!(
        problems.is_empty(),
        "responses.toml:\n{}",
        problems.join("\n")
    );
    file
}

pub fn then(v: &Option<String>) -> Result<super::recorder::Then, String> {
    use super::recorder::Then;
    Ok(match v.as_deref().unwrap_or("keep") {
        "keep" => Then::Keep,
        "close" => Then::Close,
        "echo" => Then::Echo,
        "hold" => Then::Hold,
        other => return Err(format!("unknown then {other:?}")),
    })
}

/// Decodes the corpus escapes.
pub fn unescape(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let Some(&e) = b.get(i + 1) else {
            return Err("dangling backslash".into());
        };
        match e {
            b'r' => out.push(b'\r'),
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'0' => out.push(0),
            b'\\' => out.push(b'\\'),
            b'x' => {
                let hex = s
                    .get(i + 2..i + 4)
                    .ok_or_else(|| format!("short \\x escape at {i}"))?;
                let v = u8::from_str_radix(hex, 16).map_err(|_| format!("bad \\x{hex}"))?;
                out.push(v);
                i += 2;
            }
            other => return Err(format!("unknown escape \\{}", other as char)),
        }
        i += 2;
    }
    Ok(out)
}

/// Bytes shown the way the corpus writes them.
pub fn show(b: &[u8]) -> String {
    let mut s = String::new();
    for &c in b {
        match c {
            b'\r' => s.push_str("\\r"),
            b'\n' => s.push_str("\\n"),
            b'\t' => s.push_str("\\t"),
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(c as char),
            _ => s.push_str(&format!("\\x{c:02x}")),
        }
    }
    s
}

/// Shows at most `max` bytes (the start and the end).
pub fn show_short(b: &[u8], max: usize) -> String {
    if b.len() <= max {
        show(b)
    } else {
        format!(
            "{}…({} bytes)…{}",
            show(&b[..max / 2]),
            b.len() - max,
            show(&b[b.len() - max / 2..])
        )
    }
}

pub fn fwd(host: &str, prior: Option<&str>) -> String {
    let mut s = String::from("x-forwarded-for: ");
    if let Some(p) = prior {
        s.push_str(p);
        s.push_str(", ");
    }
    s.push_str(CLIENT_IP);
    s.push_str("\r\nx-real-ip: ");
    s.push_str(CLIENT_IP);
    s.push_str("\r\nx-forwarded-proto: http\r\nx-forwarded-host: ");
    s.push_str(host);
    s.push_str("\r\n");
    s
}

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Lit(Vec<u8>),
    Chunked,
}

/// Expected bytes with placeholders.
#[derive(Debug, Clone)]
pub struct Template {
    pieces: Vec<Piece>,
    pub partial: bool,
}

impl Template {
    pub fn parse(s: &str) -> Result<Template, String> {
        if s == "{partial}" {
            return Ok(Template {
                pieces: Vec::new(),
                partial: true,
            });
        }
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            let (before, after) = rest.split_at(open);
            lit.push_str(before);
            let close = after.find('}');
            let inner = close.map(|c| &after[1..c]);
            match inner {
                Some("chunked") => {
                    pieces.push(Piece::Lit(unescape(&std::mem::take(&mut lit))?));
                    pieces.push(Piece::Chunked);
                }
                Some("ip") => lit.push_str(CLIENT_IP),
                Some("fwd") => lit.push_str(&fwd(DEFAULT_HOST, None)),
                Some(i) if i.starts_with("fwd:") => {
                    let arg = &i[4..];
                    let (host, prior) = match arg.split_once('|') {
                        Some((h, p)) => (h, Some(p)),
                        None => (arg, None),
                    };
                    lit.push_str(&fwd(host, prior));
                }
                Some("partial") => return Err("{partial} must be the whole value".into()),
                _ => {
                    // A plain brace.
                    lit.push('{');
                    rest = &after[1..];
                    continue;
                }
            }
            rest = &after[close.unwrap() + 1..];
        }
        lit.push_str(rest);
        pieces.push(Piece::Lit(unescape(&lit)?));
        pieces.retain(|p| p != &Piece::Lit(Vec::new()));
        Ok(Template {
            pieces,
            partial: false,
        })
    }

    /// Whether `got` is exactly what the template says; else where it differs.
    pub fn check(&self, got: &[u8], bodies: &[Vec<u8>]) -> Result<(), String> {
        let mut pos = 0;
        let mut next = bodies.iter();
        for p in &self.pieces {
            match p {
                Piece::Lit(l) => {
                    let have = &got[pos.min(got.len())..];
                    if !have.starts_with(l) {
                        let same = have
                            .iter()
                            .zip(l.iter())
                            .take_while(|(a, b)| a == b)
                            .count();
                        return Err(format!(
                            "differs at byte {}: expected {:?}, got {:?}",
                            pos + same,
                            show_short(&l[same..], 120),
                            show_short(&have[same..], 120)
                        ));
                    }
                    pos += l.len();
                }
                Piece::Chunked => {
                    let want = next.next().cloned().unwrap_or_default();
                    let (data, used) = decode_canonical(&got[pos.min(got.len())..])
                        .map_err(|e| format!("chunked body at byte {pos}: {e}"))?;
                    if data != want {
                        return Err(format!(
                            "chunked body at byte {pos} decodes to {:?}, expected {:?}",
                            show_short(&data, 120),
                            show_short(&want, 120)
                        ));
                    }
                    pos += used;
                }
            }
        }
        if pos < got.len() {
            return Err(format!(
                "{} bytes more than expected: {:?}",
                got.len() - pos,
                show_short(&got[pos..], 160)
            ));
        }
        Ok(())
    }
}

/// Decodes a chunked body that must be in canonical form.
pub fn decode_canonical(b: &[u8]) -> Result<(Vec<u8>, usize), String> {
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        let eol = super::recorder::find(&b[i..], b"\r\n")
            .ok_or_else(|| format!("no CRLF after a chunk size at +{i}"))?;
        let line = &b[i..i + eol];
        let canonical = !line.is_empty()
            && line
                .iter()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
            && (line == b"0" || line[0] != b'0')
            && line.len() <= 16;
        if !canonical {
            return Err(format!(
                "chunk-size line {:?} is not canonical (lowercase hex, no leading zero, no extension)",
                show_short(line, 40)
            ));
        }
        let size = usize::from_str_radix(std::str::from_utf8(line).unwrap(), 16)
            .map_err(|e| e.to_string())?;
        i += eol + 2;
        if size == 0 {
            if b.get(i..i + 2) != Some(b"\r\n") {
                return Err(format!(
                    "last chunk not followed by CRLF (trailers?): {:?}",
                    show_short(&b[i.min(b.len())..], 60)
                ));
            }
            return Ok((out, i + 2));
        }
        if b.len() < i + size + 2 {
            return Err(format!("chunk of {size} bytes cut short"));
        }
        out.extend_from_slice(&b[i..i + size]);
        if &b[i + size..i + size + 2] != b"\r\n" {
            return Err("chunk data not followed by CRLF".into());
        }
        i += size + 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_expand_and_match() {
        let t = Template::parse(r"POST / HTTP/1.1\r\n{fwd:a|1.2.3.4}\r\n{chunked}").unwrap();
        let got = b"POST / HTTP/1.1\r\nx-forwarded-for: 1.2.3.4, 127.0.0.1\r\nx-real-ip: 127.0.0.1\r\nx-forwarded-proto: http\r\nx-forwarded-host: a\r\n\r\n2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n";
        t.check(got, &[b"hello".to_vec()]).unwrap();
        assert!(t.check(got, &[b"hellO".to_vec()]).is_err());
        let upper = String::from_utf8_lossy(got).replace("3\r\nllo", "3;x\r\nllo");
        assert!(t.check(upper.as_bytes(), &[b"hello".to_vec()]).is_err());
        assert_eq!(unescape(r"a\x00\xff\\").unwrap(), b"a\x00\xff\\");
        assert!(Template::parse("{partial}").unwrap().partial);
        let plain = Template::parse(r"GET /{x} HTTP/1.1\r\n").unwrap();
        plain.check(b"GET /{x} HTTP/1.1\r\n", &[]).unwrap();
    }
}
