//! Spawn→ready and shutdown times of a managed driver, with the test driver
//! as the peer: the ready-fd handshake against socket polling.
//!
//! `cargo bench -p driver-lifecycle --bench spawn_ready [-- ITERATIONS]`

use std::time::{Duration, Instant};

use driver_lifecycle::{
    DriverCommand, DriverEndpoint, DriverGuard, ManagedDriverProcess, Readiness, SpawnOptions,
};

struct Sample {
    ready: Duration,
    shutdown: Duration,
}

async fn one(readiness: Readiness, args: &[&str], dir: &std::path::Path) -> Sample {
    let endpoint = DriverEndpoint::new("bench", dir.join("run").join("driver.sock"));
    let command =
        DriverCommand::new(openshell_test_driver::binary_path()).args(args.iter().copied());
    let options = SpawnOptions {
        readiness,
        forward_output: false,
        ..SpawnOptions::default()
    };
    let started = Instant::now();
    let guard = ManagedDriverProcess::spawn(&endpoint, command, options)
        .await
        .expect("driver starts");
    let ready = started.elapsed();
    let started = Instant::now();
    DriverGuard::Managed(guard)
        .shutdown()
        .await
        .expect("driver stops");
    Sample {
        ready,
        shutdown: started.elapsed(),
    }
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort_unstable();
    values[values.len() / 2]
}

/// Nearest-rank percentile, `pct` in 0..=100.
fn percentile(mut values: Vec<Duration>, pct: usize) -> Duration {
    values.sort_unstable();
    values[(values.len() - 1) * pct / 100]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn report(label: &str, values: &[Duration]) -> Duration {
    let m = median(values.to_vec());
    println!(
        "{label:<34} median {:>7.2} ms   p10 {:>7.2} ms   p90 {:>7.2} ms   (n={})",
        ms(m),
        ms(percentile(values.to_vec(), 10)),
        ms(percentile(values.to_vec(), 90)),
        values.len()
    );
    m
}

fn main() {
    let iterations: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(40);
    // Build (or find) the peer before timing anything.
    let binary = openshell_test_driver::binary_path();
    println!("peer: {}", binary.display());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let tmp = tempfile::tempdir().expect("tempdir");

    runtime.block_on(async {
        // Warm the page cache and the dynamic loader.
        for _ in 0..3 {
            one(Readiness::ReadyFd, &[], tmp.path()).await;
        }
        let mut fd = Vec::new();
        let mut poll = Vec::new();
        // Interleave the two modes so drift on a shared machine hits both.
        for _ in 0..iterations {
            fd.push(one(Readiness::ReadyFd, &[], tmp.path()).await);
            poll.push(one(Readiness::PollGrpc, &["--ignore-ready-fd"], tmp.path()).await);
        }
        println!();
        let fd_ready = report(
            "spawn→ready, ready fd",
            &fd.iter().map(|s| s.ready).collect::<Vec<_>>(),
        );
        let poll_ready = report(
            "spawn→ready, polling (1 ms backoff)",
            &poll.iter().map(|s| s.ready).collect::<Vec<_>>(),
        );
        let shutdown = report(
            "shutdown (SIGTERM → group gone)",
            &fd.iter()
                .chain(&poll)
                .map(|s| s.shutdown)
                .collect::<Vec<_>>(),
        );
        println!();
        println!(
            "ratio polling / ready fd (median): {:.2}",
            poll_ready.as_secs_f64() / fd_ready.as_secs_f64()
        );
        println!(
            "target: ready-fd spawn→ready median ≤ 15 ms: {} ({:.2} ms)",
            if fd_ready <= Duration::from_millis(15) {
                "met"
            } else {
                "MISSED"
            },
            ms(fd_ready)
        );
        println!("shutdown median: {:.2} ms", ms(shutdown));
    });
}
