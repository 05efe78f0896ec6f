//! Starting one driver process and waiting until it serves its socket.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::Write as _;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::net::unix::pipe;
use tokio::process::Child;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::error_chain;
use crate::error::{LifecycleError, Result, StderrTail};

/// Environment variable carrying the number of the inherited ready fd.
pub const READY_FD_ENV: &str = "OPENSHELL_DRIVER_READY_FD";
/// Environment variable carrying the pid of the process that spawned the
/// driver; the driver exits when that process is gone.
pub const PARENT_PID_ENV: &str = "OPENSHELL_DRIVER_PARENT_PID";
/// First word of the line a driver writes to its ready fd.
pub const READY_LINE_PREFIX: &str = "openshell-driver-ready";
/// Version of the ready-line format.
pub const READY_PROTOCOL_VERSION: &str = "v1";

/// Variables copied from the spawner's environment when set. Everything else
/// is dropped: a driver must not see the gateway's credentials or settings by
/// accident.
pub const DEFAULT_ENV_ALLOWLIST: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "NO_COLOR",
    "RUST_LOG",
    "RUST_BACKTRACE",
    "XDG_RUNTIME_DIR",
    "XDG_STATE_HOME",
    "XDG_DATA_HOME",
    "XDG_CONFIG_HOME",
    "XDG_CACHE_HOME",
];

/// The program to run and what it gets.
#[derive(Debug, Clone)]
pub struct DriverCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Variables set explicitly (after the allowlisted ones, so they win).
    pub env: Vec<(OsString, OsString)>,
    /// Names copied from this process's environment when present.
    pub env_allowlist: Vec<String>,
    /// Append `--bind-socket <socket> --expected-peer-pid <our pid>` and set
    /// [`PARENT_PID_ENV`]. Off for children that are not compute drivers (a
    /// container engine's API service, say).
    pub lifecycle_flags: bool,
    /// Arm `PR_SET_PDEATHSIG(SIGKILL)` in the child. Only for children that
    /// cannot watch their parent themselves: it forces the slower fork+exec
    /// path instead of `posix_spawn`.
    pub kill_with_parent: bool,
}

impl DriverCommand {
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            env_allowlist: DEFAULT_ENV_ALLOWLIST
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            lifecycle_flags: true,
            kill_with_parent: false,
        }
    }

    #[must_use]
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    #[must_use]
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    #[must_use]
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
}

/// How the spawner learns that the driver serves its socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Only the line on the inherited ready fd counts.
    ReadyFd,
    /// Dial the socket with backoff from 1 ms, then confirm with
    /// `GetCapabilities`.
    PollGrpc,
    /// Dial the socket with backoff until it accepts a connection; for
    /// children that do not speak gRPC.
    PollConnect,
    /// The ready fd, with [`Readiness::PollGrpc`] as a fallback for drivers
    /// that ignore it. Whichever answers first wins.
    Auto,
}

impl Readiness {
    fn uses_fd(self) -> bool {
        matches!(self, Self::ReadyFd | Self::Auto)
    }

    fn polls(self) -> bool {
        !matches!(self, Self::ReadyFd)
    }
}

/// When and how often a managed driver that died is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Consecutive failed restarts before giving up; 0 disables respawning.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// A driver that stayed up this long is considered healthy again and its
    /// attempt counter starts over.
    pub stable_after: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            stable_after: Duration::from_secs(60),
        }
    }
}

impl RestartPolicy {
    /// Backoff before attempt `attempt` (1-based): doubling, capped.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 2_u32.saturating_pow(attempt.saturating_sub(1));
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

/// Knobs for spawning, supervising and stopping a managed driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpawnOptions {
    pub readiness: Readiness,
    /// How long a driver may take to become ready.
    pub ready_timeout: Duration,
    pub restart: RestartPolicy,
    /// Time between SIGTERM and SIGKILL on shutdown.
    pub shutdown_grace: Duration,
    /// How long to wait for the group to vanish after SIGKILL.
    pub reap_timeout: Duration,
    /// Lines of stderr kept for error reports.
    pub stderr_tail_lines: usize,
    /// Copy the driver's stdout and stderr to ours, each line prefixed with
    /// the driver name.
    pub forward_output: bool,
}

impl Default for SpawnOptions {
    fn default() -> Self {
        Self {
            readiness: Readiness::Auto,
            ready_timeout: Duration::from_secs(10),
            restart: RestartPolicy::default(),
            shutdown_grace: Duration::from_secs(5),
            reap_timeout: Duration::from_secs(2),
            stderr_tail_lines: 20,
            forward_output: true,
        }
    }
}

/// Serializes spawns in this process. While a ready fd is being handed to a
/// child it exists as an inheritable descriptor, and any other child spawned
/// at that moment would inherit it too. Code in the same process that spawns
/// children by other means should hold this lock while doing so.
///
/// Every spawn made here first sets close-on-exec on all descriptors of this
/// process from 3 upward (descriptors it inherited without the flag
/// included), so a driver receives stdio and its ready fd and nothing else.
pub fn spawn_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The last lines of a child's stderr.
#[derive(Debug, Clone)]
pub(crate) struct OutputTail {
    lines: Arc<Mutex<VecDeque<String>>>,
    capacity: usize,
}

impl OutputTail {
    fn new(capacity: usize) -> Self {
        Self {
            lines: Arc::new(Mutex::new(VecDeque::with_capacity(capacity))),
            capacity,
        }
    }

    fn push(&self, line: String) {
        if self.capacity == 0 {
            return;
        }
        let mut lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        if lines.len() == self.capacity {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    pub(crate) fn snapshot(&self) -> StderrTail {
        let lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        StderrTail(lines.iter().cloned().collect())
    }
}

/// Longest line kept or forwarded; the rest of a longer line is dropped.
const MAX_LINE: usize = 4096;

fn pump_output<R>(
    reader: R,
    name: String,
    stream: &'static str,
    tail: Option<OutputTail>,
    forward: bool,
) -> JoinHandle<()>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut reader = BufReader::new(reader);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let end = buf.len().min(MAX_LINE);
            let line = String::from_utf8_lossy(&buf[..end]);
            let line = line.trim_end_matches(['\n', '\r']);
            if forward {
                let mut err = std::io::stderr().lock();
                let _ = writeln!(err, "[{name} {stream}] {line}");
            }
            if let Some(tail) = &tail {
                tail.push(line.to_owned());
            }
        }
    })
}

/// A driver process that answered its readiness check.
#[derive(Debug)]
pub(crate) struct Running {
    pub(crate) child: Child,
    pub(crate) pid: u32,
    pub(crate) tail: OutputTail,
    pub(crate) stderr_pump: JoinHandle<()>,
}

impl Running {
    /// Process group id; equal to the pid because the child leads its group.
    pub(crate) fn pgid(&self) -> i32 {
        i32::try_from(self.pid).unwrap_or(i32::MAX)
    }

    /// Waits briefly for the stderr pump to drain, so error reports carry the
    /// child's last words. Grandchildren may keep the pipe open; the wait is
    /// bounded.
    pub(crate) async fn drain_stderr(&mut self) -> StderrTail {
        let _ = tokio::time::timeout(Duration::from_millis(500), &mut self.stderr_pump).await;
        self.tail.snapshot()
    }
}

/// Sends `signal` to the whole process group `pgid`; a group that is already
/// gone is not an error.
pub(crate) fn signal_group(pgid: i32, signal: nix::sys::signal::Signal) {
    if pgid <= 1 {
        return;
    }
    match nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(errno) => {
            tracing::warn!(pgid, %signal, error = %errno, "could not signal driver process group");
        }
    }
}

/// Spawns the driver and waits until it is ready. On any failure the process
/// group is killed and reaped before the error is returned. `on_spawn`
/// receives the pid as soon as the process exists, so a caller can kill the
/// group even if this future is dropped half way.
pub(crate) async fn start(
    name: &str,
    socket: &Path,
    command: &DriverCommand,
    options: &SpawnOptions,
    on_spawn: &(dyn Fn(u32) + Send + Sync),
) -> Result<Running> {
    let (mut running, ready_rx) = spawn_process(name, socket, command, options)?;
    on_spawn(running.pid);
    match wait_ready(name, socket, &mut running, ready_rx, options).await {
        Ok(()) => Ok(running),
        Err(failure) => {
            signal_group(running.pgid(), nix::sys::signal::Signal::SIGKILL);
            let status = tokio::time::timeout(options.reap_timeout, running.child.wait()).await;
            let stderr = running.drain_stderr().await;
            Err(match failure {
                ReadyFailure::Exited(status) => LifecycleError::ExitedBeforeReady {
                    name: name.to_owned(),
                    status,
                    stderr,
                },
                ReadyFailure::Timeout(last_error) => {
                    // A child that died at the very end counts as an exit.
                    if let Ok(Ok(status)) = status
                        && status.code().is_some()
                    {
                        LifecycleError::ExitedBeforeReady {
                            name: name.to_owned(),
                            status,
                            stderr,
                        }
                    } else {
                        LifecycleError::ReadyTimeout {
                            name: name.to_owned(),
                            socket: socket.to_owned(),
                            timeout: options.ready_timeout,
                            last_error,
                            stderr,
                        }
                    }
                }
                ReadyFailure::Error(error) => error,
            })
        }
    }
}

fn spawn_process(
    name: &str,
    socket: &Path,
    command: &DriverCommand,
    options: &SpawnOptions,
) -> Result<(Running, Option<pipe::Receiver>)> {
    let mut cmd = std::process::Command::new(&command.program);
    cmd.args(&command.args);
    if command.lifecycle_flags {
        cmd.arg("--bind-socket")
            .arg(socket)
            .arg("--expected-peer-pid")
            .arg(std::process::id().to_string());
    }
    cmd.env_clear();
    for key in &command.env_allowlist {
        if let Some(value) = std::env::var_os(key) {
            cmd.env(key, value);
        }
    }
    if command.lifecycle_flags {
        cmd.env(PARENT_PID_ENV, std::process::id().to_string());
    }
    cmd.envs(command.env.iter().map(|(k, v)| (k, v)));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // A group of its own: teardown signals the driver and everything it
    // started, and a terminal's Ctrl-C reaches only the gateway, which then
    // stops drivers in order. std maps this to POSIX_SPAWN_SETPGROUP, so
    // the posix_spawn fast path is kept.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    if command.kill_with_parent {
        crate::sys::kill_with_parent_on_exec(&mut cmd);
    }

    let spawn_error = |source| LifecycleError::Spawn {
        program: command.program.clone(),
        source,
    };

    let (child, ready_rx) = if options.readiness.uses_fd() {
        let (read_end, write_end) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| spawn_error(e.into()))?;
        let _guard = spawn_lock();
        crate::sys::mark_all_cloexec().map_err(spawn_error)?;
        let inheritable = crate::sys::dup_inheritable(write_end.as_fd()).map_err(spawn_error)?;
        cmd.env(
            READY_FD_ENV,
            std::os::fd::AsRawFd::as_raw_fd(&inheritable).to_string(),
        );
        let child = tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_error)?;
        // Our copies close here, so the pipe reports EOF once the child (and
        // anything it passed the fd to) has closed its end.
        drop(inheritable);
        drop(write_end);
        let receiver = pipe::Receiver::from_owned_fd(read_end).map_err(spawn_error)?;
        (child, Some(receiver))
    } else {
        let _guard = spawn_lock();
        crate::sys::mark_all_cloexec().map_err(spawn_error)?;
        let child = tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_error)?;
        (child, None)
    };
    let mut child = child;
    let pid = child.id().ok_or_else(|| {
        spawn_error(std::io::Error::other(
            "child exited before its pid was read",
        ))
    })?;

    let tail = OutputTail::new(options.stderr_tail_lines);
    if let Some(stdout) = child.stdout.take() {
        pump_output(
            stdout,
            name.to_owned(),
            "stdout",
            None,
            options.forward_output,
        );
    }
    let stderr_pump = match child.stderr.take() {
        Some(stderr) => pump_output(
            stderr,
            name.to_owned(),
            "stderr",
            Some(tail.clone()),
            options.forward_output,
        ),
        None => tokio::spawn(async {}),
    };
    tracing::debug!(driver = name, pid, program = %command.program.display(), "driver process spawned");
    Ok((
        Running {
            child,
            pid,
            tail,
            stderr_pump,
        },
        ready_rx,
    ))
}

enum ReadyFailure {
    Exited(ExitStatus),
    Timeout(Option<String>),
    Error(LifecycleError),
}

/// What the ready fd said.
enum FdOutcome {
    Ready,
    /// The fd closed without a line.
    Closed,
    Bad(String),
}

async fn read_ready_line(receiver: pipe::Receiver) -> FdOutcome {
    let mut reader = BufReader::new(receiver);
    let mut line = String::new();
    match reader.read_line(&mut line).await {
        Ok(0) | Err(_) => FdOutcome::Closed,
        Ok(_) => {
            let mut words = line.split_ascii_whitespace();
            if words.next() == Some(READY_LINE_PREFIX)
                && words.next() == Some(READY_PROTOCOL_VERSION)
            {
                FdOutcome::Ready
            } else {
                FdOutcome::Bad(line.trim_end().to_owned())
            }
        }
    }
}

/// Dials the socket with backoff from 1 ms until it answers (and, for gRPC,
/// until `GetCapabilities` succeeds). Returns `Err` only for a definite
/// answer that is not a driver; connection failures are retried. The
/// caller bounds the whole loop by the readiness deadline; every attempt is
/// also bounded by it.
async fn poll_socket(
    name: &str,
    socket: &Path,
    grpc: bool,
    deadline: Instant,
    last_error: &Mutex<Option<String>>,
) -> std::result::Result<(), LifecycleError> {
    let mut backoff = Duration::from_millis(1);
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return std::future::pending().await;
        }
        let attempt = tokio::time::timeout(remaining, probe(socket, grpc)).await;
        match attempt {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(ProbeError::NotADriver(status))) => {
                return Err(LifecycleError::NotConfirmed {
                    name: name.to_owned(),
                    socket: socket.to_owned(),
                    status: Box::new(status),
                });
            }
            Ok(Err(ProbeError::Unreachable(text))) => {
                *last_error.lock().unwrap_or_else(PoisonError::into_inner) = Some(text);
            }
            Err(_) => {}
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(backoff.min(remaining)).await;
        backoff = (backoff * 2).min(Duration::from_millis(100));
    }
}

enum ProbeError {
    Unreachable(String),
    NotADriver(tonic::Status),
}

async fn probe(socket: &Path, grpc: bool) -> std::result::Result<(), ProbeError> {
    if !grpc {
        return tokio::net::UnixStream::connect(socket)
            .await
            .map(drop)
            .map_err(|e| ProbeError::Unreachable(e.to_string()));
    }
    let endpoint = crate::DriverEndpoint::new("probe", socket);
    let channel = crate::endpoint::connect_with(&endpoint, crate::DialPolicy::ONCE)
        .await
        .map_err(|e| ProbeError::Unreachable(error_chain(&e)))?;
    let mut client =
        openshell_proto::compute::v1::compute_driver_client::ComputeDriverClient::new(channel);
    match client
        .get_capabilities(openshell_proto::compute::v1::GetCapabilitiesRequest::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(status)
            if status.code() == tonic::Code::Unavailable
                || status.code() == tonic::Code::Unknown =>
        {
            Err(ProbeError::Unreachable(status.to_string()))
        }
        Err(status) => Err(ProbeError::NotADriver(status)),
    }
}

async fn wait_ready(
    name: &str,
    socket: &Path,
    running: &mut Running,
    ready_rx: Option<pipe::Receiver>,
    options: &SpawnOptions,
) -> std::result::Result<(), ReadyFailure> {
    let deadline = Instant::now() + options.ready_timeout;
    let last_error = Mutex::new(None);

    let fd_wait = async {
        match ready_rx {
            Some(rx) => read_ready_line(rx).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(fd_wait);
    let mut fd_open = options.readiness.uses_fd();

    let poll = poll_socket(
        name,
        socket,
        options.readiness != Readiness::PollConnect,
        deadline,
        &last_error,
    );
    let poll = async {
        if options.readiness.polls() {
            poll.await
        } else {
            std::future::pending().await
        }
    };
    tokio::pin!(poll);

    loop {
        tokio::select! {
            status = running.child.wait() => {
                return Err(match status {
                    Ok(status) => ReadyFailure::Exited(status),
                    Err(e) => ReadyFailure::Error(LifecycleError::io("wait for driver", socket, e)),
                });
            }
            outcome = &mut fd_wait, if fd_open => match outcome {
                FdOutcome::Ready => return Ok(()),
                FdOutcome::Bad(line) => {
                    return Err(ReadyFailure::Error(LifecycleError::BadReadyLine { name: name.to_owned(), line }));
                }
                // Closed without a line: the child is dying or does not use
                // the fd. Keep waiting for its exit, the poll, or the deadline.
                FdOutcome::Closed => fd_open = false,
            },
            result = &mut poll => return result.map_err(ReadyFailure::Error),
            () = tokio::time::sleep_until(deadline) => {
                let last = last_error.lock().unwrap_or_else(PoisonError::into_inner).take();
                return Err(ReadyFailure::Timeout(last));
            }
        }
    }
}
