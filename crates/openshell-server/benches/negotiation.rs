//! What the 1.x contract costs per create. One gateway, two attached
//! release test drivers: `new` speaks 1.x (negotiated at connect, admission
//! policy confirmed before every create), `old` answers as a v0.0.111
//! driver (`--legacy-contract`). Interleaved CreateSandbox calls on each
//! give medians and their difference; a third series measures one
//! GetCapabilities round trip with gateway metadata, which is what the
//! admission re-check costs after a driver reconnects (the only time it is
//! made).
//!
//! Run: `cargo bench -p openshell-server --bench negotiation`. Prints
//! medians; asserts nothing.

mod support;
use support::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use openshell_proto::compute::v1::GetCapabilitiesRequest;
use openshell_proto::compute::v1::compute_driver_client::ComputeDriverClient;
use openshell_proto::gateway::v1::gateway_client::GatewayClient;
use openshell_proto::gateway::v1::{self as gw};
use openshell_server::drivers::remote::gateway_metadata;
use tonic::transport::Channel;

const WARMUP: usize = 100;
const CREATES: usize = 1000;
const CAPABILITY_CALLS: usize = 2000;

fn driver(socket: &Path, extra: &[&str]) -> Killed {
    Killed(
        Command::new(openshell_test_driver::binary_path())
            .arg("--bind-socket")
            .arg(socket)
            .args(["--allow-same-uid-peer", "--provision-delay-ms", "0"])
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .expect("start the test driver"),
    )
}

async fn create(client: &mut GatewayClient<Channel>, name: String, driver: &str) -> Duration {
    let request = gw::CreateSandboxRequest {
        name: name.clone(),
        spec: Some(gw::SandboxSpec {
            command: vec!["sleep".into(), "infinity".into()],
            ..Default::default()
        }),
        labels: Default::default(),
        driver: driver.to_owned(),
    };
    let t = Instant::now();
    client
        .create_sandbox(request)
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e}"));
    t.elapsed()
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
        .prefix("negbench")
        .tempdir_in("/tmp")
        .expect("temp dir");
    // Drivers keep sockets only in a private (0700) directory.
    let sockets = dir.path().join("drivers");
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
        .create(&sockets)
        .expect("socket dir");
    let new_socket: PathBuf = sockets.join("new.sock");
    let old_socket: PathBuf = sockets.join("old.sock");
    let _new = driver(&new_socket, &[]);
    let _old = driver(&old_socket, &["--legacy-contract"]);
    let mut direct = ComputeDriverClient::new(channel(&new_socket).await);
    channel(&old_socket).await;
    let gateway_socket = dir.path().join("run").join("gateway.sock");
    let _gateway = Killed(
        Command::new(env!("CARGO_BIN_EXE_openshell-gateway"))
            .arg("--drivers")
            .arg(format!(
                "new@{},old@{}",
                new_socket.display(),
                old_socket.display()
            ))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--run-dir")
            .arg(dir.path().join("run"))
            .args(["--log-level", "warn"])
            .env_remove("OPENSHELL_DRIVERS")
            .stdin(Stdio::null())
            .spawn()
            .expect("start the gateway"),
    );
    let mut client = gateway_client(&gateway_socket).await;
    let info = client
        .get_gateway_info(gw::GetGatewayInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    for d in &info.drivers {
        let contract = d.capabilities.as_ref().map_or("?", |c| c.contract.as_str());
        println!("driver {}: contract {contract}", d.name);
    }

    let mut new = Vec::with_capacity(CREATES);
    let mut old = Vec::with_capacity(CREATES);
    for i in 0..WARMUP + CREATES {
        let a = create(&mut client, format!("n{i}"), "new").await;
        let b = create(&mut client, format!("o{i}"), "old").await;
        if i >= WARMUP {
            new.push(a);
            old.push(b);
        }
    }
    let (n50, o50) = (median(&mut new), median(&mut old));
    println!();
    println!(
        "CreateSandbox (returns once the driver accepted it), {CREATES} interleaved calls each after {WARMUP} warm-up:"
    );
    println!(
        "  1.x driver (negotiated, admission confirmed) : median {:.3} ms",
        ms(n50)
    );
    println!(
        "  v0.0.111 driver                              : median {:.3} ms",
        ms(o50)
    );
    println!(
        "  difference {:+.3} ms, ratio {:.2}",
        ms(n50) - ms(o50),
        n50.as_secs_f64() / o50.as_secs_f64()
    );

    let mut caps = Vec::with_capacity(CAPABILITY_CALLS);
    for i in 0..WARMUP + CAPABILITY_CALLS {
        let t = Instant::now();
        direct
            .get_capabilities(GetCapabilitiesRequest {
                gateway: Some(gateway_metadata()),
            })
            .await
            .expect("capabilities");
        if i >= WARMUP {
            caps.push(t.elapsed());
        }
    }
    println!();
    println!(
        "GetCapabilities with gateway metadata (the admission re-check after a reconnect), {CAPABILITY_CALLS} calls: median {:.3} ms",
        ms(median(&mut caps))
    );
}
