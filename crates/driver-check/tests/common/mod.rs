//! Starting drivers and running the checker binary for the tests.

#![allow(dead_code, reason = "each test file uses a different part")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use openshell_proto::compute::v1::ListSandboxesRequest;
use openshell_proto::compute::v1::compute_driver_client::ComputeDriverClient;
use serde_json::Value;

/// A driver process, killed when dropped.
pub struct Driver {
    pub child: Child,
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn private_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    // The drivers keep sockets only in a directory of their own.
    let socket = dir.path().join("run").join("driver.sock");
    (dir, socket)
}

fn wait_for_socket(child: &mut Child, socket: &Path, within: Duration) {
    let start = Instant::now();
    while !socket.exists() {
        if let Some(status) = child.try_wait().expect("poll the driver") {
            panic!(
                "the driver exited before binding {}: {status}",
                socket.display()
            );
        }
        assert!(
            start.elapsed() < within,
            "the driver did not bind {} within {within:?}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `openshell-test-driver` with `extra` flags.
pub fn test_driver(extra: &[&str]) -> Driver {
    let (dir, socket) = private_dir();
    let mut child = Command::new(openshell_test_driver::binary_path())
        .arg("--bind-socket")
        .arg(&socket)
        .arg("--allow-same-uid-peer")
        .args(extra)
        .stderr(Stdio::null())
        .spawn()
        .expect("start the test driver");
    wait_for_socket(&mut child, &socket, Duration::from_secs(20));
    Driver {
        child,
        socket,
        _dir: dir,
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A Python with grpcio and grpcio-tools: $OPENSHELL_PYTHON, else
/// target/python/bin/python3 under the workspace root. `Err` says why
/// there is none.
pub fn python() -> Result<PathBuf, String> {
    let candidate = match std::env::var_os("OPENSHELL_PYTHON") {
        Some(path) => PathBuf::from(path),
        None => workspace_root().join("target/python/bin/python3"),
    };
    if !candidate.exists() {
        return Err(format!(
            "no Python at {} (set OPENSHELL_PYTHON to a python3 with grpcio and grpcio-tools)",
            candidate.display()
        ));
    }
    let probe = Command::new(&candidate)
        .args(["-c", "import grpc, grpc_tools"])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", candidate.display()))?;
    if !probe.status.success() {
        return Err(format!(
            "{} lacks grpcio or grpcio-tools: {}",
            candidate.display(),
            String::from_utf8_lossy(&probe.stderr).trim()
        ));
    }
    Ok(candidate)
}

/// Starts `openshell-driver-vm` (built on first use) with its state under
/// the driver's private directory and `extra` flags.
pub fn vm_driver(extra: &[&str]) -> Driver {
    let (dir, socket) = private_dir();
    let binary =
        openshell_test_driver::workspace_binary("openshell-driver-vm", "openshell-driver-vm");
    let mut child = Command::new(binary)
        .arg("--bind-socket")
        .arg(&socket)
        .arg("--allow-same-uid-peer")
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(extra)
        .stderr(Stdio::null())
        .spawn()
        .expect("start the VM driver");
    wait_for_socket(&mut child, &socket, Duration::from_secs(60));
    Driver {
        child,
        socket,
        _dir: dir,
    }
}

/// Starts `e2e/python/grpcio_driver.py` with `extra` flags.
pub fn python_driver(python: &Path, extra: &[&str]) -> Driver {
    let (dir, socket) = private_dir();
    std::fs::create_dir(socket.parent().expect("socket dir")).expect("create the socket dir");
    let root = workspace_root();
    let mut child = Command::new(python)
        .arg(root.join("e2e/python/grpcio_driver.py"))
        .arg("--socket")
        .arg(&socket)
        .arg("--proto-dir")
        .arg(root.join("proto"))
        .args(extra)
        .stdout(Stdio::null())
        .spawn()
        .expect("start the Python driver");
    // It compiles the protos first.
    wait_for_socket(&mut child, &socket, Duration::from_secs(120));
    Driver {
        child,
        socket,
        _dir: dir,
    }
}

pub fn checker() -> Command {
    Command::new(env!("CARGO_BIN_EXE_openshell-driver-check"))
}

/// Runs the checker on `socket` with `--json` and `args`; returns the exit
/// code and the parsed report.
pub fn check_json(socket: &Path, args: &[&str]) -> (i32, Vec<Value>, Output) {
    let out = checker()
        .arg(socket)
        .arg("--json")
        .args(args)
        .output()
        .expect("run the checker");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "the report is not JSON ({e}); stdout: {} stderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let rows = report.as_array().expect("the report is an array").clone();
    (out.status.code().unwrap_or(-1), rows, out)
}

/// The row of check `id`.
pub fn row<'a>(rows: &'a [Value], id: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("no row {id} in {rows:#?}"))
}

pub fn ids_with(rows: &[Value], outcome: &str) -> Vec<String> {
    rows.iter()
        .filter(|r| r["outcome"] == outcome)
        .map(|r| r["id"].as_str().expect("id is a string").to_owned())
        .collect()
}

/// The ids of the sandboxes the driver has now.
pub async fn sandbox_ids(socket: &Path) -> Vec<String> {
    let channel = openshell_wire::uds::connect(
        socket,
        openshell_wire::DialPolicy::within(Duration::from_secs(5)),
    )
    .await
    .expect("connect to the driver");
    ComputeDriverClient::new(channel)
        .list_sandboxes(ListSandboxesRequest {})
        .await
        .expect("ListSandboxes")
        .into_inner()
        .sandboxes
        .into_iter()
        .map(|s| s.id)
        .collect()
}
