//! The client request head: `RequestHead::parse`, `screen`, the accessors, and the head
//! written upstream (docs: SPEC of issue 11, "Upstream request head written by dynagate").
//!
//! What `screen()` lets through has unambiguous framing: at most one Content-Length
//! (1*DIGIT) or one `Transfer-Encoding: chunked` (HTTP/1.1 only), never both; at most
//! one Host; no Expect but 100-continue.
//!
//! For every head `screen()` and `uri::normalize_path` let through (what `exchange`
//! forwards), with each of: no route Host / the normalised path / names with `_`
//! dropped, and a route Host / the original path / `underscores_in_headers`, the
//! upstream head
//! - parses completely with httparse, as HTTP/1.1, with the same method;
//! - carries the client's header lines byte-exact and in order minus the dropped ones
//!   (hop-by-hop, named by `Connection` except host/content-length/transfer-encoding,
//!   X-Forwarded-*/X-Real-IP, Content-Length, names with `_` unless allowed, Host when
//!   the target was absolute-form or the route sets the upstream Host), then only
//!   dynagate's own lines, in the documented order;
//! - has for target the normalised path (or the original one) and the query as received;
//! - has no hop-by-hop header but `connection: upgrade` + `Upgrade` on upgrades and the
//!   `transfer-encoding: chunked` dynagate adds, at most one Content-Length, Transfer-
//!   Encoding and Host line, never both framings, no name with `_` unless allowed, no
//!   bare CR or LF;
//! - parses again with `RequestHead::parse`, passes `screen()`, and has the same body kind;
//!   re-framed with a length (`reframe_with_length`, a chunked body read whole), it
//!   parses and passes `screen()` with that length as its only framing.
#![no_main]

use dynagate_fuzz::{
    assert_clean_lines, assert_unambiguous_framing, is, is_hop_by_hop, tokens, trim_ows,
};
use dynagate_proxy::h1::framing::BodyKind;
use dynagate_proxy::h1::head::{reframe_with_length, Parsed, RequestHead, UpstreamHeadCtx};
use dynagate_proxy::uri::normalize_path;
use libfuzzer_sys::fuzz_target;
use std::borrow::Cow;

const MAX_HEADERS: usize = 100;

/// Lines dynagate writes after the client's, in this order.
const ADDED: [&str; 8] = [
    "host",
    "x-forwarded-for",
    "x-real-ip",
    "x-forwarded-proto",
    "x-forwarded-host",
    "connection",
    "content-length",
    "transfer-encoding",
];

fuzz_target!(|buf: &[u8]| {
    let head = match RequestHead::parse(buf, MAX_HEADERS) {
        Ok(Parsed::Complete(h)) => h,
        _ => return,
    };
    assert!(head.len <= buf.len());
    // The accessors never panic, whatever the head.
    let _ = (
        head.method(buf),
        head.target(buf),
        head.origin_form(buf),
        head.path(buf),
        head.query(buf),
        head.host(buf),
        head.header(buf, "host"),
        head.headers_named(buf, "cookie").count(),
        head.is_head(buf),
        head.keep_alive(),
        head.is_upgrade(),
        head.body(),
    );
    let screened = head.screen(buf);
    if let Err(refusal) = screened {
        assert!(matches!(refusal.status, 400 | 417 | 501), "{refusal:?}");
    }
    let normal = normalize_path(head.path(buf));
    let upgrade = head.is_upgrade();
    for (client_ip, upstream_host, original_path, underscores) in [
        ("192.0.2.7", None, false, false),
        (
            "2001:db8::1",
            Some(&b"backend.internal:8080"[..]),
            true,
            true,
        ),
    ] {
        // As exchange.rs: the normalised path unless the route forwards the original.
        let path = match &normal {
            Ok(Cow::Owned(p)) if !original_path => Some(p.as_str()),
            _ => None,
        };
        let ctx = UpstreamHeadCtx {
            client_ip,
            upstream_host,
            upgrade,
            path,
            underscores,
            default_host: b"up",
        };
        let mut out = Vec::new();
        head.write_upstream(buf, &mut out, &ctx);
        if screened.is_ok() && normal.is_ok() {
            check_upstream(buf, &head, &out, &ctx);
        }
    }
});

fn check_upstream(buf: &[u8], head: &RequestHead, out: &[u8], ctx: &UpstreamHeadCtx<'_>) {
    let show = || String::from_utf8_lossy(out).into_owned();
    assert_clean_lines(out);

    // What the client sent, as httparse saw it.
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut client = httparse::Request::new(&mut slots);
    let Ok(httparse::Status::Complete(_)) = client.parse(buf) else {
        panic!("RequestHead parsed what httparse refuses")
    };
    // What screen() let through has one reading (no smuggling), as the SPEC says.
    assert_unambiguous_framing(client.headers, "screen() let through");
    if client
        .headers
        .iter()
        .any(|h| is(h.name.as_bytes(), "transfer-encoding"))
    {
        assert_eq!(
            client.version,
            Some(1),
            "Transfer-Encoding on HTTP/1.0 let through"
        );
    }
    let hosts = client
        .headers
        .iter()
        .filter(|h| is(h.name.as_bytes(), "host"))
        .count();
    assert!(hosts <= 1, "more than one Host let through");
    for h in client
        .headers
        .iter()
        .filter(|h| is(h.name.as_bytes(), "expect"))
    {
        assert!(
            trim_ows(h.value).eq_ignore_ascii_case(b"100-continue"),
            "Expect other than 100-continue let through"
        );
    }
    let target = client.path.unwrap_or("");
    let absolute = ["http://", "https://"]
        .iter()
        .any(|s| {
            let t = target.as_bytes();
            t.len() >= s.len() && t[..s.len()].eq_ignore_ascii_case(s.as_bytes())
        });

    // What went upstream.
    let mut up_slots = [httparse::EMPTY_HEADER; 2 * MAX_HEADERS];
    let mut up = httparse::Request::new(&mut up_slots);
    match up.parse(out) {
        Ok(httparse::Status::Complete(n)) => assert_eq!(n, out.len(), "{}", show()),
        other => panic!("upstream head does not parse ({other:?}): {}", show()),
    }
    assert_eq!(up.version, Some(1), "{}", show());
    assert_eq!(up.method, client.method, "{}", show());
    let up_target = up.path.unwrap_or("");
    let (origin, _) = head.origin_form(buf);
    let query = origin.split_once('?').map(|(_, q)| q);
    let expected_path = match ctx.path {
        Some(p) => p.to_string(),
        // The original origin-form: `http://h?q` is `/?q` (RFC 9112 §3.2.1).
        None => match origin.split('?').next().unwrap_or("") {
            "" => "/".to_string(),
            p => p.to_string(),
        },
    };
    let expected_target = match query {
        Some(q) => format!("{expected_path}?{q}"),
        None => expected_path.clone(),
    };
    assert_eq!(up_target, expected_target, "target: {}", show());
    if ctx.path.is_some() {
        let again = normalize_path(&expected_path).expect("a normalised path normalises");
        assert!(
            matches!(again, Cow::Borrowed(_)),
            "normalising {expected_path:?} again gives {again:?}"
        );
    }

    // The client lines that must be passed on, in order.
    let connection_names: Vec<&[u8]> = client
        .headers
        .iter()
        .filter(|h| is(h.name.as_bytes(), "connection"))
        .flat_map(|h| tokens(h.value))
        .collect();
    let kept: Vec<(&[u8], &[u8])> = client
        .headers
        .iter()
        .map(|h| (h.name.as_bytes(), h.value))
        .filter(|(name, _)| {
            if name.contains(&b'_') && !ctx.underscores {
                return false;
            }
            if is_hop_by_hop(name) {
                return ctx.upgrade && is(name, "upgrade");
            }
            let protected = ["host", "content-length", "transfer-encoding"]
                .iter()
                .any(|p| is(name, p));
            if !protected
                && connection_names
                    .iter()
                    .any(|t| t.eq_ignore_ascii_case(name))
            {
                return false;
            }
            if [
                "content-length",
                "x-forwarded-for",
                "x-real-ip",
                "x-forwarded-proto",
                "x-forwarded-host",
            ]
            .iter()
            .any(|d| is(name, d))
            {
                return false;
            }
            !(is(name, "host") && (absolute || ctx.upstream_host.is_some()))
        })
        .collect();
    let written: Vec<(&[u8], &[u8])> = up
        .headers
        .iter()
        .map(|h| (h.name.as_bytes(), h.value))
        .collect();
    assert!(
        written.len() >= kept.len() && written[..kept.len()] == kept[..],
        "client lines not passed on byte-exact and in order: {}",
        show()
    );
    // Then dynagate's own lines, each at most once, in the documented order.
    let mut next = 0;
    for (name, value) in &written[kept.len()..] {
        let pos = ADDED[next..]
            .iter()
            .position(|a| is(name, a))
            .unwrap_or_else(|| {
                panic!(
                    "unexpected added line {:?}: {}",
                    String::from_utf8_lossy(name),
                    show()
                )
            });
        next += pos + 1;
        if is(name, "connection") {
            assert!(ctx.upgrade && *value == b"upgrade", "{}", show());
        }
        if is(name, "transfer-encoding") {
            assert_eq!(*value, b"chunked", "{}", show());
        }
    }

    // Whole-head properties.
    let count = |n: &str| written.iter().filter(|(name, _)| is(name, n)).count();
    for (name, value) in &written {
        assert!(
            ctx.underscores || !name.contains(&b'_'),
            "name with _ forwarded: {}",
            show()
        );
        if is(name, "connection") {
            assert!(
                ctx.upgrade && value.eq_ignore_ascii_case(b"upgrade"),
                "{}",
                show()
            );
        } else if is(name, "upgrade") {
            assert!(
                ctx.upgrade,
                "Upgrade forwarded without an upgrade: {}",
                show()
            );
        } else if is(name, "transfer-encoding") {
            assert_eq!(*value, b"chunked", "{}", show());
        } else {
            assert!(!is_hop_by_hop(name), "hop-by-hop forwarded: {}", show());
        }
    }
    for n in ["content-length", "transfer-encoding", "host", "connection"] {
        assert!(count(n) <= 1, "more than one {n}: {}", show());
    }
    assert!(
        count("content-length") + count("transfer-encoding") <= 1,
        "both Content-Length and Transfer-Encoding: {}",
        show()
    );

    // Read back as dynagate (or a backend like it) reads a request.
    let again = match RequestHead::parse(out, 2 * MAX_HEADERS) {
        Ok(Parsed::Complete(h)) => h,
        other => panic!("upstream head does not parse again ({other:?}): {}", show()),
    };
    assert_eq!(again.len, out.len());
    if let Err(refusal) = again.screen(out) {
        panic!("upstream head fails screen() ({refusal:?}): {}", show());
    }
    assert_eq!(again.body(), head.body(), "body kind changed: {}", show());

    // A chunked body read whole is sent with its decoded length instead.
    if head.body() == BodyKind::Chunked {
        for len in [0, 5, i64::MAX as u64] {
            let mut framed = out.to_vec();
            reframe_with_length(&mut framed, len);
            let show = || String::from_utf8_lossy(&framed).into_owned();
            assert_clean_lines(&framed);
            let again = match RequestHead::parse(&framed, 2 * MAX_HEADERS) {
                Ok(Parsed::Complete(h)) => h,
                other => panic!("re-framed head does not parse ({other:?}): {}", show()),
            };
            assert_eq!(again.len, framed.len());
            if let Err(refusal) = again.screen(&framed) {
                panic!("re-framed head fails screen() ({refusal:?}): {}", show());
            }
            let want = if len == 0 {
                BodyKind::Empty
            } else {
                BodyKind::Length(len)
            };
            assert_eq!(again.body(), want, "{}", show());
            assert_eq!(again.content_length(), Some(len), "{}", show());
        }
    }
}
