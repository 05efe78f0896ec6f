//! The checker against the real `openshell-test-driver` binary.

mod common;

use std::time::Duration;

use common::{check_json, ids_with, row, sandbox_ids, test_driver};

/// Every check, and whether a 1.x driver must pass it.
fn assert_all_pass(rows: &[serde_json::Value]) {
    let failed = ids_with(rows, "FAIL");
    assert!(failed.is_empty(), "failed: {failed:?}\n{rows:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_driver_conforms_to_both_generations() {
    let driver = test_driver(&[]);
    let (code, rows, out) = check_json(&driver.socket, &["--keep-going", "--ready-timeout", "20"]);
    assert_eq!(code, 0, "every required check passes; {out:?}");
    assert_all_pass(&rows);
    // As a 1.x driver, the 1.x checks apply and are required.
    for id in [
        "negotiation",
        "admission-policy",
        "major-mismatch",
        "condition-time-both",
    ] {
        let r = row(&rows, id);
        assert_eq!(r["outcome"], "PASS", "{r}");
        assert_eq!(r["required"], true, "{r}");
    }
    assert!(
        row(&rows, "capabilities")["reason"]
            .as_str()
            .expect("reason")
            .contains("1.x"),
        "{rows:#?}"
    );
    assert_eq!(row(&rows, "logs-service")["required"], false);

    // The same driver answering as a v0.0.111 one: the 1.x checks do not
    // apply and are not required.
    let legacy = test_driver(&["--legacy-contract"]);
    let (code, legacy_rows, out) = check_json(&legacy.socket, &["--keep-going"]);
    assert_eq!(code, 0, "{out:?}");
    assert_all_pass(&legacy_rows);
    for id in ["negotiation", "admission-policy", "major-mismatch"] {
        let r = row(&legacy_rows, id);
        assert_eq!(r["outcome"], "SKIP", "{r}");
        assert_eq!(r["required"], false, "{r}");
    }
    // Both time encodings are still welcome from a v0.0.111 driver, just
    // not required.
    assert_eq!(row(&legacy_rows, "condition-time-both")["required"], false);
    assert!(
        row(&legacy_rows, "capabilities")["reason"]
            .as_str()
            .expect("reason")
            .contains("v0.0.111"),
        "{legacy_rows:#?}"
    );

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
    // A driver of another protocol major refuses this checker's 1.x
    // gateway metadata: the very first check fails.
    let driver = test_driver(&["--protocol-major", "2"]);
    let (code, rows, _) = check_json(&driver.socket, &[]);
    assert_eq!(code, 1);
    assert_eq!(ids_with(&rows, "FAIL"), ["capabilities"]);
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

/// A driver with more sandboxes than fit in gRPC's default 4 MiB: the
/// checker reads its ListSandboxes reply with the gateway's limits, so the
/// list checks judge the driver, not the checker's buffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_larger_than_four_mib_is_read_like_the_gateway_reads_it() {
    let driver = test_driver(&["--preload", "20000"]);
    let (code, rows, out) = check_json(
        &driver.socket,
        &["--only", "capabilities,create-ready,list-ready,delete"],
    );
    assert_eq!(code, 0, "{out:?}");
    let list = row(&rows, "list-ready");
    assert_eq!(list["outcome"], "PASS", "{list}");
}
