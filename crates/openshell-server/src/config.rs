//! The sources of the gateway's settings: the command line (with the
//! environment variables clap reads) and `gateway.toml`. They are merged,
//! and drivers are selected, in [`crate::settings`].
//!
//! Precedence: a flag beats its environment variable, which beats the TOML
//! file, which beats the built-in default. Unknown keys in the gateway's own
//! tables are errors naming the key's full path; `[openshell.drivers.NAME]`
//! tables are passed through to managed drivers, minus the keys the gateway
//! itself reads (see [`GATEWAY_DRIVER_KEYS`]).

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

/// Keys of `[openshell.drivers.NAME]` that the gateway reads itself and does
/// not pass to the driver.
pub const GATEWAY_DRIVER_KEYS: &[&str] = &[
    "socket_path",
    "expect_driver_name",
    "binary",
    "ready_timeout_secs",
];

/// Keys of `[openshell.gateway]`.
pub const GATEWAY_KEYS: &[&str] = &[
    "compute_drivers",
    "listen",
    "allow_remote",
    "state_dir",
    "run_dir",
    "log_format",
    "log_level",
    "driver_call_timeout_secs",
    "driver_connect_timeout_secs",
    "reconcile_interval_secs",
    "orphan_grace_secs",
];

/// `[openshell.gateway]` as written in the file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GatewayTable {
    pub compute_drivers: Option<Vec<String>>,
    pub listen: Option<String>,
    pub allow_remote: Option<bool>,
    pub state_dir: Option<PathBuf>,
    pub run_dir: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
    pub driver_call_timeout: Option<Duration>,
    pub driver_connect_timeout: Option<Duration>,
    pub reconcile_interval: Option<Duration>,
    pub orphan_grace: Option<Duration>,
}

/// A parsed `gateway.toml`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FileConfig {
    pub path: PathBuf,
    pub gateway: GatewayTable,
    /// Keyed by the normalised driver name.
    pub drivers: BTreeMap<String, DriverTable>,
}

/// Reads one typed value out of a TOML table, with errors that name the
/// key's full path and the file.
struct Reader<'a> {
    file: &'a Path,
}

impl Reader<'_> {
    fn error(&self, message: impl std::fmt::Display) -> Error {
        Error::Config(format!("{}: {message}", self.file.display()))
    }

    fn wrong_type(&self, path: &str, expected: &str, value: &toml::Value) -> Error {
        self.error(format!(
            "{path} must be {expected}, not {} {}",
            article(value.type_str()),
            value.type_str()
        ))
    }

    fn table<'v>(&self, value: &'v toml::Value, path: &str) -> Result<&'v toml::Table> {
        value
            .as_table()
            .ok_or_else(|| self.wrong_type(path, "a table", value))
    }

    fn string(&self, value: &toml::Value, path: &str) -> Result<String> {
        value
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| self.wrong_type(path, "a string", value))
    }

    fn non_empty_string(&self, value: &toml::Value, path: &str) -> Result<String> {
        let text = self.string(value, path)?;
        if text.trim().is_empty() {
            return Err(self.error(format!("{path} is empty")));
        }
        Ok(text)
    }

    fn bool(&self, value: &toml::Value, path: &str) -> Result<bool> {
        value
            .as_bool()
            .ok_or_else(|| self.wrong_type(path, "true or false", value))
    }

    fn absolute_path(&self, value: &toml::Value, path: &str) -> Result<PathBuf> {
        let text = self.non_empty_string(value, path)?;
        if text.contains('\0') {
            return Err(self.error(format!("{path} contains a NUL byte")));
        }
        if !text.starts_with('/') {
            return Err(self.error(format!("{path} must be an absolute path, not {text:?}")));
        }
        Ok(PathBuf::from(text))
    }

    fn seconds(&self, value: &toml::Value, path: &str) -> Result<Duration> {
        let secs = match value {
            toml::Value::Integer(n) => {
                #[allow(clippy::cast_precision_loss)]
                let n = *n as f64;
                n
            }
            toml::Value::Float(f) => *f,
            other => return Err(self.wrong_type(path, "a number of seconds", other)),
        };
        positive_seconds(secs).map_err(|e| self.error(format!("{path} {e}")))
    }

    fn string_array(&self, value: &toml::Value, path: &str) -> Result<Vec<String>> {
        let array = value
            .as_array()
            .ok_or_else(|| self.wrong_type(path, "an array of strings", value))?;
        array
            .iter()
            .enumerate()
            .map(|(i, item)| self.string(item, &format!("{path}[{i}]")))
            .collect()
    }
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// A duration in seconds that must be positive and finite.
pub(crate) fn positive_seconds(secs: f64) -> std::result::Result<Duration, String> {
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("must be a positive number of seconds, not {secs}"));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| format!("is too large ({secs} seconds)"))
}

fn unknown_key(reader: &Reader<'_>, path: &str, known: &[&str]) -> Error {
    reader.error(format!(
        "unknown key {path}; known keys here: {}",
        known.join(", ")
    ))
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

    /// Parses `text`, reporting problems against `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let root: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| Error::ConfigSyntax {
                path: path.to_owned(),
                message: e.to_string().trim_end().replace('\n', " "),
            })?;
        let reader = Reader { file: path };
        let mut config = Self {
            path: path.to_owned(),
            ..Self::default()
        };
        for (key, value) in &root {
            if key != "openshell" {
                return Err(unknown_key(&reader, key, &["openshell"]));
            }
            let openshell = reader.table(value, "openshell")?;
            for (key, value) in openshell {
                let path = format!("openshell.{key}");
                match key.as_str() {
                    "version" => match value.as_integer() {
                        Some(1) => {}
                        _ => {
                            return Err(reader.error(format!(
                                "{path} must be 1 (the only config version this gateway knows), not {value}"
                            )));
                        }
                    },
                    "gateway" => config.gateway = parse_gateway(&reader, value)?,
                    "drivers" => config.drivers = parse_drivers(&reader, value)?,
                    _ => {
                        return Err(unknown_key(
                            &reader,
                            &path,
                            &["version", "gateway", "drivers"],
                        ));
                    }
                }
            }
        }
        Ok(config)
    }
}

fn parse_gateway(reader: &Reader<'_>, value: &toml::Value) -> Result<GatewayTable> {
    let table = reader.table(value, "openshell.gateway")?;
    let mut out = GatewayTable::default();
    for (key, value) in table {
        let path = format!("openshell.gateway.{key}");
        let path = path.as_str();
        match key.as_str() {
            "compute_drivers" => out.compute_drivers = Some(reader.string_array(value, path)?),
            "listen" => out.listen = Some(reader.non_empty_string(value, path)?),
            "allow_remote" => out.allow_remote = Some(reader.bool(value, path)?),
            "state_dir" => out.state_dir = Some(reader.absolute_path(value, path)?),
            "run_dir" => out.run_dir = Some(reader.absolute_path(value, path)?),
            "log_format" => {
                let text = reader.string(value, path)?;
                out.log_format = Some(LogFormat::parse(&text).ok_or_else(|| {
                    reader.error(format!("{path} must be \"text\" or \"json\", not {text:?}"))
                })?);
            }
            "log_level" => out.log_level = Some(reader.non_empty_string(value, path)?),
            "driver_call_timeout_secs" => {
                out.driver_call_timeout = Some(reader.seconds(value, path)?);
            }
            "driver_connect_timeout_secs" => {
                out.driver_connect_timeout = Some(reader.seconds(value, path)?);
            }
            "reconcile_interval_secs" => {
                out.reconcile_interval = Some(reader.seconds(value, path)?);
            }
            "orphan_grace_secs" => out.orphan_grace = Some(reader.seconds(value, path)?),
            _ => return Err(unknown_key(reader, path, GATEWAY_KEYS)),
        }
    }
    Ok(out)
}

fn parse_drivers(
    reader: &Reader<'_>,
    value: &toml::Value,
) -> Result<BTreeMap<String, DriverTable>> {
    let tables = reader.table(value, "openshell.drivers")?;
    let mut out: BTreeMap<String, DriverTable> = BTreeMap::new();
    let mut spelled: BTreeMap<String, String> = BTreeMap::new();
    for (key, value) in tables {
        let table_path = format!("openshell.drivers.{}", quote_key(key));
        let name = normalize_name(key).map_err(|e| reader.error(format!("[{table_path}]: {e}")))?;
        if let Some(previous) = spelled.insert(name.clone(), key.clone()) {
            return Err(reader.error(format!(
                "[openshell.drivers.{}] and [{table_path}] are the same driver '{name}'; merge them",
                quote_key(&previous)
            )));
        }
        let table = reader.table(value, &table_path)?;
        let mut driver = DriverTable::default();
        for (key, value) in table {
            let path = format!("{table_path}.{}", quote_key(key));
            let path = path.as_str();
            match key.as_str() {
                "socket_path" => driver.socket_path = Some(reader.absolute_path(value, path)?),
                "expect_driver_name" => {
                    driver.expect_driver_name = Some(reader.non_empty_string(value, path)?);
                }
                "binary" => driver.binary = Some(reader.absolute_path(value, path)?),
                "ready_timeout_secs" => driver.ready_timeout = Some(reader.seconds(value, path)?),
                _ => {
                    driver.passthrough.insert(key.clone(), value.clone());
                }
            }
        }
        out.insert(name, driver);
    }
    Ok(out)
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
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            driver_call: Duration::from_secs(30),
            driver_connect: Duration::from_secs(30),
            reconcile_interval: Duration::from_secs(60),
            orphan_grace: Duration::from_secs(60),
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
        ];
        for (text, expected) in cases {
            let message = err(text);
            assert!(message.contains(expected), "{text}: {message}");
        }
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
