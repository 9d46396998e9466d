//! The chunked-coding decoder (`h1::framing`).
//!
//! - Fed split at a point the input picks, or one byte at a time, the decoder gives the
//!   same result as fed at once: bytes consumed, data, error or not, finished or not.
//! - decode(encode(data)) is the identity, for data cut into chunks of any sizes.
//! - What the decoder accepts, re-encoded and decoded again, gives the same data.
//! - It agrees with a plain reading of the rules (`reference` below, SPEC of issue 11,
//!   "Body framing"): the same inputs accepted, refused or incomplete, the same data.
#![no_main]

use dynagate_fuzz::{encode_chunked, Rng};
use dynagate_proxy::h1::framing::ChunkedDecoder;
use libfuzzer_sys::fuzz_target;

/// What decoding a body gave: bytes consumed (of the body), data, finished, error.
#[derive(Debug, PartialEq, Eq)]
struct Decoded {
    used: usize,
    data: Vec<u8>,
    done: bool,
    error: bool,
}

/// Decodes `input` fed in the pieces `cuts` makes (cut positions, ascending).
fn decode(input: &[u8], cuts: &[usize]) -> Decoded {
    let mut s = ChunkedDecoder::default();
    let mut out = Decoded {
        used: 0,
        data: Vec::new(),
        done: false,
        error: false,
    };
    let mut start = 0;
    for &end in cuts.iter().chain(std::iter::once(&input.len())) {
        let piece = &input[start..end.max(start)];
        start = end.max(start);
        match s.feed(piece, |a, b| out.data.extend_from_slice(&piece[a..b])) {
            Ok(n) => {
                assert!(n <= piece.len());
                out.used += n;
                if n < piece.len() {
                    assert!(s.is_done(), "stopped early without finishing");
                }
            }
            Err(_) => {
                // Where an error was found is not compared: only that it was.
                out.error = true;
                out.used = 0;
                break;
            }
        }
        if s.is_done() {
            break;
        }
    }
    out.done = s.is_done();
    out
}

/// Most hex digits of a chunk size, leading zeros included (the value at most i64::MAX).
const MAX_SIZE_DIGITS: usize = 16;
/// A chunk extension, from its `;` to the CR, and the trailer section (names, colons
/// and values, line ends not counted) are bounded.
const MAX_EXTENSION: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

/// What the rules say of an input: a body `used` bytes long with its data, a prefix of
/// one, or not one (as soon as a byte breaks a rule, as a decoder fed byte by byte sees).
#[derive(Debug, PartialEq, Eq)]
enum Reading {
    Body { used: usize, data: Vec<u8> },
    Prefix,
    Invalid(&'static str),
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// SP, HTAB, visible ASCII and obs-text: no CTL, no NUL.
fn is_field_byte(b: u8) -> bool {
    b == b' ' || b == b'\t' || (0x21..=0x7e).contains(&b) || b >= 0x80
}

fn reference(input: &[u8]) -> Reading {
    use Reading::{Invalid, Prefix};
    let mut data = Vec::new();
    let mut i = 0;
    let at = |i: usize| input.get(i).copied();
    macro_rules! expect {
        ($byte:expr, $why:expr) => {
            match at(i) {
                None => return Prefix,
                Some(b) if b == $byte => i += 1,
                Some(_) => return Invalid($why),
            }
        };
    }
    loop {
        // chunk-size = 1*HEXDIG, at most MAX_SIZE_DIGITS, value at most i64::MAX
        let mut size: u128 = 0;
        let mut digits = 0;
        while let Some(d) = at(i).and_then(|b| (b as char).to_digit(16)) {
            digits += 1;
            size = size * 16 + u128::from(d);
            if digits > MAX_SIZE_DIGITS || size > i64::MAX as u128 {
                return Invalid("chunk size too large");
            }
            i += 1;
        }
        match at(i) {
            None => return Prefix,
            Some(_) if digits == 0 => return Invalid("no chunk size"),
            Some(_) => {}
        }
        // BWS, then `;` extensions; BWS only before a `;`.
        let mut bws = false;
        while matches!(at(i), Some(b' ' | b'\t')) {
            bws = true;
            i += 1;
        }
        match at(i) {
            None => return Prefix,
            Some(b';') => {
                let start = i;
                i += 1;
                loop {
                    match at(i) {
                        None => return Prefix,
                        Some(_) if i - start > MAX_EXTENSION => {
                            return Invalid("extension too long")
                        }
                        Some(b'\r') => break,
                        Some(b) if is_field_byte(b) => i += 1,
                        Some(_) => return Invalid("control character in an extension"),
                    }
                }
            }
            Some(_) if bws => return Invalid("whitespace after the size without `;`"),
            Some(_) => {}
        }
        expect!(b'\r', "chunk-size line not ended by CR");
        expect!(b'\n', "chunk-size line not ended by CRLF");
        if size == 0 {
            break;
        }
        let size = size as usize;
        let have = (input.len() - i).min(size);
        data.extend_from_slice(&input[i..i + have]);
        if have < size {
            return Prefix;
        }
        i += size;
        expect!(b'\r', "chunk data not followed by CR");
        expect!(b'\n', "chunk data not followed by CRLF");
    }
    // trailer-section: *( field-name ":" field-value CRLF ) CRLF
    let mut trailers = 0;
    loop {
        match at(i) {
            None => return Prefix,
            Some(b'\r') => {
                i += 1;
                expect!(b'\n', "chunked body not ended by CRLF");
                return Reading::Body { used: i, data };
            }
            Some(b) if is_tchar(b) => {}
            Some(_) => return Invalid("trailer line does not start with a name"),
        }
        // Each byte of a name, its colon and its value counts towards the bound.
        let mut over = || {
            trailers += 1;
            trailers > MAX_TRAILERS
        };
        while at(i).is_some_and(is_tchar) {
            if over() {
                return Invalid("trailers too large");
            }
            i += 1;
        }
        match at(i) {
            None => return Prefix,
            Some(b':') if over() => return Invalid("trailers too large"),
            Some(b':') => i += 1,
            Some(_) => return Invalid("trailer name not followed by `:`"),
        }
        loop {
            match at(i) {
                None => return Prefix,
                Some(b'\r') => break,
                Some(b) if is_field_byte(b) => {
                    if over() {
                        return Invalid("trailers too large");
                    }
                    i += 1;
                }
                Some(_) => return Invalid("control character in a trailer"),
            }
        }
        expect!(b'\r', "trailer line not ended by CR");
        expect!(b'\n', "trailer line not ended by CRLF");
    }
}

fuzz_target!(|input: &[u8]| {
    let mut rng = Rng::from_input(input);
    let whole = decode(input, &[]);
    if whole.done {
        assert!(!whole.error);
    }
    match reference(input) {
        Reading::Body { used, data } => {
            assert!(
                whole.done && whole.used == used && whole.data == data,
                "the rules read a body of {used} bytes, the decoder {whole:?}"
            );
        }
        Reading::Prefix => assert!(
            !whole.done && !whole.error && whole.used == input.len(),
            "the rules read a prefix of a body, the decoder {whole:?}"
        ),
        Reading::Invalid(why) => assert!(
            whole.error,
            "the rules refuse ({why}), the decoder {whole:?}"
        ),
    }

    // Split at one point, at two, and byte by byte: the same result.
    let cut = rng.upto(input.len());
    assert_eq!(decode(input, &[cut]), whole, "split at {cut}");
    let (a, b) = (rng.upto(input.len()), rng.upto(input.len()));
    assert_eq!(
        decode(input, &[a.min(b), a.max(b)]),
        whole,
        "split at {a}, {b}"
    );
    if input.len() <= 1024 {
        let every: Vec<usize> = (1..input.len()).collect();
        assert_eq!(decode(input, &every), whole, "byte by byte");
    }

    // Any data, cut into chunks of any sizes, comes back as it was.
    let encoded = encode_chunked(input, |left| 1 + rng.upto(left.min(300)));
    let back = decode(&encoded, &[rng.upto(encoded.len())]);
    assert!(back.done && !back.error, "own coding refused: {back:?}");
    assert_eq!(back.used, encoded.len());
    assert_eq!(back.data, input);

    // What was accepted decodes the same after re-encoding.
    if whole.done {
        let again = encode_chunked(&whole.data, |left| 1 + rng.upto(left.min(64)));
        let back = decode(&again, &[]);
        assert!(back.done && !back.error);
        assert_eq!(back.used, again.len());
        assert_eq!(back.data, whole.data);
    }
});
