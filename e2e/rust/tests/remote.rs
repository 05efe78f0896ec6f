//! Bucket `remote`: `openshell-driver-podman` served over TCP with mutual
//! TLS on 127.0.0.1 (as it would be on another host) and attached as
//! `remote-podman@https://127.0.0.1:PORT`, with certificates from
//! `openshell-gateway certs init`.
#![cfg(feature = "remote")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use openshell_e2e::{
    Gateway, GatewayConfig, Proc, TEST_IMAGE, TestEnv, alive, bin, require_podman, wait_for_socket,
    wait_until,
};

const DRIVER: &str = "remote-podman";

fn certs_init(dir: &Path) {
    let output = Command::new(bin::gateway())
        .args(["certs", "init"])
        .arg(dir)
        .args(["--driver", DRIVER])
        .output()
        .expect("run certs init");
    assert!(
        output.status.success(),
        "certs init: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind port 0")
        .port()
}

/// The Podman driver on its socket and on `127.0.0.1:port` with mutual TLS.
fn start_remote_podman(env: &TestEnv, certs: &Path, port: u16) -> Proc {
    let socket = env.path().join(format!("{DRIVER}.sock"));
    let mut command = Command::new(bin::podman_driver());
    command
        .arg("--bind-socket")
        .arg(&socket)
        .arg("--allow-same-uid-peer")
        .args(["--bind-tcp", &format!("127.0.0.1:{port}")])
        .arg("--tls-cert")
        .arg(certs.join(format!("driver-{DRIVER}.pem")))
        .arg("--tls-key")
        .arg(certs.join(format!("driver-{DRIVER}.key")))
        .arg("--tls-client-ca")
        .arg(certs.join("ca.pem"))
        .args(["--name", DRIVER, "--start-podman-service=true"])
        .args(["--default-image", TEST_IMAGE, "--stop-timeout", "2"])
        .env("RUST_LOG", "info");
    let mut proc = Proc::spawn(DRIVER, command, env.path().join(format!("{DRIVER}.log")));
    wait_for_socket(&mut proc, &socket, DRIVER);
    proc
}

fn gateway_config(endpoint: &str, certs: &Path) -> GatewayConfig {
    let file = |name: &str| certs.join(name).display().to_string();
    GatewayConfig {
        drivers: Some(format!("{DRIVER}@{endpoint}")),
        extra_args: vec![
            "--driver-tls-ca".into(),
            file("ca.pem"),
            "--driver-tls-cert".into(),
            file("gateway.pem"),
            "--driver-tls-key".into(),
            file("gateway.key"),
            "--driver-connect-timeout".into(),
            "20".into(),
        ],
        ..GatewayConfig::default()
    }
}

fn lifecycle(gateway: &Gateway, env: &TestEnv) {
    let info = gateway.driver(DRIVER);
    assert_eq!(info["managed"], false, "{info}");
    assert_eq!(info["state"], "Ready", "{info}");
    let name = env.name("remote");
    let created = gateway
        .cli(&[
            "-o",
            "json",
            "sandbox",
            "create",
            &name,
            "--driver",
            DRIVER,
            "--",
            "sh",
            "-c",
            "echo remote-ok; exec sleep 3600",
        ])
        .ok()
        .json();
    assert_eq!(created["phase"], "Ready", "{created}");
    assert!(
        gateway
            .cli(&["sandbox", "logs", &name])
            .ok()
            .stdout
            .contains("remote-ok")
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
    assert_eq!(gateway.phase(&name), None);
}

#[test]
fn podman_over_mutual_tls_full_lifecycle_and_reconnect() {
    require_podman!();
    let env = TestEnv::new();
    let certs: PathBuf = env.path().join("certs");
    certs_init(&certs);
    let port = free_port();
    let mut driver = start_remote_podman(&env, &certs, port);
    let endpoint = format!("https://127.0.0.1:{port}");
    let mut gateway =
        Gateway::start(&env, &gateway_config(&endpoint, &certs)).unwrap_or_else(|e| panic!("{e}"));
    lifecycle(&gateway, &env);

    // The driver restarts: the gateway reconnects and works again.
    driver.signal(Signal::SIGTERM);
    assert!(driver.wait_exit(Duration::from_secs(30)).is_some());
    let driver = start_remote_podman(&env, &certs, port);
    wait_until("the driver is Ready again", Duration::from_secs(60), || {
        gateway.driver(DRIVER)["state"] == "Ready"
    });
    lifecycle(&gateway, &env);

    // The driver outlives the gateway.
    let status = gateway.stop();
    assert!(status.success(), "{status}\n{}", gateway.log());
    assert!(
        alive(driver.pid()),
        "an attached driver outlives the gateway"
    );
}

#[test]
fn wrong_ca_or_missing_client_cert_fail_startup_naming_the_driver() {
    require_podman!();
    let env = TestEnv::new();
    let certs = env.path().join("certs");
    let other = env.path().join("other");
    certs_init(&certs);
    certs_init(&other);
    let port = free_port();
    let _driver = start_remote_podman(&env, &certs, port);
    let endpoint = format!("https://127.0.0.1:{port}");

    // Another deployment's CA and client certificate.
    let error = Gateway::start(&env, &gateway_config(&endpoint, &other))
        .expect_err("a foreign CA must not attach");
    assert!(
        error.contains(&format!("driver '{DRIVER}'")) && error.contains("not signed by the CA"),
        "{error}"
    );

    // No client certificate configured.
    let config = GatewayConfig {
        drivers: Some(format!("{DRIVER}@{endpoint}")),
        extra_args: vec![
            "--driver-tls-ca".into(),
            certs.join("ca.pem").display().to_string(),
        ],
        ..GatewayConfig::default()
    };
    let error = Gateway::start(&env, &config).expect_err("no client certificate");
    assert!(
        error.contains(&format!("driver '{DRIVER}'")) && error.contains("tls_cert, tls_key"),
        "{error}"
    );
}
