//! Bucket `foreign`: peers this project did not write. A compute driver in
//! Python on stock grpcio (which sends a server stream's headers only with
//! its first message) attached by `name@socket`, idle for longer than the
//! gateway's call timeout, then used through the CLI.
#![cfg(feature = "foreign")]

use std::time::Duration;

use openshell_e2e::{
    Gateway, GatewayConfig, TestEnv, grpc_python, start_python_driver, start_test_driver,
};

fn python_or_skip() -> Option<std::path::PathBuf> {
    match grpc_python() {
        Ok(python) => Some(python),
        Err(reason) => {
            eprintln!("SKIP foreign bucket: {reason}");
            None
        }
    }
}

#[test]
fn an_idle_grpcio_driver_stays_available_and_runs_sandboxes() {
    let Some(python) = python_or_skip() else {
        return;
    };
    let env = TestEnv::new();
    let socket = env.path().join("lazy.sock");
    let mut driver = start_python_driver(&env, &python, &socket, "lazy-py");
    let mut gateway = Gateway::start(
        &env,
        &GatewayConfig {
            drivers: Some(format!("lazy@{}", socket.display())),
            extra_args: vec!["--driver-call-timeout".to_owned(), "2".to_owned()],
            ..GatewayConfig::default()
        },
    )
    .expect("gateway starts");

    // Several call timeouts with no sandbox, so the driver's watch sends
    // nothing at all, not even response headers.
    std::thread::sleep(Duration::from_secs(7));
    let info = gateway.driver("lazy");
    assert_eq!(
        info["state"], "Ready",
        "idle driver must stay available: {info}"
    );
    assert_eq!(info["capabilities"]["driver_name"], "lazy-py", "{info}");

    let name = env.name("py");
    let created = gateway
        .cli(&["-o", "json", "sandbox", "create", &name, "--", "true"])
        .ok()
        .json();
    assert_eq!(created["phase"], "Ready", "{created}");
    assert_eq!(created["driver"], "lazy");
    let listed = gateway.cli(&["-o", "json", "sandbox", "list"]).ok().json();
    assert!(
        listed.to_string().contains(&name),
        "the sandbox is listed: {listed}"
    );
    gateway.cli(&["sandbox", "delete", &name]).ok();
    assert_eq!(gateway.phase(&name), None, "deleted");

    gateway.stop();
    driver.stop(Duration::from_secs(5));
}

/// Runs `e2e/python/stock_client.py TARGET SOCKET` and returns its output,
/// panicking with it when the client fails.
fn stock_client(python: &std::path::Path, target: &str, socket: &std::path::Path) -> String {
    let root = openshell_e2e::repo_root();
    let out = std::process::Command::new(python)
        .arg(root.join("e2e/python/stock_client.py"))
        .arg("--proto-dir")
        .arg(root.join("proto"))
        .arg(target)
        .arg(socket)
        .output()
        .expect("run stock_client.py");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "stock grpcio client failed on the {target} socket: {text}"
    );
    text
}

/// A stock grpcio client (no channel options) sends the socket path as
/// `:authority`; both our driver and gateway sockets must serve it.
#[test]
fn stock_grpcio_clients_reach_driver_and_gateway_sockets() {
    let Some(python) = python_or_skip() else {
        return;
    };
    let env = TestEnv::new();
    let socket = env.path().join("testd.sock");
    let mut driver = start_test_driver(&env, &socket, &[]);
    let out = stock_client(&python, "driver", &socket);
    assert!(out.contains("openshell-test-driver"), "{out}");

    let mut gateway = Gateway::start(
        &env,
        &GatewayConfig {
            drivers: Some(format!("testd@{}", socket.display())),
            ..GatewayConfig::default()
        },
    )
    .expect("gateway starts");
    let out = stock_client(&python, "gateway", &env.gateway_socket());
    assert!(out.contains("1 drivers"), "{out}");
    gateway.stop();
    driver.stop(Duration::from_secs(5));
}
