//! Translation between the public model and the driver contract.

use openshell_proto::compute::v1::{
    DriverResourceRequirements, DriverSandbox, DriverSandboxSpec, DriverSandboxStatus,
    DriverSandboxTemplate,
};
use openshell_proto::gateway::v1 as gw;

use crate::state::store::SandboxRow;

/// The longest condition message the public API shows: a driver's (or an
/// error's) text can quote a request back at length.
pub const MAX_CONDITION_MESSAGE: usize = 2048;

/// The workspace every sandbox of this gateway belongs to. The public API
/// has no workspaces; drivers that scope resources by workspace see this one.
pub const WORKSPACE: &str = "default";

/// The sandbox as a driver receives it on validate and create:
/// namespace empty, env as `spec.environment`, image, labels and typed
/// resources in the template, argv and tty as given.
pub fn driver_sandbox(row: &SandboxRow) -> DriverSandbox {
    let spec = &row.spec;
    let resources = spec.resources.as_ref().and_then(|r| {
        let typed = DriverResourceRequirements {
            cpu_request: r.cpu_request.clone(),
            cpu_limit: r.cpu_limit.clone(),
            memory_request: r.memory_request.clone(),
            memory_limit: r.memory_limit.clone(),
        };
        (typed != DriverResourceRequirements::default()).then_some(typed)
    });
    DriverSandbox {
        id: row.id.clone(),
        name: row.name.clone(),
        namespace: String::new(),
        spec: Some(DriverSandboxSpec {
            log_level: String::new(),
            environment: spec.env.clone(),
            template: Some(DriverSandboxTemplate {
                image: spec.image.clone(),
                labels: row
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                resources,
                ..Default::default()
            }),
            command: spec.command.clone(),
            tty: spec.tty,
            ..Default::default()
        }),
        status: Some(DriverSandboxStatus {
            sandbox_name: row.name.clone(),
            ..Default::default()
        }),
        workspace: WORKSPACE.to_owned(),
    }
}

fn condition(c: &openshell_proto::compute::v1::DriverCondition) -> gw::Condition {
    gw::Condition {
        r#type: c.r#type.clone(),
        status: c.status.clone(),
        reason: c.reason.clone(),
        message: openshell_driver_kit::contract::truncate(&c.message, MAX_CONDITION_MESSAGE),
        last_transition_time: transition_time(&c.last_transition_time),
    }
}

/// A condition time in the one wire format. Rows stored by earlier
/// gateways (and older drivers) carry epoch milliseconds as text; those are
/// rewritten as RFC 3339 so the public API never shows epoch text.
pub fn transition_time(text: &str) -> String {
    match text.trim().parse::<i64>() {
        Ok(ms) => openshell_wire::time::rfc3339_millis(ms),
        Err(_) => text.to_owned(),
    }
}

/// The public view of a row. `extra` is a condition the gateway adds at read
/// time (a driver that is down or not configured).
pub fn public_sandbox(row: &SandboxRow, extra: Option<gw::Condition>) -> gw::Sandbox {
    let mut conditions: Vec<gw::Condition> = row
        .observed
        .as_ref()
        .map(|s| s.conditions.iter().map(condition).collect())
        .unwrap_or_default();
    if let Some(own) = &row.gateway_condition {
        let own = gw::Condition {
            last_transition_time: transition_time(&own.last_transition_time),
            message: openshell_driver_kit::contract::truncate(&own.message, MAX_CONDITION_MESSAGE),
            ..own.clone()
        };
        match conditions.iter_mut().find(|c| c.r#type == own.r#type) {
            Some(slot) => *slot = own,
            None => conditions.insert(0, own),
        }
    }
    conditions.extend(extra);
    gw::Sandbox {
        id: row.id.clone(),
        name: row.name.clone(),
        driver: row.driver.clone(),
        spec: Some(row.spec.clone()),
        labels: row
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        phase: row.phase.into(),
        conditions,
        instance_id: row.instance_id.clone(),
        resource_version: row.resource_version,
        created_at_ms: row.created_at_ms,
        updated_at_ms: row.updated_at_ms,
    }
}

/// Public log chunk from a driver's.
pub fn log_chunk(chunk: openshell_proto::compute::logs::v1::LogChunk) -> gw::LogChunk {
    // The two LogStream enums share their numbers.
    gw::LogChunk {
        data: chunk.data,
        stream: chunk.stream,
        timestamp_ms: chunk.timestamp_ms,
    }
}

/// Public platform event from a driver's.
pub fn platform_event(
    sandbox_id: &str,
    sandbox_name: &str,
    event: openshell_proto::compute::v1::DriverPlatformEvent,
) -> gw::PlatformEvent {
    gw::PlatformEvent {
        sandbox_id: sandbox_id.to_owned(),
        sandbox_name: sandbox_name.to_owned(),
        timestamp_ms: event.timestamp_ms,
        source: event.source,
        r#type: event.r#type,
        reason: event.reason,
        message: event.message,
        metadata: event.metadata,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openshell_proto::compute::v1::DriverCondition;
    use openshell_proto::gateway::v1::SandboxPhase;
    use std::collections::BTreeMap;

    fn row() -> SandboxRow {
        SandboxRow {
            id: "0b7c".into(),
            name: "dev".into(),
            driver: "vm".into(),
            spec: gw::SandboxSpec {
                image: "busybox".into(),
                command: vec!["sh".into(), "-c".into(), "echo hi".into()],
                env: [("A".to_owned(), "1".to_owned())].into_iter().collect(),
                tty: true,
                resources: Some(gw::Resources {
                    cpu_limit: "2".into(),
                    ..Default::default()
                }),
            },
            labels: BTreeMap::from([("team".to_owned(), "infra".to_owned())]),
            phase: SandboxPhase::Ready,
            observed: None,
            gateway_condition: None,
            instance_id: "i-1".into(),
            resource_version: 4,
            created_at_ms: 10,
            updated_at_ms: 20,
        }
    }

    #[test]
    fn driver_view() {
        let sandbox = driver_sandbox(&row());
        assert_eq!(sandbox.id, "0b7c");
        assert_eq!(sandbox.namespace, "");
        assert_eq!(sandbox.workspace, WORKSPACE);
        let spec = sandbox.spec.unwrap();
        assert_eq!(spec.command, ["sh", "-c", "echo hi"]);
        assert!(spec.tty);
        assert_eq!(spec.environment["A"], "1");
        let template = spec.template.unwrap();
        assert_eq!(template.image, "busybox");
        assert_eq!(template.labels["team"], "infra");
        assert_eq!(template.resources.unwrap().cpu_limit, "2");
        assert!(template.platform_config.is_none());
        assert_eq!(sandbox.status.unwrap().sandbox_name, "dev");

        let mut bare = row();
        bare.spec.resources = Some(gw::Resources::default());
        let template = driver_sandbox(&bare).spec.unwrap().template.unwrap();
        assert!(
            template.resources.is_none(),
            "all-empty resources are omitted"
        );
    }

    #[test]
    fn public_view_overlays_the_gateway_condition() {
        let mut r = row();
        r.observed = Some(DriverSandboxStatus {
            conditions: vec![
                DriverCondition {
                    r#type: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                },
                DriverCondition {
                    r#type: "Disk".into(),
                    status: "True".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        });
        r.gateway_condition = Some(crate::phases::ready_false("Stopping", "stop requested", 5));
        let extra = gw::Condition {
            r#type: "DriverAvailable".into(),
            status: "False".into(),
            ..Default::default()
        };
        let public = public_sandbox(&r, Some(extra));
        let kinds: Vec<(&str, &str)> = public
            .conditions
            .iter()
            .map(|c| (c.r#type.as_str(), c.status.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("Ready", "False"),
                ("Disk", "True"),
                ("DriverAvailable", "False")
            ]
        );
        assert_eq!(public.conditions[0].reason, "Stopping");
        assert_eq!(
            public.conditions[0].last_transition_time,
            "1970-01-01T00:00:00.005Z"
        );
        assert_eq!(public.phase, SandboxPhase::Ready as i32);
        assert_eq!(public.resource_version, 4);
    }

    #[test]
    fn condition_times_are_rfc3339() {
        // What an earlier gateway stored, and what a driver may still send.
        assert_eq!(transition_time("1764873600123"), "2025-12-04T18:40:00.123Z");
        assert_eq!(
            transition_time("2026-12-04T18:29:19.123Z"),
            "2026-12-04T18:29:19.123Z"
        );
        assert_eq!(transition_time(""), "");
        let mut r = row();
        r.gateway_condition = Some(gw::Condition {
            r#type: "Ready".into(),
            status: "False".into(),
            last_transition_time: "1764873600123".into(),
            ..Default::default()
        });
        let public = public_sandbox(&r, None);
        let time = &public.conditions[0].last_transition_time;
        assert!(
            openshell_wire::time::parse_rfc3339(time).is_some(),
            "{time} is not RFC 3339"
        );
    }
}
