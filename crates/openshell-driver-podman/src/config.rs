//! Driver settings: the `--driver-config` TOML file, the flags that override
//! it, and the defaults that make a fresh Debian 12 host work.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use openshell_driver_kit::contract::AdmissionPolicy;
use serde::Deserialize;

use crate::error::{Error, Result};

/// Default driver name, used in labels, container names and the service
/// socket name when the config names none.
pub const DEFAULT_NAME: &str = "podman";
/// Default OCI runtime for a Podman service this driver starts.
pub const DEFAULT_RUNTIME: &str = "runc";
/// Default cgroup manager for a Podman service this driver starts.
pub const DEFAULT_CGROUP_MANAGER: CgroupManager = CgroupManager::Cgroupfs;
/// Default time a stopped sandbox's main process gets between SIGTERM and
/// SIGKILL.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time the engine may be unreachable before sandboxes are reported
/// with the `EngineUnavailable` condition.
pub const DEFAULT_ENGINE_UNAVAILABLE_AFTER: Duration = Duration::from_secs(30);

/// The settings as given: one struct for both the flags and the
/// `--driver-config` TOML file (keys spelled like the flags, with '_').
/// Each flag overrides the key of the same name in the file; every key is
/// optional and unknown keys are an error.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsArgs {
    /// Driver config file (TOML; the gateway writes one for drivers it
    /// spawns). Unknown keys are an error. Flags override its values.
    #[arg(long, value_name = "PATH")]
    #[serde(skip)]
    pub driver_config: Option<PathBuf>,

    /// Driver instance name: labels the containers this driver owns
    /// (`openshell.driver.instance`) and prefixes their names [default: podman].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// Directory for the driver's own state (stop markers, sandbox tokens)
    /// [default: $XDG_STATE_HOME/openshell/drivers/NAME].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Podman API socket to use (a path or unix://PATH). When given, no
    /// other socket is tried.
    #[arg(long, value_name = "PATH")]
    pub podman_socket: Option<PathBuf>,

    /// When no Podman socket answers, start `podman system service` on a
    /// private socket next to --bind-socket and stop it on exit [default:
    /// true when spawned by a gateway (--expected-peer-pid), else false].
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub start_podman_service: Option<bool>,

    /// Look for a running Podman service (CONTAINER_HOST, the rootful and
    /// rootless default sockets) before starting one [default: true].
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub discover_podman_socket: Option<bool>,

    /// The podman program used to start a service [default: podman, from PATH].
    #[arg(long, value_name = "PATH")]
    pub podman_binary: Option<PathBuf>,

    /// OCI runtime of a Podman service this driver starts: runc or crun
    /// [default: runc].
    #[arg(long, value_name = "NAME")]
    pub runtime: Option<String>,

    /// Cgroup manager of a Podman service this driver starts: cgroupfs or
    /// systemd [default: cgroupfs].
    #[arg(long, value_name = "MANAGER")]
    pub cgroup_manager: Option<String>,

    /// A resource limit for every sandbox, like podman's --ulimit:
    /// NAME=SOFT[:HARD], e.g. nofile=20000:20000. Repeatable; overrides the
    /// config file per NAME [default: nofile and nproc set explicitly, under
    /// the hard limits of this driver and of the engine].
    ///
    /// In the file: `ulimits = { nofile = "20000:20000", nproc = 4096 }` or
    /// `ulimits = ["nofile=20000:20000", "nproc=4096"]`.
    #[arg(long = "ulimit", value_name = "NAME=SOFT[:HARD]")]
    #[serde(default, deserialize_with = "ulimit_entries")]
    pub ulimits: Vec<String>,

    /// Network of sandbox containers: bridge, host, none, slirp4netns,
    /// private, or the name of a Podman network [default: bridge].
    #[arg(long, value_name = "MODE")]
    pub network: Option<String>,

    /// Image for create requests that name none. There is no built-in
    /// default; it is pulled like any other image (see image_pull_policy).
    #[arg(long, value_name = "IMAGE")]
    pub default_image: Option<String>,

    /// When the engine pulls a sandbox's image from its registry: missing
    /// (only when the local store lacks it), always (every create), newer
    /// (when the registry's digest differs from the local one) or never
    /// (the image must already be in the local store) [default: missing].
    #[arg(long, value_name = "POLICY")]
    pub image_pull_policy: Option<String>,

    /// A registry (HOST or HOST:PORT, as in the image reference) pulled
    /// from without TLS verification: plain HTTP or an untrusted
    /// certificate, e.g. a local registry on 127.0.0.1:5000. Repeatable; the
    /// file's list and the flags' are combined.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    #[serde(default)]
    pub insecure_registries: Vec<String>,

    /// Seconds a sandbox gets to exit after SIGTERM on StopSandbox before
    /// it is killed [default: 10].
    #[arg(long, value_name = "SECONDS")]
    pub stop_timeout: Option<u64>,

    /// Seconds the engine may be unreachable before sandboxes are reported
    /// with the EngineUnavailable condition [default: 30].
    #[arg(long, value_name = "SECONDS")]
    pub engine_unavailable_after: Option<u64>,

    /// Accept a non-empty `template.driver_config` from callers, as the
    /// admission policy reported to 1.x gateways says (`allow_driver_config`).
    /// The one per-sandbox setting is `image_pull_policy`; other keys are
    /// refused with INVALID_ARGUMENT naming the key [default: false].
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub allow_driver_config: Option<bool>,
}

/// The file's `ulimits`, a table or a list, as `NAME=SOFT[:HARD]` entries
/// like the `--ulimit` flag takes.
fn ulimit_entries<'de, D>(deserializer: D) -> std::result::Result<Vec<String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Value {
        Number(i64),
        Text(String),
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Ulimits {
        Table(BTreeMap<String, Value>),
        List(Vec<String>),
    }
    Ok(match Ulimits::deserialize(deserializer)? {
        Ulimits::Table(table) => table
            .into_iter()
            .map(|(name, value)| match value {
                Value::Number(n) => format!("{name}={n}"),
                Value::Text(text) => format!("{name}={text}"),
            })
            .collect(),
        Ulimits::List(list) => list,
    })
}

impl SettingsArgs {
    /// Reads and parses a config file. Errors name the file, the line and
    /// the key.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::io("read driver config", path, e))?;
        Self::parse_toml(&text).map_err(|message| Error::ConfigFile {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses TOML text; the error is one line (with the line number).
    pub fn parse_toml(text: &str) -> std::result::Result<Self, String> {
        toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
            let message = e.message().trim().replace('\n', " ");
            match line {
                Some(line) => format!("line {line}: {message}"),
                None => message,
            }
        })
    }

    /// Values given here (the flags) win over `file`'s; ulimits are
    /// combined per NAME, the flags' last.
    pub fn over(self, file: Self) -> Self {
        Self {
            driver_config: self.driver_config,
            name: self.name.or(file.name),
            state_dir: self.state_dir.or(file.state_dir),
            podman_socket: self.podman_socket.or(file.podman_socket),
            start_podman_service: self.start_podman_service.or(file.start_podman_service),
            discover_podman_socket: self.discover_podman_socket.or(file.discover_podman_socket),
            podman_binary: self.podman_binary.or(file.podman_binary),
            runtime: self.runtime.or(file.runtime),
            cgroup_manager: self.cgroup_manager.or(file.cgroup_manager),
            ulimits: file.ulimits.into_iter().chain(self.ulimits).collect(),
            network: self.network.or(file.network),
            default_image: self.default_image.or(file.default_image),
            image_pull_policy: self.image_pull_policy.or(file.image_pull_policy),
            insecure_registries: file
                .insecure_registries
                .into_iter()
                .chain(self.insecure_registries)
                .collect(),
            stop_timeout: self.stop_timeout.or(file.stop_timeout),
            engine_unavailable_after: self
                .engine_unavailable_after
                .or(file.engine_unavailable_after),
            allow_driver_config: self.allow_driver_config.or(file.allow_driver_config),
        }
    }
}

/// When the engine pulls a sandbox's image, as Podman's `--pull`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PullPolicy {
    /// Pull only when the local store lacks the image.
    #[default]
    Missing,
    /// Pull on every create.
    Always,
    /// Pull when the registry's digest differs from the local image's.
    Newer,
    /// Never pull: the image must be in the local store.
    Never,
}

impl PullPolicy {
    /// The names Podman's pull endpoint takes as `policy`.
    pub const NAMES: [&'static str; 4] = ["missing", "always", "newer", "never"];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Always => "always",
            Self::Newer => "newer",
            Self::Never => "never",
        }
    }

    /// Parses a policy name; the error says which names are valid.
    pub fn parse(value: &str) -> std::result::Result<Self, String> {
        match value.trim() {
            "missing" => Ok(Self::Missing),
            "always" => Ok(Self::Always),
            "newer" => Ok(Self::Newer),
            "never" => Ok(Self::Never),
            other => Err(format!(
                "{other:?} is not an image pull policy; use one of {}",
                Self::NAMES.join(", ")
            )),
        }
    }
}

impl std::fmt::Display for PullPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The registry host (`HOST[:PORT]`) an image reference pulls from, as
/// Podman resolves it: the first path component when it looks like a host
/// (has a '.' or ':', or is `localhost`). A short name (`busybox`,
/// `library/busybox`) has none: Podman resolves it through its
/// registries.conf, so `None`.
pub fn registry_of(image: &str) -> Option<&str> {
    let (first, _) = image.split_once('/')?;
    let looks_like_host = first.contains('.') || first.contains(':') || first == "localhost";
    looks_like_host.then_some(first)
}

/// Checks one `insecure_registries` entry (surrounding blanks ignored)
/// and returns it lowercased, as the engine compares registry names.
fn check_registry(entry: &str) -> Result<String> {
    let entry = entry.trim();
    openshell_driver_kit::registry::check_insecure_registry(entry).map_err(Error::Config)?;
    Ok(entry.to_ascii_lowercase())
}

/// Cgroup manager of a Podman service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupManager {
    Cgroupfs,
    Systemd,
}

impl CgroupManager {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cgroupfs => "cgroupfs",
            Self::Systemd => "systemd",
        }
    }

    fn parse(value: &str) -> Result<Self> {
        match value {
            "cgroupfs" => Ok(Self::Cgroupfs),
            "systemd" => Ok(Self::Systemd),
            other => Err(Error::Config(format!(
                "cgroup_manager {other:?} is not valid; use \"cgroupfs\" or \"systemd\""
            ))),
        }
    }
}

/// One resource limit, as podman's `--ulimit NAME=SOFT:HARD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ulimit {
    pub soft: u64,
    pub hard: u64,
}

/// `u64::MAX` is how Podman spells "unlimited".
pub const UNLIMITED: u64 = u64::MAX;

/// Resource names Podman accepts in `--ulimit`.
pub const ULIMIT_NAMES: &[&str] = &[
    "core",
    "cpu",
    "data",
    "fsize",
    "locks",
    "memlock",
    "msgqueue",
    "nice",
    "nofile",
    "nproc",
    "rss",
    "rtprio",
    "rttime",
    "sigpending",
    "stack",
];

impl Ulimit {
    /// Parses `SOFT[:HARD]`, where each side is a number, `-1` or
    /// `unlimited`. A single number sets both.
    pub fn parse(name: &str, value: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::Config(format!(
                "ulimits.{name} = {value:?} is not valid ({why}); use SOFT[:HARD], e.g. \"20000:20000\""
            ))
        };
        let one = |text: &str| -> Result<u64> {
            let text = text.trim();
            if text == "unlimited" || text == "-1" {
                return Ok(UNLIMITED);
            }
            text.parse::<u64>()
                .map_err(|_| bad(&format!("{text:?} is not a number")))
        };
        let (soft, hard) = match value.split_once(':') {
            Some((soft, hard)) => (one(soft)?, one(hard)?),
            None => {
                let both = one(value)?;
                (both, both)
            }
        };
        if soft > hard {
            return Err(bad("the soft limit is above the hard limit"));
        }
        Ok(Self { soft, hard })
    }

    fn render(value: u64) -> String {
        if value == UNLIMITED {
            "unlimited".to_owned()
        } else {
            value.to_string()
        }
    }
}

impl std::fmt::Display for Ulimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", Self::render(self.soft), Self::render(self.hard))
    }
}

fn check_ulimit_name(name: &str) -> Result<()> {
    if ULIMIT_NAMES.contains(&name) {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "ulimits: {name:?} is not a resource limit Podman knows; use one of {}",
            ULIMIT_NAMES.join(", ")
        )))
    }
}

/// Parses `NAME=SOFT[:HARD]`.
pub fn parse_ulimit_entry(entry: &str) -> Result<(String, Ulimit)> {
    let Some((name, value)) = entry.split_once('=') else {
        return Err(Error::Config(format!(
            "ulimit {entry:?} is not NAME=SOFT[:HARD], e.g. nofile=20000:20000"
        )));
    };
    let name = name.trim();
    check_ulimit_name(name)?;
    Ok((name.to_owned(), Ulimit::parse(name, value)?))
}

/// Network of sandbox containers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// A namespace mode Podman knows by name (bridge, host, none, ...).
    Mode(&'static str),
    /// A named Podman network (bridge mode, attached to that network).
    Named(String),
}

const NETWORK_MODES: &[&str] = &["bridge", "host", "none", "slirp4netns", "private", "pasta"];

impl Network {
    pub fn parse(value: &str) -> Result<Self> {
        let value = value.trim();
        if let Some(mode) = NETWORK_MODES.iter().find(|m| **m == value) {
            return Ok(Self::Mode(mode));
        }
        let valid = value
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if valid {
            Ok(Self::Named(value.to_owned()))
        } else {
            Err(Error::Config(format!(
                "network {value:?} is not valid; use one of {} or the name of a Podman network",
                NETWORK_MODES.join(", ")
            )))
        }
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Mode(mode) => f.write_str(mode),
            Self::Named(name) => f.write_str(name),
        }
    }
}

/// The resolved settings of one driver instance.
#[derive(Debug, Clone)]
pub struct Settings {
    pub name: String,
    pub state_dir: PathBuf,
    pub podman_socket: Option<PathBuf>,
    pub start_podman_service: bool,
    pub discover_podman_socket: bool,
    pub podman_binary: PathBuf,
    pub runtime: String,
    pub cgroup_manager: CgroupManager,
    /// Limits the operator set; defaults for nofile/nproc are added when the
    /// engine is known (see `engine::effective_ulimits`).
    pub ulimits: BTreeMap<String, Ulimit>,
    pub network: Network,
    pub default_image: Option<String>,
    pub image_pull_policy: PullPolicy,
    /// Registries (`HOST[:PORT]`, lower case) pulled from with
    /// `tlsVerify=false`.
    pub insecure_registries: Vec<String>,
    pub stop_timeout: Duration,
    pub engine_unavailable_after: Duration,
    /// The admission policy acknowledged to 1.x gateways.
    pub admission: AdmissionPolicy,
}

/// Checks a driver instance name: it ends up in labels, container names and
/// a socket file name.
pub fn check_name(name: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 40
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
    if valid {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "name {name:?} is not valid; use 1-40 ASCII letters, digits, '-' or '_'"
        )))
    }
}

/// Checks an image reference enough to reject obvious garbage early.
pub fn check_image_reference(image: &str) -> std::result::Result<(), String> {
    if image.is_empty() {
        return Err("the image reference is empty".to_owned());
    }
    if image.len() > 1024 {
        return Err("the image reference is longer than 1024 characters".to_owned());
    }
    if let Some(c) = image
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || !c.is_ascii())
    {
        return Err(format!("the image reference contains {c:?}"));
    }
    Ok(())
}

fn default_state_dir(name: &str) -> PathBuf {
    directories::BaseDirs::new()
        .and_then(|dirs| dirs.state_dir().map(Path::to_path_buf))
        .unwrap_or_else(|| {
            std::env::temp_dir().join(format!("openshell-{}", nix::unistd::geteuid().as_raw()))
        })
        .join("openshell")
        .join("drivers")
        .join(name)
}

/// Makes a path absolute against the current directory, so it keeps its
/// meaning after the driver changes directory (see `crate::run`).
pub fn absolute(key: &str, path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).map_err(|e| {
        Error::Config(format!(
            "{key} {}: cannot make the path absolute: {e}",
            path.display()
        ))
    })
}

fn strip_unix_scheme(path: PathBuf) -> PathBuf {
    match path.to_str().and_then(|s| s.strip_prefix("unix://")) {
        Some(rest) => PathBuf::from(rest),
        None => path,
    }
}

impl Settings {
    /// Resolves the settings: flag, else config file, else default.
    /// `managed` is whether a gateway spawned this driver (it passed
    /// `--expected-peer-pid`); it decides the default of
    /// `start_podman_service`.
    pub fn resolve(args: &SettingsArgs, managed: bool) -> Result<Self> {
        let file = match &args.driver_config {
            Some(path) => SettingsArgs::load(path)?,
            None => SettingsArgs::default(),
        };
        Self::merge(args, file, managed).map_err(|error| match (&args.driver_config, error) {
            (Some(path), Error::Config(message)) => Error::ConfigFile {
                path: path.clone(),
                message,
            },
            (_, error) => error,
        })
    }

    /// Merges flags over a parsed file.
    pub fn merge(args: &SettingsArgs, file: SettingsArgs, managed: bool) -> Result<Self> {
        Self::from_given(args.clone().over(file), managed)
    }

    /// Checks the given values and fills in the defaults.
    fn from_given(given: SettingsArgs, managed: bool) -> Result<Self> {
        let name = given.name.unwrap_or_else(|| DEFAULT_NAME.to_owned());
        check_name(&name)?;
        let state_dir = given
            .state_dir
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| default_state_dir(&name));
        let default_image = given
            .default_image
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty());
        if let Some(image) = &default_image {
            check_image_reference(image)
                .map_err(|why| Error::Config(format!("default_image {image:?}: {why}")))?;
        }
        Ok(Self {
            state_dir: absolute("state_dir", &state_dir)?,
            podman_socket: given.podman_socket.map(podman_socket).transpose()?,
            start_podman_service: given.start_podman_service.unwrap_or(managed),
            discover_podman_socket: given.discover_podman_socket.unwrap_or(true),
            podman_binary: podman_binary(given.podman_binary)?,
            runtime: runtime(given.runtime)?,
            cgroup_manager: given
                .cgroup_manager
                .as_deref()
                .map_or(Ok(DEFAULT_CGROUP_MANAGER), CgroupManager::parse)?,
            ulimits: given
                .ulimits
                .iter()
                .map(|entry| parse_ulimit_entry(entry))
                .collect::<Result<_>>()?,
            network: Network::parse(given.network.as_deref().unwrap_or("bridge"))?,
            default_image,
            image_pull_policy: given
                .image_pull_policy
                .as_deref()
                .map(PullPolicy::parse)
                .transpose()
                .map_err(|why| Error::Config(format!("image_pull_policy: {why}")))?
                .unwrap_or_default(),
            insecure_registries: {
                let mut registries = given
                    .insecure_registries
                    .iter()
                    .map(|entry| check_registry(entry))
                    .collect::<Result<Vec<_>>>()?;
                registries.sort();
                registries.dedup();
                registries
            },
            stop_timeout: stop_timeout(given.stop_timeout)?,
            engine_unavailable_after: given
                .engine_unavailable_after
                .map_or(DEFAULT_ENGINE_UNAVAILABLE_AFTER, Duration::from_secs),
            admission: AdmissionPolicy {
                allow_driver_config: given.allow_driver_config.unwrap_or(false),
                ..AdmissionPolicy::default()
            },
            name,
        })
    }

    /// True when `image` is pulled without TLS verification.
    pub fn is_insecure_registry(&self, image: &str) -> bool {
        registry_of(image).is_some_and(|host| {
            self.insecure_registries
                .iter()
                .any(|r| r.eq_ignore_ascii_case(host))
        })
    }
}

/// `podman_socket`: a path or `unix://PATH`, made absolute.
fn podman_socket(path: PathBuf) -> Result<PathBuf> {
    let path = strip_unix_scheme(path);
    if path.as_os_str().is_empty() {
        return Err(Error::Config(
            "podman_socket is empty; give the path of a Podman API socket or leave it out"
                .to_owned(),
        ));
    }
    absolute("podman_socket", &path)
}

/// `podman_binary`: a bare name is looked up on PATH; a relative path is
/// made absolute.
fn podman_binary(given: Option<PathBuf>) -> Result<PathBuf> {
    let binary = given.unwrap_or_else(|| PathBuf::from("podman"));
    if binary.components().count() > 1 {
        absolute("podman_binary", &binary)
    } else {
        Ok(binary)
    }
}

/// `runtime`: an OCI runtime name or path.
fn runtime(given: Option<String>) -> Result<String> {
    let runtime = given.unwrap_or_else(|| DEFAULT_RUNTIME.to_owned());
    let valid = !runtime.is_empty()
        && runtime
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/'));
    if valid {
        Ok(runtime)
    } else {
        Err(Error::Config(format!(
            "runtime {runtime:?} is not valid; use an OCI runtime name such as \"runc\" or \"crun\", or its path"
        )))
    }
}

/// `stop_timeout`: seconds, at most an hour.
fn stop_timeout(given: Option<u64>) -> Result<Duration> {
    let timeout = given.map_or(DEFAULT_STOP_TIMEOUT, Duration::from_secs);
    if timeout > Duration::from_secs(3600) {
        return Err(Error::Config(format!(
            "stop_timeout {} is more than an hour; give seconds, e.g. 10",
            timeout.as_secs()
        )));
    }
    Ok(timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> SettingsArgs {
        SettingsArgs::parse_toml(text).unwrap()
    }

    #[test]
    fn defaults_make_a_plain_host_work() {
        let settings = Settings::merge(&SettingsArgs::default(), SettingsArgs::default(), false)
            .expect("defaults are valid");
        assert_eq!(settings.name, "podman");
        assert_eq!(settings.runtime, "runc");
        assert_eq!(settings.cgroup_manager, CgroupManager::Cgroupfs);
        assert_eq!(settings.network, Network::Mode("bridge"));
        assert!(!settings.start_podman_service);
        assert!(settings.discover_podman_socket);
        assert!(settings.default_image.is_none());
        assert!(settings.ulimits.is_empty());
        assert!(settings.state_dir.ends_with("openshell/drivers/podman"));
        assert_eq!(settings.stop_timeout, DEFAULT_STOP_TIMEOUT);
    }

    #[test]
    fn managed_drivers_start_a_service_unless_told_not_to() {
        let settings = Settings::merge(&SettingsArgs::default(), SettingsArgs::default(), true)
            .expect("valid");
        assert!(settings.start_podman_service);
        let args = SettingsArgs {
            start_podman_service: Some(false),
            ..SettingsArgs::default()
        };
        let settings = Settings::merge(&args, SettingsArgs::default(), true).expect("valid");
        assert!(!settings.start_podman_service);
        let file = parse("start_podman_service = false");
        let settings = Settings::merge(&SettingsArgs::default(), file, true).expect("valid");
        assert!(!settings.start_podman_service);
    }

    #[test]
    fn every_key_of_the_file_is_read() {
        let file = parse(
            r#"
            name = "external-podman"
            state_dir = "/var/lib/openshell/drivers/external-podman"
            podman_socket = "unix:///run/podman/podman.sock"
            start_podman_service = true
            discover_podman_socket = false
            podman_binary = "/usr/bin/podman"
            runtime = "crun"
            cgroup_manager = "systemd"
            ulimits = { nofile = "1024:2048", nproc = 512 }
            network = "host"
            default_image = "localhost/openshell-busybox:latest"
            stop_timeout = 3
            engine_unavailable_after = 5
            image_pull_policy = "always"
            insecure_registries = ["127.0.0.1:5000", "Registry.Test"]
            "#,
        );
        let s = Settings::merge(&SettingsArgs::default(), file, false).expect("valid");
        assert_eq!(s.name, "external-podman");
        assert_eq!(
            s.state_dir,
            PathBuf::from("/var/lib/openshell/drivers/external-podman")
        );
        assert_eq!(
            s.podman_socket,
            Some(PathBuf::from("/run/podman/podman.sock"))
        );
        assert!(s.start_podman_service);
        assert!(!s.discover_podman_socket);
        assert_eq!(s.podman_binary, PathBuf::from("/usr/bin/podman"));
        assert_eq!(s.runtime, "crun");
        assert_eq!(s.cgroup_manager, CgroupManager::Systemd);
        assert_eq!(
            s.ulimits.get("nofile"),
            Some(&Ulimit {
                soft: 1024,
                hard: 2048
            })
        );
        assert_eq!(
            s.ulimits.get("nproc"),
            Some(&Ulimit {
                soft: 512,
                hard: 512
            })
        );
        assert_eq!(s.network, Network::Mode("host"));
        assert_eq!(
            s.default_image.as_deref(),
            Some("localhost/openshell-busybox:latest")
        );
        assert_eq!(s.stop_timeout, Duration::from_secs(3));
        assert_eq!(s.engine_unavailable_after, Duration::from_secs(5));
        assert_eq!(s.image_pull_policy, PullPolicy::Always);
        assert_eq!(s.insecure_registries, ["127.0.0.1:5000", "registry.test"]);
    }

    #[test]
    fn pull_policy_defaults_to_missing() {
        let s = Settings::merge(&SettingsArgs::default(), SettingsArgs::default(), false)
            .expect("valid");
        assert_eq!(s.image_pull_policy, PullPolicy::Missing);
        assert!(s.insecure_registries.is_empty());
        for name in PullPolicy::NAMES {
            assert_eq!(PullPolicy::parse(name).unwrap().as_str(), name);
        }
    }

    #[test]
    fn insecure_registries_match_the_reference_host() {
        let args = SettingsArgs {
            insecure_registries: vec!["127.0.0.1:5000".into()],
            image_pull_policy: Some("never".into()),
            ..SettingsArgs::default()
        };
        let file = parse("insecure_registries = [\"localhost\"]\nimage_pull_policy = \"newer\"");
        let s = Settings::merge(&args, file, false).expect("valid");
        assert_eq!(s.image_pull_policy, PullPolicy::Never, "the flag wins");
        assert!(s.is_insecure_registry("127.0.0.1:5000/openshell/busybox:latest"));
        assert!(s.is_insecure_registry("localhost/openshell-busybox:latest"));
        assert!(!s.is_insecure_registry("127.0.0.1:5001/openshell/busybox:latest"));
        assert!(!s.is_insecure_registry("docker.io/library/busybox"));
        assert!(!s.is_insecure_registry("busybox"));
        assert_eq!(registry_of("library/busybox"), None);
        assert_eq!(registry_of("quay.io/x/y:1"), Some("quay.io"));
    }

    #[test]
    fn flags_override_the_file_key_by_key() {
        let file = parse(
            r#"
            name = "from-file"
            runtime = "crun"
            network = "host"
            ulimits = ["nofile=1024:2048", "nproc=512"]
            "#,
        );
        let args = SettingsArgs {
            name: Some("from-flag".into()),
            ulimits: vec!["nofile=4096".into()],
            ..SettingsArgs::default()
        };
        let s = Settings::merge(&args, file, false).expect("valid");
        assert_eq!(s.name, "from-flag");
        assert_eq!(
            s.runtime, "crun",
            "a key without a flag keeps the file value"
        );
        assert_eq!(s.network, Network::Mode("host"));
        assert_eq!(
            s.ulimits.get("nofile"),
            Some(&Ulimit {
                soft: 4096,
                hard: 4096
            })
        );
        assert_eq!(
            s.ulimits.get("nproc"),
            Some(&Ulimit {
                soft: 512,
                hard: 512
            })
        );
    }

    #[test]
    fn relative_paths_become_absolute() {
        let args = SettingsArgs {
            state_dir: Some("state".into()),
            podman_socket: Some("unix://run/podman.sock".into()),
            podman_binary: Some("bin/podman".into()),
            ..SettingsArgs::default()
        };
        let s = Settings::merge(&args, SettingsArgs::default(), false).expect("valid");
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(s.state_dir, cwd.join("state"));
        assert_eq!(s.podman_socket, Some(cwd.join("run/podman.sock")));
        assert_eq!(s.podman_binary, cwd.join("bin/podman"));
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let error =
            SettingsArgs::parse_toml("name = \"x\"\nsocket_path = \"/x.sock\"\n").unwrap_err();
        assert!(error.contains("line 2"), "{error}");
        assert!(error.contains("socket_path"), "{error}");
        assert!(!error.contains('\n'), "one line: {error}");
    }

    #[test]
    fn unknown_keys_in_a_file_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("podman.toml");
        std::fs::write(&path, "bogus_key = 1\n").unwrap();
        let args = SettingsArgs {
            driver_config: Some(path.clone()),
            ..SettingsArgs::default()
        };
        let error = Settings::resolve(&args, false).unwrap_err().to_string();
        assert!(error.contains("bogus_key"), "{error}");
        assert!(error.contains(&path.display().to_string()), "{error}");
    }

    #[test]
    fn flag_only_settings_are_not_file_keys() {
        let error = SettingsArgs::parse_toml("driver_config = \"/other.toml\"\n").unwrap_err();
        assert!(error.contains("driver_config"), "{error}");
        assert!(error.contains("line 1"), "{error}");
    }

    #[test]
    fn both_ulimit_forms_read_the_same() {
        let table = parse("ulimits = { nofile = \"1:2\", nproc = 3 }");
        let list = parse("ulimits = [\"nofile=1:2\", \"nproc=3\"]");
        assert_eq!(table.ulimits, list.ulimits);
    }

    #[test]
    fn bad_values_name_the_setting() {
        let cases = [
            ("cgroup_manager = \"cgroupv3\"", "cgroup_manager"),
            ("runtime = \"run c\"", "runtime"),
            ("network = \"bad net!\"", "network"),
            ("name = \"a/b\"", "name"),
            ("ulimits = { nofiles = 10 }", "nofiles"),
            ("ulimits = { nofile = \"20:10\" }", "ulimits.nofile"),
            ("ulimits = [\"nofile\"]", "NAME=SOFT"),
            ("default_image = \"a b\"", "default_image"),
            ("stop_timeout = 7200", "stop_timeout"),
            ("podman_socket = \"\"", "podman_socket"),
            ("image_pull_policy = \"sometimes\"", "image_pull_policy"),
            ("insecure_registries = [\"http://r:5000\"]", "scheme"),
            (
                "insecure_registries = [\"r:5000/ns\"]",
                "insecure_registries",
            ),
        ];
        for (text, needle) in cases {
            let error = Settings::merge(&SettingsArgs::default(), parse(text), false)
                .expect_err(text)
                .to_string();
            assert!(error.contains(needle), "{text}: {error}");
        }
    }

    #[test]
    fn ulimit_values() {
        assert_eq!(
            Ulimit::parse("nofile", "10").unwrap(),
            Ulimit { soft: 10, hard: 10 }
        );
        assert_eq!(
            Ulimit::parse("nofile", "10:unlimited").unwrap(),
            Ulimit {
                soft: 10,
                hard: UNLIMITED
            }
        );
        assert_eq!(
            Ulimit::parse("core", "-1").unwrap(),
            Ulimit {
                soft: UNLIMITED,
                hard: UNLIMITED
            }
        );
        assert!(Ulimit::parse("nofile", "x").is_err());
        assert!(Ulimit::parse("nofile", "2:1").is_err());
        assert_eq!(
            Ulimit {
                soft: 1,
                hard: UNLIMITED
            }
            .to_string(),
            "1:unlimited"
        );
    }

    #[test]
    fn named_networks_are_allowed() {
        assert_eq!(
            Network::parse("openshell-net").unwrap(),
            Network::Named("openshell-net".into())
        );
        assert_eq!(Network::parse("none").unwrap(), Network::Mode("none"));
        assert!(Network::parse("").is_err());
        assert!(Network::parse("-x").is_err());
    }
}
