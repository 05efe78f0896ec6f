//! Helpers for tests and benchmarks that run the real `openshell-driver-vm`
//! binary as a managed driver (the test process plays the gateway).

#![allow(
    dead_code,
    reason = "shared by several test and bench targets, each using only part of it"
)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use driver_lifecycle::{
    DriverCommand, DriverEndpoint, ManagedDriverProcess, Readiness, RestartPolicy, SpawnOptions,
    connect,
};
use openshell_proto::compute::logs::v1::StreamLogsRequest;
use openshell_proto::compute::logs::v1::sandbox_logs_client::SandboxLogsClient;
use openshell_proto::compute::v1::compute_driver_client::ComputeDriverClient;
use openshell_proto::compute::v1::{
    CreateSandboxRequest, DriverCondition, DriverPlatformEvent, DriverSandbox, DriverSandboxSpec,
    DriverSandboxTemplate, GetSandboxRequest, WatchSandboxesEvent, WatchSandboxesRequest,
    watch_sandboxes_event,
};
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_openshell-driver-vm");

/// Text the fake kernels write to the serial port before failing.
pub const FAKE_KERNEL_MARKER: &str = "openshell-test-kernel: booting";

/// What a fake kernel does after printing its marker.
#[derive(Debug, Clone, Copy)]
pub enum FakeKernel {
    /// `ud2` with no interrupt table: the vCPU triple-faults and libkrun
    /// stops the VM at once. Deterministic boot failure on any host.
    Fail,
    /// `jmp .`: the vCPU spins until the VMM is stopped.
    Spin,
}

/// Writes a minimal x86-64 ELF "kernel": it prints
/// [`FAKE_KERNEL_MARKER`] on COM1 (port 0x3f8, which libkrun routes to the
/// console) and then fails or spins. It never reaches a root filesystem,
/// so the driver must report a boot failure (or keep booting).
pub fn write_fake_kernel(path: &Path, kind: FakeKernel) {
    let message = format!("{FAKE_KERNEL_MARKER}\n\0");
    let mut code: Vec<u8> = vec![
        0x66, 0xBA, 0xF8, 0x03, // mov dx, 0x3f8
        0x48, 0x8D, 0x35, 10, 0, 0, 0,    // lea rsi, [rip + 10] (the message)
        0xAC, // lodsb
        0x84, 0xC0, // test al, al
        0x74, 0x03, // jz +3
        0xEE, // out dx, al
        0xEB, 0xF8, // jmp lodsb
    ];
    code.extend_from_slice(match kind {
        FakeKernel::Fail => &[0x0F, 0x0B], // ud2
        FakeKernel::Spin => &[0xEB, 0xFE], // jmp .
    });
    assert_eq!(
        code.len(),
        21,
        "the message offset above assumes 21 bytes of code"
    );
    code.extend_from_slice(message.as_bytes());

    let load: u64 = 0x100_0000;
    let phoff: u64 = 64;
    let offset: u64 = 64 + 56;
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2_u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62_u16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1_u32.to_le_bytes());
    elf.extend_from_slice(&load.to_le_bytes()); // entry
    elf.extend_from_slice(&phoff.to_le_bytes());
    elf.extend_from_slice(&0_u64.to_le_bytes()); // no sections
    elf.extend_from_slice(&0_u32.to_le_bytes());
    for half in [64_u16, 56, 1, 0, 0, 0] {
        elf.extend_from_slice(&half.to_le_bytes());
    }
    let size = code.len() as u64;
    elf.extend_from_slice(&1_u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5_u32.to_le_bytes()); // R+X
    for word in [offset, load, load, size, size, 0x1000] {
        elf.extend_from_slice(&word.to_le_bytes());
    }
    elf.extend_from_slice(&code);
    std::fs::write(path, elf).expect("write fake kernel");
}

/// A busybox root filesystem at `dir`, from the host's static busybox.
/// `None` (and a printed reason) when the host has none.
pub fn busybox_rootfs(dir: &Path) -> Option<PathBuf> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())?;
    for sub in ["bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "root"] {
        std::fs::create_dir_all(dir.join(sub)).expect("create rootfs dir");
    }
    std::fs::copy(busybox, dir.join("bin/busybox")).expect("copy busybox");
    for applet in [
        "sh", "echo", "cat", "ls", "sleep", "mount", "sync", "true", "false",
    ] {
        let _ = std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet));
    }
    std::fs::write(dir.join("etc/hostname"), b"image\n").expect("write hostname");
    Some(dir.to_owned())
}

/// A driver spawned the way a gateway spawns it.
pub struct Driver {
    pub state: PathBuf,
    pub endpoint: DriverEndpoint,
    pub guard: Option<ManagedDriverProcess>,
    pub client: ComputeDriverClient<Channel>,
    pub logs: SandboxLogsClient<Channel>,
    pub args: Vec<String>,
}

impl Driver {
    /// Starts the driver with its state in `root/state` and the given extra
    /// flags.
    pub async fn start(root: &Path, args: &[String]) -> Self {
        let state = root.join("state");
        let endpoint = DriverEndpoint::new("vm", root.join("run").join("vm.sock"));
        let mut all = vec!["--state-dir".to_owned(), state.display().to_string()];
        all.extend(args.iter().cloned());
        let options = SpawnOptions {
            readiness: Readiness::ReadyFd,
            ready_timeout: Duration::from_secs(30),
            restart: RestartPolicy {
                max_attempts: 0,
                ..RestartPolicy::default()
            },
            forward_output: std::env::var_os("OPENSHELL_TEST_DRIVER_OUTPUT").is_some(),
            ..SpawnOptions::default()
        };
        let guard = ManagedDriverProcess::spawn(
            &endpoint,
            DriverCommand::new(BIN).args(all.clone()),
            options,
        )
        .await
        .expect("the VM driver starts");
        let channel = connect(&endpoint).await.expect("connect to the driver");
        Self {
            state,
            client: ComputeDriverClient::new(channel.clone()),
            logs: SandboxLogsClient::new(channel),
            endpoint,
            guard: Some(guard),
            args: args.to_vec(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.guard
            .as_ref()
            .and_then(ManagedDriverProcess::pid)
            .expect("driver pid")
    }

    /// Graceful stop, as a gateway does at shutdown.
    pub async fn shutdown(mut self) {
        if let Some(guard) = self.guard.take() {
            guard.shutdown().await.expect("driver shuts down cleanly");
        }
    }

    /// SIGKILL, as when the gateway and driver crash.
    pub async fn kill(mut self) {
        let pid = self.pid();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill driver");
        wait_until("the killed driver to exit", Duration::from_secs(10), || {
            !alive(pid)
        })
        .await;
        drop(self.guard.take());
        // The leader turns zombie before its last thread has closed the
        // descriptors; the socket lock is free only after that.
        let socket = self.endpoint.socket.clone();
        wait_until(
            "the killed driver's socket lock",
            Duration::from_secs(10),
            || driver_lifecycle::socket::SocketLock::acquire(&socket).is_ok(),
        )
        .await;
    }

    pub async fn create(&mut self, sandbox: DriverSandbox) -> Result<(), tonic::Status> {
        self.client
            .create_sandbox(CreateSandboxRequest {
                sandbox: Some(sandbox),
            })
            .await
            .map(|_| ())
    }

    pub async fn get(&mut self, id: &str) -> Result<DriverSandbox, tonic::Status> {
        Ok(self
            .client
            .get_sandbox(GetSandboxRequest {
                sandbox_id: id.to_owned(),
                sandbox_name: String::new(),
            })
            .await?
            .into_inner()
            .sandbox
            .expect("a sandbox"))
    }

    /// Polls GetSandbox until `check` holds.
    pub async fn wait_for(
        &mut self,
        id: &str,
        what: &str,
        check: impl Fn(&DriverSandbox) -> bool,
    ) -> DriverSandbox {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let sandbox = self.get(id).await.expect("GetSandbox");
            if check(&sandbox) {
                return sandbox;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last status: {:?}",
                sandbox.status
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The console log through the log service.
    pub async fn console(&mut self, id: &str, tail_lines: u32) -> String {
        let mut stream = self
            .logs
            .stream_logs(StreamLogsRequest {
                sandbox_id: id.to_owned(),
                sandbox_name: String::new(),
                follow: false,
                tail_lines,
            })
            .await
            .expect("StreamLogs")
            .into_inner();
        let mut text = Vec::new();
        while let Some(chunk) = stream.message().await.expect("log chunk") {
            text.extend(chunk.data);
        }
        String::from_utf8_lossy(&text).into_owned()
    }

    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.state.join("sandboxes").join(id)
    }

    /// Processes whose parent is the driver (its VMM children).
    pub fn children(&self) -> Vec<i32> {
        children_of(i32::try_from(self.pid()).expect("pid"))
    }
}

/// A collected watch stream.
pub struct Watch {
    rx: tokio::sync::mpsc::UnboundedReceiver<WatchSandboxesEvent>,
    pub seen: Vec<WatchSandboxesEvent>,
}

impl Watch {
    pub async fn open(client: &mut ComputeDriverClient<Channel>) -> Self {
        let mut stream = client
            .watch_sandboxes(WatchSandboxesRequest {})
            .await
            .expect("WatchSandboxes")
            .into_inner();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(event)) = stream.message().await {
                if tx.send(event).is_err() {
                    break;
                }
            }
        });
        Self {
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits for an event matching `pick`, returning what it picked.
    pub async fn next_matching<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(&WatchSandboxesEvent) -> Option<T>,
    ) -> T {
        if let Some(found) = self.seen.iter().find_map(&mut pick) {
            return found;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let event = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}; saw {:#?}", self.seen))
                .unwrap_or_else(|| panic!("watch ended while waiting for {what}"));
            let found = pick(&event);
            self.seen.push(event);
            if let Some(found) = found {
                return found;
            }
        }
    }

    /// A sandbox snapshot of `id` matching `check`.
    pub async fn sandbox(
        &mut self,
        id: &str,
        what: &str,
        check: impl Fn(&DriverSandbox) -> bool,
    ) -> DriverSandbox {
        let id = id.to_owned();
        self.next_matching(what, |event| match &event.payload {
            Some(watch_sandboxes_event::Payload::Sandbox(s)) => s
                .sandbox
                .as_ref()
                .filter(|sb| sb.id == id && check(sb))
                .cloned(),
            _ => None,
        })
        .await
    }

    /// A platform event of `id` with `reason`.
    pub async fn platform(&mut self, id: &str, reason: &str) -> DriverPlatformEvent {
        let id = id.to_owned();
        self.next_matching(&format!("platform event {reason}"), |event| {
            match &event.payload {
                Some(watch_sandboxes_event::Payload::PlatformEvent(p)) if p.sandbox_id == id => {
                    p.event.as_ref().filter(|e| e.reason == reason).cloned()
                }
                _ => None,
            }
        })
        .await
    }

    pub async fn deleted(&mut self, id: &str) {
        let id = id.to_owned();
        self.next_matching("deleted event", |event| match &event.payload {
            Some(watch_sandboxes_event::Payload::Deleted(d)) if d.sandbox_id == id => Some(()),
            _ => None,
        })
        .await;
    }
}

/// A create request.
pub fn sandbox(id: &str, image: &str, command: &[&str]) -> DriverSandbox {
    DriverSandbox {
        id: id.to_owned(),
        name: format!("name-{id}"),
        spec: Some(DriverSandboxSpec {
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            template: Some(DriverSandboxTemplate {
                image: image.to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        workspace: "default".to_owned(),
        ..Default::default()
    }
}

pub fn condition(sandbox: &DriverSandbox, kind: &str) -> Option<DriverCondition> {
    sandbox
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.r#type == kind)
        .cloned()
}

/// The reason of the `Ready` condition.
pub fn ready_reason(sandbox: &DriverSandbox) -> String {
    condition(sandbox, "Ready")
        .map(|c| c.reason)
        .unwrap_or_default()
}

pub fn is_suspended(sandbox: &DriverSandbox) -> bool {
    condition(sandbox, "Suspended").is_some_and(|c| c.status == "True")
}

pub fn alive(pid: u32) -> bool {
    i32::try_from(pid)
        .ok()
        .and_then(driver_lifecycle::proc::stat)
        .is_some_and(|p| p.state != 'Z')
}

pub fn children_of(parent: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(driver_lifecycle::proc::stat)
        .filter(|p| p.ppid == parent && p.state != 'Z')
        .map(|p| p.pid)
        .collect()
}

pub async fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The VMM pid a platform event carries.
pub fn vmm_pid(event: &DriverPlatformEvent) -> u32 {
    event
        .metadata
        .get("vmm_pid")
        .and_then(|p| p.parse().ok())
        .expect("vmm_pid metadata")
}

pub fn metadata_u64(metadata: &HashMap<String, String>, key: &str) -> Option<u64> {
    metadata.get(key)?.parse().ok()
}

/// Whether `path` is a mount point right now.
pub fn mounted(path: &Path) -> bool {
    openshell_driver_vm::layer::is_mount_point(path)
}
