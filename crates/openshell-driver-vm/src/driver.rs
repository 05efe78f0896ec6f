//! The driver's core: the registry of sandboxes, their lifecycle, and the
//! supervision of one VMM child per running sandbox.
//!
//! Every state change goes through the registry lock and is published to
//! the shared [`WatchFeed`] while the lock is held, so the feed's picture
//! and its change stream follow the registry in order; the feed serves
//! `WatchSandboxes` (snapshot, changes, resync on lag).
//! Lifecycle operations on one sandbox (create, stop, start, delete) are
//! serialised by a per-sandbox async lock; each boot runs in its own task,
//! identified by a generation number so a late result of an old boot never
//! overwrites a newer state.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use openshell_driver_kit::{WatchFeed, contract};
use openshell_proto::compute::v1::{DriverPlatformEvent, DriverSandbox};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt as _;
use tokio::io::AsyncReadExt as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, NetworkMode};
use crate::console::ConsoleLog;
use crate::error::{Error, Result};
use crate::ids::SandboxId;
use crate::image::{self, ImageCache, ResolvedImage};
use crate::launch::{
    Executor, GuestNetwork, KernelSpec, LAUNCH_VERSION, LaunchConfig, ROOT_TAG, StatusLine,
    VmmExit, guest_code_meaning,
};
use crate::launcher::{Launcher, Vmm};
use crate::layer::{self, LayerKind};
use crate::preflight::{Backend, HostPaths, HostReport, Kernel, Platform};
use crate::registry::Puller;
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
    /// What Create and Start report as the sandbox's runtime identity.
    identity: String,
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
    feed: Arc<WatchFeed>,
    next_generation: u64,
}

impl Registry {
    /// Puts the entry's current status in the watch feed (a no-op when it
    /// did not change).
    fn publish_sandbox(&self, entry: &Entry) {
        self.feed.upsert(entry.snapshot());
    }

    /// Publishes the status of `id`, if registered.
    fn publish(&self, id: &SandboxId) {
        if let Some(entry) = self.entries.get(id.as_str()) {
            self.publish_sandbox(entry);
        }
    }

    /// Sends a platform event about `id` to the current watchers.
    fn publish_event(&self, id: &SandboxId, event: DriverPlatformEvent) {
        self.feed.publish_platform_event(id.as_str(), event);
    }
}

struct Inner {
    config: Config,
    state: StateDir,
    cache: ImageCache,
    /// Fetches registry images into the cache's pulled layout.
    puller: Puller,
    host: HostPaths,
    program: PathBuf,
    launcher: Launcher,
    feed: Arc<WatchFeed>,
    registry: Mutex<Registry>,
}

/// The VM driver. Cheap to clone.
#[derive(Clone)]
pub struct Driver {
    inner: Arc<Inner>,
}

/// How a boot task ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Stopped on request (stop, delete, driver shutdown): whoever asked
    /// sets the phase.
    Stopped,
    /// Ended on its own in this phase.
    Ended(Phase),
}

/// The runtime identity of a sandbox: the driver instance, the sandbox id
/// and when its state directory was made. Stable across stops, starts and
/// driver restarts; a sandbox deleted and created again under the same id
/// gets a new one.
fn runtime_identity(driver_name: &str, id: &SandboxId, created_ms: i64) -> String {
    format!("vm:{driver_name}/{id}/{created_ms}")
}

/// A platform event from this driver, stamped now.
fn platform_event(
    kind: &str,
    reason: &str,
    message: String,
    metadata: HashMap<String, String>,
) -> DriverPlatformEvent {
    // Both time encodings: `timestamp_ms` for v0.0.111 gateways,
    // `event_time` for 1.x gateways.
    contract::stamp_event(
        DriverPlatformEvent {
            source: "vm".to_owned(),
            r#type: kind.to_owned(),
            reason: reason.to_owned(),
            message,
            metadata,
            ..DriverPlatformEvent::default()
        },
        SystemTime::now(),
    )
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
        let feed = Arc::new(WatchFeed::new(EVENT_BUFFER));
        let cache = ImageCache::new(state.images_dir());
        let puller = Puller::new(&config, &cache)?;
        let driver = Self {
            inner: Arc::new(Inner {
                cache,
                puller,
                state,
                host,
                program,
                launcher: Launcher::start()?,
                feed: Arc::clone(&feed),
                registry: Mutex::new(Registry {
                    entries: BTreeMap::new(),
                    creating: HashSet::new(),
                    feed,
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
        HostReport::check_platform(
            &self.inner.host,
            self.inner.config.kernel.as_deref(),
            &Platform::from_config(&self.inner.config),
        )
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
                    tracing::warn!(sandbox_id = %dir.id, error = %driver_lifecycle::error_chain(&error), "cannot restore sandbox; leaving its directory alone");
                    continue;
                }
            };
            // Mounts left behind by a driver that was killed.
            if let Err(error) = layer::deactivate(&dir) {
                tracing::warn!(sandbox_id = %dir.id, error = %driver_lifecycle::error_chain(&error), "cannot unmount a leftover writable layer");
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
                identity: runtime_identity(&self.inner.config.name, &dir.id, meta.created_ms),
                phase,
                since_ms: openshell_wire::time::now_millis(),
                deleting: false,
                op: Arc::default(),
                run: None,
                console: self.console_for(&dir),
            };
            tracing::info!(sandbox_id = %dir.id, phase = entry.phase.label(), "restored sandbox");
            registry.entries.insert(dir.id.as_str().to_owned(), entry);
            if launch {
                registry.publish_event(
                    &dir.id,
                    platform_event(
                        "Normal",
                        "Restoring",
                        "Booting the sandbox again after a driver restart".to_owned(),
                        HashMap::new(),
                    ),
                );
                // start_run publishes the sandbox.
                self.start_run(&mut registry, &dir.id);
                relaunched += 1;
            } else {
                registry.publish(&dir.id);
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
        entry.since_ms = openshell_wire::time::now_millis();
        entry.console.begin_boot();
        registry.publish(id);
        let driver = self.clone();
        let dir = self.inner.state.sandbox(id);
        tokio::spawn(async move {
            let outcome = driver.boot(&dir, generation, &stop).await;
            driver.end_boot(&dir, generation, outcome).await;
            let _ = done_tx.send(true);
        });
    }

    /// After a boot: closes its console output, unmounts its writable
    /// layer and, when it ended on its own, records how (tombstone, phase,
    /// event).
    async fn end_boot(&self, dir: &SandboxDir, generation: u64, outcome: Outcome) {
        let id = &dir.id;
        if let Some(console) = self.console_of(id) {
            console.end_boot();
        }
        let dir_for_unmount = dir.clone();
        match tokio::task::spawn_blocking(move || layer::deactivate(&dir_for_unmount)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(sandbox_id = %id, error = %driver_lifecycle::error_chain(&error), "cannot unmount the writable layer");
            }
            Err(error) => tracing::warn!(sandbox_id = %id, %error, "unmount task failed"),
        }
        if let Outcome::Ended(phase) = outcome {
            if let Some(tombstone) = phase.tombstone(openshell_wire::time::now_millis())
                && let Err(error) = dir.write_tombstone(&tombstone)
            {
                tracing::warn!(sandbox_id = %id, error = %driver_lifecycle::error_chain(&error), "cannot record how the sandbox ended");
            }
            self.finish_run(id, generation, phase);
        }
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
        entry.since_ms = openshell_wire::time::now_millis();
        registry.publish(id);
        true
    }

    /// The boot ended on its own: record the phase and forget the run.
    fn finish_run(&self, id: &SandboxId, generation: u64, phase: Phase) {
        let event = ending_event(&phase);
        if self.set_phase(id, generation, phase) {
            let mut registry = self.registry();
            registry.publish_event(id, event);
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
        self.registry()
            .publish_event(id, platform_event(kind, reason, message, metadata));
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
                tracing::warn!(sandbox_id = %dir.id, error = %driver_lifecycle::error_chain(&error), "provisioning failed");
                return Outcome::Ended(match error {
                    Error::HostUnsupported(message) => Phase::HostUnsupported { message },
                    other => Phase::ProvisioningFailed {
                        message: driver_lifecycle::error_chain(&other),
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
                        driver_lifecycle::error_chain(&error)
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

        // A registry image's layers come now, not at create (see
        // registry.rs); after a restart, again if they were pruned.
        image::fetch_layers(&meta.image, &self.inner.puller).await?;
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
        let (backend, _) = report.backend.map_err(Error::HostUnsupported)?;
        let network = report.network.map_err(Error::HostUnsupported)?;
        let network = match (network.mode, network.passt) {
            (NetworkMode::Passt, Some(binary)) => {
                let (dns, left_out) =
                    crate::passt::resolvers_for_guest(&self.inner.config.dns_servers);
                for why in left_out {
                    tracing::warn!(sandbox_id = %dir.id, reason = %why, "a DNS resolver is out of the guest's reach");
                }
                GuestNetwork::Passt { binary, dns }
            }
            (NetworkMode::Tsi, _) => GuestNetwork::Tsi,
            _ => GuestNetwork::None,
        };
        let extra = &self.inner.config.kernel_args;
        let (executor, kernel) = match (backend, kernel) {
            (Backend::Libkrun, Kernel::Elf(path)) => (
                Executor::Libkrun,
                KernelSpec::Elf {
                    path,
                    cmdline: kernel_cmdline(extra),
                },
            ),
            (Backend::Libkrun, Kernel::Libkrunfw(_)) => (Executor::Libkrun, KernelSpec::Libkrunfw),
            (Backend::Qemu { binary, accel }, Kernel::Elf(path)) => (
                Executor::Qemu { binary, accel },
                KernelSpec::Elf {
                    path,
                    cmdline: crate::qemu::kernel_cmdline(
                        extra,
                        matches!(network, GuestNetwork::Passt { .. }),
                    ),
                },
            ),
            (Backend::Qemu { .. }, Kernel::Libkrunfw(path)) => {
                return Err(Error::HostUnsupported(format!(
                    "QEMU boots an ELF vmlinux and only {} was found; build one with \
                     scripts/build-guest-kernel.sh or pass --kernel",
                    path.display()
                )));
            }
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
            executor,
            network,
            run_dir: dir.path().to_owned(),
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
        let console = self.console_of(&dir.id);
        let mut pumps = Pumps::start(&mut vmm, dir, console.clone());
        let mut progress = BootProgress::default();
        let ending = self
            .wait_for_exit(dir, generation, &mut vmm, &mut pumps, &mut progress, stop)
            .await;
        // The pipes end when the process is gone; their last lines still
        // count (a final status line can arrive after the exit).
        for line in pumps.drain().await {
            self.report_status(&dir.id, generation, &vmm, &mut progress, line);
        }
        let tails = Tails {
            console: console.map(|c| c.boot_tail(TAIL_LINES)).unwrap_or_default(),
            log: pumps.log_tail(),
        };
        classify_exit(ending, &progress, &tails, self.inner.config.boot_timeout)
    }

    /// Waits for the VMM to exit while passing its status lines on,
    /// stopping it on request (SIGTERM, then SIGKILL after the stop
    /// timeout) and killing it at the boot timeout.
    async fn wait_for_exit(
        &self,
        dir: &SandboxDir,
        generation: u64,
        vmm: &mut Vmm,
        pumps: &mut Pumps,
        progress: &mut BootProgress,
        stop: &CancellationToken,
    ) -> Ending {
        let boot_deadline = self
            .inner
            .config
            .boot_timeout
            .map(|t| tokio::time::Instant::now() + t);
        let mut stopping = false;
        let mut timed_out = false;
        let mut kill_at: Option<tokio::time::Instant> = None;
        let status = loop {
            let boot_timer = async {
                match boot_deadline {
                    Some(deadline) if !progress.guest_root && !timed_out && !stopping => {
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
                line = pumps.status.recv() => {
                    if let Some(line) = line {
                        self.report_status(&dir.id, generation, vmm, progress, line);
                    }
                }
                () = stop.cancelled(), if !stopping => {
                    stopping = true;
                    vmm.signal(nix::sys::signal::Signal::SIGTERM);
                    kill_at = Some(tokio::time::Instant::now() + self.inner.config.stop_timeout);
                }
                () = kill_timer => {
                    tracing::warn!(sandbox_id = %dir.id, pid = vmm.pid, "VMM did not stop after SIGTERM; sending SIGKILL");
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
        Ending {
            status,
            stopping,
            timed_out,
        }
    }

    /// Records a status line and turns what it marks into a phase change
    /// and platform events.
    fn report_status(
        &self,
        id: &SandboxId,
        generation: u64,
        vmm: &Vmm,
        progress: &mut BootProgress,
        line: StatusLine,
    ) {
        let pid = vmm.pid;
        match progress.apply(line, vmm.spawned_at_us) {
            None => {}
            Some(Milestone::Entered { micros }) => {
                tracing::debug!(sandbox_id = %id, spawn_to_enter_us = micros, "VMM entered libkrun");
                self.event(
                    id,
                    "Normal",
                    "VmmStarted",
                    format!("VMM pid {pid} entered libkrun {micros} µs after spawn"),
                    HashMap::from([
                        ("vmm_pid".to_owned(), pid.to_string()),
                        ("spawn_to_enter_us".to_owned(), micros.to_string()),
                    ]),
                );
            }
            Some(Milestone::GuestRoot { micros }) => {
                self.set_phase(id, generation, Phase::Running { pid });
                self.event(
                    id,
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
        let image = image::resolve(&request.image, &self.inner.puller).await?;
        image::check_unpacker(&image)?;
        spec::guest_command(&request, &image.config(), request.token.is_some())?;
        Ok((request, image))
    }

    /// Creates the sandbox and starts booting it; returns its runtime
    /// identity.
    pub async fn create(&self, sandbox: Option<DriverSandbox>) -> Result<String> {
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
        let created_ms = openshell_wire::time::now_millis();
        let written = self.write_new_sandbox(&id, &sandbox, image, created_ms);
        let mut registry = self.registry();
        registry.creating.remove(id.as_str());
        written?;
        let dir = self.inner.state.sandbox(&id);
        let identity = runtime_identity(&self.inner.config.name, &id, created_ms);
        registry.entries.insert(
            id.as_str().to_owned(),
            Entry {
                id: id.clone(),
                name: request.name.clone(),
                workspace: sandbox.workspace.clone(),
                phase: Phase::Provisioning,
                since_ms: openshell_wire::time::now_millis(),
                deleting: false,
                op: Arc::default(),
                run: None,
                console: self.console_for(&dir),
                identity: identity.clone(),
            },
        );
        tracing::info!(sandbox_id = %id, name = %request.name, image = %request.image, "sandbox created");
        registry.publish_event(
            &id,
            platform_event(
                "Normal",
                "Scheduled",
                format!("Sandbox accepted; image {}", request.image),
                HashMap::new(),
            ),
        );
        self.start_run(&mut registry, &id);
        Ok(identity)
    }

    fn write_new_sandbox(
        &self,
        id: &SandboxId,
        sandbox: &DriverSandbox,
        image: ResolvedImage,
        created_ms: i64,
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
                    created_ms,
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
                entry.since_ms = openshell_wire::time::now_millis();
            }
            registry.publish(&id);
            if changed {
                registry.publish_event(
                    &id,
                    platform_event(
                        "Normal",
                        "Stopped",
                        "The VM was stopped; its writable layer is kept".to_owned(),
                        HashMap::new(),
                    ),
                );
            }
        }
        Ok(())
    }

    /// Boots a sandbox that is not running, from its writable layer, and
    /// returns its runtime identity. A non-empty `expected_identity` (what
    /// a 1.x gateway recorded at create) must be this sandbox's: a
    /// different one means the sandbox was replaced behind the gateway's
    /// back.
    pub async fn start(&self, id: &str, name: &str, expected_identity: &str) -> Result<String> {
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
        let entry = registry
            .entries
            .get(id.as_str())
            .ok_or_else(|| Error::NotFound(id.to_string()))?;
        let identity = entry.identity.clone();
        if !expected_identity.is_empty() && expected_identity != identity {
            return Err(Error::FailedPrecondition(format!(
                "sandbox {id} has runtime identity {identity:?}, not the expected {:?}; it was \
                 recreated since the gateway recorded it",
                contract::truncate(expected_identity, 200)
            )));
        }
        if entry.run.is_some() {
            return Ok(identity);
        }
        dir.set_stopped(false)?;
        dir.clear_tombstone()?;
        tracing::info!(sandbox_id = %id, "starting sandbox");
        self.start_run(&mut registry, &id);
        Ok(identity)
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
            registry.publish(&id);
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
            registry.publish(&id);
            return Err(error);
        }
        registry.entries.remove(id.as_str());
        tracing::info!(sandbox_id = %id, "sandbox deleted");
        registry.feed.remove(id.as_str());
        Ok(true)
    }

    /// The feed `WatchSandboxes` serves: every sandbox's status as the
    /// registry holds it, and the platform events.
    pub fn feed(&self) -> &Arc<WatchFeed> {
        &self.inner.feed
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
        if !runs.is_empty() {
            tracing::info!(count = runs.len(), "stopping VMs before exit");
            futures::future::join_all(runs.into_iter().map(Run::finish)).await;
        }
        self.inner.feed.close();
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

/// The platform event announcing that a boot ended on its own in `phase`.
fn ending_event(phase: &Phase) -> DriverPlatformEvent {
    let (kind, reason, message) = match phase {
        Phase::Exited { code, message } => (
            if *code == Some(0) {
                "Normal"
            } else {
                "Warning"
            },
            "Exited",
            message.clone(),
        ),
        Phase::BootFailed { message } => ("Warning", "BootFailed", message.clone()),
        Phase::ProvisioningFailed { message } => ("Warning", "ProvisioningFailed", message.clone()),
        other => ("Normal", "PhaseChanged", other.label().to_owned()),
    };
    platform_event(kind, reason, message, HashMap::new())
}

/// The tasks copying a VMM's console and log pipes, and the status lines
/// found in its log.
struct Pumps {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    status: tokio::sync::mpsc::UnboundedReceiver<StatusLine>,
    log_tail: Arc<Mutex<VecDeque<String>>>,
}

impl Pumps {
    /// Takes the VMM's pipes: the console goes to `console`, the log to
    /// vmm.log (its last lines kept, its status lines passed on).
    fn start(vmm: &mut Vmm, dir: &SandboxDir, console: Option<Arc<ConsoleLog>>) -> Self {
        let mut tasks = Vec::new();
        if let Some(pipe) = vmm.console.take() {
            tasks.push(tokio::spawn(copy_console(pipe, console)));
        }
        let (status_tx, status) = tokio::sync::mpsc::unbounded_channel();
        let log_tail: Arc<Mutex<VecDeque<String>>> = Arc::default();
        if let Some(pipe) = vmm.log.take() {
            tasks.push(tokio::spawn(read_vmm_log(
                pipe,
                dir.vmm_log(),
                log_tail.clone(),
                status_tx,
            )));
        }
        Self {
            tasks,
            status,
            log_tail,
        }
    }

    /// Lets the copying tasks finish (bounded: a pipe a grandchild still
    /// holds open must not hold supervision up) and returns the status
    /// lines not read yet.
    async fn drain(&mut self) -> Vec<StatusLine> {
        for task in self.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        let mut lines = Vec::new();
        while let Ok(line) = self.status.try_recv() {
            lines.push(line);
        }
        lines
    }

    /// The last lines of vmm.log that were not status lines.
    fn log_tail(&self) -> String {
        let tail = self.log_tail.lock().unwrap_or_else(PoisonError::into_inner);
        tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// Copies the VMM's console pipe into the console log.
async fn copy_console(
    mut pipe: tokio::net::unix::pipe::Receiver,
    console: Option<Arc<ConsoleLog>>,
) {
    let mut buf = vec![0_u8; 16 << 10];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if let Some(console) = &console
                    && let Err(error) =
                        console.append(&buf[..n], openshell_wire::time::now_millis())
                {
                    tracing::warn!(error = %driver_lifecycle::error_chain(&error), "cannot write the console log");
                }
            }
        }
    }
}

/// What the VMM reported about its boot so far.
#[derive(Debug, Default)]
struct BootProgress {
    /// It reported `entering`: libkrun owns the process from then on.
    entered: bool,
    /// It reported `guest-root`: the guest booted.
    guest_root: bool,
    /// The message of a `setup-failed` line.
    setup_error: Option<String>,
}

/// A point of a boot worth telling watchers about; times are µs after
/// the spawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Milestone {
    Entered { micros: u64 },
    GuestRoot { micros: u64 },
}

impl BootProgress {
    /// Records `line`; returns the milestone it marks, if any (the guest
    /// root only the first time).
    fn apply(&mut self, line: StatusLine, spawned_at_us: u64) -> Option<Milestone> {
        match line {
            StatusLine::Configuring { .. } => None,
            StatusLine::Entering { at_us } => {
                self.entered = true;
                Some(Milestone::Entered {
                    micros: at_us.saturating_sub(spawned_at_us),
                })
            }
            StatusLine::GuestRoot { at_us } => {
                if self.guest_root {
                    return None;
                }
                self.guest_root = true;
                Some(Milestone::GuestRoot {
                    micros: at_us.saturating_sub(spawned_at_us),
                })
            }
            StatusLine::SetupFailed { message, .. } => {
                self.setup_error = Some(message);
                None
            }
        }
    }
}

/// How waiting for a VMM ended.
#[derive(Debug)]
struct Ending {
    /// The exit status, or why it could not be read.
    status: std::io::Result<std::process::ExitStatus>,
    /// It was stopped on request.
    stopping: bool,
    /// It was killed at the boot timeout.
    timed_out: bool,
}

/// The last lines of the console and of vmm.log, quoted in boot failures.
#[derive(Debug, Default)]
struct Tails {
    console: String,
    log: String,
}

impl Tails {
    fn quote(&self, headline: String) -> String {
        let mut message = headline;
        message.push_str("\nconsole (last lines):\n");
        message.push_str(if self.console.is_empty() {
            "(no output)"
        } else {
            &self.console
        });
        message.push_str("\nVMM log (last lines):\n");
        message.push_str(if self.log.is_empty() {
            "(empty)"
        } else {
            &self.log
        });
        message
    }
}

/// What the end of a VMM means for its sandbox.
fn classify_exit(
    ending: Ending,
    progress: &BootProgress,
    tails: &Tails,
    boot_timeout: Option<Duration>,
) -> Outcome {
    if ending.stopping {
        return Outcome::Stopped;
    }
    let status = match ending.status {
        Ok(status) => status,
        Err(error) => {
            return Outcome::Ended(Phase::BootFailed {
                message: format!("waiting for the VMM failed: {error}"),
            });
        }
    };
    if ending.timed_out {
        let secs = boot_timeout.map_or(0, |t| t.as_secs());
        return Outcome::Ended(Phase::BootFailed {
            message: tails.quote(format!(
                "the guest did not reach its root filesystem within {secs} s; the VM was killed"
            )),
        });
    }
    let phase = match VmmExit::classify(status, progress.entered, progress.guest_root) {
        VmmExit::Guest(code) => Phase::Exited {
            code: Some(code),
            message: match guest_code_meaning(code) {
                Some(meaning) => format!("The guest exited with code {code}: {meaning}"),
                None => format!("The guest exited with code {code}"),
            },
        },
        VmmExit::Setup(failure) => Phase::BootFailed {
            message: tails.quote(format!(
                "the VMM failed before starting the VM ({}, exit code {}): {}",
                failure.describe(),
                failure.code(),
                progress.setup_error.as_deref().unwrap_or_default()
            )),
        },
        VmmExit::NoBoot(code) => Phase::BootFailed {
            message: tails.quote(format!(
                "the VM stopped before the guest reached its root filesystem (VMM exit code \
                 {code})"
            )),
        },
        VmmExit::Signal(signal) => {
            let name = nix::sys::signal::Signal::try_from(signal)
                .map_or_else(|_| signal.to_string(), |s| s.as_str().to_owned());
            if progress.guest_root {
                Phase::Exited {
                    code: None,
                    message: format!("The VMM was killed by {name} while the guest ran"),
                }
            } else {
                Phase::BootFailed {
                    message: tails.quote(format!("the VMM was killed by {name} during boot")),
                }
            }
        }
    };
    Outcome::Ended(phase)
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

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt as _;
    use std::process::ExitStatus;

    use super::*;
    use crate::launch::SetupFailure;

    fn exited(code: i32) -> Ending {
        Ending {
            status: Ok(ExitStatus::from_raw(code << 8)),
            stopping: false,
            timed_out: false,
        }
    }

    fn killed(signal: i32) -> Ending {
        Ending {
            status: Ok(ExitStatus::from_raw(signal)),
            stopping: false,
            timed_out: false,
        }
    }

    fn booted() -> BootProgress {
        BootProgress {
            entered: true,
            guest_root: true,
            setup_error: None,
        }
    }

    fn tails() -> Tails {
        Tails {
            console: "kernel panic".to_owned(),
            log: String::new(),
        }
    }

    fn message(outcome: &Outcome) -> &str {
        match outcome {
            Outcome::Ended(
                Phase::BootFailed { message }
                | Phase::Exited { message, .. }
                | Phase::ProvisioningFailed { message },
            ) => message,
            other => panic!("no message in {other:?}"),
        }
    }

    #[test]
    fn status_lines_mark_each_milestone_once() {
        let mut progress = BootProgress::default();
        assert_eq!(
            progress.apply(StatusLine::Configuring { at_us: 150 }, 100),
            None
        );
        assert_eq!(
            progress.apply(StatusLine::Entering { at_us: 400 }, 100),
            Some(Milestone::Entered { micros: 300 })
        );
        assert!(progress.entered && !progress.guest_root);
        assert_eq!(
            progress.apply(StatusLine::GuestRoot { at_us: 50 }, 100),
            Some(Milestone::GuestRoot { micros: 0 }),
            "a clock that went backwards gives 0, not a panic"
        );
        assert_eq!(
            progress.apply(StatusLine::GuestRoot { at_us: 900 }, 100),
            None,
            "the guest boots once"
        );
        assert_eq!(
            progress.apply(
                StatusLine::SetupFailed {
                    at_us: 1,
                    message: "no kvm".to_owned()
                },
                100
            ),
            None
        );
        assert_eq!(progress.setup_error.as_deref(), Some("no kvm"));
    }

    #[test]
    fn a_stop_request_wins_over_how_the_vmm_ended() {
        let mut ending = killed(15);
        ending.stopping = true;
        ending.timed_out = true;
        assert_eq!(
            classify_exit(ending, &BootProgress::default(), &tails(), None),
            Outcome::Stopped
        );
    }

    #[test]
    fn guest_exits_are_exited_with_the_code_and_its_meaning() {
        let outcome = classify_exit(exited(3), &booted(), &tails(), None);
        assert_eq!(
            outcome,
            Outcome::Ended(Phase::Exited {
                code: Some(3),
                message: "The guest exited with code 3".to_owned()
            })
        );
        let outcome = classify_exit(exited(127), &booted(), &tails(), None);
        assert_eq!(
            message(&outcome),
            "The guest exited with code 127: the command was not found in the image"
        );
        let outcome = classify_exit(killed(9), &booted(), &tails(), None);
        assert_eq!(
            outcome,
            Outcome::Ended(Phase::Exited {
                code: None,
                message: "The VMM was killed by SIGKILL while the guest ran".to_owned()
            })
        );
    }

    #[test]
    fn boot_failures_quote_the_tails() {
        let progress = BootProgress {
            entered: false,
            guest_root: false,
            setup_error: Some("cannot open /dev/kvm".to_owned()),
        };
        let code = i32::from(SetupFailure::KrunStart.code());
        let outcome = classify_exit(exited(code), &progress, &tails(), None);
        let text = message(&outcome);
        assert!(matches!(outcome, Outcome::Ended(Phase::BootFailed { .. })));
        assert!(text.contains("cannot open /dev/kvm"), "{text}");
        assert!(text.contains(&format!("exit code {code}")), "{text}");
        assert!(
            text.contains("console (last lines):\nkernel panic"),
            "{text}"
        );
        assert!(text.contains("VMM log (last lines):\n(empty)"), "{text}");

        let entered = BootProgress {
            entered: true,
            ..BootProgress::default()
        };
        let outcome = classify_exit(killed(11), &entered, &Tails::default(), None);
        let text = message(&outcome);
        assert!(text.contains("killed by SIGSEGV during boot"), "{text}");
        assert!(text.contains("(no output)"), "{text}");
    }

    #[test]
    fn the_boot_timeout_and_wait_errors_are_boot_failures() {
        let mut ending = killed(9);
        ending.timed_out = true;
        let outcome = classify_exit(
            ending,
            &BootProgress::default(),
            &tails(),
            Some(Duration::from_secs(42)),
        );
        assert!(message(&outcome).contains("within 42 s"), "{outcome:?}");

        let ending = Ending {
            status: Err(std::io::Error::other("ECHILD")),
            stopping: false,
            timed_out: true,
        };
        let outcome = classify_exit(ending, &booted(), &tails(), None);
        assert!(
            message(&outcome).starts_with("waiting for the VMM failed: ECHILD"),
            "{outcome:?}"
        );
    }

    #[test]
    fn ending_events_are_warnings_unless_the_guest_succeeded() {
        let event = ending_event(&Phase::Exited {
            code: Some(0),
            message: "done".to_owned(),
        });
        assert_eq!(
            (
                event.r#type.as_str(),
                event.reason.as_str(),
                event.message.as_str()
            ),
            ("Normal", "Exited", "done")
        );
        let event = ending_event(&Phase::Exited {
            code: None,
            message: "killed".to_owned(),
        });
        assert_eq!(event.r#type, "Warning");
        let event = ending_event(&Phase::ProvisioningFailed {
            message: "umoci".to_owned(),
        });
        assert_eq!(
            (event.r#type.as_str(), event.reason.as_str()),
            ("Warning", "ProvisioningFailed")
        );
        let event = ending_event(&Phase::Stopped);
        assert_eq!(
            (event.reason.as_str(), event.message.as_str()),
            ("PhaseChanged", "stopped")
        );
        assert_eq!(event.source, "vm");
    }
}
