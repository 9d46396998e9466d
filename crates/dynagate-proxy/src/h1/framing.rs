//! HTTP/1.1 message framing (RFC 9112 §6): how long a body is, a strict decoder of the
//! chunked coding and the encoder that re-frames what it decoded.

/// How the body of one message is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Empty,
    Length(u64),
    Chunked,
    /// Until the sender closes the connection (responses only).
    UntilClose,
}

/// Longest chunk extension and trailer section we accept (nginx allows no trailers to
/// reach the upstream either; it reads them and drops them).
const MAX_EXTENSION: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;
/// Hex digits of a chunk size, leading zeros included: 16 is as long as an i64 gets
/// (the value itself is bounded by i64::MAX, as nginx bounds it by off_t).
const MAX_SIZE_DIGITS: u32 = 16;

/// What comes after `0\r\n\r\n`: nothing of a chunked body is forwarded as received.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Appends a chunk-size line for `len` bytes of data (lowercase hex, no extensions).
pub fn push_chunk_size(out: &mut Vec<u8>, len: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = len;
    loop {
        i -= 1;
        digits[i] = HEX[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Size,
    /// Whitespace after the size: only more of it or `;` may follow (RFC 9112 BWS).
    SizeWs,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    EndLf,
    Done,
}

/// Decodes a chunked body strictly (RFC 9112 §7.1): CRLF only, hex sizes that fit an
/// i64, extensions of visible characters, trailers that are valid header fields. It
/// hands out the data runs, so the caller re-frames them; extensions and trailers are
/// read and dropped, never forwarded.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    size: u64,
    digits: u32,
    extension: usize,
    trailers: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder {
            state: State::Size,
            size: 0,
            digits: 0,
            extension: 0,
            trailers: 0,
        }
    }
}

/// A token character (RFC 9110 §5.6.2), for trailer field names.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Visible characters, obs-text, space and tab: what a field value or an extension may hold.
fn is_field_byte(b: u8) -> bool {
    b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80
}

impl ChunkedDecoder {
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes as much of `input` as belongs to the body; calls `data(start, end)` for
    /// every run of payload bytes. Returns the number of bytes consumed (less than
    /// `input.len()` only when the body ended inside it).
    pub fn feed(
        &mut self,
        input: &[u8],
        mut data: impl FnMut(usize, usize),
    ) -> Result<usize, &'static str> {
        let mut i = 0;
        while i < input.len() {
            if self.state == State::Done {
                return Ok(i);
            }
            if self.state == State::Data {
                let take = (input.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                data(i, i + take);
                i += take;
                self.size -= take as u64;
                if self.size == 0 {
                    self.state = State::DataCr;
                }
                continue;
            }
            let b = input[i];
            i += 1;
            self.state = match self.state {
                State::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if self.digits >= MAX_SIZE_DIGITS || self.size > (i64::MAX as u64) >> 4 {
                            return Err("chunk size too large");
                        }
                        let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                        self.digits += 1;
                        self.size = self.size * 16 + d;
                        State::Size
                    }
                    b';' if self.digits > 0 => State::Ext,
                    b' ' | b'\t' if self.digits > 0 => State::SizeWs,
                    b'\r' if self.digits > 0 => State::SizeLf,
                    _ => return Err("invalid chunk size line"),
                },
                State::SizeWs => match b {
                    b' ' | b'\t' => State::SizeWs,
                    b';' => State::Ext,
                    _ => return Err("invalid chunk size line"),
                },
                State::Ext => {
                    self.extension += 1;
                    if self.extension > MAX_EXTENSION {
                        return Err("chunk extension too long");
                    }
                    match b {
                        b'\r' => State::SizeLf,
                        b if is_field_byte(b) => State::Ext,
                        _ => return Err("invalid chunk extension"),
                    }
                }
                State::SizeLf => match b {
                    b'\n' => {
                        self.extension = 0;
                        self.digits = 0;
                        if self.size == 0 {
                            State::TrailerStart
                        } else {
                            State::Data
                        }
                    }
                    _ => return Err("invalid chunk size line"),
                },
                State::DataCr => match b {
                    b'\r' => State::DataLf,
                    _ => return Err("chunk data longer than its size"),
                },
                State::DataLf => match b {
                    b'\n' => State::Size,
                    _ => return Err("chunk data not followed by CRLF"),
                },
                State::TrailerStart => match b {
                    b'\r' => State::EndLf,
                    b if is_tchar(b) => self.trailer_byte(State::TrailerName)?,
                    _ => return Err("invalid trailer field"),
                },
                State::TrailerName => match b {
                    b':' => self.trailer_byte(State::TrailerValue)?,
                    b if is_tchar(b) => self.trailer_byte(State::TrailerName)?,
                    _ => return Err("invalid trailer field name"),
                },
                State::TrailerValue => match b {
                    b'\r' => State::TrailerLf,
                    b if is_field_byte(b) => self.trailer_byte(State::TrailerValue)?,
                    _ => return Err("invalid trailer field value"),
                },
                State::TrailerLf => match b {
                    b'\n' => State::TrailerStart,
                    _ => return Err("invalid trailer line ending"),
                },
                State::EndLf => match b {
                    b'\n' => State::Done,
                    _ => return Err("invalid end of chunked body"),
                },
                State::Data | State::Done => unreachable!("handled above"),
            };
        }
        Ok(i)
    }

    fn trailer_byte(&mut self, next: State) -> Result<State, &'static str> {
        self.trailers += 1;
        if self.trailers > MAX_TRAILERS {
            return Err("trailer section too large");
        }
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(pieces: &[&[u8]]) -> Result<(Vec<u8>, usize, bool), &'static str> {
        let mut s = ChunkedDecoder::default();
        let mut data = Vec::new();
        let mut total = 0;
        for p in pieces {
            let n = s.feed(p, |a, b| data.extend_from_slice(&p[a..b]))?;
            total += n;
            if s.is_done() {
                break;
            }
        }
        Ok((data, total, s.is_done()))
    }

    #[test]
    fn decodes_chunks_split_anywhere() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        for cut in 0..body.len() {
            let (data, used, done) = scan_all(&[&body[..cut], &body[cut..]]).unwrap();
            assert_eq!(data, b"hello world", "cut at {cut}");
            assert!(done);
            assert_eq!(used, body.len() - 4, "cut at {cut}");
        }
    }

    #[test]
    fn refuses_bad_framing() {
        for bad in [
            &b"zz\r\n"[..],
            b"\r\n",
            b"3\r\nabcd\r\n",
            b"8000000000000000\r\n",
            b"3\nabc",
            b"3\r\nabc\n0\r\n\r\n",
            b"5 3\r\nhello\r\n",
            b"5\r\r\nhello",
            b"3;a=\x00\r\nabc\r\n",
            b"3;a=\x0b\r\nabc\r\n",
            b"-3\r\nabc\r\n",
            b"0x3\r\nabc\r\n",
            b"+3\r\nabc\r\n",
            b"0\r\nX: a\n\r\n",
            b"0\r\nX: a\r\n\n",
            b"0\r\nX a\r\n\r\n",
            b"0\r\n: a\r\n\r\n",
            b"0\r\nX: \x00\r\n\r\n",
            b"0\r\n X: a\r\n\r\n",
            b"0\r\n\n",
        ] {
            assert!(
                scan_all(&[bad]).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn accepts_what_rfc_9112_allows() {
        for good in [
            &b"3\r\nabc\r\n0\r\n\r\n"[..],
            b"3;name=value\r\nabc\r\n0\r\n\r\n",
            b"3 ;name=\"quoted value\"\r\nabc\r\n0\r\n\r\n",
            b"0003\r\nabc\r\n0\r\n\r\n",
            b"3\r\nabc\r\n0\r\nX-T: 1\r\nY:\r\n\r\n",
            b"7fffffffffffffff\r\n",
        ] {
            assert!(
                scan_all(&[good]).is_ok(),
                "{:?}",
                String::from_utf8_lossy(good)
            );
        }
        assert!(scan_all(&[b"8000000000000000\r\n"]).is_err());
    }

    #[test]
    fn encoded_chunks_decode_to_the_same_data() {
        for len in [1usize, 9, 15, 16, 255, 4096, 65_537] {
            let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut wire = Vec::new();
            push_chunk_size(&mut wire, data.len());
            wire.extend_from_slice(&data);
            wire.extend_from_slice(b"\r\n");
            wire.extend_from_slice(LAST_CHUNK);
            let (decoded, used, done) = scan_all(&[&wire]).unwrap();
            assert!(done && used == wire.len());
            assert_eq!(decoded, data);
        }
        let mut line = Vec::new();
        push_chunk_size(&mut line, 0xabc);
        assert_eq!(line, b"abc\r\n");
    }

    #[test]
    fn stops_at_the_end_and_leaves_the_rest() {
        let (_, used, done) = scan_all(&[b"0\r\n\r\nGET / HTTP/1.1\r\n"]).unwrap();
        assert!(done);
        assert_eq!(used, 5);
        let (_, _, done) = scan_all(&[b"3\r\nabc\r\n"]).unwrap();
        assert!(!done);
    }
}
