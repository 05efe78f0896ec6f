//! Reading Podman's streaming answers: newline-delimited JSON (events) and
//! the multiplexed log format (an 8-byte header per frame: stream id, three
//! zero bytes, big-endian payload length).

use bytes::{Buf as _, Bytes, BytesMut};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;

use crate::error::{Error, Result};

/// Longest event line or log frame accepted; a longer one means the stream
/// is not what it claims to be.
const MAX_ITEM: usize = 8 * 1024 * 1024;

/// Which stream a log frame belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameStream {
    Stdin,
    Stdout,
    Stderr,
    /// Stream id 3: an error message from the engine itself.
    System,
}

/// One frame of a multiplexed log stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFrame {
    pub stream: FrameStream,
    pub payload: Bytes,
}

/// Incremental parser over the chunks of a response body.
#[derive(Debug, Default)]
pub struct Buffer {
    data: BytesMut,
}

impl Buffer {
    pub fn push(&mut self, chunk: &[u8]) {
        self.data.extend_from_slice(chunk);
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The next complete line (without its newline), if one is buffered.
    pub fn line(&mut self) -> Result<Option<Bytes>> {
        match self.data.iter().position(|b| *b == b'\n') {
            Some(end) => {
                let mut line = self.data.split_to(end + 1);
                line.truncate(end);
                Ok(Some(line.freeze()))
            }
            None if self.data.len() > MAX_ITEM => Err(too_long()),
            None => Ok(None),
        }
    }

    /// The next complete log frame, if one is buffered.
    pub fn frame(&mut self) -> Result<Option<LogFrame>> {
        if self.data.len() < 8 {
            return Ok(None);
        }
        let stream = match self.data[0] {
            0 => FrameStream::Stdin,
            1 => FrameStream::Stdout,
            2 => FrameStream::Stderr,
            3 => FrameStream::System,
            other => {
                return Err(Error::Protocol {
                    action: "stream the container's log".to_owned(),
                    reason: format!("unknown log stream id {other}"),
                });
            }
        };
        let len = u32::from_be_bytes([self.data[4], self.data[5], self.data[6], self.data[7]]);
        let len = usize::try_from(len).map_err(|_| too_long())?;
        if len > MAX_ITEM {
            return Err(too_long());
        }
        if self.data.len() < 8 + len {
            return Ok(None);
        }
        self.data.advance(8);
        let payload = self.data.split_to(len).freeze();
        Ok(Some(LogFrame { stream, payload }))
    }
}

fn too_long() -> Error {
    Error::Protocol {
        action: "stream".to_owned(),
        reason: format!("an item longer than {MAX_ITEM} bytes"),
    }
}

/// A streaming response body read as lines or log frames.
#[derive(Debug)]
pub struct BodyReader {
    body: Incoming,
    buffer: Buffer,
    done: bool,
}

impl BodyReader {
    pub fn new(body: Incoming) -> Self {
        Self {
            body,
            buffer: Buffer::default(),
            done: false,
        }
    }

    /// Reads the next body chunk into the buffer; `false` at the end.
    async fn fill(&mut self) -> Result<bool> {
        while !self.done {
            match self.body.frame().await {
                None => self.done = true,
                Some(Err(error)) => {
                    return Err(Error::Protocol {
                        action: "stream".to_owned(),
                        reason: crate::error::chain(&error),
                    });
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.push(&data);
                        return Ok(true);
                    }
                }
            }
        }
        Ok(false)
    }

    /// The next line; `None` once the stream has ended.
    pub async fn next_line(&mut self) -> Result<Option<Bytes>> {
        loop {
            if let Some(line) = self.buffer.line()? {
                return Ok(Some(line));
            }
            if !self.fill().await? {
                if self.buffer.is_empty() {
                    return Ok(None);
                }
                let rest = std::mem::take(&mut self.buffer.data).freeze();
                return Ok(Some(rest));
            }
        }
    }

    /// The next log frame; `None` once the stream has ended.
    pub async fn next_frame(&mut self) -> Result<Option<LogFrame>> {
        loop {
            if let Some(frame) = self.buffer.frame()? {
                return Ok(Some(frame));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(stream: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![stream, 0, 0, 0];
        out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn lines_split_across_chunks() {
        let mut buffer = Buffer::default();
        buffer.push(b"{\"a\":1}\n{\"b\"");
        assert_eq!(
            buffer.line().unwrap().unwrap(),
            Bytes::from_static(b"{\"a\":1}")
        );
        assert!(buffer.line().unwrap().is_none());
        buffer.push(b":2}\n");
        assert_eq!(
            buffer.line().unwrap().unwrap(),
            Bytes::from_static(b"{\"b\":2}")
        );
        assert!(buffer.is_empty());
    }

    #[test]
    fn frames_split_across_chunks() {
        let mut bytes = frame(1, b"2026-11-23T10:28:20Z out\n");
        bytes.extend(frame(2, b"2026-11-23T10:28:20Z err\n"));
        let mut buffer = Buffer::default();
        let (first, second) = bytes.split_at(5);
        buffer.push(first);
        assert!(buffer.frame().unwrap().is_none());
        buffer.push(second);
        let one = buffer.frame().unwrap().unwrap();
        assert_eq!(one.stream, FrameStream::Stdout);
        assert_eq!(
            one.payload,
            Bytes::from_static(b"2026-11-23T10:28:20Z out\n")
        );
        let two = buffer.frame().unwrap().unwrap();
        assert_eq!(two.stream, FrameStream::Stderr);
        assert!(buffer.frame().unwrap().is_none());
    }

    #[test]
    fn garbage_is_an_error_not_a_hang() {
        let mut buffer = Buffer::default();
        buffer.push(b"HTTP/1.1 200 OK\r\n");
        assert!(buffer.frame().is_err());
    }
}
