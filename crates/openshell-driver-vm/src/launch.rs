//! What the driver hands one VMM child, what the child reports back, and
//! what its exit status means.
//!
//! The driver writes a [`LaunchConfig`] as JSON (mode 0600) into the
//! sandbox directory and runs `openshell-driver-vm vmm <file>`; nothing
//! about the sandbox is on the command line. The child reports progress as
//! [`StatusLine`]s on stderr, mixed with its log, and its exit status is
//! read with [`VmmExit`].

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Version of the launch-file format.
pub const LAUNCH_VERSION: u32 = 2;

/// virtio-fs tag of the guest root when the driver boots an ELF kernel.
pub const ROOT_TAG: &str = "openshell-root";

/// Virtual directory (never on disk) holding files the driver gives the
/// guest, such as the sandbox token.
pub const GUEST_DIR: &str = ".openshell";
/// File name of the sandbox token inside [`GUEST_DIR`].
pub const TOKEN_FILE: &str = "sandbox-token";

/// How the guest kernel is provided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelSpec {
    /// An ELF vmlinux booted with this command line.
    Elf { path: PathBuf, cmdline: String },
    /// libkrunfw, found by libkrun on the library path.
    Libkrunfw,
}

/// Which executor turns the launch plan into a running VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Executor {
    /// libkrun, in the VMM child's own process.
    Libkrun,
    /// A QEMU `-M microvm` child of the VMM child.
    Qemu {
        binary: PathBuf,
        accel: crate::preflight::QemuAccel,
    },
}

/// The guest's network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum GuestNetwork {
    /// Loopback only.
    None,
    /// libkrun's implicit vsock (TSI).
    Tsi,
    /// A virtio-net NIC backed by a passt process; the guest configures it
    /// by DHCP. `dns`: the guest's resolvers, as the guest reaches them
    /// (see [`crate::passt`]).
    Passt {
        binary: PathBuf,
        #[serde(default)]
        dns: Vec<std::net::IpAddr>,
    },
}

/// Everything the VMM child needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchConfig {
    pub version: u32,
    pub sandbox_id: String,
    /// The guest's root directory on the host (the sandbox's writable root).
    pub rootfs: PathBuf,
    pub kernel: KernelSpec,
    pub vcpus: u8,
    pub mem_mib: u32,
    /// Program the guest init runs, and its arguments after the program.
    pub exec: String,
    pub args: Vec<String>,
    /// Exact guest environment, `KEY=VALUE`.
    pub env: Vec<String>,
    pub workdir: String,
    /// libkrun log level, 0 (off) to 5 (trace).
    pub krun_log_level: u8,
    pub executor: Executor,
    pub network: GuestNetwork,
    /// The sandbox directory: private runtime files (passt's socket) go
    /// below it.
    pub run_dir: PathBuf,
    /// Handed to the guest as a virtual file, never written to disk by the
    /// VMM.
    pub sandbox_token: Option<String>,
}

impl LaunchConfig {
    /// Writes the file with mode 0600, atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| Error::CorruptState {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        crate::state::write_private(path, &json)
    }

    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io("read launch file", path, e))?;
        let config: Self = serde_json::from_slice(&bytes).map_err(|e| Error::CorruptState {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        if config.version != LAUNCH_VERSION {
            return Err(Error::CorruptState {
                path: path.to_owned(),
                message: format!(
                    "launch file version {} is not {LAUNCH_VERSION}",
                    config.version
                ),
            });
        }
        Ok(config)
    }
}

/// Writes `line` to this process's stderr (the driver's status pipe) in
/// one `write`, so that a line never interleaves with what a child sharing
/// that stderr (passt, QEMU) writes there.
pub fn report_status(line: &StatusLine) {
    use std::io::Write as _;
    let text = format!("{}\n", line.render());
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(text.as_bytes());
    let _ = err.flush();
}

/// First word of a status line on the VMM's stderr.
pub const STATUS_PREFIX: &str = "@openshell-vmm";

/// Progress the VMM child reports. Each line carries the `CLOCK_MONOTONIC`
/// time in microseconds at which it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusLine {
    /// The launch file was read; libkrun is being configured.
    Configuring { at_us: u64 },
    /// Configuration done; `krun_start_enter` is being called.
    Entering { at_us: u64 },
    /// The guest kernel opened its root filesystem: the guest booted.
    GuestRoot { at_us: u64 },
    /// Setup failed before libkrun took over; the process exits with a
    /// [`SetupFailure`] code right after.
    SetupFailed { at_us: u64, message: String },
}

impl StatusLine {
    pub fn render(&self) -> String {
        match self {
            Self::Configuring { at_us } => format!("{STATUS_PREFIX} configuring {at_us}"),
            Self::Entering { at_us } => format!("{STATUS_PREFIX} entering {at_us}"),
            Self::GuestRoot { at_us } => format!("{STATUS_PREFIX} guest-root {at_us}"),
            Self::SetupFailed { at_us, message } => {
                let one_line = message.replace(['\n', '\r'], " ");
                format!("{STATUS_PREFIX} setup-failed {at_us} {one_line}")
            }
        }
    }

    /// Parses a line; anything else (log output) is `None`.
    pub fn parse(line: &str) -> Option<Self> {
        let rest = line.strip_prefix(STATUS_PREFIX)?.strip_prefix(' ')?;
        let mut words = rest.splitn(3, ' ');
        let kind = words.next()?;
        let at_us = words.next()?.trim().parse().ok()?;
        match kind {
            "configuring" => Some(Self::Configuring { at_us }),
            "entering" => Some(Self::Entering { at_us }),
            "guest-root" => Some(Self::GuestRoot { at_us }),
            "setup-failed" => Some(Self::SetupFailed {
                at_us,
                message: words.next().unwrap_or("").to_owned(),
            }),
            _ => None,
        }
    }
}

/// Exit codes the VMM child uses for its own failures. They are only used
/// before `krun_start_enter`: from then on libkrun owns the process and the
/// exit code is the guest's. The driver tells the two apart by the
/// `entering` status line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SetupFailure {
    /// Bad command line (the driver and the VMM disagree: a packaging bug).
    Usage = 64,
    /// The launch file is not valid JSON of the expected version.
    LaunchFileInvalid = 65,
    /// The launch file cannot be read.
    LaunchFileMissing = 66,
    /// A libkrun configuration call failed.
    KrunConfig = 70,
    /// `krun_start_enter` returned: the VM could not be built (no KVM
    /// access, kernel not loadable, libkrunfw missing, ...).
    KrunStart = 71,
    /// The driver was already gone, or the parent-death signal could not be
    /// armed.
    ParentGone = 72,
    /// The QEMU executor could not prepare the guest root, start passt or
    /// start QEMU.
    Executor = 73,
}

impl SetupFailure {
    pub fn code(self) -> u8 {
        self as u8
    }

    /// Reports this failure and `error` as a status line; returns the VMM
    /// child's exit code for it.
    pub fn report(self, error: &Error) -> u8 {
        report_status(&StatusLine::SetupFailed {
            at_us: monotonic_us(),
            message: format!(
                "{}: {}",
                self.describe(),
                driver_lifecycle::error_chain(error)
            ),
        });
        self.code()
    }

    pub fn from_code(code: i32) -> Option<Self> {
        [
            Self::Usage,
            Self::LaunchFileInvalid,
            Self::LaunchFileMissing,
            Self::KrunConfig,
            Self::KrunStart,
            Self::ParentGone,
            Self::Executor,
        ]
        .into_iter()
        .find(|f| i32::from(f.code()) == code)
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::Usage => "the VMM was started with a bad command line",
            Self::LaunchFileInvalid => "the launch file is invalid",
            Self::LaunchFileMissing => "the launch file cannot be read",
            Self::KrunConfig => "a libkrun configuration call failed",
            Self::KrunStart => "libkrun could not start the VM",
            Self::ParentGone => "the driver was gone before the VMM started",
            Self::Executor => "the QEMU executor could not start the VM",
        }
    }
}

/// How a VMM child ended, as the driver reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmmExit {
    /// The guest booted and its command exited with this code. Codes 125,
    /// 126 and 127 come from libkrun's guest init (see [`guest_code_meaning`]).
    Guest(i32),
    /// The VMM failed before libkrun took over.
    Setup(SetupFailure),
    /// libkrun ran but the guest never reached its root filesystem: the
    /// kernel did not boot (bad kernel, no hardware virtualization, ...).
    /// Carries the VMM's raw exit code.
    NoBoot(i32),
    /// The VMM was killed by this signal (by the driver on stop, or by
    /// anything else: OOM killer, crash).
    Signal(i32),
}

impl VmmExit {
    /// Classifies an exit. `entered`: the child reported `entering`;
    /// `guest_root`: it reported `guest-root`.
    pub fn classify(status: std::process::ExitStatus, entered: bool, guest_root: bool) -> Self {
        use std::os::unix::process::ExitStatusExt as _;
        if let Some(signal) = status.signal() {
            return Self::Signal(signal);
        }
        let code = status.code().unwrap_or(-1);
        if !entered {
            return match SetupFailure::from_code(code) {
                Some(failure) => Self::Setup(failure),
                None => Self::NoBoot(code),
            };
        }
        if guest_root {
            Self::Guest(code)
        } else {
            Self::NoBoot(code)
        }
    }
}

/// What a guest exit code means when it is one libkrun's init reserves.
pub fn guest_code_meaning(code: i32) -> Option<&'static str> {
    match code {
        125 => Some("libkrun's guest init could not set up the command"),
        126 => Some("the command could not be executed"),
        127 => Some("the command was not found in the image"),
        _ => None,
    }
}

/// `CLOCK_MONOTONIC` in microseconds: comparable between the driver and
/// its VMM children.
pub fn monotonic_us() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|ts| {
            let secs = u64::try_from(ts.tv_sec()).unwrap_or(0);
            let nanos = u64::try_from(ts.tv_nsec()).unwrap_or(0);
            secs.saturating_mul(1_000_000).saturating_add(nanos / 1000)
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt as _;
    use std::process::ExitStatus;

    #[test]
    fn status_lines_round_trip() {
        for line in [
            StatusLine::Configuring { at_us: 1 },
            StatusLine::Entering { at_us: 22 },
            StatusLine::GuestRoot { at_us: 333 },
            StatusLine::SetupFailed {
                at_us: 4,
                message: "libkrun krun_set_root failed: No such file".into(),
            },
        ] {
            assert_eq!(StatusLine::parse(&line.render()), Some(line));
        }
        assert_eq!(StatusLine::parse("[2026] ERROR vmm: boom"), None);
        assert_eq!(StatusLine::parse("@openshell-vmm nonsense 1"), None);
        assert_eq!(StatusLine::parse("@openshell-vmm entering x"), None);
    }

    #[test]
    fn setup_failure_messages_stay_on_one_line() {
        let line = StatusLine::SetupFailed {
            at_us: 1,
            message: "a\nb".into(),
        }
        .render();
        assert!(!line.contains('\n'));
    }

    #[test]
    fn exit_classification() {
        let code = |c: i32| ExitStatus::from_raw(c << 8);
        let signal = ExitStatus::from_raw;
        assert_eq!(VmmExit::classify(code(3), true, true), VmmExit::Guest(3));
        assert_eq!(
            VmmExit::classify(code(127), true, true),
            VmmExit::Guest(127)
        );
        assert_eq!(
            VmmExit::classify(code(71), true, true),
            VmmExit::Guest(71),
            "after entering, 71 is the guest's"
        );
        assert_eq!(
            VmmExit::classify(code(71), false, false),
            VmmExit::Setup(SetupFailure::KrunStart)
        );
        assert_eq!(VmmExit::classify(code(1), true, false), VmmExit::NoBoot(1));
        assert_eq!(VmmExit::classify(code(0), true, false), VmmExit::NoBoot(0));
        assert_eq!(VmmExit::classify(code(1), false, false), VmmExit::NoBoot(1));
        assert_eq!(VmmExit::classify(signal(9), true, true), VmmExit::Signal(9));
    }

    #[test]
    fn setup_codes_are_distinct_from_libkrun_reserved_codes() {
        for failure in [
            SetupFailure::Usage,
            SetupFailure::LaunchFileInvalid,
            SetupFailure::LaunchFileMissing,
            SetupFailure::KrunConfig,
            SetupFailure::KrunStart,
            SetupFailure::ParentGone,
            SetupFailure::Executor,
        ] {
            assert!(guest_code_meaning(i32::from(failure.code())).is_none());
            assert_eq!(
                SetupFailure::from_code(i32::from(failure.code())),
                Some(failure)
            );
        }
        assert!(guest_code_meaning(126).is_some());
    }

    #[test]
    fn launch_file_round_trip_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("launch.json");
        let config = LaunchConfig {
            version: LAUNCH_VERSION,
            sandbox_id: "s1".into(),
            rootfs: "/r".into(),
            kernel: KernelSpec::Elf {
                path: "/k".into(),
                cmdline: "console=hvc0".into(),
            },
            vcpus: 1,
            mem_mib: 128,
            exec: "/bin/sh".into(),
            args: vec!["-c".into(), "echo hi".into()],
            env: vec!["A=b".into()],
            workdir: "/".into(),
            krun_log_level: 2,
            executor: Executor::Qemu {
                binary: "/usr/bin/qemu-system-x86_64".into(),
                accel: crate::preflight::QemuAccel::Tcg,
            },
            network: GuestNetwork::Passt {
                binary: "/usr/bin/passt".into(),
                dns: Vec::new(),
            },
            run_dir: "/s".into(),
            sandbox_token: Some("secret".into()),
        };
        config.write(&path).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(LaunchConfig::read(&path).unwrap(), config);

        std::fs::write(&path, b"{\"version\": 9}").unwrap();
        assert!(LaunchConfig::read(&path).is_err());
    }
}
