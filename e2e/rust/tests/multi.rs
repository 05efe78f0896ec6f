//! Bucket `multi`: two drivers at once — the managed Podman driver and an
//! attached standalone one — with sandboxes routed by `--driver`.
#![cfg(feature = "multi")]

use openshell_e2e::{
    Gateway, GatewayConfig, TEST_IMAGE, TestEnv, require_podman, start_external_podman,
};

fn instance_of(sandbox: &str) -> String {
    let out = std::process::Command::new("podman")
        .args([
            "ps",
            "-a",
            "--format",
            "{{ index .Labels \"openshell.driver.instance\" }}",
            "--filter",
        ])
        .arg(format!("label=openshell.sandbox.name={sandbox}"))
        .output()
        .expect("podman ps");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn sandboxes_are_routed_to_their_driver() {
    require_podman!();
    let env = TestEnv::new();
    let (_external, socket) = start_external_podman(&env, "external-podman");
    let config = GatewayConfig {
        drivers: Some(format!("podman,external-podman@{}", socket.display())),
        toml: Some(format!(
            "[openshell.drivers.podman]\ndefault_image = \"{TEST_IMAGE}\"\nstop_timeout = 2\n"
        )),
        ..GatewayConfig::default()
    };
    let gateway = Gateway::start(&env, &config).unwrap_or_else(|e| panic!("{e}"));

    let info = gateway.info();
    let drivers = info["drivers"].as_array().unwrap();
    assert_eq!(drivers.len(), 2, "{info}");
    assert_eq!(drivers[0]["name"], "podman");
    assert_eq!(drivers[0]["managed"], true);
    assert_eq!(
        drivers[0]["default"], true,
        "the first driver is the default"
    );
    assert_eq!(drivers[1]["name"], "external-podman");
    assert_eq!(drivers[1]["managed"], false);

    let local = env.name("local");
    let remote = env.name("remote");
    let default = env.name("dflt");
    gateway
        .cli(&[
            "sandbox", "create", &local, "--driver", "podman", "--", "sleep", "3600",
        ])
        .ok();
    gateway
        .cli(&[
            "sandbox",
            "create",
            &remote,
            "--driver",
            "external-podman",
            "--",
            "sleep",
            "3600",
        ])
        .ok();
    gateway
        .cli(&["sandbox", "create", &default, "--", "sleep", "3600"])
        .ok();

    assert_eq!(instance_of(&local), "podman");
    assert_eq!(instance_of(&remote), "external-podman");
    assert_eq!(instance_of(&default), "podman");

    let only_external = gateway
        .cli(&[
            "-o",
            "json",
            "sandbox",
            "list",
            "--driver",
            "external-podman",
        ])
        .ok()
        .json();
    let names: Vec<&str> = only_external
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, [remote.as_str()]);

    // Each driver handles its own sandbox's calls.
    assert_eq!(
        gateway
            .cli(&["-o", "json", "sandbox", "stop", &remote])
            .ok()
            .json()["phase"],
        "Stopped"
    );
    assert_eq!(gateway.phase(&local).as_deref(), Some("Ready"));

    for name in [&local, &remote, &default] {
        gateway.cli(&["sandbox", "delete", name]).ok();
    }
    assert!(
        gateway
            .cli(&["-o", "json", "sandbox", "list"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .is_empty()
    );
}
