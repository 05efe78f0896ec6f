//! Turning a `DriverSandbox` into what one VM boots, with every check a
//! create request gets before anything is written.
//!
//! The guest command and environment travel on the guest kernel command
//! line (libkrun hands them to its init that way), which limits them to
//! printable ASCII without double quotes and to a total size the kernel
//! keeps (2048 bytes on x86, part of it taken by libkrun).

use std::collections::BTreeMap;

use openshell_proto::compute::v1::DriverSandbox;
use prost_types::value::Kind;

use crate::config::{Config, MAX_MEM_MIB, MIN_MEM_MIB};
use crate::error::{Error, Result};
use crate::ids::SandboxId;
use crate::image::ImageConfig;

/// Bytes of the guest kernel command line the sandbox's command,
/// environment and working directory may take.
pub const CMDLINE_BUDGET: usize = 1536;
/// `PATH` for guests whose image sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Guest command when neither the request nor the image names one.
pub const DEFAULT_COMMAND: &str = "/bin/sh";

/// A create request that passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub id: SandboxId,
    pub name: String,
    /// The image reference to resolve (request or driver default).
    pub image: String,
    /// Exact argv; empty means the image's default.
    pub command: Vec<String>,
    /// Template environment overlaid by the spec's.
    pub env: BTreeMap<String, String>,
    pub log_level: String,
    pub vcpus: u8,
    pub mem_mib: u32,
    pub token: Option<String>,
}

/// What the guest runs, once the image is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestCommand {
    pub exec: String,
    pub args: Vec<String>,
    /// `KEY=VALUE`, sorted by key.
    pub env: Vec<String>,
    pub workdir: String,
}

fn invalid(message: String) -> Error {
    Error::InvalidArgument(message)
}

/// Checks a value that ends up on the kernel command line.
fn cmdline_safe(what: &str, value: &str) -> Result<()> {
    if let Some(bad) = value.chars().find(|c| !matches!(c, ' '..='~') || *c == '"') {
        return Err(invalid(format!(
            "{what} contains {bad:?}; VM sandboxes pass the command and environment on the guest \
             kernel command line, which holds printable ASCII without double quotes; put such \
             values in a file in the image instead"
        )));
    }
    Ok(())
}

fn check_env_key(key: &str) -> Result<()> {
    let mut bytes = key.bytes();
    let ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "environment variable name {key:?} is invalid; use letters, digits and `_`, not \
             starting with a digit"
        )))
    }
}

/// Validates a create (or validate) request against the driver settings.
pub fn validate(sandbox: Option<&DriverSandbox>, config: &Config) -> Result<Request> {
    let sandbox = sandbox.ok_or_else(|| invalid("sandbox is required".to_owned()))?;
    let id = SandboxId::parse(&sandbox.id)?;
    let spec = sandbox
        .spec
        .as_ref()
        .ok_or_else(|| invalid("sandbox spec is required".to_owned()))?;
    if sandbox.name.is_empty() {
        return Err(invalid("sandbox name is required".to_owned()));
    }
    let template = spec.template.clone().unwrap_or_default();

    if spec
        .resource_requirements
        .as_ref()
        .is_some_and(|r| r.gpu.is_some())
    {
        return Err(Error::FailedPrecondition(
            "GPU passthrough is not supported by the VM driver".to_owned(),
        ));
    }
    if !template.agent_socket_path.is_empty() {
        return Err(Error::FailedPrecondition(
            "template.agent_socket_path is not supported by the VM driver".to_owned(),
        ));
    }
    if let Some(platform) = &template.platform_config {
        let unsupported: Vec<&str> = platform
            .fields
            .keys()
            .map(String::as_str)
            .filter(|k| *k != "annotations")
            .collect();
        if !unsupported.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "platform settings {} are not supported by the VM driver",
                unsupported.join(", ")
            )));
        }
    }

    if !config.admission.allow_driver_config
        && template
            .driver_config
            .as_ref()
            .is_some_and(|c| !c.fields.is_empty())
    {
        return Err(Error::FailedPrecondition(
            "caller driver config is disabled; a gateway administrator must enable \
             allow_driver_config"
                .to_owned(),
        ));
    }

    let image = if template.image.trim().is_empty() {
        config.default_image.clone().ok_or_else(|| {
            Error::FailedPrecondition(
                "VM sandboxes need template.image or a configured default_image".to_owned(),
            )
        })?
    } else {
        template.image.trim().to_owned()
    };

    let mut env = BTreeMap::new();
    for (key, value) in template.environment.iter().chain(spec.environment.iter()) {
        check_env_key(key)?;
        cmdline_safe(&format!("environment variable {key}"), value)?;
        env.insert(key.clone(), value.clone());
    }
    for (i, arg) in spec.command.iter().enumerate() {
        cmdline_safe(&format!("command argument {i}"), arg)?;
    }
    if let Some(program) = spec.command.first()
        && (program.is_empty() || program.contains(' '))
    {
        return Err(invalid(format!(
            "command program {program:?} must be non-empty and contain no spaces"
        )));
    }
    cmdline_safe("log_level", &spec.log_level)?;

    let mut vcpus = config.vcpus;
    let mut mem_mib = config.mem_mib;
    if let Some(resources) = &template.resources {
        let cpu = first_non_empty(&resources.cpu_limit, &resources.cpu_request);
        if let Some(cpu) = cpu {
            vcpus = parse_cpu(cpu)?;
        }
        let memory = first_non_empty(&resources.memory_limit, &resources.memory_request);
        if let Some(memory) = memory {
            mem_mib = parse_memory_mib(memory)?;
        }
    }
    if let Some(driver_config) = &template.driver_config {
        for (key, value) in &driver_config.fields {
            match key.as_str() {
                "vcpus" => {
                    vcpus = struct_integer(key, value, 1, 255)?
                        .try_into()
                        .unwrap_or(u8::MAX);
                }
                "mem_mib" => {
                    mem_mib =
                        struct_integer(key, value, u64::from(MIN_MEM_MIB), u64::from(MAX_MEM_MIB))?
                            .try_into()
                            .unwrap_or(MAX_MEM_MIB);
                }
                other => {
                    return Err(invalid(format!(
                        "unknown VM driver_config key {other:?}; the VM driver accepts vcpus and \
                         mem_mib"
                    )));
                }
            }
        }
    }

    let token = (!spec.sandbox_token.is_empty()).then(|| spec.sandbox_token.clone());
    Ok(Request {
        name: sandbox.name.clone(),
        id,
        image,
        command: spec.command.clone(),
        env,
        log_level: spec.log_level.clone(),
        vcpus,
        mem_mib,
        token,
    })
}

fn first_non_empty<'a>(a: &'a str, b: &'a str) -> Option<&'a str> {
    [a, b].into_iter().map(str::trim).find(|s| !s.is_empty())
}

fn struct_integer(key: &str, value: &prost_types::Value, min: u64, max: u64) -> Result<u64> {
    let number = match &value.kind {
        Some(Kind::NumberValue(n)) => *n,
        _ => return Err(invalid(format!("driver_config.{key} must be a number"))),
    };
    if number.fract() != 0.0 || number < min as f64 || number > max as f64 {
        return Err(invalid(format!(
            "driver_config.{key} must be a whole number from {min} to {max}, not {number}"
        )));
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "checked above: a whole number within min..=max, both u64"
    )]
    Ok(number as u64)
}

/// A Kubernetes CPU quantity ("2", "1.5", "500m") as whole vCPUs, rounded
/// up.
pub fn parse_cpu(quantity: &str) -> Result<u8> {
    let bad = || {
        invalid(format!(
            "CPU quantity {quantity:?} is invalid; use cores such as \"2\" or \"500m\""
        ))
    };
    let millis: u64 = if let Some(m) = quantity.strip_suffix('m') {
        m.parse().map_err(|_| bad())?
    } else {
        let (whole, frac) = quantity.split_once('.').unwrap_or((quantity, ""));
        let whole: u64 = whole.parse().map_err(|_| bad())?;
        let frac_millis = if frac.is_empty() {
            0
        } else {
            let digits: String = frac.chars().chain("000".chars()).take(3).collect();
            if !frac.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            let rounded_up = u64::from(frac.len() > 3 && frac[3..].bytes().any(|b| b != b'0'));
            digits.parse::<u64>().map_err(|_| bad())? + rounded_up
        };
        whole.saturating_mul(1000).saturating_add(frac_millis)
    };
    if millis == 0 {
        return Err(invalid(format!(
            "CPU quantity {quantity:?} must be more than zero"
        )));
    }
    let cores = millis.div_ceil(1000);
    u8::try_from(cores)
        .map_err(|_| invalid(format!("CPU quantity {quantity:?} is more than 255 vCPUs")))
}

/// A Kubernetes memory quantity ("512Mi", "1Gi", "1G", "1000000") in MiB,
/// rounded up.
pub fn parse_memory_mib(quantity: &str) -> Result<u32> {
    let bad = || {
        invalid(format!(
            "memory quantity {quantity:?} is invalid; use e.g. \"512Mi\" or \"2Gi\""
        ))
    };
    const UNITS: [(&str, u64); 10] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("K", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
        ("", 1),
    ];
    let (number, factor) = UNITS
        .iter()
        .find_map(|(suffix, factor)| {
            quantity
                .strip_suffix(suffix)
                .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .map(|n| (n, *factor))
        })
        .ok_or_else(bad)?;
    let bytes = number
        .parse::<u64>()
        .map_err(|_| bad())?
        .checked_mul(factor)
        .ok_or_else(bad)?;
    let mib = bytes.div_ceil(1 << 20);
    let mib = u32::try_from(mib).unwrap_or(u32::MAX);
    if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mib) {
        return Err(invalid(format!(
            "memory quantity {quantity:?} is {mib} MiB; VM sandboxes take {MIN_MEM_MIB} MiB to \
             {MAX_MEM_MIB} MiB"
        )));
    }
    Ok(mib)
}

/// Combines the request with the image's defaults into the guest command,
/// and checks the result against the kernel command-line budget.
pub fn guest_command(
    request: &Request,
    image: &ImageConfig,
    has_token: bool,
) -> Result<GuestCommand> {
    let argv: Vec<String> = if !request.command.is_empty() {
        request.command.clone()
    } else {
        let default: Vec<String> = image.entrypoint.iter().chain(&image.cmd).cloned().collect();
        if default.is_empty() {
            vec![DEFAULT_COMMAND.to_owned()]
        } else {
            default
        }
    };
    let (exec, args) = argv
        .split_first()
        .map(|(e, a)| (e.clone(), a.to_vec()))
        .unwrap_or_else(|| (DEFAULT_COMMAND.to_owned(), Vec::new()));
    if exec.is_empty() || exec.contains(' ') {
        return Err(invalid(format!(
            "the image's command {exec:?} must be non-empty and contain no spaces"
        )));
    }
    for (i, arg) in args.iter().enumerate() {
        cmdline_safe(&format!("command argument {}", i + 1), arg)?;
    }

    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for pair in &image.env {
        if let Some((key, value)) = pair.split_once('=')
            && check_env_key(key).is_ok()
        {
            cmdline_safe(&format!("image environment variable {key}"), value)?;
            env.insert(key.to_owned(), value.to_owned());
        }
    }
    env.extend(request.env.clone());
    env.entry("PATH".into())
        .or_insert_with(|| DEFAULT_PATH.to_owned());
    env.entry("HOME".into())
        .or_insert_with(|| "/root".to_owned());
    env.entry("TERM".into())
        .or_insert_with(|| "linux".to_owned());
    env.insert(
        "OPENSHELL_SANDBOX_ID".into(),
        request.id.as_str().to_owned(),
    );
    cmdline_safe("sandbox name", &request.name)?;
    env.insert("OPENSHELL_SANDBOX".into(), request.name.clone());
    if !request.log_level.is_empty() {
        env.insert("OPENSHELL_LOG_LEVEL".into(), request.log_level.clone());
    }
    if has_token {
        env.insert(
            "OPENSHELL_SANDBOX_TOKEN_FILE".into(),
            format!(
                "/{}/{}",
                crate::launch::GUEST_DIR,
                crate::launch::TOKEN_FILE
            ),
        );
    }

    let workdir = if image.working_dir.is_empty() {
        "/".to_owned()
    } else {
        image.working_dir.clone()
    };
    if workdir.contains(' ') || !workdir.starts_with('/') {
        return Err(invalid(format!(
            "the image's working directory {workdir:?} must be absolute and contain no spaces"
        )));
    }
    cmdline_safe("working directory", &workdir)?;

    let env: Vec<String> = env.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    // Each item is written as ` "item"`; exec and workdir as KRUN_* words.
    let size: usize = env.iter().chain(&args).map(|s| s.len() + 3).sum::<usize>()
        + exec.len()
        + workdir.len()
        + 32;
    if size > CMDLINE_BUDGET {
        return Err(invalid(format!(
            "the command and environment take {size} bytes; a VM sandbox passes them on the \
             guest kernel command line, which leaves {CMDLINE_BUDGET} bytes for them; shorten \
             them or move large values into a file in the image"
        )));
    }
    Ok(GuestCommand {
        exec,
        args,
        env,
        workdir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use openshell_proto::compute::v1::{
        DriverResourceRequirements, DriverSandboxSpec, DriverSandboxTemplate,
        GpuResourceRequirements, ResourceRequirements,
    };

    fn config() -> Config {
        crate::config::ConfigArgs {
            state_dir: Some("/tmp/s".into()),
            default_image: Some("rootfs:/srv/default".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap()
    }

    fn sandbox(spec: DriverSandboxSpec) -> DriverSandbox {
        DriverSandbox {
            id: "s-1".into(),
            name: "demo".into(),
            spec: Some(spec),
            ..Default::default()
        }
    }

    fn with_template(template: DriverSandboxTemplate) -> DriverSandbox {
        sandbox(DriverSandboxSpec {
            template: Some(template),
            ..Default::default()
        })
    }

    #[test]
    fn a_plain_request_takes_driver_defaults() {
        let request = validate(Some(&sandbox(DriverSandboxSpec::default())), &config()).unwrap();
        assert_eq!(request.image, "rootfs:/srv/default");
        assert_eq!(request.vcpus, 2);
        assert_eq!(request.mem_mib, 1024);
        assert_eq!(request.name, "demo");
        assert_eq!(request.token, None);
    }

    #[test]
    fn missing_pieces_are_invalid_arguments() {
        assert!(matches!(
            validate(None, &config()),
            Err(Error::InvalidArgument(_))
        ));
        let no_spec = DriverSandbox {
            id: "x".into(),
            ..Default::default()
        };
        assert!(
            validate(Some(&no_spec), &config())
                .unwrap_err()
                .to_string()
                .contains("spec")
        );
        let no_name = DriverSandbox {
            id: "x".into(),
            spec: Some(DriverSandboxSpec::default()),
            ..Default::default()
        };
        assert!(
            validate(Some(&no_name), &config())
                .unwrap_err()
                .to_string()
                .contains("name is required")
        );
        let bad_id = DriverSandbox {
            id: "../x".into(),
            spec: Some(DriverSandboxSpec::default()),
            ..Default::default()
        };
        assert!(matches!(
            validate(Some(&bad_id), &config()),
            Err(Error::InvalidId { .. })
        ));
    }

    #[test]
    fn no_image_anywhere_is_a_precondition_failure() {
        let mut config = config();
        config.default_image = None;
        let err = validate(Some(&sandbox(DriverSandboxSpec::default())), &config).unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)));
        assert!(err.to_string().contains("default_image"));
    }

    #[test]
    fn unsupported_features_are_refused() {
        let gpu = sandbox(DriverSandboxSpec {
            resource_requirements: Some(ResourceRequirements {
                gpu: Some(GpuResourceRequirements { count: Some(1) }),
            }),
            ..Default::default()
        });
        assert!(
            validate(Some(&gpu), &config())
                .unwrap_err()
                .to_string()
                .contains("GPU")
        );
        let agent = with_template(DriverSandboxTemplate {
            agent_socket_path: "/run/agent.sock".into(),
            ..Default::default()
        });
        assert!(matches!(
            validate(Some(&agent), &config()),
            Err(Error::FailedPrecondition(_))
        ));
        let mut fields = BTreeMap::new();
        fields.insert(
            "runtime_class_name".to_owned(),
            prost_types::Value {
                kind: Some(Kind::StringValue("kata".into())),
            },
        );
        let platform = with_template(DriverSandboxTemplate {
            platform_config: Some(prost_types::Struct { fields }),
            ..Default::default()
        });
        let err = validate(Some(&platform), &config())
            .unwrap_err()
            .to_string();
        assert!(err.contains("runtime_class_name"), "{err}");
    }

    #[test]
    fn environment_is_merged_and_checked() {
        let mut spec = DriverSandboxSpec {
            template: Some(DriverSandboxTemplate {
                environment: [
                    ("A".to_owned(), "template".to_owned()),
                    ("B".to_owned(), "b".to_owned()),
                ]
                .into(),
                ..Default::default()
            }),
            environment: [("A".to_owned(), "spec".to_owned())].into(),
            ..Default::default()
        };
        let request = validate(Some(&sandbox(spec.clone())), &config()).unwrap();
        assert_eq!(request.env.get("A").map(String::as_str), Some("spec"));
        assert_eq!(request.env.get("B").map(String::as_str), Some("b"));

        spec.environment = [("A".to_owned(), "say \"hi\"".to_owned())].into();
        let err = validate(Some(&sandbox(spec.clone())), &config())
            .unwrap_err()
            .to_string();
        assert!(err.contains("double quotes") && err.contains("A"), "{err}");
        spec.environment = [("1BAD".to_owned(), "x".to_owned())].into();
        assert!(validate(Some(&sandbox(spec.clone())), &config()).is_err());
        spec.environment = [("OK".to_owned(), "naïve".to_owned())].into();
        assert!(validate(Some(&sandbox(spec)), &config()).is_err());
    }

    #[test]
    fn commands_must_survive_the_kernel_command_line() {
        let ok = sandbox(DriverSandboxSpec {
            command: vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo hello world; exit 3".into(),
            ],
            ..Default::default()
        });
        assert!(validate(Some(&ok), &config()).is_ok());
        let quoted = sandbox(DriverSandboxSpec {
            command: vec!["/bin/sh".into(), "-c".into(), "echo \"x\"".into()],
            ..Default::default()
        });
        assert!(
            validate(Some(&quoted), &config())
                .unwrap_err()
                .to_string()
                .contains("argument 2")
        );
        let spaced = sandbox(DriverSandboxSpec {
            command: vec!["/my program".into()],
            ..Default::default()
        });
        assert!(validate(Some(&spaced), &config()).is_err());
    }

    #[test]
    fn sizes_come_from_driver_config_then_limits_then_requests() {
        let resources = DriverResourceRequirements {
            cpu_request: "1".into(),
            cpu_limit: "2500m".into(),
            memory_request: "256Mi".into(),
            memory_limit: String::new(),
        };
        let sized = with_template(DriverSandboxTemplate {
            resources: Some(resources.clone()),
            ..Default::default()
        });
        let request = validate(Some(&sized), &config()).unwrap();
        assert_eq!((request.vcpus, request.mem_mib), (3, 256));

        let number = |n: f64| prost_types::Value {
            kind: Some(Kind::NumberValue(n)),
        };
        let overridden = with_template(DriverSandboxTemplate {
            resources: Some(resources),
            driver_config: Some(prost_types::Struct {
                fields: [
                    ("vcpus".to_owned(), number(1.0)),
                    ("mem_mib".to_owned(), number(128.0)),
                ]
                .into(),
            }),
            ..Default::default()
        });
        let request = validate(Some(&overridden), &config()).unwrap();
        assert_eq!((request.vcpus, request.mem_mib), (1, 128));

        for (key, value) in [
            ("vcpus", number(0.0)),
            ("vcpus", number(1.5)),
            ("mem_mib", number(1.0)),
            ("disk", number(1.0)),
        ] {
            let bad = with_template(DriverSandboxTemplate {
                driver_config: Some(prost_types::Struct {
                    fields: [(key.to_owned(), value)].into(),
                }),
                ..Default::default()
            });
            let err = validate(Some(&bad), &config()).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{key}: {err}");
        }
    }

    #[test]
    fn driver_config_is_refused_when_the_policy_disallows_it() {
        let mut locked = config();
        locked.admission.allow_driver_config = false;
        let sized = with_template(DriverSandboxTemplate {
            driver_config: Some(prost_types::Struct {
                fields: [(
                    "vcpus".to_owned(),
                    prost_types::Value {
                        kind: Some(Kind::NumberValue(1.0)),
                    },
                )]
                .into(),
            }),
            ..Default::default()
        });
        let err = validate(Some(&sized), &locked).unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
        assert_eq!(
            err.to_string(),
            "caller driver config is disabled; a gateway administrator must enable \
             allow_driver_config"
        );
        assert!(validate(Some(&sized), &config()).is_ok());

        // An empty struct asks for nothing and passes either way.
        let empty = with_template(DriverSandboxTemplate {
            driver_config: Some(prost_types::Struct::default()),
            ..Default::default()
        });
        assert!(validate(Some(&empty), &locked).is_ok());
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_cpu("1").unwrap(), 1);
        assert_eq!(parse_cpu("500m").unwrap(), 1);
        assert_eq!(parse_cpu("1.5").unwrap(), 2);
        assert_eq!(parse_cpu("2.0001").unwrap(), 3);
        assert_eq!(parse_cpu("4").unwrap(), 4);
        for bad in ["", "0", "0m", "-1", "two", "1.x", "300"] {
            assert!(parse_cpu(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_memory_mib("512Mi").unwrap(), 512);
        assert_eq!(parse_memory_mib("1Gi").unwrap(), 1024);
        assert_eq!(parse_memory_mib("1G").unwrap(), 954);
        assert_eq!(parse_memory_mib("134217728").unwrap(), 128);
        assert_eq!(parse_memory_mib("65537Ki").unwrap(), 65);
        for bad in ["", "Mi", "1.5Gi", "10Mi", "-1Gi", "lots", "2Pi"] {
            assert!(parse_memory_mib(bad).is_err(), "{bad}");
        }
    }

    fn plain_request() -> Request {
        validate(Some(&sandbox(DriverSandboxSpec::default())), &config()).unwrap()
    }

    #[test]
    fn guest_command_uses_request_then_image_then_default() {
        let image = ImageConfig {
            entrypoint: vec!["/entry".into()],
            cmd: vec!["arg".into()],
            env: vec!["PATH=/image/bin".into(), "IMG=1".into(), "broken".into()],
            working_dir: "/work".into(),
        };
        let mut request = plain_request();
        let guest = guest_command(&request, &image, true).unwrap();
        assert_eq!(guest.exec, "/entry");
        assert_eq!(guest.args, ["arg"]);
        assert_eq!(guest.workdir, "/work");
        assert!(guest.env.contains(&"PATH=/image/bin".to_owned()));
        assert!(guest.env.contains(&"IMG=1".to_owned()));
        assert!(guest.env.contains(&"OPENSHELL_SANDBOX_ID=s-1".to_owned()));
        assert!(guest.env.contains(&"OPENSHELL_SANDBOX=demo".to_owned()));
        assert!(
            guest
                .env
                .iter()
                .any(|e| e.starts_with("OPENSHELL_SANDBOX_TOKEN_FILE=/.openshell/"))
        );
        let mut sorted = guest.env.clone();
        sorted.sort();
        assert_eq!(sorted, guest.env);

        request.command = vec!["/bin/echo".into(), "hi".into()];
        request.env.insert("PATH".into(), "/mine".into());
        let guest = guest_command(&request, &image, false).unwrap();
        assert_eq!(
            (guest.exec.as_str(), guest.args.as_slice()),
            ("/bin/echo", ["hi".to_owned()].as_slice())
        );
        assert!(
            guest.env.contains(&"PATH=/mine".to_owned()),
            "request env wins over the image"
        );
        assert!(
            !guest
                .env
                .iter()
                .any(|e| e.starts_with("OPENSHELL_SANDBOX_TOKEN_FILE"))
        );

        let guest = guest_command(&plain_request(), &ImageConfig::default(), false).unwrap();
        assert_eq!(guest.exec, DEFAULT_COMMAND);
        assert_eq!(guest.workdir, "/");
        assert!(guest.env.contains(&format!("PATH={DEFAULT_PATH}")));
    }

    #[test]
    fn guest_command_enforces_the_budget() {
        let mut request = plain_request();
        request.env.insert("BIG".into(), "x".repeat(CMDLINE_BUDGET));
        let err = guest_command(&request, &ImageConfig::default(), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("kernel command line"), "{err}");
    }
}
