//! The registry's own HTTP/1 request-head reader (`dynagate-registry` api/http1.rs).
//!
//! No panic; a complete head is at most the input and is the same head when read alone
//! (it delimits itself); a head read from a prefix of the input is the head of the whole
//! input, and a prefix refused is refused with the same status; a body by length is
//! never 0 bytes and chunked bodies come only with HTTP/1.1; only 400 and 431 refuse.
#![no_main]

use dynagate_fuzz::Rng;
use dynagate_registry::fuzzing::parse_head;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|buf: &[u8]| {
    let whole = parse_head(buf);
    match &whole {
        Ok(Some(h)) => {
            assert!(h.len <= buf.len() && h.len > 0);
            assert_eq!(
                parse_head(&buf[..h.len]),
                whole,
                "head alone reads differently"
            );
            if let Some(Some(n)) = h.body {
                assert!(n > 0);
            }
            if h.body == Some(None) {
                assert!(h.http11, "chunked body on HTTP/1.0");
            }
            assert!(h.headers <= 100);
        }
        Ok(None) => {}
        Err(status) => assert!(*status == 400 || *status == 431, "status {status}"),
    }
    let cut = Rng::from_input(buf).upto(buf.len());
    match parse_head(&buf[..cut]) {
        Ok(Some(h)) => assert_eq!(Ok(Some(h)), whole, "prefix of {cut} bytes"),
        Ok(None) => {}
        Err(status) => assert_eq!(Err(status), whole, "prefix of {cut} bytes"),
    }
});
