//! The end-to-end harness: real `openshell-gateway`, driver and `openshell`
//! binaries started on private temp dirs, driven through the CLI, and
//! cleaned up — every process the harness started, even when a test fails.

use std::fs::{self, File};
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// The image the Podman buckets run, built locally by
/// `scripts/podman-test-image.sh` (there is no registry).
pub const TEST_IMAGE: &str = "localhost/openshell-busybox:latest";

/// Paths of the workspace binaries under test, each built on first use with
/// the profile of the running test (so a test builds only what it runs).
pub mod bin {
    use std::path::PathBuf;

    use openshell_test_driver::workspace_binary;

    pub fn gateway() -> PathBuf {
        workspace_binary("openshell-server", "openshell-gateway")
    }

    pub fn cli() -> PathBuf {
        workspace_binary("openshell-cli", "openshell")
    }

    pub fn podman_driver() -> PathBuf {
        workspace_binary("openshell-driver-podman", "openshell-driver-podman")
    }

    pub fn vm_driver() -> PathBuf {
        workspace_binary("openshell-driver-vm", "openshell-driver-vm")
    }

    pub fn test_driver() -> PathBuf {
        openshell_test_driver::binary_path()
    }

    pub fn driver_check() -> PathBuf {
        workspace_binary("openshell-driver-check", "openshell-driver-check")
    }
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

/// Waits until `check` holds, polling every 50 ms; panics with `what` after
/// `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether process `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    i32::try_from(pid)
        .ok()
        .and_then(driver_lifecycle::proc::stat)
        .is_some_and(|p| p.state != 'Z' && p.state != 'X')
}

/// Pids of live processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me && alive(*pid))
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmd| String::from_utf8_lossy(&cmd).contains(needle))
        })
        .collect()
}

/// A process the harness started; stopped (SIGTERM, then SIGKILL) when
/// dropped if it is still running. Its stdout and stderr go to a log file.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `command` with its output going to `log`.
    pub fn spawn(name: &str, mut command: Command, log: PathBuf) -> Self {
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open process log");
        let err = out.try_clone().expect("clone log handle");
        command.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {name}: {e}"));
        Self {
            name: name.to_owned(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: Signal) {
        let _ = kill(
            Pid::from_raw(i32::try_from(self.pid()).expect("pid fits")),
            signal,
        );
    }

    /// Exit status if the process has exited (reaping it).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.try_exit() {
            return Some(status);
        }
        self.signal(Signal::SIGTERM);
        if let Some(status) = self.wait_exit(grace) {
            return Some(status);
        }
        self.signal(Signal::SIGKILL);
        self.wait_exit(Duration::from_secs(5))
    }

    /// The log so far.
    pub fn output(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.output();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

/// A private directory for one test, short enough for socket paths, with
/// `run/` and `state/` below it. On drop, every process whose command line
/// still mentions the directory is killed: nothing a test started outlives
/// it.
#[derive(Debug)]
pub struct TestEnv {
    dir: tempfile::TempDir,
    /// Appended to sandbox names so parallel runs on one Podman engine do
    /// not collide.
    pub suffix: String,
}

impl TestEnv {
    pub fn new() -> Self {
        // Private (0700): sockets are placed directly in it.
        let dir = tempfile::Builder::new()
            .prefix("ose2e.")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir_in("/tmp")
            .expect("temp dir");
        let suffix = dir
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .map(|n| n.trim_start_matches("ose2e.").to_ascii_lowercase())
            .unwrap_or_default()
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect();
        Self { dir, suffix }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn run_dir(&self) -> PathBuf {
        self.path().join("run")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.path().join("state")
    }

    pub fn gateway_socket(&self) -> PathBuf {
        self.run_dir().join("gateway.sock")
    }

    /// A sandbox name unique to this environment.
    pub fn name(&self, base: &str) -> String {
        format!("{base}-{}", self.suffix)
    }

    /// Writes `content` to `<dir>/<file>` and returns the path.
    pub fn write(&self, file: &str, content: &str) -> PathBuf {
        let path = self.path().join(file);
        fs::write(&path, content).expect("write test file");
        path
    }

    /// Processes still running that belong to this environment.
    pub fn leftover_processes(&self) -> Vec<u32> {
        processes_mentioning(&self.path().to_string_lossy())
    }
}

impl Default for TestEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        for pid in self.leftover_processes() {
            let _ = kill(
                Pid::from_raw(i32::try_from(pid).unwrap_or(0)),
                Signal::SIGKILL,
            );
        }
        remove_containers_with_suffix(&self.suffix);
    }
}

/// Removes Podman containers of sandboxes named `*-<suffix>`: what a test
/// that failed half way left in the engine. Does nothing without Podman.
fn remove_containers_with_suffix(suffix: &str) {
    if suffix.is_empty() {
        return;
    }
    let Ok(out) = Command::new("podman")
        .args([
            "ps",
            "-a",
            "--filter",
            "label=openshell.managed-by=openshell-driver-podman",
            "--format",
            "{{.ID}} {{index .Labels \"openshell.sandbox.name\"}}",
        ])
        .stderr(Stdio::null())
        .output()
    else {
        return;
    };
    let ending = format!("-{suffix}");
    let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_once(' '))
        .filter(|(_, name)| name.ends_with(&ending))
        .map(|(id, _)| id.to_owned())
        .collect();
    if !ids.is_empty() {
        let _ = Command::new("podman")
            .args(["rm", "-f", "-t", "0"])
            .args(&ids)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// What a CLI invocation printed.
#[derive(Debug)]
pub struct CliOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    /// Panics with everything printed unless the command succeeded.
    #[track_caller]
    pub fn ok(self) -> Self {
        assert!(
            self.status.success(),
            "openshell failed ({}):\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    /// Panics unless the command failed with `code`.
    #[track_caller]
    pub fn fails_with(self, code: i32) -> Self {
        assert_eq!(
            self.status.code(),
            Some(code),
            "expected exit code {code}:\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

/// How to start a gateway.
#[derive(Debug, Clone, Default)]
pub struct GatewayConfig {
    /// `--drivers` value.
    pub drivers: Option<String>,
    /// Content of a `--config` TOML file.
    pub toml: Option<String>,
    pub extra_args: Vec<String>,
}

/// A running `openshell-gateway` on the environment's private directories.
#[derive(Debug)]
pub struct Gateway {
    pub proc: Proc,
    socket: PathBuf,
    args: Vec<String>,
    log: PathBuf,
}

impl Gateway {
    /// Starts a gateway and waits until it answers `openshell gateway info`.
    /// Returns the log tail if it exits first or does not answer in 60 s.
    pub fn start(env: &TestEnv, config: &GatewayConfig) -> Result<Self, String> {
        let socket = env.gateway_socket();
        let mut args = vec![
            "--listen".to_owned(),
            format!("unix://{}", socket.display()),
            "--run-dir".to_owned(),
            env.run_dir().display().to_string(),
            "--state-dir".to_owned(),
            env.state_dir().display().to_string(),
        ];
        if let Some(drivers) = &config.drivers {
            args.push("--drivers".to_owned());
            args.push(drivers.clone());
        }
        if let Some(toml) = &config.toml {
            args.push("--config".to_owned());
            args.push(env.write("gateway.toml", toml).display().to_string());
        }
        args.extend(config.extra_args.iter().cloned());
        let log = env.path().join("gateway.log");
        Self::launch(socket, args, log)
    }

    fn launch(socket: PathBuf, args: Vec<String>, log: PathBuf) -> Result<Self, String> {
        let mut command = Command::new(bin::gateway());
        command
            .args(&args)
            .env("RUST_LOG", "info")
            .env_remove("OPENSHELL_DRIVERS");
        let proc = Proc::spawn("openshell-gateway", command, log.clone());
        let mut gateway = Self {
            proc,
            socket,
            args,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = gateway.proc.try_exit() {
                return Err(format!(
                    "gateway exited during startup ({status}):\n{}",
                    gateway.proc.log_tail(40)
                ));
            }
            if gateway.socket.exists() && gateway.cli(&["gateway", "info"]).status.success() {
                return Ok(gateway);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "gateway did not answer within 60 s:\n{}",
                    gateway.proc.log_tail(40)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn address(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Runs `openshell --gateway <this> ARGS...`.
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        let out = Command::new(bin::cli())
            .arg("--gateway")
            .arg(self.address())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run openshell");
        CliOutput {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `gateway info -o json`.
    pub fn info(&self) -> Value {
        self.cli(&["-o", "json", "gateway", "info"]).ok().json()
    }

    /// The info entry of driver `name`.
    pub fn driver(&self, name: &str) -> Value {
        self.info()["drivers"]
            .as_array()
            .and_then(|drivers| drivers.iter().find(|d| d["name"] == name).cloned())
            .unwrap_or_else(|| panic!("driver {name} not in gateway info"))
    }

    /// `sandbox get -o json` phase, or `None` when it does not exist.
    pub fn phase(&self, name: &str) -> Option<String> {
        let out = self.cli(&["-o", "json", "sandbox", "get", name]);
        out.status
            .success()
            .then(|| out.json()["phase"].as_str().unwrap_or_default().to_owned())
    }

    /// Waits until sandbox `name` is in `phase`.
    pub fn wait_phase(&self, name: &str, phase: &str, timeout: Duration) {
        let mut last = None;
        let deadline = Instant::now() + timeout;
        loop {
            last = self.phase(name).or(last);
            if last.as_deref() == Some(phase) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "sandbox {name} did not reach {phase} within {timeout:?} (last: {last:?})\ngateway log:\n{}",
                self.proc.log_tail(30)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM and wait (up to 60 s) for a clean exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.proc.signal(Signal::SIGTERM);
        self.proc
            .wait_exit(Duration::from_secs(60))
            .unwrap_or_else(|| {
                panic!(
                    "gateway did not stop on SIGTERM:\n{}",
                    self.proc.log_tail(30)
                )
            })
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        self.proc.signal(Signal::SIGKILL);
        self.proc.wait_exit(Duration::from_secs(10));
    }

    /// Starts the same gateway again (same flags, same state), appending to
    /// the same log.
    pub fn restart(self) -> Result<Self, String> {
        let Self {
            proc,
            socket,
            args,
            log,
        } = self;
        drop(proc);
        Self::launch(socket, args, log)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Whether Podman can run containers here; the error says why not. Builds
/// the test image when it is missing.
pub fn podman_ready() -> Result<(), String> {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    READY
        .get_or_init(|| {
            let version = Command::new("podman").arg("--version").output();
            match version {
                Ok(out) if out.status.success() => {}
                Ok(out) => {
                    return Err(format!(
                        "podman --version failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
                Err(e) => return Err(format!("podman is not installed ({e})")),
            }
            let script = repo_root().join("scripts/podman-test-image.sh");
            let out = Command::new("bash")
                .arg(&script)
                .output()
                .map_err(|e| format!("could not run {}: {e}", script.display()))?;
            if !out.status.success() {
                return Err(format!(
                    "building the test image failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Ok(())
        })
        .clone()
}

/// Skips the calling test (returns from it) with a printed reason when
/// Podman cannot run here.
#[macro_export]
macro_rules! require_podman {
    () => {
        if let Err(reason) = $crate::podman_ready() {
            eprintln!("skipped: {reason}");
            return;
        }
    };
}

/// An `openshell-driver-podman` started by the test as an operator would:
/// standalone, on its own socket, attachable by any same-uid process.
pub fn start_external_podman(env: &TestEnv, name: &str) -> (Proc, PathBuf) {
    let socket = env.path().join(format!("{name}.sock"));
    let mut command = Command::new(bin::podman_driver());
    command
        .arg("--bind-socket")
        .arg(&socket)
        .arg("--allow-same-uid-peer")
        .arg("--name")
        .arg(name)
        .arg("--start-podman-service=true")
        .arg("--default-image")
        .arg(TEST_IMAGE)
        // Test commands run as PID 1 and ignore SIGTERM; don't wait 10 s.
        .arg("--stop-timeout")
        .arg("2")
        .env("RUST_LOG", "info");
    let mut proc = Proc::spawn(name, command, env.path().join(format!("{name}.log")));
    wait_for_socket(&mut proc, &socket, name);
    (proc, socket)
}

/// Waits (up to 60 s) until `proc` has bound `socket`; panics with its log
/// when it exits first or takes too long.
pub fn wait_for_socket(proc: &mut Proc, socket: &Path, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !socket.exists() {
        if let Some(status) = proc.try_exit() {
            panic!(
                "{name} exited during startup ({status}):\n{}",
                proc.log_tail(30)
            );
        }
        assert!(
            Instant::now() < deadline,
            "{name} did not bind {}:\n{}",
            socket.display(),
            proc.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts a standalone `openshell-test-driver` on `socket` that any process
/// of this user may use, and waits until it serves.
pub fn start_test_driver(env: &TestEnv, socket: &Path, extra_args: &[&str]) -> Proc {
    let mut command = Command::new(bin::test_driver());
    command
        .arg("--bind-socket")
        .arg(socket)
        .arg("--allow-same-uid-peer")
        .args(extra_args);
    let mut proc = Proc::spawn(
        "openshell-test-driver",
        command,
        env.path().join("test-driver.log"),
    );
    wait_for_socket(&mut proc, socket, "openshell-test-driver");
    proc
}

/// Reads lines of a log file that contain `needle`.
pub fn log_lines_with(path: &Path, needle: &str) -> Vec<String> {
    File::open(path)
        .map(|f| {
            BufReader::new(f)
                .lines()
                .map_while(Result::ok)
                .filter(|l| l.contains(needle))
                .collect()
        })
        .unwrap_or_default()
}

/// A Python interpreter with `grpcio` and `grpcio-tools`, for the foreign
/// peers of the `foreign` bucket: `$OPENSHELL_PYTHON`, else the virtual
/// environment `scripts/python-env.sh` makes under `target/python`. The
/// error says why none is usable.
pub fn grpc_python() -> Result<PathBuf, String> {
    let candidate = std::env::var_os("OPENSHELL_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/python/bin/python3"));
    if !candidate.exists() {
        return Err(format!(
            "no Python with grpcio at {} (run scripts/python-env.sh, or set OPENSHELL_PYTHON)",
            candidate.display()
        ));
    }
    let probe = Command::new(&candidate)
        .args(["-c", "import grpc, grpc_tools; print(grpc.__version__)"])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", candidate.display()))?;
    if !probe.status.success() {
        return Err(format!(
            "{} cannot import grpc and grpc_tools: {}",
            candidate.display(),
            String::from_utf8_lossy(&probe.stderr).trim()
        ));
    }
    Ok(candidate)
}

/// Starts the Python grpcio compute driver (`e2e/python/grpcio_driver.py`)
/// on `socket` and waits until the socket exists.
pub fn start_python_driver(env: &TestEnv, python: &Path, socket: &Path, name: &str) -> Proc {
    let mut command = Command::new(python);
    command
        .arg(repo_root().join("e2e/python/grpcio_driver.py"))
        .arg("--socket")
        .arg(socket)
        .arg("--proto-dir")
        .arg(repo_root().join("proto"))
        .arg("--name")
        .arg(name);
    let mut proc = Proc::spawn(
        "grpcio_driver.py",
        command,
        env.path().join(format!("{name}.log")),
    );
    wait_for_socket(&mut proc, socket, "grpcio_driver.py");
    proc
}

/// A real registry for the Podman pull tests: Debian's `docker-registry`
/// (the CNCF distribution server) serving plain HTTP on a free 127.0.0.1
/// port, storing under the environment's directory. Never the system
/// service; stopped with the environment.
#[derive(Debug)]
pub struct PodmanTestRegistry {
    pub proc: Proc,
    /// `127.0.0.1:PORT`, as image references and `insecure_registries`
    /// name it.
    pub host: String,
    /// `USER:PASSWORD` where the registry wants them.
    pub creds: Option<String>,
}

/// A 127.0.0.1 TCP port nothing listens on at the time of asking.
pub fn podman_free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

/// Starts a [`PodmanTestRegistry`], or says why this machine cannot
/// (no `docker-registry`: `apt-get install docker-registry`).
pub fn start_podman_test_registry(env: &TestEnv) -> Result<PodmanTestRegistry, String> {
    start_registry(env, None)
}

/// Starts a [`PodmanTestRegistry`] that answers only requests with
/// `user`'s `password` (htpasswd, bcrypt); pushes to it use them.
pub fn start_podman_test_registry_with_auth(
    env: &TestEnv,
    user: &str,
    password: &str,
) -> Result<PodmanTestRegistry, String> {
    let hash = bcrypt::hash(password, 4).map_err(|e| format!("bcrypt: {e}"))?;
    let htpasswd = env.write("registry.htpasswd", &format!("{user}:{hash}\n"));
    let mut registry = start_registry(env, Some(&htpasswd))?;
    registry.creds = Some(format!("{user}:{password}"));
    Ok(registry)
}

fn start_registry(env: &TestEnv, htpasswd: Option<&Path>) -> Result<PodmanTestRegistry, String> {
    let binary = Path::new("/usr/bin/docker-registry");
    if !binary.exists() {
        return Err(
            "no /usr/bin/docker-registry; install it (apt-get install docker-registry) \
                    to run the registry tests"
                .to_owned(),
        );
    }
    let host = format!("127.0.0.1:{}", podman_free_tcp_port());
    let auth = htpasswd.map_or_else(String::new, |path| {
        format!(
            "auth:\n  htpasswd:\n    realm: openshell-test\n    path: {}\n",
            path.display()
        )
    });
    let config = env.write(
        "registry.yml",
        &format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {host}\n{auth}",
            env.path().join("registry-data").display()
        ),
    );
    let mut command = Command::new(binary);
    command.arg("serve").arg(&config);
    let mut proc = Proc::spawn("docker-registry", command, env.path().join("registry.log"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&host).is_err() {
        if let Some(status) = proc.try_exit() {
            return Err(format!(
                "docker-registry exited early ({status}):\n{}",
                proc.log_tail(20)
            ));
        }
        if Instant::now() >= deadline {
            return Err("docker-registry did not listen within 30 s".to_owned());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(PodmanTestRegistry {
        proc,
        host,
        creds: None,
    })
}

impl PodmanTestRegistry {
    /// `HOST/openshell/NAME:TAG` in this registry.
    pub fn reference(&self, name: &str, tag: &str) -> String {
        format!("{}/openshell/{name}:{tag}", self.host)
    }

    /// Pushes [`TEST_IMAGE`] as `reference`, then removes any local image
    /// by that reference, so creating a sandbox from it means pulling.
    pub fn push_test_image(&self, reference: &str) {
        let mut push = Command::new("podman");
        push.args(["push", "--tls-verify=false"]);
        if let Some(creds) = &self.creds {
            push.arg("--creds").arg(creds);
        }
        let out = push
            .args([TEST_IMAGE, reference])
            .output()
            .expect("run podman push");
        assert!(
            out.status.success(),
            "podman push {reference} failed: {}\nregistry log:\n{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            self.proc.log_tail(20)
        );
        remove_podman_image(reference);
    }
}

/// Removes local image `reference` (untags it where it has other names);
/// nothing when it is absent.
pub fn remove_podman_image(reference: &str) {
    let out = Command::new("podman")
        .args(["rmi", "--ignore", reference])
        .output()
        .expect("run podman rmi");
    assert!(
        out.status.success(),
        "podman rmi {reference} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Packs the directory `rootfs` as a one-layer OCI image (umoci, in an OCI
/// layout under the environment's directory, with `cmd` as its default
/// command and `/root` as its working directory) and copies it to `reference` in a plain-HTTP test registry
/// (skopeo). `Err(reason)` when umoci or skopeo is not installed
/// (`apt-get install umoci skopeo`).
pub fn push_rootfs_image(
    env: &TestEnv,
    rootfs: &Path,
    cmd: &str,
    reference: &str,
) -> Result<(), String> {
    for tool in ["umoci", "skopeo"] {
        if Command::new(tool).arg("--version").output().is_err() {
            return Err(format!(
                "{tool} is not installed (apt-get install {tool}) to build and push test images"
            ));
        }
    }
    let layout = env.path().join("oci-layout");
    let bundle = env.path().join("oci-bundle");
    let image = format!("{}:v1", layout.display());
    let run = |program: &str, args: &[&std::ffi::OsStr]| {
        let out = Command::new(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    };
    let os = |s: &str| std::ffi::OsString::from(s);
    run("umoci", &[&os("init"), &os("--layout"), layout.as_os_str()]);
    run("umoci", &[&os("new"), &os("--image"), &os(&image)]);
    run(
        "umoci",
        &[
            &os("unpack"),
            &os("--rootless"),
            &os("--image"),
            &os(&image),
            bundle.as_os_str(),
        ],
    );
    let mut source = rootfs.as_os_str().to_owned();
    source.push("/.");
    run(
        "cp",
        &[&os("-a"), &source, bundle.join("rootfs").as_os_str()],
    );
    run(
        "umoci",
        &[
            &os("repack"),
            &os("--image"),
            &os(&image),
            bundle.as_os_str(),
        ],
    );
    run(
        "umoci",
        &[
            &os("config"),
            &os("--image"),
            &os(&image),
            &os("--config.cmd"),
            &os(cmd),
            &os("--config.workingdir"),
            &os("/root"),
        ],
    );
    run(
        "skopeo",
        &[
            &os("copy"),
            &os("--quiet"),
            &os("--dest-tls-verify=false"),
            &os(&format!("oci:{image}")),
            &os(&format!("docker://{reference}")),
        ],
    );
    Ok(())
}
