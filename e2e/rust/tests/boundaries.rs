//! The crate boundaries of `architecture/README.md`, checked against the
//! workspace's real dependency graph (`cargo metadata`). Runs with plain
//! `cargo test --workspace`: it needs nothing but cargo.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

const GATEWAY: &str = "openshell-server";
const LIFECYCLE: &str = "driver-lifecycle";
const CLI: &str = "openshell-cli";
const KIT: &str = "openshell-driver-kit";
const PROTO: &str = "openshell-proto";
const WIRE: &str = "openshell-wire";
const DRIVERS: &[&str] = &[
    "openshell-driver-podman",
    "openshell-driver-vm",
    "openshell-test-driver",
];

/// Workspace crate -> the workspace crates it needs to build and run
/// (normal and build dependencies; dev-dependencies only serve its tests).
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let output = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(
        output.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: Value = serde_json::from_slice(&output.stdout).expect("metadata is JSON");
    let packages = metadata["packages"].as_array().expect("packages");
    let members: BTreeSet<String> = packages
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect();
    packages
        .iter()
        .map(|p| {
            let name = p["name"].as_str().expect("name").to_owned();
            let deps = p["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                .filter(|d| d["kind"].as_str() != Some("dev"))
                .filter_map(|d| d["name"].as_str())
                .filter(|d| members.contains(*d))
                .map(str::to_owned)
                .collect();
            (name, deps)
        })
        .collect()
}

fn deps<'a>(graph: &'a BTreeMap<String, BTreeSet<String>>, krate: &str) -> &'a BTreeSet<String> {
    graph
        .get(krate)
        .unwrap_or_else(|| panic!("{krate} is not a workspace member any more; update this test"))
}

fn forbid(graph: &BTreeMap<String, BTreeSet<String>>, krate: &str, forbidden: &[&str], why: &str) {
    let bad: Vec<&String> = deps(graph, krate)
        .iter()
        .filter(|d| forbidden.contains(&d.as_str()))
        .collect();
    assert!(bad.is_empty(), "{krate} depends on {bad:?}: {why}");
}

fn only(graph: &BTreeMap<String, BTreeSet<String>>, krate: &str, allowed: &[&str], why: &str) {
    let bad: Vec<&String> = deps(graph, krate)
        .iter()
        .filter(|d| !allowed.contains(&d.as_str()))
        .collect();
    assert!(bad.is_empty(), "{krate} depends on {bad:?}: {why}");
}

#[test]
fn the_gateway_links_no_driver() {
    forbid(
        &graph(),
        GATEWAY,
        DRIVERS,
        "drivers are separate processes reached over the wire contract",
    );
}

#[test]
fn lifecycle_knows_neither_gateway_nor_drivers() {
    let mut forbidden = vec![GATEWAY, KIT, CLI];
    forbidden.extend_from_slice(DRIVERS);
    forbid(
        &graph(),
        LIFECYCLE,
        &forbidden,
        "driver-lifecycle acquires endpoints and must stay sandbox-agnostic",
    );
}

#[test]
fn the_cli_reaches_only_the_gateway() {
    only(
        &graph(),
        CLI,
        &[PROTO, WIRE],
        "the CLI speaks the gateway's public API and nothing else",
    );
}

#[test]
fn drivers_do_not_depend_on_the_gateway() {
    let graph = graph();
    for driver in DRIVERS {
        forbid(
            &graph,
            driver,
            &[GATEWAY, CLI],
            "a driver serves the wire contract to any gateway",
        );
    }
}

#[test]
fn shared_pieces_stay_at_the_bottom() {
    let graph = graph();
    only(&graph, PROTO, &[], "generated code only");
    only(&graph, WIRE, &[], "transport helpers are driver-agnostic");
    only(
        &graph,
        KIT,
        &[PROTO, WIRE],
        "the driver kit builds on the protocol alone",
    );
}
