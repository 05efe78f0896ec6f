//! The driver pulling sandbox images from a real registry (Debian's
//! `docker-registry` on a free local port, plain HTTP, listed in
//! `--insecure-registry`), through its gRPC API, under each image pull
//! policy; and the errors a caller gets when a pull cannot work. Skips with
//! the reason where Podman or `docker-registry` is missing.

mod common;

use common::{
    IMAGE, LONG, Standalone, TestEngine, base_args, engine_or_skip, event_deleted, event_sandbox,
    free_port, get, image_id, ready_condition, ready_true, registry_or_skip, remove_image, sandbox,
    unique, wait_for, watch_until,
};
use openshell_proto::compute::v1::compute_driver_client::ComputeDriverClient;
use openshell_proto::compute::v1::{
    CreateSandboxRequest, DeleteSandboxRequest, DriverSandbox, ValidateSandboxCreateRequest,
    WatchSandboxesEvent, WatchSandboxesRequest, watch_sandboxes_event,
};
use prost_types::value::Kind;
use tonic::transport::Channel;

type Client = ComputeDriverClient<Channel>;

/// `tester` / `right-password`, bcrypt as the registry's htpasswd wants.
const HTPASSWD: &str = "tester:$2b$04$OKt1uCQhQb3HNKT9Q87uY.ch9KPmnA2p6cWkW677FmozItG2XTx3e\n";

async fn create(client: &mut Client, sandbox: &DriverSandbox) -> Result<(), tonic::Status> {
    client
        .create_sandbox(CreateSandboxRequest {
            sandbox: Some(sandbox.clone()),
        })
        .await
        .map(drop)
}

async fn delete(client: &mut Client, id: &str) {
    client
        .delete_sandbox(DeleteSandboxRequest {
            sandbox_id: id.to_owned(),
            sandbox_name: String::new(),
        })
        .await
        .expect("DeleteSandbox");
}

/// A long-running sandbox of `image`, with `policy` as its
/// `image_pull_policy` in driver_config when given.
fn from_image(name: &str, image: &str, policy: Option<&str>) -> DriverSandbox {
    let mut request = sandbox(name, &LONG);
    let template = request
        .spec
        .as_mut()
        .and_then(|s| s.template.as_mut())
        .expect("a template");
    template.image = image.to_owned();
    if let Some(policy) = policy {
        template.driver_config = Some(prost_types::Struct {
            fields: [(
                "image_pull_policy".to_owned(),
                prost_types::Value {
                    kind: Some(Kind::StringValue(policy.to_owned())),
                },
            )]
            .into(),
        });
    }
    request
}

/// The platform event `reason` about sandbox `id`, if `event` is one.
fn platform<'a>(
    event: &'a WatchSandboxesEvent,
    id: &str,
    reason: &str,
) -> Option<&'a openshell_proto::compute::v1::DriverPlatformEvent> {
    match &event.payload {
        Some(watch_sandboxes_event::Payload::PlatformEvent(p)) if p.sandbox_id == id => {
            p.event.as_ref().filter(|e| e.reason == reason)
        }
        _ => None,
    }
}

/// The image id the sandbox's container runs.
fn container_image(engine: &TestEngine, id: &str) -> String {
    let containers = engine.containers_with_label(&format!("openshell.sandbox.id={id}"));
    assert_eq!(containers.len(), 1, "one container for sandbox {id}");
    let output = engine
        .remote()
        .args([
            "container",
            "inspect",
            "--format",
            "{{.Image}}",
            &containers[0],
        ])
        .output()
        .expect("podman container inspect runs");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// A second local image, different from the test image, to push over the
/// same tag.
fn second_image(engine: &TestEngine) -> String {
    let name = format!("localhost/openshell-busybox-rev2-{}:latest", unique("r"));
    let created = engine
        .remote()
        .args(["create", IMAGE, "true"])
        .output()
        .expect("podman create runs");
    assert!(created.status.success(), "podman create: {created:?}");
    let container = String::from_utf8_lossy(&created.stdout).trim().to_owned();
    let committed = engine
        .remote()
        .args([
            "commit",
            "--quiet",
            "--change",
            "LABEL openshell.test.revision=2",
        ])
        .arg(&container)
        .arg(&name)
        .output()
        .expect("podman commit runs");
    let _ = engine.remote().args(["rm", "-f", &container]).output();
    assert!(committed.status.success(), "podman commit: {committed:?}");
    name
}

fn assert_precondition(result: Result<(), tonic::Status>, needles: &[&str]) {
    let status = result.expect_err("the request must fail");
    assert_eq!(
        status.code(),
        tonic::Code::FailedPrecondition,
        "{}",
        status.message()
    );
    for needle in needles {
        assert!(
            status.message().contains(needle),
            "{needle:?} missing from: {}",
            status.message()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_come_from_a_registry_under_each_pull_policy() {
    let registry = registry_or_skip!(None);
    let engine = engine_or_skip!();
    let instance = unique("pull");
    engine.clean_up_instance(&instance);
    let reference = registry.reference("busybox", "latest");
    registry.push(&engine, IMAGE, &reference, None);
    assert!(image_id(&engine, &reference).is_none(), "not local before");

    let unreachable = format!("127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().unwrap();
    let mut args = base_args(&engine, &instance, &dir.path().join("state"));
    args.extend([
        "--insecure-registry".to_owned(),
        registry.host.clone(),
        "--insecure-registry".to_owned(),
        unreachable.clone(),
        "--allow-driver-config=true".to_owned(),
    ]);
    let driver = Standalone::start(dir.path(), &args).await;
    let mut client = driver.client().await;
    let mut watch = client
        .watch_sandboxes(WatchSandboxesRequest {})
        .await
        .unwrap()
        .into_inner();

    // `never` refuses an image the store lacks, at validate and at create.
    let never = from_image("never", &reference, Some("never"));
    let validated = client
        .validate_sandbox_create(ValidateSandboxCreateRequest {
            sandbox: Some(never.clone()),
        })
        .await
        .map(drop);
    assert_precondition(validated, &[&reference, "\"never\""]);
    assert_precondition(
        create(&mut client, &never).await,
        &[&reference, "\"never\""],
    );

    // The default policy (missing) pulls, announces it, and runs it.
    let first = from_image("first", &reference, None);
    create(&mut client, &first).await.expect("create pulls");
    let seen = watch_until(&mut watch, "the Pulled event", |e| {
        platform(e, &first.id, "Pulled").is_some()
    })
    .await;
    assert!(
        seen.iter()
            .any(|e| platform(e, &first.id, "Pulling").is_some()),
        "a Pulling event came before: {seen:#?}"
    );
    assert!(
        seen.iter().any(|e| event_sandbox(e).is_some_and(|s| {
            s.id == first.id
                && ready_condition(s).is_some_and(|(status, reason, message)| {
                    status == "False" && reason == "Pulling" && message.contains("pulling image")
                })
        })),
        "the sandbox showed Ready=False, pulling, while pulling: {seen:#?}"
    );
    let pulled = seen
        .last()
        .and_then(|e| platform(e, &first.id, "Pulled"))
        .expect("Pulled");
    assert!(
        pulled
            .metadata
            .get("digest")
            .is_some_and(|d| d.starts_with("sha256:")),
        "{pulled:?}"
    );
    assert!(pulled.message.contains(&reference), "{pulled:?}");
    wait_for(
        &mut client,
        &first.id,
        "the pulled sandbox to run",
        ready_true,
    )
    .await;
    let rev1 = image_id(&engine, &reference).expect("pulled into the local store");
    assert_eq!(container_image(&engine, &first.id), rev1);

    // A new image under the same tag: `missing` keeps the local one,
    // `always` pulls the new one.
    let rev2_local = second_image(&engine);
    let rev2 = image_id(&engine, &rev2_local).expect("second image");
    assert_ne!(rev1, rev2);
    let push = engine
        .remote()
        .args(["push", "--tls-verify=false", &rev2_local, &reference])
        .output()
        .expect("podman push runs");
    assert!(push.status.success(), "push rev2: {push:?}");
    let kept = from_image("kept", &reference, Some("missing"));
    create(&mut client, &kept).await.expect("create, no pull");
    assert_eq!(
        container_image(&engine, &kept.id),
        rev1,
        "missing does not pull"
    );
    let again = from_image("again", &reference, Some("always"));
    create(&mut client, &again).await.expect("create re-pulls");
    assert_eq!(container_image(&engine, &again.id), rev2, "always pulls");
    // The first image back under the tag: `newer` sees the registry's
    // digest differ from the local one and pulls it.
    let push = engine
        .remote()
        .args(["push", "--tls-verify=false", IMAGE, &reference])
        .output()
        .expect("podman push runs");
    assert!(push.status.success(), "push rev1 again: {push:?}");
    let newer = from_image("newer", &reference, Some("newer"));
    create(&mut client, &newer)
        .await
        .expect("create pulls newer");
    assert_eq!(container_image(&engine, &newer.id), rev1, "newer pulls");

    // A tag the registry lacks and a registry nobody listens on.
    let missing_tag = registry.reference("busybox", "no-such-tag");
    assert_precondition(
        create(&mut client, &from_image("tag", &missing_tag, None)).await,
        &[&missing_tag, "no such image or tag"],
    );
    let nowhere = format!("{unreachable}/openshell/busybox:latest");
    let failed = from_image("nowhere", &nowhere, None);
    assert_precondition(
        create(&mut client, &failed).await,
        &[&nowhere, "cannot be reached"],
    );
    // Its Pulling placeholder is gone with the failed create.
    let seen = watch_until(&mut watch, "the failed pull's sandbox to go", |e| {
        event_deleted(e) == Some(failed.id.as_str())
    })
    .await;
    assert!(
        seen.iter()
            .any(|e| platform(e, &failed.id, "PullFailed").is_some()),
        "{seen:#?}"
    );
    let gone = get(&mut client, &failed.id).await.expect_err("no sandbox");
    assert_eq!(gone.code(), tonic::Code::NotFound, "{gone:?}");
    // Plain HTTP without --insecure-registry fails on TLS, and says what
    // to set.
    let via_localhost = reference.replacen("127.0.0.1", "localhost", 1);
    assert_precondition(
        create(&mut client, &from_image("tls", &via_localhost, None)).await,
        &[&via_localhost, "insecure_registries"],
    );

    for id in [&first.id, &kept.id, &again.id, &newer.id] {
        delete(&mut client, id).await;
    }
    let _ = engine
        .remote()
        .args(["rmi", "--ignore", &reference, &rev2_local])
        .output();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_credentials_come_from_the_engines_auth_file() {
    let registry = registry_or_skip!(Some(HTPASSWD));
    // Podman's API service reads `${XDG_RUNTIME_DIR}/containers/auth.json`.
    let runtime_dir = tempfile::tempdir().unwrap();
    let auth_file = runtime_dir.path().join("containers").join("auth.json");
    std::fs::create_dir_all(auth_file.parent().unwrap()).unwrap();
    let auth = |password: &str| {
        use std::io::Write as _;
        let mut token = Vec::new();
        let _ = write!(token, "tester:{password}");
        let encoded = base64_encode(&token);
        format!(
            r#"{{"auths":{{"{}":{{"auth":"{encoded}"}}}}}}"#,
            registry.host
        )
    };
    std::fs::write(&auth_file, auth("wrong-password")).unwrap();
    let runtime_path = runtime_dir.path().display().to_string();
    let engine = match TestEngine::start_with_env(&[("XDG_RUNTIME_DIR", &runtime_path)]) {
        Ok(engine) => engine,
        Err(reason) => {
            eprintln!("skipped: {reason}");
            return;
        }
    };
    let instance = unique("auth");
    engine.clean_up_instance(&instance);
    let reference = registry.reference("private", "latest");
    registry.push(&engine, IMAGE, &reference, Some("tester:right-password"));

    let dir = tempfile::tempdir().unwrap();
    let mut args = base_args(&engine, &instance, &dir.path().join("state"));
    args.extend(["--insecure-registry".to_owned(), registry.host.clone()]);
    let driver = Standalone::start(dir.path(), &args).await;
    let mut client = driver.client().await;

    assert_precondition(
        create(&mut client, &from_image("denied", &reference, None)).await,
        &[&reference, "credentials", "podman login"],
    );

    // The right password in the same file: the next pull uses it.
    std::fs::write(&auth_file, auth("right-password")).unwrap();
    let allowed = from_image("allowed", &reference, None);
    create(&mut client, &allowed)
        .await
        .expect("pulls with the engine's credentials");
    wait_for(&mut client, &allowed.id, "the sandbox to run", ready_true).await;
    delete(&mut client, &allowed.id).await;
    remove_image(&engine, &reference);
}

/// Standard base64 with padding, for the auth file.
fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn base64_matches_the_standard_alphabet() {
    assert_eq!(base64_encode(b"tester:x"), "dGVzdGVyOng=");
    assert_eq!(base64_encode(b"ab"), "YWI=");
    assert_eq!(base64_encode(b"abc"), "YWJj");
}
