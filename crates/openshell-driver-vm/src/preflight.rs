//! What the host offers: a usable `/dev/kvm` backed by hardware
//! virtualization, QEMU and passt, and a guest kernel; and from those the
//! hypervisor backend and guest network the sandboxes get. Checked at
//! startup and again before every create and start, so the messages always
//! describe the host as it is now.

use std::fmt;
use std::io::Read as _;
use std::os::unix::fs::FileTypeExt as _;
use std::path::{Path, PathBuf};

use crate::config::{Config, HypervisorChoice, NetworkMode};
use crate::error::Error;

/// The name libkrun `dlopen`s when no kernel is given.
pub const LIBKRUNFW: &str = "libkrunfw.so.5";
/// Where `scripts/build-guest-kernel.sh` installs the kernel when run as
/// root.
pub const SYSTEM_KERNEL_PATH: &str = "/usr/local/lib/openshell/vmlinux";
/// The script that builds a guest kernel, named in messages.
pub const KERNEL_SCRIPT: &str = "scripts/build-guest-kernel.sh";

#[cfg(target_arch = "x86_64")]
const ELF_MACHINE: u16 = 62;
#[cfg(target_arch = "aarch64")]
const ELF_MACHINE: u16 = 183;
#[cfg(target_arch = "x86_64")]
const ARCH_NAME: &str = "x86-64";
#[cfg(target_arch = "aarch64")]
const ARCH_NAME: &str = "aarch64";

/// Where the host facts are read from. Tests point these at fakes.
#[derive(Debug, Clone)]
pub struct HostPaths {
    pub dev_kvm: PathBuf,
    pub cpuinfo: PathBuf,
    pub sys_module: PathBuf,
    /// Default kernel locations, in lookup order.
    pub kernel_candidates: Vec<PathBuf>,
    /// Directories searched for `libkrunfw.so.5`, in order.
    pub library_dirs: Vec<PathBuf>,
}

impl HostPaths {
    /// The real host.
    pub fn system() -> Self {
        Self {
            dev_kvm: "/dev/kvm".into(),
            cpuinfo: "/proc/cpuinfo".into(),
            sys_module: "/sys/module".into(),
            kernel_candidates: default_kernel_paths(),
            library_dirs: library_dirs(),
        }
    }
}

/// The QEMU system emulator for this architecture.
#[cfg(target_arch = "x86_64")]
pub const QEMU_BINARY: &str = "qemu-system-x86_64";
#[cfg(target_arch = "aarch64")]
pub const QEMU_BINARY: &str = "qemu-system-aarch64";
/// passt, for guest networking.
pub const PASST_BINARY: &str = "passt";

/// The settings that choose the backend and the guest network.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Platform {
    pub hypervisor: Option<HypervisorChoice>,
    pub network: Option<NetworkMode>,
    pub qemu_binary: Option<PathBuf>,
    pub passt_binary: Option<PathBuf>,
}

impl Platform {
    pub fn from_config(config: &Config) -> Self {
        Self {
            hypervisor: Some(config.hypervisor),
            network: config.network,
            qemu_binary: config.qemu_binary.clone(),
            passt_binary: config.passt_binary.clone(),
        }
    }
}

/// How QEMU runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QemuAccel {
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// TCG: software emulation; slower, but runs anywhere.
    Tcg,
}

/// The hypervisor backend that turns a launch plan into a running VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Libkrun,
    Qemu { binary: PathBuf, accel: QemuAccel },
}

impl Backend {
    /// `libkrun`, `qemu-kvm` or `qemu-tcg`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Libkrun => "libkrun",
            Self::Qemu {
                accel: QemuAccel::Kvm,
                ..
            } => "qemu-kvm",
            Self::Qemu {
                accel: QemuAccel::Tcg,
                ..
            } => "qemu-tcg",
        }
    }
}

/// The first executable `name` in `$PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

fn locate(configured: Option<&PathBuf>, name: &str) -> Result<PathBuf, String> {
    match configured {
        Some(path) if path.is_file() => Ok(path.clone()),
        Some(path) => Err(format!(
            "the configured {name} {} does not exist",
            path.display()
        )),
        None => find_on_path(name).ok_or_else(|| format!("{name} is not on PATH")),
    }
}

/// Picks the backend: `(backend, why)`, or why none can run.
fn select_backend(
    choice: HypervisorChoice,
    kvm: &Result<KvmBackend, KvmProblem>,
    qemu: Result<PathBuf, String>,
) -> Result<(Backend, String), String> {
    let install = format!(
        "install QEMU (Debian: apt-get install qemu-system-x86) or set qemu_binary to {QEMU_BINARY}"
    );
    match choice {
        HypervisorChoice::Libkrun => Ok((Backend::Libkrun, "hypervisor = libkrun".to_owned())),
        HypervisorChoice::Qemu => {
            let binary = qemu.map_err(|why| format!("hypervisor = qemu but {why}; {install}"))?;
            let (accel, why) = match kvm {
                Ok(_) => (
                    QemuAccel::Kvm,
                    "hypervisor = qemu, /dev/kvm usable".to_owned(),
                ),
                Err(problem) => (
                    QemuAccel::Tcg,
                    format!("hypervisor = qemu, no usable KVM ({})", short_kvm(problem)),
                ),
            };
            Ok((Backend::Qemu { binary, accel }, why))
        }
        HypervisorChoice::Auto => match (kvm, qemu) {
            (Ok(_), _) => Ok((
                Backend::Libkrun,
                "hypervisor = auto, hardware KVM usable".to_owned(),
            )),
            (Err(problem), Ok(binary)) => Ok((
                Backend::Qemu {
                    binary,
                    accel: QemuAccel::Tcg,
                },
                format!(
                    "hypervisor = auto, no usable KVM ({}): QEMU with TCG software emulation",
                    short_kvm(problem)
                ),
            )),
            (Err(problem), Err(why)) => Err(format!(
                "hypervisor = auto found neither a usable KVM for libkrun ({problem}) nor QEMU \
                 ({why}); {install}"
            )),
        },
    }
}

fn short_kvm(problem: &KvmProblem) -> &'static str {
    match problem {
        KvmProblem::Missing { .. } => "/dev/kvm missing",
        KvmProblem::NotCharDevice { .. } => "/dev/kvm is not a device",
        KvmProblem::NotAccessible { .. } => "/dev/kvm not accessible",
        KvmProblem::Pvm { .. } => "/dev/kvm is PVM",
    }
}

/// Picks the guest network: `(mode, passt binary, note)`.
fn select_network(
    wanted: Option<NetworkMode>,
    backend: Option<&Backend>,
    passt: Result<PathBuf, String>,
) -> Result<(NetworkMode, Option<PathBuf>, String), String> {
    let install = "install passt (Debian: apt-get install passt) or set passt_binary";
    match wanted {
        Some(NetworkMode::Passt) => {
            let binary = passt.map_err(|why| format!("network = passt but {why}; {install}"))?;
            Ok((
                NetworkMode::Passt,
                Some(binary),
                "network = passt".to_owned(),
            ))
        }
        Some(NetworkMode::Tsi) => match backend {
            Some(Backend::Qemu { .. }) => Err(
                "network = tsi is libkrun's own transport and QEMU has none; use passt or none"
                    .to_owned(),
            ),
            _ => Ok((NetworkMode::Tsi, None, "network = tsi".to_owned())),
        },
        Some(NetworkMode::None) => Ok((NetworkMode::None, None, "network = none".to_owned())),
        // libkrun without passt still has its own transport (which needs a
        // libkrunfw kernel).
        None if matches!(backend, Some(Backend::Libkrun)) && passt.is_err() => Ok((
            NetworkMode::Tsi,
            None,
            format!(
                "network default for libkrun without passt: tsi, because {}; {install} for a \
                 NIC",
                passt.err().unwrap_or_default()
            ),
        )),
        None => match passt {
            Ok(binary) => Ok((
                NetworkMode::Passt,
                Some(binary),
                "network default: passt".to_owned(),
            )),
            Err(why) => Ok((
                NetworkMode::None,
                None,
                format!("network default: none, because {why}; {install} for guest networking"),
            )),
        },
    }
}

/// Default kernel locations: the per-user install path of the kernel
/// script, then the system one.
pub fn default_kernel_paths() -> Vec<PathBuf> {
    let mut paths = Vec::new();
    let data_home = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| directories::BaseDirs::new().map(|b| b.home_dir().join(".local/share")));
    if let Some(data_home) = data_home {
        paths.push(data_home.join("openshell/vmlinux"));
    }
    paths.push(SYSTEM_KERNEL_PATH.into());
    paths
}

/// The dynamic linker's search path as far as it matters for
/// `libkrunfw.so.5`: `LD_LIBRARY_PATH`, the directories listed in
/// `/etc/ld.so.conf` (with its `include` lines), then the defaults.
pub fn library_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var("LD_LIBRARY_PATH")
        .unwrap_or_default()
        .split(':')
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .collect();
    read_ld_so_conf(Path::new("/etc/ld.so.conf"), &mut dirs, 0);
    for d in [
        "/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu",
        "/lib/aarch64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/lib64",
        "/usr/lib64",
        "/lib",
        "/usr/lib",
    ] {
        dirs.push(d.into());
    }
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| seen.insert(d.clone()));
    dirs
}

fn read_ld_so_conf(path: &Path, dirs: &mut Vec<PathBuf>, depth: u8) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if let Some(pattern) = line.strip_prefix("include") {
            if depth < 4 {
                for file in expand_include(pattern.trim()) {
                    read_ld_so_conf(&file, dirs, depth + 1);
                }
            }
        } else if line.starts_with('/') {
            dirs.push(line.into());
        }
    }
}

/// `include` lines use a glob, in practice `/etc/ld.so.conf.d/*.conf`.
fn expand_include(pattern: &str) -> Vec<PathBuf> {
    let pattern = Path::new(pattern);
    let (Some(dir), Some(name)) = (pattern.parent(), pattern.file_name()) else {
        return Vec::new();
    };
    let name = name.to_string_lossy();
    let Some((prefix, suffix)) = name.split_once('*') else {
        return vec![pattern.to_owned()];
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(suffix))
        })
        .collect();
    files.sort();
    files
}

/// What serves `/dev/kvm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmBackend {
    Intel,
    Amd,
    /// `/dev/kvm` works but neither kvm_intel, kvm_amd nor kvm_pvm is
    /// loaded (another architecture, or an unusual build). Allowed.
    Other,
}

/// Why `/dev/kvm` cannot run a stock guest kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmProblem {
    Missing {
        path: PathBuf,
    },
    NotCharDevice {
        path: PathBuf,
    },
    NotAccessible {
        path: PathBuf,
        error: String,
    },
    /// PVM: a software hypervisor that only runs PVM-aware guest kernels.
    Pvm {
        path: PathBuf,
    },
}

impl fmt::Display for KvmProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing { path } => write!(
                f,
                "{} does not exist: this host offers no KVM; run the driver on a host with \
                 hardware virtualization (Intel VT-x or AMD-V) and the kvm_intel or kvm_amd \
                 module loaded",
                path.display()
            ),
            Self::NotCharDevice { path } => write!(
                f,
                "{} is not a character device, so it cannot be KVM",
                path.display()
            ),
            Self::NotAccessible { path, error } => write!(
                f,
                "{} is not readable and writable by uid {} ({error}); add the driver's user to \
                 the group that owns it (usually `kvm`) or run the driver as root",
                path.display(),
                nix::unistd::geteuid()
            ),
            Self::Pvm { path } => write!(
                f,
                "{} is served by PVM (the kvm_pvm module is loaded and the CPU reports no vmx or \
                 svm flag); PVM runs only PVM-aware guest kernels, so a stock guest kernel \
                 cannot boot; use a host with hardware virtualization (VT-x or AMD-V, on bare \
                 metal or with nested virtualization)",
                path.display()
            ),
        }
    }
}

/// The guest kernel the VMM will boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kernel {
    /// An ELF vmlinux loaded with `krun_set_kernel`; the driver writes the
    /// kernel command line.
    Elf(PathBuf),
    /// libkrunfw found on the library path; libkrun loads it by itself.
    Libkrunfw(PathBuf),
}

impl Kernel {
    pub fn describe(&self) -> String {
        match self {
            Self::Elf(path) => format!("ELF vmlinux {}", path.display()),
            Self::Libkrunfw(path) => format!("libkrunfw {}", path.display()),
        }
    }
}

/// Why no kernel can be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelProblem {
    ConfiguredMissing {
        path: PathBuf,
    },
    NotElf {
        path: PathBuf,
        detail: String,
    },
    NotFound {
        looked_at: Vec<PathBuf>,
        library_dirs: Vec<PathBuf>,
    },
}

impl fmt::Display for KernelProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ConfiguredMissing { path } => write!(
                f,
                "the configured kernel {} does not exist; build one with {KERNEL_SCRIPT} or fix \
                 the `kernel` setting",
                path.display()
            ),
            Self::NotElf { path, detail } => write!(
                f,
                "the kernel {} is not an uncompressed {ARCH_NAME} ELF vmlinux ({detail}); a \
                 compressed bzImage/vmlinuz cannot be loaded; build one with {KERNEL_SCRIPT}",
                path.display()
            ),
            Self::NotFound {
                looked_at,
                library_dirs,
            } => {
                let files: Vec<String> =
                    looked_at.iter().map(|p| p.display().to_string()).collect();
                write!(
                    f,
                    "no guest kernel: looked for a vmlinux at {} and for {LIBKRUNFW} in the {} \
                     directories of the library search path (LD_LIBRARY_PATH, /etc/ld.so.conf, \
                     the system library directories); run {KERNEL_SCRIPT} (it installs to one of \
                     those vmlinux paths), pass --kernel PATH, or install libkrunfw",
                    files.join(", "),
                    library_dirs.len()
                )
            }
        }
    }
}

/// The chosen guest network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkChoice {
    pub mode: NetworkMode,
    /// The passt binary, for [`NetworkMode::Passt`].
    pub passt: Option<PathBuf>,
    /// How it was chosen (and why not passt, where it fell back).
    pub note: String,
}

/// The preflight result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostReport {
    pub kvm: Result<KvmBackend, KvmProblem>,
    pub kernel: Result<Kernel, KernelProblem>,
    /// The backend and why it was chosen, or why none can run.
    pub backend: Result<(Backend, String), String>,
    pub network: Result<NetworkChoice, String>,
}

impl HostReport {
    /// Looks at the host with the default platform settings (`hypervisor =
    /// auto`, default network). `configured_kernel` is the `kernel` setting.
    pub fn check(paths: &HostPaths, configured_kernel: Option<&Path>) -> Self {
        Self::check_platform(paths, configured_kernel, &Platform::default())
    }

    /// Looks at the host and picks the backend and network `platform` asks
    /// for.
    pub fn check_platform(
        paths: &HostPaths,
        configured_kernel: Option<&Path>,
        platform: &Platform,
    ) -> Self {
        let kvm = check_kvm(paths);
        let backend = select_backend(
            platform.hypervisor.unwrap_or(HypervisorChoice::Auto),
            &kvm,
            locate(platform.qemu_binary.as_ref(), QEMU_BINARY),
        );
        let network = select_network(
            platform.network,
            backend.as_ref().ok().map(|(b, _)| b),
            locate(platform.passt_binary.as_ref(), PASST_BINARY),
        )
        .map(|(mode, passt, note)| NetworkChoice { mode, passt, note });
        Self {
            kvm,
            kernel: find_kernel(paths, configured_kernel),
            backend,
            network,
        }
    }

    /// The error a create or start gets on this host, if any. With
    /// `allow_unsupported_host` only a missing kernel, backend or network
    /// blocks: a KVM that libkrun cannot use is left for the VMM to fail on.
    pub fn blocker(&self, allow_unsupported_host: bool) -> Option<Error> {
        let mut problems = Vec::new();
        match &self.backend {
            Ok((Backend::Libkrun, _)) => {
                if let Err(problem) = &self.kvm
                    && !allow_unsupported_host
                {
                    problems.push(problem.to_string());
                }
            }
            Ok((Backend::Qemu { .. }, _)) => {
                if let Ok(Kernel::Libkrunfw(path)) = &self.kernel {
                    problems.push(format!(
                        "QEMU boots an ELF vmlinux and only {} was found; build one with \
                         {KERNEL_SCRIPT} or pass --kernel",
                        path.display()
                    ));
                }
            }
            Err(problem) => problems.push(problem.clone()),
        }
        if let Err(problem) = &self.kernel {
            problems.push(problem.to_string());
        }
        if let Err(problem) = &self.network {
            problems.push(problem.clone());
        }
        (!problems.is_empty()).then(|| Error::HostUnsupported(problems.join("; ")))
    }

    /// `libkrun`, `qemu-kvm`, `qemu-tcg` or `none`, and the network mode,
    /// for capability reports.
    pub fn platform_label(&self) -> String {
        let backend = self.backend.as_ref().map_or("none", |(b, _)| b.label());
        let network = match &self.network {
            Ok(choice) => match choice.mode {
                NetworkMode::Passt => "passt",
                NetworkMode::Tsi => "tsi",
                NetworkMode::None => "none",
            },
            Err(_) => "unavailable",
        };
        format!("{backend}, network {network}")
    }

    /// One line per fact, for `openshell-driver-vm preflight` and the log.
    pub fn lines(&self) -> Vec<String> {
        let kvm = match &self.kvm {
            Ok(KvmBackend::Intel) => "kvm: ok (kvm_intel)".to_owned(),
            Ok(KvmBackend::Amd) => "kvm: ok (kvm_amd)".to_owned(),
            Ok(KvmBackend::Other) => {
                "kvm: ok (/dev/kvm usable; no kvm_intel, kvm_amd or kvm_pvm module seen)".to_owned()
            }
            Err(problem) => format!("kvm: unsupported: {problem}"),
        };
        let kernel = match &self.kernel {
            Ok(kernel) => format!("kernel: ok ({})", kernel.describe()),
            Err(problem) => format!("kernel: missing: {problem}"),
        };
        let backend = match &self.backend {
            Ok((Backend::Libkrun, why)) => format!("hypervisor: libkrun ({why})"),
            Ok((backend @ Backend::Qemu { binary, .. }, why)) => {
                format!(
                    "hypervisor: {} {} ({why})",
                    backend.label(),
                    binary.display()
                )
            }
            Err(problem) => format!("hypervisor: none: {problem}"),
        };
        let network = match &self.network {
            Ok(NetworkChoice {
                passt: Some(passt),
                note,
                ..
            }) => format!("network: passt {} ({note})", passt.display()),
            Ok(NetworkChoice { note, .. }) => format!("network: {note}"),
            Err(problem) => format!("network: unavailable: {problem}"),
        };
        vec![kvm, kernel, backend, network]
    }

    /// Whether sandboxes can boot here.
    pub fn is_ok(&self) -> bool {
        self.blocker(false).is_none()
    }
}

fn check_kvm(paths: &HostPaths) -> Result<KvmBackend, KvmProblem> {
    let path = paths.dev_kvm.clone();
    let Ok(meta) = std::fs::metadata(&path) else {
        return Err(KvmProblem::Missing { path });
    };
    if !meta.file_type().is_char_device() {
        return Err(KvmProblem::NotCharDevice { path });
    }
    if let Err(errno) = nix::unistd::access(
        &path,
        nix::unistd::AccessFlags::R_OK | nix::unistd::AccessFlags::W_OK,
    ) {
        return Err(KvmProblem::NotAccessible {
            path,
            error: errno.desc().to_owned(),
        });
    }
    let module = |name: &str| paths.sys_module.join(name).exists();
    let flags = cpu_flags(&paths.cpuinfo);
    let hardware = flags.iter().any(|f| f == "vmx" || f == "svm");
    if module("kvm_intel") {
        Ok(KvmBackend::Intel)
    } else if module("kvm_amd") {
        Ok(KvmBackend::Amd)
    } else if module("kvm_pvm") && !hardware {
        Err(KvmProblem::Pvm { path })
    } else {
        Ok(KvmBackend::Other)
    }
}

/// The `flags` of the first CPU in `/proc/cpuinfo`.
fn cpu_flags(cpuinfo: &Path) -> Vec<String> {
    std::fs::read_to_string(cpuinfo)
        .unwrap_or_default()
        .lines()
        .find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == "flags").then(|| value.split_whitespace().map(str::to_owned).collect())
        })
        .unwrap_or_default()
}

fn find_kernel(paths: &HostPaths, configured: Option<&Path>) -> Result<Kernel, KernelProblem> {
    if let Some(path) = configured {
        if !path.exists() {
            return Err(KernelProblem::ConfiguredMissing {
                path: path.to_owned(),
            });
        }
        return check_elf(path).map(|()| Kernel::Elf(path.to_owned()));
    }
    for candidate in &paths.kernel_candidates {
        if candidate.is_file() {
            return check_elf(candidate).map(|()| Kernel::Elf(candidate.clone()));
        }
    }
    for dir in &paths.library_dirs {
        let lib = dir.join(LIBKRUNFW);
        if lib.is_file() {
            return Ok(Kernel::Libkrunfw(lib));
        }
    }
    Err(KernelProblem::NotFound {
        looked_at: paths.kernel_candidates.clone(),
        library_dirs: paths.library_dirs.clone(),
    })
}

/// Checks the ELF header: magic, 64-bit, little-endian, this machine.
pub fn check_elf(path: &Path) -> Result<(), KernelProblem> {
    let not_elf = |detail: String| KernelProblem::NotElf {
        path: path.to_owned(),
        detail,
    };
    let mut header = [0_u8; 20];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .map_err(|e| not_elf(format!("cannot read its header: {e}")))?;
    if header[..4] != *b"\x7fELF" {
        return Err(not_elf("no ELF magic".to_owned()));
    }
    if header[4] != 2 || header[5] != 1 {
        return Err(not_elf("not a 64-bit little-endian ELF".to_owned()));
    }
    let machine = u16::from_le_bytes([header[18], header[19]]);
    if machine != ELF_MACHINE {
        return Err(not_elf(format!(
            "ELF machine {machine}, expected {ELF_MACHINE}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeHost {
        dir: tempfile::TempDir,
    }

    impl FakeHost {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("module")).unwrap();
            Self { dir }
        }
        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }
        fn paths(&self, dev_kvm: PathBuf) -> HostPaths {
            HostPaths {
                dev_kvm,
                cpuinfo: self.path("cpuinfo"),
                sys_module: self.path("module"),
                kernel_candidates: vec![self.path("user-vmlinux"), self.path("system-vmlinux")],
                library_dirs: vec![self.path("lib")],
            }
        }
        fn cpu(&self, flags: &str) {
            std::fs::write(
                self.path("cpuinfo"),
                format!("processor\t: 0\nflags\t\t: fpu {flags} sse\n\nprocessor\t: 1\n"),
            )
            .unwrap();
        }
        fn module(&self, name: &str) {
            std::fs::create_dir_all(self.path("module").join(name)).unwrap();
        }
    }

    fn elf(path: &Path, machine: u16) {
        let mut header = vec![0_u8; 64];
        header[..4].copy_from_slice(b"\x7fELF");
        header[4] = 2;
        header[5] = 1;
        header[18..20].copy_from_slice(&machine.to_le_bytes());
        std::fs::write(path, header).unwrap();
    }

    #[test]
    fn missing_dev_kvm_says_so() {
        let host = FakeHost::new();
        let report = HostReport::check(&host.paths(host.path("kvm")), None);
        let problem = report.kvm.unwrap_err();
        assert!(matches!(problem, KvmProblem::Missing { .. }));
        assert!(problem.to_string().contains("does not exist"));
        assert!(problem.to_string().contains("VT-x"));
    }

    #[test]
    fn a_regular_file_is_not_kvm() {
        let host = FakeHost::new();
        std::fs::write(host.path("kvm"), b"").unwrap();
        let report = HostReport::check(&host.paths(host.path("kvm")), None);
        assert!(matches!(report.kvm, Err(KvmProblem::NotCharDevice { .. })));
    }

    // /dev/null is a character device everyone may read and write, which
    // lets the module and flag logic be tested on any host.
    #[test]
    fn pvm_is_recognised_by_module_and_missing_flags() {
        let host = FakeHost::new();
        host.cpu("hypervisor");
        host.module("kvm");
        host.module("kvm_pvm");
        let report = HostReport::check(&host.paths("/dev/null".into()), None);
        let problem = report.kvm.unwrap_err();
        assert!(matches!(problem, KvmProblem::Pvm { .. }));
        let text = problem.to_string();
        assert!(text.contains("PVM") && text.contains("kvm_pvm"), "{text}");
        assert!(text.contains("vmx"), "{text}");
    }

    #[test]
    fn hardware_kvm_is_accepted() {
        let host = FakeHost::new();
        host.cpu("vmx");
        host.module("kvm_intel");
        let report = HostReport::check(&host.paths("/dev/null".into()), None);
        assert_eq!(report.kvm, Ok(KvmBackend::Intel));

        let host = FakeHost::new();
        host.cpu("svm");
        host.module("kvm_amd");
        host.module("kvm_pvm");
        let report = HostReport::check(&host.paths("/dev/null".into()), None);
        assert_eq!(
            report.kvm,
            Ok(KvmBackend::Amd),
            "real KVM wins over kvm_pvm"
        );
    }

    #[test]
    fn pvm_module_with_hardware_flags_is_not_refused() {
        let host = FakeHost::new();
        host.cpu("vmx");
        host.module("kvm_pvm");
        let report = HostReport::check(&host.paths("/dev/null".into()), None);
        assert_eq!(report.kvm, Ok(KvmBackend::Other));
    }

    #[test]
    fn kernel_lookup_order_and_messages() {
        let host = FakeHost::new();
        let paths = host.paths("/dev/null".into());

        let missing = HostReport::check(&paths, None).kernel.unwrap_err();
        let text = missing.to_string();
        assert!(
            text.contains("user-vmlinux") && text.contains("system-vmlinux"),
            "{text}"
        );
        assert!(
            text.contains(LIBKRUNFW) && text.contains(KERNEL_SCRIPT),
            "{text}"
        );

        std::fs::create_dir_all(host.path("lib")).unwrap();
        std::fs::write(host.path("lib").join(LIBKRUNFW), b"lib").unwrap();
        assert_eq!(
            HostReport::check(&paths, None).kernel,
            Ok(Kernel::Libkrunfw(host.path("lib").join(LIBKRUNFW)))
        );

        elf(&host.path("system-vmlinux"), ELF_MACHINE);
        assert_eq!(
            HostReport::check(&paths, None).kernel,
            Ok(Kernel::Elf(host.path("system-vmlinux"))),
            "an installed vmlinux wins over libkrunfw"
        );

        elf(&host.path("user-vmlinux"), ELF_MACHINE);
        assert_eq!(
            HostReport::check(&paths, None).kernel,
            Ok(Kernel::Elf(host.path("user-vmlinux")))
        );

        elf(&host.path("mine"), ELF_MACHINE);
        assert_eq!(
            HostReport::check(&paths, Some(&host.path("mine"))).kernel,
            Ok(Kernel::Elf(host.path("mine"))),
            "the configured kernel wins"
        );
    }

    #[test]
    fn configured_kernel_must_exist_and_be_an_elf_for_this_machine() {
        let host = FakeHost::new();
        let paths = host.paths("/dev/null".into());
        let err = HostReport::check(&paths, Some(&host.path("nope")))
            .kernel
            .unwrap_err();
        assert!(matches!(err, KernelProblem::ConfiguredMissing { .. }));

        std::fs::write(host.path("bz"), b"MZ\x00\x00 this is a bzImage").unwrap();
        let err = HostReport::check(&paths, Some(&host.path("bz")))
            .kernel
            .unwrap_err();
        assert!(err.to_string().contains("no ELF magic"), "{err}");
        assert!(err.to_string().contains("bzImage"), "{err}");

        elf(&host.path("arm"), ELF_MACHINE.wrapping_add(1));
        let err = HostReport::check(&paths, Some(&host.path("arm")))
            .kernel
            .unwrap_err();
        assert!(err.to_string().contains("ELF machine"), "{err}");
    }

    #[test]
    fn blocker_respects_the_override_but_never_skips_the_kernel() {
        let report = HostReport {
            kvm: Err(KvmProblem::Pvm {
                path: "/dev/kvm".into(),
            }),
            kernel: Ok(Kernel::Elf("/k".into())),
            backend: Ok((Backend::Libkrun, "test".into())),
            network: Ok(NetworkChoice {
                mode: NetworkMode::None,
                passt: None,
                note: "test".into(),
            }),
        };
        let err = report.blocker(false).unwrap();
        assert!(matches!(err, Error::HostUnsupported(_)));
        assert!(err.to_string().contains("PVM"));
        assert!(report.blocker(true).is_none());

        let no_kernel = HostReport {
            kvm: Ok(KvmBackend::Intel),
            kernel: Err(KernelProblem::ConfiguredMissing { path: "/k".into() }),
            ..report.clone()
        };
        assert!(no_kernel.blocker(true).is_some());

        let qemu = HostReport {
            backend: Ok((
                Backend::Qemu {
                    binary: "/q".into(),
                    accel: QemuAccel::Tcg,
                },
                "test".into(),
            )),
            ..report.clone()
        };
        assert!(qemu.blocker(false).is_none(), "TCG does not need KVM");
        let qemu_libkrunfw = HostReport {
            kernel: Ok(Kernel::Libkrunfw("/lib/libkrunfw.so.5".into())),
            ..qemu
        };
        let err = qemu_libkrunfw.blocker(false).unwrap().to_string();
        assert!(err.contains("ELF vmlinux"), "{err}");
    }

    #[test]
    fn backend_selection_follows_kvm_and_qemu() {
        let pvm: Result<KvmBackend, KvmProblem> = Err(KvmProblem::Pvm {
            path: "/dev/kvm".into(),
        });
        let qemu = || Ok(PathBuf::from("/usr/bin/qemu-system-x86_64"));
        let missing = || Err("qemu-system-x86_64 is not on PATH".to_owned());
        let (backend, why) = select_backend(HypervisorChoice::Auto, &pvm, qemu()).unwrap();
        assert_eq!(backend.label(), "qemu-tcg");
        assert!(why.contains("PVM"), "{why}");
        let (backend, _) =
            select_backend(HypervisorChoice::Auto, &Ok(KvmBackend::Intel), qemu()).unwrap();
        assert_eq!(backend, Backend::Libkrun);
        let (backend, _) =
            select_backend(HypervisorChoice::Qemu, &Ok(KvmBackend::Amd), qemu()).unwrap();
        assert_eq!(backend.label(), "qemu-kvm");
        let err = select_backend(HypervisorChoice::Auto, &pvm, missing()).unwrap_err();
        assert!(err.contains("apt-get install qemu-system-x86"), "{err}");
        let err = select_backend(HypervisorChoice::Qemu, &pvm, missing()).unwrap_err();
        assert!(err.contains("hypervisor = qemu"), "{err}");
        let (backend, _) = select_backend(HypervisorChoice::Libkrun, &pvm, missing()).unwrap();
        assert_eq!(backend, Backend::Libkrun);
    }

    #[test]
    fn network_defaults_to_passt_where_installed() {
        let passt = || Ok(PathBuf::from("/usr/bin/passt"));
        let missing = || Err("passt is not on PATH".to_owned());
        let (mode, binary, _) = select_network(None, None, passt()).unwrap();
        assert_eq!(
            (mode, binary),
            (NetworkMode::Passt, Some("/usr/bin/passt".into()))
        );
        let (mode, _, note) = select_network(None, None, missing()).unwrap();
        assert_eq!(mode, NetworkMode::None);
        assert!(note.contains("passt is not on PATH"), "{note}");
        let err = select_network(Some(NetworkMode::Passt), None, missing()).unwrap_err();
        assert!(err.contains("apt-get install passt"), "{err}");
        let qemu = Backend::Qemu {
            binary: "/q".into(),
            accel: QemuAccel::Tcg,
        };
        let err = select_network(Some(NetworkMode::Tsi), Some(&qemu), passt()).unwrap_err();
        assert!(err.contains("tsi"), "{err}");
        let (mode, _, _) = select_network(None, Some(&Backend::Libkrun), passt()).unwrap();
        assert_eq!(mode, NetworkMode::Passt, "libkrun gets a passt NIC too");
        let (mode, _, note) = select_network(None, Some(&Backend::Libkrun), missing()).unwrap();
        assert_eq!(mode, NetworkMode::Tsi, "{note}");
        let (mode, _, _) =
            select_network(Some(NetworkMode::Passt), Some(&Backend::Libkrun), passt()).unwrap();
        assert_eq!(mode, NetworkMode::Passt);
    }

    #[test]
    fn ld_so_conf_includes_are_followed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("ld.so.conf.d");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("a.conf"), "/opt/a/lib\n# comment\n").unwrap();
        std::fs::write(d.join("b.conf"), "/opt/b/lib # trailing\n").unwrap();
        std::fs::write(d.join("ignored.txt"), "/opt/c/lib\n").unwrap();
        let conf = dir.path().join("ld.so.conf");
        std::fs::write(&conf, format!("include {}/*.conf\n/opt/top\n", d.display())).unwrap();
        let mut dirs = Vec::new();
        read_ld_so_conf(&conf, &mut dirs, 0);
        assert_eq!(
            dirs,
            vec![
                PathBuf::from("/opt/a/lib"),
                PathBuf::from("/opt/b/lib"),
                PathBuf::from("/opt/top")
            ]
        );
    }
}
