//! Tests that boot a real guest. They need a backend that can boot one
//! (libkrun on hardware KVM, or QEMU: `hypervisor = auto` picks) and a
//! guest kernel (scripts/build-guest-kernel.sh, or libkrunfw for libkrun),
//! and skip with the reason on hosts without them. One test instead checks
//! what happens when libkrun is forced on a host that has a kernel but
//! cannot boot it (PVM): the failure must be reported, not hang.

mod common;

use std::time::Duration;

use common::{Driver, Watch, busybox_rootfs, condition, ready_reason, sandbox};
use openshell_driver_vm::preflight::{HostPaths, HostReport, KvmProblem};
use openshell_proto::compute::v1::{StartSandboxRequest, StopSandboxRequest};

/// The rootfs image and, when a guest can really boot here, nothing to
/// skip; otherwise the reason.
fn bootable() -> Result<(), String> {
    let report = HostReport::check(&HostPaths::system(), None);
    match report.blocker(false) {
        None => {
            eprintln!("booting with {}", report.platform_label());
            Ok(())
        }
        Some(problem) => Err(problem.to_string()),
    }
}

macro_rules! require_boot {
    () => {
        if let Err(reason) = bootable() {
            eprintln!("skipped: no guest can boot on this host: {reason}");
            return;
        }
    };
}

/// Whether guests get a passt NIC here; says why not otherwise.
fn passt_network() -> bool {
    let report = HostReport::check(&HostPaths::system(), None);
    let passt = report.platform_label().ends_with("network passt");
    if !passt {
        eprintln!(
            "skipped: the guest network here is not passt ({})",
            report.platform_label()
        );
    }
    passt
}

struct Guest {
    tmp: tempfile::TempDir,
    image: String,
}

fn guest() -> Option<Guest> {
    let tmp = tempfile::tempdir().expect("tempdir");
    let Some(rootfs) = busybox_rootfs(&tmp.path().join("rootfs")) else {
        eprintln!("skipped: no static busybox on this host (install busybox-static)");
        return None;
    };
    Some(Guest {
        image: format!("rootfs:{}", rootfs.display()),
        tmp,
    })
}

async fn console_until(driver: &mut Driver, id: &str, needle: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let text = driver.console(id, 0).await;
        if text.contains(needle) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "console never showed {needle:?}; it has:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busybox_boots_and_its_exit_code_and_output_are_reported() {
    require_boot!();
    let Some(guest) = guest() else { return };
    let mut driver = Driver::start(guest.tmp.path(), &[]).await;
    let mut watch = Watch::open(&mut driver.client).await;
    driver
        .create(sandbox(
            "boot-ok",
            &guest.image,
            &["/bin/sh", "-c", "echo hello-from-guest; exit 7"],
        ))
        .await
        .unwrap();
    watch.platform("boot-ok", "GuestBooted").await;
    let exited = watch
        .sandbox("boot-ok", "Exited", |s| ready_reason(s) == "Exited")
        .await;
    let message = condition(&exited, "Ready").unwrap().message;
    assert!(message.contains("code 7"), "{message}");
    let console = driver.console("boot-ok", 0).await;
    assert!(console.contains("hello-from-guest"), "{console}");
    assert!(driver.children().is_empty());
    driver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_command_is_exit_127() {
    require_boot!();
    let Some(guest) = guest() else { return };
    let mut driver = Driver::start(guest.tmp.path(), &[]).await;
    driver
        .create(sandbox("boot-127", &guest.image, &["/bin/no-such-program"]))
        .await
        .unwrap();
    let exited = driver
        .wait_for("boot-127", "Exited", |s| ready_reason(s) == "Exited")
        .await;
    let message = condition(&exited, "Ready").unwrap().message;
    assert!(
        message.contains("127") && message.contains("not found"),
        "{message}"
    );
    driver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_and_start_keep_what_the_guest_wrote() {
    require_boot!();
    let Some(guest) = guest() else { return };
    let mut driver = Driver::start(guest.tmp.path(), &[]).await;
    let script = "if [ -f /root/marker ]; then echo found-$(cat /root/marker); \
                  else echo first-boot; echo kept > /root/marker; sync; fi; \
                  echo ready-for-stop; sleep 600";
    driver
        .create(sandbox(
            "boot-keep",
            &guest.image,
            &["/bin/sh", "-c", script],
        ))
        .await
        .unwrap();
    driver
        .wait_for("boot-keep", "Running", |s| ready_reason(s) == "Running")
        .await;
    console_until(&mut driver, "boot-keep", "ready-for-stop").await;
    let id = || "boot-keep".to_owned();
    driver
        .client
        .stop_sandbox(StopSandboxRequest {
            sandbox_id: id(),
            sandbox_name: String::new(),
        })
        .await
        .unwrap();
    driver
        .client
        .start_sandbox(StartSandboxRequest {
            sandbox_id: id(),
            ..Default::default()
        })
        .await
        .unwrap();
    let console = console_until(&mut driver, "boot-keep", "found-kept").await;
    assert!(
        console.contains("first-boot"),
        "the first boot's output is kept: {console}"
    );
    driver.shutdown().await;
}

/// A real kernel on a host whose /dev/kvm cannot run it (PVM): the guest
/// fails, and that must come back as BootFailed with the diagnostics, with
/// no VMM left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_kernel_on_an_unsupported_host_is_boot_failed() {
    let report = HostReport::check(&HostPaths::system(), None);
    let kernel = match (&report.kvm, &report.kernel) {
        (Err(KvmProblem::Pvm { .. }), Ok(kernel)) => kernel.clone(),
        _ => {
            eprintln!(
                "skipped: needs a PVM host with a guest kernel installed; here: {}",
                report.lines().join("; ")
            );
            return;
        }
    };
    let Some(guest) = guest() else { return };
    let mut driver = Driver::start(
        guest.tmp.path(),
        &[
            "--allow-unsupported-host".to_owned(),
            "--hypervisor=libkrun".to_owned(),
        ],
    )
    .await;
    let mut watch = Watch::open(&mut driver.client).await;
    driver
        .create(sandbox("pvm-1", &guest.image, &["/bin/true"]))
        .await
        .unwrap();
    let pid = common::vmm_pid(&watch.platform("pvm-1", "VmmStarted").await);
    let failed = watch
        .sandbox("pvm-1", "BootFailed", |s| ready_reason(s) == "BootFailed")
        .await;
    let message = condition(&failed, "Ready").unwrap().message;
    assert!(message.contains("VMM log"), "{message}");
    common::wait_until("the VMM to be gone", Duration::from_secs(10), || {
        !common::alive(pid)
    })
    .await;
    assert!(driver.children().is_empty());
    eprintln!("{} on PVM: {message}", kernel.describe());
    driver.shutdown().await;
}

/// The guest gets the sandbox's environment, starts in its working
/// directory, and reaches a TCP server on the host's loopback through
/// passt (the gateway address 192.0.2.1 maps to the host's 127.0.0.1).
/// Skips where the network is not passt (libkrun, or no passt installed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_workdir_and_the_host_loopback_through_passt() {
    require_boot!();
    if !passt_network() {
        return;
    }
    let Some(guest) = guest() else { return };
    // A one-shot HTTP server on the host's loopback only.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        let (mut stream, peer) = listener.accept().unwrap();
        let mut request = [0_u8; 1024];
        let n = stream.read(&mut request).unwrap_or(0);
        let body = "reply-from-host-loopback\n";
        let _ = write!(
            stream,
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        (peer, String::from_utf8_lossy(&request[..n]).into_owned())
    });
    let mut driver = Driver::start(guest.tmp.path(), &[]).await;
    let script = format!(
        "echo env=$GREETING; echo cwd=$(pwd); wget -q -O - http://192.0.2.1:{port}/probe; \
         echo wget-exit=$?"
    );
    let mut request = sandbox("net-1", &guest.image, &["/bin/sh", "-c", &script]);
    if let Some(spec) = request.spec.as_mut() {
        spec.environment
            .insert("GREETING".to_owned(), "hello guest".to_owned());
    }
    driver.create(request).await.unwrap();
    let exited = driver
        .wait_for("net-1", "Exited", |s| ready_reason(s) == "Exited")
        .await;
    let console = driver.console("net-1", 0).await;
    let message = condition(&exited, "Ready").unwrap().message;
    assert!(message.contains("code 0"), "{message}\n{console}");
    assert!(console.contains("env=hello guest"), "{console}");
    assert!(console.contains("cwd=/"), "{console}");
    assert!(console.contains("reply-from-host-loopback"), "{console}");
    assert!(console.contains("wget-exit=0"), "{console}");
    let (peer, request) = server.join().unwrap();
    assert!(
        peer.ip().is_loopback(),
        "passt maps the guest to loopback: {peer}"
    );
    assert!(request.starts_with("GET /probe "), "{request}");
    driver.shutdown().await;
}

/// A DNS server for one name on a UDP socket: A queries for `name` get
/// `address`, other names NXDOMAIN, other types of `name` an empty answer.
/// Every question's name is recorded.
struct TinyResolver {
    asked: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TinyResolver {
    fn start(socket: std::net::UdpSocket, name: &'static str, address: [u8; 4]) -> Self {
        use std::sync::atomic::Ordering;
        let asked: std::sync::Arc<std::sync::Mutex<Vec<String>>> = std::sync::Arc::default();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("a read timeout");
        let thread = {
            let (asked, stop) = (std::sync::Arc::clone(&asked), std::sync::Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut buf = [0_u8; 512];
                while !stop.load(Ordering::Acquire) {
                    let Ok((n, peer)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    if let Some((qname, reply)) = dns_reply(&buf[..n], name, address) {
                        asked.lock().expect("names asked").push(qname);
                        let _ = socket.send_to(&reply, peer);
                    }
                }
            })
        };
        Self {
            asked,
            stop,
            thread: Some(thread),
        }
    }

    fn asked(&self) -> Vec<String> {
        self.asked.lock().expect("names asked").clone()
    }
}

impl Drop for TinyResolver {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The reply to one DNS query (RFC 1035 wire format), and the name asked.
fn dns_reply(query: &[u8], name: &str, address: [u8; 4]) -> Option<(String, Vec<u8>)> {
    if query.len() < 12 || query[2] & 0x80 != 0 || u16::from_be_bytes([query[4], query[5]]) != 1 {
        return None;
    }
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*query.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).into_owned());
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    let question_end = at + 4;
    let question = query.get(12..question_end)?;
    let qname = labels.join(".");
    let known = qname.eq_ignore_ascii_case(name);
    let answer = known && qtype == 1;
    let mut reply = Vec::with_capacity(question_end + 16);
    reply.extend_from_slice(&query[..2]);
    // QR, opcode 0, RD copied, RA; RCODE 3 (NXDOMAIN) for other names.
    reply.push(0x80 | (query[2] & 0x01));
    reply.push(if known { 0x80 } else { 0x83 });
    reply.extend_from_slice(&[0, 1, 0, u8::from(answer), 0, 0, 0, 0]);
    reply.extend_from_slice(question);
    if answer {
        // The name by pointer to the question, A, IN, TTL 60, 4 bytes.
        reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        reply.extend_from_slice(&address);
    }
    Some((qname, reply))
}

/// The guest resolves a name through passt to the resolver configured
/// with `--dns-server`, here one this test runs on the host's 127.0.0.1:
/// the driver writes the guest's /etc/resolv.conf with the address the
/// guest reaches it at (its gateway, which passt maps to the host's
/// loopback), and the answer comes back. Needs port 53 (root); skips where
/// the network is not passt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_resolves_names_through_passt_to_the_configured_resolver() {
    require_boot!();
    if !passt_network() {
        return;
    }
    // Resolvers listen on port 53; passt maps the gateway to 127.0.0.1.
    let socket = match std::net::UdpSocket::bind("127.0.0.1:53") {
        Ok(socket) => socket,
        Err(e) => {
            eprintln!(
                "skipped: cannot serve DNS on 127.0.0.1:53 ({e}); this test needs root and a free port 53"
            );
            return;
        }
    };
    let Some(guest) = guest() else { return };
    let resolver = TinyResolver::start(socket, "probe.openshell.test", [203, 0, 113, 7]);
    let mut driver = Driver::start(
        guest.tmp.path(),
        &["--dns-server".to_owned(), "127.0.0.1".to_owned()],
    )
    .await;
    let script = "cat /etc/resolv.conf; nslookup probe.openshell.test; echo lookup-exit=$?; \
                  nslookup missing.openshell.test; echo missing-exit=$?";
    driver
        .create(sandbox("dns-1", &guest.image, &["/bin/sh", "-c", script]))
        .await
        .unwrap();
    let exited = driver
        .wait_for("dns-1", "Exited", |s| ready_reason(s) == "Exited")
        .await;
    let console = driver.console("dns-1", 0).await;
    let message = condition(&exited, "Ready").unwrap().message;
    assert!(message.contains("code 0"), "{message}\n{console}");

    assert!(
        console.contains("nameserver ") && !console.contains("nameserver 127."),
        "the guest's resolver is reachable from the guest:\n{console}"
    );
    assert!(console.contains("203.0.113.7"), "{console}");
    assert!(console.contains("lookup-exit=0"), "{console}");
    assert!(!console.contains("missing-exit=0"), "{console}");
    let asked = resolver.asked();
    assert!(
        asked.iter().any(|n| n == "probe.openshell.test"),
        "the test's resolver was asked: {asked:?}"
    );
    driver.shutdown().await;
}
