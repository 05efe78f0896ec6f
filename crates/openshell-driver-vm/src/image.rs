//! Image references and the image cache.
//!
//! `template.image` may be:
//!
//! - `oci:PATH[:TAG]` or an absolute path to a directory with an
//!   `oci-layout` file: an OCI image layout;
//! - `oci-archive:PATH[:TAG]` or an absolute path to a file: a tarball of an
//!   OCI image layout (`podman save --format oci-archive`, `skopeo copy
//!   ... oci-archive:...`);
//! - `rootfs:PATH` or an absolute path to any other directory: a root
//!   filesystem used as it is (read-only, never copied into the cache);
//! - anything else: an image in a registry, normalised as Docker does
//!   (`busybox` → `docker.io/library/busybox:latest`). It is pulled by
//!   [`crate::registry::Puller`] into the cache's own OCI layout
//!   (`<state>/images/.registry`) and from then on treated like a local
//!   layout. Plain HTTP only for `insecure_registries`; credentials from a
//!   containers/docker auth file; see the registry module for what is
//!   fetched again and what is not.
//!
//! OCI images are resolved to a manifest digest when a sandbox is created
//! (so a moving tag never changes an existing sandbox), then unpacked once
//! per digest with `umoci raw unpack` into `<state>/images/<key>/rootfs`,
//! shared read-only by every sandbox of that image.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::registry::{self, Puller};
use crate::state;

/// Tag written into the temporary layouts handed to umoci.
const UNPACK_TAG: &str = "openshell-unpack";
const INDEX_MEDIA_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
/// Manifests and configs are small; larger archive members are layers.
const SMALL_BLOB_LIMIT: u64 = 4 << 20;

#[cfg(target_arch = "x86_64")]
const OCI_ARCH: &str = "amd64";
#[cfg(target_arch = "aarch64")]
const OCI_ARCH: &str = "arm64";

/// An image reference as a user wrote it, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    Rootfs(PathBuf),
    OciLayout {
        path: PathBuf,
        tag: Option<String>,
    },
    OciArchive {
        path: PathBuf,
        tag: Option<String>,
    },
    /// An image in a registry, normalized (registry, `library/`, tag).
    Registry(oci_client::Reference),
}

/// Splits `PATH[:TAG]`; a colon counts only after the last `/`.
fn split_tag(rest: &str) -> (PathBuf, Option<String>) {
    let slash = rest.rfind('/').map_or(0, |i| i + 1);
    match rest[slash..].rfind(':') {
        Some(colon) if colon > 0 => {
            let at = slash + colon;
            (PathBuf::from(&rest[..at]), Some(rest[at + 1..].to_owned()))
        }
        _ => (PathBuf::from(rest), None),
    }
}

fn absolute(reference: &str, path: PathBuf) -> Result<PathBuf> {
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(Error::InvalidArgument(format!(
            "image {reference:?}: the path must be absolute"
        )))
    }
}

impl ImageRef {
    /// Classifies a reference. Paths must be absolute; plain paths are
    /// classified by looking at what is there.
    pub fn parse(reference: &str) -> Result<Self> {
        let reference = reference.trim();
        if let Some(rest) = reference.strip_prefix("oci-archive:") {
            let (path, tag) = split_tag(rest);
            return Ok(Self::OciArchive {
                path: absolute(reference, path)?,
                tag,
            });
        }
        if let Some(rest) = reference.strip_prefix("oci:") {
            let (path, tag) = split_tag(rest);
            return Ok(Self::OciLayout {
                path: absolute(reference, path)?,
                tag,
            });
        }
        if let Some(rest) = reference.strip_prefix("rootfs:") {
            return Ok(Self::Rootfs(absolute(reference, rest.into())?));
        }
        if !reference.starts_with('/') {
            return registry::parse_reference(reference).map(Self::Registry);
        }
        let path = PathBuf::from(reference);
        let meta = std::fs::metadata(&path).map_err(|_| {
            Error::FailedPrecondition(format!("image path {reference} does not exist"))
        })?;
        Ok(if meta.is_dir() {
            if path.join("oci-layout").is_file() {
                Self::OciLayout { path, tag: None }
            } else {
                Self::Rootfs(path)
            }
        } else {
            Self::OciArchive { path, tag: None }
        })
    }
}

/// What an image asks the runtime to do by default (from its OCI config).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `KEY=VALUE`.
    pub env: Vec<String>,
    pub working_dir: String,
}

/// An image pinned for one sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ResolvedImage {
    Rootfs {
        source: String,
        path: PathBuf,
    },
    Oci {
        source: String,
        /// `sha256:<hex>` of the manifest.
        digest: String,
        /// The layout directory or the archive file.
        path: PathBuf,
        archive: bool,
        config: ImageConfig,
    },
}

impl ResolvedImage {
    pub fn source(&self) -> &str {
        match self {
            Self::Rootfs { source, .. } | Self::Oci { source, .. } => source,
        }
    }

    pub fn config(&self) -> ImageConfig {
        match self {
            Self::Rootfs { .. } => ImageConfig::default(),
            Self::Oci { config, .. } => config.clone(),
        }
    }

    /// The cache key of an OCI image.
    pub fn cache_key(&self) -> Option<String> {
        match self {
            Self::Rootfs { .. } => None,
            Self::Oci { digest, .. } => Some(cache_key(digest)),
        }
    }
}

/// `sha256:abc` → `sha256-abc` (a directory name).
pub fn cache_key(digest: &str) -> String {
    digest.replace(':', "-")
}

#[derive(Debug, Deserialize)]
pub(crate) struct Descriptor {
    pub(crate) digest: String,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Debug, Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

/// The entry of an image index for this host (linux and the host's
/// architecture); the error lists what the index has instead.
pub(crate) fn platform_manifest<'a>(
    reference: &str,
    manifests: &'a [Descriptor],
) -> Result<&'a Descriptor> {
    manifests
        .iter()
        .find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == OCI_ARCH)
        })
        .ok_or_else(|| {
            let mut offered: Vec<String> = manifests
                .iter()
                .filter_map(|d| d.platform.as_ref())
                .map(|p| format!("{}/{}", p.os, p.architecture))
                .collect();
            offered.dedup();
            offered.truncate(12);
            Error::FailedPrecondition(format!(
                "image {reference:?} is not built for this host's architecture: the image index \
                 has no linux/{OCI_ARCH} manifest (it has: {}); use an image built for \
                 linux/{OCI_ARCH}",
                if offered.is_empty() {
                    "no platforms named".to_owned()
                } else {
                    offered.join(", ")
                }
            ))
        })
}

#[derive(Debug, Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

/// A manifest or an image index (whichever fields are there).
#[derive(Debug, Deserialize)]
pub(crate) struct Manifest {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    #[serde(default)]
    pub(crate) manifests: Vec<Descriptor>,
    pub(crate) config: Option<Descriptor>,
    #[serde(default)]
    pub(crate) layers: Vec<Descriptor>,
}

impl Manifest {
    /// Whether this is an image index rather than an image manifest.
    pub(crate) fn is_index(&self) -> bool {
        INDEX_MEDIA_TYPES.contains(&self.media_type.as_str())
            || (self.config.is_none() && !self.manifests.is_empty())
    }
}

#[derive(Debug, Default, Deserialize)]
struct OciConfigFile {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    config: Option<OciRuntimeConfig>,
}

#[derive(Debug, Default, Deserialize)]
struct OciRuntimeConfig {
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
}

/// Read access to the files of an OCI layout, on disk or in a tarball.
enum Layout {
    Dir(PathBuf),
    /// Small members in memory, and the names of all members.
    Archive {
        path: PathBuf,
        small: HashMap<String, Vec<u8>>,
        names: HashSet<String>,
    },
}

pub(crate) fn blob_name(digest: &str) -> Option<String> {
    let (algorithm, hex) = digest.split_once(':')?;
    let plain = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric());
    (plain(algorithm) && plain(hex)).then(|| format!("blobs/{algorithm}/{hex}"))
}

impl Layout {
    fn open_archive(path: &Path) -> Result<Self> {
        let file =
            std::fs::File::open(path).map_err(|e| Error::io("open image archive", path, e))?;
        let mut archive = tar::Archive::new(std::io::BufReader::new(file));
        let mut small = HashMap::new();
        let mut names = HashSet::new();
        let bad = |e: std::io::Error| {
            Error::FailedPrecondition(format!(
                "image archive {} is not a readable tar file: {e}",
                path.display()
            ))
        };
        for entry in archive.entries().map_err(bad)? {
            let mut entry = entry.map_err(bad)?;
            let name = entry.path().map_err(bad)?.to_string_lossy().into_owned();
            let name = name.trim_start_matches("./").to_owned();
            if entry.header().entry_type().is_file() && entry.size() <= SMALL_BLOB_LIMIT {
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes).map_err(bad)?;
                small.insert(name.clone(), bytes);
            }
            names.insert(name);
        }
        Ok(Self::Archive {
            path: path.to_owned(),
            small,
            names,
        })
    }

    fn describe(&self) -> String {
        match self {
            Self::Dir(path) => format!("OCI layout {}", path.display()),
            Self::Archive { path, .. } => format!("OCI archive {}", path.display()),
        }
    }

    fn read(&self, name: &str) -> Result<Vec<u8>> {
        let missing = || Error::FailedPrecondition(format!("{} has no {name}", self.describe()));
        match self {
            Self::Dir(path) => std::fs::read(path.join(name)).map_err(|_| missing()),
            Self::Archive { small, .. } => small.get(name).cloned().ok_or_else(missing),
        }
    }

    fn has(&self, name: &str) -> bool {
        match self {
            Self::Dir(path) => path.join(name).is_file(),
            Self::Archive { names, .. } => names.contains(name),
        }
    }

    fn json<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<T> {
        let bytes = self.read(name)?;
        serde_json::from_slice(&bytes).map_err(|e| {
            Error::FailedPrecondition(format!("{}: {name} is not valid: {e}", self.describe()))
        })
    }

    fn blob<T: for<'de> Deserialize<'de>>(&self, digest: &str) -> Result<T> {
        let name = blob_name(digest).ok_or_else(|| {
            Error::FailedPrecondition(format!("{}: bad digest {digest:?}", self.describe()))
        })?;
        self.json(&name)
    }
}

/// Pins `reference` to what a sandbox will run: a local image as
/// [`resolve_local`] does, a registry image by pulling it into the
/// puller's layout first (the network part runs on the async runtime, the
/// file work on blocking threads).
pub async fn resolve(reference: &str, puller: &Puller) -> Result<ResolvedImage> {
    let parsed = ImageRef::parse(reference)?;
    let ImageRef::Registry(registry_ref) = parsed else {
        let reference = reference.to_owned();
        return off_runtime(move || resolve_local(&reference)).await;
    };
    // Prune (exclusive) must not remove blobs while they are written.
    let cache = puller.cache().clone();
    let _shared = off_runtime(move || cache.lock_shared()).await?;
    let top = puller.pull(reference, &registry_ref).await?;
    let layout_dir = puller.layout().to_owned();
    let source = reference.to_owned();
    off_runtime(move || {
        let layout = Layout::Dir(layout_dir.clone());
        resolve_descriptor(&source, &layout, &top, layout_dir, false, false)
    })
    .await
}

/// Fetches what an image pinned by [`resolve`] still lacks before it can be
/// unpacked: a registry image's layers (nothing when its root filesystem
/// is already in the cache); nothing for a local image. Run by the boot.
pub async fn fetch_layers(image: &ResolvedImage, puller: &Puller) -> Result<()> {
    let ResolvedImage::Oci { source, digest, .. } = image else {
        return Ok(());
    };
    // Already unpacked (every boot after the first): nothing to fetch, and
    // no auth file to read or client to build.
    if !matches!(ImageRef::parse(source), Ok(ImageRef::Registry(_)))
        || puller.cache().is_unpacked(digest)
    {
        return Ok(());
    }
    // Prune (exclusive) must not remove blobs while they are written.
    let cache = puller.cache().clone();
    let _shared = off_runtime(move || cache.lock_shared()).await?;
    puller.pull_layers(source, digest).await
}

async fn off_runtime<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work).await.map_err(|e| {
        Error::io(
            "run a background task for",
            "the image cache",
            std::io::Error::other(e),
        )
    })?
}

/// Pins a local `reference` to what a sandbox will run. Cheap: reads only
/// the index, manifest and config (one sequential read for an archive).
/// Registry references are refused here: they need [`resolve`].
pub fn resolve_local(reference: &str) -> Result<ResolvedImage> {
    match ImageRef::parse(reference)? {
        ImageRef::Registry(_) => Err(Error::FailedPrecondition(format!(
            "image {reference:?} is in a registry and has to be pulled first"
        ))),
        ImageRef::Rootfs(path) => {
            if !path.is_dir() {
                return Err(Error::FailedPrecondition(format!(
                    "image {reference:?}: {} is not a directory",
                    path.display()
                )));
            }
            Ok(ResolvedImage::Rootfs {
                source: reference.to_owned(),
                path,
            })
        }
        ImageRef::OciLayout { path, tag } => {
            if !path.join("oci-layout").is_file() {
                return Err(Error::FailedPrecondition(format!(
                    "image {reference:?}: {} is not an OCI image layout (no oci-layout file)",
                    path.display()
                )));
            }
            let layout = Layout::Dir(path.clone());
            resolve_layout(reference, &layout, tag.as_deref(), path, false)
        }
        ImageRef::OciArchive { path, tag } => {
            if !path.is_file() {
                return Err(Error::FailedPrecondition(format!(
                    "image {reference:?}: {} does not exist",
                    path.display()
                )));
            }
            let layout = Layout::open_archive(&path)?;
            resolve_layout(reference, &layout, tag.as_deref(), path, true)
        }
    }
}

fn resolve_layout(
    reference: &str,
    layout: &Layout,
    tag: Option<&str>,
    path: PathBuf,
    archive: bool,
) -> Result<ResolvedImage> {
    let index: Index = layout.json("index.json")?;
    let tags: Vec<&str> = index
        .manifests
        .iter()
        .filter_map(|d| d.annotations.get("org.opencontainers.image.ref.name"))
        .map(String::as_str)
        .collect();
    let chosen = match tag {
        Some(tag) => index.manifests.iter().find(|d| {
            d.annotations
                .get("org.opencontainers.image.ref.name")
                .map(String::as_str)
                == Some(tag)
        }),
        None if index.manifests.len() == 1 => index.manifests.first(),
        None => index.manifests.iter().find(|d| {
            d.annotations
                .get("org.opencontainers.image.ref.name")
                .map(String::as_str)
                == Some("latest")
        }),
    };
    let Some(descriptor) = chosen else {
        return Err(Error::FailedPrecondition(format!(
            "image {reference:?}: {} has no {}; tags there: {}",
            layout.describe(),
            tag.map_or_else(
                || "single image and no `latest` tag".to_owned(),
                |t| format!("tag {t:?}")
            ),
            if tags.is_empty() {
                "none".to_owned()
            } else {
                tags.join(", ")
            }
        )));
    };
    resolve_descriptor(reference, layout, &descriptor.digest, path, archive, true)
}

/// Follows `digest` (a manifest, or an index to this host's platform) in
/// `layout` and pins the image to its manifest digest.
fn resolve_descriptor(
    reference: &str,
    layout: &Layout,
    digest: &str,
    path: PathBuf,
    archive: bool,
    check_layers: bool,
) -> Result<ResolvedImage> {
    let mut digest = digest.to_owned();
    let mut manifest: Manifest = layout.blob(&digest)?;
    for _ in 0..4 {
        if !manifest.is_index() {
            break;
        }
        digest = platform_manifest(reference, &manifest.manifests)?
            .digest
            .clone();
        manifest = layout.blob(&digest)?;
    }
    let config_descriptor = manifest.config.as_ref().ok_or_else(|| {
        Error::FailedPrecondition(format!(
            "image {reference:?}: manifest {digest} has no config"
        ))
    })?;
    // A registry image's layers are fetched by the boot, not here.
    for layer in manifest.layers.iter().filter(|_| check_layers) {
        let present = blob_name(&layer.digest).is_some_and(|name| layout.has(&name));
        if !present {
            return Err(Error::FailedPrecondition(format!(
                "image {reference:?}: layer {} is missing from {}",
                layer.digest,
                layout.describe()
            )));
        }
    }
    let config: OciConfigFile = layout.blob(&config_descriptor.digest)?;
    if !config.architecture.is_empty() && config.architecture != OCI_ARCH
        || !config.os.is_empty() && config.os != "linux"
    {
        return Err(Error::FailedPrecondition(format!(
            "image {reference:?} is built for {}/{}, not for this host (linux/{OCI_ARCH}); use \
             an image built for linux/{OCI_ARCH}",
            if config.os.is_empty() {
                "?"
            } else {
                &config.os
            },
            if config.architecture.is_empty() {
                "?"
            } else {
                &config.architecture
            },
        )));
    }
    let runtime = config.config.unwrap_or_default();
    Ok(ResolvedImage::Oci {
        source: reference.to_owned(),
        digest,
        path,
        archive,
        config: ImageConfig {
            entrypoint: runtime.entrypoint.unwrap_or_default(),
            cmd: runtime.cmd.unwrap_or_default(),
            env: runtime.env.unwrap_or_default(),
            working_dir: runtime.working_dir.unwrap_or_default(),
        },
    })
}

/// Finds `name` on `PATH`.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Fails early, at create time, when an OCI image could not be unpacked.
pub fn check_unpacker(image: &ResolvedImage) -> Result<()> {
    if matches!(image, ResolvedImage::Oci { .. }) && find_tool("umoci").is_none() {
        return Err(Error::FailedPrecondition(
            "umoci is needed to unpack OCI images and is not on PATH; install it (Debian: \
             apt-get install umoci)"
                .to_owned(),
        ));
    }
    Ok(())
}

/// What the cache records next to each unpacked image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheEntry {
    pub digest: String,
    /// The reference it was first unpacked from.
    pub source: String,
    pub created_ms: i64,
}

/// The image cache under `<state>/images`.
#[derive(Debug, Clone)]
pub struct ImageCache {
    dir: PathBuf,
    /// One lock per cache key so an image is unpacked once even when
    /// several sandboxes of it are created at the same time.
    unpacking: Arc<openshell_driver_kit::KeyLocks>,
}

/// A held lock on the cache: shared for users, exclusive for prune.
pub struct CacheLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl ImageCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            unpacking: openshell_driver_kit::KeyLocks::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The per-key locks of this cache (unpacks, and blob downloads).
    pub fn locks(&self) -> &Arc<openshell_driver_kit::KeyLocks> {
        &self.unpacking
    }

    pub fn entry_dir(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// Whether the image with manifest `digest` is unpacked here already.
    pub fn is_unpacked(&self, digest: &str) -> bool {
        let entry = self.entry_dir(&cache_key(digest));
        entry.join("entry.json").is_file() && entry.join("rootfs").is_dir()
    }

    fn lock(&self, exclusive: bool, wait: bool) -> Result<Option<CacheLock>> {
        use nix::fcntl::{Flock, FlockArg};
        state::create_private_dir_all(&self.dir)?;
        let path = self.dir.join(".lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io("open", &path, e))?;
        let arg = match (exclusive, wait) {
            (true, true) => FlockArg::LockExclusive,
            (true, false) => FlockArg::LockExclusiveNonblock,
            (false, true) => FlockArg::LockShared,
            (false, false) => FlockArg::LockSharedNonblock,
        };
        match Flock::lock(file, arg) {
            Ok(lock) => Ok(Some(CacheLock { _lock: lock })),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, errno)) => Err(Error::io("lock", &path, errno.into())),
        }
    }

    /// A shared lock: prune waits while it is held.
    pub fn lock_shared(&self) -> Result<CacheLock> {
        self.lock(false, true)?.ok_or_else(|| {
            Error::io(
                "lock",
                self.dir.join(".lock"),
                std::io::ErrorKind::WouldBlock.into(),
            )
        })
    }

    /// The read-only root filesystem of `image`, unpacking it into the
    /// cache first if needed. Blocking: run it off the async runtime.
    pub fn ensure(&self, image: &ResolvedImage) -> Result<PathBuf> {
        let (source, digest, path, archive) = match image {
            ResolvedImage::Rootfs { path, .. } => {
                return if path.is_dir() {
                    Ok(path.clone())
                } else {
                    Err(Error::FailedPrecondition(format!(
                        "image directory {} no longer exists",
                        path.display()
                    )))
                };
            }
            ResolvedImage::Oci {
                source,
                digest,
                path,
                archive,
                ..
            } => (source, digest, path, *archive),
        };
        let key = cache_key(digest);
        let entry = self.entry_dir(&key);
        let rootfs = entry.join("rootfs");
        let _shared = self.lock_shared()?;
        let _one_at_a_time = self.unpacking.lock_blocking(&key);
        if self.is_unpacked(digest) {
            return Ok(rootfs);
        }
        tracing::info!(image = %source, %digest, "unpacking image into the cache");
        let tmp = self.dir.join(format!(".tmp-{key}-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io("remove", &tmp, e))?;
        }
        state::create_private_dir_all(&tmp)?;
        let result = self
            .unpack_into(&tmp, digest, path, archive)
            .and_then(|()| {
                state::write_json(
                    &tmp.join("entry.json"),
                    &CacheEntry {
                        digest: digest.clone(),
                        source: source.clone(),
                        created_ms: openshell_wire::time::now_millis(),
                    },
                )?;
                if entry.exists() {
                    std::fs::remove_dir_all(&entry).map_err(|e| Error::io("remove", &entry, e))?;
                }
                std::fs::rename(&tmp, &entry)
                    .map_err(|e| Error::io("rename into the cache", &entry, e))
            });
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result.map(|()| rootfs)
    }

    fn unpack_into(&self, tmp: &Path, digest: &str, source: &Path, archive: bool) -> Result<()> {
        let layout = tmp.join("layout");
        if archive {
            std::fs::create_dir(&layout).map_err(|e| Error::io("create", &layout, e))?;
            let file = std::fs::File::open(source).map_err(|e| Error::io("open", source, e))?;
            tar::Archive::new(std::io::BufReader::new(file))
                .unpack(&layout)
                .map_err(|e| Error::io("extract image archive", source, e))?;
        } else {
            std::fs::create_dir(&layout).map_err(|e| Error::io("create", &layout, e))?;
            link_manifest_blobs(source, &layout, digest)?;
        }
        let (digest, size) = manifest_for_umoci(&layout, digest)?;
        // A layout of exactly one manifest under a fixed tag: umoci unpacks
        // the digest resolved at create time, whatever the tags say now.
        std::fs::write(
            layout.join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .map_err(|e| Error::io("write", layout.join("oci-layout"), e))?;
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": digest,
                "size": size,
                "annotations": {"org.opencontainers.image.ref.name": UNPACK_TAG},
            }],
        });
        std::fs::write(layout.join("index.json"), index.to_string())
            .map_err(|e| Error::io("write", layout.join("index.json"), e))?;

        let umoci = find_tool("umoci").ok_or_else(|| {
            Error::FailedPrecondition(
                "umoci is not on PATH; install it (apt-get install umoci)".to_owned(),
            )
        })?;
        let mut command = std::process::Command::new(&umoci);
        command.arg("raw").arg("unpack");
        if !nix::unistd::geteuid().is_root() {
            command.arg("--rootless");
        }
        let mut image_arg = layout.as_os_str().to_owned();
        image_arg.push(format!(":{UNPACK_TAG}"));
        let output = command
            .arg("--image")
            .arg(image_arg)
            .arg(tmp.join("rootfs"))
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| Error::Spawn {
                program: umoci.clone(),
                source: e,
            })?;
        if !output.status.success() {
            return Err(Error::Tool {
                tool: "umoci raw unpack".to_owned(),
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        std::fs::remove_dir_all(&layout).map_err(|e| Error::io("remove", &layout, e))
    }

    /// Cache entries, sorted by key.
    pub fn entries(&self) -> Result<Vec<(String, CacheEntry)>> {
        let mut out = Vec::new();
        let read = match std::fs::read_dir(&self.dir) {
            Ok(read) => read,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(Error::io("list", &self.dir, e)),
        };
        for item in read {
            let item = item.map_err(|e| Error::io("list", &self.dir, e))?;
            let name = item.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            if let Some(entry) =
                state::read_json_if_exists::<CacheEntry>(&item.path().join("entry.json"))?
            {
                out.push((name, entry));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Removes the entries whose key is not in `in_use`, and leftovers of
    /// interrupted unpacks. Waits (up to `wait`) for running unpacks.
    pub fn prune(
        &self,
        in_use: &HashSet<String>,
        wait: std::time::Duration,
    ) -> Result<Vec<(String, u64)>> {
        let deadline = std::time::Instant::now() + wait;
        let _exclusive = loop {
            if let Some(lock) = self.lock(true, false)? {
                break lock;
            }
            if std::time::Instant::now() >= deadline {
                return Err(Error::FailedPrecondition(format!(
                    "the image cache {} is busy (a driver is unpacking an image); try again",
                    self.dir.display()
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        let mut removed = Vec::new();
        let read = match std::fs::read_dir(&self.dir) {
            Ok(read) => read,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
            Err(e) => return Err(Error::io("list", &self.dir, e)),
        };
        for item in read {
            let item = item.map_err(|e| Error::io("list", &self.dir, e))?;
            let name = item.file_name().to_string_lossy().into_owned();
            let stale_tmp = name.starts_with(".tmp-");
            if name.starts_with('.') && !stale_tmp {
                continue;
            }
            if !stale_tmp && in_use.contains(&name) {
                continue;
            }
            let path = item.path();
            if !item.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let size = disk_usage(&path);
            std::fs::remove_dir_all(&path).map_err(|e| Error::io("remove", &path, e))?;
            removed.push((name, size));
        }
        let freed = registry::prune_blobs(&self.dir, in_use)?;
        if freed > 0 {
            removed.push((format!("{}/blobs", registry::LAYOUT_DIR), freed));
        }
        removed.sort();
        Ok(removed)
    }
}

/// Links the blobs of manifest `digest` (itself, its config, its layers)
/// from the layout `source` into the temporary layout `layout`.
fn link_manifest_blobs(source: &Path, layout: &Path, digest: &str) -> Result<()> {
    let name = blob_name(digest)
        .ok_or_else(|| Error::FailedPrecondition(format!("bad manifest digest {digest:?}")))?;
    let manifest_path = source.join(&name);
    let bytes = std::fs::read(&manifest_path).map_err(|e| Error::io("read", &manifest_path, e))?;
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
        Error::FailedPrecondition(format!(
            "manifest {} is not valid: {e}",
            manifest_path.display()
        ))
    })?;
    let digests = std::iter::once(digest).chain(
        manifest
            .config
            .iter()
            .chain(manifest.layers.iter())
            .map(|d| d.digest.as_str()),
    );
    for blob in digests {
        let name = blob_name(blob)
            .ok_or_else(|| Error::FailedPrecondition(format!("bad blob digest {blob:?}")))?;
        let link = layout.join(&name);
        if link.symlink_metadata().is_ok() {
            continue;
        }
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io("create", parent, e))?;
        }
        std::os::unix::fs::symlink(source.join(&name), &link)
            .map_err(|e| Error::io("link the blobs of", source, e))?;
    }
    Ok(())
}

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// The OCI media type umoci expects for a Docker schema 2 one.
fn oci_media_type(docker: &str) -> Option<&'static str> {
    Some(match docker {
        DOCKER_MANIFEST => "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.container.image.v1+json" => {
            "application/vnd.oci.image.config.v1+json"
        }
        "application/vnd.docker.image.rootfs.diff.tar.gzip" => {
            "application/vnd.oci.image.layer.v1.tar+gzip"
        }
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        }
        _ => return None,
    })
}

/// The digest and size of the manifest umoci is to unpack. umoci takes
/// only OCI media types, so a Docker schema 2 manifest is handed over as
/// the same manifest with OCI media types (same config and layer blobs),
/// written into the temporary layout. The cache key stays the original
/// digest.
fn manifest_for_umoci(layout: &Path, digest: &str) -> Result<(String, u64)> {
    let name = blob_name(digest)
        .ok_or_else(|| Error::FailedPrecondition(format!("bad manifest digest {digest:?}")))?;
    let path = layout.join(name);
    let bytes = std::fs::read(&path).map_err(|e| Error::io("read", &path, e))?;
    let size = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    let Ok(mut manifest) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return Ok((digest.to_owned(), size(bytes.len())));
    };
    let mut changed = false;
    let mut translate = |value: &mut serde_json::Value| {
        if let Some(media_type) = value.get_mut("mediaType")
            && let Some(oci) = media_type.as_str().and_then(oci_media_type)
        {
            *media_type = serde_json::Value::from(oci);
            changed = true;
        }
    };
    translate(&mut manifest);
    if let Some(config) = manifest.get_mut("config") {
        translate(config);
    }
    if let Some(layers) = manifest.get_mut("layers").and_then(|l| l.as_array_mut()) {
        layers.iter_mut().for_each(&mut translate);
    }
    if !changed {
        return Ok((digest.to_owned(), size(bytes.len())));
    }
    let converted = manifest.to_string().into_bytes();
    let converted_digest = registry::sha256_digest(&converted);
    let name = blob_name(&converted_digest).ok_or_else(|| {
        Error::FailedPrecondition(format!("bad manifest digest {converted_digest:?}"))
    })?;
    let converted_path = layout.join(name);
    if converted_path.symlink_metadata().is_err() {
        std::fs::write(&converted_path, &converted)
            .map_err(|e| Error::io("write", &converted_path, e))?;
    }
    Ok((converted_digest, size(converted.len())))
}

/// Bytes allocated on disk under `path` (hard links counted once, symlinks
/// not followed, other filesystems not entered).
pub fn disk_usage(path: &Path) -> u64 {
    let Ok(root) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let device = root.dev();
    let mut seen = HashSet::new();
    let mut total = 0_u64;
    let mut stack = vec![path.to_owned()];
    while let Some(current) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&current) else {
            continue;
        };
        if meta.dev() != device {
            continue;
        }
        if meta.nlink() <= 1 || seen.insert((meta.dev(), meta.ino())) {
            total = total.saturating_add(meta.blocks().saturating_mul(512));
        }
        if meta.is_dir()
            && let Ok(children) = std::fs::read_dir(&current)
        {
            stack.extend(children.filter_map(|c| c.ok().map(|c| c.path())));
        }
    }
    total
}

/// `1536` → `1.5 KiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    let mut whole = bytes;
    let mut tenths = 0;
    while whole >= 1024 && unit + 1 < UNITS.len() {
        tenths = (whole % 1024) * 10 / 1024;
        whole /= 1024;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{whole}.{tenths} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_classified() {
        assert_eq!(
            ImageRef::parse("oci:/images/busybox:1.36").unwrap(),
            ImageRef::OciLayout {
                path: "/images/busybox".into(),
                tag: Some("1.36".into())
            }
        );
        assert_eq!(
            ImageRef::parse("oci:/images/dir.v1/busybox").unwrap(),
            ImageRef::OciLayout {
                path: "/images/dir.v1/busybox".into(),
                tag: None
            }
        );
        assert_eq!(
            ImageRef::parse("oci-archive:/a/b.tar:latest").unwrap(),
            ImageRef::OciArchive {
                path: "/a/b.tar".into(),
                tag: Some("latest".into())
            }
        );
        assert_eq!(
            ImageRef::parse("rootfs:/srv/root").unwrap(),
            ImageRef::Rootfs("/srv/root".into())
        );
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_str().unwrap().to_owned();
        assert_eq!(
            ImageRef::parse(&dir).unwrap(),
            ImageRef::Rootfs(dir.clone().into())
        );
        std::fs::write(tmp.path().join("oci-layout"), b"{}").unwrap();
        assert!(matches!(
            ImageRef::parse(&dir).unwrap(),
            ImageRef::OciLayout { .. }
        ));
        let file = tmp.path().join("x.tar");
        std::fs::write(&file, b"").unwrap();
        assert!(matches!(
            ImageRef::parse(file.to_str().unwrap()).unwrap(),
            ImageRef::OciArchive { .. }
        ));
    }

    #[test]
    fn registry_references_are_recognized_and_bad_names_refused() {
        for (reference, whole) in [
            ("busybox", "docker.io/library/busybox:latest"),
            (
                "docker.io/library/busybox:latest",
                "docker.io/library/busybox:latest",
            ),
            ("ghcr.io/x/y", "ghcr.io/x/y:latest"),
            (
                "127.0.0.1:5000/openshell/busybox:1",
                "127.0.0.1:5000/openshell/busybox:1",
            ),
        ] {
            let ImageRef::Registry(parsed) = ImageRef::parse(reference).unwrap() else {
                panic!("{reference} is a registry reference");
            };
            assert_eq!(parsed.whole(), whole);
        }
        let err = ImageRef::parse("relative/Dir").unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        assert!(err.to_string().contains("oci-archive:"), "{err}");
        assert!(
            resolve_local("busybox")
                .unwrap_err()
                .to_string()
                .contains("pulled")
        );
        assert!(matches!(
            ImageRef::parse("oci:relative/dir").unwrap_err(),
            Error::InvalidArgument(_)
        ));
        assert!(
            ImageRef::parse("/does/not/exist")
                .unwrap_err()
                .to_string()
                .contains("does not exist")
        );
    }

    fn write_blob(layout: &Path, bytes: &[u8]) -> String {
        // Not a real sha256: the resolver only needs names to match.
        let hex = format!("{:064x}", bytes.len() as u128 * 7919 + u128::from(bytes[0]));
        std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
        std::fs::write(layout.join("blobs/sha256").join(&hex), bytes).unwrap();
        format!("sha256:{hex}")
    }

    fn fake_layout(layout: &Path, with_index: bool) -> String {
        std::fs::create_dir_all(layout).unwrap();
        std::fs::write(
            layout.join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        let layer = write_blob(layout, b"layer-bytes-0");
        let config = write_blob(
            layout,
            br#"{"config":{"Env":["PATH=/bin","A=1"],"Cmd":["/bin/sh"],"WorkingDir":"/w"}}"#,
        );
        let manifest = write_blob(
            layout,
            format!(
                r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":1}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":1}}]}}"#
            )
            .as_bytes(),
        );
        let top = if with_index {
            let index = write_blob(
                layout,
                format!(
                    r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{manifest}","size":1,"platform":{{"architecture":"{OCI_ARCH}","os":"linux"}}}}]}}"#
                )
                .as_bytes(),
            );
            (index, "application/vnd.oci.image.index.v1+json")
        } else {
            (
                manifest.clone(),
                "application/vnd.oci.image.manifest.v1+json",
            )
        };
        std::fs::write(
            layout.join("index.json"),
            format!(
                r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{}","digest":"{}","size":1,"annotations":{{"org.opencontainers.image.ref.name":"v1"}}}}]}}"#,
                top.1, top.0
            ),
        )
        .unwrap();
        manifest
    }

    #[test]
    fn layouts_resolve_to_the_manifest_digest_and_config() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = tmp.path().join("img");
        let manifest = fake_layout(&layout, false);
        let reference = format!("oci:{}:v1", layout.display());
        let ResolvedImage::Oci {
            digest,
            config,
            archive,
            ..
        } = resolve_local(&reference).unwrap()
        else {
            panic!("expected an OCI image");
        };
        assert_eq!(digest, manifest);
        assert!(!archive);
        assert_eq!(config.cmd, ["/bin/sh"]);
        assert_eq!(config.env, ["PATH=/bin", "A=1"]);
        assert_eq!(config.working_dir, "/w");

        let err = resolve_local(&format!("oci:{}:v2", layout.display()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("tag \"v2\"") && err.contains("v1"), "{err}");

        // The single manifest is used when no tag is given.
        let untagged = resolve_local(&format!("oci:{}", layout.display())).unwrap();
        assert_eq!(untagged.cache_key(), Some(cache_key(&manifest)));
    }

    #[test]
    fn image_indexes_are_followed_to_this_platform() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = tmp.path().join("multi");
        let manifest = fake_layout(&layout, true);
        let resolved = resolve_local(&format!("oci:{}:v1", layout.display())).unwrap();
        assert!(matches!(resolved, ResolvedImage::Oci { ref digest, .. } if *digest == manifest));
    }

    #[test]
    fn images_for_another_architecture_are_refused() {
        let other = if OCI_ARCH == "amd64" {
            "arm64"
        } else {
            "amd64"
        };
        let index: Manifest = serde_json::from_str(&format!(
            r#"{{"manifests":[{{"digest":"sha256:1","platform":{{"os":"linux","architecture":"{other}"}}}},
                {{"digest":"sha256:2","platform":{{"os":"windows","architecture":"{OCI_ARCH}"}}}}]}}"#
        ))
        .unwrap();
        assert!(index.is_index());
        let err = platform_manifest("img", &index.manifests).unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)));
        let text = err.to_string();
        assert!(
            text.contains(&format!("no linux/{OCI_ARCH} manifest"))
                && text.contains(&format!("linux/{other}"))
                && text.contains(&format!("windows/{OCI_ARCH}")),
            "{text}"
        );

        // A single manifest whose config names another architecture.
        let tmp = tempfile::tempdir().unwrap();
        let layout = tmp.path().join("img");
        fake_layout(&layout, false);
        for entry in std::fs::read_dir(layout.join("blobs/sha256")).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.starts_with(r#"{"config""#) {
                let patched = text.replacen(
                    '{',
                    &format!(r#"{{"architecture":"{other}","os":"linux","#),
                    1,
                );
                std::fs::write(&path, patched).unwrap();
            }
        }
        let err = resolve_local(&format!("oci:{}:v1", layout.display()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("built for linux/{other}")) && err.contains("not for this host"),
            "{err}"
        );
    }

    #[test]
    fn archives_resolve_like_layouts() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = tmp.path().join("img");
        let manifest = fake_layout(&layout, false);
        let tar_path = tmp.path().join("img.tar");
        let mut builder = tar::Builder::new(std::fs::File::create(&tar_path).unwrap());
        builder.append_dir_all(".", &layout).unwrap();
        builder.finish().unwrap();
        drop(builder);
        let resolved = resolve_local(tar_path.to_str().unwrap()).unwrap();
        let ResolvedImage::Oci {
            digest, archive, ..
        } = resolved
        else {
            panic!("expected an OCI image");
        };
        assert_eq!(digest, manifest);
        assert!(archive);
    }

    #[test]
    fn missing_layers_are_reported_at_resolve_time() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = tmp.path().join("img");
        fake_layout(&layout, false);
        for entry in std::fs::read_dir(layout.join("blobs/sha256")).unwrap() {
            let path = entry.unwrap().path();
            if std::fs::read(&path).unwrap() == b"layer-bytes-0" {
                std::fs::remove_file(path).unwrap();
            }
        }
        let err = resolve_local(&format!("oci:{}:v1", layout.display()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("layer") && err.contains("missing"), "{err}");
    }

    #[test]
    fn sizes_and_prune() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(3 << 30), "3.0 GiB");

        let tmp = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(tmp.path().join("images"));
        for key in ["sha256-a", "sha256-b"] {
            let dir = cache.entry_dir(key);
            std::fs::create_dir_all(dir.join("rootfs")).unwrap();
            std::fs::write(dir.join("rootfs/file"), vec![7_u8; 10_000]).unwrap();
            state::write_json(
                &dir.join("entry.json"),
                &CacheEntry {
                    digest: key.replace('-', ":"),
                    source: "oci:/x".into(),
                    created_ms: 1,
                },
            )
            .unwrap();
        }
        std::fs::create_dir_all(cache.dir().join(".tmp-sha256-c-1")).unwrap();
        assert_eq!(cache.entries().unwrap().len(), 2);
        assert!(disk_usage(&cache.entry_dir("sha256-a")) >= 10_000);

        let in_use: HashSet<String> = ["sha256-b".to_owned()].into();
        let removed = cache.prune(&in_use, std::time::Duration::ZERO).unwrap();
        let names: Vec<&str> = removed.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, [".tmp-sha256-c-1", "sha256-a"]);
        let left: Vec<String> = cache
            .entries()
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(left, ["sha256-b"]);
    }

    #[test]
    fn prune_waits_for_users_and_gives_up_clearly() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(tmp.path().join("images"));
        let held = cache.lock_shared().unwrap();
        let err = cache
            .prune(&HashSet::new(), std::time::Duration::from_millis(50))
            .unwrap_err()
            .to_string();
        assert!(err.contains("busy"), "{err}");
        drop(held);
        assert!(
            cache
                .prune(&HashSet::new(), std::time::Duration::ZERO)
                .is_ok()
        );
    }
}
