//! The `openshell` binary against a real `openshell-gateway`, whose managed
//! driver is the in-memory test driver (no container engine needed).

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use openshell_e2e::{Gateway, GatewayConfig, TestEnv, bin, wait_until};
use serde_json::Value;

fn gateway_with(env: &TestEnv, provision_delay_ms: u64) -> Gateway {
    let toml = format!(
        "[openshell.gateway]\ncompute_drivers = [\"podman\"]\n\n\
         [openshell.drivers.podman]\nbinary = \"{}\"\nprovision_delay_ms = {provision_delay_ms}\n",
        bin::test_driver().display()
    );
    Gateway::start(
        env,
        &GatewayConfig {
            toml: Some(toml),
            ..GatewayConfig::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn gateway(env: &TestEnv) -> Gateway {
    gateway_with(env, 30)
}

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .expect("a JSON list")
        .iter()
        .map(|s| s["name"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn create_waits_for_ready_and_shows_the_sandbox() {
    let env = TestEnv::new();
    let gw = gateway(&env);
    let out = gw
        .cli(&[
            "sandbox", "create", "web", "-e", "A=1", "-l", "team=x", "--", "echo", "hello", "cli",
        ])
        .ok();
    assert!(out.stdout.contains("Phase:       Ready"), "{}", out.stdout);
    assert!(
        out.stdout
            .contains(r#"Command:     ["echo","hello","cli"]"#),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("Labels:      team=x"), "{}", out.stdout);
    // Off a terminal, progress is one line per change on stderr.
    assert!(out.stderr.contains("sandbox web: Ready"), "{}", out.stderr);

    let json = gw.cli(&["-o", "json", "sandbox", "get", "web"]).ok().json();
    assert_eq!(json["phase"], "Ready");
    assert_eq!(json["driver"], "podman");
    assert_eq!(json["env"]["A"], "1");
    assert_eq!(json["labels"]["team"], "x");
    assert_eq!(json["command"], serde_json::json!(["echo", "hello", "cli"]));
    assert_eq!(
        json["image"], "test/busybox:latest",
        "the driver's default image is filled in"
    );

    let logs = gw.cli(&["sandbox", "logs", "web"]).ok();
    assert!(logs.stdout.contains("hello cli"), "{}", logs.stdout);
    let tail = gw.cli(&["sandbox", "logs", "web", "--tail", "1"]).ok();
    assert_eq!(tail.stdout.trim(), "hello cli");
}

#[test]
fn no_wait_returns_before_ready() {
    let env = TestEnv::new();
    let gw = gateway_with(&env, 2_000);
    let json = gw
        .cli(&[
            "-o",
            "json",
            "sandbox",
            "create",
            "slow",
            "--no-wait",
            "--",
            "true",
        ])
        .ok()
        .json();
    assert_eq!(json["phase"], "Provisioning", "{json}");
    gw.wait_phase("slow", "Ready", Duration::from_secs(30));
}

#[test]
fn waiting_too_long_is_exit_code_5() {
    let env = TestEnv::new();
    let gw = gateway_with(&env, 60_000);
    let out = gw
        .cli(&["sandbox", "create", "slow", "--timeout", "1", "--", "true"])
        .fails_with(5);
    assert!(
        out.stderr
            .contains("timed out after 1 s waiting for sandbox 'slow'")
            && out.stderr.contains("Provisioning"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_sandbox_that_fails_is_exit_code_4_with_the_drivers_reason() {
    let env = TestEnv::new();
    let gw = gateway(&env);
    let out = gw
        .cli(&[
            "sandbox",
            "create",
            "broken",
            "--image",
            "exits/app",
            "--",
            "run",
        ])
        .fails_with(4);
    assert!(
        out.stderr.contains(
            "sandbox 'broken' failed: ContainerExited: the main process exited with code 3"
        ),
        "{}",
        out.stderr
    );
    assert_eq!(gw.phase("broken").as_deref(), Some("Error"));
}

#[test]
fn list_filters_and_formats() {
    let env = TestEnv::new();
    let gw = gateway(&env);
    assert_eq!(gw.cli(&["sandbox", "list"]).ok().stdout, "no sandboxes\n");
    gw.cli(&["sandbox", "create", "alpha", "-l", "team=a", "--", "true"])
        .ok();
    gw.cli(&["sandbox", "create", "beta", "-l", "team=b", "--", "true"])
        .ok();
    gw.cli(&["sandbox", "stop", "beta"]).ok();

    let table = gw.cli(&["sandbox", "list"]).ok().stdout;
    let mut lines = table.lines();
    let header = lines.next().unwrap();
    for column in ["NAME", "DRIVER", "PHASE", "IMAGE", "AGE", "STATUS"] {
        assert!(header.contains(column), "{header}");
    }
    assert_eq!(lines.count(), 2, "{table}");

    let all = gw.cli(&["-o", "json", "sandbox", "list"]).ok().json();
    assert_eq!(names(&all), ["alpha", "beta"]);
    let team_a = gw
        .cli(&["-o", "json", "sandbox", "list", "-l", "team=a"])
        .ok()
        .json();
    assert_eq!(names(&team_a), ["alpha"]);
    let stopped = gw
        .cli(&["-o", "json", "sandbox", "list", "--phase", "stopped"])
        .ok()
        .json();
    assert_eq!(names(&stopped), ["beta"]);
    let limited = gw
        .cli(&["-o", "json", "sandbox", "list", "--limit", "1"])
        .ok()
        .json();
    assert_eq!(names(&limited).len(), 1);
    // A driver name that is neither configured nor has sandboxes is most
    // likely a typo: the gateway says so instead of listing nothing.
    let out = gw
        .cli(&["sandbox", "list", "--driver", "nope"])
        .fails_with(1);
    assert!(
        out.stderr.contains("NOT_FOUND") && out.stderr.contains("'nope'"),
        "{}",
        out.stderr
    );
}

#[test]
fn stop_start_delete() {
    let env = TestEnv::new();
    let gw = gateway(&env);
    gw.cli(&["sandbox", "create", "box", "--", "true"]).ok();
    let stopped = gw
        .cli(&["-o", "json", "sandbox", "stop", "box"])
        .ok()
        .json();
    assert_eq!(stopped["phase"], "Stopped");
    let started = gw
        .cli(&["-o", "json", "sandbox", "start", "box"])
        .ok()
        .json();
    assert_eq!(started["phase"], "Ready");

    let deleted = gw.cli(&["sandbox", "delete", "box"]).ok();
    assert_eq!(deleted.stdout, "sandbox box deleted\n");
    let out = gw.cli(&["sandbox", "get", "box"]).fails_with(1);
    assert!(out.stderr.contains("NOT_FOUND"), "{}", out.stderr);
    // Like `get`, deleting a name that does not exist is NOT_FOUND.
    let again = gw.cli(&["sandbox", "delete", "box"]).fails_with(1);
    assert!(again.stderr.contains("NOT_FOUND"), "{}", again.stderr);
}

#[test]
fn refused_requests_are_one_line_with_the_code() {
    let env = TestEnv::new();
    let gw = gateway(&env);
    for (args, code) in [
        (
            vec!["sandbox", "create", "Web", "--", "true"],
            "INVALID_ARGUMENT",
        ),
        (
            vec!["sandbox", "create", "x", "--driver", "nope", "--", "true"],
            "NOT_FOUND",
        ),
        (
            vec![
                "sandbox",
                "create",
                "x",
                "--image",
                "missing/img",
                "--",
                "true",
            ],
            "FAILED_PRECONDITION",
        ),
        (
            vec!["sandbox", "create", "x", "--", "echo", ""],
            "INVALID_ARGUMENT",
        ),
        (vec!["sandbox", "stop", "ghost"], "NOT_FOUND"),
    ] {
        let out = gw.cli(&args).fails_with(1);
        assert!(
            out.stderr.starts_with("error: "),
            "{args:?}: {}",
            out.stderr
        );
        assert!(out.stderr.contains(code), "{args:?}: {}", out.stderr);
        assert_eq!(
            out.stderr.trim_end().lines().count(),
            1,
            "{args:?}: {}",
            out.stderr
        );
    }
    gw.cli(&["sandbox", "create", "dup", "--", "true"]).ok();
    let out = gw
        .cli(&["sandbox", "create", "dup", "--", "true"])
        .fails_with(1);
    assert!(out.stderr.contains("ALREADY_EXISTS"), "{}", out.stderr);
}

#[test]
fn unreachable_gateway_and_bad_addresses() {
    let env = TestEnv::new();
    let socket = env.path().join("nothing.sock");
    let out = Command::new(bin::cli())
        .args([
            "--gateway",
            &format!("unix://{}", socket.display()),
            "gateway",
            "info",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot reach the gateway") && stderr.contains("OPENSHELL_GATEWAY"),
        "{stderr}"
    );

    let out = Command::new(bin::cli())
        .args(["sandbox", "list"])
        .env("OPENSHELL_GATEWAY", "http://example")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown scheme"));
}

#[test]
fn gateway_info_names_every_driver() {
    let env = TestEnv::new();
    let gw = gateway(&env);
    let info = gw.info();
    assert_eq!(info["listen"], gw.address());
    let driver = &info["drivers"][0];
    assert_eq!(driver["name"], "podman");
    assert_eq!(driver["managed"], true);
    assert_eq!(driver["default"], true);
    assert_eq!(driver["state"], "Ready");
    assert_eq!(
        driver["capabilities"]["driver_name"],
        "openshell-test-driver"
    );
    let text = gw.cli(&["gateway", "info"]).ok().stdout;
    assert!(
        text.contains("podman *") && text.contains("managed"),
        "{text}"
    );
}

#[test]
fn watch_prints_the_current_state_then_changes() {
    let env = TestEnv::new();
    let gw = gateway(&env);
    gw.cli(&["sandbox", "create", "first", "--", "true"]).ok();
    // `timeout` ends the watch even if this test goes wrong, so reading its
    // output cannot block forever.
    let mut watch = Command::new("timeout")
        .arg("60")
        .arg(bin::cli())
        .args(["--gateway", &gw.address(), "-o", "json", "sandbox", "watch"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let mut next = || -> Value {
        let line = lines.next().expect("the watch ended early").unwrap();
        serde_json::from_str(&line).unwrap()
    };
    let initial = next();
    assert_eq!(initial["type"], "sandbox");
    assert_eq!(initial["sandbox"]["name"], "first");
    assert_eq!(next()["type"], "synced");

    gw.cli(&["sandbox", "create", "second", "--no-wait", "--", "true"])
        .ok();
    let mut seen_ready = false;
    wait_until(
        "the new sandbox to show up Ready",
        Duration::from_secs(30),
        || {
            let event = next();
            seen_ready |=
                event["sandbox"]["name"] == "second" && event["sandbox"]["phase"] == "Ready";
            seen_ready
        },
    );
    watch.kill().unwrap();
    watch.wait().unwrap();
}

#[test]
fn completions_are_generated() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(bin::cli())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("openshell"),
            "{shell}"
        );
    }
}

/// A wait that times out at once still reports the phase the create
/// returned, not "unknown".
#[test]
fn a_zero_timeout_reports_the_phase_the_create_returned() {
    let env = TestEnv::new();
    let gw = gateway_with(&env, 60_000);
    let out = gw
        .cli(&["sandbox", "create", "slow", "--timeout", "0", "--", "true"])
        .fails_with(5);
    assert!(
        out.stderr
            .contains("timed out after 0 s waiting for sandbox 'slow'")
            && out.stderr.contains("last phase: Provisioning"),
        "{}",
        out.stderr
    );
}

/// Watching a driver that does not exist is NOT_FOUND, as listing it is.
#[test]
fn watching_an_unknown_driver_is_not_found() {
    let env = TestEnv::new();
    let gw = gateway(&env);
    // `timeout`: a watch that is wrongly accepted would run forever.
    let out = Command::new("timeout")
        .arg("30")
        .arg(bin::cli())
        .args([
            "--gateway",
            &gw.address(),
            "sandbox",
            "watch",
            "--driver",
            "nope",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("driver 'nope' is not configured") && stderr.contains("NOT_FOUND"),
        "{stderr}"
    );
    let out = gw
        .cli(&["sandbox", "list", "--driver", "nope"])
        .fails_with(1);
    assert!(out.stderr.contains("NOT_FOUND"), "{}", out.stderr);
}

/// An oversized name is refused with a short message that quotes only the
/// start of it (an error quoting it whole would not fit in a header).
#[test]
fn an_oversized_name_is_refused_briefly() {
    let env = TestEnv::new();
    let gw = gateway(&env);
    let name = "a".repeat(100_000);
    let out = gw
        .cli(&["sandbox", "create", &name, "--no-wait", "--", "true"])
        .fails_with(1);
    assert!(
        out.stderr.contains("the limit is 63") && out.stderr.contains("INVALID_ARGUMENT"),
        "{}",
        &out.stderr[..out.stderr.len().min(2000)]
    );
    assert!(out.stderr.len() < 1000, "{} bytes", out.stderr.len());
}
