//! The driver's core: the registry of sandboxes, their lifecycle, and the
//! supervision of one VMM child per running sandbox.
//!
//! Every state change goes through the registry lock and is published on a
//! broadcast channel while the lock is held, so a watcher that subscribes
//! and snapshots under the same lock sees every change exactly once.
//! Lifecycle operations on one sandbox (create, stop, start, delete) are
//! serialised by a per-sandbox async lock; each boot runs in its own task,
//! identified by a generation number so a late result of an old boot never
//! overwrites a newer state.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use openshell_proto::compute::v1::{
    DriverPlatformEvent, DriverSandbox, WatchSandboxesDeletedEvent, WatchSandboxesEvent,
    WatchSandboxesPlatformEvent, WatchSandboxesSandboxEvent, watch_sandboxes_event,
};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt as _;
use tokio::io::AsyncReadExt as _;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, NetworkMode};
use crate::console::ConsoleLog;
use crate::error::{Error, Result};
use crate::ids::SandboxId;
use crate::image::{self, ImageCache, ResolvedImage};
use crate::launch::{
    KernelSpec, LAUNCH_VERSION, LaunchConfig, ROOT_TAG, StatusLine, VmmExit, guest_code_meaning,
};
use crate::launcher::{Launcher, Vmm};
use crate::layer::{self, LayerKind};
use crate::preflight::{HostPaths, HostReport, Kernel};
use crate::spec;
use crate::state::{self, SandboxDir, StateDir};
use crate::status::Phase;

/// Lines of console and VMM log quoted in a BootFailed message.
const TAIL_LINES: usize = 20;
/// Events a slow watcher may fall behind before it is resynchronised.
const EVENT_BUFFER: usize = 1024;

/// What is kept next to the request: the image pinned at create time and
/// the kind of writable layer, once made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxMeta {
    pub image: ResolvedImage,
    pub layer: Option<LayerKind>,
    pub workspace: String,
    pub created_ms: i64,
}

struct Run {
    generation: u64,
    stop: CancellationToken,
    done: watch::Receiver<bool>,
}

impl Run {
    /// Stops the boot and waits until its VMM is reaped and its layer
    /// unmounted.
    async fn finish(mut self) {
        self.stop.cancel();
        let _ = self.done.wait_for(|done| *done).await;
    }
}

struct Entry {
    id: SandboxId,
    name: String,
    workspace: String,
    phase: Phase,
    since_ms: i64,
    deleting: bool,
    op: Arc<tokio::sync::Mutex<()>>,
    run: Option<Run>,
    console: Arc<ConsoleLog>,
}

impl Entry {
    fn snapshot(&self) -> DriverSandbox {
        DriverSandbox {
            id: self.id.as_str().to_owned(),
            name: self.name.clone(),
            namespace: String::new(),
            spec: None,
            status: Some(crate::status::status(
                &self.name,
                &self.phase,
                self.deleting,
                self.since_ms,
            )),
            workspace: self.workspace.clone(),
        }
    }
}

struct Registry {
    entries: BTreeMap<String, Entry>,
    /// Ids being created, reserved so two creates cannot race.
    creating: HashSet<String>,
    events: broadcast::Sender<WatchSandboxesEvent>,
    next_generation: u64,
}

impl Registry {
    fn publish_sandbox(&self, entry: &Entry) {
        let _ = self.events.send(sandbox_event(entry.snapshot()));
    }
}

struct Inner {
    config: Config,
    state: StateDir,
    cache: ImageCache,
    host: HostPaths,
    program: PathBuf,
    launcher: Launcher,
    registry: Mutex<Registry>,
}

/// The VM driver. Cheap to clone.
#[derive(Clone)]
pub struct Driver {
    inner: Arc<Inner>,
}

/// How a boot task ended.
enum Outcome {
    /// Stopped on request (stop, delete, driver shutdown): whoever asked
    /// sets the phase.
    Stopped,
    /// Ended on its own in this phase.
    Ended(Phase),
}

/// Start of a watch stream: the current sandboxes and a receiver for what
/// happens next, taken under one lock.
pub struct WatchStart {
    pub snapshots: Vec<DriverSandbox>,
    pub events: broadcast::Receiver<WatchSandboxesEvent>,
}

fn platform_event(
    id: &str,
    kind: &str,
    reason: &str,
    message: String,
    metadata: HashMap<String, String>,
) -> WatchSandboxesEvent {
    WatchSandboxesEvent {
        payload: Some(watch_sandboxes_event::Payload::PlatformEvent(
            WatchSandboxesPlatformEvent {
                sandbox_id: id.to_owned(),
                event: Some(DriverPlatformEvent {
                    timestamp_ms: state::now_ms(),
                    source: "vm".to_owned(),
                    r#type: kind.to_owned(),
                    reason: reason.to_owned(),
                    message,
                    metadata,
                }),
            },
        )),
    }
}

impl Driver {
    /// Builds the driver: prepares the state directory and registers every
    /// sandbox found there. Call [`Driver::restore`] afterwards to boot the
    /// ones that were running.
    pub fn new(config: Config, host: HostPaths) -> Result<Self> {
        let state = StateDir::new(&config.state_dir);
        state.prepare()?;
        let program = std::env::current_exe()
            .map_err(|e| Error::io("find the driver's own executable", "/proc/self/exe", e))?;
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let driver = Self {
            inner: Arc::new(Inner {
                cache: ImageCache::new(state.images_dir()),
                state,
                host,
                program,
                launcher: Launcher::start()?,
                registry: Mutex::new(Registry {
                    entries: BTreeMap::new(),
                    creating: HashSet::new(),
                    events,
                    next_generation: 1,
                }),
                config,
            }),
        };
        Ok(driver)
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.inner
            .registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn host_report(&self) -> HostReport {
        HostReport::check(&self.inner.host, self.inner.config.kernel.as_deref())
    }

    fn console_for(&self, dir: &SandboxDir) -> Arc<ConsoleLog> {
        Arc::new(ConsoleLog::new(
            dir.console_log(),
            dir.console_log_rotated(),
            self.inner.config.console_log_max_bytes,
        ))
    }

    /// Registers the sandboxes on disk. Stopped ones stay stopped, ones
    /// whose last boot ended on its own keep that status, and the others —
    /// running when the driver went away — are booted again (or marked
    /// HostUnsupported when this host cannot boot them now).
    pub fn restore(&self) -> Result<usize> {
        let (dirs, skipped) = self.inner.state.scan()?;
        for path in skipped {
            tracing::warn!(path = %path.display(), "ignoring an entry of the sandboxes directory that is not a sandbox");
        }
        let blocker = self
            .host_report()
            .blocker(self.inner.config.allow_unsupported_host);
        let mut relaunched = 0;
        for dir in dirs {
            let loaded = read_request(&dir).and_then(|request| {
                let meta: SandboxMeta =
                    state::read_json_if_exists(&dir.image())?.ok_or_else(|| {
                        Error::CorruptState {
                            path: dir.image(),
                            message: "missing".to_owned(),
                        }
                    })?;
                Ok((request, meta))
            });
            let (request, meta) = match loaded {
                Ok(loaded) => loaded,
                Err(error) => {
                    tracing::warn!(sandbox_id = %dir.id, error = %crate::error::chain(&error), "cannot restore sandbox; leaving its directory alone");
                    continue;
                }
            };
            // Mounts left behind by a driver that was killed.
            if let Err(error) = layer::deactivate(&dir) {
                tracing::warn!(sandbox_id = %dir.id, error = %crate::error::chain(&error), "cannot unmount a leftover writable layer");
            }
            let phase = if dir.is_stopped() {
                Phase::Stopped
            } else if let Some(tombstone) = dir.read_tombstone().unwrap_or(None) {
                Phase::from_tombstone(&tombstone)
            } else if let Some(blocker) = &blocker {
                Phase::HostUnsupported {
                    message: blocker.to_string(),
                }
            } else {
                Phase::Provisioning
            };
            let launch = phase == Phase::Provisioning;
            let mut registry = self.registry();
            let entry = Entry {
                id: dir.id.clone(),
                name: if request.name.is_empty() {
                    dir.id.as_str().to_owned()
                } else {
                    request.name.clone()
                },
                workspace: meta.workspace.clone(),
                phase,
                since_ms: state::now_ms(),
                deleting: false,
                op: Arc::default(),
                run: None,
                console: self.console_for(&dir),
            };
            tracing::info!(sandbox_id = %dir.id, phase = entry.phase.label(), "restored sandbox");
            registry.entries.insert(dir.id.as_str().to_owned(), entry);
            if launch {
                let _ = registry.events.send(platform_event(
                    dir.id.as_str(),
                    "Normal",
                    "Restoring",
                    "Booting the sandbox again after a driver restart".to_owned(),
                    HashMap::new(),
                ));
                self.start_run(&mut registry, &dir.id);
                relaunched += 1;
            }
        }
        Ok(relaunched)
    }

    /// Starts a boot task for `id` (which must be registered) and moves it
    /// to Provisioning.
    fn start_run(&self, registry: &mut Registry, id: &SandboxId) {
        let generation = registry.next_generation;
        registry.next_generation += 1;
        let stop = CancellationToken::new();
        let (done_tx, done) = watch::channel(false);
        let Some(entry) = registry.entries.get_mut(id.as_str()) else {
            return;
        };
        entry.run = Some(Run {
            generation,
            stop: stop.clone(),
            done,
        });
        entry.phase = Phase::Provisioning;
        entry.since_ms = state::now_ms();
        entry.console.begin_boot();
        if let Some(entry) = registry.entries.get(id.as_str()) {
            registry.publish_sandbox(entry);
        }
        let driver = self.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let dir = driver.inner.state.sandbox(&id);
            let outcome = driver.boot(&dir, generation, &stop).await;
            if let Some(console) = driver.console_of(&id) {
                console.end_boot();
            }
            let dir_for_unmount = dir.clone();
            match tokio::task::spawn_blocking(move || layer::deactivate(&dir_for_unmount)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::warn!(sandbox_id = %id, error = %crate::error::chain(&error), "cannot unmount the writable layer");
                }
                Err(error) => tracing::warn!(sandbox_id = %id, %error, "unmount task failed"),
            }
            if let Outcome::Ended(phase) = outcome {
                if let Some(tombstone) = phase.tombstone(state::now_ms())
                    && let Err(error) = dir.write_tombstone(&tombstone)
                {
                    tracing::warn!(sandbox_id = %id, error = %crate::error::chain(&error), "cannot record how the sandbox ended");
                }
                driver.finish_run(&id, generation, phase);
            }
            let _ = done_tx.send(true);
        });
    }

    fn console_of(&self, id: &SandboxId) -> Option<Arc<ConsoleLog>> {
        self.registry()
            .entries
            .get(id.as_str())
            .map(|e| e.console.clone())
    }

    /// Sets the phase if boot `generation` is still the sandbox's current
    /// one. Returns whether it was.
    fn set_phase(&self, id: &SandboxId, generation: u64, phase: Phase) -> bool {
        let mut registry = self.registry();
        let Some(entry) = registry.entries.get_mut(id.as_str()) else {
            return false;
        };
        if entry.run.as_ref().map(|r| r.generation) != Some(generation) {
            return false;
        }
        tracing::info!(sandbox_id = %id, from = entry.phase.label(), to = phase.label(), "sandbox phase changed");
        entry.phase = phase;
        entry.since_ms = state::now_ms();
        if let Some(entry) = registry.entries.get(id.as_str()) {
            registry.publish_sandbox(entry);
        }
        true
    }

    /// The boot ended on its own: record the phase and forget the run.
    fn finish_run(&self, id: &SandboxId, generation: u64, phase: Phase) {
        let (reason, kind, message) = match &phase {
            Phase::Exited { code, message } => (
                "Exited",
                if *code == Some(0) {
                    "Normal"
                } else {
                    "Warning"
                },
                message.clone(),
            ),
            Phase::BootFailed { message } => ("BootFailed", "Warning", message.clone()),
            Phase::ProvisioningFailed { message } => {
                ("ProvisioningFailed", "Warning", message.clone())
            }
            other => ("PhaseChanged", "Normal", other.label().to_owned()),
        };
        if self.set_phase(id, generation, phase) {
            let mut registry = self.registry();
            let _ = registry.events.send(platform_event(
                id.as_str(),
                kind,
                reason,
                message,
                HashMap::new(),
            ));
            if let Some(entry) = registry.entries.get_mut(id.as_str()) {
                entry.run = None;
            }
        }
    }

    fn event(
        &self,
        id: &SandboxId,
        kind: &str,
        reason: &str,
        message: String,
        metadata: HashMap<String, String>,
    ) {
        let registry = self.registry();
        let _ = registry
            .events
            .send(platform_event(id.as_str(), kind, reason, message, metadata));
    }

    /// One boot: provision, launch the VMM, supervise it.
    async fn boot(&self, dir: &SandboxDir, generation: u64, stop: &CancellationToken) -> Outcome {
        let prepared = tokio::select! {
            prepared = self.provision(dir) => prepared,
            () = stop.cancelled() => return Outcome::Stopped,
        };
        let launch_file = match prepared {
            Ok(file) => file,
            Err(error) => {
                tracing::warn!(sandbox_id = %dir.id, error = %crate::error::chain(&error), "provisioning failed");
                return Outcome::Ended(match error {
                    Error::HostUnsupported(message) => Phase::HostUnsupported { message },
                    other => Phase::ProvisioningFailed {
                        message: crate::error::chain(&other),
                    },
                });
            }
        };
        if stop.is_cancelled() {
            return Outcome::Stopped;
        }
        let vmm = match self
            .inner
            .launcher
            .launch(&self.inner.program, &launch_file)
            .await
        {
            Ok(vmm) => vmm,
            Err(error) => {
                return Outcome::Ended(Phase::BootFailed {
                    message: format!(
                        "the VMM could not be started: {}",
                        crate::error::chain(&error)
                    ),
                });
            }
        };
        let pid = vmm.pid;
        self.set_phase(&dir.id, generation, Phase::Booting { pid });
        self.supervise(dir, generation, vmm, stop).await
    }

    /// Image, writable layer, kernel and launch file. Returns the launch
    /// file's path.
    async fn provision(&self, dir: &SandboxDir) -> Result<PathBuf> {
        let request = read_request(dir)?;
        let mut meta: SandboxMeta =
            state::read_json_if_exists(&dir.image())?.ok_or_else(|| Error::CorruptState {
                path: dir.image(),
                message: "missing".to_owned(),
            })?;
        // Checked against today's settings, but with the image pinned at
        // create time standing in for a default image that may have changed.
        let mut config = self.inner.config.clone();
        config.default_image = Some(meta.image.source().to_owned());
        let request = spec::validate(Some(&request), &config)?;
        let report = self.host_report();
        if let Some(blocker) = report.blocker(self.inner.config.allow_unsupported_host) {
            return Err(blocker);
        }
        let kernel = report
            .kernel
            .map_err(|p| Error::HostUnsupported(p.to_string()))?;

        let cache = self.inner.cache.clone();
        let image = meta.image.clone();
        let lower = blocking(move || cache.ensure(&image)).await?;
        let (layer_dir, mode) = (dir.clone(), self.inner.config.writable_layer);
        let kind = meta.layer;
        let lower_for_layer = lower.clone();
        let kind = blocking(move || match kind {
            Some(kind) => layer::activate(&layer_dir, &lower_for_layer, kind).map(|()| kind),
            None => layer::create(&layer_dir, &lower_for_layer, mode),
        })
        .await?;
        if meta.layer != Some(kind) {
            meta.layer = Some(kind);
            state::write_json(&dir.image(), &meta)?;
        }

        let guest = spec::guest_command(&request, &meta.image.config(), request.token.is_some())?;
        let kernel = match kernel {
            Kernel::Elf(path) => KernelSpec::Elf {
                path,
                cmdline: kernel_cmdline(&self.inner.config.kernel_args),
            },
            Kernel::Libkrunfw(_) => KernelSpec::Libkrunfw,
        };
        let launch = LaunchConfig {
            version: LAUNCH_VERSION,
            sandbox_id: dir.id.as_str().to_owned(),
            rootfs: dir.rootfs(),
            kernel,
            vcpus: request.vcpus,
            mem_mib: request.mem_mib,
            exec: guest.exec,
            args: guest.args,
            env: guest.env,
            workdir: guest.workdir,
            krun_log_level: self.inner.config.krun_log_level,
            network: self.inner.config.network == NetworkMode::Tsi,
            sandbox_token: request.token,
        };
        launch.write(&dir.launch())?;
        Ok(dir.launch())
    }

    /// Follows one VMM until it exits: its console into the console log,
    /// its log into vmm.log, its status lines into phases and events, the
    /// boot timeout, and stop requests (SIGTERM, then SIGKILL).
    async fn supervise(
        &self,
        dir: &SandboxDir,
        generation: u64,
        mut vmm: Vmm,
        stop: &CancellationToken,
    ) -> Outcome {
        let id = dir.id.clone();
        let (pid, spawned_at_us) = (vmm.pid, vmm.spawned_at_us);
        let console = self.console_of(&id);
        let console_pump = vmm.console.take().map(|mut pipe| {
            let console = console.clone();
            tokio::spawn(async move {
                let mut buf = vec![0_u8; 16 << 10];
                loop {
                    match pipe.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if let Some(console) = &console
                                && let Err(error) = console.append(&buf[..n], state::now_ms())
                            {
                                tracing::warn!(error = %crate::error::chain(&error), "cannot write the console log");
                            }
                        }
                    }
                }
            })
        });
        let (status_tx, mut status_rx) = tokio::sync::mpsc::unbounded_channel();
        let log_tail: Arc<Mutex<VecDeque<String>>> = Arc::default();
        let log_reader = vmm.log.take().map(|pipe| {
            let path = dir.vmm_log();
            let tail = log_tail.clone();
            tokio::spawn(read_vmm_log(pipe, path, tail, status_tx))
        });

        let boot_deadline = self
            .inner
            .config
            .boot_timeout
            .map(|t| tokio::time::Instant::now() + t);
        let mut guest_root = false;
        let mut entered = false;
        let mut setup_error: Option<String> = None;
        let mut stopping = false;
        let mut timed_out = false;
        let mut kill_at: Option<tokio::time::Instant> = None;
        let handle_status = |line: StatusLine,
                             entered: &mut bool,
                             guest_root: &mut bool,
                             setup_error: &mut Option<String>| {
            match line {
                StatusLine::Configuring { .. } => {}
                StatusLine::Entering { at_us } => {
                    *entered = true;
                    let micros = at_us.saturating_sub(spawned_at_us);
                    tracing::debug!(sandbox_id = %id, spawn_to_enter_us = micros, "VMM entered libkrun");
                    self.event(
                        &id,
                        "Normal",
                        "VmmStarted",
                        format!("VMM pid {pid} entered libkrun {micros} µs after spawn"),
                        HashMap::from([
                            ("vmm_pid".to_owned(), pid.to_string()),
                            ("spawn_to_enter_us".to_owned(), micros.to_string()),
                        ]),
                    );
                }
                StatusLine::GuestRoot { at_us } => {
                    if !*guest_root {
                        *guest_root = true;
                        let micros = at_us.saturating_sub(spawned_at_us);
                        self.set_phase(&id, generation, Phase::Running { pid });
                        self.event(
                            &id,
                            "Normal",
                            "GuestBooted",
                            format!(
                                "The guest reached its root filesystem {} ms after spawn",
                                micros / 1000
                            ),
                            HashMap::from([
                                ("vmm_pid".to_owned(), pid.to_string()),
                                ("spawn_to_guest_root_us".to_owned(), micros.to_string()),
                            ]),
                        );
                    }
                }
                StatusLine::SetupFailed { message, .. } => *setup_error = Some(message),
            }
        };

        let exit = loop {
            let boot_timer = async {
                match boot_deadline {
                    Some(deadline) if !guest_root && !timed_out && !stopping => {
                        tokio::time::sleep_until(deadline).await;
                    }
                    _ => std::future::pending().await,
                }
            };
            let kill_timer = async {
                match kill_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                line = status_rx.recv() => {
                    if let Some(line) = line {
                        handle_status(line, &mut entered, &mut guest_root, &mut setup_error);
                    }
                }
                () = stop.cancelled(), if !stopping => {
                    stopping = true;
                    vmm.signal(nix::sys::signal::Signal::SIGTERM);
                    kill_at = Some(tokio::time::Instant::now() + self.inner.config.stop_timeout);
                }
                () = kill_timer => {
                    tracing::warn!(sandbox_id = %id, pid, "VMM did not stop after SIGTERM; sending SIGKILL");
                    vmm.signal(nix::sys::signal::Signal::SIGKILL);
                    kill_at = None;
                }
                () = boot_timer => {
                    timed_out = true;
                    vmm.signal(nix::sys::signal::Signal::SIGKILL);
                }
                status = vmm.wait() => break status,
            }
        };
        // The pipes end when the process is gone; their last lines still
        // count (a final status line can arrive after the exit).
        for task in [log_reader, console_pump].into_iter().flatten() {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        while let Ok(line) = status_rx.try_recv() {
            handle_status(line, &mut entered, &mut guest_root, &mut setup_error);
        }

        if stopping {
            return Outcome::Stopped;
        }
        let status = match exit {
            Ok(status) => status,
            Err(error) => {
                return Outcome::Ended(Phase::BootFailed {
                    message: format!("waiting for the VMM failed: {error}"),
                });
            }
        };
        let console_tail = console.map(|c| c.boot_tail(TAIL_LINES)).unwrap_or_default();
        let log_tail = {
            let tail = log_tail.lock().unwrap_or_else(PoisonError::into_inner);
            tail.iter().cloned().collect::<Vec<_>>().join("\n")
        };
        let with_tails = |headline: String| {
            let mut message = headline;
            message.push_str("\nconsole (last lines):\n");
            message.push_str(if console_tail.is_empty() {
                "(no output)"
            } else {
                &console_tail
            });
            message.push_str("\nVMM log (last lines):\n");
            message.push_str(if log_tail.is_empty() {
                "(empty)"
            } else {
                &log_tail
            });
            message
        };
        if timed_out {
            let secs = self.inner.config.boot_timeout.map_or(0, |t| t.as_secs());
            return Outcome::Ended(Phase::BootFailed {
                message: with_tails(format!(
                    "the guest did not reach its root filesystem within {secs} s; the VM was killed"
                )),
            });
        }
        let phase = match VmmExit::classify(status, entered, guest_root) {
            VmmExit::Guest(code) => Phase::Exited {
                code: Some(code),
                message: match guest_code_meaning(code) {
                    Some(meaning) => format!("The guest exited with code {code}: {meaning}"),
                    None => format!("The guest exited with code {code}"),
                },
            },
            VmmExit::Setup(failure) => Phase::BootFailed {
                message: with_tails(format!(
                    "the VMM failed before starting the VM ({}, exit code {}): {}",
                    failure.describe(),
                    failure.code(),
                    setup_error.unwrap_or_default()
                )),
            },
            VmmExit::NoBoot(code) => Phase::BootFailed {
                message: with_tails(format!(
                    "the VM stopped before the guest reached its root filesystem (VMM exit code \
                     {code})"
                )),
            },
            VmmExit::Signal(signal) => {
                let name = nix::sys::signal::Signal::try_from(signal)
                    .map_or_else(|_| signal.to_string(), |s| s.as_str().to_owned());
                if guest_root {
                    Phase::Exited {
                        code: None,
                        message: format!("The VMM was killed by {name} while the guest ran"),
                    }
                } else {
                    Phase::BootFailed {
                        message: with_tails(format!("the VMM was killed by {name} during boot")),
                    }
                }
            }
        };
        Outcome::Ended(phase)
    }

    // ---- RPC operations ----

    /// Validation shared by ValidateSandboxCreate and CreateSandbox: the
    /// request, the host, the image and the guest command. Returns the
    /// request and the pinned image.
    pub async fn validate(
        &self,
        sandbox: Option<&DriverSandbox>,
    ) -> Result<(spec::Request, ResolvedImage)> {
        let request = spec::validate(sandbox, &self.inner.config)?;
        if let Some(blocker) = self
            .host_report()
            .blocker(self.inner.config.allow_unsupported_host)
        {
            return Err(blocker);
        }
        let reference = request.image.clone();
        let image = blocking(move || {
            let image = image::resolve(&reference)?;
            image::check_unpacker(&image)?;
            Ok(image)
        })
        .await?;
        spec::guest_command(&request, &image.config(), request.token.is_some())?;
        Ok((request, image))
    }

    pub async fn create(&self, sandbox: Option<DriverSandbox>) -> Result<()> {
        let (request, image) = self.validate(sandbox.as_ref()).await?;
        let sandbox = sandbox.unwrap_or_default();
        let id = request.id.clone();
        {
            let mut registry = self.registry();
            if registry.entries.contains_key(id.as_str())
                || !registry.creating.insert(id.as_str().to_owned())
            {
                return Err(Error::AlreadyExists(id.to_string()));
            }
        }
        let written = self.write_new_sandbox(&id, &sandbox, image);
        let mut registry = self.registry();
        registry.creating.remove(id.as_str());
        written?;
        let dir = self.inner.state.sandbox(&id);
        registry.entries.insert(
            id.as_str().to_owned(),
            Entry {
                id: id.clone(),
                name: request.name.clone(),
                workspace: sandbox.workspace.clone(),
                phase: Phase::Provisioning,
                since_ms: state::now_ms(),
                deleting: false,
                op: Arc::default(),
                run: None,
                console: self.console_for(&dir),
            },
        );
        tracing::info!(sandbox_id = %id, name = %request.name, image = %request.image, "sandbox created");
        let _ = registry.events.send(platform_event(
            id.as_str(),
            "Normal",
            "Scheduled",
            format!("Sandbox accepted; image {}", request.image),
            HashMap::new(),
        ));
        self.start_run(&mut registry, &id);
        Ok(())
    }

    fn write_new_sandbox(
        &self,
        id: &SandboxId,
        sandbox: &DriverSandbox,
        image: ResolvedImage,
    ) -> Result<()> {
        let dir = self.inner.state.sandbox(id);
        if dir.path().exists() {
            return Err(Error::AlreadyExists(id.to_string()));
        }
        // The cache must not be pruned between pinning the image and
        // recording that this sandbox uses it.
        let _cache = self.inner.cache.lock_shared()?;
        dir.create()?;
        let result = (|| {
            state::write_private(&dir.request(), &sandbox.encode_to_vec())?;
            state::write_json(
                &dir.image(),
                &SandboxMeta {
                    image,
                    layer: None,
                    workspace: sandbox.workspace.clone(),
                    created_ms: state::now_ms(),
                },
            )
        })();
        if result.is_err() {
            let _ = dir.remove_all();
        }
        result
    }

    /// Stop, start, delete and logs find a sandbox by id, falling back to
    /// its name; GetSandbox uses the name only when no id is given.
    fn lookup(&self, id: &str, name: &str) -> Result<(SandboxId, Arc<tokio::sync::Mutex<()>>)> {
        let registry = self.registry();
        let entry = find(&registry, id, name, true)?;
        Ok((entry.id.clone(), entry.op.clone()))
    }

    pub fn get(&self, id: &str, name: &str) -> Result<DriverSandbox> {
        let registry = self.registry();
        find(&registry, id, name, false).map(Entry::snapshot)
    }

    pub fn list(&self) -> Vec<DriverSandbox> {
        let registry = self.registry();
        let mut all: Vec<DriverSandbox> = registry.entries.values().map(Entry::snapshot).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)));
        all
    }

    /// Stops the VM and keeps everything else. Returns once the VMM is gone.
    pub async fn stop(&self, id: &str, name: &str) -> Result<()> {
        let (id, op) = self.lookup(id, name)?;
        let _op = op.lock().await;
        let dir = self.inner.state.sandbox(&id);
        let run = {
            let mut registry = self.registry();
            let entry = registry
                .entries
                .get_mut(id.as_str())
                .ok_or_else(|| Error::NotFound(id.to_string()))?;
            dir.set_stopped(true)?;
            entry.run.take()
        };
        if let Some(run) = run {
            run.finish().await;
        }
        let mut registry = self.registry();
        if let Some(entry) = registry.entries.get_mut(id.as_str()) {
            let changed = entry.phase != Phase::Stopped;
            if changed {
                tracing::info!(sandbox_id = %id, from = entry.phase.label(), "sandbox stopped");
                entry.phase = Phase::Stopped;
                entry.since_ms = state::now_ms();
            }
            if let Some(entry) = registry.entries.get(id.as_str()) {
                registry.publish_sandbox(entry);
            }
            if changed {
                let _ = registry.events.send(platform_event(
                    id.as_str(),
                    "Normal",
                    "Stopped",
                    "The VM was stopped; its writable layer is kept".to_owned(),
                    HashMap::new(),
                ));
            }
        }
        Ok(())
    }

    /// Boots a sandbox that is not running, from its writable layer.
    pub async fn start(&self, id: &str, name: &str) -> Result<()> {
        let (id, op) = self.lookup(id, name)?;
        let _op = op.lock().await;
        if let Some(blocker) = self
            .host_report()
            .blocker(self.inner.config.allow_unsupported_host)
        {
            return Err(blocker);
        }
        let dir = self.inner.state.sandbox(&id);
        let mut registry = self.registry();
        let running = registry
            .entries
            .get(id.as_str())
            .ok_or_else(|| Error::NotFound(id.to_string()))?
            .run
            .is_some();
        if running {
            return Ok(());
        }
        dir.set_stopped(false)?;
        dir.clear_tombstone()?;
        tracing::info!(sandbox_id = %id, "starting sandbox");
        self.start_run(&mut registry, &id);
        Ok(())
    }

    /// Stops the VM and removes everything. `false` when it did not exist.
    pub async fn delete(&self, id: &str, name: &str) -> Result<bool> {
        let (id, op) = match self.lookup(id, name) {
            Ok(found) => found,
            Err(Error::NotFound(_)) => return Ok(false),
            Err(other) => return Err(other),
        };
        let _op = op.lock().await;
        let run = {
            let mut registry = self.registry();
            let Some(entry) = registry.entries.get_mut(id.as_str()) else {
                return Ok(false);
            };
            entry.deleting = true;
            let run = entry.run.take();
            if let Some(entry) = registry.entries.get(id.as_str()) {
                registry.publish_sandbox(entry);
            }
            run
        };
        if let Some(run) = run {
            run.finish().await;
        }
        let dir = self.inner.state.sandbox(&id);
        let removed = blocking(move || {
            layer::deactivate(&dir)?;
            dir.remove_all()
        })
        .await;
        let mut registry = self.registry();
        if let Err(error) = removed {
            if let Some(entry) = registry.entries.get_mut(id.as_str()) {
                entry.deleting = false;
            }
            if let Some(entry) = registry.entries.get(id.as_str()) {
                registry.publish_sandbox(entry);
            }
            return Err(error);
        }
        registry.entries.remove(id.as_str());
        tracing::info!(sandbox_id = %id, "sandbox deleted");
        let _ = registry.events.send(WatchSandboxesEvent {
            payload: Some(watch_sandboxes_event::Payload::Deleted(
                WatchSandboxesDeletedEvent {
                    sandbox_id: id.as_str().to_owned(),
                },
            )),
        });
        Ok(true)
    }

    /// Snapshots and a receiver for later events, with no gap between them.
    pub fn watch(&self) -> WatchStart {
        let registry = self.registry();
        let events = registry.events.subscribe();
        let mut snapshots: Vec<DriverSandbox> =
            registry.entries.values().map(Entry::snapshot).collect();
        snapshots.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)));
        WatchStart { snapshots, events }
    }

    /// The console log of a sandbox.
    pub fn console(&self, id: &str, name: &str) -> Result<Arc<ConsoleLog>> {
        let (id, _) = self.lookup(id, name)?;
        self.console_of(&id)
            .ok_or_else(|| Error::NotFound(id.to_string()))
    }

    /// Stops every VM (the driver is exiting). No stopped markers are
    /// written: sandboxes that were running boot again when the driver
    /// comes back.
    pub async fn shutdown(&self) {
        let runs: Vec<Run> = {
            let mut registry = self.registry();
            registry
                .entries
                .values_mut()
                .filter_map(|e| e.run.take())
                .collect()
        };
        if runs.is_empty() {
            return;
        }
        tracing::info!(count = runs.len(), "stopping VMs before exit");
        futures::future::join_all(runs.into_iter().map(Run::finish)).await;
    }

    /// Cache keys used by sandboxes on disk.
    pub fn images_in_use(state: &StateDir) -> Result<HashSet<String>> {
        let (dirs, _) = state.scan()?;
        let mut keys = HashSet::new();
        for dir in dirs {
            if let Some(meta) = state::read_json_if_exists::<SandboxMeta>(&dir.image())?
                && let Some(key) = meta.image.cache_key()
            {
                keys.insert(key);
            }
        }
        Ok(keys)
    }
}

/// The entry named by `id` (validated) or, without an id or with
/// `name_fallback`, by `name`.
fn find<'r>(
    registry: &'r Registry,
    id: &str,
    name: &str,
    name_fallback: bool,
) -> Result<&'r Entry> {
    if id.is_empty() && name.is_empty() {
        return Err(Error::InvalidArgument(
            "sandbox_id or sandbox_name is required".to_owned(),
        ));
    }
    let by_name = || {
        registry
            .entries
            .values()
            .find(|e| !name.is_empty() && e.name == name)
    };
    let entry = if id.is_empty() {
        by_name()
    } else {
        let parsed = SandboxId::parse(id)?;
        registry
            .entries
            .get(parsed.as_str())
            .or_else(|| if name_fallback { by_name() } else { None })
    };
    entry.ok_or_else(|| Error::NotFound(if id.is_empty() { name } else { id }.to_owned()))
}

/// A `sandbox` watch event.
pub fn sandbox_event(sandbox: DriverSandbox) -> WatchSandboxesEvent {
    WatchSandboxesEvent {
        payload: Some(watch_sandboxes_event::Payload::Sandbox(
            WatchSandboxesSandboxEvent {
                sandbox: Some(sandbox),
            },
        )),
    }
}

/// The guest kernel command line for ELF kernels.
pub fn kernel_cmdline(extra: &str) -> String {
    let mut cmdline = format!(
        "reboot=k panic=-1 panic_print=0 nomodule console=hvc0 quiet \
         earlyprintk=serial,ttyS0,115200 root={ROOT_TAG} rootfstype=virtiofs rw no-kvmapf \
         init=/init.krun"
    );
    if !extra.trim().is_empty() {
        cmdline.push(' ');
        cmdline.push_str(extra.trim());
    }
    cmdline
}

fn read_request(dir: &SandboxDir) -> Result<DriverSandbox> {
    let bytes = std::fs::read(dir.request()).map_err(|e| Error::io("read", dir.request(), e))?;
    DriverSandbox::decode(bytes.as_slice()).map_err(|e| Error::CorruptState {
        path: dir.request(),
        message: e.to_string(),
    })
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work).await.map_err(|e| {
        Error::io(
            "run a background task for",
            "the driver",
            std::io::Error::other(e),
        )
    })?
}

/// Copies the VMM's stderr to vmm.log, keeps its last lines, and passes
/// status lines on.
async fn read_vmm_log(
    pipe: tokio::net::unix::pipe::Receiver,
    path: PathBuf,
    tail: Arc<Mutex<VecDeque<String>>>,
    status: tokio::sync::mpsc::UnboundedSender<StatusLine>,
) {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&path)
        .map_err(|error| tracing::warn!(path = %path.display(), %error, "cannot open vmm.log"))
        .ok();
    let mut lines = tokio::io::BufReader::new(pipe).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(file) = file.as_mut() {
            let _ = writeln!(file, "{line}");
        }
        if let Some(parsed) = StatusLine::parse(&line) {
            let _ = status.send(parsed);
        } else {
            let mut tail = tail.lock().unwrap_or_else(PoisonError::into_inner);
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }
}
