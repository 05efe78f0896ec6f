//! The managed-driver table: the one place that says which drivers the
//! gateway can run itself and how each one is run.
//!
//! Selection reads it to decide that a bare name is managed, acquisition
//! reads it to spawn the binary, and `--check-config` reads it to describe
//! the plan. A new managed driver is one new row here.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a managed driver has to become ready unless its row or
/// `[openshell.drivers.NAME] ready_timeout_secs` says otherwise.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// One driver the gateway can run.
#[derive(Debug, PartialEq, Eq)]
pub struct ManagedDriver {
    /// The name in `--drivers` (and of its config table).
    pub name: &'static str,
    /// Executable looked for next to the gateway, then on `PATH`.
    pub program: &'static str,
    /// Socket file name in the run directory.
    pub socket_file: &'static str,
    /// Config file name in the run directory.
    pub config_file: &'static str,
    /// Environment variables it needs from the operator's session beyond
    /// the lifecycle allowlist.
    pub env: &'static [&'static str],
    /// How long it may take to become ready.
    pub ready_timeout: Duration,
}

/// Every managed driver.
pub const MANAGED_DRIVERS: &[ManagedDriver] = &[
    // libkrunfw.so.5 may live outside the system library path.
    ManagedDriver {
        name: "vm",
        program: "openshell-driver-vm",
        socket_file: "vm.sock",
        config_file: "vm.toml",
        env: &["LD_LIBRARY_PATH"],
        ready_timeout: DEFAULT_READY_TIMEOUT,
    },
    // The Podman driver may have to start `podman system service` and take
    // its first listing before it binds; Podman's own client settings point
    // it at an engine.
    ManagedDriver {
        name: "podman",
        program: "openshell-driver-podman",
        socket_file: "podman.sock",
        config_file: "podman.toml",
        env: &["CONTAINER_HOST", "CONTAINER_CONNECTION", "CONTAINERS_CONF"],
        ready_timeout: Duration::from_secs(30),
    },
];

/// The row for `name`, when the gateway can run it.
pub fn managed_driver(name: &str) -> Option<&'static ManagedDriver> {
    MANAGED_DRIVERS.iter().find(|d| d.name == name)
}

/// `vm and podman`, for messages.
pub fn managed_names() -> String {
    MANAGED_DRIVERS
        .iter()
        .map(|d| d.name)
        .collect::<Vec<_>>()
        .join(" and ")
}

impl ManagedDriver {
    /// Where it listens: `<run_dir>/<socket_file>`.
    pub fn socket(&self, run_dir: &Path) -> PathBuf {
        run_dir.join(self.socket_file)
    }

    /// Where its config file is written: `<run_dir>/<config_file>`.
    pub fn config_path(&self, run_dir: &Path) -> PathBuf {
        run_dir.join(self.config_file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_consistent() {
        for (i, row) in MANAGED_DRIVERS.iter().enumerate() {
            assert_eq!(row.program, format!("openshell-driver-{}", row.name));
            assert_eq!(row.socket_file, format!("{}.sock", row.name));
            assert_eq!(row.config_file, format!("{}.toml", row.name));
            assert!(row.ready_timeout > Duration::ZERO);
            assert!(
                MANAGED_DRIVERS[..i]
                    .iter()
                    .all(|other| other.name != row.name),
                "{} twice",
                row.name
            );
        }
        assert_eq!(managed_names(), "vm and podman");
        assert_eq!(
            managed_driver("podman").map(|d| d.socket(Path::new("/run/os"))),
            Some(PathBuf::from("/run/os/podman.sock"))
        );
        assert!(managed_driver("kyma").is_none());
    }
}
