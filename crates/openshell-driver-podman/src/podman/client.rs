//! A small client for Podman's libpod REST API over its Unix socket
//! (hyper, HTTP/1.1, one connection per call; streams get their own).

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use tokio::net::UnixStream;

use super::stream::BodyReader;
use super::types::{
    ApiError, ContainerInspect, Created, ImageInspect, Info, ListedContainer, PullReport,
};
use crate::error::{Error, Result};

/// Every path is under this prefix. The libpod API accepts any version up
/// to its own, so v4.0.0 works with Podman 4 and 5.
pub const API_PREFIX: &str = "/v4.0.0/libpod";

/// Unary calls that take longer than this fail with a timeout.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// What `_ping` told us.
#[derive(Debug, Clone)]
pub struct Ping {
    /// The `Libpod-Api-Version` header.
    pub api_version: String,
    /// Pid of the process that owns the listening socket, from the
    /// socket's peer credentials.
    pub peer_pid: Option<u32>,
}

/// A full, non-streaming answer.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Answer {
    /// The status, with "no such container" answers (which Podman sometimes
    /// sends as 500 while a container is being removed) counted as 404.
    pub fn status(&self) -> StatusCode {
        if self.status == StatusCode::INTERNAL_SERVER_ERROR
            && String::from_utf8_lossy(&self.body).contains("no such container")
        {
            StatusCode::NOT_FOUND
        } else {
            self.status
        }
    }
}

/// Client for one engine socket. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Podman {
    socket: PathBuf,
}

/// Percent-encodes one path segment or query value.
pub fn encode(value: &str) -> String {
    utf8_percent_encode(value, NON_ALPHANUMERIC).to_string()
}

/// `filters=` query value for label filters (all must match).
pub fn label_filters(kind: Option<&str>, labels: &[String]) -> String {
    let mut filters = serde_json::Map::new();
    if let Some(kind) = kind {
        filters.insert("type".to_owned(), serde_json::json!([kind]));
    }
    if !labels.is_empty() {
        filters.insert("label".to_owned(), serde_json::json!(labels));
    }
    encode(&serde_json::Value::Object(filters).to_string())
}

impl Podman {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn unavailable(&self, reason: impl std::fmt::Display) -> Error {
        Error::EngineUnavailable {
            socket: self.socket.clone(),
            reason: reason.to_string(),
        }
    }

    async fn connect(&self) -> Result<(UnixStream, Option<u32>)> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| self.unavailable(e))?;
        let peer_pid = stream
            .peer_cred()
            .ok()
            .and_then(|c| c.pid())
            .and_then(|p| u32::try_from(p).ok());
        Ok((stream, peer_pid))
    }

    /// Sends one request on a fresh connection and returns the response with
    /// its body still streaming.
    async fn send_on(
        &self,
        stream: UnixStream,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Response<Incoming>> {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.unavailable(crate::error::chain(&e)))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(error = %error, "podman connection ended with an error");
            }
        });
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{API_PREFIX}{path}"))
            .header(HOST, "podman");
        if body.is_some() {
            request = request.header(CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| Error::Protocol {
                action: path.to_owned(),
                reason: e.to_string(),
            })?;
        sender
            .send_request(request)
            .await
            .map_err(|e| self.unavailable(crate::error::chain(&e)))
    }

    /// Opens a request whose answer streams (events, logs). An error status
    /// is turned into [`Error::Engine`].
    pub async fn open_stream(&self, action: &str, path: &str) -> Result<BodyReader> {
        self.open_stream_with(action, Method::GET, path).await
    }

    async fn open_stream_with(
        &self,
        action: &str,
        method: Method,
        path: &str,
    ) -> Result<BodyReader> {
        let (stream, _) = self.connect().await?;
        let response = self.send_on(stream, method, path, None).await?;
        let status = response.status();
        if status.is_success() {
            return Ok(BodyReader::new(response.into_body()));
        }
        let body = tokio::time::timeout(CALL_TIMEOUT, response.into_body().collect())
            .await
            .ok()
            .and_then(std::result::Result::ok)
            .map(http_body_util::Collected::to_bytes)
            .unwrap_or_default();
        Err(engine_error(action, status, &body))
    }

    /// One request with a fully read answer, bounded by `timeout`.
    pub async fn call(
        &self,
        action: &str,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Answer> {
        let work = async {
            let (stream, _) = self.connect().await?;
            let response = self.send_on(stream, method, path, body).await?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| self.unavailable(crate::error::chain(&e)))?
                .to_bytes();
            Ok(Answer { status, body })
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| Error::Timeout {
                what: format!("Podman call to {action}"),
                timeout,
            })?
    }

    async fn call_json<T: serde::de::DeserializeOwned>(
        &self,
        action: &str,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T> {
        let answer = self.call(action, method, path, body, CALL_TIMEOUT).await?;
        if !answer.status().is_success() {
            return Err(engine_error(action, answer.status(), &answer.body));
        }
        decode(action, &answer.body)
    }

    /// `GET /_ping`: proves the socket is a Podman (libpod) API and records
    /// who listens on it.
    pub async fn ping(&self, timeout: Duration) -> Result<Ping> {
        let work = async {
            let (stream, peer_pid) = self.connect().await?;
            let response = self.send_on(stream, Method::GET, "/_ping", None).await?;
            let status = response.status();
            let api_version = response
                .headers()
                .get("Libpod-Api-Version")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let _ = response.into_body().collect().await;
            if status != StatusCode::OK {
                return Err(Error::Engine {
                    action: "answer _ping".to_owned(),
                    status: status.as_u16(),
                    message: "the socket answered, but not with 200 OK".to_owned(),
                });
            }
            let Some(api_version) = api_version else {
                return Err(Error::Protocol {
                    action: "_ping".to_owned(),
                    reason: "no Libpod-Api-Version header: this is not a Podman API socket \
                             (a Docker socket?)"
                        .to_owned(),
                });
            };
            Ok(Ping {
                api_version,
                peer_pid,
            })
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| self.unavailable(format!("no answer to _ping within {timeout:?}")))?
    }

    pub async fn info(&self) -> Result<Info> {
        self.call_json("report its info", Method::GET, "/info", None)
            .await
    }

    /// The image, or `None` when the local store does not have it.
    pub async fn image(&self, name: &str) -> Result<Option<ImageInspect>> {
        let action = "inspect an image";
        let answer = self
            .call(
                action,
                Method::GET,
                &format!("/images/{}/json", encode(name)),
                None,
                CALL_TIMEOUT,
            )
            .await?;
        match answer.status() {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => decode(action, &answer.body).map(Some),
            s => Err(engine_error(action, s, &answer.body)),
        }
    }

    /// `POST /images/pull`: has the engine pull `reference` under
    /// `policy` (a [`crate::config::PullPolicy`] name). Registry
    /// credentials are the engine's own (its auth file). `progress` gets
    /// each line of progress text as it comes. Returns the id of the
    /// image; a failed pull is [`Error::Engine`] with the registry's reason.
    /// The stream answers 200 before the pull is done, so the failure
    /// comes as its last line, not as a status.
    pub async fn pull(
        &self,
        reference: &str,
        policy: &str,
        tls_verify: bool,
        timeout: Duration,
        mut progress: impl FnMut(&str) + Send,
    ) -> Result<String> {
        let action = format!("pull the image {reference:?}");
        let work = async {
            let mut reader = self
                .open_stream_with(
                    &action,
                    Method::POST,
                    &format!(
                        "/images/pull?reference={}&policy={}&tlsVerify={tls_verify}&quiet=false",
                        encode(reference),
                        encode(policy)
                    ),
                )
                .await?;
            let mut id = String::new();
            while let Some(line) = reader.next_line().await? {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let report: PullReport = decode(&action, &line)?;
                if !report.error.is_empty() {
                    return Err(Error::Engine {
                        action: action.clone(),
                        status: StatusCode::OK.as_u16(),
                        message: report.error.trim().to_owned(),
                    });
                }
                let text = report.stream.trim();
                if !text.is_empty() {
                    progress(text);
                }
                if !report.id.is_empty() {
                    id = report.id;
                }
            }
            if id.is_empty() {
                return Err(Error::Protocol {
                    action: action.clone(),
                    reason: "the pull stream ended without naming the pulled image".to_owned(),
                });
            }
            Ok(id)
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| Error::Timeout {
                what: format!("pulling the image {reference:?}"),
                timeout,
            })?
    }

    pub async fn network_exists(&self, name: &str) -> Result<bool> {
        let action = "look up a network";
        let answer = self
            .call(
                action,
                Method::GET,
                &format!("/networks/{}/exists", encode(name)),
                None,
                CALL_TIMEOUT,
            )
            .await?;
        match answer.status() {
            StatusCode::NOT_FOUND => Ok(false),
            s if s.is_success() => Ok(true),
            s => Err(engine_error(action, s, &answer.body)),
        }
    }

    /// Creates a container from a libpod spec generator body; returns its id.
    pub async fn create(&self, spec: &serde_json::Value) -> Result<Created> {
        let body = serde_json::to_vec(spec).map_err(|e| Error::Protocol {
            action: "create a container".to_owned(),
            reason: e.to_string(),
        })?;
        self.call_json(
            "create a container",
            Method::POST,
            "/containers/create",
            Some(body),
        )
        .await
    }

    /// Starts a container. `Ok(false)` when it was already running.
    pub async fn start(&self, id: &str) -> Result<bool> {
        let action = "start the container";
        let answer = self
            .call(
                action,
                Method::POST,
                &format!("/containers/{}/start", encode(id)),
                None,
                CALL_TIMEOUT,
            )
            .await?;
        match answer.status() {
            StatusCode::NOT_MODIFIED => Ok(false),
            s if s.is_success() => Ok(true),
            s => Err(engine_error(action, s, &answer.body)),
        }
    }

    /// Stops a container: SIGTERM, `timeout` to exit, then SIGKILL.
    /// `Ok(false)` when it was not running.
    pub async fn stop(&self, id: &str, timeout: Duration) -> Result<bool> {
        let action = "stop the container";
        let answer = self
            .call(
                action,
                Method::POST,
                &format!(
                    "/containers/{}/stop?timeout={}",
                    encode(id),
                    timeout.as_secs()
                ),
                None,
                timeout + CALL_TIMEOUT,
            )
            .await?;
        match answer.status() {
            StatusCode::NOT_MODIFIED => Ok(false),
            s if s.is_success() => Ok(true),
            s => Err(engine_error(action, s, &answer.body)),
        }
    }

    pub async fn unpause(&self, id: &str) -> Result<()> {
        let action = "unpause the container";
        let answer = self
            .call(
                action,
                Method::POST,
                &format!("/containers/{}/unpause", encode(id)),
                None,
                CALL_TIMEOUT,
            )
            .await?;
        if answer.status().is_success() {
            Ok(())
        } else {
            Err(engine_error(action, answer.status(), &answer.body))
        }
    }

    /// Removes a container, killing it if it runs, with its anonymous
    /// volumes. `Ok(false)` when there was no such container.
    pub async fn remove(&self, id: &str) -> Result<bool> {
        let action = "remove the container";
        let answer = self
            .call(
                action,
                Method::DELETE,
                &format!("/containers/{}?force=true&v=true&timeout=0", encode(id)),
                None,
                CALL_TIMEOUT,
            )
            .await?;
        match answer.status() {
            StatusCode::NOT_FOUND => Ok(false),
            s if s.is_success() => Ok(true),
            s => Err(engine_error(action, s, &answer.body)),
        }
    }

    /// The container, or `None` when it does not exist.
    pub async fn inspect(&self, id: &str) -> Result<Option<ContainerInspect>> {
        let action = "inspect the container";
        let answer = self
            .call(
                action,
                Method::GET,
                &format!("/containers/{}/json", encode(id)),
                None,
                CALL_TIMEOUT,
            )
            .await?;
        match answer.status() {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => decode(action, &answer.body).map(Some),
            s => Err(engine_error(action, s, &answer.body)),
        }
    }

    /// Every container (running or not) carrying all of `labels`
    /// (`key=value` each).
    pub async fn list(&self, labels: &[String]) -> Result<Vec<ListedContainer>> {
        self.call_json(
            "list containers",
            Method::GET,
            &format!(
                "/containers/json?all=true&filters={}",
                label_filters(None, labels)
            ),
            None,
        )
        .await
    }

    /// The live container event stream, one JSON object per line.
    pub async fn events(&self) -> Result<BodyReader> {
        self.open_stream(
            "stream events",
            &format!(
                "/events?stream=true&filters={}",
                label_filters(Some("container"), &[])
            ),
        )
        .await
    }

    /// A container's log, multiplexed frames with timestamps.
    pub async fn logs(&self, id: &str, follow: bool, tail_lines: u32) -> Result<BodyReader> {
        let tail = if tail_lines == 0 {
            "all".to_owned()
        } else {
            tail_lines.to_string()
        };
        self.open_stream(
            "stream the container's log",
            &format!(
                "/containers/{}/logs?stdout=true&stderr=true&timestamps=true&follow={follow}&tail={tail}",
                encode(id)
            ),
        )
        .await
    }
}

fn decode<T: serde::de::DeserializeOwned>(action: &str, body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| Error::Protocol {
        action: action.to_owned(),
        reason: format!("could not decode the JSON answer: {e}"),
    })
}

/// Turns an error answer into [`Error::Engine`] with Podman's own message.
pub fn engine_error(action: &str, status: StatusCode, body: &[u8]) -> Error {
    let message = serde_json::from_slice::<ApiError>(body)
        .ok()
        .map(|e| {
            if e.message.is_empty() {
                e.cause
            } else {
                e.message
            }
        })
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned());
    Error::Engine {
        action: action.to_owned(),
        status: status.as_u16(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_json_and_percent_encoded() {
        let query = label_filters(Some("container"), &["a=b".to_owned()]);
        let decoded = percent_encoding::percent_decode_str(&query)
            .decode_utf8()
            .unwrap();
        let value: serde_json::Value = serde_json::from_str(&decoded).unwrap();
        assert_eq!(value["type"][0], "container");
        assert_eq!(value["label"][0], "a=b");
        assert!(!query.contains('{'));
    }

    #[test]
    fn image_names_are_one_path_segment() {
        assert_eq!(
            encode("localhost/openshell-busybox:latest"),
            "localhost%2Fopenshell%2Dbusybox%3Alatest"
        );
    }

    #[test]
    fn no_such_container_counts_as_not_found() {
        let answer = Answer {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            body: Bytes::from_static(
                br#"{"cause":"no such container","message":"container x does not exist in database: no such container","response":500}"#,
            ),
        };
        assert_eq!(answer.status(), StatusCode::NOT_FOUND);
        let other = Answer {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            body: Bytes::from_static(b"boom"),
        };
        assert_eq!(other.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn engine_errors_carry_podmans_message() {
        let body = br#"{"cause":"image not known","message":"localhost/none:latest: image not known","response":500}"#;
        let error = engine_error(
            "create a container",
            StatusCode::INTERNAL_SERVER_ERROR,
            body,
        );
        assert_eq!(
            error.to_string(),
            "Podman could not create a container (HTTP 500): localhost/none:latest: image not known"
        );
        let error = engine_error("x", StatusCode::BAD_GATEWAY, b"plain text\n");
        assert!(error.to_string().ends_with("plain text"));
    }
}
