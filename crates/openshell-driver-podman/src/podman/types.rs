//! The parts of Podman's REST API answers this driver reads. Every field is
//! optional on the wire (`#[serde(default)]`), so an engine that leaves one
//! out, or adds new ones, does not break decoding.

use std::collections::BTreeMap;

use serde::Deserialize;

/// `{"cause": ..., "message": ..., "response": 500}`
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ApiError {
    pub cause: String,
    pub message: String,
}

/// `GET /libpod/info`
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct Info {
    pub host: HostInfo,
    pub version: VersionInfo,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct HostInfo {
    pub cgroup_manager: String,
    /// Where the engine records events; "none" means it records none.
    pub event_logger: String,
    pub cgroup_version: String,
    pub oci_runtime: OciRuntimeInfo,
    pub network_backend: String,
    pub security: SecurityInfo,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct OciRuntimeInfo {
    pub name: String,
    pub path: String,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct SecurityInfo {
    pub rootless: bool,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct VersionInfo {
    #[serde(rename = "APIVersion")]
    pub api_version: String,
    #[serde(rename = "Version")]
    pub version: String,
}

/// `GET /libpod/images/{name}/json`, the part that says what runs by
/// default.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct ImageInspect {
    #[serde(rename = "Id")]
    pub id: String,
    /// The manifest digest the image was pulled by (empty for an image
    /// built or loaded locally).
    #[serde(rename = "Digest")]
    pub digest: String,
    #[serde(rename = "RepoDigests")]
    pub repo_digests: Option<Vec<String>>,
    #[serde(rename = "Config")]
    pub config: ImageConfig,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct ImageConfig {
    #[serde(rename = "Cmd")]
    pub cmd: Option<Vec<String>>,
    #[serde(rename = "Entrypoint")]
    pub entrypoint: Option<Vec<String>>,
}

impl ImageInspect {
    /// True when the image says what to run when a container names nothing.
    pub fn has_default_command(&self) -> bool {
        let some = |v: &Option<Vec<String>>| v.as_ref().is_some_and(|v| !v.is_empty());
        some(&self.config.cmd) || some(&self.config.entrypoint)
    }
}

/// One line of the `POST /libpod/images/pull` stream: progress text, or
/// at the end the pulled image ids or the error.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct PullReport {
    pub stream: String,
    pub error: String,
    pub images: Option<Vec<String>>,
    pub id: String,
}

/// `POST /libpod/containers/create`
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Created {
    #[serde(rename = "Id")]
    pub id: String,
    #[serde(rename = "Warnings")]
    pub warnings: Option<Vec<String>>,
}

/// One entry of `GET /libpod/containers/json`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct ListedContainer {
    #[serde(rename = "Id")]
    pub id: String,
    #[serde(rename = "Names")]
    pub names: Vec<String>,
    #[serde(rename = "State")]
    pub state: String,
    #[serde(rename = "Labels")]
    pub labels: Option<BTreeMap<String, String>>,
}

/// `GET /libpod/containers/{id}/json`
#[derive(Debug, Default, Clone, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ContainerInspect {
    #[serde(rename = "Id")]
    pub id: String,
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Created")]
    pub created: String,
    #[serde(rename = "State")]
    pub state: ContainerState,
    #[serde(rename = "Config")]
    pub config: ContainerConfig,
    #[serde(rename = "HostConfig")]
    pub host_config: HostConfig,
}

#[derive(Debug, Default, Clone, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ContainerState {
    #[serde(rename = "Status")]
    pub status: String,
    #[serde(rename = "Running")]
    pub running: bool,
    #[serde(rename = "Paused")]
    pub paused: bool,
    #[serde(rename = "OOMKilled")]
    pub oom_killed: bool,
    #[serde(rename = "Dead")]
    pub dead: bool,
    #[serde(rename = "ExitCode")]
    pub exit_code: i32,
    #[serde(rename = "Error")]
    pub error: String,
    #[serde(rename = "StartedAt")]
    pub started_at: String,
    #[serde(rename = "FinishedAt")]
    pub finished_at: String,
}

#[derive(Debug, Default, Clone, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ContainerConfig {
    #[serde(rename = "Labels")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(rename = "Tty")]
    pub tty: bool,
}

#[derive(Debug, Default, Clone, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct HostConfig {
    /// Memory limit in bytes; 0 when none.
    #[serde(rename = "Memory")]
    pub memory: i64,
}

impl ContainerInspect {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.config.labels.as_ref()?.get(key).map(String::as_str)
    }

    /// The container name without the leading slash some engines add.
    pub fn short_name(&self) -> &str {
        self.name.trim_start_matches('/')
    }
}

/// One line of `GET /libpod/events`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct Event {
    #[serde(rename = "Type")]
    pub kind: String,
    #[serde(rename = "Action")]
    pub action: String,
    #[serde(rename = "Actor")]
    pub actor: Actor,
    #[serde(rename = "timeNano")]
    pub time_nano: i64,
    pub time: i64,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct Actor {
    #[serde(rename = "ID")]
    pub id: String,
    /// The container's name, image, exit code and labels.
    #[serde(rename = "Attributes")]
    pub attributes: BTreeMap<String, String>,
}

impl Event {
    /// Milliseconds since the epoch.
    pub fn timestamp_ms(&self) -> i64 {
        if self.time_nano > 0 {
            self.time_nano / 1_000_000
        } else {
            self.time.saturating_mul(1000)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inspect_output_of_podman_4_decodes() {
        let text = r#"{
            "Id": "ce32", "Name": "openshell-podman-a", "Created": "2026-11-23T10:28:20.03Z",
            "State": {"OciVersion": "1.0.2-dev", "Status": "exited", "Running": false,
                      "Paused": false, "OOMKilled": true, "ExitCode": 137, "Error": "",
                      "StartedAt": "2026-11-23T10:28:20.14Z", "FinishedAt": "2026-11-23T10:28:22.27Z",
                      "Health": {"Status": ""}},
            "Config": {"Labels": {"openshell.sandbox.id": "s1"}, "Tty": true, "Env": ["A=b"]},
            "HostConfig": {"Memory": 16777216, "CpuQuota": 0},
            "Mounts": []
        }"#;
        let inspect: ContainerInspect = serde_json::from_str(text).unwrap();
        assert_eq!(inspect.state.status, "exited");
        assert!(inspect.state.oom_killed);
        assert_eq!(inspect.state.exit_code, 137);
        assert_eq!(inspect.label("openshell.sandbox.id"), Some("s1"));
        assert!(inspect.config.tty);
        assert_eq!(inspect.host_config.memory, 16_777_216);
    }

    #[test]
    fn events_decode_with_labels_in_attributes() {
        let text = r#"{"status":"died","id":"ce32","Type":"container","Action":"died",
            "Actor":{"ID":"ce32","Attributes":{"containerExitCode":"137","name":"t1","openshell.test":"1"}},
            "scope":"local","time":1795429702,"timeNano":1795429702307389524}"#;
        let event: Event = serde_json::from_str(text).unwrap();
        assert_eq!(event.action, "died");
        assert_eq!(event.actor.id, "ce32");
        assert_eq!(
            event
                .actor
                .attributes
                .get("openshell.test")
                .map(String::as_str),
            Some("1")
        );
        assert_eq!(event.timestamp_ms(), 1_795_429_702_307);
    }

    #[test]
    fn pull_reports() {
        let progress: PullReport =
            serde_json::from_str(r#"{"stream":"Copying blob sha256:abc\n"}"#).unwrap();
        assert_eq!(progress.stream, "Copying blob sha256:abc\n");
        assert!(progress.error.is_empty());
        let done: PullReport = serde_json::from_str(r#"{"images":["0123"],"id":"0123"}"#).unwrap();
        assert_eq!(done.id, "0123");
        let failed: PullReport = serde_json::from_str(r#"{"error":"manifest unknown"}"#).unwrap();
        assert_eq!(failed.error, "manifest unknown");
    }

    #[test]
    fn default_command_of_an_image() {
        let with: ImageInspect =
            serde_json::from_str(r#"{"Id":"x","Config":{"Cmd":["/bin/sh"]}}"#).unwrap();
        assert!(with.has_default_command());
        let without: ImageInspect =
            serde_json::from_str(r#"{"Id":"x","Config":{"Cmd":null,"Entrypoint":[]}}"#).unwrap();
        assert!(!without.has_default_command());
    }
}
