//! A bad day, against real processes: big inventories, big sandboxes,
//! oversized requests, watches held open and never read, and a database
//! with a row the gateway cannot read.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use common::{
    AttachedDriver, Dirs, Gateway, PATIENCE, assert_status, by_name, create, create_request,
    driver_info, one_driver, preload_rows, rss_and_threads, run_cli, wait_phase, wait_until,
    write_config,
};
use openshell_proto::gateway::v1::watch_sandboxes_event::Payload;
use openshell_proto::gateway::v1::{self as gw, SandboxPhase};
use tonic::Code;

fn attached_config(
    dirs: &Dirs,
    name: &str,
    driver: &AttachedDriver,
    extra: &str,
) -> std::path::PathBuf {
    write_config(
        dirs,
        &format!(
            "[openshell.gateway]\ncompute_drivers = [\"{name}@{}\"]\n{extra}",
            driver.socket.display()
        ),
    )
}

/// `openshell -o json sandbox list`, parsed.
fn cli_list(socket: &std::path::Path) -> Vec<serde_json::Value> {
    let (status, stdout, stderr) = run_cli(socket, &["-o", "json", "sandbox", "list"]);
    assert!(
        status.success(),
        "openshell sandbox list failed ({status}): {stderr}"
    );
    serde_json::from_str::<serde_json::Value>(&stdout)
        .expect("JSON")
        .as_array()
        .expect("a JSON list")
        .clone()
}

/// Starts the gateway and waits (longer than usual: a big inventory is
/// reconciled before serving) until it serves.
async fn start_slowly(dirs: &Dirs, config: &std::path::Path) -> Gateway {
    let mut gateway = Gateway::spawn(dirs, config, &[]);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Some(status) = gateway.child.try_wait().expect("try_wait") {
            panic!("gateway exited early ({status}):\n{}", gateway.log_text());
        }
        if tokio::time::timeout(Duration::from_secs(5), gateway.client())
            .await
            .is_ok()
        {
            let mut client = gateway.client().await;
            if client
                .get_gateway_info(gw::GetGatewayInfoRequest {})
                .await
                .is_ok()
            {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "gateway never served:\n{}",
            gateway.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gateway.wait_serving().await;
    gateway
}

/// 20 sandboxes with a 240 KB command each: their driver's list is past
/// gRPC's default 4 MiB. The driver stays usable across a gateway restart,
/// and they list through the CLI and through a client with stock limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_sandboxes_keep_their_driver_usable() {
    let dirs = Dirs::new();
    let (_driver, mut gateway) = one_driver(&dirs, "big", "", &[], &[]).await;
    let mut client = gateway.client().await;
    let script = format!("echo {}", "x".repeat(240_000));
    for i in 0..20 {
        client
            .create_sandbox(create_request(
                &format!("big-{i:02}"),
                "",
                &["sh", "-c", &script],
            ))
            .await
            .unwrap_or_else(|s| panic!("create big-{i:02}: {}", s.code()));
    }
    wait_phase(&mut client, "big-19", SandboxPhase::Ready).await;
    drop(client);
    assert!(gateway.stop().success());

    // At startup the gateway lists the driver's 4.8 MB of sandboxes.
    gateway.restart().await;
    let mut client = gateway.client().await;
    assert_eq!(
        driver_info(&mut client, "big").await.state,
        gw::DriverState::Ready as i32,
        "{}",
        gateway.log_text()
    );
    create(&mut client, "after-restart", "").await;
    wait_phase(&mut client, "after-restart", SandboxPhase::Ready).await;

    // A stock client (4 MiB) pages through them: pages are bounded by bytes.
    let mut names = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .list_sandboxes(gw::ListSandboxesRequest {
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("a page fits a stock client")
            .into_inner();
        pages += 1;
        names.extend(page.sandboxes.into_iter().map(|s| s.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(names.len(), 21);
    assert!(pages > 1, "4.8 MB of sandboxes cannot be one page");
    assert_eq!(cli_list(&gateway.socket).len(), 21);
}

/// 50,000 sandboxes on one driver: the gateway reconciles them at startup,
/// the driver stays Ready and takes creates, and the CLI lists them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_thousand_sandboxes_on_one_driver() {
    const COUNT: usize = 50_000;
    let dirs = Dirs::new();
    preload_rows(&dirs.state(), "many", COUNT);
    let driver = AttachedDriver::start(
        &dirs.path("d.sock"),
        &dirs.path("calls"),
        &["--preload", &COUNT.to_string()],
    );
    let config = attached_config(&dirs, "many", &driver, "");
    let gateway = start_slowly(&dirs, &config).await;
    let mut client = gateway.client().await;
    assert_eq!(
        driver_info(&mut client, "many").await.state,
        gw::DriverState::Ready as i32,
        "{}",
        gateway.log_text()
    );
    create(&mut client, "one-more", "").await;
    wait_phase(&mut client, "one-more", SandboxPhase::Ready).await;
    // The startup reconcile applied the driver's view to the stored rows.
    wait_phase(&mut client, "preload-049999", SandboxPhase::Ready).await;

    let listed = cli_list(&gateway.socket);
    assert_eq!(listed.len(), COUNT + 1);
    assert_eq!(listed[0]["name"], "one-more");
    assert_eq!(listed[COUNT]["name"], "preload-049999");
}

/// Requests past the documented limits are refused, naming the limit, and
/// no error quotes more than a short prefix of what it was given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_refused_with_short_messages() {
    let dirs = Dirs::new();
    let (_driver, gateway) = one_driver(&dirs, "d", "", &[], &[]).await;
    let mut client = gateway.client().await;
    let huge = "a".repeat(100_000);
    let short = |status: &tonic::Status| {
        assert!(
            status.message().len() < 1000,
            "{} bytes: {}…",
            status.message().len(),
            &status.message()[..200]
        );
    };

    let named = client
        .create_sandbox(create_request(&huge, "", &["true"]))
        .await
        .unwrap_err();
    assert_eq!(named.code(), Code::InvalidArgument, "{named:?}");
    assert!(
        named.message().contains("the limit is 63"),
        "{}",
        named.message()
    );
    short(&named);

    let mut env = create_request("env", "", &["true"]);
    env.spec.as_mut().unwrap().env = (0..300)
        .map(|i| (format!("V{i}"), "v".repeat(1000)))
        .collect::<HashMap<_, _>>();
    assert_status(
        client.create_sandbox(env).await,
        Code::InvalidArgument,
        &["spec.env is", "the limit is 262144"],
    );

    let mut labels = create_request("labels", "", &["true"]);
    labels.labels = (0..65).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    assert_status(
        client.create_sandbox(labels).await,
        Code::InvalidArgument,
        &["65 labels", "the limit is 64"],
    );

    let mut total = create_request("total", "", &["sh", "-c", &"x".repeat(255_000)]);
    total.spec.as_mut().unwrap().env = (0..255)
        .map(|i| (format!("V{i}"), "v".repeat(990)))
        .collect::<HashMap<_, _>>();
    total.labels = (0..64)
        .map(|i| (format!("k{i:03}{}", "k".repeat(240)), "v".repeat(250)))
        .collect();
    assert_status(
        client.create_sandbox(total).await,
        Code::InvalidArgument,
        &["spec and labels take", "the limit is 524288"],
    );

    let mut image = create_request("image", "", &["true"]);
    image.spec.as_mut().unwrap().image = format!("bad image {huge}");
    let refused = client.create_sandbox(image).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    short(&refused);

    let mut driver_named = create_request("drv", "", &["true"]);
    driver_named.driver = huge.clone();
    let refused = client.create_sandbox(driver_named).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    short(&refused);

    let by_id = client
        .get_sandbox(gw::GetSandboxRequest {
            sandbox: Some(gw::SandboxRef {
                name: String::new(),
                id: huge.clone(),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(by_id.code(), Code::InvalidArgument, "{by_id:?}");
    short(&by_id);

    for token in ["v1.", huge.as_str()] {
        let refused = client
            .list_sandboxes(gw::ListSandboxesRequest {
                page_token: token.to_owned(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{token:.10}: {refused:?}"
        );
        assert!(
            refused.message().contains("next_page_token"),
            "{}",
            refused.message()
        );
        short(&refused);
    }

    let refused = client
        .list_sandboxes(gw::ListSandboxesRequest {
            labels: [(huge.clone(), "v".to_owned())].into_iter().collect(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    short(&refused);

    // A sandbox at the command limit is still fine.
    client
        .create_sandbox(create_request(
            "at-limit",
            "",
            &["sh", "-c", &"x".repeat(250_000)],
        ))
        .await
        .expect("a 250 KB command is within the limits");
}

/// Watching a driver that is not there is NOT_FOUND, as listing it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watching_an_unknown_driver_is_not_found() {
    let dirs = Dirs::new();
    let (_driver, gateway) = one_driver(&dirs, "d", "", &[], &[]).await;
    let mut client = gateway.client().await;
    assert_status(
        client
            .watch_sandboxes(gw::WatchSandboxesRequest {
                driver: "nope".into(),
                name: String::new(),
            })
            .await,
        Code::NotFound,
        &["driver 'nope' is not configured"],
    );
    // The configured one is fine.
    let mut stream = client
        .watch_sandboxes(gw::WatchSandboxesRequest {
            driver: "D".into(),
            name: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(
        matches!(first.payload, Some(Payload::Synced(_))),
        "{first:?}"
    );
}

/// `--max-watches` caps open watches; one more is RESOURCE_EXHAUSTED, and
/// a closed watch frees its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_watches_are_capped() {
    let dirs = Dirs::new();
    let (_driver, gateway) = one_driver(&dirs, "d", "", &[], &["--max-watches", "2"]).await;
    let mut client = gateway.client().await;
    let open = async |client: &mut gw::gateway_client::GatewayClient<_>| {
        client
            .watch_sandboxes(gw::WatchSandboxesRequest::default())
            .await
            .map(tonic::Response::into_inner)
    };
    let first = open(&mut client).await.expect("first watch");
    let _second = open(&mut client).await.expect("second watch");
    assert_status(
        open(&mut client).await,
        Code::ResourceExhausted,
        &["already serves 2 watches", "--max-watches"],
    );
    drop(first);
    wait_until("the closed watch's slot to be free", || {
        let mut client = client.clone();
        async move { open(&mut client).await.is_ok() }
    })
    .await;
}

/// Everything a watch's client should know at the end, from its events.
#[derive(Default)]
struct Picture {
    sandboxes: BTreeMap<String, (u64, i32)>,
}

impl Picture {
    fn apply(&mut self, event: gw::WatchSandboxesEvent) {
        match event.payload {
            Some(Payload::Sandbox(s)) => {
                if let Some((version, _)) = self.sandboxes.get(&s.name) {
                    assert!(
                        *version <= s.resource_version,
                        "{}: version {} after {version}",
                        s.name,
                        s.resource_version
                    );
                }
                self.sandboxes.insert(s.name, (s.resource_version, s.phase));
            }
            Some(Payload::Deleted(d)) => {
                self.sandboxes.remove(&d.name);
            }
            _ => {}
        }
    }
}

/// Every stored sandbox: name → (resource version, phase).
async fn all_sandboxes(
    client: &mut gw::gateway_client::GatewayClient<tonic::transport::Channel>,
) -> BTreeMap<String, (u64, i32)> {
    let mut all = BTreeMap::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_sandboxes(gw::ListSandboxesRequest {
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        for s in page.sandboxes {
            all.insert(s.name, (s.resource_version, s.phase));
        }
        if page.next_page_token.is_empty() {
            return all;
        }
        token = page.next_page_token;
    }
}

/// Hundreds of watches held open and never read cost little memory and
/// no threads; a watch that was not read while thousands of changes
/// went by (more than the gateway keeps) catches up to the exact state,
/// never going back to an older version of a sandbox; and once they all
/// close, the gateway gives back at least 30% of what they (and the
/// changes) grew it by: without a trim, glibc kept 90% of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_watches_are_cheap_and_catch_up() {
    const STORED: usize = 2000;
    const WATCHES: usize = 300;
    let dirs = Dirs::new();
    preload_rows(&dirs.state(), "d", STORED);
    let driver = AttachedDriver::start(
        &dirs.path("d.sock"),
        &dirs.path("calls"),
        &["--preload", &STORED.to_string()],
    );
    let config = attached_config(&dirs, "d", &driver, "");
    let gateway = start_slowly(&dirs, &config).await;
    let mut client = gateway.client().await;
    wait_phase(&mut client, "preload-001999", SandboxPhase::Ready).await;
    let (rss_before, _) = rss_and_threads(gateway.pid());

    // One watch on a connection of its own (unread streams on a shared
    // connection use up its HTTP/2 window, for the others too), then 300
    // more, one connection per 50; none of them read for now.
    let mut watch = gateway
        .client()
        .await
        .watch_sandboxes(gw::WatchSandboxesRequest::default())
        .await
        .expect("open a watch")
        .into_inner();
    let mut held = Vec::new();
    for i in 0..WATCHES {
        if i % 50 == 0 {
            client = gateway.client().await;
        }
        held.push(
            client
                .watch_sandboxes(gw::WatchSandboxesRequest::default())
                .await
                .expect("open a watch")
                .into_inner(),
        );
    }
    // Let every watch go as far as its client's HTTP/2 window lets it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_held, threads) = rss_and_threads(gateway.pid());
    let grown_mib = rss_held.saturating_sub(rss_before) / 1024;
    eprintln!(
        "gateway RSS {rss_before} KiB -> {rss_held} KiB with {WATCHES} unread watches, {threads} threads"
    );
    assert!(
        grown_mib < 60,
        "{WATCHES} unread watches grew the gateway by {grown_mib} MiB"
    );
    assert!(threads < 64, "{threads} threads");

    // Changes while nobody reads: 40 creates of 240 KB sandboxes (more
    // bytes than the change feed keeps), then deletes.
    let script = format!("echo {}", "y".repeat(240_000));
    let mut creator = gateway.client().await;
    for i in 0..40 {
        creator
            .create_sandbox(create_request(
                &format!("churn-{i:02}"),
                "",
                &["sh", "-c", &script],
            ))
            .await
            .expect("create");
    }
    for i in 0..20 {
        creator
            .delete_sandbox(gw::DeleteSandboxRequest {
                sandbox: by_name(&format!("churn-{i:02}")),
            })
            .await
            .expect("delete");
    }
    for i in 0..20 {
        creator
            .delete_sandbox(gw::DeleteSandboxRequest {
                sandbox: by_name(&format!("preload-{i:06}")),
            })
            .await
            .expect("delete");
    }
    wait_phase(&mut creator, "churn-39", SandboxPhase::Ready).await;
    let (rss_after, threads) = rss_and_threads(gateway.pid());
    eprintln!("after the changes: {rss_after} KiB, {threads} threads");
    assert!(threads < 64, "{threads} threads");

    // The first watch now reads everything; its picture must end as the
    // store's.
    let mut picture = Picture::default();
    let started = Instant::now();
    let deadline = started + 4 * PATIENCE;
    loop {
        // Read whatever is there...
        loop {
            match tokio::time::timeout(Duration::from_millis(500), watch.message()).await {
                Ok(Ok(Some(event))) => picture.apply(event),
                Ok(other) => panic!("the watch ended: {other:?}"),
                Err(_) => break,
            }
        }
        // ...and compare with the store.
        let expected = all_sandboxes(&mut creator).await;
        if picture.sandboxes == expected {
            eprintln!("caught up in {:?}", started.elapsed());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the watch never caught up: {} sandboxes, expected {}",
            picture.sandboxes.len(),
            expected.len()
        );
    }

    // Closed, the watches give back what they used: glibc alone would keep
    // it, and the gateway would stay that much larger.
    let pid = gateway.pid();
    let (rss_open, _) = rss_and_threads(pid);
    drop(held);
    drop(watch);
    // glibc alone kept 90% of the growth; trimmed, about half is given back.
    let target = rss_before + rss_open.saturating_sub(rss_before) * 7 / 10;
    wait_until(
        &format!(
            "the gateway to shrink to {target} KiB once its watches closed ({rss_before} KiB \
             before them, {rss_open} KiB with them)"
        ),
        || async move { rss_and_threads(pid).0 <= target },
    )
    .await;
    let (rss_closed, _) = rss_and_threads(pid);
    eprintln!("closed: {rss_open} KiB -> {rss_closed} KiB ({rss_before} KiB before them)");
}

/// A row the gateway cannot read (an undecodable spec, an unknown phase)
/// is set aside at startup, logged with its name and id, and kept in the
/// database; the gateway starts and serves the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_row_is_quarantined_not_fatal() {
    let dirs = Dirs::new();
    let (_driver, mut gateway) = one_driver(&dirs, "d", "", &[], &[]).await;
    let mut client = gateway.client().await;
    create(&mut client, "good", "").await;
    let bad_phase = create(&mut client, "bad-phase", "").await;
    let bad_spec = create(&mut client, "bad-spec", "").await;
    wait_phase(&mut client, "bad-spec", SandboxPhase::Ready).await;
    drop(client);
    assert!(gateway.stop().success());

    let db = dirs.state().join("gateway.db");
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute(
            "UPDATE sandboxes SET phase = 'Exploded' WHERE name = 'bad-phase'",
            [],
        )
        .unwrap();
        conn.execute(
            "UPDATE sandboxes SET spec = X'FFFFFFFFFFFF' WHERE name = 'bad-spec'",
            [],
        )
        .unwrap();
    }

    gateway.restart().await;
    let mut client = gateway.client().await;
    let listed: Vec<String> = client
        .list_sandboxes(gw::ListSandboxesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sandboxes
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(listed, ["good"]);
    let log = gateway.log_text();
    for (row, why) in [
        (&bad_phase, "unknown phase"),
        (&bad_spec, "spec cannot be read"),
    ] {
        let line = log
            .lines()
            .find(|l| l.contains(&row.id) && l.contains("quarantined_sandboxes"))
            .unwrap_or_else(|| panic!("no quarantine line for {}:\n{log}", row.name));
        assert!(line.contains(&row.name) && line.contains(why), "{line}");
    }
    // The rows are kept aside.
    drop(client);
    assert!(gateway.stop().success());
    let conn = rusqlite::Connection::open(&db).unwrap();
    let mut kept: Vec<String> = conn
        .prepare("SELECT name FROM quarantined_sandboxes ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    kept.sort();
    assert_eq!(kept, ["bad-phase", "bad-spec"]);
}
