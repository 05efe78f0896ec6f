//! Lifecycle behaviour with real processes and real sockets, using the
//! `openshell-test-driver` binary as the peer.

use std::os::unix::fs::{PermissionsExt as _, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use driver_lifecycle::{
    DriverCommand, DriverEndpoint, DriverGuard, DriverHealth, LifecycleError, ManagedDriverProcess,
    Readiness, RestartPolicy, SpawnOptions, connect,
};
use openshell_proto::compute::v1::GetCapabilitiesRequest;
use openshell_proto::compute::v1::compute_driver_client::ComputeDriverClient;

fn driver_command(args: &[&str]) -> DriverCommand {
    DriverCommand::new(openshell_test_driver::binary_path()).args(args.iter().copied())
}

fn quiet(readiness: Readiness) -> SpawnOptions {
    SpawnOptions {
        readiness,
        forward_output: false,
        ready_timeout: Duration::from_secs(10),
        ..SpawnOptions::default()
    }
}

fn endpoint(dir: &Path) -> DriverEndpoint {
    DriverEndpoint::new("test", dir.join("run").join("driver.sock"))
}

async fn capabilities(endpoint: &DriverEndpoint) -> String {
    let channel = connect(endpoint).await.expect("connect");
    ComputeDriverClient::new(channel)
        .get_capabilities(GetCapabilitiesRequest::default())
        .await
        .expect("GetCapabilities")
        .into_inner()
        .driver_name
}

fn alive(pid: u32) -> bool {
    driver_lifecycle::proc::stat(i32::try_from(pid).expect("pid fits in i32"))
        .is_some_and(|p| p.state != 'Z')
}

async fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_health(
    rx: &mut tokio::sync::watch::Receiver<DriverHealth>,
    what: &str,
    pred: impl FnMut(&DriverHealth) -> bool,
) -> DriverHealth {
    tokio::time::timeout(Duration::from_secs(20), rx.wait_for(pred))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for health: {what}"))
        .expect("health channel open")
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_via_fd_then_clean_shutdown() {
    let tmp = tempfile::tempdir().unwrap();
    let endpoint = endpoint(tmp.path());
    let guard =
        ManagedDriverProcess::spawn(&endpoint, driver_command(&[]), quiet(Readiness::ReadyFd))
            .await
            .unwrap();
    let pid = guard.pid().unwrap();
    assert!(alive(pid));
    assert_eq!(capabilities(&endpoint).await, "openshell-test-driver");

    let meta = std::fs::metadata(&endpoint.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "socket mode");
    let dir_meta = std::fs::metadata(endpoint.socket.parent().unwrap()).unwrap();
    assert_eq!(dir_meta.permissions().mode() & 0o777, 0o700, "run dir mode");

    let report = DriverGuard::Managed(guard).shutdown().await.unwrap();
    assert!(!report.forced, "driver should stop on SIGTERM");
    assert!(
        report.exit_status.is_some_and(|s| s.success()),
        "{report:?}"
    );
    assert!(!alive(pid));
    assert!(!endpoint.socket.exists(), "socket is removed on shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_via_polling_for_drivers_that_ignore_the_fd() {
    for readiness in [Readiness::PollGrpc, Readiness::Auto] {
        let tmp = tempfile::tempdir().unwrap();
        let endpoint = endpoint(tmp.path());
        let guard = ManagedDriverProcess::spawn(
            &endpoint,
            driver_command(&["--ignore-ready-fd", "--startup-delay-ms", "30"]),
            quiet(readiness),
        )
        .await
        .unwrap_or_else(|e| panic!("{readiness:?}: {e}"));
        assert_eq!(capabilities(&endpoint).await, "openshell-test-driver");
        DriverGuard::Managed(guard).shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_exit_reports_status_and_stderr_tail() {
    let tmp = tempfile::tempdir().unwrap();
    let err = ManagedDriverProcess::spawn(
        &endpoint(tmp.path()),
        driver_command(&["--exit-early", "7"]),
        quiet(Readiness::Auto),
    )
    .await
    .unwrap_err();
    let LifecycleError::ExitedBeforeReady {
        name,
        status,
        stderr,
    } = &err
    else {
        panic!("unexpected error: {err}");
    };
    assert_eq!(name, "test");
    assert_eq!(status.code(), Some(7));
    assert!(
        stderr
            .0
            .iter()
            .any(|l| l.contains("configuration looks wrong")),
        "{stderr:?}"
    );
    let text = err.to_string();
    assert!(text.contains("exit status: 7"), "{text}");
    assert!(text.contains("exiting early with code 7"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stderr_tail_keeps_only_the_last_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let options = SpawnOptions {
        stderr_tail_lines: 2,
        ..quiet(Readiness::Auto)
    };
    let err = ManagedDriverProcess::spawn(
        &endpoint(tmp.path()),
        driver_command(&["--exit-early", "2"]),
        options,
    )
    .await
    .unwrap_err();
    let LifecycleError::ExitedBeforeReady { stderr, .. } = err else {
        panic!("unexpected error");
    };
    assert_eq!(stderr.0.len(), 2, "{stderr:?}");
    assert!(stderr.0[1].contains("exiting early"), "{stderr:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_the_driver_and_reports_stderr() {
    let tmp = tempfile::tempdir().unwrap();
    let options = SpawnOptions {
        ready_timeout: Duration::from_millis(500),
        ..quiet(Readiness::Auto)
    };
    let started = Instant::now();
    let err = ManagedDriverProcess::spawn(
        &endpoint(tmp.path()),
        driver_command(&["--never-ready", "--spawn-grandchild"]),
        options,
    )
    .await
    .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "timeout honoured"
    );
    let LifecycleError::ReadyTimeout {
        stderr, timeout, ..
    } = &err
    else {
        panic!("unexpected error: {err}");
    };
    assert_eq!(*timeout, Duration::from_millis(500));
    assert!(
        stderr.0.iter().any(|l| l.contains("never becoming ready")),
        "{stderr:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fd_only_readiness_times_out_when_the_driver_ignores_the_fd() {
    let tmp = tempfile::tempdir().unwrap();
    let options = SpawnOptions {
        ready_timeout: Duration::from_millis(400),
        ..quiet(Readiness::ReadyFd)
    };
    let err = ManagedDriverProcess::spawn(
        &endpoint(tmp.path()),
        driver_command(&["--ignore-ready-fd"]),
        options,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, LifecycleError::ReadyTimeout { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_driver_is_respawned_and_healthy_again() {
    let tmp = tempfile::tempdir().unwrap();
    let endpoint = endpoint(tmp.path());
    let options = SpawnOptions {
        restart: RestartPolicy {
            initial_backoff: Duration::from_millis(20),
            ..RestartPolicy::default()
        },
        ..quiet(Readiness::Auto)
    };
    let guard = DriverGuard::Managed(
        ManagedDriverProcess::spawn(&endpoint, driver_command(&[]), options)
            .await
            .unwrap(),
    );
    let mut health = guard.health().unwrap();
    let first = guard.pid().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(first).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();

    let ready = wait_health(
        &mut health,
        "second incarnation",
        |h| matches!(h, DriverHealth::Ready { incarnation, .. } if *incarnation == 2),
    )
    .await;
    let DriverHealth::Ready { pid: second, .. } = ready else {
        unreachable!()
    };
    assert_ne!(first, second);
    assert_eq!(guard.pid(), Some(second));
    assert_eq!(capabilities(&endpoint).await, "openshell-test-driver");
    guard.shutdown().await.unwrap();
    assert!(!alive(second));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_a_call_is_survived() {
    let tmp = tempfile::tempdir().unwrap();
    let endpoint = endpoint(tmp.path());
    let options = SpawnOptions {
        restart: RestartPolicy {
            initial_backoff: Duration::from_millis(10),
            ..RestartPolicy::default()
        },
        ..quiet(Readiness::ReadyFd)
    };
    // One call is answered; the second aborts the process.
    let guard = DriverGuard::Managed(
        ManagedDriverProcess::spawn(
            &endpoint,
            driver_command(&["--crash-after-calls", "1"]),
            options,
        )
        .await
        .unwrap(),
    );
    let mut health = guard.health().unwrap();
    let channel = connect(&endpoint).await.unwrap();
    let mut client = ComputeDriverClient::new(channel);
    client
        .get_capabilities(GetCapabilitiesRequest::default())
        .await
        .unwrap();
    let status = client
        .get_capabilities(GetCapabilitiesRequest::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal
        ),
        "{status}"
    );
    wait_health(&mut health, "respawn after abort", |h| {
        matches!(h, DriverHealth::Ready { incarnation: 2, .. })
    })
    .await;
    guard.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn respawn_gives_up_after_the_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let endpoint = endpoint(tmp.path());
    let options = SpawnOptions {
        restart: RestartPolicy {
            max_attempts: 2,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(20),
            stable_after: Duration::from_secs(30),
        },
        ..quiet(Readiness::ReadyFd)
    };
    let guard = DriverGuard::Managed(
        ManagedDriverProcess::spawn(
            &endpoint,
            driver_command(&["--exit-after-ready-ms", "50"]),
            options,
        )
        .await
        .unwrap(),
    );
    let mut health = guard.health().unwrap();
    let failed = wait_health(&mut health, "failed", |h| {
        matches!(h, DriverHealth::Failed { .. })
    })
    .await;
    let DriverHealth::Failed { reason } = failed else {
        unreachable!()
    };
    assert!(
        reason.contains("gave up after 2 restart attempt(s)"),
        "{reason}"
    );
    assert!(reason.contains("exit status: 3"), "{reason}");
    let err = guard.shutdown().await.unwrap_err();
    assert!(matches!(err, LifecycleError::GaveUp { .. }), "{err}");
    assert!(
        !endpoint.socket.exists(),
        "a failed driver's socket is cleaned up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_restarts_are_reported_with_their_stderr() {
    let tmp = tempfile::tempdir().unwrap();
    let endpoint = endpoint(tmp.path());
    let marker = tmp.path().join("started-once");
    let options = SpawnOptions {
        restart: RestartPolicy {
            max_attempts: 2,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(20),
            stable_after: Duration::from_secs(30),
        },
        ..quiet(Readiness::ReadyFd)
    };
    let marker_arg = marker.to_str().unwrap();
    let guard = DriverGuard::Managed(
        ManagedDriverProcess::spawn(
            &endpoint,
            driver_command(&["--only-first-start", marker_arg]),
            options,
        )
        .await
        .unwrap(),
    );
    let mut health = guard.health().unwrap();
    let pid = guard.pid().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let failed = wait_health(&mut health, "failed", |h| {
        matches!(h, DriverHealth::Failed { .. })
    })
    .await;
    let DriverHealth::Failed { reason } = failed else {
        unreachable!()
    };
    assert!(reason.contains("refusing to start again"), "{reason}");
    assert!(reason.contains("exit status: 4"), "{reason}");
    assert!(guard.shutdown().await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_leaves_no_process_of_the_group() {
    let tmp = tempfile::tempdir().unwrap();
    let guard = ManagedDriverProcess::spawn(
        &endpoint(tmp.path()),
        driver_command(&["--spawn-grandchild"]),
        quiet(Readiness::Auto),
    )
    .await
    .unwrap();
    let pgid = i32::try_from(guard.pid().unwrap()).unwrap();
    wait_until("grandchild", Duration::from_secs(5), || {
        driver_lifecycle::proc::live_group_members(pgid).len() >= 2
    })
    .await;
    DriverGuard::Managed(guard).shutdown().await.unwrap();
    let left = driver_lifecycle::proc::live_group_members(pgid);
    assert!(
        left.is_empty(),
        "processes of group {pgid} still running: {left:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_escalates_to_sigkill_after_the_grace() {
    let tmp = tempfile::tempdir().unwrap();
    let options = SpawnOptions {
        shutdown_grace: Duration::from_millis(300),
        ..quiet(Readiness::Auto)
    };
    let guard = ManagedDriverProcess::spawn(
        &endpoint(tmp.path()),
        driver_command(&["--ignore-sigterm"]),
        options,
    )
    .await
    .unwrap();
    let pid = guard.pid().unwrap();
    let report = DriverGuard::Managed(guard).shutdown().await.unwrap();
    assert!(report.forced, "{report:?}");
    assert!(report.elapsed >= Duration::from_millis(300), "{report:?}");
    assert!(!alive(pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_guard_kills_the_group() {
    let tmp = tempfile::tempdir().unwrap();
    let guard = ManagedDriverProcess::spawn(
        &endpoint(tmp.path()),
        driver_command(&["--spawn-grandchild"]),
        quiet(Readiness::Auto),
    )
    .await
    .unwrap();
    let pgid = i32::try_from(guard.pid().unwrap()).unwrap();
    drop(guard);
    wait_until("group to die after drop", Duration::from_secs(5), || {
        driver_lifecycle::proc::live_group_members(pgid).is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_exits_when_its_parent_is_sigkilled() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("run").join("driver.sock");
    // A shell plays the gateway: it starts the driver with its own pid as
    // the parent pid, prints the driver's pid and waits.
    let mut parent = Command::new("sh")
        .arg("-c")
        .arg(r#"OPENSHELL_DRIVER_PARENT_PID=$$ "$0" --bind-socket "$1" --allow-same-uid-peer 2>/dev/null & echo $!; wait"#)
        .arg(openshell_test_driver::binary_path())
        .arg(&socket)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(parent.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let driver_pid: u32 = line.trim().parse().unwrap();
    wait_until("driver socket", Duration::from_secs(10), || socket.exists()).await;
    assert!(alive(driver_pid));

    parent.kill().unwrap();
    parent.wait().unwrap();
    wait_until(
        "driver to exit after its parent",
        Duration::from_secs(10),
        || !alive(driver_pid),
    )
    .await;
    assert!(
        !socket.exists(),
        "the driver removes its socket on the way out"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_socket_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let endpoint = endpoint(tmp.path());
    driver_lifecycle::socket::prepare_private_dir(endpoint.socket.parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&endpoint.socket).unwrap());
    assert!(
        endpoint.socket.exists(),
        "a stale socket file is left behind"
    );
    let guard = ManagedDriverProcess::spawn(&endpoint, driver_command(&[]), quiet(Readiness::Auto))
        .await
        .unwrap();
    assert_eq!(capabilities(&endpoint).await, "openshell-test-driver");
    DriverGuard::Managed(guard).shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_listener_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let endpoint = endpoint(tmp.path());
    driver_lifecycle::socket::prepare_private_dir(endpoint.socket.parent().unwrap()).unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(&endpoint.socket).unwrap();
    let err = ManagedDriverProcess::spawn(&endpoint, driver_command(&[]), quiet(Readiness::Auto))
        .await
        .unwrap_err();
    assert!(matches!(err, LifecycleError::LiveListener { .. }), "{err}");
    assert!(err.to_string().contains("driver.sock"), "{err}");

    // The driver binary itself refuses the same way when started by hand.
    let out = Command::new(openshell_test_driver::binary_path())
        .args(["--allow-same-uid-peer", "--bind-socket"])
        .arg(&endpoint.socket)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("already listening"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regular_file_is_refused_and_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let endpoint = endpoint(tmp.path());
    driver_lifecycle::socket::prepare_private_dir(endpoint.socket.parent().unwrap()).unwrap();
    std::fs::write(&endpoint.socket, b"precious").unwrap();
    let err = ManagedDriverProcess::spawn(&endpoint, driver_command(&[]), quiet(Readiness::Auto))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            LifecycleError::NotASocket {
                kind: "regular file",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("driver.sock"), "{err}");
    assert_eq!(std::fs::read(&endpoint.socket).unwrap(), b"precious");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinked_run_dir_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let real = tmp.path().join("real");
    std::fs::create_dir(&real).unwrap();
    symlink(&real, tmp.path().join("run")).unwrap();
    let err = ManagedDriverProcess::spawn(
        &endpoint(tmp.path()),
        driver_command(&[]),
        quiet(Readiness::Auto),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, LifecycleError::SymlinkedDirectory { .. }),
        "{err}"
    );
    assert!(
        std::fs::read_dir(&real).unwrap().next().is_none(),
        "nothing written through the link"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_long_path_is_refused_before_spawning() {
    let tmp = tempfile::tempdir().unwrap();
    let long = tmp.path().join("x".repeat(120)).join("driver.sock");
    let err = ManagedDriverProcess::spawn(
        &DriverEndpoint::new("test", &long),
        driver_command(&[]),
        quiet(Readiness::Auto),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, LifecycleError::SocketPathTooLong { .. }),
        "{err}"
    );
    assert!(!long.parent().unwrap().exists(), "nothing was created");
}

/// Starts the test driver by hand, as an operator would, and waits for its
/// socket.
async fn start_standalone(socket: &Path, extra: &[&str]) -> std::process::Child {
    let child = Command::new(openshell_test_driver::binary_path())
        .arg("--bind-socket")
        .arg(socket)
        .args(extra)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the test driver");
    wait_until("standalone driver socket", Duration::from_secs(10), || {
        socket.exists()
    })
    .await;
    child
}

fn probe_as(socket: &Path, uid: Option<u32>) -> std::process::Output {
    let mut cmd = Command::new(openshell_test_driver::binary_path());
    cmd.arg("probe").arg("--socket").arg(socket);
    if let Some(uid) = uid {
        std::os::unix::process::CommandExt::uid(&mut cmd, uid);
        std::os::unix::process::CommandExt::gid(&mut cmd, uid);
    }
    cmd.output().expect("run the probe")
}

fn open_up(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_with_another_uid_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to run a client as nobody");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("run").join("driver.sock");
    let mut driver = start_standalone(&socket, &["--allow-same-uid-peer"]).await;
    // Let `nobody` reach the socket at all, so the driver's own check is
    // what refuses it.
    open_up(tmp.path(), 0o755);
    open_up(socket.parent().unwrap(), 0o755);
    open_up(&socket, 0o666);

    let as_root = probe_as(&socket, None);
    assert!(
        as_root.status.success(),
        "same uid is accepted: {as_root:?}"
    );
    let as_nobody = probe_as(&socket, Some(65534));
    assert!(
        !as_nobody.status.success(),
        "another uid is refused: {as_nobody:?}"
    );

    driver.kill().unwrap();
    driver.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_with_another_pid_is_refused_when_a_pid_is_expected() {
    let tmp = tempfile::tempdir().unwrap();
    let endpoint = endpoint(tmp.path());
    // Spawned by this process, so only this process may connect.
    let guard = ManagedDriverProcess::spawn(&endpoint, driver_command(&[]), quiet(Readiness::Auto))
        .await
        .unwrap();
    assert_eq!(capabilities(&endpoint).await, "openshell-test-driver");
    let other = probe_as(&endpoint.socket, None);
    assert!(
        !other.status.success(),
        "a different process is refused: {other:?}"
    );
    DriverGuard::Managed(guard).shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmanaged_guard_never_signals_or_unlinks() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("run").join("driver.sock");
    let mut driver = start_standalone(&socket, &["--allow-same-uid-peer"]).await;
    let endpoint = DriverEndpoint::new("external", &socket);
    let guard = DriverGuard::Attached;
    assert!(guard.health().is_none());
    assert!(guard.pid().is_none());
    assert_eq!(capabilities(&endpoint).await, "openshell-test-driver");
    let report = guard.shutdown().await.unwrap();
    assert!(report.exit_status.is_none());
    drop(DriverGuard::Attached);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(alive(driver.id()), "the attached driver keeps running");
    assert!(socket.exists(), "its socket stays");
    assert_eq!(capabilities(&endpoint).await, "openshell-test-driver");
    driver.kill().unwrap();
    driver.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_is_allowlisted() {
    let tmp = tempfile::tempdir().unwrap();
    let mut command = driver_command(&[]).env("OPENSHELL_EXPLICIT", "yes");
    command.env_allowlist.push("CARGO_PKG_NAME".to_owned());
    let guard = ManagedDriverProcess::spawn(&endpoint(tmp.path()), command, quiet(Readiness::Auto))
        .await
        .unwrap();
    let environ = std::fs::read(format!("/proc/{}/environ", guard.pid().unwrap())).unwrap();
    let names: Vec<String> = environ
        .split(|b| *b == 0)
        .filter(|kv| !kv.is_empty())
        .map(|kv| String::from_utf8_lossy(kv.split(|b| *b == b'=').next().unwrap()).into_owned())
        .collect();
    assert!(
        std::env::var_os("CARGO").is_some(),
        "cargo sets CARGO for tests"
    );
    assert!(!names.contains(&"CARGO".to_owned()), "{names:?}");
    for expected in [
        "OPENSHELL_EXPLICIT",
        "CARGO_PKG_NAME",
        driver_lifecycle::READY_FD_ENV,
        driver_lifecycle::PARENT_PID_ENV,
    ] {
        assert!(
            names.contains(&expected.to_owned()),
            "{expected} missing from {names:?}"
        );
    }
    DriverGuard::Managed(guard).shutdown().await.unwrap();
}

/// The ready-fd protocol needs nothing but a line on a descriptor: a shell
/// script can take part. Once it has exec'd into `sleep`, the process holds
/// stdio and the ready fd and nothing else, even though this test process
/// itself inherited stray descriptors without close-on-exec from cargo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_stdio_and_the_ready_fd_are_inherited() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("run").join("plain.sock");
    let script = r#"echo "openshell-driver-ready v1 $$" > "/proc/self/fd/$OPENSHELL_DRIVER_READY_FD"; exec sleep 60"#;
    let mut command = DriverCommand::new("/bin/sh").arg("-c").arg(script);
    command.lifecycle_flags = false;
    let guard = ManagedDriverProcess::spawn(
        &DriverEndpoint::new("script", &socket),
        command,
        quiet(Readiness::ReadyFd),
    )
    .await
    .unwrap();
    let pid = guard.pid().unwrap();
    wait_until("exec into sleep", Duration::from_secs(5), || {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
    })
    .await;
    let mut fds: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
        .collect();
    fds.sort_unstable();
    assert_eq!(fds.len(), 4, "stdio plus the ready fd, got {fds:?}");
    assert_eq!(&fds[..3], &[0, 1, 2]);
    let ready = std::fs::read_link(format!("/proc/{pid}/fd/{}", fds[3])).unwrap();
    assert!(ready.to_string_lossy().starts_with("pipe:"), "{ready:?}");
    DriverGuard::Managed(guard).shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ready_line_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let mut command = DriverCommand::new("/bin/sh")
        .arg("-c")
        .arg(r#"echo "hello there" > "/proc/self/fd/$OPENSHELL_DRIVER_READY_FD"; exec sleep 60"#);
    command.lifecycle_flags = false;
    let err =
        ManagedDriverProcess::spawn(&endpoint(tmp.path()), command, quiet(Readiness::ReadyFd))
            .await
            .unwrap_err();
    assert!(
        matches!(err, LifecycleError::BadReadyLine { ref line, .. } if line == "hello there"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialing_a_missing_socket_gives_up_after_the_deadline() {
    let tmp = tempfile::tempdir().unwrap();
    let endpoint = DriverEndpoint::new("absent", tmp.path().join("absent.sock"));
    let policy = driver_lifecycle::DialPolicy {
        deadline: Duration::from_millis(200),
        ..driver_lifecycle::DialPolicy::default()
    };
    let started = Instant::now();
    let err = driver_lifecycle::connect_with(&endpoint, policy)
        .await
        .unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert!(matches!(err, LifecycleError::Dial { .. }), "{err}");
    assert!(err.to_string().contains("absent.sock"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialing_waits_for_a_driver_that_starts_late() {
    let tmp = tempfile::tempdir().unwrap();
    let socket: PathBuf = tmp.path().join("run").join("late.sock");
    let endpoint = DriverEndpoint::new("late", &socket);
    let dial = tokio::spawn({
        let endpoint = endpoint.clone();
        async move { connect(&endpoint).await }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut driver = start_standalone(&socket, &["--allow-same-uid-peer"]).await;
    let channel = dial.await.unwrap().unwrap();
    ComputeDriverClient::new(channel)
        .get_capabilities(GetCapabilitiesRequest::default())
        .await
        .unwrap();
    driver.kill().unwrap();
    driver.wait().unwrap();
}
