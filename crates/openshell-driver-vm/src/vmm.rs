//! The VMM child: `openshell-driver-vm vmm <launch-file>`, one process per
//! sandbox VM.
//!
//! In order (after `main` has closed inherited descriptors): arm the
//! parent-death signal (so the VM dies with the driver), install a logger that receives libkrun's
//! log, read the launch file, configure libkrun, start a thread that
//! watches for the guest reaching its root filesystem, report `entering`,
//! and call `krun_start_enter`, which runs the VM on this thread and exits
//! the process with the guest's exit code.
//!
//! Descriptors: stdout is the console pipe to the driver (the guest's hvc0,
//! and ttyS0 for ELF kernels, land there); stderr is the log pipe: libkrun's
//! log lines and the status lines of [`crate::launch::StatusLine`].

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::launch::{
    GUEST_DIR, KernelSpec, LaunchConfig, ROOT_TAG, SetupFailure, StatusLine, TOKEN_FILE,
    monotonic_us,
};
use crate::libkrun::Context;

/// Environment variable with the driver's pid, checked after arming the
/// parent-death signal.
pub const PARENT_PID_ENV: &str = "OPENSHELL_VMM_PARENT_PID";

/// The console path libkrun opens: this process's stdout (a pipe, so
/// reopening it does not truncate anything).
const CONSOLE_PATH: &str = "/proc/self/fd/1";

/// Runs the VMM. Returns an exit code only when the VM could not be
/// started; otherwise libkrun ends the process.
pub fn run(launch_file: &Path) -> u8 {
    if let Err(error) = arm_parent_death() {
        return SetupFailure::ParentGone.report(&error);
    }
    crate::launch::report_status(&StatusLine::Configuring {
        at_us: monotonic_us(),
    });
    let config = match LaunchConfig::read(launch_file) {
        Ok(config) => config,
        Err(error @ Error::Io { .. }) => return SetupFailure::LaunchFileMissing.report(&error),
        Err(error) => return SetupFailure::LaunchFileInvalid.report(&error),
    };
    if let crate::launch::Executor::Qemu { binary, accel } = &config.executor {
        return crate::qemu::run(&config, binary, *accel);
    }
    install_logger(config.krun_log_level, &config.rootfs);
    raise_nofile_limit();
    let ctx = match configure(&config) {
        Ok(ctx) => ctx,
        Err(error) => return SetupFailure::KrunConfig.report(&error),
    };
    start_root_watch();
    crate::launch::report_status(&StatusLine::Entering {
        at_us: monotonic_us(),
    });
    let error = ctx.start_enter();
    SetupFailure::KrunStart.report(&error)
}

/// `PR_SET_PDEATHSIG(SIGKILL)`, then a check that the parent is still the
/// driver that started us (it may have died before the signal was armed).
fn arm_parent_death() -> Result<()> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(|e| Error::io("arm the parent-death signal for", "the VMM", e.into()))?;
    let expected = std::env::var(PARENT_PID_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok());
    let parent = nix::unistd::getppid().as_raw();
    match expected {
        Some(pid) if pid == parent => Ok(()),
        Some(pid) => Err(Error::Setting(format!(
            "the driver (pid {pid}) exited before the VMM started"
        ))),
        None => Err(Error::Setting(format!(
            "{PARENT_PID_ENV} is not set; the vmm subcommand is started by the driver only"
        ))),
    }
}

/// virtio-fs keeps a descriptor per guest inode in use; let it have as many
/// as the hard limit allows.
fn raise_nofile_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn configure(config: &LaunchConfig) -> Result<Context> {
    let ctx = Context::new()?;
    ctx.set_vm_config(config.vcpus, config.mem_mib)?;
    let tag = match &config.kernel {
        KernelSpec::Elf { path, cmdline } => {
            ctx.set_root_with_tag(ROOT_TAG, &config.rootfs)?;
            ctx.set_elf_kernel(path, cmdline)?;
            // Early boot messages (before the virtio console exists) go to
            // ttyS0, which lands in the same console stream.
            let serial = nix::unistd::dup(std::io::stdout())
                .map_err(|e| Error::io("duplicate", "stdout", e.into()))?;
            ctx.add_serial_console(serial)?;
            ROOT_TAG
        }
        KernelSpec::Libkrunfw => {
            ctx.set_root(&config.rootfs)?;
            "/dev/root"
        }
    };
    if let Some(token) = &config.sandbox_token {
        // Lives as long as the process, as libkrun requires.
        let data: &'static [u8] = Box::leak(format!("{token}\n").into_bytes().into_boxed_slice());
        ctx.add_virtual_file(tag, GUEST_DIR, TOKEN_FILE, data, 0o400)?;
    }
    ctx.set_workdir(&config.workdir)?;
    ctx.set_exec(&config.exec, &config.args, &config.env)?;
    ctx.set_console_output(Path::new(CONSOLE_PATH))?;
    match &config.network {
        crate::launch::GuestNetwork::Tsi => {}
        crate::launch::GuestNetwork::None => ctx.disable_vsock()?,
        crate::launch::GuestNetwork::Passt { binary, dns } => {
            crate::passt::write_resolv_conf(&config.rootfs, dns)?;
            let (passt, socket) = crate::passt::start_on_fd(binary, &config.run_dir, dns)?;
            ctx.add_passt_nic(socket)?;
            // The NIC replaces TSI.
            ctx.disable_vsock()?;
            // Not waited for: libkrun ends this process when the guest
            // stops, and passt's parent-death signal then ends passt.
            drop(passt);
        }
    }
    Ok(ctx)
}

/// Detects the guest reaching its root filesystem: libkrun's virtio-fs
/// server opens a host descriptor below the shared directory for every
/// guest lookup, so the first such descriptor means the guest kernel has
/// mounted its root. Checked by a polling thread and, synchronously, on
/// every libkrun log record (libkrun logs "Vmm is stopping" right before it
/// exits the process, so a guest that ran and exited between two polls is
/// still seen).
struct RootWatch {
    prefix: PathBuf,
    seen: AtomicBool,
}

static ROOT_WATCH: OnceLock<RootWatch> = OnceLock::new();

impl RootWatch {
    /// True once the guest has touched its root; reports it the first time.
    fn check(&self) -> bool {
        if self.seen.load(Ordering::Acquire) {
            return true;
        }
        if !self.guest_descriptor_open() {
            return false;
        }
        if self
            .seen
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            crate::launch::report_status(&StatusLine::GuestRoot {
                at_us: monotonic_us(),
            });
        }
        true
    }

    fn guest_descriptor_open(&self) -> bool {
        let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
            return false;
        };
        entries.filter_map(|e| e.ok()).any(|entry| {
            std::fs::read_link(entry.path())
                .is_ok_and(|target| target.starts_with(&self.prefix) && target != self.prefix)
        })
    }
}

fn start_root_watch() {
    let _ = std::thread::Builder::new()
        .name("root-watch".into())
        .spawn(|| {
            let Some(watch) = ROOT_WATCH.get() else {
                return;
            };
            let mut interval = Duration::from_millis(2);
            while !watch.check() {
                std::thread::sleep(interval);
                interval = (interval * 3 / 2).min(Duration::from_millis(25));
            }
        });
}

/// Receives libkrun's `log` records: prints those at or above the
/// configured level to stderr with the time since the VMM started, and
/// checks for the guest root on each one.
struct VmmLogger {
    print: log::LevelFilter,
    started: Instant,
}

impl log::Log for VmmLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= self.print
    }

    fn log(&self, record: &log::Record<'_>) {
        if let Some(watch) = ROOT_WATCH.get() {
            watch.check();
        }
        if !self.enabled(record.metadata()) {
            return;
        }
        let elapsed = self.started.elapsed();
        let mut err = std::io::stderr().lock();
        let _ = writeln!(
            err,
            "[{:>4}.{:06}] {:<5} {}: {}",
            elapsed.as_secs(),
            elapsed.subsec_micros(),
            record.level(),
            record.target(),
            record.args()
        );
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

fn install_logger(krun_level: u8, rootfs: &Path) {
    let _ = ROOT_WATCH.set(RootWatch {
        prefix: std::fs::canonicalize(rootfs).unwrap_or_else(|_| rootfs.to_owned()),
        seen: AtomicBool::new(false),
    });
    let print = match krun_level {
        0 => log::LevelFilter::Off,
        1 => log::LevelFilter::Error,
        2 => log::LevelFilter::Warn,
        3 => log::LevelFilter::Info,
        4 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    let logger = Box::leak(Box::new(VmmLogger {
        print,
        started: Instant::now(),
    }));
    if log::set_logger(logger).is_ok() {
        // Info records always reach the logger (they are rare): libkrun's
        // "Vmm is stopping" is one, and it triggers the last root check.
        log::set_max_level(print.max(log::LevelFilter::Info));
    }
}
