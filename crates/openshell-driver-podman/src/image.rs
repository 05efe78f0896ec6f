//! A sandbox's image: whether the local store has it, pulling it from its
//! registry under the image pull policy, and failures explained so the
//! caller knows what to change.
//!
//! The engine pulls (`POST /libpod/images/pull`) with its own registry
//! configuration: credentials from its auth file (`REGISTRY_AUTH_FILE`,
//! else `${XDG_RUNTIME_DIR}/containers/auth.json`), mirrors and short-name
//! rules from `registries.conf`. The driver only adds `tlsVerify=false` for
//! the registries listed in `insecure_registries`.

use std::time::{Duration, SystemTime};

use openshell_proto::compute::v1::DriverPlatformEvent;

use crate::config::PullPolicy;
use crate::error::{Error, Result};
use crate::podman::Podman;
use crate::podman::types::ImageInspect;
use crate::spec::Plan;

/// How long one pull may take before the create fails.
pub const PULL_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Platform event reasons of a pull.
pub mod reason {
    pub const PULLING: &str = "Pulling";
    pub const PULLED: &str = "Pulled";
    pub const PULL_FAILED: &str = "PullFailed";
}

/// Says where the image name came from when it was the default.
pub fn origin(plan: &Plan, instance: &str) -> String {
    if plan.image_is_default {
        format!(" (the default_image of driver '{instance}')")
    } else {
        String::new()
    }
}

/// The check ValidateSandboxCreate can make without pulling: under
/// `never`, the image must be in the local store already; an image that is
/// there must say what to run when the request does not.
pub fn check_local(
    plan: &Plan,
    local: Option<&ImageInspect>,
    policy: PullPolicy,
    instance: &str,
) -> Result<()> {
    match local {
        None if policy == PullPolicy::Never => Err(Error::FailedPrecondition(format!(
            "image {:?}{} is not in the Podman engine's local image store and the image pull \
             policy is \"never\", so it is not pulled: add it first (`podman pull`, `podman \
             load -i IMAGE.tar`), or use image_pull_policy \"missing\"",
            plan.image,
            origin(plan, instance)
        ))),
        Some(image) => check_default_command(plan, image),
        None => Ok(()),
    }
}

/// An empty argv runs the image's default command: it must have one.
pub fn check_default_command(plan: &Plan, image: &ImageInspect) -> Result<()> {
    if plan.argv.is_empty() && !image.has_default_command() {
        return Err(Error::FailedPrecondition(format!(
            "image {:?} has no default command (CMD or ENTRYPOINT); give spec.command",
            plan.image
        )));
    }
    Ok(())
}

/// True when the policy has the engine pull, given what the local store
/// holds.
pub fn needs_pull(policy: PullPolicy, present: bool) -> bool {
    match policy {
        PullPolicy::Never => false,
        PullPolicy::Missing => !present,
        PullPolicy::Always | PullPolicy::Newer => true,
    }
}

/// What a pull got.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub image: ImageInspect,
    /// The manifest digest, when the registry gave one.
    pub digest: String,
}

/// Has the engine pull `plan.image` under `policy`; reports the result as
/// the image now in the local store. Failures are FAILED_PRECONDITION
/// naming the image and the registry's reason.
pub async fn pull(
    client: &Podman,
    plan: &Plan,
    policy: PullPolicy,
    insecure: bool,
    instance: &str,
) -> Result<Pulled> {
    let image = &plan.image;
    let pulled = client
        .pull(image, policy.as_str(), !insecure, PULL_TIMEOUT, |line| {
            tracing::debug!(sandbox_id = %plan.id, image = %image, progress = line, "pulling");
        })
        .await;
    let id = match pulled {
        Ok(id) => id,
        Err(Error::Engine { message, .. }) => {
            return Err(Error::FailedPrecondition(explain_pull_failure(
                image,
                &origin(plan, instance),
                &message,
                insecure,
            )));
        }
        Err(Error::Timeout { timeout, .. }) => {
            return Err(Error::FailedPrecondition(format!(
                "pulling image {image:?} did not finish within {timeout:?}; check the \
                 registry's speed, or pull it into the engine's store beforehand"
            )));
        }
        Err(other) => return Err(other),
    };
    let Some(inspected) = client.image(image).await? else {
        return Err(Error::FailedPrecondition(format!(
            "Podman pulled image {image:?} (id {id}) but its local store has no image by that \
             name afterwards; was it removed meanwhile?"
        )));
    };
    let digest = if inspected.digest.is_empty() {
        inspected
            .repo_digests
            .iter()
            .flatten()
            .find_map(|d| d.split_once('@').map(|(_, digest)| digest.to_owned()))
            .unwrap_or_default()
    } else {
        inspected.digest.clone()
    };
    Ok(Pulled {
        image: inspected,
        digest,
    })
}

/// A failed pull as one sentence: the image, what went wrong in words a
/// user can act on, then Podman's own message.
pub fn explain_pull_failure(image: &str, origin: &str, message: &str, insecure: bool) -> String {
    let lower = message.to_ascii_lowercase();
    let has = |needles: &[&str]| needles.iter().any(|n| lower.contains(n));
    let why = if has(&[
        "unauthorized",
        "authentication required",
        "denied",
        "invalid username/password",
    ]) {
        "the registry refused the credentials (or needs some): log in with `podman login` as \
         the user the Podman engine runs as, so its auth file (REGISTRY_AUTH_FILE, else \
         ${XDG_RUNTIME_DIR}/containers/auth.json) holds them"
            .to_owned()
    } else if has(&[
        "manifest unknown",
        "name unknown",
        "not found",
        "unknown tag",
    ]) {
        "the registry has no such image or tag: check the name and tag".to_owned()
    } else if has(&[
        "server gave http response to https client",
        "x509",
        "certificate",
        "tls:",
    ]) && !insecure
    {
        "TLS with the registry failed: if it serves plain HTTP or an untrusted certificate, list \
         its HOST:PORT in insecure_registries (or --insecure-registry)"
            .to_owned()
    } else if has(&[
        "connection refused",
        "no such host",
        "i/o timeout",
        "network is unreachable",
        "no route to host",
        "dial tcp",
        "connection reset",
        "timeout",
    ]) {
        "the registry cannot be reached: check the host and port, and that the Podman engine's \
         host can reach it"
            .to_owned()
    } else if has(&["short-name", "short name"]) {
        "the name is a short name Podman cannot resolve: give the full reference with its \
         registry, e.g. docker.io/library/busybox:latest"
            .to_owned()
    } else {
        "the Podman engine could not pull it".to_owned()
    };
    format!("image {image:?}{origin} could not be pulled: {why} (Podman said: {message})")
}

fn stamp(reason: &str, kind: &str, message: String, image: &str) -> DriverPlatformEvent {
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("image".to_owned(), image.to_owned());
    let event = DriverPlatformEvent {
        source: "podman".to_owned(),
        r#type: kind.to_owned(),
        reason: reason.to_owned(),
        message,
        metadata,
        ..Default::default()
    };
    openshell_driver_kit::contract::stamp_event(event, SystemTime::now())
}

/// The platform event published when a pull starts.
pub fn pulling_event(image: &str, policy: PullPolicy) -> DriverPlatformEvent {
    let mut event = stamp(
        reason::PULLING,
        "Normal",
        format!("pulling image {image} (image pull policy {policy})"),
        image,
    );
    event
        .metadata
        .insert("pull_policy".to_owned(), policy.as_str().to_owned());
    event
}

/// The platform event published when a pull succeeded.
pub fn pulled_event(image: &str, pulled: &Pulled) -> DriverPlatformEvent {
    let message = if pulled.digest.is_empty() {
        format!("pulled image {image}")
    } else {
        format!("pulled image {image} ({})", pulled.digest)
    };
    let mut event = stamp(reason::PULLED, "Normal", message, image);
    event
        .metadata
        .insert("image_id".to_owned(), pulled.image.id.clone());
    if !pulled.digest.is_empty() {
        event
            .metadata
            .insert("digest".to_owned(), pulled.digest.clone());
    }
    event
}

/// The platform event published when a pull failed.
pub fn pull_failed_event(image: &str, message: &str) -> DriverPlatformEvent {
    stamp(reason::PULL_FAILED, "Warning", message.to_owned(), image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_decide_whether_to_pull() {
        assert!(needs_pull(PullPolicy::Missing, false));
        assert!(!needs_pull(PullPolicy::Missing, true));
        assert!(needs_pull(PullPolicy::Always, true));
        assert!(needs_pull(PullPolicy::Newer, true));
        assert!(!needs_pull(PullPolicy::Never, false));
    }

    #[test]
    fn pull_failures_say_why() {
        let cases = [
            (
                "reading manifest nope in 127.0.0.1:5000/openshell/busybox: manifest unknown",
                false,
                "no such image or tag",
            ),
            (
                "pinging container registry 127.0.0.1:1: Get \"https://127.0.0.1:1/v2/\": dial \
                 tcp 127.0.0.1:1: connect: connection refused",
                true,
                "cannot be reached",
            ),
            (
                "reading manifest latest: unauthorized: authentication required",
                true,
                "podman login",
            ),
            (
                "Get \"https://r:5000/v2/\": http: server gave HTTP response to HTTPS client",
                false,
                "insecure_registries",
            ),
            ("something new", false, "could not pull it"),
        ];
        for (message, insecure, needle) in cases {
            let text = explain_pull_failure("r:5000/x:1", "", message, insecure);
            assert!(text.contains(needle), "{message}: {text}");
            assert!(text.contains("\"r:5000/x:1\""), "{text}");
            assert!(text.contains(message), "{text}");
        }
    }

    #[test]
    fn pulled_events_carry_the_digest() {
        let pulled = Pulled {
            image: ImageInspect {
                id: "abc".into(),
                ..ImageInspect::default()
            },
            digest: "sha256:0123".into(),
        };
        let event = pulled_event("r/x:1", &pulled);
        assert_eq!(event.reason, reason::PULLED);
        assert_eq!(event.metadata["digest"], "sha256:0123");
        assert_eq!(event.metadata["image_id"], "abc");
        assert!(event.message.contains("sha256:0123"));
        assert_eq!(
            pulling_event("r/x:1", PullPolicy::Always).metadata["pull_policy"],
            "always"
        );
    }
}
