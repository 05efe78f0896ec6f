//! Waiting for a sandbox to reach a phase, with a progress line.

use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, Instant};

use openshell_proto::gateway::v1::gateway_client::GatewayClient;
use openshell_proto::gateway::v1::watch_sandboxes_event::Payload;
use openshell_proto::gateway::v1::{Sandbox, SandboxPhase, WatchSandboxesRequest};
use tonic::transport::Channel;

use crate::error::CliError;
use crate::render::{condition_summary, explaining_condition, phase_name};

/// What to wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    Ready,
    Gone,
}

impl Goal {
    fn describe(self) -> &'static str {
        match self {
            Self::Ready => "waiting for Ready",
            Self::Gone => "waiting for deletion",
        }
    }
}

/// A status line on stderr: redrawn in place with a spinner on a terminal,
/// one line per change otherwise.
pub struct Progress {
    name: String,
    started: Instant,
    terminal: bool,
    enabled: bool,
    last: String,
    frame: usize,
}

const FRAMES: &[char] = &['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];

impl Progress {
    pub fn new(name: &str, enabled: bool) -> Self {
        Self {
            name: name.to_owned(),
            started: Instant::now(),
            terminal: std::io::stderr().is_terminal(),
            enabled,
            last: String::new(),
            frame: 0,
        }
    }

    fn status_of(sandbox: &Sandbox) -> String {
        let mut text = phase_name(sandbox.phase).to_owned();
        if let Some(condition) = explaining_condition(sandbox) {
            let summary = condition_summary(condition);
            if !summary.is_empty() {
                text.push_str(&format!(" ({summary})"));
            }
        }
        text
    }

    pub fn update(&mut self, status: String) {
        if !self.enabled {
            return;
        }
        if self.terminal {
            self.last = status;
            self.draw();
        } else if status != self.last {
            eprintln!("sandbox {}: {status}", self.name);
            self.last = status;
        }
    }

    pub fn sandbox(&mut self, sandbox: &Sandbox) {
        self.update(Self::status_of(sandbox));
    }

    pub fn tick(&mut self) {
        if self.enabled && self.terminal && !self.last.is_empty() {
            self.frame = (self.frame + 1) % FRAMES.len();
            self.draw();
        }
    }

    fn draw(&self) {
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[2K{} sandbox {}: {} [{}s]",
            FRAMES[self.frame],
            self.name,
            self.last,
            self.started.elapsed().as_secs()
        );
        let _ = err.flush();
    }

    /// Ends the line (terminal mode) so later output starts clean.
    pub fn finish(&mut self) {
        if self.enabled && self.terminal && !self.last.is_empty() {
            eprintln!();
        }
        self.enabled = false;
    }
}

/// Follows the sandbox through the gateway's watch stream until `goal` is
/// reached, it fails, or `timeout` passes. `known` is the sandbox as the
/// request that started the wait returned it, if it did: it counts as seen
/// (a wait that times out at once reports its phase). Returns the last
/// state seen (`None` when the goal is deletion).
pub async fn wait_for(
    client: &mut GatewayClient<Channel>,
    name: &str,
    goal: Goal,
    timeout: Duration,
    known: Option<Sandbox>,
    progress: &mut Progress,
) -> Result<Option<Sandbox>, CliError> {
    let deadline = tokio::time::Instant::now() + timeout;
    if let Some(sandbox) = &known
        && let Some(done) = check(goal, sandbox)
    {
        progress.finish();
        return done.map(|()| known);
    }
    let mut stream = client
        .watch_sandboxes(WatchSandboxesRequest {
            driver: String::new(),
            name: name.to_owned(),
        })
        .await?
        .into_inner();
    let mut last: Option<Sandbox> = known;
    // The initial listing has been read (`synced`): only then does "not in
    // the listing" mean "not there".
    let mut synced = false;
    let mut listed = false;
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    let result = loop {
        let event = tokio::select! {
            // What already arrived counts, even once the time is up.
            biased;
            event = stream.message() => event,
            _ = ticker.tick() => { progress.tick(); continue; }
            () = tokio::time::sleep_until(deadline) => {
                break Err(CliError::Timeout {
                    name: name.to_owned(),
                    secs: timeout.as_secs(),
                    waiting_for: goal.describe(),
                    phase: last.as_ref().map_or("unknown", |s| phase_name(s.phase)).to_owned(),
                });
            }
        };
        let Some(event) = event? else {
            break Err(CliError::Request {
                code: tonic::Code::Unavailable,
                message: "the gateway ended the watch stream (is it shutting down?)".to_owned(),
            });
        };
        match event.payload {
            Some(Payload::Sandbox(sandbox)) if sandbox.name == name => {
                listed |= !synced;
                progress.sandbox(&sandbox);
                if let Some(done) = check(goal, &sandbox) {
                    break done.map(|()| Some(sandbox));
                }
                last = Some(sandbox);
            }
            Some(Payload::Deleted(deleted))
                if deleted.name == name || last.as_ref().is_some_and(|s| s.id == deleted.id) =>
            {
                if goal == Goal::Gone {
                    break Ok(None);
                }
                break Err(CliError::SandboxFailed {
                    name: name.to_owned(),
                    reason: "it was deleted while waiting for it".to_owned(),
                });
            }
            Some(Payload::Synced(_)) if !synced => {
                synced = true;
                if !listed {
                    break match goal {
                        Goal::Gone => Ok(None),
                        Goal::Ready => Err(CliError::Request {
                            code: tonic::Code::NotFound,
                            message: format!("sandbox '{name}' not found"),
                        }),
                    };
                }
            }
            _ => {}
        }
    };
    progress.finish();
    result
}

/// `Some(Ok)` when the goal is reached, `Some(Err)` when it cannot be any
/// more, `None` to keep waiting.
fn check(goal: Goal, sandbox: &Sandbox) -> Option<Result<(), CliError>> {
    let phase = SandboxPhase::try_from(sandbox.phase).unwrap_or(SandboxPhase::Unspecified);
    let failed = |what: &str| {
        let reason = explaining_condition(sandbox)
            .map(condition_summary)
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| what.to_owned());
        Some(Err(CliError::SandboxFailed {
            name: sandbox.name.clone(),
            reason,
        }))
    };
    match (goal, phase) {
        (Goal::Ready, SandboxPhase::Ready) => Some(Ok(())),
        (Goal::Ready, SandboxPhase::Error) => failed("it is in phase Error"),
        (Goal::Ready, SandboxPhase::Stopped | SandboxPhase::Stopping) => failed("it was stopped"),
        (Goal::Ready, SandboxPhase::Deleting) => failed("it is being deleted"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openshell_proto::gateway::v1::Condition;

    fn sandbox(phase: SandboxPhase, reason: &str) -> Sandbox {
        Sandbox {
            name: "web".into(),
            phase: phase as i32,
            conditions: vec![Condition {
                r#type: "Ready".into(),
                status: if phase == SandboxPhase::Ready {
                    "True"
                } else {
                    "False"
                }
                .into(),
                reason: reason.into(),
                message: "details".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn ready_is_reached_and_error_is_final() {
        assert!(matches!(
            check(Goal::Ready, &sandbox(SandboxPhase::Ready, "Running")),
            Some(Ok(()))
        ));
        assert!(
            check(
                Goal::Ready,
                &sandbox(SandboxPhase::Provisioning, "Starting")
            )
            .is_none()
        );
        let Some(Err(err)) = check(Goal::Ready, &sandbox(SandboxPhase::Error, "ImageMissing"))
        else {
            panic!("error must end the wait");
        };
        assert_eq!(
            err.to_string(),
            "sandbox 'web' failed: ImageMissing: details"
        );
        assert_eq!(err.exit_code(), 4);
    }

    #[test]
    fn deletion_goal_ignores_phases() {
        assert!(check(Goal::Gone, &sandbox(SandboxPhase::Deleting, "Deleting")).is_none());
        assert!(check(Goal::Gone, &sandbox(SandboxPhase::Error, "X")).is_none());
    }
}
