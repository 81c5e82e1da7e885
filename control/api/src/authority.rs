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
mod tests {
    use super::*;
    use loona_hpack::Encoder;

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    fn fields(list: &[(&str, &str)]) -> Fields {
        list.iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn request(path: &str, authority: &str) -> Fields {
        fields(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("authorization", "Bearer t0ken"),
        ])
    }

    /// Parses what the server would read: frames, with header blocks decoded by a fresh
    /// decoder (as the server's own).
    #[derive(Debug, PartialEq)]
    enum Seen {
        Headers {
            stream: u32,
            flags: u8,
            fields: Fields,
        },
        Other {
            kind: u8,
            stream: u32,
            payload: Vec<u8>,
        },
    }

    fn server_view(mut bytes: &[u8]) -> Vec<Seen> {
        assert!(bytes.starts_with(PREFACE));
        bytes = &bytes[PREFACE.len()..];
        let mut decoder = Decoder::new();
        let mut seen = Vec::new();
        let mut block: Option<(u32, u8, Vec<u8>)> = None;
        while !bytes.is_empty() {
            let len =
                usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
            assert!(len <= MAX_FRAME, "frame of {len} bytes");
            let (kind, flags) = (bytes[3], bytes[4]);
            let stream = u32::from_be_bytes(bytes[5..9].try_into().unwrap());
            let payload = &bytes[9..9 + len];
            bytes = &bytes[9 + len..];
            match kind {
                TYPE_HEADERS => {
                    assert!(block.is_none());
                    assert_eq!(flags & FLAG_PADDED, 0);
                    let p = if flags & FLAG_PRIORITY != 0 {
                        &payload[5..]
                    } else {
                        payload
                    };
                    block = Some((stream, flags, p.to_vec()));
                }
                TYPE_CONTINUATION => block.as_mut().unwrap().2.extend_from_slice(payload),
                _ => {
                    assert!(block.is_none());
                    seen.push(Seen::Other {
                        kind,
                        stream,
                        payload: payload.to_vec(),
                    });
                }
            }
            if (kind == TYPE_HEADERS || kind == TYPE_CONTINUATION) && flags & FLAG_END_HEADERS != 0
            {
                let (stream, flags, b) = block.take().unwrap();
                seen.push(Seen::Headers {
                    stream,
                    flags: flags & (FLAG_END_STREAM | FLAG_PRIORITY),
                    fields: decoder.decode(&b).unwrap(),
                });
            }
        }
        assert!(block.is_none());
        seen
    }

    /// Feeds `input` in chunks of `chunk` bytes.
    fn run(input: &[u8], chunk: usize) -> (Vec<u8>, u64) {
        let mut r = Rewriter::new();
        let mut out = Vec::new();
        for c in input.chunks(chunk.max(1)) {
            r.feed(c, &mut out).unwrap();
        }
        (out, r.replaced())
    }

    /// A connection as C-core writes it: preface, SETTINGS, two requests with the same
    /// authority (the second refers to the first's entries in the dynamic table), DATA.
    fn c_core_connection(authority: &str) -> Vec<u8> {
        let mut enc = Encoder::new();
        let mut conn = PREFACE.to_vec();
        conn.extend(frame(0x4, 0, 0, &[0, 4, 0, 0, 0xff, 0xff]));
        for (stream, path) in [
            (1u32, "/xlb.v1.Xlb/ListFrontends"),
            (3, "/grpc.health.v1.Health/Check"),
        ] {
            let f = request(path, authority);
            let block = enc.encode(f.iter().map(|(n, v)| (&n[..], &v[..])));
            conn.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, stream, &block));
            conn.extend(frame(0x0, FLAG_END_STREAM, stream, &[0, 0, 0, 0, 0]));
        }
        conn
    }

    #[test]
    fn percent_encoded_socket_path_becomes_localhost_and_the_rest_is_kept() {
        let authority = "%2Frun%2Fxlb%2Fxlbd.sock";
        assert!(http::uri::Authority::try_from(authority).is_err());
        let input = c_core_connection(authority);
        for chunk in [1, 7, 9, 64, input.len()] {
            let (out, replaced) = run(&input, chunk);
            assert_eq!(replaced, 2, "chunk {chunk}");
            let seen = server_view(&out);
            assert_eq!(seen.len(), 5, "{seen:?}");
            assert_eq!(
                seen[0],
                Seen::Other {
                    kind: 0x4,
                    stream: 0,
                    payload: vec![0, 4, 0, 0, 0xff, 0xff]
                }
            );
            for (i, path) in [
                (1, "/xlb.v1.Xlb/ListFrontends"),
                (3, "/grpc.health.v1.Health/Check"),
            ] {
                let stream = if i == 1 { 1 } else { 3 };
                assert_eq!(
                    seen[i],
                    Seen::Headers {
                        stream,
                        flags: 0,
                        fields: request(path, SUBSTITUTE),
                    }
                );
                assert_eq!(
                    seen[i + 1],
                    Seen::Other {
                        kind: 0,
                        stream,
                        payload: vec![0, 0, 0, 0, 0]
                    }
                );
            }
        }
    }

    #[test]
    fn bare_path_and_empty_authorities_are_replaced_valid_ones_kept() {
        for (sent, expect) in [
            ("/run/xlb/xlbd.sock", SUBSTITUTE),
            ("", SUBSTITUTE),
            ("localhost", "localhost"),
            ("198.18.0.1:50051", "198.18.0.1:50051"),
            ("[2001:db8::1]:50051", "[2001:db8::1]:50051"),
        ] {
            let (out, replaced) = run(&c_core_connection(sent), 5);
            assert_eq!(replaced, if sent == expect { 0 } else { 2 }, "{sent:?}");
            let Seen::Headers { fields, .. } = &server_view(&out)[1] else {
                panic!("no headers");
            };
            assert_eq!(
                fields[3],
                (b":authority".to_vec(), expect.as_bytes().to_vec())
            );
        }
    }

    #[test]
    fn padded_prioritized_and_continued_blocks_are_joined_and_large_ones_split() {
        let mut enc = Encoder::new();
        let mut f = request("/xlb.v1.Xlb/GetConfig", "%2Ftmp%2Fs");
        // A block larger than one frame once re-encoded.
        f.push((b"x-big".to_vec(), vec![b'a'; 40_000]));
        let block = enc.encode(f.iter().map(|(n, v)| (&n[..], &v[..])));
        let (a, b) = block.split_at(10);
        let mut headers = vec![3u8]; // pad length
        headers.extend_from_slice(&[0, 0, 0, 0, 15]); // priority
        headers.extend_from_slice(a);
        headers.extend_from_slice(&[0, 0, 0]);
        let (b1, b2) = b.split_at(b.len() / 2);
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM,
            5,
            &headers,
        ));
        input.extend(frame(TYPE_CONTINUATION, 0, 5, b1));
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 5, b2));
        let (out, replaced) = run(&input, 1000);
        assert_eq!(replaced, 1);
        let seen = server_view(&out);
        let mut want = f.clone();
        want[3].1 = SUBSTITUTE.as_bytes().to_vec();
        assert_eq!(
            seen,
            vec![Seen::Headers {
                stream: 5,
                flags: FLAG_END_STREAM | FLAG_PRIORITY,
                fields: want
            }]
        );
    }

    #[test]
    fn not_http2_passes_through_untouched() {
        let input = b"GET / HTTP/1.1\r\nHost: /x\r\n\r\n";
        assert_eq!(run(input, 3).0, input.to_vec());
        let input = b"PRI * HTTP/1.1 nope";
        assert_eq!(run(input, 1).0, input.to_vec());
    }

    #[test]
    fn protocol_violations_end_the_connection() {
        let mut enc = Encoder::new();
        let block = enc.encode([(&b":authority"[..], &b"x"[..])]);
        let check = |frames: Vec<Vec<u8>>, want: RewriteError| {
            let mut input = PREFACE.to_vec();
            for f in frames {
                input.extend(f);
            }
            let mut out = Vec::new();
            assert_eq!(Rewriter::new().feed(&input, &mut out), Err(want));
        };
        check(
            vec![frame(TYPE_HEADERS, 0, 1, &block), frame(0x0, 0, 1, b"data")],
            RewriteError::Interrupted(1),
        );
        check(
            vec![
                frame(TYPE_HEADERS, 0, 1, &block),
                frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, &[]),
            ],
            RewriteError::Interrupted(1),
        );
        check(
            vec![frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &block)],
            RewriteError::StrayContinuation,
        );
        check(
            vec![frame(
                TYPE_HEADERS,
                FLAG_PADDED | FLAG_END_HEADERS,
                1,
                &[200, 1],
            )],
            RewriteError::BadHeadersFrame,
        );
        check(
            vec![frame(
                TYPE_HEADERS,
                FLAG_PRIORITY | FLAG_END_HEADERS,
                1,
                &[0, 0],
            )],
            RewriteError::BadHeadersFrame,
        );
        // A reference to a dynamic table entry that does not exist.
        check(
            vec![frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &[0x80 | 70])],
            RewriteError::Hpack("HeaderIndexOutOfBounds".into()),
        );
        // A table larger than the server allows.
        check(
            vec![frame(
                TYPE_HEADERS,
                FLAG_END_HEADERS,
                1,
                &[0x3f, 0xe1, 0x7f, 0x82],
            )],
            RewriteError::Hpack("InvalidMaxDynamicSize".into()),
        );
        let big = vec![0u8; MAX_BLOCK / 2 + 1];
        check(
            vec![
                frame(TYPE_HEADERS, 0, 1, &big),
                frame(TYPE_CONTINUATION, 0, 1, &big),
            ],
            RewriteError::TooLarge,
        );
    }

    #[test]
    fn a_small_block_that_decodes_too_large_is_refused() {
        // Indexed references to one entry of about 4 KB: small on the wire, large decoded.
        let mut enc = Encoder::new();
        let value = vec![b'v'; 4000];
        let first = enc.encode([(&b"x-a"[..], &value[..])]);
        let again = enc.encode([(&b"x-a"[..], &value[..])]);
        let mut block = first;
        for _ in 0..(MAX_BLOCK / 4000) {
            block.extend_from_slice(&again);
        }
        assert!(block.len() < MAX_BLOCK);
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
        assert_eq!(
            Rewriter::new().feed(&input, &mut Vec::new()),
            Err(RewriteError::TooLarge)
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_frames_never_panic(frames in proptest::collection::vec(
            (0u8..12, proptest::num::u8::ANY, 0u32..4, proptest::collection::vec(proptest::num::u8::ANY, 0..64)),
            0..12,
        ), chunk in 1usize..40) {
            let mut input = PREFACE.to_vec();
            for (kind, flags, stream, payload) in &frames {
                input.extend(frame(*kind, *flags, *stream, payload));
            }
            let mut r = Rewriter::new();
            let mut out = Vec::new();
            for c in input.chunks(chunk) {
                if r.feed(c, &mut out).is_err() {
                    break;
                }
            }
        }
    }
}
