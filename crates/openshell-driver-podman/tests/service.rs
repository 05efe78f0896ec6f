//! The driver starting its own `podman system service`: where it listens,
//! and that it goes away with the driver however the driver ends.

mod common;

use std::io::BufRead as _;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{IMAGE, LONG, engine_or_skip, ready_true, sandbox, unique};
use openshell_driver_podman::podman::Podman;
use openshell_proto::compute::v1::{CreateSandboxRequest, GetCapabilitiesRequest};

fn alive(pid: u32) -> bool {
    driver_lifecycle::proc::stat(i32::try_from(pid).expect("pid fits"))
        .is_some_and(|p| p.state != 'Z')
}

fn wait_gone(pid: u32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "{what} (pid {pid}) is still alive"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn wait_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(
            Instant::now() < deadline,
            "{} never answered",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Pid of the process listening on a Podman socket.
async fn service_pid(socket: &Path) -> u32 {
    Podman::new(socket)
        .ping(Duration::from_secs(5))
        .await
        .expect("the private service answers")
        .peer_pid
        .expect("peer credentials carry a pid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managed_driver_runs_and_stops_its_own_service() {
    // The test engine is only used to check Podman works here and to clean
    // up: the driver under test starts its own service.
    let engine = engine_or_skip!();
    let instance = unique("svc");
    engine.clean_up_instance(&instance);
    let dir = tempfile::tempdir().unwrap();
    // The config file the gateway writes for a managed driver.
    let config = dir.path().join(format!("{instance}.toml"));
    std::fs::write(
        &config,
        format!(
            "name = \"{instance}\"\nstate_dir = \"{}\"\ndefault_image = \"{IMAGE}\"\n\
             discover_podman_socket = false\nulimits = [\"{}\", \"{}\"]\nstop_timeout = 30\n",
            dir.path().join("state").display(),
            common::ULIMITS[0],
            common::ULIMITS[1],
        ),
    )
    .unwrap();
    let args = vec![
        "--driver-config".to_owned(),
        config.display().to_string(),
        // Flags override the file.
        "--stop-timeout".to_owned(),
        "2".to_owned(),
    ];
    let guard = common::managed(dir.path(), &instance, &args).await;

    let service_socket = dir
        .path()
        .join("run")
        .join(format!("{instance}-podman.sock"));
    assert!(
        service_socket.exists(),
        "the service listens next to the driver socket"
    );
    let service = service_pid(&service_socket).await;
    assert_ne!(Some(service), guard.pid());

    let mut client = common::client(&common::managed_socket(dir.path(), &instance)).await;
    let caps = client
        .get_capabilities(GetCapabilitiesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        caps.default_image, IMAGE,
        "default_image comes from the file"
    );
    let request = sandbox("svc", &LONG);
    client
        .create_sandbox(CreateSandboxRequest {
            sandbox: Some(request.clone()),
        })
        .await
        .expect("create through the driver's own service");
    assert!(ready_true(
        &common::get(&mut client, &request.id).await.unwrap()
    ));

    guard.shutdown().await.expect("the driver stops cleanly");
    wait_gone(service, "the podman service");
    assert!(!service_socket.exists(), "the service socket is removed");
    // Sandboxes outlive the driver and its service.
    let containers = engine.containers_with_label(&format!("openshell.driver.instance={instance}"));
    assert_eq!(containers.len(), 1);
    let inspect = engine
        .client()
        .inspect(&containers[0])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(inspect.state.status, "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_goes_when_the_driver_is_killed() {
    let engine = engine_or_skip!();
    let instance = unique("kil");
    engine.clean_up_instance(&instance);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run").join("driver.sock");
    let mut driver = Command::new(common::driver_binary())
        .arg("--bind-socket")
        .arg(&socket)
        .args([
            "--allow-same-uid-peer",
            "--start-podman-service",
            "--discover-podman-socket=false",
        ])
        .args(["--name", &instance])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    wait_socket(&socket).await;
    let service_socket = dir
        .path()
        .join("run")
        .join(format!("{instance}-podman.sock"));
    let service = service_pid(&service_socket).await;

    driver.kill().unwrap();
    driver.wait().unwrap();
    wait_gone(service, "the podman service of a SIGKILLed driver");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_driver_and_its_service_go_when_the_gateway_dies() {
    let engine = engine_or_skip!();
    let instance = unique("par");
    engine.clean_up_instance(&instance);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run").join("driver.sock");
    // A stand-in gateway: a shell that spawns the driver as a managed
    // child (its own pid as the expected peer and the parent to watch).
    let script = "export OPENSHELL_DRIVER_PARENT_PID=$$; \
                  \"$0\" --expected-peer-pid $$ \"$@\" </dev/null >/dev/null 2>&1 & echo $!; wait";
    let mut gateway = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(common::driver_binary())
        .arg("--bind-socket")
        .arg(&socket)
        .args(["--discover-podman-socket=false", "--name", &instance])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(gateway.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let driver: u32 = line.trim().parse().expect("the driver's pid");
    wait_socket(&socket).await;
    let service_socket = dir
        .path()
        .join("run")
        .join(format!("{instance}-podman.sock"));
    let service = service_pid(&service_socket).await;

    gateway.kill().unwrap();
    gateway.wait().unwrap();
    wait_gone(driver, "the driver of a dead gateway");
    wait_gone(service, "the podman service of a dead gateway's driver");
    assert!(!socket.exists(), "the driver removed its socket");
}
