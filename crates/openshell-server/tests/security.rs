//! Who gets in: the state directory, the gateway's Unix socket (peer
//! credentials), its TCP listener (mutual TLS) and drivers on TCP. Real
//! gateway, real CLI, real test driver, loopback only.
//!
//! Tests that act as another user need root, `setpriv` and a `nobody`
//! user; they print why and return where those are missing.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use openshell_proto::gateway::v1::SandboxPhase;
use openshell_proto::gateway::v1::gateway_client::GatewayClient;

const NOBODY: &str = "65534";

/// The CLI binary, built next to the gateway by a workspace build.
fn cli_binary() -> Option<PathBuf> {
    let path = gateway_binary().with_file_name("openshell");
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "skipping: {} is missing (cargo build -p openshell-cli)",
            path.display()
        );
        None
    }
}

/// Whether this test can run a process as `nobody`.
fn can_become_nobody() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: acting as nobody needs root");
        return false;
    }
    let ok = Command::new("setpriv")
        .args([
            "--reuid",
            NOBODY,
            "--regid",
            NOBODY,
            "--clear-groups",
            "true",
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipping: `setpriv --reuid 65534` does not work here");
    }
    ok
}

/// `openshell-gateway certs init DIR` with extra arguments.
fn certs_init(dir: &Path, extra: &[&str]) {
    let output = Command::new(gateway_binary())
        .args(["certs", "init"])
        .arg(dir)
        .args(extra)
        .output()
        .expect("run certs init");
    assert!(
        output.status.success(),
        "certs init failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind port 0")
        .port()
}

/// A world-traversable directory (for files `nobody` must reach).
fn open_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("gwsec")
        .permissions(fs::Permissions::from_mode(0o755))
        .tempdir_in("/tmp")
        .expect("temp dir")
}

/// Lets every user reach `socket` through the file system.
fn open_up(socket: &Path) {
    let dir = socket.parent().expect("socket dir");
    fs::set_permissions(dir, fs::Permissions::from_mode(0o711)).expect("chmod dir");
    fs::set_permissions(socket, fs::Permissions::from_mode(0o666)).expect("chmod socket");
}

fn run_cli(cli: &Path, as_nobody: bool, args: &[&str]) -> Output {
    let mut command = if as_nobody {
        let mut c = Command::new("setpriv");
        c.args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"])
            .arg(cli);
        c
    } else {
        Command::new(cli)
    };
    command
        .args(args)
        .env_remove("OPENSHELL_GATEWAY")
        .stdin(Stdio::null())
        .output()
        .expect("run the CLI")
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn tls_args(certs: &Path, who: &str) -> Vec<String> {
    vec![
        "--tls-ca".into(),
        certs.join("ca.pem").display().to_string(),
        "--tls-cert".into(),
        certs.join(format!("{who}.pem")).display().to_string(),
        "--tls-key".into(),
        certs.join(format!("{who}.key")).display().to_string(),
    ]
}

fn server_tls_args(certs: &Path) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        certs.join("gateway.pem").display().to_string(),
        "--tls-key".into(),
        certs.join("gateway.key").display().to_string(),
        "--tls-client-ca".into(),
        certs.join("ca.pem").display().to_string(),
    ]
}

fn driver_tls_args(certs: &Path) -> Vec<String> {
    vec![
        "--driver-tls-ca".into(),
        certs.join("ca.pem").display().to_string(),
        "--driver-tls-cert".into(),
        certs.join("gateway.pem").display().to_string(),
        "--driver-tls-key".into(),
        certs.join("gateway.key").display().to_string(),
    ]
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

// ---- state directory ------------------------------------------------------

#[test]
fn state_dir_permission_and_symlink_attacks_are_refused() {
    let dirs = Dirs::new();
    let config = write_config(&dirs, "");
    let attach = ["--drivers", "k@/nonexistent/driver.sock"];

    // A state directory anyone may write to.
    fs::create_dir(dirs.state()).expect("mkdir state");
    fs::set_permissions(dirs.state(), fs::Permissions::from_mode(0o777)).expect("chmod");
    let (status, stderr) = run_gateway(&dirs, &config, &attach);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("mode 777") && stderr.contains("chmod 700"),
        "{stderr}"
    );
    assert!(!dirs.state().join("gateway.db").exists());
    fs::set_permissions(dirs.state(), fs::Permissions::from_mode(0o700)).expect("chmod");

    // A dangling link where the lock goes: nothing is created at its target.
    let victim = dirs.path("planted-lock");
    std::os::unix::fs::symlink(&victim, dirs.state().join("gateway.lock")).expect("symlink");
    let (status, stderr) = run_gateway(&dirs, &config, &attach);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("gateway.lock is a symlink"), "{stderr}");
    assert!(!victim.exists(), "the gateway created the link's target");
    fs::remove_file(dirs.state().join("gateway.lock")).expect("unlink");

    // A link where the database goes: the target is left as it was.
    let precious = dirs.path("precious");
    fs::write(&precious, "not a database").expect("write");
    fs::set_permissions(&precious, fs::Permissions::from_mode(0o644)).expect("chmod");
    std::os::unix::fs::symlink(&precious, dirs.state().join("gateway.db")).expect("symlink");
    let (status, stderr) = run_gateway(&dirs, &config, &attach);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("gateway.db is a symlink"), "{stderr}");
    assert_eq!(
        fs::read_to_string(&precious).expect("read"),
        "not a database"
    );
    assert_eq!(
        fs::metadata(&precious).expect("stat").permissions().mode() & 0o777,
        0o644
    );
}

// ---- the gateway's Unix socket ----------------------------------------------

#[tokio::test]
async fn the_gateway_socket_refuses_other_users_unless_listed() {
    let Some(cli) = cli_binary() else { return };
    if !can_become_nobody() {
        return;
    }
    let dirs = Dirs::new();
    let shared = open_dir();
    let _driver = AttachedDriver::start(&dirs.path("driver.sock"), &dirs.path("calls"), &[]);
    let config = write_config(&dirs, "");
    // The gateway binds only in a private directory; it is opened up
    // below, once the socket is there.
    let socket_dir = shared.path().join("sock");
    fs::create_dir(&socket_dir).expect("mkdir");
    fs::set_permissions(&socket_dir, fs::Permissions::from_mode(0o700)).expect("chmod");
    let socket = socket_dir.join("gw.sock");
    let listen = format!("unix://{}", socket.display());
    let drivers = format!("test@{}", dirs.path("driver.sock").display());
    let mut gateway = Gateway::spawn(
        &dirs,
        &config,
        &["--drivers", &drivers, "--listen", &listen],
    );
    gateway.socket = socket.clone();
    gateway.wait_serving().await;
    // File permissions would stop nobody before the peer check; open them
    // so that the check is what is tested.
    open_up(&socket);
    let address = format!("unix://{}", socket.display());
    let list = ["--gateway", address.as_str(), "sandbox", "list"];

    let refused = run_cli(&cli, true, &list);
    assert!(!refused.status.success(), "{}", text(&refused));
    wait_until("the refusal in the gateway log", || {
        let log = gateway.log_text();
        async move {
            log.contains("refused a connection to the gateway socket")
                && log.contains("peer_uid=65534")
        }
    })
    .await;
    let owner = run_cli(&cli, false, &list);
    assert!(owner.status.success(), "{}", text(&owner));

    // Listed: nobody gets in.
    drop(gateway);
    fs::set_permissions(&socket_dir, fs::Permissions::from_mode(0o700)).expect("chmod");
    let mut gateway = Gateway::spawn(
        &dirs,
        &config,
        &[
            "--drivers",
            &drivers,
            "--listen",
            &listen,
            "--allow-uid",
            NOBODY,
        ],
    );
    gateway.socket = socket.clone();
    gateway.wait_serving().await;
    open_up(&socket);
    let admitted = run_cli(&cli, true, &list);
    assert!(admitted.status.success(), "{}", text(&admitted));
}

// ---- the gateway's TCP listener ---------------------------------------------

#[test]
fn plain_tcp_is_refused_without_insecure_tcp() {
    let dirs = Dirs::new();
    let config = write_config(&dirs, "");
    let listen = format!("tcp://127.0.0.1:{}", free_port());
    let (status, stderr) = run_gateway(
        &dirs,
        &config,
        &["--drivers", "k@/nonexistent/d.sock", "--listen", &listen],
    );
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("only with TLS and client certificates"),
        "{stderr}"
    );
}

/// Polls `gateway info` over https until it answers.
fn wait_https(cli: &Path, address: &str, tls: &[String], gateway: &mut Gateway) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(status) = gateway.child.try_wait().expect("try_wait") {
            panic!("gateway exited early ({status}):\n{}", gateway.log_text());
        }
        let mut args = vec!["--gateway", address];
        args.extend(strs(tls));
        args.extend(["gateway", "info"]);
        let output = run_cli(cli, false, &args);
        if output.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "gateway never answered over https: {}\n{}",
            text(&output),
            gateway.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn tcp_needs_a_client_certificate_from_the_gateway_ca() {
    let Some(cli) = cli_binary() else { return };
    let dirs = Dirs::new();
    let certs = dirs.path("certs");
    let other = dirs.path("other-ca");
    certs_init(&certs, &[]);
    certs_init(&other, &[]);
    let _driver = AttachedDriver::start(&dirs.path("driver.sock"), &dirs.path("calls"), &[]);
    let config = write_config(&dirs, "");
    let port = free_port();
    let listen = format!("tcp://127.0.0.1:{port}");
    let drivers = format!("test@{}", dirs.path("driver.sock").display());
    let mut args = vec!["--drivers".to_owned(), drivers, "--listen".into(), listen];
    args.extend(server_tls_args(&certs));
    let mut gateway = Gateway::spawn(&dirs, &config, &strs(&args));
    let address = format!("https://127.0.0.1:{port}");
    let good = tls_args(&certs, "cli");
    wait_https(&cli, &address, &good, &mut gateway);

    // The owner's CLI with the right certificate: every command.
    let run = |extra: &[&str]| {
        let mut args = vec!["--gateway", address.as_str()];
        args.extend(strs(&good));
        args.extend_from_slice(extra);
        let output = run_cli(&cli, false, &args);
        assert!(output.status.success(), "{extra:?}: {}", text(&output));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    run(&["sandbox", "create", "tls-box", "--", "sleep", "infinity"]);
    assert!(run(&["sandbox", "get", "tls-box"]).contains("tls-box"));
    assert!(run(&["sandbox", "list"]).contains("tls-box"));
    run(&["sandbox", "logs", "tls-box"]);
    run(&["sandbox", "stop", "tls-box"]);
    run(&["sandbox", "start", "tls-box"]);
    run(&["sandbox", "delete", "tls-box"]);
    assert!(run(&["gateway", "info"]).contains("test"));

    // Another CA's certificates: the CLI does not trust the gateway.
    let mut args = vec!["--gateway", address.as_str()];
    let foreign = tls_args(&other, "cli");
    args.extend(strs(&foreign));
    args.extend(["sandbox", "list"]);
    let output = run_cli(&cli, false, &args);
    assert_eq!(output.status.code(), Some(3), "{}", text(&output));
    assert!(
        text(&output).contains("not signed by the CA you trust"),
        "{}",
        text(&output)
    );

    // The right CA, but a client certificate from another CA: the gateway
    // refuses it.
    let mixed = vec![
        "--tls-ca".to_owned(),
        certs.join("ca.pem").display().to_string(),
        "--tls-cert".into(),
        other.join("cli.pem").display().to_string(),
        "--tls-key".into(),
        other.join("cli.key").display().to_string(),
    ];
    let mut args = vec!["--gateway", address.as_str()];
    args.extend(strs(&mixed));
    args.extend(["sandbox", "list"]);
    let output = run_cli(&cli, false, &args);
    assert!(!output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains("client certificate"),
        "{}",
        text(&output)
    );

    // No client certificate at all (a stock client that only knows the CA).
    let ca = fs::read(certs.join("ca.pem")).expect("read CA");
    let endpoint = tonic::transport::Endpoint::from_shared(address.clone())
        .expect("uri")
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                .domain_name("127.0.0.1"),
        )
        .expect("tls config");
    let anonymous = match endpoint.connect().await {
        Err(error) => Err(format!("{error:?}")),
        Ok(channel) => GatewayClient::new(channel)
            .list_sandboxes(openshell_proto::gateway::v1::ListSandboxesRequest::default())
            .await
            .map(drop)
            .map_err(|s| format!("{s:?}")),
    };
    assert!(anonymous.is_err(), "a client without a certificate got in");

    // And as another user on this host, with a certificate from another
    // CA: refused just the same.
    if can_become_nobody() {
        let shared = open_dir();
        for name in ["cli.pem", "cli.key"] {
            fs::copy(other.join(name), shared.path().join(name)).expect("copy");
            fs::set_permissions(shared.path().join(name), fs::Permissions::from_mode(0o644))
                .expect("chmod");
        }
        fs::copy(certs.join("ca.pem"), shared.path().join("ca.pem")).expect("copy");
        fs::set_permissions(
            shared.path().join("ca.pem"),
            fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        let mut args = vec!["--gateway", address.as_str()];
        let theirs = tls_args(shared.path(), "cli");
        args.extend(strs(&theirs));
        args.extend(["sandbox", "list"]);
        let output = run_cli(&cli, true, &args);
        assert!(!output.status.success(), "{}", text(&output));
    }
}

// ---- drivers on TCP -----------------------------------------------------------

/// A test driver serving on its socket and on TCP with mutual TLS.
fn remote_driver(dirs: &Dirs, certs: &Path, port: u16) -> AttachedDriver {
    let bind = format!("127.0.0.1:{port}");
    let cert = certs.join("driver-remote.pem").display().to_string();
    let key = certs.join("driver-remote.key").display().to_string();
    let ca = certs.join("ca.pem").display().to_string();
    AttachedDriver::start(
        &dirs.path("driver.sock"),
        &dirs.path("calls"),
        &[
            "--bind-tcp",
            &bind,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &ca,
        ],
    )
}

#[tokio::test]
async fn a_driver_on_tcp_is_attached_with_mutual_tls() {
    let dirs = Dirs::new();
    let certs = dirs.path("certs");
    certs_init(&certs, &["--driver", "remote"]);
    let port = free_port();
    let mut driver = remote_driver(&dirs, &certs, port);
    let config = write_config(&dirs, "");
    let drivers = format!("remote@https://127.0.0.1:{port}");
    let mut args = vec!["--drivers".to_owned(), drivers.clone()];
    args.extend(driver_tls_args(&certs));
    let mut gateway = Gateway::start(&dirs, &config, &strs(&args)).await;
    let mut client = gateway.client().await;
    let info = driver_info(&mut client, "remote").await;
    assert!(
        format!("{info:?}").contains("https://127.0.0.1"),
        "{info:?}"
    );
    create(&mut client, "far", "remote").await;
    wait_phase(&mut client, "far", SandboxPhase::Ready).await;
    assert!(
        driver.calls().iter().any(|c| c.contains("CreateSandbox")),
        "{:?}",
        driver.calls()
    );

    // The driver restarts: the gateway reconnects by itself.
    driver.kill();
    driver.restart();
    wait_until("a create through the reconnected channel", || {
        let mut client = client.clone();
        async move {
            client
                .create_sandbox(create_request("again", "remote", &["sleep", "infinity"]))
                .await
                .is_ok()
        }
    })
    .await;
    wait_phase(&mut client, "again", SandboxPhase::Ready).await;

    // The driver outlives the gateway.
    drop(client);
    assert!(gateway.stop().success(), "{}", gateway.log_text());
    assert!(pid_alive(driver.pid()), "the driver died with the gateway");

    // Another deployment's gateway (a client certificate the driver does
    // not trust, a CA that did not sign the driver) cannot attach it.
    let other = dirs.path("other-ca");
    certs_init(&other, &[]);
    let other_dirs = Dirs::new();
    let mut args = vec!["--drivers".to_owned(), drivers.clone()];
    args.extend(driver_tls_args(&other));
    args.extend(["--driver-connect-timeout".into(), "3".into()]);
    let (status, stderr) = run_gateway(&other_dirs, &config, &strs(&args));
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("driver 'remote'") && stderr.contains("not signed by the CA you trust"),
        "{stderr}"
    );
    // The right CA for the driver, but our client certificate is foreign.
    let mixed = vec![
        "--drivers".to_owned(),
        drivers.clone(),
        "--driver-tls-ca".into(),
        certs.join("ca.pem").display().to_string(),
        "--driver-tls-cert".into(),
        other.join("gateway.pem").display().to_string(),
        "--driver-tls-key".into(),
        other.join("gateway.key").display().to_string(),
        "--driver-connect-timeout".into(),
        "3".into(),
    ];
    let (status, stderr) = run_gateway(&other_dirs, &config, &strs(&mixed));
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("driver 'remote'") && stderr.contains("client certificate"),
        "{stderr}"
    );
    // No client certificate configured: refused before dialling.
    let bare = vec![
        "--drivers".to_owned(),
        drivers,
        "--driver-tls-ca".into(),
        certs.join("ca.pem").display().to_string(),
    ];
    let (status, stderr) = run_gateway(&other_dirs, &config, &strs(&bare));
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("driver 'remote'") && stderr.contains("tls_cert, tls_key are not set"),
        "{stderr}"
    );
}

#[test]
fn a_driver_refuses_tcp_without_tls_files() {
    let dirs = Dirs::new();
    let output = Command::new(test_driver())
        .arg("--bind-socket")
        .arg(dirs.path("d.sock"))
        .args(["--allow-same-uid-peer", "--bind-tcp", "127.0.0.1:1"])
        .output()
        .expect("run the test driver");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("only with mutual TLS"), "{stderr}");
}
