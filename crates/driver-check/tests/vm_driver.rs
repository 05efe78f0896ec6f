//! The checker against the VM driver's host side. Guests cannot boot on
//! hosts without hardware KVM (these CI machines), so the checks that need a
//! Ready sandbox are left out; capabilities, negotiation, validation,
//! idempotency codes, delete and its watch event all run for real, with
//! `--allow-unsupported-host` letting creates through to the VMM child.

mod common;

use common::{check_json, ids_with, row, vm_driver};

/// Checks that need the guest to run.
const NEED_A_RUNNING_GUEST: &[&str] = &[
    "create-ready",
    "list-ready",
    "watch-ready",
    "condition-time",
    "condition-time-both",
    "watch-snapshot",
    "logs-service",
    "stop",
    "stop-twice",
    "start",
    "watch-concurrent",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vm_driver_host_side_conforms() {
    let image = tempfile::tempdir().expect("image dir");
    std::fs::create_dir(image.path().join("bin")).expect("rootfs");
    // Any executable file stands in for the kernel: nothing boots here.
    // libkrun without a network, pinned, so the host side is checked the
    // same way on any machine: `auto` would need QEMU where KVM is not
    // usable, and a default network would need passt.
    let driver = vm_driver(&[
        "--allow-unsupported-host",
        "--kernel",
        "/bin/true",
        "--hypervisor",
        "libkrun",
        "--network",
        "none",
    ]);
    let skip = NEED_A_RUNNING_GUEST.join(",");
    let image_arg = image.path().display().to_string();
    let (code, rows, out) = check_json(
        &driver.socket,
        &[
            "--keep-going",
            "--skip",
            &skip,
            "--image",
            &image_arg,
            "--ready-timeout",
            "20",
        ],
    );
    assert!(ids_with(&rows, "FAIL").is_empty(), "{rows:#?}");
    assert_eq!(code, 0, "{out:?}");
    for id in [
        "capabilities",
        "negotiation",
        "admission-policy",
        "major-mismatch",
        "validate-good",
        "reject-missing-spec",
        "reject-empty-name",
        "reject-control-name",
        "reject-nan-cpu",
        "reject-negative-memory",
        "reject-gpu",
        "create-duplicate",
        "get-unknown",
        "delete-unknown",
        "delete",
        "watch-deleted",
        "cleanup",
    ] {
        assert_eq!(row(&rows, id)["outcome"], "PASS", "{id}: {rows:#?}");
    }
}
