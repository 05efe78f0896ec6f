//! The QEMU executor: the second way to turn a launch plan into a running
//! VM, for hosts where libkrun cannot run (no hardware KVM: PVM hosts, most
//! CI runners, nested clouds).
//!
//! It runs inside the same VMM child as libkrun (`openshell-driver-vm vmm
//! <launch-file>`), after the same parent-death arming and launch-file
//! read, and reports the same status lines. The child then:
//!
//! 1. writes libkrun's own guest init (`init.krun`, the bytes libkrun would
//!    inject) and the sandbox token into the guest root;
//! 2. starts passt for [`GuestNetwork::Passt`] and waits for its socket;
//! 3. starts `qemu-system-* -M microvm,acpi=off` with the root directory as
//!    a 9p share (QEMU's built-in server: no helper process, no shared guest
//!    memory), the serial port on a pipe, the same ELF kernel, and the
//!    guest command, environment and working directory on the kernel
//!    command line exactly as libkrun puts them there;
//! 4. copies the serial console to its own stdout (the driver's console
//!    pipe) and exits with the guest command's exit code.
//!
//! The exit code: libkrun's init reports it through an ioctl that only
//! libkrun's virtio-fs server implements, so here init runs in its
//! `KRUN_INIT_PID1` mode: the command is PID 1, and when it exits the guest
//! kernel prints `Attempted to kill init! exitcode=0x...`, which carries
//! the wait status. With `panic=-1 reboot=t` and `-no-reboot` QEMU then
//! exits. The last such line on the console is the guest's exit.
//!
//! QEMU and passt are started through `setpriv --pdeathsig KILL`, so they
//! die with this process, and they share its process group, so a stop
//! (a signal to the group) reaches them too.

use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::launch::{
    GUEST_DIR, GuestNetwork, KernelSpec, LaunchConfig, ROOT_TAG, SetupFailure, StatusLine,
    TOKEN_FILE, monotonic_us,
};
use crate::passt::{self, Passt};
use crate::preflight::QemuAccel;

/// What the guest kernel prints when PID 1 exits; the wait status follows
/// in hex.
pub const EXIT_MARKER: &str = "Attempted to kill init! exitcode=0x";

/// The guest kernel command line for the QEMU executor (before the guest
/// command, which [`guest_cmdline`] appends). `dhcp`: configure the NIC
/// with the kernel's DHCP client.
pub fn kernel_cmdline(extra: &str, dhcp: bool) -> String {
    let mut cmdline = format!(
        "console=ttyS0 quiet panic=-1 panic_print=0 reboot=t nomodule \
         root={ROOT_TAG} rootfstype=9p rootflags=trans=virtio,version=9p2000.L,msize=262144 rw \
         init=/init.krun KRUN_INIT_PID1=1"
    );
    if dhcp {
        cmdline.push_str(" ip=dhcp");
    }
    if !extra.trim().is_empty() {
        cmdline.push(' ');
        cmdline.push_str(extra.trim());
    }
    cmdline
}

/// `virtio_mmio.device=` entries for the first `devices` virtio devices of
/// a microvm machine. QEMU fills its eight virtio-mmio transports from the
/// top (0xfeb00e00, IRQ 12, first) and would append these entries itself,
/// but after the `--` that starts the guest command's arguments the kernel
/// would hand them to init; so the executor turns QEMU's
/// `auto-kernel-cmdline` off and places them here.
pub fn virtio_mmio_devices(devices: usize) -> String {
    const BASE: u64 = 0xfeb0_0000;
    const SIZE: u64 = 512;
    const TRANSPORTS: u64 = 8;
    const FIRST_IRQ: u64 = 5;
    (0..TRANSPORTS.min(devices as u64))
        .map(|i| {
            let slot = TRANSPORTS - 1 - i;
            format!(
                " virtio_mmio.device={SIZE}@{:#x}:{}",
                BASE + slot * SIZE,
                FIRST_IRQ + slot
            )
        })
        .collect()
}

/// The whole command line: `base`, the virtio devices, then the guest
/// command in libkrun's encoding (`KRUN_INIT`, `KRUN_WORKDIR`, each
/// variable quoted, and the arguments quoted after `--`), which libkrun's
/// init reads back.
pub fn guest_cmdline(base: &str, config: &LaunchConfig) -> String {
    let quoted = |items: &[String]| -> String {
        items
            .iter()
            .map(|item| format!("\"{item}\""))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let devices = match config.network {
        GuestNetwork::Passt { .. } => 2,
        GuestNetwork::None | GuestNetwork::Tsi => 1,
    };
    format!(
        "{base}{} KRUN_INIT={} KRUN_WORKDIR={} {} -- {}",
        virtio_mmio_devices(devices),
        config.exec,
        config.workdir,
        quoted(&config.env),
        quoted(&config.args)
    )
}

/// The guest command's exit code from a console line carrying
/// [`EXIT_MARKER`]: the exit status, or 128 + the signal that ended it.
pub fn parse_exit_line(line: &str) -> Option<i32> {
    let (_, rest) = line.split_once(EXIT_MARKER)?;
    let hex: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
    let status = i32::from_str_radix(&hex, 16).ok()?;
    let signal = status & 0x7f;
    Some(if signal == 0 {
        (status >> 8) & 0xff
    } else {
        128 + signal
    })
}

/// The QEMU arguments for this launch (without the binary).
pub fn qemu_args(
    config: &LaunchConfig,
    accel: QemuAccel,
    kernel: &Path,
    cmdline: &str,
    passt_socket: Option<&Path>,
) -> Vec<String> {
    let (accel, cpu) = match accel {
        QemuAccel::Kvm => ("kvm", "host"),
        QemuAccel::Tcg => ("tcg", "max"),
    };
    let mut args: Vec<String> = [
        "-M",
        &format!("microvm,accel={accel},acpi=off,auto-kernel-cmdline=off"),
        "-cpu",
        cpu,
        "-m",
        &config.mem_mib.to_string(),
        "-smp",
        &config.vcpus.to_string(),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-chardev",
        "stdio,id=console,signal=off",
        "-serial",
        "chardev:console",
        "-fsdev",
        &format!(
            "local,id=root,path={},security_model=none",
            config.rootfs.display()
        ),
        "-device",
        &format!("virtio-9p-device,fsdev=root,mount_tag={ROOT_TAG}"),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    if let Some(socket) = passt_socket {
        args.extend([
            "-netdev".to_owned(),
            format!(
                "stream,id=net0,server=off,addr.type=unix,addr.path={}",
                socket.display()
            ),
            "-device".to_owned(),
            "virtio-net-device,netdev=net0".to_owned(),
        ]);
    }
    args.extend([
        "-kernel".to_owned(),
        kernel.display().to_string(),
        "-append".to_owned(),
        cmdline.to_owned(),
    ]);
    args
}

fn fail(error: &Error) -> u8 {
    SetupFailure::Executor.report(error)
}

/// Runs the VM with QEMU; returns this process's exit code.
pub fn run(config: &LaunchConfig, binary: &Path, accel: QemuAccel) -> u8 {
    let KernelSpec::Elf {
        path: kernel,
        cmdline,
    } = &config.kernel
    else {
        return fail(&Error::Setting(
            "the QEMU executor needs an ELF vmlinux, not libkrunfw".to_owned(),
        ));
    };
    if let Err(error) = prepare_root(config) {
        return fail(&error);
    }
    let mut passt = match &config.network {
        GuestNetwork::Passt { binary, dns } => {
            match passt::start_on_socket(binary, &config.run_dir, dns) {
                Ok(passt) => Some(passt),
                Err(error) => return fail(&error),
            }
        }
        GuestNetwork::None | GuestNetwork::Tsi => None,
    };
    let cmdline = guest_cmdline(cmdline, config);
    let args = qemu_args(
        config,
        accel,
        kernel,
        &cmdline,
        passt.as_ref().and_then(Passt::socket),
    );
    let mut qemu = match passt::tied_to_us(binary, None)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            if let Some(passt) = passt.as_mut() {
                passt.stop();
            }
            return fail(&Error::Spawn {
                program: binary.to_owned(),
                source: e,
            });
        }
    };
    crate::launch::report_status(&StatusLine::Entering {
        at_us: monotonic_us(),
    });
    let seen = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let watch = start_root_watch(qemu.id(), &config.rootfs, &seen, &done);
    let guest_code = copy_console(&mut qemu);
    let waited = qemu.wait();
    done.store(true, Ordering::Release);
    if let Some(watch) = watch {
        let _ = watch.join();
    }
    if let Some(passt) = passt.as_mut() {
        passt.stop();
    }
    remove_token(config);
    match (guest_code, waited) {
        (Some(code), _) => {
            // The kernel only prints the exit line after running init from
            // the root filesystem.
            if !seen.swap(true, Ordering::AcqRel) {
                crate::launch::report_status(&StatusLine::GuestRoot {
                    at_us: monotonic_us(),
                });
            }
            u8::try_from(code).unwrap_or(u8::MAX)
        }
        (None, Ok(exit)) => {
            eprintln!("QEMU exited ({exit}) without the guest reporting an exit code");
            exit.code()
                .and_then(|c| u8::try_from(c).ok())
                .filter(|c| *c != 0)
                .unwrap_or(1)
        }
        (None, Err(e)) => {
            eprintln!("waiting for QEMU failed: {e}");
            1
        }
    }
}

/// libkrun's init at `/init.krun` and the token under [`GUEST_DIR`] (what
/// libkrun provides as virtual files) and, with passt, the guest's
/// resolver file, written into the sandbox's own writable root.
fn prepare_root(config: &LaunchConfig) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let init = crate::libkrun::default_init()?;
    let path = config.rootfs.join("init.krun");
    std::fs::write(&path, init).map_err(|e| Error::io("write the guest init", &path, e))?;
    if let GuestNetwork::Passt { dns, .. } = &config.network {
        passt::write_resolv_conf(&config.rootfs, dns)?;
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| Error::io("make executable", &path, e))?;
    if let Some(token) = &config.sandbox_token {
        let dir = config.rootfs.join(GUEST_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
        let file = dir.join(TOKEN_FILE);
        let _ = std::fs::remove_file(&file);
        crate::state::write_private(&file, format!("{token}\n").as_bytes())?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o400))
            .map_err(|e| Error::io("restrict", &file, e))?;
    }
    Ok(())
}

fn remove_token(config: &LaunchConfig) {
    if config.sandbox_token.is_some() {
        let _ = std::fs::remove_file(config.rootfs.join(GUEST_DIR).join(TOKEN_FILE));
    }
}

/// Copies QEMU's serial output to stdout until QEMU closes it; returns the
/// guest's exit code from the last exit line, if any.
fn copy_console(qemu: &mut Child) -> Option<i32> {
    let pipe = qemu.stdout.take()?;
    let mut reader = std::io::BufReader::new(pipe);
    let mut out = std::io::stdout().lock();
    let mut line = Vec::new();
    let mut code = None;
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let _ = out.write_all(&line);
                let _ = out.flush();
                if let Some(found) = parse_exit_line(&String::from_utf8_lossy(&line)) {
                    code = Some(found);
                }
            }
        }
    }
    code
}

/// Reports `guest-root` once QEMU's 9p server holds a descriptor below the
/// root directory (the guest mounted its root and opened init); QEMU opens
/// the directory itself at start-up, which does not count.
fn start_root_watch(
    pid: u32,
    rootfs: &Path,
    seen: &Arc<AtomicBool>,
    done: &Arc<AtomicBool>,
) -> Option<std::thread::JoinHandle<()>> {
    let prefix = std::fs::canonicalize(rootfs).unwrap_or_else(|_| rootfs.to_owned());
    let fd_dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let (seen, done) = (Arc::clone(seen), Arc::clone(done));
    std::thread::Builder::new()
        .name("root-watch".into())
        .spawn(move || {
            let mut interval = Duration::from_millis(5);
            while !done.load(Ordering::Acquire) {
                let below_root = std::fs::read_dir(&fd_dir).is_ok_and(|entries| {
                    entries.filter_map(|e| e.ok()).any(|entry| {
                        std::fs::read_link(entry.path())
                            .is_ok_and(|t| t.starts_with(&prefix) && t != prefix)
                    })
                });
                if below_root {
                    if !seen.swap(true, Ordering::AcqRel) {
                        crate::launch::report_status(&StatusLine::GuestRoot {
                            at_us: monotonic_us(),
                        });
                    }
                    return;
                }
                std::thread::sleep(interval);
                interval = (interval * 3 / 2).min(Duration::from_millis(50));
            }
        })
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::{Executor, LAUNCH_VERSION};

    fn launch() -> LaunchConfig {
        LaunchConfig {
            version: LAUNCH_VERSION,
            sandbox_id: "s1".into(),
            rootfs: "/state/s1/rootfs".into(),
            kernel: KernelSpec::Elf {
                path: "/k".into(),
                cmdline: kernel_cmdline("", true),
            },
            vcpus: 1,
            mem_mib: 256,
            exec: "/bin/sh".into(),
            args: vec!["-c".into(), "echo hi; exit 3".into()],
            env: vec!["PATH=/bin".into(), "GREETING=hello world".into()],
            workdir: "/tmp".into(),
            krun_log_level: 2,
            executor: Executor::Qemu {
                binary: "/usr/bin/qemu-system-x86_64".into(),
                accel: QemuAccel::Tcg,
            },
            network: GuestNetwork::None,
            run_dir: "/state/s1".into(),
            sandbox_token: None,
        }
    }

    #[test]
    fn exit_lines_carry_the_code_or_the_signal() {
        let line =
            "[    1.2] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000300";
        assert_eq!(parse_exit_line(line), Some(3));
        assert_eq!(
            parse_exit_line("Attempted to kill init! exitcode=0x00000000\r\n"),
            Some(0)
        );
        assert_eq!(
            parse_exit_line("Attempted to kill init! exitcode=0x00007f00"),
            Some(127)
        );
        assert_eq!(
            parse_exit_line("Attempted to kill init! exitcode=0x00000009"),
            Some(137)
        );
        assert_eq!(parse_exit_line("exitcode=0x00000300"), None);
        assert_eq!(
            parse_exit_line("Attempted to kill init! exitcode=0xzz"),
            None
        );
    }

    #[test]
    fn the_guest_command_is_encoded_as_libkrun_does() {
        let config = launch();
        let KernelSpec::Elf { cmdline, .. } = &config.kernel else {
            unreachable!()
        };
        let full = guest_cmdline(cmdline, &config);
        assert!(full.starts_with("console=ttyS0 "), "{full}");
        assert!(full.contains(" ip=dhcp"), "{full}");
        assert!(full.contains(" init=/init.krun KRUN_INIT_PID1=1"), "{full}");
        assert!(
            full.contains(" virtio_mmio.device=512@0xfeb00e00:12 KRUN_INIT="),
            "one device (the root) without a network: {full}"
        );
        assert!(
            full.ends_with(
                " KRUN_INIT=/bin/sh KRUN_WORKDIR=/tmp \"PATH=/bin\" \"GREETING=hello world\" \
                 -- \"-c\" \"echo hi; exit 3\""
            ),
            "{full}"
        );
        assert!(!kernel_cmdline("loglevel=7", false).contains("ip=dhcp"));
        assert!(kernel_cmdline("loglevel=7", false).ends_with(" loglevel=7"));
    }

    #[test]
    fn virtio_devices_take_the_transports_from_the_top() {
        assert_eq!(
            virtio_mmio_devices(2),
            " virtio_mmio.device=512@0xfeb00e00:12 virtio_mmio.device=512@0xfeb00c00:11"
        );
        assert_eq!(virtio_mmio_devices(0), "");
    }

    #[test]
    fn qemu_gets_a_9p_root_a_serial_console_and_passt() {
        let config = launch();
        let args = qemu_args(
            &config,
            QemuAccel::Tcg,
            Path::new("/k"),
            "cmd",
            Some(Path::new("/state/s1/net/passt.sock")),
        );
        let joined = args.join(" ");
        assert!(
            joined.contains("-M microvm,accel=tcg,acpi=off,auto-kernel-cmdline=off -cpu max"),
            "{joined}"
        );
        assert!(joined.contains("-m 256 -smp 1"), "{joined}");
        assert!(
            joined.contains("local,id=root,path=/state/s1/rootfs,security_model=none"),
            "{joined}"
        );
        assert!(joined.contains("virtio-9p-device,fsdev=root,mount_tag=openshell-root"));
        assert!(
            joined.contains("addr.path=/state/s1/net/passt.sock"),
            "{joined}"
        );
        assert!(joined.contains("virtio-net-device,netdev=net0"));
        assert_eq!(
            args[args.len() - 2..],
            ["-append".to_owned(), "cmd".to_owned()]
        );
        let kvm = qemu_args(&config, QemuAccel::Kvm, Path::new("/k"), "cmd", None).join(" ");
        assert!(
            kvm.contains("accel=kvm,acpi=off,auto-kernel-cmdline=off -cpu host"),
            "{kvm}"
        );
        assert!(!kvm.contains("netdev"), "{kvm}");
    }
}
