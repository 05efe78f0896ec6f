//! Usage errors exit 2 and say what to do.

mod common;

use common::checker;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = checker().args(args).output().expect("run the checker");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_missing_socket_is_a_usage_error_with_advice() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("absent.sock");
    let (code, stderr) = run(&[socket.to_str().expect("utf-8")]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("does not exist"), "{stderr}");
    assert!(stderr.contains("--bind-socket"), "{stderr}");
}

#[test]
fn a_file_that_is_not_a_socket_is_a_usage_error() {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    let (code, stderr) = run(&[file.path().to_str().expect("utf-8")]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("is not a Unix socket"), "{stderr}");
}

#[test]
fn bad_flags_are_usage_errors() {
    let (code, stderr) = run(&["/nonexistent.sock", "--only", "delete,bogus"]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("unknown check id \"bogus\" in --only"),
        "{stderr}"
    );
    let (code, stderr) = run(&["/nonexistent.sock", "--ready-timeout", "0"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("--ready-timeout"), "{stderr}");
    let (code, _) = run(&["/nonexistent.sock", "--no-such-flag"]);
    assert_eq!(code, Some(2));
    let (code, _) = run(&[]);
    assert_eq!(code, Some(2));
}
