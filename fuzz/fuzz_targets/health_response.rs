//! The active health checker's response parser (`dynagate-proxy` health.rs).
//!
//! No panic, and the verdict is consistent:
//! - once the connection ended (`eof`) the parser never asks for more bytes;
//! - a verdict reached on a prefix of the bytes (what the checker acts on, as answers
//!   arrive in pieces) is the verdict on all of them: the same failure, or the same
//!   status and body match;
//! - a verdict reached before the end stays when the end comes;
//! - a connection is kept only when the response ends exactly at the end of the bytes,
//!   its framing is unambiguous, and (chunked) its body is valid chunked coding;
//! - `found` is whether the body holds the text, for bodies it reads whole.
#![no_main]

use dynagate_fuzz::{is, Rng};
use dynagate_proxy::h1::framing::ChunkedDecoder;
use dynagate_proxy::health::fuzzing::{parse_response, Verdict, MAX_BODY};
use libfuzzer_sys::fuzz_target;

const NEEDLE: &[u8] = b"ok";

fn decided(v: &Verdict) -> bool {
    matches!(v, Verdict::Fail(_) | Verdict::Done { .. })
}

/// The same verdict, whether the connection was kept aside.
fn same(a: &Verdict, b: &Verdict) -> bool {
    match (a, b) {
        (
            Verdict::Done {
                status: s1,
                found: f1,
                ..
            },
            Verdict::Done {
                status: s2,
                found: f2,
                ..
            },
        ) => s1 == s2 && f1 == f2,
        _ => a == b,
    }
}

fuzz_target!(|buf: &[u8]| {
    if buf.len() >= MAX_BODY {
        return;
    }
    let mut rng = Rng::from_input(buf);
    for head_only in [false, true] {
        for needle in [None, Some(NEEDLE)] {
            let open = parse_response(buf, false, head_only, needle);
            let closed = parse_response(buf, true, head_only, needle);
            assert_ne!(closed, Verdict::More, "asks for more after the end");
            if decided(&open) {
                assert!(same(&open, &closed), "{open:?} then at the end {closed:?}");
            }
            let cut = rng.upto(buf.len());
            let early = parse_response(&buf[..cut], false, head_only, needle);
            if decided(&early) {
                assert!(
                    same(&early, &open),
                    "{early:?} on {cut} bytes, {open:?} on all"
                );
            }
            if let Verdict::Done {
                keep: true, found, ..
            } = open
            {
                check_kept(buf, head_only, needle, found);
            }
        }
    }
});

/// A kept connection: the response is exactly `buf`, with one reading of its framing.
fn check_kept(buf: &[u8], head_only: bool, needle: Option<&[u8]>, found: bool) {
    let show = || String::from_utf8_lossy(buf).into_owned();
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut slots);
    let Ok(httparse::Status::Complete(len)) = resp.parse(buf) else {
        panic!("kept after a head httparse does not finish: {}", show())
    };
    assert_eq!(
        resp.version,
        Some(1),
        "HTTP/1.0 connection kept: {}",
        show()
    );
    let status = resp.code.unwrap_or(0);
    let lengths: Vec<&[u8]> = resp
        .headers
        .iter()
        .filter(|h| is(h.name.as_bytes(), "content-length"))
        .map(|h| h.value)
        .collect();
    let codings: Vec<&[u8]> = resp
        .headers
        .iter()
        .filter(|h| is(h.name.as_bytes(), "transfer-encoding"))
        .map(|h| h.value)
        .collect();
    let body = &buf[len..];
    if head_only || status == 204 || status == 304 || status / 100 == 1 {
        assert!(
            body.is_empty(),
            "kept with bytes after a bodiless answer: {}",
            show()
        );
        return;
    }
    assert!(
        lengths.is_empty() || codings.is_empty(),
        "kept after both Content-Length and Transfer-Encoding: {}",
        show()
    );
    if !codings.is_empty() {
        assert!(
            codings.len() == 1 && codings[0].trim_ascii().eq_ignore_ascii_case(b"chunked"),
            "kept after a Transfer-Encoding other than chunked: {}",
            show()
        );
        let mut s = ChunkedDecoder::default();
        let mut data = Vec::new();
        let used = s.feed(body, |a, b| data.extend_from_slice(&body[a..b]));
        assert!(
            used == Ok(body.len()) && s.is_done(),
            "kept after a body that is not valid chunked coding ({used:?}): {}",
            show()
        );
        if let Some(n) = needle {
            assert_eq!(found, data.windows(n.len()).any(|w| w == n), "{}", show());
        }
        return;
    }
    assert!(
        !lengths.is_empty(),
        "kept after a body delimited by close: {}",
        show()
    );
    // Each line 1*DIGIT, all of the same value (RFC 9110 §8.6), and that is the body.
    let values: Vec<Option<usize>> = lengths
        .iter()
        .map(|l| {
            let l = l.trim_ascii();
            if l.is_empty() || !l.iter().all(u8::is_ascii_digit) {
                return None;
            }
            std::str::from_utf8(l).ok()?.parse().ok()
        })
        .collect();
    assert!(
        values.iter().all(|v| v.is_some() && *v == values[0]),
        "kept after an ambiguous Content-Length: {}",
        show()
    );
    assert_eq!(
        values[0],
        Some(body.len()),
        "kept with a body other than its Content-Length: {}",
        show()
    );
    if let Some(n) = needle {
        assert_eq!(found, body.windows(n.len()).any(|w| w == n), "{}", show());
    }
}
