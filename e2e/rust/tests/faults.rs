//! Bucket `faults`: drivers and the gateway killed at the worst moments.
#![cfg(feature = "faults")]

use std::time::Duration;

use nix::sys::signal::Signal;
use openshell_e2e::{
    Gateway, GatewayConfig, TEST_IMAGE, TestEnv, alive, bin, require_podman, start_external_podman,
    start_test_driver, wait_until,
};

fn podman_config() -> GatewayConfig {
    GatewayConfig {
        drivers: Some("podman".to_owned()),
        toml: Some(format!(
            "[openshell.drivers.podman]\ndefault_image = \"{TEST_IMAGE}\"\nstop_timeout = 2\n"
        )),
        ..GatewayConfig::default()
    }
}

fn kill(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid fits")),
        Signal::SIGKILL,
    );
}

/// `pid: command line` for each pid, for failure messages.
fn describe(pids: &[u32]) -> String {
    pids.iter()
        .map(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            format!(
                "\n  {pid}: {}",
                String::from_utf8_lossy(&cmd).replace('\0', " ")
            )
        })
        .collect()
}

#[test]
fn sigkilled_managed_driver_is_respawned() {
    require_podman!();
    let env = TestEnv::new();
    let gateway = Gateway::start(&env, &podman_config()).unwrap_or_else(|e| panic!("{e}"));
    let name = env.name("respawn");
    gateway
        .cli(&["sandbox", "create", &name, "--", "sleep", "3600"])
        .ok();

    let first = gateway.driver("podman")["pid"].as_u64().unwrap();
    kill(u32::try_from(first).unwrap());
    wait_until("managed driver respawned", Duration::from_secs(60), || {
        let driver = gateway.driver("podman");
        driver["state"] == "Ready"
            && driver["pid"].as_u64() != Some(first)
            && driver["restarts"].as_u64() >= Some(1)
    });

    // Calls for the sandbox work again through the new process.
    assert_eq!(
        gateway
            .cli(&["-o", "json", "sandbox", "stop", &name])
            .ok()
            .json()["phase"],
        "Stopped"
    );
    assert_eq!(
        gateway
            .cli(&["-o", "json", "sandbox", "start", &name])
            .ok()
            .json()["phase"],
        "Ready"
    );
    gateway.cli(&["sandbox", "delete", &name]).ok();
}

#[test]
fn restarted_external_driver_is_reconnected() {
    require_podman!();
    let env = TestEnv::new();
    let (driver, socket) = start_external_podman(&env, "external-podman");
    let config = GatewayConfig {
        drivers: Some(format!("external-podman@{}", socket.display())),
        ..GatewayConfig::default()
    };
    let gateway = Gateway::start(&env, &config).unwrap_or_else(|e| panic!("{e}"));
    let name = env.name("reconn");
    gateway
        .cli(&["sandbox", "create", &name, "--", "sleep", "3600"])
        .ok();

    kill(driver.pid());
    drop(driver);
    wait_until(
        "gateway notices the attached driver is gone",
        Duration::from_secs(30),
        || gateway.driver("external-podman")["state"] == "Unavailable",
    );
    let out = gateway.cli(&["sandbox", "stop", &name]).fails_with(1);
    assert!(
        out.stderr.contains("UNAVAILABLE") && out.stderr.contains("external-podman"),
        "{}",
        out.stderr
    );

    let (_driver, _socket) = start_external_podman(&env, "external-podman");
    wait_until("gateway reconnects", Duration::from_secs(60), || {
        gateway.driver("external-podman")["state"] == "Ready"
    });
    assert_eq!(
        gateway
            .cli(&["-o", "json", "sandbox", "stop", &name])
            .ok()
            .json()["phase"],
        "Stopped"
    );
    gateway.cli(&["sandbox", "delete", &name]).ok();
}

#[test]
fn sigkilled_gateway_leaves_no_driver_behind() {
    require_podman!();
    let env = TestEnv::new();
    let mut gateway = Gateway::start(&env, &podman_config()).unwrap_or_else(|e| panic!("{e}"));
    let driver_pid = u32::try_from(gateway.driver("podman")["pid"].as_u64().unwrap()).unwrap();
    assert!(
        !env.leftover_processes().is_empty(),
        "the driver runs on this environment's sockets"
    );

    gateway.kill();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while alive(driver_pid) || !env.leftover_processes().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "still running 30 s after the gateway was killed: {}",
            describe(&env.leftover_processes())
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn gateway_restart_keeps_running_and_stopped_sandboxes() {
    require_podman!();
    let env = TestEnv::new();
    let mut gateway = Gateway::start(&env, &podman_config()).unwrap_or_else(|e| panic!("{e}"));
    let running = env.name("keep");
    let stopped = env.name("still");
    gateway
        .cli(&["sandbox", "create", &running, "--", "sleep", "3600"])
        .ok();
    gateway
        .cli(&["sandbox", "create", &stopped, "--", "sleep", "3600"])
        .ok();
    gateway.cli(&["sandbox", "stop", &stopped]).ok();

    let status = gateway.stop();
    assert!(status.success(), "{status}\n{}", gateway.log());
    let gateway = gateway.restart().unwrap_or_else(|e| panic!("{e}"));

    gateway.wait_phase(&running, "Ready", Duration::from_secs(60));
    assert_eq!(
        gateway.phase(&stopped).as_deref(),
        Some("Stopped"),
        "explicitly stopped stays stopped"
    );
    for name in [&running, &stopped] {
        gateway.cli(&["sandbox", "delete", name]).ok();
    }
}

#[test]
fn driver_that_never_becomes_ready_fails_startup_with_its_stderr() {
    let env = TestEnv::new();
    let toml = format!(
        "[openshell.gateway]\ncompute_drivers = [\"podman\"]\n\n\
         [openshell.drivers.podman]\nbinary = \"{}\"\nnever_ready = true\nready_timeout_secs = 2\n",
        bin::test_driver().display()
    );
    let err = Gateway::start(
        &env,
        &GatewayConfig {
            toml: Some(toml),
            ..GatewayConfig::default()
        },
    )
    .unwrap_err();
    assert!(err.contains("exited during startup"), "{err}");
    assert!(
        err.contains("never becoming ready"),
        "the driver's stderr tail is shown: {err}"
    );
    assert!(
        env.leftover_processes().is_empty(),
        "the failed driver is gone"
    );
}

// ---- A bad day with the test driver (no container engine needed) --------
//
// Issue 11: drivers down at startup, frozen drivers, timed-out starts,
// creates cut off by a dying driver or gateway, and a lost database, each
// with real processes and the real CLI.

/// `[openshell.gateway]` with attached drivers and quick reconciles.
fn attached_toml(drivers: &[(&str, &std::path::Path)], extra: &str) -> String {
    let list = drivers
        .iter()
        .map(|(name, socket)| format!("\"{name}@{}\"", socket.display()))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "[openshell.gateway]\ncompute_drivers = [{list}]\nreconcile_interval_secs = 0.3\n\
         orphan_grace_secs = 0.3\n{extra}"
    )
}

fn attached(drivers: &[(&str, &std::path::Path)], extra: &str, args: &[&str]) -> GatewayConfig {
    GatewayConfig {
        drivers: None,
        toml: Some(attached_toml(drivers, extra)),
        extra_args: args.iter().map(|s| (*s).to_owned()).collect(),
    }
}

fn signal(pid: u32, signal: Signal) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid fits")),
        signal,
    );
}

/// Item 5: a driver down at startup is Unavailable while the other serves,
/// and is connected once it is up.
#[test]
fn a_driver_down_at_startup_is_dialled_in_the_background() {
    let env = TestEnv::new();
    let up = env.path().join("up.sock");
    let late = env.path().join("late.sock");
    let _up = start_test_driver(&env, &up, &[]);
    let gateway = Gateway::start(
        &env,
        &attached(
            &[("up", &up), ("late", &late)],
            "",
            &["--driver-connect-timeout", "0.5"],
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(gateway.driver("late")["state"], "Unavailable");
    gateway
        .cli(&[
            "sandbox", "create", "a", "--driver", "up", "--", "sleep", "60",
        ])
        .ok();
    let refused = gateway
        .cli(&[
            "sandbox", "create", "b", "--driver", "late", "--", "sleep", "60",
        ])
        .fails_with(1);
    assert!(refused.stderr.contains("UNAVAILABLE"), "{}", refused.stderr);
    let _late = start_test_driver(&env, &late, &[]);
    wait_until("the late driver connected", Duration::from_secs(60), || {
        gateway.driver("late")["state"] == "Ready"
    });
    gateway
        .cli(&[
            "sandbox", "create", "b", "--driver", "late", "--", "sleep", "60",
        ])
        .ok();
}

/// Items 4 and 3: a frozen driver is Unavailable and creates fail fast;
/// a start that timed out against it converges once it thaws.
#[test]
fn a_frozen_driver_fails_fast_and_a_late_start_converges() {
    let env = TestEnv::new();
    let socket = env.path().join("d.sock");
    let calls = env.path().join("calls");
    let calls_arg = calls.display().to_string();
    let driver = start_test_driver(&env, &socket, &["--call-log", &calls_arg]);
    let gateway = Gateway::start(
        &env,
        &attached(
            &[("d", &socket)],
            "driver_call_timeout_secs = 2\ndriver_probe_interval_secs = 0.3\ndriver_probe_timeout_secs = 1\n",
            &[],
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    gateway
        .cli(&["sandbox", "create", "s", "--", "sleep", "60"])
        .ok();
    gateway.cli(&["sandbox", "stop", "s"]).ok();

    signal(driver.pid(), Signal::SIGSTOP);
    // Sent before the probe notices: times out (or, if the probe was
    // quicker, is refused as UNAVAILABLE).
    let start = gateway
        .cli(&["sandbox", "start", "s", "--no-wait"])
        .fails_with(1);
    assert!(
        start.stderr.contains("DEADLINE_EXCEEDED") || start.stderr.contains("UNAVAILABLE"),
        "{}",
        start.stderr
    );
    wait_until(
        "the frozen driver is Unavailable",
        Duration::from_secs(30),
        || gateway.driver("d")["state"] == "Unavailable",
    );
    let create = gateway
        .cli(&["sandbox", "create", "t", "--", "sleep", "60"])
        .fails_with(1);
    assert!(create.stderr.contains("UNAVAILABLE"), "{}", create.stderr);
    assert!(create.stderr.contains("unresponsive"), "{}", create.stderr);

    signal(driver.pid(), Signal::SIGCONT);
    wait_until("the driver is Ready again", Duration::from_secs(30), || {
        gateway.driver("d")["state"] == "Ready"
    });
    // Give the thawed driver a moment to read what was queued for it.
    std::thread::sleep(Duration::from_secs(1));
    let late_start = std::fs::read_to_string(&calls)
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("StartSandbox"));
    if late_start {
        // The driver ran the start late: the row follows the driver.
        gateway.wait_phase("s", "Ready", Duration::from_secs(30));
    } else {
        eprintln!("the timed-out start never reached the driver; nothing to converge");
        assert_eq!(gateway.phase("s").as_deref(), Some("Stopped"));
    }
}

/// Item 7: a create cut off by a dying driver says UNAVAILABLE, and the
/// name can be created again once a driver is back.
#[test]
fn a_create_cut_off_by_a_dying_driver_frees_its_name() {
    let env = TestEnv::new();
    let socket = env.path().join("d.sock");
    let mut stalled = start_test_driver(&env, &socket, &["--stall", "CreateSandbox"]);
    let gateway = Gateway::start(&env, &attached(&[("d", &socket)], "", &[]))
        .unwrap_or_else(|e| panic!("{e}"));
    let address = gateway.address();
    let create = std::thread::spawn(move || {
        std::process::Command::new(bin::cli())
            .args([
                "--gateway",
                &address,
                "sandbox",
                "create",
                "c",
                "--no-wait",
                "--",
                "sleep",
                "60",
            ])
            .output()
            .expect("run openshell")
    });
    std::thread::sleep(Duration::from_secs(1));
    stalled.signal(Signal::SIGKILL);
    stalled.wait_exit(Duration::from_secs(10));
    let out = create.join().expect("create thread");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("UNAVAILABLE"), "{stderr}");
    drop(stalled);
    let _fresh = start_test_driver(&env, &socket, &[]);
    wait_until("the driver is back", Duration::from_secs(30), || {
        gateway.driver("d")["state"] == "Ready"
    });
    gateway
        .cli(&["sandbox", "create", "c", "--", "sleep", "60"])
        .ok();
}

/// Items 6 and 7: after a gateway SIGKILL and a lost database, the
/// driver's sandboxes are orphans to adopt or delete from the CLI.
#[test]
fn a_lost_database_leaves_orphans_the_cli_can_adopt_and_delete() {
    let env = TestEnv::new();
    let socket = env.path().join("d.sock");
    let _driver = start_test_driver(&env, &socket, &[]);
    let mut gateway = Gateway::start(&env, &attached(&[("d", &socket)], "", &[]))
        .unwrap_or_else(|e| panic!("{e}"));
    gateway
        .cli(&["sandbox", "create", "o1", "--", "sleep", "60"])
        .ok();
    gateway
        .cli(&["sandbox", "create", "o2", "--", "sleep", "60"])
        .ok();
    gateway.kill();
    for file in ["gateway.db", "gateway.db-wal", "gateway.db-shm"] {
        let _ = std::fs::remove_file(env.state_dir().join(file));
    }
    let gateway = gateway.restart().unwrap_or_else(|e| panic!("{e}"));
    wait_until("two orphans listed", Duration::from_secs(30), || {
        gateway
            .cli(&["-o", "json", "sandbox", "list", "--orphans"])
            .ok()
            .json()
            .as_array()
            .is_some_and(|a| a.len() == 2)
    });
    assert!(
        gateway.log().contains("gateway.db was lost"),
        "{}",
        gateway.log()
    );
    let orphans = gateway
        .cli(&["-o", "json", "sandbox", "list", "--orphans"])
        .ok()
        .json();
    let o2 = orphans
        .as_array()
        .and_then(|a| a.iter().find(|o| o["name"] == "o2"))
        .expect("o2 listed")
        .clone();
    let adopted = gateway
        .cli(&["-o", "json", "sandbox", "adopt", "o1", "--driver", "d"])
        .ok()
        .json();
    assert_eq!(adopted["name"], "o1");
    gateway.cli(&["sandbox", "stop", "o1"]).ok();
    let id = o2["id"].as_str().expect("id");
    let deleted = gateway
        .cli(&["sandbox", "delete", "--orphan", id, "--driver", "d"])
        .ok();
    assert!(deleted.stdout.contains("deleted"), "{}", deleted.stdout);
    gateway
        .cli(&["sandbox", "create", "o2", "--", "sleep", "60"])
        .ok();
}

/// `sandbox list -o json` as (name, phase, condition reasons).
fn listed(gateway: &Gateway) -> Vec<(String, String, Vec<String>)> {
    let list = gateway.cli(&["-o", "json", "sandbox", "list"]).ok().json();
    list.as_array()
        .expect("a list")
        .iter()
        .map(|s| {
            let reasons = s["conditions"]
                .as_array()
                .map(|c| {
                    c.iter()
                        .filter_map(|c| c["reason"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            (
                s["name"].as_str().unwrap_or_default().to_owned(),
                s["phase"].as_str().unwrap_or_default().to_owned(),
                reasons,
            )
        })
        .collect()
}

/// Item 7 at full scale: a managed driver (the test driver, run by the
/// gateway in place of podman's) frozen and then SIGKILLed while
/// 200 creates run, 32 at a time, through the CLI. Every create that failed
/// says UNAVAILABLE (never CANCELLED); once the driver is respawned, an
/// Error row can be deleted, every row becomes Ready or goes away (none
/// stays in Error for a sandbox the new driver never had), and every name
/// whose create failed can be created again.
#[test]
fn a_managed_driver_killed_during_200_creates_strands_no_name() {
    const CREATES: usize = 200;
    const IN_FLIGHT: usize = 32;
    let env = TestEnv::new();
    let toml = format!(
        "[openshell.gateway]\ncompute_drivers = [\"podman\"]\nreconcile_interval_secs = 0.3\n\
         orphan_grace_secs = 0.3\n\n[openshell.drivers.podman]\nbinary = \"{}\"\n",
        bin::test_driver().display()
    );
    let gateway = Gateway::start(
        &env,
        &GatewayConfig {
            toml: Some(toml),
            ..GatewayConfig::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let first = gateway.driver("podman")["pid"]
        .as_u64()
        .expect("a managed pid");
    let first_pid = u32::try_from(first).expect("pid fits");

    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let next = std::sync::Arc::clone(&next);
            let done = std::sync::Arc::clone(&done);
            let address = gateway.address();
            std::thread::spawn(move || {
                let mut results = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if i >= CREATES {
                        return results;
                    }
                    let name = format!("burst-{i:03}");
                    let out = std::process::Command::new(bin::cli())
                        .args(["--gateway", &address, "sandbox", "create", &name])
                        .args(["--no-wait", "--", "sleep", "600"])
                        .stdin(std::process::Stdio::null())
                        .output()
                        .expect("run openshell");
                    done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    results.push((
                        name,
                        out.status.success(),
                        String::from_utf8_lossy(&out.stderr).into_owned(),
                    ));
                }
            })
        })
        .collect();
    // Some creates done, most still to come: freeze the driver so the
    // creates sent to it hang there, then kill it under them.
    wait_until("the first creates", Duration::from_secs(120), || {
        done.load(std::sync::atomic::Ordering::SeqCst) >= 20
    });
    signal(first_pid, Signal::SIGSTOP);
    std::thread::sleep(Duration::from_millis(500));
    kill(first_pid);
    let results: Vec<(String, bool, String)> = workers
        .into_iter()
        .flat_map(|w| w.join().expect("a create worker"))
        .collect();
    assert_eq!(results.len(), CREATES);

    let failed: Vec<&(String, bool, String)> = results.iter().filter(|(_, ok, _)| !ok).collect();
    assert!(
        !failed.is_empty(),
        "creates sent to the frozen driver failed when it was killed"
    );
    for (name, _, stderr) in &failed {
        assert!(
            stderr.contains("UNAVAILABLE") && !stderr.contains("CANCELLED"),
            "{name}: {stderr}"
        );
    }
    eprintln!(
        "{} of {CREATES} creates failed, all UNAVAILABLE",
        failed.len()
    );

    wait_until(
        "the managed driver respawned",
        Duration::from_secs(60),
        || {
            let driver = gateway.driver("podman");
            driver["state"] == "Ready"
                && driver["pid"].as_u64() != Some(first)
                && driver["restarts"].as_u64() >= Some(1)
        },
    );

    // An Error row can be deleted whatever its create did: gone, or gone
    // already because the gateway cleared it first.
    let errors: Vec<String> = listed(&gateway)
        .into_iter()
        .filter(|(_, phase, _)| phase == "Error")
        .map(|(name, _, _)| name)
        .collect();
    eprintln!("{} Error rows after the respawn", errors.len());
    for name in errors.iter().step_by(2) {
        let out = gateway.cli(&["sandbox", "delete", name]);
        assert!(
            out.status.success() || out.stderr.contains("NOT_FOUND"),
            "delete {name}: {}",
            out.stderr
        );
        assert_eq!(gateway.phase(name), None, "{name} is gone");
    }

    // No row stays in Error: each is Ready (the driver has it) or gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let stuck: Vec<_> = listed(&gateway)
            .into_iter()
            .filter(|(_, phase, _)| phase != "Ready")
            .collect();
        if stuck.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rows neither Ready nor gone 60 s after the respawn: {stuck:?}\n{}",
            gateway.proc.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Every name whose create failed can be used: created again, or Ready
    // because the create reached the driver after all.
    let mut again = 0;
    for (name, _, _) in &failed {
        let out = gateway.cli(&["sandbox", "create", name, "--no-wait", "--", "sleep", "600"]);
        if out.status.success() {
            again += 1;
        } else {
            assert!(
                out.stderr.contains("ALREADY_EXISTS")
                    && gateway.phase(name).as_deref() == Some("Ready"),
                "create {name} again: {}",
                out.stderr
            );
        }
    }
    eprintln!("{again} failed names created again");
    for (name, _, _) in &failed {
        gateway.wait_phase(name, "Ready", Duration::from_secs(60));
    }
}
