//! Checks on public requests, each failing with a message that says what
//! was wrong and what is allowed.

use std::collections::HashMap;

use openshell_proto::gateway::v1 as gw;

/// Longest sandbox name (a DNS label).
pub const MAX_NAME_LEN: usize = 63;
const MAX_ARGV_BYTES: usize = 256 * 1024;
const MAX_LABEL_KEY: usize = 253;
const MAX_LABEL_VALUE: usize = 253;
const MAX_IMAGE_LEN: usize = 1024;

/// A sandbox name: 1-63 characters of `[a-z0-9-]`, starting with a letter,
/// not ending with `-`.
pub fn sandbox_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("sandbox name is required".to_owned());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "sandbox name {name:?} is {} characters; the limit is {MAX_NAME_LEN}",
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
            "sandbox name {name:?} contains {bad:?}; use lowercase letters, digits and '-'{hint}"
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(format!("sandbox name {name:?} must start with a letter"));
    }
    if name.ends_with('-') {
        return Err(format!("sandbox name {name:?} must not end with '-'"));
    }
    Ok(())
}

/// The main-process argv: passed to `execve` as is, so no NUL bytes, a
/// non-empty program, and a sane total size.
pub fn command(argv: &[String]) -> Result<(), String> {
    if let Some(first) = argv.first()
        && first.is_empty()
    {
        return Err("spec.command[0] is empty; the first element is the program to run".to_owned());
    }
    if let Some(index) = argv.iter().position(|a| a.contains('\0')) {
        return Err(format!(
            "spec.command[{index}] contains a NUL byte, which cannot be passed to a program"
        ));
    }
    let total: usize = argv.iter().map(|a| a.len() + 1).sum();
    if total > MAX_ARGV_BYTES {
        return Err(format!(
            "spec.command is {total} bytes; the limit is {MAX_ARGV_BYTES}"
        ));
    }
    Ok(())
}

/// Environment variable names and values.
pub fn env(env: &HashMap<String, String>) -> Result<(), String> {
    let mut keys: Vec<&String> = env.keys().collect();
    keys.sort();
    for key in keys {
        if key.is_empty() {
            return Err("spec.env has an empty variable name".to_owned());
        }
        if key.contains('=') || key.contains('\0') {
            return Err(format!(
                "spec.env name {key:?} contains '=' or a NUL byte, which a variable name cannot hold"
            ));
        }
        if env[key].contains('\0') {
            return Err(format!("spec.env value of {key:?} contains a NUL byte"));
        }
    }
    Ok(())
}

fn label_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("label keys must not be empty".to_owned());
    }
    if key.len() > MAX_LABEL_KEY {
        return Err(format!(
            "label key {key:?} is {} characters; the limit is {MAX_LABEL_KEY}",
            key.len()
        ));
    }
    if let Some(bad) = key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')))
    {
        return Err(format!(
            "label key {key:?} contains {bad:?}; use letters, digits, '.', '_', '-' and '/'"
        ));
    }
    if !key.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !key.ends_with(|c: char| c.is_ascii_alphanumeric())
    {
        return Err(format!(
            "label key {key:?} must start and end with a letter or digit"
        ));
    }
    Ok(())
}

/// Label keys (Kubernetes-like) and values (printable, bounded).
pub fn labels(labels: &HashMap<String, String>) -> Result<(), String> {
    let mut keys: Vec<&String> = labels.keys().collect();
    keys.sort();
    for key in keys {
        label_key(key)?;
        let value = &labels[key];
        if value.len() > MAX_LABEL_VALUE {
            return Err(format!(
                "label {key:?} has a value of {} characters; the limit is {MAX_LABEL_VALUE}",
                value.len()
            ));
        }
        if value.chars().any(char::is_control) {
            return Err(format!("label {key:?} has a value with control characters"));
        }
    }
    Ok(())
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
            "spec.image {image:?} contains whitespace or control characters"
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
                "spec.resources.{field} {value:?} is not a quantity such as \"500m\", \"2\" or \"4Gi\""
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
