//! Pulling images from OCI registries.
//!
//! A registry image is fetched with the OCI distribution API into one OCI
//! image layout the driver owns, `<state>/images/.registry` (blobs only,
//! each written under its verified digest). From there it takes the same
//! path as a local layout: it is pinned to a manifest digest and unpacked
//! once per digest by [`crate::image::ImageCache::ensure`].
//!
//! A pull comes in two halves. At create (and ValidateSandboxCreate) only
//! the manifests and the config are fetched ([`Puller::pull`]): that pins
//! the digest, gives the guest command, and turns a missing tag, an
//! unreachable registry or refused credentials into FAILED_PRECONDITION
//! within the gateway's call timeout. The layers, the bulk, are fetched
//! by the sandbox's boot ([`Puller::pull_layers`], while it is
//! Provisioning), and again there after a restart if something pruned
//! them.
//!
//! A tag is always re-resolved against the registry (a HEAD of the
//! manifest); a manifest, config or layer already in the layout is never
//! fetched again, and the layers of a manifest whose root filesystem is
//! already in the cache are not fetched at all.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Reference, manifest};
use serde::Deserialize;
use sha2::Digest as _;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::image::{self, ImageCache};

/// Directory name of the pulled layout inside the image cache. It starts
/// with a dot so cache listings and entry pruning leave it alone.
pub const LAYOUT_DIR: &str = ".registry";
/// Manifests (and indexes) are small; anything larger is refused.
const MANIFEST_LIMIT: usize = 4 << 20;
/// Longest registry-provided detail kept in an error message.
const DETAIL_LIMIT: usize = 300;
const ACCEPTED_MANIFESTS: [&str; 4] = [
    manifest::OCI_IMAGE_MEDIA_TYPE,
    manifest::IMAGE_MANIFEST_MEDIA_TYPE,
    manifest::OCI_IMAGE_INDEX_MEDIA_TYPE,
    manifest::IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// Parses a registry reference the way Docker does: no registry host means
/// `docker.io`, a one-component Docker Hub name gets `library/`, no tag or
/// digest means `latest`.
pub fn parse_reference(reference: &str) -> Result<Reference> {
    Reference::try_from(reference).map_err(|e| {
        Error::InvalidArgument(format!(
            "image {reference:?} is neither a local image (oci:/path[:tag], \
             oci-archive:/path.tar[:tag], rootfs:/path, or an absolute path) nor a registry \
             reference such as registry.example:5000/repo/name:tag ({e})"
        ))
    })
}

/// One set of credentials from an auth file.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Deserialize)]
struct AuthFileJson {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntryJson>,
}

#[derive(Debug, Deserialize)]
struct AuthEntryJson {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// A parsed containers/docker auth file: `{"auths": {KEY: {"auth":
/// base64("user:pass")}}}`, where KEY is `HOST[:PORT]`, optionally followed
/// by a repository path, or a URL as Docker writes it. Other top-level keys
/// (`credsStore`, `credHelpers`, ...) are ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthFile {
    pub path: PathBuf,
    /// Normalized key (`host[:port][/path]`, lowercase host) → credentials.
    entries: BTreeMap<String, Credentials>,
}

/// `https://index.docker.io/v1/` → `index.docker.io`; `Host:5000/ns/repo`
/// → `host:5000/ns/repo`. Keys given as URLs name a whole registry.
fn normalize_auth_key(key: &str) -> String {
    let key = key.trim();
    let (url, rest) = match key.split_once("://") {
        Some((_, rest)) => (true, rest),
        None => (false, key),
    };
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host = host.to_ascii_lowercase();
    let path = path.trim_matches('/');
    if url || path.is_empty() {
        host
    } else {
        format!("{host}/{path}")
    }
}

/// The names Docker Hub goes by in auth files.
const DOCKER_HUB_ALIASES: [&str; 3] = ["docker.io", "index.docker.io", "registry-1.docker.io"];

impl AuthFile {
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let bad = |message: String| Error::RegistryAuth {
            path: path.to_owned(),
            message,
        };
        let json: AuthFileJson = serde_json::from_str(text).map_err(|e| {
            bad(format!(
                "not a valid auth file ({e}); expected {{\"auths\": {{\"HOST:PORT\": {{\"auth\": \
                 \"BASE64(user:password)\"}}}}}}"
            ))
        })?;
        let mut entries = BTreeMap::new();
        for (key, entry) in json.auths {
            let credentials = match (&entry.auth, &entry.username, &entry.password) {
                (Some(auth), _, _) if !auth.is_empty() => {
                    let decoded = base64::engine::general_purpose::STANDARD
                        .decode(auth.trim())
                        .ok()
                        .and_then(|bytes| String::from_utf8(bytes).ok())
                        .ok_or_else(|| {
                            bad(format!(
                                "entry {key:?}: \"auth\" is not base64 of user:password"
                            ))
                        })?;
                    let (username, password) = decoded.split_once(':').ok_or_else(|| {
                        bad(format!(
                            "entry {key:?}: \"auth\" decodes to no user:password pair"
                        ))
                    })?;
                    Credentials {
                        username: username.to_owned(),
                        password: password.to_owned(),
                    }
                }
                (_, Some(username), Some(password)) => Credentials {
                    username: username.clone(),
                    password: password.clone(),
                },
                // Entries for credential helpers or identity tokens carry
                // nothing usable here.
                _ => continue,
            };
            entries.insert(normalize_auth_key(&key), credentials);
        }
        Ok(Self {
            path: path.to_owned(),
            entries,
        })
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::RegistryAuth {
            path: path.to_owned(),
            message: format!("cannot be read: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// The credentials for `repository` on `registry`: the entry for the
    /// longest matching `registry/repo-prefix`, else the one for the
    /// registry itself. Returns the key that matched.
    pub fn lookup(&self, registry: &str, repository: &str) -> Option<(&str, &Credentials)> {
        let registry = registry.to_ascii_lowercase();
        let hosts: Vec<&str> = if DOCKER_HUB_ALIASES.contains(&registry.as_str()) {
            DOCKER_HUB_ALIASES.to_vec()
        } else {
            vec![registry.as_str()]
        };
        let mut prefixes: Vec<&str> = repository
            .match_indices('/')
            .map(|(i, _)| &repository[..i])
            .collect();
        prefixes.push(repository);
        prefixes.reverse();
        for host in &hosts {
            for prefix in &prefixes {
                let key = format!("{host}/{prefix}");
                if let Some((key, credentials)) = self.entries.get_key_value(&key) {
                    return Some((key.as_str(), credentials));
                }
            }
        }
        hosts.iter().find_map(|host| {
            self.entries
                .get_key_value(*host)
                .map(|(key, credentials)| (key.as_str(), credentials))
        })
    }
}

/// The standard places of an auth file, in the order they are consulted:
/// `$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`,
/// `$HOME/.docker/config.json`.
pub fn auth_file_candidates(
    registry_auth_file: Option<OsString>,
    xdg_runtime_dir: Option<OsString>,
    home: Option<OsString>,
) -> Vec<PathBuf> {
    let nonempty = |v: Option<OsString>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    let mut out = Vec::new();
    out.extend(nonempty(registry_auth_file));
    out.extend(nonempty(xdg_runtime_dir).map(|d| d.join("containers/auth.json")));
    out.extend(nonempty(home).map(|h| h.join(".docker/config.json")));
    out
}

/// Where credentials come from: the file given in the settings (which must
/// exist), else the first standard place that holds a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthSource {
    Configured(PathBuf),
    Standard(Vec<PathBuf>),
}

impl AuthSource {
    pub fn from_config(config: &Config) -> Self {
        match &config.registry_auth_file {
            Some(path) => Self::Configured(path.clone()),
            None => Self::Standard(auth_file_candidates(
                std::env::var_os("REGISTRY_AUTH_FILE"),
                std::env::var_os("XDG_RUNTIME_DIR"),
                std::env::var_os("HOME"),
            )),
        }
    }

    /// The auth file in effect now, parsed; `None`: pull anonymously.
    pub fn load(&self) -> Result<Option<AuthFile>> {
        match self {
            Self::Configured(path) => AuthFile::read(path).map(Some),
            Self::Standard(candidates) => candidates
                .iter()
                .find(|p| p.is_file())
                .map(|p| AuthFile::read(p))
                .transpose(),
        }
    }

    /// For messages when no auth file was found: where it was looked for.
    fn describe_missing(&self) -> String {
        match self {
            Self::Configured(path) => format!("auth file {}", path.display()),
            Self::Standard(candidates) if candidates.is_empty() => {
                "no auth file (none of REGISTRY_AUTH_FILE, XDG_RUNTIME_DIR or HOME is set)"
                    .to_owned()
            }
            Self::Standard(candidates) => format!(
                "no auth file (looked for {})",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// Pulls registry images into the driver's layout.
#[derive(Debug)]
pub struct Puller {
    layout: PathBuf,
    cache: ImageCache,
    insecure: Vec<String>,
    auth: AuthSource,
    timeout: Duration,
}

/// Distinguishes the temporary files of concurrent downloads.
static DOWNLOADS: AtomicU64 = AtomicU64::new(0);

/// What one pull is about, for error messages.
struct PullContext<'a> {
    source: &'a str,
    reference: &'a Reference,
    insecure: bool,
    credentials: String,
}

impl Puller {
    /// Reads the auth file once, so that a malformed one stops the driver
    /// at startup rather than at the first pull.
    pub fn new(config: &Config, cache: &ImageCache) -> Result<Self> {
        let auth = AuthSource::from_config(config);
        if let Some(file) = auth.load()? {
            tracing::debug!(auth_file = %file.path.display(), entries = file.entries.len(), "registry auth file read");
        }
        // reqwest is built without a default rustls provider: use ring,
        // as the rest of the workspace does. Already installed is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Ok(Self {
            layout: cache.dir().join(LAYOUT_DIR),
            cache: cache.clone(),
            insecure: config.insecure_registries.clone(),
            auth,
            timeout: config.pull_timeout,
        })
    }

    pub fn cache(&self) -> &ImageCache {
        &self.cache
    }

    /// The OCI layout pulled images are kept in.
    pub fn layout(&self) -> &Path {
        &self.layout
    }

    fn is_insecure(&self, registry: &str) -> bool {
        let registry = registry.to_ascii_lowercase();
        self.insecure.contains(&registry)
    }

    fn client(&self) -> oci_client::Client {
        let insecure: Vec<String> = self.insecure.clone();
        oci_client::Client::new(oci_client::client::ClientConfig {
            protocol: oci_client::client::ClientProtocol::HttpsExcept(insecure),
            connect_timeout: Some(Duration::from_secs(30).min(self.timeout)),
            read_timeout: Some(Duration::from_secs(60).min(self.timeout)),
            // The driver picks the platform itself (see image.rs).
            platform_resolver: None,
            ..Default::default()
        })
    }

    /// Fetches the manifests and config of what `reference` names into the
    /// layout and returns the digest it resolved to (a manifest, or an
    /// index to be followed to this host's platform). The layers are left
    /// to [`Self::pull_layers`].
    pub async fn pull(&self, source: &str, reference: &Reference) -> Result<String> {
        self.pull_inner(source, reference, false).await
    }

    /// Fetches the layers (and anything else missing) of the manifest
    /// `digest` that `source` was pinned to at create; nothing when its
    /// root filesystem is already unpacked.
    pub async fn pull_layers(&self, source: &str, digest: &str) -> Result<()> {
        let reference = parse_reference(source)?.clone_with_digest(digest.to_owned());
        self.pull_inner(source, &reference, true).await.map(|_| ())
    }

    async fn pull_inner(
        &self,
        source: &str,
        reference: &Reference,
        layers: bool,
    ) -> Result<String> {
        let file = self.auth.load()?;
        let found = file
            .as_ref()
            .and_then(|f| f.lookup(reference.registry(), reference.repository()));
        let credentials = match (&file, found) {
            (Some(file), Some((key, _))) => format!(
                "credentials from auth file {} (entry {key:?})",
                file.path.display()
            ),
            (Some(file), None) => format!(
                "no credentials sent: auth file {} has no entry for {}",
                file.path.display(),
                reference.registry()
            ),
            (None, _) => format!("no credentials sent: {}", self.auth.describe_missing()),
        };
        let auth = match found {
            Some((_, c)) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
            None => RegistryAuth::Anonymous,
        };
        let context = PullContext {
            source,
            reference,
            insecure: self.is_insecure(reference.resolve_registry()),
            credentials,
        };
        self.prepare_layout()?;
        let started = std::time::Instant::now();
        let pulled = tokio::time::timeout(self.timeout, self.fetch(&context, &auth, layers)).await;
        match pulled {
            Ok(Ok((digest, 0))) => {
                tracing::debug!(image = %source, %digest, "image up to date in the pulled layout");
                Ok(digest)
            }
            Ok(Ok((digest, downloaded))) => {
                let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                if layers {
                    tracing::info!(image = %source, %digest, blobs = downloaded, elapsed_ms, "image pulled from the registry");
                } else {
                    tracing::debug!(image = %source, %digest, blobs = downloaded, elapsed_ms, "image manifest and config fetched");
                }
                Ok(digest)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::FailedPrecondition(format!(
                "image {source:?}: pulling from {} took longer than pull_timeout_secs ({} s); \
                 check the network to the registry or raise pull_timeout_secs",
                reference.registry(),
                self.timeout.as_secs()
            ))),
        }
    }

    fn prepare_layout(&self) -> Result<()> {
        let blobs = self.layout.join("blobs/sha256");
        crate::state::create_private_dir_all(&blobs)?;
        let marker = self.layout.join("oci-layout");
        if !marker.is_file() {
            std::fs::write(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)
                .map_err(|e| Error::io("write", &marker, e))?;
        }
        Ok(())
    }

    fn blob_path(&self, digest: &str) -> Option<PathBuf> {
        image::blob_name(digest).map(|name| self.layout.join(name))
    }

    /// Where a fetched blob goes; only sha256 digests are fetched.
    fn sha256_blob_path(&self, context: &PullContext<'_>, digest: &str) -> Result<PathBuf> {
        self.blob_path(digest)
            .filter(|_| digest.starts_with("sha256:"))
            .ok_or_else(|| bad_digest(context, digest))
    }

    /// Returns the top-level digest and how many blobs were downloaded;
    /// with `layers`, the layers too.
    async fn fetch(
        &self,
        context: &PullContext<'_>,
        auth: &RegistryAuth,
        layers: bool,
    ) -> Result<(String, u64)> {
        let mut downloaded = 0_u64;
        let client = self.client();
        let reference = context.reference;
        // Blob requests carry the credentials too, also when no manifest
        // request (which would store them) comes first: a digest reference
        // whose manifests are already here.
        client
            .store_auth_if_needed(reference.resolve_registry(), auth)
            .await;
        let map = |e: OciDistributionError| pull_error(context, &e);
        // The top-level digest: a digest reference is used as given; a tag
        // is asked of the registry every time (it may have moved).
        let top = match reference.digest() {
            Some(digest) => digest.to_owned(),
            None => client
                .fetch_manifest_digest(reference, auth)
                .await
                .map_err(map)?,
        };
        self.fetch_manifest(&client, context, auth, &top).await?;
        let mut digest = top.clone();
        for _ in 0..4 {
            let bytes = self.read_blob(context, &digest)?;
            let parsed: image::Manifest = serde_json::from_slice(&bytes).map_err(|e| {
                Error::FailedPrecondition(format!(
                    "image {:?}: manifest {digest} from the registry is not valid JSON: {e}",
                    context.source
                ))
            })?;
            if !parsed.is_index() {
                let config = parsed.config.as_ref().ok_or_else(|| {
                    Error::FailedPrecondition(format!(
                        "image {:?}: manifest {digest} has no config; it is not a container \
                         image",
                        context.source
                    ))
                })?;
                downloaded += u64::from(self.fetch_blob(&client, context, &config.digest).await?);
                // A manifest already unpacked needs none of its layers.
                if layers && !self.cache.is_unpacked(&digest) {
                    for layer in &parsed.layers {
                        downloaded +=
                            u64::from(self.fetch_blob(&client, context, &layer.digest).await?);
                    }
                }
                return Ok((top, downloaded));
            }
            let platform = image::platform_manifest(context.source, &parsed.manifests)?;
            digest = platform.digest.clone();
            self.fetch_manifest(&client, context, auth, &digest).await?;
        }
        Err(Error::FailedPrecondition(format!(
            "image {:?}: image indexes nest too deeply",
            context.source
        )))
    }

    fn read_blob(&self, context: &PullContext<'_>, digest: &str) -> Result<Vec<u8>> {
        let path = self
            .blob_path(digest)
            .ok_or_else(|| bad_digest(context, digest))?;
        std::fs::read(&path).map_err(|e| Error::io("read", path, e))
    }

    async fn fetch_manifest(
        &self,
        client: &oci_client::Client,
        context: &PullContext<'_>,
        auth: &RegistryAuth,
        digest: &str,
    ) -> Result<()> {
        let path = self.sha256_blob_path(context, digest)?;
        if path.is_file() {
            return Ok(());
        }
        let at = context.reference.clone_with_digest(digest.to_owned());
        let (bytes, _) = client
            .pull_manifest_raw(&at, auth, &ACCEPTED_MANIFESTS)
            .await
            .map_err(|e| pull_error(context, &e))?;
        if bytes.len() > MANIFEST_LIMIT {
            return Err(Error::FailedPrecondition(format!(
                "image {:?}: manifest {digest} is larger than {MANIFEST_LIMIT} bytes",
                context.source
            )));
        }
        let actual = sha256_digest(&bytes);
        if actual != digest {
            return Err(Error::FailedPrecondition(format!(
                "image {:?}: the registry sent a manifest with digest {actual} for {digest}",
                context.source
            )));
        }
        let tmp = self.tmp_path(digest);
        std::fs::write(&tmp, &bytes).map_err(|e| Error::io("write", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io("rename into the pulled layout", &path, e)
        })
    }

    fn tmp_path(&self, digest: &str) -> PathBuf {
        let n = DOWNLOADS.fetch_add(1, Ordering::Relaxed);
        self.layout.join(format!(
            "blobs/sha256/.tmp-{}-{}-{n}",
            cache_safe(digest),
            std::process::id()
        ))
    }

    /// Downloads one blob unless present; one download per digest at a
    /// time, others wait and then find it present. Returns whether it was
    /// downloaded.
    async fn fetch_blob(
        &self,
        client: &oci_client::Client,
        context: &PullContext<'_>,
        digest: &str,
    ) -> Result<bool> {
        let path = self.sha256_blob_path(context, digest)?;
        if path.is_file() {
            return Ok(false);
        }
        let _one_at_a_time = self.cache.locks().lock(&format!("blob:{digest}")).await;
        if path.is_file() {
            return Ok(false);
        }
        let tmp = self.tmp_path(digest);
        let result = async {
            let file = tokio::fs::File::create(&tmp)
                .await
                .map_err(|e| Error::io("create", &tmp, e))?;
            client
                .pull_blob(context.reference, digest, file)
                .await
                .map_err(|e| pull_error(context, &e))?;
            // Checked here too, whatever the client did.
            let check = tmp.clone();
            let actual = tokio::task::spawn_blocking(move || sha256_file(&check))
                .await
                .map_err(|e| Error::io("hash", &tmp, std::io::Error::other(e)))??;
            if actual != digest {
                return Err(Error::FailedPrecondition(format!(
                    "image {:?}: the registry sent blob {actual} for {digest}",
                    context.source
                )));
            }
            std::fs::rename(&tmp, &path).map_err(|e| Error::io("rename into the layout", &path, e))
        }
        .await;
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map(|()| true)
    }
}

fn cache_safe(digest: &str) -> String {
    digest
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(80)
        .collect()
}

fn bad_digest(context: &PullContext<'_>, digest: &str) -> Error {
    Error::FailedPrecondition(format!(
        "image {:?}: unsupported digest {:?}; only sha256 digests are pulled",
        context.source,
        bounded(digest)
    ))
}

pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", sha2::Sha256::digest(bytes))
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io("open", path, e))?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| Error::io("read", path, e))?;
    Ok(format!("sha256:{:x}", hasher.finalize()))
}

/// `text` cut to [`DETAIL_LIMIT`] characters, on one line.
fn bounded(text: &str) -> String {
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= DETAIL_LIMIT {
        one_line
    } else {
        let cut: String = one_line.chars().take(DETAIL_LIMIT).collect();
        format!("{cut}...")
    }
}

/// Every message of `error` and its sources, once each.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current = Some(error);
    while let Some(e) = current {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        current = e.source();
    }
    parts.join(": ")
}

/// What went wrong with a pull, as the user should hear it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    NotFound,
    Credentials,
    Unreachable,
    Tls,
    Other,
}

fn classify(error: &OciDistributionError) -> Failure {
    match error {
        OciDistributionError::ImageManifestNotFoundError(_) => Failure::NotFound,
        OciDistributionError::AuthenticationFailure(_)
        | OciDistributionError::UnauthorizedError { .. } => Failure::Credentials,
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                Failure::Credentials
            } else if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                        | OciErrorCode::BlobUnknown
                )
            }) {
                Failure::NotFound
            } else {
                Failure::Other
            }
        }
        OciDistributionError::ServerError { code: 404, .. } => Failure::NotFound,
        OciDistributionError::ServerError {
            code: 401 | 403, ..
        } => Failure::Credentials,
        OciDistributionError::RequestError(e) => classify_transport(e.is_timeout(), &chain(e)),
        other => {
            let text = chain(other);
            if looks_like_tls(&text) {
                Failure::Tls
            } else {
                Failure::Other
            }
        }
    }
}

fn looks_like_tls(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    [
        "tls",
        "certificate",
        "invalidcontenttype",
        "corrupt message",
        "handshake",
        "ssl",
    ]
    .iter()
    .any(|m| lower.contains(m))
}

fn classify_transport(timeout: bool, text: &str) -> Failure {
    if looks_like_tls(text) {
        Failure::Tls
    } else if timeout
        || [
            "connection refused",
            "dns error",
            "failed to lookup address",
            "name or service not known",
            "no route to host",
            "network is unreachable",
            "connection reset",
            "error sending request",
            "client error (connect)",
        ]
        .iter()
        .any(|m| text.to_ascii_lowercase().contains(m))
    {
        Failure::Unreachable
    } else {
        Failure::Other
    }
}

fn pull_error(context: &PullContext<'_>, error: &OciDistributionError) -> Error {
    let source = context.source;
    let reference = context.reference;
    let registry = reference.registry();
    let detail = bounded(&chain(error));
    let wanted = match (reference.tag(), reference.digest()) {
        (_, Some(digest)) => format!("digest {digest}"),
        (Some(tag), None) => format!("tag {tag:?}"),
        (None, None) => "tag \"latest\"".to_owned(),
    };
    let message = match classify(error) {
        Failure::NotFound => format!(
            "image {source:?}: the registry has no such image or tag: {registry} has no \
             repository {:?} with {wanted}; check the name and the tag",
            reference.repository()
        ),
        Failure::Credentials => format!(
            "image {source:?}: the registry {registry} refused access to {:?}: bad or missing \
             credentials ({}); log in (podman login / docker login), or point \
             registry_auth_file at an auth file with an entry for {registry} ({detail})",
            reference.repository(),
            context.credentials
        ),
        Failure::Tls if !context.insecure => format!(
            "image {source:?}: the TLS connection to the registry {registry} failed ({detail}); \
             if it serves plain HTTP, add \"{registry}\" to insecure_registries \
             (--insecure-registry {registry})"
        ),
        Failure::Unreachable | Failure::Tls => format!(
            "image {source:?}: the registry {registry} cannot be reached ({detail}); check the \
             address and the network, and that the registry is running{}",
            if context.insecure {
                " (it is in insecure_registries, so plain HTTP is used)"
            } else {
                ""
            }
        ),
        Failure::Other => {
            format!("image {source:?}: pulling from the registry {registry} failed: {detail}")
        }
    };
    Error::FailedPrecondition(message)
}

/// Keeps only the pulled blobs that `in_use` manifests (cache keys) need;
/// the caller holds the cache's exclusive lock. Returns bytes freed.
pub fn prune_blobs(cache_dir: &Path, in_use: &std::collections::HashSet<String>) -> Result<u64> {
    let layout = cache_dir.join(LAYOUT_DIR);
    let blobs = layout.join("blobs/sha256");
    let read = match std::fs::read_dir(&blobs) {
        Ok(read) => read,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io("list", &blobs, e)),
    };
    let mut keep = std::collections::HashSet::new();
    for key in in_use {
        let Some(hex) = key.strip_prefix("sha256-") else {
            continue;
        };
        keep.insert(hex.to_owned());
        let Ok(bytes) = std::fs::read(blobs.join(hex)) else {
            continue;
        };
        if let Ok(parsed) = serde_json::from_slice::<image::Manifest>(&bytes) {
            for descriptor in parsed.config.iter().chain(parsed.layers.iter()) {
                if let Some(hex) = descriptor.digest.strip_prefix("sha256:") {
                    keep.insert(hex.to_owned());
                }
            }
        }
    }
    let mut freed = 0_u64;
    for item in read {
        let item = item.map_err(|e| Error::io("list", &blobs, e))?;
        let name = item.file_name().to_string_lossy().into_owned();
        if keep.contains(&name) {
            continue;
        }
        let path = item.path();
        freed = freed.saturating_add(image::disk_usage(&path));
        std::fs::remove_file(&path).map_err(|e| Error::io("remove", &path, e))?;
    }
    Ok(freed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_normalized_like_docker() {
        for (given, registry, repository, tag) in [
            ("busybox", "docker.io", "library/busybox", Some("latest")),
            (
                "docker.io/library/busybox",
                "docker.io",
                "library/busybox",
                Some("latest"),
            ),
            ("someone/tool:1.2", "docker.io", "someone/tool", Some("1.2")),
            (
                "127.0.0.1:5000/openshell/busybox:latest",
                "127.0.0.1:5000",
                "openshell/busybox",
                Some("latest"),
            ),
            ("localhost/x", "localhost", "x", Some("latest")),
            ("ghcr.io/org/img:v1", "ghcr.io", "org/img", Some("v1")),
        ] {
            let r = parse_reference(given).unwrap();
            assert_eq!(r.registry(), registry, "{given}");
            assert_eq!(r.repository(), repository, "{given}");
            assert_eq!(r.tag(), tag, "{given}");
        }
        let digest = format!("sha256:{}", "a".repeat(64));
        let r = parse_reference(&format!("registry.example/repo@{digest}")).unwrap();
        assert_eq!(r.registry(), "registry.example");
        assert_eq!(r.digest(), Some(digest.as_str()));
        assert_eq!(r.tag(), None);

        for bad in ["UPPER/Case", "a//b", "host:5000/repo:bad tag"] {
            let err = parse_reference(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{bad}: {err}");
            assert!(err.to_string().contains("registry reference"), "{err}");
        }
    }

    fn auth_b64(user_pass: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(user_pass)
    }

    #[test]
    fn auth_files_are_parsed_and_looked_up() {
        let path = Path::new("/etc/auth.json");
        let text = format!(
            r#"{{"auths": {{
                "127.0.0.1:5000": {{"auth": "{}"}},
                "Registry.Example/team/app": {{"auth": "{}"}},
                "registry.example": {{"username": "plain", "password": "pw"}},
                "https://index.docker.io/v1/": {{"auth": "{}"}},
                "helper.example": {{"identitytoken": "x"}}
              }},
              "credsStore": "desktop"}}"#,
            auth_b64("alice:s3cr:et"),
            auth_b64("team:t"),
            auth_b64("hub:h")
        );
        let file = AuthFile::parse(path, &text).unwrap();
        let (key, c) = file.lookup("127.0.0.1:5000", "openshell/busybox").unwrap();
        assert_eq!(key, "127.0.0.1:5000");
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("alice", "s3cr:et")
        );
        let (key, c) = file.lookup("registry.example", "team/app/sub").unwrap();
        assert_eq!(key, "registry.example/team/app");
        assert_eq!(c.username, "team");
        let (_, c) = file.lookup("registry.example", "other").unwrap();
        assert_eq!(c.username, "plain");
        let (_, c) = file.lookup("docker.io", "library/busybox").unwrap();
        assert_eq!(c.username, "hub");
        assert!(file.lookup("helper.example", "x").is_none());
        assert!(file.lookup("127.0.0.1:5001", "x").is_none());
        assert!(
            !format!("{c:?}").contains("\"h\""),
            "the password is not printed"
        );
    }

    #[test]
    fn malformed_auth_files_name_the_file() {
        let path = Path::new("/run/user/1/containers/auth.json");
        for (text, needle) in [
            ("not json", "not a valid auth file"),
            (r#"{"auths": []}"#, "not a valid auth file"),
            (r#"{"auths": {"r": {"auth": "!!!"}}}"#, "not base64"),
            (
                &format!(
                    r#"{{"auths": {{"r": {{"auth": "{}"}}}}}}"#,
                    auth_b64("nocolon")
                ),
                "no user:password",
            ),
        ] {
            let err = AuthFile::parse(path, text).unwrap_err();
            assert!(matches!(err, Error::RegistryAuth { .. }));
            let text = err.to_string();
            assert!(text.contains(needle), "{text}");
            assert!(text.contains("/run/user/1/containers/auth.json"), "{text}");
            assert_eq!(
                tonic::Status::from(err).code(),
                tonic::Code::FailedPrecondition
            );
        }
        assert!(AuthFile::parse(path, "{}").unwrap().entries.is_empty());
    }

    #[test]
    fn auth_file_lookup_order() {
        assert_eq!(
            auth_file_candidates(
                Some("/a/auth.json".into()),
                Some("/run/user/7".into()),
                Some("/home/u".into())
            ),
            [
                PathBuf::from("/a/auth.json"),
                "/run/user/7/containers/auth.json".into(),
                "/home/u/.docker/config.json".into()
            ]
        );
        assert_eq!(
            auth_file_candidates(Some("".into()), None, Some("/home/u".into())),
            [PathBuf::from("/home/u/.docker/config.json")]
        );

        let tmp = tempfile::tempdir().unwrap();
        let second = tmp.path().join("second.json");
        std::fs::write(&second, r#"{"auths": {}}"#).unwrap();
        let source = AuthSource::Standard(vec![tmp.path().join("missing.json"), second.clone()]);
        assert_eq!(source.load().unwrap().unwrap().path, second);
        assert!(AuthSource::Standard(vec![]).load().unwrap().is_none());
        let err = AuthSource::Configured(tmp.path().join("missing.json"))
            .load()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("missing.json") && err.contains("cannot be read"),
            "{err}"
        );
    }

    fn context_for<'a>(reference: &'a Reference, insecure: bool) -> PullContext<'a> {
        PullContext {
            source: "127.0.0.1:5000/openshell/busybox:nope",
            reference,
            insecure,
            credentials: "credentials from auth file /a.json (entry \"127.0.0.1:5000\")".to_owned(),
        }
    }

    #[test]
    fn errors_are_mapped_to_what_to_do() {
        let reference = parse_reference("127.0.0.1:5000/openshell/busybox:nope").unwrap();
        let secure = context_for(&reference, false);
        let envelope = |code: &str| {
            serde_json::from_str::<oci_client::errors::OciEnvelope>(&format!(
                r#"{{"errors":[{{"code":"{code}","message":"m"}}]}}"#
            ))
            .unwrap()
        };
        let text = |e: Error| {
            assert!(matches!(e, Error::FailedPrecondition(_)), "{e:?}");
            e.to_string()
        };
        let not_found = text(pull_error(
            &secure,
            &OciDistributionError::RegistryError {
                envelope: envelope("MANIFEST_UNKNOWN"),
                url: "u".into(),
            },
        ));
        assert!(
            not_found.contains("no such image or tag") && not_found.contains("tag \"nope\""),
            "{not_found}"
        );
        let head_404 = text(pull_error(
            &secure,
            &OciDistributionError::ServerError {
                code: 404,
                url: "u".into(),
                message: String::new(),
            },
        ));
        assert!(head_404.contains("no such image or tag"), "{head_404}");
        for error in [
            OciDistributionError::UnauthorizedError { url: "u".into() },
            OciDistributionError::RegistryError {
                envelope: envelope("DENIED"),
                url: "u".into(),
            },
            OciDistributionError::ServerError {
                code: 403,
                url: "u".into(),
                message: "no".into(),
            },
        ] {
            let message = text(pull_error(&secure, &error));
            assert!(
                message.contains("credentials") && message.contains("/a.json"),
                "{message}"
            );
        }
        let huge = OciDistributionError::ServerError {
            code: 500,
            url: "u".into(),
            message: "x".repeat(100_000),
        };
        let message = text(pull_error(&secure, &huge));
        assert!(message.len() < 1000, "{}", message.len());
        assert!(message.contains("failed"), "{message}");
    }

    #[test]
    fn transport_failures_are_told_apart() {
        assert_eq!(
            classify_transport(
                false,
                "error sending request: client error (Connect): tcp connect error: Connection refused (os error 111)"
            ),
            Failure::Unreachable
        );
        assert_eq!(
            classify_transport(false, "dns error: failed to lookup address information"),
            Failure::Unreachable
        );
        assert_eq!(
            classify_transport(true, "operation timed out"),
            Failure::Unreachable
        );
        assert_eq!(
            classify_transport(
                false,
                "client error (Connect): received corrupt message of type InvalidContentType"
            ),
            Failure::Tls
        );
        assert_eq!(classify_transport(false, "something odd"), Failure::Other);
    }

    #[test]
    fn prune_keeps_the_blobs_of_images_in_use() {
        let tmp = tempfile::tempdir().unwrap();
        let blobs = tmp.path().join(LAYOUT_DIR).join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let put = |bytes: &[u8]| {
            let digest = sha256_digest(bytes);
            std::fs::write(blobs.join(&digest[7..]), bytes).unwrap();
            digest
        };
        let layer = put(b"layer");
        let config = put(b"{}");
        let stale = put(b"stale layer");
        let manifest = put(
            format!(
                r#"{{"schemaVersion":2,"config":{{"digest":"{config}"}},"layers":[{{"digest":"{layer}"}}]}}"#
            )
            .as_bytes(),
        );
        let in_use = [image::cache_key(&manifest)].into();
        prune_blobs(tmp.path(), &in_use).unwrap();
        for (digest, kept) in [
            (layer, true),
            (config, true),
            (manifest, true),
            (stale, false),
        ] {
            assert_eq!(blobs.join(&digest[7..]).exists(), kept, "{digest}");
        }
    }
}
