//! Finding the Podman engine (or starting one), checking it can run what
//! this driver asks of it, and turning its failures into messages that name
//! the setting to change.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use driver_lifecycle::{
    DriverCommand, DriverEndpoint, DriverGuard, ManagedDriverProcess, Readiness, SpawnOptions,
};

use crate::config::{Network, Settings, UNLIMITED, Ulimit};
use crate::error::{Error, Result};
use crate::podman::types::Info;
use crate::podman::{Ping, Podman};

/// Default soft and hard `nofile` of a sandbox, before clamping.
pub const DEFAULT_NOFILE: u64 = 1_048_576;
/// Default soft and hard `nproc` of a sandbox, before clamping. Podman
/// itself lowers its own `nproc` to this on hosts where it cannot raise it.
pub const DEFAULT_NPROC: u64 = 32_768;

const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// Rootful default socket.
pub const ROOTFUL_SOCKET: &str = "/run/podman/podman.sock";

/// Where the engine socket came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `podman_socket` / `--podman-socket`.
    Configured,
    /// The `CONTAINER_HOST` environment variable.
    ContainerHost,
    /// A well-known default path.
    Default,
    /// A `podman system service` this driver started.
    Service,
}

/// The connected engine.
#[derive(Debug)]
pub struct Engine {
    pub client: Podman,
    pub origin: Origin,
    pub info: Info,
    /// Limits every sandbox gets: the operator's, plus nofile/nproc
    /// defaults clamped under the hard limits of this driver and the engine.
    pub ulimits: BTreeMap<String, Ulimit>,
    service: Option<ManagedDriverProcess>,
}

impl Engine {
    /// Finds (or starts) the engine and checks it. `bind_socket` is the
    /// driver's own socket; a service this driver starts listens next to it.
    pub async fn connect(settings: &Settings, bind_socket: &Path) -> Result<Self> {
        let (client, origin, ping, service) = locate(settings, bind_socket).await?;
        let engine = async {
            let info = client.info().await?;
            check_engine(settings, &client, &info, origin).await?;
            let ceilings = Ceilings::read(ping.peer_pid);
            let ulimits = effective_ulimits(&settings.ulimits, &ceilings);
            for (name, limit) in &settings.ulimits {
                if let Some(ceiling) = ceilings.get(name)
                    && limit.hard != UNLIMITED
                    && limit.hard > ceiling
                {
                    tracing::warn!(
                        ulimit = %name, value = %limit, ceiling,
                        "ulimits.{name} is above the hard limit of this driver or the engine; \
                         sandboxes will fail to start unless the engine may raise it"
                    );
                }
            }
            tracing::info!(
                socket = %client.socket().display(),
                origin = ?origin,
                podman_version = %info.version.version,
                api_version = %ping.api_version,
                runtime = %info.host.oci_runtime.name,
                cgroup_manager = %info.host.cgroup_manager,
                rootless = info.host.security.rootless,
                ulimits = %render_ulimits(&ulimits),
                "podman engine connected"
            );
            Ok::<_, Error>((info, ulimits))
        }
        .await;
        match engine {
            Ok((info, ulimits)) => Ok(Self {
                client,
                origin,
                info,
                ulimits,
                service,
            }),
            Err(error) => {
                if let Some(service) = service {
                    stop_service(service).await;
                }
                Err(error)
            }
        }
    }

    /// Stops the service this driver started, if any.
    pub async fn shutdown(mut self) {
        if let Some(service) = self.service.take() {
            stop_service(service).await;
        }
    }
}

async fn stop_service(service: ManagedDriverProcess) {
    match DriverGuard::Managed(service).shutdown().await {
        Ok(report) => {
            tracing::info!(forced = report.forced, "podman service stopped");
        }
        Err(error) => {
            tracing::warn!(error = %crate::error::chain(&error), "podman service did not stop cleanly");
        }
    }
}

fn render_ulimits(ulimits: &BTreeMap<String, Ulimit>) -> String {
    ulimits
        .iter()
        .map(|(name, limit)| format!("{name}={limit}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Candidate sockets in discovery order, with where each came from.
pub fn discovery_candidates() -> Vec<(PathBuf, Origin)> {
    let mut out = Vec::new();
    if let Some(host) = std::env::var_os("CONTAINER_HOST") {
        let host = host.to_string_lossy().into_owned();
        match host.strip_prefix("unix://") {
            Some(path) if !path.is_empty() => {
                out.push((PathBuf::from(path), Origin::ContainerHost));
            }
            _ => tracing::warn!(
                container_host = %host,
                "CONTAINER_HOST is not a unix:// socket; ignoring it (give a local socket with --podman-socket)"
            ),
        }
    }
    out.push((PathBuf::from(ROOTFUL_SOCKET), Origin::Default));
    if let Some(runtime) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        out.push((
            PathBuf::from(runtime).join("podman").join("podman.sock"),
            Origin::Default,
        ));
    }
    out.push((
        PathBuf::from(format!(
            "/run/user/{}/podman/podman.sock",
            nix::unistd::geteuid().as_raw()
        )),
        Origin::Default,
    ));
    let mut seen = Vec::new();
    out.retain(|(path, _)| {
        if seen.contains(path) {
            false
        } else {
            seen.push(path.clone());
            true
        }
    });
    out
}

/// Where the private service listens: next to the driver's own socket.
pub fn service_socket_path(settings: &Settings, bind_socket: &Path) -> PathBuf {
    let dir = bind_socket
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    dir.join(format!("{}-podman.sock", settings.name))
}

async fn locate(
    settings: &Settings,
    bind_socket: &Path,
) -> Result<(Podman, Origin, Ping, Option<ManagedDriverProcess>)> {
    if let Some(socket) = &settings.podman_socket {
        let client = Podman::new(socket);
        return match client.ping(PING_TIMEOUT).await {
            Ok(ping) => Ok((client, Origin::Configured, ping, None)),
            Err(error) => Err(Error::FailedPrecondition(format!(
                "the Podman socket set by podman_socket / --podman-socket does not answer: {}. \
                 Start the service (e.g. `podman system service --time=0 unix://{}`) or leave \
                 podman_socket out to let the driver discover or start one",
                crate::error::chain(&error),
                socket.display()
            ))),
        };
    }

    let mut tried = Vec::new();
    if settings.discover_podman_socket {
        for (socket, origin) in discovery_candidates() {
            let client = Podman::new(&socket);
            match client.ping(PING_TIMEOUT).await {
                Ok(ping) => return Ok((client, origin, ping, None)),
                Err(error) => {
                    tracing::debug!(socket = %socket.display(), error = %error, "no podman engine here");
                    tried.push(format!("{} ({})", socket.display(), short_reason(&error)));
                }
            }
        }
    }

    if settings.start_podman_service {
        let socket = service_socket_path(settings, bind_socket);
        let service = start_service(settings, &socket).await?;
        let client = Podman::new(&socket);
        // The socket accepted a connection; give the API a moment to answer.
        let mut last = None;
        for attempt in 0..50_u32 {
            match client.ping(PING_TIMEOUT).await {
                Ok(ping) => return Ok((client, Origin::Service, ping, Some(service))),
                Err(error) => last = Some(error),
            }
            tokio::time::sleep(Duration::from_millis(u64::from(attempt.min(10)) * 10 + 5)).await;
        }
        stop_service(service).await;
        let reason = last.map(|e| crate::error::chain(&e)).unwrap_or_default();
        return Err(Error::FailedPrecondition(format!(
            "the Podman service this driver started at {} does not answer: {reason}",
            socket.display()
        )));
    }

    let what = if tried.is_empty() {
        "no Podman engine to use: socket discovery is off (discover_podman_socket = false) and \
         starting a service is off"
            .to_owned()
    } else {
        format!("no Podman engine answered (tried {})", tried.join(", "))
    };
    Err(Error::FailedPrecondition(format!(
        "{what}. Start one (`podman system service --time=0 unix://{ROOTFUL_SOCKET}`), point \
         --podman-socket at one, or pass --start-podman-service to let the driver run its own"
    )))
}

fn short_reason(error: &Error) -> String {
    match error {
        Error::EngineUnavailable { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}

/// Finds `program` on PATH unless it is a path already.
fn resolve_program(program: &Path) -> Result<PathBuf> {
    if program.components().count() > 1 {
        return if program.is_file() {
            Ok(program.to_owned())
        } else {
            Err(Error::FailedPrecondition(format!(
                "podman_binary {} does not exist; install podman or fix the setting",
                program.display()
            )))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "{} was not found on PATH; install podman (Debian: apt-get install podman) \
                 or set podman_binary",
                program.display()
            ))
        })
}

/// Variables a Podman service needs beyond the lifecycle layer's default
/// allowlist.
const SERVICE_ENV: &[&str] = &[
    "CONTAINERS_CONF",
    "CONTAINERS_STORAGE_CONF",
    "CONTAINERS_REGISTRIES_CONF",
    "CONTAINER_CONNECTION",
    "DBUS_SESSION_BUS_ADDRESS",
];

async fn start_service(settings: &Settings, socket: &Path) -> Result<ManagedDriverProcess> {
    let program = resolve_program(&settings.podman_binary)?;
    let mut command = DriverCommand::new(&program).args([
        OsString::from("--runtime"),
        OsString::from(&settings.runtime),
        OsString::from("--cgroup-manager"),
        OsString::from(settings.cgroup_manager.as_str()),
        OsString::from("system"),
        OsString::from("service"),
        OsString::from("--time=0"),
        OsString::from(format!("unix://{}", socket.display())),
    ]);
    command.lifecycle_flags = false;
    command.kill_with_parent = true;
    command
        .env_allowlist
        .extend(SERVICE_ENV.iter().map(|s| (*s).to_owned()));
    let endpoint = DriverEndpoint::new(format!("{}-podman", settings.name), socket);
    let options = SpawnOptions {
        readiness: Readiness::PollConnect,
        ready_timeout: Duration::from_secs(30),
        ..SpawnOptions::default()
    };
    tracing::info!(socket = %socket.display(), runtime = %settings.runtime, cgroup_manager = settings.cgroup_manager.as_str(), "starting podman service");
    ManagedDriverProcess::spawn(&endpoint, command, options)
        .await
        .map_err(|error| {
            let text = crate::error::chain(&error);
            let hint = if text.contains("OCI runtime") {
                format!(
                    "; the runtime setting is {:?}: install it or set runtime = \"runc\" / \"crun\"",
                    settings.runtime
                )
            } else if text.contains("cgroup") {
                format!(
                    "; the cgroup_manager setting is {:?}: try cgroup_manager = \"cgroupfs\"",
                    settings.cgroup_manager.as_str()
                )
            } else {
                String::new()
            };
            Error::FailedPrecondition(format!(
                "could not start `{} system service`: {text}{hint}",
                program.display()
            ))
        })
}

/// Checks the engine against the settings before serving.
async fn check_engine(
    settings: &Settings,
    client: &Podman,
    info: &Info,
    origin: Origin,
) -> Result<()> {
    if origin != Origin::Service {
        if !info.host.oci_runtime.name.is_empty() && info.host.oci_runtime.name != settings.runtime
        {
            tracing::warn!(
                engine_runtime = %info.host.oci_runtime.name,
                runtime = %settings.runtime,
                "the engine uses another OCI runtime; the runtime setting applies only to a \
                 Podman service this driver starts"
            );
        }
        if info.host.cgroup_manager == "systemd" && !Path::new("/run/systemd/system").exists() {
            return Err(Error::FailedPrecondition(format!(
                "the Podman engine at {} uses the systemd cgroup manager, but systemd is not \
                 running on this host, so no container can start. Restart the engine with \
                 `--cgroup-manager cgroupfs`, or let this driver start its own service \
                 (start_podman_service = true, cgroup_manager = \"cgroupfs\")",
                client.socket().display()
            )));
        }
    }
    if let Network::Named(name) = &settings.network
        && !client.network_exists(name).await?
    {
        return Err(Error::FailedPrecondition(format!(
            "network {name:?} does not exist in the Podman engine; create it \
             (`podman network create {name}`) or change the network setting"
        )));
    }
    if let Some(image) = &settings.default_image
        && client.image(image).await?.is_none()
    {
        if settings.image_pull_policy == crate::config::PullPolicy::Never {
            tracing::warn!(
                image = %image,
                "default_image is not in the engine's local image store and image_pull_policy is never; creates without an image will fail until it is"
            );
        } else {
            tracing::debug!(
                image = %image,
                "default_image is not in the engine's local image store yet; the first create that uses it pulls it"
            );
        }
    }
    Ok(())
}

/// Hard limits that sandbox ulimits must stay under.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ceilings {
    pub nofile: Option<u64>,
    pub nproc: Option<u64>,
}

impl Ceilings {
    /// The lower of this process's hard limits and, when readable, the
    /// engine process's (found through the socket's peer credentials).
    pub fn read(engine_pid: Option<u32>) -> Self {
        let own = std::fs::read_to_string("/proc/self/limits")
            .map(|t| parse_limits(&t))
            .unwrap_or_default();
        let engine = engine_pid
            .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/limits")).ok())
            .map(|t| parse_limits(&t))
            .unwrap_or_default();
        let lower = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Self {
            nofile: lower(own.nofile, engine.nofile),
            nproc: lower(own.nproc, engine.nproc),
        }
    }

    fn get(&self, name: &str) -> Option<u64> {
        match name {
            "nofile" => self.nofile,
            "nproc" => self.nproc,
            _ => None,
        }
    }
}

/// Reads the hard limits for open files and processes from the text of
/// `/proc/<pid>/limits`.
pub fn parse_limits(text: &str) -> Ceilings {
    let hard = |prefix: &str| {
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(prefix)?;
            let mut columns = rest.split_whitespace();
            let _soft = columns.next()?;
            match columns.next()? {
                "unlimited" => Some(UNLIMITED),
                value => value.parse().ok(),
            }
        })
    };
    Ceilings {
        nofile: hard("Max open files"),
        nproc: hard("Max processes"),
    }
}

/// The operator's ulimits plus defaults for nofile and nproc, clamped
/// under `ceilings`. Operator values are used as given.
pub fn effective_ulimits(
    explicit: &BTreeMap<String, Ulimit>,
    ceilings: &Ceilings,
) -> BTreeMap<String, Ulimit> {
    let mut out = BTreeMap::new();
    for (name, default, ceiling) in [
        ("nofile", DEFAULT_NOFILE, ceilings.nofile),
        ("nproc", DEFAULT_NPROC, ceilings.nproc),
    ] {
        let value = ceiling.map_or(default, |c| default.min(c));
        out.insert(
            name.to_owned(),
            Ulimit {
                soft: value,
                hard: value,
            },
        );
    }
    out.extend(explicit.iter().map(|(k, v)| (k.clone(), *v)));
    out
}

/// What a container start failure means for the operator, if it is one of
/// the engine problems this driver recognises: the reason for the sandbox
/// condition and a message naming the setting to change.
pub fn explain_start_failure(
    message: &str,
    ulimits: &BTreeMap<String, Ulimit>,
) -> Option<(&'static str, String)> {
    let lower = message.to_ascii_lowercase();
    let ulimit = |name: &str| {
        let value = ulimits
            .get(name)
            .map_or_else(|| "unset".to_owned(), ToString::to_string);
        format!(
            "the engine refused the {name} limit ({value}) because it is above the engine's own \
             hard limit: lower it with the ulimits setting (ulimits = {{ {name} = \"N:N\" }} or \
             --ulimit {name}=N:N). Podman said: {message}"
        )
    };
    if lower.contains("rlimit type 6") || lower.contains("rlimit_nproc") {
        return Some(("EngineMisconfigured", ulimit("nproc")));
    }
    if lower.contains("rlimit type 7") || lower.contains("rlimit_nofile") {
        return Some(("EngineMisconfigured", ulimit("nofile")));
    }
    if lower.contains("rlimit") {
        return Some((
            "EngineMisconfigured",
            format!(
                "the engine refused a resource limit: check the ulimits setting. Podman said: {message}"
            ),
        ));
    }
    if lower.contains("systemd not running")
        || lower.contains("systemd cgroup")
        || lower.contains("dbus")
    {
        return Some((
            "EngineMisconfigured",
            format!(
                "the engine's cgroup manager cannot work on this host: use cgroup_manager = \
                 \"cgroupfs\" for a service this driver starts, or restart the engine with \
                 --cgroup-manager cgroupfs. Podman said: {message}"
            ),
        ));
    }
    if lower.contains("oci runtime")
        && (lower.contains("not found") || lower.contains("no such file"))
        && !lower.contains("exec:")
        && !lower.contains("executable file")
    {
        return Some((
            "EngineMisconfigured",
            format!(
                "the engine's OCI runtime is missing: install it or change the runtime setting. \
                 Podman said: {message}"
            ),
        ));
    }
    if lower.contains("image not known") || lower.contains("no such image") {
        return Some(("ImageMissing", message.to_owned()));
    }
    if lower.contains("executable file not found")
        || lower.contains("exec:")
        || lower.contains("permission denied") && lower.contains("exec")
    {
        return Some((
            "CommandNotFound",
            format!(
                "the sandbox command could not be run in its image: check spec.command. Podman \
                 said: {message}"
            ),
        ));
    }
    if lower.contains("netavark") || lower.contains("cni") || lower.contains("network") {
        return Some((
            "EngineMisconfigured",
            format!(
                "the engine could not set up the sandbox network: check the network setting. \
                 Podman said: {message}"
            ),
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: &str = "\
Limit                     Soft Limit           Hard Limit           Units
Max cpu time              unlimited            unlimited            seconds
Max processes             32768                32768                processes
Max open files            1024                 20000                files
";

    #[test]
    fn hard_limits_are_read_from_proc() {
        let ceilings = parse_limits(LIMITS);
        assert_eq!(ceilings.nofile, Some(20000));
        assert_eq!(ceilings.nproc, Some(32768));
        let unlimited = parse_limits("Max processes  unlimited  unlimited  processes\n");
        assert_eq!(unlimited.nproc, Some(UNLIMITED));
        assert_eq!(unlimited.nofile, None);
    }

    #[test]
    fn defaults_are_clamped_and_explicit_values_win() {
        let ceilings = Ceilings {
            nofile: Some(20000),
            nproc: Some(96364),
        };
        let limits = effective_ulimits(&BTreeMap::new(), &ceilings);
        assert_eq!(
            limits["nofile"],
            Ulimit {
                soft: 20000,
                hard: 20000
            }
        );
        assert_eq!(
            limits["nproc"],
            Ulimit {
                soft: DEFAULT_NPROC,
                hard: DEFAULT_NPROC
            }
        );

        let unknown = effective_ulimits(&BTreeMap::new(), &Ceilings::default());
        assert_eq!(unknown["nofile"].hard, DEFAULT_NOFILE);

        let mut explicit = BTreeMap::new();
        explicit.insert(
            "nproc".to_owned(),
            Ulimit {
                soft: 100,
                hard: 200,
            },
        );
        explicit.insert("core".to_owned(), Ulimit { soft: 0, hard: 0 });
        let limits = effective_ulimits(&explicit, &ceilings);
        assert_eq!(
            limits["nproc"],
            Ulimit {
                soft: 100,
                hard: 200
            }
        );
        assert_eq!(limits["core"], Ulimit { soft: 0, hard: 0 });
        assert_eq!(limits["nofile"].hard, 20000);
    }

    #[test]
    fn own_limits_are_readable_here() {
        let ceilings = Ceilings::read(None);
        assert!(ceilings.nofile.is_some());
        assert!(ceilings.nproc.is_some());
    }

    #[test]
    fn start_failures_name_the_setting() {
        let mut limits = BTreeMap::new();
        limits.insert(
            "nproc".to_owned(),
            Ulimit {
                soft: 90000,
                hard: 90000,
            },
        );
        let runc = "runc: runc create failed: unable to start container process: error during container init: error setting rlimits for ready process: error setting rlimit type 6: operation not permitted: OCI permission denied";
        let (reason, message) = explain_start_failure(runc, &limits).unwrap();
        assert_eq!(reason, "EngineMisconfigured");
        assert!(message.contains("nproc limit (90000:90000)"), "{message}");
        assert!(message.contains("--ulimit nproc="), "{message}");

        let crun =
            "crun: setrlimit `RLIMIT_NOFILE`: Operation not permitted: OCI permission denied";
        let (_, message) = explain_start_failure(crun, &limits).unwrap();
        assert!(message.contains("nofile"), "{message}");

        let systemd = "runc: runc create failed: systemd not running on this host, cannot use systemd cgroups manager: OCI runtime error";
        let (_, message) = explain_start_failure(systemd, &limits).unwrap();
        assert!(message.contains("cgroup_manager"), "{message}");

        let exec = "runc: runc create failed: unable to start container process: exec: \"/nonexistent\": stat /nonexistent: no such file or directory: OCI runtime attempted to invoke a command that was not found";
        let (reason, message) = explain_start_failure(exec, &limits).unwrap();
        assert_eq!(reason, "CommandNotFound");
        assert!(message.contains("spec.command"), "{message}");

        let image = "localhost/none:latest: image not known";
        assert_eq!(
            explain_start_failure(image, &limits).unwrap().0,
            "ImageMissing"
        );

        assert!(explain_start_failure("something else entirely", &limits).is_none());
    }

    #[test]
    fn the_service_socket_sits_next_to_the_driver_socket() {
        let settings = Settings::merge(
            &crate::config::SettingsArgs {
                name: Some("external-podman".into()),
                ..Default::default()
            },
            crate::config::SettingsArgs::default(),
            false,
        )
        .unwrap();
        assert_eq!(
            service_socket_path(&settings, Path::new("/run/gw/external-podman.sock")),
            PathBuf::from("/run/gw/external-podman-podman.sock")
        );
    }

    #[test]
    fn discovery_order_is_container_host_then_defaults() {
        let candidates = discovery_candidates();
        let rootful = candidates
            .iter()
            .position(|(p, _)| p == Path::new(ROOTFUL_SOCKET))
            .expect("the rootful default is a candidate");
        if let Some(host) = candidates
            .iter()
            .position(|(_, o)| *o == Origin::ContainerHost)
        {
            assert!(host < rootful);
        }
        assert!(
            candidates
                .iter()
                .any(|(p, _)| p.ends_with("podman/podman.sock"))
        );
    }
}
