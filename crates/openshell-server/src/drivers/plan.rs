//! Plain data shared by configuration and driver selection: what the
//! operator wrote about drivers ([`DriverTable`], [`ListOrigin`],
//! [`FlagSource`]) and what selection decided ([`DriverPlan`]). Neither
//! `config` nor `select` imports the other; both import this.

use std::path::PathBuf;
use std::time::Duration;

use crate::drivers::managed::ManagedDriver;

/// Longest driver name.
pub const MAX_NAME_LEN: usize = 63;

/// A value given on the command line or through its environment variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagSource {
    CommandLine,
    Env,
}

/// One `[openshell.drivers.NAME]` table.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DriverTable {
    pub socket_path: Option<PathBuf>,
    /// `endpoint = "https://HOST:PORT"`: a driver on another host.
    pub endpoint: Option<String>,
    /// `tls_ca`, `tls_cert`, `tls_key` for that endpoint.
    pub tls: DriverTls,
    pub expect_driver_name: Option<String>,
    pub binary: Option<PathBuf>,
    pub ready_timeout: Option<Duration>,
    /// Take a 1.x driver's Ready as the sandbox's Ready even when the
    /// driver says readiness needs a supervisor session (this gateway has
    /// no supervisor sessions).
    pub trust_driver_readiness: bool,
    /// Every other key, passed to a managed driver as its config file.
    pub passthrough: toml::Table,
}

/// The TLS files the gateway uses towards one remote driver; each falls
/// back to the gateway-wide `--driver-tls-*` default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DriverTls {
    /// CA the driver's server certificate must chain to.
    pub ca: Option<PathBuf>,
    /// The gateway's client certificate and key.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl DriverTls {
    /// Fills what this table leaves out from `defaults`.
    pub fn or(&self, defaults: &Self) -> Self {
        Self {
            ca: self.ca.clone().or_else(|| defaults.ca.clone()),
            cert: self.cert.clone().or_else(|| defaults.cert.clone()),
            key: self.key.clone().or_else(|| defaults.key.clone()),
        }
    }

    /// All three files, or an error naming the missing ones and where to
    /// set them.
    pub fn complete(&self, driver: &str) -> Result<openshell_wire::tls::ClientTls, String> {
        openshell_wire::tls::ClientTls::from_parts(
            self.ca.as_ref(),
            self.cert.as_ref(),
            self.key.as_ref(),
            ["tls_ca", "tls_cert", "tls_key"],
        )
        .map_err(|missing| {
            let verb = if missing.len() == 1 { "is" } else { "are" };
            let keys: Vec<String> = missing
                .iter()
                .map(|k| format!("{k} = \"/path.pem\""))
                .collect();
            format!(
                "driver '{driver}' is reached over TCP with mutual TLS, but {} {verb} not \
                 set; set [openshell.drivers.{driver}] {} (or the gateway-wide \
                 --driver-tls-ca, --driver-tls-cert, --driver-tls-key); \
                 `openshell-gateway certs init` writes the files",
                missing.join(", "),
                keys.join(", ")
            )
        })
    }
}

/// The passed-through key the gateway reads as well: the admission policy
/// it expects a 1.x driver to acknowledge.
pub const ALLOW_DRIVER_CONFIG: &str = "allow_driver_config";

/// Where the drivers list came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListOrigin {
    CommandLine,
    Env,
    File(PathBuf),
}

impl ListOrigin {
    pub(crate) fn label(&self) -> String {
        match self {
            Self::CommandLine => "--drivers".to_owned(),
            Self::Env => "OPENSHELL_DRIVERS".to_owned(),
            Self::File(path) => format!("{}: openshell.gateway.compute_drivers", path.display()),
        }
    }
}

/// How a driver's endpoint is obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquisition {
    /// The gateway spawns the driver its managed-driver row describes.
    Managed(&'static ManagedDriver),
    /// The operator runs the driver; the gateway dials `socket`.
    Attach { socket: PathBuf, from: SocketSource },
    /// The operator runs the driver on another host; the gateway dials
    /// `addr` over TCP with mutual TLS.
    Remote {
        addr: openshell_wire::tls::HttpsAddr,
        tls: DriverTls,
        from: SocketSource,
    },
}

/// Which setting named an attached driver's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketSource {
    /// `NAME@/path` in the drivers list.
    Entry,
    /// `[openshell.drivers.NAME] socket_path`.
    ConfigFile,
    /// `--compute-driver-socket` / `OPENSHELL_COMPUTE_DRIVER_SOCKET`.
    Flag,
}

/// One selected driver.
#[derive(Debug, Clone, PartialEq)]
pub struct DriverPlan {
    /// Normalised configured name; also the key of its config table.
    pub name: String,
    pub acquisition: Acquisition,
    pub expect_driver_name: Option<String>,
    /// Executable of a managed driver, when configured.
    pub binary: Option<PathBuf>,
    pub ready_timeout: Option<Duration>,
    pub trust_driver_readiness: bool,
    /// The driver's config table minus the gateway's keys.
    pub passthrough: toml::Table,
}

impl DriverPlan {
    /// The admission policy the operator expects this driver to
    /// acknowledge: set by `allow_driver_config` in its table (a key the
    /// driver reads too), `None` when the table does not say.
    pub fn expected_admission(
        &self,
    ) -> Result<Option<openshell_driver_kit::contract::AdmissionPolicy>, String> {
        match self.passthrough.get(ALLOW_DRIVER_CONFIG) {
            None => Ok(None),
            Some(toml::Value::Boolean(allow)) => {
                Ok(Some(openshell_driver_kit::contract::AdmissionPolicy {
                    allow_driver_config: *allow,
                    ..Default::default()
                }))
            }
            Some(other) => Err(format!(
                "[openshell.drivers.{}] {ALLOW_DRIVER_CONFIG} must be true or false, not {}",
                self.name,
                other.type_str()
            )),
        }
    }
}

impl DriverPlan {
    pub fn is_managed(&self) -> bool {
        matches!(self.acquisition, Acquisition::Managed(_))
    }

    /// One line for `--check-config`.
    pub fn describe(&self) -> String {
        match &self.acquisition {
            Acquisition::Managed(row) => format!(
                "managed ({}{}), {} config key(s) passed on",
                row.program,
                self.binary
                    .as_ref()
                    .map(|b| format!(" at {}", b.display()))
                    .unwrap_or_default(),
                self.passthrough.len()
            ),
            Acquisition::Attach { socket, from } => {
                let from = match from {
                    SocketSource::Entry => "from the drivers list",
                    SocketSource::ConfigFile => "from socket_path",
                    SocketSource::Flag => "from --compute-driver-socket",
                };
                format!("attached at {} ({from})", socket.display())
            }
            Acquisition::Remote { addr, from, .. } => {
                let from = match from {
                    SocketSource::ConfigFile => "from endpoint",
                    _ => "from the drivers list",
                };
                format!("remote at {addr}, mutual TLS ({from})")
            }
        }
    }
}

/// Normalises a driver name: trimmed, lowercased, 1-63 of `[a-z0-9_-]`.
pub fn normalize_name(raw: &str) -> Result<String, String> {
    let name = raw.trim();
    if name.is_empty() {
        return Err("the driver name is empty".to_owned());
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(format!(
            "driver name {name:?} contains {bad:?}; use letters, digits, '-' and '_'"
        ));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "driver name {name:?} is {} characters; the limit is {MAX_NAME_LEN}",
            name.len()
        ));
    }
    Ok(name.to_ascii_lowercase())
}
