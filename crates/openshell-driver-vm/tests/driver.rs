//! The VM driver as a process: real binary, real socket, real VMM children.
//!
//! Most tests boot a fake kernel (see `common::write_fake_kernel`): libkrun
//! builds the VM and runs its vCPU, and the "kernel" fails or spins without
//! ever reaching a root filesystem. That exercises every host-side path —
//! VMM spawn, libkrun start, console capture, failure reporting, stop,
//! restore, cleanup — on any host where `/dev/kvm` opens, including PVM
//! hosts where a real guest cannot boot (the driver runs with
//! `--allow-unsupported-host` there). Tests that need a guest to really
//! boot are in `tests/boot.rs` and skip themselves on such hosts.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{
    Driver, FAKE_KERNEL_MARKER, FakeKernel, Watch, alive, busybox_rootfs, is_suspended, mounted,
    ready_reason, sandbox, vmm_pid, wait_until, write_fake_kernel,
};
use openshell_driver_kit::contract;
use openshell_driver_vm::preflight::{HostPaths, HostReport, KvmProblem};
use openshell_proto::compute::logs::v1::StreamLogsRequest;
use openshell_proto::compute::v1::{
    AuthenticateSandboxRequest, CreateSandboxRequest, DeleteSandboxRequest, DriverSandbox,
    GetCapabilitiesRequest, GetSandboxRequest, ListSandboxesRequest, StartSandboxRequest,
    StopSandboxRequest, ValidateSandboxCreateRequest,
};
use openshell_proto::extension::v1::ProtocolVersion;
use tonic::Code;

/// Why VMs cannot start here at all (no usable /dev/kvm), if so.
fn vmm_unavailable() -> Option<String> {
    match HostReport::check(&HostPaths::system(), None).kvm {
        Err(KvmProblem::Pvm { .. }) | Ok(_) => None,
        Err(problem) => Some(problem.to_string()),
    }
}

/// Skips the calling test (with the reason) when no VMM can run here.
macro_rules! require_vmm {
    () => {
        if let Some(reason) = vmm_unavailable() {
            eprintln!("skipped: libkrun cannot create a VM on this host: {reason}");
            return;
        }
    };
}

struct Setup {
    tmp: tempfile::TempDir,
    rootfs: String,
}

/// A temporary root with a busybox rootfs and a fake kernel of `kind`;
/// returns the flags that make the driver use them.
fn setup(kind: FakeKernel) -> Option<(Setup, Vec<String>)> {
    let tmp = tempfile::tempdir().expect("tempdir");
    let Some(rootfs) = busybox_rootfs(&tmp.path().join("rootfs")) else {
        eprintln!("skipped: no static busybox on this host (install busybox-static)");
        return None;
    };
    let kernel = tmp.path().join("vmlinux-fake");
    write_fake_kernel(&kernel, kind);
    // Fake kernels exercise libkrun's host-side path; the QEMU backend is
    // covered by tests/boot.rs with a real kernel.
    let args = vec![
        "--hypervisor=libkrun".to_owned(),
        "--kernel".to_owned(),
        kernel.display().to_string(),
        "--allow-unsupported-host".to_owned(),
        "--krun-log-level".to_owned(),
        "3".to_owned(),
    ];
    Some((
        Setup {
            tmp,
            rootfs: format!("rootfs:{}", rootfs.display()),
        },
        args,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_list_and_lookups() {
    let tmp = tempfile::tempdir().unwrap();
    let mut driver = Driver::start(
        tmp.path(),
        &["--default-image".into(), "oci:/images/x".into()],
    )
    .await;
    let caps = driver
        .client
        .get_capabilities(GetCapabilitiesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(caps.driver_name, "openshell-driver-vm");
    assert!(caps.gateway_manages_lifecycle);
    assert_eq!(caps.default_image, "oci:/images/x");
    assert!(!caps.driver_version.is_empty());

    // Without gateway metadata (a v0.0.111 gateway) the 1.x fields are
    // filled all the same.
    let extension = caps.extension.clone().expect("1.x metadata");
    assert_eq!(
        extension.protocol_version,
        Some(ProtocolVersion { major: 1, minor: 0 })
    );
    assert_eq!(extension.implementation_name, "openshell-compute-plane/vm");
    assert_eq!(
        extension.required_capabilities,
        [contract::COMPUTE_CONTRACT]
    );
    assert_eq!(
        caps.resource_admission_policy,
        contract::AdmissionPolicy {
            allow_driver_config: true,
            ..Default::default()
        }
        .encode()
    );
    assert!(caps.driver_reports_runtime_readiness);
    assert!(!caps.supports_sandbox_authentication);
    let resources = caps.resource_capabilities.expect("resource capabilities");
    assert!(resources.cpu.is_some_and(|c| c.limit_supported));
    assert!(resources.memory.is_some_and(|m| m.limit_supported));
    assert!(
        resources
            .gpu
            .is_some_and(|g| !g.default_selection_supported && !g.count_selection_supported)
    );

    // A 1.x gateway negotiates; the policy is the same bytes every time.
    let gateway = contract::peer_metadata("openshell-compute-plane/gateway", "x", &[]);
    let negotiated = driver
        .client
        .get_capabilities(GetCapabilitiesRequest {
            gateway: Some(gateway.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        negotiated.resource_admission_policy,
        caps.resource_admission_policy
    );
    assert_eq!(negotiated.extension, Some(extension));

    // A gateway of another major version is refused, naming both.
    let mut future = gateway;
    future.protocol_version = Some(ProtocolVersion { major: 2, minor: 3 });
    let refused = driver
        .client
        .get_capabilities(GetCapabilitiesRequest {
            gateway: Some(future),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("2.3") && refused.message().contains("1.0"),
        "{}",
        refused.message()
    );

    let auth = driver
        .client
        .authenticate_sandbox(AuthenticateSandboxRequest {
            credential: "anything".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(auth.code(), Code::Unimplemented);
    assert!(
        auth.message()
            .contains("supports_sandbox_authentication is false"),
        "{}",
        auth.message()
    );

    let list = driver
        .client
        .list_sandboxes(ListSandboxesRequest {})
        .await
        .unwrap();
    assert!(list.into_inner().sandboxes.is_empty());

    let missing = driver.get("nope").await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let bad = driver.get("../etc").await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(
        bad.message().contains("[A-Za-z0-9._-]{1,128}"),
        "{}",
        bad.message()
    );
    let neither = driver
        .client
        .get_sandbox(GetSandboxRequest::default())
        .await
        .unwrap_err();
    assert_eq!(neither.code(), Code::InvalidArgument);

    // Stop/start of unknown sandboxes, delete of an absent one.
    let stop = driver
        .client
        .stop_sandbox(StopSandboxRequest {
            sandbox_id: "nope".into(),
            sandbox_name: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(stop.code(), Code::NotFound);
    let deleted = driver
        .client
        .delete_sandbox(DeleteSandboxRequest {
            sandbox_id: "nope".into(),
            sandbox_name: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .deleted;
    assert!(!deleted);

    let state = driver.state.clone();
    driver.shutdown().await;
    for dir in ["sandboxes", "images"] {
        assert!(
            state.join(dir).is_dir(),
            "{dir} is created under the state dir"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_are_rejected_before_anything_is_written() {
    let Some((setup, args)) = setup(FakeKernel::Fail) else {
        return;
    };
    let mut driver = Driver::start(setup.tmp.path(), &args).await;
    let cases = [
        (
            sandbox("../escape", &setup.rootfs, &[]),
            Code::InvalidArgument,
            "sandbox id",
        ),
        (
            sandbox("a/b", &setup.rootfs, &[]),
            Code::InvalidArgument,
            "sandbox id",
        ),
        (
            // A registry on a port nothing listens on.
            sandbox("ok", "127.0.0.1:1/openshell/busybox:latest", &[]),
            Code::FailedPrecondition,
            "cannot be reached",
        ),
        (
            sandbox("ok", "Not/A/Reference", &[]),
            Code::InvalidArgument,
            "registry reference",
        ),
        (
            sandbox("ok", "oci:relative", &[]),
            Code::InvalidArgument,
            "absolute",
        ),
        (
            sandbox("ok", "/no/such/dir", &[]),
            Code::FailedPrecondition,
            "does not exist",
        ),
        (
            sandbox("ok", &setup.rootfs, &["/bin/sh", "-c", "echo \"quoted\""]),
            Code::InvalidArgument,
            "double quotes",
        ),
    ];
    for (request, code, needle) in cases {
        let id = request.id.clone();
        let validated = driver
            .client
            .validate_sandbox_create(ValidateSandboxCreateRequest {
                sandbox: Some(request.clone()),
            })
            .await
            .unwrap_err();
        assert_eq!(validated.code(), code, "{id}: {}", validated.message());
        assert!(
            validated.message().contains(needle),
            "{id}: {}",
            validated.message()
        );
        let created = driver.create(request).await.unwrap_err();
        assert_eq!(created.code(), code, "{id}: {}", created.message());
    }
    let entries: Vec<_> = std::fs::read_dir(driver.state.join("sandboxes"))
        .unwrap()
        .collect();
    assert!(entries.is_empty(), "nothing written for rejected requests");
    assert!(!setup.tmp.path().join("escape").exists());
    driver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_kernel_fails_create_but_the_driver_serves() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(rootfs) = busybox_rootfs(&tmp.path().join("rootfs")) else {
        eprintln!("skipped: no static busybox on this host (install busybox-static)");
        return;
    };
    let kernel = tmp.path().join("no-such-vmlinux");
    let mut driver = Driver::start(
        tmp.path(),
        &[
            "--kernel".into(),
            kernel.display().to_string(),
            "--allow-unsupported-host".into(),
        ],
    )
    .await;
    let image = format!("rootfs:{}", rootfs.display());
    let err = driver.create(sandbox("s1", &image, &[])).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains(&kernel.display().to_string()),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains("build-guest-kernel.sh"),
        "{}",
        err.message()
    );
    let list = driver
        .client
        .list_sandboxes(ListSandboxesRequest {})
        .await
        .unwrap();
    assert!(list.into_inner().sandboxes.is_empty());
    driver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_host_is_refused_with_the_reason() {
    let report = HostReport::check(&HostPaths::system(), None);
    let Err(problem) = report.kvm else {
        eprintln!("skipped: this host has usable hardware KVM, so nothing is refused");
        return;
    };
    let Some((setup, mut args)) = setup(FakeKernel::Fail) else {
        return;
    };
    args.retain(|a| a != "--allow-unsupported-host");
    let mut driver = Driver::start(setup.tmp.path(), &args).await;
    let err = driver
        .client
        .validate_sandbox_create(ValidateSandboxCreateRequest {
            sandbox: Some(sandbox("s1", &setup.rootfs, &[])),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains(&problem.to_string()),
        "{}",
        err.message()
    );
    if matches!(problem, KvmProblem::Pvm { .. }) {
        for needle in ["PVM", "kvm_pvm", "vmx", "hardware virtualization"] {
            assert!(
                err.message().contains(needle),
                "{needle}: {}",
                err.message()
            );
        }
    }
    let err = driver
        .create(sandbox("s1", &setup.rootfs, &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    // GetCapabilities and List keep working.
    assert!(
        driver
            .client
            .get_capabilities(GetCapabilitiesRequest::default())
            .await
            .is_ok()
    );
    driver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_boot_becomes_boot_failed_with_the_console_tail() {
    require_vmm!();
    let Some((setup, args)) = setup(FakeKernel::Fail) else {
        return;
    };
    let mut driver = Driver::start(setup.tmp.path(), &args).await;
    let mut watch = Watch::open(&mut driver.client).await;
    driver
        .create(sandbox(
            "boot-1",
            &setup.rootfs,
            &["/bin/echo", "never printed"],
        ))
        .await
        .unwrap();

    let first = watch
        .sandbox("boot-1", "a provisioning snapshot", |_| true)
        .await;
    assert_eq!(
        ready_reason(&first),
        "Starting",
        "provisioning is transient for the gateway"
    );
    let started = watch.platform("boot-1", "VmmStarted").await;
    let pid = vmm_pid(&started);
    assert!(common::metadata_u64(&started.metadata, "spawn_to_enter_us").is_some());
    let failed = watch
        .sandbox("boot-1", "BootFailed", |s| ready_reason(s) == "BootFailed")
        .await;
    let message = common::condition(&failed, "Ready").unwrap().message;
    assert!(
        message.contains(FAKE_KERNEL_MARKER),
        "console tail in the message: {message}"
    );
    assert!(
        message.contains("did not reach its root filesystem")
            || message.contains("before the guest reached"),
        "{message}"
    );
    assert!(message.contains("VMM log"), "{message}");
    watch.platform("boot-1", "BootFailed").await;

    wait_until("the VMM to be gone", Duration::from_secs(10), || {
        !alive(pid)
    })
    .await;
    assert!(
        driver.children().is_empty(),
        "no VMM left: {:?}",
        driver.children()
    );
    let dir = driver.sandbox_dir("boot-1");
    assert!(
        !mounted(&dir.join("rootfs")),
        "the writable layer is unmounted"
    );
    let tombstone = std::fs::read_to_string(dir.join("exit.json")).unwrap();
    assert!(tombstone.contains("BootFailed"), "{tombstone}");
    let vmm_log = std::fs::read_to_string(dir.join("vmm.log")).unwrap();
    assert!(vmm_log.contains("@openshell-vmm entering"), "{vmm_log}");
    // Every status line arrives whole: children sharing the VMM's stderr
    // (passt) write elsewhere.
    for line in vmm_log.lines().filter(|l| l.contains("@openshell-vmm")) {
        assert!(
            openshell_driver_vm::launch::StatusLine::parse(line).is_some(),
            "a status line mixed with other output: {line:?}\n{vmm_log}"
        );
    }
    if openshell_driver_vm::preflight::find_on_path("passt").is_some() {
        assert!(
            dir.join("passt.log").exists(),
            "passt writes to its own log"
        );
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.join("launch.json"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the launch file is private");

    // The console is also available through the log service.
    let console = driver.console("boot-1", 0).await;
    assert!(console.contains(FAKE_KERNEL_MARKER), "{console}");
    driver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_start_delete_are_idempotent_and_keep_the_layer() {
    require_vmm!();
    let Some((setup, args)) = setup(FakeKernel::Spin) else {
        return;
    };
    let mut driver = Driver::start(setup.tmp.path(), &args).await;
    let mut watch = Watch::open(&mut driver.client).await;
    driver
        .create(sandbox("life-1", &setup.rootfs, &[]))
        .await
        .unwrap();
    let pid = vmm_pid(&watch.platform("life-1", "VmmStarted").await);
    let booting = driver
        .wait_for("life-1", "booting", |s| {
            common::condition(s, "Ready").is_some_and(|c| c.message.contains("Booting"))
        })
        .await;
    assert_eq!(ready_reason(&booting), "Starting");
    let dir = driver.sandbox_dir("life-1");
    let rootfs = dir.join("rootfs");
    assert!(
        rootfs.join("bin/busybox").exists(),
        "the guest root is assembled"
    );
    // What the guest would have written lands in the writable layer.
    std::fs::write(rootfs.join("root/state-file"), b"kept\n").unwrap();

    let stop = || StopSandboxRequest {
        sandbox_id: "life-1".into(),
        sandbox_name: String::new(),
    };
    driver.client.stop_sandbox(stop()).await.unwrap();
    // Stop returns once the VMM is gone.
    assert!(!alive(pid), "VMM {pid} gone when StopSandbox returns");
    let stopped = driver.get("life-1").await.unwrap();
    assert!(is_suspended(&stopped));
    // Each condition carries its time in both encodings, and they agree.
    let conditions = &stopped.status.as_ref().unwrap().conditions;
    assert_eq!(conditions.len(), 2);
    for c in conditions {
        assert!(c.transition_time.is_some(), "{c:?}");
        let text = openshell_wire::time::parse_rfc3339(&c.last_transition_time);
        assert!(text.is_some(), "{c:?}");
        assert_eq!(contract::condition_time(c), text, "{c:?}");
    }
    let event = watch.platform("life-1", "Stopped").await;
    let event_time = event.event_time.expect("1.x event time");
    assert_eq!(
        i128::from(event_time.seconds) * 1000 + i128::from(event_time.nanos / 1_000_000),
        i128::from(event.timestamp_ms),
        "{event:?}"
    );
    assert!(dir.join("stopped").exists());
    assert!(!mounted(&rootfs));
    driver.client.stop_sandbox(stop()).await.unwrap();

    // Stop by name works too.
    driver
        .client
        .stop_sandbox(StopSandboxRequest {
            sandbox_id: String::new(),
            sandbox_name: "name-life-1".into(),
        })
        .await
        .unwrap();

    let start = || StartSandboxRequest {
        sandbox_id: "life-1".into(),
        ..Default::default()
    };
    driver.client.start_sandbox(start()).await.unwrap();
    driver.client.start_sandbox(start()).await.unwrap();
    assert!(!dir.join("stopped").exists());
    driver
        .wait_for("life-1", "booting again", |s| {
            common::condition(s, "Ready").is_some_and(|c| c.message.contains("Booting"))
        })
        .await;
    assert_eq!(
        std::fs::read(rootfs.join("root/state-file")).unwrap(),
        b"kept\n",
        "the writable layer survives stop and start"
    );
    let vmms = driver.children();
    assert_eq!(
        vmms.len(),
        1,
        "exactly one VMM after a double start: {vmms:?}"
    );

    let delete = || DeleteSandboxRequest {
        sandbox_id: "life-1".into(),
        sandbox_name: String::new(),
    };
    assert!(
        driver
            .client
            .delete_sandbox(delete())
            .await
            .unwrap()
            .into_inner()
            .deleted
    );
    watch.deleted("life-1").await;
    assert!(!dir.exists(), "delete removes the sandbox directory");
    assert!(driver.children().is_empty());
    assert!(
        !driver
            .client
            .delete_sandbox(delete())
            .await
            .unwrap()
            .into_inner()
            .deleted
    );
    assert_eq!(
        driver.client.stop_sandbox(stop()).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        driver
            .client
            .start_sandbox(start())
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    driver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_create_is_already_exists() {
    require_vmm!();
    let Some((setup, args)) = setup(FakeKernel::Fail) else {
        return;
    };
    let mut driver = Driver::start(setup.tmp.path(), &args).await;
    driver
        .create(sandbox("dup", &setup.rootfs, &[]))
        .await
        .unwrap();
    let err = driver
        .create(sandbox("dup", &setup.rootfs, &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    driver
        .wait_for("dup", "boot failure", |s| ready_reason(s) == "BootFailed")
        .await;
    driver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_relaunches_running_and_keeps_stopped_and_failed() {
    require_vmm!();
    let Some((setup, args)) = setup(FakeKernel::Spin) else {
        return;
    };
    let failing = setup.tmp.path().join("vmlinux-fail");
    write_fake_kernel(&failing, FakeKernel::Fail);
    let mut driver = Driver::start(setup.tmp.path(), &args).await;
    let mut identities = Vec::new();
    for id in ["run-a", "stop-b"] {
        let identity = create_for_identity(&mut driver, sandbox(id, &setup.rootfs, &[])).await;
        assert!(identity.contains(id), "{identity}");
        identities.push(identity);
    }
    assert_ne!(identities[0], identities[1]);
    for id in ["run-a", "stop-b"] {
        driver
            .wait_for(id, "booting", |s| {
                common::condition(s, "Ready").is_some_and(|c| c.message.contains("Booting"))
            })
            .await;
    }
    driver
        .client
        .stop_sandbox(StopSandboxRequest {
            sandbox_id: "stop-b".into(),
            sandbox_name: String::new(),
        })
        .await
        .unwrap();
    let vmms = driver.children();
    assert_eq!(vmms.len(), 1);

    // A crash: the VMM must die with its driver (parent-death signal).
    driver.kill().await;
    for pid in &vmms {
        let pid = u32::try_from(*pid).unwrap();
        wait_until("the orphaned VMM to die", Duration::from_secs(10), || {
            !alive(pid)
        })
        .await;
    }

    let mut driver = Driver::start(setup.tmp.path(), &args).await;
    let a = driver
        .wait_for("run-a", "relaunch", |s| {
            common::condition(s, "Ready").is_some_and(|c| c.message.contains("Booting"))
        })
        .await;
    assert_eq!(a.name, "name-run-a");
    assert_eq!(a.workspace, "default");
    // The runtime identity survives the restart: starting the running one
    // is a no-op that reports it, and a start expecting another identity
    // is refused without touching the stopped one.
    let start = |id: &str, expected: &str| StartSandboxRequest {
        sandbox_id: id.into(),
        expected_runtime_identity: expected.into(),
        ..Default::default()
    };
    let again = driver
        .client
        .start_sandbox(start("run-a", &identities[0]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.runtime_identity, identities[0]);
    let wrong = driver
        .client
        .start_sandbox(start("stop-b", &identities[0]))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::FailedPrecondition);
    assert!(
        is_suspended(&driver.get("stop-b").await.unwrap()),
        "stopped stays stopped"
    );
    assert_eq!(
        driver.children().len(),
        1,
        "only the running sandbox is booted again"
    );

    // A graceful driver stop keeps the running intent too.
    driver.shutdown().await;
    let mut args_fail = args.clone();
    let at = args_fail.iter().position(|a| a == "--kernel").unwrap();
    args_fail[at + 1] = failing.display().to_string();
    let mut driver = Driver::start(setup.tmp.path(), &args_fail).await;
    driver
        .wait_for("run-a", "boot failure", |s| ready_reason(s) == "BootFailed")
        .await;
    assert!(is_suspended(&driver.get("stop-b").await.unwrap()));
    driver.shutdown().await;

    // A failed boot is remembered, not retried, after a restart.
    let mut driver = Driver::start(setup.tmp.path(), &args).await;
    let a = driver.get("run-a").await.unwrap();
    assert_eq!(ready_reason(&a), "BootFailed");
    assert!(driver.children().is_empty());
    driver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_a_boot_until_it_ends() {
    require_vmm!();
    let Some((setup, args)) = setup(FakeKernel::Spin) else {
        return;
    };
    let mut driver = Driver::start(setup.tmp.path(), &args).await;
    driver
        .create(sandbox("logs-1", &setup.rootfs, &[]))
        .await
        .unwrap();
    let mut stream = driver
        .logs
        .stream_logs(StreamLogsRequest {
            sandbox_id: "logs-1".into(),
            sandbox_name: String::new(),
            follow: true,
            tail_lines: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut text = String::new();
    while !text.contains(FAKE_KERNEL_MARKER) {
        let chunk = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("console output arrives")
            .unwrap()
            .expect("stream open while the VM runs");
        text.push_str(&String::from_utf8_lossy(&chunk.data));
    }
    driver
        .client
        .stop_sandbox(StopSandboxRequest {
            sandbox_id: "logs-1".into(),
            sandbox_name: String::new(),
        })
        .await
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        while stream.message().await.unwrap().is_some() {}
    })
    .await;
    assert!(end.is_ok(), "the follow stream ends when the VM stops");

    // Without follow, a stopped sandbox's log is returned and the call ends.
    assert!(
        driver
            .console("logs-1", 1)
            .await
            .contains(FAKE_KERNEL_MARKER)
    );
    let unknown = driver
        .logs
        .stream_logs(StreamLogsRequest {
            sandbox_id: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    driver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_starts_with_snapshots_then_follows() {
    require_vmm!();
    let Some((setup, args)) = setup(FakeKernel::Fail) else {
        return;
    };
    let mut driver = Driver::start(setup.tmp.path(), &args).await;
    driver
        .create(sandbox("w-1", &setup.rootfs, &[]))
        .await
        .unwrap();
    driver
        .wait_for("w-1", "boot failure", |s| ready_reason(s) == "BootFailed")
        .await;
    let mut watch = Watch::open(&mut driver.client).await;
    let first = watch.sandbox("w-1", "the initial snapshot", |_| true).await;
    assert_eq!(
        ready_reason(&first),
        "BootFailed",
        "the first event is the current state"
    );
    assert!(watch.seen.len() == 1, "the snapshot comes first");
    driver
        .client
        .delete_sandbox(DeleteSandboxRequest {
            sandbox_id: "w-1".into(),
            sandbox_name: String::new(),
        })
        .await
        .unwrap();
    watch
        .sandbox("w-1", "a deleting snapshot", |s| {
            s.status.as_ref().is_some_and(|st| st.deleting)
        })
        .await;
    watch.deleted("w-1").await;
    driver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_config_file_is_read_and_unknown_keys_stop_startup() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("vm.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"vm\"\nstate_dir = \"{}\"\ndefault_image = \"oci:/from/file\"\n\
             allow_driver_config = false\n",
            tmp.path().join("file-state").display()
        ),
    )
    .unwrap();
    // Flags after the file: --state-dir from Driver::start wins.
    let mut driver = Driver::start(
        tmp.path(),
        &["--driver-config".into(), config.display().to_string()],
    )
    .await;
    let caps = driver
        .client
        .get_capabilities(GetCapabilitiesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(caps.default_image, "oci:/from/file");
    assert_eq!(
        caps.resource_admission_policy,
        contract::AdmissionPolicy::default().encode(),
        "allow_driver_config = false gives the upstream default policy"
    );
    let mut sized = sandbox("sized-1", "oci:/from/file", &[]);
    sized
        .spec
        .as_mut()
        .and_then(|spec| spec.template.as_mut())
        .unwrap()
        .driver_config = Some(prost_types::Struct {
        fields: [(
            "vcpus".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::NumberValue(1.0)),
            },
        )]
        .into(),
    });
    let refused = driver
        .client
        .validate_sandbox_create(ValidateSandboxCreateRequest {
            sandbox: Some(sized),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused
            .message()
            .contains("a gateway administrator must enable allow_driver_config"),
        "{}",
        refused.message()
    );
    assert!(driver.state.join("sandboxes").is_dir());
    assert!(
        !tmp.path().join("file-state").exists(),
        "the flag overrides the file"
    );
    driver.shutdown().await;

    std::fs::write(&config, "name = \"vm\"\nsocket_path = \"/x.sock\"\n").unwrap();
    let output = std::process::Command::new(common::BIN)
        .args([
            "--bind-socket",
            &tmp.path().join("x.sock").display().to_string(),
            "--allow-same-uid-peer",
        ])
        .arg("--driver-config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("socket_path") && stderr.contains(&config.display().to_string()),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one clear line: {stderr}");
}

#[test]
fn binding_without_a_peer_policy_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(common::BIN)
        .args([
            "--bind-socket",
            &tmp.path().join("x.sock").display().to_string(),
        ])
        .arg("--state-dir")
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("allow-same-uid-peer") || stderr.contains("expected-peer-pid"),
        "{stderr}"
    );
}

#[test]
fn preflight_command_reports_the_host() {
    let tmp = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(common::BIN)
        .args(["preflight", "--kernel"])
        .arg(tmp.path().join("missing-vmlinux"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        !output.status.success(),
        "a missing kernel fails preflight: {stdout}"
    );
    assert!(
        stdout.contains("kvm:") && stdout.contains("kernel: missing"),
        "{stdout}"
    );
    assert!(stdout.contains("missing-vmlinux"), "{stdout}");
}

#[test]
fn vmm_subcommand_refuses_to_run_without_its_driver() {
    let tmp = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(common::BIN)
        .arg("vmm")
        .arg(tmp.path().join("launch.json"))
        .env_remove("OPENSHELL_VMM_PARENT_PID")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(72), "ParentGone exit code");
    assert!(String::from_utf8_lossy(&output.stderr).contains("setup-failed"));
}

fn is_dir_empty(path: &Path) -> bool {
    std::fs::read_dir(path)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_images_are_cached_once_and_pruned_when_unused() {
    require_vmm!();
    if openshell_driver_vm::image::find_tool("umoci").is_none() {
        eprintln!("skipped: umoci is not installed (apt-get install umoci)");
        return;
    }
    let Some((setup, args)) = setup(FakeKernel::Fail) else {
        return;
    };
    let layout = setup.tmp.path().join("layout");
    let bundle = setup.tmp.path().join("bundle");
    let umoci = |args: &[&str]| {
        let status = std::process::Command::new("umoci")
            .args(args)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "umoci {args:?}");
    };
    let layout_s = layout.display().to_string();
    umoci(&["init", "--layout", &layout_s]);
    umoci(&["new", "--image", &format!("{layout_s}:v1")]);
    umoci(&[
        "unpack",
        "--image",
        &format!("{layout_s}:v1"),
        &bundle.display().to_string(),
    ]);
    busybox_rootfs(&bundle.join("rootfs")).unwrap();
    umoci(&[
        "repack",
        "--image",
        &format!("{layout_s}:v1"),
        &bundle.display().to_string(),
    ]);
    umoci(&[
        "config",
        "--image",
        &format!("{layout_s}:v1"),
        "--config.cmd",
        "/bin/sh",
        "--config.env",
        "FROM_IMAGE=1",
    ]);
    // The same layout as an archive.
    let archive = setup.tmp.path().join("image.tar");
    let status = std::process::Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&archive)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());

    let mut driver = Driver::start(setup.tmp.path(), &args).await;
    driver
        .create(sandbox("oci-1", &format!("oci:{layout_s}:v1"), &[]))
        .await
        .unwrap();
    driver
        .create(sandbox(
            "oci-2",
            &format!("oci-archive:{}:v1", archive.display()),
            &[],
        ))
        .await
        .unwrap();
    for id in ["oci-1", "oci-2"] {
        let s = driver
            .wait_for(id, "boot failure", |s| ready_reason(s) == "BootFailed")
            .await;
        assert_eq!(ready_reason(&s), "BootFailed");
    }
    let images = driver.state.join("images");
    let entries: Vec<String> = std::fs::read_dir(&images)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(
        entries.len(),
        1,
        "one cache entry for one digest: {entries:?}"
    );
    assert!(images.join(&entries[0]).join("rootfs/bin/busybox").exists());
    let launch = std::fs::read_to_string(driver.sandbox_dir("oci-1").join("launch.json")).unwrap();
    assert!(
        launch.contains("FROM_IMAGE=1"),
        "image env reaches the guest: {launch}"
    );
    assert!(
        launch.contains("\"exec\": \"/bin/sh\""),
        "image cmd is the default: {launch}"
    );

    let cli = |action: &str| {
        let output = std::process::Command::new(common::BIN)
            .args(["images", action, "--state-dir"])
            .arg(&driver.state)
            .output()
            .unwrap();
        assert!(output.status.success(), "images {action}: {output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let list = cli("list");
    assert!(
        list.contains(&entries[0]) && list.contains("in use"),
        "{list}"
    );
    assert!(cli("du").contains("total, image cache"));
    assert!(
        cli("prune").contains("removed 0 entries"),
        "in-use images are kept"
    );

    for id in ["oci-1", "oci-2"] {
        driver
            .client
            .delete_sandbox(DeleteSandboxRequest {
                sandbox_id: id.into(),
                sandbox_name: String::new(),
            })
            .await
            .unwrap();
    }
    assert!(cli("list").contains("unused"));
    let pruned = cli("prune");
    assert!(
        pruned.contains(&format!("removed {}", entries[0])),
        "{pruned}"
    );
    assert!(cli("list").contains("no cached images"));
    assert!(images.join(".lock").exists());
    assert!(is_dir_empty(&driver.state.join("sandboxes")));
    driver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_never_boots_is_stopped_at_the_boot_timeout() {
    require_vmm!();
    let Some((setup, mut args)) = setup(FakeKernel::Spin) else {
        return;
    };
    args.extend(["--boot-timeout-secs".to_owned(), "1".to_owned()]);
    let mut driver = Driver::start(setup.tmp.path(), &args).await;
    let mut watch = Watch::open(&mut driver.client).await;
    driver
        .create(sandbox("slow-1", &setup.rootfs, &[]))
        .await
        .unwrap();
    let pid = vmm_pid(&watch.platform("slow-1", "VmmStarted").await);
    let failed = watch
        .sandbox("slow-1", "BootFailed", |s| ready_reason(s) == "BootFailed")
        .await;
    let message = common::condition(&failed, "Ready").unwrap().message;
    assert!(message.contains("within 1 s"), "{message}");
    assert!(message.contains(FAKE_KERNEL_MARKER), "{message}");
    wait_until("the VMM to be gone", Duration::from_secs(10), || {
        !alive(pid)
    })
    .await;
    assert!(driver.children().is_empty());
    driver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_layers_keep_changes_across_stop_and_start() {
    require_vmm!();
    let Some((setup, mut args)) = setup(FakeKernel::Spin) else {
        return;
    };
    args.extend(["--writable-layer".to_owned(), "copy".to_owned()]);
    let mut driver = Driver::start(setup.tmp.path(), &args).await;
    driver
        .create(sandbox("copy-1", &setup.rootfs, &[]))
        .await
        .unwrap();
    let booting = |s: &DriverSandbox| {
        common::condition(s, "Ready").is_some_and(|c| c.message.contains("Booting"))
    };
    driver.wait_for("copy-1", "booting", booting).await;
    let rootfs = driver.sandbox_dir("copy-1").join("rootfs");
    assert!(!mounted(&rootfs), "a copy is a plain directory");
    std::fs::write(rootfs.join("etc/hostname"), b"changed\n").unwrap();
    let stop = StopSandboxRequest {
        sandbox_id: "copy-1".into(),
        sandbox_name: String::new(),
    };
    driver.client.stop_sandbox(stop.clone()).await.unwrap();
    driver
        .client
        .start_sandbox(StartSandboxRequest {
            sandbox_id: "copy-1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    driver.wait_for("copy-1", "booting again", booting).await;
    assert_eq!(
        std::fs::read(rootfs.join("etc/hostname")).unwrap(),
        b"changed\n"
    );
    let image = Path::new(setup.rootfs.trim_start_matches("rootfs:"));
    assert_eq!(
        std::fs::read(image.join("etc/hostname")).unwrap(),
        b"image\n",
        "the image is untouched"
    );
    driver.client.stop_sandbox(stop).await.unwrap();
    driver.shutdown().await;
}

/// Creates `sandbox` and returns the runtime identity CreateSandbox reports.
async fn create_for_identity(driver: &mut Driver, sandbox: DriverSandbox) -> String {
    driver
        .client
        .create_sandbox(CreateSandboxRequest {
            sandbox: Some(sandbox),
        })
        .await
        .expect("CreateSandbox")
        .into_inner()
        .runtime_identity
}
