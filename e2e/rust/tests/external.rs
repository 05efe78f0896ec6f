//! Bucket `external`: `openshell-driver-podman` started by the test as a
//! standalone process and attached to the gateway under a non-reserved
//! name, once through TOML `socket_path` and once through `name@socket`.
#![cfg(feature = "external")]

use std::path::Path;

use openshell_e2e::{
    Gateway, GatewayConfig, TestEnv, alive, require_podman, start_external_podman,
};

fn lifecycle(gateway: &Gateway, env: &TestEnv, driver: &str) {
    let info = gateway.driver(driver);
    assert_eq!(info["managed"], false, "{info}");
    assert_eq!(info["state"], "Ready", "{info}");
    assert_eq!(
        info["capabilities"]["driver_name"], "openshell-driver-podman",
        "{info}"
    );

    let name = env.name("ext");
    let created = gateway
        .cli(&[
            "-o",
            "json",
            "sandbox",
            "create",
            &name,
            "--driver",
            driver,
            "--",
            "sh",
            "-c",
            "echo external-ok; exec sleep 3600",
        ])
        .ok()
        .json();
    assert_eq!(created["phase"], "Ready", "{created}");
    assert_eq!(created["driver"], driver);
    assert!(
        gateway
            .cli(&["sandbox", "logs", &name])
            .ok()
            .stdout
            .contains("external-ok")
    );
    assert_eq!(
        gateway
            .cli(&["-o", "json", "sandbox", "stop", &name])
            .ok()
            .json()["phase"],
        "Stopped"
    );
    assert_eq!(
        gateway
            .cli(&["-o", "json", "sandbox", "start", &name])
            .ok()
            .json()["phase"],
        "Ready"
    );
    gateway.cli(&["sandbox", "delete", &name]).ok();
    assert_eq!(gateway.phase(&name), None);
}

fn stop_gateway_and_check_driver_survives(mut gateway: Gateway, driver_pid: u32, socket: &Path) {
    let status = gateway.stop();
    assert!(
        status.success(),
        "gateway exits cleanly: {status}\n{}",
        gateway.log()
    );
    assert!(alive(driver_pid), "an attached driver outlives the gateway");
    assert!(
        socket.exists(),
        "an attached driver's socket stays in place"
    );
}

#[test]
fn attached_through_toml_socket_path() {
    require_podman!();
    let env = TestEnv::new();
    let (driver, socket) = start_external_podman(&env, "external-podman");
    let toml = format!(
        "[openshell.gateway]\ncompute_drivers = [\"external-podman\"]\n\n\
         [openshell.drivers.external-podman]\nsocket_path = \"{}\"\nexpect_driver_name = \"openshell-driver-podman\"\n",
        socket.display()
    );
    let gateway = Gateway::start(
        &env,
        &GatewayConfig {
            toml: Some(toml),
            ..GatewayConfig::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    lifecycle(&gateway, &env, "external-podman");
    stop_gateway_and_check_driver_survives(gateway, driver.pid(), &socket);
}

#[test]
fn attached_through_name_at_socket() {
    require_podman!();
    let env = TestEnv::new();
    let (driver, socket) = start_external_podman(&env, "external-podman");
    let config = GatewayConfig {
        drivers: Some(format!("external-podman@{}", socket.display())),
        ..GatewayConfig::default()
    };
    let gateway = Gateway::start(&env, &config).unwrap_or_else(|e| panic!("{e}"));
    lifecycle(&gateway, &env, "external-podman");
    stop_gateway_and_check_driver_survives(gateway, driver.pid(), &socket);
}

#[test]
fn a_wrong_expected_driver_name_stops_startup() {
    require_podman!();
    let env = TestEnv::new();
    let (_driver, socket) = start_external_podman(&env, "external-podman");
    let toml = format!(
        "[openshell.gateway]\ncompute_drivers = [\"external-podman\"]\n\n\
         [openshell.drivers.external-podman]\nsocket_path = \"{}\"\nexpect_driver_name = \"openshell-driver-docker\"\n",
        socket.display()
    );
    let err = Gateway::start(
        &env,
        &GatewayConfig {
            toml: Some(toml),
            ..GatewayConfig::default()
        },
    )
    .unwrap_err();
    assert!(
        err.contains("openshell-driver-docker") && err.contains("openshell-driver-podman"),
        "{err}"
    );
}
