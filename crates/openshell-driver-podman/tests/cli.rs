//! The binary's command line and config file: errors are one clear line
//! naming what to change, and the process exits non-zero. None of these
//! need Podman.

mod common;

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(common::driver_binary())
        .args(args)
        .env_remove("CONTAINER_HOST")
        .output()
        .expect("the driver binary runs")
}

fn error_line(output: &Output) -> String {
    assert!(!output.status.success(), "expected a failure: {output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let line = stderr
        .lines()
        .find(|l| l.contains("error:"))
        .unwrap_or_else(|| panic!("no error line in {stderr}"));
    assert!(
        line.starts_with("openshell-driver-podman: error: "),
        "{line}"
    );
    line.to_owned()
}

#[test]
fn unknown_config_keys_name_the_key_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("podman.toml");
    std::fs::write(
        &config,
        "name = \"podman\"\nstate_dir = \"/tmp/x\"\nexpect_driver_name = \"podman\"\n",
    )
    .unwrap();
    let socket = dir.path().join("d.sock");
    let output = run(&[
        "--bind-socket",
        socket.to_str().unwrap(),
        "--allow-same-uid-peer",
        "--driver-config",
        config.to_str().unwrap(),
    ]);
    let line = error_line(&output);
    assert!(line.contains("expect_driver_name"), "{line}");
    assert!(line.contains(config.to_str().unwrap()), "{line}");
    assert!(line.contains("line 3"), "{line}");
    assert!(!socket.exists(), "nothing is bound after a config error");
}

#[test]
fn bad_setting_values_name_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("d.sock");
    let socket = socket.to_str().unwrap();
    for (flag, value, needle) in [
        ("--cgroup-manager", "cgroupv3", "cgroup_manager"),
        ("--ulimit", "nofile", "NAME=SOFT"),
        ("--ulimit", "files=1", "files"),
        ("--network", "no such net!", "network"),
        ("--name", "bad/name", "name"),
    ] {
        let output = run(&[
            "--bind-socket",
            socket,
            "--allow-same-uid-peer",
            flag,
            value,
        ]);
        let line = error_line(&output);
        assert!(line.contains(needle), "{flag} {value}: {line}");
    }
}

#[test]
fn binding_without_a_peer_policy_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("d.sock");
    let output = run(&["--bind-socket", socket.to_str().unwrap()]);
    let line = error_line(&output);
    assert!(line.contains("--allow-same-uid-peer"), "{line}");
}

#[test]
fn no_engine_says_how_to_get_one() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("d.sock");
    let output = run(&[
        "--bind-socket",
        socket.to_str().unwrap(),
        "--allow-same-uid-peer",
        "--discover-podman-socket=false",
        "--start-podman-service=false",
        "--state-dir",
        dir.path().join("state").to_str().unwrap(),
    ]);
    let line = error_line(&output);
    assert!(line.contains("--start-podman-service"), "{line}");
    assert!(line.contains("--podman-socket"), "{line}");

    let missing = dir.path().join("nobody-listens.sock");
    let output = run(&[
        "--bind-socket",
        socket.to_str().unwrap(),
        "--allow-same-uid-peer",
        "--podman-socket",
        missing.to_str().unwrap(),
        "--state-dir",
        dir.path().join("state").to_str().unwrap(),
    ]);
    let line = error_line(&output);
    assert!(line.contains("podman_socket"), "{line}");
    assert!(line.contains(missing.to_str().unwrap()), "{line}");
}

#[test]
fn a_socket_that_is_not_podman_is_named() {
    let dir = tempfile::tempdir().unwrap();
    // Something that speaks HTTP but is not libpod: the test driver's gRPC
    // socket answers HTTP/1 requests with an error.
    let fake = dir.path().join("fake.sock");
    let listener = std::os::unix::net::UnixListener::bind(&fake).unwrap();
    let server = std::thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        if let Ok((mut stream, _)) = listener.accept() {
            let mut buf = [0_u8; 1024];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(
                b"HTTP/1.1 200 OK\r\nApi-Version: 1.41\r\nContent-Length: 2\r\nConnection: close\r\n\r\nOK",
            );
        }
    });
    let socket = dir.path().join("d.sock");
    let output = run(&[
        "--bind-socket",
        socket.to_str().unwrap(),
        "--allow-same-uid-peer",
        "--podman-socket",
        fake.to_str().unwrap(),
        "--state-dir",
        dir.path().join("state").to_str().unwrap(),
    ]);
    let line = error_line(&output);
    assert!(line.contains("not a Podman API socket"), "{line}");
    server.join().unwrap();
}
