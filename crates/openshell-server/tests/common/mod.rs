//! Real processes for gateway tests: the `openshell-gateway` binary, and
//! `openshell-test-driver` either attached (started here) or managed
//! (started by the gateway from its config).

#![allow(
    dead_code,
    reason = "each test binary uses a different part of these helpers; the lint fires only in some of them"
)]

use std::fs;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use driver_lifecycle::DriverEndpoint;
use openshell_proto::gateway::v1::gateway_client::GatewayClient;
use openshell_proto::gateway::v1::{self as gw, SandboxPhase};
use tonic::transport::Channel;

/// Upper bound for anything a test waits on; a hang guard, not a timing.
pub const PATIENCE: Duration = Duration::from_secs(30);

pub fn gateway_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_openshell-gateway"))
}

pub fn test_driver() -> PathBuf {
    openshell_test_driver::binary_path()
}

/// Polls `check` every 20 ms until it is true; panics after [`PATIENCE`].
pub async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn pid_alive(pid: u32) -> bool {
    driver_lifecycle::proc::stat(i32::try_from(pid).expect("pid fits"))
        .is_some_and(|p| p.state != 'Z')
}

pub fn kill(pid: u32, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid fits"));
    let _ = nix::sys::signal::kill(pid, signal);
}

/// A test's directory: state, run dir, config, logs.
pub struct Dirs {
    pub tmp: tempfile::TempDir,
}

impl Dirs {
    pub fn new() -> Self {
        Self {
            // Private (0700), as every socket directory must be.
            tmp: tempfile::Builder::new()
                .prefix("gw")
                .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .tempdir_in("/tmp")
                .expect("temp dir"),
        }
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
    pub fn state(&self) -> PathBuf {
        self.path("state")
    }
    pub fn run(&self) -> PathBuf {
        self.path("run")
    }
    pub fn socket(&self) -> PathBuf {
        self.run().join("gateway.sock")
    }
}

/// An `openshell-test-driver` started by the test (an attached driver).
pub struct AttachedDriver {
    pub child: Child,
    pub socket: PathBuf,
    pub call_log: PathBuf,
    pub args: Vec<String>,
}

impl AttachedDriver {
    /// Starts the driver on `socket` and waits until it answers.
    pub fn start(socket: &Path, call_log: &Path, extra: &[&str]) -> Self {
        let mut args: Vec<String> = vec![
            "--bind-socket".into(),
            socket.display().to_string(),
            "--allow-same-uid-peer".into(),
            "--call-log".into(),
            call_log.display().to_string(),
            "--provision-delay-ms".into(),
            "5".into(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let child = Command::new(test_driver())
            .args(&args)
            .stdin(Stdio::null())
            .spawn()
            .expect("start the test driver");
        let driver = Self {
            child,
            socket: socket.to_owned(),
            call_log: call_log.to_owned(),
            args,
        };
        driver.wait_serving();
        driver
    }

    fn wait_serving(&self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let probe = Command::new(test_driver())
                .args(["probe", "--socket"])
                .arg(&self.socket)
                .output()
                .expect("run probe");
            if probe.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "test driver did not start on {}",
                self.socket.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the same driver again (after [`Self::kill`]).
    pub fn restart(&mut self) {
        self.child = Command::new(test_driver())
            .args(&self.args)
            .stdin(Stdio::null())
            .spawn()
            .expect("restart the test driver");
        self.wait_serving();
    }

    pub fn calls(&self) -> Vec<String> {
        read_calls(&self.call_log)
    }
}

impl Drop for AttachedDriver {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn read_calls(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim_end().to_owned())
        .collect()
}

/// A running `openshell-gateway`.
pub struct Gateway {
    pub child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub config: PathBuf,
    pub args: Vec<String>,
}

/// Writes `gateway.toml` into the test directory and returns its path.
pub fn write_config(dirs: &Dirs, toml: &str) -> PathBuf {
    let path = dirs.path("gateway.toml");
    fs::write(&path, toml).expect("write config");
    path
}

/// One attached test driver `name` on `d.sock` (its calls logged in
/// `calls`, started with `driver_args`) behind a gateway with
/// `gateway_keys` in `[openshell.gateway]` and `gateway_args` on its
/// command line.
pub async fn one_driver(
    dirs: &Dirs,
    name: &str,
    gateway_keys: &str,
    driver_args: &[&str],
    gateway_args: &[&str],
) -> (AttachedDriver, Gateway) {
    let driver = AttachedDriver::start(&dirs.path("d.sock"), &dirs.path("calls"), driver_args);
    let config = write_config(
        dirs,
        &format!(
            "[openshell.gateway]\ncompute_drivers = [\"{name}@{}\"]\n{gateway_keys}",
            driver.socket.display()
        ),
    );
    let gateway = Gateway::start(dirs, &config, gateway_args).await;
    (driver, gateway)
}

/// The standard arguments: private state and run dirs, the config file.
pub fn base_args(dirs: &Dirs, config: &Path) -> Vec<String> {
    vec![
        "--state-dir".into(),
        dirs.state().display().to_string(),
        "--run-dir".into(),
        dirs.run().display().to_string(),
        "--config".into(),
        config.display().to_string(),
        "--log-level".into(),
        "info,openshell_server=debug".into(),
    ]
}

impl Gateway {
    /// Starts the gateway (without waiting).
    pub fn spawn(dirs: &Dirs, config: &Path, extra: &[&str]) -> Self {
        let mut args = base_args(dirs, config);
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let log = dirs.path("gateway.log");
        let child = spawn_gateway(&args, &log);
        Self {
            child,
            socket: dirs.socket(),
            log,
            config: config.to_owned(),
            args,
        }
    }

    /// Starts the gateway and waits until its health check says SERVING.
    pub async fn start(dirs: &Dirs, config: &Path, extra: &[&str]) -> Self {
        let mut gateway = Self::spawn(dirs, config, extra);
        gateway.wait_serving().await;
        gateway
    }

    pub async fn wait_serving(&mut self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("gateway exited early ({status}):\n{}", self.log_text());
            }
            if health_serving(&self.socket).await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "gateway did not serve:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn client(&self) -> GatewayClient<Channel> {
        client(&self.socket).await
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop(&mut self) -> ExitStatus {
        kill(self.pid(), nix::sys::signal::Signal::SIGTERM);
        self.wait_exit()
    }

    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "gateway did not exit:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts the same gateway again, with the same arguments.
    pub async fn restart(&mut self) {
        self.child = spawn_gateway(&self.args, &self.log);
        self.wait_serving().await;
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- gateway log ----\n{}", self.log_text());
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            kill(self.pid(), nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn spawn_gateway(args: &[String], log: &Path) -> Child {
    let stderr = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open gateway log");
    Command::new(gateway_binary())
        .args(args)
        .env_remove("OPENSHELL_DRIVERS")
        .env_remove("OPENSHELL_COMPUTE_DRIVER_SOCKET")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start the gateway")
}

/// Runs the gateway to completion (for startup failures): exit status and
/// stderr.
pub fn run_gateway(dirs: &Dirs, config: &Path, extra: &[&str]) -> (ExitStatus, String) {
    let mut args = base_args(dirs, config);
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let output = Command::new(gateway_binary())
        .args(&args)
        .env_remove("OPENSHELL_DRIVERS")
        .env_remove("OPENSHELL_COMPUTE_DRIVER_SOCKET")
        .stdin(Stdio::null())
        .output()
        .expect("run the gateway");
    (
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

pub async fn client(socket: &Path) -> GatewayClient<Channel> {
    let channel = driver_lifecycle::connect(&DriverEndpoint::new("gateway", socket))
        .await
        .expect("connect to the gateway");
    GatewayClient::new(channel)
}

async fn health_serving(socket: &Path) -> bool {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let endpoint = DriverEndpoint::new("gateway", socket);
    let Ok(channel) =
        driver_lifecycle::connect_with(&endpoint, driver_lifecycle::DialPolicy::ONCE).await
    else {
        return false;
    };
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await;
    response.is_ok_and(|r| {
        r.into_inner().status
            == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    })
}

// ---- API helpers ----------------------------------------------------------

pub fn by_name(name: &str) -> Option<gw::SandboxRef> {
    Some(gw::SandboxRef {
        name: name.to_owned(),
        id: String::new(),
    })
}

pub fn create_request(name: &str, driver: &str, command: &[&str]) -> gw::CreateSandboxRequest {
    gw::CreateSandboxRequest {
        name: name.to_owned(),
        spec: Some(gw::SandboxSpec {
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        }),
        labels: Default::default(),
        driver: driver.to_owned(),
    }
}

pub async fn create(client: &mut GatewayClient<Channel>, name: &str, driver: &str) -> gw::Sandbox {
    client
        .create_sandbox(create_request(name, driver, &["sleep", "infinity"]))
        .await
        .unwrap_or_else(|s| panic!("create {name}: {s:?}"))
        .into_inner()
        .sandbox
        .expect("sandbox in response")
}

pub async fn get(
    client: &mut GatewayClient<Channel>,
    name: &str,
) -> Result<gw::Sandbox, tonic::Status> {
    client
        .get_sandbox(gw::GetSandboxRequest {
            sandbox: by_name(name),
        })
        .await
        .map(|r| r.into_inner().sandbox.expect("sandbox in response"))
}

pub async fn wait_phase(
    client: &mut GatewayClient<Channel>,
    name: &str,
    phase: SandboxPhase,
) -> gw::Sandbox {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let sandbox = get(client, name).await.expect("get sandbox");
        if sandbox.phase == phase as i32 {
            return sandbox;
        }
        assert!(
            Instant::now() < deadline,
            "sandbox {name} never reached {phase:?}; last: {sandbox:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn info(client: &mut GatewayClient<Channel>) -> gw::GatewayInfo {
    client
        .get_gateway_info(gw::GetGatewayInfoRequest {})
        .await
        .expect("gateway info")
        .into_inner()
}

pub async fn driver_info(client: &mut GatewayClient<Channel>, name: &str) -> gw::DriverInfo {
    info(client)
        .await
        .drivers
        .into_iter()
        .find(|d| d.name == name)
        .unwrap_or_else(|| panic!("driver {name} in gateway info"))
}

/// Asserts a status code and that the message contains every fragment.
pub fn assert_status(
    result: Result<impl std::fmt::Debug, tonic::Status>,
    code: tonic::Code,
    fragments: &[&str],
) {
    let status = match result {
        Ok(value) => panic!("expected {code:?}, got {value:?}"),
        Err(status) => status,
    };
    assert_eq!(status.code(), code, "{status:?}");
    for fragment in fragments {
        assert!(
            status.message().contains(fragment),
            "{:?} lacks {fragment:?}",
            status.message()
        );
    }
}

// ---- scale helpers ---------------------------------------------------------

/// The `openshell` CLI binary, built with this test's profile.
pub fn cli_binary() -> PathBuf {
    openshell_test_driver::workspace_binary("openshell-cli", "openshell")
}

/// Runs `openshell --gateway unix://SOCKET ARGS...`: exit status, stdout,
/// stderr.
pub fn run_cli(socket: &Path, args: &[&str]) -> (ExitStatus, String, String) {
    let out = Command::new(cli_binary())
        .arg("--gateway")
        .arg(format!("unix://{}", socket.display()))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run openshell");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A process's resident memory (KiB) and thread count, from /proc.
pub fn rss_and_threads(pid: u32) -> (u64, u64) {
    (status_field(pid, "VmRSS:"), status_field(pid, "Threads:"))
}

/// The number in field `name` (with its colon) of `/proc/PID/status`, kB
/// for sizes; 0 when the process or the field is gone.
pub fn status_field(pid: u32, name: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0)
}

/// Stores rows for the test driver's `--preload` sandboxes `0..count` in a
/// gateway state directory, before the gateway starts, as if the gateway
/// had created them on driver `driver`.
pub fn preload_rows(state_dir: &Path, driver: &str, count: usize) {
    use openshell_server::state::store::{SandboxRow, Store};
    use std::os::unix::fs::DirBuilderExt as _;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .expect("create the state directory");
    let store = Store::open(&state_dir.join("gateway.db")).expect("open the store");
    let now = openshell_wire::time::now_millis();
    for chunk in (0..count).collect::<Vec<_>>().chunks(5000) {
        store
            .write(|tx| {
                for index in chunk {
                    tx.insert(&SandboxRow {
                        id: openshell_test_driver::preloaded_id(*index),
                        name: openshell_test_driver::preloaded_name(*index),
                        driver: driver.to_owned(),
                        spec: gw::SandboxSpec {
                            image: "test/busybox:latest".to_owned(),
                            command: openshell_test_driver::PRELOADED_COMMAND
                                .map(str::to_owned)
                                .to_vec(),
                            ..Default::default()
                        },
                        labels: std::collections::BTreeMap::new(),
                        phase: SandboxPhase::Provisioning,
                        observed: None,
                        gateway_condition: None,
                        instance_id: String::new(),
                        resource_version: 1,
                        created_at_ms: now,
                        updated_at_ms: now,
                    })?;
                }
                Ok(())
            })
            .expect("store the preloaded rows");
    }
}
