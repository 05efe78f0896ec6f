//! Turning gateway messages into text for people and JSON for scripts.

use std::collections::{BTreeMap, HashMap};

use openshell_proto::gateway::v1::{
    Condition, DriverInfo, DriverState, GatewayInfo, PlatformEvent, Sandbox, SandboxPhase,
};
use serde_json::{Value, json};

/// Human name of a phase: `Ready`, `Provisioning`, ...
pub fn phase_name(phase: i32) -> &'static str {
    match SandboxPhase::try_from(phase).unwrap_or(SandboxPhase::Unspecified) {
        SandboxPhase::Unspecified => "Unspecified",
        SandboxPhase::Provisioning => "Provisioning",
        SandboxPhase::Ready => "Ready",
        SandboxPhase::Error => "Error",
        SandboxPhase::Deleting => "Deleting",
        SandboxPhase::Unknown => "Unknown",
        SandboxPhase::Stopping => "Stopping",
        SandboxPhase::Stopped => "Stopped",
        SandboxPhase::Starting => "Starting",
    }
}

/// Parses a phase name as typed on the command line (any case).
pub fn parse_phase(text: &str) -> Result<SandboxPhase, String> {
    let all = [
        SandboxPhase::Provisioning,
        SandboxPhase::Ready,
        SandboxPhase::Error,
        SandboxPhase::Deleting,
        SandboxPhase::Unknown,
        SandboxPhase::Stopping,
        SandboxPhase::Stopped,
        SandboxPhase::Starting,
    ];
    all.into_iter()
        .find(|p| phase_name(*p as i32).eq_ignore_ascii_case(text))
        .ok_or_else(|| {
            let names: Vec<&str> = all.iter().map(|p| phase_name(*p as i32)).collect();
            format!("unknown phase '{text}'; one of: {}", names.join(", "))
        })
}

pub fn driver_state_name(state: i32) -> &'static str {
    match DriverState::try_from(state).unwrap_or(DriverState::Unspecified) {
        DriverState::Unspecified => "Unknown",
        DriverState::Starting => "Starting",
        DriverState::Ready => "Ready",
        DriverState::Restarting => "Restarting",
        DriverState::Unavailable => "Unavailable",
        DriverState::Failed => "Failed",
    }
}

/// The condition that best explains a sandbox's state: the `Ready`
/// condition when it is not true, else nothing.
pub fn explaining_condition(sandbox: &Sandbox) -> Option<&Condition> {
    sandbox
        .conditions
        .iter()
        .find(|c| c.r#type == "Ready" && !c.status.eq_ignore_ascii_case("true"))
        .or_else(|| {
            sandbox.conditions.iter().find(|c| {
                c.r#type != "Ready"
                    && !c.reason.is_empty()
                    && c.status.eq_ignore_ascii_case("false")
            })
        })
}

/// `Reason: message`, or just one of them.
pub fn condition_summary(condition: &Condition) -> String {
    match (condition.reason.is_empty(), condition.message.is_empty()) {
        (false, false) => format!("{}: {}", condition.reason, condition.message),
        (false, true) => condition.reason.clone(),
        (true, false) => condition.message.clone(),
        (true, true) => String::new(),
    }
}

pub use openshell_wire::time::now_millis as now_ms;

/// Compact age: `45s`, `12m`, `3h`, `5d`.
pub fn age(created_at_ms: i64, now_ms: i64) -> String {
    if created_at_ms <= 0 {
        return "-".to_owned();
    }
    let secs = (now_ms - created_at_ms).max(0) / 1000;
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// Milliseconds since the epoch in the wire's one timestamp form
/// (RFC 3339, UTC).
pub fn timestamp(ms: i64) -> String {
    openshell_wire::time::rfc3339_millis(ms)
}

/// Left-aligned columns separated by three spaces; the last column is not
/// padded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let cells: Vec<&str> = cells.collect();
        let last = cells.len().saturating_sub(1);
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            text.push_str(cell);
            if i < last {
                text.extend(std::iter::repeat_n(' ', width - cell.chars().count() + 3));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

fn sorted(map: &HashMap<String, String>) -> BTreeMap<&str, &str> {
    map.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

fn condition_json(c: &Condition) -> Value {
    json!({
        "type": c.r#type,
        "status": c.status,
        "reason": c.reason,
        "message": c.message,
        "last_transition_time": c.last_transition_time,
    })
}

pub fn sandbox_json(sandbox: &Sandbox) -> Value {
    let spec = sandbox.spec.clone().unwrap_or_default();
    let resources = spec.resources.unwrap_or_default();
    json!({
        "id": sandbox.id,
        "name": sandbox.name,
        "driver": sandbox.driver,
        "phase": phase_name(sandbox.phase),
        "image": spec.image,
        "command": spec.command,
        "env": sorted(&spec.env),
        "tty": spec.tty,
        "resources": {
            "cpu_request": resources.cpu_request,
            "cpu_limit": resources.cpu_limit,
            "memory_request": resources.memory_request,
            "memory_limit": resources.memory_limit,
        },
        "labels": sorted(&sandbox.labels),
        "conditions": sandbox.conditions.iter().map(condition_json).collect::<Vec<_>>(),
        "instance_id": sandbox.instance_id,
        "resource_version": sandbox.resource_version,
        "created_at_ms": sandbox.created_at_ms,
        "updated_at_ms": sandbox.updated_at_ms,
    })
}

pub fn platform_event_json(event: &PlatformEvent) -> Value {
    json!({
        "sandbox_id": event.sandbox_id,
        "sandbox_name": event.sandbox_name,
        "timestamp_ms": event.timestamp_ms,
        "source": event.source,
        "type": event.r#type,
        "reason": event.reason,
        "message": event.message,
        "metadata": sorted(&event.metadata),
    })
}

fn driver_json(driver: &DriverInfo) -> Value {
    let caps = driver.capabilities.clone().unwrap_or_default();
    json!({
        "name": driver.name,
        "managed": driver.managed,
        "socket": driver.socket,
        "state": driver_state_name(driver.state),
        "state_message": driver.state_message,
        "pid": driver.pid,
        "restarts": driver.restarts,
        "default": driver.is_default,
        "capabilities": {
            "driver_name": caps.driver_name,
            "driver_version": caps.driver_version,
            "default_image": caps.default_image,
            "gateway_manages_lifecycle": caps.gateway_manages_lifecycle,
            "logs": caps.logs,
            "contract": caps.contract,
            "implementation": caps.implementation,
            "extension_capabilities": caps.extension_capabilities,
            "admission_policy": caps.admission_policy,
            "reports_runtime_readiness": caps.reports_runtime_readiness,
        },
    })
}

pub fn gateway_info_json(info: &GatewayInfo) -> Value {
    json!({
        "version": info.version,
        "listen": info.listen,
        "drivers": info.drivers.iter().map(driver_json).collect::<Vec<_>>(),
    })
}

pub fn gateway_info_text(info: &GatewayInfo) -> String {
    let mut out = format!(
        "Gateway:   {}\nListening: {}\n\n",
        info.version, info.listen
    );
    let rows: Vec<Vec<String>> = info
        .drivers
        .iter()
        .map(|d| {
            let caps = d.capabilities.clone().unwrap_or_default();
            let mut state = driver_state_name(d.state).to_owned();
            if !d.state_message.is_empty() {
                state.push_str(&format!(" ({})", d.state_message));
            }
            vec![
                format!("{}{}", d.name, if d.is_default { " *" } else { "" }),
                if d.managed { "managed" } else { "attached" }.to_owned(),
                state,
                if d.pid == 0 {
                    "-".to_owned()
                } else {
                    d.pid.to_string()
                },
                d.restarts.to_string(),
                format!("{} {}", caps.driver_name, caps.driver_version)
                    .trim()
                    .to_owned(),
                if caps.contract.is_empty() {
                    "-".to_owned()
                } else {
                    caps.contract.clone()
                },
                d.socket.clone(),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "DRIVER",
            "KIND",
            "STATE",
            "PID",
            "RESTARTS",
            "REPORTS AS",
            "CONTRACT",
            "SOCKET",
        ],
        &rows,
    ));
    if info.drivers.iter().any(|d| d.is_default) {
        out.push_str("\n* default driver for sandboxes created without --driver\n");
    }
    for driver in &info.drivers {
        let caps = driver.capabilities.clone().unwrap_or_default();
        if caps.implementation.is_empty() {
            continue;
        }
        out.push_str(&format!(
            "\n{}: contract {}, {}\n  capabilities: {}\n  admission policy: {}\n",
            driver.name,
            caps.contract,
            caps.implementation,
            caps.extension_capabilities.join(", "),
            if caps.admission_policy.is_empty() {
                "(none)"
            } else {
                caps.admission_policy.as_str()
            },
        ));
        if !caps.reports_runtime_readiness {
            out.push_str(
                "  readiness: left to a supervisor session (not available in this gateway)\n",
            );
        }
    }
    out
}

pub fn sandbox_rows(sandboxes: &[Sandbox], now: i64) -> String {
    let rows: Vec<Vec<String>> = sandboxes
        .iter()
        .map(|s| {
            let image = s
                .spec
                .as_ref()
                .map(|spec| spec.image.clone())
                .unwrap_or_default();
            vec![
                s.name.clone(),
                s.driver.clone(),
                phase_name(s.phase).to_owned(),
                if image.is_empty() {
                    "-".to_owned()
                } else {
                    image
                },
                age(s.created_at_ms, now),
                explaining_condition(s)
                    .map(condition_summary)
                    .unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &["NAME", "DRIVER", "PHASE", "IMAGE", "AGE", "STATUS"],
        &rows,
    )
}

pub fn sandbox_text(sandbox: &Sandbox) -> String {
    let spec = sandbox.spec.clone().unwrap_or_default();
    let mut out = String::new();
    let mut field = |name: &str, value: String| {
        if !value.is_empty() {
            out.push_str(&format!("{name:<12} {value}\n"));
        }
    };
    field("Name:", sandbox.name.clone());
    field("Id:", sandbox.id.clone());
    field("Driver:", sandbox.driver.clone());
    field("Phase:", phase_name(sandbox.phase).to_owned());
    field("Image:", spec.image.clone());
    if !spec.command.is_empty() {
        field(
            "Command:",
            serde_json::to_string(&spec.command).unwrap_or_default(),
        );
    }
    field(
        "TTY:",
        if spec.tty {
            "yes".to_owned()
        } else {
            String::new()
        },
    );
    let env = sorted(&spec.env);
    field(
        "Env:",
        env.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" "),
    );
    let labels = sorted(&sandbox.labels);
    field(
        "Labels:",
        labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" "),
    );
    field("Instance:", sandbox.instance_id.clone());
    if sandbox.created_at_ms > 0 {
        field("Created:", timestamp(sandbox.created_at_ms));
    }
    if !sandbox.conditions.is_empty() {
        out.push_str("Conditions:\n");
        let rows: Vec<Vec<String>> = sandbox
            .conditions
            .iter()
            .map(|c| {
                vec![
                    c.r#type.clone(),
                    c.status.clone(),
                    c.reason.clone(),
                    c.message.clone(),
                ]
            })
            .collect();
        for line in table(&["TYPE", "STATUS", "REASON", "MESSAGE"], &rows).lines() {
            out.push_str("  ");
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            timestamp(1_795_392_000_000 + 3_723_000),
            "2026-11-23T01:02:03.000Z"
        );
    }

    #[test]
    fn ages_are_compact() {
        let now = 10_000_000_000;
        assert_eq!(age(now - 5_000, now), "5s");
        assert_eq!(age(now - 600_000, now), "10m");
        assert_eq!(age(now - 3 * 3_600_000, now), "3h");
        assert_eq!(age(now - 3 * 86_400_000, now), "3d");
        assert_eq!(age(0, now), "-");
    }

    #[test]
    fn phases_round_trip_through_their_names() {
        for phase in ["ready", "Stopped", "PROVISIONING"] {
            let parsed = parse_phase(phase).unwrap();
            assert!(phase_name(parsed as i32).eq_ignore_ascii_case(phase));
        }
        let err = parse_phase("running").unwrap_err();
        assert!(err.contains("one of: Provisioning, Ready"), "{err}");
    }

    #[test]
    fn table_aligns_columns() {
        let text = table(
            &["A", "LONGER"],
            &[
                vec!["xyz".into(), "1".into()],
                vec!["q".into(), "22".into()],
            ],
        );
        assert_eq!(text, "A     LONGER\nxyz   1\nq     22\n");
    }

    #[test]
    fn the_failing_ready_condition_explains_the_state() {
        let sandbox = Sandbox {
            conditions: vec![
                Condition {
                    r#type: "Ready".into(),
                    status: "False".into(),
                    reason: "ContainerExited".into(),
                    message: "exited with code 3".into(),
                    ..Default::default()
                },
                Condition {
                    r#type: "Suspended".into(),
                    status: "True".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let summary = explaining_condition(&sandbox).map(condition_summary);
        assert_eq!(
            summary.as_deref(),
            Some("ContainerExited: exited with code 3")
        );
    }

    #[test]
    fn sandbox_json_has_stable_keys() {
        let sandbox = Sandbox {
            name: "web".into(),
            phase: SandboxPhase::Ready as i32,
            ..Default::default()
        };
        let value = sandbox_json(&sandbox);
        assert_eq!(value["name"], "web");
        assert_eq!(value["phase"], "Ready");
        assert!(value["conditions"].as_array().unwrap().is_empty());
    }
}
