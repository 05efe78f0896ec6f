//! A WatchSandboxes stream read in the background.
//!
//! Opening the stream is not bounded by a short deadline: grpc-go and
//! grpcio servers send a stream's response headers only with its first
//! message, so a watch with nothing to report yet may not "open" at all
//! until a sandbox changes. The reader task opens the stream and forwards
//! what arrives; callers wait for the events they expect with their own
//! deadline.

use openshell_proto::compute::v1::compute_driver_client::ComputeDriverClient;
use openshell_proto::compute::v1::{WatchSandboxesEvent, WatchSandboxesRequest};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::transport::Channel;

/// What the reader task forwards.
#[derive(Debug)]
enum Item {
    Event(Box<WatchSandboxesEvent>),
    /// The stream failed to open or broke; nothing follows.
    Failed(tonic::Status),
    /// The driver ended the stream; nothing follows.
    Ended,
}

pub struct Watcher {
    rx: mpsc::UnboundedReceiver<Item>,
    task: JoinHandle<()>,
    /// Every event received so far, in order.
    pub seen: Vec<WatchSandboxesEvent>,
    /// Why the stream stopped, once it has.
    pub closed: Option<String>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Watcher {
    /// Starts a watch on its own task.
    pub fn open(mut client: ComputeDriverClient<Channel>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut stream = match client.watch_sandboxes(WatchSandboxesRequest {}).await {
                Ok(response) => response.into_inner(),
                Err(status) => {
                    let _ = tx.send(Item::Failed(status));
                    return;
                }
            };
            loop {
                let item = match stream.message().await {
                    Ok(Some(event)) => Item::Event(Box::new(event)),
                    Ok(None) => Item::Ended,
                    Err(status) => Item::Failed(status),
                };
                let last = !matches!(item, Item::Event(_));
                if tx.send(item).is_err() || last {
                    return;
                }
            }
        });
        Self {
            rx,
            task,
            seen: Vec::new(),
            closed: None,
        }
    }

    /// Waits until an event satisfying `wanted` has arrived (counting those
    /// already seen) or `deadline` passes. The error says what happened
    /// instead.
    pub async fn wait_for(
        &mut self,
        deadline: Instant,
        wanted: impl Fn(&WatchSandboxesEvent) -> bool,
    ) -> Result<(), String> {
        if self.seen.iter().any(&wanted) {
            return Ok(());
        }
        loop {
            if let Some(why) = &self.closed {
                return Err(format!(
                    "the watch stopped after {} events: {why}",
                    self.seen.len()
                ));
            }
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) => {
                    return Err(format!(
                        "not seen within the timeout ({} events received{})",
                        self.seen.len(),
                        if self.seen.is_empty() {
                            "; the stream may not have opened"
                        } else {
                            ""
                        }
                    ));
                }
                Ok(None) => self.closed = Some("the reader task ended".to_owned()),
                Ok(Some(Item::Failed(status))) => {
                    self.closed = Some(format!(
                        "{} {}",
                        crate::runner::code_name(status.code()),
                        status.message()
                    ));
                }
                Ok(Some(Item::Ended)) => {
                    self.closed = Some("the driver ended the stream".to_owned());
                }
                Ok(Some(Item::Event(event))) => {
                    let hit = wanted(&event);
                    self.seen.push(*event);
                    if hit {
                        return Ok(());
                    }
                }
            }
        }
    }
}
