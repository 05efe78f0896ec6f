//! `openshell`: the command-line client of the OpenShell gateway.

mod client;
mod error;
mod render;
mod wait;

use std::collections::HashMap;
use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory as _, Parser, Subcommand, ValueEnum};
use openshell_proto::gateway::v1::gateway_client::GatewayClient;
use openshell_proto::gateway::v1::watch_sandboxes_event::Payload;
use openshell_proto::gateway::v1::{
    AdoptOrphanRequest, CreateSandboxRequest, DeleteOrphanRequest, DeleteSandboxRequest,
    GetGatewayInfoRequest, GetSandboxRequest, ListOrphansRequest, ListSandboxesRequest, Resources,
    SandboxLogsRequest, SandboxRef, SandboxSpec, StartSandboxRequest, StopSandboxRequest,
    WatchSandboxesRequest,
};
use serde_json::json;
use tonic::transport::Channel;

use crate::error::CliError;
use crate::wait::{Goal, Progress};

#[derive(Debug, Parser)]
#[command(
    name = "openshell",
    version,
    about = "Run and manage sandboxes through an OpenShell gateway"
)]
#[command(
    after_help = "Exit codes: 0 ok, 1 request refused, 2 bad usage, 3 gateway unreachable, \
                        4 sandbox failed, 5 timed out waiting"
)]
struct Cli {
    /// Gateway address: unix:///path/to/gateway.sock, https://HOST:PORT
    /// (mutual TLS: --tls-ca, --tls-cert, --tls-key) or tcp://HOST:PORT
    /// (only a gateway started with --insecure-tcp answers plain TCP)
    /// [default: the gateway's default socket in the run directory]
    #[arg(long, global = true, env = "OPENSHELL_GATEWAY", value_name = "ADDRESS")]
    gateway: Option<String>,

    /// CA certificate (PEM) that signed an https:// gateway's certificate.
    #[arg(
        long,
        global = true,
        env = "OPENSHELL_GATEWAY_TLS_CA",
        value_name = "PATH"
    )]
    tls_ca: Option<std::path::PathBuf>,

    /// Your client certificate (PEM) for an https:// gateway.
    #[arg(
        long,
        global = true,
        env = "OPENSHELL_GATEWAY_TLS_CERT",
        value_name = "PATH"
    )]
    tls_cert: Option<std::path::PathBuf>,

    /// The private key (PEM) of --tls-cert.
    #[arg(
        long,
        global = true,
        env = "OPENSHELL_GATEWAY_TLS_KEY",
        value_name = "PATH"
    )]
    tls_key: Option<std::path::PathBuf>,

    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// Aligned text for people.
    Table,
    /// JSON for scripts (one object; one per line for streams).
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The gateway itself.
    #[command(subcommand)]
    Gateway(GatewayCommand),
    /// Create and manage sandboxes.
    #[command(subcommand)]
    Sandbox(Box<SandboxCommand>),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
}

#[derive(Debug, Subcommand)]
enum GatewayCommand {
    /// Version, listen address and every driver with its health.
    Info,
}

#[derive(Debug, Subcommand)]
enum SandboxCommand {
    /// Create a sandbox and, unless --no-wait, wait until it is Ready.
    Create(CreateArgs),
    /// Show one sandbox.
    Get { name: String },
    /// List sandboxes.
    List(ListArgs),
    /// Delete a sandbox and, unless --no-wait, wait until it is gone; or,
    /// with --orphan ID --driver D, a sandbox the driver has and the
    /// gateway has no record of.
    Delete(DeleteArgs),
    /// Take an orphan (a sandbox the driver has and the gateway has no
    /// record of; see `sandbox list --orphans`) under management.
    Adopt {
        /// The orphan's name.
        name: String,
        /// The driver that reports it.
        #[arg(long)]
        driver: String,
    },
    /// Stop a sandbox, keeping its state.
    Stop { name: String },
    /// Start a stopped sandbox and, unless --no-wait, wait until it is Ready.
    Start(NameWait),
    /// Print sandbox changes as they happen (Ctrl-C to stop).
    Watch {
        /// Only this sandbox.
        name: Option<String>,
        /// Only sandboxes of this driver.
        #[arg(long)]
        driver: Option<String>,
    },
    /// Print a sandbox's console output.
    Logs {
        name: String,
        /// Keep printing new output.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines of what was already written.
        #[arg(long, value_name = "N")]
        tail: Option<u32>,
    },
}

#[derive(Debug, Args)]
struct Wait {
    /// Return as soon as the gateway accepted the request.
    #[arg(long)]
    no_wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    timeout: u64,
}

#[derive(Debug, Args)]
struct NameWait {
    name: String,
    #[command(flatten)]
    wait: Wait,
}

#[derive(Debug, Args)]
struct DeleteArgs {
    /// The sandbox to delete.
    #[arg(required_unless_present = "orphan")]
    name: Option<String>,
    /// Delete the orphan with this id instead (see `sandbox list --orphans`).
    #[arg(long, value_name = "ID", conflicts_with = "name", requires = "driver")]
    orphan: Option<String>,
    /// The driver that reports the orphan.
    #[arg(long, requires = "orphan")]
    driver: Option<String>,
    #[command(flatten)]
    wait: Wait,
}

#[derive(Debug, Args)]
struct CreateArgs {
    /// Sandbox name: 1-63 of a-z, 0-9 and '-', starting with a letter.
    name: String,
    /// Image to run [default: the driver's default image].
    #[arg(long)]
    image: Option<String>,
    /// Driver to run it on [default: the gateway's first driver].
    #[arg(long)]
    driver: Option<String>,
    /// Environment variable for the main process (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    env: Vec<(String, String)>,
    /// Label for the sandbox (repeatable).
    #[arg(short, long = "label", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    labels: Vec<(String, String)>,
    /// Give the main process a terminal.
    #[arg(long)]
    tty: bool,
    /// CPU limit, e.g. 500m or 2.
    #[arg(long, value_name = "QUANTITY")]
    cpu_limit: Option<String>,
    /// Memory limit, e.g. 512Mi or 2Gi.
    #[arg(long, value_name = "QUANTITY")]
    memory_limit: Option<String>,
    #[command(flatten)]
    wait: Wait,
    /// The main process and its arguments, exactly (after `--`).
    #[arg(last = true, value_name = "ARGV")]
    command: Vec<String>,
}

#[derive(Debug, Args)]
struct ListArgs {
    /// Only sandboxes of this driver.
    #[arg(long)]
    driver: Option<String>,
    /// Only sandboxes in this phase (e.g. Ready, Stopped, Error).
    #[arg(long, value_parser = render::parse_phase)]
    phase: Option<openshell_proto::gateway::v1::SandboxPhase>,
    /// Only sandboxes with this label (repeatable; all must match).
    #[arg(short, long = "label", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    labels: Vec<(String, String)>,
    /// Stop after this many sandboxes.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// List the sandboxes drivers report that the gateway has no record of
    /// (lost or replaced state) instead; adopt them with `sandbox adopt`
    /// or delete them with `sandbox delete --orphan`.
    #[arg(long, conflicts_with_all = ["phase", "labels", "limit"])]
    orphans: bool,
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("'{text}' is not KEY=VALUE")),
    }
}

fn by_name(name: &str) -> Option<SandboxRef> {
    Some(SandboxRef {
        name: name.to_owned(),
        id: String::new(),
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(
            shell,
            &mut Cli::command(),
            "openshell",
            &mut std::io::stdout(),
        );
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let address = match &cli.gateway {
        Some(text) => client::parse_address(text)?,
        None => client::default_address(),
    };
    let tls = client::TlsFiles {
        ca: cli.tls_ca.clone(),
        cert: cli.tls_cert.clone(),
        key: cli.tls_key.clone(),
    };
    let mut client = client::connect(&address, &tls).await?;
    let format = cli.output;
    match cli.command {
        Command::Completions { .. } => Ok(()),
        Command::Gateway(GatewayCommand::Info) => {
            let info = client
                .get_gateway_info(GetGatewayInfoRequest {})
                .await?
                .into_inner();
            match format {
                Format::Json => print_json(&render::gateway_info_json(&info)),
                Format::Table => print_text(&render::gateway_info_text(&info)),
            }
        }
        Command::Sandbox(command) => sandbox(&mut client, *command, format).await,
    }
}

fn print_json(value: &serde_json::Value) -> Result<(), CliError> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    serde_json::to_writer_pretty(&mut out, value).map_err(std::io::Error::from)?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

fn print_json_line(value: &serde_json::Value) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, value).map_err(std::io::Error::from)?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

fn print_text(text: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

fn show_sandbox(
    sandbox: &openshell_proto::gateway::v1::Sandbox,
    format: Format,
) -> Result<(), CliError> {
    match format {
        Format::Json => print_json(&render::sandbox_json(sandbox)),
        Format::Table => print_text(&render::sandbox_text(sandbox)),
    }
}

async fn sandbox(
    client: &mut GatewayClient<Channel>,
    command: SandboxCommand,
    format: Format,
) -> Result<(), CliError> {
    match command {
        SandboxCommand::Create(args) => create(client, args, format).await,
        SandboxCommand::Get { name } => {
            let response = client
                .get_sandbox(GetSandboxRequest {
                    sandbox: by_name(&name),
                })
                .await?
                .into_inner();
            show_sandbox(&response.sandbox.unwrap_or_default(), format)
        }
        SandboxCommand::List(args) => list(client, args, format).await,
        SandboxCommand::Delete(DeleteArgs {
            orphan: Some(id),
            driver,
            ..
        }) => {
            let deleted = client
                .delete_orphan(DeleteOrphanRequest {
                    driver: driver.unwrap_or_default(),
                    id: id.clone(),
                })
                .await?
                .into_inner()
                .deleted;
            match format {
                Format::Json => print_json(&json!({ "orphan": id, "deleted": deleted })),
                Format::Table if deleted => print_text(&format!("orphan {id} deleted\n")),
                Format::Table => print_text(&format!("orphan {id} was already gone\n")),
            }
        }
        SandboxCommand::Adopt { name, driver } => {
            let response = client
                .adopt_orphan(AdoptOrphanRequest {
                    driver,
                    name,
                    id: String::new(),
                })
                .await?
                .into_inner();
            show_sandbox(&response.sandbox.unwrap_or_default(), format)
        }
        SandboxCommand::Delete(DeleteArgs { name, wait, .. }) => {
            let name = name.unwrap_or_default();
            let deleted = client
                .delete_sandbox(DeleteSandboxRequest {
                    sandbox: by_name(&name),
                })
                .await?
                .into_inner()
                .deleted;
            if deleted && !wait.no_wait {
                let mut progress = Progress::new(&name, format == Format::Table);
                wait::wait_for(
                    client,
                    &name,
                    Goal::Gone,
                    Duration::from_secs(wait.timeout),
                    None,
                    &mut progress,
                )
                .await?;
            }
            match format {
                Format::Json => print_json(&json!({ "name": name, "deleted": deleted })),
                Format::Table if deleted => print_text(&format!("sandbox {name} deleted\n")),
                Format::Table => print_text(&format!("sandbox {name} was already gone\n")),
            }
        }
        SandboxCommand::Stop { name } => {
            let response = client
                .stop_sandbox(StopSandboxRequest {
                    sandbox: by_name(&name),
                })
                .await?
                .into_inner();
            show_sandbox(&response.sandbox.unwrap_or_default(), format)
        }
        SandboxCommand::Start(NameWait { name, wait }) => {
            let mut sandbox = client
                .start_sandbox(StartSandboxRequest {
                    sandbox: by_name(&name),
                })
                .await?
                .into_inner()
                .sandbox
                .unwrap_or_default();
            if !wait.no_wait {
                let mut progress = Progress::new(&name, format == Format::Table);
                let timeout = Duration::from_secs(wait.timeout);
                let known = Some(sandbox.clone());
                if let Some(ready) =
                    wait::wait_for(client, &name, Goal::Ready, timeout, known, &mut progress)
                        .await?
                {
                    sandbox = ready;
                }
            }
            show_sandbox(&sandbox, format)
        }
        SandboxCommand::Watch { name, driver } => watch(client, name, driver, format).await,
        SandboxCommand::Logs { name, follow, tail } => {
            let mut stream = client
                .sandbox_logs(SandboxLogsRequest {
                    sandbox: by_name(&name),
                    follow,
                    tail_lines: tail.unwrap_or(0),
                })
                .await?
                .into_inner();
            let mut out = std::io::stdout().lock();
            while let Some(chunk) = stream.message().await? {
                out.write_all(&chunk.data)?;
                out.flush()?;
            }
            Ok(())
        }
    }
}

async fn create(
    client: &mut GatewayClient<Channel>,
    args: CreateArgs,
    format: Format,
) -> Result<(), CliError> {
    let resources = (args.cpu_limit.is_some() || args.memory_limit.is_some()).then(|| Resources {
        cpu_limit: args.cpu_limit.clone().unwrap_or_default(),
        memory_limit: args.memory_limit.clone().unwrap_or_default(),
        ..Resources::default()
    });
    let request = CreateSandboxRequest {
        name: args.name.clone(),
        spec: Some(SandboxSpec {
            image: args.image.unwrap_or_default(),
            command: args.command,
            env: args.env.into_iter().collect::<HashMap<_, _>>(),
            tty: args.tty,
            resources,
        }),
        labels: args.labels.into_iter().collect(),
        driver: args.driver.unwrap_or_default(),
    };
    let mut progress = Progress::new(&args.name, format == Format::Table && !args.wait.no_wait);
    let mut sandbox = client
        .create_sandbox(request)
        .await?
        .into_inner()
        .sandbox
        .unwrap_or_default();
    if !args.wait.no_wait {
        progress.sandbox(&sandbox);
        let timeout = Duration::from_secs(args.wait.timeout);
        let known = Some(sandbox.clone());
        if let Some(ready) = wait::wait_for(
            client,
            &args.name,
            Goal::Ready,
            timeout,
            known,
            &mut progress,
        )
        .await?
        {
            sandbox = ready;
        }
    }
    show_sandbox(&sandbox, format)
}

async fn list(
    client: &mut GatewayClient<Channel>,
    args: ListArgs,
    format: Format,
) -> Result<(), CliError> {
    if args.orphans {
        return list_orphans(client, args.driver.unwrap_or_default(), format).await;
    }
    let limit = args.limit.unwrap_or(usize::MAX);
    let mut request = ListSandboxesRequest {
        driver: args.driver.unwrap_or_default(),
        phase: args.phase.map_or(0, |p| p as i32),
        labels: args.labels.into_iter().collect(),
        page_size: 500,
        page_token: String::new(),
    };
    if format == Format::Json {
        return list_json(client, request, limit).await;
    }
    let mut sandboxes = Vec::new();
    loop {
        let page = client.list_sandboxes(request.clone()).await?.into_inner();
        sandboxes.extend(page.sandboxes);
        if page.next_page_token.is_empty() || sandboxes.len() >= limit {
            break;
        }
        request.page_token = page.next_page_token;
    }
    sandboxes.truncate(limit);
    if sandboxes.is_empty() {
        print_text("no sandboxes\n")
    } else {
        print_text(&render::sandbox_rows(&sandboxes, render::now_ms()))
    }
}

async fn list_orphans(
    client: &mut GatewayClient<Channel>,
    driver: String,
    format: Format,
) -> Result<(), CliError> {
    let orphans = client
        .list_orphans(ListOrphansRequest { driver })
        .await?
        .into_inner()
        .orphans;
    match format {
        Format::Json => print_json(&json!(
            orphans
                .iter()
                .map(|o| json!({
                    "driver": o.driver,
                    "id": o.id,
                    "name": o.name,
                    "phase": render::phase_name(o.phase),
                    "image": o.image,
                }))
                .collect::<Vec<_>>()
        )),
        Format::Table if orphans.is_empty() => print_text("no orphans\n"),
        Format::Table => {
            let mut text = format!(
                "{:<24} {:<12} {:<14} {:<38} {}\n",
                "NAME", "DRIVER", "PHASE", "ID", "IMAGE"
            );
            for o in &orphans {
                text.push_str(&format!(
                    "{:<24} {:<12} {:<14} {:<38} {}\n",
                    o.name,
                    o.driver,
                    render::phase_name(o.phase),
                    o.id,
                    o.image
                ));
            }
            print_text(&text)
        }
    }
}

/// `list -o json`: one JSON array, written page by page as the pages come,
/// so the whole list is never held at once.
async fn list_json(
    client: &mut GatewayClient<Channel>,
    mut request: ListSandboxesRequest,
    limit: usize,
) -> Result<(), CliError> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    out.write_all(b"[")?;
    let mut count = 0usize;
    'pages: loop {
        let page = client.list_sandboxes(request.clone()).await?.into_inner();
        for sandbox in &page.sandboxes {
            if count == limit {
                break 'pages;
            }
            let element = serde_json::to_string_pretty(&render::sandbox_json(sandbox))
                .map_err(std::io::Error::from)?;
            if count > 0 {
                out.write_all(b",")?;
            }
            // As an element of a pretty-printed array: indented once more.
            out.write_all(b"\n  ")?;
            out.write_all(element.replace('\n', "\n  ").as_bytes())?;
            count += 1;
        }
        if page.next_page_token.is_empty() || count >= limit {
            break;
        }
        request.page_token = page.next_page_token;
    }
    if count > 0 {
        out.write_all(b"\n")?;
    }
    out.write_all(b"]\n")?;
    out.flush()?;
    Ok(())
}

async fn watch(
    client: &mut GatewayClient<Channel>,
    name: Option<String>,
    driver: Option<String>,
    format: Format,
) -> Result<(), CliError> {
    let mut stream = client
        .watch_sandboxes(WatchSandboxesRequest {
            driver: driver.unwrap_or_default(),
            name: name.unwrap_or_default(),
        })
        .await?
        .into_inner();
    while let Some(event) = stream.message().await? {
        let Some(payload) = event.payload else {
            continue;
        };
        match format {
            Format::Json => {
                let value = match &payload {
                    Payload::Sandbox(s) => {
                        json!({ "type": "sandbox", "sandbox": render::sandbox_json(s) })
                    }
                    Payload::Deleted(d) => json!({ "type": "deleted", "id": d.id, "name": d.name }),
                    Payload::PlatformEvent(e) => {
                        json!({ "type": "event", "event": render::platform_event_json(e) })
                    }
                    Payload::Synced(_) => json!({ "type": "synced" }),
                };
                print_json_line(&value)?;
            }
            Format::Table => {
                let now = render::timestamp(render::now_ms());
                let line = match &payload {
                    Payload::Sandbox(s) => {
                        let why = render::explaining_condition(s)
                            .map(render::condition_summary)
                            .unwrap_or_default();
                        format!(
                            "{now}  {:<12} {:<24} {:<14} {why}",
                            render::phase_name(s.phase),
                            s.name,
                            s.driver
                        )
                    }
                    Payload::Deleted(d) => format!("{now}  {:<12} {}", "Deleted", d.name),
                    Payload::PlatformEvent(e) => {
                        format!(
                            "{now}  {:<12} {:<24} {}: {}",
                            e.r#type, e.sandbox_name, e.reason, e.message
                        )
                    }
                    Payload::Synced(_) => "--- watching for changes".to_owned(),
                };
                print_text(&format!("{}\n", line.trim_end()))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn create_takes_argv_after_double_dash_exactly() {
        let cli = Cli::try_parse_from([
            "openshell",
            "sandbox",
            "create",
            "web",
            "--image",
            "img",
            "-e",
            "A=1",
            "--",
            "sh",
            "-c",
            "echo  two",
        ])
        .unwrap();
        let Command::Sandbox(command) = cli.command else {
            panic!("wrong command");
        };
        let SandboxCommand::Create(args) = *command else {
            panic!("wrong command");
        };
        assert_eq!(args.command, ["sh", "-c", "echo  two"]);
        assert_eq!(args.env, [("A".to_owned(), "1".to_owned())]);
        assert_eq!(args.image.as_deref(), Some("img"));
        assert!(!args.wait.no_wait);
    }

    #[test]
    fn key_value_needs_a_key() {
        assert_eq!(
            parse_key_value("A=b=c").unwrap(),
            ("A".to_owned(), "b=c".to_owned())
        );
        assert_eq!(
            parse_key_value("A=").unwrap(),
            ("A".to_owned(), String::new())
        );
        assert!(parse_key_value("=x").is_err());
        assert!(parse_key_value("novalue").is_err());
    }

    #[test]
    fn phase_filter_is_validated() {
        assert!(Cli::try_parse_from(["openshell", "sandbox", "list", "--phase", "ready"]).is_ok());
        let err = Cli::try_parse_from(["openshell", "sandbox", "list", "--phase", "running"])
            .unwrap_err();
        assert!(err.to_string().contains("unknown phase"), "{err}");
    }
}
