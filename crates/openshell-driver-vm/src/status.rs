//! What the driver reports about a sandbox: its phase, turned into the
//! conditions the gateway derives the public phase from.
//!
//! | phase | conditions | gateway reads |
//! |---|---|---|
//! | provisioning, booting | `Ready=False`, reason `Starting` | Provisioning (transient) |
//! | running | `Ready=True`, reason `Running` | Ready |
//! | stopped | `Suspended=True`, `Ready=False` reason `Stopped` | Stopped |
//! | exited | `Ready=False`, reason `Exited` | Error |
//! | boot failed | `Ready=False`, reason `BootFailed` | Error |
//! | provisioning failed | `Ready=False`, reason `ProvisioningFailed` | Error |
//! | host unsupported | `Ready=False`, reason `HostUnsupported` | Error |
//! | deleting | `deleting=true`, `Ready=False` reason `Deleting` | Deleting |

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openshell_driver_kit::contract;
use openshell_proto::compute::v1::DriverSandboxStatus;

use crate::state::Tombstone;

/// Where a sandbox is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Image and writable layer being prepared.
    Provisioning,
    /// The VMM runs; the guest has not reached its root filesystem yet.
    Booting {
        pid: u32,
    },
    /// The guest booted.
    Running {
        pid: u32,
    },
    Stopped,
    /// The guest ran and its command ended (or its VMM was killed).
    Exited {
        code: Option<i32>,
        message: String,
    },
    BootFailed {
        message: String,
    },
    ProvisioningFailed {
        message: String,
    },
    HostUnsupported {
        message: String,
    },
}

pub const REASON_EXITED: &str = "Exited";
pub const REASON_BOOT_FAILED: &str = "BootFailed";
pub const REASON_PROVISIONING_FAILED: &str = "ProvisioningFailed";

impl Phase {
    /// The tombstone that records this phase, for phases that end a boot on
    /// their own.
    pub fn tombstone(&self, at_ms: i64) -> Option<Tombstone> {
        let (reason, message, exit_code) = match self {
            Self::Exited { code, message } => (REASON_EXITED, message, *code),
            Self::BootFailed { message } => (REASON_BOOT_FAILED, message, None),
            Self::ProvisioningFailed { message } => (REASON_PROVISIONING_FAILED, message, None),
            _ => return None,
        };
        Some(Tombstone {
            reason: reason.to_owned(),
            message: message.clone(),
            exit_code,
            at_ms,
        })
    }

    /// The phase a tombstone records.
    pub fn from_tombstone(tombstone: &Tombstone) -> Self {
        let message = tombstone.message.clone();
        match tombstone.reason.as_str() {
            REASON_EXITED => Self::Exited {
                code: tombstone.exit_code,
                message,
            },
            REASON_PROVISIONING_FAILED => Self::ProvisioningFailed { message },
            _ => Self::BootFailed { message },
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            Self::Provisioning => "provisioning",
            Self::Booting { .. } => "booting",
            Self::Running { .. } => "running",
            Self::Stopped => "stopped",
            Self::Exited { .. } => "exited",
            Self::BootFailed { .. } => "boot-failed",
            Self::ProvisioningFailed { .. } => "provisioning-failed",
            Self::HostUnsupported { .. } => "host-unsupported",
        }
    }
}

/// `ms` milliseconds after the Unix epoch (earlier instants clamp to it).
fn instant(ms: i64) -> SystemTime {
    let ms = u64::try_from(ms).unwrap_or(0);
    UNIX_EPOCH
        .checked_add(Duration::from_millis(ms))
        .unwrap_or(UNIX_EPOCH)
}

/// The observed status of a sandbox in `phase` since `since_ms`. Every
/// condition carries its transition time in both encodings (RFC 3339 text
/// for v0.0.111 gateways, a Timestamp for 1.x gateways).
pub fn status(name: &str, phase: &Phase, deleting: bool, since_ms: i64) -> DriverSandboxStatus {
    let since = instant(since_ms);
    let ready_false =
        |reason: &str, message: &str| contract::condition("Ready", "False", reason, message, since);
    let conditions = if deleting {
        vec![ready_false("Deleting", "The sandbox is being deleted")]
    } else {
        match phase {
            Phase::Provisioning => vec![ready_false(
                "Starting",
                "Provisioning: preparing the image and the writable layer",
            )],
            Phase::Booting { pid } => vec![ready_false(
                "Starting",
                &format!("Booting the VM (VMM pid {pid})"),
            )],
            Phase::Running { pid } => vec![contract::condition(
                "Ready",
                "True",
                "Running",
                &format!("The guest is running (VMM pid {pid})"),
                since,
            )],
            Phase::Stopped => vec![
                ready_false("Stopped", "The VM is stopped; its writable layer is kept"),
                contract::condition(
                    "Suspended",
                    "True",
                    "Stopped",
                    "The VM is stopped; start it again to boot from its writable layer",
                    since,
                ),
            ],
            Phase::Exited { message, .. } => vec![ready_false(REASON_EXITED, message)],
            Phase::BootFailed { message } => vec![ready_false(REASON_BOOT_FAILED, message)],
            Phase::ProvisioningFailed { message } => {
                vec![ready_false(REASON_PROVISIONING_FAILED, message)]
            }
            Phase::HostUnsupported { message } => vec![ready_false("HostUnsupported", message)],
        }
    };
    DriverSandboxStatus {
        sandbox_name: name.to_owned(),
        instance_id: String::new(),
        agent_fd: String::new(),
        sandbox_fd: String::new(),
        conditions,
        deleting,
        // The VM driver has no workload identity to resolve and no fencing
        // of older generations to prove (one VMM per sandbox at a time).
        resolved_identity: None,
        fence_evidence: None,
    }
}

#[cfg(test)]
mod tests {
    use openshell_proto::compute::v1::DriverCondition;

    use super::*;

    fn only(status: &DriverSandboxStatus, kind: &str) -> DriverCondition {
        status
            .conditions
            .iter()
            .find(|c| c.r#type == kind)
            .cloned()
            .unwrap()
    }

    #[test]
    fn conditions_carry_the_wire_timestamp() {
        let ready = only(
            &status("n", &Phase::Running { pid: 1 }, false, 951_782_400_123),
            "Ready",
        );
        assert_eq!(ready.last_transition_time, "2000-02-29T00:00:00.123Z");
        assert_eq!(
            ready.transition_time,
            Some(prost_types::Timestamp {
                seconds: 951_782_400,
                nanos: 123_000_000,
            })
        );
        let stopped = status("n", &Phase::Stopped, false, 951_782_400_123);
        for c in &stopped.conditions {
            assert_eq!(
                contract::condition_time(c),
                openshell_wire::time::parse_rfc3339(&c.last_transition_time),
                "{c:?}"
            );
        }
    }

    #[test]
    fn provisioning_is_transient_for_the_gateway() {
        // The gateway reads any Ready=False reason other than a short list
        // (Starting among them) as an error, so provisioning must say
        // Starting.
        for phase in [Phase::Provisioning, Phase::Booting { pid: 7 }] {
            let ready = only(&status("n", &phase, false, 0), "Ready");
            assert_eq!(
                (ready.status.as_str(), ready.reason.as_str()),
                ("False", "Starting")
            );
        }
        let ready = only(&status("n", &Phase::Provisioning, false, 0), "Ready");
        assert!(ready.message.contains("Provisioning"));
    }

    #[test]
    fn stopped_is_suspended_and_running_is_ready() {
        let stopped = status("n", &Phase::Stopped, false, 0);
        assert_eq!(only(&stopped, "Suspended").status, "True");
        let running = only(&status("n", &Phase::Running { pid: 1 }, false, 0), "Ready");
        assert_eq!(
            (running.status.as_str(), running.reason.as_str()),
            ("True", "Running")
        );
        let deleting = status("n", &Phase::Running { pid: 1 }, true, 0);
        assert!(deleting.deleting);
        assert_eq!(only(&deleting, "Ready").reason, "Deleting");
    }

    #[test]
    fn terminal_phases_round_trip_through_tombstones() {
        for phase in [
            Phase::Exited {
                code: Some(3),
                message: "guest exited with code 3".into(),
            },
            Phase::BootFailed {
                message: "no boot".into(),
            },
            Phase::ProvisioningFailed {
                message: "umoci failed".into(),
            },
        ] {
            let tomb = phase.tombstone(9).unwrap();
            assert_eq!(Phase::from_tombstone(&tomb), phase);
            let ready = only(&status("n", &phase, false, 0), "Ready");
            assert_eq!(ready.reason, tomb.reason);
        }
        assert!(Phase::Stopped.tombstone(0).is_none());
        assert!(Phase::Running { pid: 1 }.tombstone(0).is_none());
    }
}
