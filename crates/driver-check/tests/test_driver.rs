//! The checker against the real `openshell-test-driver` binary.

mod common;

use std::time::Duration;

use common::{check_json, ids_with, row, sandbox_ids, test_driver};

/// What the test driver fails today, with a piece of each reason. When the
/// test driver is tightened, move the id out of this list.
const KNOWN_FAILURES: &[(&str, &str)] = &[
    (
        "reject-missing-spec",
        "ValidateSandboxCreate: expected INVALID_ARGUMENT, got OK; CreateSandbox: expected INVALID_ARGUMENT, got OK",
    ),
    (
        "reject-control-name",
        "ValidateSandboxCreate: expected INVALID_ARGUMENT, got OK",
    ),
    ("reject-nan-cpu", "expected INVALID_ARGUMENT, got OK"),
    ("reject-negative-cpu", "expected INVALID_ARGUMENT, got OK"),
    ("reject-nan-memory", "expected INVALID_ARGUMENT, got OK"),
    (
        "reject-negative-memory",
        "expected INVALID_ARGUMENT, got OK",
    ),
    (
        "reject-gpu",
        "expected INVALID_ARGUMENT or FAILED_PRECONDITION, got OK",
    ),
    // It stamps conditions with epoch milliseconds as text.
    ("condition-time", "is not RFC 3339"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_driver_passes_the_contract_except_its_known_gaps() {
    let driver = test_driver(&[]);
    let (code, rows, out) = check_json(&driver.socket, &["--keep-going", "--ready-timeout", "20"]);
    assert_eq!(code, 1, "required failures make exit 1; {out:?}");

    let mut failed = ids_with(&rows, "FAIL");
    failed.sort();
    let mut expected: Vec<String> = KNOWN_FAILURES
        .iter()
        .map(|(id, _)| (*id).to_owned())
        .collect();
    expected.sort();
    assert_eq!(failed, expected, "{rows:#?}");
    for (id, reason) in KNOWN_FAILURES {
        let r = row(&rows, id);
        assert_eq!(r["required"], true, "{r}");
        assert!(
            r["reason"].as_str().expect("reason").contains(reason),
            "{id}: {r}"
        );
    }

    // The contract behaviours it does have.
    for id in [
        "capabilities",
        "validate-good",
        "reject-missing-sandbox",
        "reject-empty-name",
        "create-ready",
        "list-ready",
        "watch-ready",
        "create-duplicate",
        "get-unknown",
        "delete-unknown",
        "watch-snapshot",
        "stop",
        "stop-twice",
        "start",
        "delete",
        "watch-deleted",
        "watch-concurrent",
        "cleanup",
        "logs-service",
    ] {
        assert_eq!(row(&rows, id)["outcome"], "PASS", "{id}: {rows:#?}");
    }
    let caps = row(&rows, "capabilities");
    assert!(
        caps["reason"]
            .as_str()
            .expect("reason")
            .contains("v0.0.111"),
        "{caps}"
    );

    // 1.x-only checks do not apply to a v0.0.111 driver and are not required.
    for id in [
        "negotiation",
        "admission-policy",
        "major-mismatch",
        "condition-time-both",
    ] {
        let r = row(&rows, id);
        assert_eq!(r["outcome"], "SKIP", "{r}");
        assert_eq!(r["required"], false, "{r}");
    }
    assert_eq!(row(&rows, "logs-service")["required"], false);

    // Every row has the stable shape.
    assert_eq!(rows.len(), 31);
    for r in &rows {
        let keys: Vec<&str> = r
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys.len(), 6, "{r}");
        for key in ["id", "title", "required", "outcome", "reason", "elapsed_ms"] {
            assert!(keys.contains(&key), "{key} missing in {r}");
        }
    }

    // The checker really removed what it created, invalid ones included.
    let left = sandbox_ids(&driver.socket).await;
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keep_going_the_first_required_failure_stops_the_run() {
    let driver = test_driver(&[]);
    let (code, rows, _) = check_json(&driver.socket, &[]);
    assert_eq!(code, 1);
    assert_eq!(ids_with(&rows, "FAIL"), ["reject-missing-spec"]);
    let after = row(&rows, "create-ready");
    assert_eq!(after["outcome"], "SKIP");
    assert!(
        after["reason"]
            .as_str()
            .expect("reason")
            .contains("--keep-going"),
        "{after}"
    );
    // Cleanup is still done and reported.
    assert_eq!(row(&rows, "cleanup")["outcome"], "PASS");
    assert!(sandbox_ids(&driver.socket).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_selected_checks_run_and_passing_them_exits_zero() {
    let driver = test_driver(&["--minimal"]);
    let (code, rows, out) = check_json(
        &driver.socket,
        &[
            "--only",
            "capabilities,create-ready,delete",
            "--only",
            "logs-service",
        ],
    );
    assert_eq!(code, 0, "{out:?}");
    let ids: Vec<&str> = rows.iter().map(|r| r["id"].as_str().expect("id")).collect();
    assert_eq!(
        ids,
        ["capabilities", "create-ready", "logs-service", "delete"]
    );
    // --minimal answers UNIMPLEMENTED for the log service: not a failure.
    let logs = row(&rows, "logs-service");
    assert_eq!(logs["outcome"], "SKIP", "{logs}");
    assert!(
        logs["reason"]
            .as_str()
            .expect("reason")
            .contains("not offered"),
        "{logs}"
    );
    assert!(sandbox_ids(&driver.socket).await.is_empty());

    let (code, rows, _) = check_json(
        &driver.socket,
        &[
            "--skip",
            "reject-missing-spec,reject-control-name,reject-nan-cpu,reject-negative-cpu,reject-nan-memory,reject-negative-memory,reject-gpu,condition-time",
        ],
    );
    assert_eq!(code, 0, "{rows:#?}");
    assert!(ids_with(&rows, "FAIL").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_whose_calls_hang_fails_with_the_reason() {
    let driver = test_driver(&["--stall", "GetSandbox", "--stall", "StopSandbox"]);
    let (code, rows, _) = check_json(
        &driver.socket,
        &[
            "--keep-going",
            "--call-timeout",
            "1",
            "--ready-timeout",
            "2",
        ],
    );
    assert_eq!(code, 1);
    for id in ["create-ready", "get-unknown"] {
        let r = row(&rows, id);
        assert_eq!(r["outcome"], "FAIL", "{r}");
        assert!(
            r["reason"]
                .as_str()
                .expect("reason")
                .contains("DEADLINE_EXCEEDED"),
            "{r}"
        );
    }
    // What depends on a Ready sandbox is skipped, not passed.
    assert_eq!(row(&rows, "list-ready")["outcome"], "SKIP");
    assert_eq!(row(&rows, "stop")["outcome"], "SKIP");
    // The watch and delete do not depend on GetSandbox answering.
    assert_eq!(row(&rows, "watch-ready")["outcome"], "PASS");
    assert_eq!(row(&rows, "cleanup")["outcome"], "PASS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_that_dies_fails_every_later_check() {
    // GetCapabilities twice, then the process aborts.
    let driver = test_driver(&["--crash-after-calls", "2"]);
    let (code, rows, _) = check_json(
        &driver.socket,
        &[
            "--keep-going",
            "--call-timeout",
            "2",
            "--ready-timeout",
            "2",
        ],
    );
    assert_eq!(code, 1);
    assert_eq!(row(&rows, "capabilities")["outcome"], "PASS");
    let r = row(&rows, "validate-good");
    assert_eq!(r["outcome"], "FAIL", "{r}");
    assert!(
        r["reason"]
            .as_str()
            .expect("reason")
            .contains("expected OK"),
        "{r}"
    );
    assert_eq!(row(&rows, "cleanup")["outcome"], "FAIL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_deletes_what_the_run_created() {
    // Sandboxes never become Ready, so the run waits in create-ready.
    let driver = test_driver(&["--provision-delay-ms", "600000"]);
    let mut run = common::checker()
        .arg(&driver.socket)
        .args(["--only", "create-ready", "--ready-timeout", "300"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run the checker");
    let mut waited = Duration::ZERO;
    loop {
        let ids = sandbox_ids(&driver.socket).await;
        if ids.iter().any(|id| id.contains("-main-")) {
            break;
        }
        assert!(
            waited < Duration::from_secs(60),
            "the run never created its sandbox: {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += Duration::from_millis(50);
    }
    let sent = std::process::Command::new("kill")
        .args(["-INT", &run.id().to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success());
    let status = run.wait().expect("wait for the checker");
    assert_eq!(status.code(), Some(130));
    let left = sandbox_ids(&driver.socket).await;
    assert!(left.is_empty(), "left behind after Ctrl-C: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_prove_nothing_when_the_good_sandbox_is_refused_too() {
    // Every sandbox without an image gets this default, which the test
    // driver reports as absent (FAILED_PRECONDITION).
    let driver = test_driver(&["--default-image", "missing/busybox"]);
    let (code, rows, _) = check_json(
        &driver.socket,
        &[
            "--keep-going",
            "--only",
            "validate-good,reject-missing-sandbox,reject-empty-name,reject-nan-cpu",
        ],
    );
    assert_eq!(code, 1);
    let good = row(&rows, "validate-good");
    assert_eq!(good["outcome"], "FAIL", "{good}");
    let reason = good["reason"].as_str().expect("reason");
    assert!(reason.contains("got FAILED_PRECONDITION"), "{reason}");
    assert!(reason.contains("pass --image"), "{reason}");
    // The request without a sandbox does not depend on the good one.
    assert_eq!(row(&rows, "reject-missing-sandbox")["outcome"], "PASS");
    for id in ["reject-empty-name", "reject-nan-cpu"] {
        let r = row(&rows, id);
        assert_eq!(r["outcome"], "SKIP", "{r}");
        assert!(
            r["reason"]
                .as_str()
                .expect("reason")
                .contains("see validate-good"),
            "{r}"
        );
    }

    // With an image it has, the same checks run for real.
    let (_, rows, _) = check_json(
        &driver.socket,
        &[
            "--keep-going",
            "--image",
            "test/busybox:latest",
            "--only",
            "validate-good,reject-empty-name",
        ],
    );
    assert_eq!(row(&rows, "validate-good")["outcome"], "PASS");
    assert_eq!(row(&rows, "reject-empty-name")["outcome"], "PASS");
}
