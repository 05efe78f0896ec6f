//! From a `DriverSandbox` create request to a Podman container: validation
//! with messages a user can act on, ownership labels, and the libpod
//! spec-generator body.

use std::collections::BTreeMap;
use std::path::Path;

use openshell_proto::compute::v1::{
    DriverResourceRequirements, DriverSandbox, DriverSandboxSpec, DriverSandboxTemplate,
};
use prost_types::value::Kind;
use serde_json::json;

use crate::config::{Network, PullPolicy, Settings, Ulimit};
use crate::error::{Error, Result};
use crate::quantity;

/// Label every container of this driver carries.
pub const LABEL_MANAGED_BY: &str = "openshell.managed-by";
/// Value of [`LABEL_MANAGED_BY`].
pub const MANAGED_BY: &str = "openshell-driver-podman";
/// Label naming the driver instance that owns the container.
pub const LABEL_INSTANCE: &str = "openshell.driver.instance";
pub const LABEL_SANDBOX_ID: &str = "openshell.sandbox.id";
pub const LABEL_SANDBOX_NAME: &str = "openshell.sandbox.name";
pub const LABEL_WORKSPACE: &str = "openshell.workspace";
/// Labels under this prefix are the driver's; requests may not set them.
pub const RESERVED_LABEL_PREFIX: &str = "openshell.";

/// Environment variables the driver sets in every sandbox.
pub const ENV_SANDBOX_ID: &str = "OPENSHELL_SANDBOX_ID";
pub const ENV_SANDBOX_NAME: &str = "OPENSHELL_SANDBOX";
pub const ENV_TOKEN_FILE: &str = "OPENSHELL_SANDBOX_TOKEN_FILE";
/// Where the sandbox token file appears inside the container.
pub const TOKEN_MOUNT: &str = "/run/openshell/sandbox-token";

/// Minimum memory limit Podman accepts.
pub const MIN_MEMORY_LIMIT: u64 = 6 * 1024 * 1024;
/// CFS period used for CPU limits, in microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;
/// Smallest CPU limit: a 1 ms quota per period.
pub const MIN_CPU_LIMIT_MILLIS: u64 = 10;

/// `key=value` label filters selecting the containers of one instance.
pub fn ownership_filters(instance: &str) -> Vec<String> {
    vec![
        format!("{LABEL_MANAGED_BY}={MANAGED_BY}"),
        format!("{LABEL_INSTANCE}={instance}"),
    ]
}

/// True when `labels` mark a container as owned by driver instance
/// `instance`.
pub fn owned_by(labels: Option<&BTreeMap<String, String>>, instance: &str) -> bool {
    labels.is_some_and(|labels| {
        labels.get(LABEL_MANAGED_BY).map(String::as_str) == Some(MANAGED_BY)
            && labels.get(LABEL_INSTANCE).map(String::as_str) == Some(instance)
            && labels.contains_key(LABEL_SANDBOX_ID)
    })
}

/// Sandbox ids become label values and file names: keep them plain.
pub fn check_sandbox_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::InvalidArgument(
            "sandbox_id is empty; every request must name the sandbox by its id".to_owned(),
        ));
    }
    let valid = id.len() <= 128
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "sandbox id {id:?} is not valid; use up to 128 ASCII letters, digits, '-', '_' or '.' \
             (not starting with '.')"
        )))
    }
}

fn check_sandbox_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::InvalidArgument(
            "sandbox.name is empty; give the sandbox a name".to_owned(),
        ));
    }
    if name.len() > 253 || name.chars().any(char::is_control) {
        return Err(Error::InvalidArgument(format!(
            "sandbox name {name:?} is not valid; use at most 253 printable characters"
        )));
    }
    Ok(())
}

/// `openshell-<instance>-<name>-<id prefix>`: readable, valid for Podman
/// (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`) and unique per sandbox id.
pub fn container_name(instance: &str, sandbox_name: &str, sandbox_id: &str) -> String {
    let clean = |text: &str, max: usize| -> String {
        text.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                    c
                } else {
                    '-'
                }
            })
            .take(max)
            .collect()
    };
    let id: String = sandbox_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect();
    format!(
        "openshell-{}-{}-{}",
        clean(instance, 40),
        clean(sandbox_name, 48),
        id
    )
}

/// Typed CPU and memory from `template.resources`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    pub cpu_request_millis: Option<u64>,
    pub cpu_limit_millis: Option<u64>,
    pub memory_request: Option<u64>,
    pub memory_limit: Option<u64>,
}

/// A validated create request, ready to become a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub id: String,
    pub name: String,
    pub workspace: String,
    pub image: String,
    /// The image came from the `default_image` setting.
    pub image_is_default: bool,
    /// Exact argv; empty means the image's default command.
    pub argv: Vec<String>,
    pub tty: bool,
    /// The environment the request asked for (template, then spec on top).
    pub env: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub resources: Resources,
    /// Credential to deliver as a file; empty when none.
    pub token: String,
    /// `template.driver_config`'s `image_pull_policy`, over the driver's
    /// setting for this sandbox.
    pub pull_policy: Option<PullPolicy>,
}

/// The per-sandbox settings `template.driver_config` may carry (only
/// where the admission policy allows driver config at all).
pub const DRIVER_CONFIG_KEYS: &[&str] = &["image_pull_policy"];

fn check_env(scope: &str, key: &str, value: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{scope} has an empty variable name"
        )));
    }
    if let Some(c) = key
        .chars()
        .find(|c| *c == '=' || c.is_control() || c.is_whitespace())
    {
        return Err(Error::InvalidArgument(format!(
            "{scope} variable name {key:?} contains {c:?}; names may not contain '=', spaces or \
             control characters"
        )));
    }
    if value.contains('\0') {
        return Err(Error::InvalidArgument(format!(
            "{scope}.{key} contains a NUL byte"
        )));
    }
    if key == ENV_SANDBOX_ID || key == ENV_SANDBOX_NAME || key == ENV_TOKEN_FILE {
        return Err(Error::InvalidArgument(format!(
            "{scope}.{key} is set by the driver; remove it from the request"
        )));
    }
    Ok(())
}

fn parse_resource(
    field: &str,
    value: &str,
    parse: fn(&str) -> std::result::Result<u64, String>,
) -> Result<Option<u64>> {
    if value.trim().is_empty() {
        return Ok(None);
    }
    parse(value)
        .map(Some)
        .map_err(|why| Error::InvalidArgument(format!("template.resources.{field}: {why}")))
}

fn string_value(value: &prost_types::Value) -> Option<&str> {
    match &value.kind {
        Some(Kind::StringValue(s)) => Some(s),
        _ => None,
    }
}

/// Reads the gateway's `platform_config`: annotations are applied; settings
/// this driver cannot honour are refused; keys it does not know are
/// ignored (the gateway may add new ones).
fn platform_annotations(config: Option<&prost_types::Struct>) -> Result<BTreeMap<String, String>> {
    let mut annotations = BTreeMap::new();
    let Some(config) = config else {
        return Ok(annotations);
    };
    for (key, value) in &config.fields {
        match key.as_str() {
            "annotations" => {
                let Some(Kind::StructValue(inner)) = &value.kind else {
                    return Err(Error::InvalidArgument(
                        "template.annotations must be a map of strings".to_owned(),
                    ));
                };
                for (name, value) in &inner.fields {
                    let Some(text) = string_value(value) else {
                        return Err(Error::InvalidArgument(format!(
                            "template.annotations.{name} must be a string"
                        )));
                    };
                    annotations.insert(name.clone(), text.to_owned());
                }
            }
            "runtime_class_name" => {
                if string_value(value).is_some_and(|s| !s.is_empty()) {
                    return Err(Error::InvalidArgument(
                        "template.runtime_class_name is not supported by the Podman driver; the \
                         OCI runtime is the driver's runtime setting"
                            .to_owned(),
                    ));
                }
            }
            "host_users" => {
                if matches!(value.kind, Some(Kind::BoolValue(false))) {
                    return Err(Error::InvalidArgument(
                        "template.user_namespaces is not supported by the Podman driver; leave it \
                         unset"
                            .to_owned(),
                    ));
                }
            }
            "resources_raw" => {
                let keys = match &value.kind {
                    Some(Kind::StructValue(inner)) => {
                        inner.fields.keys().cloned().collect::<Vec<_>>().join(", ")
                    }
                    _ => "?".to_owned(),
                };
                return Err(Error::InvalidArgument(format!(
                    "template.resources has entries the Podman driver does not support ({keys}); \
                     only limits/requests of cpu and memory are supported"
                )));
            }
            other => {
                tracing::debug!(key = other, "ignoring an unknown platform_config key");
            }
        }
    }
    Ok(annotations)
}

/// Validates a create (or validate) request and resolves it into a plan.
/// Checks that need the engine (image present) are separate.
pub fn plan(
    sandbox: Option<&DriverSandbox>,
    instance: &str,
    default_image: Option<&str>,
) -> Result<Plan> {
    let sandbox = sandbox.ok_or_else(|| {
        Error::InvalidArgument(
            "the request has no sandbox; set CreateSandboxRequest.sandbox".to_owned(),
        )
    })?;
    check_identity(sandbox)?;
    let spec = sandbox.spec.as_ref().ok_or_else(|| {
        Error::InvalidArgument(
            "sandbox.spec is missing; the driver needs it to create a sandbox".to_owned(),
        )
    })?;
    let template = spec.template.clone().unwrap_or_default();
    check_supported(spec, &template, instance)?;
    let (image, image_is_default) = resolve_image(&template.image, instance, default_image)?;
    check_command(&spec.command)?;
    let pull_policy = sandbox_pull_policy(&template, instance)?;
    Ok(Plan {
        id: sandbox.id.clone(),
        name: sandbox.name.clone(),
        workspace: sandbox.workspace.clone(),
        image,
        image_is_default,
        argv: spec.command.clone(),
        tty: spec.tty,
        env: request_env(&template.environment, &spec.environment)?,
        labels: user_labels(&template.labels)?,
        annotations: platform_annotations(template.platform_config.as_ref())?,
        resources: resources(&template.resources.unwrap_or_default())?,
        token: spec.sandbox_token.clone(),
        pull_policy,
    })
}

/// Step of [`plan`]: the sandbox's id, name and workspace.
fn check_identity(sandbox: &DriverSandbox) -> Result<()> {
    check_sandbox_id(&sandbox.id)?;
    check_sandbox_name(&sandbox.name)?;
    if sandbox.workspace.chars().any(char::is_control) {
        return Err(Error::InvalidArgument(
            "sandbox.workspace contains control characters".to_owned(),
        ));
    }
    Ok(())
}

/// Step of [`plan`]: refuses what this driver cannot provide (GPUs, an
/// agent socket, per-sandbox driver settings).
fn check_supported(
    spec: &DriverSandboxSpec,
    template: &DriverSandboxTemplate,
    instance: &str,
) -> Result<()> {
    if spec
        .resource_requirements
        .as_ref()
        .is_some_and(|r| r.gpu.is_some())
    {
        return Err(Error::FailedPrecondition(
            "this sandbox asks for a GPU, but the Podman driver does not provide GPUs; use a \
             driver that does, or remove the GPU request"
                .to_owned(),
        ));
    }
    if !template.agent_socket_path.is_empty() {
        return Err(Error::InvalidArgument(
            "template.agent_socket is not supported by the Podman driver; leave it empty"
                .to_owned(),
        ));
    }
    if let Some(config) = &template.driver_config
        && let Some(key) = config
            .fields
            .keys()
            .find(|k| !DRIVER_CONFIG_KEYS.contains(&k.as_str()))
    {
        return Err(Error::InvalidArgument(format!(
            "template.driver_config.{instance}.{key} is not a setting of the Podman driver; it \
             takes only {} per sandbox",
            DRIVER_CONFIG_KEYS.join(", ")
        )));
    }
    Ok(())
}

/// Step of [`plan`]: the per-sandbox `image_pull_policy`, if given.
fn sandbox_pull_policy(
    template: &DriverSandboxTemplate,
    instance: &str,
) -> Result<Option<PullPolicy>> {
    let Some(value) = template
        .driver_config
        .as_ref()
        .and_then(|c| c.fields.get("image_pull_policy"))
    else {
        return Ok(None);
    };
    let key = format!("template.driver_config.{instance}.image_pull_policy");
    let Some(text) = string_value(value) else {
        return Err(Error::InvalidArgument(format!(
            "{key} must be a string: one of {}",
            PullPolicy::NAMES.join(", ")
        )));
    };
    PullPolicy::parse(text)
        .map(Some)
        .map_err(|why| Error::InvalidArgument(format!("{key}: {why}")))
}

/// Step of [`plan`]: the image to run and whether it is the driver's
/// default.
fn resolve_image(
    requested: &str,
    instance: &str,
    default_image: Option<&str>,
) -> Result<(String, bool)> {
    let (image, image_is_default) = if requested.trim().is_empty() {
        let Some(image) = default_image else {
            return Err(Error::FailedPrecondition(format!(
                "the request names no image and driver '{instance}' has no default_image; \
                 give template.image, or set default_image in the driver config (or \
                 --default-image)"
            )));
        };
        (image.to_owned(), true)
    } else {
        (requested.trim().to_owned(), false)
    };
    crate::config::check_image_reference(&image)
        .map_err(|why| Error::InvalidArgument(format!("template.image {image:?}: {why}")))?;
    Ok((image, image_is_default))
}

/// Step of [`plan`]: the argv is run exactly; an empty one means the
/// image's default command.
fn check_command(argv: &[String]) -> Result<()> {
    if let Some(first) = argv.first()
        && first.is_empty()
    {
        return Err(Error::InvalidArgument(
            "spec.command[0] is empty; the first element must be the program to run".to_owned(),
        ));
    }
    if let Some(index) = argv.iter().position(|arg| arg.contains('\0')) {
        return Err(Error::InvalidArgument(format!(
            "spec.command[{index}] contains a NUL byte"
        )));
    }
    Ok(())
}

/// Step of [`plan`]: the template's environment with the spec's on top.
fn request_env<'a>(
    template: impl IntoIterator<Item = (&'a String, &'a String)>,
    spec: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<BTreeMap<String, String>> {
    let mut env = BTreeMap::new();
    for (scope, vars) in [
        (
            "template.environment",
            template.into_iter().collect::<Vec<_>>(),
        ),
        ("spec.environment", spec.into_iter().collect()),
    ] {
        for (key, value) in vars {
            check_env(scope, key, value)?;
            env.insert(key.clone(), value.clone());
        }
    }
    Ok(env)
}

/// Step of [`plan`]: the request's own labels, none in the driver's
/// reserved prefix.
fn user_labels<'a>(
    labels: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for (key, value) in labels {
        if key.is_empty() || key.contains('=') || key.chars().any(char::is_control) {
            return Err(Error::InvalidArgument(format!(
                "template.labels key {key:?} is not valid; keys may not be empty or contain '='"
            )));
        }
        if key.starts_with(RESERVED_LABEL_PREFIX) {
            return Err(Error::InvalidArgument(format!(
                "template.labels.{key}: labels starting with {RESERVED_LABEL_PREFIX:?} are \
                 reserved for the driver"
            )));
        }
        if value.chars().any(char::is_control) {
            return Err(Error::InvalidArgument(format!(
                "template.labels.{key} contains control characters"
            )));
        }
        out.insert(key.clone(), value.clone());
    }
    Ok(out)
}

/// Step of [`plan`]: typed CPU and memory, within what Podman accepts.
fn resources(requested: &DriverResourceRequirements) -> Result<Resources> {
    let resources = Resources {
        cpu_request_millis: parse_resource(
            "requests.cpu",
            &requested.cpu_request,
            quantity::cpu_millis,
        )?,
        cpu_limit_millis: parse_resource("limits.cpu", &requested.cpu_limit, quantity::cpu_millis)?,
        memory_request: parse_resource(
            "requests.memory",
            &requested.memory_request,
            quantity::memory_bytes,
        )?,
        memory_limit: parse_resource(
            "limits.memory",
            &requested.memory_limit,
            quantity::memory_bytes,
        )?,
    };
    if let Some(limit) = resources.cpu_limit_millis
        && limit < MIN_CPU_LIMIT_MILLIS
    {
        return Err(Error::InvalidArgument(format!(
            "template.resources.limits.cpu is {limit}m; the smallest CPU limit is \
             {MIN_CPU_LIMIT_MILLIS}m"
        )));
    }
    if let (Some(request), Some(limit)) = (resources.cpu_request_millis, resources.cpu_limit_millis)
        && request > limit
    {
        return Err(Error::InvalidArgument(format!(
            "template.resources.requests.cpu ({request}m) is above limits.cpu ({limit}m)"
        )));
    }
    if let Some(limit) = resources.memory_limit
        && limit < MIN_MEMORY_LIMIT
    {
        return Err(Error::InvalidArgument(format!(
            "template.resources.limits.memory is {}; Podman needs at least {}",
            quantity::human_bytes(limit),
            quantity::human_bytes(MIN_MEMORY_LIMIT)
        )));
    }
    if let (Some(request), Some(limit)) = (resources.memory_request, resources.memory_limit)
        && request > limit
    {
        return Err(Error::InvalidArgument(format!(
            "template.resources.requests.memory ({}) is above limits.memory ({})",
            quantity::human_bytes(request),
            quantity::human_bytes(limit)
        )));
    }
    Ok(resources)
}

/// The libpod spec-generator body that creates the container for `plan`.
pub fn create_body(
    plan: &Plan,
    settings: &Settings,
    ulimits: &BTreeMap<String, Ulimit>,
    token_file: Option<&Path>,
) -> serde_json::Value {
    let r_limits: Vec<_> = ulimits
        .iter()
        .map(|(name, limit)| json!({"type": name, "soft": limit.soft, "hard": limit.hard}))
        .collect();

    let mut body = json!({
        "name": container_name(&settings.name, &plan.name, &plan.id),
        "image": plan.image,
        "labels": container_labels(plan, &settings.name),
        "env": container_env(plan, token_file.is_some()),
        "terminal": plan.tty,
        "stdin": plan.tty,
        "r_limits": r_limits,
        "stop_timeout": settings.stop_timeout.as_secs(),
    });
    if !plan.annotations.is_empty() {
        body["annotations"] = json!(plan.annotations);
    }
    // The exact argv: the program as the entrypoint and the rest as the
    // command, so an image ENTRYPOINT never wraps it.
    if let Some((program, args)) = plan.argv.split_first() {
        body["entrypoint"] = json!([program]);
        body["command"] = json!(args);
    }
    match &settings.network {
        Network::Mode(mode) => body["netns"] = json!({"nsmode": mode}),
        Network::Named(name) => {
            body["netns"] = json!({"nsmode": "bridge"});
            body["Networks"] = json!({ name.as_str(): {} });
        }
    }
    if let Some(limits) = resource_limits(&plan.resources) {
        body["resource_limits"] = limits;
    }
    if let Some(file) = token_file {
        body["mounts"] = token_mounts(file);
    }
    body
}

/// Step of [`create_body`]: the request's labels plus the ownership ones.
fn container_labels(plan: &Plan, instance: &str) -> BTreeMap<String, String> {
    let mut labels = plan.labels.clone();
    labels.insert(LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned());
    labels.insert(LABEL_INSTANCE.to_owned(), instance.to_owned());
    labels.insert(LABEL_SANDBOX_ID.to_owned(), plan.id.clone());
    labels.insert(LABEL_SANDBOX_NAME.to_owned(), plan.name.clone());
    if !plan.workspace.is_empty() {
        labels.insert(LABEL_WORKSPACE.to_owned(), plan.workspace.clone());
    }
    labels
}

/// Step of [`create_body`]: the request's environment plus the driver's
/// variables.
fn container_env(plan: &Plan, has_token: bool) -> BTreeMap<String, String> {
    let mut env = plan.env.clone();
    env.insert(ENV_SANDBOX_ID.to_owned(), plan.id.clone());
    env.insert(ENV_SANDBOX_NAME.to_owned(), plan.name.clone());
    if has_token {
        env.insert(ENV_TOKEN_FILE.to_owned(), TOKEN_MOUNT.to_owned());
    }
    env
}

/// Step of [`create_body`]: libpod `resource_limits`, or `None` when the
/// request sets none.
fn resource_limits(r: &Resources) -> Option<serde_json::Value> {
    let mut limits = serde_json::Map::new();
    if r.memory_limit.is_some() || r.memory_request.is_some() {
        let mut memory = serde_json::Map::new();
        if let Some(limit) = r.memory_limit {
            memory.insert("limit".to_owned(), json!(limit));
        }
        if let Some(request) = r.memory_request {
            memory.insert("reservation".to_owned(), json!(request));
        }
        limits.insert("memory".to_owned(), serde_json::Value::Object(memory));
    }
    if r.cpu_limit_millis.is_some() || r.cpu_request_millis.is_some() {
        let mut cpu = serde_json::Map::new();
        if let Some(limit) = r.cpu_limit_millis {
            cpu.insert("quota".to_owned(), json!(limit * CPU_PERIOD_US / 1000));
            cpu.insert("period".to_owned(), json!(CPU_PERIOD_US));
        }
        if let Some(request) = r.cpu_request_millis {
            cpu.insert("shares".to_owned(), json!((request * 1024 / 1000).max(2)));
        }
        limits.insert("cpu".to_owned(), serde_json::Value::Object(cpu));
    }
    (!limits.is_empty()).then_some(serde_json::Value::Object(limits))
}

/// Step of [`create_body`]: the token file, bind-mounted read-only.
fn token_mounts(file: &Path) -> serde_json::Value {
    json!([{
        "destination": TOKEN_MOUNT,
        "source": file,
        "type": "bind",
        "options": ["ro", "rbind"],
    }])
}

#[cfg(test)]
mod tests {
    use super::*;
    use openshell_proto::compute::v1::{
        DriverResourceRequirements, DriverSandboxSpec, DriverSandboxTemplate,
        GpuResourceRequirements, ResourceRequirements,
    };

    fn sandbox() -> DriverSandbox {
        DriverSandbox {
            id: "3f1c9a2e-0000-4000-8000-000000000001".to_owned(),
            name: "dev box".to_owned(),
            workspace: "default".to_owned(),
            spec: Some(DriverSandboxSpec {
                command: vec!["sh".into(), "-c".into(), "echo \"$1\"".into(), "a b".into()],
                tty: true,
                environment: [("B".to_owned(), "spec".to_owned())].into(),
                template: Some(DriverSandboxTemplate {
                    image: "localhost/openshell-busybox:latest".to_owned(),
                    environment: [
                        ("A".to_owned(), "template".to_owned()),
                        ("B".to_owned(), "template".to_owned()),
                    ]
                    .into(),
                    labels: [("team".to_owned(), "x".to_owned())].into(),
                    resources: Some(DriverResourceRequirements {
                        cpu_request: "250m".into(),
                        cpu_limit: "1.5".into(),
                        memory_request: "32Mi".into(),
                        memory_limit: "64Mi".into(),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn settings() -> Settings {
        Settings::merge(
            &crate::config::SettingsArgs::default(),
            crate::config::SettingsArgs::default(),
            false,
        )
        .unwrap()
    }

    fn invalid(sandbox: &DriverSandbox) -> String {
        match plan(Some(sandbox), "podman", Some("localhost/default:latest")) {
            Err(Error::InvalidArgument(message)) => message,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    fn with_spec(edit: impl FnOnce(&mut DriverSandboxSpec)) -> DriverSandbox {
        let mut s = sandbox();
        edit(s.spec.as_mut().unwrap());
        s
    }

    fn with_template(edit: impl FnOnce(&mut DriverSandboxTemplate)) -> DriverSandbox {
        with_spec(|spec| edit(spec.template.as_mut().unwrap()))
    }

    #[test]
    fn a_full_request_becomes_a_plan() {
        let plan = plan(Some(&sandbox()), "podman", None).unwrap();
        assert_eq!(plan.image, "localhost/openshell-busybox:latest");
        assert!(!plan.image_is_default);
        assert_eq!(plan.argv.len(), 4);
        assert!(plan.tty);
        assert_eq!(plan.env["A"], "template");
        assert_eq!(plan.env["B"], "spec", "spec env wins over template env");
        assert_eq!(
            plan.resources,
            Resources {
                cpu_request_millis: Some(250),
                cpu_limit_millis: Some(1500),
                memory_request: Some(32 << 20),
                memory_limit: Some(64 << 20),
            }
        );
    }

    #[test]
    fn the_body_carries_argv_env_labels_and_limits_exactly() {
        let plan = plan(Some(&sandbox()), "podman", None).unwrap();
        let mut ulimits = BTreeMap::new();
        ulimits.insert(
            "nofile".to_owned(),
            Ulimit {
                soft: 20000,
                hard: 20000,
            },
        );
        let body = create_body(&plan, &settings(), &ulimits, None);
        assert_eq!(body["entrypoint"], json!(["sh"]));
        assert_eq!(body["command"], json!(["-c", "echo \"$1\"", "a b"]));
        assert_eq!(body["terminal"], json!(true));
        assert_eq!(body["env"]["OPENSHELL_SANDBOX_ID"], json!(plan.id));
        assert_eq!(body["env"]["OPENSHELL_SANDBOX"], json!("dev box"));
        assert_eq!(body["labels"][LABEL_MANAGED_BY], json!(MANAGED_BY));
        assert_eq!(body["labels"][LABEL_INSTANCE], json!("podman"));
        assert_eq!(body["labels"][LABEL_SANDBOX_ID], json!(plan.id));
        assert_eq!(body["labels"][LABEL_SANDBOX_NAME], json!("dev box"));
        assert_eq!(body["labels"]["team"], json!("x"));
        assert_eq!(
            body["r_limits"],
            json!([{"type": "nofile", "soft": 20000, "hard": 20000}])
        );
        assert_eq!(body["netns"], json!({"nsmode": "bridge"}));
        assert_eq!(body["resource_limits"]["cpu"]["quota"], json!(150_000));
        assert_eq!(body["resource_limits"]["cpu"]["period"], json!(100_000));
        assert_eq!(body["resource_limits"]["cpu"]["shares"], json!(256));
        assert_eq!(body["resource_limits"]["memory"]["limit"], json!(64 << 20));
        assert_eq!(body["name"], json!("openshell-podman-dev-box-3f1c9a2e"));
        assert!(body.get("mounts").is_none());
    }

    #[test]
    fn an_empty_command_keeps_the_image_default() {
        let plan = plan(Some(&with_spec(|s| s.command.clear())), "podman", None).unwrap();
        let body = create_body(&plan, &settings(), &BTreeMap::new(), None);
        assert!(body.get("entrypoint").is_none());
        assert!(body.get("command").is_none());
    }

    #[test]
    fn the_default_image_fills_in() {
        let s = with_template(|t| t.image.clear());
        let plan = plan(Some(&s), "podman", Some("localhost/default:latest")).unwrap();
        assert_eq!(plan.image, "localhost/default:latest");
        assert!(plan.image_is_default);
        match super::plan(Some(&s), "podman", None) {
            Err(Error::FailedPrecondition(message)) => {
                assert!(message.contains("default_image"), "{message}");
            }
            other => panic!("expected FailedPrecondition, got {other:?}"),
        }
    }

    #[test]
    fn bad_inputs_say_what_is_wrong() {
        assert!(
            invalid(&DriverSandbox {
                spec: None,
                ..sandbox()
            })
            .contains("sandbox.spec")
        );
        assert!(
            invalid(&DriverSandbox {
                id: String::new(),
                ..sandbox()
            })
            .contains("sandbox_id")
        );
        assert!(
            invalid(&DriverSandbox {
                id: "../x".into(),
                ..sandbox()
            })
            .contains("not valid")
        );
        assert!(
            invalid(&DriverSandbox {
                name: String::new(),
                ..sandbox()
            })
            .contains("name")
        );
        assert!(invalid(&with_spec(|s| s.command = vec![String::new()])).contains("command[0]"));
        assert!(
            invalid(&with_spec(|s| s.command = vec!["a".into(), "b\0".into()]))
                .contains("command[1]")
        );
        assert!(
            invalid(&with_spec(|s| {
                s.environment.insert("A=B".into(), "x".into());
            }))
            .contains("'='")
        );
        assert!(
            invalid(&with_spec(|s| {
                s.environment.insert(String::new(), "x".into());
            }))
            .contains("empty")
        );
        assert!(
            invalid(&with_spec(|s| {
                s.environment.insert(ENV_SANDBOX_ID.into(), "x".into());
            }))
            .contains("set by the driver")
        );
        assert!(
            invalid(&with_template(|t| t
                .resources
                .as_mut()
                .unwrap()
                .cpu_limit = "lots".into()))
            .contains("limits.cpu")
        );
        assert!(
            invalid(&with_template(|t| t
                .resources
                .as_mut()
                .unwrap()
                .memory_limit = "1Mi".into()))
            .contains("at least")
        );
        assert!(
            invalid(&with_template(|t| t
                .resources
                .as_mut()
                .unwrap()
                .memory_request = "1Gi".into()))
            .contains("above limits.memory")
        );
        assert!(
            invalid(&with_template(|t| t
                .resources
                .as_mut()
                .unwrap()
                .cpu_limit = "1m".into()))
            .contains("smallest")
        );
        assert!(
            invalid(&with_template(|t| {
                t.labels.insert("openshell.sandbox.id".into(), "x".into());
            }))
            .contains("reserved")
        );
        assert!(invalid(&with_template(|t| t.image = "a b".into())).contains("template.image"));
        assert!(
            invalid(&with_template(|t| t.agent_socket_path = "/x".into())).contains("agent_socket")
        );
        let driver_config = prost_types::Struct {
            fields: [(
                "gpu".to_owned(),
                prost_types::Value {
                    kind: Some(Kind::BoolValue(true)),
                },
            )]
            .into(),
        };
        assert!(
            invalid(&with_template(|t| t.driver_config = Some(driver_config)))
                .contains("template.driver_config.podman.gpu")
        );
        let policy = |kind: Kind| prost_types::Struct {
            fields: [(
                "image_pull_policy".to_owned(),
                prost_types::Value { kind: Some(kind) },
            )]
            .into(),
        };
        let bad_name = policy(Kind::StringValue("sometimes".into()));
        let message = invalid(&with_template(|t| t.driver_config = Some(bad_name)));
        assert!(
            message.contains("template.driver_config.podman.image_pull_policy")
                && message.contains("sometimes"),
            "{message}"
        );
        let not_text = policy(Kind::BoolValue(true));
        assert!(invalid(&with_template(|t| t.driver_config = Some(not_text))).contains("a string"));
        let good = with_template(|t| {
            t.driver_config = Some(policy(Kind::StringValue("always".into())));
        });
        assert_eq!(
            plan(Some(&good), "podman", None).unwrap().pull_policy,
            Some(PullPolicy::Always)
        );
    }

    #[test]
    fn gpus_are_a_precondition_failure() {
        let s = with_spec(|s| {
            s.resource_requirements = Some(ResourceRequirements {
                gpu: Some(GpuResourceRequirements { count: Some(1) }),
            });
        });
        assert!(matches!(
            plan(Some(&s), "podman", None),
            Err(Error::FailedPrecondition(m)) if m.contains("GPU")
        ));
    }

    #[test]
    fn platform_config_annotations_apply_and_unsupported_keys_are_refused() {
        let text = |s: &str| prost_types::Value {
            kind: Some(Kind::StringValue(s.into())),
        };
        let annotations = prost_types::Struct {
            fields: [("a".to_owned(), text("1"))].into(),
        };
        let config = prost_types::Struct {
            fields: [
                (
                    "annotations".to_owned(),
                    prost_types::Value {
                        kind: Some(Kind::StructValue(annotations)),
                    },
                ),
                ("some_future_key".to_owned(), text("x")),
            ]
            .into(),
        };
        let s = with_template(|t| t.platform_config = Some(config));
        let plan = plan(Some(&s), "podman", None).unwrap();
        assert_eq!(plan.annotations["a"], "1");

        let runtime = prost_types::Struct {
            fields: [("runtime_class_name".to_owned(), text("kata"))].into(),
        };
        assert!(invalid(&with_template(|t| t.platform_config = Some(runtime))).contains("runtime"));
    }

    #[test]
    fn container_names_are_valid_and_distinct() {
        assert_eq!(
            container_name("podman", "my sandbox/1", "ab-cd-ef-12-34"),
            "openshell-podman-my-sandbox-1-abcdef12"
        );
        assert_ne!(
            container_name("podman", "x", "11111111-a"),
            container_name("podman", "x", "22222222-a")
        );
    }

    #[test]
    fn ownership_needs_both_labels() {
        let mut labels = BTreeMap::new();
        labels.insert(LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned());
        labels.insert(LABEL_SANDBOX_ID.to_owned(), "s".to_owned());
        assert!(!owned_by(Some(&labels), "podman"));
        labels.insert(LABEL_INSTANCE.to_owned(), "external-podman".to_owned());
        assert!(!owned_by(Some(&labels), "podman"));
        assert!(owned_by(Some(&labels), "external-podman"));
        assert!(!owned_by(None, "podman"));
    }

    #[test]
    fn the_token_is_mounted_read_only() {
        let plan = plan(Some(&sandbox()), "podman", None).unwrap();
        let body = create_body(
            &plan,
            &settings(),
            &BTreeMap::new(),
            Some(Path::new("/s/t")),
        );
        assert_eq!(body["mounts"][0]["destination"], json!(TOKEN_MOUNT));
        assert_eq!(body["mounts"][0]["options"][0], json!("ro"));
        assert_eq!(body["env"][ENV_TOKEN_FILE], json!(TOKEN_MOUNT));
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn step_identity() {
        let mut s = sandbox();
        assert!(check_identity(&s).is_ok());
        s.workspace = "a\nb".into();
        assert!(check_identity(&s).is_err());
        s = sandbox();
        s.name.clear();
        assert!(check_identity(&s).is_err());
    }

    #[test]
    fn step_image() {
        assert_eq!(
            resolve_image("  busybox ", "p", Some("d")).unwrap(),
            ("busybox".to_owned(), false)
        );
        assert_eq!(
            resolve_image("", "p", Some("localhost/d:1")).unwrap(),
            ("localhost/d:1".to_owned(), true)
        );
        assert!(matches!(
            resolve_image(" ", "p", None),
            Err(Error::FailedPrecondition(m)) if m.contains("default_image")
        ));
    }

    #[test]
    fn step_command() {
        assert!(check_command(&[]).is_ok());
        assert!(check_command(&["sh".into(), String::new()]).is_ok());
        assert!(check_command(&[String::new()]).is_err());
        assert!(check_command(&["sh".into(), "a\0".into()]).is_err());
    }

    #[test]
    fn step_env_puts_the_spec_over_the_template() {
        let env = request_env(&map(&[("A", "t"), ("B", "t")]), &map(&[("B", "s")])).unwrap();
        assert_eq!(env, map(&[("A", "t"), ("B", "s")]));
        let error = request_env(&map(&[]), &map(&[(ENV_SANDBOX_ID, "x")])).unwrap_err();
        assert!(error.to_string().contains("spec.environment"), "{error}");
    }

    #[test]
    fn step_labels_keep_out_of_the_reserved_prefix() {
        assert_eq!(
            user_labels(&map(&[("team", "x")])).unwrap(),
            map(&[("team", "x")])
        );
        assert!(user_labels(&map(&[("openshell.sandbox.id", "x")])).is_err());
        assert!(user_labels(&map(&[("a=b", "x")])).is_err());
        assert!(user_labels(&map(&[("a", "x\ny")])).is_err());
    }

    #[test]
    fn step_resources_and_limits() {
        let r = resources(&DriverResourceRequirements {
            cpu_request: "250m".into(),
            cpu_limit: "2".into(),
            memory_request: String::new(),
            memory_limit: "64Mi".into(),
        })
        .unwrap();
        assert_eq!(
            r,
            Resources {
                cpu_request_millis: Some(250),
                cpu_limit_millis: Some(2000),
                memory_request: None,
                memory_limit: Some(64 * 1024 * 1024),
            }
        );
        let limits = resource_limits(&r).unwrap();
        assert_eq!(limits["cpu"]["quota"], 200_000);
        assert_eq!(limits["cpu"]["period"], CPU_PERIOD_US);
        assert_eq!(limits["cpu"]["shares"], 256);
        assert_eq!(limits["memory"]["limit"], 64 * 1024 * 1024);
        assert!(limits["memory"].get("reservation").is_none());
        assert!(resource_limits(&Resources::default()).is_none());

        let too_small = DriverResourceRequirements {
            memory_limit: "1Mi".into(),
            ..Default::default()
        };
        assert!(resources(&too_small).is_err());
        let inverted = DriverResourceRequirements {
            cpu_request: "2".into(),
            cpu_limit: "1".into(),
            ..Default::default()
        };
        assert!(resources(&inverted).is_err());
    }

    #[test]
    fn step_container_labels_env_and_mounts() {
        let plan = plan(Some(&sandbox()), "podman", None).unwrap();
        let labels = container_labels(&plan, "podman");
        assert_eq!(labels[LABEL_INSTANCE], "podman");
        assert_eq!(labels[LABEL_SANDBOX_ID], plan.id);
        assert_eq!(labels["team"], "x");
        assert!(owned_by(Some(&labels), "podman"));

        let env = container_env(&plan, false);
        assert_eq!(env[ENV_SANDBOX_NAME], "dev box");
        assert!(!env.contains_key(ENV_TOKEN_FILE));
        assert_eq!(container_env(&plan, true)[ENV_TOKEN_FILE], TOKEN_MOUNT);

        let mounts = token_mounts(Path::new("/state/token"));
        assert_eq!(mounts[0]["destination"], TOKEN_MOUNT);
        assert_eq!(mounts[0]["options"], json!(["ro", "rbind"]));
    }
}
