//! HTTP/1.1 message framing (RFC 9112 §6): how long a body is, and a chunked-coding
//! scanner that finds where a chunked body ends without copying it.

/// How the body of one message is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Empty,
    Length(u64),
    Chunked,
    /// Until the sender closes the connection (responses only).
    UntilClose,
}

/// Longest chunk-size line (with extensions) and trailer section we accept.
const MAX_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Size,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

/// Walks a chunked body byte by byte (data runs at once). `feed` says how much of the
/// input belongs to the body and hands out the data ranges, so a caller can pass the
/// coding through verbatim or decode it.
#[derive(Debug, Clone)]
pub struct ChunkedScanner {
    state: State,
    size: u64,
    digits: u32,
    line: usize,
    trailers: usize,
}

impl Default for ChunkedScanner {
    fn default() -> Self {
        ChunkedScanner {
            state: State::Size,
            size: 0,
            digits: 0,
            line: 0,
            trailers: 0,
        }
    }
}

impl ChunkedScanner {
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
                        let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                        if self.digits >= 15 {
                            return Err("chunk size too large");
                        }
                        self.digits += 1;
                        self.size = self.size * 16 + d;
                        State::Size
                    }
                    b';' | b' ' | b'\t' if self.digits > 0 => State::Ext,
                    b'\r' if self.digits > 0 => State::SizeLf,
                    _ => return Err("invalid chunk size line"),
                },
                State::Ext => {
                    self.line += 1;
                    if self.line > MAX_LINE {
                        return Err("chunk extension too long");
                    }
                    match b {
                        b'\r' => State::SizeLf,
                        b'\n' => return Err("invalid chunk size line"),
                        _ => State::Ext,
                    }
                }
                State::SizeLf => match b {
                    b'\n' => {
                        self.line = 0;
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
                    _ => return Err("chunk data longer than its size"),
                },
                State::TrailerStart => match b {
                    b'\r' => State::EndLf,
                    _ => self.trailer_byte()?,
                },
                State::TrailerLine => match b {
                    b'\r' => State::TrailerLf,
                    _ => self.trailer_byte()?,
                },
                State::TrailerLf => match b {
                    b'\n' => State::TrailerStart,
                    _ => return Err("invalid trailer line"),
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

    fn trailer_byte(&mut self) -> Result<State, &'static str> {
        self.trailers += 1;
        if self.trailers > MAX_TRAILERS {
            return Err("trailer section too large");
        }
        Ok(State::TrailerLine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(pieces: &[&[u8]]) -> Result<(Vec<u8>, usize, bool), &'static str> {
        let mut s = ChunkedScanner::default();
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
        assert!(scan_all(&[b"zz\r\n"]).is_err());
        assert!(scan_all(&[b"\r\n"]).is_err());
        assert!(scan_all(&[b"3\r\nabcd\r\n"]).is_err());
        assert!(scan_all(&[b"1234567890abcdef0\r\n"]).is_err());
        assert!(scan_all(&[b"3\nabc"]).is_err());
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
