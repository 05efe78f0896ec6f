//! The rules of the compute-driver contract that both peers apply: which
//! generation a peer speaks, 1.x extension negotiation, the admission-policy
//! string, and conditions and platform events stamped in both time
//! encodings. Gateways and drivers use the same code, so they agree.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{SystemTime, UNIX_EPOCH};

use openshell_proto::compute::v1::{
    CpuResourceCapabilities, DriverCondition, DriverPlatformEvent, GetCapabilitiesResponse,
    GpuResourceCapabilities, MemoryResourceCapabilities, ResourceCapabilities,
};
use openshell_proto::extension::v1::{PeerMetadata, ProtocolVersion};
use serde::{Deserialize, Serialize};

/// The protocol version this code speaks.
pub const PROTOCOL_MAJOR: u32 = 1;
pub const PROTOCOL_MINOR: u32 = 0;

/// The capability every 1.x compute peer offers and requires.
pub const COMPUTE_CONTRACT: &str = "openshell.compute.contract";

/// Bounds on what a peer may send in its metadata.
const MAX_TEXT_BYTES: usize = 128;
const MAX_CAPABILITIES: usize = 128;

/// The contract generation a peer speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Generation {
    /// No negotiation metadata: the v0.0.111 contract.
    V0,
    /// Negotiated through `openshell.extension.v1.PeerMetadata`.
    V1,
}

impl Generation {
    pub fn label(self) -> &'static str {
        match self {
            Self::V0 => "v0.0.111",
            Self::V1 => "1.x",
        }
    }
}

/// What both peers agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The other peer's version.
    pub version: (u32, u32),
    pub implementation_name: String,
    pub implementation_version: String,
    /// Capabilities the other peer offers, sorted.
    pub capabilities: Vec<String>,
}

/// Why two peers cannot work together, worded for the operator who has to
/// fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NegotiationError {
    #[error(
        "{peer} sent no protocol metadata; it speaks only the v0.0.111 contract, upgrade it to a 1.x release"
    )]
    MissingMetadata { peer: String },
    #[error("{peer} sent protocol metadata without a protocol version")]
    MissingProtocolVersion { peer: String },
    #[error(
        "{peer} speaks protocol {theirs_major}.{theirs_minor}, this side speaks {ours_major}.{ours_minor}: major versions must match"
    )]
    IncompatibleProtocol {
        peer: String,
        theirs_major: u32,
        theirs_minor: u32,
        ours_major: u32,
        ours_minor: u32,
    },
    #[error("{peer} sent invalid protocol metadata: {reason}")]
    InvalidMetadata { peer: String, reason: String },
    #[error("{peer} lacks capabilities this side requires: {missing:?}")]
    MissingCapabilities { peer: String, missing: Vec<String> },
    #[error("{peer} requires capabilities this side does not offer: {missing:?}")]
    UnsupportedRequirements { peer: String, missing: Vec<String> },
}

/// This side's metadata: version 1.0, the compute contract offered and
/// required, plus `extra` offered capabilities.
pub fn peer_metadata(name: &str, version: &str, extra: &[&str]) -> PeerMetadata {
    let mut supported = vec![COMPUTE_CONTRACT.to_owned()];
    supported.extend(extra.iter().map(|c| (*c).to_owned()));
    PeerMetadata {
        protocol_version: Some(ProtocolVersion {
            major: PROTOCOL_MAJOR,
            minor: PROTOCOL_MINOR,
        }),
        implementation_name: name.to_owned(),
        implementation_version: version.to_owned(),
        supported_capabilities: supported,
        required_capabilities: vec![COMPUTE_CONTRACT.to_owned()],
    }
}

/// Checks `theirs` against `ours` by the 1.x rules: metadata present, same
/// major (any minor), well-formed names and capability strings, and each
/// side offering what the other requires. `peer` names the other side in
/// errors (e.g. "driver 'kyma'" or "the gateway").
pub fn negotiate(
    peer: &str,
    ours: &PeerMetadata,
    theirs: Option<&PeerMetadata>,
) -> Result<Negotiated, NegotiationError> {
    let peer = peer.to_owned();
    let Some(theirs) = theirs else {
        return Err(NegotiationError::MissingMetadata { peer });
    };
    let Some(their_version) = theirs.protocol_version else {
        return Err(NegotiationError::MissingProtocolVersion { peer });
    };
    let our_version = ours.protocol_version.unwrap_or(ProtocolVersion {
        major: PROTOCOL_MAJOR,
        minor: PROTOCOL_MINOR,
    });
    if their_version.major != our_version.major {
        return Err(NegotiationError::IncompatibleProtocol {
            peer,
            theirs_major: their_version.major,
            theirs_minor: their_version.minor,
            ours_major: our_version.major,
            ours_minor: our_version.minor,
        });
    }
    let invalid = |reason: String| NegotiationError::InvalidMetadata {
        peer: peer.clone(),
        reason,
    };
    check_text("implementation_name", &theirs.implementation_name).map_err(invalid)?;
    check_text("implementation_version", &theirs.implementation_version).map_err(invalid)?;
    check_capabilities("supported_capabilities", &theirs.supported_capabilities)
        .map_err(invalid)?;
    check_capabilities("required_capabilities", &theirs.required_capabilities).map_err(invalid)?;

    let their_supported: BTreeSet<&str> = theirs
        .supported_capabilities
        .iter()
        .map(String::as_str)
        .collect();
    let missing: Vec<String> = ours
        .required_capabilities
        .iter()
        .filter(|c| !their_supported.contains(c.as_str()))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(NegotiationError::MissingCapabilities { peer, missing });
    }
    let our_supported: BTreeSet<&str> = ours
        .supported_capabilities
        .iter()
        .map(String::as_str)
        .collect();
    let unsupported: Vec<String> = theirs
        .required_capabilities
        .iter()
        .filter(|c| !our_supported.contains(c.as_str()))
        .cloned()
        .collect();
    if !unsupported.is_empty() {
        return Err(NegotiationError::UnsupportedRequirements {
            peer,
            missing: unsupported,
        });
    }
    Ok(Negotiated {
        version: (their_version.major, their_version.minor),
        implementation_name: theirs.implementation_name.clone(),
        implementation_version: theirs.implementation_version.clone(),
        capabilities: their_supported.into_iter().map(str::to_owned).collect(),
    })
}

fn check_text(field: &str, value: &str) -> Result<(), String> {
    if value.trim().is_empty() {
        return Err(format!("{field} is blank"));
    }
    if value.len() > MAX_TEXT_BYTES {
        return Err(format!(
            "{field} is {} bytes, at most {MAX_TEXT_BYTES} are allowed",
            value.len()
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("{field} contains control characters"));
    }
    Ok(())
}

/// Whether `capability` is well formed: `openshell.` prefix, at least three
/// dot-separated non-empty segments of `[a-z0-9-]`, at most 128 bytes.
pub fn valid_capability(capability: &str) -> bool {
    let segments: Vec<&str> = capability.split('.').collect();
    capability.len() <= MAX_TEXT_BYTES
        && capability.starts_with("openshell.")
        && segments.len() >= 3
        && segments.iter().all(|s| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

fn check_capabilities(field: &str, list: &[String]) -> Result<(), String> {
    if list.len() > MAX_CAPABILITIES {
        return Err(format!(
            "{field} has {} entries, at most {MAX_CAPABILITIES} are allowed",
            list.len()
        ));
    }
    let mut seen = BTreeSet::new();
    for capability in list {
        if !valid_capability(capability) {
            return Err(format!(
                "{field} entry {:?} is not a capability string (openshell.<family>.<name>, lowercase [a-z0-9-] segments)",
                truncate(capability, 80)
            ));
        }
        if !seen.insert(capability) {
            return Err(format!("{field} lists {capability:?} twice"));
        }
    }
    Ok(())
}

/// `text` cut to at most `max` bytes on a character boundary, with an
/// ellipsis when cut: for echoing untrusted input in messages.
pub fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The admission policy a 1.x driver acknowledges in
/// `resource_admission_policy`: `"v1:"` and compact JSON of this struct, in
/// declaration order with sorted label keys.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdmissionPolicy {
    pub allow_driver_config: bool,
    pub resource_admission: ResourceAdmission,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResourceAdmission {
    pub enabled: bool,
    pub required_labels: BTreeMap<String, String>,
}

impl Default for ResourceAdmission {
    fn default() -> Self {
        Self {
            enabled: true,
            required_labels: BTreeMap::from([
                (
                    "openshell.ai/sandbox-attachable".to_owned(),
                    "true".to_owned(),
                ),
                (
                    "openshell.ai/sandbox-attachable-workspace".to_owned(),
                    "${workspace}".to_owned(),
                ),
            ]),
        }
    }
}

/// Why an admission-policy string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    #[error("admission policy {policy:?} does not start with \"v1:\"")]
    UnknownVersion { policy: String },
    #[error("admission policy {policy:?} is not valid v1 JSON: {reason}")]
    Invalid { policy: String, reason: String },
}

impl AdmissionPolicy {
    /// The exact string a driver sends; byte-stable for equal policies.
    pub fn encode(&self) -> String {
        // Serialising plain structs, bools and string maps cannot fail.
        let json = serde_json::to_string(self).unwrap_or_default();
        format!("v1:{json}")
    }

    /// Parses a driver's acknowledgement.
    pub fn decode(policy: &str) -> Result<Self, AdmissionError> {
        let Some(json) = policy.strip_prefix("v1:") else {
            return Err(AdmissionError::UnknownVersion {
                policy: truncate(policy, 200),
            });
        };
        serde_json::from_str(json).map_err(|e| AdmissionError::Invalid {
            policy: truncate(policy, 200),
            reason: e.to_string(),
        })
    }
}

/// What a driver says about itself in `GetCapabilities`, for both contract
/// generations. Drivers without GPUs, sandbox authentication or root
/// filesystem tarballs (all of ours) fill it and call [`capabilities`].
#[derive(Debug, Clone)]
pub struct DriverFacts {
    pub driver_name: String,
    pub driver_version: String,
    pub default_image: String,
    pub gateway_manages_lifecycle: bool,
    /// The driver honours CPU / memory limits.
    pub cpu_limits: bool,
    pub memory_limits: bool,
    /// The driver's Ready=True means the workload itself runs.
    pub reports_runtime_readiness: bool,
    /// This driver's 1.x metadata ([`peer_metadata`]).
    pub metadata: PeerMetadata,
    /// The encoded admission policy ([`AdmissionPolicy::encode`]), the same
    /// bytes on every call.
    pub admission_policy: String,
}

/// Answers `GetCapabilities`: checks a 1.x gateway's metadata (a v0.0.111
/// gateway sends none and is answered as well), then fills the v0.0.111
/// fields and the 1.x ones, which v0.0.111 gateways skip. A driver returns
/// the error as FAILED_PRECONDITION.
pub fn capabilities(
    gateway: Option<&PeerMetadata>,
    facts: &DriverFacts,
) -> Result<GetCapabilitiesResponse, NegotiationError> {
    if let Some(gateway) = gateway {
        negotiate("the gateway", &facts.metadata, Some(gateway))?;
    }
    Ok(GetCapabilitiesResponse {
        driver_name: facts.driver_name.clone(),
        driver_version: facts.driver_version.clone(),
        default_image: facts.default_image.clone(),
        gateway_manages_lifecycle: facts.gateway_manages_lifecycle,
        supports_sandbox_authentication: false,
        driver_reports_runtime_readiness: facts.reports_runtime_readiness,
        resource_capabilities: Some(ResourceCapabilities {
            cpu: Some(CpuResourceCapabilities {
                limit_supported: facts.cpu_limits,
            }),
            memory: Some(MemoryResourceCapabilities {
                limit_supported: facts.memory_limits,
            }),
            gpu: Some(GpuResourceCapabilities {
                default_selection_supported: false,
                count_selection_supported: false,
            }),
        }),
        rootfs_tar_staging_dir: String::new(),
        rootfs_tar_max_bytes: 0,
        extension: Some(facts.metadata.clone()),
        resource_admission_policy: facts.admission_policy.clone(),
    })
}

/// What a driver answers `AuthenticateSandbox` with: none of ours
/// authenticates sandbox credentials (that needs a supervisor component this
/// project does not have).
pub const NO_SANDBOX_AUTHENTICATION: &str = "this driver does not authenticate sandbox credentials (supports_sandbox_authentication is false)";

fn timestamp(at: SystemTime) -> prost_types::Timestamp {
    let (seconds, nanos) = match at.duration_since(UNIX_EPOCH) {
        Ok(d) => (
            i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            i32::try_from(d.subsec_nanos()).unwrap_or(0),
        ),
        Err(_) => (0, 0),
    };
    prost_types::Timestamp { seconds, nanos }
}

/// A condition stamped `at` in both encodings: RFC 3339 text for v0.0.111
/// peers (field 5) and a Timestamp for 1.x peers (field 105).
pub fn condition(
    kind: &str,
    status: &str,
    reason: &str,
    message: &str,
    at: SystemTime,
) -> DriverCondition {
    DriverCondition {
        r#type: kind.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        last_transition_time: openshell_wire::time::rfc3339(at),
        transition_time: Some(timestamp(at)),
    }
}

/// Fills the time fields of a platform event from `at`, in both encodings
/// (`timestamp_ms` for v0.0.111, `event_time` for 1.x).
pub fn stamp_event(mut event: DriverPlatformEvent, at: SystemTime) -> DriverPlatformEvent {
    event.timestamp_ms = at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    event.event_time = Some(timestamp(at));
    event
}

/// The transition time of a condition from whichever encoding the peer
/// sent (1.x Timestamp first, then RFC 3339 text).
pub fn condition_time(condition: &DriverCondition) -> Option<SystemTime> {
    if let Some(ts) = condition.transition_time {
        let secs = u64::try_from(ts.seconds).ok()?;
        let nanos = u32::try_from(ts.nanos).ok()?;
        return UNIX_EPOCH.checked_add(std::time::Duration::new(secs, nanos));
    }
    openshell_wire::time::parse_rfc3339(&condition.last_transition_time)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway() -> PeerMetadata {
        peer_metadata("test/gateway", "1.2.3", &[])
    }

    #[test]
    fn matching_peers_negotiate_and_minor_skew_is_fine() {
        let mut driver = peer_metadata("test/driver", "0.9", &["openshell.compute.logs"]);
        driver.protocol_version = Some(ProtocolVersion {
            major: 1,
            minor: 99,
        });
        let done = negotiate("driver 'x'", &gateway(), Some(&driver)).expect("compatible");
        assert_eq!(done.version, (1, 99));
        assert_eq!(
            done.capabilities,
            ["openshell.compute.contract", "openshell.compute.logs"]
        );
    }

    #[test]
    fn every_refusal_names_the_peer_and_the_reason() {
        let g = gateway();
        let err = negotiate("driver 'x'", &g, None).unwrap_err();
        assert!(matches!(err, NegotiationError::MissingMetadata { .. }));
        assert!(err.to_string().contains("driver 'x'"), "{err}");

        let mut d = peer_metadata("d", "1", &[]);
        d.protocol_version = None;
        assert!(matches!(
            negotiate("p", &g, Some(&d)).unwrap_err(),
            NegotiationError::MissingProtocolVersion { .. }
        ));

        let mut d = peer_metadata("d", "1", &[]);
        d.protocol_version = Some(ProtocolVersion { major: 2, minor: 0 });
        let err = negotiate("p", &g, Some(&d)).unwrap_err();
        assert!(err.to_string().contains("2.0"), "{err}");

        for (name, version) in [
            ("", "1"),
            ("d", " "),
            ("a\u{7}b", "1"),
            (&*"n".repeat(129), "1"),
        ] {
            let d = peer_metadata(name, version, &[]);
            assert!(
                matches!(
                    negotiate("p", &g, Some(&d)).unwrap_err(),
                    NegotiationError::InvalidMetadata { .. }
                ),
                "{name:?} {version:?}"
            );
        }

        for bad in [
            "Openshell.compute.x",
            "openshell.compute",
            "openshell..x",
            "other.compute.x",
            "openshell.compute.x_y",
        ] {
            let d = peer_metadata("d", "1", &[bad]);
            assert!(
                matches!(
                    negotiate("p", &g, Some(&d)).unwrap_err(),
                    NegotiationError::InvalidMetadata { .. }
                ),
                "{bad}"
            );
        }
        let d = peer_metadata("d", "1", &[COMPUTE_CONTRACT]);
        assert!(
            negotiate("p", &g, Some(&d))
                .unwrap_err()
                .to_string()
                .contains("twice")
        );

        let mut d = peer_metadata("d", "1", &[]);
        d.supported_capabilities.clear();
        assert!(matches!(
            negotiate("p", &g, Some(&d)).unwrap_err(),
            NegotiationError::MissingCapabilities { .. }
        ));

        let mut d = peer_metadata("d", "1", &[]);
        d.required_capabilities
            .push("openshell.compute.launch-authentication".to_owned());
        let err = negotiate("p", &g, Some(&d)).unwrap_err();
        assert!(matches!(
            err,
            NegotiationError::UnsupportedRequirements { .. }
        ));
        assert!(err.to_string().contains("launch-authentication"), "{err}");
    }

    #[test]
    fn the_default_admission_policy_is_the_upstream_string() {
        assert_eq!(
            AdmissionPolicy::default().encode(),
            r#"v1:{"allow_driver_config":false,"resource_admission":{"enabled":true,"required_labels":{"openshell.ai/sandbox-attachable":"true","openshell.ai/sandbox-attachable-workspace":"${workspace}"}}}"#
        );
        let decoded = AdmissionPolicy::decode(&AdmissionPolicy::default().encode()).expect("own");
        assert_eq!(decoded, AdmissionPolicy::default());
    }

    #[test]
    fn admission_policies_compare_as_structures() {
        let spaced = r#"v1:{ "allow_driver_config": true }"#;
        let policy = AdmissionPolicy::decode(spaced).expect("defaults fill the rest");
        assert!(policy.allow_driver_config);
        assert!(policy.resource_admission.enabled);
        assert!(matches!(
            AdmissionPolicy::decode("v2:{}"),
            Err(AdmissionError::UnknownVersion { .. })
        ));
        assert!(matches!(
            AdmissionPolicy::decode(r#"v1:{"surprise":1}"#),
            Err(AdmissionError::Invalid { .. })
        ));
    }

    #[test]
    fn conditions_carry_both_time_encodings() {
        let at = UNIX_EPOCH + std::time::Duration::from_millis(1_795_000_000_250);
        let c = condition("Ready", "True", "Running", "", at);
        assert_eq!(c.last_transition_time, "2026-11-18T11:06:40.250Z");
        assert_eq!(
            c.transition_time,
            Some(prost_types::Timestamp {
                seconds: 1_795_000_000,
                nanos: 250_000_000
            })
        );
        assert_eq!(condition_time(&c), Some(at));
        let legacy = DriverCondition {
            transition_time: None,
            ..c
        };
        assert_eq!(condition_time(&legacy), Some(at));
        let e = stamp_event(DriverPlatformEvent::default(), at);
        assert_eq!(e.timestamp_ms, 1_795_000_000_250);
        assert_eq!(e.event_time.map(|t| t.seconds), Some(1_795_000_000));
    }

    #[test]
    fn capabilities_answer_both_generations() {
        let facts = DriverFacts {
            driver_name: "d".into(),
            driver_version: "1".into(),
            default_image: "img".into(),
            gateway_manages_lifecycle: true,
            cpu_limits: true,
            memory_limits: false,
            reports_runtime_readiness: true,
            metadata: peer_metadata("test/driver", "1", &[]),
            admission_policy: AdmissionPolicy::default().encode(),
        };
        let legacy = capabilities(None, &facts).expect("v0.0.111 gateway");
        assert_eq!(legacy.driver_name, "d");
        assert!(legacy.extension.is_some());
        let resources = legacy.resource_capabilities.expect("resources");
        assert_eq!(resources.cpu.map(|c| c.limit_supported), Some(true));
        assert_eq!(resources.memory.map(|c| c.limit_supported), Some(false));
        assert!(capabilities(Some(&gateway()), &facts).is_ok());
        let mut other = gateway();
        other.protocol_version = Some(ProtocolVersion { major: 3, minor: 0 });
        assert!(matches!(
            capabilities(Some(&other), &facts),
            Err(NegotiationError::IncompatibleProtocol { .. })
        ));
    }

    #[test]
    fn truncation_keeps_characters_whole() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("ééé", 3), "é…");
    }
}
