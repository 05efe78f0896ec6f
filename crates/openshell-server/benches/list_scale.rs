//! 50,000 sandboxes on one driver: how long the gateway takes to start
//! (it lists the driver's whole inventory and reconciles it before
//! serving), and how long `openshell sandbox list` takes to list them all,
//! with its peak RSS. Release builds; `openshell-test-driver --preload N`
//! attached over a Unix socket, and the gateway's rows for those sandboxes
//! written to its database before it starts.
//!
//! Run: `cargo bench -p openshell-server --bench list_scale -- [N]`
//! (default 50000). Prints; asserts nothing.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;
use common::{preload_rows, status_field};
use support::*;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use driver_lifecycle::DriverEndpoint;
use openshell_proto::gateway::v1::gateway_client::GatewayClient;
use openshell_proto::gateway::v1::{self as gw};

async fn serving(socket: &Path, gateway: &mut Child) -> GatewayClient<tonic::transport::Channel> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        assert!(
            gateway.try_wait().expect("try_wait").is_none(),
            "the gateway exited"
        );
        let endpoint = DriverEndpoint::new("bench", socket);
        if let Ok(channel) =
            driver_lifecycle::connect_with(&endpoint, driver_lifecycle::DialPolicy::ONCE).await
        {
            let mut client = GatewayClient::new(channel);
            if client
                .get_gateway_info(gw::GetGatewayInfoRequest {})
                .await
                .is_ok()
            {
                return client;
            }
        }
        assert!(Instant::now() < deadline, "the gateway never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the CLI once: wall time, and its peak RSS (KiB, from wait4's
/// rusage of the one child waited for).
fn timed_cli(socket: &Path, args: &[&str]) -> (Duration, u64, usize) {
    let cli = openshell_test_driver::workspace_binary("openshell-cli", "openshell");
    let started = Instant::now();
    let child = Command::new("/usr/bin/time")
        .args(["-f", "%M"])
        .arg(cli)
        .arg("--gateway")
        .arg(format!("unix://{}", socket.display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run openshell under /usr/bin/time");
    let out = child.wait_with_output().expect("wait for openshell");
    let elapsed = started.elapsed();
    assert!(
        out.status.success(),
        "openshell failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let peak = String::from_utf8_lossy(&out.stderr)
        .lines()
        .last()
        .and_then(|l| l.trim().parse::<u64>().ok())
        .unwrap_or(0);
    (elapsed, peak, out.stdout.len())
}

fn main() {
    let count = std::env::args()
        .skip(1)
        .find_map(|a| a.parse::<usize>().ok())
        .unwrap_or(50_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(count));
}

async fn run(count: usize) {
    let dir = tempfile::Builder::new()
        .prefix("gwlist")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir_in("/tmp")
        .expect("temp dir");
    let state = dir.path().join("state");
    let driver_socket = dir.path().join("driver.sock");
    let gateway_socket = dir.path().join("run").join("gateway.sock");
    let t = Instant::now();
    preload_rows(&state, "bench", count);
    let rows_took = t.elapsed();
    let _driver = Killed(
        Command::new(openshell_test_driver::binary_path())
            .arg("--bind-socket")
            .arg(&driver_socket)
            .args(["--allow-same-uid-peer", "--provision-delay-ms", "0"])
            .args(["--preload", &count.to_string()])
            .stdin(Stdio::null())
            .spawn()
            .expect("start the test driver"),
    );
    let begin = Instant::now();
    let mut gateway = Killed(
        Command::new(env!("CARGO_BIN_EXE_openshell-gateway"))
            .arg("--drivers")
            .arg(format!("bench@{}", driver_socket.display()))
            .arg("--state-dir")
            .arg(&state)
            .arg("--run-dir")
            .arg(dir.path().join("run"))
            .args(["--log-level", "warn"])
            .env_remove("OPENSHELL_DRIVERS")
            .stdin(Stdio::null())
            .spawn()
            .expect("start the gateway"),
    );
    let pid = gateway.0.id();
    let mut client = serving(&gateway_socket, &mut gateway.0).await;
    let started = begin.elapsed();
    let info = client
        .get_gateway_info(gw::GetGatewayInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    let state_of = info.drivers.first().map_or(0, |d| d.state);
    println!(
        "{count} sandboxes on one driver (release builds; rows written in {:.1} s)",
        rows_took.as_secs_f64()
    );
    println!(
        "  gateway start -> serving (lists and reconciles all of them first): {:.2} s; driver state {}; gateway RSS {:.1} MiB (peak {:.1} MiB)",
        started.as_secs_f64(),
        if state_of == gw::DriverState::Ready as i32 {
            "READY"
        } else {
            "NOT READY"
        },
        status_field(pid, "VmRSS:") as f64 / 1024.0,
        status_field(pid, "VmHWM:") as f64 / 1024.0
    );
    for (label, args) in [
        ("openshell sandbox list", &["sandbox", "list"][..]),
        (
            "openshell -o json sandbox list",
            &["-o", "json", "sandbox", "list"][..],
        ),
    ] {
        let mut times = Vec::new();
        let mut peak = 0;
        let mut bytes = 0;
        for _ in 0..3 {
            let (took, rss, out) = timed_cli(&gateway_socket, args);
            times.push(took);
            peak = peak.max(rss);
            bytes = out;
        }
        times.sort_unstable();
        println!(
            "  {label:<32}: median {:.2} s (runs: {}), CLI peak RSS {:.1} MiB, {:.1} MB printed",
            times[1].as_secs_f64(),
            times
                .iter()
                .map(|t| format!("{:.2}", t.as_secs_f64()))
                .collect::<Vec<_>>()
                .join(", "),
            peak as f64 / 1024.0,
            bytes as f64 / 1e6
        );
    }
    println!(
        "  gateway RSS after listing: {:.1} MiB (peak {:.1} MiB)",
        status_field(pid, "VmRSS:") as f64 / 1024.0,
        status_field(pid, "VmHWM:") as f64 / 1024.0
    );
}
