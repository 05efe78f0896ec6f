//! The sources of the gateway's settings: the command line (with the
//! environment variables clap reads) and `gateway.toml`. They are merged,
//! and drivers are selected, in [`crate::settings`].
//!
//! Precedence: a flag beats its environment variable, which beats the TOML
//! file, which beats the built-in default. The file is read with serde:
//! unknown keys in the gateway's own tables (`[openshell]`,
//! `[openshell.gateway]`) are errors naming the file, line, column and the
//! key's full path; `[openshell.drivers.NAME]` tables are passed through to
//! managed drivers, minus the keys the gateway itself reads (`socket_path`,
//! `expect_driver_name`, `binary`, `ready_timeout_secs`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory as _, FromArgMatches as _, Parser, ValueEnum};

use crate::drivers::plan::{DriverTable, FlagSource, normalize_name};
use crate::error::{Error, Result};

/// The gateway's command line. Every flag except `--config` and
/// `--check-config` also has a TOML key under `[openshell.gateway]`.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "openshell-gateway",
    version,
    args_override_self = true,
    about = "The OpenShell gateway: runs sandboxes through compute drivers spoken to over gRPC on Unix sockets"
)]
pub struct Cli {
    /// Compute drivers, comma-separated, first one is the default:
    /// `vm` and `podman` are run by the gateway; `NAME@/path/driver.sock`
    /// attaches to a driver you run yourself. May be given more than once.
    #[arg(
        long = "drivers",
        alias = "driver",
        env = "OPENSHELL_DRIVERS",
        value_name = "LIST"
    )]
    pub drivers: Vec<String>,

    /// Socket of the single driver named by --drivers (same as NAME@PATH).
    #[arg(long, env = "OPENSHELL_COMPUTE_DRIVER_SOCKET", value_name = "PATH")]
    pub compute_driver_socket: Option<String>,

    /// Gateway config file [default: $XDG_CONFIG_HOME/openshell/gateway.toml
    /// when it exists].
    #[arg(long, env = "OPENSHELL_GATEWAY_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Where the gateway keeps its database and managed drivers keep their
    /// state [default: $XDG_STATE_HOME/openshell].
    #[arg(long, env = "OPENSHELL_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Private directory for sockets of the gateway and managed drivers
    /// [default: $XDG_RUNTIME_DIR/openshell, or /tmp/openshell-UID].
    #[arg(long, env = "OPENSHELL_RUN_DIR", value_name = "DIR")]
    pub run_dir: Option<PathBuf>,

    /// Where to serve the API: unix:///path or tcp://HOST:PORT
    /// [default: unix://RUN_DIR/gateway.sock].
    #[arg(long, env = "OPENSHELL_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,

    /// Allow a TCP listen address other machines can reach. The API has no
    /// authentication: only do this on a trusted network.
    #[arg(
        long,
        env = "OPENSHELL_ALLOW_REMOTE",
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub allow_remote: Option<bool>,

    /// Server certificate (PEM) for a tcp:// listener. TCP is always TLS
    /// with client certificates; see `openshell-gateway certs init`.
    #[arg(long, env = "OPENSHELL_TLS_CERT", value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "OPENSHELL_TLS_KEY", value_name = "PATH")]
    pub tls_key: Option<PathBuf>,

    /// CA (PEM) that clients' certificates must be signed by.
    #[arg(long, env = "OPENSHELL_TLS_CLIENT_CA", value_name = "PATH")]
    pub tls_client_ca: Option<PathBuf>,

    /// Development only: serve tcp:// on loopback without TLS. Any local
    /// user can then drive the gateway.
    #[arg(
        long,
        env = "OPENSHELL_INSECURE_TCP",
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub insecure_tcp: Option<bool>,

    /// Also accept this uid on the gateway's Unix socket (the gateway's own
    /// uid always is). Repeatable.
    #[arg(long = "allow-uid", value_name = "UID")]
    pub allow_uids: Vec<u32>,

    /// Also accept peers whose primary gid is this on the gateway's Unix
    /// socket. Repeatable.
    #[arg(long = "allow-gid", value_name = "GID")]
    pub allow_gids: Vec<u32>,

    /// CA (PEM) that remote drivers' server certificates must be signed by
    /// (default for every `NAME@https://...` driver).
    #[arg(long, env = "OPENSHELL_DRIVER_TLS_CA", value_name = "PATH")]
    pub driver_tls_ca: Option<PathBuf>,

    /// Client certificate (PEM) the gateway presents to remote drivers.
    #[arg(long, env = "OPENSHELL_DRIVER_TLS_CERT", value_name = "PATH")]
    pub driver_tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --driver-tls-cert.
    #[arg(long, env = "OPENSHELL_DRIVER_TLS_KEY", value_name = "PATH")]
    pub driver_tls_key: Option<PathBuf>,

    /// Log line format.
    #[arg(long, env = "OPENSHELL_LOG_FORMAT", value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Log filter, e.g. `info` or `openshell_server=debug` [default: RUST_LOG,
    /// else info].
    #[arg(long, env = "OPENSHELL_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,

    /// Deadline for each unary call to a driver, in seconds [default: 30].
    #[arg(long, value_name = "SECS")]
    pub driver_call_timeout: Option<f64>,

    /// How long to keep dialing an attached driver's socket at startup, in
    /// seconds [default: 30].
    #[arg(long, value_name = "SECS")]
    pub driver_connect_timeout: Option<f64>,

    /// A driver the gateway must reach to start (repeatable): without it,
    /// a configured driver that is down at startup is marked Unavailable
    /// and dialled in the background while the others serve.
    #[arg(long = "require-driver", value_name = "NAME")]
    pub require_driver: Vec<String>,
    /// Most WatchSandboxes streams open at once; one more is refused with
    /// RESOURCE_EXHAUSTED [default: 1024].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_watches: Option<u32>,

    /// Milliseconds the gateway gathers sandbox changes before waking the
    /// open WatchSandboxes streams, so a burst of changes wakes each once;
    /// watches hear of a change up to this much later (0: at once)
    /// [default: 5].
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub watch_coalesce_ms: Option<u32>,

    /// Resolve and print the configuration, then exit without starting
    /// anything.
    #[arg(long)]
    pub check_config: bool,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl LogFormat {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "text" => Some(Self::Text),
            "json" => Some(Self::Json),
            _ => None,
        }
    }
}

/// Where `--drivers` and `--compute-driver-socket` came from, for messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CliSources {
    pub drivers: Option<FlagSource>,
    pub compute_driver_socket: Option<FlagSource>,
}

fn flag_source(matches: &ArgMatches, id: &str) -> Option<FlagSource> {
    match matches.value_source(id)? {
        ValueSource::CommandLine => Some(FlagSource::CommandLine),
        ValueSource::EnvVariable => Some(FlagSource::Env),
        _ => None,
    }
}

/// Parses the command line (and the environment variables clap reads).
pub fn parse_cli<I, T>(args: I) -> std::result::Result<(Cli, CliSources), clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let matches = Cli::command().try_get_matches_from(args)?;
    let cli = Cli::from_arg_matches(&matches)?;
    let sources = CliSources {
        drivers: flag_source(&matches, "drivers"),
        compute_driver_socket: flag_source(&matches, "compute_driver_socket"),
    };
    Ok((cli, sources))
}

/// `[openshell.gateway]` as written in the file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GatewayTable {
    pub compute_drivers: Option<Vec<String>>,
    pub listen: Option<String>,
    pub allow_remote: Option<bool>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub insecure_tcp: Option<bool>,
    pub allow_uids: Vec<u32>,
    pub allow_gids: Vec<u32>,
    pub driver_tls_ca: Option<PathBuf>,
    pub driver_tls_cert: Option<PathBuf>,
    pub driver_tls_key: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub run_dir: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
    pub driver_call_timeout: Option<Duration>,
    pub driver_connect_timeout: Option<Duration>,
    pub reconcile_interval: Option<Duration>,
    pub orphan_grace: Option<Duration>,
    pub driver_probe_interval: Option<Duration>,
    pub driver_probe_timeout: Option<Duration>,
    pub max_watches: Option<u32>,
    pub watch_coalesce_ms: Option<u32>,
}

/// A parsed `gateway.toml`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FileConfig {
    pub path: PathBuf,
    pub gateway: GatewayTable,
    /// Keyed by the normalised driver name.
    pub drivers: BTreeMap<String, DriverTable>,
    /// Drivers whose table says `required = true`.
    pub required_drivers: std::collections::BTreeSet<String>,
}

/// The file as serde reads it. Every table the gateway owns refuses
/// unknown keys; driver tables keep theirs for the driver.
mod raw {
    use std::collections::BTreeMap;
    use std::fmt;
    use std::path::PathBuf;
    use std::time::Duration;

    use serde::Deserialize;
    use serde::de::{self, Deserializer, SeqAccess, Visitor};

    use super::LogFormat;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct File {
        pub openshell: Option<Openshell>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Openshell {
        #[expect(dead_code, reason = "only checked: 1 is the one version there is")]
        pub version: Option<Version>,
        pub gateway: Option<Gateway>,
        pub drivers: Option<BTreeMap<String, Driver>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Gateway {
        pub compute_drivers: Option<StringList>,
        pub listen: Option<NonEmpty>,
        pub allow_remote: Option<bool>,
        pub tls_cert: Option<AbsolutePath>,
        pub tls_key: Option<AbsolutePath>,
        pub tls_client_ca: Option<AbsolutePath>,
        pub insecure_tcp: Option<bool>,
        pub allow_uids: Option<Vec<u32>>,
        pub allow_gids: Option<Vec<u32>>,
        pub driver_tls_ca: Option<AbsolutePath>,
        pub driver_tls_cert: Option<AbsolutePath>,
        pub driver_tls_key: Option<AbsolutePath>,
        pub state_dir: Option<AbsolutePath>,
        pub run_dir: Option<AbsolutePath>,
        pub log_format: Option<Format>,
        pub log_level: Option<NonEmpty>,
        pub driver_call_timeout_secs: Option<Seconds>,
        pub driver_connect_timeout_secs: Option<Seconds>,
        pub reconcile_interval_secs: Option<Seconds>,
        pub orphan_grace_secs: Option<Seconds>,
        pub driver_probe_interval_secs: Option<Seconds>,
        pub driver_probe_timeout_secs: Option<Seconds>,
        pub max_watches: Option<Count>,
        pub watch_coalesce_ms: Option<Millis>,
    }

    /// `[openshell.drivers.NAME]`: the keys the gateway reads, and the rest
    /// passed through untouched.
    #[derive(Debug, Deserialize)]
    pub struct Driver {
        pub socket_path: Option<AbsolutePath>,
        pub endpoint: Option<NonEmpty>,
        pub tls_ca: Option<AbsolutePath>,
        pub tls_cert: Option<AbsolutePath>,
        pub tls_key: Option<AbsolutePath>,
        pub expect_driver_name: Option<NonEmpty>,
        pub binary: Option<AbsolutePath>,
        pub ready_timeout_secs: Option<Seconds>,
        pub trust_driver_readiness: Option<bool>,
        pub required: Option<bool>,
        #[serde(flatten)]
        pub passthrough: toml::Table,
    }

    fn kind(value: &toml::Value) -> String {
        let word = value.type_str();
        let article = if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        };
        format!("{article} {word}")
    }

    /// Declares a newtype read from one TOML value by `check`.
    macro_rules! leaf {
        ($name:ident, $inner:ty, $check:expr) => {
            #[derive(Debug)]
            pub struct $name(pub $inner);

            impl<'de> Deserialize<'de> for $name {
                fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                    let value = toml::Value::deserialize(d)?;
                    let check: fn(&toml::Value) -> Result<$inner, String> = $check;
                    check(&value).map($name).map_err(de::Error::custom)
                }
            }
        };
    }

    fn text(value: &toml::Value, expected: &str) -> Result<String, String> {
        value
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("must be {expected}, not {}", kind(value)))
    }

    fn non_empty(value: &toml::Value) -> Result<String, String> {
        let text = text(value, "a string")?;
        if text.trim().is_empty() {
            return Err("is empty".to_owned());
        }
        Ok(text)
    }

    leaf!(NonEmpty, String, non_empty);

    leaf!(AbsolutePath, PathBuf, |value| {
        let text = non_empty(value)?;
        if text.contains('\0') {
            return Err("contains a NUL byte".to_owned());
        }
        if !text.starts_with('/') {
            return Err(format!("must be an absolute path, not {text:?}"));
        }
        Ok(PathBuf::from(text))
    });

    leaf!(Seconds, Duration, |value| {
        #[expect(
            clippy::cast_precision_loss,
            reason = "seconds beyond 2^53 are refused as too large anyway"
        )]
        let secs = match value {
            toml::Value::Integer(n) => *n as f64,
            toml::Value::Float(f) => *f,
            other => return Err(format!("must be a number of seconds, not {}", kind(other))),
        };
        super::positive_seconds(secs)
    });

    leaf!(Count, u32, |value| match value.as_integer() {
        Some(n) if (1..=1_000_000).contains(&n) => u32::try_from(n).map_err(|e| e.to_string()),
        Some(n) => Err(format!("must be between 1 and 1000000, not {n}")),
        None => Err(format!("must be a whole number, not {}", kind(value))),
    });

    leaf!(Millis, u32, |value| match value.as_integer() {
        Some(n) if (0..=1000).contains(&n) => u32::try_from(n).map_err(|e| e.to_string()),
        Some(n) => Err(format!(
            "must be a whole number of milliseconds from 0 to 1000, not {n}"
        )),
        None => Err(format!(
            "must be a whole number of milliseconds, not {}",
            kind(value)
        )),
    });

    leaf!(Format, LogFormat, |value| {
        let text = text(value, "\"text\" or \"json\"")?;
        LogFormat::parse(&text).ok_or_else(|| format!("must be \"text\" or \"json\", not {text:?}"))
    });

    leaf!(Version, (), |value| match value.as_integer() {
        Some(1) => Ok(()),
        _ => Err(format!(
            "must be 1 (the only config version this gateway knows), not {value}"
        )),
    });

    /// An array of strings; a wrong item is named by its index.
    #[derive(Debug)]
    pub struct StringList(pub Vec<String>);

    impl<'de> Deserialize<'de> for StringList {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Items;
            impl<'de> Visitor<'de> for Items {
                type Value = Vec<String>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("an array of strings")
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
                    let mut out = Vec::new();
                    while let Some(item) = seq.next_element::<toml::Value>()? {
                        match item {
                            toml::Value::String(text) => out.push(text),
                            other => {
                                return Err(de::Error::custom(format!(
                                    "[{}] must be a string, not {}",
                                    out.len(),
                                    kind(&other)
                                )));
                            }
                        }
                    }
                    Ok(out)
                }
            }
            d.deserialize_seq(Items).map(StringList)
        }
    }
}

/// A TOML key as it would be written in a dotted path.
fn quote_key(key: &str) -> String {
    if !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        key.to_owned()
    } else {
        format!("{key:?}")
    }
}

/// 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit_once('\n')
        .map_or(before, |(_, tail)| tail)
        .chars()
        .count()
        + 1;
    (line, column)
}

/// The dotted key path toml attaches to a deserialization error (only shown
/// by its `Display` when no input is set).
fn error_keys(error: &toml::de::Error) -> Vec<String> {
    let mut bare = error.clone();
    bare.set_input(None);
    let shown = bare.to_string();
    shown
        .lines()
        .rev()
        .find_map(|line| {
            line.strip_prefix("in `")?
                .strip_suffix('`')
                .map(str::to_owned)
        })
        .map(|path| path.split('.').map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Rewrites serde's wording in the gateway's: the key's full path, what it
/// must be, and, for an unknown key, the keys that are known there.
fn describe_error(message: &str, keys: &[String]) -> String {
    let path = keys
        .iter()
        .map(|k| quote_key(k))
        .collect::<Vec<_>>()
        .join(".");
    let joined = |key: &str| {
        if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{}", quote_key(key))
        }
    };
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let (field, expected) = rest.split_once('`').unwrap_or((rest, ""));
        let known: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        return format!(
            "unknown key {}; known keys here: {}",
            joined(field),
            known.join(", ")
        );
    }
    if let Some(rest) = message.strip_prefix("invalid type: ") {
        let (found, expected) = rest.split_once(", expected ").unwrap_or((rest, "?"));
        let found = found.split_whitespace().next().unwrap_or(found);
        let found = match found {
            "map" => "a table",
            "sequence" => "an array",
            "integer" => "an integer",
            "boolean" => "a boolean",
            "string" => "a string",
            "floating" => "a float",
            other => other,
        };
        let expected = match expected {
            e if e.starts_with("struct ") || e == "a map" => "a table",
            "a boolean" => "true or false",
            e => e,
        };
        return format!("{path} must be {expected}, not {found}");
    }
    if message.starts_with('[') {
        format!("{path}{message}")
    } else if path.is_empty() {
        message.to_owned()
    } else {
        format!("{path} {message}")
    }
}

/// A duration in seconds that must be positive and finite.
pub(crate) fn positive_seconds(secs: f64) -> std::result::Result<Duration, String> {
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("must be a positive number of seconds, not {secs}"));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| format!("is too large ({secs} seconds)"))
}

impl FileConfig {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ConfigRead {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses `text`, reporting problems against `path` with the line and
    /// column of the offending key or value.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        // Syntax first, so a broken file is reported as such.
        text.parse::<toml::Table>()
            .map_err(|e: toml::de::Error| Error::ConfigSyntax {
                path: path.to_owned(),
                message: e.to_string().trim_end().replace('\n', " "),
            })?;
        let file: raw::File = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|span| {
                    let (line, column) = line_column(text, span.start);
                    format!(":{line}:{column}")
                })
                .unwrap_or_default();
            Error::Config(format!(
                "{}{at}: {}",
                path.display(),
                describe_error(e.message(), &error_keys(&e))
            ))
        })?;
        let mut config = Self {
            path: path.to_owned(),
            ..Self::default()
        };
        let Some(openshell) = file.openshell else {
            return Ok(config);
        };
        if let Some(gw) = openshell.gateway {
            config.gateway = GatewayTable {
                compute_drivers: gw.compute_drivers.map(|l| l.0),
                listen: gw.listen.map(|v| v.0),
                allow_remote: gw.allow_remote,
                tls_cert: gw.tls_cert.map(|v| v.0),
                tls_key: gw.tls_key.map(|v| v.0),
                tls_client_ca: gw.tls_client_ca.map(|v| v.0),
                insecure_tcp: gw.insecure_tcp,
                allow_uids: gw.allow_uids.unwrap_or_default(),
                allow_gids: gw.allow_gids.unwrap_or_default(),
                driver_tls_ca: gw.driver_tls_ca.map(|v| v.0),
                driver_tls_cert: gw.driver_tls_cert.map(|v| v.0),
                driver_tls_key: gw.driver_tls_key.map(|v| v.0),
                state_dir: gw.state_dir.map(|v| v.0),
                run_dir: gw.run_dir.map(|v| v.0),
                log_format: gw.log_format.map(|v| v.0),
                log_level: gw.log_level.map(|v| v.0),
                driver_call_timeout: gw.driver_call_timeout_secs.map(|v| v.0),
                driver_connect_timeout: gw.driver_connect_timeout_secs.map(|v| v.0),
                reconcile_interval: gw.reconcile_interval_secs.map(|v| v.0),
                orphan_grace: gw.orphan_grace_secs.map(|v| v.0),
                driver_probe_interval: gw.driver_probe_interval_secs.map(|v| v.0),
                driver_probe_timeout: gw.driver_probe_timeout_secs.map(|v| v.0),
                max_watches: gw.max_watches.map(|v| v.0),
                watch_coalesce_ms: gw.watch_coalesce_ms.map(|v| v.0),
            };
        }
        let tables = openshell.drivers.unwrap_or_default();
        config.required_drivers = tables
            .iter()
            .filter(|(_, table)| table.required == Some(true))
            .filter_map(|(key, _)| normalize_name(key).ok())
            .collect();
        config.drivers = driver_tables(tables, path)?;
        Ok(config)
    }
}

/// Driver tables keyed by normalised name; two spellings of one name are
/// refused.
fn driver_tables(
    tables: BTreeMap<String, raw::Driver>,
    file: &Path,
) -> Result<BTreeMap<String, DriverTable>> {
    let error = |message: String| Error::Config(format!("{}: {message}", file.display()));
    let mut out: BTreeMap<String, DriverTable> = BTreeMap::new();
    let mut spelled: BTreeMap<String, String> = BTreeMap::new();
    for (key, table) in tables {
        let table_path = format!("openshell.drivers.{}", quote_key(&key));
        let name = normalize_name(&key).map_err(|e| error(format!("[{table_path}]: {e}")))?;
        if let Some(previous) = spelled.insert(name.clone(), key.clone()) {
            return Err(error(format!(
                "[openshell.drivers.{}] and [{table_path}] are the same driver '{name}'; merge them",
                quote_key(&previous)
            )));
        }
        out.insert(
            name,
            DriverTable {
                socket_path: table.socket_path.map(|v| v.0),
                endpoint: table.endpoint.map(|v| v.0),
                tls: crate::drivers::plan::DriverTls {
                    ca: table.tls_ca.map(|v| v.0),
                    cert: table.tls_cert.map(|v| v.0),
                    key: table.tls_key.map(|v| v.0),
                },
                expect_driver_name: table.expect_driver_name.map(|v| v.0),
                binary: table.binary.map(|v| v.0),
                ready_timeout: table.ready_timeout_secs.map(|v| v.0),
                trust_driver_readiness: table.trust_driver_readiness.unwrap_or(false),
                passthrough: table.passthrough,
            },
        );
    }
    Ok(out)
}

/// Timing knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Deadline of every unary driver call.
    pub driver_call: Duration,
    /// How long to dial an attached driver at startup.
    pub driver_connect: Duration,
    /// How often each driver's sandboxes are re-listed.
    pub reconcile_interval: Duration,
    /// A row absent from its driver's list is left alone until it has not
    /// changed for this long.
    pub orphan_grace: Duration,
    /// How often each driver is asked GetCapabilities to tell a frozen
    /// driver from a healthy one.
    pub driver_probe_interval: Duration,
    /// How long that probe waits before the driver counts as unresponsive.
    pub driver_probe_timeout: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            driver_call: Duration::from_secs(30),
            driver_connect: Duration::from_secs(30),
            reconcile_interval: Duration::from_secs(60),
            orphan_grace: Duration::from_secs(60),
            driver_probe_interval: Duration::from_secs(5),
            driver_probe_timeout: Duration::from_secs(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<FileConfig> {
        FileConfig::parse(text, Path::new("/etc/openshell/gateway.toml"))
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn empty_file_is_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config.gateway, GatewayTable::default());
        assert!(config.drivers.is_empty());
    }

    #[test]
    fn full_file_parses() {
        let config = parse(
            r#"
            [openshell]
            version = 1
            [openshell.gateway]
            compute_drivers = ["podman", "kyma@/run/kyma.sock"]
            listen = "tcp://127.0.0.1:7000"
            allow_remote = false
            state_dir = "/var/lib/openshell"
            run_dir = "/run/openshell"
            log_format = "json"
            log_level = "debug"
            driver_call_timeout_secs = 5
            driver_connect_timeout_secs = 0.5
            reconcile_interval_secs = 10
            orphan_grace_secs = 2
            watch_coalesce_ms = 0
            [openshell.drivers.podman]
            binary = "/opt/os/openshell-driver-podman"
            ready_timeout_secs = 20
            socket_uri = "unix:///run/podman/podman.sock"
            [openshell.drivers.Kyma]
            expect_driver_name = "kyma-driver"
            "#,
        )
        .unwrap();
        let gw = &config.gateway;
        assert_eq!(
            gw.compute_drivers.as_deref().unwrap(),
            ["podman", "kyma@/run/kyma.sock"]
        );
        assert_eq!(gw.log_format, Some(LogFormat::Json));
        assert_eq!(gw.driver_connect_timeout, Some(Duration::from_millis(500)));
        assert_eq!(gw.watch_coalesce_ms, Some(0));
        let podman = &config.drivers["podman"];
        assert_eq!(podman.ready_timeout, Some(Duration::from_secs(20)));
        assert_eq!(
            podman.binary.as_deref(),
            Some(Path::new("/opt/os/openshell-driver-podman"))
        );
        assert_eq!(
            podman
                .passthrough
                .get("socket_uri")
                .and_then(|v| v.as_str()),
            Some("unix:///run/podman/podman.sock")
        );
        assert!(!podman.passthrough.contains_key("binary"));
        assert_eq!(
            config.drivers["kyma"].expect_driver_name.as_deref(),
            Some("kyma-driver")
        );
    }

    #[test]
    fn unknown_keys_name_their_path() {
        let cases = [
            ("listen = 1", "unknown key listen"),
            ("[gateway]\nlisten = \"x\"", "unknown key gateway"),
            ("[openshell]\nfoo = 1", "unknown key openshell.foo"),
            (
                "[openshell.gateway]\nlisten_addr = \"x\"",
                "unknown key openshell.gateway.listen_addr",
            ),
            (
                "[openshell.gateway.tls]\ncert = \"x\"",
                "unknown key openshell.gateway.tls",
            ),
        ];
        for (text, expected) in cases {
            let message = err(text);
            assert!(message.contains(expected), "{text}: {message}");
            assert!(
                message.contains("/etc/openshell/gateway.toml"),
                "{text}: {message}"
            );
        }
        assert!(
            err("[openshell.gateway]\nlistne = \"x\"")
                .contains("known keys here: compute_drivers, listen")
        );
    }

    #[test]
    fn wrong_types_name_their_path() {
        let cases = [
            (
                "[openshell.gateway]\ncompute_drivers = \"vm\"",
                "openshell.gateway.compute_drivers must be an array of strings, not a string",
            ),
            (
                "[openshell.gateway]\ncompute_drivers = [\"vm\", 3]",
                "openshell.gateway.compute_drivers[1] must be a string, not an integer",
            ),
            (
                "[openshell.gateway]\nallow_remote = \"yes\"",
                "openshell.gateway.allow_remote must be true or false",
            ),
            (
                "[openshell.gateway]\nstate_dir = \"relative/dir\"",
                "openshell.gateway.state_dir must be an absolute path",
            ),
            (
                "[openshell.gateway]\nlog_format = \"xml\"",
                "openshell.gateway.log_format must be \"text\" or \"json\"",
            ),
            (
                "[openshell.gateway]\ndriver_call_timeout_secs = 0",
                "openshell.gateway.driver_call_timeout_secs must be a positive number",
            ),
            (
                "[openshell.gateway]\ndriver_call_timeout_secs = -1.5",
                "must be a positive number",
            ),
            ("[openshell]\nversion = 2", "openshell.version must be 1"),
            (
                "[openshell]\ndrivers = 3",
                "openshell.drivers must be a table",
            ),
            (
                "[openshell.drivers]\nvm = \"x\"",
                "openshell.drivers.vm must be a table, not a string",
            ),
            (
                "[openshell.drivers.kyma]\nsocket_path = \"kyma.sock\"",
                "openshell.drivers.kyma.socket_path must be an absolute path",
            ),
            (
                "[openshell.drivers.kyma]\nsocket_path = \"\"",
                "openshell.drivers.kyma.socket_path is empty",
            ),
            (
                "[openshell.drivers.vm]\nready_timeout_secs = \"ten\"",
                "openshell.drivers.vm.ready_timeout_secs must be a number of seconds",
            ),
            (
                "[openshell.drivers.\"my driver\"]\nsocket_path = \"/x.sock\"",
                "[openshell.drivers.\"my driver\"]",
            ),
            (
                "[openshell.gateway]\nwatch_coalesce_ms = 1001",
                "openshell.gateway.watch_coalesce_ms must be a whole number of milliseconds from 0 to 1000, not 1001",
            ),
            (
                "[openshell.gateway]\nwatch_coalesce_ms = -1",
                "openshell.gateway.watch_coalesce_ms must be a whole number of milliseconds from 0 to 1000, not -1",
            ),
            (
                "[openshell.gateway]\nwatch_coalesce_ms = 2.5",
                "openshell.gateway.watch_coalesce_ms must be a whole number of milliseconds, not a float",
            ),
        ];
        for (text, expected) in cases {
            let message = err(text);
            assert!(message.contains(expected), "{text}: {message}");
        }
    }

    #[test]
    fn errors_name_line_and_column() {
        let cases = [
            (
                "[openshell.gateway]\nlisten = \"unix:///x.sock\"\nlisten_addr = \"x\"",
                "/etc/openshell/gateway.toml:3:1: unknown key openshell.gateway.listen_addr",
            ),
            (
                "[openshell.gateway]\n\nallow_remote = \"yes\"",
                "/etc/openshell/gateway.toml:3:16: openshell.gateway.allow_remote must be true or false, not a string",
            ),
            (
                "[openshell.gateway]\ncompute_drivers = [\"vm\", 3]",
                "/etc/openshell/gateway.toml:2:19: openshell.gateway.compute_drivers[1] must be a string",
            ),
            (
                "[openshell.drivers.vm]\nvcpus = 2\nready_timeout_secs = -1",
                "/etc/openshell/gateway.toml:3:22: openshell.drivers.vm.ready_timeout_secs must be a positive number of seconds, not -1",
            ),
        ];
        for (text, expected) in cases {
            let message = err(text);
            assert!(message.contains(expected), "{text}: {message}");
        }
    }

    #[test]
    fn driver_tables_pass_unknown_keys_through_untouched() {
        let config = parse(
            "[openshell.drivers.podman]\nsocket_path = \"/run/p.sock\"\n[openshell.drivers.podman.extra]\nnested = [1, 2]\n",
        )
        .unwrap();
        let podman = &config.drivers["podman"];
        assert_eq!(
            podman.socket_path.as_deref(),
            Some(Path::new("/run/p.sock"))
        );
        assert_eq!(podman.passthrough.keys().collect::<Vec<_>>(), ["extra"]);
        assert_eq!(
            podman.passthrough["extra"]["nested"],
            toml::Value::Array(vec![toml::Value::Integer(1), toml::Value::Integer(2)])
        );
    }

    #[test]
    fn same_driver_twice_in_different_case_is_refused() {
        let message = err("[openshell.drivers.vm]\n[openshell.drivers.VM]\n");
        assert!(message.contains("same driver 'vm'"), "{message}");
    }

    #[test]
    fn syntax_errors_name_the_file() {
        let message = err("[openshell.gateway\n");
        assert!(message.contains("is not valid TOML"), "{message}");
        assert!(message.contains("/etc/openshell/gateway.toml"), "{message}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        #[test]
        fn config_parser_never_panics(text in "(\\[openshell(\\.(gateway|drivers(\\.[a-zA-Z\" ]{1,6})?))?\\]\n|[a-z_]{1,12} = (\"[^\"\n]{0,20}\"|[0-9.-]{1,6}|true|\\[\\]|\\{\\})\n){0,8}") {
            let _ = FileConfig::parse(&text, Path::new("/x.toml"));
        }
    }
}
