//! Gateway overhead and scale, against a release `openshell-test-driver`
//! attached over a Unix socket:
//!
//! 1. GetSandbox through the gateway vs. GetSandbox straight to the driver
//!    (interleaved calls; medians, ratio and difference);
//! 2. CreateSandbox → Ready throughput and latency (16 creates in flight,
//!    Ready observed on a WatchSandboxes stream);
//! 3. ListSandboxes with 10,000 stored sandboxes (one page of 100, one of
//!    1000, a label-filtered page, and a full walk in pages of 1000).
//!
//! Run: `cargo bench -p openshell-server --bench gateway`. Prints medians;
//! asserts nothing.

mod support;
use support::*;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use openshell_proto::compute::v1::GetSandboxRequest;
use openshell_proto::compute::v1::compute_driver_client::ComputeDriverClient;
use openshell_proto::gateway::v1::gateway_client::GatewayClient;
use openshell_proto::gateway::v1::{self as gw, SandboxPhase};
use tokio::sync::Mutex;
use tonic::transport::Channel;

const GET_WARMUP: usize = 500;
const GET_CALLS: usize = 5000;
const THROUGHPUT_SANDBOXES: usize = 1000;
const CONCURRENCY: usize = 16;
const STORED: usize = 10_000;

fn create_request(name: String) -> gw::CreateSandboxRequest {
    let mut labels = HashMap::new();
    labels.insert("bench".to_owned(), "yes".to_owned());
    gw::CreateSandboxRequest {
        name,
        spec: Some(gw::SandboxSpec {
            command: vec!["sleep".into(), "infinity".into()],
            ..Default::default()
        }),
        labels,
        driver: String::new(),
    }
}

/// Creates `names` with `CONCURRENCY` in flight; returns each create's
/// start time by name.
async fn create_all(
    client: &GatewayClient<Channel>,
    names: Vec<String>,
) -> HashMap<String, Instant> {
    let started = Arc::new(Mutex::new(HashMap::new()));
    futures::stream::iter(names)
        .for_each_concurrent(CONCURRENCY, |name| {
            let mut client = client.clone();
            let started = Arc::clone(&started);
            async move {
                let mut request = create_request(name.clone());
                if name.ends_with("00") {
                    request.labels.insert("tier".into(), "gold".into());
                }
                started.lock().await.insert(name.clone(), Instant::now());
                client
                    .create_sandbox(request)
                    .await
                    .unwrap_or_else(|e| panic!("create {name}: {e}"));
            }
        })
        .await;
    Arc::try_unwrap(started)
        .expect("all creates done")
        .into_inner()
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
        .prefix("gwbench")
        .tempdir_in("/tmp")
        .expect("temp dir");
    // Drivers keep sockets only in a private (0700) directory.
    let sockets = dir.path().join("driver");
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
        .create(&sockets)
        .expect("socket dir");
    let driver_socket: PathBuf = sockets.join("driver.sock");
    let gateway_socket = dir.path().join("run").join("gateway.sock");
    let _driver = Killed(
        Command::new(openshell_test_driver::binary_path())
            .arg("--bind-socket")
            .arg(&driver_socket)
            .args(["--allow-same-uid-peer", "--provision-delay-ms", "0"])
            .stdin(Stdio::null())
            .spawn()
            .expect("start the test driver"),
    );
    let mut driver = ComputeDriverClient::new(channel(&driver_socket).await);
    let _gateway = Killed(
        Command::new(env!("CARGO_BIN_EXE_openshell-gateway"))
            .arg("--drivers")
            .arg(format!("bench@{}", driver_socket.display()))
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
    println!(
        "openshell-gateway benchmark (release build, test driver attached over a Unix socket)"
    );

    // 1. GetSandbox: gateway vs. driver.
    let probe = client
        .create_sandbox(create_request("probe".into()))
        .await
        .expect("create probe")
        .into_inner()
        .sandbox
        .expect("sandbox");
    let get_gateway = gw::GetSandboxRequest {
        sandbox: Some(gw::SandboxRef {
            name: "probe".into(),
            id: String::new(),
        }),
    };
    let get_driver = GetSandboxRequest {
        sandbox_id: probe.id.clone(),
        sandbox_name: String::new(),
    };
    let mut via_gateway = Vec::with_capacity(GET_CALLS);
    let mut direct = Vec::with_capacity(GET_CALLS);
    for i in 0..GET_WARMUP + GET_CALLS {
        let t = Instant::now();
        client
            .get_sandbox(get_gateway.clone())
            .await
            .expect("gateway get");
        let g = t.elapsed();
        let t = Instant::now();
        driver
            .get_sandbox(get_driver.clone())
            .await
            .expect("driver get");
        let d = t.elapsed();
        if i >= GET_WARMUP {
            via_gateway.push(g);
            direct.push(d);
        }
    }
    let (g50, g90, g99) = (
        median(&mut via_gateway),
        percentile(&mut via_gateway, 90),
        percentile(&mut via_gateway, 99),
    );
    let (d50, d90, d99) = (
        median(&mut direct),
        percentile(&mut direct, 90),
        percentile(&mut direct, 99),
    );
    println!();
    println!("GetSandbox, {GET_CALLS} interleaved calls each after {GET_WARMUP} warm-up:");
    println!(
        "  through the gateway : median {:.3} ms, p90 {:.3} ms, p99 {:.3} ms",
        ms(g50),
        ms(g90),
        ms(g99)
    );
    println!(
        "  straight to driver  : median {:.3} ms, p90 {:.3} ms, p99 {:.3} ms",
        ms(d50),
        ms(d90),
        ms(d99)
    );
    println!(
        "  ratio gateway/driver: {:.2}; the gateway adds {:.3} ms at the median (target <= 0.5 ms)",
        g50.as_secs_f64() / d50.as_secs_f64(),
        ms(g50.saturating_sub(d50))
    );

    // 2. CreateSandbox -> Ready.
    let mut watch = synced_watch(&mut client).await;
    let names: Vec<String> = (0..THROUGHPUT_SANDBOXES)
        .map(|i| format!("t{i:05}"))
        .collect();
    let wanted: std::collections::HashSet<String> = names.iter().cloned().collect();
    let ready_at = tokio::spawn(async move {
        let mut ready: HashMap<String, Instant> = HashMap::new();
        while ready.len() < wanted.len() {
            let event = watch.message().await.expect("watch").expect("watch open");
            if let Some(gw::watch_sandboxes_event::Payload::Sandbox(s)) = event.payload
                && s.phase == SandboxPhase::Ready as i32
                && wanted.contains(&s.name)
            {
                ready.entry(s.name).or_insert_with(Instant::now);
            }
        }
        (ready, Instant::now())
    });
    let begin = Instant::now();
    let started = create_all(&client, names).await;
    let created = begin.elapsed();
    let (ready, all_ready) = ready_at.await.expect("watch task");
    let total = all_ready - begin;
    let mut latencies: Vec<Duration> = ready.iter().map(|(name, at)| *at - started[name]).collect();
    println!();
    println!(
        "CreateSandbox -> Ready, {THROUGHPUT_SANDBOXES} sandboxes, {CONCURRENCY} creates in flight (driver provision delay 0):"
    );
    println!(
        "  all Ready after {:.0} ms: {:.0} sandboxes/s (creates alone: {:.0} ms, {:.0}/s)",
        ms(total),
        THROUGHPUT_SANDBOXES as f64 / total.as_secs_f64(),
        ms(created),
        THROUGHPUT_SANDBOXES as f64 / created.as_secs_f64()
    );
    println!(
        "  create -> Ready per sandbox: median {:.2} ms, p90 {:.2} ms",
        ms(median(&mut latencies)),
        ms(percentile(&mut latencies, 90))
    );

    // 3. ListSandboxes with 10,000 stored.
    let have = THROUGHPUT_SANDBOXES + 1;
    let fill: Vec<String> = (have..STORED).map(|i| format!("f{i:05}")).collect();
    let fill_begin = Instant::now();
    create_all(&client, fill).await;
    let stored = client
        .list_sandboxes(gw::ListSandboxesRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert!(!stored.next_page_token.is_empty());
    println!();
    println!(
        "ListSandboxes with {STORED} stored sandboxes (filled in {:.1} s):",
        fill_begin.elapsed().as_secs_f64()
    );
    let mut measure =
        async |label: &str, runs: usize, request: gw::ListSandboxesRequest, walk: bool| {
            let mut samples = Vec::with_capacity(runs);
            let mut count = 0;
            for _ in 0..runs + 3 {
                let t = Instant::now();
                let mut request = request.clone();
                count = 0;
                loop {
                    let page = client
                        .list_sandboxes(request.clone())
                        .await
                        .expect("list")
                        .into_inner();
                    count += page.sandboxes.len();
                    if !walk || page.next_page_token.is_empty() {
                        break;
                    }
                    request.page_token = page.next_page_token;
                }
                samples.push(t.elapsed());
            }
            let mut samples = samples.split_off(3);
            println!(
                "  {label:<38}: median {:.2} ms, p90 {:.2} ms ({count} sandboxes, {runs} runs)",
                ms(median(&mut samples)),
                ms(percentile(&mut samples, 90))
            );
        };
    measure(
        "one page of 100 (default)",
        200,
        gw::ListSandboxesRequest::default(),
        false,
    )
    .await;
    measure(
        "one page of 1000 (the maximum)",
        50,
        gw::ListSandboxesRequest {
            page_size: 1000,
            ..Default::default()
        },
        false,
    )
    .await;
    let mut gold = gw::ListSandboxesRequest {
        page_size: 1000,
        ..Default::default()
    };
    gold.labels.insert("tier".into(), "gold".into());
    measure("label-filtered (1 in 100 match)", 50, gold, false).await;
    measure(
        "all 10,000, pages of 1000",
        10,
        gw::ListSandboxesRequest {
            page_size: 1000,
            ..Default::default()
        },
        true,
    )
    .await;
}
