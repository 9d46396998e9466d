//! The upstream response head: `ResponseHead::parse`, `body`, `keep_alive`, and the head
//! written to the client for every `OutFraming` × `ClientConnection` (× HEAD or not).
//!
//! What `parse` accepts has unambiguous framing (at most one Content-Length, 1*DIGIT,
//! or one `Transfer-Encoding: chunked`, never both); 204, 304, 1xx and HEAD answers
//! have no body.
//!
//! Every client head parses completely with httparse as HTTP/1.1 with the upstream's
//! status, has at most one framing header (Content-Length or Transfer-Encoding) and none
//! on 1xx and 204, no hop-by-hop header from the upstream (only dynagate's own
//! `connection` line and `transfer-encoding: chunked`; `Upgrade` on a switch), at most
//! one `connection` line, and no bare CR or LF.
#![no_main]

use dynagate_fuzz::{assert_clean_lines, assert_unambiguous_framing, is, is_hop_by_hop};
use dynagate_proxy::h1::framing::BodyKind;
use dynagate_proxy::h1::head::{ClientConnection, OutFraming, Parsed, ResponseHead};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|buf: &[u8]| {
    let head = match ResponseHead::parse(buf) {
        Ok(Parsed::Complete(h)) => h,
        _ => return,
    };
    assert!(head.len <= buf.len());
    // The upstream's framing was unambiguous (anything else is a 502).
    let mut slots = [httparse::EMPTY_HEADER; 128];
    let mut upstream = httparse::Response::new(&mut slots);
    assert!(matches!(
        upstream.parse(buf),
        Ok(httparse::Status::Complete(_))
    ));
    assert_unambiguous_framing(upstream.headers, "ResponseHead::parse accepted");
    let _ = (head.keep_alive(), head.is_interim());
    for request_was_head in [false, true] {
        let body = head.body(request_was_head);
        if request_was_head
            || head.status == 204
            || head.status == 304
            || (100..200).contains(&head.status)
        {
            assert_eq!(body, BodyKind::Empty);
        }
        if let BodyKind::Length(n) = body {
            assert!(n > 0);
        }
    }
    for request_was_head in [false, true] {
        for framing in [OutFraming::Same, OutFraming::Chunked, OutFraming::Raw] {
            for connection in [
                ClientConnection::Default,
                ClientConnection::Close,
                ClientConnection::KeepAlive,
                ClientConnection::Upgrade,
            ] {
                let mut out = Vec::new();
                head.write_client(buf, &mut out, request_was_head, framing, connection);
                check_client(&head, &out, framing, connection);
            }
        }
    }
});

fn check_client(
    head: &ResponseHead,
    out: &[u8],
    framing: OutFraming,
    connection: ClientConnection,
) {
    let show = || {
        format!(
            "{framing:?} {connection:?}: {}",
            String::from_utf8_lossy(out)
        )
    };
    assert_clean_lines(out);
    let mut slots = [httparse::EMPTY_HEADER; 256];
    let mut resp = httparse::Response::new(&mut slots);
    match resp.parse(out) {
        Ok(httparse::Status::Complete(n)) => assert_eq!(n, out.len(), "{}", show()),
        other => panic!("client head does not parse ({other:?}): {}", show()),
    }
    assert_eq!(resp.version, Some(1), "{}", show());
    assert_eq!(resp.code, Some(head.status), "{}", show());
    let mut framing_lines = 0;
    let mut connection_lines = 0;
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if is(name, "content-length") {
            framing_lines += 1;
        } else if is(name, "transfer-encoding") {
            framing_lines += 1;
            assert_eq!(h.value, b"chunked", "{}", show());
        } else if is(name, "connection") {
            connection_lines += 1;
            let own: &[u8] = match connection {
                ClientConnection::Default => b"",
                ClientConnection::Close => b"close",
                ClientConnection::KeepAlive => b"keep-alive",
                ClientConnection::Upgrade => b"upgrade",
            };
            assert_eq!(h.value, own, "upstream Connection passed on: {}", show());
        } else if is(name, "upgrade") {
            assert_eq!(connection, ClientConnection::Upgrade, "{}", show());
        } else {
            assert!(!is_hop_by_hop(name), "hop-by-hop passed on: {}", show());
        }
    }
    assert!(
        framing_lines <= 1,
        "more than one framing header: {}",
        show()
    );
    assert!(
        connection_lines <= 1,
        "more than one Connection: {}",
        show()
    );
    if (100..200).contains(&head.status) || head.status == 204 {
        assert_eq!(
            framing_lines,
            0,
            "framing header on {}: {}",
            head.status,
            show()
        );
    }
}
