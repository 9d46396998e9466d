//! Helpers shared by the fuzz targets in `fuzz_targets/`.

/// A small deterministic generator seeded from the input, for choices the input does
/// not spell out (split points, chunk sizes): the same input always makes the same choices.
pub struct Rng(u64);

impl Rng {
    pub fn from_input(data: &[u8]) -> Rng {
        // FNV-1a: every byte of the input moves the seed.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in data {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        Rng(h | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `0..=max`.
    pub fn upto(&mut self, max: usize) -> usize {
        (self.next() % (max as u64 + 1)) as usize
    }
}

/// Header names compared as HTTP does (ASCII case-insensitive).
pub fn is(name: &[u8], lower: &str) -> bool {
    name.eq_ignore_ascii_case(lower.as_bytes())
}

pub const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

pub fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP.iter().any(|h| is(name, h))
}

/// Comma-separated tokens of a header value, trimmed, empty ones left out.
pub fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
}

/// A head as written on the wire: every line ends in CRLF, no line holds a bare CR or
/// LF, the one empty line is the last. Panics (a fuzz finding) otherwise.
pub fn assert_clean_lines(head: &[u8]) {
    assert!(
        head.ends_with(b"\r\n\r\n"),
        "head does not end in CRLF CRLF"
    );
    // Up to the last line's LF: every piece but the empty one after it is a line.
    let lines = &head[..head.len() - 3];
    for line in lines.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or_else(|| {
            panic!(
                "bare LF in the written head: {:?}",
                String::from_utf8_lossy(head)
            )
        });
        assert!(
            !line.contains(&b'\r'),
            "bare CR in the written head: {:?}",
            String::from_utf8_lossy(head)
        );
        assert!(
            !line.is_empty(),
            "empty line inside the written head: {:?}",
            String::from_utf8_lossy(head)
        );
    }
}

/// Chunked coding of `data` cut into runs whose sizes `sizes` picks (each at least 1),
/// written as dynagate writes it (`h1::io`): `push_chunk_size`, the data, CRLF, and
/// `LAST_CHUNK` at the end.
pub fn encode_chunked(data: &[u8], mut sizes: impl FnMut(usize) -> usize) -> Vec<u8> {
    use dynagate_proxy::h1::framing::{push_chunk_size, LAST_CHUNK};
    let mut out = Vec::with_capacity(data.len() + 32);
    let mut rest = data;
    while !rest.is_empty() {
        let n = sizes(rest.len()).clamp(1, rest.len());
        push_chunk_size(&mut out, n);
        out.extend_from_slice(&rest[..n]);
        out.extend_from_slice(b"\r\n");
        rest = &rest[n..];
    }
    out.extend_from_slice(LAST_CHUNK);
    out
}

/// A field value without the optional whitespace (SP, HTAB) around it.
pub fn trim_ows(v: &[u8]) -> &[u8] {
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

/// The one reading of a message's framing headers the SPEC of issue 11 lets through:
/// at most one Content-Length (1*DIGIT, at most i64::MAX) or one Transfer-Encoding
/// (exactly `chunked`), never both. Panics with `what` otherwise.
pub fn assert_unambiguous_framing(headers: &[httparse::Header<'_>], what: &str) {
    let lines = |n: &str| -> Vec<&[u8]> {
        headers
            .iter()
            .filter(|h| is(h.name.as_bytes(), n))
            .map(|h| trim_ows(h.value))
            .collect()
    };
    let (cl, te) = (lines("content-length"), lines("transfer-encoding"));
    assert!(
        cl.is_empty() || te.is_empty(),
        "{what}: both Content-Length and Transfer-Encoding"
    );
    assert!(
        cl.len() <= 1 && te.len() <= 1,
        "{what}: framing header repeated"
    );
    if let Some(v) = cl.first() {
        assert!(
            !v.is_empty()
                && v.iter().all(u8::is_ascii_digit)
                && std::str::from_utf8(v)
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                    .is_some_and(|n| n <= i64::MAX as u64),
            "{what}: Content-Length {:?}",
            String::from_utf8_lossy(v)
        );
    }
    if let Some(v) = te.first() {
        assert!(
            v.eq_ignore_ascii_case(b"chunked"),
            "{what}: Transfer-Encoding {:?}",
            String::from_utf8_lossy(v)
        );
    }
}
