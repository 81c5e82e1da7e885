//! Accepting gRPC clients that send a Unix socket's path as HTTP/2 `:authority`.
//!
//! gRPC C-core clients (Python `grpcio`, C++, Ruby, PHP) connecting to `unix:PATH` send the
//! percent-encoded path (`%2Frun%2Fxlb%2Fxlbd.sock`) as `:authority`; grpc-java and others send
//! the bare path. Neither is a valid authority, and the HTTP/2 server library refuses such a
//! request with `RST_STREAM(PROTOCOL_ERROR)` before any service sees it, so every call of such
//! a client fails with `INTERNAL`. The authority means nothing on a Unix socket, so the Unix
//! listener reads its connections through [`FixAuthority`]: it decodes every header block the
//! client sends, replaces an `:authority` that does not parse with `localhost`, and re-encodes
//! the block before the HTTP/2 server reads it. Everything else passes through unchanged.
//!
//! HPACK is stateful (a header may refer to an earlier one through the client's dynamic
//! table), so every header block of the connection is decoded, not only those that need a
//! change; the re-encoded blocks use literals only, so the server's own table stays empty and
//! the two never disagree. Memory is bounded: a header block larger than [`MAX_BLOCK`] bytes,
//! before or after decoding, ends the connection, as does a block that does not decode (the
//! server would end it too, with a compression error).

use std::borrow::Cow;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use loona_hpack::Decoder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a client sends first on an HTTP/2 connection without TLS (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEAD: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// Largest frame payload written: HTTP/2's initial `SETTINGS_MAX_FRAME_SIZE`, which the server
/// keeps (re-encoded blocks are split into CONTINUATION frames to fit).
const MAX_FRAME: usize = 16_384;
/// Dynamic table size the server announces (HTTP/2's default): the client's encoder may not
/// use more, so the decoder refuses more.
const HEADER_TABLE_SIZE: usize = 4096;
/// Largest header block accepted, compressed and decoded (name + value + 32 per field, as
/// HTTP/2 counts a header list). gRPC requests carry a few hundred bytes of headers.
pub const MAX_BLOCK: usize = 256 << 10;
/// The authority that replaces one that does not parse.
pub const SUBSTITUTE: &str = "localhost";

/// Why a connection was ended.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RewriteError {
    #[error("HTTP/2 header block of stream {0} interrupted by another frame")]
    Interrupted(u32),
    #[error("HTTP/2 CONTINUATION frame without a header block in progress")]
    StrayContinuation,
    #[error("HTTP/2 HEADERS frame with a bad padding or priority field")]
    BadHeadersFrame,
    #[error("HTTP/2 header block larger than {MAX_BLOCK} bytes")]
    TooLarge,
    #[error("HTTP/2 header block does not decode: {0}")]
    Hpack(String),
}

/// A header block being collected (a HEADERS frame and its CONTINUATION frames).
#[derive(Debug)]
struct Block {
    /// Stream id as received (4 bytes, reserved bit included).
    stream: [u8; 4],
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// The frame whose payload is being read.
#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: [u8; 4],
    remaining: usize,
    payload: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Matching the client preface; this many bytes of it seen.
    Preface(usize),
    Frames,
    /// Not an HTTP/2 connection with prior knowledge: left to the server to refuse.
    Passthrough,
}

/// The byte-level rewriter of the client-to-server direction (no I/O: [`FixAuthority`] feeds
/// it what it reads).
pub struct Rewriter {
    phase: Phase,
    head: [u8; FRAME_HEAD],
    head_len: usize,
    /// Payload bytes of a frame that passes through unchanged, still to copy.
    pass: usize,
    frame: Option<Frame>,
    block: Option<Block>,
    decoder: Decoder<'static>,
    replaced: u64,
}

impl std::fmt::Debug for Rewriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rewriter")
            .field("phase", &self.phase)
            .field("replaced", &self.replaced)
            .finish_non_exhaustive()
    }
}

impl Default for Rewriter {
    fn default() -> Rewriter {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Rewriter {
            phase: Phase::Preface(0),
            head: [0; FRAME_HEAD],
            head_len: 0,
            pass: 0,
            frame: None,
            block: None,
            decoder,
            replaced: 0,
        }
    }
}

impl Rewriter {
    pub fn new() -> Rewriter {
        Rewriter::default()
    }

    /// Authorities replaced so far.
    pub fn replaced(&self) -> u64 {
        self.replaced
    }

    /// Consumes `input` (any split of the stream), appending what the server should read to
    /// `out`. After an error the connection must be ended.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), RewriteError> {
        while !input.is_empty() {
            match self.phase {
                Phase::Passthrough => {
                    out.extend_from_slice(input);
                    return Ok(());
                }
                Phase::Preface(seen) => {
                    let n = (PREFACE.len() - seen).min(input.len());
                    if input[..n] != PREFACE[seen..seen + n] {
                        out.extend_from_slice(&PREFACE[..seen]);
                        self.phase = Phase::Passthrough;
                        continue;
                    }
                    input = &input[n..];
                    if seen + n == PREFACE.len() {
                        out.extend_from_slice(PREFACE);
                        self.phase = Phase::Frames;
                    } else {
                        self.phase = Phase::Preface(seen + n);
                    }
                }
                Phase::Frames => input = self.frames(input, out)?,
            }
        }
        Ok(())
    }

    /// Consumes some of `input` in the frame phase; returns the rest.
    fn frames<'a>(&mut self, input: &'a [u8], out: &mut Vec<u8>) -> Result<&'a [u8], RewriteError> {
        if self.pass > 0 {
            let n = self.pass.min(input.len());
            out.extend_from_slice(&input[..n]);
            self.pass -= n;
            return Ok(&input[n..]);
        }
        if let Some(frame) = &mut self.frame {
            let n = frame.remaining.min(input.len());
            frame.payload.extend_from_slice(&input[..n]);
            frame.remaining -= n;
            if frame.remaining == 0 {
                self.frame_done(out)?;
            }
            return Ok(&input[n..]);
        }
        let n = (FRAME_HEAD - self.head_len).min(input.len());
        self.head[self.head_len..self.head_len + n].copy_from_slice(&input[..n]);
        self.head_len += n;
        if self.head_len == FRAME_HEAD {
            self.head_len = 0;
            self.frame_head(out)?;
        }
        Ok(&input[n..])
    }

    /// A complete frame header is in `self.head`.
    fn frame_head(&mut self, out: &mut Vec<u8>) -> Result<(), RewriteError> {
        let h = self.head;
        let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        let (kind, flags) = (h[3], h[4]);
        let stream = [h[5], h[6], h[7], h[8]];
        if kind != TYPE_HEADERS && kind != TYPE_CONTINUATION {
            if let Some(b) = &self.block {
                return Err(RewriteError::Interrupted(stream_id(b.stream)));
            }
            out.extend_from_slice(&h);
            self.pass = len;
            return Ok(());
        }
        let collected = self.block.as_ref().map_or(0, |b| b.fragment.len());
        if collected + len > MAX_BLOCK {
            return Err(RewriteError::TooLarge);
        }
        self.frame = Some(Frame {
            kind,
            flags,
            stream,
            remaining: len,
            payload: Vec::with_capacity(len),
        });
        if len == 0 {
            self.frame_done(out)?;
        }
        Ok(())
    }

    /// The payload of a HEADERS or CONTINUATION frame is complete.
    fn frame_done(&mut self, out: &mut Vec<u8>) -> Result<(), RewriteError> {
        let Some(frame) = self.frame.take() else {
            return Ok(());
        };
        if frame.kind == TYPE_HEADERS {
            if let Some(b) = &self.block {
                return Err(RewriteError::Interrupted(stream_id(b.stream)));
            }
            let mut p = &frame.payload[..];
            let mut pad = 0;
            if frame.flags & FLAG_PADDED != 0 {
                let (&n, rest) = p.split_first().ok_or(RewriteError::BadHeadersFrame)?;
                pad = usize::from(n);
                p = rest;
            }
            let mut priority = None;
            if frame.flags & FLAG_PRIORITY != 0 {
                let (prio, rest) = p
                    .split_first_chunk::<5>()
                    .ok_or(RewriteError::BadHeadersFrame)?;
                priority = Some(*prio);
                p = rest;
            }
            let end = p
                .len()
                .checked_sub(pad)
                .ok_or(RewriteError::BadHeadersFrame)?;
            self.block = Some(Block {
                stream: frame.stream,
                end_stream: frame.flags & FLAG_END_STREAM != 0,
                priority,
                fragment: p[..end].to_vec(),
            });
        } else {
            match &mut self.block {
                Some(b) if b.stream == frame.stream => b.fragment.extend_from_slice(&frame.payload),
                Some(b) => return Err(RewriteError::Interrupted(stream_id(b.stream))),
                None => return Err(RewriteError::StrayContinuation),
            }
        }
        if frame.flags & FLAG_END_HEADERS != 0 {
            if let Some(block) = self.block.take() {
                self.rewrite(block, out)?;
            }
        }
        Ok(())
    }

    /// Decodes a complete header block, fixes its authority, and writes it re-encoded.
    fn rewrite(&mut self, block: Block, out: &mut Vec<u8>) -> Result<(), RewriteError> {
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut size = 0usize;
        self.decoder
            .decode_with_cb(&block.fragment, |name: Cow<[u8]>, value: Cow<[u8]>| {
                size += name.len() + value.len() + 32;
                if size <= MAX_BLOCK {
                    fields.push((name.into_owned(), value.into_owned()));
                }
            })
            .map_err(|e| RewriteError::Hpack(format!("{e:?}")))?;
        if size > MAX_BLOCK {
            return Err(RewriteError::TooLarge);
        }
        let mut encoded = Vec::with_capacity(block.fragment.len() + 64);
        for (name, value) in &mut fields {
            if name.as_slice() == b":authority"
                && http::uri::Authority::try_from(value.as_slice()).is_err()
            {
                *value = SUBSTITUTE.as_bytes().to_vec();
                self.replaced += 1;
            }
            // Literal header field without indexing, new name (RFC 7541 §6.2.2).
            encoded.push(0);
            literal(&mut encoded, name);
            literal(&mut encoded, value);
        }
        write_block(out, &block, &encoded);
        Ok(())
    }
}

fn stream_id(raw: [u8; 4]) -> u32 {
    u32::from_be_bytes(raw) & 0x7fff_ffff
}

/// A string literal without Huffman coding (RFC 7541 §5.2).
fn literal(out: &mut Vec<u8>, s: &[u8]) {
    // Writing to a Vec cannot fail.
    let _ = loona_hpack::encoder::encode_integer_into(s.len(), 7, 0, out);
    out.extend_from_slice(s);
}

/// Writes `encoded` as a HEADERS frame and as many CONTINUATION frames as it needs.
fn write_block(out: &mut Vec<u8>, block: &Block, encoded: &[u8]) {
    let mut rest = encoded;
    let mut first = true;
    loop {
        let prio = if first { block.priority } else { None };
        let room = MAX_FRAME - if prio.is_some() { 5 } else { 0 };
        let (chunk, tail) = rest.split_at(room.min(rest.len()));
        rest = tail;
        let (kind, mut flags) = if first {
            let mut f = 0;
            if block.end_stream {
                f |= FLAG_END_STREAM;
            }
            if prio.is_some() {
                f |= FLAG_PRIORITY;
            }
            (TYPE_HEADERS, f)
        } else {
            (TYPE_CONTINUATION, 0)
        };
        if rest.is_empty() {
            flags |= FLAG_END_HEADERS;
        }
        let len = chunk.len() + prio.map_or(0, |p| p.len());
        out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
        out.extend_from_slice(&block.stream);
        if let Some(p) = prio {
            out.extend_from_slice(&p);
        }
        out.extend_from_slice(chunk);
        if rest.is_empty() {
            return;
        }
        first = false;
    }
}

/// A connection whose client-to-server bytes go through a [`Rewriter`]; the other direction is
/// untouched.
#[derive(Debug)]
pub struct FixAuthority<S> {
    inner: S,
    rewriter: Rewriter,
    out: Vec<u8>,
    out_pos: usize,
    eof: bool,
}

impl<S> FixAuthority<S> {
    pub fn new(inner: S) -> FixAuthority<S> {
        FixAuthority {
            inner,
            rewriter: Rewriter::new(),
            out: Vec::new(),
            out_pos: 0,
            eof: false,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FixAuthority<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_pos < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_pos);
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut scratch = [0u8; 8192];
            let mut read = ReadBuf::new(&mut scratch);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                this.eof = true;
                continue;
            }
            this.rewriter
                .feed(read.filled(), &mut this.out)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FixAuthority<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for FixAuthority<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests;
