//! Starting VMM children and watching them.
//!
//! Children are spawned by one long-lived thread: the parent-death signal
//! each VMM arms fires when the *thread* that spawned it exits, so spawning
//! from a tokio blocking-pool thread (which exits when idle) would kill
//! running VMs at random. The spawn keeps std's `posix_spawn` path (a
//! process group of its own, no `pre_exec`), under
//! `driver_lifecycle::spawn_lock`.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;

use tokio::net::unix::pipe;
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::launch::monotonic_us;

/// Variables a VMM child may see from the driver's environment.
const VMM_ENV_ALLOWLIST: &[&str] = &["LD_LIBRARY_PATH", "PATH", "TMPDIR"];

struct Job {
    program: PathBuf,
    launch_file: PathBuf,
    reply: oneshot::Sender<std::io::Result<(Child, u64)>>,
}

/// The spawning thread. Dropping the last handle ends the thread, which
/// kills every VMM it started: keep it alive until they are stopped.
#[derive(Clone)]
pub struct Launcher {
    jobs: mpsc::Sender<Job>,
}

impl Launcher {
    pub fn start() -> Result<Self> {
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("vmm-launcher".into())
            .spawn(move || {
                for job in rx {
                    let result = spawn(&job.program, &job.launch_file);
                    let _ = job.reply.send(result);
                }
            })
            .map_err(|e| Error::io("start the VMM launcher thread", "vmm-launcher", e))?;
        Ok(Self { jobs })
    }

    /// Starts `program vmm <launch_file>`.
    pub async fn launch(&self, program: &Path, launch_file: &Path) -> Result<Vmm> {
        let (reply, answer) = oneshot::channel();
        let spawn_error = |source| Error::Spawn {
            program: program.to_owned(),
            source,
        };
        self.jobs
            .send(Job {
                program: program.to_owned(),
                launch_file: launch_file.to_owned(),
                reply,
            })
            .map_err(|_| spawn_error(std::io::Error::other("the launcher thread is gone")))?;
        let (mut child, spawned_at_us) = answer
            .await
            .map_err(|_| spawn_error(std::io::Error::other("the launcher thread is gone")))?
            .map_err(spawn_error)?;
        let pid = child.id();
        let take = |fd: Option<std::os::fd::OwnedFd>, what: &str| {
            fd.ok_or_else(|| spawn_error(std::io::Error::other(format!("no {what} pipe"))))
                .and_then(|fd| pipe::Receiver::from_owned_fd(fd).map_err(spawn_error))
        };
        let console = take(child.stdout.take().map(Into::into), "console");
        let log = take(child.stderr.take().map(Into::into), "log");
        let exited = driver_lifecycle::pidfd::exit_watch(pid).map_err(spawn_error);
        match (console, log, exited) {
            (Ok(console), Ok(log), Ok(exited)) => Ok(Vmm {
                child,
                pid,
                spawned_at_us,
                console: Some(console),
                log: Some(log),
                exited,
            }),
            (console, log, exited) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(console
                    .err()
                    .or(log.err())
                    .or(exited.err())
                    .unwrap_or_else(|| spawn_error(std::io::Error::other("VMM setup failed"))))
            }
        }
    }
}

fn spawn(program: &Path, launch_file: &Path) -> std::io::Result<(Child, u64)> {
    let mut command = std::process::Command::new(program);
    command
        .arg("vmm")
        .arg(launch_file)
        .env_clear()
        .env(crate::vmm::PARENT_PID_ENV, std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group: a stop signals the VMM and nothing else, and a
        // terminal's Ctrl-C does not reach it. Maps to POSIX_SPAWN_SETPGROUP.
        .process_group(0);
    for key in VMM_ENV_ALLOWLIST {
        if let Some(value) = std::env::var_os(key) {
            command.env(key, value);
        }
    }
    let _guard = driver_lifecycle::spawn_lock();
    let spawned_at_us = monotonic_us();
    let child = command.spawn()?;
    Ok((child, spawned_at_us))
}

/// A running VMM child. Its pid stays valid (unreaped) until
/// [`Vmm::wait`] returns, so signalling it by pid is safe until then.
pub struct Vmm {
    child: Child,
    pub pid: u32,
    /// `CLOCK_MONOTONIC` µs right before the spawn.
    pub spawned_at_us: u64,
    pub console: Option<pipe::Receiver>,
    pub log: Option<pipe::Receiver>,
    exited: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl Vmm {
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let Ok(pid) = i32::try_from(self.pid) else {
            return;
        };
        // The VMM leads its own group; libkrun starts threads, not
        // processes, but the group signal also reaches anything it forks.
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), signal);
    }

    /// Waits for the exit and reaps the child.
    pub async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        let _ready = self.exited.readable().await?;
        self.child.wait()
    }
}
