//! Lets stock gRPC clients talk to our Unix-socket servers.
//!
//! Since grpc 1.57, grpc-core clients (Python grpcio, Ruby, C++, ...) and
//! grpc-java and grpc-swift send the socket path, percent-encoded, as the
//! HTTP/2 `:authority` of requests on `unix:` channels. hyper's HTTP/2 layer
//! parses that value as a URI authority, finds a `%` in the host part and
//! resets the stream with PROTOCOL_ERROR before any handler runs.
//!
//! [`AuthorityFix`] sits between the socket and hyper on the server side.
//! It reads the client's HTTP/2 frames, decodes every header block with its
//! own HPACK decoder (so it tracks the client's dynamic table), and when a
//! request carries an authority hyper would refuse, replaces it with
//! `localhost`. From the first such request on, it re-encodes every header
//! block of that connection as plain literals, which touch no dynamic table,
//! so hyper's decoder never disagrees with what it is sent. Connections of
//! clients that send a valid authority (tonic, grpc-go) pass through byte
//! for byte. Everything the server writes passes through untouched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The HTTP/2 client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Largest frame payload every HTTP/2 peer must accept; re-encoded header
/// blocks are split to fit it.
const MAX_FRAME: usize = 16_384;
/// A header block larger than this is passed on untouched for hyper to
/// judge (it enforces its own, smaller, header-list limit).
const MAX_BLOCK: usize = 1 << 20;
/// What replaces an authority hyper would refuse.
const REPLACEMENT: &[u8] = b"localhost";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Waiting for the connection preface.
    Preface,
    /// Reading frames; blocks pass through as they came.
    Watching,
    /// Reading frames; every header block is re-encoded.
    Rewriting,
    /// Not HTTP/2 as expected, or the HPACK state was lost: bytes pass
    /// through and hyper decides.
    Transparent,
}

/// A header block being collected from HEADERS + CONTINUATION frames.
struct Block {
    stream_id: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    /// The frames as received, for passing through unchanged.
    raw: Vec<u8>,
}

/// A server-side connection whose incoming requests get a usable
/// `:authority`. See the module documentation.
pub struct AuthorityFix<S> {
    inner: S,
    mode: Mode,
    decoder: loona_hpack::Decoder<'static>,
    /// Bytes read from the client, not yet processed.
    input: BytesMut,
    /// Processed bytes waiting to be read by the server.
    output: BytesMut,
    block: Option<Block>,
    eof: bool,
    rewrote: bool,
}

impl<S> std::fmt::Debug for AuthorityFix<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityFix")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            mode: Mode::Preface,
            decoder: loona_hpack::Decoder::new(),
            input: BytesMut::new(),
            output: BytesMut::new(),
            block: None,
            eof: false,
            rewrote: false,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Whether this connection's requests have been rewritten.
    pub fn rewriting(&self) -> bool {
        self.rewrote
    }

    /// Moves whatever can be decided from `input` to `output`.
    fn process(&mut self) {
        loop {
            match self.mode {
                Mode::Transparent => {
                    if let Some(block) = self.block.take() {
                        self.output.extend_from_slice(&block.raw);
                    }
                    let all = self.input.split();
                    self.output.extend_from_slice(&all);
                    return;
                }
                Mode::Preface => {
                    let n = self.input.len().min(PREFACE.len());
                    if self.input[..n] != PREFACE[..n] {
                        self.mode = Mode::Transparent;
                        continue;
                    }
                    if n < PREFACE.len() {
                        return;
                    }
                    let preface = self.input.split_to(PREFACE.len());
                    self.output.extend_from_slice(&preface);
                    self.mode = Mode::Watching;
                }
                Mode::Watching | Mode::Rewriting => {
                    if self.input.len() < FRAME_HEADER {
                        return;
                    }
                    let length = (usize::from(self.input[0]) << 16)
                        | (usize::from(self.input[1]) << 8)
                        | usize::from(self.input[2]);
                    if self.input.len() < FRAME_HEADER + length {
                        return;
                    }
                    let frame = self.input.split_to(FRAME_HEADER + length);
                    self.frame(&frame);
                }
            }
        }
    }

    fn frame(&mut self, frame: &[u8]) {
        let kind = frame[3];
        let flags = frame[4];
        let stream_id = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        let payload = &frame[FRAME_HEADER..];
        match (kind, self.block.is_some()) {
            (HEADERS, false) => {
                let Some((priority, fragment)) = split_headers_payload(flags, payload) else {
                    self.give_up(frame);
                    return;
                };
                self.block = Some(Block {
                    stream_id,
                    flags,
                    priority,
                    fragment: fragment.to_vec(),
                    raw: frame.to_vec(),
                });
            }
            (CONTINUATION, true) => {
                let Some(block) = self.block.as_mut() else {
                    return;
                };
                if block.stream_id != stream_id || block.fragment.len() + payload.len() > MAX_BLOCK
                {
                    self.give_up(frame);
                    return;
                }
                block.fragment.extend_from_slice(payload);
                block.raw.extend_from_slice(frame);
                block.flags |= flags & END_HEADERS;
            }
            (_, false) => {
                self.output.extend_from_slice(frame);
                return;
            }
            // Anything but CONTINUATION inside a header block is a
            // connection error hyper reports itself.
            (_, true) => {
                self.give_up(frame);
                return;
            }
        }
        if self
            .block
            .as_ref()
            .is_some_and(|b| b.flags & END_HEADERS != 0)
            && let Some(block) = self.block.take()
        {
            self.finish(&block);
        }
    }

    /// Stops interpreting: what was collected and `frame` go on as they are.
    fn give_up(&mut self, frame: &[u8]) {
        self.mode = Mode::Transparent;
        if let Some(block) = self.block.take() {
            self.output.extend_from_slice(&block.raw);
        }
        self.output.extend_from_slice(frame);
    }

    fn finish(&mut self, block: &Block) {
        let Ok(headers) = self.decoder.decode(&block.fragment) else {
            // The client's dynamic table can no longer be followed.
            self.mode = Mode::Transparent;
            self.output.extend_from_slice(&block.raw);
            return;
        };
        let refused = headers
            .iter()
            .any(|(name, value)| name == b":authority" && !acceptable_authority(value));
        if refused {
            self.mode = Mode::Rewriting;
            self.rewrote = true;
        }
        if self.mode != Mode::Rewriting {
            self.output.extend_from_slice(&block.raw);
            return;
        }
        let mut encoded = Vec::with_capacity(block.fragment.len() + 64);
        for (name, value) in &headers {
            let value: &[u8] = if name == b":authority" && !acceptable_authority(value) {
                REPLACEMENT
            } else {
                value
            };
            encode_literal(&mut encoded, name, value);
        }
        self.write_block(block, &encoded);
    }

    fn write_block(&mut self, block: &Block, encoded: &[u8]) {
        let mut first = true;
        let mut rest = encoded;
        loop {
            let room = if first && block.priority.is_some() {
                MAX_FRAME - 5
            } else {
                MAX_FRAME
            };
            let take = rest.len().min(room);
            let (chunk, tail) = rest.split_at(take);
            let last = tail.is_empty();
            let (kind, mut flags) = if first {
                (HEADERS, block.flags & END_STREAM)
            } else {
                (CONTINUATION, 0)
            };
            if last {
                flags |= END_HEADERS;
            }
            let priority = if first { block.priority } else { None };
            if priority.is_some() {
                flags |= PRIORITY;
            }
            let length = chunk.len() + priority.map_or(0, |p| p.len());
            let length = u32::try_from(length).unwrap_or(u32::MAX);
            self.output.put_slice(&length.to_be_bytes()[1..]);
            self.output.put_u8(kind);
            self.output.put_u8(flags);
            self.output.put_u32(block.stream_id);
            if let Some(p) = priority {
                self.output.put_slice(&p);
            }
            self.output.put_slice(chunk);
            if last {
                return;
            }
            first = false;
            rest = tail;
        }
    }
}

/// Whether hyper accepts `value` as a request authority.
fn acceptable_authority(value: &[u8]) -> bool {
    tonic::codegen::http::uri::Authority::try_from(value).is_ok()
}

/// The priority fields and header block fragment of a HEADERS payload,
/// without padding; `None` when the payload is malformed.
fn split_headers_payload(flags: u8, payload: &[u8]) -> Option<(Option<[u8; 5]>, &[u8])> {
    let mut body = payload;
    let mut pad = 0usize;
    if flags & PADDED != 0 {
        pad = usize::from(*body.first()?);
        body = &body[1..];
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        let fields: [u8; 5] = body.get(..5)?.try_into().ok()?;
        priority = Some(fields);
        body = &body[5..];
    }
    let end = body.len().checked_sub(pad)?;
    Some((priority, &body[..end]))
}

/// An HPACK "literal header field without indexing, new name", no Huffman.
fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    encode_string(out, name);
    encode_string(out, value);
}

fn encode_string(out: &mut Vec<u8>, text: &[u8]) {
    encode_integer(out, text.len(), 7, 0x00);
    out.extend_from_slice(text);
}

/// HPACK integer with an `prefix_bits`-bit prefix (RFC 7541, 5.1).
fn encode_integer(out: &mut Vec<u8>, mut value: usize, prefix_bits: u8, first_byte_flags: u8) {
    let max_prefix = (1usize << prefix_bits) - 1;
    if value < max_prefix {
        out.push(first_byte_flags | u8::try_from(value).unwrap_or(0));
        return;
    }
    out.push(first_byte_flags | u8::try_from(max_prefix).unwrap_or(0));
    value -= max_prefix;
    while value >= 128 {
        out.push(u8::try_from(value % 128).unwrap_or(0) | 0x80);
        value /= 128;
    }
    out.push(u8::try_from(value).unwrap_or(0));
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output[..n]);
                this.output.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // Whatever was half-collected goes on as it is.
                this.mode = Mode::Transparent;
                this.process();
                if this.output.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                this.eof = true;
            } else {
                this.input.extend_from_slice(read.filled());
                this.process();
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityFix<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let len = u32::try_from(payload.len()).expect("len");
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn block(headers: &[(&[u8], &[u8])]) -> Vec<u8> {
        // Uses the dynamic table the way real clients do.
        let mut encoder = loona_hpack::Encoder::new();
        encoder.encode(headers.iter().copied())
    }

    async fn pass(input: Vec<u8>) -> (Vec<u8>, bool) {
        let mut fix = AuthorityFix::new(io::Cursor::new(input));
        let mut out = Vec::new();
        fix.read_to_end(&mut out).await.expect("read");
        let rewriting = fix.rewriting();
        (out, rewriting)
    }

    type Headers = Vec<(Vec<u8>, Vec<u8>)>;

    /// (frame type, flags, decoded headers) of each frame after the preface.
    fn decode_all(bytes: &[u8]) -> Vec<(u8, u8, Headers)> {
        assert!(bytes.starts_with(PREFACE));
        let mut rest = &bytes[PREFACE.len()..];
        let mut decoder = loona_hpack::Decoder::new();
        let mut out = Vec::new();
        let mut fragment = Vec::new();
        while !rest.is_empty() {
            let len =
                (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
            let (kind, flags) = (rest[3], rest[4]);
            let payload = &rest[9..9 + len];
            if kind == HEADERS || kind == CONTINUATION {
                let (_, f) =
                    split_headers_payload(if kind == HEADERS { flags } else { 0 }, payload)
                        .expect("well formed");
                fragment.extend_from_slice(f);
                if flags & END_HEADERS != 0 {
                    out.push((kind, flags, decoder.decode(&fragment).expect("decodes")));
                    fragment.clear();
                }
            } else {
                out.push((kind, flags, Vec::new()));
            }
            rest = &rest[9 + len..];
        }
        out
    }

    fn authority(headers: &[(Vec<u8>, Vec<u8>)]) -> &[u8] {
        headers
            .iter()
            .find(|(n, _)| n == b":authority")
            .map(|(_, v)| v.as_slice())
            .expect("authority")
    }

    #[tokio::test]
    async fn valid_authorities_pass_through_byte_for_byte() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[]));
        let h: &[(&[u8], &[u8])] = &[(b":method", b"POST"), (b":authority", b"localhost")];
        input.extend(frame(HEADERS, END_HEADERS, 1, &block(h)));
        input.extend(frame(0x0, END_STREAM, 1, b"data"));
        let (out, rewriting) = pass(input.clone()).await;
        assert_eq!(out, input);
        assert!(!rewriting);
    }

    #[tokio::test]
    async fn a_percent_encoded_socket_path_becomes_localhost() {
        let mut encoder = loona_hpack::Encoder::new();
        let first: &[(&[u8], &[u8])] = &[
            (b":method", b"POST"),
            (b":authority", b"tmp%2Frun%2Fgw.sock"),
            (b"x-custom", b"kept"),
        ];
        let second: &[(&[u8], &[u8])] = &[
            (b":method", b"POST"),
            (b":authority", b"tmp%2Frun%2Fgw.sock"),
            (b"x-custom", b"kept"),
        ];
        let mut input = PREFACE.to_vec();
        // Padding and priority on the first, a CONTINUATION split on the
        // second: both forms clients may send.
        let b1 = encoder.encode(first.iter().copied());
        let mut payload = vec![2u8];
        payload.extend_from_slice(&[0, 0, 0, 0, 15]);
        payload.extend_from_slice(&b1);
        payload.extend_from_slice(&[0, 0]);
        input.extend(frame(HEADERS, END_HEADERS | PADDED | PRIORITY, 1, &payload));
        let b2 = encoder.encode(second.iter().copied());
        let (a, b) = b2.split_at(b2.len() / 2);
        input.extend(frame(HEADERS, END_STREAM, 3, a));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, b));

        let (out, rewriting) = pass(input).await;
        assert!(rewriting);
        let frames = decode_all(&out);
        assert_eq!(frames.len(), 2, "one HEADERS frame per block");
        for (kind, _, headers) in &frames {
            assert_eq!(*kind, HEADERS);
            assert_eq!(authority(headers), b"localhost");
            assert!(
                headers
                    .iter()
                    .any(|(n, v)| n == b"x-custom" && v == b"kept")
            );
        }
        assert_eq!(frames[1].1 & END_STREAM, END_STREAM, "END_STREAM kept");
        assert_eq!(frames[0].1 & PRIORITY, PRIORITY, "priority kept");
    }

    #[tokio::test]
    async fn large_blocks_are_split_into_continuations() {
        let big = vec![b'v'; 40_000];
        let h: &[(&[u8], &[u8])] = &[(b":authority", b"a%2Fb"), (b"x-big", &big)];
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &block(h)));
        let (out, _) = pass(input).await;
        let frames = decode_all(&out);
        assert_eq!(frames.len(), 1);
        assert_eq!(authority(&frames[0].2), b"localhost");
        assert!(out.len() > 40_000 && out.len() < 40_200);
    }

    #[tokio::test]
    async fn anything_but_http2_is_left_alone() {
        let input = b"GET / HTTP/1.1\r\nHost: %2F\r\n\r\n".to_vec();
        assert_eq!(pass(input.clone()).await.0, input);
        let mut broken = PREFACE.to_vec();
        broken.extend(frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff]));
        assert_eq!(pass(broken.clone()).await.0, broken);
    }

    #[test]
    fn integers_follow_rfc7541() {
        let mut out = Vec::new();
        encode_integer(&mut out, 10, 5, 0);
        assert_eq!(out, [10]);
        out.clear();
        encode_integer(&mut out, 1337, 5, 0);
        assert_eq!(out, [31, 154, 10]);
    }
}
