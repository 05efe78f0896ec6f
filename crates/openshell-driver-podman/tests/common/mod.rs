//! Shared pieces of the Podman driver's integration tests: a private Podman
//! service per test, the local test image, the driver binary (standalone or
//! managed) and clean-up of every container a test made.
#![allow(
    dead_code,
    unused_macros,
    unused_imports,
    reason = "each test binary uses a different part of this shared module"
)]

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use driver_lifecycle::{
    DriverCommand, DriverEndpoint, DriverGuard, ManagedDriverProcess, Readiness, RestartPolicy,
    SpawnOptions,
};
use openshell_driver_podman::podman::Podman;
use openshell_proto::compute::logs::v1::sandbox_logs_client::SandboxLogsClient;
use openshell_proto::compute::v1::compute_driver_client::ComputeDriverClient;
use openshell_proto::compute::v1::{
    DriverSandbox, DriverSandboxSpec, DriverSandboxTemplate, GetSandboxRequest,
    WatchSandboxesEvent, watch_sandboxes_event,
};
use tonic::transport::Channel;

pub const IMAGE: &str = "localhost/openshell-busybox:latest";

/// Limits every test container gets, under the hard limits of these
/// machines.
pub const ULIMITS: [&str; 2] = ["nofile=1024:1024", "nproc=1024:1024"];

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this test process and call.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

fn podman_works() -> Result<(), String> {
    let output = Command::new("podman")
        .arg("--version")
        .output()
        .map_err(|e| format!("podman cannot be run ({e}); install it (apt-get install podman)"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`podman --version` failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Builds the test image once per test process.
fn ensure_image() -> Result<(), String> {
    static BUILT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    BUILT.get_or_init(build_image).clone()
}

fn build_image() -> Result<(), String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/podman-test-image.sh");
    let output = Command::new("bash")
        .arg(&script)
        .arg(IMAGE)
        .output()
        .map_err(|e| format!("could not run {}: {e}", script.display()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "building the test image failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// A `podman system service` of this test on a private socket.
pub struct TestEngine {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    child: Option<Child>,
    /// Containers with any of these `key=value` labels are removed at the end.
    cleanup_labels: std::sync::Mutex<Vec<String>>,
    /// Extra environment of the service process.
    env: Vec<(String, String)>,
}

impl TestEngine {
    /// Starts a private service and checks it can run a container, or says
    /// why this machine cannot.
    pub fn start() -> Result<Self, String> {
        Self::start_with_env(&[])
    }

    /// [`TestEngine::start`] with extra environment for the service (e.g.
    /// `XDG_RUNTIME_DIR`, where it finds `containers/auth.json`).
    pub fn start_with_env(env: &[(&str, &str)]) -> Result<Self, String> {
        podman_works()?;
        ensure_image()?;
        let dir = tempfile::Builder::new()
            .prefix("pdt")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let socket = dir.path().join("engine.sock");
        let mut engine = Self {
            dir,
            socket,
            child: None,
            cleanup_labels: std::sync::Mutex::new(Vec::new()),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        engine.spawn_service()?;
        engine.check_can_run()?;
        Ok(engine)
    }

    /// (Re)starts the service process on the same socket.
    pub fn spawn_service(&mut self) -> Result<(), String> {
        let _ = std::fs::remove_file(&self.socket);
        let child = Command::new("podman")
            .args([
                "--runtime",
                "runc",
                "--cgroup-manager",
                "cgroupfs",
                "--log-level",
                "error",
            ])
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", self.socket.display()))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // conmon writes OOM marker files into its working directory.
            .current_dir(self.dir.path())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("could not start podman system service: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if Instant::now() > deadline {
                return Err("podman system service did not open its socket within 30 s".into());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!("podman system service exited early ({status})"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Stops the service (SIGTERM to its group, then SIGKILL) and waits.
    pub fn stop_service(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pgid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid fits"));
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn service_pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `podman --remote --url unix://<socket> ARGS...`
    pub fn remote(&self) -> Command {
        let mut command = Command::new("podman");
        command
            .arg("--remote")
            .arg("--url")
            .arg(format!("unix://{}", self.socket.display()));
        command
    }

    fn check_can_run(&self) -> Result<(), String> {
        let mut command = self.remote();
        command.args(["run", "--rm"]);
        for limit in ULIMITS {
            command.args(["--ulimit", limit]);
        }
        let output = command
            .args([IMAGE, "true"])
            .output()
            .map_err(|e| e.to_string())?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "podman cannot run a container on this machine: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }

    pub fn client(&self) -> Podman {
        Podman::new(&self.socket)
    }

    /// Removes, at the end of the test, every container labelled `label`.
    pub fn clean_up_label(&self, label: impl Into<String>) {
        self.cleanup_labels
            .lock()
            .expect("cleanup list")
            .push(label.into());
    }

    /// Removes, at the end of the test, every container of driver
    /// instance `instance`.
    pub fn clean_up_instance(&self, instance: &str) {
        self.clean_up_label(format!("openshell.driver.instance={instance}"));
    }

    /// Ids of containers with label `label`, via the CLI (not the driver).
    pub fn containers_with_label(&self, label: &str) -> Vec<String> {
        let output = self
            .remote()
            .args(["ps", "-a", "-q", "--no-trunc", "--filter"])
            .arg(format!("label={label}"))
            .output()
            .expect("podman ps runs");
        String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }

    fn remove_labelled(&self) {
        let labels = self.cleanup_labels.lock().expect("cleanup list").clone();
        for label in labels {
            let ids = self.containers_with_label(&label);
            if !ids.is_empty() {
                let _ = self
                    .remote()
                    .args(["rm", "-f", "-t", "0"])
                    .args(&ids)
                    .output();
            }
        }
    }
}

impl Drop for TestEngine {
    fn drop(&mut self) {
        if self.child.is_none() {
            // The service is down; bring it back just to clean up.
            let _ = self.spawn_service();
        }
        self.remove_labelled();
        self.stop_service();
    }
}

/// Starts the test engine or prints why the test is skipped.
macro_rules! engine_or_skip {
    () => {
        match common::TestEngine::start() {
            Ok(engine) => engine,
            Err(reason) => {
                eprintln!("skipped: {reason}");
                return;
            }
        }
    };
}
pub(crate) use engine_or_skip;

pub fn driver_binary() -> PathBuf {
    openshell_test_driver::workspace_binary("openshell-driver-podman", "openshell-driver-podman")
}

/// Driver flags every test uses: its engine, the test image as default,
/// the test ulimits, quick stops.
pub fn base_args(engine: &TestEngine, instance: &str, state_dir: &Path) -> Vec<String> {
    let mut args = vec![
        "--name".to_owned(),
        instance.to_owned(),
        "--state-dir".to_owned(),
        state_dir.display().to_string(),
        "--podman-socket".to_owned(),
        engine.socket.display().to_string(),
        "--default-image".to_owned(),
        IMAGE.to_owned(),
        "--stop-timeout".to_owned(),
        "2".to_owned(),
    ];
    for limit in ULIMITS {
        args.push("--ulimit".to_owned());
        args.push(limit.to_owned());
    }
    args
}

/// The driver binary run by hand, attached to with `--allow-same-uid-peer`.
pub struct Standalone {
    pub child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Standalone {
    pub async fn start(dir: &Path, args: &[String]) -> Self {
        let socket = dir.join("run").join("driver.sock");
        let log = dir.join(format!("driver-{}.log", unique("l")));
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(driver_binary())
            .arg("--bind-socket")
            .arg(&socket)
            .arg("--allow-same-uid-peer")
            .args(args)
            .env("RUST_LOG", "openshell_driver_podman=debug,info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .process_group(0)
            .spawn()
            .expect("driver starts");
        let mut this = Self { child, socket, log };
        this.wait_ready().await;
        this
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "driver exited before it was ready ({status}):\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "driver not ready within 60 s:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn client(&self) -> ComputeDriverClient<Channel> {
        client(&self.socket).await
    }

    pub async fn logs_client(&self) -> SandboxLogsClient<Channel> {
        SandboxLogsClient::new(channel(&self.socket).await)
    }

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(Instant::now() < deadline, "driver ignored SIGTERM for 20 s");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- driver log {}:\n{}",
                self.log.display(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// The driver spawned the way a gateway spawns it.
pub async fn managed(dir: &Path, name: &str, args: &[String]) -> DriverGuard {
    let endpoint = DriverEndpoint::new(name, dir.join("run").join(format!("{name}.sock")));
    let command = DriverCommand::new(driver_binary())
        .args(args.iter().cloned())
        .env("RUST_LOG", "warn");
    let options = SpawnOptions {
        readiness: Readiness::ReadyFd,
        ready_timeout: Duration::from_secs(60),
        forward_output: false,
        restart: RestartPolicy {
            max_attempts: 0,
            ..RestartPolicy::default()
        },
        ..SpawnOptions::default()
    };
    let process = ManagedDriverProcess::spawn(&endpoint, command, options)
        .await
        .unwrap_or_else(|e| panic!("managed driver did not start: {e}"));
    DriverGuard::Managed(process)
}

pub fn managed_socket(dir: &Path, name: &str) -> PathBuf {
    dir.join("run").join(format!("{name}.sock"))
}

pub async fn channel(socket: &Path) -> Channel {
    driver_lifecycle::connect(&DriverEndpoint::new("test", socket))
        .await
        .expect("connect to the driver")
}

pub async fn client(socket: &Path) -> ComputeDriverClient<Channel> {
    ComputeDriverClient::new(channel(socket).await)
}

/// A create request for `argv` in the test image.
pub fn sandbox(name: &str, argv: &[&str]) -> DriverSandbox {
    DriverSandbox {
        id: format!("{}-{}", unique("id"), name),
        name: name.to_owned(),
        workspace: "default".to_owned(),
        spec: Some(DriverSandboxSpec {
            command: argv.iter().map(|s| (*s).to_owned()).collect(),
            template: Some(DriverSandboxTemplate {
                image: IMAGE.to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `sleep` for a long time: a sandbox that stays up.
pub const LONG: [&str; 2] = ["sleep", "100000"];

pub fn ready_condition(sandbox: &DriverSandbox) -> Option<(String, String, String)> {
    openshell_driver_podman::status::ready(sandbox)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

pub fn is_suspended(sandbox: &DriverSandbox) -> bool {
    openshell_driver_podman::status::suspended(sandbox)
}

pub async fn get(
    client: &mut ComputeDriverClient<Channel>,
    id: &str,
) -> Result<DriverSandbox, tonic::Status> {
    client
        .get_sandbox(GetSandboxRequest {
            sandbox_id: id.to_owned(),
            sandbox_name: String::new(),
        })
        .await
        .map(|r| r.into_inner().sandbox.expect("a sandbox in the answer"))
}

/// Polls GetSandbox until `check` holds (deadline 60 s).
pub async fn wait_for(
    client: &mut ComputeDriverClient<Channel>,
    id: &str,
    what: &str,
    check: impl Fn(&DriverSandbox) -> bool,
) -> DriverSandbox {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let last = get(client, id).await;
        if let Ok(sandbox) = &last
            && check(sandbox)
        {
            return sandbox.clone();
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads watch events until one satisfies `check` (deadline 60 s);
/// returns every event read, the match last.
pub async fn watch_until(
    stream: &mut tonic::Streaming<WatchSandboxesEvent>,
    what: &str,
    check: impl Fn(&WatchSandboxesEvent) -> bool,
) -> Vec<WatchSandboxesEvent> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let next = tokio::time::timeout_at(deadline, stream.message())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for watch event: {what}; saw {seen:#?}"))
            .expect("watch stream healthy")
            .unwrap_or_else(|| panic!("watch stream ended while waiting for {what}"));
        let done = check(&next);
        seen.push(next);
        if done {
            return seen;
        }
    }
}

pub fn event_sandbox(event: &WatchSandboxesEvent) -> Option<&DriverSandbox> {
    match &event.payload {
        Some(watch_sandboxes_event::Payload::Sandbox(s)) => s.sandbox.as_ref(),
        _ => None,
    }
}

pub fn event_deleted(event: &WatchSandboxesEvent) -> Option<&str> {
    match &event.payload {
        Some(watch_sandboxes_event::Payload::Deleted(d)) => Some(&d.sandbox_id),
        _ => None,
    }
}

pub fn ready_true(sandbox: &DriverSandbox) -> bool {
    ready_condition(sandbox).is_some_and(|(status, _, _)| status == "True")
}

/// A real registry (Debian's `docker-registry`, the CNCF distribution
/// server) on a free 127.0.0.1 port, storing into a temporary directory;
/// stopped when dropped. Never the system service.
pub struct TestRegistry {
    pub dir: tempfile::TempDir,
    /// `127.0.0.1:PORT`, as image references and `--insecure-registry`
    /// name it.
    pub host: String,
    child: Child,
}

/// The registry program, or why there is none.
fn registry_binary() -> Result<PathBuf, String> {
    let path = PathBuf::from("/usr/bin/docker-registry");
    if path.exists() {
        Ok(path)
    } else {
        Err(
            "no /usr/bin/docker-registry; install Debian's registry (apt-get install \
             docker-registry) to run the registry tests"
                .to_owned(),
        )
    }
}

/// A 127.0.0.1 port nothing listens on (at the time of asking).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

impl TestRegistry {
    /// Starts a registry; with `htpasswd` (lines `user:bcrypt-hash`) it
    /// asks for credentials.
    pub fn start(htpasswd: Option<&str>) -> Result<Self, String> {
        let binary = registry_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("reg")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let host = format!("127.0.0.1:{}", free_port());
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {host}\n",
            dir.path().join("data").display()
        );
        if let Some(htpasswd) = htpasswd {
            let path = dir.path().join("htpasswd");
            std::fs::write(&path, htpasswd).map_err(|e| e.to_string())?;
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: openshell-test\n    path: {}\n",
                path.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
        let log =
            std::fs::File::create(dir.path().join("registry.log")).map_err(|e| e.to_string())?;
        let child = Command::new(binary)
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("could not start docker-registry: {e}"))?;
        let mut registry = Self { dir, host, child };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&registry.host).is_err() {
            if let Ok(Some(status)) = registry.child.try_wait() {
                return Err(format!(
                    "docker-registry exited early ({status}): {}",
                    registry.log()
                ));
            }
            if Instant::now() > deadline {
                return Err("docker-registry did not listen within 30 s".to_owned());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(registry)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// `HOST/openshell/NAME:TAG` in this registry.
    pub fn reference(&self, name: &str, tag: &str) -> String {
        format!("{}/openshell/{name}:{tag}", self.host)
    }

    /// Pushes local image `image` as `reference` (with `creds` as
    /// `user:password` where the registry asks), then makes sure the local
    /// store has no image by that reference, so using it means pulling.
    pub fn push(&self, engine: &TestEngine, image: &str, reference: &str, creds: Option<&str>) {
        let mut push = engine.remote();
        push.args(["push", "--tls-verify=false"]);
        if let Some(creds) = creds {
            push.arg("--creds").arg(creds);
        }
        let output = push
            .arg(image)
            .arg(reference)
            .output()
            .expect("podman push runs");
        assert!(
            output.status.success(),
            "podman push {image} {reference} failed: {}; registry log: {}",
            String::from_utf8_lossy(&output.stderr).trim(),
            self.log()
        );
        remove_image(engine, reference);
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits"));
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Removes `reference` from the engine's local store (untags it when the
/// image has other names); fine when it is not there.
pub fn remove_image(engine: &TestEngine, reference: &str) {
    let output = engine
        .remote()
        .args(["rmi", "--ignore", reference])
        .output()
        .expect("podman rmi runs");
    assert!(
        output.status.success(),
        "podman rmi {reference} failed: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
}

/// The id of the local image `reference`, or `None`.
pub fn image_id(engine: &TestEngine, reference: &str) -> Option<String> {
    let output = engine
        .remote()
        .args(["image", "inspect", "--format", "{{.Id}}", reference])
        .output()
        .expect("podman image inspect runs");
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Starts a registry or prints why the test is skipped.
macro_rules! registry_or_skip {
    ($htpasswd:expr) => {
        match common::TestRegistry::start($htpasswd) {
            Ok(registry) => registry,
            Err(reason) => {
                eprintln!("skipped: {reason}");
                return;
            }
        }
    };
}
pub(crate) use registry_or_skip;
