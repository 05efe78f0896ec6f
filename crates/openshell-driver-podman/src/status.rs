//! What a container's state means as sandbox conditions.
//!
//! The gateway reads `Suspended=True` as stopped, `Ready=True` as running,
//! `Ready=False` with a transient reason (`ContainerCreated`,
//! `ContainerStarting`) as provisioning and any other `Ready=False` reason as
//! an error; no `Ready` condition at all also reads as provisioning.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openshell_driver_kit::contract;
use openshell_proto::compute::v1::{DriverCondition, DriverSandbox, DriverSandboxStatus};

use crate::podman::types::ContainerInspect;
use crate::quantity::human_bytes;
use crate::spec::{LABEL_SANDBOX_ID, LABEL_SANDBOX_NAME, LABEL_WORKSPACE};
use crate::state::StartFailure;

pub const READY: &str = "Ready";
pub const SUSPENDED: &str = "Suspended";

/// Condition reasons this driver reports.
pub mod reason {
    pub const RUNNING: &str = "Running";
    pub const CONTAINER_CREATED: &str = "ContainerCreated";
    pub const CONTAINER_STARTING: &str = "ContainerStarting";
    pub const CONTAINER_STOPPING: &str = "ContainerStopping";
    pub const CONTAINER_STOPPED: &str = "ContainerStopped";
    pub const CONTAINER_EXITED: &str = "ContainerExited";
    pub const CONTAINER_PAUSED: &str = "ContainerPaused";
    pub const CONTAINER_REMOVING: &str = "ContainerRemoving";
    pub const OOM_KILLED: &str = "OOMKilled";
    pub const IMAGE_MISSING: &str = "ImageMissing";
    /// The image is being pulled; there is no container yet (the message
    /// says so). The gateway counts it as a transient reason.
    pub const PULLING: &str = "Pulling";
    pub const ENGINE_UNAVAILABLE: &str = "EngineUnavailable";
    pub const UNKNOWN_STATE: &str = "UnknownState";
}

/// Podman's "zero" time, meaning "never".
const ZERO_TIME_PREFIX: &str = "0001-01-01";

/// A Podman time (RFC 3339, any offset, nanoseconds); `None` for "never"
/// and for anything that is not a time.
fn time(value: &str) -> Option<SystemTime> {
    if value.starts_with(ZERO_TIME_PREFIX) {
        return None;
    }
    openshell_wire::time::parse_rfc3339(value)
}

/// `at` cut to whole milliseconds, the precision of the RFC 3339 text, so
/// both encodings of a condition's time denote the same instant.
fn whole_millis(at: SystemTime) -> SystemTime {
    let millis = at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    UNIX_EPOCH + Duration::from_millis(millis)
}

/// A condition stamped `at` in both time encodings (RFC 3339 text for
/// v0.0.111 gateways, a Timestamp for 1.x); neither when the time is not
/// known.
pub fn condition(
    kind: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    at: Option<SystemTime>,
) -> DriverCondition {
    let status = if status { "True" } else { "False" };
    let message = message.into();
    match at {
        Some(at) => contract::condition(kind, status, reason, &message, whole_millis(at)),
        None => DriverCondition {
            r#type: kind.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message,
            ..Default::default()
        },
    }
}

/// Everything that decides a sandbox's observed state.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub inspect: &'a ContainerInspect,
    /// The driver's namespace (its instance name).
    pub instance: &'a str,
    /// Stopped through StopSandbox.
    pub stopped: bool,
    pub start_failure: Option<&'a StartFailure>,
}

fn exit_message(inspect: &ContainerInspect) -> String {
    let state = &inspect.state;
    let mut message = format!("exited with code {}", state.exit_code);
    if state.exit_code > 128 && state.exit_code < 160 {
        message.push_str(&format!(" (killed by signal {})", state.exit_code - 128));
    }
    if !state.error.is_empty() {
        message.push_str(&format!("; Podman: {}", state.error));
    }
    message
}

fn conditions(facts: Facts<'_>) -> (Vec<DriverCondition>, bool) {
    let inspect = facts.inspect;
    let state = &inspect.state;
    let started = time(&state.started_at);
    let finished = time(&state.finished_at);
    let created = time(&inspect.created);
    let failure = facts.start_failure;
    let stopped_pair = |message: String, at: Option<SystemTime>| {
        let ready = match failure {
            Some(f) => condition(READY, false, &f.reason, f.message.clone(), at),
            None => condition(READY, false, reason::CONTAINER_STOPPED, message.clone(), at),
        };
        vec![
            condition(SUSPENDED, true, reason::CONTAINER_STOPPED, message, at),
            ready,
        ]
    };
    let failed = |f: &StartFailure, at: Option<SystemTime>| {
        vec![condition(READY, false, &f.reason, f.message.clone(), at)]
    };

    let list = match state.status.as_str() {
        "running" => vec![condition(
            READY,
            true,
            reason::RUNNING,
            "container is running",
            started,
        )],
        "paused" => vec![
            condition(
                SUSPENDED,
                true,
                reason::CONTAINER_PAUSED,
                "container is paused",
                started,
            ),
            condition(
                READY,
                false,
                reason::CONTAINER_PAUSED,
                "container is paused",
                started,
            ),
        ],
        "created" | "configured" | "initialized" => {
            if facts.stopped {
                stopped_pair(
                    "stopped through StopSandbox before it ran".to_owned(),
                    created,
                )
            } else if let Some(f) = failure {
                failed(f, created)
            } else if state.status == "initialized" {
                vec![condition(
                    READY,
                    false,
                    reason::CONTAINER_STARTING,
                    "container is starting",
                    created,
                )]
            } else {
                vec![condition(
                    READY,
                    false,
                    reason::CONTAINER_CREATED,
                    "container is created and not started yet",
                    created,
                )]
            }
        }
        "stopping" => vec![condition(
            SUSPENDED,
            false,
            reason::CONTAINER_STOPPING,
            "container is stopping",
            started,
        )],
        "exited" | "stopped" => {
            if facts.stopped {
                stopped_pair(
                    format!("stopped through StopSandbox ({})", exit_message(inspect)),
                    finished,
                )
            } else if let Some(f) = failure {
                failed(f, finished)
            } else if state.oom_killed {
                let limit = u64::try_from(inspect.host_config.memory)
                    .ok()
                    .filter(|m| *m > 0)
                    .map_or_else(String::new, |m| {
                        format!(" (memory limit {})", human_bytes(m))
                    });
                vec![condition(
                    READY,
                    false,
                    reason::OOM_KILLED,
                    format!(
                        "killed by the kernel because it ran out of memory{limit}; raise \
                         template.resources.limits.memory"
                    ),
                    finished,
                )]
            } else {
                vec![condition(
                    READY,
                    false,
                    reason::CONTAINER_EXITED,
                    exit_message(inspect),
                    finished,
                )]
            }
        }
        "removing" => vec![condition(
            READY,
            false,
            reason::CONTAINER_REMOVING,
            "container is being removed",
            finished,
        )],
        other => vec![DriverCondition {
            r#type: READY.to_owned(),
            status: "Unknown".to_owned(),
            reason: reason::UNKNOWN_STATE.to_owned(),
            message: format!("Podman reports the container as {other:?}"),
            ..Default::default()
        }],
    };
    (list, state.status == "removing")
}

/// The sandbox as observed from its container.
pub fn observe(facts: Facts<'_>) -> DriverSandbox {
    let inspect = facts.inspect;
    let (conditions, deleting) = conditions(facts);
    DriverSandbox {
        id: inspect
            .label(LABEL_SANDBOX_ID)
            .unwrap_or_default()
            .to_owned(),
        name: inspect
            .label(LABEL_SANDBOX_NAME)
            .unwrap_or_default()
            .to_owned(),
        namespace: facts.instance.to_owned(),
        spec: None,
        status: Some(DriverSandboxStatus {
            sandbox_name: inspect.short_name().to_owned(),
            instance_id: inspect.id.clone(),
            agent_fd: String::new(),
            sandbox_fd: String::new(),
            conditions,
            deleting,
            ..Default::default()
        }),
        workspace: inspect
            .label(LABEL_WORKSPACE)
            .unwrap_or_default()
            .to_owned(),
    }
}

/// A sandbox whose image is being pulled before its container exists:
/// `Ready=False`, reason [`reason::PULLING`], no instance id.
pub fn pulling(
    id: &str,
    name: &str,
    workspace: &str,
    instance: &str,
    message: &str,
    since: SystemTime,
) -> DriverSandbox {
    DriverSandbox {
        id: id.to_owned(),
        name: name.to_owned(),
        namespace: instance.to_owned(),
        spec: None,
        status: Some(DriverSandboxStatus {
            conditions: vec![condition(
                READY,
                false,
                reason::PULLING,
                message,
                Some(since),
            )],
            ..Default::default()
        }),
        workspace: workspace.to_owned(),
    }
}

/// A last-known sandbox, marked as unreachable because the engine is.
pub fn engine_unavailable(last: &DriverSandbox, message: &str, since: SystemTime) -> DriverSandbox {
    let mut sandbox = last.clone();
    let status = sandbox.status.get_or_insert_with(Default::default);
    status.conditions = vec![condition(
        READY,
        false,
        reason::ENGINE_UNAVAILABLE,
        message,
        Some(since),
    )];
    status.deleting = false;
    sandbox
}

/// The `Ready` condition of an observation, if any.
pub fn ready(sandbox: &DriverSandbox) -> Option<&DriverCondition> {
    sandbox
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.r#type == READY)
}

/// Whether an observation says the sandbox is stopped on request.
pub fn suspended(sandbox: &DriverSandbox) -> bool {
    sandbox.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.r#type == SUSPENDED && c.status == "True")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::podman::types::{ContainerConfig, ContainerState, HostConfig};

    fn inspect(status: &str, exit_code: i32, oom: bool) -> ContainerInspect {
        ContainerInspect {
            id: "c0ffee".into(),
            name: "openshell-podman-a-1".into(),
            created: "2026-11-23T10:00:00Z".into(),
            state: ContainerState {
                status: status.into(),
                running: status == "running",
                oom_killed: oom,
                exit_code,
                started_at: "2026-11-23T10:00:01Z".into(),
                finished_at: "0001-01-01T00:00:00Z".into(),
                ..Default::default()
            },
            config: ContainerConfig {
                labels: Some(
                    [
                        (LABEL_SANDBOX_ID.to_owned(), "s1".to_owned()),
                        (LABEL_SANDBOX_NAME.to_owned(), "a".to_owned()),
                        (LABEL_WORKSPACE.to_owned(), "w".to_owned()),
                    ]
                    .into(),
                ),
                tty: false,
            },
            host_config: HostConfig { memory: 16 << 20 },
        }
    }

    fn observed(
        status: &str,
        exit_code: i32,
        oom: bool,
        stopped: bool,
        failure: Option<&StartFailure>,
    ) -> DriverSandbox {
        observe(Facts {
            inspect: &inspect(status, exit_code, oom),
            instance: "podman",
            stopped,
            start_failure: failure,
        })
    }

    fn ready_of(s: &DriverSandbox) -> (String, String, String) {
        let c = ready(s).expect("a Ready condition");
        (c.status.clone(), c.reason.clone(), c.message.clone())
    }

    #[test]
    fn podman_times_become_utc_milliseconds() {
        let c = condition(
            READY,
            true,
            "r",
            "",
            time("2026-11-23T11:00:01.123456789+01:00"),
        );
        assert_eq!(c.last_transition_time, "2026-11-23T10:00:01.123Z");
        assert_eq!(
            c.transition_time,
            Some(prost_types::Timestamp {
                seconds: 1_795_428_001,
                nanos: 123_000_000
            })
        );
        assert_eq!(
            contract::condition_time(&c),
            openshell_wire::time::parse_rfc3339(&c.last_transition_time)
        );
        assert_eq!(time("0001-01-01T00:00:00Z"), None);
        assert_eq!(time(""), None);
        assert_eq!(time("yesterday"), None);
        let unknown = condition(READY, false, "r", "", None);
        assert!(unknown.last_transition_time.is_empty() && unknown.transition_time.is_none());
    }

    #[test]
    fn running_is_ready_with_identity_filled_in() {
        let s = observed("running", 0, false, false, None);
        assert_eq!(s.id, "s1");
        assert_eq!(s.name, "a");
        assert_eq!(s.workspace, "w");
        assert_eq!(s.namespace, "podman");
        let status = s.status.as_ref().unwrap();
        assert_eq!(status.instance_id, "c0ffee");
        assert_eq!(status.sandbox_name, "openshell-podman-a-1");
        assert_eq!(ready_of(&s).0, "True");
        assert_eq!(
            ready(&s).unwrap().last_transition_time,
            "2026-11-23T10:00:01.000Z"
        );
        assert!(!suspended(&s));
    }

    #[test]
    fn exits_report_the_code() {
        let s = observed("exited", 3, false, false, None);
        assert_eq!(
            ready_of(&s),
            (
                "False".into(),
                reason::CONTAINER_EXITED.into(),
                "exited with code 3".into()
            )
        );
        assert_eq!(
            ready(&s).unwrap().last_transition_time,
            "",
            "zero time is no time"
        );
        let killed = observed("exited", 137, false, false, None);
        assert!(
            ready_of(&killed)
                .2
                .starts_with("exited with code 137 (killed by signal 9)")
        );
    }

    #[test]
    fn oom_kills_are_named_with_the_limit() {
        let s = observed("exited", 137, true, false, None);
        let (status, reason, message) = ready_of(&s);
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("False", reason::OOM_KILLED)
        );
        assert!(message.contains("16 MiB"), "{message}");
    }

    #[test]
    fn stopped_on_request_is_suspended() {
        for state in ["exited", "stopped", "created"] {
            let s = observed(state, 143, false, true, None);
            assert!(suspended(&s), "{state}");
            assert_eq!(ready_of(&s).1, reason::CONTAINER_STOPPED);
        }
        // A running container ignores a stale marker.
        let s = observed("running", 0, false, true, None);
        assert!(!suspended(&s));
        assert_eq!(ready_of(&s).0, "True");
    }

    #[test]
    fn stopping_has_no_ready_condition() {
        let s = observed("stopping", 0, false, true, None);
        assert!(ready(&s).is_none());
        assert!(!suspended(&s));
    }

    #[test]
    fn transient_states_use_transient_reasons() {
        assert_eq!(
            ready_of(&observed("created", 0, false, false, None)).1,
            reason::CONTAINER_CREATED
        );
        assert_eq!(
            ready_of(&observed("configured", 0, false, false, None)).1,
            reason::CONTAINER_CREATED
        );
        assert_eq!(
            ready_of(&observed("initialized", 0, false, false, None)).1,
            reason::CONTAINER_STARTING
        );
    }

    #[test]
    fn start_failures_show_until_cleared() {
        let failure = StartFailure {
            reason: reason::IMAGE_MISSING.into(),
            message: "image gone".into(),
        };
        let s = observed("exited", 0, false, false, Some(&failure));
        assert_eq!(
            ready_of(&s),
            (
                "False".into(),
                reason::IMAGE_MISSING.into(),
                "image gone".into()
            )
        );
        let stopped = observed("exited", 0, false, true, Some(&failure));
        assert!(suspended(&stopped), "a stopped sandbox stays stopped");
        assert_eq!(ready_of(&stopped).1, reason::IMAGE_MISSING);
    }

    #[test]
    fn paused_and_removing() {
        let paused = observed("paused", 0, false, false, None);
        assert!(suspended(&paused));
        let removing = observed("removing", 0, false, false, None);
        assert!(removing.status.unwrap().deleting);
        let odd = observed("weird", 0, false, false, None);
        assert_eq!(ready_of(&odd).0, "Unknown");
    }

    #[test]
    fn unavailable_replaces_conditions() {
        let s = observed("running", 0, false, false, None);
        let u = engine_unavailable(&s, "no engine", SystemTime::now());
        assert_eq!(
            ready_of(&u),
            (
                "False".into(),
                reason::ENGINE_UNAVAILABLE.into(),
                "no engine".into()
            )
        );
        assert_eq!(u.id, "s1");
    }
}
