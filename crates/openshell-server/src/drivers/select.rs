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
use std::path::PathBuf;

use crate::drivers::managed::{managed_driver, managed_names};
use crate::drivers::plan::{
    Acquisition, DriverPlan, DriverTable, FlagSource, ListOrigin, SocketSource, normalize_name,
};
use crate::error::{Error, Result};

/// Well-known names this gateway has no built-in backend for.
pub const RESERVED_NAMES: &[&str] = &["docker", "kubernetes"];

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
    /// `NAME@https://HOST:PORT`: a driver on another host.
    remote: Option<openshell_wire::tls::HttpsAddr>,
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
    if let Some(url) = socket_part.filter(|p| p.contains("://")) {
        let addr = openshell_wire::tls::HttpsAddr::parse(url).map_err(|e| {
            format!("{what}: {e}; a remote driver is NAME@https://HOST:PORT (mutual TLS)")
        })?;
        return Ok(Entry {
            raw: entry.to_owned(),
            name,
            socket: None,
            remote: Some(addr),
        });
    }
    let socket = match socket_part {
        None => None,
        Some("") => {
            let hint = if managed_driver(&name).is_some() {
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
        remote: None,
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
    let (raw_entries, origin) = required_list(input)?;
    let label = origin.label();
    let entries = parse_entries(raw_entries, &label)?;
    let socket_flag = socket_flag(input.compute_driver_socket, origin, &entries, &label)?;
    let mut warnings = Vec::new();
    let mut plans = Vec::with_capacity(entries.len());
    for entry in entries {
        let table = input.tables.get(&entry.name).cloned().unwrap_or_default();
        let (acquisition, warning) = match remote_for(&entry, socket_flag.as_ref(), &table)? {
            Some(remote) => (remote, None),
            None => acquisition_for(&entry, socket_flag.as_ref(), &table, origin, &label)?,
        };
        warnings.extend(warning);
        if !matches!(acquisition, Acquisition::Managed(_)) {
            warnings.extend(ignored_keys_warning(&entry.name, &table));
        }
        plans.push(DriverPlan {
            name: entry.name,
            acquisition,
            expect_driver_name: table.expect_driver_name,
            binary: table.binary,
            ready_timeout: table.ready_timeout,
            trust_driver_readiness: table.trust_driver_readiness,
            passthrough: table.passthrough,
        });
    }
    warnings.extend(shared_socket_warnings(&plans));
    Ok(Selection { plans, warnings })
}

/// Step 1: the drivers list, which must name at least one driver.
fn required_list<'i>(
    input: &'i SelectionInput<'_>,
) -> std::result::Result<(&'i [String], &'i ListOrigin), String> {
    if let Some((entries, origin)) = input.list.as_ref().filter(|(e, _)| !e.is_empty()) {
        return Ok((entries, origin));
    }
    if let Some((_, source)) = input.compute_driver_socket {
        return Err(format!(
            "{} needs --drivers NAME (or OPENSHELL_DRIVERS=NAME) naming the one driver the socket belongs to",
            socket_flag_label(source)
        ));
    }
    Err(
        "no compute driver configured; use --drivers (e.g. --drivers podman, or \
         --drivers NAME@/path/to/driver.sock), OPENSHELL_DRIVERS, or \
         [openshell.gateway] compute_drivers in gateway.toml"
            .to_owned(),
    )
}

/// Step 2: every entry parsed, each name at most once.
fn parse_entries(raw_entries: &[String], label: &str) -> std::result::Result<Vec<Entry>, String> {
    let mut entries: Vec<Entry> = Vec::with_capacity(raw_entries.len());
    for (index, raw) in raw_entries.iter().enumerate() {
        let entry = parse_entry(raw, index, raw_entries, label)?;
        if let Some(previous) = entries.iter().find(|e| e.name == entry.name) {
            return Err(format!(
                "{label} names driver '{}' twice ({:?} and {:?}); each driver may appear once",
                entry.name, previous.raw, entry.raw
            ));
        }
        entries.push(entry);
    }
    Ok(entries)
}

/// Step 3: `--compute-driver-socket`, which belongs to exactly one driver
/// named on the command line or in the environment.
fn socket_flag(
    flag: Option<(&str, FlagSource)>,
    origin: &ListOrigin,
    entries: &[Entry],
    label: &str,
) -> std::result::Result<Option<PathBuf>, String> {
    let Some((path, source)) = flag else {
        return Ok(None);
    };
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
    check_socket(path, flag).map(Some)
}

/// Step 4: how one driver is acquired, from its entry, the socket flag and
/// its table's `socket_path` (in that order of precedence), plus a warning
/// when one overrides another.
fn acquisition_for(
    entry: &Entry,
    socket_flag: Option<&PathBuf>,
    table: &DriverTable,
    origin: &ListOrigin,
    label: &str,
) -> std::result::Result<(Acquisition, Option<String>), String> {
    let attach = |socket: &PathBuf, from| Acquisition::Attach {
        socket: socket.clone(),
        from,
    };
    let configured = table.socket_path.as_ref();
    match (entry.socket.as_ref(), socket_flag, configured) {
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
            let warning = format!(
                "driver '{}': {label} entry {:?} overrides socket_path {} from the config file",
                entry.name,
                entry.raw,
                configured.display()
            );
            Ok((attach(socket, SocketSource::Entry), Some(warning)))
        }
        (Some(socket), _, _) => Ok((attach(socket, SocketSource::Entry), None)),
        (None, Some(socket), configured) => {
            let warning = configured.filter(|c| *c != socket).map(|configured| {
                format!(
                    "driver '{}': --compute-driver-socket overrides socket_path {} from the config file",
                    entry.name,
                    configured.display()
                )
            });
            Ok((attach(socket, SocketSource::Flag), warning))
        }
        (None, None, Some(socket)) => Ok((attach(socket, SocketSource::ConfigFile), None)),
        (None, None, None) => without_socket(entry, label).map(|a| (a, None)),
    }
}

/// A driver on another host: `NAME@https://...` in the list, or the
/// table's `endpoint` when nothing names a socket. A table with both
/// `socket_path` and `endpoint` is refused.
fn remote_for(
    entry: &Entry,
    socket_flag: Option<&PathBuf>,
    table: &DriverTable,
) -> std::result::Result<Option<Acquisition>, String> {
    let name = &entry.name;
    if table.endpoint.is_some() && table.socket_path.is_some() {
        return Err(format!(
            "[openshell.drivers.{name}] sets both socket_path and endpoint; a driver is \
             reached one way: keep socket_path for a local socket or endpoint for https://HOST:PORT"
        ));
    }
    if let Some(addr) = &entry.remote {
        return Ok(Some(Acquisition::Remote {
            addr: addr.clone(),
            tls: table.tls.clone(),
            from: SocketSource::Entry,
        }));
    }
    let Some(endpoint) = table.endpoint.as_deref() else {
        return Ok(None);
    };
    if entry.socket.is_some() || socket_flag.is_some() {
        return Ok(None);
    }
    let addr = openshell_wire::tls::HttpsAddr::parse(endpoint.trim())
        .map_err(|e| format!("[openshell.drivers.{name}] endpoint: {e}"))?;
    Ok(Some(Acquisition::Remote {
        addr,
        tls: table.tls.clone(),
        from: SocketSource::ConfigFile,
    }))
}

/// A name given without any socket: managed when the gateway can run it,
/// otherwise an error that says how to attach it.
fn without_socket(entry: &Entry, label: &str) -> std::result::Result<Acquisition, String> {
    let name = entry.name.as_str();
    if let Some(row) = managed_driver(name) {
        return Ok(Acquisition::Managed(row));
    }
    if RESERVED_NAMES.contains(&name) {
        return Err(format!(
            "{label} entry {:?}: this gateway has no built-in {name} driver; run a \
             {name} compute driver yourself and attach it with {name}@/path/to/driver.sock \
             (or set [openshell.drivers.{name}] socket_path)",
            entry.raw
        ));
    }
    Err(format!(
        "{label} entry {:?}: the gateway can only run {} itself, so driver '{name}' \
         needs a socket: write {name}@/path/to/driver.sock, set \
         [openshell.drivers.{name}] socket_path = \"/path/to/driver.sock\", or pass \
         --compute-driver-socket /path/to/driver.sock with --drivers {name}",
        entry.raw,
        managed_names()
    ))
}

/// Step 5: keys of an attached driver's table that nothing will read.
fn ignored_keys_warning(name: &str, table: &DriverTable) -> Option<String> {
    let mut ignored: Vec<&str> = Vec::new();
    if table.binary.is_some() {
        ignored.push("binary");
    }
    if table.ready_timeout.is_some() {
        ignored.push("ready_timeout_secs");
    }
    ignored.extend(
        table
            .passthrough
            .keys()
            .map(String::as_str)
            .filter(|k| *k != crate::drivers::plan::ALLOW_DRIVER_CONFIG),
    );
    (!ignored.is_empty()).then(|| {
        format!(
            "driver '{name}' is attached, so the gateway does not start it and ignores \
             [openshell.drivers.{name}] key(s): {}",
            ignored.join(", ")
        )
    })
}

/// Step 6: two names attached to one socket are one driver process.
fn shared_socket_warnings(plans: &[DriverPlan]) -> Vec<String> {
    let mut warnings = Vec::new();
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
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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

    fn entry(raw: &str) -> Entry {
        parse_entry(raw, 0, &[raw.to_owned()], "--drivers").unwrap()
    }

    #[test]
    fn step_acquisition_precedence() {
        let table = DriverTable {
            socket_path: Some(PathBuf::from("/run/file.sock")),
            ..DriverTable::default()
        };
        let flag = PathBuf::from("/run/flag.sock");
        let cli = ListOrigin::CommandLine;
        let (a, warning) =
            acquisition_for(&entry("k@/run/e.sock"), None, &table, &cli, "--drivers").unwrap();
        assert_eq!(
            a,
            Acquisition::Attach {
                socket: PathBuf::from("/run/e.sock"),
                from: SocketSource::Entry
            }
        );
        assert!(
            warning
                .unwrap()
                .contains("overrides socket_path /run/file.sock")
        );
        let (a, warning) =
            acquisition_for(&entry("k"), Some(&flag), &table, &cli, "--drivers").unwrap();
        assert_eq!(
            a,
            Acquisition::Attach {
                socket: flag.clone(),
                from: SocketSource::Flag
            }
        );
        assert!(
            warning
                .unwrap()
                .contains("--compute-driver-socket overrides")
        );
        let (a, warning) = acquisition_for(&entry("k"), None, &table, &cli, "--drivers").unwrap();
        assert_eq!(
            a,
            Acquisition::Attach {
                socket: PathBuf::from("/run/file.sock"),
                from: SocketSource::ConfigFile
            }
        );
        assert!(warning.is_none());
        let empty = DriverTable::default();
        let (a, _) = acquisition_for(&entry("podman"), None, &empty, &cli, "--drivers").unwrap();
        assert_eq!(a, Acquisition::Managed(managed_driver("podman").unwrap()));
        let file = ListOrigin::File(PathBuf::from("/etc/gw.toml"));
        let message =
            acquisition_for(&entry("k@/run/e.sock"), None, &table, &file, "gw.toml").unwrap_err();
        assert!(message.contains("two different sockets"), "{message}");
    }

    #[test]
    fn step_ignored_keys_and_socket_flag() {
        assert_eq!(ignored_keys_warning("k", &DriverTable::default()), None);
        let mut table = DriverTable {
            binary: Some(PathBuf::from("/opt/k")),
            ..DriverTable::default()
        };
        table
            .passthrough
            .insert("vcpus".into(), toml::Value::Integer(2));
        let warning = ignored_keys_warning("k", &table).unwrap();
        assert!(
            warning.contains("[openshell.drivers.k] key(s): binary, vcpus"),
            "{warning}"
        );

        let entries = vec![entry("k")];
        let cli = ListOrigin::CommandLine;
        assert_eq!(socket_flag(None, &cli, &entries, "--drivers"), Ok(None));
        assert_eq!(
            socket_flag(
                Some(("/run/k.sock", FlagSource::CommandLine)),
                &cli,
                &entries,
                "--drivers"
            ),
            Ok(Some(PathBuf::from("/run/k.sock")))
        );
        let two = vec![entry("a"), entry("b")];
        let message = socket_flag(
            Some(("/run/k.sock", FlagSource::Env)),
            &cli,
            &two,
            "--drivers",
        )
        .unwrap_err();
        assert!(
            message.starts_with("OPENSHELL_COMPUTE_DRIVER_SOCKET belongs to exactly one driver"),
            "{message}"
        );
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
    }
}
