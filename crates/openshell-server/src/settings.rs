//! [`Settings`]: the command line, the environment and `gateway.toml`
//! merged, with the drivers selected. This is the one module that joins
//! configuration ([`crate::config`]) and driver selection
//! ([`crate::drivers::select`]); neither of those imports the other.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::api::listen::ListenAddr;
use crate::config::{Cli, CliSources, FileConfig, LogFormat, Timeouts, positive_seconds};
use crate::drivers::plan::{Acquisition, DriverPlan, DriverTls, FlagSource, ListOrigin};
use crate::drivers::select::{self, SelectionInput};
use crate::error::{Error, Result};

/// Everything the gateway needs to start, resolved from all sources.
#[derive(Debug, Clone)]
pub struct Settings {
    pub drivers: Vec<DriverPlan>,
    /// Selection notes worth a warning (ignored keys, overridden sockets).
    pub warnings: Vec<String>,
    pub listen: ListenAddr,
    pub allow_remote: bool,
    /// TLS of a tcp:// listener (always set for TCP unless `insecure_tcp`).
    pub tls: Option<openshell_wire::tls::ServerTls>,
    /// Plain TCP on loopback, for development only.
    pub insecure_tcp: bool,
    /// Peers the Unix socket accepts besides the gateway's own uid.
    pub allow_uids: Vec<u32>,
    pub allow_gids: Vec<u32>,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub log_format: LogFormat,
    pub log_level: Option<String>,
    pub timeouts: Timeouts,
    /// Most public watches open at once.
    pub max_watches: usize,
    /// How long changes are gathered before open watches are woken.
    pub watch_coalesce: Duration,
    pub config_file: Option<PathBuf>,
    /// Drivers that must be reachable for the gateway to start
    /// (`--require-driver`, `required = true`); the others may be down.
    pub required_drivers: Vec<String>,
}

/// The default config file, when it exists.
pub fn default_config_file() -> Option<PathBuf> {
    let path = directories::BaseDirs::new()?
        .config_dir()
        .join("openshell")
        .join("gateway.toml");
    path.is_file().then_some(path)
}

fn default_state_dir() -> Result<PathBuf> {
    directories::BaseDirs::new()
        .and_then(|dirs| dirs.state_dir().map(|d| d.join("openshell")))
        .ok_or_else(|| {
            Error::Config(
                "cannot tell where this user's state directory is (no $XDG_STATE_HOME or $HOME); \
                 set --state-dir"
                    .to_owned(),
            )
        })
}

/// Makes a command-line path absolute against the working directory.
fn absolute(flag: &str, path: &Path) -> Result<PathBuf> {
    if path.as_os_str().is_empty() {
        return Err(Error::Config(format!("{flag} is empty")));
    }
    std::path::absolute(path).map_err(|e| Error::Config(format!("{flag} {}: {e}", path.display())))
}

fn flag_seconds(flag: &str, secs: Option<f64>) -> Result<Option<Duration>> {
    secs.map(|s| positive_seconds(s).map_err(|e| Error::Config(format!("{flag} {e}"))))
        .transpose()
}

/// Merges the command line, the environment (already folded in by clap) and
/// the config file into [`Settings`]. Nothing is created or started.
pub fn resolve(cli: &Cli, sources: CliSources) -> Result<Settings> {
    let config_path = match &cli.config {
        Some(path) => Some(absolute("--config", path)?),
        None => default_config_file(),
    };
    let file = match &config_path {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    resolve_with(cli, sources, &file)
}

/// [`resolve`] with the config file already read.
pub fn resolve_with(cli: &Cli, sources: CliSources, file: &FileConfig) -> Result<Settings> {
    let gw = &file.gateway;

    // An environment variable that is set but empty counts as unset; an
    // empty flag is a mistake worth an error.
    let blank_env = |source: Option<FlagSource>, values: &[&str]| {
        source == Some(FlagSource::Env) && values.iter().all(|v| v.trim().is_empty())
    };
    let drivers: Vec<&str> = cli.drivers.iter().map(String::as_str).collect();
    let drivers_source = sources
        .drivers
        .filter(|_| !drivers.is_empty() && !blank_env(sources.drivers, &drivers));
    let list = if let Some(source) = drivers_source {
        let origin = match source {
            FlagSource::CommandLine => ListOrigin::CommandLine,
            FlagSource::Env => ListOrigin::Env,
        };
        let entries: Vec<String> = cli
            .drivers
            .iter()
            .flat_map(|value| value.split(','))
            .map(str::to_owned)
            .collect();
        Some((entries, origin))
    } else {
        gw.compute_drivers
            .clone()
            .map(|entries| (entries, ListOrigin::File(file.path.clone())))
    };
    let socket_flag = cli
        .compute_driver_socket
        .as_deref()
        .filter(|path| !blank_env(sources.compute_driver_socket, &[path]))
        .map(|path| {
            let source = sources
                .compute_driver_socket
                .unwrap_or(FlagSource::CommandLine);
            (path, source)
        });
    let selection = select::select(&SelectionInput {
        list,
        compute_driver_socket: socket_flag,
        tables: &file.drivers,
    })?;

    let run_dir = match (&cli.run_dir, &gw.run_dir) {
        (Some(dir), _) => absolute("--run-dir", dir)?,
        (None, Some(dir)) => dir.clone(),
        (None, None) => openshell_wire::paths::default_run_dir(),
    };
    let state_dir = match (&cli.state_dir, &gw.state_dir) {
        (Some(dir), _) => absolute("--state-dir", dir)?,
        (None, Some(dir)) => dir.clone(),
        (None, None) => default_state_dir()?,
    };
    let listen = match (&cli.listen, &gw.listen) {
        (Some(text), _) => {
            ListenAddr::parse(text).map_err(|e| Error::Config(format!("--listen: {e}")))?
        }
        (None, Some(text)) => ListenAddr::parse(text).map_err(|e| {
            Error::Config(format!(
                "{}: openshell.gateway.listen: {e}",
                file.path.display()
            ))
        })?,
        (None, None) => {
            let path = run_dir.join(openshell_wire::paths::GATEWAY_SOCKET_NAME);
            driver_lifecycle::socket::check_socket_path(&path).map_err(|e| {
                Error::Config(format!(
                    "the default listen socket is unusable: {e}; set --run-dir or --listen"
                ))
            })?;
            ListenAddr::Unix(path)
        }
    };
    let allow_remote = cli.allow_remote.or(gw.allow_remote).unwrap_or(false);
    if !listen.is_local() && !allow_remote {
        return Err(Error::Config(format!(
            "--listen {listen} can be reached from other machines; listen on 127.0.0.1 or a \
             Unix socket, or pass --allow-remote (TLS with client certificates is required \
             either way)"
        )));
    }
    let insecure_tcp = cli.insecure_tcp.or(gw.insecure_tcp).unwrap_or(false);
    let tls = listener_tls(cli, gw, &listen, insecure_tcp)?;
    let driver_tls_defaults = DriverTls {
        ca: cli
            .driver_tls_ca
            .clone()
            .or_else(|| gw.driver_tls_ca.clone()),
        cert: cli
            .driver_tls_cert
            .clone()
            .or_else(|| gw.driver_tls_cert.clone()),
        key: cli
            .driver_tls_key
            .clone()
            .or_else(|| gw.driver_tls_key.clone()),
    };
    let mut selection = selection;
    for plan in &mut selection.plans {
        if let Acquisition::Remote { tls, .. } = &mut plan.acquisition {
            *tls = tls.or(&driver_tls_defaults);
            tls.complete(&plan.name).map_err(Error::Config)?;
        }
    }
    let mut allow_uids = cli.allow_uids.clone();
    allow_uids.extend(&gw.allow_uids);
    let mut allow_gids = cli.allow_gids.clone();
    allow_gids.extend(&gw.allow_gids);
    for plan in &selection.plans {
        plan.expected_admission().map_err(Error::Config)?;
    }
    let defaults = Timeouts::default();
    let timeouts = Timeouts {
        driver_call: flag_seconds("--driver-call-timeout", cli.driver_call_timeout)?
            .or(gw.driver_call_timeout)
            .unwrap_or(defaults.driver_call),
        driver_connect: flag_seconds("--driver-connect-timeout", cli.driver_connect_timeout)?
            .or(gw.driver_connect_timeout)
            .unwrap_or(defaults.driver_connect),
        reconcile_interval: gw.reconcile_interval.unwrap_or(defaults.reconcile_interval),
        orphan_grace: gw.orphan_grace.unwrap_or(defaults.orphan_grace),
        driver_probe_interval: gw
            .driver_probe_interval
            .unwrap_or(defaults.driver_probe_interval),
        driver_probe_timeout: gw
            .driver_probe_timeout
            .unwrap_or(defaults.driver_probe_timeout),
    };
    let mut required_drivers: Vec<String> = file.required_drivers.iter().cloned().collect();
    for name in &cli.require_driver {
        let name = name.trim().to_ascii_lowercase();
        if !selection.plans.iter().any(|p| p.name == name) {
            return Err(Error::Config(format!(
                "--require-driver {}: no such driver is configured (configured: {})",
                openshell_driver_kit::contract::truncate(&name, 64),
                selection
                    .plans
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if !required_drivers.contains(&name) {
            required_drivers.push(name);
        }
    }
    Ok(Settings {
        drivers: selection.plans,
        warnings: selection.warnings,
        listen,
        allow_remote,
        tls,
        insecure_tcp,
        allow_uids,
        allow_gids,
        state_dir,
        run_dir,
        log_format: cli.log_format.or(gw.log_format).unwrap_or_default(),
        log_level: cli
            .log_level
            .clone()
            .or_else(|| {
                std::env::var("RUST_LOG")
                    .ok()
                    .filter(|v| !v.trim().is_empty())
            })
            .or_else(|| gw.log_level.clone()),
        timeouts,
        max_watches: cli
            .max_watches
            .or(gw.max_watches)
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(crate::gateway::watch::DEFAULT_MAX_WATCHES),
        watch_coalesce: cli
            .watch_coalesce_ms
            .or(gw.watch_coalesce_ms)
            .map_or(crate::gateway::watch::DEFAULT_WATCH_COALESCE, |ms| {
                Duration::from_millis(u64::from(ms))
            }),
        config_file: (!file.path.as_os_str().is_empty()).then(|| file.path.clone()),
        required_drivers,
    })
}

/// The TLS files of the API listener. TCP needs all three (certificate,
/// key, client CA) unless `--insecure-tcp` on loopback; a Unix socket needs
/// none.
fn listener_tls(
    cli: &Cli,
    gw: &crate::config::GatewayTable,
    listen: &ListenAddr,
    insecure_tcp: bool,
) -> Result<Option<openshell_wire::tls::ServerTls>> {
    let cert = cli.tls_cert.clone().or_else(|| gw.tls_cert.clone());
    let key = cli.tls_key.clone().or_else(|| gw.tls_key.clone());
    let client_ca = cli
        .tls_client_ca
        .clone()
        .or_else(|| gw.tls_client_ca.clone());
    let absolute_or = |flag: &str, path: Option<PathBuf>| -> Result<Option<PathBuf>> {
        path.map(|p| absolute(flag, &p)).transpose()
    };
    let cert = absolute_or("--tls-cert", cert)?;
    let key = absolute_or("--tls-key", key)?;
    let client_ca = absolute_or("--tls-client-ca", client_ca)?;
    let any = cert.is_some() || key.is_some() || client_ca.is_some();
    if let ListenAddr::Unix(_) = listen {
        // Keys in the file may serve a tcp:// listen that a flag replaced;
        // flags that cannot apply are a mistake worth stopping for.
        let flagged = cli.tls_cert.is_some()
            || cli.tls_key.is_some()
            || cli.tls_client_ca.is_some()
            || cli.insecure_tcp == Some(true);
        if flagged {
            return Err(Error::Config(format!(
                "--tls-cert/--tls-key/--tls-client-ca and --insecure-tcp apply to a tcp:// \
                 listener, but the gateway listens on {listen} (protected by file permissions \
                 and peer credentials); drop them or listen on tcp://HOST:PORT"
            )));
        }
        return Ok(None);
    }
    match (cert, key, client_ca) {
        (Some(cert), Some(key), Some(client_ca)) => {
            if insecure_tcp {
                return Err(Error::Config(
                    "--insecure-tcp and TLS files were both given; drop --insecure-tcp".to_owned(),
                ));
            }
            Ok(Some(openshell_wire::tls::ServerTls {
                identity: openshell_wire::tls::KeyPair { cert, key },
                client_ca,
            }))
        }
        (cert, key, client_ca) if any => {
            let missing: Vec<&str> = [
                (cert.is_none(), "--tls-cert"),
                (key.is_none(), "--tls-key"),
                (client_ca.is_none(), "--tls-client-ca"),
            ]
            .into_iter()
            .filter_map(|(absent, flag)| absent.then_some(flag))
            .collect();
            Err(Error::Config(format!(
                "--listen {listen} with TLS needs --tls-cert, --tls-key and --tls-client-ca; \
                 missing: {}",
                missing.join(", ")
            )))
        }
        _ if insecure_tcp && listen.is_local() => Ok(None),
        _ if insecure_tcp => Err(Error::Config(format!(
            "--insecure-tcp is for development on loopback only, but --listen {listen} can be \
             reached from other machines; give --tls-cert, --tls-key and --tls-client-ca"
        ))),
        _ => Err(Error::Config(format!(
            "--listen {listen} is TCP, and TCP is served only with TLS and client \
             certificates: give --tls-cert, --tls-key and --tls-client-ca (`openshell-gateway \
             certs init DIR` writes them), or use a Unix socket; --insecure-tcp serves plain \
             TCP on loopback for development only"
        ))),
    }
}

impl Settings {
    /// A human-readable summary, for `--check-config`.
    pub fn describe(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "config file: {}",
            self.config_file
                .as_ref()
                .map_or_else(|| "(none)".to_owned(), |p| p.display().to_string())
        );
        let _ = writeln!(out, "listen: {}", self.listen);
        if let Some(tls) = &self.tls {
            let _ = writeln!(
                out,
                "tls: cert {}, client CA {} (client certificates required)",
                tls.identity.cert.display(),
                tls.client_ca.display()
            );
        } else if self.insecure_tcp {
            let _ = writeln!(
                out,
                "warning: --insecure-tcp: plain TCP, any local user can use the API"
            );
        }
        let _ = writeln!(out, "state dir: {}", self.state_dir.display());
        let _ = writeln!(out, "run dir: {}", self.run_dir.display());
        let _ = writeln!(
            out,
            "driver call timeout: {:?}; attach timeout: {:?}",
            self.timeouts.driver_call, self.timeouts.driver_connect
        );
        let _ = writeln!(out, "max watches: {}", self.max_watches);
        let _ = writeln!(
            out,
            "watch coalescing: {} ms",
            self.watch_coalesce.as_millis()
        );
        for (i, plan) in self.drivers.iter().enumerate() {
            let default = if i == 0 { " (default)" } else { "" };
            let _ = writeln!(out, "driver {}{default}: {}", plan.name, plan.describe());
        }
        for warning in &self.warnings {
            let _ = writeln!(out, "warning: {warning}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_cli;
    use crate::drivers::plan::Acquisition;

    fn parse(text: &str) -> Result<FileConfig> {
        FileConfig::parse(text, Path::new("/etc/openshell/gateway.toml"))
    }

    fn cli(args: &[&str]) -> (Cli, CliSources) {
        let mut argv = vec![
            "openshell-gateway",
            "--state-dir",
            "/tmp/os-state",
            "--run-dir",
            "/tmp/os-run",
        ];
        argv.extend_from_slice(args);
        parse_cli(argv).unwrap()
    }

    #[test]
    fn flags_override_the_file() {
        let file = parse(
            r#"
            [openshell.gateway]
            compute_drivers = ["kyma@/run/kyma.sock"]
            listen = "tcp://127.0.0.1:7000"
            insecure_tcp = true
            log_format = "json"
            state_dir = "/var/lib/os"
            driver_call_timeout_secs = 9
            "#,
        )
        .unwrap();
        let (args, sources) = cli(&[
            "--drivers",
            "podman",
            "--listen",
            "unix:///tmp/os-run/g.sock",
        ]);
        let settings = resolve_with(&args, sources, &file).unwrap();
        assert_eq!(settings.drivers.len(), 1);
        assert_eq!(settings.drivers[0].name, "podman");
        assert_eq!(
            settings.listen,
            ListenAddr::Unix(PathBuf::from("/tmp/os-run/g.sock"))
        );
        assert_eq!(settings.log_format, LogFormat::Json);
        assert_eq!(settings.state_dir, PathBuf::from("/tmp/os-state"));
        assert_eq!(settings.timeouts.driver_call, Duration::from_secs(9));

        let (args, sources) = cli(&[]);
        let settings = resolve_with(&args, sources, &file).unwrap();
        assert_eq!(settings.drivers[0].name, "kyma");
        assert_eq!(
            settings.listen,
            ListenAddr::Tcp("127.0.0.1:7000".parse().unwrap())
        );
    }

    #[test]
    fn empty_environment_values_count_as_unset() {
        let file = parse("[openshell.gateway]\ncompute_drivers = [\"podman\"]\n").unwrap();
        let (mut args, _) = cli(&[]);
        args.drivers = vec![" ".to_owned()];
        args.compute_driver_socket = Some(String::new());
        let env = CliSources {
            drivers: Some(FlagSource::Env),
            compute_driver_socket: Some(FlagSource::Env),
        };
        let settings = resolve_with(&args, env, &file).unwrap();
        assert_eq!(settings.drivers[0].name, "podman");
        assert!(settings.drivers[0].is_managed());
        // The same values given as flags are mistakes.
        let flags = CliSources {
            drivers: Some(FlagSource::CommandLine),
            compute_driver_socket: Some(FlagSource::CommandLine),
        };
        let message = resolve_with(&args, flags, &file).unwrap_err().to_string();
        assert!(message.contains("--drivers: entry 1"), "{message}");
    }

    #[test]
    fn default_listen_is_gateway_sock_in_the_run_dir() {
        let (args, sources) = cli(&["--drivers", "vm"]);
        let settings = resolve_with(&args, sources, &FileConfig::default()).unwrap();
        assert_eq!(
            settings.listen,
            ListenAddr::Unix(PathBuf::from("/tmp/os-run/gateway.sock"))
        );
        assert!(!settings.allow_remote);
    }

    #[test]
    fn default_listen_is_where_the_cli_looks() {
        let (args, sources) = parse_cli([
            "openshell-gateway",
            "--state-dir",
            "/tmp/os-state",
            "--drivers",
            "vm",
        ])
        .unwrap();
        let settings = resolve_with(&args, sources, &FileConfig::default()).unwrap();
        assert_eq!(
            settings.listen,
            ListenAddr::Unix(openshell_wire::paths::default_gateway_socket())
        );
    }

    #[test]
    fn remote_listen_needs_allow_remote() {
        let (args, sources) = cli(&["--drivers", "vm", "--listen", "tcp://0.0.0.0:7000"]);
        let message = resolve_with(&args, sources, &FileConfig::default())
            .unwrap_err()
            .to_string();
        assert!(message.contains("--allow-remote"), "{message}");
        let (args, sources) = cli(&[
            "--drivers",
            "vm",
            "--listen",
            "tcp://0.0.0.0:7000",
            "--allow-remote",
            "--tls-cert=/etc/os/gateway.pem",
            "--tls-key=/etc/os/gateway.key",
            "--tls-client-ca=/etc/os/ca.pem",
        ]);
        assert!(
            resolve_with(&args, sources, &FileConfig::default())
                .unwrap()
                .allow_remote
        );
        let (args, sources) = cli(&[
            "--drivers",
            "vm",
            "--listen",
            "tcp://0.0.0.0:7000",
            "--allow-remote=false",
        ]);
        assert!(resolve_with(&args, sources, &FileConfig::default()).is_err());
    }

    #[test]
    fn tcp_needs_tls_unless_insecure_on_loopback() {
        let resolve = |extra: &[&str]| {
            let mut args = vec!["--drivers", "vm"];
            args.extend_from_slice(extra);
            let (args, sources) = cli(&args);
            resolve_with(&args, sources, &FileConfig::default()).map_err(|e| e.to_string())
        };
        let tls = [
            "--tls-cert=/c.pem",
            "--tls-key=/k.pem",
            "--tls-client-ca=/ca.pem",
        ];
        let error = resolve(&["--listen", "tcp://127.0.0.1:7000"]).unwrap_err();
        assert!(
            error.contains("only with TLS and client certificates"),
            "{error}"
        );
        let error =
            resolve(&["--listen", "tcp://127.0.0.1:7000", "--tls-cert=/c.pem"]).unwrap_err();
        assert!(
            error.contains("missing: --tls-key, --tls-client-ca"),
            "{error}"
        );
        let mut args = vec!["--listen", "tcp://127.0.0.1:7000"];
        args.extend_from_slice(&tls);
        let settings = resolve(&args).unwrap();
        assert_eq!(settings.tls.unwrap().client_ca, PathBuf::from("/ca.pem"));
        let settings = resolve(&["--listen", "tcp://127.0.0.1:7000", "--insecure-tcp"]).unwrap();
        assert!(settings.insecure_tcp && settings.tls.is_none());
        assert!(settings.describe().contains("--insecure-tcp"));
        let error = resolve(&[
            "--listen",
            "tcp://0.0.0.0:7000",
            "--allow-remote",
            "--insecure-tcp",
        ])
        .unwrap_err();
        assert!(error.contains("loopback only"), "{error}");
        let error =
            resolve(&["--listen", "unix:///tmp/x/g.sock", "--tls-cert=/c.pem"]).unwrap_err();
        assert!(error.contains("apply to a tcp:// listener"), "{error}");
    }

    #[test]
    fn remote_drivers_take_tls_from_their_table_or_the_defaults() {
        let file = parse(
            r#"
            [openshell.drivers.far]
            endpoint = "https://10.0.0.7:7443"
            tls_ca = "/etc/os/ca.pem"
            "#,
        )
        .unwrap();
        let (args, sources) = cli(&["--drivers", "far"]);
        let error = resolve_with(&args, sources, &file).unwrap_err().to_string();
        assert!(
            error.contains("driver 'far'") && error.contains("tls_cert, tls_key are not set"),
            "{error}"
        );
        let (args, sources) = cli(&[
            "--drivers",
            "far,near@https://[::1]:9000",
            "--driver-tls-ca=/d/ca.pem",
            "--driver-tls-cert=/d/gw.pem",
            "--driver-tls-key=/d/gw.key",
        ]);
        let settings = resolve_with(&args, sources, &file).unwrap();
        let Acquisition::Remote { addr, tls, .. } = &settings.drivers[0].acquisition else {
            panic!("far is remote: {:?}", settings.drivers[0]);
        };
        assert_eq!(addr.to_string(), "https://10.0.0.7:7443");
        assert_eq!(tls.ca.as_deref(), Some(Path::new("/etc/os/ca.pem")));
        assert_eq!(tls.cert.as_deref(), Some(Path::new("/d/gw.pem")));
        let Acquisition::Remote { addr, .. } = &settings.drivers[1].acquisition else {
            panic!("near is remote");
        };
        assert_eq!(addr.bare_host(), "::1");
        let (args, sources) = cli(&["--drivers", "x@http://h:1"]);
        let error = resolve_with(&args, sources, &FileConfig::default())
            .unwrap_err()
            .to_string();
        assert!(error.contains("NAME@https://HOST:PORT"), "{error}");
        let both =
            parse("[openshell.drivers.far]\nendpoint = \"https://h:1\"\nsocket_path = \"/x.sock\"")
                .unwrap();
        let (args, sources) = cli(&["--drivers", "far"]);
        let error = resolve_with(&args, sources, &both).unwrap_err().to_string();
        assert!(error.contains("both socket_path and endpoint"), "{error}");
    }

    #[test]
    fn bad_flag_values_are_config_errors() {
        let (args, sources) = cli(&["--drivers", "vm", "--driver-call-timeout", "0"]);
        let message = resolve_with(&args, sources, &FileConfig::default())
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("--driver-call-timeout must be a positive"),
            "{message}"
        );
        let (args, sources) = cli(&["--drivers", "vm", "--listen", "gateway.sock"]);
        let message = resolve_with(&args, sources, &FileConfig::default())
            .unwrap_err()
            .to_string();
        assert!(message.contains("--listen: listen address"), "{message}");
    }

    #[test]
    fn watch_coalescing_comes_from_the_flag_the_file_or_the_default() {
        let none = FileConfig::default();
        let file = parse("[openshell.gateway]\nwatch_coalesce_ms = 20\n").unwrap();
        let (args, sources) = cli(&["--drivers", "vm"]);
        let default = resolve_with(&args, sources, &none).unwrap();
        assert_eq!(
            default.watch_coalesce,
            crate::gateway::watch::DEFAULT_WATCH_COALESCE
        );
        assert!(
            default.describe().contains("watch coalescing: 5 ms"),
            "{}",
            default.describe()
        );
        let from_file = resolve_with(&args, sources, &file).unwrap();
        assert_eq!(from_file.watch_coalesce, Duration::from_millis(20));
        let (args, sources) = cli(&["--drivers", "vm", "--watch-coalesce-ms", "0"]);
        let flagged = resolve_with(&args, sources, &file).unwrap();
        assert_eq!(flagged.watch_coalesce, Duration::ZERO);
        for bad in ["1001", "-1", "soon"] {
            let error = parse_cli(["openshell-gateway", &format!("--watch-coalesce-ms={bad}")])
                .unwrap_err()
                .to_string();
            assert!(error.contains("--watch-coalesce-ms"), "{bad}: {error}");
        }
    }

    // Selection from every source at once: flags, environment and file.

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
        let selection = select::select(&SelectionInput {
            list,
            compute_driver_socket: case.socket.map(|s| (s, socket_source)),
            tables: &file.drivers,
        })
        .map_err(|e| e.to_string())?;
        Ok(selection
            .plans
            .iter()
            .map(|p| match &p.acquisition {
                Acquisition::Managed(_) => format!("{}=managed", p.name),
                Acquisition::Attach { socket, .. } => format!("{}@{}", p.name, socket.display()),
                Acquisition::Remote { addr, .. } => format!("{}@{addr}", p.name),
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
        let selection = select::select(&SelectionInput {
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
    fn managed_plans_carry_their_table() {
        let file = FileConfig::parse(
            "[openshell.drivers.podman]\nbinary = \"/opt/p\"\nready_timeout_secs = 3\nexpect_driver_name = \"x\"\nsocket_uri = \"unix:///p.sock\"",
            Path::new("/etc/gw.toml"),
        )
        .unwrap();
        let selection = select::select(&SelectionInput {
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
}
