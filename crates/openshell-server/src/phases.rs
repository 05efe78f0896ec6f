//! Public phase derivation.
//!
//! Drivers report raw conditions; the gateway derives the public phase from
//! them and from its own persisted intent (Stopping, Stopped, Starting,
//! Deleting). A driver's `Ready=True` is public Ready (there are no
//! supervisor sessions in this gateway).

use openshell_proto::compute::v1::DriverSandboxStatus;
use openshell_proto::gateway::v1::{Condition, SandboxPhase};

/// `Ready=False` reasons that mean "not yet", not "failed". Compared
/// case-insensitively; every other reason is terminal.
const TRANSIENT_REASONS: &[&str] = &[
    "reconcilererror",
    "dependenciesnotready",
    "supervisornotconnected",
    "starting",
    "pulling",
    "containerstarting",
    "containercreated",
    "healthcheckstarting",
    "inspectfailed",
];

/// Phase implied by a driver's status alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendPhase {
    Unknown,
    Provisioning,
    Ready,
    Stopped,
    Deleting,
    Error,
}

/// Derives the backend phase from a driver status:
/// no status ⇒ Unknown; `deleting` ⇒ Deleting; `Suspended=True` ⇒ Stopped;
/// else the first `Ready` condition: True ⇒ Ready, False with a terminal
/// reason ⇒ Error, otherwise Provisioning.
pub fn backend_phase(status: Option<&DriverSandboxStatus>) -> BackendPhase {
    let Some(status) = status else {
        return BackendPhase::Unknown;
    };
    if status.deleting {
        return BackendPhase::Deleting;
    }
    if status.conditions.iter().any(|c| {
        c.r#type.eq_ignore_ascii_case("Suspended") && c.status.eq_ignore_ascii_case("true")
    }) {
        return BackendPhase::Stopped;
    }
    let Some(ready) = status.conditions.iter().find(|c| c.r#type == "Ready") else {
        return BackendPhase::Provisioning;
    };
    if ready.status.eq_ignore_ascii_case("true") {
        BackendPhase::Ready
    } else if ready.status.eq_ignore_ascii_case("false") {
        let reason = ready.reason.to_ascii_lowercase();
        if TRANSIENT_REASONS.contains(&reason.as_str()) {
            BackendPhase::Provisioning
        } else {
            BackendPhase::Error
        }
    } else {
        BackendPhase::Provisioning
    }
}

/// A status that says the workload has stopped (`ContainerExited` or
/// `ContainerStopped` on a False condition).
fn confirms_stopped(status: &DriverSandboxStatus) -> bool {
    status.conditions.iter().any(|c| {
        c.status.eq_ignore_ascii_case("false")
            && (c.reason.eq_ignore_ascii_case("ContainerExited")
                || c.reason.eq_ignore_ascii_case("ContainerStopped"))
    })
}

fn public(backend: BackendPhase) -> SandboxPhase {
    match backend {
        BackendPhase::Unknown => SandboxPhase::Unknown,
        BackendPhase::Provisioning => SandboxPhase::Provisioning,
        BackendPhase::Ready => SandboxPhase::Ready,
        BackendPhase::Stopped => SandboxPhase::Stopped,
        BackendPhase::Deleting => SandboxPhase::Deleting,
        BackendPhase::Error => SandboxPhase::Error,
    }
}

/// The phase after a driver snapshot, given the persisted phase.
///
/// | persisted | snapshot | result |
/// |---|---|---|
/// | Deleting, Error | any | unchanged |
/// | any | no status | unchanged |
/// | Stopping | Stopped, or stop confirmed | Stopped |
/// | Stopping | Error | Error |
/// | Stopping | other | Stopping |
/// | Stopped | any | Stopped |
/// | Starting | Ready or Error | that |
/// | Starting | other | Starting |
/// | other | any | the backend phase |
pub fn next_phase(current: SandboxPhase, status: Option<&DriverSandboxStatus>) -> SandboxPhase {
    if matches!(current, SandboxPhase::Deleting | SandboxPhase::Error) {
        return current;
    }
    let Some(status) = status else {
        return current;
    };
    let composed = public(backend_phase(Some(status)));
    match current {
        SandboxPhase::Stopping => {
            if composed == SandboxPhase::Stopped || confirms_stopped(status) {
                SandboxPhase::Stopped
            } else if composed == SandboxPhase::Error {
                SandboxPhase::Error
            } else {
                SandboxPhase::Stopping
            }
        }
        SandboxPhase::Stopped => SandboxPhase::Stopped,
        SandboxPhase::Starting => {
            if matches!(composed, SandboxPhase::Ready | SandboxPhase::Error) {
                composed
            } else {
                SandboxPhase::Starting
            }
        }
        _ => composed,
    }
}

/// The phase a row converges to when reconcile finds it out of step with
/// its driver's list: the phase the driver's status implies, whatever the
/// gateway last recorded (a start that timed out but happened late, a stop
/// the gateway missed, a failed create the driver did make). Deleting is
/// not converged (the gateway re-drives the delete instead), and a status
/// that implies nothing leaves the row as it is.
pub fn converged_phase(current: SandboxPhase, status: &DriverSandboxStatus) -> SandboxPhase {
    if current == SandboxPhase::Deleting {
        return current;
    }
    match backend_phase(Some(status)) {
        BackendPhase::Unknown => current,
        BackendPhase::Deleting => SandboxPhase::Deleting,
        backend => {
            if current == SandboxPhase::Stopping && confirms_stopped(status) {
                SandboxPhase::Stopped
            } else {
                public(backend)
            }
        }
    }
}

/// Phases with running intent: the gateway starts these at startup and
/// stops them at shutdown for drivers with `gateway_manages_lifecycle`.
pub fn has_running_intent(phase: SandboxPhase) -> bool {
    matches!(
        phase,
        SandboxPhase::Unspecified
            | SandboxPhase::Provisioning
            | SandboxPhase::Ready
            | SandboxPhase::Unknown
            | SandboxPhase::Starting
    )
}

/// The `Ready` condition the gateway shows instead of the driver's while it
/// is in one of its own transitions.
pub fn intent_condition(phase: SandboxPhase, now_ms: i64) -> Option<Condition> {
    let (reason, message) = match phase {
        SandboxPhase::Stopping => ("Stopping", "Sandbox stop requested"),
        SandboxPhase::Stopped => ("Stopped", "Sandbox compute is stopped"),
        SandboxPhase::Starting => ("Starting", "Sandbox start requested"),
        SandboxPhase::Deleting => ("Deleting", "Sandbox deletion requested"),
        _ => return None,
    };
    Some(ready_false(reason, message, now_ms))
}

/// A `Ready=False` condition written by the gateway; `now_ms` (milliseconds
/// since the Unix epoch) becomes an RFC 3339 `last_transition_time`.
pub fn ready_false(reason: &str, message: &str, now_ms: i64) -> Condition {
    Condition {
        r#type: "Ready".to_owned(),
        status: "False".to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        last_transition_time: openshell_wire::time::rfc3339_millis(now_ms),
    }
}

/// Stored names of phases (the database keeps text, readable with sqlite3).
pub fn phase_name(phase: SandboxPhase) -> &'static str {
    match phase {
        SandboxPhase::Unspecified => "unspecified",
        SandboxPhase::Provisioning => "provisioning",
        SandboxPhase::Ready => "ready",
        SandboxPhase::Error => "error",
        SandboxPhase::Deleting => "deleting",
        SandboxPhase::Unknown => "unknown",
        SandboxPhase::Stopping => "stopping",
        SandboxPhase::Stopped => "stopped",
        SandboxPhase::Starting => "starting",
    }
}

/// Inverse of [`phase_name`].
pub fn phase_from_name(name: &str) -> Option<SandboxPhase> {
    [
        SandboxPhase::Unspecified,
        SandboxPhase::Provisioning,
        SandboxPhase::Ready,
        SandboxPhase::Error,
        SandboxPhase::Deleting,
        SandboxPhase::Unknown,
        SandboxPhase::Stopping,
        SandboxPhase::Stopped,
        SandboxPhase::Starting,
    ]
    .into_iter()
    .find(|p| phase_name(*p) == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconcile_converges_every_phase_to_the_driver() {
        use openshell_proto::compute::v1::DriverCondition;
        let status = |kind: &str, value: &str, reason: &str| DriverSandboxStatus {
            conditions: vec![DriverCondition {
                r#type: kind.into(),
                status: value.into(),
                reason: reason.into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let ready = status("Ready", "True", "");
        let suspended = status("Suspended", "True", "");
        for current in [
            SandboxPhase::Stopped,
            SandboxPhase::Stopping,
            SandboxPhase::Starting,
            SandboxPhase::Error,
            SandboxPhase::Provisioning,
            SandboxPhase::Unknown,
        ] {
            assert_eq!(
                converged_phase(current, &ready),
                SandboxPhase::Ready,
                "{current:?}"
            );
            assert_eq!(
                converged_phase(current, &suspended),
                SandboxPhase::Stopped,
                "{current:?}"
            );
        }
        assert_eq!(
            converged_phase(SandboxPhase::Deleting, &ready),
            SandboxPhase::Deleting
        );
        assert_eq!(
            converged_phase(SandboxPhase::Stopped, &DriverSandboxStatus::default()),
            SandboxPhase::Provisioning,
            "no conditions yet: the driver is making it"
        );
    }
    use SandboxPhase as P;
    use openshell_proto::compute::v1::DriverCondition;

    fn cond(kind: &str, status: &str, reason: &str) -> DriverCondition {
        DriverCondition {
            r#type: kind.into(),
            status: status.into(),
            reason: reason.into(),
            ..Default::default()
        }
    }

    fn status(conditions: Vec<DriverCondition>) -> DriverSandboxStatus {
        DriverSandboxStatus {
            conditions,
            ..Default::default()
        }
    }

    #[test]
    fn backend_phases() {
        use BackendPhase as B;
        let cases: Vec<(Option<DriverSandboxStatus>, BackendPhase)> = vec![
            (None, B::Unknown),
            (Some(status(vec![])), B::Provisioning),
            (
                Some(DriverSandboxStatus {
                    deleting: true,
                    conditions: vec![cond("Ready", "True", "")],
                    ..Default::default()
                }),
                B::Deleting,
            ),
            (
                Some(status(vec![
                    cond("suspended", "TRUE", "x"),
                    cond("Ready", "True", ""),
                ])),
                B::Stopped,
            ),
            (
                Some(status(vec![
                    cond("Suspended", "False", "x"),
                    cond("Ready", "True", ""),
                ])),
                B::Ready,
            ),
            (Some(status(vec![cond("Ready", "true", "")])), B::Ready),
            (
                Some(status(vec![cond("Ready", "False", "Starting")])),
                B::Provisioning,
            ),
            (
                Some(status(vec![cond("Ready", "False", "CONTAINERCREATED")])),
                B::Provisioning,
            ),
            (
                Some(status(vec![cond("Ready", "False", "ImagePullBackOff")])),
                B::Error,
            ),
            (Some(status(vec![cond("Ready", "False", "")])), B::Error),
            (
                Some(status(vec![cond("Ready", "Unknown", "x")])),
                B::Provisioning,
            ),
            // Only the exact type "Ready" counts, and only the first one.
            (
                Some(status(vec![cond("ready", "True", "")])),
                B::Provisioning,
            ),
            (
                Some(status(vec![
                    cond("Ready", "False", "Starting"),
                    cond("Ready", "True", ""),
                ])),
                B::Provisioning,
            ),
        ];
        for (input, want) in cases {
            assert_eq!(backend_phase(input.as_ref()), want, "{input:?}");
        }
    }

    #[test]
    fn overlay_table() {
        let ready = status(vec![cond("Ready", "True", "Running")]);
        let provisioning = status(vec![cond("Ready", "False", "Starting")]);
        let stopped = status(vec![
            cond("Ready", "False", "ContainerStopped"),
            cond("Suspended", "True", "Stopped"),
        ]);
        let exited = status(vec![cond("Ready", "False", "ContainerExited")]);
        let failed = status(vec![cond("Ready", "False", "ImagePullFailed")]);
        let cases = [
            (P::Provisioning, Some(&ready), P::Ready),
            (P::Provisioning, Some(&provisioning), P::Provisioning),
            (P::Provisioning, None, P::Provisioning),
            (P::Ready, Some(&failed), P::Error),
            (P::Ready, Some(&stopped), P::Stopped),
            (P::Unknown, Some(&ready), P::Ready),
            (P::Unspecified, Some(&provisioning), P::Provisioning),
            (P::Deleting, Some(&ready), P::Deleting),
            (P::Error, Some(&ready), P::Error),
            (P::Stopping, Some(&ready), P::Stopping),
            (P::Stopping, Some(&stopped), P::Stopped),
            (P::Stopping, Some(&exited), P::Stopped),
            (P::Stopping, Some(&failed), P::Error),
            (P::Stopped, Some(&ready), P::Stopped),
            (P::Stopped, Some(&failed), P::Stopped),
            (P::Starting, Some(&stopped), P::Starting),
            (P::Starting, Some(&provisioning), P::Starting),
            (P::Starting, Some(&ready), P::Ready),
            (P::Starting, Some(&failed), P::Error),
        ];
        for (current, snapshot, want) in cases {
            assert_eq!(
                next_phase(current, snapshot),
                want,
                "{current:?} + {snapshot:?}"
            );
        }
    }

    #[test]
    fn names_round_trip() {
        for value in 0..=8 {
            let phase = P::try_from(value).unwrap();
            assert_eq!(phase_from_name(phase_name(phase)), Some(phase));
        }
        assert_eq!(phase_from_name("nope"), None);
    }

    #[test]
    fn running_intent() {
        assert!(has_running_intent(P::Ready));
        assert!(has_running_intent(P::Unspecified));
        assert!(has_running_intent(P::Starting));
        assert!(!has_running_intent(P::Stopped));
        assert!(!has_running_intent(P::Stopping));
        assert!(!has_running_intent(P::Error));
        assert!(!has_running_intent(P::Deleting));
    }
}
