//! The gateway end to end: the real `openshell-gateway` binary with
//! `openshell-test-driver` peers over real Unix sockets.

mod common;

use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use openshell_proto::gateway::v1::{self as gw, DriverState, SandboxPhase};
use tonic::Code;

fn toml_attached(name: &str, socket: &std::path::Path, extra: &str) -> String {
    format!(
        "[openshell.gateway]\ncompute_drivers = [\"{name}@{}\"]\n{extra}",
        socket.display()
    )
}

/// Every driver RPC the gateway uses, forwarded to an attached driver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_calls_to_an_attached_driver() {
    let dirs = Dirs::new();
    let driver = AttachedDriver::start(
        &dirs.path("kyma.sock"),
        &dirs.path("calls"),
        &["--platform-events"],
    );
    let config = write_config(&dirs, &toml_attached("kyma", &driver.socket, ""));
    let gateway = Gateway::start(&dirs, &config, &[]).await;
    let mut client = gateway.client().await;

    // GetCapabilities, snapshotted at start.
    let info = info(&mut client).await;
    assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(info.listen, format!("unix://{}", dirs.socket().display()));
    let kyma = &info.drivers[0];
    assert_eq!(kyma.name, "kyma");
    assert!(!kyma.managed);
    assert!(kyma.is_default);
    assert_eq!(kyma.socket, driver.socket.display().to_string());
    assert_eq!(kyma.state, DriverState::Ready as i32);
    let caps = kyma.capabilities.as_ref().unwrap();
    assert_eq!(caps.driver_name, "openshell-test-driver");
    assert_eq!(caps.default_image, "test/busybox:latest");
    assert!(caps.logs);
    assert!(!caps.gateway_manages_lifecycle);

    let mut watch = client
        .watch_sandboxes(gw::WatchSandboxesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert!(
        matches!(
            first.payload,
            Some(gw::watch_sandboxes_event::Payload::Synced(_))
        ),
        "{first:?}"
    );

    // ValidateSandboxCreate + CreateSandbox.
    let mut request = create_request("alpha", "", &["echo", "hello", "world"]);
    request.labels.insert("team".into(), "infra".into());
    let created = client
        .create_sandbox(request)
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(created.driver, "kyma");
    assert_eq!(
        created.spec.as_ref().unwrap().image,
        "test/busybox:latest",
        "default image filled in"
    );
    assert_eq!(created.labels["team"], "infra");
    assert!(uuid::Uuid::parse_str(&created.id).is_ok(), "{}", created.id);
    let ready = wait_phase(&mut client, "alpha", SandboxPhase::Ready).await;
    assert_eq!(ready.instance_id, "test-alpha");
    assert!(ready.resource_version > created.resource_version);

    // The watch saw the sandbox become Ready and the driver's platform events.
    let mut saw_ready = false;
    let mut reasons = Vec::new();
    while !(saw_ready && reasons.iter().any(|r| r == "Started")) {
        let event = tokio::time::timeout(PATIENCE, watch.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match event.payload {
            Some(gw::watch_sandboxes_event::Payload::Sandbox(s))
                if s.phase == SandboxPhase::Ready as i32 =>
            {
                saw_ready = true;
            }
            Some(gw::watch_sandboxes_event::Payload::PlatformEvent(e)) => {
                assert_eq!(e.sandbox_name, "alpha");
                assert_eq!(e.sandbox_id, created.id);
                reasons.push(e.reason);
            }
            _ => {}
        }
    }
    assert!(reasons.contains(&"Scheduled".to_owned()), "{reasons:?}");

    // Get and List come from the store.
    let listed = client
        .list_sandboxes(gw::ListSandboxesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.sandboxes.len(), 1);
    assert!(listed.next_page_token.is_empty());

    // Logs through the optional log service.
    let mut logs = client
        .sandbox_logs(gw::SandboxLogsRequest {
            sandbox: by_name("alpha"),
            follow: false,
            tail_lines: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut text = String::new();
    while let Some(chunk) = logs.message().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&chunk.data));
    }
    assert!(text.contains("hello world"), "{text:?}");

    // Stop and Start.
    let stopped = client
        .stop_sandbox(gw::StopSandboxRequest {
            sandbox: by_name("alpha"),
        })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(stopped.phase, SandboxPhase::Stopped as i32);
    let ready_condition = stopped
        .conditions
        .iter()
        .find(|c| c.r#type == "Ready")
        .unwrap();
    assert_eq!(ready_condition.reason, "Stopped");
    assert_rfc3339(&ready_condition.last_transition_time);
    // Idempotent.
    client
        .stop_sandbox(gw::StopSandboxRequest {
            sandbox: by_name("alpha"),
        })
        .await
        .unwrap();
    client
        .start_sandbox(gw::StartSandboxRequest {
            sandbox: by_name("alpha"),
        })
        .await
        .unwrap();
    wait_phase(&mut client, "alpha", SandboxPhase::Ready).await;

    // Delete, seen on the watch.
    let deleted = client
        .delete_sandbox(gw::DeleteSandboxRequest {
            sandbox: by_name("alpha"),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.deleted);
    loop {
        let event = tokio::time::timeout(PATIENCE, watch.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(gw::watch_sandboxes_event::Payload::Deleted(d)) = event.payload {
            assert_eq!(d.id, created.id);
            break;
        }
    }
    assert_status(
        get(&mut client, "alpha").await,
        Code::NotFound,
        &["sandbox 'alpha' not found"],
    );

    let calls = driver.calls();
    let id = &created.id;
    for expected in [
        "GetCapabilities".to_owned(),
        "GetGatewayListenerRequirements".to_owned(),
        "EnsureWorkspace default".to_owned(),
        "WatchSandboxes".to_owned(),
        "ListSandboxes".to_owned(),
        format!("ValidateSandboxCreate {id}"),
        format!("CreateSandbox {id}"),
        format!("StopSandbox {id}"),
        format!("StartSandbox {id}"),
        format!("GetSandbox {id}"),
        format!("StreamLogs {id}"),
        format!("DeleteSandbox {id}"),
    ] {
        assert!(calls.contains(&expected), "{expected:?} not in {calls:?}");
    }
    let position = |needle: &str| calls.iter().position(|c| c == needle).unwrap();
    assert!(
        position(&format!("ValidateSandboxCreate {id}")) < position(&format!("CreateSandbox {id}"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() {
    let dirs = Dirs::new();
    let driver = AttachedDriver::start(&dirs.path("kyma.sock"), &dirs.path("calls"), &[]);
    let config = write_config(&dirs, &toml_attached("kyma", &driver.socket, ""));
    let gateway = Gateway::start(&dirs, &config, &[]).await;
    let mut client = gateway.client().await;

    let mut try_create =
        async |request: gw::CreateSandboxRequest| client.create_sandbox(request).await;
    assert_status(
        try_create(create_request("", "", &[])).await,
        Code::InvalidArgument,
        &["sandbox name is required"],
    );
    assert_status(
        try_create(create_request("Alpha", "", &[])).await,
        Code::InvalidArgument,
        &["\"Alpha\"", "lowercase: \"alpha\""],
    );
    assert_status(
        try_create(create_request("a_b", "", &[])).await,
        Code::InvalidArgument,
        &["contains '_'"],
    );
    assert_status(
        try_create(create_request("alpha", "nope", &[])).await,
        Code::NotFound,
        &[
            "driver 'nope' is not configured",
            "configured drivers: kyma",
        ],
    );
    assert_status(
        try_create(create_request("alpha", "", &["", "x"])).await,
        Code::InvalidArgument,
        &["spec.command[0] is empty"],
    );
    assert_status(
        try_create(create_request("alpha", "", &["echo", "a\0b"])).await,
        Code::InvalidArgument,
        &["spec.command[1] contains a NUL byte"],
    );
    let mut env = create_request("alpha", "", &[]);
    env.spec
        .as_mut()
        .unwrap()
        .env
        .insert("A=B".into(), "x".into());
    assert_status(
        try_create(env).await,
        Code::InvalidArgument,
        &["spec.env name \"A=B\""],
    );
    let mut labels = create_request("alpha", "", &[]);
    labels.labels.insert("bad key".into(), "x".into());
    assert_status(
        try_create(labels).await,
        Code::InvalidArgument,
        &["label key \"bad key\""],
    );
    // The driver's own validation, with its code and message.
    let mut missing = create_request("alpha", "", &[]);
    missing.spec.as_mut().unwrap().image = "missing/thing:1".into();
    assert_status(
        try_create(missing).await,
        Code::FailedPrecondition,
        &[
            "driver 'kyma' failed ValidateSandboxCreate",
            "missing/thing:1 is not present",
        ],
    );
    // Nothing was stored by the failures.
    let listed = client
        .list_sandboxes(gw::ListSandboxesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.sandboxes.is_empty(), "{listed:?}");

    create(&mut client, "alpha", "").await;
    assert_status(
        client
            .create_sandbox(create_request("alpha", "kyma", &[]))
            .await,
        Code::AlreadyExists,
        &["sandbox 'alpha' already exists", "driver 'kyma'"],
    );

    assert_status(
        get(&mut client, "ghost").await,
        Code::NotFound,
        &["sandbox 'ghost' not found"],
    );
    assert_status(
        client
            .get_sandbox(gw::GetSandboxRequest { sandbox: None })
            .await,
        Code::InvalidArgument,
        &["set sandbox.name"],
    );
    assert_status(
        client
            .get_sandbox(gw::GetSandboxRequest {
                sandbox: Some(gw::SandboxRef {
                    name: String::new(),
                    id: "nope".into(),
                }),
            })
            .await,
        Code::NotFound,
        &["no sandbox has id nope"],
    );
    assert_status(
        client
            .delete_sandbox(gw::DeleteSandboxRequest {
                sandbox: by_name("ghost"),
            })
            .await,
        Code::NotFound,
        &["'ghost'"],
    );
    assert_status(
        client
            .list_sandboxes(gw::ListSandboxesRequest {
                page_token: "garbage".into(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        &["page_token \"garbage\""],
    );
    assert_status(
        client
            .list_sandboxes(gw::ListSandboxesRequest {
                driver: "nope".into(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        &["driver 'nope' is not configured"],
    );
    assert_status(
        client
            .watch_sandboxes(gw::WatchSandboxesRequest {
                driver: String::new(),
                name: "Bad".into(),
            })
            .await,
        Code::InvalidArgument,
        &["lowercase"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_filters_and_pages() {
    let dirs = Dirs::new();
    let a = AttachedDriver::start(&dirs.path("a.sock"), &dirs.path("a-calls"), &[]);
    let b = AttachedDriver::start(&dirs.path("b.sock"), &dirs.path("b-calls"), &[]);
    let config = write_config(
        &dirs,
        &format!(
            "[openshell.gateway]\ncompute_drivers = [\"one@{}\", \"two@{}\"]\n",
            a.socket.display(),
            b.socket.display()
        ),
    );
    let gateway = Gateway::start(&dirs, &config, &[]).await;
    let mut client = gateway.client().await;
    for i in 0..7 {
        let mut request = create_request(
            &format!("s{i}"),
            if i % 2 == 0 { "one" } else { "two" },
            &[],
        );
        if i < 3 {
            request.labels.insert("tier".into(), "gold".into());
        }
        client.create_sandbox(request).await.unwrap();
    }
    let mut names = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_sandboxes(gw::ListSandboxesRequest {
                page_size: 3,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.sandboxes.len() <= 3);
        names.extend(page.sandboxes.into_iter().map(|s| s.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(names, ["s0", "s1", "s2", "s3", "s4", "s5", "s6"]);
    let lister = client.clone();
    let filtered = |request: gw::ListSandboxesRequest| {
        let mut client = lister.clone();
        async move {
            client
                .list_sandboxes(request)
                .await
                .unwrap()
                .into_inner()
                .sandboxes
                .into_iter()
                .map(|s| s.name)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        filtered(gw::ListSandboxesRequest {
            driver: "two".into(),
            ..Default::default()
        })
        .await,
        ["s1", "s3", "s5"]
    );
    let mut gold_one = gw::ListSandboxesRequest {
        driver: "one".into(),
        ..Default::default()
    };
    gold_one.labels.insert("tier".into(), "gold".into());
    assert_eq!(filtered(gold_one).await, ["s0", "s2"]);
    for i in 0..7 {
        wait_phase(&mut client, &format!("s{i}"), SandboxPhase::Ready).await;
    }
    client
        .stop_sandbox(gw::StopSandboxRequest {
            sandbox: by_name("s4"),
        })
        .await
        .unwrap();
    assert_eq!(
        filtered(gw::ListSandboxesRequest {
            phase: SandboxPhase::Stopped as i32,
            ..Default::default()
        })
        .await,
        ["s4"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_a_driver_that_reports_another_name() {
    let dirs = Dirs::new();
    let driver = AttachedDriver::start(
        &dirs.path("kyma.sock"),
        &dirs.path("calls"),
        &["--driver-name", "kyma-real"],
    );
    let config = write_config(
        &dirs,
        &format!(
            "{}[openshell.drivers.kyma]\nexpect_driver_name = \"kyma-expected\"\n",
            toml_attached("kyma", &driver.socket, "")
        ),
    );
    let (status, stderr) = run_gateway(&dirs, &config, &[]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    for fragment in [
        "driver 'kyma'",
        "'kyma-real'",
        "'kyma-expected'",
        "expect_driver_name",
    ] {
        assert!(stderr.contains(fragment), "{fragment:?} not in {stderr}");
    }
    assert!(!dirs.socket().exists(), "nothing left listening");
}

/// An attached driver dies and comes back: its sandboxes' calls fail with
/// UNAVAILABLE naming it meanwhile, another driver is unaffected, and once
/// it is back the watch reconnects, re-lists, and calls succeed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attached_driver_restart_reconnects_and_isolates_failures() {
    let dirs = Dirs::new();
    let mut kyma = AttachedDriver::start(
        &dirs.path("kyma.sock"),
        &dirs.path("kyma-calls"),
        &["--state-file", &dirs.path("kyma.pb").display().to_string()],
    );
    let other = AttachedDriver::start(&dirs.path("other.sock"), &dirs.path("other-calls"), &[]);
    let config = write_config(
        &dirs,
        &format!(
            "[openshell.gateway]\ncompute_drivers = [\"kyma@{}\", \"other@{}\"]\n",
            kyma.socket.display(),
            other.socket.display()
        ),
    );
    let gateway = Gateway::start(&dirs, &config, &[]).await;
    let mut client = gateway.client().await;
    create(&mut client, "on-kyma", "kyma").await;
    create(&mut client, "on-other", "other").await;
    wait_phase(&mut client, "on-kyma", SandboxPhase::Ready).await;
    wait_phase(&mut client, "on-other", SandboxPhase::Ready).await;

    kyma.kill();
    {
        let mut client = client.clone();
        wait_until("kyma unavailable", || {
            let mut client = client.clone();
            async move {
                driver_info(&mut client, "kyma").await.state == DriverState::Unavailable as i32
            }
        })
        .await;
        let info = driver_info(&mut client, "kyma").await;
        assert!(!info.state_message.is_empty());
    }
    assert_status(
        client
            .stop_sandbox(gw::StopSandboxRequest {
                sandbox: by_name("on-kyma"),
            })
            .await,
        Code::Unavailable,
        &["driver 'kyma' is unavailable"],
    );
    assert_status(
        client
            .create_sandbox(create_request("new-kyma", "kyma", &[]))
            .await,
        Code::Unavailable,
        &["driver 'kyma'"],
    );
    // The failed stop left the sandbox as it was, with a condition saying why.
    let on_kyma = get(&mut client, "on-kyma").await.unwrap();
    assert_eq!(on_kyma.phase, SandboxPhase::Ready as i32);
    let condition = on_kyma
        .conditions
        .iter()
        .find(|c| c.r#type == "DriverAvailable")
        .unwrap();
    assert_eq!(
        (condition.status.as_str(), condition.reason.as_str()),
        ("False", "DriverUnavailable")
    );
    // The other driver does not care.
    client
        .stop_sandbox(gw::StopSandboxRequest {
            sandbox: by_name("on-other"),
        })
        .await
        .unwrap();
    client
        .start_sandbox(gw::StartSandboxRequest {
            sandbox: by_name("on-other"),
        })
        .await
        .unwrap();
    wait_phase(&mut client, "on-other", SandboxPhase::Ready).await;
    assert_eq!(
        driver_info(&mut client, "other").await.state,
        DriverState::Ready as i32
    );

    let before = kyma.calls().len();
    kyma.restart();
    wait_until("kyma ready again", || {
        let mut client = client.clone();
        async move { driver_info(&mut client, "kyma").await.state == DriverState::Ready as i32 }
    })
    .await;
    let after: Vec<String> = kyma.calls()[before..].to_vec();
    assert!(after.contains(&"WatchSandboxes".to_owned()), "{after:?}");
    assert!(
        after.contains(&"ListSandboxes".to_owned()),
        "re-listed after reconnect: {after:?}"
    );
    let stopped = client
        .stop_sandbox(gw::StopSandboxRequest {
            sandbox: by_name("on-kyma"),
        })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(stopped.phase, SandboxPhase::Stopped as i32);
    assert!(
        stopped
            .conditions
            .iter()
            .all(|c| c.r#type != "DriverAvailable"),
        "{stopped:?}"
    );
}

fn managed_config(dirs: &Dirs, extra_table: &str) -> std::path::PathBuf {
    write_config(
        dirs,
        &format!(
            "[openshell.gateway]\ncompute_drivers = [\"podman\"]\n\
             [openshell.drivers.podman]\nbinary = \"{}\"\ncall_log = \"{}\"\nprovision_delay_ms = 5\n{extra_table}",
            test_driver().display(),
            dirs.path("podman-calls").display()
        ),
    )
}

/// A managed driver killed behind the gateway's back is respawned by the
/// lifecycle layer; the gateway follows the new process, reconnects its
/// watch, re-lists, and serves calls again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_driver_respawn_reconnects() {
    let dirs = Dirs::new();
    let config = managed_config(&dirs, "platform_events = true\n");
    let gateway = Gateway::start(&dirs, &config, &[]).await;
    let mut client = gateway.client().await;

    // The driver got its config file, with name and state_dir injected and
    // the gateway's keys removed.
    let written = std::fs::read_to_string(dirs.run().join("podman.toml")).unwrap();
    let table: toml::Table = written.parse().unwrap();
    assert_eq!(table["name"].as_str(), Some("podman"));
    assert_eq!(
        table["state_dir"].as_str(),
        Some(
            dirs.state()
                .join("drivers/podman")
                .display()
                .to_string()
                .as_str()
        )
    );
    assert!(!table.contains_key("binary"), "{written}");
    assert!(
        dirs.state()
            .join("drivers/podman/sandboxes.pb")
            .parent()
            .unwrap()
            .is_dir()
    );

    let info = driver_info(&mut client, "podman").await;
    assert!(info.managed);
    assert_eq!(
        info.socket,
        dirs.run().join("podman.sock").display().to_string()
    );
    assert_eq!(info.restarts, 0);
    let first_pid = info.pid;
    assert!(first_pid > 0 && pid_alive(first_pid));

    create(&mut client, "keep", "").await;
    wait_phase(&mut client, "keep", SandboxPhase::Ready).await;

    let calls_before = read_calls(&dirs.path("podman-calls")).len();
    kill(first_pid, Signal::SIGKILL);
    wait_until("a new driver process", || {
        let mut client = client.clone();
        async move {
            let info = driver_info(&mut client, "podman").await;
            info.state == DriverState::Ready as i32 && info.pid != first_pid && info.restarts == 1
        }
    })
    .await;
    // The new process reloaded its state; the watch reconnected and re-listed.
    wait_until("watch reconnected", || {
        let calls = read_calls(&dirs.path("podman-calls"));
        let after = calls[calls_before..].to_vec();
        async move {
            after.contains(&"WatchSandboxes".to_owned())
                && after.contains(&"ListSandboxes".to_owned())
        }
    })
    .await;
    let stopped = client
        .stop_sandbox(gw::StopSandboxRequest {
            sandbox: by_name("keep"),
        })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(stopped.phase, SandboxPhase::Stopped as i32);
    client
        .start_sandbox(gw::StartSandboxRequest {
            sandbox: by_name("keep"),
        })
        .await
        .unwrap();
    wait_phase(&mut client, "keep", SandboxPhase::Ready).await;
}

/// Two drivers at once: each sandbox's calls go to its own driver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_drivers_route_each_sandbox_to_its_own() {
    let dirs = Dirs::new();
    let kyma = AttachedDriver::start(&dirs.path("kyma.sock"), &dirs.path("kyma-calls"), &[]);
    let config = write_config(
        &dirs,
        &format!(
            "[openshell.gateway]\ncompute_drivers = [\"podman\", \"kyma@{}\"]\n\
             [openshell.drivers.podman]\nbinary = \"{}\"\ncall_log = \"{}\"\ndriver_name = \"managed-one\"\n",
            kyma.socket.display(),
            test_driver().display(),
            dirs.path("podman-calls").display()
        ),
    );
    let gateway = Gateway::start(&dirs, &config, &[]).await;
    let mut client = gateway.client().await;
    let info = info(&mut client).await;
    let names: Vec<(&str, bool, bool)> = info
        .drivers
        .iter()
        .map(|d| (d.name.as_str(), d.managed, d.is_default))
        .collect();
    assert_eq!(names, [("podman", true, true), ("kyma", false, false)]);
    assert_eq!(
        info.drivers[0].capabilities.as_ref().unwrap().driver_name,
        "managed-one"
    );

    let on_default = create(&mut client, "on-default", "").await;
    let on_kyma = create(&mut client, "on-kyma", "kyma").await;
    assert_eq!(on_default.driver, "podman");
    assert_eq!(on_kyma.driver, "kyma");
    for name in ["on-default", "on-kyma"] {
        wait_phase(&mut client, name, SandboxPhase::Ready).await;
        client
            .stop_sandbox(gw::StopSandboxRequest {
                sandbox: by_name(name),
            })
            .await
            .unwrap();
        client
            .delete_sandbox(gw::DeleteSandboxRequest {
                sandbox: by_name(name),
            })
            .await
            .unwrap();
    }
    let podman_calls = read_calls(&dirs.path("podman-calls"));
    let kyma_calls = kyma.calls();
    for rpc in ["CreateSandbox", "StopSandbox", "DeleteSandbox"] {
        assert!(
            podman_calls.contains(&format!("{rpc} {}", on_default.id)),
            "{rpc}: {podman_calls:?}"
        );
        assert!(
            kyma_calls.contains(&format!("{rpc} {}", on_kyma.id)),
            "{rpc}: {kyma_calls:?}"
        );
        assert!(
            !podman_calls.iter().any(|c| c.ends_with(&on_kyma.id)),
            "{podman_calls:?}"
        );
        assert!(
            !kyma_calls.iter().any(|c| c.ends_with(&on_default.id)),
            "{kyma_calls:?}"
        );
    }
}

/// Stopping and starting the gateway keeps every sandbox, its id and its
/// intent; with gateway_manages_lifecycle the gateway stops running
/// sandboxes on the way down and starts them on the way up, and leaves an
/// explicitly stopped one stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_restart_keeps_state_and_intent() {
    let dirs = Dirs::new();
    let config = managed_config(&dirs, "gateway_manages_lifecycle = true\n");
    let mut gateway = Gateway::start(&dirs, &config, &[]).await;
    let mut client = gateway.client().await;
    let running = create(&mut client, "running", "").await;
    let parked = create(&mut client, "parked", "").await;
    wait_phase(&mut client, "running", SandboxPhase::Ready).await;
    wait_phase(&mut client, "parked", SandboxPhase::Ready).await;
    client
        .stop_sandbox(gw::StopSandboxRequest {
            sandbox: by_name("parked"),
        })
        .await
        .unwrap();
    let before_stop = read_calls(&dirs.path("podman-calls")).len();
    let driver_pid = driver_info(&mut client, "podman").await.pid;
    drop(client);

    let status = gateway.stop();
    assert!(status.success(), "{status}\n{}", gateway.log_text());
    assert!(
        !pid_alive(driver_pid),
        "the managed driver stopped with the gateway"
    );
    assert!(!dirs.socket().exists(), "the API socket was removed");
    assert!(
        !dirs.run().join("podman.sock").exists(),
        "the driver socket was removed"
    );
    let sweep: Vec<String> = read_calls(&dirs.path("podman-calls"))[before_stop..].to_vec();
    assert!(
        sweep.contains(&format!("StopSandbox {}", running.id)),
        "{sweep:?}"
    );
    assert!(
        !sweep.contains(&format!("StopSandbox {}", parked.id)),
        "already stopped: {sweep:?}"
    );

    let before_start = read_calls(&dirs.path("podman-calls")).len();
    gateway.restart().await;
    let mut client = gateway.client().await;
    let after: Vec<String> = read_calls(&dirs.path("podman-calls"))[before_start..].to_vec();
    assert!(
        after.contains(&format!("StartSandbox {}", running.id)),
        "{after:?}"
    );
    assert!(
        !after.contains(&format!("StartSandbox {}", parked.id)),
        "{after:?}"
    );
    let again = wait_phase(&mut client, "running", SandboxPhase::Ready).await;
    assert_eq!(again.id, running.id);
    let still = get(&mut client, "parked").await.unwrap();
    assert_eq!(still.id, parked.id);
    assert_eq!(still.phase, SandboxPhase::Stopped as i32);
    let listed = client
        .list_sandboxes(gw::ListSandboxesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.sandboxes.len(), 2);
}

/// A sandbox its driver no longer has becomes Error (ComputeResourceMissing)
/// once it has been unchanged for the orphan grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_missing_from_their_driver_become_errors() {
    let dirs = Dirs::new();
    let mut kyma = AttachedDriver::start(&dirs.path("kyma.sock"), &dirs.path("calls"), &[]);
    let config = write_config(
        &dirs,
        &toml_attached("kyma", &kyma.socket, "orphan_grace_secs = 0.05\n"),
    );
    let mut gateway = Gateway::start(&dirs, &config, &[]).await;
    let mut client = gateway.client().await;
    create(&mut client, "lost", "").await;
    wait_phase(&mut client, "lost", SandboxPhase::Ready).await;
    drop(client);
    assert!(gateway.stop().success());
    // The driver restarts without state: the sandbox is gone.
    kyma.kill();
    kyma.restart();
    tokio::time::sleep(Duration::from_millis(100)).await;
    gateway.restart().await;
    let mut client = gateway.client().await;
    let lost = wait_phase(&mut client, "lost", SandboxPhase::Error).await;
    let ready = lost
        .conditions
        .iter()
        .find(|c| c.r#type == "Ready")
        .unwrap();
    assert_eq!(ready.reason, "ComputeResourceMissing");
    assert!(
        ready
            .message
            .contains("driver 'kyma' no longer has this sandbox"),
        "{ready:?}"
    );
    // It can still be deleted.
    assert!(
        client
            .delete_sandbox(gw::DeleteSandboxRequest {
                sandbox: by_name("lost")
            })
            .await
            .unwrap()
            .into_inner()
            .deleted
    );
    assert_status(get(&mut client, "lost").await, Code::NotFound, &[]);
}

/// SIGKILL of the gateway leaves no managed driver behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_gateway_takes_managed_drivers_down() {
    let dirs = Dirs::new();
    let config = managed_config(&dirs, "");
    let mut gateway = Gateway::start(&dirs, &config, &[]).await;
    let mut client = gateway.client().await;
    let pid = driver_info(&mut client, "podman").await.pid;
    assert!(pid_alive(pid));
    drop(client);
    kill(gateway.pid(), Signal::SIGKILL);
    gateway.wait_exit();
    wait_until(
        "the orphaned driver to exit",
        || async move { !pid_alive(pid) },
    )
    .await;
}

/// A driver without the optional RPCs and log service still works; logs are
/// refused with FAILED_PRECONDITION naming the driver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minimal_driver_without_optional_services() {
    let dirs = Dirs::new();
    let driver =
        AttachedDriver::start(&dirs.path("mini.sock"), &dirs.path("calls"), &["--minimal"]);
    let config = write_config(&dirs, &toml_attached("mini", &driver.socket, ""));
    let gateway = Gateway::start(&dirs, &config, &[]).await;
    let mut client = gateway.client().await;
    let info = driver_info(&mut client, "mini").await;
    assert!(!info.capabilities.unwrap().logs);
    create(&mut client, "m", "").await;
    wait_phase(&mut client, "m", SandboxPhase::Ready).await;
    assert_status(
        client
            .sandbox_logs(gw::SandboxLogsRequest {
                sandbox: by_name("m"),
                follow: false,
                tail_lines: 0,
            })
            .await,
        Code::FailedPrecondition,
        &["driver 'mini' keeps no logs"],
    );
}

/// Following logs streams new output until the gateway stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followed_logs_end_when_the_gateway_stops() {
    let dirs = Dirs::new();
    let driver = AttachedDriver::start(&dirs.path("kyma.sock"), &dirs.path("calls"), &[]);
    let config = write_config(&dirs, &toml_attached("kyma", &driver.socket, ""));
    let mut gateway = Gateway::start(&dirs, &config, &[]).await;
    let mut client = gateway.client().await;
    client
        .create_sandbox(create_request("talk", "", &["echo", "first"]))
        .await
        .unwrap();
    wait_phase(&mut client, "talk", SandboxPhase::Ready).await;
    let mut logs = client
        .sandbox_logs(gw::SandboxLogsRequest {
            sandbox: by_name("talk"),
            follow: true,
            tail_lines: 1,
        })
        .await
        .unwrap()
        .into_inner();
    let first = logs.message().await.unwrap().unwrap();
    assert_eq!(String::from_utf8_lossy(&first.data), "first\n");
    client
        .stop_sandbox(gw::StopSandboxRequest {
            sandbox: by_name("talk"),
        })
        .await
        .unwrap();
    let next = tokio::time::timeout(PATIENCE, logs.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&next.data), "stopped\n");
    kill(gateway.pid(), Signal::SIGTERM);
    let end = tokio::time::timeout(PATIENCE, logs.message())
        .await
        .unwrap();
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
    assert!(gateway.wait_exit().success(), "{}", gateway.log_text());
}

/// Driver calls carry deadlines: a stalled StopSandbox fails with
/// DEADLINE_EXCEEDED naming the driver and the call, and the sandbox is put
/// back as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_driver_calls_hit_their_deadline() {
    let dirs = Dirs::new();
    let driver = AttachedDriver::start(
        &dirs.path("slow.sock"),
        &dirs.path("calls"),
        &["--stall", "StopSandbox"],
    );
    let config = write_config(
        &dirs,
        &toml_attached("slow", &driver.socket, "driver_call_timeout_secs = 0.3\n"),
    );
    let gateway = Gateway::start(&dirs, &config, &[]).await;
    let mut client = gateway.client().await;
    create(&mut client, "stuck", "").await;
    wait_phase(&mut client, "stuck", SandboxPhase::Ready).await;
    assert_status(
        client
            .stop_sandbox(gw::StopSandboxRequest {
                sandbox: by_name("stuck"),
            })
            .await,
        Code::DeadlineExceeded,
        &["driver 'slow' did not answer StopSandbox within 300ms"],
    );
    let after = get(&mut client, "stuck").await.unwrap();
    assert_eq!(after.phase, SandboxPhase::Ready as i32, "{after:?}");
    // The driver is still fine for everything else.
    assert_eq!(
        driver_info(&mut client, "slow").await.state,
        DriverState::Ready as i32
    );
}

/// A managed driver that keeps dying is given up on: the gateway says so in
/// its info and in every call for its sandboxes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managed_driver_that_keeps_dying_is_reported_failed() {
    let dirs = Dirs::new();
    let marker = dirs.path("started-once");
    let config = managed_config(
        &dirs,
        &format!("only_first_start = \"{}\"\n", marker.display()),
    );
    let gateway = Gateway::start(&dirs, &config, &[]).await;
    let mut client = gateway.client().await;
    create(&mut client, "doomed", "").await;
    let pid = driver_info(&mut client, "podman").await.pid;
    kill(pid, Signal::SIGKILL);
    wait_until("the driver to be given up on", || {
        let mut client = client.clone();
        async move { driver_info(&mut client, "podman").await.state == DriverState::Failed as i32 }
    })
    .await;
    let info = driver_info(&mut client, "podman").await;
    assert!(
        info.state_message
            .contains("gave up after 5 restart attempt(s)"),
        "{info:?}"
    );
    assert_eq!(info.pid, 0);
    assert_status(
        client
            .stop_sandbox(gw::StopSandboxRequest {
                sandbox: by_name("doomed"),
            })
            .await,
        Code::Unavailable,
        &["driver 'podman' is unavailable: failed: gave up"],
    );
    let doomed = get(&mut client, "doomed").await.unwrap();
    let condition = doomed
        .conditions
        .iter()
        .find(|c| c.r#type == "DriverAvailable")
        .unwrap();
    assert_eq!(condition.reason, "DriverFailed");
    assert_rfc3339(&condition.last_transition_time);
}

/// WatchSandboxes filters by driver and by name, and re-sends a driver's
/// sandboxes when its availability changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_filters_and_availability_updates() {
    let dirs = Dirs::new();
    let mut a = AttachedDriver::start(&dirs.path("a.sock"), &dirs.path("a-calls"), &[]);
    let b = AttachedDriver::start(&dirs.path("b.sock"), &dirs.path("b-calls"), &[]);
    let config = write_config(
        &dirs,
        &format!(
            "[openshell.gateway]\ncompute_drivers = [\"a@{}\", \"b@{}\"]\n",
            a.socket.display(),
            b.socket.display()
        ),
    );
    let gateway = Gateway::start(&dirs, &config, &[]).await;
    let mut client = gateway.client().await;
    create(&mut client, "a1", "a").await;
    create(&mut client, "b1", "b").await;
    create(&mut client, "b2", "b").await;

    let mut only_b = client
        .watch_sandboxes(gw::WatchSandboxesRequest {
            driver: "b".into(),
            name: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut only_a1 = client
        .watch_sandboxes(gw::WatchSandboxesRequest {
            driver: String::new(),
            name: "a1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let initial = |events: Vec<gw::WatchSandboxesEvent>| -> Vec<String> {
        events
            .into_iter()
            .filter_map(|e| match e.payload {
                Some(gw::watch_sandboxes_event::Payload::Sandbox(s)) => Some(s.name),
                _ => None,
            })
            .collect()
    };
    let until_synced = async |stream: &mut tonic::Streaming<gw::WatchSandboxesEvent>| {
        let mut events = Vec::new();
        loop {
            let event = stream.message().await.unwrap().unwrap();
            if matches!(
                event.payload,
                Some(gw::watch_sandboxes_event::Payload::Synced(_))
            ) {
                return events;
            }
            events.push(event);
        }
    };
    assert_eq!(initial(until_synced(&mut only_b).await), ["b1", "b2"]);
    assert_eq!(initial(until_synced(&mut only_a1).await), ["a1"]);

    // Driver a goes down: a1's watcher hears about it, b's does not.
    a.kill();
    loop {
        let event = tokio::time::timeout(PATIENCE, only_a1.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(gw::watch_sandboxes_event::Payload::Sandbox(s)) = event.payload {
            assert_eq!(s.name, "a1");
            if s.conditions.iter().any(|c| c.reason == "DriverUnavailable") {
                break;
            }
        }
    }
    client
        .delete_sandbox(gw::DeleteSandboxRequest {
            sandbox: by_name("b2"),
        })
        .await
        .unwrap();
    loop {
        let event = tokio::time::timeout(PATIENCE, only_b.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match event.payload {
            Some(gw::watch_sandboxes_event::Payload::Sandbox(s)) => {
                assert!(s.name.starts_with('b'), "{s:?}");
            }
            Some(gw::watch_sandboxes_event::Payload::Deleted(d)) => {
                assert_eq!(d.name, "b2");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// A sandbox whose driver is dropped from the configuration is kept, shown
/// with DriverNotConfigured, refused changes, and usable again once the
/// driver is configured again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_of_an_unconfigured_driver_are_kept() {
    let dirs = Dirs::new();
    let a = AttachedDriver::start(&dirs.path("a.sock"), &dirs.path("a-calls"), &[]);
    let b = AttachedDriver::start(
        &dirs.path("b.sock"),
        &dirs.path("b-calls"),
        &["--state-file", &dirs.path("b.pb").display().to_string()],
    );
    let both = format!(
        "[openshell.gateway]\ncompute_drivers = [\"a@{}\", \"b@{}\"]\n",
        a.socket.display(),
        b.socket.display()
    );
    let config = write_config(&dirs, &both);
    let mut gateway = Gateway::start(&dirs, &config, &[]).await;
    let mut client = gateway.client().await;
    let kept = create(&mut client, "on-b", "b").await;
    wait_phase(&mut client, "on-b", SandboxPhase::Ready).await;
    drop(client);
    assert!(gateway.stop().success());

    write_config(&dirs, &toml_attached("a", &a.socket, ""));
    gateway.restart().await;
    assert!(
        gateway
            .log_text()
            .contains("belong to a driver that is not configured")
    );
    let mut client = gateway.client().await;
    let shown = get(&mut client, "on-b").await.unwrap();
    assert_eq!(shown.id, kept.id);
    let condition = shown
        .conditions
        .iter()
        .find(|c| c.r#type == "DriverAvailable")
        .unwrap();
    assert_eq!(condition.reason, "DriverNotConfigured");
    assert_rfc3339(&condition.last_transition_time);
    assert_status(
        client
            .stop_sandbox(gw::StopSandboxRequest {
                sandbox: by_name("on-b"),
            })
            .await,
        Code::FailedPrecondition,
        &[
            "belongs to driver 'b', which is not configured",
            "configured: a",
        ],
    );
    let listed = client
        .list_sandboxes(gw::ListSandboxesRequest {
            driver: "b".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed.sandboxes.len(),
        1,
        "rows of an unconfigured driver can still be listed"
    );
    drop(client);
    assert!(gateway.stop().success());

    write_config(&dirs, &both);
    gateway.restart().await;
    let mut client = gateway.client().await;
    let stopped = client
        .stop_sandbox(gw::StopSandboxRequest {
            sandbox: by_name("on-b"),
        })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(stopped.phase, SandboxPhase::Stopped as i32);
}

/// Condition times on the public API are RFC 3339, never epoch text.
fn assert_rfc3339(time: &str) {
    assert!(
        time.ends_with('Z') && openshell_wire::time::parse_rfc3339(time).is_some(),
        "last_transition_time {time:?} is not RFC 3339 UTC"
    );
}
