//! What mutual TLS on TCP costs a driver RPC, against one release
//! `openshell-test-driver` serving both its Unix socket and `--bind-tcp`
//! with mutual TLS (certificates from `openshell-gateway certs init`):
//!
//! 1. GetSandbox straight to the driver, UDS vs. mTLS TCP (interleaved);
//! 2. CreateSandbox through two gateways on the same driver, one attached
//!    by socket and one by `https://` (interleaved), which is the driver
//!    RPC plus the gateway's own work;
//! 3. reconnect: a new channel (connect, TLS handshake) plus one GetSandbox,
//!    UDS vs. mTLS TCP.
//!
//! Run: `cargo bench -p openshell-server --bench tls`. Prints medians,
//! differences and ratios; asserts nothing.

mod support;
use support::*;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use driver_lifecycle::DriverEndpoint;
use openshell_proto::compute::v1::GetSandboxRequest;
use openshell_proto::compute::v1::compute_driver_client::ComputeDriverClient;
use openshell_proto::gateway::v1::{self as gw};
use openshell_wire::tls::{ClientTls, HttpsAddr, KeyPair};
use tonic::transport::Channel;

const WARMUP: usize = 300;
const CALLS: usize = 3000;
const CREATES: usize = 400;
const RECONNECTS: usize = 300;

fn report(what: &str, uds: &mut [Duration], tls: &mut [Duration]) {
    let (u, t) = (median(uds), median(tls));
    println!(
        "{what}: UDS median {:.3} ms, mTLS TCP median {:.3} ms, added {:+.3} ms, ratio {:.2}x",
        ms(u),
        ms(t),
        ms(t) - ms(u),
        t.as_secs_f64() / u.as_secs_f64()
    );
}

async fn uds(socket: &Path) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let endpoint = DriverEndpoint::new("bench", socket);
        if let Ok(channel) =
            driver_lifecycle::connect_with(&endpoint, driver_lifecycle::DialPolicy::ONCE).await
        {
            return channel;
        }
        assert!(
            Instant::now() < deadline,
            "{} never answered",
            socket.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn tls(addr: &HttpsAddr, files: &ClientTls) -> Channel {
    openshell_wire::tls::connect(
        addr,
        files,
        driver_lifecycle::DialPolicy::within(Duration::from_secs(30)),
        None,
    )
    .await
    .expect("mTLS connect")
}

fn gateway(dir: &Path, name: &str, drivers: &str, extra: &[String]) -> Killed {
    Killed(
        Command::new(env!("CARGO_BIN_EXE_openshell-gateway"))
            .args(["--drivers", drivers])
            .arg("--state-dir")
            .arg(dir.join(format!("{name}-state")))
            .arg("--run-dir")
            .arg(dir.join(format!("{name}-run")))
            .args(["--log-level", "warn"])
            .args(extra)
            .env_remove("OPENSHELL_DRIVERS")
            .stdin(Stdio::null())
            .spawn()
            .expect("start a gateway"),
    )
}

fn create_request(name: String) -> gw::CreateSandboxRequest {
    gw::CreateSandboxRequest {
        name,
        spec: Some(gw::SandboxSpec {
            command: vec!["sleep".into(), "infinity".into()],
            ..Default::default()
        }),
        labels: HashMap::new(),
        driver: String::new(),
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

async fn run() {
    let dir = tempfile::Builder::new()
        .prefix("tlsbench")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir_in("/tmp")
        .expect("temp dir");
    let certs: PathBuf = dir.path().join("certs");
    let made = Command::new(env!("CARGO_BIN_EXE_openshell-gateway"))
        .args(["certs", "init"])
        .arg(&certs)
        .args(["--driver", "bench"])
        .output()
        .expect("certs init");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let socket = dir.path().join("driver.sock");
    let _driver = Killed(
        Command::new(openshell_test_driver::binary_path())
            .arg("--bind-socket")
            .arg(&socket)
            .args(["--allow-same-uid-peer", "--provision-delay-ms", "0"])
            .args(["--bind-tcp", &format!("127.0.0.1:{port}")])
            .arg("--tls-cert")
            .arg(certs.join("driver-bench.pem"))
            .arg("--tls-key")
            .arg(certs.join("driver-bench.key"))
            .arg("--tls-client-ca")
            .arg(certs.join("ca.pem"))
            .stdin(Stdio::null())
            .spawn()
            .expect("start the test driver"),
    );
    let addr = HttpsAddr::parse(&format!("https://127.0.0.1:{port}")).expect("address");
    let files = ClientTls {
        ca: certs.join("ca.pem"),
        identity: KeyPair {
            cert: certs.join("gateway.pem"),
            key: certs.join("gateway.key"),
        },
    };
    let mut over_uds = ComputeDriverClient::new(uds(&socket).await);
    let mut over_tls = ComputeDriverClient::new(tls(&addr, &files).await);
    println!(
        "mTLS benchmark (release build; one test driver serving UDS and TCP+mTLS on 127.0.0.1)"
    );

    // Two gateways on the same driver: by socket and by https.
    let driver_tls: Vec<String> = vec![
        "--driver-tls-ca".into(),
        certs.join("ca.pem").display().to_string(),
        "--driver-tls-cert".into(),
        certs.join("gateway.pem").display().to_string(),
        "--driver-tls-key".into(),
        certs.join("gateway.key").display().to_string(),
    ];
    let _gw_uds = gateway(
        dir.path(),
        "uds",
        &format!("bench@{}", socket.display()),
        &[],
    );
    let _gw_tls = gateway(
        dir.path(),
        "tls",
        &format!("bench@https://127.0.0.1:{port}"),
        &driver_tls,
    );
    let mut client_uds = gateway_client(&dir.path().join("uds-run").join("gateway.sock")).await;
    let mut client_tls = gateway_client(&dir.path().join("tls-run").join("gateway.sock")).await;

    // 1. GetSandbox straight to the driver.
    let probe = client_uds
        .create_sandbox(create_request("probe".into()))
        .await
        .expect("create probe")
        .into_inner()
        .sandbox
        .expect("sandbox");
    let request = GetSandboxRequest {
        sandbox_id: probe.id.clone(),
        sandbox_name: String::new(),
    };
    let (mut a, mut b) = (Vec::with_capacity(CALLS), Vec::with_capacity(CALLS));
    for i in 0..WARMUP + CALLS {
        let t = Instant::now();
        over_uds
            .get_sandbox(request.clone())
            .await
            .expect("get over UDS");
        let u = t.elapsed();
        let t = Instant::now();
        over_tls
            .get_sandbox(request.clone())
            .await
            .expect("get over mTLS");
        let s = t.elapsed();
        if i >= WARMUP {
            a.push(u);
            b.push(s);
        }
    }
    report(
        &format!("GetSandbox to the driver ({CALLS} calls each)"),
        &mut a,
        &mut b,
    );

    // 2. CreateSandbox through a gateway attached each way.
    let (mut a, mut b) = (Vec::with_capacity(CREATES), Vec::with_capacity(CREATES));
    for i in 0..CREATES {
        let t = Instant::now();
        client_uds
            .create_sandbox(create_request(format!("u{i}")))
            .await
            .expect("create via the UDS gateway");
        a.push(t.elapsed());
        let t = Instant::now();
        client_tls
            .create_sandbox(create_request(format!("t{i}")))
            .await
            .expect("create via the https gateway");
        b.push(t.elapsed());
    }
    report(
        &format!("CreateSandbox via a gateway ({CREATES} each)"),
        &mut a,
        &mut b,
    );

    // 3. Reconnect: new channel + one call.
    let (mut a, mut b) = (
        Vec::with_capacity(RECONNECTS),
        Vec::with_capacity(RECONNECTS),
    );
    for _ in 0..RECONNECTS {
        let t = Instant::now();
        ComputeDriverClient::new(uds(&socket).await)
            .get_sandbox(request.clone())
            .await
            .expect("get on a new UDS channel");
        a.push(t.elapsed());
        let t = Instant::now();
        ComputeDriverClient::new(tls(&addr, &files).await)
            .get_sandbox(request.clone())
            .await
            .expect("get on a new mTLS channel");
        b.push(t.elapsed());
    }
    report(
        &format!("reconnect + GetSandbox ({RECONNECTS} each)"),
        &mut a,
        &mut b,
    );
}
