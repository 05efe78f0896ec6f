//! [`Settings`]: the command line, the environment and `gateway.toml`
//! merged, with the drivers selected. This is the one module that joins
//! configuration ([`crate::config`]) and driver selection
//! ([`crate::drivers::select`]); neither of those imports the other.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::api::listen::ListenAddr;
use crate::config::{Cli, CliSources, FileConfig, LogFormat, Timeouts, positive_seconds};
use crate::drivers::plan::{DriverPlan, FlagSource, ListOrigin};
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
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub log_format: LogFormat,
    pub log_level: Option<String>,
    pub timeouts: Timeouts,
    /// Most public watches open at once.
    pub max_watches: usize,
    pub config_file: Option<PathBuf>,
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
            "--listen {listen} can be reached from other machines, and the gateway API has no \
             authentication; listen on 127.0.0.1 or a Unix socket, or pass --allow-remote to accept that"
        )));
    }
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
    };
    Ok(Settings {
        drivers: selection.plans,
        warnings: selection.warnings,
        listen,
        allow_remote,
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
        config_file: (!file.path.as_os_str().is_empty()).then(|| file.path.clone()),
    })
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
        let _ = writeln!(out, "state dir: {}", self.state_dir.display());
        let _ = writeln!(out, "run dir: {}", self.run_dir.display());
        let _ = writeln!(
            out,
            "driver call timeout: {:?}; attach timeout: {:?}",
            self.timeouts.driver_call, self.timeouts.driver_connect
        );
        let _ = writeln!(out, "max watches: {}", self.max_watches);
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
