//! Bucket `faults`: drivers and the gateway killed at the worst moments.
#![cfg(feature = "faults")]

use std::time::Duration;

use nix::sys::signal::Signal;
use openshell_e2e::{
    Gateway, GatewayConfig, TEST_IMAGE, TestEnv, alive, bin, require_podman, start_external_podman,
    wait_until,
};

fn podman_config() -> GatewayConfig {
    GatewayConfig {
        drivers: Some("podman".to_owned()),
        toml: Some(format!(
            "[openshell.drivers.podman]\ndefault_image = \"{TEST_IMAGE}\"\nstop_timeout = 2\n"
        )),
        ..GatewayConfig::default()
    }
}

fn kill(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid fits")),
        Signal::SIGKILL,
    );
}

/// `pid: command line` for each pid, for failure messages.
fn describe(pids: &[u32]) -> String {
    pids.iter()
        .map(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            format!(
                "\n  {pid}: {}",
                String::from_utf8_lossy(&cmd).replace('\0', " ")
            )
        })
        .collect()
}

#[test]
fn sigkilled_managed_driver_is_respawned() {
    require_podman!();
    let env = TestEnv::new();
    let gateway = Gateway::start(&env, &podman_config()).unwrap_or_else(|e| panic!("{e}"));
    let name = env.name("respawn");
    gateway
        .cli(&["sandbox", "create", &name, "--", "sleep", "3600"])
        .ok();

    let first = gateway.driver("podman")["pid"].as_u64().unwrap();
    kill(u32::try_from(first).unwrap());
    wait_until("managed driver respawned", Duration::from_secs(60), || {
        let driver = gateway.driver("podman");
        driver["state"] == "Ready"
            && driver["pid"].as_u64() != Some(first)
            && driver["restarts"].as_u64() >= Some(1)
    });

    // Calls for the sandbox work again through the new process.
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
}

#[test]
fn restarted_external_driver_is_reconnected() {
    require_podman!();
    let env = TestEnv::new();
    let (driver, socket) = start_external_podman(&env, "external-podman");
    let config = GatewayConfig {
        drivers: Some(format!("external-podman@{}", socket.display())),
        ..GatewayConfig::default()
    };
    let gateway = Gateway::start(&env, &config).unwrap_or_else(|e| panic!("{e}"));
    let name = env.name("reconn");
    gateway
        .cli(&["sandbox", "create", &name, "--", "sleep", "3600"])
        .ok();

    kill(driver.pid());
    drop(driver);
    wait_until(
        "gateway notices the attached driver is gone",
        Duration::from_secs(30),
        || gateway.driver("external-podman")["state"] == "Unavailable",
    );
    let out = gateway.cli(&["sandbox", "stop", &name]).fails_with(1);
    assert!(
        out.stderr.contains("UNAVAILABLE") && out.stderr.contains("external-podman"),
        "{}",
        out.stderr
    );

    let (_driver, _socket) = start_external_podman(&env, "external-podman");
    wait_until("gateway reconnects", Duration::from_secs(60), || {
        gateway.driver("external-podman")["state"] == "Ready"
    });
    assert_eq!(
        gateway
            .cli(&["-o", "json", "sandbox", "stop", &name])
            .ok()
            .json()["phase"],
        "Stopped"
    );
    gateway.cli(&["sandbox", "delete", &name]).ok();
}

#[test]
fn sigkilled_gateway_leaves_no_driver_behind() {
    require_podman!();
    let env = TestEnv::new();
    let mut gateway = Gateway::start(&env, &podman_config()).unwrap_or_else(|e| panic!("{e}"));
    let driver_pid = u32::try_from(gateway.driver("podman")["pid"].as_u64().unwrap()).unwrap();
    assert!(
        !env.leftover_processes().is_empty(),
        "the driver runs on this environment's sockets"
    );

    gateway.kill();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while alive(driver_pid) || !env.leftover_processes().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "still running 30 s after the gateway was killed: {}",
            describe(&env.leftover_processes())
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn gateway_restart_keeps_running_and_stopped_sandboxes() {
    require_podman!();
    let env = TestEnv::new();
    let mut gateway = Gateway::start(&env, &podman_config()).unwrap_or_else(|e| panic!("{e}"));
    let running = env.name("keep");
    let stopped = env.name("still");
    gateway
        .cli(&["sandbox", "create", &running, "--", "sleep", "3600"])
        .ok();
    gateway
        .cli(&["sandbox", "create", &stopped, "--", "sleep", "3600"])
        .ok();
    gateway.cli(&["sandbox", "stop", &stopped]).ok();

    let status = gateway.stop();
    assert!(status.success(), "{status}\n{}", gateway.log());
    let gateway = gateway.restart().unwrap_or_else(|e| panic!("{e}"));

    gateway.wait_phase(&running, "Ready", Duration::from_secs(60));
    assert_eq!(
        gateway.phase(&stopped).as_deref(),
        Some("Stopped"),
        "explicitly stopped stays stopped"
    );
    for name in [&running, &stopped] {
        gateway.cli(&["sandbox", "delete", name]).ok();
    }
}

#[test]
fn driver_that_never_becomes_ready_fails_startup_with_its_stderr() {
    let env = TestEnv::new();
    let toml = format!(
        "[openshell.gateway]\ncompute_drivers = [\"podman\"]\n\n\
         [openshell.drivers.podman]\nbinary = \"{}\"\nnever_ready = true\nready_timeout_secs = 2\n",
        bin::test_driver().display()
    );
    let err = Gateway::start(
        &env,
        &GatewayConfig {
            toml: Some(toml),
            ..GatewayConfig::default()
        },
    )
    .unwrap_err();
    assert!(err.contains("exited during startup"), "{err}");
    assert!(
        err.contains("never becoming ready"),
        "the driver's stderr tail is shown: {err}"
    );
    assert!(
        env.leftover_processes().is_empty(),
        "the failed driver is gone"
    );
}
