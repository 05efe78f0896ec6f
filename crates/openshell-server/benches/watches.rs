//! A bad day for the gateway, measured: many creates at once, then many
//! public watches held open and never read. Release builds of the gateway
//! and `openshell-test-driver` (attached over a Unix socket, provision
//! delay 0).
//!
//! 1. 2000 creates, 32 in flight: create-call latency (p50, p99), create →
//!    Ready latency (seen on a watch), throughput until all are Ready;
//! 2. with those 2000 stored: gateway RSS (from /proc), threads, and
//!    create latency (one at a time) without watches;
//! 3. WATCHES watches opened over CONNECTIONS connections: RSS, threads,
//!    and, once the gateway is idle again (the watches' initial listings
//!    sent as far as they go), create latency again. Three times: held by a
//!    child process that is stopped with SIGSTOP (nothing is taken in at
//!    all; first, so its RSS is not mixed with what glibc keeps from
//!    earlier watches), held by this process and never read (its HTTP/2
//!    connections still take in what their windows allow, on the runtime
//!    the creates run on), and held and read by a child process (as 1000
//!    `openshell sandbox watch` would), with the CPU it spends reading.
//!    RSS again after each set is closed.
//!
//! Run: `cargo bench -p openshell-server --bench watches -- [WATCHES]
//! [CONNECTIONS]` (default 1000 watches, each on its own connection, as
//! 1000 `openshell sandbox watch` would be). Prints; asserts nothing.
//!
//! To compare two builds with one bench binary, `OPENSHELL_BENCH_GATEWAY`
//! names another `openshell-gateway` to run, and `OPENSHELL_BENCH_GATEWAY_ARGS`
//! adds flags to it (split at whitespace), e.g. `--watch-coalesce-ms 0`.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;
use common::rss_and_threads;
use support::*;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use openshell_proto::gateway::v1::gateway_client::GatewayClient;
use openshell_proto::gateway::v1::{self as gw, SandboxPhase};
use tokio::sync::Mutex;
use tonic::transport::Channel;

const SANDBOXES: usize = 2000;
const CONCURRENCY: usize = 32;
const LATENCY_CREATES: usize = 200;

/// CPU time (user + system) `pid` has used.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces) end with ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line, 11 and 12 here;
    // clock ticks are 100 a second on Linux.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn create_request(name: String) -> gw::CreateSandboxRequest {
    gw::CreateSandboxRequest {
        name,
        spec: Some(gw::SandboxSpec {
            command: vec!["sleep".into(), "infinity".into()],
            ..Default::default()
        }),
        labels: HashMap::from([("bench".to_owned(), "watches".to_owned())]),
        driver: String::new(),
    }
}

/// RSS once it stops growing (or after a minute).
async fn settled_rss(pid: u32) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = rss_and_threads(pid);
    let mut stable = 0;
    while stable < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = rss_and_threads(pid);
        if now.0 <= last.0 + 256 {
            stable += 1;
        } else {
            stable = 0;
        }
        last = now;
    }
    last
}

/// Waits (up to two minutes) until the gateway has been idle for a second
/// and a half (under 10% of a CPU in each half second): until held watches
/// have sent what their clients take in of the initial listings, so the
/// creates that follow measure the steady state. Returns how long that
/// took.
async fn quiet(pid: u32) -> Duration {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(120);
    let mut last = cpu_time(pid);
    let mut idle = 0;
    while idle < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = cpu_time(pid);
        if now.saturating_sub(last) < Duration::from_millis(50) {
            idle += 1;
        } else {
            idle = 0;
        }
        last = now;
    }
    start.elapsed()
}

/// Creates `count` sandboxes one at a time; prints their create-call
/// latency and the gateway's CPU time per create.
async fn sequential_creates(
    client: &mut GatewayClient<Channel>,
    pid: u32,
    prefix: &str,
    count: usize,
) {
    let cpu = cpu_time(pid);
    let own = cpu_time(std::process::id());
    let mut samples = sequential_create_calls(client, prefix, count).await;
    let cpu = cpu_time(pid).saturating_sub(cpu);
    let own = cpu_time(std::process::id()).saturating_sub(own);
    println!(
        "  create (one at a time, {count}): p50 {:.2} ms, p99 {:.2} ms; CPU per create: gateway {:.2} ms, this bench {:.2} ms",
        ms(percentile(&mut samples, 50)),
        ms(percentile(&mut samples, 99)),
        ms(cpu) / count as f64,
        ms(own) / count as f64
    );
}

async fn sequential_create_calls(
    client: &mut GatewayClient<Channel>,
    prefix: &str,
    count: usize,
) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(count);
    for i in 0..count {
        let t = Instant::now();
        client
            .create_sandbox(create_request(format!("{prefix}-{i:04}")))
            .await
            .unwrap_or_else(|e| panic!("create: {e}"));
        samples.push(t.elapsed());
    }
    samples
}

/// In the child: opens the watches, says so, then holds them, reading
/// every event when `read` (as 1000 `openshell sandbox watch` would) or
/// none (until it is stopped or killed).
async fn hold(socket: &Path, watches: usize, connections: usize, read: bool) {
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(channel(socket).await);
    }
    let mut held = Vec::with_capacity(watches);
    for i in 0..watches {
        let mut watcher = GatewayClient::new(channels[i % connections].clone());
        held.push(
            watcher
                .watch_sandboxes(gw::WatchSandboxesRequest::default())
                .await
                .expect("open a watch")
                .into_inner(),
        );
    }
    if read {
        for mut watch in held.drain(..) {
            tokio::spawn(async move { while let Ok(Some(_)) = watch.message().await {} });
        }
    }
    println!("holding");
    std::future::pending::<()>().await;
}

/// A child process of this bench holding `watches` watches of the gateway
/// on `socket` over `connections` connections, once it says it holds them.
fn holder(socket: &Path, watches: usize, connections: usize, read: bool) -> std::process::Child {
    let mode = if read { "read" } else { "hold" };
    let mut holder = Command::new(std::env::current_exe().expect("own executable"))
        .env(
            HOLDER,
            format!("{watches},{connections},{mode},{}", socket.display()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the holder");
    use std::io::BufRead as _;
    let mut line = String::new();
    std::io::BufReader::new(holder.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the holder says it holds");
    holder
}

const HOLDER: &str = "OPENSHELL_BENCH_HOLD_WATCHES";

fn main() {
    if let Ok(spec) = std::env::var(HOLDER) {
        let mut parts = spec.splitn(4, ',');
        let watches = parts.next().and_then(|n| n.parse().ok()).unwrap_or(1000);
        let connections = parts.next().and_then(|n| n.parse().ok()).unwrap_or(1000);
        let read = parts.next() == Some("read");
        let socket = PathBuf::from(parts.next().unwrap_or_default());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(hold(&socket, watches, connections, read));
        return;
    }
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let watches = args.first().copied().unwrap_or(1000);
    let connections = args
        .get(1)
        .copied()
        .unwrap_or(watches)
        .clamp(1, watches.max(1));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(watches, connections));
}

async fn run(watches: usize, connections: usize) {
    let dir = tempfile::Builder::new()
        .prefix("gwwatch")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir_in("/tmp")
        .expect("temp dir");
    let driver_socket = dir.path().join("driver.sock");
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
    channel(&driver_socket).await;
    let binary = std::env::var_os("OPENSHELL_BENCH_GATEWAY").map_or_else(
        || env!("CARGO_BIN_EXE_openshell-gateway").into(),
        PathBuf::from,
    );
    let extra = std::env::var("OPENSHELL_BENCH_GATEWAY_ARGS").unwrap_or_default();
    println!("gateway: {} {extra}", binary.display());
    let gateway = Killed(
        Command::new(binary)
            .arg("--drivers")
            .arg(format!("bench@{}", driver_socket.display()))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--run-dir")
            .arg(dir.path().join("run"))
            .args(["--log-level", "warn", "--max-watches", "100000"])
            .args(extra.split_whitespace())
            .env_remove("OPENSHELL_DRIVERS")
            .stdin(Stdio::null())
            .spawn()
            .expect("start the gateway"),
    );
    let pid = gateway.0.id();
    let mut client = gateway_client(&gateway_socket).await;
    println!(
        "openshell-gateway under load (release build, test driver attached, provision delay 0)"
    );
    let (rss, threads) = rss_and_threads(pid);
    println!("  idle gateway: RSS {:.1} MiB, {threads} threads", mib(rss));

    // 1. 2000 creates, 32 in flight.
    let mut watch = synced_watch(&mut client).await;
    let names: Vec<String> = (0..SANDBOXES).map(|i| format!("load-{i:05}")).collect();
    let wanted: HashSet<String> = names.iter().cloned().collect();
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
    let timings = Arc::new(Mutex::new(HashMap::new()));
    let begin = Instant::now();
    futures::stream::iter(names)
        .for_each_concurrent(CONCURRENCY, |name| {
            let mut client = client.clone();
            let timings = Arc::clone(&timings);
            async move {
                let t = Instant::now();
                client
                    .create_sandbox(create_request(name.clone()))
                    .await
                    .unwrap_or_else(|e| panic!("create {name}: {e}"));
                timings.lock().await.insert(name, (t, t.elapsed()));
            }
        })
        .await;
    let created = begin.elapsed();
    let (ready, all_ready) = ready_at.await.expect("watch task");
    let timings = Arc::try_unwrap(timings).expect("done").into_inner();
    let mut calls: Vec<Duration> = timings.values().map(|(_, d)| *d).collect();
    let mut to_ready: Vec<Duration> = ready
        .iter()
        .map(|(name, at)| *at - timings[name].0)
        .collect();
    let total = all_ready - begin;
    println!();
    println!("{SANDBOXES} creates, {CONCURRENCY} in flight:");
    println!(
        "  all Ready after {:.0} ms: {:.0} sandboxes/s (create calls alone: {:.0} ms, {:.0}/s)",
        ms(total),
        SANDBOXES as f64 / total.as_secs_f64(),
        ms(created),
        SANDBOXES as f64 / created.as_secs_f64()
    );
    println!(
        "  create call: p50 {:.2} ms, p99 {:.2} ms; create -> Ready: p50 {:.2} ms, p99 {:.2} ms",
        ms(percentile(&mut calls, 50)),
        ms(percentile(&mut calls, 99)),
        ms(percentile(&mut to_ready, 50)),
        ms(percentile(&mut to_ready, 99))
    );

    // 2. Without watches.
    let (rss, threads) = settled_rss(pid).await;
    println!();
    println!("{} sandboxes stored, no watches:", SANDBOXES);
    println!("  gateway RSS {:.1} MiB, {threads} threads", mib(rss));
    sequential_creates(&mut client, pid, "plain", LATENCY_CREATES).await;

    // 3. Held by a process that is then stopped: nothing is taken in at
    //    all. First, so that what it costs is measured on a gateway that has
    //    not yet served any watch (glibc keeps what earlier watches used).
    let stopped = Killed(holder(&gateway_socket, watches, connections, false));
    let holder_pid = nix::unistd::Pid::from_raw(i32::try_from(stopped.0.id()).expect("pid"));
    nix::sys::signal::kill(holder_pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    let (rss_stopped, threads_stopped) = settled_rss(pid).await;
    println!();
    println!(
        "{watches} watches over {connections} connections, held by a process stopped with SIGSTOP:"
    );
    println!(
        "  gateway RSS {:.1} MiB ({:+.1} MiB from {:.1}), {threads_stopped} threads",
        mib(rss_stopped),
        mib(rss_stopped) - mib(rss),
        mib(rss),
    );
    let quiet_after = quiet(pid).await;
    let (rss_quiet, _) = rss_and_threads(pid);
    println!(
        "  gateway quiet after {:.1} s more (listings sent as far as they go): RSS {:.1} MiB",
        quiet_after.as_secs_f64(),
        mib(rss_quiet)
    );
    sequential_creates(&mut client, pid, "stopped", LATENCY_CREATES).await;
    let (rss_stopped_after, _) = settled_rss(pid).await;
    println!(
        "  gateway RSS after those creates: {:.1} MiB",
        mib(rss_stopped_after)
    );
    drop(stopped);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_gone, threads_gone) = settled_rss(pid).await;
    println!(
        "  after the holder is killed: RSS {:.1} MiB, {threads_gone} threads",
        mib(rss_gone)
    );

    // 4. Held watches, never read.
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(channel(&gateway_socket).await);
    }
    let opened = Instant::now();
    let mut held = Vec::with_capacity(watches);
    for i in 0..watches {
        let mut watcher = GatewayClient::new(channels[i % connections].clone());
        held.push(
            watcher
                .watch_sandboxes(gw::WatchSandboxesRequest::default())
                .await
                .expect("open a watch")
                .into_inner(),
        );
    }
    let open_time = opened.elapsed();
    let (rss_held, threads_held) = settled_rss(pid).await;
    println!();
    println!(
        "{watches} watches held open and never read, over {connections} connections (opened in {:.0} ms):",
        ms(open_time)
    );
    println!(
        "  gateway RSS {:.1} MiB ({:+.1} MiB), {threads_held} threads",
        mib(rss_held),
        mib(rss_held) - mib(rss),
    );
    println!(
        "  gateway busy sending the initial listings: quiet after {:.1} s",
        quiet(pid).await.as_secs_f64()
    );
    sequential_creates(&mut client, pid, "watched", LATENCY_CREATES).await;
    let (rss_after_creates, _) = rss_and_threads(pid);
    println!(
        "  gateway RSS after those creates: {:.1} MiB",
        mib(rss_after_creates)
    );

    drop(held);
    drop(channels);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_closed, threads_closed) = settled_rss(pid).await;
    println!(
        "  after closing them: RSS {:.1} MiB, {threads_closed} threads",
        mib(rss_closed)
    );
    sequential_creates(&mut client, pid, "closed", LATENCY_CREATES).await;

    // 5. Held and read by another process, as 1000 `openshell sandbox
    //    watch` would: the creating client no longer shares a runtime with
    //    the watches' connections.
    let reader = Killed(holder(&gateway_socket, watches, connections, true));
    println!();
    println!("{watches} watches over {connections} connections, held and read by another process:");
    println!(
        "  gateway busy sending the initial listings: quiet after {:.1} s",
        quiet(pid).await.as_secs_f64()
    );
    let reader_cpu = cpu_time(reader.0.id());
    sequential_creates(&mut client, pid, "read", LATENCY_CREATES).await;
    println!(
        "  the reading process's CPU: {:.2} ms per create",
        ms(cpu_time(reader.0.id()).saturating_sub(reader_cpu)) / LATENCY_CREATES as f64
    );
    drop(reader);
}
