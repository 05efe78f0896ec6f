//! The checker against a foreign peer: the Python grpcio driver in
//! `e2e/python/grpcio_driver.py`, in both contract generations.

mod common;

use common::{check_json, ids_with, python, python_driver, row, sandbox_ids};

/// Runs every check; `None` when there is no suitable Python.
async fn conforms(contract: &str) -> Option<Vec<serde_json::Value>> {
    let python = match python() {
        Ok(python) => python,
        Err(why) => {
            eprintln!("skipped: {why}");
            return None;
        }
    };
    let driver = python_driver(&python, &["--contract", contract]);
    let (code, rows, out) = check_json(&driver.socket, &["--keep-going", "--ready-timeout", "30"]);
    assert_eq!(ids_with(&rows, "FAIL"), Vec::<String>::new(), "{rows:#?}");
    assert_eq!(code, 0, "{out:?}");
    for r in &rows {
        if r["required"] == true {
            assert_eq!(r["outcome"], "PASS", "{r}");
        }
    }
    // grpcio has no log service registered.
    assert_eq!(row(&rows, "logs-service")["outcome"], "SKIP");
    let caps = row(&rows, "capabilities");
    assert!(
        caps["reason"]
            .as_str()
            .expect("reason")
            .contains(&format!("speaks {contract}")),
        "{caps}"
    );
    assert!(sandbox_ids(&driver.socket).await.is_empty());
    Some(rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpcio_driver_conforms_as_a_v0_driver() {
    let Some(rows) = conforms("v0.0.111").await else {
        return;
    };
    for id in ["negotiation", "admission-policy", "major-mismatch"] {
        let r = row(&rows, id);
        assert_eq!(
            (&r["outcome"], &r["required"]),
            (&"SKIP".into(), &false.into()),
            "{r}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpcio_driver_conforms_as_a_1x_driver() {
    let Some(rows) = conforms("1.x").await else {
        return;
    };
    // The 1.x checks ran, were required, and passed.
    for id in [
        "negotiation",
        "admission-policy",
        "major-mismatch",
        "condition-time-both",
    ] {
        let r = row(&rows, id);
        assert_eq!(
            (&r["outcome"], &r["required"]),
            (&"PASS".into(), &true.into()),
            "{r}"
        );
    }
}
