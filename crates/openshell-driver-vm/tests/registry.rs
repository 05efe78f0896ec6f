//! Registry pulls against a real registry: Debian's `docker-registry` (the
//! CNCF distribution server) on 127.0.0.1, fed with `skopeo`, unpacked with
//! `umoci`. Each test skips itself, saying why, where one of them is
//! missing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::busybox_rootfs;
use openshell_driver_vm::config::ConfigArgs;
use openshell_driver_vm::error::Error;
use openshell_driver_vm::image::{self, ImageCache, ResolvedImage};
use openshell_driver_vm::registry::Puller;

const REGISTRY: &str = "/usr/bin/docker-registry";

/// Why this host cannot run these tests, if it cannot.
fn missing_tools() -> Option<String> {
    if !Path::new(REGISTRY).exists() {
        return Some("no /usr/bin/docker-registry (apt-get install docker-registry)".into());
    }
    for tool in ["skopeo", "umoci"] {
        if image::find_tool(tool).is_none() {
            return Some(format!("{tool} is not on PATH (apt-get install {tool})"));
        }
    }
    if !["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .any(|p| Path::new(p).is_file())
    {
        return Some("no busybox (apt-get install busybox-static)".into());
    }
    None
}

macro_rules! require_tools {
    () => {
        if let Some(why) = missing_tools() {
            eprintln!("skipped: {why}");
            return;
        }
    };
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

/// A `docker-registry` serving plain HTTP; killed when dropped.
struct TestRegistry {
    child: Child,
    host: String,
    log: PathBuf,
}

impl TestRegistry {
    /// Starts one storing under `dir`; with `htpasswd`, every request
    /// needs those credentials.
    fn start(dir: &Path, htpasswd: Option<&Path>) -> Self {
        let host = format!("127.0.0.1:{}", free_port());
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {host}\n",
            dir.join("data").display()
        );
        if let Some(path) = htpasswd {
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: openshell-test\n    path: {}\n",
                path.display()
            ));
        }
        std::fs::create_dir_all(dir).expect("create the registry dir");
        let config_path = dir.join("registry.yml");
        std::fs::write(&config_path, config).expect("write registry.yml");
        let log = dir.join("registry.log");
        let child = Command::new(REGISTRY)
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("create registry.log"))
            .stderr(std::fs::File::create(dir.join("registry.err")).expect("create registry.err"))
            .spawn()
            .expect("start docker-registry");
        let mut registry = Self { child, host, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&registry.host).is_err() {
            if let Ok(Some(status)) = registry.child.try_wait() {
                panic!(
                    "docker-registry exited early ({status}): {}",
                    std::fs::read_to_string(dir.join("registry.err")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen within 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        registry
    }

    fn reference(&self, tag: &str) -> String {
        format!("{}/openshell/busybox:{tag}", self.host)
    }

    /// Copies the OCI layout's `v1` image to `tag` here.
    fn push(&self, layout: &Path, tag: &str, creds: Option<&str>) {
        self.push_as(layout, tag, creds, None);
    }

    /// [`Self::push`], converting to skopeo's manifest `format` (`v2s2`:
    /// Docker schema 2 media types) where given.
    fn push_as(&self, layout: &Path, tag: &str, creds: Option<&str>, format: Option<&str>) {
        let mut command = Command::new("skopeo");
        command
            .arg("copy")
            .arg("--quiet")
            .arg("--dest-tls-verify=false");
        if let Some(creds) = creds {
            command.arg(format!("--dest-creds={creds}"));
        }
        if let Some(format) = format {
            command.arg(format!("--format={format}"));
        }
        let out = command
            .arg(format!("oci:{}:v1", layout.display()))
            .arg(format!("docker://{}", self.reference(tag)))
            .output()
            .expect("run skopeo");
        assert!(
            out.status.success(),
            "skopeo copy failed: {}\nregistry log: {}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An OCI layout at `dir` with one busybox image tagged `v1`.
fn busybox_layout(dir: &Path) -> PathBuf {
    let layout = dir.join("layout");
    let bundle = dir.join("bundle");
    let layout_s = layout.display().to_string();
    let umoci = |args: &[&str]| {
        let status = Command::new("umoci")
            .args(args)
            .stderr(Stdio::null())
            .status()
            .expect("run umoci");
        assert!(status.success(), "umoci {args:?}");
    };
    umoci(&["init", "--layout", &layout_s]);
    umoci(&["new", "--image", &format!("{layout_s}:v1")]);
    let bundle_s = bundle.display().to_string();
    umoci(&["unpack", "--image", &format!("{layout_s}:v1"), &bundle_s]);
    busybox_rootfs(&bundle.join("rootfs")).expect("a busybox root filesystem");
    umoci(&["repack", "--image", &format!("{layout_s}:v1"), &bundle_s]);
    umoci(&[
        "config",
        "--image",
        &format!("{layout_s}:v1"),
        "--config.cmd",
        "/bin/sh",
    ]);
    layout
}

fn auth_file(dir: &Path, host: &str, user_pass: &str) -> PathBuf {
    use base64::Engine as _;
    let path = dir.join("auth.json");
    let auth = base64::engine::general_purpose::STANDARD.encode(user_pass);
    std::fs::write(
        &path,
        format!(r#"{{"auths": {{"{host}": {{"auth": "{auth}"}}}}}}"#),
    )
    .expect("write the auth file");
    path
}

/// A puller for a driver with its state under `state`, treating
/// `insecure` as plain-HTTP registries and reading credentials from
/// `auth` (an empty auth file where `None`, so the host's own files are
/// never consulted).
fn new_puller(state: &Path, insecure: &[&str], auth: Option<PathBuf>) -> Puller {
    std::fs::create_dir_all(state).expect("create the state dir");
    let auth = auth.unwrap_or_else(|| {
        let path = state.join("no-auth.json");
        std::fs::write(&path, r#"{"auths": {}}"#).expect("write an empty auth file");
        path
    });
    let config = ConfigArgs {
        state_dir: Some(state.to_owned()),
        insecure_registries: insecure.iter().map(|s| (*s).to_owned()).collect(),
        registry_auth_file: Some(auth),
        pull_timeout_secs: Some(60),
        ..ConfigArgs::default()
    }
    .resolve()
    .expect("a valid config");
    Puller::new(&config, &ImageCache::new(state.join("images"))).expect("a puller")
}

/// What a boot does with an image pinned at create: fetch its layers, then
/// unpack it.
async fn ensure(puller: &Puller, image: &ResolvedImage) -> PathBuf {
    image::fetch_layers(image, puller)
        .await
        .expect("the layers are fetched");
    let cache = puller.cache().clone();
    let image = image.clone();
    tokio::task::spawn_blocking(move || cache.ensure(&image))
        .await
        .expect("the unpack task")
        .expect("the image unpacks")
}

/// Blob file names and inodes of the pulled layout (a re-download would
/// write a new file under the same name).
fn blob_files(puller: &Puller) -> Vec<(String, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let mut out: Vec<(String, u64)> = std::fs::read_dir(puller.layout().join("blobs/sha256"))
        .expect("list the pulled blobs")
        .map(|e| {
            let e = e.expect("a blob entry");
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().expect("blob metadata").ino(),
            )
        })
        .collect();
    out.sort();
    out
}

fn precondition(result: Result<ResolvedImage, Error>) -> String {
    match result {
        Err(Error::FailedPrecondition(message)) => message,
        other => panic!("expected FailedPrecondition, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_pulled_cached_and_failures_explained() {
    require_tools!();
    let tmp = tempfile::tempdir().unwrap();
    let layout = busybox_layout(tmp.path());
    let mut registry = TestRegistry::start(&tmp.path().join("registry"), None);
    registry.push(&layout, "latest", None);
    let host = registry.host.clone();
    let reference = registry.reference("latest");

    // Two creates of the same image at once share one cache safely.
    let state = tmp.path().join("state");
    let puller = new_puller(&state, &[&host], None);
    let (a, b) = tokio::join!(
        image::resolve(&reference, &puller),
        image::resolve(&reference, &puller)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a, b);
    let ResolvedImage::Oci {
        digest,
        config,
        path,
        archive,
        ..
    } = &a
    else {
        panic!("expected an OCI image: {a:?}");
    };
    assert_eq!(path, puller.layout());
    assert!(!archive);
    assert_eq!(config.cmd, ["/bin/sh"]);
    // Create time fetched the manifest and the config only (within the
    // gateway's call timeout); the layer comes with the boot.
    let at_create = blob_files(&puller);
    assert_eq!(at_create.len(), 2, "manifest and config: {at_create:?}");
    let rootfs = ensure(&puller, &a).await;
    assert_eq!(blob_files(&puller).len(), 3, "and the layer at boot");
    assert!(rootfs.join("bin/busybox").is_file(), "{}", rootfs.display());
    assert!(rootfs.join("bin/sh").symlink_metadata().is_ok());

    // By tag again: the manifest is asked for, nothing is downloaded.
    let blobs = blob_files(&puller);
    let again = image::resolve(&reference, &puller).await.unwrap();
    assert_eq!(again, a);
    assert_eq!(blob_files(&puller), blobs, "no blob was fetched again");

    // A tag that is not there.
    let missing = precondition(image::resolve(&registry.reference("nope"), &puller).await);
    eprintln!("missing tag: {missing}");
    assert!(
        missing.contains("no such image or tag") && missing.contains("\"nope\""),
        "{missing}"
    );

    // Docker schema 2 media types (what `docker push` writes): umoci
    // takes only OCI ones, and gets the same image with those.
    registry.push_as(&layout, "docker", None, Some("v2s2"));
    let docker = image::resolve(&registry.reference("docker"), &puller)
        .await
        .unwrap();
    assert_ne!(docker.cache_key(), a.cache_key(), "another manifest");
    assert_eq!(docker.config().cmd, ["/bin/sh"]);
    let docker_rootfs = ensure(&puller, &docker).await;
    assert!(docker_rootfs.join("bin/busybox").is_file());
    let blobs = blob_files(&puller);

    // Plain HTTP registry not declared insecure: TLS fails, and the
    // message says what to configure.
    let strict = new_puller(&tmp.path().join("strict"), &[], None);
    let tls = precondition(image::resolve(&reference, &strict).await);
    eprintln!("not insecure: {tls}");
    assert!(
        tls.contains("insecure_registries") && tls.contains(&host),
        "{tls}"
    );

    // With the registry gone, a digest already pulled still resolves (and
    // needs nothing from the network); a tag does not.
    registry.stop();
    let by_digest = format!("{host}/openshell/busybox@{digest}");
    let offline = image::resolve(&by_digest, &puller).await.unwrap();
    assert_eq!(offline.cache_key(), a.cache_key());
    assert_eq!(blob_files(&puller), blobs);
    let gone = precondition(image::resolve(&reference, &puller).await);
    eprintln!("registry stopped: {gone}");
    assert!(gone.contains("cannot be reached"), "{gone}");

    // Nothing listening at all.
    let port = free_port();
    let nowhere = format!("127.0.0.1:{port}");
    let unreachable_puller = new_puller(&tmp.path().join("nowhere"), &[&nowhere], None);
    let refused =
        precondition(image::resolve(&format!("{nowhere}/x/y:1"), &unreachable_puller).await);
    eprintln!("nothing listening: {refused}");
    assert!(
        refused.contains("cannot be reached") && refused.contains(&nowhere),
        "{refused}"
    );
    assert!(refused.len() < 1000, "bounded: {refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_credentials_come_from_the_auth_file() {
    require_tools!();
    let tmp = tempfile::tempdir().unwrap();
    let layout = busybox_layout(tmp.path());
    let htpasswd = tmp.path().join("htpasswd");
    let hash = bcrypt::hash("right-password", 4).unwrap();
    std::fs::write(&htpasswd, format!("tester:{hash}\n")).unwrap();
    let registry = TestRegistry::start(&tmp.path().join("registry"), Some(&htpasswd));
    registry.push(&layout, "latest", Some("tester:right-password"));
    let host = registry.host.clone();
    let reference = registry.reference("latest");

    let wrong_dir = tmp.path().join("wrong");
    std::fs::create_dir_all(&wrong_dir).unwrap();
    let wrong = auth_file(&wrong_dir, &host, "tester:wrong-password");
    let denied = precondition(
        image::resolve(
            &reference,
            &new_puller(&wrong_dir.join("state"), &[&host], Some(wrong.clone())),
        )
        .await,
    );
    eprintln!("wrong credentials: {denied}");
    assert!(
        denied.contains("credentials") && denied.contains(&wrong.display().to_string()),
        "{denied}"
    );

    let anonymous = precondition(
        image::resolve(
            &reference,
            &new_puller(&tmp.path().join("anon"), &[&host], None),
        )
        .await,
    );
    eprintln!("anonymous: {anonymous}");
    assert!(anonymous.contains("credentials"), "{anonymous}");

    let right_dir = tmp.path().join("right");
    std::fs::create_dir_all(&right_dir).unwrap();
    let right = auth_file(&right_dir, &host, "tester:right-password");
    let puller = new_puller(&right_dir.join("state"), &[&host], Some(right));
    let image = image::resolve(&reference, &puller).await.unwrap();
    let rootfs = ensure(&puller, &image).await;
    assert!(rootfs.join("bin/busybox").is_file());
}

#[test]
fn a_malformed_auth_file_stops_the_driver_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("auth.json");
    std::fs::write(&bad, "{\"auths\": {\"r\": {\"auth\": \"%%%\"}}}").unwrap();
    let config = ConfigArgs {
        state_dir: Some(tmp.path().join("state")),
        registry_auth_file: Some(bad.clone()),
        ..ConfigArgs::default()
    }
    .resolve()
    .unwrap();
    let err = Puller::new(&config, &ImageCache::new(tmp.path().join("images")))
        .unwrap_err()
        .to_string();
    assert!(err.contains(&bad.display().to_string()), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_never_answers_is_given_up_on_in_time() {
    // Connections are accepted by the kernel; nothing ever answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let auth = tmp.path().join("auth.json");
    std::fs::write(&auth, r#"{"auths": {}}"#).unwrap();
    let config = ConfigArgs {
        state_dir: Some(tmp.path().join("state")),
        insecure_registries: vec![host.clone()],
        registry_auth_file: Some(auth),
        pull_timeout_secs: Some(1),
        ..ConfigArgs::default()
    }
    .resolve()
    .unwrap();
    let puller = Puller::new(&config, &ImageCache::new(tmp.path().join("images"))).unwrap();
    let started = Instant::now();
    let message = precondition(image::resolve(&format!("{host}/silent/image:1"), &puller).await);
    eprintln!("silent registry: {message}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(
        message.contains("pull_timeout_secs") || message.contains("cannot be reached"),
        "{message}"
    );
    drop(listener);
}
