//! Acquisition, last step: turning a [`DriverPlan`] into an endpoint, a
//! guard and a channel. Managed drivers are spawned with driver-lifecycle; attached ones
//! are dialled. Nothing after this module knows which way a driver came.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use driver_lifecycle::{
    DialPolicy, DriverCommand, DriverEndpoint, DriverGuard, ManagedDriverProcess, SpawnOptions,
};
use tonic::transport::Channel;

use crate::drivers::managed::ManagedDriver;
use crate::drivers::plan::{Acquisition, DriverPlan};
use crate::error::{Error, Result};

/// An acquired driver endpoint.
#[derive(Debug)]
pub struct Acquired {
    pub endpoint: DriverEndpoint,
    pub guard: DriverGuard,
    pub channel: Channel,
    /// Connections the channel has opened: a changed count means the peer
    /// may be another process than the one whose capabilities were read.
    pub connections: openshell_wire::ConnectionCounter,
}

/// Where managed drivers get their sockets, config files and state.
#[derive(Debug, Clone)]
pub struct AcquireContext {
    pub run_dir: PathBuf,
    pub state_dir: PathBuf,
    /// How long to keep dialling an attached driver.
    pub attach_timeout: Duration,
    /// Directory of the gateway executable (managed drivers are looked for
    /// there first).
    pub exe_dir: Option<PathBuf>,
    /// `PATH` to search after that.
    pub search_path: Option<OsString>,
}

impl AcquireContext {
    pub fn new(run_dir: PathBuf, state_dir: PathBuf, attach_timeout: Duration) -> Self {
        Self {
            run_dir,
            state_dir,
            attach_timeout,
            exe_dir: std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(Path::to_path_buf)),
            search_path: std::env::var_os("PATH"),
        }
    }

    /// How an attached or remote driver is dialled: retried with backoff
    /// for up to `attach_timeout`.
    fn attach_policy(&self) -> DialPolicy {
        DialPolicy {
            deadline: self.attach_timeout,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(500),
        }
    }
}

fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Finds a managed driver's executable: the table's `binary`, else the
/// row's program next to the gateway, else on `PATH`.
pub fn resolve_binary(
    plan: &DriverPlan,
    row: &ManagedDriver,
    ctx: &AcquireContext,
) -> Result<PathBuf> {
    let program = row.program.to_owned();
    let mut looked = Vec::new();
    if let Some(binary) = &plan.binary {
        if is_executable_file(binary) {
            return Ok(binary.clone());
        }
        return Err(Error::Config(format!(
            "[openshell.drivers.{}] binary {} is not an executable file",
            plan.name,
            binary.display()
        )));
    }
    if let Some(dir) = &ctx.exe_dir {
        let candidate = dir.join(&program);
        if is_executable_file(&candidate) {
            return Ok(candidate);
        }
        looked.push(candidate);
    }
    if let Some(path) = &ctx.search_path {
        for dir in std::env::split_paths(path) {
            if dir.as_os_str().is_empty() {
                continue;
            }
            let candidate = dir.join(&program);
            if is_executable_file(&candidate) {
                return Ok(candidate);
            }
            looked.push(candidate);
        }
    }
    Err(Error::DriverBinaryNotFound {
        name: plan.name.clone(),
        program,
        looked,
    })
}

/// The config file a managed driver gets: its table minus the gateway's
/// keys, with `name` and `state_dir` added when absent.
pub fn driver_config(plan: &DriverPlan, state_dir: &Path) -> toml::Table {
    let mut table = plan.passthrough.clone();
    table
        .entry("name")
        .or_insert_with(|| toml::Value::String(plan.name.clone()));
    table.entry("state_dir").or_insert_with(|| {
        toml::Value::String(
            state_dir
                .join("drivers")
                .join(&plan.name)
                .display()
                .to_string(),
        )
    });
    table
}

/// Writes `contents` to `path` with mode 0600, replacing it atomically.
fn write_private(path: &Path, contents: &str) -> Result<()> {
    let tmp = path.with_extension("toml.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc_o_nofollow())
        .open(&tmp)
        .map_err(|e| Error::io("create", &tmp, e))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io("replace", path, e))?;
    Ok(())
}

fn libc_o_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}

/// Stops a driver whose acquisition or start failed at a later step. The
/// one place a guard is released on a failure path; `step` says what failed.
pub async fn release(name: &str, guard: DriverGuard, step: &str) {
    if let Err(stop) = guard.shutdown().await {
        tracing::warn!(driver = %name, step, error = %stop, "could not stop the driver after a failed step");
    }
}

/// Acquires one driver.
pub async fn acquire(plan: &DriverPlan, ctx: &AcquireContext) -> Result<Acquired> {
    let lifecycle = |source| Error::lifecycle(&plan.name, source);
    match &plan.acquisition {
        Acquisition::Managed(row) => {
            let binary = resolve_binary(plan, row, ctx)?;
            let config_path = row.config_path(&ctx.run_dir);
            let config = driver_config(plan, &ctx.state_dir);
            let text = toml::to_string(&config).map_err(|e| {
                Error::Config(format!(
                    "[openshell.drivers.{}] cannot be written back as TOML: {e}",
                    plan.name
                ))
            })?;
            write_private(&config_path, &text)?;
            let endpoint = DriverEndpoint::new(plan.name.clone(), row.socket(&ctx.run_dir));
            let mut command = DriverCommand::new(&binary)
                .arg("--driver-config")
                .arg(&config_path);
            command
                .env_allowlist
                .extend(row.env.iter().map(|name| (*name).to_owned()));
            let options = SpawnOptions {
                ready_timeout: plan.ready_timeout.unwrap_or(row.ready_timeout),
                ..SpawnOptions::default()
            };
            tracing::debug!(driver = %plan.name, binary = %binary.display(), config = %config_path.display(), "starting managed driver");
            let process = ManagedDriverProcess::spawn(&endpoint, command, options)
                .await
                .map_err(lifecycle)?;
            let guard = DriverGuard::Managed(process);
            let policy = DialPolicy {
                deadline: Duration::from_secs(5),
                ..DialPolicy::default()
            };
            let connections = openshell_wire::ConnectionCounter::new();
            match driver_lifecycle::connect_counting(&endpoint, policy, connections.clone()).await {
                Ok(channel) => Ok(Acquired {
                    endpoint,
                    guard,
                    channel,
                    connections,
                }),
                Err(error) => {
                    release(&plan.name, guard, "connect").await;
                    Err(lifecycle(error))
                }
            }
        }
        Acquisition::Attach { socket, .. } => {
            // Something that is there but is not a socket will never answer.
            if let Ok(meta) = std::fs::metadata(socket)
                && !meta.file_type().is_socket()
            {
                return Err(Error::Config(format!(
                    "driver '{}': {} is not a socket",
                    plan.name,
                    socket.display()
                )));
            }
            let endpoint = DriverEndpoint::new(plan.name.clone(), socket.clone());
            let policy = ctx.attach_policy();
            let connections = openshell_wire::ConnectionCounter::new();
            let channel =
                driver_lifecycle::connect_counting(&endpoint, policy, connections.clone())
                    .await
                    .map_err(lifecycle)?;
            Ok(Acquired {
                endpoint,
                guard: DriverGuard::Attached,
                channel,
                connections,
            })
        }
        Acquisition::Remote { addr, tls, .. } => {
            // Completed (with the gateway-wide defaults) when the settings
            // were resolved.
            let tls = tls.complete(&plan.name).map_err(Error::Config)?;
            // The endpoint's "socket" is the URL: it only appears in
            // messages and `gateway info`.
            let endpoint = DriverEndpoint::new(plan.name.clone(), addr.to_string());
            let policy = ctx.attach_policy();
            let connections = openshell_wire::ConnectionCounter::new();
            let channel =
                openshell_wire::tls::connect(addr, &tls, policy, Some(connections.clone()))
                    .await
                    .map_err(|e| Error::Config(format!("driver '{}' at {addr}: {e}", plan.name)))?;
            probe_tls(&plan.name, addr, channel.clone()).await?;
            Ok(Acquired {
                endpoint,
                guard: DriverGuard::Attached,
                channel,
                connections,
            })
        }
    }
}

/// With TLS 1.3 a server's refusal of our client certificate arrives
/// after the client thinks the handshake is done, so the first call is
/// what fails. Make one (GetCapabilities, a query) and turn a TLS failure
/// into an error naming the driver and the reason; other failures are left
/// to the runtime's own startup calls.
async fn probe_tls(
    name: &str,
    addr: &openshell_wire::tls::HttpsAddr,
    channel: Channel,
) -> Result<()> {
    use openshell_proto::compute::v1::GetCapabilitiesRequest;
    use openshell_proto::compute::v1::compute_driver_client::ComputeDriverClient;
    let request = GetCapabilitiesRequest {
        gateway: Some(crate::drivers::remote::gateway_metadata()),
    };
    let Err(status) = ComputeDriverClient::new(channel)
        .get_capabilities(request)
        .await
    else {
        return Ok(());
    };
    let Some(source) = std::error::Error::source(&status) else {
        return Ok(());
    };
    let cause = openshell_wire::uds::root_cause(source);
    let reason = openshell_wire::tls::explain(&cause);
    if reason.starts_with("TLS:") {
        return Err(Error::Config(format!(
            "driver '{name}' at {addr}: {reason}"
        )));
    }
    // The refusal can also surface only as a closed connection.
    Err(Error::Config(format!(
        "driver '{name}' at {addr}: the driver closed the connection on the first call \
         ({cause}); over mutual TLS this means it does not trust our client certificate: \
         check that --driver-tls-cert (or tls_cert) is signed by the CA the driver was given \
         as --tls-client-ca"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::managed::managed_driver;

    fn plan(name: &str) -> DriverPlan {
        DriverPlan {
            name: name.to_owned(),
            acquisition: Acquisition::Managed(managed_driver(name).unwrap()),
            expect_driver_name: None,
            binary: None,
            ready_timeout: None,
            trust_driver_readiness: false,
            passthrough: toml::Table::new(),
        }
    }

    fn executable(path: &Path) {
        std::fs::write(path, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn binary_resolution_order() {
        let tmp = tempfile::tempdir().unwrap();
        let exe_dir = tmp.path().join("bin");
        let path_dir = tmp.path().join("path");
        std::fs::create_dir_all(&exe_dir).unwrap();
        std::fs::create_dir_all(&path_dir).unwrap();
        let ctx = AcquireContext {
            run_dir: tmp.path().join("run"),
            state_dir: tmp.path().join("state"),
            attach_timeout: Duration::from_secs(1),
            exe_dir: Some(exe_dir.clone()),
            search_path: Some(std::env::join_paths([&path_dir]).unwrap()),
        };
        let podman = managed_driver("podman").unwrap();
        let err = resolve_binary(&plan("podman"), podman, &ctx)
            .unwrap_err()
            .to_string();
        assert!(err.contains("openshell-driver-podman"), "{err}");
        assert!(
            err.contains(
                &exe_dir
                    .join("openshell-driver-podman")
                    .display()
                    .to_string()
            ),
            "{err}"
        );
        assert!(
            err.contains(
                &path_dir
                    .join("openshell-driver-podman")
                    .display()
                    .to_string()
            ),
            "{err}"
        );
        assert!(err.contains("binary = "), "{err}");

        executable(&path_dir.join("openshell-driver-podman"));
        assert_eq!(
            resolve_binary(&plan("podman"), podman, &ctx).unwrap(),
            path_dir.join("openshell-driver-podman")
        );
        executable(&exe_dir.join("openshell-driver-podman"));
        assert_eq!(
            resolve_binary(&plan("podman"), podman, &ctx).unwrap(),
            exe_dir.join("openshell-driver-podman")
        );

        let mut explicit = plan("podman");
        explicit.binary = Some(tmp.path().join("nope"));
        let err = resolve_binary(&explicit, podman, &ctx)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not an executable file"), "{err}");
        std::fs::write(tmp.path().join("plain"), b"x").unwrap();
        explicit.binary = Some(tmp.path().join("plain"));
        assert!(
            resolve_binary(&explicit, podman, &ctx).is_err(),
            "not executable"
        );
    }

    #[test]
    fn driver_config_injects_name_and_state_dir() {
        let mut p = plan("vm");
        p.passthrough
            .insert("vcpus".into(), toml::Value::Integer(4));
        let table = driver_config(&p, Path::new("/var/lib/os"));
        assert_eq!(table["name"].as_str(), Some("vm"));
        assert_eq!(table["state_dir"].as_str(), Some("/var/lib/os/drivers/vm"));
        assert_eq!(table["vcpus"].as_integer(), Some(4));

        p.passthrough
            .insert("state_dir".into(), toml::Value::String("/srv/vm".into()));
        p.passthrough
            .insert("name".into(), toml::Value::String("custom".into()));
        let table = driver_config(&p, Path::new("/var/lib/os"));
        assert_eq!(table["state_dir"].as_str(), Some("/srv/vm"));
        assert_eq!(table["name"].as_str(), Some("custom"));
    }

    #[test]
    fn config_file_is_private_and_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("vm.toml");
        write_private(&path, "a = 1\n").unwrap();
        write_private(&path, "a = 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a = 2\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
