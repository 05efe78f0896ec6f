//! The optional log service: a sandbox's container log, optionally
//! followed until the container stops or the client goes away.

use openshell_proto::compute::logs::v1::sandbox_logs_server::SandboxLogs;
use openshell_proto::compute::logs::v1::{LogChunk, LogStream, StreamLogsRequest};
use tonic::{Request, Response, Status};

use crate::driver::{BoxStream, PodmanDriver};
use crate::podman::stream::{FrameStream, LogFrame};

/// Splits the `RFC3339 ` prefix Podman puts on each log line when asked for
/// timestamps; returns milliseconds since the epoch (0 when absent) and the
/// rest.
pub fn split_timestamp(payload: &[u8]) -> (i64, &[u8]) {
    let Some(space) = payload.iter().take(64).position(|b| *b == b' ') else {
        return (0, payload);
    };
    let Ok(text) = std::str::from_utf8(&payload[..space]) else {
        return (0, payload);
    };
    let Some(at) = openshell_wire::time::parse_rfc3339(text) else {
        return (0, payload);
    };
    let ms = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    (ms, &payload[space + 1..])
}

/// One frame as a chunk; `None` for frames that carry no sandbox output.
pub fn chunk(frame: &LogFrame, tty: bool) -> Option<LogChunk> {
    let stream = match (frame.stream, tty) {
        (FrameStream::Stdin, _) => return None,
        (_, true) => LogStream::Console,
        (FrameStream::Stdout, false) => LogStream::Stdout,
        (FrameStream::Stderr | FrameStream::System, false) => LogStream::Stderr,
    };
    let (timestamp_ms, data) = split_timestamp(&frame.payload);
    Some(LogChunk {
        data: data.to_vec(),
        stream: stream.into(),
        timestamp_ms,
    })
}

#[tonic::async_trait]
impl SandboxLogs for PodmanDriver {
    type StreamLogsStream = BoxStream<LogChunk>;

    async fn stream_logs(
        &self,
        request: Request<StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        let request = request.into_inner();
        let container = self
            .core
            .require_by_id_or_name(&request.sandbox_id, &request.sandbox_name)
            .await?;
        let tty = self
            .core
            .client
            .inspect(&container.id)
            .await?
            .is_some_and(|i| i.config.tty);
        let mut reader = self
            .core
            .client
            .logs(&container.id, request.follow, request.tail_lines)
            .await?;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let cancel = self.cancel.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = reader.next_frame() => next,
                    () = tx.closed() => return,
                    () = cancel.cancelled() => return,
                };
                match next {
                    Ok(Some(frame)) => {
                        if let Some(chunk) = chunk(&frame, tty)
                            && tx.send(Ok(chunk)).await.is_err()
                        {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(error) => {
                        let _ = tx.send(Err(Status::from(error))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    #[test]
    fn timestamps_are_split_off() {
        let (ms, rest) = split_timestamp(b"2026-11-23T10:28:20Z out\n");
        assert_eq!(ms, 1_795_429_700_000);
        assert_eq!(rest, b"out\n");
        let (ms, rest) = split_timestamp(b"2026-11-23T10:28:20.5+01:00 x");
        assert_eq!(ms, 1_795_429_700_500 - 3_600_000);
        assert_eq!(rest, b"x");
        let (ms, rest) = split_timestamp(b"no timestamp here");
        assert_eq!(ms, 0);
        assert_eq!(rest, b"no timestamp here");
    }

    #[test]
    fn streams_map_to_log_streams() {
        let frame = |stream| LogFrame {
            stream,
            payload: Bytes::from_static(b"2026-11-23T10:28:20Z hi\n"),
        };
        let out = chunk(&frame(FrameStream::Stdout), false).unwrap();
        assert_eq!(out.stream(), LogStream::Stdout);
        assert_eq!(out.data, b"hi\n");
        assert_eq!(
            chunk(&frame(FrameStream::Stderr), false).unwrap().stream(),
            LogStream::Stderr
        );
        assert_eq!(
            chunk(&frame(FrameStream::Stdout), true).unwrap().stream(),
            LogStream::Console
        );
        assert!(chunk(&frame(FrameStream::Stdin), false).is_none());
    }
}
