//! `lazy_watch_headers` over a real gRPC connection: the client's
//! WatchSandboxes call gets no response until there is a first event.

use std::path::PathBuf;
use std::time::Duration;

use openshell_proto::compute::v1::compute_driver_client::ComputeDriverClient;
use openshell_proto::compute::v1::compute_driver_server::ComputeDriverServer;
use openshell_proto::compute::v1::watch_sandboxes_event::Payload;
use openshell_proto::compute::v1::{
    CreateSandboxRequest, DriverSandbox, DriverSandboxSpec, WatchSandboxesRequest,
};
use openshell_test_driver::{Behaviour, TestDriver};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Channel;

/// Serves `behaviour` on a fresh socket; returns a client and the socket
/// path (removed by the caller).
async fn serve(behaviour: Behaviour, tag: &str) -> (ComputeDriverClient<Channel>, PathBuf) {
    let socket = std::env::temp_dir().join(format!(
        "test-driver-lazy-{tag}-{}.sock",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&socket);
    let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
    let driver = TestDriver::new(behaviour);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ComputeDriverServer::new(driver))
            .serve_with_incoming(UnixListenerStream::new(listener)),
    );
    let endpoint = driver_lifecycle::DriverEndpoint::new(tag, &socket);
    let channel = driver_lifecycle::connect_with(&endpoint, driver_lifecycle::DialPolicy::ONCE)
        .await
        .expect("connect");
    (ComputeDriverClient::new(channel), socket)
}

fn sandbox(id: &str, name: &str) -> DriverSandbox {
    DriverSandbox {
        id: id.into(),
        name: name.into(),
        spec: Some(DriverSandboxSpec::default()),
        ..Default::default()
    }
}

fn lazy() -> Behaviour {
    Behaviour {
        provision_delay: Duration::from_millis(1),
        lazy_watch_headers: true,
        ..Behaviour::default()
    }
}

#[tokio::test]
async fn a_lazy_watch_answers_only_with_its_first_event() {
    let (client, socket) = serve(lazy(), "empty").await;
    let mut watcher = client.clone();
    let mut call = tokio::spawn(async move {
        watcher
            .watch_sandboxes(WatchSandboxesRequest {})
            .await
            .map(tonic::Response::into_inner)
    });
    // No sandboxes, so no event: the call must still be waiting.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut call)
            .await
            .is_err(),
        "WatchSandboxes answered before it had an event"
    );

    let mut creator = client;
    creator
        .create_sandbox(CreateSandboxRequest {
            sandbox: Some(sandbox("s1", "one")),
        })
        .await
        .expect("create");
    let mut stream = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the watch answers once a sandbox exists")
        .expect("task")
        .expect("watch");
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("first event")
        .expect("stream open")
        .expect("not an error");
    match first.payload {
        Some(Payload::Sandbox(s)) => {
            assert_eq!(s.sandbox.expect("sandbox").id, "s1");
        }
        other => panic!("expected the sandbox first, got {other:?}"),
    }
    let _ = std::fs::remove_file(socket);
}

#[tokio::test]
async fn a_lazy_watch_with_sandboxes_answers_with_the_snapshot() {
    let (mut client, socket) = serve(lazy(), "snapshot").await;
    client
        .create_sandbox(CreateSandboxRequest {
            sandbox: Some(sandbox("s1", "one")),
        })
        .await
        .expect("create");
    let mut stream = tokio::time::timeout(
        Duration::from_secs(10),
        client.watch_sandboxes(WatchSandboxesRequest {}),
    )
    .await
    .expect("answers: the snapshot is an event")
    .expect("watch")
    .into_inner();
    let first = stream.next().await.expect("open").expect("ok");
    assert!(matches!(first.payload, Some(Payload::Sandbox(_))));
    let _ = std::fs::remove_file(socket);
}

#[tokio::test]
async fn an_eager_watch_answers_with_no_sandboxes() {
    let behaviour = Behaviour {
        lazy_watch_headers: false,
        ..lazy()
    };
    let (mut client, socket) = serve(behaviour, "eager").await;
    tokio::time::timeout(
        Duration::from_secs(10),
        client.watch_sandboxes(WatchSandboxesRequest {}),
    )
    .await
    .expect("the default answers without an event")
    .expect("watch");
    let _ = std::fs::remove_file(socket);
}
