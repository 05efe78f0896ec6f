//! Bucket `podman`: a gateway with the managed Podman driver
//! (`--drivers podman`) runs a sandbox through its whole lifecycle.
#![cfg(feature = "podman")]

use std::time::Duration;

use openshell_e2e::{
    Gateway, GatewayConfig, TEST_IMAGE, TestEnv, bin, podman_free_tcp_port, remove_podman_image,
    require_podman, start_external_podman, start_podman_test_registry,
    start_podman_test_registry_with_auth, wait_until,
};

fn podman_gateway(env: &TestEnv) -> Gateway {
    let config = GatewayConfig {
        drivers: Some("podman".to_owned()),
        toml: Some(format!(
            "[openshell.drivers.podman]\ndefault_image = \"{TEST_IMAGE}\"\nstop_timeout = 2\n"
        )),
        ..GatewayConfig::default()
    };
    Gateway::start(env, &config).unwrap_or_else(|e| panic!("{e}"))
}

/// Container ids Podman itself reports for a sandbox name.
fn containers_named(sandbox: &str) -> Vec<String> {
    let out = std::process::Command::new("podman")
        .args(["ps", "-a", "-q", "--filter"])
        .arg(format!("label=openshell.sandbox.name={sandbox}"))
        .output()
        .expect("podman ps");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn managed_podman_lifecycle() {
    require_podman!();
    let env = TestEnv::new();
    let gateway = podman_gateway(&env);

    let driver = gateway.driver("podman");
    assert_eq!(driver["managed"], true, "{driver}");
    assert_eq!(driver["state"], "Ready", "{driver}");
    assert!(driver["pid"].as_u64().unwrap_or(0) > 0, "{driver}");
    assert_eq!(
        driver["capabilities"]["driver_name"], "openshell-driver-podman",
        "{driver}"
    );

    let name = env.name("life");
    let marker = format!("hello-from-{name}");
    let created = gateway
        .cli(&[
            "-o",
            "json",
            "sandbox",
            "create",
            &name,
            "--env",
            "GREETING=hi",
            "--",
            "sh",
            "-c",
            &format!("echo {marker} $GREETING $OPENSHELL_SANDBOX; exec sleep 3600"),
        ])
        .ok()
        .json();
    assert_eq!(created["phase"], "Ready", "{created}");
    assert_eq!(created["driver"], "podman");
    assert_eq!(
        created["image"], TEST_IMAGE,
        "the driver's default image is filled in"
    );
    assert_eq!(
        containers_named(&name).len(),
        1,
        "exactly one container backs the sandbox"
    );

    // The main process's output arrives through the driver's log service.
    wait_until("sandbox output in logs", Duration::from_secs(30), || {
        gateway
            .cli(&["sandbox", "logs", &name])
            .ok()
            .stdout
            .contains(&format!("{marker} hi {name}"))
    });

    let listed = gateway
        .cli(&["-o", "json", "sandbox", "list", "--driver", "podman"])
        .ok()
        .json();
    assert!(
        listed.as_array().unwrap().iter().any(|s| s["name"] == name),
        "{listed}"
    );

    let stopped = gateway
        .cli(&["-o", "json", "sandbox", "stop", &name])
        .ok()
        .json();
    assert_eq!(stopped["phase"], "Stopped", "{stopped}");
    let started = gateway
        .cli(&["-o", "json", "sandbox", "start", &name])
        .ok()
        .json();
    assert_eq!(started["phase"], "Ready", "{started}");

    gateway.cli(&["sandbox", "delete", &name]).ok();
    assert_eq!(
        gateway.phase(&name),
        None,
        "deleted sandboxes are gone from the gateway"
    );
    wait_until("container removed", Duration::from_secs(30), || {
        containers_named(&name).is_empty()
    });
}

#[test]
fn bad_requests_are_refused_with_clear_errors() {
    require_podman!();
    let env = TestEnv::new();
    let gateway = podman_gateway(&env);

    let out = gateway
        .cli(&["sandbox", "create", "Bad_Name", "--", "true"])
        .fails_with(1);
    assert!(out.stderr.contains("INVALID_ARGUMENT"), "{}", out.stderr);

    let out = gateway
        .cli(&[
            "sandbox",
            "create",
            &env.name("noimg"),
            "--image",
            "localhost/does-not-exist:1",
            "--",
            "true",
        ])
        .fails_with(1);
    assert!(out.stderr.contains("FAILED_PRECONDITION"), "{}", out.stderr);
    assert!(out.stderr.contains("does-not-exist"), "{}", out.stderr);

    let out = gateway
        .cli(&[
            "sandbox",
            "create",
            &env.name("nodrv"),
            "--driver",
            "nope",
            "--",
            "true",
        ])
        .fails_with(1);
    assert!(out.stderr.contains("nope"), "{}", out.stderr);

    let out = gateway
        .cli(&["sandbox", "get", &env.name("missing")])
        .fails_with(1);
    assert!(out.stderr.contains("NOT_FOUND"), "{}", out.stderr);
}

/// The conformance checker passes the Podman driver: every required check
/// of both contract generations, with a real container behind each.
#[test]
fn the_podman_driver_passes_the_conformance_checker() {
    require_podman!();
    let env = TestEnv::new();
    let (mut driver, socket) = start_external_podman(&env, "conformance-podman");
    let out = std::process::Command::new(bin::driver_check())
        .arg(&socket)
        .args([
            "--keep-going",
            "--ready-timeout",
            "60",
            "--image",
            TEST_IMAGE,
            "--command",
            "sleep",
            "3600",
        ])
        .output()
        .expect("run openshell-driver-check");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the Podman driver does not conform:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("negotiation "), "{report}");
    driver.stop(Duration::from_secs(10));
}

/// A gateway whose Podman driver trusts `insecure` registries and pulls
/// under `policy`.
fn pulling_gateway(env: &TestEnv, insecure: &[&str], policy: &str) -> Gateway {
    let list = insecure
        .iter()
        .map(|r| format!("\"{r}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let config = GatewayConfig {
        drivers: Some("podman".to_owned()),
        toml: Some(format!(
            "[openshell.drivers.podman]\ndefault_image = \"{TEST_IMAGE}\"\nstop_timeout = 2\n\
             image_pull_policy = \"{policy}\"\ninsecure_registries = [{list}]\n"
        )),
        ..GatewayConfig::default()
    };
    Gateway::start(env, &config).unwrap_or_else(|e| panic!("{e}"))
}

/// A sandbox from an image only a local registry has: the managed driver
/// pulls it; a missing tag and an unreachable registry are refused with
/// FAILED_PRECONDITION naming the image and the reason.
#[test]
fn managed_podman_pulls_from_a_registry() {
    require_podman!();
    let env = TestEnv::new();
    let registry = match start_podman_test_registry(&env) {
        Ok(registry) => registry,
        Err(reason) => {
            eprintln!("skipped: {reason}");
            return;
        }
    };
    let reference = registry.reference(&format!("busybox-{}", env.suffix), "latest");
    registry.push_test_image(&reference);
    let unreachable = format!("127.0.0.1:{}", podman_free_tcp_port());
    let gateway = pulling_gateway(&env, &[&registry.host, &unreachable], "missing");

    let name = env.name("pulled");
    let created = gateway
        .cli(&[
            "-o", "json", "sandbox", "create", &name, "--image", &reference, "--", "sleep", "3600",
        ])
        .ok()
        .json();
    assert_eq!(created["phase"], "Ready", "{created}");
    assert_eq!(created["image"], reference.as_str(), "{created}");
    assert_eq!(containers_named(&name).len(), 1);

    let missing_tag = registry.reference(&format!("busybox-{}", env.suffix), "no-such-tag");
    let out = gateway
        .cli(&[
            "sandbox",
            "create",
            &env.name("tag"),
            "--image",
            &missing_tag,
            "--",
            "true",
        ])
        .fails_with(1);
    assert!(out.stderr.contains("FAILED_PRECONDITION"), "{}", out.stderr);
    assert!(out.stderr.contains(&missing_tag), "{}", out.stderr);
    assert!(
        out.stderr.contains("no such image or tag"),
        "{}",
        out.stderr
    );

    let nowhere = format!("{unreachable}/openshell/busybox:latest");
    let out = gateway
        .cli(&[
            "sandbox",
            "create",
            &env.name("nowhere"),
            "--image",
            &nowhere,
            "--",
            "true",
        ])
        .fails_with(1);
    assert!(out.stderr.contains("FAILED_PRECONDITION"), "{}", out.stderr);
    assert!(out.stderr.contains(&nowhere), "{}", out.stderr);
    assert!(out.stderr.contains("cannot be reached"), "{}", out.stderr);

    gateway.cli(&["sandbox", "delete", &name]).ok();
    wait_until("container removed", Duration::from_secs(30), || {
        containers_named(&name).is_empty()
    });
    remove_podman_image(&reference);
}

/// A registry that wants credentials the engine does not have: the create
/// is refused with FAILED_PRECONDITION naming the image and the missing
/// credentials, and nothing is stored.
#[test]
fn managed_podman_explains_a_registry_that_wants_credentials() {
    require_podman!();
    let env = TestEnv::new();
    let registry =
        match start_podman_test_registry_with_auth(&env, "openshell-tester", "right-password") {
            Ok(registry) => registry,
            Err(reason) => {
                eprintln!("skipped: {reason}");
                return;
            }
        };
    let reference = registry.reference(&format!("busybox-{}", env.suffix), "latest");
    registry.push_test_image(&reference);
    let gateway = pulling_gateway(&env, &[&registry.host], "missing");
    let name = env.name("locked");
    let out = gateway
        .cli(&[
            "sandbox", "create", &name, "--image", &reference, "--", "true",
        ])
        .fails_with(1);
    assert!(out.stderr.contains("FAILED_PRECONDITION"), "{}", out.stderr);
    assert!(out.stderr.contains(&reference), "{}", out.stderr);
    assert!(out.stderr.contains("credentials"), "{}", out.stderr);
    assert_eq!(gateway.phase(&name), None, "nothing is stored");
    assert!(containers_named(&name).is_empty());
}

/// Under `image_pull_policy = "never"` an image the engine lacks is
/// refused, and says the policy is why.
#[test]
fn managed_podman_never_pulls_when_told_not_to() {
    require_podman!();
    let env = TestEnv::new();
    let registry = match start_podman_test_registry(&env) {
        Ok(registry) => registry,
        Err(reason) => {
            eprintln!("skipped: {reason}");
            return;
        }
    };
    let reference = registry.reference(&format!("busybox-{}", env.suffix), "latest");
    registry.push_test_image(&reference);
    let gateway = pulling_gateway(&env, &[&registry.host], "never");
    let out = gateway
        .cli(&[
            "sandbox",
            "create",
            &env.name("never"),
            "--image",
            &reference,
            "--",
            "true",
        ])
        .fails_with(1);
    assert!(out.stderr.contains("FAILED_PRECONDITION"), "{}", out.stderr);
    assert!(out.stderr.contains(&reference), "{}", out.stderr);
    assert!(out.stderr.contains("\"never\""), "{}", out.stderr);
    // The default image is local: `never` still runs it.
    let name = env.name("local");
    let created = gateway
        .cli(&[
            "-o", "json", "sandbox", "create", &name, "--", "sleep", "3600",
        ])
        .ok()
        .json();
    assert_eq!(created["phase"], "Ready", "{created}");
    gateway.cli(&["sandbox", "delete", &name]).ok();
}
