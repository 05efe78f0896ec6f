//! Driver settings: one struct serves as the command-line flags and as the
//! keys of an optional TOML file (`--driver-config`, the table a gateway
//! writes for a managed driver). Flags win over the file; unknown keys in
//! the file are an error naming the key, the file and the line.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use openshell_driver_kit::contract::{AdmissionPolicy, ResourceAdmission};
use serde::Deserialize;

use crate::error::{Error, Result};

/// How each sandbox gets its own writable root filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LayerMode {
    /// An overlayfs mount over the shared image; a full copy (with a
    /// warning) where overlayfs cannot be mounted.
    Auto,
    /// Only overlayfs; creating a sandbox fails where it cannot be mounted.
    Overlay,
    /// A full private copy of the image per sandbox.
    Copy,
}

/// Which hypervisor runs the sandboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum HypervisorChoice {
    /// libkrun where hardware KVM is usable, else QEMU with KVM where
    /// `/dev/kvm` works for it, else QEMU with TCG (software emulation).
    Auto,
    /// libkrun only (needs hardware KVM).
    Libkrun,
    /// QEMU `-M microvm` only: KVM acceleration where usable, else TCG.
    Qemu,
}

/// Guest networking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// A virtio-net NIC served by passt in user mode (DHCP, DNS forwarding,
    /// NAT; the host's loopback is reachable as the gateway address).
    Passt,
    /// libkrun's transparent socket impersonation: guest sockets are opened
    /// by the VMM process on the host. Needs a TSI-aware guest kernel
    /// (libkrunfw's); with another kernel the guest has loopback only.
    Tsi,
    /// No network device at all.
    None,
}

/// The driver's settings as given: command-line flags, and the same keys
/// (snake_case) in a driver-config file. Every one is optional; the
/// defaults are applied by [`ConfigArgs::resolve`].
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigArgs {
    /// TOML file with driver settings (the keys below, snake_case).
    #[arg(long, value_name = "PATH")]
    #[serde(skip)]
    pub driver_config: Option<PathBuf>,

    /// Name of this driver instance as the gateway knows it [default: vm].
    #[arg(long)]
    pub name: Option<String>,

    /// Where sandboxes, the image cache and logs live
    /// [default: $XDG_STATE_HOME/openshell/vm-driver].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Guest kernel: an uncompressed x86-64 ELF vmlinux. Without it the
    /// driver looks at the install paths of scripts/build-guest-kernel.sh,
    /// then for libkrunfw.so.5 on the library path.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// Extra guest kernel command-line arguments (ELF kernels only), e.g.
    /// "loglevel=7" to see the whole boot log in the console.
    #[arg(long, value_name = "ARGS")]
    pub kernel_args: Option<String>,

    /// vCPUs per sandbox unless the sandbox asks for a size [default: 2].
    #[arg(long)]
    pub vcpus: Option<u8>,

    /// Guest memory per sandbox in MiB unless the sandbox asks for a size
    /// [default: 1024].
    #[arg(long, value_name = "MIB")]
    pub mem_mib: Option<u32>,

    /// Image for sandboxes that name none.
    #[arg(long, value_name = "IMAGE")]
    pub default_image: Option<String>,

    /// Create sandboxes even where /dev/kvm is missing, not writable or
    /// served by PVM. The VMM then starts and the guest fails to boot, which
    /// is reported as BootFailed; for testing the host-side path.
    #[arg(long)]
    #[serde(default)]
    pub allow_unsupported_host: bool,

    /// libkrun's log level in each sandbox's vmm.log: 0 off, 1 error,
    /// 2 warn, 3 info, 4 debug, 5 trace [default: 2].
    #[arg(long, value_name = "0-5")]
    pub krun_log_level: Option<u8>,

    /// The driver's own log filter (RUST_LOG syntax) [default: info].
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,

    /// How each sandbox gets its writable root [default: auto].
    #[arg(long, value_enum)]
    pub writable_layer: Option<LayerMode>,

    /// Guest networking [default: passt where the passt binary is
    /// installed, else none].
    #[arg(long, value_enum)]
    pub network: Option<NetworkMode>,

    /// Hypervisor backend [default: auto].
    #[arg(long, value_enum)]
    pub hypervisor: Option<HypervisorChoice>,

    /// QEMU binary for the qemu backend [default: qemu-system-x86_64 (or
    /// qemu-system-aarch64) on PATH].
    #[arg(long, value_name = "PATH")]
    pub qemu_binary: Option<PathBuf>,

    /// passt binary for passt networking [default: passt on PATH].
    #[arg(long, value_name = "PATH")]
    pub passt_binary: Option<PathBuf>,

    /// DNS resolver for guests with passt networking, written into each
    /// guest's /etc/resolv.conf as the guest reaches it through passt
    /// (127.0.0.1 becomes the guest's gateway; other loopback addresses are
    /// unreachable); repeat for more [default: the host's
    /// /etc/resolv.conf].
    #[arg(long = "dns-server", value_name = "IP")]
    #[serde(default)]
    pub dns_servers: Vec<IpAddr>,

    /// A guest that has not reached its root filesystem after this many
    /// seconds is stopped and reported as BootFailed; 0 waits forever
    /// [default: 60].
    #[arg(long, value_name = "SECS")]
    pub boot_timeout_secs: Option<u64>,

    /// How long a VMM gets after SIGTERM before SIGKILL [default: 5].
    #[arg(long, value_name = "SECS")]
    pub stop_timeout_secs: Option<u64>,

    /// Console log size, in MiB, at which it is rotated to console.log.1
    /// [default: 16].
    #[arg(long, value_name = "MIB")]
    pub console_log_max_mib: Option<u64>,

    /// Whether a sandbox may size its VM through template.driver_config
    /// (keys vcpus and mem_mib); with false such a request is refused.
    /// Part of the admission policy reported to 1.x gateways, which must
    /// be configured the same way [default: true].
    #[arg(long, value_name = "BOOL")]
    pub allow_driver_config: Option<bool>,

    /// A registry (HOST or HOST:PORT, as in the image reference) pulled
    /// from over plain HTTP, e.g. a local registry on 127.0.0.1:5000; every
    /// other registry is pulled from over HTTPS. Repeatable; the file's
    /// list and the flags' are combined.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    #[serde(default)]
    pub insecure_registries: Vec<String>,

    /// Registry credentials: a containers/docker auth file (`{"auths":
    /// {"HOST[:PORT]": {"auth": base64("user:pass")}}}`) [default:
    /// $REGISTRY_AUTH_FILE, else $XDG_RUNTIME_DIR/containers/auth.json, else
    /// ~/.docker/config.json, the first that exists; anonymous without one].
    #[arg(long, value_name = "PATH")]
    pub registry_auth_file: Option<PathBuf>,

    /// How long pulling one image from a registry may take, in seconds
    /// [default: 300].
    #[arg(long, value_name = "SECS")]
    pub pull_timeout_secs: Option<u64>,

    /// The resource-admission half of the admission policy reported to 1.x
    /// gateways (file only: a `[resource_admission]` table with `enabled`
    /// and `required_labels`). The gateway enforces it; the driver only
    /// acknowledges it [default: the upstream default].
    #[arg(skip)]
    pub resource_admission: Option<ResourceAdmission>,
}

/// The settings the driver runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub name: String,
    pub state_dir: PathBuf,
    pub kernel: Option<PathBuf>,
    pub kernel_args: String,
    pub vcpus: u8,
    pub mem_mib: u32,
    pub default_image: Option<String>,
    pub allow_unsupported_host: bool,
    pub krun_log_level: u8,
    pub log_level: String,
    pub writable_layer: LayerMode,
    /// `None`: passt where available, else none.
    pub network: Option<NetworkMode>,
    pub hypervisor: HypervisorChoice,
    pub qemu_binary: Option<PathBuf>,
    pub passt_binary: Option<PathBuf>,
    /// Where passt forwards guest DNS queries; empty: the host's resolvers.
    pub dns_servers: Vec<IpAddr>,
    pub boot_timeout: Option<Duration>,
    pub stop_timeout: Duration,
    pub console_log_max_bytes: u64,
    /// The admission policy: whether caller driver_config is accepted, and
    /// what is reported to 1.x gateways.
    pub admission: AdmissionPolicy,
    /// Registries pulled from over plain HTTP (`HOST[:PORT]`, lowercase).
    pub insecure_registries: Vec<String>,
    /// The auth file given in the settings; `None`: the standard lookup.
    pub registry_auth_file: Option<PathBuf>,
    pub pull_timeout: Duration,
}

/// Smallest guest memory accepted, in MiB.
pub const MIN_MEM_MIB: u32 = 64;
/// Largest guest memory accepted, in MiB (1 TiB).
pub const MAX_MEM_MIB: u32 = 1 << 20;

impl ConfigArgs {
    /// Reads the keys of the driver-config file `path`. Errors name the
    /// file and, where the TOML parser points at one, the line.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
        toml::from_str(&text).map_err(|e| {
            // One line: the message and the offending line of the file.
            let location = e
                .span()
                .map(|span| {
                    let start = span.start.min(text.len());
                    let line_no = text[..start].matches('\n').count() + 1;
                    let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
                    format!(" (line {line_no}: {line})")
                })
                .unwrap_or_default();
            Error::Config {
                path: path.to_owned(),
                message: format!("{}{location}", e.message().trim()),
            }
        })
    }

    /// Each setting given here wins over the one in `file`.
    fn over(self, file: Self) -> Self {
        Self {
            driver_config: self.driver_config,
            name: self.name.or(file.name),
            state_dir: self.state_dir.or(file.state_dir),
            kernel: self.kernel.or(file.kernel),
            kernel_args: self.kernel_args.or(file.kernel_args),
            vcpus: self.vcpus.or(file.vcpus),
            mem_mib: self.mem_mib.or(file.mem_mib),
            default_image: self.default_image.or(file.default_image),
            allow_unsupported_host: self.allow_unsupported_host || file.allow_unsupported_host,
            krun_log_level: self.krun_log_level.or(file.krun_log_level),
            log_level: self.log_level.or(file.log_level),
            writable_layer: self.writable_layer.or(file.writable_layer),
            network: self.network.or(file.network),
            hypervisor: self.hypervisor.or(file.hypervisor),
            qemu_binary: self.qemu_binary.or(file.qemu_binary),
            passt_binary: self.passt_binary.or(file.passt_binary),
            dns_servers: if self.dns_servers.is_empty() {
                file.dns_servers
            } else {
                self.dns_servers
            },
            boot_timeout_secs: self.boot_timeout_secs.or(file.boot_timeout_secs),
            stop_timeout_secs: self.stop_timeout_secs.or(file.stop_timeout_secs),
            console_log_max_mib: self.console_log_max_mib.or(file.console_log_max_mib),
            allow_driver_config: self.allow_driver_config.or(file.allow_driver_config),
            resource_admission: self.resource_admission.or(file.resource_admission),
            insecure_registries: file
                .insecure_registries
                .into_iter()
                .chain(self.insecure_registries)
                .collect(),
            registry_auth_file: self.registry_auth_file.or(file.registry_auth_file),
            pull_timeout_secs: self.pull_timeout_secs.or(file.pull_timeout_secs),
        }
    }

    /// Merges the file (if any) with the flags, fills in the defaults and
    /// checks the result.
    pub fn resolve(&self) -> Result<Config> {
        let given = match &self.driver_config {
            Some(path) => self.clone().over(Self::from_file(path)?),
            None => self.clone(),
        };
        let state_dir = match given.state_dir {
            Some(dir) => dir,
            None => default_state_dir()?,
        };
        let config = Config {
            name: given.name.unwrap_or_else(|| "vm".to_owned()),
            state_dir,
            kernel: given.kernel,
            kernel_args: given.kernel_args.unwrap_or_default(),
            vcpus: given.vcpus.unwrap_or(2),
            mem_mib: given.mem_mib.unwrap_or(1024),
            default_image: given.default_image.filter(|s| !s.trim().is_empty()),
            allow_unsupported_host: given.allow_unsupported_host,
            krun_log_level: given.krun_log_level.unwrap_or(2),
            log_level: given.log_level.unwrap_or_else(|| "info".to_owned()),
            writable_layer: given.writable_layer.unwrap_or(LayerMode::Auto),
            network: given.network,
            hypervisor: given.hypervisor.unwrap_or(HypervisorChoice::Auto),
            qemu_binary: given.qemu_binary,
            passt_binary: given.passt_binary,
            dns_servers: given.dns_servers,
            boot_timeout: match given.boot_timeout_secs.unwrap_or(60) {
                0 => None,
                secs => Some(Duration::from_secs(secs)),
            },
            stop_timeout: Duration::from_secs(given.stop_timeout_secs.unwrap_or(5)),
            console_log_max_bytes: given
                .console_log_max_mib
                .unwrap_or(16)
                .saturating_mul(1 << 20),
            // The VM driver took caller driver_config (vcpus, mem_mib)
            // before admission policies existed; it still does unless told
            // otherwise.
            admission: AdmissionPolicy {
                allow_driver_config: given.allow_driver_config.unwrap_or(true),
                resource_admission: given.resource_admission.unwrap_or_default(),
            },
            insecure_registries: given
                .insecure_registries
                .iter()
                .map(|entry| entry.trim().to_ascii_lowercase())
                .collect(),
            registry_auth_file: given.registry_auth_file,
            pull_timeout: Duration::from_secs(given.pull_timeout_secs.unwrap_or(300)),
        };
        config
            .validate()
            .map_err(|message| match &self.driver_config {
                Some(path) => Error::Config {
                    path: path.clone(),
                    message,
                },
                None => Error::Setting(message),
            })?;
        Ok(config)
    }
}

impl Config {
    fn validate(&self) -> std::result::Result<(), String> {
        if !self.state_dir.is_absolute() {
            return Err(format!(
                "state_dir {} is relative; give an absolute path",
                self.state_dir.display()
            ));
        }
        if let Some(kernel) = &self.kernel
            && !kernel.is_absolute()
        {
            return Err(format!(
                "kernel {} is relative; give an absolute path",
                kernel.display()
            ));
        }
        for (key, path) in [
            ("qemu_binary", &self.qemu_binary),
            ("passt_binary", &self.passt_binary),
            ("registry_auth_file", &self.registry_auth_file),
        ] {
            if let Some(path) = path
                && !path.is_absolute()
            {
                return Err(format!(
                    "{key} {} is relative; give an absolute path",
                    path.display()
                ));
            }
        }
        if let Some(bad) = self
            .dns_servers
            .iter()
            .find(|ip| ip.is_unspecified() || ip.is_multicast())
        {
            return Err(format!(
                "dns_servers entry {bad} is not a resolver's address; give the unicast address of \
                 a DNS server (port 53), e.g. 127.0.0.1 for one on the host's loopback"
            ));
        }
        if self.vcpus == 0 {
            return Err("vcpus must be at least 1".to_owned());
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(format!(
                "mem_mib {} is out of range; use {MIN_MEM_MIB} to {MAX_MEM_MIB}",
                self.mem_mib
            ));
        }
        if self.krun_log_level > 5 {
            return Err(format!(
                "krun_log_level {} is out of range; use 0 (off) to 5 (trace)",
                self.krun_log_level
            ));
        }
        if self.name.trim().is_empty() {
            return Err("name must not be empty".to_owned());
        }
        if let Some(bad) = self
            .kernel_args
            .chars()
            .find(|c| !matches!(c, ' '..='~') || *c == '"')
        {
            return Err(format!(
                "kernel_args may only hold printable ASCII without double quotes; found {bad:?}"
            ));
        }
        if self.stop_timeout.is_zero() {
            return Err("stop_timeout_secs must be at least 1".to_owned());
        }
        if self.console_log_max_bytes == 0 {
            return Err("console_log_max_mib must be at least 1".to_owned());
        }
        if self.pull_timeout.is_zero() {
            return Err("pull_timeout_secs must be at least 1".to_owned());
        }
        for entry in &self.insecure_registries {
            openshell_driver_kit::registry::check_insecure_registry(entry)?;
        }
        Ok(())
    }
}

/// `$XDG_STATE_HOME/openshell/vm-driver`, or `~/.local/state/...`.
pub fn default_state_dir() -> Result<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| directories::BaseDirs::new().map(|b| b.home_dir().join(".local/state")))
        .ok_or_else(|| {
            Error::Setting(
                "no state directory: HOME and XDG_STATE_HOME are unset; pass --state-dir"
                    .to_owned(),
            )
        })?;
    Ok(base.join("openshell").join("vm-driver"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("vm.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn args_with_file(path: PathBuf) -> ConfigArgs {
        ConfigArgs {
            driver_config: Some(path),
            ..ConfigArgs::default()
        }
    }

    #[test]
    fn file_keys_are_read_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            r#"
name = "vm"
state_dir = "/var/lib/gw/drivers/vm"
vcpus = 4
mem_mib = 512
default_image = "oci:/images/busybox:latest"
allow_unsupported_host = true
krun_log_level = 3
writable_layer = "copy"
network = "none"
hypervisor = "qemu"
boot_timeout_secs = 0
dns_servers = ["127.77.0.1", "::1"]
"#,
        );
        let mut args = args_with_file(path);
        let config = args.resolve().unwrap();
        assert_eq!(config.state_dir, PathBuf::from("/var/lib/gw/drivers/vm"));
        assert_eq!(config.vcpus, 4);
        assert_eq!(config.mem_mib, 512);
        assert!(config.allow_unsupported_host);
        assert_eq!(config.writable_layer, LayerMode::Copy);
        assert_eq!(config.network, Some(NetworkMode::None));
        assert_eq!(config.hypervisor, HypervisorChoice::Qemu);
        assert_eq!(config.boot_timeout, None);
        assert_eq!(
            config.dns_servers,
            [
                "127.77.0.1".parse::<IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
        assert_eq!(
            config.default_image.as_deref(),
            Some("oci:/images/busybox:latest")
        );

        args.vcpus = Some(1);
        args.state_dir = Some("/tmp/other".into());
        args.writable_layer = Some(LayerMode::Overlay);
        args.dns_servers = vec!["10.1.2.3".parse().unwrap()];
        let config = args.resolve().unwrap();
        assert_eq!(config.dns_servers, ["10.1.2.3".parse::<IpAddr>().unwrap()]);
        assert_eq!(config.vcpus, 1);
        assert_eq!(config.state_dir, PathBuf::from("/tmp/other"));
        assert_eq!(config.writable_layer, LayerMode::Overlay);
        assert_eq!(
            config.mem_mib, 512,
            "file value kept where no flag is given"
        );
    }

    #[test]
    fn defaults_without_file_or_flags() {
        let args = ConfigArgs {
            state_dir: Some("/tmp/s".into()),
            ..ConfigArgs::default()
        };
        let config = args.resolve().unwrap();
        assert_eq!(config.name, "vm");
        assert_eq!(config.vcpus, 2);
        assert_eq!(config.mem_mib, 1024);
        assert_eq!(config.krun_log_level, 2);
        assert_eq!(config.writable_layer, LayerMode::Auto);
        assert_eq!(config.network, None);
        assert_eq!(config.hypervisor, HypervisorChoice::Auto);
        assert_eq!(config.boot_timeout, Some(Duration::from_secs(60)));
        assert_eq!(config.stop_timeout, Duration::from_secs(5));
        assert!(!config.allow_unsupported_host);
        assert!(config.admission.allow_driver_config);
        assert_eq!(
            config.admission.resource_admission,
            ResourceAdmission::default()
        );
        assert!(config.insecure_registries.is_empty());
        assert_eq!(config.registry_auth_file, None);
        assert_eq!(config.pull_timeout, Duration::from_secs(300));
    }

    #[test]
    fn registry_settings_come_from_the_file_and_the_flags() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            config: ConfigArgs,
        }
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "state_dir = \"/s\"\ninsecure_registries = [\"127.0.0.1:5000\"]\n\
             registry_auth_file = \"/etc/auth.json\"\npull_timeout_secs = 30\n",
        );
        let cli = Cli::try_parse_from([
            "driver".as_ref(),
            "--driver-config".as_ref(),
            path.as_os_str(),
            "--insecure-registry=Registry.Local".as_ref(),
            "--insecure-registry".as_ref(),
            "[::1]:5001".as_ref(),
        ])
        .unwrap();
        let config = cli.config.resolve().unwrap();
        assert_eq!(
            config.insecure_registries,
            ["127.0.0.1:5000", "registry.local", "[::1]:5001"]
        );
        assert_eq!(
            config.registry_auth_file.as_deref(),
            Some(Path::new("/etc/auth.json"))
        );
        assert_eq!(config.pull_timeout, Duration::from_secs(30));

        for (text, needle) in [
            (
                "insecure_registries = [\"http://r:5000\"]",
                "leave out the scheme",
            ),
            ("insecure_registries = [\"r/x\"]", "it contains '/'"),
            ("insecure_registries = \"r:5000\"", "insecure_registries"),
            ("registry_auth_file = \"auth.json\"", "is relative"),
            (
                "pull_timeout_secs = 0",
                "pull_timeout_secs must be at least 1",
            ),
        ] {
            let path = write(dir.path(), text);
            let err = args_with_file(path).resolve().unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn the_admission_policy_comes_from_the_file_and_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            r#"
state_dir = "/s"
allow_driver_config = false

[resource_admission]
enabled = true
required_labels = { "example.com/team" = "${workspace}", "example.com/ok" = "yes" }
"#,
        );
        let mut args = args_with_file(path);
        let config = args.resolve().unwrap();
        assert!(!config.admission.allow_driver_config);
        assert_eq!(
            config.admission.encode(),
            r#"v1:{"allow_driver_config":false,"resource_admission":{"enabled":true,"required_labels":{"example.com/ok":"yes","example.com/team":"${workspace}"}}}"#
        );
        args.allow_driver_config = Some(true);
        assert!(args.resolve().unwrap().admission.allow_driver_config);

        let path = write(
            dir.path(),
            "[resource_admission]
enable = false
",
        );
        let err = args_with_file(path).resolve().unwrap_err().to_string();
        assert!(err.contains("enable"), "{err}");
    }

    #[test]
    fn unknown_key_names_the_key_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "name = \"vm\"\nsocket_path = \"/x.sock\"\n");
        let err = args_with_file(path.clone())
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(err.contains("socket_path"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn the_config_path_itself_is_not_a_file_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "driver_config = \"/other.toml\"\n");
        let err = args_with_file(path).resolve().unwrap_err().to_string();
        assert!(err.contains("driver_config"), "{err}");
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn flags_and_file_keys_are_one_struct() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            config: ConfigArgs,
        }
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "allow_unsupported_host = true\nstop_timeout_secs = 9\nconsole_log_max_mib = 2\n",
        );
        let cli = Cli::try_parse_from([
            "driver".as_ref(),
            "--driver-config".as_ref(),
            path.as_os_str(),
            "--state-dir=/s".as_ref(),
            "--network=none".as_ref(),
            "--hypervisor=libkrun".as_ref(),
            "--boot-timeout-secs=7".as_ref(),
            "--kernel-args=loglevel=7".as_ref(),
            "--allow-driver-config=false".as_ref(),
        ])
        .unwrap();
        let config = cli.config.resolve().unwrap();
        assert!(config.allow_unsupported_host, "a file-only switch is kept");
        assert_eq!(config.stop_timeout, Duration::from_secs(9));
        assert_eq!(config.console_log_max_bytes, 2 << 20);
        assert_eq!(config.network, Some(NetworkMode::None));
        assert_eq!(config.hypervisor, HypervisorChoice::Libkrun);
        assert_eq!(config.boot_timeout, Some(Duration::from_secs(7)));
        assert_eq!(config.kernel_args, "loglevel=7");
        assert_eq!(config.state_dir, PathBuf::from("/s"));
        assert!(!config.admission.allow_driver_config);
    }

    #[test]
    fn wrong_types_and_bad_values_are_reported_with_the_file() {
        let dir = tempfile::tempdir().unwrap();
        for (text, needle) in [
            ("vcpus = \"two\"", "vcpus"),
            ("vcpus = 0", "vcpus must be at least 1"),
            ("mem_mib = 8", "mem_mib 8 is out of range"),
            ("krun_log_level = 9", "krun_log_level 9"),
            ("state_dir = \"relative/dir\"", "is relative"),
            ("writable_layer = \"zfs\"", "writable_layer"),
            ("hypervisor = \"xen\"", "hypervisor"),
            ("qemu_binary = \"qemu\"", "qemu_binary qemu is relative"),
            ("kernel_args = \"init=\\\"x\\\"\"", "double quotes"),
            ("dns_servers = [\"0.0.0.0\"]", "not a resolver's address"),
            ("dns_servers = [\"resolver.lan\"]", "dns_servers"),
            ("this is not toml", "vm.toml"),
        ] {
            let path = write(dir.path(), text);
            let err = args_with_file(path).resolve().unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
            assert!(err.contains("vm.toml"), "{text}: {err}");
        }
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let err = args_with_file("/nonexistent/vm.toml".into())
            .resolve()
            .unwrap_err();
        assert!(driver_lifecycle::error_chain(&err).contains("/nonexistent/vm.toml"));
    }

    #[test]
    fn default_state_dir_is_absolute_and_under_openshell() {
        let dir = default_state_dir().unwrap();
        assert!(dir.is_absolute());
        assert!(dir.ends_with("openshell/vm-driver"));
    }
}
