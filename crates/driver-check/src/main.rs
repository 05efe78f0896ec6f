//! `openshell-driver-check SOCKET`: runs the compute-driver contract's
//! checks against a driver and prints what passes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use openshell_driver_check::CheckError;
use openshell_driver_check::catalog::{CHECKS, Requirement, Selection};
use openshell_driver_check::report::Report;
use openshell_driver_check::runner::{self, Options, Runner};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Conformance checker for OpenShell compute drivers",
    long_about = "Runs the behaviours of the openshell.compute.v1.ComputeDriver contract against a running driver's Unix socket and prints one row per check. Exit status: 0 when every required check passes, 1 when one fails, 2 for usage errors. Sandboxes it creates are named conformance-<run>-* and deleted at the end, also on Ctrl-C.",
    after_help = check_list()
)]
struct Cli {
    /// The driver's socket (what it was started with as --bind-socket).
    socket: PathBuf,
    /// Image for the sandboxes the checks create [default: the driver's default image].
    #[arg(long)]
    image: Option<String>,
    /// Comma-separated check ids to run (repeatable); the rest are not reported.
    #[arg(long, value_name = "ID,...")]
    only: Vec<String>,
    /// Comma-separated check ids not to run (repeatable).
    #[arg(long, value_name = "ID,...")]
    skip: Vec<String>,
    /// Print the report as a JSON array of {id, title, required, outcome, reason, elapsed_ms}.
    #[arg(long)]
    json: bool,
    /// Seconds a sandbox may take to become Ready, stop or go away, and a watch to deliver an event.
    #[arg(long, value_name = "SECS", default_value = "60")]
    ready_timeout: String,
    /// Seconds one unary call may take.
    #[arg(long, value_name = "SECS", default_value = "10")]
    call_timeout: String,
    /// Keep running after a required check failed (by default the rest are skipped).
    #[arg(long)]
    keep_going: bool,
    /// The driver has GPUs, so a GPU request is not expected to be refused
    /// (1.x drivers say so in resource_capabilities themselves).
    #[arg(long)]
    driver_has_gpu: bool,
    /// Main process argv for the sandboxes the checks create, e.g.
    /// `--command sleep infinity`; takes every argument after it, so give it last
    /// [default: the driver's default command].
    #[arg(long, num_args = 1.., allow_hyphen_values = true, value_name = "ARG")]
    command: Vec<String>,
}

fn check_list() -> String {
    let mut text = String::from("Checks (id, required):\n");
    for c in CHECKS {
        let required = match c.requirement {
            Requirement::Always => "required",
            Requirement::OneX => "required of 1.x drivers",
            Requirement::Optional => "optional",
        };
        text.push_str(&format!("  {:<24} {required}: {}\n", c.id, c.title));
    }
    text
}

fn seconds(flag: &'static str, value: &str) -> Result<Duration, CheckError> {
    value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0)
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| CheckError::BadSeconds {
            flag,
            value: value.to_owned(),
        })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("openshell-driver-check: error: {error}");
            ExitCode::from(if error.is_usage() { 2 } else { 1 })
        }
    }
}

fn run(cli: Cli) -> Result<u8, CheckError> {
    let opts = Options {
        selection: Selection::new(&cli.only, &cli.skip)?,
        ready_timeout: seconds("--ready-timeout", &cli.ready_timeout)?,
        call_timeout: seconds("--call-timeout", &cli.call_timeout)?,
        socket: cli.socket,
        image: cli.image.unwrap_or_default(),
        command: cli.command,
        keep_going: cli.keep_going,
        driver_has_gpu: cli.driver_has_gpu,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let json = cli.json;
    runtime.block_on(async move {
        let channel = runner::connect(&opts.socket, opts.call_timeout).await?;
        let limit = opts.call_timeout;
        let runner = Runner::new(channel, opts);
        let tracker = runner.tracker();
        let client = runner.client();
        let report: Report = tokio::select! {
            report = runner.run() => report,
            _ = tokio::signal::ctrl_c() => {
                eprintln!("openshell-driver-check: interrupted; deleting the sandboxes this run created");
                let problems = runner::remove_all(&client, &tracker, limit).await;
                for problem in &problems {
                    eprintln!("openshell-driver-check: could not delete {problem}");
                }
                return Ok(130);
            }
        };
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        if json {
            writeln!(out, "{}", report.to_json()?)?;
        } else {
            write!(out, "{}", report.to_table())?;
        }
        Ok(report.exit_code())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_and_command_takes_the_rest() {
        let cli = Cli::try_parse_from([
            "openshell-driver-check",
            "/run/d.sock",
            "--only",
            "capabilities,delete",
            "--json",
            "--command",
            "sleep",
            "--infinity",
        ])
        .expect("valid flags");
        assert_eq!(cli.only, ["capabilities,delete"]);
        assert!(cli.json);
        assert_eq!(cli.command, ["sleep", "--infinity"]);
    }

    #[test]
    fn seconds_must_be_positive_numbers() {
        assert_eq!(
            seconds("--ready-timeout", "1.5").ok(),
            Some(Duration::from_millis(1500))
        );
        for bad in ["0", "-3", "NaN", "soon", "inf"] {
            let err = seconds("--call-timeout", bad).expect_err(bad);
            assert!(err.to_string().contains("--call-timeout"), "{err}");
            assert!(err.is_usage());
        }
    }

    #[test]
    fn the_help_lists_every_check() {
        let help = check_list();
        for c in CHECKS {
            assert!(help.contains(c.id), "{}", c.id);
        }
    }
}
