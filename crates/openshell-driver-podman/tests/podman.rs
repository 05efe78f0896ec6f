//! The driver against real Podman, through its gRPC API on a Unix socket.
//! Every test starts its own `podman system service` on a private socket
//! and removes every container it made; on a machine where Podman cannot
//! run a container the tests print why and skip.

mod common;

use std::time::Duration;

use common::{
    IMAGE, LONG, Standalone, base_args, engine_or_skip, event_deleted, event_sandbox, get,
    is_suspended, ready_condition, ready_true, sandbox, unique, wait_for, watch_until,
};
use openshell_driver_kit::contract::{self, AdmissionPolicy};
use openshell_proto::compute::logs::v1::{LogStream, StreamLogsRequest};
use openshell_proto::compute::v1::AuthenticateSandboxRequest;
use openshell_proto::compute::v1::compute_driver_client::ComputeDriverClient;
use openshell_proto::compute::v1::{
    CreateSandboxRequest, DeleteSandboxRequest, DriverResourceRequirements, DriverSandbox,
    GetCapabilitiesRequest, GetGatewayListenerRequirementsRequest, GetSandboxRequest,
    GpuResourceRequirements, ListSandboxesRequest, ResourceRequirements, StartSandboxRequest,
    StopSandboxRequest, ValidateSandboxCreateRequest, WatchSandboxesRequest,
};
use openshell_proto::extension::v1::ProtocolVersion;
use tonic::transport::Channel;

type Client = ComputeDriverClient<Channel>;

async fn create(client: &mut Client, sandbox: &DriverSandbox) -> Result<(), tonic::Status> {
    client
        .create_sandbox(CreateSandboxRequest {
            sandbox: Some(sandbox.clone()),
        })
        .await
        .map(drop)
}

async fn stop(client: &mut Client, id: &str) -> Result<(), tonic::Status> {
    client
        .stop_sandbox(StopSandboxRequest {
            sandbox_id: id.to_owned(),
            sandbox_name: String::new(),
        })
        .await
        .map(drop)
}

async fn start(client: &mut Client, id: &str) -> Result<(), tonic::Status> {
    client
        .start_sandbox(StartSandboxRequest {
            sandbox_id: id.to_owned(),
            ..Default::default()
        })
        .await
        .map(drop)
}

async fn delete(client: &mut Client, id: &str) -> Result<bool, tonic::Status> {
    client
        .delete_sandbox(DeleteSandboxRequest {
            sandbox_id: id.to_owned(),
            sandbox_name: String::new(),
        })
        .await
        .map(|r| r.into_inner().deleted)
}

async fn list_ids(client: &mut Client) -> Vec<String> {
    client
        .list_sandboxes(ListSandboxesRequest {})
        .await
        .expect("ListSandboxes")
        .into_inner()
        .sandboxes
        .into_iter()
        .map(|s| s.id)
        .collect()
}

async fn log_text(driver: &Standalone, id: &str, follow: bool) -> String {
    let mut logs = driver.logs_client().await;
    let mut stream = logs
        .stream_logs(StreamLogsRequest {
            sandbox_id: id.to_owned(),
            sandbox_name: String::new(),
            follow,
            tail_lines: 0,
        })
        .await
        .expect("StreamLogs")
        .into_inner();
    let mut text = String::new();
    while let Some(chunk) = stream.message().await.expect("log stream") {
        text.push_str(&String::from_utf8_lossy(&chunk.data));
    }
    text
}

async fn wait_for_log(driver: &Standalone, id: &str, needle: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = log_text(driver, id, false).await;
        if text.contains(needle) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "log of {id} never contained {needle:?}; it is:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_lifecycle_through_grpc() {
    let engine = engine_or_skip!();
    let instance = unique("life");
    engine.clean_up_instance(&instance);
    let dir = tempfile::tempdir().unwrap();
    let driver = Standalone::start(
        dir.path(),
        &base_args(&engine, &instance, &dir.path().join("state")),
    )
    .await;
    let mut client = driver.client().await;

    let caps = client
        .get_capabilities(GetCapabilitiesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(caps.driver_name, "openshell-driver-podman");
    assert_eq!(caps.default_image, IMAGE);
    assert!(caps.gateway_manages_lifecycle);
    assert!(!caps.driver_version.is_empty());
    let listeners = client
        .get_gateway_listener_requirements(GetGatewayListenerRequirementsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listeners.requirements.is_empty());

    let mut watch = client
        .watch_sandboxes(WatchSandboxesRequest {})
        .await
        .unwrap()
        .into_inner();

    // The argv must arrive exactly: no shell re-parsing of quotes or spaces.
    let mut request = sandbox(
        "life",
        &[
            "sh",
            "-c",
            "printf '<%s>' \"$@\"; echo; echo \"id=$OPENSHELL_SANDBOX_ID name=$OPENSHELL_SANDBOX greeting=$GREETING\"; exec sleep 100000",
            "argv0",
            "a b",
            "it's",
            "",
        ],
    );
    request
        .spec
        .as_mut()
        .unwrap()
        .environment
        .insert("GREETING".into(), "hello there".into());
    let id = request.id.clone();

    client
        .validate_sandbox_create(ValidateSandboxCreateRequest {
            sandbox: Some(request.clone()),
        })
        .await
        .expect("a good request validates");
    create(&mut client, &request).await.expect("create");

    let running = get(&mut client, &id).await.unwrap();
    assert!(ready_true(&running), "running after create: {running:?}");
    assert_eq!(running.name, "life");
    assert_eq!(running.workspace, "default");
    assert_eq!(running.namespace, instance);
    let container_id = running.status.as_ref().unwrap().instance_id.clone();
    assert!(!container_id.is_empty());
    assert_eq!(list_ids(&mut client).await, vec![id.clone()]);

    let text = wait_for_log(&driver, &id, "greeting=").await;
    assert!(text.contains("<a b><it's><>"), "{text}");
    assert!(
        text.contains(&format!("id={id} name=life greeting=hello there")),
        "{text}"
    );

    // The container carries the ownership labels (checked through the CLI).
    let labelled = engine.containers_with_label(&format!("openshell.sandbox.id={id}"));
    assert_eq!(labelled, vec![container_id.clone()]);
    assert_eq!(
        engine.containers_with_label(&format!("openshell.driver.instance={instance}")),
        vec![container_id.clone()]
    );

    watch_until(&mut watch, "the new sandbox running", |e| {
        event_sandbox(e).is_some_and(|s| s.id == id && ready_true(s))
    })
    .await;

    stop(&mut client, &id).await.expect("stop");
    let stopped = get(&mut client, &id).await.unwrap();
    assert!(is_suspended(&stopped), "{stopped:?}");
    let (status, reason, _) = ready_condition(&stopped).unwrap();
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "ContainerStopped")
    );
    watch_until(&mut watch, "the sandbox suspended", |e| {
        event_sandbox(e).is_some_and(|s| s.id == id && is_suspended(s))
    })
    .await;

    start(&mut client, &id).await.expect("start");
    let again = get(&mut client, &id).await.unwrap();
    assert!(ready_true(&again), "{again:?}");
    assert!(!is_suspended(&again));

    assert!(delete(&mut client, &id).await.expect("delete"));
    let gone = get(&mut client, &id).await.unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound, "{gone:?}");
    watch_until(&mut watch, "the deleted event", |e| {
        event_deleted(e) == Some(id.as_str())
    })
    .await;
    assert!(
        engine
            .containers_with_label(&format!("openshell.sandbox.id={id}"))
            .is_empty()
    );
    assert!(list_ids(&mut client).await.is_empty());
}

/// The instant both encodings of a condition's time denote, in ms.
fn both_times_ms(condition: &openshell_proto::compute::v1::DriverCondition) -> (i128, i128) {
    let text = openshell_wire::time::parse_rfc3339(&condition.last_transition_time)
        .expect("RFC 3339 text");
    let text_ms = text
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after the epoch")
        .as_millis();
    let ts = condition.transition_time.expect("a Timestamp");
    let ts_ms = i128::from(ts.seconds) * 1000 + i128::from(ts.nanos) / 1_000_000;
    (i128::try_from(text_ms).expect("fits"), ts_ms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_contract_generations_are_answered() {
    let engine = engine_or_skip!();
    let instance = unique("gens");
    engine.clean_up_instance(&instance);
    let dir = tempfile::tempdir().unwrap();
    let driver = Standalone::start(
        dir.path(),
        &base_args(&engine, &instance, &dir.path().join("state")),
    )
    .await;
    let mut client = driver.client().await;

    let legacy = client
        .get_capabilities(GetCapabilitiesRequest::default())
        .await
        .expect("a v0.0.111 gateway sends no metadata")
        .into_inner();
    let extension = legacy.extension.as_ref().expect("1.x metadata always sent");
    assert_eq!(
        extension.implementation_name,
        "openshell-compute-plane/podman"
    );
    assert_eq!(
        legacy.resource_admission_policy,
        AdmissionPolicy::default().encode()
    );
    assert!(legacy.driver_reports_runtime_readiness);
    assert!(!legacy.supports_sandbox_authentication);
    let resources = legacy.resource_capabilities.expect("resource capabilities");
    assert!(resources.cpu.expect("cpu").limit_supported);
    assert!(resources.memory.expect("memory").limit_supported);
    let gpu = resources.gpu.expect("gpu");
    assert!(!gpu.default_selection_supported && !gpu.count_selection_supported);

    let gateway = contract::peer_metadata("openshell-compute-plane/gateway", "x", &[]);
    let negotiated = client
        .get_capabilities(GetCapabilitiesRequest {
            gateway: Some(gateway.clone()),
        })
        .await
        .expect("this project's gateway negotiates")
        .into_inner();
    assert_eq!(
        negotiated.resource_admission_policy,
        legacy.resource_admission_policy
    );
    let mut future = gateway;
    future.protocol_version = Some(ProtocolVersion { major: 2, minor: 1 });
    let refused = client
        .get_capabilities(GetCapabilitiesRequest {
            gateway: Some(future),
        })
        .await
        .expect_err("major 2 is refused");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    for version in ["2.1", "1.0"] {
        assert!(refused.message().contains(version), "{}", refused.message());
    }

    let denied = client
        .authenticate_sandbox(AuthenticateSandboxRequest {
            credential: "c".into(),
        })
        .await
        .expect_err("not offered");
    assert_eq!(denied.code(), tonic::Code::Unimplemented);

    let mut with_config = sandbox("gens", &LONG);
    if let Some(template) = with_config.spec.as_mut().and_then(|s| s.template.as_mut()) {
        template.driver_config = Some(prost_types::Struct {
            fields: [("x".to_owned(), prost_types::Value::default())].into(),
        });
    }
    let refused = create(&mut client, &with_config)
        .await
        .expect_err("caller driver config is off by default");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains("allow_driver_config"));

    let mut request = sandbox("gens", &LONG);
    if let Some(spec) = request.spec.as_mut() {
        spec.launch_authentication = b"bundle".to_vec();
    }
    let id = request.id.clone();
    let created = client
        .create_sandbox(CreateSandboxRequest {
            sandbox: Some(request),
        })
        .await
        .expect("create, launch authentication accepted")
        .into_inner();
    let running = get(&mut client, &id).await.unwrap();
    let status = running.status.as_ref().expect("status");
    assert_eq!(created.runtime_identity, status.instance_id);
    assert!(!status.conditions.is_empty());
    for condition in &status.conditions {
        let (text, ts) = both_times_ms(condition);
        assert_eq!(text, ts, "{condition:?}");
    }
    stop(&mut client, &id).await.expect("stop");
    let started = client
        .start_sandbox(StartSandboxRequest {
            sandbox_id: id.clone(),
            launch_authentication: b"fresh".to_vec(),
            expected_runtime_identity: created.runtime_identity.clone(),
            ..Default::default()
        })
        .await
        .expect("start")
        .into_inner();
    assert_eq!(started.runtime_identity, created.runtime_identity);
    assert!(delete(&mut client, &id).await.expect("delete"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exits_tty_and_followed_logs() {
    let engine = engine_or_skip!();
    let instance = unique("exit");
    engine.clean_up_instance(&instance);
    let dir = tempfile::tempdir().unwrap();
    let driver = Standalone::start(
        dir.path(),
        &base_args(&engine, &instance, &dir.path().join("state")),
    )
    .await;
    let mut client = driver.client().await;

    let failing = sandbox("fails", &["sh", "-c", "echo bye; exit 3"]);
    create(&mut client, &failing).await.unwrap();
    let exited = wait_for(&mut client, &failing.id, "exit code 3", |s| {
        ready_condition(s).is_some_and(|(status, _, _)| status == "False")
    })
    .await;
    assert_eq!(
        ready_condition(&exited).unwrap(),
        (
            "False".to_owned(),
            "ContainerExited".to_owned(),
            "exited with code 3".to_owned()
        )
    );

    let mut tty = sandbox("tty", &["sh", "-c", "tty; exec sleep 100000"]);
    tty.spec.as_mut().unwrap().tty = true;
    create(&mut client, &tty).await.unwrap();
    let text = wait_for_log(&driver, &tty.id, "/dev/pts/").await;
    assert!(text.contains("/dev/pts/"), "{text}");
    let mut logs = driver.logs_client().await;
    let first = logs
        .stream_logs(StreamLogsRequest {
            sandbox_id: tty.id.clone(),
            sandbox_name: String::new(),
            follow: false,
            tail_lines: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .expect("one chunk");
    assert_eq!(first.stream(), LogStream::Console);
    assert!(first.timestamp_ms > 0);

    // A followed log delivers new output as it is written and ends when the
    // sandbox stops.
    let ticking = sandbox(
        "ticks",
        &[
            "sh",
            "-c",
            "echo first; read -t 1 x; echo second; exec sleep 100000",
        ],
    );
    create(&mut client, &ticking).await.unwrap();
    let mut stream = logs
        .stream_logs(StreamLogsRequest {
            sandbox_id: ticking.id.clone(),
            sandbox_name: String::new(),
            follow: true,
            tail_lines: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut text = String::new();
    while !text.contains("second") {
        let chunk = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("follow delivers output")
            .unwrap()
            .expect("stream open while the sandbox runs");
        assert_eq!(chunk.stream(), LogStream::Stdout);
        text.push_str(&String::from_utf8_lossy(&chunk.data));
    }
    assert!(text.starts_with("first\n"), "{text}");
    stop(&mut client, &ticking.id).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(30), async {
        while stream.message().await.ok().flatten().is_some() {}
    })
    .await;
    assert!(end.is_ok(), "a followed log ends when the sandbox stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_after_driver_restart_shows_the_same_sandboxes() {
    let engine = engine_or_skip!();
    let instance = unique("rst");
    engine.clean_up_instance(&instance);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // Managed, the way a gateway runs it: --bind-socket and
    // --expected-peer-pid come from driver-lifecycle.
    let args = base_args(&engine, &instance, &state);
    let first = common::managed(dir.path(), &instance, &args).await;
    let socket = common::managed_socket(dir.path(), &instance);
    let mut client = common::client(&socket).await;

    let running = sandbox("running", &LONG);
    let stopped = sandbox("stopped", &LONG);
    create(&mut client, &running).await.unwrap();
    create(&mut client, &stopped).await.unwrap();
    stop(&mut client, &stopped.id).await.unwrap();

    first.shutdown().await.expect("driver stops cleanly");
    assert!(!socket.exists(), "the socket goes with the driver");
    // The containers outlive the driver.
    assert_eq!(
        engine
            .containers_with_label(&format!("openshell.driver.instance={instance}"))
            .len(),
        2
    );

    let second = common::managed(dir.path(), &instance, &args).await;
    let mut client = common::client(&socket).await;
    let mut watch = client
        .watch_sandboxes(WatchSandboxesRequest {})
        .await
        .unwrap()
        .into_inner();
    // The first two events are the full picture, before anything else.
    let mut initial = Vec::new();
    for _ in 0..2 {
        let event = tokio::time::timeout(Duration::from_secs(30), watch.message())
            .await
            .expect("initial events")
            .unwrap()
            .expect("stream open");
        initial.push(event_sandbox(&event).expect("a sandbox event").clone());
    }
    initial.sort_by_key(|s| s.name.clone());
    assert_eq!(initial[0].id, running.id);
    assert!(ready_true(&initial[0]), "{:?}", initial[0]);
    assert_eq!(initial[1].id, stopped.id);
    assert!(
        is_suspended(&initial[1]),
        "stop intent survives a restart: {:?}",
        initial[1]
    );

    // Live changes follow.
    assert!(delete(&mut client, &running.id).await.unwrap());
    watch_until(&mut watch, "deleted after restart", |e| {
        event_deleted(e) == Some(running.id.as_str())
    })
    .await;
    start(&mut client, &stopped.id).await.unwrap();
    watch_until(&mut watch, "restarted sandbox running", |e| {
        event_sandbox(e).is_some_and(|s| s.id == stopped.id && ready_true(s))
    })
    .await;
    second.shutdown().await.expect("driver stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_start_and_delete_are_idempotent() {
    let engine = engine_or_skip!();
    let instance = unique("idem");
    engine.clean_up_instance(&instance);
    let dir = tempfile::tempdir().unwrap();
    let driver = Standalone::start(
        dir.path(),
        &base_args(&engine, &instance, &dir.path().join("state")),
    )
    .await;
    let mut client = driver.client().await;

    // sh as PID 1 ignores SIGTERM, so every stop runs into the stop timeout
    // and SIGKILL: the case where Podman reports "stopping" for a while.
    let request = sandbox("idem", &["sh", "-c", "while :; do sleep 1; done"]);
    let id = request.id.clone();
    create(&mut client, &request).await.unwrap();

    for round in 0..2 {
        stop(&mut client, &id)
            .await
            .unwrap_or_else(|e| panic!("stop {round}: {e}"));
        stop(&mut client, &id)
            .await
            .unwrap_or_else(|e| panic!("second stop {round}: {e}"));
        let stopped = get(&mut client, &id).await.unwrap();
        assert!(is_suspended(&stopped), "{stopped:?}");
        // Start right after stop: stop only returned once Podman was done.
        start(&mut client, &id)
            .await
            .unwrap_or_else(|e| panic!("start {round}: {e}"));
        start(&mut client, &id)
            .await
            .unwrap_or_else(|e| panic!("second start {round}: {e}"));
        let running = get(&mut client, &id).await.unwrap();
        assert!(ready_true(&running), "{running:?}");
    }

    // Paused behind the driver's back: reported as suspended; both stop and
    // start still work.
    let container = get(&mut client, &id)
        .await
        .unwrap()
        .status
        .unwrap()
        .instance_id;
    let pause = |engine: &common::TestEngine| {
        let output = engine
            .remote()
            .args(["pause", &container])
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
    };
    pause(&engine);
    let paused = wait_for(&mut client, &id, "paused", is_suspended).await;
    assert_eq!(ready_condition(&paused).unwrap().1, "ContainerPaused");
    start(&mut client, &id).await.expect("start unpauses");
    assert!(ready_true(&get(&mut client, &id).await.unwrap()));
    pause(&engine);
    wait_for(&mut client, &id, "paused again", is_suspended).await;
    stop(&mut client, &id)
        .await
        .expect("stop of a paused sandbox");
    let stopped = get(&mut client, &id).await.unwrap();
    assert_eq!(ready_condition(&stopped).unwrap().1, "ContainerStopped");

    assert!(delete(&mut client, &id).await.unwrap());
    assert!(
        !delete(&mut client, &id).await.unwrap(),
        "a second delete finds nothing"
    );
    for (what, result) in [
        ("stop", stop(&mut client, &id).await),
        ("start", start(&mut client, &id).await),
    ] {
        let status = result.expect_err(what);
        assert_eq!(status.code(), tonic::Code::NotFound, "{what}: {status:?}");
    }
    assert!(!delete(&mut client, "never-existed").await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_containers_are_never_listed_or_touched() {
    let engine = engine_or_skip!();
    let run = unique("own");
    engine.clean_up_label(format!("openshell-test.run={run}"));
    let mine = format!("{run}a");
    let other = format!("{run}b");
    engine.clean_up_instance(&mine);
    engine.clean_up_instance(&other);

    // A plain container, and one that looks like another driver instance's
    // sandbox, both made behind the driver's back.
    let foreign_id = "foreign-sandbox-id";
    let podman = engine.client();
    for (name, labels) in [
        (
            format!("{run}-plain"),
            serde_json::json!({"openshell-test.run": run}),
        ),
        (
            format!("{run}-other"),
            serde_json::json!({
                "openshell-test.run": run,
                "openshell.managed-by": "openshell-driver-podman",
                "openshell.driver.instance": other,
                "openshell.sandbox.id": foreign_id,
                "openshell.sandbox.name": "theirs",
            }),
        ),
    ] {
        let created = podman
            .create(&serde_json::json!({
                "name": name,
                "image": IMAGE,
                "command": ["sleep", "100000"],
                "labels": labels,
                "r_limits": [{"type": "nofile", "soft": 1024, "hard": 1024},
                             {"type": "nproc", "soft": 1024, "hard": 1024}],
            }))
            .await
            .expect("create a foreign container");
        podman.start(&created.id).await.expect("start it");
    }

    let dir = tempfile::tempdir().unwrap();
    let driver = Standalone::start(
        dir.path(),
        &base_args(&engine, &mine, &dir.path().join("a")),
    )
    .await;
    let mut client = driver.client().await;
    let own = sandbox("mine", &LONG);
    create(&mut client, &own).await.unwrap();

    // A second instance against the same engine.
    let dir_b = tempfile::tempdir().unwrap();
    let driver_b = Standalone::start(
        dir_b.path(),
        &base_args(&engine, &other, &dir_b.path().join("b")),
    )
    .await;
    let mut client_b = driver_b.client().await;

    assert_eq!(list_ids(&mut client).await, vec![own.id.clone()]);
    assert_eq!(list_ids(&mut client_b).await, vec![foreign_id.to_owned()]);
    let mut watch = client
        .watch_sandboxes(WatchSandboxesRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(
        event_sandbox(&first).map(|s| s.id.as_str()),
        Some(own.id.as_str())
    );

    let status = get(&mut client, foreign_id).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert_eq!(
        stop(&mut client, foreign_id).await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    assert_eq!(
        start(&mut client, foreign_id).await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    assert!(!delete(&mut client, foreign_id).await.unwrap());
    // Instance b cannot touch instance a's sandbox either.
    assert!(!delete(&mut client_b, &own.id).await.unwrap());
    assert_eq!(
        get(&mut client_b, &own.id).await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    // A name lookup does not cross instances.
    let by_name = client
        .get_sandbox(GetSandboxRequest {
            sandbox_id: String::new(),
            sandbox_name: "theirs".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(by_name.code(), tonic::Code::NotFound);

    // Everything foreign still runs.
    for name in [format!("{run}-plain"), format!("{run}-other")] {
        let inspect = podman.inspect(&name).await.unwrap().expect("still there");
        assert_eq!(inspect.state.status, "running", "{name}");
    }
    assert!(ready_true(&get(&mut client, &own.id).await.unwrap()));
}

fn invalid(status: &tonic::Status, code: tonic::Code, needle: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "{needle:?} not in {:?}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_errors_a_user_can_act_on() {
    let engine = engine_or_skip!();
    let instance = unique("bad");
    engine.clean_up_instance(&instance);
    let dir = tempfile::tempdir().unwrap();
    // No default image on this one.
    let args: Vec<String> = base_args(&engine, &instance, &dir.path().join("state"))
        .into_iter()
        .filter(|a| a != "--default-image" && a != IMAGE)
        .collect();
    let driver = Standalone::start(dir.path(), &args).await;
    let mut client = driver.client().await;

    let validate = |request: DriverSandbox| {
        let mut client = client.clone();
        async move {
            client
                .validate_sandbox_create(ValidateSandboxCreateRequest {
                    sandbox: Some(request),
                })
                .await
                .unwrap_err()
        }
    };
    let edit = |f: &dyn Fn(&mut DriverSandbox)| {
        let mut request = sandbox("bad", &LONG);
        f(&mut request);
        request
    };

    let no_image = edit(&|s| {
        s.spec
            .as_mut()
            .unwrap()
            .template
            .as_mut()
            .unwrap()
            .image
            .clear();
    });
    invalid(
        &validate(no_image).await,
        tonic::Code::FailedPrecondition,
        "default_image",
    );
    let absent = edit(&|s| {
        s.spec.as_mut().unwrap().template.as_mut().unwrap().image = "localhost/not-here:1".into();
    });
    // Under the default policy (missing) an absent image is pulled at
    // create; validation does not pull, so it passes.
    client
        .clone()
        .validate_sandbox_create(ValidateSandboxCreateRequest {
            sandbox: Some(absent.clone()),
        })
        .await
        .expect("an absent image validates under image_pull_policy missing");
    let cpu = edit(&|s| {
        s.spec
            .as_mut()
            .unwrap()
            .template
            .as_mut()
            .unwrap()
            .resources = Some(DriverResourceRequirements {
            cpu_limit: "two".into(),
            ..Default::default()
        });
    });
    invalid(
        &validate(cpu).await,
        tonic::Code::InvalidArgument,
        "limits.cpu",
    );
    let env = edit(&|s| {
        s.spec
            .as_mut()
            .unwrap()
            .environment
            .insert("BAD=KEY".into(), "x".into());
    });
    invalid(
        &validate(env).await,
        tonic::Code::InvalidArgument,
        "BAD=KEY",
    );
    let argv = edit(&|s| s.spec.as_mut().unwrap().command = vec![String::new(), "x".into()]);
    invalid(
        &validate(argv).await,
        tonic::Code::InvalidArgument,
        "command[0]",
    );
    let gpu = edit(&|s| {
        s.spec.as_mut().unwrap().resource_requirements = Some(ResourceRequirements {
            gpu: Some(GpuResourceRequirements { count: None }),
        });
    });
    invalid(&validate(gpu).await, tonic::Code::FailedPrecondition, "GPU");
    let no_spec = edit(&|s| s.spec = None);
    invalid(
        &validate(no_spec).await,
        tonic::Code::InvalidArgument,
        "sandbox.spec",
    );
    let status = client
        .create_sandbox(CreateSandboxRequest { sandbox: None })
        .await
        .unwrap_err();
    invalid(&status, tonic::Code::InvalidArgument, "sandbox");

    // Create pulls it; no registry answers for `localhost`.
    let status = create(&mut client, &absent).await.unwrap_err();
    invalid(
        &status,
        tonic::Code::FailedPrecondition,
        "\"localhost/not-here:1\" could not be pulled",
    );

    // A program that is not in the image: refused, nothing left behind.
    let missing = sandbox("nocmd", &["/no/such/program"]);
    let status = create(&mut client, &missing).await.unwrap_err();
    invalid(&status, tonic::Code::FailedPrecondition, "spec.command");
    assert!(
        engine
            .containers_with_label(&format!("openshell.sandbox.id={}", missing.id))
            .is_empty()
    );

    let good = sandbox("good", &LONG);
    create(&mut client, &good).await.unwrap();
    let status = create(&mut client, &good).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::AlreadyExists, "{status:?}");

    let status = client
        .get_sandbox(GetSandboxRequest::default())
        .await
        .unwrap_err();
    invalid(&status, tonic::Code::InvalidArgument, "sandbox_id");
    let status = stop(&mut client, "").await.unwrap_err();
    invalid(&status, tonic::Code::InvalidArgument, "sandbox_id");
    let status = delete(&mut client, "../../etc").await.unwrap_err();
    invalid(&status, tonic::Code::InvalidArgument, "not valid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_limit_too_high_names_the_ulimits_setting() {
    let engine = engine_or_skip!();
    let Some(pid) = engine.service_pid() else {
        return;
    };
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let Some(ceiling) = openshell_driver_podman::engine::parse_limits(&limits).nproc else {
        eprintln!("skipped: the engine's nproc limit is not readable");
        return;
    };
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    if cap_eff & (1 << 24) != 0 || ceiling == u64::MAX {
        eprintln!(
            "skipped: this engine may raise its limits (CAP_SYS_RESOURCE or no nproc ceiling), so it cannot be misconfigured this way"
        );
        return;
    }
    let instance = unique("ulim");
    engine.clean_up_instance(&instance);
    let dir = tempfile::tempdir().unwrap();
    let mut args = base_args(&engine, &instance, &dir.path().join("state"));
    let too_high = ceiling + 1000;
    args.push("--ulimit".into());
    args.push(format!("nproc={too_high}:{too_high}"));
    let driver = Standalone::start(dir.path(), &args).await;
    let mut client = driver.client().await;
    let request = sandbox("ulimit", &LONG);
    let status = create(&mut client, &request).await.unwrap_err();
    invalid(&status, tonic::Code::FailedPrecondition, "ulimits");
    assert!(status.message().contains("--ulimit nproc="), "{status:?}");
    assert!(
        engine
            .containers_with_label(&format!("openshell.sandbox.id={}", request.id))
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_engine_is_reported_and_recovered_from() {
    let mut engine = engine_or_skip!();
    let instance = unique("gone");
    engine.clean_up_instance(&instance);
    let dir = tempfile::tempdir().unwrap();
    let mut args = base_args(&engine, &instance, &dir.path().join("state"));
    args.extend(["--engine-unavailable-after".to_owned(), "1".to_owned()]);
    let driver = Standalone::start(dir.path(), &args).await;
    let mut client = driver.client().await;
    let request = sandbox("survivor", &LONG);
    create(&mut client, &request).await.unwrap();
    let mut watch = client
        .watch_sandboxes(WatchSandboxesRequest {})
        .await
        .unwrap()
        .into_inner();
    watch_until(&mut watch, "initial running", |e| {
        event_sandbox(e).is_some_and(|s| s.id == request.id && ready_true(s))
    })
    .await;

    engine.stop_service();
    let events = watch_until(&mut watch, "EngineUnavailable", |e| {
        event_sandbox(e).is_some_and(|s| {
            ready_condition(s).is_some_and(|(_, reason, _)| reason == "EngineUnavailable")
        })
    })
    .await;
    let unavailable = event_sandbox(events.last().unwrap()).unwrap();
    let (_, _, message) = ready_condition(unavailable).unwrap();
    assert!(
        message.contains(&engine.socket.display().to_string()),
        "{message}"
    );
    // Get and List answer from the last known state meanwhile.
    let got = get(&mut client, &request.id).await.unwrap();
    assert_eq!(ready_condition(&got).unwrap().1, "EngineUnavailable");
    assert_eq!(list_ids(&mut client).await, vec![request.id.clone()]);

    engine.spawn_service().expect("the engine comes back");
    watch_until(&mut watch, "running again after the engine returned", |e| {
        event_sandbox(e).is_some_and(|s| s.id == request.id && ready_true(s))
    })
    .await;
    assert!(ready_true(&get(&mut client, &request.id).await.unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limits_apply_and_oom_kills_are_reported() {
    let engine = engine_or_skip!();
    let instance = unique("oom");
    engine.clean_up_instance(&instance);
    let dir = tempfile::tempdir().unwrap();
    let driver = Standalone::start(
        dir.path(),
        &base_args(&engine, &instance, &dir.path().join("state")),
    )
    .await;
    let mut client = driver.client().await;
    let mut request = sandbox(
        "hog",
        &[
            "sh",
            "-c",
            "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived",
        ],
    );
    request
        .spec
        .as_mut()
        .unwrap()
        .template
        .as_mut()
        .unwrap()
        .resources = Some(DriverResourceRequirements {
        memory_limit: "16Mi".into(),
        cpu_limit: "500m".into(),
        ..Default::default()
    });
    create(&mut client, &request).await.unwrap();
    let inspect = engine
        .client()
        .inspect(
            &get(&mut client, &request.id)
                .await
                .unwrap()
                .status
                .unwrap()
                .instance_id,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        inspect.host_config.memory,
        16 << 20,
        "the memory limit is applied"
    );
    let ended = wait_for(&mut client, &request.id, "the hog to end", |s| {
        ready_condition(s).is_some_and(|(status, _, _)| status == "False")
    })
    .await;
    let (_, reason, message) = ready_condition(&ended).unwrap();
    if reason == "OOMKilled" {
        assert!(message.contains("16 MiB"), "{message}");
    } else {
        assert_eq!(reason, "ContainerExited");
        assert!(
            message.starts_with("exited with code 137"),
            "killed, not finished: {message}"
        );
        eprintln!(
            "skipped: Podman on this host does not record OOM kills (State.OOMKilled stays false), \
             so only the exit by SIGKILL was checked"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_start_is_reported_until_a_start_succeeds() {
    let engine = engine_or_skip!();
    let instance = unique("refu");
    engine.clean_up_instance(&instance);
    let dir = tempfile::tempdir().unwrap();
    let driver = Standalone::start(
        dir.path(),
        &base_args(&engine, &instance, &dir.path().join("state")),
    )
    .await;
    let mut client = driver.client().await;
    let request = sandbox("refused", &["/bin/sleep", "100000"]);
    create(&mut client, &request).await.unwrap();
    stop(&mut client, &request.id).await.unwrap();
    let container = get(&mut client, &request.id)
        .await
        .unwrap()
        .status
        .unwrap()
        .instance_id;

    // Take the program away inside the stopped container's filesystem.
    let mounted = std::process::Command::new("podman")
        .args(["mount", &container])
        .output()
        .unwrap();
    if !mounted.status.success() {
        eprintln!(
            "skipped: `podman mount` is not available here ({})",
            String::from_utf8_lossy(&mounted.stderr).trim()
        );
        return;
    }
    let root = std::path::PathBuf::from(String::from_utf8_lossy(&mounted.stdout).trim());
    let program = root.join("bin/sleep");
    std::fs::remove_file(&program).unwrap();

    let status = start(&mut client, &request.id).await.unwrap_err();
    invalid(&status, tonic::Code::FailedPrecondition, "spec.command");
    let refused = get(&mut client, &request.id).await.unwrap();
    assert!(is_suspended(&refused), "still stopped: {refused:?}");
    let (state, reason, message) = ready_condition(&refused).unwrap();
    assert_eq!(
        (state.as_str(), reason.as_str()),
        ("False", "CommandNotFound")
    );
    assert!(message.contains("spec.command"), "{message}");

    std::os::unix::fs::symlink("busybox", &program).unwrap();
    let _ = std::process::Command::new("podman")
        .args(["umount", &container])
        .output();
    start(&mut client, &request.id)
        .await
        .expect("start after the fix");
    let running = get(&mut client, &request.id).await.unwrap();
    assert!(ready_true(&running), "{running:?}");
    assert!(!is_suspended(&running));
}
