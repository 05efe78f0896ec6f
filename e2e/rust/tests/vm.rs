//! Bucket `vm`: the VM driver, managed (`--drivers vm`) and attached
//! (`--drivers vm@SOCKET` against a separately started `openshell-driver-vm`),
//! through the same lifecycle. It needs a backend that can boot a guest
//! (libkrun on hardware KVM, else QEMU, TCG where there is no usable KVM)
//! and a guest kernel, which `openshell-driver-vm preflight` checks;
//! elsewhere it prints the reason and is skipped. `.ci/run` installs QEMU,
//! passt and the kernel, so in CI it runs for real.
#![cfg(feature = "vm")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use openshell_e2e::{Gateway, GatewayConfig, Proc, TestEnv, bin, wait_until};

/// `Err(reason)` when this host cannot boot VM sandboxes.
fn vm_gate() -> Result<(), String> {
    let out = Command::new(bin::vm_driver())
        .arg("preflight")
        .output()
        .map_err(|e| format!("could not run openshell-driver-vm preflight: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Err(format!(
        "this host cannot boot VM sandboxes: {}",
        text.trim()
    ))
}

macro_rules! require_vm {
    () => {
        if let Err(reason) = vm_gate() {
            eprintln!("skipped: {reason}");
            return;
        }
        if !["/usr/bin/passt", "/usr/local/bin/passt"]
            .iter()
            .any(|p| Path::new(p).exists())
        {
            eprintln!(
                "skipped: passt (apt-get install passt) is needed for the guest network checks"
            );
            return;
        }
        if !Path::new("/bin/busybox").exists() {
            eprintln!(
                "skipped: /bin/busybox (package busybox-static) is needed for the guest root"
            );
            return;
        }
    };
}

/// A busybox root filesystem for the guest.
fn busybox_rootfs(env: &TestEnv) -> PathBuf {
    let root = env.path().join("rootfs");
    for dir in [
        "bin", "sbin", "proc", "sys", "dev", "tmp", "etc", "root", "usr/bin", "usr/sbin",
    ] {
        std::fs::create_dir_all(root.join(dir)).expect("rootfs dir");
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("copy busybox");
    let applets = Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&applets.stdout).lines() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
        }
    }
    root
}

/// The VMM and QEMU processes started for this test's sandboxes.
fn vm_processes(env: &TestEnv) -> Vec<u32> {
    let mut pids = env.leftover_processes();
    pids.retain(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmd| {
            let cmd = String::from_utf8_lossy(&cmd);
            cmd.contains("qemu-system") || cmd.contains(" vmm ") || cmd.contains("\0vmm\0")
        })
    });
    pids
}

fn managed_vm_config(rootfs: &Path) -> GatewayConfig {
    GatewayConfig {
        drivers: Some("vm".to_owned()),
        toml: Some(format!(
            "[openshell.drivers.vm]\ndefault_image = \"rootfs:{}\"\n",
            rootfs.display()
        )),
        ..GatewayConfig::default()
    }
}

fn lifecycle(gateway: &Gateway, env: &TestEnv, driver: &str) {
    let info = gateway.driver(driver);
    assert_eq!(info["state"], "Ready", "{info}");
    assert_eq!(
        info["capabilities"]["driver_name"], "openshell-driver-vm",
        "{info}"
    );

    // The network check: a one-shot HTTP server on the host's loopback,
    // which the guest reaches at its gateway address (passt maps it).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a host server");
    let port = listener.local_addr().expect("its address").port();
    let server = std::thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        let (mut stream, _) = listener.accept().expect("the guest connects");
        let mut request = [0_u8; 1024];
        let _ = stream.read(&mut request);
        let body = "host-says-hello\n";
        let _ = write!(
            stream,
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    });
    let script = format!(
        "echo vm-ok > /root/marker; cat /root/marker; \
         gw=$(ip route | awk '/^default/ {{print $3}}'); \
         wget -q -O - http://$gw:{port}/probe; exec sleep 3600"
    );
    let name = env.name("vm");
    let created = gateway
        .cli(&[
            "-o",
            "json",
            "sandbox",
            "create",
            &name,
            "--driver",
            driver,
            "--timeout",
            "180",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .ok()
        .json();
    assert_eq!(created["phase"], "Ready", "{created}");
    wait_until("guest output in logs", Duration::from_secs(60), || {
        let logs = gateway.cli(&["sandbox", "logs", &name]).ok().stdout;
        logs.contains("vm-ok") && logs.contains("host-says-hello")
    });
    server.join().expect("the host server");
    assert_eq!(
        gateway
            .cli(&["-o", "json", "sandbox", "stop", &name])
            .ok()
            .json()["phase"],
        "Stopped"
    );
    assert_eq!(
        gateway
            .cli(&["-o", "json", "sandbox", "start", &name, "--timeout", "180"])
            .ok()
            .json()["phase"],
        "Ready"
    );
    gateway.cli(&["sandbox", "delete", &name]).ok();
    assert_eq!(gateway.phase(&name), None);
}

#[test]
fn managed_vm_lifecycle() {
    require_vm!();
    let env = TestEnv::new();
    let rootfs = busybox_rootfs(&env);
    let config = managed_vm_config(&rootfs);
    let gateway = Gateway::start(&env, &config).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(gateway.driver("vm")["managed"], true);
    lifecycle(&gateway, &env, "vm");
}

#[test]
fn attached_vm_lifecycle() {
    require_vm!();
    let env = TestEnv::new();
    let rootfs = busybox_rootfs(&env);
    let socket = env.path().join("vm.sock");
    let mut command = Command::new(bin::vm_driver());
    command
        .arg("--bind-socket")
        .arg(&socket)
        .arg("--allow-same-uid-peer")
        .arg("--state-dir")
        .arg(env.path().join("vm-state"))
        .arg("--default-image")
        .arg(format!("rootfs:{}", rootfs.display()));
    let mut driver = Proc::spawn(
        "openshell-driver-vm",
        command,
        env.path().join("vm-driver.log"),
    );
    wait_until("vm driver socket", Duration::from_secs(30), || {
        assert!(
            driver.try_exit().is_none(),
            "vm driver exited:\n{}",
            driver.log_tail(30)
        );
        socket.exists()
    });
    let config = GatewayConfig {
        drivers: Some(format!("vm@{}", socket.display())),
        ..GatewayConfig::default()
    };
    let gateway = Gateway::start(&env, &config).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(gateway.driver("vm")["managed"], false);
    lifecycle(&gateway, &env, "vm");
}

/// The guest's output and exit code come back through the gateway, and a
/// gateway killed with SIGKILL leaves no QEMU, passt or VMM process behind.
#[test]
fn exit_code_and_no_orphans_after_the_gateway_is_killed() {
    require_vm!();
    let env = TestEnv::new();
    let rootfs = busybox_rootfs(&env);
    let config = managed_vm_config(&rootfs);
    let mut gateway = Gateway::start(&env, &config).unwrap_or_else(|e| panic!("{e}"));

    let short = env.name("vm-exit");
    gateway
        .cli(&[
            "sandbox",
            "create",
            &short,
            "--driver",
            "vm",
            "--timeout",
            "180",
            "--",
            "sh",
            "-c",
            "echo exiting-with-3; exit 3",
        ])
        .ok();
    wait_until(
        "the exit code in the sandbox",
        Duration::from_secs(120),
        || {
            let shown = gateway
                .cli(&["-o", "json", "sandbox", "get", &short])
                .stdout;
            shown.contains("code 3")
        },
    );
    assert!(
        gateway
            .cli(&["sandbox", "logs", &short])
            .ok()
            .stdout
            .contains("exiting-with-3")
    );

    let long = env.name("vm-long");
    gateway
        .cli(&[
            "sandbox",
            "create",
            &long,
            "--driver",
            "vm",
            "--timeout",
            "180",
            "--",
            "sleep",
            "3600",
        ])
        .ok();
    let vm_processes = || vm_processes(&env);
    let passt_before = openshell_e2e::processes_mentioning("openshell-passt-");
    assert!(!vm_processes().is_empty(), "a VMM runs for {long}");
    gateway.kill();
    wait_until("no VM process left", Duration::from_secs(30), || {
        vm_processes().is_empty()
    });
    wait_until("no passt left", Duration::from_secs(30), || {
        passt_before.iter().all(|pid| !openshell_e2e::alive(*pid))
    });
}

/// A managed VM driver killed with SIGKILL takes its VMs with it: no VMM,
/// QEMU or passt process is left. The gateway respawns it and the new
/// driver restores the sandboxes from its state directory: the running one
/// boots again from the same writable root, the stopped one stays stopped.
#[test]
fn a_killed_vm_driver_leaves_nothing_behind_and_its_successor_restores() {
    require_vm!();
    let env = TestEnv::new();
    let rootfs = busybox_rootfs(&env);
    let gateway =
        Gateway::start(&env, &managed_vm_config(&rootfs)).unwrap_or_else(|e| panic!("{e}"));
    let running = env.name("vm-kept");
    gateway
        .cli(&[
            "sandbox",
            "create",
            &running,
            "--timeout",
            "180",
            "--",
            "sh",
            "-c",
            "echo boot >> /root/boots; echo boots=$(wc -l < /root/boots); exec sleep 3600",
        ])
        .ok();
    let stopped = env.name("vm-stopped");
    gateway
        .cli(&[
            "sandbox",
            "create",
            &stopped,
            "--timeout",
            "180",
            "--",
            "sleep",
            "3600",
        ])
        .ok();
    gateway.cli(&["sandbox", "stop", &stopped]).ok();
    wait_until("the first boot's output", Duration::from_secs(60), || {
        gateway
            .cli(&["sandbox", "logs", &running])
            .stdout
            .contains("boots=1")
    });

    let vms = vm_processes(&env);
    assert!(!vms.is_empty(), "a VMM runs for {running}");
    let passt = openshell_e2e::processes_mentioning("openshell-passt-");
    let driver = gateway.driver("vm")["pid"].as_u64().expect("driver pid");
    let driver = u32::try_from(driver).expect("pid fits");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(driver).expect("pid fits")),
        nix::sys::signal::Signal::SIGKILL,
    );
    wait_until(
        "the killed driver's VMs gone",
        Duration::from_secs(30),
        || {
            vms.iter()
                .chain(&passt)
                .all(|pid| !openshell_e2e::alive(*pid))
        },
    );

    wait_until("the VM driver respawned", Duration::from_secs(60), || {
        let info = gateway.driver("vm");
        info["state"] == "Ready" && info["pid"].as_u64() != Some(u64::from(driver))
    });
    wait_until(
        "the running sandbox booted again",
        Duration::from_secs(180),
        || {
            gateway
                .cli(&["sandbox", "logs", &running])
                .stdout
                .contains("boots=2")
        },
    );
    gateway.wait_phase(&running, "Ready", Duration::from_secs(60));
    assert_eq!(gateway.phase(&stopped).as_deref(), Some("Stopped"));
    assert!(
        !vm_processes(&env).is_empty(),
        "the restored sandbox runs in a new VMM"
    );
    for name in [&running, &stopped] {
        gateway.cli(&["sandbox", "delete", name]).ok();
    }
    wait_until("no VM process left", Duration::from_secs(30), || {
        vm_processes(&env).is_empty()
    });
}

/// Where VM sandboxes cannot boot, `--drivers vm` still comes up, lists and
/// reports, and a create is refused up front with the host's shortcoming.
#[test]
fn unsupported_host_refuses_creates_clearly() {
    let Err(reason) = vm_gate() else {
        eprintln!("skipped: this host can boot VM sandboxes; the refusal path does not apply");
        return;
    };
    let env = TestEnv::new();
    let config = GatewayConfig {
        drivers: Some("vm".to_owned()),
        toml: Some("[openshell.drivers.vm]\ndefault_image = \"rootfs:/\"\n".to_owned()),
        ..GatewayConfig::default()
    };
    let gateway = Gateway::start(&env, &config).unwrap_or_else(|e| panic!("{e}"));
    let info = gateway.driver("vm");
    assert_eq!(info["managed"], true, "{info}");
    assert_eq!(
        info["state"], "Ready",
        "the driver serves even on an unsupported host: {info}"
    );
    assert!(
        gateway
            .cli(&["-o", "json", "sandbox", "list"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .is_empty()
    );

    let out = gateway
        .cli(&["sandbox", "create", &env.name("vm"), "--", "true"])
        .fails_with(1);
    assert!(out.stderr.contains("FAILED_PRECONDITION"), "{}", out.stderr);
    // The same shortcoming preflight named, e.g. PVM or a missing kernel.
    let first_reason = reason.split(';').next().unwrap_or(&reason);
    let key = if first_reason.contains("PVM") {
        "PVM"
    } else {
        "kernel"
    };
    assert!(
        out.stderr.contains(key),
        "expected the refusal to name {key}:\n{}\n(preflight: {reason})",
        out.stderr
    );
    assert_eq!(
        gateway.phase(&env.name("vm")),
        None,
        "nothing is stored for a refused create"
    );
}

/// A VM sandbox from an image in a registry: the driver pulls it (plain
/// HTTP, as `insecure_registries` allows), unpacks it and boots it; a tag
/// the registry lacks is refused up front with FAILED_PRECONDITION.
#[test]
fn vm_sandbox_from_a_registry_image() {
    require_vm!();
    let env = TestEnv::new();
    let registry = match openshell_e2e::start_podman_test_registry(&env) {
        Ok(registry) => registry,
        Err(reason) => {
            eprintln!("skipped: {reason}");
            return;
        }
    };
    let rootfs = busybox_rootfs(&env);
    let reference = registry.reference("busybox", "latest");
    if let Err(reason) = openshell_e2e::push_rootfs_image(&env, &rootfs, "/bin/sh", &reference) {
        eprintln!("skipped: {reason}");
        return;
    }
    let config = GatewayConfig {
        drivers: Some("vm".to_owned()),
        toml: Some(format!(
            "[openshell.drivers.vm]\ninsecure_registries = [\"{}\"]\n",
            registry.host
        )),
        ..GatewayConfig::default()
    };
    let gateway = Gateway::start(&env, &config).unwrap_or_else(|e| panic!("{e}"));

    let name = env.name("pulled");
    let created = gateway
        .cli(&[
            "-o",
            "json",
            "sandbox",
            "create",
            &name,
            "--image",
            &reference,
            "-e",
            "GREETING=hello from the gateway",
            "--timeout",
            "180",
            "--",
            "sh",
            "-c",
            "echo pulled-ok; echo env=$GREETING; echo cwd=$(pwd); exec sleep 3600",
        ])
        .ok()
        .json();
    assert_eq!(created["phase"], "Ready", "{created}");
    wait_until("guest output in logs", Duration::from_secs(60), || {
        gateway
            .cli(&["sandbox", "logs", &name])
            .ok()
            .stdout
            .contains("cwd=")
    });
    // The sandbox's environment and the image's working directory.
    let logs = gateway.cli(&["sandbox", "logs", &name]).ok().stdout;
    assert!(logs.contains("pulled-ok"), "{logs}");
    assert!(logs.contains("env=hello from the gateway"), "{logs}");
    assert!(logs.contains("cwd=/root"), "{logs}");
    gateway.cli(&["sandbox", "delete", &name]).ok();

    let missing = registry.reference("busybox", "no-such-tag");
    let out = gateway
        .cli(&[
            "sandbox",
            "create",
            &env.name("missing"),
            "--image",
            &missing,
            "--",
            "true",
        ])
        .fails_with(1);
    assert!(out.stderr.contains("FAILED_PRECONDITION"), "{}", out.stderr);
    assert!(
        out.stderr.contains("no such image or tag") && out.stderr.contains("no-such-tag"),
        "{}",
        out.stderr
    );
    assert_eq!(gateway.phase(&env.name("missing")), None);
}
