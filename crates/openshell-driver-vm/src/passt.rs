//! passt, the user-mode network behind each guest's virtio-net NIC, for
//! both executors.
//!
//! One passt process per boot, started by the VMM child and tied to it
//! (`setpriv --pdeathsig KILL`), so it never outlives the VM:
//!
//! - the QEMU executor gives passt a socket in a private directory and
//!   points `-netdev stream` at it ([`start_on_socket`]);
//! - the libkrun executor hands passt one end of a socket pair and libkrun
//!   the other ([`start_on_fd`]): libkrun ends the process itself when the
//!   guest stops, so nothing may be left on disk for it to clean up.
//!
//! DNS: the guest's `/etc/resolv.conf` (written into its root by
//! [`write_resolv_conf`], and the same list in passt's DHCP answers) names
//! the resolvers as the guest reaches them through passt: a resolver on the
//! host's `127.0.0.1` becomes the guest's gateway address, which passt maps
//! to the host's loopback; any other address is reached through passt's
//! NAT as it is. Other loopback addresses (such as `127.0.0.53`) cannot be
//! reached from the guest and are left out with a warning. The resolvers
//! are `dns_servers` from the config, else the host's `/etc/resolv.conf`.
//! (passt's own `--dns-forward` did not forward anything with the Debian 12
//! passt in our tests, so the driver does not rely on it.)

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Where passt's own messages go, in the sandbox directory.
pub const LOG_FILE: &str = "passt.log";

/// How long passt gets to create its socket.
const READY: Duration = Duration::from_secs(5);

/// A command that gets SIGKILL when this process dies: through `setpriv
/// --pdeathsig KILL` where util-linux's setpriv is installed. With
/// `run_as`, setpriv switches to that user first: a process that changes
/// its own credentials loses its parent-death signal (passt drops to
/// `nobody` when started as root), so the switch must happen before.
pub fn tied_to_us(program: &Path, run_as: Option<&nix::unistd::User>) -> Command {
    match crate::preflight::find_on_path("setpriv") {
        Some(setpriv) => {
            let mut command = Command::new(setpriv);
            if let Some(user) = run_as {
                command
                    .arg(format!("--reuid={}", user.uid))
                    .arg(format!("--regid={}", user.gid))
                    .arg("--clear-groups");
            }
            command.args(["--pdeathsig", "KILL", "--"]).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// The user passt should run as: `nobody` when we are root (passt refuses
/// to keep root), else ourselves.
fn unprivileged_user() -> Option<nix::unistd::User> {
    if nix::unistd::geteuid().is_root() {
        nix::unistd::User::from_name("nobody").ok().flatten()
    } else {
        None
    }
}

/// passt's arguments besides how it meets the VMM: quiet, in the
/// foreground, and `dns` (the guest's resolvers) in its DHCP answers.
pub fn common_args(dns: &[IpAddr]) -> Vec<String> {
    let mut args: Vec<String> = vec!["--foreground".into(), "--quiet".into()];
    for server in dns {
        args.push("--dns".into());
        args.push(server.to_string());
    }
    args
}

/// The resolvers a guest is given for the `upstreams` the host uses, with
/// `gateway` the guest's gateway (passt hands out the host's default
/// gateway and maps it to the host's `127.0.0.1`). Returns the guest's list
/// and, for each upstream it cannot reach, why.
pub fn guest_resolvers(
    upstreams: &[IpAddr],
    gateway: Option<Ipv4Addr>,
) -> (Vec<IpAddr>, Vec<String>) {
    let mut reachable = Vec::new();
    let mut left_out = Vec::new();
    for upstream in upstreams {
        let guest = match upstream {
            IpAddr::V4(v4) if *v4 == Ipv4Addr::LOCALHOST => match gateway {
                Some(gateway) => Some(IpAddr::V4(gateway)),
                None => {
                    left_out.push(format!(
                        "resolver {upstream}: the host has no IPv4 default gateway for passt to \
                         map to its loopback"
                    ));
                    None
                }
            },
            ip if ip.is_loopback() => {
                left_out.push(format!(
                    "resolver {upstream}: of the host's loopback only 127.0.0.1 is reachable \
                     from a guest; set dns_servers to the resolver's upstream"
                ));
                None
            }
            ip => Some(*ip),
        };
        if let Some(guest) = guest
            && !reachable.contains(&guest)
        {
            reachable.push(guest);
        }
    }
    (reachable, left_out)
}

/// The `nameserver` addresses of a resolv.conf text.
pub fn nameservers(resolv_conf: &str) -> Vec<IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next()?.split('%').next()?.parse().ok())
                .flatten()
        })
        .collect()
}

/// The host's IPv4 default gateway, from `/proc/net/route` text.
pub fn default_gateway(route_table: &str) -> Option<Ipv4Addr> {
    route_table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) != Some(&"00000000") || fields.get(7) != Some(&"00000000") {
            return None;
        }
        // Stored in the host's byte order (little endian on the machines
        // this runs on).
        let raw = u32::from_str_radix(fields.get(2)?, 16).ok()?;
        let gateway = Ipv4Addr::from(raw.swap_bytes());
        (!gateway.is_unspecified()).then_some(gateway)
    })
}

/// The guest's resolvers on this host for `configured` (`dns_servers`;
/// empty: the host's /etc/resolv.conf), and why any were left out.
pub fn resolvers_for_guest(configured: &[IpAddr]) -> (Vec<IpAddr>, Vec<String>) {
    let upstreams = if configured.is_empty() {
        nameservers(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default())
    } else {
        configured.to_vec()
    };
    let gateway = default_gateway(&std::fs::read_to_string("/proc/net/route").unwrap_or_default());
    guest_resolvers(&upstreams, gateway)
}

/// The `/etc/resolv.conf` a guest with a passt NIC gets.
pub fn resolv_conf(servers: &[IpAddr]) -> String {
    let mut text =
        String::from("# Written by openshell-driver-vm for the guest's passt network.\n");
    for server in servers {
        text.push_str(&format!("nameserver {server}\n"));
    }
    text
}

/// Writes [`resolv_conf`] into the guest root, replacing the image's (as
/// container engines do); with no resolvers the image's file is kept. A
/// symlink there is removed first, never followed, so the write stays
/// inside the root.
pub fn write_resolv_conf(rootfs: &Path, servers: &[IpAddr]) -> Result<()> {
    if servers.is_empty() {
        return Ok(());
    }
    let etc = rootfs.join("etc");
    match std::fs::symlink_metadata(&etc) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(Error::Setting(format!(
                "{} in the guest root is not a directory; cannot give the guest a resolver",
                etc.display()
            )));
        }
        Err(_) => std::fs::create_dir(&etc).map_err(|e| Error::io("create", &etc, e))?,
    }
    let path = etc.join("resolv.conf");
    if std::fs::symlink_metadata(&path).is_ok() {
        std::fs::remove_file(&path).map_err(|e| Error::io("replace", &path, e))?;
    }
    std::fs::write(&path, resolv_conf(servers)).map_err(|e| Error::io("write", &path, e))
}

/// passt's messages go to `<run_dir>/passt.log`, never to the VMM's
/// stderr: that carries the status lines the driver parses.
fn log_file(run_dir: &Path) -> Result<std::fs::File> {
    let path = run_dir.join(LOG_FILE);
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| Error::io("open", &path, e))
}

/// Starts passt with [`common_args`] and `how` (how it meets the VMM),
/// tied to this process, its messages into `log`.
fn spawn(
    binary: &Path,
    run_as: Option<&nix::unistd::User>,
    dns: &[IpAddr],
    how: &[&std::ffi::OsStr],
    log: std::fs::File,
) -> Result<Child> {
    tied_to_us(binary, run_as)
        .args(common_args(dns))
        .args(how)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| Error::Spawn {
            program: binary.to_owned(),
            source: e,
        })
}

/// A running passt.
pub struct Passt {
    child: Child,
    /// The socket and its private directory, for [`start_on_socket`].
    socket: Option<PathBuf>,
}

impl Passt {
    pub fn socket(&self) -> Option<&Path> {
        self.socket.as_deref()
    }

    /// Stops passt and removes its directory.
    pub fn stop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = self.child.wait();
        if let Some(dir) = self.socket.as_deref().and_then(Path::parent) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Starts passt on a socket in a private directory of its own and waits
/// for the socket. The directory is not below the state directory: that
/// may be closed to passt's unprivileged user, and a unix socket path must
/// stay short.
pub fn start_on_socket(binary: &Path, run_dir: &Path, dns: &[IpAddr]) -> Result<Passt> {
    let log = log_file(run_dir)?;
    use std::os::unix::fs::PermissionsExt as _;
    let name = run_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = std::env::temp_dir().join(format!("openshell-passt-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).map_err(|e| Error::io("create", &dir, e))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o770))
        .map_err(|e| Error::io("restrict", &dir, e))?;
    // passt started as root switches to `nobody` before it binds its socket
    // (older versions) or binds as root without CAP_DAC_OVERRIDE (newer
    // ones): owner nobody, group root, mode 0770 lets both in and nobody
    // else.
    let nobody = unprivileged_user();
    if let Some(nobody) = &nobody {
        let _ = nix::unistd::chown(&dir, Some(nobody.uid), Some(nix::unistd::Gid::from_raw(0)));
    }
    let socket = dir.join("passt.sock");
    let mut child = spawn(
        binary,
        nobody.as_ref(),
        dns,
        &[
            "--one-off".as_ref(),
            "--socket".as_ref(),
            socket.as_os_str(),
        ],
        log,
    )?;
    let deadline = Instant::now() + READY;
    loop {
        if socket.exists() {
            return Ok(Passt {
                child,
                socket: Some(socket),
            });
        }
        if let Ok(Some(exit)) = child.try_wait() {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(Error::Setting(format!(
                "passt ({}) exited ({exit}) before creating its socket {}; see vmm.log",
                binary.display(),
                socket.display()
            )));
        }
        if Instant::now() > deadline {
            let mut passt = Passt {
                child,
                socket: Some(socket.clone()),
            };
            passt.stop();
            return Err(Error::Setting(format!(
                "passt ({}) did not create its socket {} within {} s",
                binary.display(),
                socket.display(),
                READY.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Starts passt on one end of a new stream socket pair and returns passt
/// and the other end, for the VMM. passt's end is the only descriptor it
/// inherits besides the standard ones: it is made inheritable here, and
/// this process's copy is closed once passt has started.
pub fn start_on_fd(binary: &Path, run_dir: &Path, dns: &[IpAddr]) -> Result<(Passt, OwnedFd)> {
    let log = log_file(run_dir)?;
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    use std::os::fd::AsRawFd as _;
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| Error::io("create a socket pair for", "passt", e.into()))?;
    nix::fcntl::fcntl(
        &theirs,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .map_err(|e| Error::io("hand a socket to", "passt", e.into()))?;
    let fd = theirs.as_raw_fd().to_string();
    let child = spawn(
        binary,
        unprivileged_user().as_ref(),
        dns,
        &["--fd".as_ref(), fd.as_ref()],
        log,
    )?;
    drop(theirs);
    Ok((
        Passt {
            child,
            socket: None,
        },
        ours,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_reaches_host_resolvers_through_passt() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let gateway = Some(Ipv4Addr::new(192, 0, 2, 1));
        let (guest, left_out) = guest_resolvers(
            &[
                ip("127.0.0.1"),
                ip("10.255.255.53"),
                ip("127.0.0.53"),
                ip("::1"),
            ],
            gateway,
        );
        assert_eq!(guest, [ip("192.0.2.1"), ip("10.255.255.53")]);
        assert_eq!(left_out.len(), 2, "{left_out:?}");
        assert!(left_out[0].contains("127.0.0.53"), "{left_out:?}");
        let (guest, left_out) = guest_resolvers(&[ip("127.0.0.1")], None);
        assert!(guest.is_empty());
        assert!(left_out[0].contains("default gateway"), "{left_out:?}");
        assert_eq!(
            common_args(&guest_resolvers(&[ip("127.0.0.1")], gateway).0).join(" "),
            "--foreground --quiet --dns 192.0.2.1"
        );
        assert_eq!(
            resolv_conf(&[ip("192.0.2.1")]).lines().last(),
            Some("nameserver 192.0.2.1")
        );
    }

    #[test]
    fn host_files_are_read() {
        let conf = "# generated\nsearch lan\nnameserver 10.255.255.53\nnameserver fe80::1%eth0\n\
                    nameserver bogus\noptions edns0\n";
        assert_eq!(
            nameservers(conf),
            [
                "10.255.255.53".parse::<IpAddr>().unwrap(),
                "fe80::1".parse().unwrap()
            ]
        );
        let routes = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                      eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                      eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(default_gateway(routes), Some(Ipv4Addr::new(192, 0, 2, 1)));
        assert_eq!(default_gateway("Iface\n"), None);
    }

    #[test]
    fn the_resolver_file_replaces_a_symlink_without_following_it() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("resolv.conf");
        std::fs::write(&target, "nameserver 10.0.0.1\n").unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::os::unix::fs::symlink(&target, root.path().join("etc/resolv.conf")).unwrap();
        let servers = ["192.0.2.1".parse::<IpAddr>().unwrap()];
        write_resolv_conf(root.path(), &servers).unwrap();
        assert_eq!(
            std::fs::read_to_string(&target).unwrap(),
            "nameserver 10.0.0.1\n",
            "the link's target is untouched"
        );
        let written = std::fs::read_to_string(root.path().join("etc/resolv.conf")).unwrap();
        assert_eq!(written, resolv_conf(&servers));

        let bare = tempfile::tempdir().unwrap();
        write_resolv_conf(bare.path(), &[]).unwrap();
        assert!(!bare.path().join("etc").exists(), "nothing to write");
        write_resolv_conf(bare.path(), &servers).unwrap();
        assert!(bare.path().join("etc/resolv.conf").is_file());

        let odd = tempfile::tempdir().unwrap();
        std::fs::write(odd.path().join("etc"), "not a dir").unwrap();
        let err = write_resolv_conf(odd.path(), &servers)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a directory"), "{err}");
    }

    #[test]
    fn passt_on_a_socket_pair_starts_and_stops() {
        let Some(binary) = crate::preflight::find_on_path("passt") else {
            eprintln!("skipped: passt is not installed");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let (mut passt, ours) = start_on_fd(&binary, dir.path(), &[]).unwrap();
        assert!(passt.socket().is_none());
        // passt holds the other end: a write does not fail with EPIPE.
        let mut stream = std::os::unix::net::UnixStream::from(ours);
        std::thread::sleep(Duration::from_millis(100));
        use std::io::Write as _;
        // A zero-length frame header: passt reads and drops it.
        assert!(stream.write_all(&[0, 0, 0, 0]).is_ok());
        passt.stop();
    }
}
