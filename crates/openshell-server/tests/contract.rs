//! Drivers of both contract generations through the real gateway binary:
//! 1.x negotiation and admission, v0.0.111 drivers beside them, readiness
//! the gateway cannot confirm, and drivers whose watch stays silent until
//! it has something to say (as grpc-go and grpcio servers do).

mod common;

use std::time::Duration;

use common::*;
use openshell_driver_kit::contract::AdmissionPolicy;
use openshell_proto::gateway::v1::{DriverState, SandboxPhase};
use tonic::Code;

fn attached(drivers: &[(&str, &std::path::Path)], tables: &str) -> String {
    let list: Vec<String> = drivers
        .iter()
        .map(|(name, socket)| format!("\"{name}@{}\"", socket.display()))
        .collect();
    format!(
        "[openshell.gateway]\ncompute_drivers = [{}]\n{tables}",
        list.join(", ")
    )
}

/// The driver's watch answers nothing, not even headers, while it has no
/// sandboxes. With a 1 s call timeout the driver must stay available for
/// several timeouts and then run a sandbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_driver_whose_watch_is_silent_stays_available() {
    let dirs = Dirs::new();
    let driver = AttachedDriver::start(
        &dirs.path("lazy.sock"),
        &dirs.path("calls"),
        &["--lazy-watch-headers"],
    );
    let config = write_config(&dirs, &attached(&[("lazy", &driver.socket)], ""));
    let gateway = Gateway::start(&dirs, &config, &["--driver-call-timeout", "1"]).await;
    let mut client = gateway.client().await;

    tokio::time::sleep(Duration::from_millis(3500)).await;
    let info = driver_info(&mut client, "lazy").await;
    assert_eq!(
        info.state,
        DriverState::Ready as i32,
        "an idle driver is not an unreachable one: {info:?}\n{}",
        gateway.log_text()
    );
    create(&mut client, "idle-then-busy", "lazy").await;
    wait_phase(&mut client, "idle-then-busy", SandboxPhase::Ready).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        driver_info(&mut client, "lazy").await.state,
        DriverState::Ready as i32
    );
}

/// A 1.x driver and a v0.0.111 driver serve one gateway side by side; gateway
/// info tells them apart and both run sandboxes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_generations_side_by_side() {
    let dirs = Dirs::new();
    let new = AttachedDriver::start(&dirs.path("new.sock"), &dirs.path("calls-new"), &[]);
    let old = AttachedDriver::start(
        &dirs.path("old.sock"),
        &dirs.path("calls-old"),
        &["--legacy-contract"],
    );
    let config = write_config(
        &dirs,
        &attached(&[("new", &new.socket), ("old", &old.socket)], ""),
    );
    let gateway = Gateway::start(&dirs, &config, &[]).await;
    let mut client = gateway.client().await;

    let caps = driver_info(&mut client, "new")
        .await
        .capabilities
        .expect("caps");
    assert_eq!(caps.contract, "1.x");
    assert!(
        caps.implementation
            .starts_with("openshell-compute-plane/test-driver "),
        "{caps:?}"
    );
    assert!(caps.implementation.ends_with("(protocol 1.0)"), "{caps:?}");
    assert_eq!(caps.extension_capabilities, ["openshell.compute.contract"]);
    assert_eq!(caps.admission_policy, AdmissionPolicy::default().encode());
    assert!(caps.reports_runtime_readiness);

    let caps = driver_info(&mut client, "old")
        .await
        .capabilities
        .expect("caps");
    assert_eq!(caps.contract, "v0.0.111");
    assert!(caps.implementation.is_empty());
    assert!(caps.admission_policy.is_empty());

    for (name, driver) in [("on-new", "new"), ("on-old", "old")] {
        create(&mut client, name, driver).await;
        let sandbox = wait_phase(&mut client, name, SandboxPhase::Ready).await;
        for condition in &sandbox.conditions {
            assert!(
                openshell_wire::time::parse_rfc3339(&condition.last_transition_time).is_some(),
                "{condition:?}"
            );
        }
    }
}

/// A driver of another protocol major is refused at startup, naming the
/// driver and both versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incompatible_driver_is_refused_at_startup() {
    let dirs = Dirs::new();
    let driver = AttachedDriver::start(
        &dirs.path("kyma.sock"),
        &dirs.path("calls"),
        &["--protocol-major", "2"],
    );
    let config = write_config(&dirs, &attached(&[("kyma", &driver.socket)], ""));
    let (status, stderr) = run_gateway(&dirs, &config, &[]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    for fragment in ["driver 'kyma'", "2.0", "1.0", "major"] {
        assert!(stderr.contains(fragment), "{fragment:?} not in {stderr}");
    }
}

/// When the operator says what admission policy to expect, a driver that
/// acknowledges another one is refused, with both strings in the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_admission_policy_must_match() {
    let dirs = Dirs::new();
    let driver = AttachedDriver::start(&dirs.path("kyma.sock"), &dirs.path("calls"), &[]);
    let config = write_config(
        &dirs,
        &attached(
            &[("kyma", &driver.socket)],
            "[openshell.drivers.kyma]\nallow_driver_config = true\n",
        ),
    );
    let (status, stderr) = run_gateway(&dirs, &config, &[]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    for fragment in [
        "driver 'kyma'",
        "differs from the gateway's configuration",
        r#"\"allow_driver_config\":true"#,
        r#"\"allow_driver_config\":false"#,
    ] {
        assert!(stderr.contains(fragment), "{fragment:?} not in {stderr}");
    }

    // The same expectation, met: the gateway starts.
    let config = write_config(
        &dirs,
        &attached(
            &[("kyma", &driver.socket)],
            "[openshell.drivers.kyma]\nallow_driver_config = false\n",
        ),
    );
    let mut gateway = Gateway::start(&dirs, &config, &[]).await;
    gateway.stop();
}

/// The driver comes back acknowledging another policy: the next create is
/// refused with FAILED_PRECONDITION naming both strings. Creates on the
/// same connection ask nothing extra.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_admission_policy_is_refused_before_create() {
    let dirs = Dirs::new();
    let mut driver = AttachedDriver::start(&dirs.path("kyma.sock"), &dirs.path("calls"), &[]);
    let config = write_config(&dirs, &attached(&[("kyma", &driver.socket)], ""));
    let gateway = Gateway::start(&dirs, &config, &[]).await;
    let mut client = gateway.client().await;

    let before = driver
        .calls()
        .iter()
        .filter(|c| c.starts_with("GetCapabilities"))
        .count();
    create(&mut client, "same-connection", "kyma").await;
    let after = driver
        .calls()
        .iter()
        .filter(|c| c.starts_with("GetCapabilities"))
        .count();
    assert_eq!(
        before, after,
        "no extra round trip on an unchanged connection"
    );

    driver.kill();
    driver.args.push("--allow-driver-config".to_owned());
    driver.restart();
    wait_until("the driver is reachable again", || {
        let mut client = client.clone();
        async move { driver_info(&mut client, "kyma").await.state == DriverState::Ready as i32 }
    })
    .await;
    let refused = client
        .create_sandbox(create_request("after-restart", "kyma", &["true"]))
        .await;
    assert_status(
        refused,
        Code::FailedPrecondition,
        &[
            "driver 'kyma'",
            "admission policy changed",
            r#"\"allow_driver_config\":false"#,
            r#"\"allow_driver_config\":true"#,
        ],
    );
}

/// A 1.x driver that leaves runtime readiness to a supervisor session: this
/// gateway has none, so the sandbox stays Provisioning and says why, unless
/// the operator trusts the driver's Ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_the_gateway_cannot_confirm_is_not_faked() {
    let dirs = Dirs::new();
    let driver = AttachedDriver::start(
        &dirs.path("kyma.sock"),
        &dirs.path("calls"),
        &["--no-runtime-readiness"],
    );
    let config = write_config(&dirs, &attached(&[("kyma", &driver.socket)], ""));
    let mut gateway = Gateway::start(&dirs, &config, &[]).await;
    let mut client = gateway.client().await;
    assert!(
        !driver_info(&mut client, "kyma")
            .await
            .capabilities
            .expect("caps")
            .reports_runtime_readiness
    );
    create(&mut client, "waits", "kyma").await;
    wait_until("the supervisor condition shows", || {
        let mut client = client.clone();
        async move {
            get(&mut client, "waits").await.is_ok_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.r#type == "Ready" && c.reason == "SupervisorNotConnected")
            })
        }
    })
    .await;
    let sandbox = get(&mut client, "waits").await.expect("get");
    assert_eq!(
        sandbox.phase,
        SandboxPhase::Provisioning as i32,
        "{sandbox:?}"
    );
    gateway.stop();

    let config = write_config(
        &dirs,
        &attached(
            &[("kyma", &driver.socket)],
            "[openshell.drivers.kyma]\ntrust_driver_readiness = true\n",
        ),
    );
    let gateway = Gateway::start(&dirs, &config, &[]).await;
    let mut client = gateway.client().await;
    wait_phase(&mut client, "waits", SandboxPhase::Ready).await;
}
