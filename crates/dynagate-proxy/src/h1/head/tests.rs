//! Tests of the request and response heads: the screen, the upstream and client heads.

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
            path: None,
            underscores: false,
            default_host: b"up",
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
            path: None,
            underscores: false,
            default_host: b"up",
        },
    );
    let s = String::from_utf8(out).unwrap();
    assert!(
        s.starts_with("GET /p?q HTTP/1.1\r\nhost: h.test:8080\r\n"),
        "{s}"
    );
}

fn screened(s: &str) -> Result<(), Refusal> {
    req(s).screen(s.as_bytes())
}

fn upstream_head(raw: &str, ctx: &UpstreamHeadCtx<'_>) -> String {
    let mut out = Vec::new();
    req(raw).write_upstream(raw.as_bytes(), &mut out, ctx);
    String::from_utf8(out).unwrap()
}

const PLAIN: UpstreamHeadCtx<'static> = UpstreamHeadCtx {
    client_ip: "127.0.0.1",
    upstream_host: None,
    upgrade: false,
    path: None,
    underscores: false,
    default_host: b"up",
};

#[test]
fn screens_ambiguous_framing() {
    let status = |s: &str| screened(s).err().map(|r| r.status);
    let h = "Host: a\r\n";
    for (raw, want) in [
        ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
        ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n", 400),
        ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -3\r\n\r\n", 400),
        ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 9223372036854775808\r\n\r\n", 400),
        ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\n", 400),
        ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 501),
        ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", 501),
        ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: \r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: ..\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: x, y\r\n\r\n", 400),
        ("GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        ("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        ("CONNECT a:80 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        ("GET abc HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        ("GET ftp://x/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        ("GET http://u@x/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue, x\r\n\r\n", 417),
    ] {
        assert_eq!(status(raw), Some(want), "{raw:?}");
    }
    for raw in [
        format!("POST / HTTP/1.1\r\n{h}Transfer-Encoding: Chunked \r\n\r\n"),
        format!("POST / HTTP/1.1\r\n{h}Content-Length: 007\r\n\r\n"),
        format!("POST / HTTP/1.1\r\n{h}Expect: 100-Continue\r\n\r\n"),
        "GET http://b.test:81/x HTTP/1.1\r\nHost: B.test:81\r\n\r\n".into(),
        "GET / HTTP/1.0\r\n\r\n".into(),
    ] {
        assert_eq!(status(&raw), None, "{raw:?}");
    }
    let ok = req("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
    assert_eq!(ok.body(), BodyKind::Chunked);
}

#[test]
fn decimals_are_written_exactly() {
    for n in [0u64, 7, 10, 99, 100, 65_535, u64::MAX] {
        let mut out = Vec::new();
        push_decimal(&mut out, n);
        assert_eq!(out, n.to_string().as_bytes());
    }
}

#[test]
fn an_absolute_target_without_a_path_gets_the_root() {
    let raw = "GET http://h.test?q=1 HTTP/1.1\r\nHost: h.test\r\n\r\n";
    assert!(upstream_head(raw, &PLAIN).starts_with("GET /?q=1 HTTP/1.1\r\n"));
    let raw = "GET http://h.test HTTP/1.1\r\nHost: h.test\r\n\r\n";
    assert!(upstream_head(raw, &PLAIN).starts_with("GET / HTTP/1.1\r\n"));
}

#[test]
fn targets_with_non_ascii_bytes_never_panic_and_invalid_utf8_is_refused() {
    let utf8 = "GET /юю/юю HTTP/1.1\r\nHost: a\r\n\r\n";
    assert_eq!(req(utf8).origin_form(utf8.as_bytes()).0, "/юю/юю");
    let odd = "GET юююю HTTP/1.1\r\nHost: a\r\n\r\n";
    assert_eq!(req(odd).origin_form(odd.as_bytes()), ("юююю", None));
    let raw = b"GET /a\xff HTTP/1.1\r\nHost: a\r\n\r\n";
    if let Ok(Parsed::Complete(h)) = RequestHead::parse(raw, 100) {
        assert_eq!(h.screen(raw).map_err(|r| r.status), Err(400));
    }
}

#[test]
fn connection_never_removes_framing_or_host() {
    let raw = "POST /x HTTP/1.1\r\nHost: a\r\nConnection: Content-Length, Host, Transfer-Encoding, X-Gone\r\nX-Gone: 1\r\nContent-Length: 3\r\n\r\n";
    let s = upstream_head(raw, &PLAIN);
    assert!(s.starts_with("POST /x HTTP/1.1\r\nHost: a\r\n"), "{s}");
    assert!(s.ends_with("content-length: 3\r\n\r\n"), "{s}");
    assert!(!s.contains("X-Gone"), "{s}");
    assert_eq!(s.matches("ontent-").count(), 1, "{s}");
}

#[test]
fn framing_is_written_by_dynagate() {
    let s = upstream_head(
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0005\r\nX: 1\r\n\r\n",
        &PLAIN,
    );
    assert!(
        s.contains("X: 1\r\n") && s.ends_with("content-length: 5\r\n\r\n"),
        "{s}"
    );
    assert!(!s.contains("0005"), "{s}");
    let s = upstream_head(
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
        &PLAIN,
    );
    assert!(s.ends_with("transfer-encoding: chunked\r\n\r\n"), "{s}");
    assert_eq!(
        s.to_ascii_lowercase().matches("transfer-encoding").count(),
        1
    );
}

#[test]
fn a_request_without_host_goes_upstream_with_the_upstreams_name() {
    let s = upstream_head("GET /x HTTP/1.0\r\n\r\n", &PLAIN);
    assert!(s.starts_with("GET /x HTTP/1.1\r\nhost: up\r\n"), "{s}");
    let odd = UpstreamHeadCtx {
        default_host: b"svc@dc1",
        ..PLAIN
    };
    let s = upstream_head("GET /x HTTP/1.0\r\n\r\n", &odd);
    assert!(s.contains("host: localhost\r\n"), "{s}");
}

#[test]
fn underscore_names_are_dropped_unless_allowed() {
    let raw = "GET / HTTP/1.1\r\nHost: a\r\nTransfer_Encoding: chunked\r\nContent_Length: 5\r\nX_Ok: 1\r\n\r\n";
    let s = upstream_head(raw, &PLAIN);
    assert!(!s.contains('_'), "{s}");
    assert_eq!(req(raw).body(), BodyKind::Empty);
    let allowed = UpstreamHeadCtx {
        underscores: true,
        ..PLAIN
    };
    assert!(upstream_head(raw, &allowed).contains("X_Ok: 1\r\n"));
}

#[test]
fn absolute_form_authority_wins_over_host() {
    let raw = "GET http://Real.test/p?q=1 HTTP/1.1\r\nHost: real.test:80\r\n\r\n";
    assert_eq!(screened(raw), Ok(()));
    let h = req(raw);
    assert_eq!(h.host(raw.as_bytes()), Some(&b"Real.test"[..]));
    let s = upstream_head(raw, &PLAIN);
    assert!(
        s.starts_with("GET /p?q=1 HTTP/1.1\r\nhost: Real.test\r\n"),
        "{s}"
    );
    assert!(!s.contains("real.test:80"), "{s}");
    assert!(s.contains("x-forwarded-host: Real.test\r\n"), "{s}");
    // Two different hosts in one request: refused, as HAProxy does.
    let other = "GET http://real.test/p HTTP/1.1\r\nHost: other.test\r\n\r\n";
    assert_eq!(screened(other).map_err(|r| r.status), Err(400));
    let port = "GET https://real.test/p HTTP/1.1\r\nHost: real.test:80\r\n\r\n";
    assert_eq!(screened(port).map_err(|r| r.status), Err(400));
}

#[test]
fn normalised_path_replaces_the_target_and_keeps_the_query() {
    let raw = "GET /a/../b?x=/../y HTTP/1.1\r\nHost: a\r\n\r\n";
    let ctx = UpstreamHeadCtx {
        path: Some("/b"),
        ..PLAIN
    };
    assert!(upstream_head(raw, &ctx).starts_with("GET /b?x=/../y HTTP/1.1\r\n"));
}

#[test]
fn upgrades_need_http11_no_body_and_not_h2c() {
    let up = |s: &str| req(s).is_upgrade();
    assert!(up(
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    ));
    assert!(!up(
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\r\n"
    ));
    assert!(!up(
        "GET / HTTP/1.0\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    ));
    assert!(!up("POST / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 4\r\n\r\n"));
    let s = upstream_head(
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: x\r\n\r\n",
        &PLAIN,
    );
    assert!(
        !s.to_ascii_lowercase().contains("upgrade") && !s.contains("HTTP2-Settings"),
        "{s}"
    );
}

fn resp(s: &str) -> Result<ResponseHead, HeadError> {
    match ResponseHead::parse(s.as_bytes()) {
        Ok(Parsed::Complete(h)) => Ok(h),
        Ok(Parsed::Partial) => panic!("partial"),
        Err(e) => Err(e),
    }
}

#[test]
fn response_framing_that_reads_two_ways_is_refused() {
    for raw in [
        "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 3x\r\n\r\n",
    ] {
        assert!(resp(raw).is_err(), "{raw:?}");
    }
}

#[test]
fn client_head_keeps_its_length_whatever_connection_names() {
    let raw = "HTTP/1.1 200 OK\r\nConnection: content-length, x-drop\r\nX-Drop: 1\r\nContent-Length: 5\r\n\r\nhello";
    let h = resp(raw).unwrap();
    let mut out = Vec::new();
    h.write_client(
        raw.as_bytes(),
        &mut out,
        false,
        OutFraming::Same,
        ClientConnection::Default,
    );
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"
    );
    let raw = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n";
    let mut out = Vec::new();
    resp(raw).unwrap().write_client(
        raw.as_bytes(),
        &mut out,
        true,
        OutFraming::Same,
        ClientConnection::Default,
    );
    assert!(String::from_utf8(out)
        .unwrap()
        .contains("content-length: 5\r\n"));
    let raw = "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n";
    let mut out = Vec::new();
    resp(raw).unwrap().write_client(
        raw.as_bytes(),
        &mut out,
        false,
        OutFraming::Same,
        ClientConnection::Default,
    );
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "HTTP/1.1 204 No Content\r\n\r\n"
    );
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
        false,
        OutFraming::Same,
        ClientConnection::Default,
    );
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "HTTP/1.1 200 OK\r\nX-A: 1\r\ncontent-length: 5\r\n\r\n"
    );
    let raw = "HTTP/1.0 200 OK\r\nX-A: 1\r\n\r\nstream";
    let h = match ResponseHead::parse(raw.as_bytes()).unwrap() {
        Parsed::Complete(h) => h,
        Parsed::Partial => panic!(),
    };
    assert_eq!(h.body(false), BodyKind::UntilClose);
    assert!(!h.keep_alive());
}

/// Malformed and random input never panics the head code (a cheap fuzz: mutations of
/// valid heads plus random bytes, deterministic seed).
mod fuzz {
    use super::super::*;

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
                h.screen(buf),
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
                        path: Some("/n"),
                        underscores: upgrade,
                        default_host: b"up",
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
                    h.write_client(buf, &mut out, false, f, c);
                    h.write_client(buf, &mut out, true, f, c);
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
            let mut scanner = crate::h1::framing::ChunkedDecoder::default();
            let _ = scanner.feed(&random, |_, _| {});
            let _ = scanner.feed(&buf, |_, _| {});
        }
    }
}
