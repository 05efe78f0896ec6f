//! VM driver benchmark: `cargo bench -p openshell-driver-vm --bench vmm`.
//!
//! Measured on any host where libkrun can create a VM (including PVM hosts,
//! with `--allow-unsupported-host` and fake kernels):
//! - VMM child spawn → `krun_start_enter` (the child's own timestamps);
//! - create → BootFailed, the whole host-side round trip of a VM whose
//!   guest fails at its first instruction;
//! - VMM child RSS without guest RAM, while its vCPU runs.
//!
//! Measured where a guest can boot, with the backend `hypervisor = auto`
//! picks (libkrun on hardware KVM, else QEMU; TCG where KVM is not usable)
//! and a guest kernel:
//! - create → Running (the guest reached its root filesystem);
//! - create → guest command exited;
//! - RSS of the processes a running sandbox adds, without guest RAM: the
//!   VMM child and, under QEMU, QEMU and passt.
//!
//! Prints medians, p10/p90 and ratios; asserts nothing about time.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Driver, FakeKernel, Watch, busybox_rootfs, ready_reason, sandbox, write_fake_kernel};
use openshell_driver_vm::preflight::{HostPaths, HostReport, KvmProblem};
use openshell_proto::compute::v1::DeleteSandboxRequest;

const ITERATIONS: usize = 20;
const RSS_SAMPLES: usize = 8;
/// Real boots timed (after one warm-up), and real boots sampled for RSS.
const BOOTS: usize = 10;
const RSS_BOOTS: usize = 4;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * (sorted.len() - 1) as f64).round();
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a rounded rank between 0 and len - 1"
    )]
    let index = rank as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Prints one row and returns the median.
fn report(name: &str, unit: &str, mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let median = percentile(&values, 0.5);
    println!(
        "| {name} | {median:.2} {unit} | {:.2} {unit} | {:.2} {unit} | {} |",
        percentile(&values, 0.1),
        percentile(&values, 0.9),
        values.len()
    );
    median
}

/// RSS of `pid` in KiB, leaving out guest RAM: anonymous mappings of at
/// least 64 MiB (libkrun maps guest memory as one anonymous region per
/// memory range; nothing else in the VMM is that large).
fn rss_without_guest_kib(pid: u32) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut total = 0_u64;
    let mut guest = false;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        {
            let path = line.split_whitespace().nth(5);
            guest = path.is_none() && end.saturating_sub(start) >= 64 << 20;
        } else if first == "Rss:" && !guest {
            total += words.next()?.parse::<u64>().ok()?;
        }
    }
    Some(total)
}

async fn delete(driver: &mut Driver, id: &str) {
    driver
        .client
        .delete_sandbox(DeleteSandboxRequest {
            sandbox_id: id.to_owned(),
            sandbox_name: String::new(),
        })
        .await
        .expect("delete");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let report_host = HostReport::check(&HostPaths::system(), None);
    let tmp = tempfile::tempdir().expect("tempdir");
    let Some(rootfs) = busybox_rootfs(&tmp.path().join("rootfs")) else {
        println!("skipped: no static busybox on this host (install busybox-static)");
        return;
    };
    let image = format!("rootfs:{}", rootfs.display());
    println!("| measurement | median | p10 | p90 | n |");
    println!("|---|---|---|---|---|");
    let enter = match &report_host.kvm {
        Err(problem) if !matches!(problem, KvmProblem::Pvm { .. }) => {
            println!("skipped: libkrun cannot create a VM on this host: {problem}");
            None
        }
        _ => Some(libkrun_host_side(tmp.path(), &image).await),
    };
    real_boots(&report_host, tmp.path(), &image, enter).await;
}

/// The libkrun host side with fake kernels; returns the median spawn →
/// `krun_start_enter` in ms.
async fn libkrun_host_side(tmp: &std::path::Path, image: &str) -> f64 {
    let failing = tmp.join("vmlinux-fail");
    let spinning = tmp.join("vmlinux-spin");
    write_fake_kernel(&failing, FakeKernel::Fail);
    write_fake_kernel(&spinning, FakeKernel::Spin);

    // Host-side path with a guest that fails at once.
    let args = |kernel: &std::path::Path| {
        vec![
            // `auto` would pick QEMU on a PVM host.
            "--hypervisor=libkrun".to_owned(),
            "--kernel".to_owned(),
            kernel.display().to_string(),
            "--allow-unsupported-host".to_owned(),
            "--mem-mib".to_owned(),
            "256".to_owned(),
        ]
    };
    let mut driver = Driver::start(&tmp.join("a"), &args(&failing)).await;
    let mut spawn_to_enter = Vec::new();
    let mut round_trip = Vec::new();
    for i in 0..ITERATIONS + 2 {
        let id = format!("bench-{i}");
        let mut watch = Watch::open(&mut driver.client).await;
        let started = Instant::now();
        driver
            .create(sandbox(&id, image, &[]))
            .await
            .expect("create");
        let event = watch.platform(&id, "VmmStarted").await;
        watch
            .sandbox(&id, "BootFailed", |s| ready_reason(s) == "BootFailed")
            .await;
        let elapsed = started.elapsed();
        delete(&mut driver, &id).await;
        if i < 2 {
            continue; // warm-up
        }
        let micros = common::metadata_u64(&event.metadata, "spawn_to_enter_us").expect("timing");
        spawn_to_enter.push(micros as f64 / 1000.0);
        round_trip.push(elapsed.as_secs_f64() * 1000.0);
    }
    driver.shutdown().await;
    let enter = report("VMM child spawn → krun_start_enter", "ms", spawn_to_enter);
    let trip = report(
        "create → BootFailed (fake kernel fails at its first instruction)",
        "ms",
        round_trip,
    );

    // VMM overhead while the vCPU runs.
    let mut driver = Driver::start(&tmp.join("b"), &args(&spinning)).await;
    let mut rss = Vec::new();
    for i in 0..RSS_SAMPLES {
        let id = format!("rss-{i}");
        let mut watch = Watch::open(&mut driver.client).await;
        driver
            .create(sandbox(&id, image, &[]))
            .await
            .expect("create");
        let pid = common::vmm_pid(&watch.platform(&id, "VmmStarted").await);
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Some(kib) = rss_without_guest_kib(pid) {
            rss.push(kib as f64 / 1024.0);
        }
        delete(&mut driver, &id).await;
    }
    driver.shutdown().await;
    let rss = report(
        "VMM child RSS without guest RAM (256 MiB guest, vCPU running)",
        "MiB",
        rss,
    );

    println!();
    println!("ratio create→BootFailed / spawn→enter: {:.1}", trip / enter);
    println!("VMM overhead {rss:.1} MiB against a 5–15 MiB budget per VMM child");
    enter
}

/// The pids of the live children of `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                // The fields after the command name, which is in brackets.
                stat.rsplit_once(") ")
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(parent)
            })
        })
        .collect()
}

fn command_name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Boots real guests with the backend `hypervisor = auto` picks here.
async fn real_boots(
    report_host: &HostReport,
    tmp: &std::path::Path,
    image: &str,
    enter: Option<f64>,
) {
    if let Some(problem) = report_host.blocker(false) {
        println!(
            "skipped: create → Running and create → exited need a bootable guest; this host: \
             {problem}"
        );
        return;
    }
    println!();
    println!("booting with {}", report_host.platform_label());
    println!("| measurement | median | p10 | p90 | n |");
    println!("|---|---|---|---|---|");
    let mut driver =
        Driver::start(&tmp.join("c"), &["--mem-mib".to_owned(), "256".to_owned()]).await;
    let mut to_running = Vec::new();
    let mut to_exit = Vec::new();
    for i in 0..BOOTS + 1 {
        let id = format!("boot-{i}");
        let mut watch = Watch::open(&mut driver.client).await;
        let started = Instant::now();
        driver
            .create(sandbox(&id, image, &["/bin/true"]))
            .await
            .expect("create");
        watch.platform(&id, "GuestBooted").await;
        let running = started.elapsed();
        watch
            .sandbox(&id, "Exited", |s| ready_reason(s) == "Exited")
            .await;
        let exited = started.elapsed();
        delete(&mut driver, &id).await;
        if i == 0 {
            continue; // warm-up
        }
        to_running.push(running.as_secs_f64() * 1000.0);
        to_exit.push(exited.as_secs_f64() * 1000.0);
    }
    let running = report(
        "create → Running (guest reached its root)",
        "ms",
        to_running,
    );
    let exited = report("create → Exited (`/bin/true`)", "ms", to_exit);

    // What a running sandbox costs the host besides guest RAM.
    let mut vmm = Vec::new();
    let mut helpers: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for i in 0..RSS_BOOTS {
        let id = format!("rss-boot-{i}");
        let mut watch = Watch::open(&mut driver.client).await;
        driver
            .create(sandbox(&id, image, &["sleep", "3600"]))
            .await
            .expect("create");
        let pid = common::vmm_pid(&watch.platform(&id, "VmmStarted").await);
        watch.platform(&id, "GuestBooted").await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        if let Some(kib) = rss_without_guest_kib(pid) {
            vmm.push(kib as f64 / 1024.0);
        }
        for child in children_of(pid) {
            if let Some(kib) = rss_without_guest_kib(child) {
                helpers
                    .entry(command_name(child))
                    .or_default()
                    .push(kib as f64 / 1024.0);
            }
        }
        delete(&mut driver, &id).await;
    }
    driver.shutdown().await;
    let mut total = report(
        "VMM child RSS without guest RAM (booted guest, 256 MiB)",
        "MiB",
        vmm,
    );
    for (name, values) in helpers {
        total += report(
            &format!("{name} RSS without guest RAM (booted guest, 256 MiB)"),
            "MiB",
            values,
        );
    }
    println!();
    if let Some(enter) = enter {
        println!(
            "ratio create→Running / libkrun spawn→enter: {:.1}",
            running / enter
        );
    }
    println!(
        "ratio create→Exited / create→Running: {:.2}",
        exited / running
    );
    println!(
        "host processes per running sandbox, without guest RAM: {total:.1} MiB (sum of medians)"
    );
}
