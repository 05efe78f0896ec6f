//! Checks on public requests, each failing with a message that says what
//! was wrong and what is allowed. Input quoted back in a message is cut to
//! [`ECHO_BYTES`], so an oversized request cannot make an oversized error.
//!
//! Size limits of one sandbox's request (`openshell_wire::limits`):
//!
//! | what | limit |
//! |---|---|
//! | name | 63 characters |
//! | `spec.command` | 4096 arguments, 256 KiB (each argument + 1) |
//! | `spec.env` | 4096 variables, 256 KiB (each `NAME=value` + 1) |
//! | labels | 64; keys and values 253 bytes each |
//! | `spec.image` | 1024 bytes |
//! | `spec.resources` | 64 bytes per quantity |
//! | the whole request (spec and labels, encoded) | 512 KiB |

use std::collections::HashMap;

use openshell_driver_kit::contract::truncate;
use openshell_proto::gateway::v1 as gw;
use openshell_wire::limits::{
    ECHO_BYTES, MAX_COMMAND_ARGS, MAX_COMMAND_BYTES, MAX_ENV_BYTES, MAX_ENV_VARS, MAX_LABELS,
    MAX_SANDBOX_REQUEST_BYTES,
};
use prost::Message as _;

/// Longest sandbox name (a DNS label).
pub const MAX_NAME_LEN: usize = 63;
/// Longest driver name.
pub const MAX_DRIVER_LEN: usize = 63;
/// Longest sandbox id a request may carry (the gateway's are UUIDs).
pub const MAX_ID_LEN: usize = 128;
const MAX_LABEL_KEY: usize = 253;
const MAX_LABEL_VALUE: usize = 253;
const MAX_IMAGE_LEN: usize = 1024;

/// `text` as a message quotes it: cut to [`ECHO_BYTES`], in quotes, with
/// control characters escaped.
pub fn quote(text: &str) -> String {
    format!("{:?}", truncate(text, ECHO_BYTES))
}

/// A sandbox name: 1-63 characters of `[a-z0-9-]`, starting with a letter,
/// not ending with `-`.
pub fn sandbox_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("sandbox name is required".to_owned());
    }
    let quoted = quote(name);
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "sandbox name {quoted} is {} characters; the limit is {MAX_NAME_LEN}",
            name.len()
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        let hint = if bad.is_ascii_uppercase() {
            format!(" (use lowercase: {:?})", name.to_ascii_lowercase())
        } else {
            String::new()
        };
        return Err(format!(
            "sandbox name {quoted} contains {bad:?}; use lowercase letters, digits and '-'{hint}"
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(format!("sandbox name {quoted} must start with a letter"));
    }
    if name.ends_with('-') {
        return Err(format!("sandbox name {quoted} must not end with '-'"));
    }
    Ok(())
}

/// A driver name in a request: at most 63 characters, no control
/// characters. (Whether it is configured is decided later.)
pub fn driver_name(driver: &str) -> Result<(), String> {
    if driver.len() > MAX_DRIVER_LEN {
        return Err(format!(
            "driver name {} is {} characters; the limit is {MAX_DRIVER_LEN}",
            quote(driver),
            driver.len()
        ));
    }
    if driver.chars().any(char::is_control) {
        return Err(format!(
            "driver name {} contains control characters",
            quote(driver)
        ));
    }
    Ok(())
}

/// A sandbox reference's id: at most 128 characters, no control characters.
pub fn sandbox_id(id: &str) -> Result<(), String> {
    if id.len() > MAX_ID_LEN {
        return Err(format!(
            "sandbox id {} is {} characters; the limit is {MAX_ID_LEN}",
            quote(id),
            id.len()
        ));
    }
    if id.chars().any(char::is_control) {
        return Err(format!(
            "sandbox id {} contains control characters",
            quote(id)
        ));
    }
    Ok(())
}

/// The main-process argv: passed to `execve` as is, so no NUL bytes, a
/// non-empty program, and a bounded size.
pub fn command(argv: &[String]) -> Result<(), String> {
    if let Some(first) = argv.first()
        && first.is_empty()
    {
        return Err("spec.command[0] is empty; the first element is the program to run".to_owned());
    }
    if argv.len() > MAX_COMMAND_ARGS {
        return Err(format!(
            "spec.command has {} arguments; the limit is {MAX_COMMAND_ARGS}",
            argv.len()
        ));
    }
    if let Some(index) = argv.iter().position(|a| a.contains('\0')) {
        return Err(format!(
            "spec.command[{index}] contains a NUL byte, which cannot be passed to a program"
        ));
    }
    let total: usize = argv.iter().map(|a| a.len() + 1).sum();
    if total > MAX_COMMAND_BYTES {
        return Err(format!(
            "spec.command is {total} bytes (each argument counts its length + 1); the limit is \
             {MAX_COMMAND_BYTES}"
        ));
    }
    Ok(())
}

/// Environment variable names and values, and their total size.
pub fn env(env: &HashMap<String, String>) -> Result<(), String> {
    if env.len() > MAX_ENV_VARS {
        return Err(format!(
            "spec.env has {} variables; the limit is {MAX_ENV_VARS}",
            env.len()
        ));
    }
    let total: usize = env.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    if total > MAX_ENV_BYTES {
        return Err(format!(
            "spec.env is {total} bytes (each variable counts NAME=value + 1); the limit is \
             {MAX_ENV_BYTES}"
        ));
    }
    let mut keys: Vec<&String> = env.keys().collect();
    keys.sort();
    for key in keys {
        if key.is_empty() {
            return Err("spec.env has an empty variable name".to_owned());
        }
        if key.contains('=') || key.contains('\0') {
            return Err(format!(
                "spec.env name {} contains '=' or a NUL byte, which a variable name cannot hold",
                quote(key)
            ));
        }
        if env[key].contains('\0') {
            return Err(format!(
                "spec.env value of {} contains a NUL byte",
                quote(key)
            ));
        }
    }
    Ok(())
}

fn label_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("label keys must not be empty".to_owned());
    }
    let quoted = quote(key);
    if key.len() > MAX_LABEL_KEY {
        return Err(format!(
            "label key {quoted} is {} characters; the limit is {MAX_LABEL_KEY}",
            key.len()
        ));
    }
    if let Some(bad) = key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')))
    {
        return Err(format!(
            "label key {quoted} contains {bad:?}; use letters, digits, '.', '_', '-' and '/'"
        ));
    }
    if !key.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !key.ends_with(|c: char| c.is_ascii_alphanumeric())
    {
        return Err(format!(
            "label key {quoted} must start and end with a letter or digit"
        ));
    }
    Ok(())
}

/// Label keys (Kubernetes-like) and values (printable, bounded).
pub fn labels(labels: &HashMap<String, String>) -> Result<(), String> {
    if labels.len() > MAX_LABELS {
        return Err(format!(
            "there are {} labels; the limit is {MAX_LABELS}",
            labels.len()
        ));
    }
    label_filter(labels)
}

/// Label keys and values, without a limit on their number (a list filter).
pub fn label_filter(labels: &HashMap<String, String>) -> Result<(), String> {
    let mut keys: Vec<&String> = labels.keys().collect();
    keys.sort();
    for key in keys {
        label_key(key)?;
        let value = &labels[key];
        if value.len() > MAX_LABEL_VALUE {
            return Err(format!(
                "label {} has a value of {} characters; the limit is {MAX_LABEL_VALUE}",
                quote(key),
                value.len()
            ));
        }
        if value.chars().any(char::is_control) {
            return Err(format!(
                "label {} has a value with control characters",
                quote(key)
            ));
        }
    }
    Ok(())
}

/// The whole request: spec and labels, as encoded, within
/// [`MAX_SANDBOX_REQUEST_BYTES`].
pub fn request_size(
    spec: Option<&gw::SandboxSpec>,
    labels: &HashMap<String, String>,
) -> Result<(), String> {
    let spec_bytes = spec.map_or(0, prost::Message::encoded_len);
    let label_bytes = gw::CreateSandboxRequest {
        labels: labels.clone(),
        ..Default::default()
    }
    .encoded_len();
    let total = spec_bytes + label_bytes;
    if total > MAX_SANDBOX_REQUEST_BYTES {
        return Err(format!(
            "the sandbox's spec and labels take {total} bytes; the limit is \
             {MAX_SANDBOX_REQUEST_BYTES}"
        ));
    }
    Ok(())
}

/// Every check of a create request that needs no driver.
pub fn create_request(request: &gw::CreateSandboxRequest) -> Result<(), String> {
    sandbox_name(&request.name)?;
    driver_name(&request.driver)?;
    if let Some(spec) = &request.spec {
        command(&spec.command)?;
        env(&spec.env)?;
        image(&spec.image)?;
        resources(spec.resources.as_ref())?;
    }
    labels(&request.labels)?;
    request_size(request.spec.as_ref(), &request.labels)
}

/// Image references: no whitespace or control characters, bounded length.
pub fn image(image: &str) -> Result<(), String> {
    if image.len() > MAX_IMAGE_LEN {
        return Err(format!(
            "spec.image is {} characters; the limit is {MAX_IMAGE_LEN}",
            image.len()
        ));
    }
    if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "spec.image {} contains whitespace or control characters",
            quote(image)
        ));
    }
    Ok(())
}

/// Resource quantities: short, printable, no whitespace; the driver checks
/// the unit.
pub fn resources(resources: Option<&gw::Resources>) -> Result<(), String> {
    let Some(r) = resources else {
        return Ok(());
    };
    for (field, value) in [
        ("cpu_request", &r.cpu_request),
        ("cpu_limit", &r.cpu_limit),
        ("memory_request", &r.memory_request),
        ("memory_limit", &r.memory_limit),
    ] {
        if value.len() > 64 || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "spec.resources.{field} {} is not a quantity such as \"500m\", \"2\" or \"4Gi\"",
                quote(value)
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_names() {
        for good in ["a", "dev", "dev-1", "a1b2", &"a".repeat(63)] {
            assert!(sandbox_name(good).is_ok(), "{good}");
        }
        let cases = [
            ("", "required"),
            ("Dev", "use lowercase: \"dev\""),
            ("1dev", "start with a letter"),
            ("-dev", "start with a letter"),
            ("dev-", "must not end with '-'"),
            ("dev_1", "contains '_'"),
            ("dev.1", "contains '.'"),
            ("dév", "contains 'é'"),
        ];
        for (name, expected) in cases {
            let err = sandbox_name(name).unwrap_err();
            assert!(err.contains(expected), "{name}: {err}");
        }
        let err = sandbox_name(&"a".repeat(64)).unwrap_err();
        assert!(err.contains("limit is 63"), "{err}");
    }

    #[test]
    fn argv() {
        assert!(command(&[]).is_ok());
        assert!(command(&["sh".into(), "-c".into(), String::new()]).is_ok());
        assert!(
            command(&[String::new()])
                .unwrap_err()
                .contains("command[0] is empty")
        );
        assert!(
            command(&["echo".into(), "a\0b".into()])
                .unwrap_err()
                .contains("command[1] contains a NUL")
        );
        assert!(
            command(&["x".repeat(300 * 1024)])
                .unwrap_err()
                .contains("limit is")
        );
    }

    #[test]
    fn env_and_labels() {
        let env_map = |k: &str, v: &str| HashMap::from([(k.to_owned(), v.to_owned())]);
        assert!(env(&env_map("PATH", "/bin")).is_ok());
        assert!(
            env(&env_map("", "x"))
                .unwrap_err()
                .contains("empty variable name")
        );
        assert!(env(&env_map("A=B", "x")).unwrap_err().contains("'='"));
        assert!(env(&env_map("A", "x\0")).unwrap_err().contains("NUL"));
        assert!(labels(&env_map("team", "infra")).is_ok());
        assert!(labels(&env_map("example.com/team", "")).is_ok());
        assert!(
            labels(&env_map("", "x"))
                .unwrap_err()
                .contains("must not be empty")
        );
        assert!(
            labels(&env_map("a b", "x"))
                .unwrap_err()
                .contains("contains ' '")
        );
        assert!(
            labels(&env_map("-a", "x"))
                .unwrap_err()
                .contains("start and end")
        );
        assert!(
            labels(&env_map("a", "x\ny"))
                .unwrap_err()
                .contains("control")
        );
    }

    #[test]
    fn images_and_resources() {
        assert!(image("").is_ok());
        assert!(image("docker.io/library/busybox:1.36").is_ok());
        assert!(image("busy box").unwrap_err().contains("whitespace"));
        let r = gw::Resources {
            cpu_limit: "2 cores".into(),
            ..Default::default()
        };
        assert!(resources(Some(&r)).unwrap_err().contains("cpu_limit"));
        assert!(resources(None).is_ok());
    }
}
