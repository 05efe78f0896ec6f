//! Create→running and delete through the driver, against the same work
//! done with the podman CLI directly.
//!
//! `cargo bench -p openshell-driver-podman --bench lifecycle [-- ITERATIONS]`
//!
//! Needs Podman; without it the bench prints why and exits 0.

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{IMAGE, LONG, Standalone, ULIMITS, base_args, ready_true, sandbox, unique};
use openshell_proto::compute::v1::{CreateSandboxRequest, DeleteSandboxRequest};

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort_unstable();
    values[values.len() / 2]
}

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
        "{label:<44} median {:>8.1} ms   p10 {:>8.1} ms   p90 {:>8.1} ms   (n={})",
        ms(m),
        ms(percentile(values.to_vec(), 10)),
        ms(percentile(values.to_vec(), 90)),
        values.len()
    );
    m
}

/// `podman [--remote --url U] --runtime runc --cgroup-manager cgroupfs run -d ...`
fn podman_run(engine: Option<&common::TestEngine>, label: &str) -> (Duration, String) {
    let mut command = match engine {
        Some(engine) => engine.remote(),
        None => {
            let mut c = Command::new("podman");
            c.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
            c
        }
    };
    command.args(["run", "-d", "--network", "bridge", "--label", label]);
    for limit in ULIMITS {
        command.args(["--ulimit", limit]);
    }
    command.arg(IMAGE).args(LONG);
    let started = Instant::now();
    let output = command.output().expect("podman runs");
    let elapsed = started.elapsed();
    assert!(
        output.status.success(),
        "podman run failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    (
        elapsed,
        String::from_utf8_lossy(&output.stdout).trim().to_owned(),
    )
}

fn podman_rm(engine: Option<&common::TestEngine>, id: &str) -> Duration {
    let mut command = match engine {
        Some(engine) => engine.remote(),
        None => Command::new("podman"),
    };
    command.args(["rm", "-f", "-t", "0", id]);
    let started = Instant::now();
    let output = command.output().expect("podman runs");
    assert!(output.status.success(), "podman rm failed");
    started.elapsed()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let iterations: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(20);
    let engine = match common::TestEngine::start() {
        Ok(engine) => engine,
        Err(reason) => {
            println!("skipped: {reason}");
            return;
        }
    };
    let instance = unique("bench");
    let run = unique("benchrun");
    let label = format!("openshell-bench.run={run}");
    engine.clean_up_instance(&instance);
    engine.clean_up_label(label.clone());
    let dir = tempfile::tempdir().expect("temp dir");
    let mut args = base_args(&engine, &instance, &dir.path().join("state"));
    args.extend(["--network".to_owned(), "bridge".to_owned()]);
    let driver = Standalone::start(dir.path(), &args).await;
    let mut client = driver.client().await;

    let mut driver_create = Vec::new();
    let mut driver_delete = Vec::new();
    let mut cli_run = Vec::new();
    let mut cli_rm = Vec::new();
    let mut remote_run = Vec::new();
    let mut remote_rm = Vec::new();

    let warmup = 3;
    for i in 0..warmup + iterations {
        let record = i >= warmup;

        let request = sandbox("bench", &LONG);
        let started = Instant::now();
        client
            .create_sandbox(CreateSandboxRequest {
                sandbox: Some(request.clone()),
            })
            .await
            .expect("create");
        loop {
            let observed = common::get(&mut client, &request.id).await.expect("get");
            if ready_true(&observed) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let created = started.elapsed();
        let started = Instant::now();
        let deleted = client
            .delete_sandbox(DeleteSandboxRequest {
                sandbox_id: request.id.clone(),
                sandbox_name: String::new(),
            })
            .await
            .expect("delete")
            .into_inner()
            .deleted;
        assert!(deleted);
        let removed = started.elapsed();

        let (run_time, id) = podman_run(None, &label);
        let rm_time = podman_rm(None, &id);
        let (remote_time, remote_id) = podman_run(Some(&engine), &label);
        let remote_rm_time = podman_rm(Some(&engine), &remote_id);

        if record {
            driver_create.push(created);
            driver_delete.push(removed);
            cli_run.push(run_time);
            cli_rm.push(rm_time);
            remote_run.push(remote_time);
            remote_rm.push(remote_rm_time);
        }
    }

    println!(
        "podman driver lifecycle, {iterations} interleaved iterations after {warmup} warm-up rounds"
    );
    let through_driver = report("create -> running, through the driver", &driver_create);
    let direct = report("`podman run -d` (CLI, same image and limits)", &cli_run);
    let remote = report("`podman --remote run -d` (same service)", &remote_run);
    let delete = report("delete, through the driver", &driver_delete);
    let rm = report("`podman rm -f -t 0` (CLI)", &cli_rm);
    report("`podman --remote rm -f -t 0` (same service)", &remote_rm);
    let ratio = through_driver.as_secs_f64() / direct.as_secs_f64();
    println!(
        "ratio create->running driver / `podman run -d`: {ratio:.2} (target <= 1.3: {})",
        if ratio <= 1.3 { "met" } else { "NOT met" }
    );
    println!(
        "ratio driver / `podman --remote run -d`: {:.2}",
        through_driver.as_secs_f64() / remote.as_secs_f64()
    );
    println!(
        "ratio delete driver / `podman rm -f`: {:.2}",
        delete.as_secs_f64() / rm.as_secs_f64()
    );
    drop(client);
    drop(driver);
    drop(engine);
}
