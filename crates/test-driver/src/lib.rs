//! An in-memory compute driver for tests.
//!
//! It implements `openshell.compute.v1.ComputeDriver` and the optional log
//! service, served over a Unix socket with `driver_lifecycle::serve_uds`,
//! and has switches to misbehave (exit early, never become ready, ignore the
//! ready fd, crash after N calls, stall a call, ignore SIGTERM). It is the
//! peer for the lifecycle tests and for gateway tests.
//!
//! [`binary_path`] builds the `openshell-test-driver` binary on first use
//! and returns its path, so any test in the workspace can spawn it.

pub mod service;

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, OnceLock};

pub use service::{
    Behaviour, EXITING_IMAGE_PREFIX, MISSING_IMAGE_PREFIX, PRELOADED_COMMAND, TestDriver,
    preloaded_id, preloaded_name,
};

/// Path of a binary target of this workspace, built (once per test process)
/// with the same profile and target directory as the running test.
///
/// # Panics
/// When the build fails: a test cannot run without its peer binary.
pub fn workspace_binary(package: &str, bin: &str) -> PathBuf {
    static BUILT: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());
    let mut built = BUILT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, path)) = built.iter().find(|(name, _)| name == bin) {
        return path.clone();
    }
    let exe = std::env::current_exe().expect("the test knows its own executable");
    // target/<profile>/deps/<test> for tests and benches,
    // target/<profile>/<bin> for binaries.
    let mut profile_dir = exe
        .parent()
        .expect("executable has a directory")
        .to_path_buf();
    if profile_dir.ends_with("deps") {
        profile_dir.pop();
    }
    let target_dir = profile_dir
        .parent()
        .expect("profile directory has a parent")
        .to_path_buf();
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .arg("build")
        .arg("--quiet")
        .arg("--manifest-path")
        .arg(&manifest)
        .args(["-p", package, "--bin", bin])
        .env("CARGO_TARGET_DIR", &target_dir);
    if release {
        build.arg("--release");
    }
    let status = build
        .status()
        .expect("cargo can be started to build a test peer");
    assert!(
        status.success(),
        "building {bin} from package {package} failed ({status})"
    );
    let path = profile_dir.join(bin);
    assert!(
        path.is_file(),
        "{} was not produced by the build",
        path.display()
    );
    built.push((bin.to_owned(), path.clone()));
    path
}

/// Path of the `openshell-test-driver` binary.
pub fn binary_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| workspace_binary("openshell-test-driver", "openshell-test-driver"))
        .clone()
}
