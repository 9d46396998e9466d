//! Response compression as Consul's agent does it: every API handler is wrapped in
//! `gziphandler.GzipHandlerWithOpts(gziphandler.MinSize(0))` (hashicorp/consul,
//! agent/http.go), so a request whose `Accept-Encoding` takes gzip gets its body
//! gzip-coded with `Content-Encoding: gzip` and `Vary: Accept-Encoding`. Go's net/http
//! (consul/api, consul-template) asks for gzip by default and decodes it transparently;
//! Python `requests` (py-consul) sends `gzip, deflate`; nginx-upsync-module sends no
//! `Accept-Encoding` and gets the identity body.
//!
//! Two differences from Consul, both invisible to a client (which must take either
//! coding): bodies under [`GZIP_MIN`] bytes go out as they are, and so does a body whose
//! gzip form would not be smaller (an already compressed KV value). A shared blocking
//! answer is compressed once, for all its watchers (see [`crate::blocking`]).

use bytes::Bytes;
use flate2::{Compress, Compression, Crc, FlushCompress, Status};
use http::header::{HeaderMap, ACCEPT_ENCODING};
use std::cell::RefCell;

/// Smaller bodies are sent as they are: they save at most a few hundred bytes (the same
/// number of TCP segments either way), and compressing one costs 17-20 µs of the
/// registry's thread even with a reused compressor, more than writing it. Go's
/// gziphandler uses 1,400 by default (Consul sets 0). Measurements: docs/registry.md
/// "Compression".
pub(crate) const GZIP_MIN: usize = 1024;

/// The deflate level: 1, the fastest. On a real 16 KB health answer (15 instances) it
/// leaves 8.3 % of the bytes in 24 µs, level 6 5.8 % in 96 µs; either is one TCP segment.
const GZIP_LEVEL: u32 = 1;

thread_local! {
    /// A deflate compressor per thread, reset for each body: making one costs ~260 µs
    /// (its tables), more than compressing a 16 KB answer with it.
    static DEFLATE: RefCell<Option<Compress>> = const { RefCell::new(None) };
}

/// A q-value in thousandths (RFC 9110 §12.4.2: `0(.ddd)` or `1(.000)`); `None` when
/// malformed.
fn qvalue(v: &[u8]) -> Option<u16> {
    let (int, frac) = match v.iter().position(|b| *b == b'.') {
        Some(p) => (&v[..p], &v[p + 1..]),
        None => (v, &[][..]),
    };
    if int.len() != 1 || frac.len() > 3 || !frac.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut thousandths: u16 = 0;
    for i in 0..3 {
        thousandths = thousandths * 10 + frac.get(i).map_or(0, |d| u16::from(*d - b'0'));
    }
    match int[0] {
        b'0' => Some(thousandths),
        b'1' if thousandths == 0 => Some(1000),
        _ => None,
    }
}

/// Whether the answer to a request with these headers may be gzip-coded (RFC 9110
/// §12.5.3): `gzip` (or `x-gzip`) listed with a weight above 0, or else `*` with a
/// weight above 0, and `identity` not explicitly preferred. Names compare without case;
/// several `Accept-Encoding` fields are one list; an element with a malformed weight is
/// ignored; when a coding is listed twice the lower weight counts. No header, an empty
/// one, or `identity` alone: identity.
pub(crate) fn accepts_gzip(headers: &HeaderMap) -> bool {
    let mut gzip: Option<u16> = None;
    let mut star: Option<u16> = None;
    let mut identity: Option<u16> = None;
    for value in headers.get_all(ACCEPT_ENCODING) {
        for element in value.as_bytes().split(|b| *b == b',') {
            let mut params = element.split(|b| *b == b';');
            let coding = params.next().unwrap_or(b"").trim_ascii();
            if coding.is_empty() {
                continue;
            }
            let mut q = Some(1000);
            for p in params {
                let p = p.trim_ascii();
                if p.len() >= 2 && p[..2].eq_ignore_ascii_case(b"q=") {
                    q = qvalue(p[2..].trim_ascii());
                }
            }
            let Some(q) = q else { continue };
            let slot =
                if coding.eq_ignore_ascii_case(b"gzip") || coding.eq_ignore_ascii_case(b"x-gzip") {
                    &mut gzip
                } else if coding == b"*" {
                    &mut star
                } else if coding.eq_ignore_ascii_case(b"identity") {
                    &mut identity
                } else {
                    continue;
                };
            *slot = Some(slot.map_or(q, |old| old.min(q)));
        }
    }
    let q = gzip.or(star).unwrap_or(0);
    q > 0
        && match identity {
            Some(i) => q >= i,
            None => true,
        }
}

/// Whether a body of this length is ever sent gzip-coded (its answer then carries
/// `Vary: Accept-Encoding`, whichever coding a request gets).
pub(crate) fn eligible(len: usize) -> bool {
    len >= GZIP_MIN
}

/// gzip member header (RFC 1952): no name, no time, XFL 4 (fastest), OS unknown.
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 4, 255];

/// The gzip form of `body`, or `None` when it is not worth sending (too small, not
/// smaller than `body`, or the encoder failed: then the body goes out as it is).
pub(crate) fn gzip(body: &[u8]) -> Option<Bytes> {
    if !eligible(body.len()) {
        return None;
    }
    // Header + deflate stream + CRC-32 + length must come out smaller than the body.
    let room = body.len().checked_sub(GZIP_HEADER.len() + 8 + 1)?;
    let mut out = vec![0u8; GZIP_HEADER.len() + room];
    out[..GZIP_HEADER.len()].copy_from_slice(&GZIP_HEADER);
    let n = DEFLATE.with(|cell| {
        let mut cell = cell.try_borrow_mut().ok()?;
        let c = cell.get_or_insert_with(|| Compress::new(Compression::new(GZIP_LEVEL), false));
        c.reset();
        deflate(c, body, &mut out[GZIP_HEADER.len()..])
    })?;
    let mut crc = Crc::new();
    crc.update(body);
    let mut coded = Vec::with_capacity(GZIP_HEADER.len() + n + 8);
    coded.extend_from_slice(&out[..GZIP_HEADER.len() + n]);
    coded.extend_from_slice(&crc.sum().to_le_bytes());
    // ISIZE: the length modulo 2^32.
    coded.extend_from_slice(&(body.len() as u32).to_le_bytes());
    Some(Bytes::from(coded))
}

/// The raw deflate stream of `body` into `out`: its length, or `None` when it does not
/// fit or the compressor fails.
fn deflate(c: &mut Compress, body: &[u8], out: &mut [u8]) -> Option<usize> {
    loop {
        let read = usize::try_from(c.total_in()).ok()?;
        let written = usize::try_from(c.total_out()).ok()?;
        let before = (c.total_in(), c.total_out());
        let status = c
            .compress(
                body.get(read..)?,
                out.get_mut(written..)?,
                FlushCompress::Finish,
            )
            .ok()?;
        if status == Status::StreamEnd {
            return usize::try_from(c.total_out()).ok();
        }
        if (c.total_in(), c.total_out()) == before {
            // No progress: the output is full.
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use std::io::Read;

    fn accepts(values: &[&str]) -> bool {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
        }
        accepts_gzip(&h)
    }

    #[test]
    fn accept_encoding() {
        assert!(!accepts(&[]), "absent: identity");
        assert!(!accepts(&[""]));
        assert!(!accepts(&["identity"]));
        assert!(!accepts(&["deflate, br"]));
        assert!(accepts(&["gzip"]), "Go's net/http");
        assert!(accepts(&["gzip, deflate"]), "Python requests");
        assert!(accepts(&["gzip, deflate, br, zstd"]), "browsers");
        assert!(accepts(&["GZip"]));
        assert!(accepts(&["x-gzip"]));
        assert!(accepts(&["deflate", "gzip"]), "several fields are one list");
        assert!(accepts(&["*"]));
        assert!(accepts(&["br;q=1.0, *;q=0.1"]));
        assert!(!accepts(&["gzip;q=0"]));
        assert!(!accepts(&["gzip; q=0.000"]));
        assert!(!accepts(&["gzip;Q=0, *"]), "gzip refused by name beats *");
        assert!(!accepts(&["*;q=0"]));
        assert!(!accepts(&["*;q=0, identity"]));
        assert!(accepts(&["gzip;q=0.001"]));
        assert!(accepts(&[" gzip ; q=0.5 , identity;q=0.5"]));
        assert!(!accepts(&["gzip;q=0.5, identity"]), "identity preferred");
        assert!(accepts(&["identity;q=0, gzip"]));
        assert!(!accepts(&["gzip, gzip;q=0"]), "the lower weight counts");
        // Malformed weights: the element is ignored.
        for bad in [
            "gzip;q=",
            "gzip;q=2",
            "gzip;q=1.5",
            "gzip;q=0.1234",
            "gzip;q=-1",
            "gzip;q=x",
        ] {
            assert!(!accepts(&[bad]), "{bad}");
        }
        assert!(accepts(&["gzip;q=x, *"]), "then * decides");
        assert!(accepts(&["gzip;level=1"]), "other parameters are ignored");
        assert!(accepts(&[",,gzip,,"]));
        let mut h = HeaderMap::new();
        h.append(
            ACCEPT_ENCODING,
            HeaderValue::from_bytes(b"gzip\xff;q=1").unwrap(),
        );
        assert!(!accepts_gzip(&h), "non-ASCII coding: not gzip, no panic");
    }

    #[test]
    fn qvalues() {
        assert_eq!(qvalue(b"0"), Some(0));
        assert_eq!(qvalue(b"0.5"), Some(500));
        assert_eq!(qvalue(b"0.05"), Some(50));
        assert_eq!(qvalue(b"0.123"), Some(123));
        assert_eq!(qvalue(b"1"), Some(1000));
        assert_eq!(qvalue(b"1."), Some(1000));
        assert_eq!(qvalue(b"1.000"), Some(1000));
        for bad in [
            &b""[..],
            b".5",
            b"1.001",
            b"2",
            b"00.1",
            b"0.1234",
            b"0.a",
            b"+1",
        ] {
            assert_eq!(qvalue(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn compresses_only_what_is_worth_it() {
        assert_eq!(gzip(b"[]"), None);
        assert_eq!(gzip(&vec![b'x'; GZIP_MIN - 1]), None);
        let body = br#"{"Node":{"Node":"dynagate","Address":"127.0.0.1"},"Checks":[]},"#.repeat(40);
        let z = gzip(&body).expect("repetitive JSON compresses");
        assert!(z.len() < body.len() / 5);
        assert_eq!(&z[..3], b"\x1f\x8b\x08", "gzip member header");
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&z[..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, body);
        // Random bytes do not get smaller: sent as they are.
        let mut noise = vec![0u8; 4096];
        let mut x: u32 = 0x9e37_79b9;
        for b in noise.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        assert_eq!(gzip(&noise), None);
        // The compressor is reused: after an abandoned body, the next one is whole.
        let decode = |z: &[u8]| {
            let mut back = Vec::new();
            flate2::read::GzDecoder::new(z)
                .read_to_end(&mut back)
                .unwrap();
            back
        };
        assert_eq!(decode(&gzip(&body).unwrap()), body);
        // Half noise, half text: smaller, and decodes to the same bytes.
        let mixed = [&noise[..2048], &body[..]].concat();
        assert_eq!(decode(&gzip(&mixed).unwrap()), mixed);
        let big = br#"{"Key":"upstreams/x/10.0.0.1:80","Value":null},"#.repeat(50_000);
        assert_eq!(decode(&gzip(&big).unwrap()), big);
    }
}
