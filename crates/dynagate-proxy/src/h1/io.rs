//! Byte movers of the HTTP/1 path: reading a head into a connection's buffer, copying
//! one body from one socket to another with its framing, the upstream connection type,
//! and the replay wrapper that hands an HTTP/2 connection to hyper.

use super::framing::{push_chunk_size, BodyKind, ChunkedDecoder, LAST_CHUNK};
use super::head::OutFraming;
use crate::pool::Reusable;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// Read size while a body streams; doubled after every read that filled it, up to
/// `MAX_BODY_BUF`, so a large transfer costs few reads and a small one little memory.
pub const BODY_BUF: usize = 64 * 1024;
const MAX_BODY_BUF: usize = 512 * 1024;
/// Head pieces up to this size are gathered with the body's first bytes into one write.
const GATHER_MAX: usize = 16 * 1024;

/// A pooled connection to an upstream server. Its read buffer is empty (and released)
/// while it idles in the pool.
pub struct UpConn {
    pub stream: TcpStream,
    pub buf: Vec<u8>,
}

impl Reusable for UpConn {
    /// Readable while idle means the server closed it (or sent bytes nobody asked for).
    fn is_closed(&self) -> bool {
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        if self.stream.poll_read_ready(&mut cx).is_pending() {
            return false;
        }
        // Readiness can be left over from the last read of the response: ask the socket.
        let mut probe = [0u8; 1];
        !matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// Which side of a copy failed.
#[derive(Debug)]
pub enum PumpError {
    /// The source failed, closed early or timed out.
    Read(String),
    /// The source's chunked framing is invalid (a client gets a 400 for it).
    Framing(String),
    /// The body is longer than the copy's limit (a client gets a 413 for it).
    TooLarge(u64),
    /// The source failed (as `Read` or `Framing`) before any byte, the head included,
    /// reached the destination: it can still be answered (a client gets a 502).
    Unsent(String),
    /// The destination went away.
    Write(io::Error),
}

impl std::fmt::Display for PumpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PumpError::Read(e) | PumpError::Framing(e) | PumpError::Unsent(e) => write!(f, "{e}"),
            PumpError::TooLarge(limit) => write!(f, "body larger than {limit} bytes"),
            PumpError::Write(e) => write!(f, "{e}"),
        }
    }
}

/// Reads more bytes into `buf` (growing it by at least `min_room`) within `timeout`.
/// Ok(0) is end of stream.
pub async fn read_more<R: AsyncRead + Unpin>(
    src: &mut R,
    buf: &mut Vec<u8>,
    min_room: usize,
    timeout: Duration,
) -> Result<usize, String> {
    if buf.capacity() - buf.len() < min_room {
        buf.reserve(min_room);
    }
    match tokio::time::timeout(timeout, src.read_buf(buf)).await {
        Ok(Ok(n)) => Ok(n),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// Where bytes for the destination gather: a head waiting to go out with the first
/// body bytes, so a small response costs one write.
struct Out<'a, W> {
    dst: &'a mut W,
    pending: Vec<u8>,
    sent: u64,
    /// Longest wait for the destination to take more (between two writes, as nginx's
    /// send_timeout: a slow but moving reader is never cut).
    write_timeout: Duration,
    /// Something was written to the destination.
    wrote: bool,
}

impl<W: AsyncWrite + Unpin> Out<'_, W> {
    async fn body(&mut self, data: &[u8]) -> Result<(), PumpError> {
        self.sent += data.len() as u64;
        if !self.pending.is_empty() && self.pending.len() + data.len() <= GATHER_MAX + BODY_BUF {
            self.pending.extend_from_slice(data);
            return Ok(());
        }
        self.flush().await?;
        self.wrote = true;
        write_within(self.dst, data, self.write_timeout).await
    }

    /// Framing bytes: not counted as body.
    fn frame(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    /// One chunk of the chunked coding dynagate writes (never the sender's own framing).
    async fn chunk(&mut self, data: &[u8]) -> Result<(), PumpError> {
        push_chunk_size(&mut self.pending, data.len());
        self.body(data).await?;
        self.frame(b"\r\n");
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), PumpError> {
        if !self.pending.is_empty() {
            self.wrote = true;
            write_within(self.dst, &self.pending, self.write_timeout).await?;
            self.pending.clear();
        }
        Ok(())
    }
}

/// Writes all of `data`, failing when the destination takes nothing for `timeout`. A
/// write the socket takes at once (nearly all of them) arms no timer.
async fn write_within<W: AsyncWrite + Unpin>(
    dst: &mut W,
    mut data: &[u8],
    timeout: Duration,
) -> Result<(), PumpError> {
    while !data.is_empty() {
        let at_once = std::future::poll_fn(|cx| {
            Poll::Ready(match Pin::new(&mut *dst).poll_write(cx, data) {
                Poll::Ready(r) => Some(r),
                Poll::Pending => None,
            })
        })
        .await;
        let written = match at_once {
            Some(r) => r,
            None => match tokio::time::timeout(timeout, dst.write(data)).await {
                Ok(r) => r,
                Err(_) => {
                    let e = io::Error::new(io::ErrorKind::TimedOut, "peer took nothing in time");
                    return Err(PumpError::Write(e));
                }
            },
        };
        match written {
            Ok(0) => return Err(PumpError::Write(io::ErrorKind::WriteZero.into())),
            Ok(n) => data = &data[n..],
            Err(e) => return Err(PumpError::Write(e)),
        }
    }
    Ok(())
}

/// How one body is copied: how the source delimits it, how the destination gets it,
/// the longest waits for the source to send and the destination to take more, and the
/// most body bytes allowed (0: no limit).
#[derive(Debug, Clone, Copy)]
pub struct BodyCopy {
    pub kind: BodyKind,
    pub framing: OutFraming,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub limit: u64,
}

/// Copies one body from `src` to `dst`: first what is already in `buf[*pos..]`, then
/// reads. Bytes after the body stay in `buf[*pos..]` (a pipelined request). `head` is
/// written before (gathered with) the first body bytes. A chunked body is decoded and
/// framed anew (chunked again, or raw for an HTTP/1.0 client), so nothing of the
/// sender's framing — sizes, extensions, trailers — reaches the destination. Returns
/// the body bytes sent.
pub async fn pump<R, W>(
    src: &mut R,
    buf: &mut Vec<u8>,
    pos: &mut usize,
    dst: &mut W,
    head: Vec<u8>,
    copy: BodyCopy,
) -> Result<u64, PumpError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let BodyCopy {
        kind,
        framing,
        read_timeout,
        write_timeout,
        limit,
    } = copy;
    let with_head = !head.is_empty();
    let mut out = Out {
        dst,
        pending: head,
        sent: 0,
        write_timeout,
        wrote: false,
    };
    let result = copy_body(src, buf, pos, &mut out, kind, framing, read_timeout, limit).await;
    match result {
        Err(PumpError::Read(e) | PumpError::Framing(e)) if with_head && !out.wrote => {
            Err(PumpError::Unsent(e))
        }
        r => r,
    }
}

#[allow(clippy::too_many_arguments)]
async fn copy_body<R, W>(
    src: &mut R,
    buf: &mut Vec<u8>,
    pos: &mut usize,
    out: &mut Out<'_, W>,
    kind: BodyKind,
    framing: OutFraming,
    read_timeout: Duration,
    limit: u64,
) -> Result<u64, PumpError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut remaining = match kind {
        BodyKind::Length(n) => n,
        _ => 0,
    };
    let limit = if limit == 0 { u64::MAX } else { limit };
    let mut chunked = ChunkedDecoder::default();
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    let mut room = BODY_BUF;
    loop {
        let avail = &buf[*pos..];
        let done = match kind {
            BodyKind::Empty => true,
            BodyKind::Length(_) => {
                let take = avail
                    .len()
                    .min(usize::try_from(remaining).unwrap_or(usize::MAX));
                if take > 0 {
                    out.body(&avail[..take]).await?;
                }
                *pos += take;
                remaining -= take as u64;
                remaining == 0
            }
            BodyKind::Chunked => {
                if !avail.is_empty() {
                    ranges.clear();
                    let used = chunked
                        .feed(avail, |a, b| ranges.push((a, b)))
                        .map_err(|e| PumpError::Framing(e.to_string()))?;
                    for &(a, b) in &ranges {
                        if out.sent + (b - a) as u64 > limit {
                            return Err(PumpError::TooLarge(limit));
                        }
                        if framing == OutFraming::Raw {
                            out.body(&avail[a..b]).await?;
                        } else {
                            out.chunk(&avail[a..b]).await?;
                        }
                    }
                    *pos += used;
                }
                let done = chunked.is_done();
                if done && framing != OutFraming::Raw {
                    out.frame(LAST_CHUNK);
                }
                done
            }
            BodyKind::UntilClose => {
                if !avail.is_empty() {
                    if framing == OutFraming::Chunked {
                        out.chunk(avail).await?;
                    } else {
                        out.body(avail).await?;
                    }
                    *pos = buf.len();
                }
                false
            }
        };
        if done {
            out.flush().await?;
            return Ok(out.sent);
        }
        // Everything buffered went out: wait for more with the head already sent, so a
        // slow body does not hold back the response head.
        out.flush().await?;
        buf.clear();
        *pos = 0;
        let n = read_more(src, buf, room, read_timeout)
            .await
            .map_err(PumpError::Read)?;
        if n == buf.capacity() && room < MAX_BODY_BUF {
            room *= 2;
        }
        if n == 0 {
            if kind == BodyKind::UntilClose {
                if framing == OutFraming::Chunked {
                    out.frame(LAST_CHUNK);
                }
                out.flush().await?;
                return Ok(out.sent);
            }
            return Err(PumpError::Read(
                "connection closed before the body ended".into(),
            ));
        }
    }
}

/// A connection whose first bytes were already read: they are read again first (the
/// HTTP/2 preface, handed to hyper's HTTP/2 server).
pub struct Replay {
    pub read: Vec<u8>,
    pub pos: usize,
    pub stream: TcpStream,
}

impl AsyncRead for Replay {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.read.len() {
            let n = (this.read.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.read[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.read.len() {
                this.read = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Replay {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(
        input: &[u8],
        already: &[u8],
        kind: BodyKind,
        framing: OutFraming,
    ) -> (Result<u64, PumpError>, Vec<u8>, Vec<u8>) {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        a.write_all(input).await.unwrap();
        drop(a);
        let mut buf = already.to_vec();
        let mut pos = 0;
        let mut dst = Vec::new();
        let copy = BodyCopy {
            kind,
            framing,
            read_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
            limit: 0,
        };
        let r = pump(
            &mut b,
            &mut buf,
            &mut pos,
            &mut dst,
            b"HEAD|".to_vec(),
            copy,
        )
        .await;
        (r, dst, buf[pos..].to_vec())
    }

    #[tokio::test]
    async fn length_body_leaves_the_pipelined_rest() {
        let (r, out, rest) = run(b"lo NEXT", b"hel", BodyKind::Length(5), OutFraming::Same).await;
        assert_eq!(r.unwrap(), 5);
        assert_eq!(out, b"HEAD|hello");
        assert_eq!(rest, b" NEXT");
    }

    #[tokio::test]
    async fn chunked_is_framed_anew_without_extensions_or_trailers() {
        let body = b"3;ext=1\r\nabc\r\n00002\r\nde\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        let (r, out, rest) = run(body, b"", BodyKind::Chunked, OutFraming::Chunked).await;
        assert_eq!(r.unwrap(), 5);
        assert_eq!(out, b"HEAD|3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n");
        assert_eq!(rest, b"NEXT");
        let (_, out, _) = run(body, b"", BodyKind::Chunked, OutFraming::Raw).await;
        assert_eq!(out, b"HEAD|abcde");
    }

    #[tokio::test]
    async fn chunked_body_over_the_limit_stops_before_it_is_sent() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(b"4\r\nabcd\r\n4\r\nefgh\r\n0\r\n\r\n")
            .await
            .unwrap();
        drop(a);
        let (mut buf, mut pos, mut dst) = (Vec::new(), 0, Vec::new());
        let copy = BodyCopy {
            kind: BodyKind::Chunked,
            framing: OutFraming::Chunked,
            read_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
            limit: 6,
        };
        let r = pump(&mut b, &mut buf, &mut pos, &mut dst, Vec::new(), copy).await;
        assert!(matches!(r, Err(PumpError::TooLarge(6))), "{r:?}");
        assert!(!dst.windows(4).any(|w| w == b"efgh"));
    }

    #[tokio::test]
    async fn until_close_gets_chunked_and_truncation_is_an_error() {
        let (r, out, _) = run(b"abc", b"", BodyKind::UntilClose, OutFraming::Chunked).await;
        assert_eq!(r.unwrap(), 3);
        assert_eq!(out, b"HEAD|3\r\nabc\r\n0\r\n\r\n");
        let (r, _, _) = run(b"ab", b"", BodyKind::Length(5), OutFraming::Same).await;
        assert!(matches!(r, Err(PumpError::Read(_))));
    }
}
