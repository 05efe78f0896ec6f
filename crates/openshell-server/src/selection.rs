//! Driver selection: the `--drivers` list, `NAME@/path` entries, TOML
//! `socket_path` and `--compute-driver-socket`, turned into one
//! [`DriverPlan`] per driver. Everything is checked here, before anything is
//! spawned or dialled.
//!
//! Rules:
//! - entries are comma-separated (`--drivers`, `OPENSHELL_DRIVERS`) or one
//!   per array element (`[openshell.gateway] compute_drivers`); each is
//!   trimmed and parsed on its own, split on the first `@`;
//! - names are lowercased and must be 1-63 of `[a-z0-9_-]`;
//! - `vm` and `podman` without a socket are run by the gateway (managed);
//! - `docker` and `kubernetes` without a socket are refused: there are no
//!   built-in backends for them, attach one with `NAME@/path`;
//! - any name with a socket (`NAME@/path`, `[openshell.drivers.NAME]
//!   socket_path`, or `--compute-driver-socket` with exactly one name) is
//!   attached, keeping `NAME`'s config table;
//! - any other name without a socket is an error that says how to give one;
//! - a name may appear once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{DriverTable, FlagSource};
use crate::error::{Error, Result};

/// Names the gateway can run itself.
pub const MANAGED_NAMES: &[&str] = &["vm", "podman"];
/// Well-known names this gateway has no built-in backend for.
pub const RESERVED_NAMES: &[&str] = &["docker", "kubernetes"];
/// Longest driver name.
pub const MAX_NAME_LEN: usize = 63;

/// Where the drivers list came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListOrigin {
    CommandLine,
    Env,
    File(PathBuf),
}

impl ListOrigin {
    fn label(&self) -> String {
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
    /// The gateway spawns the driver binary on `<run_dir>/<name>.sock`.
    Managed,
    /// The operator runs the driver; the gateway dials `socket`.
    Attach { socket: PathBuf, from: SocketSource },
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
    /// The driver's config table minus the gateway's keys.
    pub passthrough: toml::Table,
}

impl DriverPlan {
    pub fn is_managed(&self) -> bool {
        self.acquisition == Acquisition::Managed
    }

    /// One line for `--check-config`.
    pub fn describe(&self) -> String {
        match &self.acquisition {
            Acquisition::Managed => format!(
                "managed (openshell-driver-{}{}), {} config key(s) passed on",
                self.name,
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
        }
    }
}

/// What [`select`] works from.
#[derive(Debug, Clone)]
pub struct SelectionInput<'a> {
    /// The raw entries and where they came from; `None` when no source
    /// named any driver.
    pub list: Option<(Vec<String>, ListOrigin)>,
    pub compute_driver_socket: Option<(&'a str, FlagSource)>,
    pub tables: &'a BTreeMap<String, DriverTable>,
}

/// The selected drivers, in order (the first is the default), plus notes
/// worth a warning.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    pub plans: Vec<DriverPlan>,
    pub warnings: Vec<String>,
}

/// Normalises a driver name: trimmed, lowercased, 1-63 of `[a-z0-9_-]`.
pub fn normalize_name(raw: &str) -> std::result::Result<String, String> {
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

/// Checks an attached driver's socket path; `what` names the setting.
fn check_socket(path: &str, what: &str) -> std::result::Result<PathBuf, String> {
    if path.trim().is_empty() {
        return Err(format!("{what}: the socket path is empty"));
    }
    if path.contains('\0') {
        return Err(format!("{what}: the socket path contains a NUL byte"));
    }
    if !path.starts_with('/') {
        return Err(format!(
            "{what}: the socket path {path:?} must be absolute (start with '/')"
        ));
    }
    if path.ends_with('/') {
        return Err(format!(
            "{what}: the socket path {path:?} names a directory; add the socket's file name"
        ));
    }
    let path = PathBuf::from(path);
    driver_lifecycle::socket::check_socket_path(&path).map_err(|e| format!("{what}: {e}"))?;
    Ok(path)
}

/// A parsed list entry.
struct Entry {
    raw: String,
    name: String,
    socket: Option<PathBuf>,
}

fn parse_entry(
    raw: &str,
    index: usize,
    all: &[String],
    label: &str,
) -> std::result::Result<Entry, String> {
    let entry = raw.trim();
    if entry.is_empty() {
        let list = all.join(",");
        return Err(format!(
            "{label}: entry {} of {list:?} is empty; remove the extra comma or name a driver",
            index + 1
        ));
    }
    let (name_part, socket_part) = match entry.split_once('@') {
        Some((name, socket)) => (name.trim(), Some(socket.trim())),
        None => (entry, None),
    };
    let what = format!("{label} entry {entry:?}");
    if name_part.is_empty() {
        return Err(if socket_part.is_some() {
            format!("{what}: the driver name before '@' is empty; write NAME@/path/to/driver.sock")
        } else {
            format!("{what}: the driver name is empty")
        });
    }
    if socket_part.is_none() && name_part.starts_with('/') {
        return Err(format!(
            "{what} looks like a socket path; name the driver too: NAME@{name_part}"
        ));
    }
    let name = normalize_name(name_part).map_err(|e| format!("{what}: {e}"))?;
    let socket = match socket_part {
        None => None,
        Some("") => {
            let hint = if MANAGED_NAMES.contains(&name.as_str()) {
                format!(
                    "write {name}@/path/to/driver.sock, or just {name} to let the gateway run it"
                )
            } else {
                format!("write {name}@/path/to/driver.sock")
            };
            return Err(format!(
                "{what}: the socket path after '@' is empty; {hint}"
            ));
        }
        Some(path) => Some(check_socket(path, &what)?),
    };
    Ok(Entry {
        raw: entry.to_owned(),
        name,
        socket,
    })
}

fn socket_flag_label(source: FlagSource) -> &'static str {
    match source {
        FlagSource::CommandLine => "--compute-driver-socket",
        FlagSource::Env => "OPENSHELL_COMPUTE_DRIVER_SOCKET",
    }
}

/// Applies the selection rules. Errors name the offending entry or setting.
pub fn select(input: &SelectionInput<'_>) -> Result<Selection> {
    select_inner(input).map_err(Error::Config)
}

fn select_inner(input: &SelectionInput<'_>) -> std::result::Result<Selection, String> {
    let Some((raw_entries, origin)) = input.list.as_ref().filter(|(e, _)| !e.is_empty()) else {
        if let Some((_, source)) = input.compute_driver_socket {
            return Err(format!(
                "{} needs --drivers NAME (or OPENSHELL_DRIVERS=NAME) naming the one driver the socket belongs to",
                socket_flag_label(source)
            ));
        }
        return Err(
            "no compute driver configured; use --drivers (e.g. --drivers podman, or \
             --drivers NAME@/path/to/driver.sock), OPENSHELL_DRIVERS, or \
             [openshell.gateway] compute_drivers in gateway.toml"
                .to_owned(),
        );
    };
    let label = origin.label();
    let mut entries: Vec<Entry> = Vec::with_capacity(raw_entries.len());
    for (index, raw) in raw_entries.iter().enumerate() {
        let entry = parse_entry(raw, index, raw_entries, &label)?;
        if let Some(previous) = entries.iter().find(|e| e.name == entry.name) {
            return Err(format!(
                "{label} names driver '{}' twice ({:?} and {:?}); each driver may appear once",
                entry.name, previous.raw, entry.raw
            ));
        }
        entries.push(entry);
    }

    let socket_flag = match input.compute_driver_socket {
        None => None,
        Some((path, source)) => {
            let flag = socket_flag_label(source);
            if matches!(origin, ListOrigin::File(_)) {
                return Err(format!(
                    "{flag} needs --drivers NAME (or OPENSHELL_DRIVERS=NAME) naming the one driver \
                     the socket belongs to; compute_drivers in the config file does not count, so \
                     a stray environment variable cannot silently turn a driver into an attached one"
                ));
            }
            if entries.len() != 1 {
                let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
                return Err(format!(
                    "{flag} belongs to exactly one driver, but {label} names {}: {}; \
                     give each driver its socket as NAME@/path instead",
                    names.len(),
                    names.join(", ")
                ));
            }
            if let Some(entry) = entries.iter().find(|e| e.socket.is_some()) {
                return Err(format!(
                    "{flag} and {label} entry {:?} both give driver '{}' a socket; keep one",
                    entry.raw, entry.name
                ));
            }
            Some(check_socket(path, flag)?)
        }
    };

    let mut warnings = Vec::new();
    let mut plans = Vec::with_capacity(entries.len());
    for entry in entries {
        let table = input.tables.get(&entry.name).cloned().unwrap_or_default();
        let table_socket = table.socket_path.clone();
        let acquisition = match (entry.socket, socket_flag.clone(), table_socket) {
            (Some(socket), _, Some(configured)) if socket != configured => {
                if matches!(origin, ListOrigin::File(_)) {
                    return Err(format!(
                        "{label} entry {:?} and [openshell.drivers.{}] socket_path {:?} give \
                         driver '{}' two different sockets; keep one",
                        entry.raw,
                        entry.name,
                        configured.display().to_string(),
                        entry.name
                    ));
                }
                warnings.push(format!(
                    "driver '{}': {label} entry {:?} overrides socket_path {} from the config file",
                    entry.name,
                    entry.raw,
                    configured.display()
                ));
                Acquisition::Attach {
                    socket,
                    from: SocketSource::Entry,
                }
            }
            (Some(socket), _, _) => Acquisition::Attach {
                socket,
                from: SocketSource::Entry,
            },
            (None, Some(socket), configured) => {
                if let Some(configured) = configured.filter(|c| *c != socket) {
                    warnings.push(format!(
                        "driver '{}': --compute-driver-socket overrides socket_path {} from the config file",
                        entry.name,
                        configured.display()
                    ));
                }
                Acquisition::Attach {
                    socket,
                    from: SocketSource::Flag,
                }
            }
            (None, None, Some(socket)) => Acquisition::Attach {
                socket,
                from: SocketSource::ConfigFile,
            },
            (None, None, None) => {
                let name = entry.name.as_str();
                if MANAGED_NAMES.contains(&name) {
                    Acquisition::Managed
                } else if RESERVED_NAMES.contains(&name) {
                    return Err(format!(
                        "{label} entry {:?}: this gateway has no built-in {name} driver; run a \
                         {name} compute driver yourself and attach it with {name}@/path/to/driver.sock \
                         (or set [openshell.drivers.{name}] socket_path)",
                        entry.raw
                    ));
                } else {
                    return Err(format!(
                        "{label} entry {:?}: the gateway can only run {} itself, so driver '{name}' \
                         needs a socket: write {name}@/path/to/driver.sock, set \
                         [openshell.drivers.{name}] socket_path = \"/path/to/driver.sock\", or pass \
                         --compute-driver-socket /path/to/driver.sock with --drivers {name}",
                        entry.raw,
                        MANAGED_NAMES.join(" and ")
                    ));
                }
            }
        };
        if acquisition != Acquisition::Managed {
            let mut ignored: Vec<&str> = Vec::new();
            if table.binary.is_some() {
                ignored.push("binary");
            }
            if table.ready_timeout.is_some() {
                ignored.push("ready_timeout_secs");
            }
            ignored.extend(table.passthrough.keys().map(String::as_str));
            if !ignored.is_empty() {
                warnings.push(format!(
                    "driver '{}' is attached, so the gateway does not start it and ignores \
                     [openshell.drivers.{}] key(s): {}",
                    entry.name,
                    entry.name,
                    ignored.join(", ")
                ));
            }
        }
        plans.push(DriverPlan {
            name: entry.name,
            acquisition,
            expect_driver_name: table.expect_driver_name,
            binary: table.binary,
            ready_timeout: table.ready_timeout,
            passthrough: table.passthrough,
        });
    }
    for (i, plan) in plans.iter().enumerate() {
        if let Acquisition::Attach { socket, .. } = &plan.acquisition
            && let Some(other) = plans[..i].iter().find(
                |p| matches!(&p.acquisition, Acquisition::Attach { socket: s, .. } if s == socket),
            )
        {
            warnings.push(format!(
                "drivers '{}' and '{}' both attach to {}; they are the same driver process",
                other.name,
                plan.name,
                socket.display()
            ));
        }
    }
    Ok(Selection { plans, warnings })
}

/// The socket of a managed driver: `<run_dir>/<name>.sock`.
pub fn managed_socket(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join(format!("{name}.sock"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FileConfig;
    use proptest::prelude::*;

    /// What a case expects: the resolved drivers as `name=managed` or
    /// `name@/socket`, or every listed fragment in the error.
    enum Want {
        Ok(&'static [&'static str]),
        Err(&'static [&'static str]),
    }
    use Want::{Err as E, Ok as O};

    struct Case {
        drivers: Option<&'static str>,
        env: bool,
        socket: Option<&'static str>,
        toml: &'static str,
        want: Want,
    }

    const fn flag(drivers: &'static str, want: Want) -> Case {
        Case {
            drivers: Some(drivers),
            env: false,
            socket: None,
            toml: "",
            want,
        }
    }

    fn run(case: &Case) -> std::result::Result<Vec<String>, String> {
        let file =
            FileConfig::parse(case.toml, Path::new("/etc/gw.toml")).map_err(|e| e.to_string())?;
        let list = match case.drivers {
            Some(text) => Some((
                text.split(',').map(str::to_owned).collect(),
                if case.env {
                    ListOrigin::Env
                } else {
                    ListOrigin::CommandLine
                },
            )),
            None => file
                .gateway
                .compute_drivers
                .clone()
                .map(|entries| (entries, ListOrigin::File(file.path.clone()))),
        };
        let socket_source = if case.env {
            FlagSource::Env
        } else {
            FlagSource::CommandLine
        };
        let selection = select(&SelectionInput {
            list,
            compute_driver_socket: case.socket.map(|s| (s, socket_source)),
            tables: &file.drivers,
        })
        .map_err(|e| e.to_string())?;
        Ok(selection
            .plans
            .iter()
            .map(|p| match &p.acquisition {
                Acquisition::Managed => format!("{}=managed", p.name),
                Acquisition::Attach { socket, .. } => format!("{}@{}", p.name, socket.display()),
            })
            .collect())
    }

    #[test]
    fn selection_table() {
        let long_name = "a".repeat(64);
        let long_name: &'static str = Box::leak(long_name.into_boxed_str());
        let long_socket: &'static str =
            Box::leak(format!("kyma@/{}", "s".repeat(120)).into_boxed_str());
        let cases = [
            // Valid.
            flag("vm", O(&["vm=managed"])),
            flag("podman", O(&["podman=managed"])),
            flag("VM", O(&["vm=managed"])),
            flag(" podman , vm ", O(&["podman=managed", "vm=managed"])),
            flag("vm@/run/vm.sock", O(&["vm@/run/vm.sock"])),
            flag("podman@/run/p.sock", O(&["podman@/run/p.sock"])),
            flag("docker@/run/d.sock", O(&["docker@/run/d.sock"])),
            flag(
                "kubernetes@/var/run/k8s.sock",
                O(&["kubernetes@/var/run/k8s.sock"]),
            ),
            flag("kyma@/run/kyma.sock", O(&["kyma@/run/kyma.sock"])),
            flag("Kyma_2-x@/run/k.sock", O(&["kyma_2-x@/run/k.sock"])),
            flag("a@/x@y.sock", O(&["a@/x@y.sock"])),
            flag(
                "vm,podman,kyma@/k.sock",
                O(&["vm=managed", "podman=managed", "kyma@/k.sock"]),
            ),
            Case {
                drivers: Some("kyma"),
                env: false,
                socket: None,
                toml: "[openshell.drivers.kyma]\nsocket_path = \"/run/kyma.sock\"",
                want: O(&["kyma@/run/kyma.sock"]),
            },
            Case {
                drivers: Some("vm"),
                env: false,
                socket: None,
                toml: "[openshell.drivers.vm]\nsocket_path = \"/run/vm.sock\"",
                want: O(&["vm@/run/vm.sock"]),
            },
            Case {
                drivers: Some("kubernetes"),
                env: true,
                socket: Some("/var/run/driver.sock"),
                toml: "",
                want: O(&["kubernetes@/var/run/driver.sock"]),
            },
            Case {
                drivers: Some("kyma"),
                env: false,
                socket: Some("/run/k.sock"),
                toml: "[openshell.drivers.kyma]\nsocket_path = \"/run/other.sock\"",
                want: O(&["kyma@/run/k.sock"]),
            },
            Case {
                drivers: Some("kyma@/run/flag.sock"),
                env: false,
                socket: None,
                toml: "[openshell.drivers.kyma]\nsocket_path = \"/run/file.sock\"",
                want: O(&["kyma@/run/flag.sock"]),
            },
            Case {
                drivers: None,
                env: false,
                socket: None,
                toml: "[openshell.gateway]\ncompute_drivers = [\"podman\", \"ext@/run/e.sock\"]",
                want: O(&["podman=managed", "ext@/run/e.sock"]),
            },
            Case {
                drivers: Some("vm"),
                env: false,
                socket: None,
                toml: "[openshell.gateway]\ncompute_drivers = [\"podman\"]",
                want: O(&["vm=managed"]),
            },
            // Invalid.
            flag("", E(&["--drivers: entry 1 of \"\" is empty"])),
            flag(
                "vm,,podman",
                E(&["entry 2 of \"vm,,podman\" is empty", "extra comma"]),
            ),
            flag("vm,", E(&["entry 2 of \"vm,\" is empty"])),
            flag(
                "@/run/x.sock",
                E(&["\"@/run/x.sock\"", "name before '@' is empty"]),
            ),
            flag(
                "vm@",
                E(&["\"vm@\"", "socket path after '@' is empty", "or just vm"]),
            ),
            flag(
                "kyma@",
                E(&["\"kyma@\"", "write kyma@/path/to/driver.sock"]),
            ),
            flag("kyma@ ", E(&["socket path after '@' is empty"])),
            flag(
                "my.driver@/x.sock",
                E(&["\"my.driver@/x.sock\"", "contains '.'"]),
            ),
            flag("my driver", E(&["\"my driver\"", "contains ' '"])),
            flag("dr/iver", E(&["contains '/'"])),
            flag(
                "/run/x.sock",
                E(&["looks like a socket path", "NAME@/run/x.sock"]),
            ),
            flag(long_name, E(&["64 characters", "limit is 63"])),
            flag(
                "kyma@run/k.sock",
                E(&["\"kyma@run/k.sock\"", "must be absolute"]),
            ),
            flag("kyma@/run/dir/", E(&["names a directory"])),
            flag(long_socket, E(&["limited to 107 bytes"])),
            flag(
                "docker",
                E(&[
                    "\"docker\"",
                    "no built-in docker driver",
                    "docker@/path/to/driver.sock",
                ]),
            ),
            flag(
                "kubernetes",
                E(&[
                    "no built-in kubernetes driver",
                    "kubernetes@/path/to/driver.sock",
                ]),
            ),
            flag(
                "kyma",
                E(&[
                    "\"kyma\"",
                    "needs a socket",
                    "kyma@/path/to/driver.sock",
                    "socket_path",
                    "--compute-driver-socket",
                ]),
            ),
            flag(
                "vm,VM",
                E(&["names driver 'vm' twice", "\"vm\" and \"VM\""]),
            ),
            flag("vm,vm@/run/v.sock", E(&["names driver 'vm' twice"])),
            Case {
                drivers: None,
                env: false,
                socket: None,
                toml: "",
                want: E(&["no compute driver configured", "--drivers"]),
            },
            Case {
                drivers: None,
                env: false,
                socket: Some("/run/x.sock"),
                toml: "",
                want: E(&["--compute-driver-socket needs --drivers NAME"]),
            },
            Case {
                drivers: None,
                env: true,
                socket: Some("/run/x.sock"),
                toml: "[openshell.gateway]\ncompute_drivers = [\"kyma\"]",
                want: E(&[
                    "OPENSHELL_COMPUTE_DRIVER_SOCKET needs --drivers NAME",
                    "does not count",
                ]),
            },
            Case {
                drivers: Some("vm,podman"),
                env: false,
                socket: Some("/run/x.sock"),
                toml: "",
                want: E(&[
                    "--compute-driver-socket belongs to exactly one driver",
                    "names 2: vm, podman",
                ]),
            },
            Case {
                drivers: Some("kyma@/a.sock"),
                env: false,
                socket: Some("/b.sock"),
                toml: "",
                want: E(&["both give driver 'kyma' a socket"]),
            },
            Case {
                drivers: Some("kyma"),
                env: false,
                socket: Some(""),
                toml: "",
                want: E(&["--compute-driver-socket: the socket path is empty"]),
            },
            Case {
                drivers: Some("kyma"),
                env: true,
                socket: Some("relative.sock"),
                toml: "",
                want: E(&["OPENSHELL_COMPUTE_DRIVER_SOCKET", "must be absolute"]),
            },
            Case {
                drivers: Some(""),
                env: true,
                socket: None,
                toml: "",
                want: E(&["OPENSHELL_DRIVERS: entry 1"]),
            },
            Case {
                drivers: None,
                env: false,
                socket: None,
                toml: "[openshell.gateway]\ncompute_drivers = [\"kyma@/a.sock\"]\n[openshell.drivers.kyma]\nsocket_path = \"/b.sock\"",
                want: E(&["two different sockets", "/etc/gw.toml"]),
            },
            Case {
                drivers: None,
                env: false,
                socket: None,
                toml: "[openshell.gateway]\ncompute_drivers = [\"docker\"]",
                want: E(&["/etc/gw.toml: openshell.gateway.compute_drivers entry \"docker\""]),
            },
            Case {
                drivers: None,
                env: false,
                socket: None,
                toml: "[openshell.gateway]\ncompute_drivers = []",
                want: E(&["no compute driver configured"]),
            },
            Case {
                drivers: Some("kyma"),
                env: false,
                socket: None,
                toml: "[openshell.drivers.kyma]\nsocket_path = \"kyma.sock\"",
                want: E(&["openshell.drivers.kyma.socket_path must be an absolute path"]),
            },
        ];
        assert!(cases.len() >= 30, "the table has {} cases", cases.len());
        for case in &cases {
            let got = run(case);
            let input = format!(
                "drivers={:?} env={} socket={:?} toml={:?}",
                case.drivers, case.env, case.socket, case.toml
            );
            match (&case.want, got) {
                (O(want), Ok(got)) => assert_eq!(got, *want, "{input}"),
                (E(fragments), Err(message)) => {
                    for fragment in *fragments {
                        assert!(
                            message.contains(fragment),
                            "{input}: {message:?} lacks {fragment:?}"
                        );
                    }
                }
                (O(_), Err(message)) => panic!("{input}: unexpected error {message}"),
                (E(_), Ok(got)) => panic!("{input}: expected an error, got {got:?}"),
            }
        }
    }

    #[test]
    fn attached_drivers_warn_about_ignored_keys() {
        let file = FileConfig::parse(
            "[openshell.drivers.vm]\nsocket_path = \"/run/vm.sock\"\nbinary = \"/opt/vm\"\nvcpus = 2",
            Path::new("/etc/gw.toml"),
        )
        .unwrap();
        let selection = select(&SelectionInput {
            list: Some((vec!["vm".to_owned()], ListOrigin::CommandLine)),
            compute_driver_socket: None,
            tables: &file.drivers,
        })
        .unwrap();
        assert_eq!(selection.warnings.len(), 1, "{:?}", selection.warnings);
        assert!(
            selection.warnings[0].contains("binary, vcpus"),
            "{:?}",
            selection.warnings
        );
    }

    #[test]
    fn two_names_on_one_socket_warn() {
        let selection = select(&SelectionInput {
            list: Some((
                vec!["a@/run/x.sock".to_owned(), "b@/run/x.sock".to_owned()],
                ListOrigin::CommandLine,
            )),
            compute_driver_socket: None,
            tables: &BTreeMap::new(),
        })
        .unwrap();
        assert_eq!(selection.plans.len(), 2);
        assert!(
            selection.warnings[0].contains("'a' and 'b' both attach to /run/x.sock"),
            "{:?}",
            selection.warnings
        );
    }

    #[test]
    fn managed_plans_carry_their_table() {
        let file = FileConfig::parse(
            "[openshell.drivers.podman]\nbinary = \"/opt/p\"\nready_timeout_secs = 3\nexpect_driver_name = \"x\"\nsocket_uri = \"unix:///p.sock\"",
            Path::new("/etc/gw.toml"),
        )
        .unwrap();
        let selection = select(&SelectionInput {
            list: Some((vec!["podman".to_owned()], ListOrigin::CommandLine)),
            compute_driver_socket: None,
            tables: &file.drivers,
        })
        .unwrap();
        let plan = &selection.plans[0];
        assert!(plan.is_managed());
        assert_eq!(plan.binary.as_deref(), Some(Path::new("/opt/p")));
        assert_eq!(plan.ready_timeout, Some(Duration::from_secs(3)));
        assert_eq!(plan.expect_driver_name.as_deref(), Some("x"));
        assert_eq!(plan.passthrough.keys().collect::<Vec<_>>(), ["socket_uri"]);
        assert!(selection.warnings.is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn selection_never_panics(
            entries in proptest::collection::vec(".{0,40}", 0..5),
            joined in "[a-zA-Z@/,. _-]{0,60}",
            socket in proptest::option::of(".{0,130}"),
            from_env in any::<bool>(),
        ) {
            let tables = BTreeMap::new();
            let origin = if from_env { ListOrigin::Env } else { ListOrigin::CommandLine };
            let source = if from_env { FlagSource::Env } else { FlagSource::CommandLine };
            for list in [entries.clone(), joined.split(',').map(str::to_owned).collect()] {
                let result = select(&SelectionInput {
                    list: Some((list, origin.clone())),
                    compute_driver_socket: socket.as_deref().map(|s| (s, source)),
                    tables: &tables,
                });
                if let Ok(selection) = result {
                    for plan in &selection.plans {
                        prop_assert!(normalize_name(&plan.name).as_deref() == Ok(plan.name.as_str()));
                    }
                }
            }
        }

        #[test]
        fn config_parser_never_panics(text in "(\\[openshell(\\.(gateway|drivers(\\.[a-zA-Z\" ]{1,6})?))?\\]\n|[a-z_]{1,12} = (\"[^\"\n]{0,20}\"|[0-9.-]{1,6}|true|\\[\\]|\\{\\})\n){0,8}") {
            let _ = FileConfig::parse(&text, Path::new("/x.toml"));
        }
    }
}
