//! Startup and configuration failures of the real binary: each must exit
//! non-zero with one clear message before serving, and leave nothing behind.

mod common;

use std::process::Command;

use common::*;

fn check_config(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut command = Command::new(gateway_binary());
    command
        .arg("--check-config")
        .args([
            "--state-dir",
            "/tmp/os-check/state",
            "--run-dir",
            "/tmp/os-check/run",
        ])
        .args(args)
        .env_remove("OPENSHELL_DRIVERS")
        .env_remove("OPENSHELL_COMPUTE_DRIVER_SOCKET")
        .env_remove("OPENSHELL_GATEWAY_CONFIG")
        .env("XDG_CONFIG_HOME", "/nonexistent-openshell-test");
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().expect("run the gateway");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn flags_beat_environment_beats_file() {
    let dirs = Dirs::new();
    let config = write_config(
        &dirs,
        "[openshell.gateway]\ncompute_drivers = [\"podman\"]\nlisten = \"tcp://127.0.0.1:7001\"\ninsecure_tcp = true\n",
    );
    let config = config.display().to_string();
    let (code, out, err) = check_config(&["--config", &config], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("driver podman (default): managed"), "{out}");
    assert!(out.contains("listen: tcp://127.0.0.1:7001"), "{out}");

    let (code, out, err) = check_config(
        &["--config", &config],
        &[
            ("OPENSHELL_DRIVERS", "kyma@/run/k.sock"),
            ("OPENSHELL_LISTEN", "tcp://127.0.0.1:7002"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("driver kyma (default): attached at /run/k.sock"),
        "{out}"
    );
    assert!(out.contains("listen: tcp://127.0.0.1:7002"), "{out}");

    let (code, out, err) = check_config(
        &[
            "--config",
            &config,
            "--drivers",
            "vm",
            "--listen",
            "unix:///tmp/os-check/g.sock",
        ],
        &[
            ("OPENSHELL_DRIVERS", "kyma@/run/k.sock"),
            ("OPENSHELL_LISTEN", "tcp://127.0.0.1:7002"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("driver vm (default): managed"), "{out}");
    assert!(out.contains("listen: unix:///tmp/os-check/g.sock"), "{out}");
}

#[test]
fn compute_driver_socket_from_the_environment() {
    let (code, out, err) = check_config(
        &[],
        &[
            ("OPENSHELL_DRIVERS", "kubernetes"),
            ("OPENSHELL_COMPUTE_DRIVER_SOCKET", "/var/run/driver.sock"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("driver kubernetes (default): attached at /var/run/driver.sock (from --compute-driver-socket)"),
        "{out}"
    );
    // Without a driver name the socket is refused.
    let (code, _, err) = check_config(
        &[],
        &[("OPENSHELL_COMPUTE_DRIVER_SOCKET", "/var/run/driver.sock")],
    );
    assert_eq!(code, 2);
    assert!(
        err.starts_with("error: OPENSHELL_COMPUTE_DRIVER_SOCKET needs --drivers NAME"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
}

#[test]
fn configuration_errors_exit_2_with_one_line() {
    let dirs = Dirs::new();
    let config = write_config(&dirs, "[openshell.gateway]\nlisten_on = \"x\"\n");
    let (code, _, err) = check_config(
        &["--config", &config.display().to_string(), "--drivers", "vm"],
        &[],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("unknown key openshell.gateway.listen_on"),
        "{err}"
    );
    assert!(err.contains(&config.display().to_string()), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    let (code, _, err) = check_config(&["--drivers", "vm,,podman"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("entry 2 of \"vm,,podman\" is empty"), "{err}");

    let (code, _, err) = check_config(
        &["--config", "/nonexistent/gateway.toml", "--drivers", "vm"],
        &[],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("could not read config file /nonexistent/gateway.toml"),
        "{err}"
    );

    let (code, _, err) = check_config(&["--drivers", "vm", "--listen", "tcp://0.0.0.0:7000"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("--allow-remote"), "{err}");
}

#[test]
fn a_managed_driver_that_dies_at_startup_is_reported_with_its_stderr() {
    let dirs = Dirs::new();
    let config = write_config(
        &dirs,
        &format!(
            "[openshell.gateway]\ncompute_drivers = [\"podman\"]\n[openshell.drivers.podman]\nbinary = \"{}\"\nexit_early = 7\n",
            test_driver().display()
        ),
    );
    let (status, stderr) = run_gateway(&dirs, &config, &[]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: driver 'podman' exited before it became ready"),
        "{stderr}"
    );
    assert!(stderr.contains("exit status: 7"), "{stderr}");
    assert!(
        stderr.contains("configuration looks wrong"),
        "stderr tail: {stderr}"
    );
    assert!(!dirs.socket().exists());
}

#[test]
fn a_managed_driver_with_a_bad_config_key_is_reported() {
    let dirs = Dirs::new();
    let config = write_config(
        &dirs,
        &format!(
            "[openshell.gateway]\ncompute_drivers = [\"vm\"]\n[openshell.drivers.vm]\nbinary = \"{}\"\nno_such_key = 1\n",
            test_driver().display()
        ),
    );
    let (status, stderr) = run_gateway(&dirs, &config, &[]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("driver 'vm' exited before it became ready"),
        "{stderr}"
    );
    assert!(stderr.contains("no_such_key"), "{stderr}");
}

#[test]
fn a_missing_driver_binary_lists_where_it_looked() {
    let dirs = Dirs::new();
    let config = write_config(&dirs, "[openshell.gateway]\ncompute_drivers = [\"vm\"]\n");
    // A gateway executable with no driver binaries beside it (the build
    // directory has them all).
    let lonely = dirs.path("bin").join("openshell-gateway");
    std::fs::create_dir(dirs.path("bin")).unwrap();
    std::fs::hard_link(gateway_binary(), &lonely)
        .or_else(|_| std::fs::copy(gateway_binary(), &lonely).map(drop))
        .unwrap();
    let output = Command::new(&lonely)
        .args(base_args(&dirs, &config))
        .env("PATH", dirs.path("empty-bin"))
        .env_remove("OPENSHELL_DRIVERS")
        .output()
        .expect("run the gateway");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no executable for driver 'vm' (openshell-driver-vm)"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            &dirs
                .path("empty-bin/openshell-driver-vm")
                .display()
                .to_string()
        ),
        "{stderr}"
    );
    assert!(stderr.contains("binary = "), "{stderr}");
}

#[test]
fn an_unreachable_attached_driver_fails_startup_naming_it() {
    let dirs = Dirs::new();
    let socket = dirs.path("absent.sock");
    let config = write_config(
        &dirs,
        &format!(
            "[openshell.gateway]\ncompute_drivers = [\"kyma@{}\"]\ndriver_connect_timeout_secs = 0.3\n",
            socket.display()
        ),
    );
    let (status, stderr) = run_gateway(&dirs, &config, &[]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("could not connect to driver 'kyma'"),
        "{stderr}"
    );
    assert!(stderr.contains(&socket.display().to_string()), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_on_the_same_state_dir_is_refused() {
    let dirs = Dirs::new();
    let driver = AttachedDriver::start(&dirs.path("kyma.sock"), &dirs.path("calls"), &[]);
    let config = write_config(
        &dirs,
        &format!(
            "[openshell.gateway]\ncompute_drivers = [\"kyma@{}\"]\n",
            driver.socket.display()
        ),
    );
    let _first = Gateway::start(&dirs, &config, &[]).await;
    let other_run = dirs.path("run2").display().to_string();
    let (status, stderr) = run_gateway(&dirs, &config, &["--run-dir", &other_run]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("another gateway is using the state directory"),
        "{stderr}"
    );
}

#[test]
fn a_run_dir_other_users_can_enter_is_refused_and_left_alone() {
    use std::os::unix::fs::PermissionsExt as _;
    let dirs = Dirs::new();
    let open_dir = dirs.path("open");
    std::fs::create_dir(&open_dir).unwrap();
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = write_config(&dirs, "");
    let open = open_dir.display().to_string();
    let (status, stderr) = run_gateway(&dirs, &config, &["--drivers", "vm", "--run-dir", &open]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("can be entered by other users (mode 755)"),
        "{stderr}"
    );
    let mode = std::fs::metadata(&open_dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o755, "the directory was not touched");

    let listen = format!("unix://{open}/gateway.sock");
    let (status, stderr) = run_gateway(
        &dirs,
        &config,
        &["--drivers", "k@/nonexistent.sock", "--listen", &listen],
    );
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("cannot listen on") && stderr.contains("chmod 700"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let dirs = Dirs::new();
    let driver = AttachedDriver::start(&dirs.path("kyma.sock"), &dirs.path("calls"), &[]);
    let config = write_config(
        &dirs,
        &format!(
            "[openshell.gateway]\ncompute_drivers = [\"kyma@{}\"]\nlog_format = \"json\"\n",
            driver.socket.display()
        ),
    );
    let mut gateway = Gateway::start(&dirs, &config, &[]).await;
    assert!(gateway.stop().success());
    let log = gateway.log_text();
    let mut messages = Vec::new();
    for line in log.lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        messages.push(value["message"].as_str().unwrap_or_default().to_owned());
    }
    for expected in ["driver ready", "listening", "stopped"] {
        assert!(
            messages.iter().any(|m| m == expected),
            "{expected:?} not in {messages:?}"
        );
    }
}
